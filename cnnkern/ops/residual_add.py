"""torch.library registration of residual add: schema, fake implementation, autograd, routing.

Ops (all in the ``cnnkern`` namespace):

* ``residual_add(x, shortcut, stride, relu, backend) -> out``
  ``out = [relu](x + A(shortcut))``; ``A`` is the identity or ResNet's option-A mapping
  (subsample by ``stride``, zero-pad channels). ``backend`` is ``"triton"`` or ``"cuda"``.
* ``residual_add_backward(grad_out, out, backend) -> grad``: the ReLU's backward
  (``grad_out`` where ``out > 0``), i.e. the gradient of the sum ``x + A(shortcut)``.
* ``residual_add_shortcut_backward(grad, shortcut_size, stride, channels_last, backend)``:
  the adjoint of ``A``: the shortcut's gradient, zero where ``A`` did not sample.

The CUDA C++ kernels are separate ops (``residual_add_cuda`` etc., schemas in csrc/cnnkern.cpp);
the ops above route to them or to the Triton launchers, and both backends share the one autograd
formula below. Arguments reach these ops validated (cnnkern/functional.py).
"""

from __future__ import annotations

import torch
from torch.library import custom_op

from .. import _backend
from ._common import (
    cuda_ops,
    elementwise_channels_last,
    in_layout,
    new_output,
    output_channels_last,
    register_autograd,
    unary_channels_last,
)


def _kernels():
    # Imported on first use: Triton decides interpreter vs GPU when a kernel is defined.
    from cnnkern.kernels import residual_add as k

    return k


def _shortcut_output(grad: torch.Tensor, shortcut_size, channels_last: bool) -> torch.Tensor:
    return new_output(shortcut_size, grad, channels_last)


def out_channels_last(x: torch.Tensor, shortcut: torch.Tensor, relu: bool) -> bool:
    """The output layout PyTorch gives ``[relu](x + shortcut)``: the sum's (its elementwise rule over
    both operands; x's alone for option A, whose shortcut is mapped first), then the ReLU's."""
    cl = elementwise_channels_last(x, shortcut) if shortcut.shape == x.shape else elementwise_channels_last(x)
    return unary_channels_last(x.shape, cl) if relu else cl


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------
@custom_op("cnnkern::residual_add", mutates_args=())
def residual_add(x: torch.Tensor, shortcut: torch.Tensor, stride: int, relu: bool, backend: str) -> torch.Tensor:
    if backend == "cuda":
        return cuda_ops().residual_add_cuda(x, shortcut, stride, relu)
    out = new_output(x.shape, x, out_channels_last(x, shortcut, relu))
    _kernels().residual_add_forward(x, shortcut, out, stride, relu)
    return out


@residual_add.register_fake
def _(x, shortcut, stride, relu, backend):
    return new_output(x.shape, x, out_channels_last(x, shortcut, relu))


