// Local Response Normalization across channels, CUDA C++ (PyTorch's definition):
//
//   scale[n,c,h,w] = k + alpha/size * sum_{j in window(c)} x[n,j,h,w]^2,   out = x * scale^-beta
//   window(c) = [c-P, c+Q] clipped to [0, C),  P = size/2,  Q = (size-1)/2
//
// The algorithm is the one of kernels/local_response_norm.py (read its docstring for the why), so
// both backends agree step by step:
//   * one thread per spatial position (n, h, w) walks the channels with a running sum of squares:
//     the square of channel c+Q enters, that of c-P-1 leaves; cost per element independent of
//     size. When positions are too few to keep DRAM busy, the channels are split into chunks
//     (channel_chunk, the same rule as the Triton launcher's), each walked by its own thread after
//     re-entering the window of its first channel. A warp covers 32 consecutive positions: coalesced in NCHW; in channels_last each
//     thread reads its own contiguous channels, and the following channels hit the lines already
//     in L1. The re-reads (the leaving channel, the centre) come from L1/L2: x is read from DRAM
//     once and the output written once.
//   * the running sum is compensated (TwoSum); squares are formed with __fmul_rn/__dmul_rn so
//     that nvcc cannot contract them into the additions, which would break the exact bookkeeping.
//     Non-finite squares are counted, not summed, so they only affect the windows that hold them.
//   * x^-beta = exp2(-beta * log2(scale)) in fp32 (fp64 for double).
//   * backward recomputes scale (three running sums at channels i+P, i and i-Q-1) instead of
//     saving it from the forward: no extra tensor written or read.
// Channel loops are uniform across a warp (every thread walks the same channel), so the range
// tests below never diverge. All offsets are int64.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>

#include "common.h"

namespace cnnkern {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float square_rn(float v) { return __fmul_rn(v, v); }
__device__ __forceinline__ double square_rn(double v) { return __dmul_rn(v, v); }
// s^e for s >= 0 (NaN for s < 0 or NaN s, as pow): exp2(e * log2(s)).
__device__ __forceinline__ float pow_exp2(float s, float e) { return exp2f(e * log2f(s)); }
__device__ __forceinline__ double pow_exp2(double s, double e) { return exp2(e * log2(s)); }

// s += y, with the rounding error of the addition (exact, by TwoSum) added to comp.
template <typename A>
__device__ __forceinline__ void two_sum(A& s, A& comp, A y) {
  const A t = s + y;
  const A bp = t - s;
  comp += (s - (t - bp)) + (y - bp);
  s = t;
}

// A window's running sum of squares, compensated, with its NaN and inf squares counted apart.
template <typename A>
struct Cursor {
  A s = A(0), comp = A(0);
  int n_nan = 0, n_inf = 0;

  __device__ __forceinline__ void slide(A in, A out) {  // `in` enters, `out` leaves (0: none)
    const A qi = square_rn(in), qo = square_rn(out);
    const bool nan_i = isnan(qi), inf_i = isinf(qi), nan_o = isnan(qo), inf_o = isinf(qo);
    two_sum(s, comp, (nan_i || inf_i) ? A(0) : qi);
    two_sum(s, comp, -((nan_o || inf_o) ? A(0) : qo));
    n_nan += static_cast<int>(nan_i) - static_cast<int>(nan_o);
    n_inf += static_cast<int>(inf_i) - static_cast<int>(inf_o);
  }

