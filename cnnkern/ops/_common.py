"""Helpers shared by the op registrations: output allocation and its layout rule."""

from __future__ import annotations

import os

import torch

# Test harnesses set CNNKERN_POISON=1: every output a cnnkern op allocates is then filled with NaN
# before the kernel runs, so an element the kernel forgets to write fails the comparison.
_POISON = os.environ.get("CNNKERN_POISON", "0") not in ("", "0")


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
    """``t`` itself if it already has exactly the strides :func:`new_output` would give it (dense
    NCHW or channels_last), else a copy that does."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    want = torch.empty(t.shape, device="meta", memory_format=fmt).stride()
    if t.stride() == want:
        return t
    return new_output(t.shape, t, channels_last).copy_(t)
