// Kernels with deliberate bugs, for tests/test_cuemu.py: each one shows that the emulator catches a
// class of error that would otherwise pass unnoticed on the CPU (and often on a GPU too, by luck of
// timing). Written as ordinary CUDA C++ and compiled through the same rewrites as csrc/; the
// statistics op reads the emulator's own counters, so this file only ever builds for the emulator.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <vector>

#include "ptx.cuh"
#include "tensor_core.cuh"

namespace cnnkern_selftest {

// out[t] = x[(t + 1) % n] through shared memory; without the barrier a thread reads a slot its
// neighbour has not written yet.
__global__ void neighbor_kernel(const float* x, float* out, int n, bool sync) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  const int t = threadIdx.x;
  s[t] = x[t];
  if (sync) __syncthreads();
  out[t] = s[(t + 1) % n];
}

// The same per block of 32 threads through a static __shared__ array (a function static in the
// emulator, which would otherwise hold the previous block's values).
__global__ void static_neighbor_kernel(const float* x, float* out, bool sync) {
  __shared__ float s[32], unused[2][4];
  const int t = threadIdx.x, base = blockIdx.x * 32;
  s[t] = x[base + t];
  if (t < 8) unused[t / 4][t % 4] = 0.f;
  if (sync) __syncthreads();
  out[base + t] = s[(t + 1) % 32];
}

// Each of 32 threads copies 16 bytes with cp.async and then reads its neighbour's 16 bytes; without
// the wait the copies may not have landed.
__global__ void cp_async_kernel(const float* x, float* out, bool wait) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  const int t = threadIdx.x;
  cnnkern::ptx::cp_async16(cnnkern::ptx::smem_u32(s + 4 * t), x + 4 * t, 16);
  cnnkern::ptx::cp_async_commit();
  if (wait) cnnkern::ptx::cp_async_wait<0>();
  __syncthreads();
  for (int i = 0; i < 4; ++i) out[4 * t + i] = s[4 * ((t + 1) % 32) + i];
}

// A warp-collective mma reached by half of the warp only (the other half exits early).
__global__ void divergent_mma_kernel(float* out) {
  const int lane = threadIdx.x % 32;
  if (lane >= 16) return;
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  const uint32_t a[4] = {0u, 0u, 0u, 0u};
  cnnkern::ptx::mma_m16n8k16_f16(d, a, 0u, 0u);
  out[lane] = d[0];
}

// Writes one float past the dynamic shared memory it was given.
__global__ void overflow_kernel(float* out, int n) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  const int t = threadIdx.x;
  s[t + 1] = 1.f;  // thread n-1 writes s[n]
  __syncthreads();
  out[t] = s[t % n];
}

// One warp loads eight 8x8 matrices' rows from a 8 x 128-byte tile with ldmatrix: the rows of a
// phase share a 16-byte column, so without the XOR swizzle they all sit in one bank group.
__global__ void ldmatrix_kernel(float* out, bool swizzle) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int lane = threadIdx.x;
  for (int i = lane; i < 8 * 128 / 4; i += 32) reinterpret_cast<float*>(smem_raw)[i] = 0.f;
  __syncthreads();
  const int row = lane % 8, chunk = lane / 8;
  const int col = swizzle ? chunk ^ row : chunk;
  uint32_t r[4];
  cnnkern::ptx::ldmatrix_x4(r, cnnkern::ptx::smem_u32(smem_raw + row * 128 + col * 16));
  out[lane] = static_cast<float>(r[0] + r[1] + r[2] + r[3]);
}

// One warp reads one 32-bit word per lane with ptx::lds32, lane l the word l * stride (mod 256
// words): stride 1 hits 32 banks, stride 2 two words in each even bank, stride 32 eight words in
// one bank, stride 0 one word (a broadcast).
__global__ void lds32_kernel(float* out, int stride) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) reinterpret_cast<float*>(smem_raw)[i] = static_cast<float>(i);
  __syncthreads();
  const uint32_t bits = cnnkern::ptx::lds32(cnnkern::ptx::smem_u32(smem_raw + 4 * ((lane * stride) % 256)));
  out[lane] = __uint_as_float(bits);
}