  __device__ __forceinline__ A window() const {
    if (n_nan > 0) return std::numeric_limits<A>::quiet_NaN();
    if (n_inf > 0) return std::numeric_limits<A>::infinity();
    const A w = s + comp;
    return w > A(0) ? w : A(0);
  }
};

// Shape and strides. x (and grad_out) are read through their strides; outputs are dense NCHW or
// channels_last, addressed as n*so[0] + c*so[1] + s*so[2] with s = h*W + w.
struct Geometry {
  int64_t N, C, HW, W;
  int P, Q;             // window halves, clipped to C-1
  int n_chunks, chunk;  // channels [k*chunk, (k+1)*chunk) per thread
  int64_t sx[4];
  int64_t sg[4];  // grad_out (backward only)
  int64_t so[3];
};

template <typename A>
struct Params {
  A k, an, nb, nb1, cf;  // k, alpha/size, -beta, -beta-1, 2*alpha*beta/size
};

template <typename T>
__device__ __forceinline__ at::opmath_type<T> load(const T* p, int64_t stride, int ch) {
  return static_cast<at::opmath_type<T>>(p[static_cast<int64_t>(ch) * stride]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lrn_forward_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                               Geometry g, Params<at::opmath_type<T>> pr) {
  using A = at::opmath_type<T>;
  const int C = static_cast<int>(g.C), P = g.P, Q = g.Q;
  const int64_t total = g.N * g.n_chunks * g.HW;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < total; item += step) {
    // item = (n * n_chunks + chunk) * HW + s: consecutive threads, consecutive positions
    const int64_t t = item / g.HW, s = item - t * g.HW;
    const int64_t n = t / g.n_chunks;
    const int c0 = static_cast<int>(t - n * g.n_chunks) * g.chunk;
    const int c1 = c0 + g.chunk < C ? c0 + g.chunk : C;
    const int64_t h = s / g.W, w = s - h * g.W;
    const T* xp = x + n * g.sx[0] + h * g.sx[2] + w * g.sx[3];
    T* yp = y + n * g.so[0] + s * g.so[2];
    const int64_t sc = g.sx[1];
    // Window of channel c0: [lo, c0+Q], lo = max(0, c0-P): channels lo..c0+Q-1 enter first; a
    // channel leaves only if it entered (>= lo).
    const int lo = c0 - P > 0 ? c0 - P : 0;
    Cursor<A> cur;
    for (int e = lo; e < c0 + Q; ++e) cur.slide(e < C ? load(xp, sc, e) : A(0), A(0));
    // x[c+Q], the only load not served by L1, is prefetched two channels ahead (a0 = x[c+Q],
    // a1 = x[c+Q+1] at the top of step c) so that each thread keeps several DRAM loads in flight.
    // (Unrolling the loop instead made ptxas spill.)
    A a0 = c0 + Q < C ? load(xp, sc, c0 + Q) : A(0);
    A a1 = c0 + Q + 1 < C ? load(xp, sc, c0 + Q + 1) : A(0);
    for (int c = c0; c < c1; ++c) {
      const A a = a0;
      a0 = a1;
      a1 = c + Q + 2 < C ? load(xp, sc, c + Q + 2) : A(0);
      const int l = c - P - 1;
      cur.slide(a, l >= lo ? load(xp, sc, l) : A(0));
      const A scale = pr.k + pr.an * cur.window();
      yp[static_cast<int64_t>(c) * g.so[1]] = static_cast<T>(load(xp, sc, c) * pow_exp2(scale, pr.nb));
    }
  }
}

// grad_in[i] = g[i]*scale[i]^-beta - cf * x[i] * sum_{j in [i-Q, i+P]} g[j]*x[j]*scale[j]^(-beta-1).
// Cursors at channels i+P (lead), i (mid) and i-Q-1 (lag); with L = P+Q+1 their windows are
// [i, i+L-1], [i-P, i+Q], [i-L, i-1]. A thread finishes channels [c0, c1) (its chunk); no window
// any of them needs reaches below c0-L, so channels below lo = max(0, c0-L) are treated as
// absent: from i = lo+1-L all three windows (and T's window [i-Q, i+P]) start empty, and the sums
// are exact from the first output on. Steps before c0 only warm the sums up.
// At most 64 registers (4 blocks of 256 threads per SM): the fp64 instantiation would otherwise
// take ~78; capped, ptxas still needs no spills (checked by tests/test_build.py).
template <typename T>
__global__ void __launch_bounds__(kThreads, 4) lrn_backward_kernel(const T* __restrict__ x, const T* __restrict__ gr,
                                                                T* __restrict__ gi, Geometry g,
                                                                Params<at::opmath_type<T>> pr) {
  using A = at::opmath_type<T>;
  const int C = static_cast<int>(g.C), P = g.P, Q = g.Q, L = g.P + g.Q + 1;
  const int64_t total = g.N * g.n_chunks * g.HW;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < total; item += step) {
    const int64_t t = item / g.HW, s = item - t * g.HW;
    const int64_t n = t / g.n_chunks;
    const int c0 = static_cast<int>(t - n * g.n_chunks) * g.chunk;
    const int c1 = c0 + g.chunk < C ? c0 + g.chunk : C;
    const int lo = c0 - L > 0 ? c0 - L : 0;
    const int64_t h = s / g.W, w = s - h * g.W;
    const T* xp = x + n * g.sx[0] + h * g.sx[2] + w * g.sx[3];
    const T* gp = gr + n * g.sg[0] + h * g.sg[2] + w * g.sg[3];
    T* op = gi + n * g.so[0] + s * g.so[2];
    const int64_t sxc = g.sx[1], sgc = g.sg[1];
    Cursor<A> lead, mid, lag;
    A t_sum = A(0), t_comp = A(0);
    // The two loads not served by L1, x[i+L-1] and g[i+P], are prefetched one step ahead (not
    // for fp64: the two extra registers would make ptxas spill under the 64-register cap).
    constexpr bool kPrefetch = sizeof(A) == 4;
    const int i0 = lo + 1 - L;
    A xa_next = kPrefetch ? load(xp, sxc, lo) : A(0);  // x[i+L-1] at i = i0 (lo < C)
    A gt_next = (kPrefetch && i0 + P >= lo && i0 + P < C) ? load(gp, sgc, i0 + P) : A(0);  // g[i+P] at i = i0
    for (int i = i0; i < c1; ++i) {
      A xa, gt;
      if constexpr (kPrefetch) {
        xa = xa_next;
        xa_next = i + L < C ? load(xp, sxc, i + L) : A(0);
        gt = gt_next;
        gt_next = (i + P + 1 >= lo && i + P + 1 < C) ? load(gp, sgc, i + P + 1) : A(0);
      } else {
        xa = i + L - 1 < C ? load(xp, sxc, i + L - 1) : A(0);
        gt = (i + P >= lo && i + P < C) ? load(gp, sgc, i + P) : A(0);
      }
      int ch = i - 1;
      const A xb = ch >= lo ? load(xp, sxc, ch) : A(0);
      ch = i + Q;
      const A xc = (ch >= lo && ch < C) ? load(xp, sxc, ch) : A(0);
      ch = i - P - 1;
      const A xd = ch >= lo ? load(xp, sxc, ch) : A(0);
      ch = i - L - 1;
      const A xe = ch >= lo ? load(xp, sxc, ch) : A(0);
      lead.slide(xa, xb);
      mid.slide(xc, xd);
      lag.slide(xb, xe);

      ch = i + P;  // T[i+P] enters T's window
      if (ch >= lo && ch < C) {
        two_sum(t_sum, t_comp, gt * load(xp, sxc, ch) * pow_exp2(pr.k + pr.an * lead.window(), pr.nb1));
      }
      ch = i - Q - 1;  // T[i-Q-1] leaves it
      if (ch >= lo) {
        two_sum(t_sum, t_comp, -(load(gp, sgc, ch) * load(xp, sxc, ch) * pow_exp2(pr.k + pr.an * lag.window(), pr.nb1)));
      }
      if (i >= c0) {
        const A gv = load(gp, sgc, i) * pow_exp2(pr.k + pr.an * mid.window(), pr.nb);
        op[static_cast<int64_t>(i) * g.so[1]] = static_cast<T>(gv - pr.cf * load(xp, sxc, i) * (t_sum + t_comp));
      }
    }
  }
}

