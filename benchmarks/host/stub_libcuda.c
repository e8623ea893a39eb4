/* A stand-in CUDA driver (libcuda.so.1) for measuring host-side launch work without a GPU.
 *
 * It defines the driver entry points that Triton's launcher and runtime call (cuda.h's own
 * prototypes, so the versioned names match). Every call succeeds; a kernel launch runs nothing
 * and only counts itself (cnnkern_stub_launches), and, while recording is on, keeps what the
 * driver would have been given (cnnkern_stub_record): benchmarks/host/check_launches.py compares
 * the launches of cnnkern's replays with Triton's own. Each function looked up gets a handle of
 * its own. The device it reports is H100-like: compute capability 9.0, 132 SMs, 227 KiB of
 * shared memory per block.
 *
 * It refuses to load on a machine with an NVIDIA GPU driver (/proc/driver/nvidia), so it can never
 * shadow a real driver. benchmarks/bench_host.py builds it with gcc and loads it in a child process
 * of its own, before Triton.
 */
#include "cuda.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#if __has_include(<valgrind/callgrind.h>)
#include <valgrind/callgrind.h>
#define HAVE_CALLGRIND 1
#else
#define HAVE_CALLGRIND 0
#endif

static unsigned long long launches;
static int fake_object;  /* the address handed out as context and module */
static char functions[1 << 16];  /* a function's handle: an address in here, one per lookup */
static unsigned long functions_used;

__attribute__((constructor)) static void refuse_real_gpu(void) {
  if (access("/proc/driver/nvidia", F_OK) == 0) {
    fprintf(stderr, "cnnkern stand-in libcuda: this machine has an NVIDIA driver; refusing to load\n");
    abort();
  }
}

unsigned long long cnnkern_stub_launches(void) { return launches; }
static unsigned long long loads;  /* modules loaded: a kernel compiled or first used */
unsigned long long cnnkern_stub_loads(void) { return loads; }

/* Callgrind's client requests, for the benchmark to count instructions around its measured loops
 * only (valgrind --tool=callgrind --instr-atstart=no). Outside valgrind they do nothing. */
int cnnkern_callgrind_available(void) { return HAVE_CALLGRIND; }
void cnnkern_callgrind_start(void) {
#if HAVE_CALLGRIND
  CALLGRIND_ZERO_STATS;
  CALLGRIND_START_INSTRUMENTATION;
#endif
}
void cnnkern_callgrind_stop(const char *name) {
#if HAVE_CALLGRIND
  CALLGRIND_STOP_INSTRUMENTATION;
  CALLGRIND_DUMP_STATS_AT(name);
#else
  (void)name;
#endif
}

CUresult CUDAAPI cuInit(unsigned int flags) { (void)flags; return CUDA_SUCCESS; }
CUresult CUDAAPI cuDriverGetVersion(int *v) { *v = 13000; return CUDA_SUCCESS; }
CUresult CUDAAPI cuDeviceGetCount(int *n) { *n = 1; return CUDA_SUCCESS; }
CUresult CUDAAPI cuDeviceGet(CUdevice *d, int ordinal) { *d = ordinal; return CUDA_SUCCESS; }

