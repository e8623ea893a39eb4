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
    """The layout rule for an output that follows ``t``, PyTorch's own: whether
    ``t.suggest_memory_format()`` is channels_last (c10's is_channels_last_strides_2d), so that
    ambiguous strides (size-1 channels or pixels) decide as PyTorch decides. The CUDA C++ side
    calls suggest_memory_format itself (csrc/common.h: output_memory_format)."""
    if t.dim() != 4:
        return False
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:  # a broadcast channel dimension: NCHW
        return False
    smallest = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < smallest:
            return False
        if d == 0 and smallest == strides[1]:  # N111 and the like: NCHW, PyTorch's default when ambiguous
            return False
        smallest = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return True


_NCHW, _CL = (3, 2, 1, 0), (1, 3, 2, 0)  # the dims, fastest first


def _dense_in(shape, strides, order) -> bool:
    """Whether (shape, strides) is dense in the dim order ``order`` (size-1 dims ignored, as
    PyTorch's is_contiguous ignores them)."""
    if 0 in shape:
        return True
    expected = 1
    for d in order:
        if shape[d] != 1:
            if strides[d] != expected:
                return False
            expected *= shape[d]
    return True


def elementwise_channels_last(*operands) -> bool:
    """The layout rule of PyTorch's elementwise ops (TensorIterator) for an output of the 4-D
    operands' common shape, each operand a tensor or a (shape, strides) pair: NCHW when every
    operand is contiguous, channels_last when every one is channels_last-contiguous, else the dim
    order of the first operand whose strides tell the dims apart. (Where that order is neither,
    an exotic permutation no cnnkern kernel writes, channels_last when the channels move fastest.)"""
    ops = [(tuple(o.shape), o.stride()) if isinstance(o, torch.Tensor) else o for o in operands]
    if all(_dense_in(sh, st, _NCHW) for sh, st in ops):
        return False
    if all(_dense_in(sh, st, _CL) for sh, st in ops):
        return True
    shape = ops[0][0]

    def should_swap(d0, d1):
        for _, st in ops:
            s0, s1 = st[d0], st[d1]
            if s0 == 0 or s1 == 0:
                continue
            if s0 != s1:
                return -1 if s0 < s1 else 1
            if shape[d0] > shape[d1]:
                return 1
        return 0

    perm = list(_NCHW)
    for i in range(1, 4):  # TensorIterator's insertion sort, ambiguous comparisons left in place
        d1 = i
        for d0 in range(i - 1, -1, -1):
            c = should_swap(perm[d0], perm[d1])
            if c > 0:
                perm[d0], perm[d1] = perm[d1], perm[d0]
                d1 = d0
            elif c < 0:
                break
    return perm[0] == 1


def unary_channels_last(shape, channels_last: bool) -> bool:
    """The layout of an elementwise op (a ReLU) applied to a dense output of ``shape`` in the given
    layout: channels_last only where that is not also NCHW-contiguous (PyTorch's rule for
    ambiguous sizes)."""
    return channels_last and not _dense_in(shape, _cl_strides(shape), _NCHW)


def _cl_strides(shape):
    _, c, h, w = shape
    return (c * h * w, 1, w * c, c)


def nchw_strides(shape):
    """The strides of a dense NCHW tensor of 4-D ``shape``."""
    _, c, h, w = shape
    return (c * h * w, h * w, w, 1)


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


def changed_in_place(*tensors: torch.Tensor | None) -> None:
    """Bump the version counters of tensors a kernel wrote in place (None: no tensor), as
    PyTorch's in-place ops do (a folded BatchNorm, autograd's saved-tensor check and
    torch.compile's guards read them), and record it: a replay bumps them too."""
    tensors = tuple(t for t in tensors if t is not None)
    torch._C._increment_version(tensors)
    if RECORD is not None:
        RECORD.add(("dirty", tensors))


def in_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``t`` (4-D) itself if it already has exactly the strides :func:`new_output` would give it
    (dense NCHW or channels_last), else a copy that does."""
    want = _cl_strides(t.shape) if channels_last else nchw_strides(t.shape)
    if t.stride() == want:
        return t
    record_miss(again=False)
    return new_output(t.shape, t, channels_last).copy_(t)


# ---------------------------------------------------------------------------------------------
# Recording a call for a plan (cnnkern/ops/_plan.py)
# ---------------------------------------------------------------------------------------------
class Recording(list):
    """The work of one call, in order, as a plan needs it: ``("launch", plan, args, grid)`` from the
    Triton launchers (kernels/_launch.py), ``("alloc", tensor, zeroed)`` for each output or
    workspace, ``("call", op, args, result)`` for each CUDA C++ op, ``("op", op, args, result)``
    for the registered op the call ran, ``("dirty", tensors)`` for inputs written in place (their
    versions bumped), ``("miss",)`` for a compilation or a timing that the next call will not
    repeat, and ``("never",)`` for work a plan cannot replay. Entries from another thread than
    the recording one (which would interleave) spoil the recording."""

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


def record_miss(again: bool) -> None:
    """Mark the call being recorded as one a plan cannot replay: PyTorch tensor work outside the
    kernels (``again=False``: calls of this key are never planned), or a first time that the
    next call will not repeat (a compilation, a timing: ``again=True``, the next call records)."""
    if RECORD is not None:
        RECORD.add(("miss",) if again else ("never",))


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
            if RECORD is not None and (
                out is None
                or isinstance(out, torch.Tensor)
                or (type(out) is tuple and all(isinstance(t, torch.Tensor) for t in out))
            ):
                RECORD.add(("call", op, args, out))
            return out

        return call


_RECORDING_OPS = _RecordingOps()


def register_autograd(op, backward, setup_context) -> None:
    """``op.register_autograd(backward, setup_context=setup_context)``, the two functions also kept
    as ``op.formulas`` for the plans that replay the op's calls (cnnkern/ops/_plan.py)."""
    op.register_autograd(backward, setup_context=setup_context)
    op.formulas = (setup_context, backward)
