// The multistage cp.async pipeline that both implicit GEMMs (conv2d_igemm.cu, forward and
// grad-input; conv2d_wgrad_igemm.cu, grad-weight) run, written once.
#pragma once

#include "ptx.cuh"

namespace cnnkern {

// `load(step, stage)` issues this thread's cp.async copies of k-step `step` into shared buffer
// `stage`; `compute(stage)` consumes buffer `stage`. STAGES - 1 steps are in flight ahead of the
// math. Before step kt: wait until at most STAGES - 2 of this thread's groups are pending (step
// kt's copies have landed), then one barrier, which makes every thread's copies visible and tells
// everyone that the buffer refilled after the math (the one read in step kt - 1) is free.
template <int STAGES, typename Load, typename Compute>
__device__ __forceinline__ void cp_async_pipeline(int steps, Load&& load, Compute&& compute) {
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < steps) load(st, st);
    ptx::cp_async_commit();
  }
  for (int kt = 0; kt < steps; ++kt) {
    ptx::cp_async_wait<STAGES - 2>();
    __syncthreads();
    compute(kt % STAGES);
    const int next = kt + STAGES - 1;
    if (next < steps) load(next, next % STAGES);
    ptx::cp_async_commit();
  }
  ptx::cp_async_wait<0>();
}

}  // namespace cnnkern
