// Gradient of the filter on tensor cores, CUDA C++ (fp16/bf16, and fp32 as TF32; fp32
// accumulation; sm_80+), for inputs and output gradients whose channels are contiguous
// (channels_last) and 16-byte aligned.
//
// The GEMM: rows o (output channels of a group), columns j = (r*S + s)*C + c (filter taps, then
// channels: the consecutive columns of one 16-byte chunk, 8 halves or 4 floats, are consecutive
// channels of one tap, one chunk of an NHWC pixel), reduction over the output pixels l = (n, p,
// q). Both operands arrive with the reduction index as the *slow* one: grad_out is [l][o] (o
// contiguous) and the gathered input is [l][j] (c contiguous). So a stage holds BK pixels as rows:
// A_s[BK][64 o], B_s[BK][128 j], filled with 16-byte cp.async (zero fill for padding taps, pixels
// past the split and o/j tails).
//
// fp16/bf16 (BK = 32, mma.sync m16n8k16): the fragments are read with ldmatrix .trans, which
// turns those pixel-major 8x8 blocks into the row-major A (o x l) and column-major B (l x j)
// fragments; in each row the 16-byte chunk c sits at chunk c ^ (row % 8), so the eight rows an
// ldmatrix phase reads (eight pixels, same chunk) hit eight different bank groups.
// fp32 as TF32 (BK = 16, mma.sync m16n8k8): ldmatrix cannot transpose 32-bit elements, and wgmma
// has no transposed tf32 operands, so each lane reads its fragment words with plain 32-bit loads
// (A: o = gid (+8), l = tig (+4); B: l = tig (+4), j = gid) and rounds them to TF32 (to nearest,
// as the forward kernels do). A lane reads row tig, word gid of a 4 x 8 block: rows padded by 8
// words (72 and 136 words, both 8 mod 32 banks) put the 32 lanes on 32 different banks.
//
// 8 warps in a 2 x 4 grid over the 64 x 128 tile (warp tile 32 x 32: 2 x 4 fragments of m16n8),
// 3 stages in flight (36 KiB of shared memory for 16-bit types, 39 KiB for fp32). The reduction
// over pixels is split exactly as for the SIMT kernel (conv2d_wgrad.cu: fixed slices, fp32
// partials, a fixed-order sum), and the partials are written in its layout (c*R*S + r*S + s), so
// the same reduce kernel finishes both: bitwise reproducible run to run.
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
constexpr int BM = 64, BN = 128, STAGES = 3;
constexpr int WARPS_M = 2, WARPS_N = 4, WTM = BM / WARPS_M, WTN = BN / WARPS_N, MT = WTM / 16, NT = WTN / 8;

// The shared-memory tiles of one element type: BK pixels per stage, rows of 16-byte chunks
// (A: BM / EPC chunks, B: BN / EPC), the k of one mma (KSTEP) and where chunk c of row r lives.
template <typename T>
struct Tiles {
  static constexpr bool kTf32 = std::is_same_v<T, float>;
  static constexpr int EPC = 16 / sizeof(T);                 // elements per 16-byte chunk
  static constexpr int BK = kTf32 ? 16 : 32, KSTEP = kTf32 ? 8 : 16;
  static constexpr int A_CHUNKS = BM / EPC, B_CHUNKS = BN / EPC;
  static constexpr int PAD = kTf32 ? 8 : 0;                  // words appended to every fp32 row
  static constexpr int A_LD = BM + PAD, B_LD = BN + PAD;     // row strides, elements
  static constexpr int STAGE_A = BK * A_LD, STAGE_B = BK * B_LD;
  static constexpr size_t kSmem = static_cast<size_t>(STAGES) * (STAGE_A + STAGE_B) * sizeof(T);
  static_assert(BK * A_CHUNKS == kThreads && BK * B_CHUNKS == 2 * kThreads, "one A and two B chunks per thread");
  static_assert(kSmem <= 48 * 1024, "the stages fit the default shared memory");
  static_assert(!kTf32 || (A_LD % 32 == 8 && B_LD % 32 == 8), "fp32 rows 8 banks apart: conflict-free fragments");

