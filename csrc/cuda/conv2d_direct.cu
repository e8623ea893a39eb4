// Direct (SIMT) convolution, CUDA C++: the path for every dtype (fp64, fp32, fp16, bf16; fp32
// accumulation for the 16-bit types), every layout (read and written through strides), any kernel
// size, stride, padding and dilation, groups, and the small-channel first layers (AlexNet's
// 11x11/4 and the 7x7/2 of GoogLeNet and ResNet on 3 channels), where an implicit GEMM would
// waste most of its K dimension. With an upsampled source (DirectParams: uh, uw) the same kernel
// computes the gradient of the input for any stride.
//
// Tiling. A block of 256 threads owns one image n, one group g, BO = 32 output channels and an
// output tile of BP x BQ = 8 x 16 pixels. Per step it stages in shared memory, for `cb` source
// channels,
//   * the source window the tile reads: halo_h x halo_w with halo = (B-1)*stride + (R-1)*dil + 1,
//     zero where it falls in the padding (or between the rows of an upsampled source), and
//   * the filter slice cb x R x S x BO (output channel innermost, so a warp reads one broadcast
//     word per tap),
// both converted to the accumulator type once. Register blocking: thread t computes 4 output
// channels (o = 4*(t/32) + i) x 4 pixels (row (t%32)/4, columns (t%4) + 4*j): 16 accumulators,
// 8 shared loads per 16 FMAs. Adjacent lanes read adjacent columns (stride sw apart), so a warp's
// source reads spread over the banks.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "conv2d.h"

namespace cnnkern {
namespace conv {
namespace {

constexpr int kThreads = 256;
constexpr int BO = kDirectBO, BP = kDirectBP, BQ = kDirectBQ;

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) direct_kernel(const DirectParams<T> p) {
  using A = at::opmath_type<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* in_s = reinterpret_cast<A*>(smem_raw);                       // [cb][halo_h][halo_w]
  A* w_s = in_s + static_cast<int64_t>(p.cb) * p.halo_h * p.halo_w;  // [cb][R][S][BO]

  const int tiles_q = (p.Q + BQ - 1) / BQ;
  const int tiles_p = (p.P + BP - 1) / BP;
  const int64_t bx = blockIdx.x;
  const int n = static_cast<int>(bx / (static_cast<int64_t>(tiles_p) * tiles_q));
  const int tile = static_cast<int>(bx % (static_cast<int64_t>(tiles_p) * tiles_q));
  const int p0 = (tile / tiles_q) * BP, q0 = (tile % tiles_q) * BQ;
  const int oblocks = (p.OC + BO - 1) / BO;
  const int g = blockIdx.y / oblocks, o0 = (blockIdx.y % oblocks) * BO;

  const int t = threadIdx.x;
  const int lane = t % 32, og = t / 32;
  const int pr = lane / 4, qc = lane % 4;

  const int hv0 = p0 * p.sh - p.ph, wv0 = q0 * p.sw - p.pw;  // virtual origin of the window
  const int Hv = (p.Hs - 1) * p.uh + 1, Wv = (p.Ws - 1) * p.uw + 1;
  const T* src_n = p.src + static_cast<int64_t>(n) * p.sn + static_cast<int64_t>(g) * p.IC * p.sc;
  const T* w_g = p.w + static_cast<int64_t>(g) * p.wg;
  const int win = p.halo_h * p.halo_w;
  const int taps = p.R * p.S;

  A acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = A(0);

  for (int c0 = 0; c0 < p.IC; c0 += p.cb) {
    __syncthreads();  // the previous step's readers are done with the staging buffers
    // source window: element e -> (c, hh, ww); zero outside the virtual extent, between the rows
    // of an upsampled source and past the last channel
    for (int e = t; e < p.cb * win; e += kThreads) {
      const int c = e / win, rem = e % win;
      const int hv = hv0 + rem / p.halo_w, wv = wv0 + rem % p.halo_w;
      A v = A(0);
      if (c0 + c < p.IC && hv >= 0 && hv < Hv && wv >= 0 && wv < Wv && hv % p.uh == 0 && wv % p.uw == 0) {
        v = static_cast<A>(src_n[static_cast<int64_t>(c0 + c) * p.sc + static_cast<int64_t>(hv / p.uh) * p.sh_ +
                                 static_cast<int64_t>(wv / p.uw) * p.sw_]);
      }
      in_s[e] = v;
    }
    // filter slice: element e -> (c, tap, o), o innermost
    for (int e = t; e < p.cb * taps * BO; e += kThreads) {
      const int o = e % BO, ct = e / BO;
      const int c = ct / taps, tap = ct % taps;
      const int r = tap / p.S, s = tap % p.S;
      A v = A(0);
      if (c0 + c < p.IC && o0 + o < p.OC) {
        v = static_cast<A>(w_g[static_cast<int64_t>(o0 + o) * p.wo + static_cast<int64_t>(c0 + c) * p.wi +
                               static_cast<int64_t>(r) * p.wr + static_cast<int64_t>(s) * p.ws]);
      }
      w_s[e] = v;
    }
    __syncthreads();

    const int cn = min(p.cb, p.IC - c0);
    for (int c = 0; c < cn; ++c) {
      const A* in_c = in_s + c * win;
      const A* w_c = w_s + c * taps * BO + og * 4;
      for (int r = 0; r < p.R; ++r) {
        const A* in_r = in_c + (pr * p.sh + r * p.dh) * p.halo_w + qc * p.sw;
        for (int s = 0; s < p.S; ++s) {
          const A* wt = w_c + (r * p.S + s) * BO;
          A wv[4], xv[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) wv[i] = wt[i];
#pragma unroll
          for (int j = 0; j < 4; ++j) xv[j] = in_r[s * p.dw + 4 * j * p.sw];
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] += wv[i] * xv[j];
        }
      }
    }
  }

