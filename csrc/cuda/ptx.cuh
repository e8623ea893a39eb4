// The inline PTX that cnnkern's CUDA kernels use, in one place: cp.async, ldmatrix, mma.sync, the
// TF32 rounding and (sm_90a) wgmma with its fences. Every asm statement of csrc/ lives here, so
// that the CPU emulator of the CUDA kernels (tests/cuemu/) can stand in for exactly this file with
// C++ that follows the PTX ISA's definitions (fragment layouts, zero fill, group waits, matrix
// descriptors), and run the kernels unchanged.
#pragma once

#include <cstdint>

namespace cnnkern {
namespace ptx {

// Shared-memory address of a generic pointer into shared memory (what cp.async and ldmatrix take).
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy of `bytes` (0 or 16) source bytes; the rest of the 16 is zero-filled
// (bytes = 0: a pure zero fill, src is not read). Completes at a cp_async_wait that covers it.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
// Closes the group of this thread's cp.async issued since the last commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices from shared memory: lanes 8j..8j+7 give the row addresses of matrix j;
// lane l receives in r[j] the two elements (row l/4, columns 2*(l%4), 2*(l%4)+1) of matrix j.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// One 32-bit word from shared address `addr`, read by all 32 lanes of a warp together (the TF32
// grad-weight's fragment words, which ldmatrix cannot transpose); the warp's words take one
// wavefront when they fall in 32 different banks ((addr / 4) % 32) or share words.
__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
  uint32_t r;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(r) : "r"(addr));
  return r;
}

// The same four matrices, transposed on the way: lane l receives in r[j] the elements (rows
// 2*(l%4), 2*(l%4)+1; column l/4) of matrix j as stored (low half: the lower row).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += A (16x16, row) * B (16x8, col), f16 or bf16 operands packed two per register, f32 accumulators.
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// d += A (16x8, row) * B (8x8, col), TF32 operands (one per register), f32 accumulators.
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// fp32 bits -> TF32 bits, rounded to nearest with ties away from zero (cvt.rna), as cuDNN's TF32
// mode rounds.
__device__ __forceinline__ uint32_t cvt_rna_tf32(uint32_t bits) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(__uint_as_float(bits)));
  return r;
}

// ---- sm_90a: warpgroup MMA (wgmma) ------------------------------------------------------------
// These instructions exist only in code compiled for sm_90a (arch=compute_90a). Elsewhere (sm_80,
// the compute_90 PTX) the wrappers trap; the host never launches a wgmma kernel there.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define CNNKERN_WGMMA_ASM 1
#else
#define CNNKERN_WGMMA_ASM 0
#endif

__device__ __forceinline__ void no_wgmma() {
#if defined(__CUDA_ARCH__)
  __trap();
#endif
}

// Orders this thread's earlier register accesses (the accumulators) before the following wgmma.
__device__ __forceinline__ void wgmma_fence() {
#if CNNKERN_WGMMA_ASM
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
  no_wgmma();
#endif
}
// Closes the group of this warpgroup's wgmma issued since the last commit.
__device__ __forceinline__ void wgmma_commit() {
#if CNNKERN_WGMMA_ASM
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#else
  no_wgmma();
#endif
}
// Waits until at most N of this warpgroup's committed wgmma groups are pending; the accumulators
// of the completed ones may then be read, and their shared memory refilled.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if CNNKERN_WGMMA_ASM
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#else
  no_wgmma();
#endif
}
// Makes this thread's generic-proxy writes to shared memory (st.shared, cp.async) visible to the
// async proxy, through which wgmma reads its operands. Each writer fences before the barrier
// that hands the buffer to the warpgroups.
__device__ __forceinline__ void fence_proxy_async() {
#if CNNKERN_WGMMA_ASM
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#else
  no_wgmma();
#endif
}

// Keeps the compiler from moving accesses of `d` across this point (after a wgmma_wait: the
// registers a wgmma wrote asynchronously are read only below it).
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d (64 x N, f32, the m16n8 accumulator layout per warp: warp w of the warpgroup holds rows
// 16w..16w+15, register 4j + e = element e of the n8 tile j) += A (64 x 16, K-major, shared
// memory, descriptor desc_a) * B (16 x N, K-major: N rows of 16 k, descriptor desc_b); f16 or
// bf16 operands, scale-d = 1 (accumulate), no negation, no transposes. Asynchronous: d is
// written by the wgmma_wait that covers this instruction's group.
// (the operand lists: d[0..N/2) as "+f" outputs, named %0 .. %(N/2 - 1) in the instruction)
#define CNNKERN_WGMMA_D32 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), \
  "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), \
  "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), \
  "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), \
  "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define CNNKERN_WGMMA_D64 \
  CNNKERN_WGMMA_D32, \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), \
  "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), \
  "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), \
  "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), \
  "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define CNNKERN_WGMMA_R32 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define CNNKERN_WGMMA_R64 \
  CNNKERN_WGMMA_R32 ", " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
