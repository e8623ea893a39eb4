// Tensor-core implicit-GEMM convolution, CUDA C++ (fp16/bf16, or fp32 as TF32; fp32 accumulate;
// sm_80+).
//
// The GEMM. Rows m = (n, ho, wo) are output pixels, columns o are output channels of one group,
// the reduction index kk = (r*S + s)*CK + c runs over filter taps and source channels. The A
// operand is gathered from the NHWC source on the fly (IgemmParams: forward or grad-input
// gather), the B operand is the packed filter wp[o][kk] (kk contiguous). Because CK is a multiple
// of the elements per 16 bytes (EPC: 8 halves, 4 floats), every 16-byte chunk of a row of A lies
// inside one tap, so each chunk is one cp.async of 16 bytes from one source pixel, or a zero fill
// where the tap falls in the padding.
// A 1x1, stride-1, unpadded convolution gathers exactly the rows of a plain GEMM.
//
// The block. 8 warps compute a BM x BN tile (128x128, 64x128 or 128x64) in steps of one 64-byte
// row of kk (BK = 32 halves or 16 floats). Shared memory holds STAGES = 4 such steps (A: BM rows,
// B: BN rows), filled by cp.async STAGES-1 steps ahead of the math, so global loads overlap the
// tensor cores. A row is four 16-byte chunks; chunk c of row r is stored at chunk c ^ ((r/2) % 4),
// which makes the eight row addresses of every ldmatrix phase hit eight distinct bank groups.
// Each warp owns a (BM/WARPS_M) x (BN/WARPS_N) sub-tile: MT x NT fragments of m16n8, fed by
// ldmatrix.x4 over two chunks (A: one 16-row fragment; B: two 8-column fragments) and multiplied
// with mma.sync m16n8k16 (f16/bf16) or m16n8k8 (tf32; ldmatrix's 8x8 b16 matrices are then 8x4
// fp32 matrices, and the fragment layouts line up the same way), row.col, f32 accumulators.
// fp32 operands are rounded to TF32 (cvt.rna) after ldmatrix, as cuDNN's TF32 mode rounds.
//
// Epilogue: bias, ReLU, conversion, and stores through the output's strides (channels_last
// writes two adjacent channels as one 32-bit store).
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "common.h"
#include "conv2d.h"
#include "ptx.cuh"
#include "conv2d_igemm.cuh"
#include "tensor_core.cuh"

