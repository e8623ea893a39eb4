"""Helpers shared by the op registrations: output allocation and its layout rule, the CUDA C++
ops, and the recording of a call for a plan (cnnkern/ops/_plan.py)."""

from __future__ import annotations

import os
import sys
import threading

import torch

# Test harnesses set CNNKERN_POISON=1: every output a cnnkern op allocates is then filled with NaN
# before the kernel runs, so an element the kernel forgets to write fails the comparison.
_POISON = os.environ.get("CNNKERN_POISON", "0") not in ("", "0")


# The CUDA C++ ops (schemas in csrc/cnnkern.cpp, kernels in cnnkern._C). Every op file reaches them
# through cuda_ops(), so that the tests' CPU emulator of the CUDA kernels (tests/cuda_emulator.py)
# can put its own build of the same sources, torch.ops.cnnkern_emu, in their place.
_CUDA_OPS = torch.ops.cnnkern


def cuda_ops():
    """The namespace holding the ``*_cuda`` ops: ``torch.ops.cnnkern`` (recording its calls while
    a call is recorded into a plan)."""
    return _CUDA_OPS if RECORD is None else _RECORDING_OPS


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
    if RECORD is not None:
        RECORD.add(("alloc", out, False))
    return out


def new_workspace(shape, dtype: torch.dtype, device, zero: bool = False) -> torch.Tensor:
    """A kernel's workspace or small output: ``torch.empty`` (``torch.zeros`` when ``zero``)."""
    t = (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=device)
    if RECORD is not None:
        RECORD.add(("alloc", t, zero))
    return t


def in_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``t`` (4-D) itself if it already has exactly the strides :func:`new_output` would give it
    (dense NCHW or channels_last), else a copy that does."""
    _, c, h, w = t.shape
    want = (c * h * w, 1, w * c, c) if channels_last else (c * h * w, h * w, w, 1)
    if t.stride() == want:
        return t
    record_miss()
    return new_output(t.shape, t, channels_last).copy_(t)


# ---------------------------------------------------------------------------------------------
# Recording a call for a plan (cnnkern/ops/_plan.py)
# ---------------------------------------------------------------------------------------------
class Recording(list):
    """The work of one call, in order, as a plan needs it: ``("launch", plan, args, grid)`` from the
    Triton launchers (kernels/_launch.py), ``("alloc", tensor, zeroed)`` for each output or
    workspace, ``("call", op, args, result)`` for each CUDA C++ op, ``("op", op, args, result)``
    for the registered op the call ran, and ``("miss",)`` for work a plan cannot replay. Entries
    from another thread than the recording one (which would interleave) spoil the recording."""

    def __init__(self):
        super().__init__()
        self.thread = threading.get_ident()
        self.spoilt = False

    def add(self, entry) -> None:
        if threading.get_ident() == self.thread:
            self.append(entry)
        else:
            self.spoilt = True


RECORD: Recording | None = None


def record_miss() -> None:
    """Mark the call being recorded as one a plan cannot replay (tensor work outside a kernel)."""
    if RECORD is not None:
        RECORD.add(("miss",))


def start_recording() -> Recording:
    """Record the work that follows, here and in the Triton launchers, until :func:`stop_recording`."""
    global RECORD
    RECORD = Recording()
    launch = sys.modules.get("cnnkern.kernels._launch")
    if launch is not None:
        launch.RECORD = RECORD
    return RECORD


def stop_recording() -> None:
    global RECORD
    RECORD = None
    launch = sys.modules.get("cnnkern.kernels._launch")
    if launch is not None:
        launch.RECORD = None


class _RecordingOps:
    """``torch.ops.cnnkern`` (or its stand-in, :data:`_CUDA_OPS`) whose kernel calls are recorded:
    those that return nothing, a tensor or a tuple of tensors (queries, which return numbers, are
    not work to replay)."""

    def __getattr__(self, name):
        packet = getattr(_CUDA_OPS, name)
        op = getattr(packet, "default", packet)

        def call(*args):
            out = packet(*args)
            if RECORD is not None and (out is None or isinstance(out, torch.Tensor) or (
                    type(out) is tuple and all(isinstance(t, torch.Tensor) for t in out))):
                RECORD.add(("call", op, args, out))
            return out
        return call


_RECORDING_OPS = _RecordingOps()


def register_autograd(op, backward, setup_context) -> None:
    """``op.register_autograd(backward, setup_context=setup_context)``, the two functions also kept
    as ``op.formulas`` for the plans that replay the op's calls (cnnkern/ops/_plan.py)."""
    op.register_autograd(backward, setup_context=setup_context)
    op.formulas = (setup_context, backward)
