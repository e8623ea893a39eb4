// Gradient of the filter on Hopper's warpgroup MMA (wgmma, sm_90a only; fp16/bf16, fp32
// accumulate): the GEMM of conv2d_wgrad_igemm.cu (rows o, the output channels of a group; columns
// j = (r*S + s)*C + c; reduction over the output pixels l = (n, p, q)), the same operands, split
// and partial layout, with wgmma instead of mma.sync.
//
// Both operands arrive pixel-major (grad_out is [l][o], the gathered input [l][j], channels
// contiguous), which wgmma reads as they are: an M-major A and an N-major B (its transpose
// immediates set). A stage holds BK = 64 pixels; per pixel one 128-byte row of A (64 o) and two of
// B (64 j each, one per warpgroup), each row's eight 16-byte chunks in the 128-byte swizzle (chunk
// c of row l at chunk c ^ (l % 8)), 8 rows to a 1024-aligned atom of 1024 bytes; a k16 step
// reads two atoms of each operand, 2048 bytes apart per step; every operand is one atom (64
// elements) wide in M or N (tensor_core.cuh: wgmma_desc_mn128).
//
// The block: two warpgroups on a 64 x 128 tile (warpgroup w: all 64 rows, columns 64w..64w+63;
// one m64n64k16 per k16 step), 4 stages of 24 KiB in the LAG = 1 cp.async pipeline of the wgmma
// forward (conv2d_wgmma.cu): fence.proxy.async before each hand-over, one wgmma group in flight.
// The epilogue writes the split's fp32 partial tile in the SIMT kernel's layout, and the same
// fixed-order reduce finishes it: bitwise reproducible run to run.
//
// Built only for sm_90a (setup.py); elsewhere the kernel body is empty and the host (conv2d.cu)
// never launches it.
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "conv2d.h"
#include "conv2d_wgrad_gather.cuh"
#include "ptx.cuh"
#include "tensor_core.cuh"