namespace cnnkern {
namespace conv {
namespace {

constexpr int kThreads = 256;
constexpr int ROW_BYTES = 64;  // one step of kk: 4 chunks of 16 bytes
template <typename T>
constexpr int EPC = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte chunk
template <typename T>
constexpr int BK = 4 * EPC<T>;  // elements of kk per step
constexpr int STAGES = 4;

using ptx::ldmatrix_x4;
using ptx::smem_u32;

// offset (in halves) of chunk `c` of row `r` in a [rows][32] swizzled stage
template <typename T>
__device__ __forceinline__ int swz(int r, int c) { return r * BK<T> + (c ^ ((r >> 1) & 3)) * EPC<T>; }

template <typename T, int BM, int BN, int WARPS_M, bool DGRAD>
__global__ void __launch_bounds__(kThreads) igemm_kernel(const IgemmParams<T> p) {
  constexpr int WARPS_N = 8 / WARPS_M;
  constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;  // warp tile
  constexpr int MT = WTM / 16, NT = WTN / 8;
  static_assert(NT % 2 == 0, "B fragments are loaded two n8 tiles at a time");
  constexpr int A_ITERS = BM * 4 / kThreads, B_ITERS = BN * 4 / kThreads;
  constexpr int STAGE_A = BM * BK<T>, STAGE_B = BN * BK<T>;  // elements

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sA = reinterpret_cast<T*>(smem_raw);
  T* sB = sA + STAGES * STAGE_A;

  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int wm = warp % WARPS_M, wn = warp / WARPS_M;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN, g = blockIdx.z % p.G;
  const int chunk = t % 4;  // the 16-byte chunk of each row this thread copies

  // Per-thread gather state of its A and B rows (fixed across the kk loop): row (t + i*256) / 4.
  const GatherA<T, A_ITERS, DGRAD> ga(p, m0, g, t / 4, kThreads / 4);
  const GatherB<T, B_ITERS> gb(p, n0, g, t / 4, kThreads / 4);

  const StepRange steps = step_range(p, BK<T>);

  auto load_stage = [&](int kt, int stage) {
    const int kk = (steps.first + kt) * BK<T> + chunk * EPC<T>;
    const Tap tap = tap_of(p, kk);
    T* dA = sA + stage * STAGE_A;
#pragma unroll
    for (int i = 0; i < A_ITERS; ++i) {
      ga.copy(p, i, tap, smem_u32(dA + swz<T>((t + i * kThreads) / 4, chunk)));
    }
    T* dB = sB + stage * STAGE_B;
#pragma unroll
    for (int i = 0; i < B_ITERS; ++i) {
      gb.copy(p, i, kk, tap.ok, smem_u32(dB + swz<T>((t + i * kThreads) / 4, chunk)));
    }
  };

  float acc[MT][NT][4];
  zero_tile(acc);

  cp_async_pipeline<STAGES>(steps.count, load_stage, [&](int stage) {
    const T* tA = sA + stage * STAGE_A;
    const T* tB = sB + stage * STAGE_B;
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {  // two MMA k-steps per row: chunks (0, 1) and (2, 3)
      uint32_t af[MT][4], bf[NT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        // lanes 0-15 address rows 0-15 at k 0-7, lanes 16-31 the same rows at k 8-15
        const int row = wm * WTM + i * 16 + (lane % 16);
        ldmatrix_x4(af[i], smem_u32(tA + swz<T>(row, ks * 2 + lane / 16)));
        Mma<T>::prepare(af[i]);
      }
#pragma unroll
      for (int j = 0; j < NT / 2; ++j) {
        // matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
        const int row = wn * WTN + j * 16 + (lane % 8) + (lane / 16) * 8;
        uint32_t r4[4];
        ldmatrix_x4(r4, smem_u32(tB + swz<T>(row, ks * 2 + (lane / 8) % 2)));
        Mma<T>::prepare(r4);
        set_b_pair(bf, j, r4);
      }
      mma_tile<T>(acc, af, bf);
    }
  });

  static_assert(BM * BN * 4 <= STAGES * (BM + BN) * ROW_BYTES, "the fp32 tile must fit the stages");
  igemm_epilogue<T, BM, BN>(p, acc, m0, n0, g, wm * WTM, wn * WTN, smem_raw);
}

template <typename T, int BM, int BN, int WARPS_M, bool DGRAD>
void launch_one(const IgemmParams<T>& p, cudaStream_t stream) {
  constexpr size_t smem = static_cast<size_t>(STAGES) * (BM + BN) * ROW_BYTES;
  auto kernel = igemm_kernel<T, BM, BN, WARPS_M, DGRAD>;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  const dim3 grid((p.M + BM - 1) / BM, (p.NO + BN - 1) / BN, p.G * std::max(1, p.splits));
  TORCH_CHECK(grid.y < 65536 && grid.z < 65536, "cnnkern conv2d (cuda, igemm): grid too large");
  kernel<<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool DGRAD>
void launch_tile(const IgemmParams<T>& p, int tile, cudaStream_t stream) {
  switch (tile) {
    case 0: launch_one<T, 128, 128, 2, DGRAD>(p, stream); break;   // warp tile 64 x 32
    case 1: launch_one<T, 64, 128, 2, DGRAD>(p, stream); break;    // warp tile 32 x 32
    default: launch_one<T, 128, 64, 4, DGRAD>(p, stream); break;   // warp tile 32 x 32
  }
}

// Output element (m, oc) of a split-K GEMM: the splits' partials added in order, + bias (the
// value the BatchNorm statistics take); then store_reduced adds the residual, applies the ReLU
// and rounds once into y.
template <typename T>
__device__ __forceinline__ float split_sum(const IgemmParams<T>& p, int m, int oc) {
  const int64_t split_stride = static_cast<int64_t>(p.G) * p.M * p.part_ld;
  const float* src = p.part + (static_cast<int64_t>(oc / p.NO) * p.M + m) * p.part_ld + oc % p.NO;
  float v = 0.f;
  for (int s = 0; s < p.splits; ++s) v += src[s * split_stride];
  return p.bias != nullptr ? v + static_cast<float>(p.bias[oc]) : v;
}

template <typename T>
__device__ __forceinline__ void store_reduced(const IgemmParams<T>& p, int m, int oc, float v) {
  const int HoWo = p.Ho * p.Wo, n = m / HoWo, rem = m % HoWo;
  const int64_t off = static_cast<int64_t>(n) * p.yn + static_cast<int64_t>(rem / p.Wo) * p.yh +
                      static_cast<int64_t>(rem % p.Wo) * p.yw + static_cast<int64_t>(oc) * p.yc;
  if (p.res != nullptr) v += static_cast<float>(p.res[off]);
  if (p.relu) v = v < 0.f ? 0.f : v;
  p.y[off] = static_cast<T>(v);
}

// The end of a split-K GEMM: one thread per output element (m, g, o), o fastest, as the unsplit
// epilogue does it.
template <typename T>
__global__ void __launch_bounds__(256) igemm_reduce_kernel(const IgemmParams<T> p) {
  const int64_t cols = static_cast<int64_t>(p.G) * p.NO, total = static_cast<int64_t>(p.M) * cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int m = static_cast<int>(i / cols), oc = static_cast<int>(i % cols);
    store_reduced(p, m, oc, split_sum(p, m, oc));
  }
}

// The same with the BatchNorm statistics (p.stats): block (x, y) sums rows [BM*x, BM*x + BM) of
// 32 channels (y: the 32 across the groups' G*NO), the BM-row block of the unsplit tile, so the
// statistics rows are the unsplit kernel's. Thread (tx, ty) = (t % 32, t / 32) takes channel tx
// (the warp reads 32 consecutive partials), rows ty, ty + 8, ...; the summed values (bias added)
// stay in shared memory, where one warp then takes each channel's count, mean and M2.
template <typename T, int BM>
__global__ void __launch_bounds__(256) igemm_reduce_stats_kernel(const IgemmParams<T> p) {
  __shared__ float sC[BM][33];
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const int cols = p.G * p.NO, oc = blockIdx.y * 32 + tx;
  const int m0 = blockIdx.x * BM, rows = min(BM, p.M - m0);
  if (oc < cols) {
    for (int r = ty; r < rows; r += 8) {
      const float v = split_sum(p, m0 + r, oc);
      sC[r][tx] = v;
      store_reduced(p, m0 + r, oc, v);  // (residual and ReLU after the statistics, as unsplit)
    }
  }
  __syncthreads();
  if (ty == 0 && oc < cols) store_column_stats(&sC[0][tx], 33, rows, p.stats + static_cast<int64_t>(blockIdx.x) * 3 * cols + oc, cols);
}

}  // namespace

int igemm_tile_rows(int tile) { return tile == 1 ? 64 : 128; }

template <typename T>
void launch_igemm_reduce(const IgemmParams<T>& p, int tile, cudaStream_t stream) {
  if (p.stats == nullptr) {
    igemm_reduce_kernel<T><<<grid_for(static_cast<int64_t>(p.M) * p.G * p.NO, 256), 256, 0, stream>>>(p);
  } else {
    const int bm = igemm_tile_rows(tile), cols = p.G * p.NO;
    const dim3 grid((p.M + bm - 1) / bm, (cols + 31) / 32);
    if (bm == 64) {
      igemm_reduce_stats_kernel<T, 64><<<grid, 256, 0, stream>>>(p);
    } else {
      igemm_reduce_stats_kernel<T, 128><<<grid, 256, 0, stream>>>(p);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_igemm(const IgemmParams<T>& p, bool dgrad, int tile, cudaStream_t stream) {
  TORCH_CHECK(p.CK % EPC<T> == 0 && p.Cs % EPC<T> == 0, "cnnkern conv2d (cuda, igemm): channels must be multiples of ",
              EPC<T>);
  if (dgrad) {
    launch_tile<T, true>(p, tile, stream);
  } else {
    launch_tile<T, false>(p, tile, stream);
  }
}

template void launch_igemm<c10::Half>(const IgemmParams<c10::Half>&, bool, int, cudaStream_t);
template void launch_igemm<c10::BFloat16>(const IgemmParams<c10::BFloat16>&, bool, int, cudaStream_t);
template void launch_igemm<float>(const IgemmParams<float>&, bool, int, cudaStream_t);
template void launch_igemm_reduce<c10::Half>(const IgemmParams<c10::Half>&, int, cudaStream_t);
template void launch_igemm_reduce<c10::BFloat16>(const IgemmParams<c10::BFloat16>&, int, cudaStream_t);
template void launch_igemm_reduce<float>(const IgemmParams<float>&, int, cudaStream_t);

}  // namespace conv
}  // namespace cnnkern