# ---------------------------------------------------------------------------------------------
# backward ops
# ---------------------------------------------------------------------------------------------
@custom_op("cnnkern::residual_add_backward", mutates_args=())
def residual_add_backward(grad_out: torch.Tensor, out: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "cuda":
        return cuda_ops().residual_add_backward_cuda(grad_out, out)
    cl = output_channels_last(out)
    # The kernel reads all three tensors in one dense layout: anything else (an expanded or sliced
    # gradient, a layout mismatch) is copied into that layout first, never read wrongly.
    out = in_layout(out, cl)
    grad_out = in_layout(grad_out, cl)
    grad = new_output(out.shape, out, cl)
    _kernels().residual_add_backward(grad_out, out, grad)
    return grad


@residual_add_backward.register_fake
def _(grad_out, out, backend):
    return new_output(out.shape, out, output_channels_last(out))


@custom_op("cnnkern::residual_add_shortcut_backward", mutates_args=())
def residual_add_shortcut_backward(
    grad: torch.Tensor, shortcut_size: list[int], stride: int, channels_last: bool, backend: str
) -> torch.Tensor:
    if backend == "cuda":
        return cuda_ops().residual_add_shortcut_backward_cuda(grad, shortcut_size, stride, channels_last)
    grad_shortcut = _shortcut_output(grad, shortcut_size, channels_last)
    _kernels().residual_add_shortcut_backward(grad, grad_shortcut, stride)
    return grad_shortcut


@residual_add_shortcut_backward.register_fake
def _(grad, shortcut_size, stride, channels_last, backend):
    return _shortcut_output(grad, shortcut_size, channels_last)


# ---------------------------------------------------------------------------------------------
# autograd: one formula for every backend
# ---------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    x, shortcut, stride, relu, backend = inputs
    ctx.save_for_backward(output if relu else None)
    ctx.identity = tuple(shortcut.shape) == tuple(x.shape)
    ctx.shortcut_size = list(shortcut.shape)
    ctx.shortcut_channels_last = output_channels_last(shortcut)
    ctx.stride = stride
    ctx.backend = backend


def _backward(ctx, grad):
    (out,) = ctx.saved_tensors
    # d/d(sum): the ReLU's mask, or the incoming gradient itself when there is no ReLU.
    grad_sum = grad if out is None else residual_add_backward(grad, out, ctx.backend)
    grad_x = grad_sum if ctx.needs_input_grad[0] else None
    grad_shortcut = None
    if ctx.needs_input_grad[1]:
        grad_shortcut = (
            grad_sum
            if ctx.identity
            else residual_add_shortcut_backward(
                grad_sum, ctx.shortcut_size, ctx.stride, ctx.shortcut_channels_last, ctx.backend
            )
        )
    return grad_x, grad_shortcut, None, None, None


register_autograd(residual_add, _backward, _setup_context)


# The backward ops are differentiable too (double backward): both are linear in their gradient
# input. The ReLU mask's derivative with respect to `out` is zero almost everywhere.
def _relu_bwd_setup(ctx, inputs, output):
    grad_out, out, backend = inputs
    ctx.save_for_backward(out)
    ctx.backend = backend


def _relu_bwd_backward(ctx, gg):
    (out,) = ctx.saved_tensors
    return residual_add_backward(gg, out, ctx.backend), None, None


register_autograd(residual_add_backward, _relu_bwd_backward, _relu_bwd_setup)


def _shortcut_bwd_setup(ctx, inputs, output):
    grad, shortcut_size, stride, channels_last, backend = inputs
    ctx.grad_shape = tuple(grad.shape)
    ctx.like = (grad.dtype, grad.device, output_channels_last(grad))
    ctx.stride = stride
    ctx.backend = backend


def _shortcut_bwd_backward(ctx, gg):
    # The adjoint of the adjoint is A itself: A(gg) = residual_add(zeros, gg) without ReLU.
    dtype, device, cl = ctx.like
    zeros = torch.empty(
        ctx.grad_shape, dtype=dtype, device=device, memory_format=torch.channels_last if cl else torch.contiguous_format
    ).zero_()
    return residual_add(zeros, gg, ctx.stride, False, ctx.backend), None, None, None, None


register_autograd(residual_add_shortcut_backward, _shortcut_bwd_backward, _shortcut_bwd_setup)


# ---------------------------------------------------------------------------------------------
# fake implementations of the CUDA C++ ops (their schemas come from cnnkern._C)
# ---------------------------------------------------------------------------------------------
if _backend.has_extension():

    @torch.library.register_fake("cnnkern::residual_add_cuda")
    def _(x, shortcut, stride, relu):
        return new_output(x.shape, x, out_channels_last(x, shortcut, relu))

    @torch.library.register_fake("cnnkern::residual_add_backward_cuda")
    def _(grad_out, out):
        return new_output(out.shape, out, output_channels_last(out))

    @torch.library.register_fake("cnnkern::residual_add_shortcut_backward_cuda")
    def _(grad, shortcut_size, stride, channels_last):
        return _shortcut_output(grad, shortcut_size, channels_last)
