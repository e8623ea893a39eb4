"""Drop-in modules backed by cnnkern's ops."""

from __future__ import annotations

import torch

from . import functional as F

__all__ = ["Conv2d", "ResidualAdd"]


class ResidualAdd(torch.nn.Module):
    """``relu(x + shortcut)`` (or the plain sum): the join at the end of a ResNet block.

    ``shortcut`` may be the identity (x's shape) or an option-A shortcut (fewer channels and/or a
    larger spatial size), see :func:`cnnkern.functional.residual_add`. Parameter-free.

    Args:
        relu: apply ReLU to the sum.
        backend: pin this module to a backend (``None``: the current default).
    """

    def __init__(self, relu: bool = True, backend: str | None = None):
        super().__init__()
        self.relu = relu
        self.backend = backend

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        return F.residual_add(x, shortcut, relu=self.relu, backend=self.backend)

    def extra_repr(self) -> str:
        s = f"relu={self.relu}"
        return s + (f", backend={self.backend!r}" if self.backend else "")


class Conv2d(torch.nn.Conv2d):
    """Drop-in ``torch.nn.Conv2d`` running on cnnkern's convolution kernels.

    Same constructor, parameters and state_dict as ``torch.nn.Conv2d`` (a model's weights load
    unchanged), plus two keyword-only options:

    Args:
        activation: None or "relu": fuse a ReLU into the convolution's epilogue.
        backend: pin this layer to a backend (None: the current default).

    Only ``padding_mode="zeros"`` is supported; other modes raise ``ValueError``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, *, activation=None, backend=None):
        if padding_mode != "zeros":
            raise ValueError(f"cnnkern.nn.Conv2d: padding_mode={padding_mode!r} is not supported, only 'zeros'")
        if activation not in (None, "relu"):
            raise ValueError(f"cnnkern.nn.Conv2d: activation must be None or 'relu', got {activation!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self.activation = activation
        self.backend = backend

    @classmethod
    def from_torch(cls, conv: torch.nn.Conv2d, *, activation=None, backend=None) -> "Conv2d":
        """A cnnkern Conv2d sharing ``conv``'s parameters (no copy)."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
                  activation=activation, backend=backend)
        new.weight = conv.weight
        new.bias = conv.bias
        return new

    def _conv_forward(self, input, weight, bias):
        return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups,
                        activation=self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.activation:
            s += f", activation={self.activation!r}"
        return s + (f", backend={self.backend!r}" if self.backend else "")
