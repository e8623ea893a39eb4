// Gradients of the filter and of the bias, CUDA C++ (every dtype; fp32 accumulation for the
// 16-bit types, fp64 for double). Deterministic by construction, with or without
// torch.use_deterministic_algorithms: no atomics anywhere.
//
// grad-weight is a GEMM with rows o (output channels of a group), columns j = c*R*S + r*S + s
// (filter entries) and a reduction over the L = N*P*Q output pixels, which is long (up to ~10^6)
// while the GEMM itself is small. So the reduction is split ("split-K"): split z sums the fixed
// pixel slice [z*chunk, (z+1)*chunk) into its own fp32 partial tile; a second kernel adds the
// partials in the order z = 0, 1, ... and writes the filter gradient through its strides. Same
// inputs and launch, same bits.
//
// Tiling of the partial GEMM: a block of 256 threads owns 64 rows x 64 columns and walks its
// pixel slice 16 pixels at a time, staging grad_out (16 x 64 rows) and the gathered input
// (16 x 64 columns; zero where a tap falls in the padding) in shared memory; each thread keeps a
// 4 x 4 register tile (rows 4*(t/16)+i, columns (t%16) + 16*j).
// grad-bias: per split, one thread per channel sums its slice; then the same ordered reduction.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "conv2d.h"

namespace cnnkern {
namespace conv {
namespace {

constexpr int kThreads = 256;
constexpr int TM = 64, TN = 64, TL = 16;

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) wgrad_kernel(const WgradParams<T, A> p) {
  __shared__ A gy_s[TL][TM];
  __shared__ A x_s[TL][TN];
  const int t = threadIdx.x;
  const int RS = p.R * p.S, J = p.C * RS;
  const int o0 = blockIdx.x * TM, j0 = blockIdx.y * TN;
  const int g = blockIdx.z % p.G, split = blockIdx.z / p.G;
  const int64_t l_begin = static_cast<int64_t>(split) * p.chunk;
  const int64_t l_end = l_begin + p.chunk < p.L ? l_begin + p.chunk : p.L;
  const int PQ = p.P * p.Q;

  // Loader roles: element e = t + 256*k of a 16 x 64 stage is (pixel e/64, column e%64); the
  // column (t % 64) is the same for all four of this thread's elements.
  const int lcol = t % 64;
  const int o_ld = o0 + lcol;
  const bool o_ok = o_ld < p.K;
  const int j_ld = j0 + lcol;
  const bool j_ok = j_ld < J;
  int c_ld = 0, r_ld = 0, s_ld = 0;
  if (j_ok) {
    c_ld = j_ld / RS;
    r_ld = (j_ld % RS) / p.S;
    s_ld = j_ld % p.S;
  }
  const T* gy_g = p.gy + static_cast<int64_t>(g * p.K + (o_ok ? o_ld : 0)) * p.gc;
  const T* x_g = p.x + static_cast<int64_t>(g * p.C + c_ld) * p.xc;

  const int ty = t / 16, tx = t % 16;
  A acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = A(0);

  for (int64_t l0 = l_begin; l0 < l_end; l0 += TL) {
#pragma unroll
    for (int k = 0; k < TL * 64 / kThreads; ++k) {
      const int row = (t + k * kThreads) / 64;
      const int64_t l = l0 + row;
      A gv = A(0), xv = A(0);
      if (l < l_end) {
        const int n = static_cast<int>(l / PQ), rem = static_cast<int>(l % PQ);
        const int pp = rem / p.Q, q = rem % p.Q;
        if (o_ok) {
          gv = static_cast<A>(gy_g[static_cast<int64_t>(n) * p.gn + static_cast<int64_t>(pp) * p.gh +
                                   static_cast<int64_t>(q) * p.gw_]);
        }
        const int h = pp * p.sh - p.ph + r_ld * p.dh, w = q * p.sw - p.pw + s_ld * p.dw;
        if (j_ok && h >= 0 && h < p.H && w >= 0 && w < p.W) {
          xv = static_cast<A>(x_g[static_cast<int64_t>(n) * p.xn + static_cast<int64_t>(h) * p.xh +
                                  static_cast<int64_t>(w) * p.xw]);
        }
      }
      gy_s[row][lcol] = gv;
      x_s[row][lcol] = xv;
    }
    __syncthreads();
#pragma unroll
    for (int l = 0; l < TL; ++l) {
      A a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = gy_s[l][4 * ty + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = x_s[l][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }

  A* part = p.part + (static_cast<int64_t>(split) * p.G + g) * p.K * J;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int o = o0 + 4 * ty + i;
    if (o >= p.K) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int jj = j0 + tx + 16 * j;
      if (jj < J) part[static_cast<int64_t>(o) * J + jj] = acc[i][j];
    }
  }
}

template <typename T, typename A>
__global__ void wgrad_reduce_kernel(const A* __restrict__ part, int splits, int G, int K, int C, int R, int S,
                                    T* __restrict__ gw, int64_t wk, int64_t wc, int64_t wr, int64_t ws) {
  const int64_t J = static_cast<int64_t>(C) * R * S;
  const int64_t total = static_cast<int64_t>(G) * K * J;  // == one split's size
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A sum = A(0);
    for (int z = 0; z < splits; ++z) sum += part[z * total + e];
    const int64_t go = e / J, j = e % J;  // go = g*K + o
    const int64_t c = j / (R * S), r = (j % (R * S)) / S, s = j % S;
    gw[go * wk + c * wc + r * wr + s * ws] = static_cast<T>(sum);
  }
}

template <typename T, typename A>
__global__ void bias_grad_kernel(const T* __restrict__ gy, int64_t gn, int64_t gc, int64_t gh, int64_t gw, int N,
                                 int Ktot, int P, int Q, A* __restrict__ part, int splits) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  const int split = blockIdx.y;
  if (k >= Ktot) return;
  const int64_t PQ = static_cast<int64_t>(P) * Q, L = PQ * N;
  const int64_t chunk = (L + splits - 1) / splits;
  const int64_t l_end = (split + 1) * chunk < L ? (split + 1) * chunk : L;
  A sum = A(0);
  // consecutive threads take consecutive channels: coalesced in channels_last, and for NCHW each
  // thread walks its own contiguous plane
  for (int64_t l = split * chunk; l < l_end; ++l) {
    const int64_t n = l / PQ, rem = l % PQ;
    sum += static_cast<A>(gy[n * gn + k * gc + (rem / Q) * gh + (rem % Q) * gw]);
  }
  part[static_cast<int64_t>(split) * Ktot + k] = sum;
}

template <typename T, typename A>
__global__ void bias_reduce_kernel(const A* __restrict__ part, int splits, int Ktot, T* __restrict__ gb) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= Ktot) return;
  A sum = A(0);
  for (int z = 0; z < splits; ++z) sum += part[static_cast<int64_t>(z) * Ktot + k];
  gb[k] = static_cast<T>(sum);
}

}  // namespace