// One m64nNk16 wgmma of element type TY ("f16" or "bf16"): registers REGS, descriptors %A and %B;
// D accumulates (scale-d 1), A and B unscaled (1, 1), TNSP the two transpose immediates: "0, 0"
// for K-major operands, "1, 1" for an M-major A and an N-major B.
#define CNNKERN_WGMMA(N, TY, REGS, A, B, OUTS, TNSP)                                               \
  asm volatile("wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " {" REGS "}, %" #A ", %" #B \
               ", 1, 1, 1, " TNSP ";\n"                                                              \
               : OUTS                                                                               \
               : "l"(desc_a), "l"(desc_b))

template <bool BF16>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b) {
#if CNNKERN_WGMMA_ASM
  if constexpr (BF16) {
    CNNKERN_WGMMA(128, "bf16", CNNKERN_WGMMA_R64, 64, 65, CNNKERN_WGMMA_D64, "0, 0");
  } else {
    CNNKERN_WGMMA(128, "f16", CNNKERN_WGMMA_R64, 64, 65, CNNKERN_WGMMA_D64, "0, 0");
  }
#else
  no_wgmma();
#endif
}
template <bool BF16>
__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[32], uint64_t desc_a, uint64_t desc_b) {
#if CNNKERN_WGMMA_ASM
  if constexpr (BF16) {
    CNNKERN_WGMMA(64, "bf16", CNNKERN_WGMMA_R32, 32, 33, CNNKERN_WGMMA_D32, "0, 0");
  } else {
    CNNKERN_WGMMA(64, "f16", CNNKERN_WGMMA_R32, 32, 33, CNNKERN_WGMMA_D32, "0, 0");
  }
#else
  no_wgmma();
#endif
}

// One m64nNk8 tf32 wgmma (N = 128 or 64): A (64 x 8) and B (8 x N) K-major fp32 words in shared
// memory (the PTX ISA has no transposes for tf32), D accumulates; the tensor core reads each word
// as tf32, so the kernels round the operands to tf32 in shared memory first (round_tf32_16).
#define CNNKERN_WGMMA_TF32(N, REGS, A, B, OUTS)                                                          \
  asm volatile("wgmma.mma_async.sync.aligned.m64n" #N "k8.f32.tf32.tf32 {" REGS "}, %" #A ", %" #B \
               ", 1, 1, 1;\n"                                                                          \
               : OUTS                                                                               \
               : "l"(desc_a), "l"(desc_b))

__device__ __forceinline__ void wgmma_m64n128k8_tf32(float (&d)[64], uint64_t desc_a, uint64_t desc_b) {
#if CNNKERN_WGMMA_ASM
  CNNKERN_WGMMA_TF32(128, CNNKERN_WGMMA_R64, 64, 65, CNNKERN_WGMMA_D64);
#else
  no_wgmma();
#endif
}
__device__ __forceinline__ void wgmma_m64n64k8_tf32(float (&d)[32], uint64_t desc_a, uint64_t desc_b) {
#if CNNKERN_WGMMA_ASM
  CNNKERN_WGMMA_TF32(64, CNNKERN_WGMMA_R32, 32, 33, CNNKERN_WGMMA_D32);
#else
  no_wgmma();
#endif
}

// D (64 x 64) += A * B with A M-major (64 rows of M contiguous per k) and B N-major (64 columns
// of N contiguous per k): the layout of a reduction over rows of pixels (the grad-weight GEMM).
template <bool BF16>
__device__ __forceinline__ void wgmma_m64n64k16_mn(float (&d)[32], uint64_t desc_a, uint64_t desc_b) {
#if CNNKERN_WGMMA_ASM
  if constexpr (BF16) {
    CNNKERN_WGMMA(64, "bf16", CNNKERN_WGMMA_R32, 32, 33, CNNKERN_WGMMA_D32, "1, 1");
  } else {
    CNNKERN_WGMMA(64, "f16", CNNKERN_WGMMA_R32, 32, 33, CNNKERN_WGMMA_D32, "1, 1");
  }
#else
  no_wgmma();
#endif
}

}  // namespace ptx
}  // namespace cnnkern