void check_args(const char* op, const at::Tensor& x, int64_t size) {
  CNNKERN_CHECK_CUDA(x, "x");
  TORCH_CHECK(x.dim() == 4, "cnnkern: ", op, " expects a 4-D x (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(size >= 1, "cnnkern: ", op, ": size must be >= 1, got ", size);
  TORCH_CHECK(x.size(1) < (int64_t{1} << 29), "cnnkern: ", op, ": too many channels (", x.size(1), ")");
}

// Channels per thread: the rule of kernels/local_response_norm.py (_channel_chunk). A walk over a
// position's channels is one serial chain; when the N*H*W chains are fewer than 2 per thread slot
// (2 * SMs * 2048), split the channels, in chunks of at least 8 window spans (each chunk first
// re-enters the window of its first channel: at most 1/8 extra steps forward, 1/4 backward).
int channel_chunk(int64_t positions, int64_t channels, int64_t span) {
  const int64_t target = 2 * static_cast<int64_t>(sm_count()) * 2048;
  const int64_t p = std::max<int64_t>(positions, 1);
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>((target + p - 1) / p, channels / (8 * span)));
  return static_cast<int>((channels + n_chunks - 1) / n_chunks);
}

Geometry geometry(const at::Tensor& x, const at::Tensor& out, int64_t size) {
  Geometry g{};
  g.N = x.size(0);
  g.C = x.size(1);
  g.HW = x.size(2) * x.size(3);
  g.W = x.size(3);
  g.P = static_cast<int>(std::min<int64_t>(size / 2, g.C - 1));
  g.Q = static_cast<int>(std::min<int64_t>((size - 1) / 2, g.C - 1));
  g.chunk = channel_chunk(g.N * g.HW, g.C, g.P + g.Q + 1);
  g.n_chunks = static_cast<int>((g.C + g.chunk - 1) / g.chunk);
  for (int d = 0; d < 4; ++d) g.sx[d] = x.stride(d);
  // out is freshly allocated dense NCHW or NHWC: its W stride is the spatial stride (1 or C).
  g.so[0] = out.stride(0);
  g.so[1] = out.stride(1);
  g.so[2] = out.stride(3);
  return g;
}

