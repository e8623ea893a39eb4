// 2-D convolution, CUDA C++: the parameter blocks and launchers shared by the convolution's .cu
// files (split so that ninja compiles them in parallel):
//
//   conv2d.cu          host side: argument checks, choice of kernel, weight packing, the op
//                      registrations (TORCH_LIBRARY_IMPL) of forward, grad-input and grad-weight
//   conv2d_direct.cu   SIMT direct convolution (any dtype, kernel size, stride, padding, dilation,
//                      groups, layout); with an "upsampled" source it is also the general grad-input
//   conv2d_igemm.cu    tensor-core implicit GEMM (fp16/bf16, mma.sync m16n8k16, ldmatrix, a
//                      4-stage cp.async pipeline); forward and grad-input (the same gather, read
//                      backwards); 1x1 convolutions are its plain-GEMM case
//   conv2d_wgmma.cu    the same implicit GEMM on Hopper's warpgroup MMA (wgmma, sm_90a only),
//                      5-stage cp.async pipeline with one wgmma group in flight
//   conv2d_wgrad.cu    grad-weight and grad-bias: deterministic split-K (fixed slices, fixed-order
//                      reduction, no atomics)
//   conv2d_wgrad_igemm.cu  grad-weight on tensor cores (fp16/bf16, fp32 as TF32; channels_last,
//                      NCHW copied to it): the same split-K partials from mma.sync, finished by
//                      the same reduction
//   conv2d_wgrad_wgmma.cu  the same tensor-core grad-weight on wgmma (sm_90a only; fp16/bf16)
//
// Index arithmetic: every offset into a tensor is int64; a GEMM row index (an output pixel
// n*P*Q + p*Q + q) is int32 and the host refuses inputs where it would not fit.
#pragma once

#include <cstddef>
#include <cstdint>

#include <ATen/OpMathType.h>
#include <cuda_runtime.h>

