// Tensor-core implicit-GEMM convolution on Hopper's warpgroup MMA (wgmma, sm_90a only; fp16/bf16,
// and fp32 as TF32; fp32 accumulate): the forward and grad-input of conv2d_igemm.cu's GEMM (the
// same gather, the same packed filter, the same epilogue: conv2d_igemm.cuh), with wgmma instead
// of mma.sync.
//
// The block: WG warpgroups of 128 threads compute a BM x BN tile (BM = 64*WG: 128x128, 64x128 or
// 128x64), warpgroup w owning rows 64w..64w+63 and all BN columns, in steps of one 128-byte row of
// kk (BK = 64 halves or 32 floats). A stage holds the BM rows of A and the BN rows of B of one
// step, each row eight 16-byte chunks in the 128-byte swizzle wgmma reads: chunk c of row r sits
// at chunk c ^ (r % 8) of its row, in atoms of 8 rows x 128 bytes = 1024 bytes, 1024-aligned. A
// matrix descriptor (start address, 1024 bytes between 8-row atoms, swizzle mode 128B) names a
// 64-row (A) or BN-row (B) K-major operand; the four k steps of a row (k16 for halves, k8 for
// TF32: 32 bytes each) start 32 bytes apart. TF32: each thread rounds the chunks it copied to
// tf32 in shared memory once they have landed (round_tf32_16), before the fence that hands them
// to the async proxy, so the tensor core reads exact tf32 values, rounded to nearest as the
// mma.sync kernel rounds them in registers.
//
// The pipeline (tensor_core.cuh, LAG = 1): cp.async fills STAGES = 5 buffers, three steps ahead
// of the math; each thread fences its landed copies into the async proxy (fence.proxy.async)
// before the barrier that hands the buffer over; each warpgroup issues its four wgmma of a step as
// one group and then waits for the group before it, so one group is always in flight while the
// next step's copies are issued; the buffer refilled at step kt is the one read at step kt - 2,
// complete in every warpgroup before that step's barrier.
//
// Built only for sm_90a (setup.py); on other architectures the kernel body is empty and the host
// side (conv2d.cu: wgmma_available) never launches it.
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "common.h"
#include "conv2d.h"
#include "conv2d_igemm.cuh"
#include "ptx.cuh"
#include "tensor_core.cuh"

