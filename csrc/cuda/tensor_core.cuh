// The building blocks the implicit GEMMs (conv2d_igemm.cu and conv2d_wgmma.cu, forward and
// grad-input; conv2d_wgrad_igemm.cu, grad-weight) share: the per-dtype warp MMA, the fragment-tile loop and
// the multistage cp.async pipeline.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "ptx.cuh"

namespace cnnkern {

// One warp MMA per element type: run (d += A*B on one m16n8 fragment), prepare (operand registers
// after ldmatrix: TF32 rounding for fp32), store_pair (two adjacent output channels, 32 or 64 bits).
template <typename T>
struct Mma;

template <>
struct Mma<c10::Half> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    ptx::mma_m16n8k16_f16(d, a, b0, b1);
  }
  static __device__ __forceinline__ void prepare(uint32_t (&)[4]) {}
  static __device__ __forceinline__ void store_pair(c10::Half* dst, float lo, float hi) {
    *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(lo, hi);
  }
};

template <>
struct Mma<c10::BFloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    ptx::mma_m16n8k16_bf16(d, a, b0, b1);
  }
  static __device__ __forceinline__ void prepare(uint32_t (&)[4]) {}
  static __device__ __forceinline__ void store_pair(c10::BFloat16* dst, float lo, float hi) {
    *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(lo, hi);
  }
};

template <>
struct Mma<float> {  // TF32: m16n8k8, A 4 registers (rows gid/gid+8, k tig/tig+4), B 2 (k tig/tig+4)
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    ptx::mma_m16n8k8_tf32(d, a, b0, b1);
  }
  // fp32 bits -> TF32, rounded to nearest (ties away), as cuDNN's TF32 mode does
  static __device__ __forceinline__ void prepare(uint32_t (&r)[4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) r[i] = ptx::cvt_rna_tf32(r[i]);
  }
  static __device__ __forceinline__ void store_pair(float* dst, float lo, float hi) {
    *reinterpret_cast<float2*>(dst) = make_float2(lo, hi);
  }
};

// The four fp32 words of the 16-byte shared-memory chunk at `chunk`, rounded to TF32 in place (to
// nearest, ties away, as Mma<float>::prepare does in registers): a wgmma reads its tf32 operands
// straight from shared memory, and rounded words are tf32 values exactly, whichever way the tensor
// core treats the low mantissa bits of a word.
__device__ __forceinline__ void round_tf32_16(unsigned char* chunk) {
  uint4 v = *reinterpret_cast<const uint4*>(chunk);
  v.x = ptx::cvt_rna_tf32(v.x);
  v.y = ptx::cvt_rna_tf32(v.y);
  v.z = ptx::cvt_rna_tf32(v.z);
  v.w = ptx::cvt_rna_tf32(v.w);
  *reinterpret_cast<uint4*>(chunk) = v;
}

// B fragments come from ldmatrix.x4 two column fragments at a time: registers (0, 1) are b0, b1 of
// fragment 2j, registers (2, 3) those of fragment 2j + 1.
template <int NT>
__device__ __forceinline__ void set_b_pair(uint32_t (&bf)[NT][2], int j, const uint32_t (&r4)[4]) {
  bf[2 * j][0] = r4[0];
  bf[2 * j][1] = r4[1];
  bf[2 * j + 1][0] = r4[2];
  bf[2 * j + 1][1] = r4[3];
}

template <int MT, int NT>
__device__ __forceinline__ void zero_tile(float (&acc)[MT][NT][4]) {
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[i][j][k] = 0.f;
}

// A warp's MT x NT fragments of one k-step: acc[i][j] += A fragment i * B fragment j.
template <typename T, int MT, int NT>
__device__ __forceinline__ void mma_tile(float (&acc)[MT][NT][4], const uint32_t (&af)[MT][4],
                                         const uint32_t (&bf)[NT][2]) {
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j) Mma<T>::run(acc[i][j], af[i], bf[j][0], bf[j][1]);
}