namespace cnnkern {
namespace conv {

// Direct convolution: y[n, g*OC + o, p, q] = act(bias + sum_{i, r, s} w(g, o, i, r, s) * src(n, g*IC + i, hv, wv))
// with hv = p*sh - ph + r*dh (virtual coordinates). The source is read through an "upsampling" by
// (uh, uw): virtual row hv holds source row hv/uh when uh divides hv, zero otherwise, over the
// virtual extent (Hs-1)*uh+1. Forward: uh = uw = 1. Grad-input: src = grad_out upsampled by the
// forward stride, conv stride 1, the flipped filter, padding d*(R-1) - p (possibly negative).
// The filter element (g, o, i, r, s) sits at w + g*wg + o*wo + i*wi + r*wr + s*ws (strides may be
// negative: that is how the grad-input flips the filter without a copy).
template <typename T>
struct DirectParams {
  const T* src;
  int64_t sn, sc, sh_, sw_;  // source strides (elements)
  int Hs, Ws, uh, uw;
  const T* w;
  int64_t wg, wo, wi, wr, ws;
  const T* bias;  // nullptr: none
  T* y;
  int64_t yn, yc, yh, yw;
  const T* res;  // residual added before the activation, y's strides; nullptr: none
  int N, OC, IC, G, R, S, P, Q;
  int sh, sw, ph, pw, dh, dw;
  int cb;              // source channels staged in shared memory per step
  int halo_h, halo_w;  // staged source window per output tile
  bool relu;
  // BatchNorm statistics (nullptr: none): row blockIdx.x of a (rows, 3, G*OC) accumulator-type
  // tensor receives, per output channel, the (count, mean, M2) of this block's outputs before
  // the activation (M2: sum of squared deviations from the block's own mean).
  at::opmath_type<T>* stats;
};

// Implicit GEMM on tensor cores. Source: NHWC dense (pixel pitch Cs channels); filter packed as
// wp[g*NO + o][(r*S + s)*CK + c] (row-major, contiguous). Output rows m = (n, ho, wo) over an
// Nimg x Ho x Wo grid, columns o < NO (per group). Gather of source pixel for (ho, r):
//   forward   hs = ho*sh - ph + r*dh                     (valid if 0 <= hs < Hs)
//   grad-in   t = ho + ph - r*dh, hs = t / sh            (valid if t >= 0, sh | t, hs < Hs)
template <typename T>
struct IgemmParams {
  const T* src;
  int Hs, Ws, Cs;
  const T* wp;
  const T* bias;
  T* y;
  int64_t yn, yc, yh, yw;
  const T* res;  // residual added before the activation, y's strides; nullptr: none (forward only)
  int Nimg, Ho, Wo, M;
  int NO, CK, G, R, S, KK;
  int sh, sw, ph, pw, dh, dw;
  bool relu;
  float* stats;  // as DirectParams::stats, one row per BM-row block (blockIdx.x), fp32
  // channels contiguous (yc == 1), the other strides, NO and y's address multiples of 16 bytes:
  // the epilogue stages the tile in shared memory and stores whole 16-byte chunks of rows
  bool vec_store;
  // Split-K (splits > 1): the grid's z extent is splits * G, block z = s * G + g reduces kk in
  // [s * kk_split, (s + 1) * kk_split) (kk_split: a multiple of 128 bytes of kk, so of both
  // kernels' steps) and stores its fp32 accumulators, nothing added, at
  // part[((s * G + g) * M + m) * part_ld + o] (part_ld even: pairs stored as float2);
  // launch_igemm_reduce then adds the splits in order 0..splits-1, applies bias, residual and
  // ReLU, and takes the statistics (stats) from the sums.
  int splits;
  int kk_split, part_ld;
  float* part;
};

// Grad-weight: gw(g, o, c, r, s) = sum_{n, p, q} gy[n, g*K + o, p, q] * x[n, g*C + c, p*sh-ph+r*dh, q*sw-pw+s*dw].
// Split-K: split j sums the output pixels [j*chunk, min((j+1)*chunk, L)) into part[j][g][o][c*R*S + r*S + s]
// (accumulator type A); the reduce kernel adds the splits in order 0..splits-1 into gw.
template <typename T, typename A>
struct WgradParams {
  const T* gy;
  int64_t gn, gc, gh, gw_;
  const T* x;
  int64_t xn, xc, xh, xw;
  A* part;
  int N, K, C, G, H, W, P, Q, R, S;  // K, C per group
  int sh, sw, ph, pw, dh, dw;
  int64_t L, chunk;
  int splits;
};

// Direct kernel tile: BO output channels x BP x BQ output pixels per block of 256 threads.
constexpr int kDirectBO = 32, kDirectBP = 8, kDirectBQ = 16;

// Launchers (one stream: PyTorch's current one; each checks its launch).
template <typename T>
void launch_direct(const DirectParams<T>& p, cudaStream_t stream);
// shared-memory bytes the direct kernel stages per source channel (the host sizes `cb` from it)
template <typename T>
size_t direct_bytes_per_channel(int halo_h, int halo_w, int R, int S);

// tile: 0 = 128x128, 1 = 64x128, 2 = 128x64 (rows x cols of the output tile per block)
int igemm_tile_rows(int tile);
template <typename T>
void launch_igemm(const IgemmParams<T>& p, bool dgrad, int tile, cudaStream_t stream);
// The end of a split-K GEMM (either kernel): y = [relu](sum of p.part over the splits, in order,
// + bias + residual), through y's strides; with p.stats, also the BatchNorm statistics of the
// sums (bias added) per row block of the unsplit `tile`'s rows.
template <typename T>
void launch_igemm_reduce(const IgemmParams<T>& p, int tile, cudaStream_t stream);

// The wgmma implicit GEMM (fp16/bf16, and fp32 as TF32; the same tiles as launch_igemm). Launch it only where
// wgmma_available() (the caller checks, once per call): the extension holds sm_90a code
// (CNNKERN_SM90A) and the current device is compute capability 9.0.
bool wgmma_available();
template <typename T>
void launch_wgmma(const IgemmParams<T>& p, bool dgrad, int tile, cudaStream_t stream);

template <typename T, typename A>
void launch_wgrad(const WgradParams<T, A>& p, cudaStream_t stream);

// Tensor-core grad-weight (conv2d_wgrad_igemm.cu; fp16/bf16, and fp32 as TF32; channels contiguous
// in x and gy with 16-byte aligned pixels, channels per group multiples of one 16-byte chunk, 8
// halves or 4 floats): the same split-K partials as
// launch_wgrad, in the same layout, from a BM x BN = wgrad_igemm_tile_rows() x _cols() tile.
template <typename T>
void launch_wgrad_igemm(const WgradParams<T, float>& p, cudaStream_t stream);
int wgrad_igemm_tile_rows();
int wgrad_igemm_tile_cols();
// The same on wgmma (conv2d_wgrad_wgmma.cu; the same inputs, fp16/bf16 only; only where
// wgmma_available()).
template <typename T>
void launch_wgrad_wgmma(const WgradParams<T, float>& p, cudaStream_t stream);
int wgrad_wgmma_tile_rows();
int wgrad_wgmma_tile_cols();

// out(g, o, c, r, s) at gw + (g*K + o)*wk + c*wc + r*wr + s*ws  <-  sum over splits, in order
template <typename T, typename A>
void launch_wgrad_reduce(const A* part, int splits, int G, int K, int C, int R, int S, T* gw, int64_t wk,
                         int64_t wc, int64_t wr, int64_t ws, cudaStream_t stream);

// Grad-bias: gb[k] = sum_{n, p, q} gy[n, k, p, q], split over pixels, reduced in order; `part`
// holds splits * Ktot accumulators.
template <typename T, typename A>
void launch_bias_grad(const T* gy, int64_t gn, int64_t gc, int64_t gh, int64_t gw, int N, int Ktot, int P, int Q,
                      A* part, int splits, T* gb, cudaStream_t stream);

}  // namespace conv
}  // namespace cnnkern