namespace cnnkern {
namespace conv {
namespace {

constexpr int ROW = 128;  // bytes of one row of a stage: BK = 64 halves or 32 floats of kk, eight 16-byte chunks
constexpr int STAGES = 5;

// The kernel's code exists in the sm_90a compile (and the host pass, which only needs its
// declaration); the other device compiles get an empty kernel of the same signature.
#if CNNKERN_WGMMA_ASM || !defined(__CUDA_ARCH__)
// one wgmma of the element type over 32 bytes of kk (m64nNk16 for fp16/bf16, m64nNk8 TF32 for
// fp32), N = 128 or 64
template <typename T, int N>
__device__ __forceinline__ void wgmma_step(float (&d)[N / 2], uint64_t a, uint64_t b) {
  static_assert(N == 128 || N == 64, "tiles of 128 or 64 columns");
  if constexpr (std::is_same_v<T, float>) {
    if constexpr (N == 128) {
      ptx::wgmma_m64n128k8_tf32(d, a, b);
    } else {
      ptx::wgmma_m64n64k8_tf32(d, a, b);
    }
  } else {
    constexpr bool bf16 = std::is_same_v<T, c10::BFloat16>;
    static_assert(bf16 || std::is_same_v<T, c10::Half>, "wgmma: fp16, bf16 or fp32 (TF32)");
    if constexpr (N == 128) {
      ptx::wgmma_m64n128k16<bf16>(d, a, b);
    } else {
      ptx::wgmma_m64n64k16<bf16>(d, a, b);
    }
  }
}

template <typename T, int WG, int BN, bool DGRAD>
__global__ void __launch_bounds__(128 * WG) wgmma_kernel(const IgemmParams<T> p) {
  constexpr int THREADS = 128 * WG, BM = 64 * WG, NT = BN / 8;
  constexpr int EPC = 16 / sizeof(T), BK = 8 * EPC;  // elements per 16-byte chunk, per 128-byte row
  constexpr int A_ITERS = BM * 8 / THREADS, B_ITERS = BN * 8 / THREADS;
  constexpr int STAGE_A = BM * ROW, STAGE = (BM + BN) * ROW;  // bytes
  static_assert(BM * BN * 4 <= STAGES * STAGE, "the fp32 tile must fit the stages");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  // the swizzle atoms must start on 1024 bytes of the shared address space
  unsigned char* smem = smem_raw + ((1024 - (ptx::smem_u32(smem_raw) & 1023)) & 1023);
  const uint32_t s0 = ptx::smem_u32(smem);

  const int t = threadIdx.x, warp = t / 32, wg = warp / 4;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN, g = blockIdx.z % p.G;
  const int chunk = t % 8;  // the 16-byte chunk of each row this thread copies: rows t/8 + i*THREADS/8

  const GatherA<T, A_ITERS, DGRAD> ga(p, m0, g, t / 8, THREADS / 8);
  const GatherB<T, B_ITERS> gb(p, n0, g, t / 8, THREADS / 8);
  const StepRange steps = step_range(p, BK);

  auto load_stage = [&](int kt, int stage) {
    const int kk = (steps.first + kt) * BK + chunk * EPC;
    const Tap tap = tap_of(p, kk);
    const uint32_t dA = s0 + stage * STAGE, dB = dA + STAGE_A;
#pragma unroll
    for (int i = 0; i < A_ITERS; ++i) ga.copy(p, i, tap, dA + wgmma_swz128(t / 8 + i * (THREADS / 8), chunk));
#pragma unroll
    for (int i = 0; i < B_ITERS; ++i) {
      gb.copy(p, i, kk, tap.ok, dB + wgmma_swz128(t / 8 + i * (THREADS / 8), chunk));
    }
  };

  float acc[1][NT][4];  // the warp's 16 rows x BN columns: register 4j + e of the wgmma accumulator
  zero_tile(acc);
  float(&d)[BN / 2] = reinterpret_cast<float(&)[BN / 2]>(acc);
  const uint32_t a_rows = static_cast<uint32_t>(wg) * 64 * ROW;  // this warpgroup's 64 rows of A

  // TF32: this thread's chunks of a landed step, rounded in place (the rows and chunk it copied)
  auto round_landed = [&](int, int stage) {
    if constexpr (std::is_same_v<T, float>) {
      unsigned char* at = smem + stage * STAGE;
#pragma unroll
      for (int i = 0; i < A_ITERS; ++i) round_tf32_16(at + wgmma_swz128(t / 8 + i * (THREADS / 8), chunk));
#pragma unroll
      for (int i = 0; i < B_ITERS; ++i) {
        round_tf32_16(at + STAGE_A + wgmma_swz128(t / 8 + i * (THREADS / 8), chunk));
      }
    }
  };

  cp_async_pipeline<STAGES, 1, true>(
      steps.count, load_stage,
      [&](int stage) {
        const uint32_t a = s0 + stage * STAGE + a_rows, b = s0 + stage * STAGE + STAGE_A;
        ptx::wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {  // four k steps 32 bytes apart in the 128-byte rows
          wgmma_step<T, BN>(d, wgmma_desc_k128(a + ks * 32), wgmma_desc_k128(b + ks * 32));
        }
        ptx::wgmma_commit();
        ptx::wgmma_wait<1>();  // the group of the step before is complete: its buffer may be refilled
      },
      round_landed);
  ptx::wgmma_wait<0>();
  ptx::fence_operands(d);

  igemm_epilogue<T, BM, BN>(p, acc, m0, n0, g, wg * 64 + (warp % 4) * 16, 0, smem);
}
#else
template <typename T, int WG, int BN, bool DGRAD>
__global__ void __launch_bounds__(128 * WG) wgmma_kernel(const IgemmParams<T>) {
  ptx::no_wgmma();
}
#endif

template <typename T, int WG, int BN, bool DGRAD>
void launch_one(const IgemmParams<T>& p, cudaStream_t stream) {
  constexpr int BM = 64 * WG;
  constexpr size_t smem = static_cast<size_t>(STAGES) * (BM + BN) * ROW + 1024;  // + room to align to 1024
  auto kernel = wgmma_kernel<T, WG, BN, DGRAD>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid((p.M + BM - 1) / BM, (p.NO + BN - 1) / BN, p.G * std::max(1, p.splits));
  TORCH_CHECK(grid.y < 65536 && grid.z < 65536, "cnnkern conv2d (cuda, wgmma): grid too large");
  kernel<<<grid, 128 * WG, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool DGRAD>
void launch_tile(const IgemmParams<T>& p, int tile, cudaStream_t stream) {
  switch (tile) {  // the tiles of igemm_tile (conv2d.cu), rows x columns
    case 0: launch_one<T, 2, 128, DGRAD>(p, stream); break;  // 128 x 128
    case 1: launch_one<T, 1, 128, DGRAD>(p, stream); break;  // 64 x 128
    default: launch_one<T, 2, 64, DGRAD>(p, stream); break;  // 128 x 64
  }
}

}  // namespace

bool wgmma_available() {
#if defined(CNNKERN_SM90A)
  int dev = 0, major = 0, minor = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  return major == 9 && minor == 0;
#else
  return false;
#endif
}

// (the caller has checked wgmma_available(): conv2d.cu's choose_algo)
template <typename T>
void launch_wgmma(const IgemmParams<T>& p, bool dgrad, int tile, cudaStream_t stream) {
  constexpr int EPC = 16 / sizeof(T);
  TORCH_CHECK(p.CK % EPC == 0 && p.Cs % EPC == 0, "cnnkern conv2d (cuda, wgmma): channels must be multiples of ",
              EPC);
  if (dgrad) {
    launch_tile<T, true>(p, tile, stream);
  } else {
    launch_tile<T, false>(p, tile, stream);
  }
}

template void launch_wgmma<float>(const IgemmParams<float>&, bool, int, cudaStream_t);
template void launch_wgmma<c10::Half>(const IgemmParams<c10::Half>&, bool, int, cudaStream_t);
template void launch_wgmma<c10::BFloat16>(const IgemmParams<c10::BFloat16>&, bool, int, cudaStream_t);

}  // namespace conv
}  // namespace cnnkern
