// cuemu: runs cnnkern's CUDA C++ kernels on the CPU, so that the tests can check them on a machine
// without a GPU. It is a test tool, not a backend: slow (one fiber per CUDA thread), and only as
// faithful as the parts of CUDA the kernels use.
//
// How. tests/cuda_emulator.py copies csrc/ with a few textual rewrites (launch syntax, extern
// shared memory, the CUDA/c10-cuda includes -> this header, the registrations -> the CPU key of a
// separate `cnnkern_emu` library) and compiles it with the host compiler. This header supplies
// what the kernels need from CUDA:
//   - a block runs as one fiber per thread on the calling OS thread (a hand-written x86-64 stack
//     switch in cuemu.cpp: ucontext's swapcontext makes a system call per switch, which was a
//     third of the run time); blocks run one
//     after another. __syncthreads() parks the fiber until every live thread of the block is
//     parked; warp-collective operations (ldmatrix, mma) park it until the 32 lanes of its warp are;
//   - a deadlock (threads that can never all meet) is an error, as is a warp-collective operation
//     with lanes missing;
//   - dynamic shared memory is poisoned with 0xFF bytes (NaN in every float format) before each
//     block and guarded by a canary after its end; static __shared__ arrays become function
//     statics (blocks are sequential, so that is one block's shared memory), poisoned the same
//     way by the first thread of each block to reach their declaration (static_smem);
//   - the dynamic shared-memory size is checked against the 48 KiB default, or the opt-in size set
//     with cudaFuncSetAttribute (at most 227 KiB, as on sm_90);
//   - cuemu_ptx.h implements the inline PTX of csrc/cuda/ptx.cuh from the PTX ISA's definitions,
//     sm_90a's wgmma included: the emulated device reports compute capability 9.0 (CUEMU_CC=80
//     makes it an sm_80 part) and the emulated build "holds" sm_90a code (CNNKERN_SM90A);
//   - shared memory written by cp.async is generic-proxy data until its writer executes
//     fence.proxy.async: a wgmma (async proxy) reading it before that is an error.
//
// Two environment variables make the schedule adversarial, so the tests run several ways:
//   CUEMU_SCHEDULE=lockstep    (default) threads run in index order until they block; then every
//                              warp whose lanes all wait is released together, else the block
//                              barrier; so warps stay in step, as they roughly do on a GPU;
//                  reverse     the same in reverse thread and warp order;
//                  greedy      reverse order, and one warp released at a time: the last warp runs
//                              ahead of the others as far as the barriers let it, which exposes a
//                              missing __syncthreads (a read of data other warps have not written
//                              yet, or a refill of a buffer they still read);
//   CUEMU_CP_ASYNC=late        cp.async copies land at the cp.async.wait_group that must cover
//                              them (default "eager": at issue). "late" catches reads that do
//                              not wait, "eager" catches refills of a buffer other warps still read.
//   CUEMU_WGMMA=late           a wgmma reads its operands and writes its accumulators at the
//                              wgmma.wait_group that covers it (default "eager": at issue). "late"
//                              (best with eager copies) catches a buffer refilled under a wgmma of
//                              another warp still in flight and accumulators read before the wait;
//                              "eager" catches a wgmma issued before its operands are there.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/core/Device.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- CUDA C++ keywords -------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// ---- runtime types and calls the host code uses --------------------------------------------------
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
struct alignas(4) __half2 {
  c10::Half x, y;
};
struct alignas(4) __nv_bfloat162 {
  c10::BFloat16 x, y;
};
inline __half2 __floats2half2_rn(float a, float b) { return __half2{c10::Half(a), c10::Half(b)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{c10::BFloat16(a), c10::BFloat16(b)};
}
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fmul_rn(float a, float b) { return a * b; }
using std::isfinite;
using std::isinf;
using std::isnan;
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
template <typename A, typename B>
inline typename std::common_type<A, B>::type min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
inline typename std::common_type<A, B>::type max(A a, B b) {
  return a < b ? b : a;
}

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76
};
// The emulated extension holds sm_90a code (csrc/cuda/conv2d_wgmma.cu runs where the emulated
// device is compute capability 9.0).
#define CNNKERN_SM90A 1