  if (p.stats != nullptr) {
    // BatchNorm statistics of this block's outputs (bias added, before the activation): the
    // BO x (BP*BQ) tile goes to shared memory (the host sized it to hold it), then one thread per
    // output channel takes count, mean and M2 over the valid pixels in two passes.
    A* sC = reinterpret_cast<A*>(smem_raw);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int o = o0 + og * 4 + i;
      const A b = (p.bias != nullptr && o < p.OC) ? static_cast<A>(p.bias[g * p.OC + o]) : A(0);
#pragma unroll
      for (int j = 0; j < 4; ++j) sC[(og * 4 + i) * (BP * BQ) + pr * BQ + qc + 4 * j] = acc[i][j] + b;
    }
    __syncthreads();
    const int o = o0 + t;
    if (t < BO && o < p.OC) {
      const int rows = min(BP, p.P - p0), cols = min(BQ, p.Q - q0);
      const A* col = sC + t * (BP * BQ);
      A sum = A(0);
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) sum += col[r * BQ + c];
      const A cnt = static_cast<A>(rows * cols);
      const A mean = sum / cnt;
      A m2 = A(0);
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) {
          const A d = col[r * BQ + c] - mean;
          m2 += d * d;
        }
      const int64_t K = static_cast<int64_t>(p.G) * p.OC;
      A* st = p.stats + static_cast<int64_t>(blockIdx.x) * 3 * K + g * p.OC + o;
      st[0] = cnt;
      st[K] = mean;
      st[2 * K] = m2;
    }
  }

  // epilogue: bias, residual, ReLU (`v < 0` keeps NaN, as torch.relu does), store through y's
  // strides (the residual has the same strides)
  const int pp = p0 + pr;
  if (pp >= p.P) return;
  const int64_t row = static_cast<int64_t>(n) * p.yn + static_cast<int64_t>(pp) * p.yh;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int o = o0 + og * 4 + i;
    if (o >= p.OC) continue;
    const int oc = g * p.OC + o;
    const A b = p.bias != nullptr ? static_cast<A>(p.bias[oc]) : A(0);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int q = q0 + qc + 4 * j;
      if (q >= p.Q) continue;
      const int64_t off = row + static_cast<int64_t>(oc) * p.yc + static_cast<int64_t>(q) * p.yw;
      A v = acc[i][j] + b;
      if (p.res != nullptr) v += static_cast<A>(p.res[off]);
      if (p.relu && v < A(0)) v = A(0);
      p.y[off] = static_cast<T>(v);
    }
  }
}

}  // namespace

template <typename T>
void launch_direct(const DirectParams<T>& p, cudaStream_t stream) {
  using A = at::opmath_type<T>;
  const int64_t tiles = static_cast<int64_t>((p.P + BP - 1) / BP) * ((p.Q + BQ - 1) / BQ) * p.N;
  const int64_t yblocks = static_cast<int64_t>((p.OC + BO - 1) / BO) * p.G;
  TORCH_CHECK(tiles < (int64_t{1} << 31) && yblocks < 65536, "cnnkern conv2d (cuda, direct): grid too large: ",
              tiles, " x ", yblocks, " blocks");
  size_t smem = sizeof(A) * (static_cast<size_t>(p.cb) * p.halo_h * p.halo_w +
                             static_cast<size_t>(p.cb) * p.R * p.S * BO);
  if (p.stats != nullptr) smem = std::max(smem, sizeof(A) * BO * BP * BQ);  // the statistics' tile
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(direct_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  direct_kernel<T><<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(yblocks)), kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
size_t direct_bytes_per_channel(int halo_h, int halo_w, int R, int S) {
  using A = at::opmath_type<T>;
  return sizeof(A) * (static_cast<size_t>(halo_h) * halo_w + static_cast<size_t>(R) * S * BO);
}

#define CNNKERN_DIRECT(T)                                                  \
  template void launch_direct<T>(const DirectParams<T>&, cudaStream_t); \
  template size_t direct_bytes_per_channel<T>(int, int, int, int);
CNNKERN_DIRECT(float)
CNNKERN_DIRECT(double)
CNNKERN_DIRECT(c10::Half)
CNNKERN_DIRECT(c10::BFloat16)
#undef CNNKERN_DIRECT

}  // namespace conv
}  // namespace cnnkern
