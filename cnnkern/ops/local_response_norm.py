"""torch.library registration of Local Response Normalization: schema, fake implementation,
autograd, routing.

Ops (all in the ``cnnkern`` namespace, all on 4-D (N, C, H, W) tensors; cnnkern/functional.py
reshapes 3-D and 5-D+ inputs to 4-D views first):

* ``local_response_norm(x, size, alpha, beta, k, backend) -> out``: PyTorch's LRN across dim 1
  (alpha divided by size). ``backend`` is ``"triton"`` or ``"cuda"``.
* ``local_response_norm_backward(grad_out, x, size, alpha, beta, k, backend) -> grad_in``: its
  input gradient in one pass. ``scale`` is recomputed from ``x`` rather than saved by the forward
  (the backward reads x anyway; saving scale would add a tensor-sized write and read), so the
  autograd context holds only ``x``.

The CUDA C++ kernels are the separate ops ``local_response_norm_cuda`` and
``local_response_norm_backward_cuda`` (schemas in csrc/cnnkern.cpp); the ops above route to them or
to the Triton launchers, and both backends share the autograd formula below. Outputs are
channels_last when ``x`` is, NCHW-contiguous otherwise. Arguments reach these ops validated.
"""

from __future__ import annotations

import torch
from torch.library import custom_op

from .. import _backend
from ._common import cuda_ops, elementwise_channels_last, nchw_strides, new_output, register_autograd


def _kernels():
    # Imported on first use: Triton decides interpreter vs GPU when a kernel is defined.
    from cnnkern.kernels import local_response_norm as k

    return k


def _like(x: torch.Tensor) -> torch.Tensor:
    """An output in the layout PyTorch's composite LRN gives: its last step, ``x / div``, is an
    elementwise op over x and an NCHW-contiguous ``div``."""
    return new_output(x.shape, x, elementwise_channels_last(x, (tuple(x.shape), nchw_strides(x.shape))))


@custom_op("cnnkern::local_response_norm", mutates_args=())
def local_response_norm(x: torch.Tensor, size: int, alpha: float, beta: float, k: float, backend: str) -> torch.Tensor:
    if backend == "cuda":
        return cuda_ops().local_response_norm_cuda(x, size, alpha, beta, k)
    out = _like(x)
    _kernels().local_response_norm_forward(x, out, size, alpha, beta, k)
    return out


@local_response_norm.register_fake
def _(x, size, alpha, beta, k, backend):
    return _like(x)


@custom_op("cnnkern::local_response_norm_backward", mutates_args=())
def local_response_norm_backward(
    grad_out: torch.Tensor, x: torch.Tensor, size: int, alpha: float, beta: float, k: float, backend: str
) -> torch.Tensor:
    if backend == "cuda":
        return cuda_ops().local_response_norm_backward_cuda(grad_out, x, size, alpha, beta, k)
    grad_in = _like(x)
    # grad_out is read through its strides (an expanded gradient from .sum() included).
    _kernels().local_response_norm_backward(grad_out, x, grad_in, size, alpha, beta, k)
    return grad_in


@local_response_norm_backward.register_fake
def _(grad_out, x, size, alpha, beta, k, backend):
    return _like(x)


def _setup_context(ctx, inputs, output):
    x, size, alpha, beta, k, backend = inputs
    ctx.save_for_backward(x)
    ctx.args = (size, alpha, beta, k, backend)


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None
    return local_response_norm_backward(grad, x, *ctx.args), None, None, None, None, None


# The backward op has no autograd formula of its own: double backward through LRN raises.
register_autograd(local_response_norm, _backward, _setup_context)


# ---------------------------------------------------------------------------------------------
# fake implementations of the CUDA C++ ops (their schemas come from cnnkern._C)
# ---------------------------------------------------------------------------------------------
if _backend.has_extension():

    @torch.library.register_fake("cnnkern::local_response_norm_cuda")
    def _(x, size, alpha, beta, k):
        return _like(x)

    @torch.library.register_fake("cnnkern::local_response_norm_backward_cuda")
    def _(grad_out, x, size, alpha, beta, k):
        return _like(x)