namespace cuemu {

// The emulated device: few SMs, so that grid-stride loops and "blocks per SM" heuristics take
// their multi-iteration paths on small test inputs. CUEMU_SMS overrides it.
inline int sm_count() {
  const char* e = std::getenv("CUEMU_SMS");
  return e != nullptr ? std::max(1, std::atoi(e)) : 4;
}
// The emulated compute capability, major * 10 + minor: 90 (an H100) unless CUEMU_CC says otherwise.
inline int compute_capability() {
  const char* e = std::getenv("CUEMU_CC");
  return e != nullptr ? std::atoi(e) : 90;
}

constexpr size_t kDefaultSmem = 48 * 1024, kMaxSmem = 227 * 1024, kCanary = 256;
constexpr unsigned char kPoison = 0xFF, kCanaryByte = 0xA5;

inline std::map<const void*, int>& smem_optin() {
  static std::map<const void*, int> m;
  return m;
}

struct Copy {
  unsigned char* dst;
  const unsigned char* src;
  int bytes;
};

enum class State { Run, BlockBarrier, WarpBarrier, Done };

#if !defined(__x86_64__)
#error "cuemu switches fiber stacks with x86-64 assembly (cuemu.cpp)"
#endif
}  // namespace cuemu
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores
// the stack pointer in *save and continues on the stack `load` (cuemu.cpp).
extern "C" void cuemu_switch(void** save, void* load);

