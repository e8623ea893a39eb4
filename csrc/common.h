// Helpers shared by the CUDA C++ kernels of cnnkern. Only ATen/c10 headers: torch/extension.h and
// pybind11 stay out of .cu files (they triple the compile time).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace cnnkern {

// A register array that is loaded and stored as one 16-byte (or narrower) memory transaction.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Elements per 16-byte access for element type T (float: 4, half/bf16: 8, double: 2).
template <typename T>
constexpr int vec16() {
  return 16 / static_cast<int>(sizeof(T)) > 0 ? 16 / static_cast<int>(sizeof(T)) : 1;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// The memory format of an output that follows `t`, PyTorch's rule: t's suggested memory format
// (channels_last or contiguous; ambiguous strides decide as in PyTorch). The Python side mirrors
// it (cnnkern/ops/_common.py: output_channels_last).
inline at::MemoryFormat output_memory_format(const at::Tensor& t) {
  if (t.dim() == 4 && t.suggest_memory_format() == at::MemoryFormat::ChannelsLast) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// Whether (sizes, strides) of a 4-D tensor is dense in the dim order `order` (fastest first),
// size-1 dims ignored as PyTorch's is_contiguous ignores them.
inline bool dense_in(at::IntArrayRef sizes, at::IntArrayRef strides, const int (&order)[4]) {
  for (int64_t s : sizes) {
    if (s == 0) return true;
  }
  int64_t expected = 1;
  for (int d : order) {
    if (sizes[d] != 1) {
      if (strides[d] != expected) return false;
      expected *= sizes[d];
    }
  }
  return true;
}

// The layout of PyTorch's elementwise ops (TensorIterator) for an output of the 4-D operands'
// common shape `sizes`, the operands given by their strides: contiguous when every operand is,
// channels_last when every one is channels_last-contiguous, else the dim order of the first
// operand whose strides tell the dims apart (channels_last when the channels come out fastest).
// The Python side is the same rule (cnnkern/ops/_common.py: elementwise_channels_last).
inline at::MemoryFormat elementwise_memory_format(at::IntArrayRef sizes,
                                                  std::initializer_list<at::IntArrayRef> operands) {
  static constexpr int kNCHW[4] = {3, 2, 1, 0}, kCL[4] = {1, 3, 2, 0};
  bool all_nchw = true, all_cl = true;
  for (const auto& st : operands) {
    all_nchw = all_nchw && dense_in(sizes, st, kNCHW);
    all_cl = all_cl && dense_in(sizes, st, kCL);
  }
  if (all_nchw) return at::MemoryFormat::Contiguous;
  if (all_cl) return at::MemoryFormat::ChannelsLast;
  auto should_swap = [&](int d0, int d1) {
    for (const auto& st : operands) {
      const int64_t s0 = st[d0], s1 = st[d1];
      if (s0 == 0 || s1 == 0) continue;
      if (s0 != s1) return s0 < s1 ? -1 : 1;
      if (sizes[d0] > sizes[d1]) return 1;
    }
    return 0;
  };
  int perm[4] = {3, 2, 1, 0};
  for (int i = 1; i < 4; ++i) {  // TensorIterator's insertion sort, ambiguous comparisons left in place
    int d1 = i;
    for (int d0 = i - 1; d0 >= 0; --d0) {
      const int c = should_swap(perm[d0], perm[d1]);
      if (c > 0) {
        std::swap(perm[d0], perm[d1]);
        d1 = d0;
      } else if (c < 0) {
        break;
      }
    }
  }
  return perm[0] == 1 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// An elementwise op (a ReLU) applied to a dense output of `sizes` in `fmt`: channels_last only
// where that is not also NCHW-contiguous.
inline at::MemoryFormat unary_memory_format(at::IntArrayRef sizes, at::MemoryFormat fmt) {
  if (fmt != at::MemoryFormat::ChannelsLast) return fmt;
  const int64_t c = sizes[1], h = sizes[2], w = sizes[3];
  const int64_t cl[4] = {c * h * w, 1, w * c, c};
  static constexpr int kNCHW[4] = {3, 2, 1, 0};
  return dense_in(sizes, cl, kNCHW) ? at::MemoryFormat::Contiguous : fmt;
}

// Grid for a grid-stride loop over `work` items with `threads` per block: enough blocks to fill
// every SM several times over, never more than the work needs.
// (ATen/cuda/CUDAContext.h would give the device properties, but it pulls in the cuBLAS and
// cuSPARSE headers, which a bare toolkit does not have.)
inline int sm_count() {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

inline unsigned int grid_for(int64_t work, int threads) {
  const int64_t sms = sm_count();
  const int64_t need = (work + threads - 1) / threads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(need, sms * 16)));
}

}  // namespace cnnkern

#define CNNKERN_CHECK_CUDA(t, name) \
  TORCH_CHECK((t).is_cuda(), "cnnkern: ", name, " must be a CUDA tensor, got device ", (t).device())
