// cuemu's stand-in for csrc/cuda/ptx.cuh: the same functions, in C++, following the PTX ISA
// (sections "cp.async", "ldmatrix", "Matrix fragments for mma.m16n8k16 with floating point type",
// "Matrix fragments for mma.m16n8k8" (.tf32), "cvt", "Asynchronous Warpgroup Level Matrix
// Multiply-Accumulate" (wgmma: register fragments, shared memory matrix layout and descriptors),
// "membar/fence" (fence.proxy.async)). Warp-collective operations exchange their
// operands through per-lane slots between two warp barriers.
#pragma once

#include <cstdint>
#include <cstring>

#include "cuemu.h"

namespace cnnkern {
namespace ptx {

// The "shared-state-space address" of the block's dynamic shared memory (the only shared memory
// the kernels hand to cp.async, ldmatrix and wgmma) starts at kSharedBase: 128-aligned, as the
// kernels declare it, but not 1024-aligned, so a kernel that needs more (wgmma's 128-byte swizzle
// atoms) must align it itself, as it must on a GPU.
constexpr uint32_t kSharedBase = 128;

inline uint32_t smem_u32(const void* p) {
  auto& b = *::cuemu::g_block;
  const auto* c = static_cast<const unsigned char*>(p);
  TORCH_CHECK(c >= b.smem.data() && c <= b.smem.data() + b.smem_bytes,
              "cuemu: smem_u32 of a pointer outside the dynamic shared memory");
  return kSharedBase + static_cast<uint32_t>(c - b.smem.data());
}

// the bytes at shared address `addr` (checked: inside the block's shared memory, 16-byte aligned)
inline unsigned char* smem_at(uint32_t addr, uint32_t bytes, const char* what) {
  auto& b = *::cuemu::g_block;
  TORCH_CHECK(addr >= kSharedBase && static_cast<size_t>(addr - kSharedBase) + bytes <= b.smem_bytes, "cuemu: ",
              what, " at shared address ", addr, " + ", bytes, " bytes is outside the block's ", b.smem_bytes,
              " bytes at ", kSharedBase);
  TORCH_CHECK(addr % 16 == 0, "cuemu: ", what, " at shared address ", addr, " is not 16-byte aligned");
  return b.smem.data() + (addr - kSharedBase);
}

inline void cp_async16(uint32_t dst, const void* src, int bytes) {
  TORCH_CHECK(bytes == 0 || bytes == 16 || bytes == 4 || bytes == 8, "cuemu: cp.async src-size ", bytes);
  TORCH_CHECK(bytes == 0 || reinterpret_cast<uintptr_t>(src) % 16 == 0,
              "cuemu: cp.async 16 from a global address that is not 16-byte aligned");
  ::cuemu::Copy c{smem_at(dst, 16, "cp.async"), static_cast<const unsigned char*>(src), bytes};
  if (::cuemu::g_block->late_copies) {
    ::cuemu::self().open.push_back(c);
  } else {
    ::cuemu::do_copy(c);
  }
}

inline void cp_async_commit() {
  auto& t = ::cuemu::self();
  t.groups.push_back(std::move(t.open));
  t.open.clear();
}

template <int N>
inline void cp_async_wait() {
  auto& t = ::cuemu::self();
  while (t.groups.size() > static_cast<size_t>(N)) {
    for (auto& c : t.groups.front()) ::cuemu::do_copy(c);
    t.groups.pop_front();
  }
}

// ldmatrix.x4, both forms: every lane publishes its row address, then reads the shared memory the
// instruction would hand it. `trans` = false: lane l takes from matrix j the 32-bit word l % 4
// (elements 2*(l%4), 2*(l%4)+1) of row l / 4. `trans` = true: it takes the 16-bit elements of
// column l / 4 in rows 2*(l%4) (low half) and 2*(l%4)+1 (high half). Row i of matrix j is the
// address of lane 8j + i.
inline void ldmatrix_x4_impl(uint32_t (&r)[4], uint32_t addr, bool trans) {
  auto& b = *::cuemu::g_block;
  auto& me = ::cuemu::self();
  smem_at(addr, 16, "ldmatrix row");
  std::memcpy(me.slot, &addr, 4);
  ::cuemu::warp_sync();
  if (me.lane == 0) ::cuemu::count_ldmatrix_phases(b, me.warp);
  const int base = me.warp * 32;
  auto row_addr = [&](int j, int i) {
    uint32_t a;
    std::memcpy(&a, b.threads[base + 8 * j + i].slot, 4);
    return a;
  };
  for (int j = 0; j < 4; ++j) {
    if (!trans) {
      std::memcpy(&r[j], smem_at(row_addr(j, me.lane / 4), 16, "ldmatrix row") + 4 * (me.lane % 4), 4);
      continue;
    }
    const int t = me.lane % 4, col = me.lane / 4;
    uint16_t lo, hi;
    std::memcpy(&lo, smem_at(row_addr(j, 2 * t), 16, "ldmatrix row") + 2 * col, 2);
    std::memcpy(&hi, smem_at(row_addr(j, 2 * t + 1), 16, "ldmatrix row") + 2 * col, 2);
    r[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  ::cuemu::warp_sync();  // the slots are free again
}

inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { ldmatrix_x4_impl(r, addr, false); }

// ld.shared.b32 by a whole warp: every lane publishes its address (for the bank count), then reads
// its own word. (A 4-byte-aligned word inside the block's shared memory.)
inline uint32_t lds32(uint32_t addr) {
  auto& b = *::cuemu::g_block;
  auto& me = ::cuemu::self();
  TORCH_CHECK(addr >= kSharedBase && static_cast<size_t>(addr - kSharedBase) + 4 <= b.smem_bytes,
              "cuemu: ld.shared.b32 at shared address ", addr, " is outside the block's ", b.smem_bytes, " bytes");
  TORCH_CHECK(addr % 4 == 0, "cuemu: ld.shared.b32 at shared address ", addr, " is not 4-byte aligned");
  std::memcpy(me.slot, &addr, 4);
  ::cuemu::warp_sync();
  if (me.lane == 0) ::cuemu::count_lds32(b, me.warp);
  uint32_t r;
  std::memcpy(&r, b.smem.data() + (addr - kSharedBase), 4);
  ::cuemu::warp_sync();  // the slots are free again
  return r;
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { ldmatrix_x4_impl(r, addr, true); }

struct MmaOperands {
  uint32_t a[4], b[2];
  float c[4];
};

inline float half_bits(uint32_t reg, int hi, bool bf16) {
  const auto h = static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xFFFFu);
  if (bf16) {
    c10::BFloat16 v;
    v.x = h;
    return static_cast<float>(v);
  }
  c10::Half v;
  v.x = h;
  return static_cast<float>(v);
}

// The tf32 operand the tensor core reads: the top 19 bits (the low 13 mantissa bits are ignored).
inline float tf32_bits(uint32_t reg) { return __uint_as_float(reg & 0xFFFFE000u); }

// One mma.sync for the warp: every lane publishes its fragments, the first lane past the barrier
// rebuilds A (16 x K) and B (K x 8) from all 32 lanes' registers and computes all 32 x 4 results
// (exact products, double sums, one rounding to f32 per result), each lane takes its four.
// Fragment layouts (groupID g = lane / 4, threadID_in_group t = lane % 4):
//   m16n8k16 f16/bf16, two halves per register (low half = lower k):
//     A register r: row g + 8*(r & 1), k 2t + 8*(r >> 1) (+1 in the high half)
//     B register r: k 2t + 8r (+1 in the high half), column g
//   m16n8k8 tf32, one element per register:
//     A register r: row g + 8*(r & 1), k t + 4*(r >> 1);  B register r: k t + 4r, column g
//   D (both) element i: row g + 8*(i >= 2), column 2t + (i & 1)
template <int K>
inline void mma_warp(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, int kind) {
  auto& blk = *::cuemu::g_block;
  auto& me = ::cuemu::self();
  const MmaOperands mine{{a[0], a[1], a[2], a[3]}, {b0, b1}, {d[0], d[1], d[2], d[3]}};
  static_assert(sizeof(MmaOperands) <= sizeof(me.slot), "the operands must fit the lane's slot");
  std::memcpy(me.slot, &mine, sizeof mine);
  ::cuemu::warp_sync();
  auto& ws = blk.warps[me.warp];
  if (ws.arrived++ == 0) {
    ::cuemu::g_stats.mma_sync += 1;
    float A[16][K], B[K][8];
    const int base = me.warp * 32;
    for (int l = 0; l < 32; ++l) {
      MmaOperands o;
      std::memcpy(&o, blk.threads[base + l].slot, sizeof o);
      const int g = l / 4, t = l % 4;
      for (int r = 0; r < 4; ++r) {
        const int row = g + 8 * (r & 1);
        if (kind == 2) {
          A[row][t + 4 * (r >> 1)] = tf32_bits(o.a[r]);
        } else {
          const int k = 2 * t + 8 * (r >> 1);
          A[row][k] = half_bits(o.a[r], 0, kind == 1);
          A[row][k + 1] = half_bits(o.a[r], 1, kind == 1);
        }
      }
      for (int r = 0; r < 2; ++r) {
        if (kind == 2) {
          B[t + 4 * r][g] = tf32_bits(o.b[r]);
        } else {
          B[2 * t + 8 * r][g] = half_bits(o.b[r], 0, kind == 1);
          B[2 * t + 8 * r + 1][g] = half_bits(o.b[r], 1, kind == 1);
        }
      }
    }
    for (int l = 0; l < 32; ++l) {
      MmaOperands o;
      std::memcpy(&o, blk.threads[base + l].slot, sizeof o);
      for (int i = 0; i < 4; ++i) {
        const int row = l / 4 + 8 * (i >= 2), col = 2 * (l % 4) + (i & 1);
        double acc = 0.0;
        for (int k = 0; k < K; ++k) acc += static_cast<double>(A[row][k]) * static_cast<double>(B[k][col]);
        ws.d[l][i] = static_cast<float>(static_cast<double>(o.c[i]) + acc);
      }
    }
  }
  float out[4];
  for (int i = 0; i < 4; ++i) out[i] = ws.d[me.lane][i];
  if (ws.arrived == 32) ws.arrived = 0;
  ::cuemu::warp_sync();  // the slots and the scratch are free again
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

inline void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma_warp<16>(d, a, b0, b1, 0);
}
inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma_warp<16>(d, a, b0, b1, 1);
}
inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma_warp<8>(d, a, b0, b1, 2);
}

// cvt.rna.tf32.f32: round the fp32 value to 10 mantissa bits, to nearest, ties away from zero
// (in sign-magnitude bits: add half of the dropped range, then clear it); NaN and Inf unchanged.
inline uint32_t cvt_rna_tf32(uint32_t bits) {
  if ((bits & 0x7F800000u) == 0x7F800000u) return bits;
  return (bits + 0x1000u) & 0xFFFFE000u;
}

// ---- wgmma (sm_90a) ------------------------------------------------------------------------------
#define CNNKERN_WGMMA_ASM 1

inline void no_wgmma() {}

// wgmma.fence: orders register accesses; the emulator only checks that one came before the first
// wgmma of the warp.
inline void wgmma_fence() { ::cuemu::g_block->warps[::cuemu::self().warp].wgmma_fenced = true; }

// fence.proxy.async: this thread's cp.async data becomes visible to the async proxy.
inline void fence_proxy_async() {
  auto& b = *::cuemu::g_block;
  auto& t = ::cuemu::self();
  for (uint32_t c : t.unfenced) b.generic[c] = 0;
  t.unfenced.clear();
}

template <int N>
inline void fence_operands(float (&)[N]) {}

// The element types of a wgmma's operands: 16-bit f16 or bf16 (k16 steps), or tf32 (k8 steps),
// read from a 32-bit fp32 word as the tensor core reads a tf32 operand (tf32_bits: the low 13
// mantissa bits ignored).
enum class WgmmaType { F16, BF16, TF32 };
inline int wgmma_bytes(WgmmaType ty) { return ty == WgmmaType::TF32 ? 4 : 2; }

// The element at logical shared address `addr` of a 128-byte-swizzled operand: the 16-byte chunk
// address bits 4-6 XORed with bits 7-9; cp.async data must have been fenced into the async proxy
// by its writer.
inline float wgmma_read(uint32_t addr, WgmmaType ty) {
  const uint32_t phys = addr ^ (((addr >> 7) & 7) << 4);
  const unsigned char* at = smem_at(phys & ~15u, 16, "wgmma operand") + (phys & 15u);
  TORCH_CHECK(!::cuemu::g_block->generic[(phys - kSharedBase) / 16], "cuemu: wgmma reads shared address ", phys,
              ", written by cp.async without a fence.proxy.async of its writer (generic proxy data)");
  if (ty == WgmmaType::TF32) {
    uint32_t w;
    std::memcpy(&w, at, 4);
    return tf32_bits(w);
  }
  uint16_t h;
  std::memcpy(&h, at, 2);
  return half_bits(h, 0, ty == WgmmaType::BF16);
}

// A matrix descriptor's start address, leading and stride byte offsets; the 128-byte swizzle with
// base offset 0 is the only mode the kernels use, and anything else is an error.
struct WgmmaDesc {
  uint32_t start, lbo, sbo;
};
inline WgmmaDesc wgmma_decode(uint64_t desc) {
  const int base_offset = static_cast<int>((desc >> 49) & 7), mode = static_cast<int>(desc >> 62);
  TORCH_CHECK(mode == 1 && base_offset == 0, "cuemu: wgmma descriptor with swizzle mode ", mode, " and base offset ",
              base_offset, ": only the 128-byte swizzle with base offset 0 is emulated");
  return {static_cast<uint32_t>(desc & 0x3FFF) << 4, static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4,
          static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4};
}

// Element (row, k) of a K-major operand described by `desc`: in the 128-byte swizzle (the only
// mode the kernels use; anything else is an error), row r lies at start + (r / 8) * SBO +
// (r % 8) * 128 bytes, element k at 2k bytes into it, and the 16-byte chunk address bits 4-6 are
// XORed with bits 7-9 of the shared address (so the atoms must be 1024-aligned for chunk c of row
// r to sit at chunk c ^ (r % 8)).
inline float wgmma_operand(uint64_t desc, int row, int k, WgmmaType ty) {
  const auto [start, lbo, sbo] = wgmma_decode(desc);
  (void)lbo;  // a k step (32 bytes) of a K-major operand lies in one 128-byte row
  const uint32_t addr = start + static_cast<uint32_t>(row / 8) * sbo + static_cast<uint32_t>(row % 8) * 128 +
                        static_cast<uint32_t>(k * wgmma_bytes(ty));
  return wgmma_read(addr, ty);
}

// Element (mn, k) of an MN-major operand (a transpose immediate set) in the 128-byte swizzle: row
// k of an atom holds 64 consecutive M (or N) elements, element mn at 2*mn bytes into it, 8 rows
// (k % 8) of 128 bytes to an atom, atoms along K one offset field apart, the same swizzle XOR
// (f16/bf16 only: the PTX ISA has no transpose for tf32).
// Which offset field is the stride along K and which along MN is where readings of the PTX ISA
// differ for MN-major operands; the kernels avoid the question (one atom along MN, both fields
// equal: tensor_core.cuh, wgmma_desc_mn128), and anything else is an error here rather than
// one reading emulated as if it were the hardware's.
inline float wgmma_operand_mn(uint64_t desc, int mn, int k, WgmmaType ty) {
  const auto [start, lbo, sbo] = wgmma_decode(desc);
  TORCH_CHECK(ty != WgmmaType::TF32, "cuemu: wgmma has no transposed (MN-major) tf32 operands");
  TORCH_CHECK(mn < 64 && lbo == sbo, "cuemu: an MN-major wgmma operand more than one 128-byte atom (64 elements) ",
              "wide, or with different leading and stride byte offsets (", lbo, ", ", sbo, "), is not emulated: ",
              "the two readings of the PTX ISA's offsets disagree there");
  const uint32_t addr = start + static_cast<uint32_t>(k / 8) * sbo + static_cast<uint32_t>(k % 8) * 128 +
                        static_cast<uint32_t>(mn) * 2;
  return wgmma_read(addr, ty);
}

// One warp's share of a wgmma m64nNkK (K = 16 for f16/bf16, 8 for tf32): rows 16w..16w+15 (w =
// warp % 4) of D += A * B^T with A 64 x K and B N x K (K-major, or MN-major when op.mn), exact
// products summed in double, one rounding to f32. Lane l, register 4j + e: row 16w + l/4 +
// 8*(e >= 2), column 8j + 2*(l%4) + (e & 1).
inline void wgmma_compute(const ::cuemu::WarpScratch::Wgmma& op, int warp) {
  const auto ty = static_cast<WgmmaType>(op.type);
  const int w = warp % 4, K = ty == WgmmaType::TF32 ? 8 : 16;
  float A[16][16];
  std::vector<float> B(static_cast<size_t>(op.n) * 16);
  auto operand = op.mn ? wgmma_operand_mn : wgmma_operand;
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < K; ++k) A[r][k] = operand(op.desc_a, 16 * w + r, k, ty);
  for (int c = 0; c < op.n; ++c)
    for (int k = 0; k < K; ++k) B[c * 16 + k] = operand(op.desc_b, c, k, ty);
  for (int l = 0; l < 32; ++l) {
    for (int reg = 0; reg < op.n / 2; ++reg) {
      const int j = reg / 4, e = reg % 4;
      const int row = l / 4 + 8 * (e >= 2), col = 8 * j + 2 * (l % 4) + (e & 1);
      double acc = 0.0;
      for (int k = 0; k < K; ++k) acc += static_cast<double>(A[row][k]) * static_cast<double>(B[col * 16 + k]);
      op.d[l][reg] = static_cast<float>(static_cast<double>(op.d[l][reg]) + acc);
    }
  }
}

// wgmma.mma_async (warp-collective here): every lane publishes its accumulator address and the
// descriptors (which must agree across the warp); the first lane past the barrier records the
// operation and, in eager mode, computes it at once; in late mode (CUEMU_WGMMA=late) it is
// computed at the wgmma.wait_group that covers it, reading the shared memory as it is then.
template <int N>
inline void wgmma_issue(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, WgmmaType type, bool mn = false) {
  auto& blk = *::cuemu::g_block;
  auto& me = ::cuemu::self();
  float* mine = d;
  std::memcpy(me.slot, &mine, sizeof mine);
  std::memcpy(me.slot + 8, &desc_a, 8);
  std::memcpy(me.slot + 16, &desc_b, 8);
  ::cuemu::warp_sync();
  auto& ws = blk.warps[me.warp];
  if (ws.arrived++ == 0) {
    TORCH_CHECK(ws.wgmma_fenced, "cuemu: warp ", me.warp, ": wgmma.mma_async before any wgmma.fence");
    ::cuemu::g_stats.wgmma += 1;
    ::cuemu::WarpScratch::Wgmma op{desc_a, desc_b, N, static_cast<int>(type), mn, false, {}};
    const int base = me.warp * 32;
    for (int l = 0; l < 32; ++l) {
      const auto& slot = blk.threads[base + l].slot;
      uint64_t a, b;
      std::memcpy(&op.d[l], slot, sizeof(float*));
      std::memcpy(&a, slot + 8, 8);
      std::memcpy(&b, slot + 16, 8);
      TORCH_CHECK(a == desc_a && b == desc_b, "cuemu: wgmma descriptors differ across the lanes of warp ", me.warp);
    }
    if (!blk.late_wgmma) {
      wgmma_compute(op, me.warp);
      op.done = true;
    }
    ws.wg_open.push_back(op);
  }
  if (ws.arrived == 32) ws.arrived = 0;
  ::cuemu::warp_sync();  // the slots are free again
}

inline void wgmma_commit() {
  auto& me = ::cuemu::self();
  auto& ws = ::cuemu::g_block->warps[me.warp];
  if (me.lane == 0) {
    ws.wg_groups.push_back(std::move(ws.wg_open));
    ws.wg_open.clear();
  }
  ::cuemu::warp_sync();
}

template <int N>
inline void wgmma_wait() {
  auto& me = ::cuemu::self();
  auto& ws = ::cuemu::g_block->warps[me.warp];
  ::cuemu::warp_sync();  // every lane is here: whatever it did before the wait saw no results yet
  if (me.lane == 0) {
    while (ws.wg_groups.size() > static_cast<size_t>(N)) {
      for (auto& op : ws.wg_groups.front())
        if (!op.done) wgmma_compute(op, me.warp);
      ws.wg_groups.pop_front();
    }
  }
  ::cuemu::warp_sync();  // no lane reads its accumulators before they are written
}

template <bool BF16>
inline void wgmma_m64n128k16(float (&d)[64], uint64_t a, uint64_t b) {
  wgmma_issue<128>(d, a, b, BF16 ? WgmmaType::BF16 : WgmmaType::F16);
}
template <bool BF16>
inline void wgmma_m64n64k16(float (&d)[32], uint64_t a, uint64_t b) {
  wgmma_issue<64>(d, a, b, BF16 ? WgmmaType::BF16 : WgmmaType::F16);
}
template <bool BF16>
inline void wgmma_m64n64k16_mn(float (&d)[32], uint64_t a, uint64_t b) {
  wgmma_issue<64>(d, a, b, BF16 ? WgmmaType::BF16 : WgmmaType::F16, true);
}
inline void wgmma_m64n128k8_tf32(float (&d)[64], uint64_t a, uint64_t b) { wgmma_issue<128>(d, a, b, WgmmaType::TF32); }
inline void wgmma_m64n64k8_tf32(float (&d)[32], uint64_t a, uint64_t b) { wgmma_issue<64>(d, a, b, WgmmaType::TF32); }

}  // namespace ptx
}  // namespace cnnkern