CUresult CUDAAPI cuDeviceGetAttribute(int *pi, CUdevice_attribute attrib, CUdevice dev) {
  (void)dev;
  switch (attrib) {
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *pi = 9; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *pi = 0; break;
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *pi = 132; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *pi = 232448; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: *pi = 233472; break;
    case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK: *pi = 65536; break;
    case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *pi = 32; break;
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *pi = 1024; break;
    case CU_DEVICE_ATTRIBUTE_CLOCK_RATE: *pi = 1980000; break;
    case CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE: *pi = 2619000; break;
    case CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH: *pi = 5120; break;
    default: *pi = 1; break;
  }
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxGetCurrent(CUcontext *c) { *c = (CUcontext)&fake_object; return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxSetCurrent(CUcontext c) { (void)c; return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxGetDevice(CUdevice *d) { *d = 0; return CUDA_SUCCESS; }
CUresult CUDAAPI cuDevicePrimaryCtxRetain(CUcontext *c, CUdevice d) {
  (void)d;
  *c = (CUcontext)&fake_object;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuCtxGetLimit(size_t *v, CUlimit limit) { (void)limit; *v = 1 << 20; return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxSetLimit(CUlimit limit, size_t v) { (void)limit; (void)v; return CUDA_SUCCESS; }

CUresult CUDAAPI cuModuleLoadData(CUmodule *m, const void *image) {
  (void)image;
  ++loads;
  *m = (CUmodule)&fake_object;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuModuleUnload(CUmodule m) { (void)m; return CUDA_SUCCESS; }
CUresult CUDAAPI cuModuleGetFunction(CUfunction *f, CUmodule m, const char *name) {
  (void)m; (void)name;
  *f = (CUfunction)&functions[functions_used++ % sizeof functions];
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuFuncGetAttribute(int *pi, CUfunction_attribute attrib, CUfunction f) {
  (void)f;
  switch (attrib) {
    case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *pi = 1024; break;
    case CU_FUNC_ATTRIBUTE_NUM_REGS: *pi = 128; break;
    default: *pi = 0; break;  /* no spills, no static shared memory */
  }
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuFuncSetAttribute(CUfunction f, CUfunction_attribute a, int v) {
  (void)f; (void)a; (void)v;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuFuncSetCacheConfig(CUfunction f, CUfunc_cache c) { (void)f; (void)c; return CUDA_SUCCESS; }

CUresult CUDAAPI cuPointerGetAttribute(void *data, CUpointer_attribute attribute, CUdeviceptr ptr) {
  (void)attribute;
  *(CUdeviceptr *)data = ptr;  /* every pointer is a device pointer to itself */
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuPointerGetAttributes(unsigned int n, CUpointer_attribute *attrs, void **data, CUdeviceptr ptr) {
  (void)attrs;
  for (unsigned int i = 0; i < n; i++) *(CUdeviceptr *)data[i] = ptr;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuOccupancyMaxActiveClusters(int *n, CUfunction f, const CUlaunchConfig *config) {
  (void)f; (void)config;
  *n = 1;
  return CUDA_SUCCESS;
}

/* The launch record. A record is, as 64-bit words: function, grid x, y, z, block x, y, z, shared
 * memory bytes, stream, the number of launch attributes, then the parameters, each read with the
 * size cnnkern_stub_param_sizes gave for the function (none for a function it was not given). */
#define RECORD_WORDS (1 << 16)
#define MAX_PARAMS 64
#define MAX_SIZED 4096
static int recording;
static unsigned long long record[RECORD_WORDS];
static unsigned long record_used, record_lost;
static struct {
  CUfunction f;
  int n;
  unsigned char size[MAX_PARAMS];
} sized[MAX_SIZED];
static int n_sized;

void cnnkern_stub_record(int on) {
  recording = on;
  record_used = record_lost = 0;
}
unsigned long cnnkern_stub_recorded(const unsigned long long **words) {
  *words = record;
  return record_lost ? 0 : record_used;
}
int cnnkern_stub_param_sizes(CUfunction f, int n, const unsigned char *sizes) {
  if (n > MAX_PARAMS) return -1;
  int i = 0;
  while (i < n_sized && sized[i].f != f) i++;
  if (i == n_sized) {
    if (n_sized == MAX_SIZED) return -1;
    n_sized++;
  }
  sized[i].f = f;
  sized[i].n = n;
  memcpy(sized[i].size, sizes, (size_t)n);
  return 0;
}

static void keep(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                 unsigned smem, CUstream stream, unsigned n_attrs, void **params) {
  int s = 0;
  while (s < n_sized && sized[s].f != f) s++;
  int n = s < n_sized ? sized[s].n : 0;
  if (record_used + 11 + (unsigned long)n > RECORD_WORDS) {
    record_lost = 1;
    return;
  }
  unsigned long long *r = &record[record_used];
  r[0] = (unsigned long long)(size_t)f;
  r[1] = gx, r[2] = gy, r[3] = gz, r[4] = bx, r[5] = by, r[6] = bz, r[7] = smem;
  r[8] = (unsigned long long)(size_t)stream;
  r[9] = n_attrs;
  r[10] = (unsigned long long)n;
  for (int i = 0; i < n; i++) {
    unsigned long long v = 0;
    memcpy(&v, params[i], sized[s].size[i]);
    r[11 + i] = v;
  }
  record_used += 11 + (unsigned long)n;
}

CUresult CUDAAPI cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **params, void **extra) {
  (void)extra;
  launches++;
  if (recording)
    keep(f, config->gridDimX, config->gridDimY, config->gridDimZ, config->blockDimX, config->blockDimY,
         config->blockDimZ, config->sharedMemBytes, config->hStream, config->numAttrs, params);
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuLaunchKernel(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx,
                                unsigned int by, unsigned int bz, unsigned int smem, CUstream stream, void **params,
                                void **extra) {
  (void)extra;
  launches++;
  if (recording) keep(f, gx, gy, gz, bx, by, bz, smem, stream, 0, params);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuTensorMapEncodeTiled(CUtensorMap *m, CUtensorMapDataType t, cuuint32_t rank, void *addr,
                                        const cuuint64_t *dims, const cuuint64_t *strides, const cuuint32_t *box,
                                        const cuuint32_t *estrides, CUtensorMapInterleave il, CUtensorMapSwizzle sw,
                                        CUtensorMapL2promotion l2, CUtensorMapFloatOOBfill oob) {
  (void)t; (void)rank; (void)addr; (void)dims; (void)strides; (void)box; (void)estrides; (void)il; (void)sw;
  (void)l2; (void)oob;
  memset(m, 0, sizeof *m);
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuTensorMapEncodeIm2col(CUtensorMap *m, CUtensorMapDataType t, cuuint32_t rank, void *addr,
                                         const cuuint64_t *dims, const cuuint64_t *strides, const int *lower,
                                         const int *upper, cuuint32_t channels, cuuint32_t pixels,
                                         const cuuint32_t *estrides, CUtensorMapInterleave il,
                                         CUtensorMapSwizzle sw, CUtensorMapL2promotion l2,
                                         CUtensorMapFloatOOBfill oob) {
  (void)t; (void)rank; (void)addr; (void)dims; (void)strides; (void)lower; (void)upper; (void)channels;
  (void)pixels; (void)estrides; (void)il; (void)sw; (void)l2; (void)oob;
  memset(m, 0, sizeof *m);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuGetErrorString(CUresult error, const char **s) {
  (void)error;
  *s = "cnnkern stand-in driver error";
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuGetErrorName(CUresult error, const char **s) { return cuGetErrorString(error, s); }