// One warpgroup computes D (64 x 64, f32) = A (64 x 16) * B (64 x 16)^T, fp16, with one wgmma from
// 128-byte-swizzled shared memory. flags: 1 = each thread fences its cp.async data into the async
// proxy, 2 = the operand tiles start 1024-aligned (the swizzle's atoms), 4 = the accumulators are
// read after the wgmma.wait_group (else before it, and waited for afterwards).
__global__ void wgmma_kernel(const c10::Half* a, const c10::Half* b, float* out, int flags) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  namespace ptx = cnnkern::ptx;
  unsigned char* smem = (flags & 2) ? smem_raw + ((1024 - (ptx::smem_u32(smem_raw) & 1023)) & 1023) : smem_raw;
  const uint32_t sa = ptx::smem_u32(smem), sb = sa + 64 * 128;
  const int t = threadIdx.x, r = t / 2, c = t % 2;  // thread t: chunk c (k 8c..8c+7) of row r of A and B
  ptx::cp_async16(sa + cnnkern::wgmma_swz128(r, c), a + r * 16 + c * 8, 16);
  ptx::cp_async16(sb + cnnkern::wgmma_swz128(r, c), b + r * 16 + c * 8, 16);
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  if (flags & 1) ptx::fence_proxy_async();
  __syncthreads();
  float d[32];
  for (int i = 0; i < 32; ++i) d[i] = 0.f;
  ptx::wgmma_fence();
  ptx::wgmma_m64n64k16<false>(d, cnnkern::wgmma_desc_k128(sa), cnnkern::wgmma_desc_k128(sb));
  ptx::wgmma_commit();
  if (flags & 4) ptx::wgmma_wait<0>();
  const int warp = t / 32, lane = t % 32;
  for (int reg = 0; reg < 32; ++reg) {
    const int j = reg / 4, e = reg % 4;
    out[(16 * warp + lane / 4 + 8 * (e >= 2)) * 64 + 8 * j + 2 * (lane % 4) + (e & 1)] = d[reg];
  }
  if (!(flags & 4)) ptx::wgmma_wait<0>();
}

at::Tensor static_neighbor(const at::Tensor& x, bool sync) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == 32, "x");
  auto out = at::empty_like(x);
  static_neighbor_kernel<<<static_cast<unsigned>(x.size(0)), 32>>>(x.const_data_ptr<float>(),
                                                                 out.mutable_data_ptr<float>(), sync);
  return out;
}

at::Tensor neighbor(const at::Tensor& x, bool sync) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat && x.numel() >= 1 && x.numel() <= 1024, "x");
  auto out = at::empty_like(x);
  const int n = static_cast<int>(x.numel());
  neighbor_kernel<<<1, n, n * sizeof(float), nullptr>>>(x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), n,
                                                         sync);
  return out;
}

at::Tensor cp_async(const at::Tensor& x, bool wait) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat && x.numel() == 128, "x");
  auto out = at::empty_like(x);
  cp_async_kernel<<<1, 32, 512, nullptr>>>(x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), wait);
  return out;
}

at::Tensor divergent_mma(const at::Tensor& x) {
  auto out = at::empty({32}, x.options().dtype(at::kFloat));
  divergent_mma_kernel<<<1, 32>>>(out.mutable_data_ptr<float>());
  return out;
}

at::Tensor overflow(const at::Tensor& x) {
  auto out = at::empty({64}, x.options().dtype(at::kFloat));
  overflow_kernel<<<1, 64, 64 * sizeof(float)>>>(out.mutable_data_ptr<float>(), 64);
  return out;
}

at::Tensor ldmatrix_conflicts(const at::Tensor& x, bool swizzle) {
  auto out = at::empty({32}, x.options().dtype(at::kFloat));
  ldmatrix_kernel<<<1, 32, 8 * 128>>>(out.mutable_data_ptr<float>(), swizzle);
  return out;
}

at::Tensor lds32_conflicts(const at::Tensor& x, int64_t stride) {
  auto out = at::empty({32}, x.options().dtype(at::kFloat));
  lds32_kernel<<<1, 32, 256 * 4>>>(out.mutable_data_ptr<float>(), static_cast<int>(stride));
  return out;
}

