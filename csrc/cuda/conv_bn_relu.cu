// Training-mode BatchNorm + ReLU around the CUDA C++ convolution (the same algorithm as
// kernels/conv_bn_relu.py; cnnkern/ops/conv_bn_relu.py strings the steps together):
//
//   forward   the convolution's epilogue writes y and per-block (count, mean, M2) statistics
//             (conv2d_forward_cuda with stats=True); bn_finalize_cuda merges them (Chan et al.)
//             into the batch mean and variance and folds BN into per-channel scale/shift, in one
//             launch; bn_apply_cuda writes out = [relu](y * scale[c] + shift[c] [+ residual]) in one
//             pass; bn_update_running_cuda updates the running mean and variance in place and
//             increments the batch count (one launch, the momentum an argument).
//   backward  bn_backward_reduce_cuda: one pass over (grad, out, y) gives, per chunk of rows and
//             channel, sum g' and sum g' * y with g' = grad masked by the ReLU (out > 0);
//             bn_backward_coefficients_cuda adds the chunks in order and folds the BN backward
//             into per-channel coefficients (one launch); bn_backward_dy_cuda:
//             dy = a[c] * g' + b[c] * y + c[c].
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
__global__ void apply_kernel(const T* __restrict__ y, const T* __restrict__ res, T* __restrict__ out,
                             const at::opmath_type<T>* __restrict__ scale, const at::opmath_type<T>* __restrict__ shift,
                             int64_t n, int64_t K, int64_t PQ, bool relu) {
  using A = at::opmath_type<T>;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = channel_of<CL>(e, K, PQ);
    A v = static_cast<A>(y[e]) * scale[c] + shift[c];
    if (res != nullptr) v += static_cast<A>(res[e]);
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

// The per-channel finishing steps. A block owns 32 channels (threadIdx.x % 32, coalesced along K)
// with 8 row lanes (threadIdx.x / 32) striding over the rows; the lanes are added in order 0..7,
// so every sum has a fixed order. Parameters (gamma, beta, and the parameter gradients) have the
// BatchNorm module's dtype P; everything else the accumulation dtype A (float; double for double).
constexpr int kLanes = 8;

// stats (R, 3, K) rows of (count, mean, M2) -> mean, invstd = 1/sqrt(var + eps), biased var,
// scale = gamma * invstd, shift = beta - mean * scale. Two passes over the rows: the global mean,
// then M2 = sum(M2_t + n_t (mean_t - mean)^2), so there is no E[y^2] - E[y]^2 cancellation.
template <typename A, typename P>
__global__ void finalize_kernel(const A* __restrict__ stats, const P* __restrict__ gamma, const P* __restrict__ beta,
                                A* __restrict__ mean_o, A* __restrict__ invstd_o, A* __restrict__ var_o,
                                A* __restrict__ scale_o, A* __restrict__ shift_o, int64_t R, int64_t K, double eps) {
  __shared__ A s_x[kLanes][32], s_y[kLanes][32];
  __shared__ A s_n[32], s_mean[32];
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * 32 + tx;
  A n = A(0), s = A(0);
  if (k < K) {
    for (int64_t r = ty; r < R; r += kLanes) {
      const A c = stats[r * 3 * K + k];
      n += c;
      s += c * stats[r * 3 * K + K + k];
    }
  }
  s_x[ty][tx] = n;
  s_y[ty][tx] = s;
  __syncthreads();
  if (ty == 0) {
    A tn = A(0), ts = A(0);
    for (int i = 0; i < kLanes; ++i) {
      tn += s_x[i][tx];
      ts += s_y[i][tx];
    }
    s_n[tx] = tn > A(0) ? tn : A(1);  // channels past K: never stored
    s_mean[tx] = ts / s_n[tx];
  }
  __syncthreads();
  const A mu = s_mean[tx];
  A m2 = A(0);
  if (k < K) {
    for (int64_t r = ty; r < R; r += kLanes) {
      const A d = stats[r * 3 * K + K + k] - mu;
      m2 += stats[r * 3 * K + 2 * K + k] + stats[r * 3 * K + k] * d * d;
    }
  }
  s_x[ty][tx] = m2;  // every read of s_x in the first pass happened before the barrier above
  __syncthreads();
  if (ty == 0 && k < K) {
    A tm = A(0);
    for (int i = 0; i < kLanes; ++i) tm += s_x[i][tx];
    const A var = tm / s_n[tx];
    const A inv = A(1) / ::sqrt(var + static_cast<A>(eps));
    const A sc = (gamma != nullptr ? static_cast<A>(gamma[k]) : A(1)) * inv;
    mean_o[k] = mu;
    invstd_o[k] = inv;
    var_o[k] = var;
    scale_o[k] = sc;
    shift_o[k] = (beta != nullptr ? static_cast<A>(beta[k]) : A(0)) - mu * sc;
  }
}

// part (R, 2, K) rows of (sum g', sum g' y) over the M values of each channel -> dy = a g' + b y + c
// with sgx = sum g' xhat = invstd (sum g' y - mean sum g'), a = gamma invstd,
// b = -a invstd sgx / M, c = a (mean invstd sgx - sg) / M; and the parameter gradients sg, sgx.
template <typename A, typename P>
__global__ void coefficients_kernel(const A* __restrict__ part, const A* __restrict__ mean,
                                    const A* __restrict__ invstd, const P* __restrict__ gamma, A* __restrict__ a_o,
                                    A* __restrict__ b_o, A* __restrict__ c_o, P* __restrict__ sg_o,
                                    P* __restrict__ sgx_o, int64_t R, int64_t K, int64_t M) {
  __shared__ A s_g[kLanes][32], s_gy[kLanes][32];
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * 32 + tx;
  A sg = A(0), sgy = A(0);
  if (k < K) {
    for (int64_t r = ty; r < R; r += kLanes) {
      sg += part[r * 2 * K + k];
      sgy += part[r * 2 * K + K + k];
    }
  }
  s_g[ty][tx] = sg;
  s_gy[ty][tx] = sgy;
  __syncthreads();
  if (ty == 0 && k < K) {
    A tg = A(0), tgy = A(0);
    for (int i = 0; i < kLanes; ++i) {
      tg += s_g[i][tx];
      tgy += s_gy[i][tx];
    }
    const A mu = mean[k], inv = invstd[k];
    const A sgx = inv * (tgy - mu * tg);
    const A a = (gamma != nullptr ? static_cast<A>(gamma[k]) : A(1)) * inv;
    const A inv_m = A(1) / static_cast<A>(M);
    a_o[k] = a;
    b_o[k] = -a * inv * sgx * inv_m;
    c_o[k] = a * (mu * inv * sgx - tg) * inv_m;
    sg_o[k] = static_cast<P>(tg);
    sgx_o[k] = static_cast<P>(sgx);
  }
}

// running = running + momentum * (batch - running), the variance's batch value unbiased (var *
// unbias); in A, rounded once to the running statistics' dtypes (RM, RV); any stride.
template <typename A, typename RM, typename RV>
__global__ void running_stats_kernel(RM* __restrict__ rm, RV* __restrict__ rv, const A* __restrict__ mean,
                                     const A* __restrict__ var, int64_t K, int64_t stride_m, int64_t stride_v,
                                     double momentum, double unbias, int64_t* __restrict__ tracked) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tracked != nullptr && k == 0) *tracked += 1;  // the batch count, where given
  if (k >= K) return;
  const A w = static_cast<A>(momentum);
  const A old_m = static_cast<A>(rm[k * stride_m]), old_v = static_cast<A>(rv[k * stride_v]);
  rm[k * stride_m] = static_cast<RM>(old_m + w * (mean[k] - old_m));
  rv[k * stride_v] = static_cast<RV>(old_v + w * (var[k] * static_cast<A>(unbias) - old_v));
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

