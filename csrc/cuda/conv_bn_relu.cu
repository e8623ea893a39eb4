// Training-mode BatchNorm + ReLU around the CUDA C++ convolution (the same algorithm as
// kernels/conv_bn_relu.py; cnnkern/ops/conv_bn_relu.py strings the steps together):
//
//   forward   the convolution's epilogue writes y and per-block (count, mean, M2) statistics
//             (conv2d_forward_cuda with stats=True); the host merges them (Chan et al.) into the
//             batch mean and variance and folds BN into per-channel scale/shift; bn_apply_cuda
//             writes out = [relu](y * scale[c] + shift[c]) in one pass.
//   backward  bn_backward_reduce_cuda: one pass over (grad, out, y) gives, per chunk of rows and
//             channel, sum g' and sum g' * y with g' = grad masked by the ReLU (out > 0);
//             the host adds the chunks in order and folds the BN backward into per-channel
//             coefficients; bn_backward_dy_cuda: dy = a[c] * g' + b[c] * y + c[c].
//
// y, out, grad and dy share one dense layout, NCHW or NHWC: the channel of linear element e is
// (e / PQ) % K or e % K. No atomics: the reductions are fixed-order, so results are bitwise
// reproducible. Elementwise math in the accumulator type (fp32; fp64 for double).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common.h"

namespace cnnkern {
namespace {

constexpr int kThreads = 256;

template <bool CL>
__device__ __forceinline__ int64_t channel_of(int64_t e, int64_t K, int64_t PQ) {
  return CL ? e % K : (e / PQ) % K;
}

template <typename T, bool CL>
__global__ void apply_kernel(const T* __restrict__ y, T* __restrict__ out, const at::opmath_type<T>* __restrict__ scale,
                             const at::opmath_type<T>* __restrict__ shift, int64_t n, int64_t K, int64_t PQ,
                             bool relu) {
  using A = at::opmath_type<T>;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = channel_of<CL>(e, K, PQ);
    A v = static_cast<A>(y[e]) * scale[c] + shift[c];
    if (relu && v < A(0)) v = A(0);
    out[e] = static_cast<T>(v);
  }
}

template <typename T, bool CL>
__global__ void dy_kernel(const T* __restrict__ g, const T* __restrict__ out, const T* __restrict__ y,
                          T* __restrict__ dy, const at::opmath_type<T>* __restrict__ a,
                          const at::opmath_type<T>* __restrict__ b, const at::opmath_type<T>* __restrict__ c,
                          int64_t n, int64_t K, int64_t PQ) {
  using A = at::opmath_type<T>;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ch = channel_of<CL>(e, K, PQ);
    A gv = static_cast<A>(g[e]);
    if (out != nullptr && static_cast<A>(out[e]) <= A(0)) gv = A(0);  // ReLU mask (threshold_backward)
    dy[e] = static_cast<T>(a[ch] * gv + b[ch] * static_cast<A>(y[e]) + c[ch]);
  }
}

// NHWC: the tensors are (M, K) matrices. Block (chunk, kb): 32 channels x 8 row lanes over rows
// [chunk*rows_per, ...); the 8 lanes are added in order 0..7.
template <typename T>
__global__ void reduce_nhwc_kernel(const T* __restrict__ g, const T* __restrict__ out, const T* __restrict__ y,
                                   at::opmath_type<T>* __restrict__ part, int64_t M, int64_t K, int64_t rows_per) {
  using A = at::opmath_type<T>;
  __shared__ A s_g[8][32], s_gy[8][32];
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const int64_t k = static_cast<int64_t>(blockIdx.y) * 32 + tx;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per;
  const int64_t r1 = r0 + rows_per < M ? r0 + rows_per : M;
  A sg = A(0), sgy = A(0);
  if (k < K) {
    for (int64_t r = r0 + ty; r < r1; r += 8) {
      const int64_t e = r * K + k;
      A gv = static_cast<A>(g[e]);
      if (out != nullptr && static_cast<A>(out[e]) <= A(0)) gv = A(0);
      sg += gv;
      sgy += gv * static_cast<A>(y[e]);
    }
  }
  s_g[ty][tx] = sg;
  s_gy[ty][tx] = sgy;
  __syncthreads();
  if (ty == 0 && k < K) {
    A tg = A(0), tgy = A(0);
    for (int i = 0; i < 8; ++i) {
      tg += s_g[i][tx];
      tgy += s_gy[i][tx];
    }
    part[static_cast<int64_t>(blockIdx.x) * 2 * K + k] = tg;
    part[static_cast<int64_t>(blockIdx.x) * 2 * K + K + k] = tgy;
  }
}