at::Tensor wgmma(const at::Tensor& a, const at::Tensor& b, int64_t flags) {
  TORCH_CHECK(a.scalar_type() == at::kHalf && b.scalar_type() == at::kHalf && a.is_contiguous() && b.is_contiguous() &&
                  a.numel() == 64 * 16 && b.numel() == 64 * 16,
              "a, b: contiguous 64 x 16 fp16");
  auto out = at::empty({64, 64}, a.options().dtype(at::kFloat));
  const int smem = 2 * 64 * 128 + 1024;
  wgmma_kernel<<<1, 128, smem>>>(a.const_data_ptr<c10::Half>(), b.const_data_ptr<c10::Half>(),
                                 out.mutable_data_ptr<float>(), static_cast<int>(flags));
  return out;
}

// (ldmatrix phases, extra wavefronts from bank-group conflicts, warp mma.sync operations, warp
// wgmma operations, warp 32-bit shared loads, their extra wavefronts from bank conflicts, blocks
// launched) since the last call; resets them
std::vector<int64_t> cuemu_stats() {
  const auto& g = cuemu::g_stats;
  std::vector<int64_t> out = {g.ldmatrix_phases, g.ldmatrix_extra_wavefronts, g.mma_sync, g.wgmma,
                              g.lds32_reads, g.lds32_extra_wavefronts, g.blocks};
  cuemu::g_stats = cuemu::Stats{};
  return out;
}

// A launch asking for `bytes` of dynamic shared memory, after opting in to `optin` bytes (0: the
// 48 KiB default).
at::Tensor big_smem(const at::Tensor& x, int64_t bytes, int64_t optin) {
  auto out = at::empty({1}, x.options().dtype(at::kFloat));
  const int limit = optin > 0 ? static_cast<int>(optin) : 48 * 1024;  // 48 KiB: the default again
  const cudaError_t err = cudaFuncSetAttribute(neighbor_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit);
  TORCH_CHECK(err == cudaSuccess, "cudaFuncSetAttribute refused ", limit, " bytes");
  neighbor_kernel<<<1, 1, static_cast<size_t>(bytes)>>>(x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), 1,
                                                        true);
  return out;
}

}  // namespace cnnkern_selftest

TORCH_LIBRARY_FRAGMENT(cnnkern_emu, m) {
  m.def("selftest_neighbor(Tensor x, bool sync) -> Tensor");
  m.def("selftest_static_neighbor(Tensor x, bool sync) -> Tensor");
  m.def("selftest_cp_async(Tensor x, bool wait) -> Tensor");
  m.def("selftest_divergent_mma(Tensor x) -> Tensor");
  m.def("selftest_overflow(Tensor x) -> Tensor");
  m.def("selftest_big_smem(Tensor x, int bytes, int optin) -> Tensor");
  m.def("selftest_ldmatrix_conflicts(Tensor x, bool swizzle) -> Tensor");
  m.def("selftest_lds32_conflicts(Tensor x, int stride) -> Tensor");
  m.def("selftest_wgmma(Tensor a, Tensor b, int flags) -> Tensor");
  m.def("cuemu_stats() -> int[]");
}

TORCH_LIBRARY_IMPL(cnnkern_emu, CPU, m) {
  m.impl("selftest_neighbor", &cnnkern_selftest::neighbor);
  m.impl("selftest_static_neighbor", &cnnkern_selftest::static_neighbor);
  m.impl("selftest_cp_async", &cnnkern_selftest::cp_async);
  m.impl("selftest_divergent_mma", &cnnkern_selftest::divergent_mma);
  m.impl("selftest_overflow", &cnnkern_selftest::overflow);
  m.impl("selftest_big_smem", &cnnkern_selftest::big_smem);
  m.impl("selftest_ldmatrix_conflicts", &cnnkern_selftest::ldmatrix_conflicts);
  m.impl("selftest_lds32_conflicts", &cnnkern_selftest::lds32_conflicts);
  m.impl("selftest_wgmma", &cnnkern_selftest::wgmma);
}

TORCH_LIBRARY_IMPL(cnnkern_emu, CatchAll, m) { m.impl("cuemu_stats", &cnnkern_selftest::cuemu_stats); }