// Under AddressSanitizer (CUEMU_ASAN=1, tests/cuda_emulator.py) every stack switch is announced to
// it, and a fiber stack is unpoisoned before reuse; without ASan these are no-ops.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUEMU_ASAN 1
#else
#define CUEMU_ASAN 0
#endif
namespace cuemu {

struct Thread {
  void* sp = nullptr;  // saved stack pointer while the fiber is parked
  unsigned char* stack = nullptr;
  void* fake_stack = nullptr;  // ASan's per-fiber state
  dim3 tid;
  int index = 0, lane = 0, warp = 0;
  State state = State::Run;
  std::vector<Copy> open;                 // cp.async issued since the last commit
  std::deque<std::vector<Copy>> groups;   // committed groups, oldest first
  std::vector<uint32_t> unfenced;         // 16-byte shared chunks its copies wrote since its last
                                          // fence.proxy.async
  alignas(16) unsigned char slot[64];     // this lane's contribution to a warp-collective op
};

// Per-warp scratch of a warp-collective operation: the first lane to pass the operation's barrier
// computes every lane's result here; the last one to read its result resets `arrived`.
struct WarpScratch {
  int arrived = 0;
  float d[32][4];
  // wgmma (warp-collective per warp; each warp computes its 16 rows of the warpgroup's 64)
  bool wgmma_fenced = false;  // a wgmma.fence has been executed
  struct Wgmma {
    uint64_t desc_a, desc_b;
    int n;            // N of m64nNkK
    int type;         // ptx::WgmmaType: f16, bf16 or tf32 (K = 16, 16, 8)
    bool mn;          // M-major A and N-major B (both transpose immediates set), else both K-major
    bool done;        // already computed (eager mode)
    float* d[32];     // each lane's accumulator registers (N / 2 floats)
  };
  std::vector<Wgmma> wg_open;               // issued since the last commit
  std::deque<std::vector<Wgmma>> wg_groups;  // committed, not yet waited for
  void reset() {
    arrived = 0;
    wgmma_fenced = false;
    wg_open.clear();
    wg_groups.clear();
  }
};

struct Block {
  dim3 bid, bdim, gdim;
  std::vector<Thread> threads;
  std::vector<WarpScratch> warps;
  unsigned char* stacks = nullptr;  // threads x stack_bytes (reused across launches)
  size_t stack_bytes = 0;
  std::vector<unsigned char> smem;  // dynamic shared memory + canary
  size_t smem_bytes = 0;
  std::vector<const void*> static_smem;  // the static __shared__ arrays poisoned for this block
  std::vector<uint8_t> generic;     // per 16-byte chunk: written by cp.async, not yet fenced into
                                    // the async proxy by its writer
  void* sched_sp = nullptr;  // the scheduler's saved stack pointer while a fiber runs
  const void* sched_bottom = nullptr;  // the scheduler's stack (for ASan's fiber annotations)
  size_t sched_size = 0;
  std::string error;         // an exception a fiber raised (the block is abandoned)
  Thread* cur = nullptr;
  const std::function<void()>* body = nullptr;
  bool late_copies = false;
  bool late_wgmma = false;
};

inline thread_local Block* g_block = nullptr;

// Shared-memory bank accounting of the warp-collective loads (the one performance property the
// emulator can see): an ldmatrix phase reads eight 16-byte rows, which take one wavefront when
// they fall in eight different groups of four banks ((address / 16) % 8) and k wavefronts when
// k of them share a group; a warp's 32-bit shared loads (ptx::lds32) take as many wavefronts as
// the most distinct words any one bank ((address / 4) % 32) holds among them. Read (and reset)
// through the cnnkern_emu::cuemu_stats op.
// The counters also record which tensor-core instructions ran (warp-level mma.sync and wgmma
// operations), so a test can tell which kernel a call dispatched to.
// They count the blocks launched as well, so a test can tell how a call split its work.
struct Stats {
  long long ldmatrix_phases = 0, ldmatrix_extra_wavefronts = 0, mma_sync = 0, wgmma = 0;
  long long lds32_reads = 0, lds32_extra_wavefronts = 0, blocks = 0;
};
inline Stats g_stats;

inline void count_ldmatrix_phases(const Block& b, int warp) {
  for (int j = 0; j < 4; ++j) {
    int groups[8] = {0, 0, 0, 0, 0, 0, 0, 0}, worst = 0;
    for (int i = 0; i < 8; ++i) {
      uint32_t addr;
      std::memcpy(&addr, b.threads[warp * 32 + 8 * j + i].slot, 4);
      worst = std::max(worst, ++groups[(addr / 16) % 8]);
    }
    g_stats.ldmatrix_phases += 1;
    g_stats.ldmatrix_extra_wavefronts += worst - 1;
  }
}

inline void count_lds32(const Block& b, int warp) {
  uint32_t addr[32];
  for (int l = 0; l < 32; ++l) std::memcpy(&addr[l], b.threads[warp * 32 + l].slot, 4);
  int worst = 0;
  for (int bank = 0; bank < 32; ++bank) {
    int distinct = 0;
    for (int l = 0; l < 32; ++l) {
      if ((addr[l] / 4) % 32 != static_cast<uint32_t>(bank)) continue;
      bool seen = false;
      for (int m = 0; m < l; ++m) seen = seen || addr[m] == addr[l];
      distinct += !seen;
    }
    worst = std::max(worst, distinct);
  }
  g_stats.lds32_reads += 1;
  g_stats.lds32_extra_wavefronts += worst - 1;
}

inline Thread& self() { return *g_block->cur; }

// lands one copy (in the context of the thread that issued it)
inline void do_copy(const Copy& c) {
  std::memset(c.dst, 0, 16);
  if (c.bytes > 0) std::memcpy(c.dst, c.src, static_cast<size_t>(c.bytes));
  Block& b = *g_block;
  const auto chunk = static_cast<uint32_t>((c.dst - b.smem.data()) / 16);
  b.generic[chunk] = 1;
  self().unfenced.push_back(chunk);
}

inline void land_all(Thread& t) {
  for (auto& g : t.groups)
    for (auto& c : g) do_copy(c);
  t.groups.clear();
  for (auto& c : t.open) do_copy(c);
  t.open.clear();
}

// fiber -> scheduler
inline void yield() {
  Thread& t = self();
  Block& b = *g_block;
#if CUEMU_ASAN
  __sanitizer_start_switch_fiber(&t.fake_stack, b.sched_bottom, b.sched_size);
#endif
  cuemu_switch(&t.sp, b.sched_sp);
#if CUEMU_ASAN
  __sanitizer_finish_switch_fiber(t.fake_stack, nullptr, nullptr);
#endif
}

inline void syncthreads() {
  self().state = State::BlockBarrier;
  yield();
}

inline void warp_sync() {
  self().state = State::WarpBarrier;
  yield();
}

// First frame of every fiber (entered by cuemu_switch's `ret`); never returns.
[[noreturn]] inline void fiber_main() {
  Block& b = *g_block;
  Thread& t = *b.cur;
#if CUEMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b.sched_bottom, &b.sched_size);
#endif
  try {
    (*b.body)();
    land_all(t);
    const WarpScratch& ws = b.warps[t.warp];
    TORCH_CHECK(!(t.lane == 0 && (!ws.wg_open.empty() || !ws.wg_groups.empty())), "warp ", t.warp,
                " exited with wgmma in flight (not committed, or not waited for)");
  } catch (const std::exception& e) {
    if (b.error.empty()) b.error = e.what();
  } catch (...) {
    if (b.error.empty()) b.error = "an unknown exception";
  }
  t.state = State::Done;
  void* dead = nullptr;
#if CUEMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, b.sched_bottom, b.sched_size);  // this fiber is over
#endif
  cuemu_switch(&dead, b.sched_sp);
  __builtin_unreachable();
}

// A fresh fiber stack whose first cuemu_switch lands in fiber_main with the ABI's alignment.
inline void* fiber_stack(unsigned char* base, size_t bytes) {
  auto top = reinterpret_cast<uintptr_t>(base + bytes) & ~static_cast<uintptr_t>(15);
  auto** slot = reinterpret_cast<void**>(top - 16);  // 16-aligned: the return address
  *slot = reinterpret_cast<void*>(&fiber_main);
  void** sp = slot - 7;  // MXCSR/x87 word, then r15 r14 r13 r12 rbx rbp
  for (int i = 1; i < 7; ++i) sp[i] = nullptr;
  uint32_t csr[2] = {0, 0};
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(*reinterpret_cast<uint16_t*>(&csr[1])));
  std::memcpy(sp, csr, 8);
  return sp;
}