namespace cnnkern {
namespace conv {
namespace {

constexpr int kThreads = 256;
constexpr int BM = 64, BN = 128, BK = 64, STAGES = 4;
constexpr int ROW = 128;               // bytes: 64 halves of o or of j
constexpr int STAGE = 3 * BK * ROW;   // bytes: A, then B's two column halves

#if CNNKERN_WGMMA_ASM || !defined(__CUDA_ARCH__)
constexpr int STAGE_A = BK * ROW;
template <typename T>
__global__ void __launch_bounds__(kThreads) wgrad_wgmma_kernel(const WgradParams<T, float> p) {
  static_assert(std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>, "wgmma: fp16 or bf16");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  // the swizzle atoms must start on 1024 bytes of the shared address space
  const uint32_t s0 = ptx::smem_u32(smem_raw) + ((1024 - (ptx::smem_u32(smem_raw) & 1023)) & 1023);

  const int t = threadIdx.x, warp = t / 32, wg = warp / 4, lane = t % 32;
  const int RS = p.R * p.S, J = p.C * RS;
  const int o0 = blockIdx.x * BM, j0 = blockIdx.y * BN;
  const int g = blockIdx.z % p.G, split = blockIdx.z / p.G;
  const int64_t l_begin = static_cast<int64_t>(split) * p.chunk;
  const int64_t l_end = l_begin + p.chunk < p.L ? l_begin + p.chunk : p.L;

  // Copy roles. A: chunk t % 8 of rows t / 8 and t / 8 + 32. B: chunk t % 16 (half (t % 16) / 8)
  // of rows t / 16 + 16 i; that chunk's tap and channel are fixed for the block.
  const int a_chunk = t % 8, a_row = t / 8;
  const int b_chunk = t % 16, b_row = t / 16;
  const WgradGather<T> gather(p, g, o0 + a_chunk * 8, j0 + b_chunk * 8);
  const uint32_t b_base = STAGE_A + (b_chunk / 8) * BK * ROW;

  auto load_stage = [&](int step, int stage) {
    const int64_t l0 = l_begin + static_cast<int64_t>(step) * BK;
    const uint32_t dst = s0 + stage * STAGE;
    const T* src;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = a_row + 32 * i;
      const bool ok = gather.a(p, l0 + row, l_end, src);
      ptx::cp_async16(dst + wgmma_swz128(row, a_chunk), src, ok ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = b_row + 16 * i;
      const bool ok = gather.b(p, l0 + row, l_end, src);
      ptx::cp_async16(dst + b_base + wgmma_swz128(row, b_chunk % 8), src, ok ? 16 : 0);
    }
  };

  float acc[1][8][4];  // the warp's 16 rows x 64 columns: register 4j + e of the wgmma accumulator
  zero_tile(acc);
  float(&d)[32] = reinterpret_cast<float(&)[32]>(acc);

  const int KT = static_cast<int>((l_end - l_begin + BK - 1) / BK);
  cp_async_pipeline<STAGES, 1, true>(KT, load_stage, [&](int stage) {
    const uint32_t a = s0 + stage * STAGE, b = a + STAGE_A + wg * BK * ROW;
    ptx::wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {  // k16 steps: two 1024-byte atoms (16 pixels) each
      ptx::wgmma_m64n64k16_mn<std::is_same_v<T, c10::BFloat16>>(d, wgmma_desc_mn128(a + ks * 2048),
                                                                 wgmma_desc_mn128(b + ks * 2048));
    }
    ptx::wgmma_commit();
    ptx::wgmma_wait<1>();  // the group of the step before is complete: its buffer may be refilled
  });
  ptx::wgmma_wait<0>();
  ptx::fence_operands(d);

  // Epilogue: register 4j + e is row 16 (warp % 4) + lane / 4 (+8 for e >= 2), column
  // 64 wg + 8 j + 2 (lane % 4) + (e & 1); the partial tile in the SIMT kernel's layout,
  // part[split][g][o][c*R*S + r*S + s].
  const int gid = lane / 4, tig = lane % 4;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int o = o0 + 16 * (warp % 4) + gid + 8 * h;
    if (o >= p.K) continue;
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int jj = j0 + 64 * wg + 8 * j + 2 * tig + e;
        if (jj < J) p.part[wgrad_partial_at(p, split, g, o, jj)] = acc[0][j][2 * h + e];
      }
  }
}
#else
template <typename T>
__global__ void __launch_bounds__(kThreads) wgrad_wgmma_kernel(const WgradParams<T, float>) {
  ptx::no_wgmma();
}
#endif

}  // namespace

int wgrad_wgmma_tile_rows() { return BM; }
int wgrad_wgmma_tile_cols() { return BN; }

// (the caller has checked wgmma_available(): conv2d.cu)
template <typename T>
void launch_wgrad_wgmma(const WgradParams<T, float>& p, cudaStream_t stream) {
  TORCH_CHECK(p.K % 8 == 0 && p.C % 8 == 0, "cnnkern conv2d (cuda, wgmma grad-weight): channels per group must be "
              "multiples of 8");
  constexpr size_t smem = static_cast<size_t>(STAGES) * STAGE + 1024;  // + room to align to 1024
  auto kernel = wgrad_wgmma_kernel<T>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const int J = p.C * p.R * p.S;
  const dim3 grid((p.K + BM - 1) / BM, (J + BN - 1) / BN, p.G * p.splits);
  TORCH_CHECK(grid.y < 65536 && grid.z < 65536, "cnnkern conv2d (cuda): grad-weight grid too large");
  kernel<<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_wgrad_wgmma<c10::Half>(const WgradParams<c10::Half, float>&, cudaStream_t);
template void launch_wgrad_wgmma<c10::BFloat16>(const WgradParams<c10::BFloat16, float>&, cudaStream_t);

}  // namespace conv
}  // namespace cnnkern
