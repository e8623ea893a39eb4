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

// The memory format of an output that follows `t`: channels_last when t is channels_last
// (and not also plainly contiguous), contiguous otherwise. The Python fake implementations use the
// same rule (cnnkern/ops/_common.py: output_channels_last).
inline at::MemoryFormat output_memory_format(const at::Tensor& t) {
  if (t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
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
