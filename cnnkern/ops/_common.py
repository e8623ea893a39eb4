"""Helpers shared by the op registrations: output allocation and its layout rule."""

from __future__ import annotations

import os

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import _autocast

# Test harnesses set CNNKERN_POISON=1: every output a cnnkern op allocates is then filled with NaN
# before the kernel runs, so an element the kernel forgets to write fails the comparison.
_POISON = os.environ.get("CNNKERN_POISON", "0") not in ("", "0")


# The CUDA C++ ops (schemas in csrc/cnnkern.cpp, kernels in cnnkern._C). Every op file reaches them
# through cuda_ops(), so that the tests' CPU emulator of the CUDA kernels (tests/cuda_emulator.py)
# can put its own build of the same sources, torch.ops.cnnkern_emu, in their place.
_CUDA_OPS = torch.ops.cnnkern


def cuda_ops():
    """The namespace holding the ``*_cuda`` ops: ``torch.ops.cnnkern``."""
    return _CUDA_OPS


def output_channels_last(t: torch.Tensor) -> bool:
    """The layout rule for an output that follows ``t``: channels_last when ``t`` is
    channels_last (and not also plainly contiguous), NCHW-contiguous otherwise. The CUDA C++ side
    implements the same rule (csrc/common.h: output_memory_format)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def new_output(shape, like: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """An uninitialised (or, under CNNKERN_POISON, NaN-filled) output in the given layout."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)
    if _POISON and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def in_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``t`` (4-D) itself if it already has exactly the strides :func:`new_output` would give it
    (dense NCHW or channels_last), else a copy that does."""
    _, c, h, w = t.shape
    want = (c * h * w, 1, w * c, c) if channels_last else (c * h * w, h * w, w, 1)
    if t.stride() == want:
        return t
    return new_output(t.shape, t, channels_last).copy_(t)


# ---------------------------------------------------------------------------------------------
# Eager autograd path
# ---------------------------------------------------------------------------------------------
# For plain tensors outside torch.compile each op runs its implementation directly, under a
# torch.autograd.Function whose backward is the op's own registered formula calling the backward
# implementations directly too; this skips torch.library's Python dispatch (its cost on this
# path: benchmarks/bench_host.py). Everything else (torch.compile, fake/meta tensors, tensor
# subclasses, dispatch or torch-function modes, functorch transforms) goes through the op. Warm
# calls that need no autograd do not come here at all: cnnkern/ops/_plan.py replays them.


def custom_op(name: str, mutates_args=()):
    """``torch.library.custom_op`` that also keeps the undecorated function as ``op.eager_impl``."""
    def wrap(fn):
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        op.eager_impl = fn
        return op
    return wrap


def pick(op, ctx):
    """In a registered backward formula: ``op``'s implementation when the backward runs on the eager
    path (and builds no graph of its own), else the op itself (torch.compile, double backward)."""
    return op.eager_impl if getattr(ctx, "eager", False) and not torch.is_grad_enabled() else op


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def eager_ok(args) -> bool:
    """Whether a call with ``args`` may skip the op's dispatch: plain tensors (no subclass, no
    meta tensor) outside torch.compile, torch-function and dispatch modes and functorch transforms.
    Called on every op call, so it is written for speed (a few microseconds of host time)."""
    if torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active():
        return False
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN_TYPES or a.is_meta:
                return False
        elif type(a) in (list, tuple) and a and not isinstance(a[0], (int, float, str)):  # Tensor[] / Tensor?[]
            for t in a:
                if isinstance(t, torch.Tensor) and (type(t) not in _PLAIN_TYPES or t.is_meta):
                    return False
    return True


def dispatcher(op, setup_context=None, backward=None):
    """``call(*args)``: the same result as ``op(*args)`` (positional arguments in the op's schema
    order), on the eager fast path where :func:`eager_ok` allows it.

    Under ``torch.autocast`` the fast path is taken only when the arguments are already in the
    dtypes autocast would give them (cnnkern/functional.py casts first); otherwise the call goes
    through the op, whose Autocast kernel (cnnkern/ops/_autocast.py) casts them."""
    fn = None
    amp_name = _autocast.op_name_for(op._name)
    if backward is not None:
        class _Eager(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                out = op.eager_impl(*args)
                ctx.eager = True
                setup_context(ctx, args, out)
                return out

            @staticmethod
            def backward(ctx, *grads):
                return backward(ctx, *grads)

        _Eager.__name__ = _Eager.__qualname__ = f"{op._name.split('::')[-1]}_eager"
        fn = _Eager

    def call(*args):
        if not eager_ok(args) or (amp_name is not None and _autocast.pending(amp_name, args)):
            return op(*args)
        if fn is not None and torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return fn.apply(*args)
        return op.eager_impl(*args)

    call.op = op
    return call
