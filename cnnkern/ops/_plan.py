"""Warm eager calls replayed from a plan: one dictionary lookup, one allocation, the launches.

The first eager call of an op with a given *call key* (every tensor argument's type, shape,
strides, dtype, device, ``requires_grad`` and 16-byte alignment, every other argument, and the
global state the op reads: backend default, grad mode, deterministic mode, TF32) runs the full
path: validation, backend choice, the op's implementation and its launchers. While it runs, the
Triton launchers record each launch (kernels/_launch.py). When every launch was a direct launch
of a compiled kernel and every tensor it took is one of the call's tensors or its output, the
call is kept as an :class:`OpPlan`; later calls with the same key allocate the output and replay
the launches with their own tensors. The key holds everything the full path decides from, so the
validation it skips would pass again and the layout it computed is the same.

Not planned (the full path runs every time): calls that need autograd, calls under torch.compile,
tensor subclasses, torch-function or dispatch modes, functorch transforms, autocast, Triton launch
hooks, the interpreter, NaN-poisoned outputs (CNNKERN_POISON), the CUDA C++ backend, and calls
whose launches take a workspace or a view.
"""

from __future__ import annotations

import operator
import sys

import torch

from ._common import _POISON

_Tensor = torch.Tensor
_CL = torch.channels_last
# what torch.utils._python_dispatch._get_current_dispatch_mode() reads, without its Python frame
_dispatch_modes = torch._C._len_torch_dispatch_stack
_allow_tf32 = torch._C._get_cudnn_allow_tf32  # torch.backends.cudnn.allow_tf32
PLANS: dict = {}  # call key -> OpPlan, or None for a key whose calls cannot be planned


def eager() -> bool:
    """Whether this call may be planned or replayed: plain eager mode (no torch.compile, torch
    function or dispatch mode, functorch transform or autocast). Triton's launch hooks are
    checked by the plan itself (kernels/_launch.py: direct_ok)."""
    return not (torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()
                or torch._C._are_functorch_transforms_active() or torch._C._is_any_autocast_enabled()
                or _dispatch_modes())


def tkey(t):
    """The part of a call key that a tensor argument (or None) contributes."""
    if t is None:
        return None
    return type(t), t.shape, t.stride(), t.dtype, t.device, t.requires_grad, t.data_ptr() & 15


def state() -> tuple:
    """The global state every op's full path reads: grad mode, deterministic mode, TF32."""
    return torch.is_grad_enabled(), torch.are_deterministic_algorithms_enabled(), _allow_tf32()


class OpPlan:
    """The output's allocation and the recorded launches of one call key."""

    __slots__ = ("shape", "strides", "dtype", "device", "launches", "direct", "kernel_device", "get_device",
                 "get_stream", "hooks_active")

    def __init__(self, out: torch.Tensor, launches, first, hooks_active):
        self.shape, self.strides, self.dtype, self.device = tuple(out.shape), out.stride(), out.dtype, out.device
        self.launches = launches
        self.direct = all(launch[0] is not None for launch in launches)
        self.kernel_device, self.get_device, self.get_stream = first.device, first.get_device, first.get_stream
        self.hooks_active = hooks_active

    def __call__(self, *tensors) -> torch.Tensor | None:
        """The output, or None (nothing done) when Triton's launch hooks are installed or the
        current device is not the one the kernels were loaded on: the caller runs the full path."""
        device = self.get_device()
        if device != self.kernel_device or self.hooks_active():
            return None
        y = torch.empty_strided(self.shape, self.strides, dtype=self.dtype, device=self.device)
        t = (*tensors, y)
        stream = self.get_stream(device)
        if self.direct:  # Triton's C launcher itself (kernels/_launch.py: Plan.direct)
            for (c_launch, coop, pdl, ann, sig), run, g0, g1, g2, fn, meta, pick, tail in self.launches:
                c_launch(g0, g1, g2, stream, fn, coop, pdl, meta, None, None, None, None, None, ann, sig,
                         (*pick(t), *tail))
        else:
            for _, run, g0, g1, g2, fn, meta, pick, tail in self.launches:
                run(g0, g1, g2, stream, fn, meta, None, None, None, *pick(t), *tail)
        return y


_RETRY = object()


def _build(out, tensors, recorded, hooks_active):
    """The plan of a recorded call; ``_RETRY`` when a launch was not direct this time (Triton
    compiled or tuned it: the next call records again), None when the call cannot be planned."""
    if any(plan is None for plan, _, _ in recorded):
        return _RETRY
    if not recorded or type(out) is not _Tensor:
        return None
    if not (out.is_contiguous() or (out.dim() == 4 and out.is_contiguous(memory_format=_CL))):
        return None
    pool = (*tensors, out)
    launches = []
    for plan, args, grid in recorded:
        k = next((i for i, a in enumerate(args) if not isinstance(a, _Tensor)), len(args))  # the tensors lead
        tail = tuple(args[k:])
        idx = [next((i for i, t in enumerate(pool) if t is a), None) for a in args[:k]]
        if None in idx or any(isinstance(a, _Tensor) for a in tail):
            return None
        # the launch's tensors, picked from (call's tensors..., output) as a tuple
        pick = operator.itemgetter(*idx) if len(idx) > 1 else (lambda t, i=idx[0]: (t[i],))
        launches.append((plan.direct, plan.run, grid[0], grid[1], grid[2], plan.function, plan.metadata, pick,
                         tail + plan.tail))
    return OpPlan(out, tuple(launches), recorded[0][0], hooks_active)


def run_and_plan(key, full, tensors):
    """``full()`` (the op's full path, returning its output), recorded into a plan for ``key``
    when the call may be replayed (no autograd, a GPU backend's direct launches only). A key that
    has a plan reaches here only when the plan declined (launch hooks, another current device)."""
    # no Triton kernel loaded yet: nothing to record (the Triton backend's first call loads them)
    launch = sys.modules.get("cnnkern.kernels._launch")
    if launch is None or _POISON or key is None or key in PLANS or not launch.direct_ok() or (
            torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        return full()
    launch.RECORD = []
    try:
        out = full()
    finally:
        recorded, launch.RECORD = launch.RECORD, None
    plan = _build(out, tensors, recorded, launch.hooks_active)
    if plan is not _RETRY:
        PLANS[key] = plan
    return out