template <typename T, typename A>
void launch_wgrad(const WgradParams<T, A>& p, cudaStream_t stream) {
  const int J = p.C * p.R * p.S;
  const dim3 grid((p.K + TM - 1) / TM, (J + TN - 1) / TN, p.G * p.splits);
  TORCH_CHECK(grid.y < 65536 && grid.z < 65536, "cnnkern conv2d (cuda): grad-weight grid too large");
  wgrad_kernel<T, A><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename A>
void launch_wgrad_reduce(const A* part, int splits, int G, int K, int C, int R, int S, T* gw, int64_t wk, int64_t wc,
                         int64_t wr, int64_t ws, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(G) * K * C * R * S;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 65535);
  wgrad_reduce_kernel<T, A><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(part, splits, G, K, C, R, S, gw, wk,
                                                                                    wc, wr, ws);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename A>
void launch_bias_grad(const T* gy, int64_t gn, int64_t gc, int64_t gh, int64_t gw, int N, int Ktot, int P, int Q,
                      A* part, int splits, T* gb, cudaStream_t stream) {
  const dim3 grid((Ktot + kThreads - 1) / kThreads, splits);
  bias_grad_kernel<T, A><<<grid, kThreads, 0, stream>>>(gy, gn, gc, gh, gw, N, Ktot, P, Q, part, splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bias_reduce_kernel<T, A><<<(Ktot + kThreads - 1) / kThreads, kThreads, 0, stream>>>(part, splits, Ktot, gb);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define CNNKERN_WGRAD(T)                                                                                         \
  template void launch_wgrad<T, at::opmath_type<T>>(const WgradParams<T, at::opmath_type<T>>&, cudaStream_t);    \
  template void launch_wgrad_reduce<T, at::opmath_type<T>>(const at::opmath_type<T>*, int, int, int, int, int,   \
                                                           int, T*, int64_t, int64_t, int64_t, int64_t,          \
                                                           cudaStream_t);                                        \
  template void launch_bias_grad<T, at::opmath_type<T>>(const T*, int64_t, int64_t, int64_t, int64_t, int, int, \
                                                        int, int, at::opmath_type<T>*, int, T*, cudaStream_t);
CNNKERN_WGRAD(float)
CNNKERN_WGRAD(double)
CNNKERN_WGRAD(c10::Half)
CNNKERN_WGRAD(c10::BFloat16)
#undef CNNKERN_WGRAD

}  // namespace conv
}  // namespace cnnkern
