// cuemu's stand-in for csrc/cuda/ptx.cuh: the same functions, in C++, following the PTX ISA
// (sections "cp.async", "ldmatrix", "Matrix fragments for mma.m16n8k16 with floating point type",
// "Matrix fragments for mma.m16n8k8" (.tf32), "cvt"). Warp-collective operations exchange their
// operands through per-lane slots between two warp barriers.
#pragma once

#include <cstdint>
#include <cstring>

#include "cuemu.h"

namespace cnnkern {
namespace ptx {

// The "shared-state-space address" is the byte offset into the block's dynamic shared memory (the
// only shared memory the kernels hand to cp.async and ldmatrix).
inline uint32_t smem_u32(const void* p) {
  auto& b = *::cuemu::g_block;
  const auto* c = static_cast<const unsigned char*>(p);
  TORCH_CHECK(c >= b.smem.data() && c <= b.smem.data() + b.smem_bytes,
              "cuemu: smem_u32 of a pointer outside the dynamic shared memory");
  return static_cast<uint32_t>(c - b.smem.data());
}

inline unsigned char* smem_at(uint32_t addr, uint32_t bytes, const char* what) {
  auto& b = *::cuemu::g_block;
  TORCH_CHECK(static_cast<size_t>(addr) + bytes <= b.smem_bytes, "cuemu: ", what, " at shared address ", addr,
              " + ", bytes, " bytes is outside the block's ", b.smem_bytes, " bytes");
  TORCH_CHECK(addr % 16 == 0, "cuemu: ", what, " at shared address ", addr, " is not 16-byte aligned");
  return b.smem.data() + addr;
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

inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  auto& b = *::cuemu::g_block;
  auto& me = ::cuemu::self();
  smem_at(addr, 16, "ldmatrix row");
  std::memcpy(me.slot, &addr, 4);
  ::cuemu::warp_sync();
  const int base = me.warp * 32;
  for (int j = 0; j < 4; ++j) {
    // matrix j's row (lane / 4) was addressed by lane 8j + lane/4; this lane takes its 32-bit
    // word (lane % 4): elements 2*(lane%4), 2*(lane%4)+1
    uint32_t row;
    std::memcpy(&row, b.threads[base + 8 * j + me.lane / 4].slot, 4);
    std::memcpy(&r[j], b.smem.data() + row + 4 * (me.lane % 4), 4);
  }
  ::cuemu::warp_sync();  // the slots are free again
}

struct MmaOperands {
  uint32_t a[4], b[2];
};

inline float half_bits(uint16_t h, bool bf16) {
  if (bf16) {
    c10::BFloat16 v;
    v.x = h;
    return static_cast<float>(v);
  }
  c10::Half v;
  v.x = h;
  return static_cast<float>(v);
}

// m16n8k16, f16/bf16: A (16x16) element (row, k) is half (k % 2) of register (row >= 8) + 2*(k >= 8)
// of lane (row % 8)*4 + (k % 8)/2; B (16x8) element (k, n) is half (k % 2) of register (k >= 8) of
// lane n*4 + (k % 8)/2; D element i of lane l: row l/4 + 8*(i >= 2), column 2*(l % 4) + (i & 1).
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  auto& b = *::cuemu::g_block;
  auto& me = ::cuemu::self();
  MmaOperands mine{{a[0], a[1], a[2], a[3]}, {b0, b1}};
  std::memcpy(me.slot, &mine, sizeof mine);
  ::cuemu::warp_sync();
  const int base = me.warp * 32;
  auto ops = [&](int lane) {
    MmaOperands o;
    std::memcpy(&o, b.threads[base + lane].slot, sizeof o);
    return o;
  };
  auto A = [&](int row, int k) {
    const uint32_t reg = ops((row % 8) * 4 + (k % 8) / 2).a[(row >= 8) + 2 * (k >= 8)];
    return half_bits(static_cast<uint16_t>(k % 2 ? reg >> 16 : reg & 0xFFFF), bf16);
  };
  auto B = [&](int k, int n) {
    const uint32_t reg = ops(n * 4 + (k % 8) / 2).b[k >= 8];
    return half_bits(static_cast<uint16_t>(k % 2 ? reg >> 16 : reg & 0xFFFF), bf16);
  };
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = me.lane / 4 + 8 * (i >= 2), col = 2 * (me.lane % 4) + (i & 1);
    double acc = 0.0;
    for (int k = 0; k < 16; ++k) acc += static_cast<double>(A(row, k)) * static_cast<double>(B(k, col));
    out[i] = static_cast<float>(static_cast<double>(d[i]) + acc);
  }
  ::cuemu::warp_sync();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

inline void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma_m16n8k16(d, a, b0, b1, false);
}
inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma_m16n8k16(d, a, b0, b1, true);
}

// m16n8k8, tf32: A (16x8) element (row, k) is register (row >= 8) + 2*(k >= 4) of lane
// (row % 8)*4 + k % 4; B (8x8) element (k, n) is register (k >= 4) of lane n*4 + k % 4. The tensor
// core reads the 19 TF32 bits of each operand (the low 13 mantissa bits are ignored).
inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  auto& b = *::cuemu::g_block;
  auto& me = ::cuemu::self();
  MmaOperands mine{{a[0], a[1], a[2], a[3]}, {b0, b1}};
  std::memcpy(me.slot, &mine, sizeof mine);
  ::cuemu::warp_sync();
  const int base = me.warp * 32;
  auto ops = [&](int lane) {
    MmaOperands o;
    std::memcpy(&o, b.threads[base + lane].slot, sizeof o);
    return o;
  };
  auto tf32 = [](uint32_t bits) { return static_cast<double>(__uint_as_float(bits & 0xFFFFE000u)); };
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = me.lane / 4 + 8 * (i >= 2), col = 2 * (me.lane % 4) + (i & 1);
    double acc = 0.0;
    for (int k = 0; k < 8; ++k) {
      acc += tf32(ops((row % 8) * 4 + k % 4).a[(row >= 8) + 2 * (k >= 4)]) * tf32(ops(col * 4 + k % 4).b[k >= 4]);
    }
    out[i] = static_cast<float>(static_cast<double>(d[i]) + acc);
  }
  ::cuemu::warp_sync();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// cvt.rna.tf32.f32: round the fp32 value to 10 mantissa bits, to nearest, ties away from zero
// (in sign-magnitude bits: add half of the dropped range, then clear it); NaN and Inf unchanged.
inline uint32_t cvt_rna_tf32(uint32_t bits) {
  if ((bits & 0x7F800000u) == 0x7F800000u) return bits;
  return (bits + 0x1000u) & 0xFFFFE000u;
}

}  // namespace ptx
}  // namespace cnnkern
