"""The public ops, with ``torch.nn.functional``-style signatures.

Every op validates its arguments (cnnkern/_checks.py), picks a backend (cnnkern/_backend.py:
``backend=None`` means the current default, see :func:`cnnkern.set_backend`), and then calls the
registered op (cnnkern/ops/), or the pure-PyTorch reference for ``backend="torch"``.
"""

from __future__ import annotations

import torch

from . import _backend, _checks, reference
from . import ops as _ops  # noqa: F401  (registers torch.ops.cnnkern.*)

__all__ = ["conv2d", "residual_add"]


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


def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1, *, activation: str | None = None, backend: str | None = None) -> torch.Tensor:
    """2-D convolution with the semantics of ``torch.nn.functional.conv2d``, plus an optional fused
    ReLU epilogue.

    Args:
        input: (N, C, H, W) or unbatched (C, H, W); float16, bfloat16, float32 or float64; any
            layout (channels_last is the fast path).
        weight: (K, C / groups, R, S), same dtype and device.
        bias: (K,) or None.
        stride, dilation: int or (h, w) pair, positive.
        padding: int or (h, w) pair (non-negative), or "valid" (none) or "same" (stride 1 only;
            an even kernel pads one more at the bottom/right, as PyTorch does).
        groups: positive, divides C and K.
        activation: None or "relu", applied in the kernel's epilogue.
        backend: "auto" | "triton" | "torch" (no "cuda" kernel yet), or None for the default.

    Returns:
        (N, K, P, Q) (or (K, P, Q)) with P = (H + pad_top + pad_bottom - dilation*(R-1) - 1) // stride + 1;
        channels_last when the input or the weight is. fp32 inputs multiply in TF32 exactly when
        PyTorch's conv would (CUDA tensors and ``torch.backends.cudnn.allow_tf32``), with fp32
        accumulation; fp16/bf16 accumulate in fp32, fp64 in fp64. Differentiable in input,
        weight and bias (Triton backward kernels; the weight gradient is deterministic).
    """
    op = "conv2d"
    _checks.tensor(op, "input", input)
    if input.dim() not in (3, 4):
        raise ValueError(f"{op}: input must be 4-D (N, C, H, W) or 3-D (C, H, W), got {input.dim()}-D with shape "
                         f"{tuple(input.shape)}")
    if activation not in (None, "relu"):
        raise ValueError(f"{op}: activation must be None or 'relu', got {activation!r}")
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    stride_, pad, dilation_ = _checks.conv_args(op, x, weight, bias, stride, padding, dilation, groups)
    name = _backend.resolve(op, backend, x.device)
    if name == "torch":
        y = reference.conv2d(x, weight, bias, stride, padding, dilation, groups, activation)
    else:
        tf32 = x.dtype == torch.float32 and x.is_cuda and torch.backends.cudnn.allow_tf32
        y = torch.ops.cnnkern.conv2d(x, weight, bias, stride_, pad, dilation_, groups, activation == "relu",
                                     "tf32" if tf32 else "ieee", name)
    return y.squeeze(0) if unbatched else y
