"""Triton kernels of cnnkern (installed as ``cnnkern.kernels``).

One module per op, each holding its ``@triton.jit`` kernels and their launchers. Launchers take
preallocated outputs and know nothing of autograd or torch.library (that is ``cnnkern.ops``).

Triton decides at kernel definition time whether kernels run compiled on a GPU or under its CPU
interpreter (``TRITON_INTERPRET=1``); ``INTERPRET`` records what was in force when this package
was imported.
"""

import os

import torch
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def cdiv(a: int, b: int) -> int:
    """Ceiling division of two ints (``triton.cdiv`` without its per-call overhead)."""
    return -(-a // b)


def acc_type(dtype):
    """The kernels' compute type for a tensor dtype: fp32 for fp16, bf16 and fp32 (PyTorch's
    opmath), fp64 for fp64."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def sm_count(device, interpreted: int) -> int:
    """The number of SMs of ``device``'s GPU; under the interpreter, ``interpreted``: the count a
    launcher's grid and split choices assume on the CPU, given by each launcher with its reason."""
    if INTERPRET:
        return interpreted
    return torch.cuda.get_device_properties(device).multi_processor_count


def check_like(op: str, name: str, t, like, like_name: str) -> None:
    """``t`` (a tensor the kernel reads at ``like``'s offsets, e.g. a fused residual) has exactly
    ``like``'s shape and strides."""
    if t.shape != like.shape or t.stride() != like.stride():
        raise ValueError(
            f"{op}: {name} {tuple(t.shape)} with strides {t.stride()} must have {like_name}'s shape "
            f"{tuple(like.shape)} and strides {like.stride()}"
        )


from . import conv2d, conv_bn_relu, local_response_norm, residual_add  # noqa: E402,F401
