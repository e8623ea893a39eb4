"""The public ops, with ``torch.nn.functional``-style signatures.

Every op validates its arguments (cnnkern/_checks.py), picks a backend (cnnkern/_backend.py:
``backend=None`` means the current default, see :func:`cnnkern.set_backend`), and then calls the
registered op (cnnkern/ops/), or the pure-PyTorch reference for ``backend="torch"``.
"""

from __future__ import annotations

import torch

from . import _backend, _checks, reference
from . import ops as _ops  # noqa: F401  (registers torch.ops.cnnkern.*)

__all__ = ["residual_add"]


def residual_add(x: torch.Tensor, shortcut: torch.Tensor, relu: bool = True, backend: str | None = None) -> torch.Tensor:
    """ResNet's shortcut connection: ``relu(x + shortcut)`` (or the plain sum with ``relu=False``).

    Args:
        x: (N, C, H, W) float16, bfloat16, float32 or float64, the residual branch's output.
        shortcut: the block's input, either
            * (N, C, H, W), the identity shortcut, or
            * (N, Cs, Hs, Ws) with Cs <= C and a larger spatial size: ResNet's option A. The
              shortcut is subsampled with stride s (the smallest s with ceil(Hs/s) == H and
              ceil(Ws/s) == W) and zero-padded in channels, its Cs channels first. This happens
              inside the kernel, in one pass; no padded copy is made.
            Same dtype and device as ``x``; any memory layout.
        relu: apply ReLU to the sum (the end of every ResNet block).
        backend: ``"auto" | "triton" | "cuda" | "torch"``, or None for the current default.

    Returns:
        (N, C, H, W) tensor of x's dtype; channels_last when x is channels_last, else contiguous.
        Differentiable with respect to both inputs (option A scatters the gradient back into the
        shortcut's shape, zero where it was not sampled).

    Example:
        >>> y = cnnkern.functional.residual_add(branch_out, block_input)       # identity
        >>> y = cnnkern.functional.residual_add(branch_out, block_input[:, :64])  # option A
    """
    op = "residual_add"
    _checks.tensor(op, "x", x, ndim=4)
    _checks.tensor(op, "shortcut", shortcut, ndim=4)
    _checks.same_dtype_device(op, "x", x, shortcut=shortcut)
    _checks.flag(op, "relu", relu)
    stride = _checks.option_a_stride(op, x, shortcut)
    name = _backend.resolve(op, backend, x.device)
    if name == "torch":
        return reference.residual_add(x, shortcut, relu, stride)
    return torch.ops.cnnkern.residual_add(x, shortcut, stride, relu, name)