inline unsigned char* dynamic_smem() { return g_block->smem.data(); }

// Follows each static __shared__ declaration (tests/cuda_emulator.py): the array is a function
// static, which would hold the previous block's values (or zeros, before the first block); the
// first thread of a block to reach the declaration poisons it, as the dynamic shared memory is.
inline void static_smem(void* p, size_t bytes) {
  Block& b = *g_block;
  if (std::find(b.static_smem.begin(), b.static_smem.end(), p) != b.static_smem.end()) return;
  b.static_smem.push_back(p);
  std::memset(p, kPoison, bytes);
}

inline std::string where(const Block& b) {
  return "block (" + std::to_string(b.bid.x) + ", " + std::to_string(b.bid.y) + ", " + std::to_string(b.bid.z) + ")";
}

// Runs one block to completion; returns an error message, empty on success.
enum class Schedule { Lockstep, Reverse, Greedy };

inline std::string run_block(Block& b, Schedule schedule) {
  const bool reverse = schedule != Schedule::Lockstep;
  const int n = static_cast<int>(b.threads.size());
  for (int i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    t.state = State::Run;
    t.open.clear();
    t.groups.clear();
    t.unfenced.clear();
    t.stack = b.stacks + static_cast<size_t>(i) * b.stack_bytes;
#if CUEMU_ASAN
    __asan_unpoison_memory_region(t.stack, b.stack_bytes);  // redzones of its previous frames
#endif
    t.sp = fiber_stack(t.stack, b.stack_bytes);
  }
  for (auto& w : b.warps) w.reset();
  b.static_smem.clear();
  std::fill(b.generic.begin(), b.generic.end(), 0);
  std::fill(b.smem.begin(), b.smem.begin() + static_cast<std::ptrdiff_t>(b.smem_bytes), kPoison);
  std::fill(b.smem.begin() + static_cast<std::ptrdiff_t>(b.smem_bytes), b.smem.end(), kCanaryByte);
  const int warps = (n + 31) / 32;
  for (;;) {
    for (int k = 0; k < n; ++k) {
      Thread& t = b.threads[reverse ? n - 1 - k : k];
      if (t.state != State::Run) continue;
      b.cur = &t;
#if CUEMU_ASAN
      void* fake = nullptr;
      __sanitizer_start_switch_fiber(&fake, t.stack, b.stack_bytes);
#endif
      cuemu_switch(&b.sched_sp, t.sp);
#if CUEMU_ASAN
      __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
    }
    b.cur = nullptr;
    if (!b.error.empty()) return where(b) + ": " + b.error;
    int done = 0, at_block = 0;
    for (auto& t : b.threads) {
      done += t.state == State::Done;
      at_block += t.state == State::BlockBarrier;
    }
    if (done == n) break;
    bool released = false;
    for (int k = 0; k < warps && !(released && schedule == Schedule::Greedy); ++k) {
      const int w = reverse ? warps - 1 - k : k;
      const int lo = w * 32, hi = std::min(n, lo + 32);
      int waiting = 0, live = 0;
      for (int i = lo; i < hi; ++i) {
        live += b.threads[i].state != State::Done;
        waiting += b.threads[i].state == State::WarpBarrier;
      }
      if (waiting == 0) continue;
      if (waiting == 32 && hi - lo == 32) {
        for (int i = lo; i < hi; ++i) b.threads[i].state = State::Run;
        released = true;
      } else if (waiting == live) {
        return where(b) + ", warp " + std::to_string(w) + ": a warp-collective operation (ldmatrix/mma) ran with " +
               std::to_string(32 - waiting) + " of its 32 lanes exited or missing";
      }
    }
    if (released) continue;
    if (at_block == n - done) {
      for (auto& t : b.threads)
        if (t.state == State::BlockBarrier) t.state = State::Run;
      continue;
    }
    return where(b) + ": deadlock: " + std::to_string(at_block) + " threads wait at __syncthreads while others " +
           "wait at a warp-collective operation";
  }
  for (size_t i = b.smem_bytes; i < b.smem.size(); ++i) {
    if (b.smem[i] != kCanaryByte) {
      return where(b) + ": wrote past the end of its " + std::to_string(b.smem_bytes) +
             " bytes of dynamic shared memory (byte " + std::to_string(i) + ")";
    }
  }
  return {};
}