template <typename A>
Params<A> params(int64_t size, double alpha, double beta, double k) {
  const double n = static_cast<double>(size);
  return Params<A>{static_cast<A>(k), static_cast<A>(alpha / n), static_cast<A>(-beta), static_cast<A>(-beta - 1.0),
                   static_cast<A>(2.0 * alpha * beta / n)};
}

// PyTorch's composite LRN ends with x / div, div NCHW-contiguous: that elementwise op's layout.
at::MemoryFormat lrn_memory_format(const at::Tensor& x) {
  const int64_t c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t nchw[4] = {c * h * w, h * w, w, 1};
  return elementwise_memory_format(x.sizes(), {x.strides(), at::IntArrayRef(nchw, 4)});
}

at::Tensor local_response_norm_cuda(const at::Tensor& x, int64_t size, double alpha, double beta, double k) {
  check_args("local_response_norm", x, size);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(lrn_memory_format(x)));
  if (out.numel() == 0) return out;
  const Geometry g = geometry(x, out, size);
  const unsigned int grid = grid_for(g.N * g.n_chunks * g.HW, kThreads);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "local_response_norm_cuda", [&] {
    lrn_forward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g,
        params<at::opmath_type<scalar_t>>(size, alpha, beta, k));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor local_response_norm_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, int64_t size,
                                             double alpha, double beta, double k) {
  check_args("local_response_norm_backward", x, size);
  CNNKERN_CHECK_CUDA(grad_out, "grad_out");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "cnnkern: local_response_norm_backward: grad_out ", grad_out.sizes(),
              " and x ", x.sizes(), " differ in shape");
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "cnnkern: local_response_norm_backward: grad_out has dtype ",
              grad_out.scalar_type(), " but x has dtype ", x.scalar_type());
  TORCH_CHECK(grad_out.device() == x.device(), "cnnkern: local_response_norm_backward: grad_out is on ",
              grad_out.device(), " but x is on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor gi = at::empty(x.sizes(), x.options().memory_format(lrn_memory_format(x)));
  if (gi.numel() == 0) return gi;
  Geometry g = geometry(x, gi, size);
  for (int d = 0; d < 4; ++d) g.sg[d] = grad_out.stride(d);  // read through its strides (expanded too)
  const unsigned int grid = grid_for(g.N * g.n_chunks * g.HW, kThreads);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "local_response_norm_backward_cuda", [&] {
    lrn_backward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), grad_out.const_data_ptr<scalar_t>(), gi.mutable_data_ptr<scalar_t>(), g,
        params<at::opmath_type<scalar_t>>(size, alpha, beta, k));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gi;
}

}  // namespace
}  // namespace cnnkern

TORCH_LIBRARY_IMPL(cnnkern, CUDA, m) {
  m.impl("local_response_norm_cuda", &cnnkern::local_response_norm_cuda);
  m.impl("local_response_norm_backward_cuda", &cnnkern::local_response_norm_backward_cuda);
}
