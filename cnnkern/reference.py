"""Pure-PyTorch versions of every cnnkern op: the ``"torch"`` backend and the tests' oracle.

These are written for clarity, not speed, from PyTorch's own differentiable ops, so PyTorch's
autograd (not cnnkern's backward formulas) differentiates them: the tests compare cnnkern's
gradients against these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def option_a_shortcut(shortcut: torch.Tensor, channels: int, stride: int) -> torch.Tensor:
    """ResNet's option-A shortcut: ``shortcut[:, :, ::stride, ::stride]`` zero-padded in channels
    up to ``channels`` (the shortcut's channels first, the zeros after)."""
    sub = shortcut[:, :, ::stride, ::stride]
    extra = channels - shortcut.shape[1]
    if extra:
        sub = F.pad(sub, (0, 0, 0, 0, 0, extra))
    return sub


def residual_add(x: torch.Tensor, shortcut: torch.Tensor, relu: bool = True, stride: int = 1) -> torch.Tensor:
    """``[relu](x + A(shortcut))`` with ``A`` the identity or the option-A mapping."""
    if shortcut.shape != x.shape:
        shortcut = option_a_shortcut(shortcut, x.shape[1], stride)
    y = x + shortcut
    return torch.relu(y) if relu else y


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, activation=None, residual=None):
    """``torch.nn.functional.conv2d``, plus ``residual`` (None or a tensor of the output's shape),
    followed by the optional activation (None or "relu")."""
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if activation == "relu" else y


def conv_bn_relu(
    x,
    weight,
    bias,
    running_mean,
    running_var,
    bn_weight,
    bn_bias,
    training=False,
    momentum=0.1,
    eps=1e-5,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    relu=True,
    residual=None,
):
    """``relu(batch_norm(conv2d(x)) + residual)`` (``residual`` None or a tensor of the output's
    shape) with PyTorch's BatchNorm semantics (running statistics updated in place in training)."""
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def local_response_norm(
    x: torch.Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0
) -> torch.Tensor:
    """``torch.nn.functional.local_response_norm`` itself (alpha divided by size; the window
    holds size//2 channels before and (size-1)//2 after each channel). On the CPU, where
    PyTorch's avg_pool3d has no float16/bfloat16 kernel, 4-D+ half inputs compute in float32."""
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16) and x.dim() > 3:
        return F.local_response_norm(x.float(), size, alpha, beta, k).to(x.dtype)
    return F.local_response_norm(x, size, alpha, beta, k)