// The fiber stacks, one pool for every kernel (grown when a launch needs more, never re-zeroed).
inline unsigned char* fiber_stacks(size_t bytes) {
  static thread_local std::vector<unsigned char> pool;
  if (pool.size() < bytes) pool.resize(bytes);
  return pool.data();
}

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

// kernel<<<grid, block, smem, stream>>>(args...)
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "cuemu: launch with the wrong number of arguments");
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  TORCH_CHECK(threads >= 1 && threads <= 1024, "cuemu: a block of ", threads, " threads (1..1024)");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1, "cuemu: an empty grid (", grid.x, ", ", grid.y, ", ",
              grid.z, ") is an invalid launch on a GPU");
  TORCH_CHECK(grid.y < 65536 && grid.z < 65536, "cuemu: grid.y and grid.z must be below 65536");
  {
    auto it = smem_optin().find(reinterpret_cast<const void*>(kernel));
    const size_t limit = it == smem_optin().end() ? kDefaultSmem : static_cast<size_t>(it->second);
    TORCH_CHECK(smem <= limit, "cuemu: ", smem, " bytes of dynamic shared memory, but the kernel may use ", limit,
                " (above 48 KiB needs cudaFuncSetAttribute)");
  }
  std::lock_guard<std::mutex> lock(launch_mutex());
  g_stats.blocks += 1ll * grid.x * grid.y * grid.z;
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  const std::function<void()> body = [&] { std::apply(kernel, params); };
  Block b;
  b.bdim = block;
  b.gdim = grid;
  b.body = &body;
  b.stack_bytes = 128 * 1024;
  b.threads.resize(threads);
  b.warps.resize((threads + 31) / 32);
  b.stacks = fiber_stacks(threads * b.stack_bytes);
  b.smem_bytes = smem;
  b.smem.resize(smem + kCanary);
  b.generic.resize((smem + kCanary + 15) / 16);
  const char* cp = std::getenv("CUEMU_CP_ASYNC");
  b.late_copies = cp != nullptr && std::string(cp) == "late";
  const char* wg = std::getenv("CUEMU_WGMMA");
  b.late_wgmma = wg != nullptr && std::string(wg) == "late";
  const char* env = std::getenv("CUEMU_SCHEDULE");
  const std::string sched = env != nullptr ? env : "lockstep";
  TORCH_CHECK(sched == "lockstep" || sched == "reverse" || sched == "greedy",
              "cuemu: CUEMU_SCHEDULE must be lockstep, reverse or greedy, got ", sched);
  const Schedule schedule =
      sched == "greedy" ? Schedule::Greedy : sched == "reverse" ? Schedule::Reverse : Schedule::Lockstep;
  for (unsigned i = 0; i < threads; ++i) {
    Thread& t = b.threads[i];
    t.index = static_cast<int>(i);
    t.lane = static_cast<int>(i % 32);
    t.warp = static_cast<int>(i / 32);
    t.tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
  }
  Block* saved = g_block;
  g_block = &b;
  std::string err;
  for (unsigned z = 0; z < grid.z && err.empty(); ++z)
    for (unsigned y = 0; y < grid.y && err.empty(); ++y)
      for (unsigned x = 0; x < grid.x && err.empty(); ++x) {
        b.bid = dim3(x, y, z);
        err = run_block(b, schedule);
      }
  g_block = saved;
  TORCH_CHECK(err.empty(), "cuemu: ", err);
}

}  // namespace cuemu

#define threadIdx (::cuemu::self().tid)
#define blockIdx (::cuemu::g_block->bid)
#define blockDim (::cuemu::g_block->bdim)
#define gridDim (::cuemu::g_block->gdim)
#define __syncthreads() ::cuemu::syncthreads()

inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *v = cuemu::sm_count(); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *v = cuemu::compute_capability() / 10; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *v = cuemu::compute_capability() % 10; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || static_cast<size_t>(value) > cuemu::kMaxSmem) {
    return cudaErrorInvalidValue;
  }
  cuemu::smem_optin()[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "invalid value"; }

#define C10_CUDA_CHECK(expr)                                                             \
  do {                                                                                   \
    const cudaError_t cuemu_err_ = (expr);                                               \
    TORCH_CHECK(cuemu_err_ == cudaSuccess, "cuemu: CUDA call failed: ", #expr, ": ",      \
                cudaGetErrorString(cuemu_err_));                                         \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return CUDAStream{}; }
}  // namespace cuda
}  // namespace c10