// NCHW: block (n, k) reduces the PQ plane of channel k of image n; a fixed tree in shared memory.
template <typename T>
__global__ void reduce_nchw_kernel(const T* __restrict__ g, const T* __restrict__ out, const T* __restrict__ y,
                                   at::opmath_type<T>* __restrict__ part, int64_t K, int64_t PQ) {
  using A = at::opmath_type<T>;
  __shared__ A s_g[kThreads], s_gy[kThreads];
  const int64_t n = blockIdx.x, k = blockIdx.y;
  const int64_t base = (n * K + k) * PQ;
  A sg = A(0), sgy = A(0);
  for (int64_t i = threadIdx.x; i < PQ; i += kThreads) {
    A gv = static_cast<A>(g[base + i]);
    if (out != nullptr && static_cast<A>(out[base + i]) <= A(0)) gv = A(0);
    sg += gv;
    sgy += gv * static_cast<A>(y[base + i]);
  }
  s_g[threadIdx.x] = sg;
  s_gy[threadIdx.x] = sgy;
  __syncthreads();
  for (int step = kThreads / 2; step > 0; step /= 2) {
    if (threadIdx.x < step) {
      s_g[threadIdx.x] += s_g[threadIdx.x + step];
      s_gy[threadIdx.x] += s_gy[threadIdx.x + step];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    part[n * 2 * K + k] = s_g[0];
    part[n * 2 * K + K + k] = s_gy[0];
  }
}

// The layout all the tensors share: true for channels_last, false for NCHW; anything else is an error.
bool dense_layout(const char* op, const at::Tensor& ref, std::initializer_list<const at::Tensor*> others) {
  TORCH_CHECK(ref.dim() == 4, "cnnkern ", op, ": expects 4-D tensors, got ", ref.sizes());
  const bool cl = !ref.is_contiguous() && ref.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(cl || ref.is_contiguous(), "cnnkern ", op, ": expects dense NCHW or channels_last tensors");
  for (const at::Tensor* t : others) {
    CNNKERN_CHECK_CUDA(*t, op);
    const at::MemoryFormat fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    TORCH_CHECK(t->sizes() == ref.sizes() && t->is_contiguous(fmt) && t->scalar_type() == ref.scalar_type(), "cnnkern ",
                op, ": tensors must share shape, dense layout and dtype; got ", t->sizes(), "/", t->strides(), " vs ",
                ref.sizes(), "/", ref.strides());
  }
  return cl;
}

void check_vec(const char* op, const at::Tensor& v, const at::Tensor& like, const char* name) {
  CNNKERN_CHECK_CUDA(v, name);
  const auto acc = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(v.dim() == 1 && v.size(0) == like.size(1) && v.is_contiguous() && v.scalar_type() == acc, "cnnkern ",
              op, ": ", name, " must be a contiguous (", like.size(1), ",) ", acc, " vector, got ", v.sizes(), " ",
              v.scalar_type());
}

void bn_apply_cuda(const at::Tensor& y, const at::Tensor& out, const at::Tensor& scale, const at::Tensor& shift,
                   bool relu) {
  const char* op = "bn_apply (cuda)";
  CNNKERN_CHECK_CUDA(y, "y");
  const bool cl = dense_layout(op, y, {&out});
  check_vec(op, scale, y, "scale");
  check_vec(op, shift, y, "shift");
  const int64_t n = y.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(y.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t K = y.size(1), PQ = y.size(2) * y.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_apply_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    auto kernel = cl ? apply_kernel<scalar_t, true> : apply_kernel<scalar_t, false>;
    kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(y.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                                           scale.const_data_ptr<A>(), shift.const_data_ptr<A>(), n, K,
                                                           PQ, relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor bn_backward_reduce_cuda(const at::Tensor& grad, const std::optional<at::Tensor>& out, const at::Tensor& y) {
  const char* op = "bn_backward_reduce (cuda)";
  CNNKERN_CHECK_CUDA(y, "y");
  const bool cl = out.has_value() ? dense_layout(op, y, {&grad, &*out}) : dense_layout(op, y, {&grad});
  const int64_t K = y.size(1), PQ = y.size(2) * y.size(3), M = y.size(0) * PQ;
  const auto acc = y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t rows_per = 1024;
  const int64_t chunks = cl ? std::max<int64_t>(1, (M + rows_per - 1) / rows_per) : std::max<int64_t>(1, y.size(0));
  at::Tensor part = at::empty({chunks, 2, K}, y.options().dtype(acc));
  if (M == 0 || K == 0) return part.zero_();
  TORCH_CHECK(chunks < (int64_t{1} << 31) && (K + 31) / 32 < 65536 && K < 65536, "cnnkern ", op,
              ": too many channels or rows (", K, ", ", M, ")");
  const c10::cuda::CUDAGuard guard(y.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_backward_reduce_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* po = out.has_value() ? out->const_data_ptr<scalar_t>() : nullptr;
    if (cl) {
      reduce_nhwc_kernel<scalar_t><<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>((K + 31) / 32)),
                                     kThreads, 0, stream>>>(grad.const_data_ptr<scalar_t>(), po,
                                                            y.const_data_ptr<scalar_t>(), part.mutable_data_ptr<A>(),
                                                            M, K, rows_per);
    } else {
      reduce_nchw_kernel<scalar_t><<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(K)), kThreads, 0,
                                     stream>>>(grad.const_data_ptr<scalar_t>(), po, y.const_data_ptr<scalar_t>(),
                                               part.mutable_data_ptr<A>(), K, PQ);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return part;
}

void bn_backward_dy_cuda(const at::Tensor& grad, const std::optional<at::Tensor>& out, const at::Tensor& y,
                         const at::Tensor& dy, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  const char* op = "bn_backward_dy (cuda)";
  CNNKERN_CHECK_CUDA(y, "y");
  const bool cl = out.has_value() ? dense_layout(op, y, {&grad, &dy, &*out}) : dense_layout(op, y, {&grad, &dy});
  check_vec(op, a, y, "a");
  check_vec(op, b, y, "b");
  check_vec(op, c, y, "c");
  const int64_t n = y.numel();
  if (n == 0) return;
  const int64_t K = y.size(1), PQ = y.size(2) * y.size(3);
  const c10::cuda::CUDAGuard guard(y.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_backward_dy_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* po = out.has_value() ? out->const_data_ptr<scalar_t>() : nullptr;
    auto kernel = cl ? dy_kernel<scalar_t, true> : dy_kernel<scalar_t, false>;
    kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(grad.const_data_ptr<scalar_t>(), po,
                                                           y.const_data_ptr<scalar_t>(), dy.mutable_data_ptr<scalar_t>(),
                                                           a.const_data_ptr<A>(), b.const_data_ptr<A>(),
                                                           c.const_data_ptr<A>(), n, K, PQ);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace cnnkern

TORCH_LIBRARY_IMPL(cnnkern, CUDA, m) {
  m.impl("bn_apply_cuda", &cnnkern::bn_apply_cuda);
  m.impl("bn_backward_reduce_cuda", &cnnkern::bn_backward_reduce_cuda);
  m.impl("bn_backward_dy_cuda", &cnnkern::bn_backward_dy_cuda);
}