  // element offset of chunk c of row r in a tile with `chunks` chunks per row: swizzled (16-bit
  // types, for ldmatrix) or padded (fp32)
  static __device__ __forceinline__ int at(int r, int c, int chunks) {
    if constexpr (kTf32) {
      return r * (chunks * EPC + PAD) + c * EPC;
    } else {
      return (r * chunks + (c ^ (r & 7))) * EPC;
    }
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) wgrad_igemm_kernel(const WgradParams<T, float> p) {
  using Tl = Tiles<T>;
  constexpr int BK = Tl::BK, KSTEP = Tl::KSTEP, EPC = Tl::EPC;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sA = reinterpret_cast<T*>(smem_raw);
  T* sB = sA + STAGES * Tl::STAGE_A;

  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int wm = warp % WARPS_M, wn = warp / WARPS_M;
  const int RS = p.R * p.S, J = p.C * RS;
  const int o0 = blockIdx.x * BM, j0 = blockIdx.y * BN;
  const int g = blockIdx.z % p.G, split = blockIdx.z / p.G;
  const int64_t l_begin = static_cast<int64_t>(split) * p.chunk;
  const int64_t l_end = l_begin + p.chunk < p.L ? l_begin + p.chunk : p.L;

  // Copy roles. A: one chunk per thread (row t / A_CHUNKS, chunk t % A_CHUNKS). B: two chunks per
  // thread (rows t / B_CHUNKS and that + BK / 2, chunk t % B_CHUNKS), whose tap and channel are
  // fixed for the block.
  const int a_row = t / Tl::A_CHUNKS, a_chunk = t % Tl::A_CHUNKS;
  const int b_row = t / Tl::B_CHUNKS, b_chunk = t % Tl::B_CHUNKS;
  const WgradGather<T> gather(p, g, o0 + a_chunk * EPC, j0 + b_chunk * EPC);

  auto load_stage = [&](int step, int stage) {
    const int64_t l0 = l_begin + static_cast<int64_t>(step) * BK;
    const T* src;
    bool ok = gather.a(p, l0 + a_row, l_end, src);
    ptx::cp_async16(ptx::smem_u32(sA + stage * Tl::STAGE_A + Tl::at(a_row, a_chunk, Tl::A_CHUNKS)), src, ok ? 16 : 0);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = b_row + (BK / 2) * i;
      ok = gather.b(p, l0 + row, l_end, src);
      ptx::cp_async16(ptx::smem_u32(sB + stage * Tl::STAGE_B + Tl::at(row, b_chunk, Tl::B_CHUNKS)), src, ok ? 16 : 0);
    }
  };

  float acc[MT][NT][4];
  zero_tile(acc);