// wgmma's K-major operands in the 128-byte swizzle: rows of 128 bytes (eight 16-byte chunks), chunk
// c of row r stored at chunk c ^ (r % 8), in atoms of 8 rows = 1024 bytes that start 1024-aligned
// in the shared address space. Byte offset of chunk c of row r:
__device__ __forceinline__ uint32_t wgmma_swz128(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }

// The matrix descriptor of such an operand at shared address `addr`: bits 0-13 start address / 16,
// 16-29 leading byte offset / 16 (unused for a K-major swizzled operand whose k16 step fits in
// the 128-byte row; 1 by convention), 32-45 stride byte offset / 16 (1024 bytes from one 8-row
// atom to the next), 49-51 base offset 0 (the atoms are 1024-aligned), 62-63 swizzle mode 1
// (128B). The k16 steps of a row start 32 bytes apart: addr + 32*ks.
__device__ __forceinline__ uint64_t wgmma_desc_k128(uint32_t addr) {
  return (static_cast<uint64_t>(addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
}

// The descriptor of an MN-major operand in the same 128-byte swizzle, one atom wide: each of the
// k16 step's 16 rows (one per k) holds 64 consecutive M (or N) elements, 8 rows to a 1024-byte
// atom, the step's two atoms 1024 bytes apart. The PTX ISA names the atom strides along K and
// along MN by the two offset fields, and its texts can be read either way round for MN-major
// operands; with a single atom along MN only the K stride is ever used, and both fields carry it
// (1024 bytes), so both readings address the same bytes.
__device__ __forceinline__ uint64_t wgmma_desc_mn128(uint32_t addr) {
  return (static_cast<uint64_t>(addr & 0x3FFFF) >> 4) | (uint64_t{1024 >> 4} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
}

// `load(step, stage)` issues this thread's cp.async copies of k-step `step` into shared buffer
// `stage`; `compute(stage)` consumes buffer `stage`. LAG: how many steps the math may still be
// reading after compute() returns (0 for mma.sync, which has read its operands into registers;
// 1 for wgmma kept one group in flight: compute(kt) returns once its own wgmma of step kt - 1 is
// complete). AHEAD = STAGES - 1 - LAG steps are in flight ahead of the math. Before step kt: wait
// until at most AHEAD - 1 of this thread's groups are pending (step kt's copies have landed),
// then one barrier, which makes every thread's copies visible and tells everyone that the buffer
// refilled after the math (the one read in step kt - 1 - LAG, finished by every thread before
// this barrier) is free. ASYNC_PROXY: the math reads shared memory through the async proxy
// (wgmma), so each thread fences its landed copies into it before the barrier. `landed(step,
// stage)`, when given, runs in each thread once its copies of that step have landed and before
// the fence and the barrier: it may rewrite them in place (the TF32 rounding of wgmma operands).
struct NoLanded {
  __device__ __forceinline__ void operator()(int, int) const {}
};

template <int STAGES, int LAG = 0, bool ASYNC_PROXY = false, typename Load, typename Compute,
          typename Landed = NoLanded>
__device__ __forceinline__ void cp_async_pipeline(int steps, Load&& load, Compute&& compute,
                                                  Landed&& landed = Landed{}) {
  constexpr int AHEAD = STAGES - 1 - LAG;
  static_assert(AHEAD >= 1, "at least one step of copies must run ahead of the math");
#pragma unroll
  for (int st = 0; st < AHEAD; ++st) {
    if (st < steps) load(st, st);
    ptx::cp_async_commit();
  }
  for (int kt = 0; kt < steps; ++kt) {
    ptx::cp_async_wait<AHEAD - 1>();
    landed(kt, kt % STAGES);
    if constexpr (ASYNC_PROXY) ptx::fence_proxy_async();
    __syncthreads();
    compute(kt % STAGES);
    const int next = kt + AHEAD;
    if (next < steps) load(next, next % STAGES);
    ptx::cp_async_commit();
  }
  ptx::cp_async_wait<0>();
}

}  // namespace cnnkern