// A (K,) contiguous CUDA vector of dtype `dtype`.
void check_channel_vec(const char* op, const at::Tensor& v, int64_t K, at::ScalarType dtype, const char* name) {
  CNNKERN_CHECK_CUDA(v, name);
  TORCH_CHECK(v.dim() == 1 && v.size(0) == K && v.is_contiguous() && v.scalar_type() == dtype, "cnnkern ", op, ": ",
              name, " must be a contiguous (", K, ",) ", dtype, " vector, got ", v.sizes(), " ", v.scalar_type());
}

// A per-channel vector of `like` (N, K, P, Q) in its accumulation dtype (fp32; fp64 for double).
void check_vec(const char* op, const at::Tensor& v, const at::Tensor& like, const char* name) {
  check_channel_vec(op, v, like.size(1), like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat, name);
}

// Per-chunk partial sums (chunks, width, K), contiguous, fp32 or fp64.
void check_partials(const char* op, const at::Tensor& t, int64_t width, const char* name) {
  CNNKERN_CHECK_CUDA(t, name);
  TORCH_CHECK(t.dim() == 3 && t.size(1) == width && t.is_contiguous() &&
                  (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
              "cnnkern ", op, ": ", name, " must be a contiguous (rows, ", width, ", K) float32 or float64 tensor, got ",
              t.sizes(), " ", t.scalar_type());
}

void bn_apply_cuda(const at::Tensor& y, const at::Tensor& out, const at::Tensor& scale, const at::Tensor& shift,
                   bool relu, const std::optional<at::Tensor>& residual) {
  const char* op = "bn_apply (cuda)";
  CNNKERN_CHECK_CUDA(y, "y");
  const bool cl = residual.has_value() ? dense_layout(op, y, {&out, &*residual}) : dense_layout(op, y, {&out});
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
    const scalar_t* res = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
    kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(y.const_data_ptr<scalar_t>(), res,
                                                           out.mutable_data_ptr<scalar_t>(), scale.const_data_ptr<A>(),
                                                           shift.const_data_ptr<A>(), n, K, PQ, relu);
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

// The parameter dtype P: that of the first given tensor, else the accumulation dtype.
at::ScalarType param_dtype(std::initializer_list<const std::optional<at::Tensor>*> ts, at::ScalarType acc) {
  for (const auto* t : ts) {
    if (t->has_value()) return (*t)->scalar_type();
  }
  return acc;
}

template <typename P>
const P* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<P>() : nullptr;
}

void bn_finalize_cuda(const at::Tensor& stats, const std::optional<at::Tensor>& gamma,
                      const std::optional<at::Tensor>& beta, double eps, const at::Tensor& mean,
                      const at::Tensor& invstd, const at::Tensor& var, const at::Tensor& scale,
                      const at::Tensor& shift) {
  const char* op = "bn_finalize (cuda)";
  check_partials(op, stats, 3, "stats");
  const int64_t R = stats.size(0), K = stats.size(2);
  const auto acc = stats.scalar_type();
  const auto pdt = param_dtype({&gamma, &beta}, acc);
  if (gamma.has_value()) check_channel_vec(op, *gamma, K, pdt, "gamma");
  if (beta.has_value()) check_channel_vec(op, *beta, K, pdt, "beta");
  check_channel_vec(op, mean, K, acc, "mean");
  check_channel_vec(op, invstd, K, acc, "invstd");
  check_channel_vec(op, var, K, acc, "var");
  check_channel_vec(op, scale, K, acc, "scale");
  check_channel_vec(op, shift, K, acc, "shift");
  if (K == 0) return;
  TORCH_CHECK((K + 31) / 32 < (int64_t{1} << 31), "cnnkern ", op, ": too many channels (", K, ")");
  const c10::cuda::CUDAGuard guard(stats.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, "bn_finalize_cuda", [&] {
    using A = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pdt, "bn_finalize_cuda_param", [&] {
      using P = scalar_t;
      finalize_kernel<A, P><<<static_cast<unsigned>((K + 31) / 32), 32 * kLanes, 0, stream>>>(
          stats.const_data_ptr<A>(), opt_ptr<P>(gamma), opt_ptr<P>(beta), mean.mutable_data_ptr<A>(),
          invstd.mutable_data_ptr<A>(), var.mutable_data_ptr<A>(), scale.mutable_data_ptr<A>(),
          shift.mutable_data_ptr<A>(), R, K, eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void bn_update_running_cuda(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                            const at::Tensor& var, double unbias, double momentum,
                            const std::optional<at::Tensor>& num_batches_tracked) {
  const char* op = "bn_update_running (cuda)";
  const int64_t K = mean.numel();
  const auto acc = mean.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, "cnnkern ", op, ": mean must be float32 or float64, got ", acc);
  check_channel_vec(op, mean, K, acc, "mean");
  check_channel_vec(op, var, K, acc, "var");
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&running_mean, "running_mean"},
                                {&running_var, "running_var"}}) {
    CNNKERN_CHECK_CUDA(*t, name);
    TORCH_CHECK(t->dim() == 1 && t->size(0) == K && at::isFloatingType(t->scalar_type()), "cnnkern ", op, ": ", name,
                " must be a floating (", K, ",) vector, got ", t->sizes(), " ", t->scalar_type());
    TORCH_CHECK(K <= 1 || t->stride(0) != 0, "cnnkern ", op, ": ", name,
                " has stride 0: more than one of its elements refers to a single memory location (clone() it first)");
  }
  if (num_batches_tracked.has_value()) {
    const at::Tensor& t = *num_batches_tracked;
    CNNKERN_CHECK_CUDA(t, "num_batches_tracked");
    TORCH_CHECK(t.scalar_type() == at::kLong && t.numel() == 1, "cnnkern ", op,
                ": num_batches_tracked must be an int64 tensor of one element, got ", t.scalar_type(), " of shape ",
                t.sizes());
  }
  if (K == 0) {
    if (num_batches_tracked.has_value()) num_batches_tracked->add_(1);
    return;
  }
  TORCH_CHECK((K + 127) / 128 < (int64_t{1} << 31), "cnnkern ", op, ": too many channels (", K, ")");
  const c10::cuda::CUDAGuard guard(mean.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, "bn_update_running_cuda", [&] {
    using A = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(), "bn_update_running_m", [&] {
      using RM = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_var.scalar_type(), "bn_update_running_v", [&] {
        using RV = scalar_t;
        running_stats_kernel<A, RM, RV><<<static_cast<unsigned>((K + 127) / 128), 128, 0, stream>>>(
            running_mean.mutable_data_ptr<RM>(), running_var.mutable_data_ptr<RV>(), mean.const_data_ptr<A>(),
            var.const_data_ptr<A>(), K, running_mean.stride(0), running_var.stride(0), momentum, unbias,
            num_batches_tracked.has_value() ? num_batches_tracked->mutable_data_ptr<int64_t>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

void bn_backward_coefficients_cuda(const at::Tensor& part, const at::Tensor& mean, const at::Tensor& invstd,
                                   const std::optional<at::Tensor>& gamma, int64_t count, const at::Tensor& a,
                                   const at::Tensor& b, const at::Tensor& c, const at::Tensor& sg,
                                   const at::Tensor& sgx) {
  const char* op = "bn_backward_coefficients (cuda)";
  check_partials(op, part, 2, "part");
  TORCH_CHECK(count > 0, "cnnkern ", op, ": count must be positive, got ", count);
  const int64_t R = part.size(0), K = part.size(2);
  const auto acc = part.scalar_type();
  const auto pdt = sg.scalar_type();
  check_channel_vec(op, mean, K, acc, "mean");
  check_channel_vec(op, invstd, K, acc, "invstd");
  if (gamma.has_value()) check_channel_vec(op, *gamma, K, pdt, "gamma");
  check_channel_vec(op, a, K, acc, "a");
  check_channel_vec(op, b, K, acc, "b");
  check_channel_vec(op, c, K, acc, "c");
  check_channel_vec(op, sg, K, pdt, "sg");
  check_channel_vec(op, sgx, K, pdt, "sgx");
  if (K == 0) return;
  TORCH_CHECK((K + 31) / 32 < (int64_t{1} << 31), "cnnkern ", op, ": too many channels (", K, ")");
  const c10::cuda::CUDAGuard guard(part.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, "bn_backward_coefficients_cuda", [&] {
    using A = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pdt, "bn_backward_coefficients_cuda_param", [&] {
      using P = scalar_t;
      coefficients_kernel<A, P><<<static_cast<unsigned>((K + 31) / 32), 32 * kLanes, 0, stream>>>(
          part.const_data_ptr<A>(), mean.const_data_ptr<A>(), invstd.const_data_ptr<A>(), opt_ptr<P>(gamma),
          a.mutable_data_ptr<A>(), b.mutable_data_ptr<A>(), c.mutable_data_ptr<A>(), sg.mutable_data_ptr<P>(),
          sgx.mutable_data_ptr<P>(), R, K, count);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace
}  // namespace cnnkern

TORCH_LIBRARY_IMPL(cnnkern, CUDA, m) {
  m.impl("bn_finalize_cuda", &cnnkern::bn_finalize_cuda);
  m.impl("bn_update_running_cuda", &cnnkern::bn_update_running_cuda);
  m.impl("bn_backward_coefficients_cuda", &cnnkern::bn_backward_coefficients_cuda);
  m.impl("bn_apply_cuda", &cnnkern::bn_apply_cuda);
  m.impl("bn_backward_reduce_cuda", &cnnkern::bn_backward_reduce_cuda);
  m.impl("bn_backward_dy_cuda", &cnnkern::bn_backward_dy_cuda);
}
