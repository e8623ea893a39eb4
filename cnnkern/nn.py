"""Drop-in modules backed by cnnkern's ops."""

from __future__ import annotations

import torch

from . import functional as F

__all__ = ["ResidualAdd"]


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