  const int KT = static_cast<int>((l_end - l_begin + BK - 1) / BK);
  // ldmatrix lane roles: lane 8m + i addresses row i of matrix m; mma roles: gid, tig
  const int lm = lane / 8, li = lane % 8;
  const int gid = lane / 4, tig = lane % 4;
  cp_async_pipeline<STAGES>(KT, load_stage, [&](int stage) {
    const T* tA = sA + stage * Tl::STAGE_A;
    const T* tB = sB + stage * Tl::STAGE_B;
#pragma unroll
    for (int ks = 0; ks < BK / KSTEP; ++ks) {
      uint32_t af[MT][4], bf[NT][2];
      if constexpr (Tl::kTf32) {
        // A (o x l, m16n8k8): a0 (o gid, l tig), a1 (o gid + 8, l tig), a2, a3: l + 4; B (l x j):
        // b0 (l tig, j gid), b1 (l tig + 4, j gid). Rows are pixels, words o or j (shared
        // addresses, 4 bytes a word).
        const uint32_t wA = ptx::smem_u32(tA + (ks * KSTEP + tig) * Tl::A_LD);
        const uint32_t wB = ptx::smem_u32(tB + (ks * KSTEP + tig) * Tl::B_LD);
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          const uint32_t o = 4 * (wm * WTM + i * 16 + gid);
          af[i][0] = ptx::lds32(wA + o);
          af[i][1] = ptx::lds32(wA + o + 4 * 8);
          af[i][2] = ptx::lds32(wA + 4 * 4 * Tl::A_LD + o);
          af[i][3] = ptx::lds32(wA + 4 * 4 * Tl::A_LD + o + 4 * 8);
          Mma<T>::prepare(af[i]);
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const uint32_t n = 4 * (wn * WTN + j * 8 + gid);
          bf[j][0] = ptx::cvt_rna_tf32(ptx::lds32(wB + n));
          bf[j][1] = ptx::cvt_rna_tf32(ptx::lds32(wB + 4 * 4 * Tl::B_LD + n));
        }
      } else {
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          // matrices (o 0-7, l 0-7), (o 8-15, l 0-7), (o 0-7, l 8-15), (o 8-15, l 8-15): a0..a3
          const int row = ks * 16 + 8 * (lm >> 1) + li;
          const int chunk = (wm * WTM + i * 16) / 8 + (lm & 1);
          ptx::ldmatrix_x4_trans(af[i], ptx::smem_u32(tA + Tl::at(row, chunk, Tl::A_CHUNKS)));
        }
#pragma unroll
        for (int j = 0; j < NT / 2; ++j) {
          // matrices (l 0-7, j 0-7), (l 8-15, j 0-7), (l 0-7, j 8-15), (l 8-15, j 8-15):
          // b0, b1 of column fragment 2j, then of 2j + 1
          const int row = ks * 16 + 8 * (lm & 1) + li;
          const int chunk = (wn * WTN + j * 16) / 8 + (lm >> 1);
          uint32_t r4[4];
          ptx::ldmatrix_x4_trans(r4, ptx::smem_u32(tB + Tl::at(row, chunk, Tl::B_CHUNKS)));
          set_b_pair(bf, j, r4);
        }
      }
      mma_tile<T>(acc, af, bf);
    }
  });

  // Epilogue: fragment element e of acc[i][j] is row gid (+8 for e >= 2), column 2*tig + (e & 1);
  // partial tile in the SIMT kernel's layout, part[split][g][o][c*R*S + r*S + s].
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int o = o0 + wm * WTM + i * 16 + gid + 8 * h;
      if (o >= p.K) continue;
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int jj = j0 + wn * WTN + j * 8 + 2 * tig + e;
          if (jj < J) p.part[wgrad_partial_at(p, split, g, o, jj)] = acc[i][j][2 * h + e];
        }
    }
}

}  // namespace

int wgrad_igemm_tile_rows() { return BM; }
int wgrad_igemm_tile_cols() { return BN; }

template <typename T>
void launch_wgrad_igemm(const WgradParams<T, float>& p, cudaStream_t stream) {
  constexpr int epc = Tiles<T>::EPC;
  TORCH_CHECK(p.K % epc == 0 && p.C % epc == 0, "cnnkern conv2d (cuda, tensor-core grad-weight): channels per group "
              "must be multiples of ", epc);
  constexpr size_t smem = Tiles<T>::kSmem;
  const int J = p.C * p.R * p.S;
  const dim3 grid((p.K + BM - 1) / BM, (J + BN - 1) / BN, p.G * p.splits);
  TORCH_CHECK(grid.y < 65536 && grid.z < 65536, "cnnkern conv2d (cuda): grad-weight grid too large");
  wgrad_igemm_kernel<T><<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_wgrad_igemm<c10::Half>(const WgradParams<c10::Half, float>&, cudaStream_t);
template void launch_wgrad_igemm<c10::BFloat16>(const WgradParams<c10::BFloat16, float>&, cudaStream_t);
template void launch_wgrad_igemm<float>(const WgradParams<float, float>&, cudaStream_t);  // TF32

}  // namespace conv
}  // namespace cnnkern
