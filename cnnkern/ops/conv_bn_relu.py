"""torch.library registration of the training-mode fused convolution + BatchNorm + ReLU.

(Inference needs no op of its own: cnnkern.functional folds BatchNorm into the convolution's
weights and bias and runs one ``cnnkern::conv2d`` with the ReLU in its epilogue.)

Ops (``cnnkern`` namespace; conv arguments as in cnnkern/ops/conv2d.py):

* ``conv_bn_relu_train(x, w, bias?, residual?, bn_weight?, bn_bias?, eps, stride, padding, dilation,
  groups, relu, precision, backend) -> (out, y, mean, invstd, var)``: the convolution writes y and
  its per-tile statistics (no second pass over y), the statistics are merged into the batch mean
  and biased variance, and one pass writes out = [relu](BN(y) + residual). ``y``, ``mean`` and ``invstd`` are
  kept for the backward.
* ``bn_update_running_stats(running_mean!, running_var!, mean, var, count, momentum, backend,
  num_batches_tracked!?)``: the in-place running-statistics update (unbiased variance, PyTorch's
  rule) and the batch count's increment, one kernel launch.
  A separate op because an op that mutates its inputs cannot carry an autograd formula.
* ``conv_bn_relu_backward(grad, out?, y, mean, invstd, bn_weight?, backend) -> (dy, dgamma, dbeta)``:
  ReLU mask and BatchNorm backward (both reductions in one pass); the convolution's own backward
  ops then turn dy into the input, weight and bias gradients.
"""

from __future__ import annotations

import torch
from torch.library import custom_op

from ._common import changed_in_place, cuda_ops, in_layout, new_output, new_workspace, record_miss, register_autograd
from .conv2d import (
    TRITON_SPLITS,
    _check_backend,
    _y_channels_last,
    conv2d_backward_input,
    conv2d_backward_weight,
    cuda_forward,
    output_size,
)


def _kernels():
    from cnnkern.kernels import conv2d as kc
    from cnnkern.kernels import conv_bn_relu as kb  # on first use: see cnnkern/ops/residual_add.py

    return kc, kb


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@custom_op("cnnkern::conv_bn_relu_train", mutates_args=())
def conv_bn_relu_train(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    eps: float,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    relu: bool,
    precision: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_backend(backend)
    kc, kb = _kernels()
    shape = output_size(x.shape, w.shape, stride, padding, dilation)
    cl = _y_channels_last(x, w)
    y = new_output(shape, x, cl)
    n_, k, p, q = shape
    acc_t = _acc_dtype(x)
    if backend == "cuda":  # the statistics' workspace comes back from the kernel that fills it
        stats = cuda_forward(x, w, bias, y, stride, padding, dilation, groups, False, True, precision == "tf32", None)
        if stats.dim() != 3:  # no output element (K = 0; an empty batch never gets here): no statistics
            stats = new_workspace((0, 3, k), acc_t, x.device, zero=True)
    else:
        stats = new_workspace((kc.stats_rows(n_ * p * q), 3, k), acc_t, x.device, zero=True)
        kc.conv2d_forward(
            x, w, bias, y, stride, padding[:2], dilation, groups, False, precision, stats=stats, splits=TRITON_SPLITS
        )
    out = new_output(shape, x, cl)
    if residual is not None:  # the apply pass reads it through y's layout
        residual = in_layout(residual, cl)
    if backend == "cuda":
        mean, invstd, var, scale, shift = (new_workspace(k, stats.dtype, x.device) for _ in range(5))
        cuda_ops().bn_finalize_cuda(stats, bn_weight, bn_bias, eps, mean, invstd, var, scale, shift)
        cuda_ops().bn_apply_cuda(y, out, scale, shift, relu, residual)
    else:
        mean, invstd, var, scale, shift = kb.bn_finalize(stats, bn_weight, bn_bias, eps)
        kb.bn_apply(y, out, scale, shift, relu, residual)
    return out, y, mean, invstd, var


@conv_bn_relu_train.register_fake
def _(x, w, bias, residual, bn_weight, bn_bias, eps, stride, padding, dilation, groups, relu, precision, backend):
    shape = output_size(x.shape, w.shape, stride, padding, dilation)
    cl = _y_channels_last(x, w)
    stat = x.new_empty((shape[1],), dtype=_acc_dtype(x))
    return new_output(shape, x, cl), new_output(shape, x, cl), stat, stat.clone(), stat.clone()


def update_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    momentum: float,
    unbias: float,
    backend: str,
    num_batches_tracked: torch.Tensor | None = None,
) -> None:
    """running = (1 - momentum) * running + momentum * batch, with the unbiased batch variance
    var * unbias (count / (count - 1)), and ``num_batches_tracked`` (int64, one element), where
    given, incremented: one launch of the backend's kernel, ``momentum`` and ``unbias`` passed on
    as given (a planned update passes its own: cnnkern/functional.py). ``mean`` and ``var`` are
    the training op's (K,) statistics; the running ones any float dtype and stride. Their
    versions are bumped, as an in-place PyTorch op bumps them."""
    if backend == "cuda":
        cuda_ops().bn_update_running_cuda(running_mean, running_var, mean, var, unbias, momentum, num_batches_tracked)
    else:
        _check_backend(backend)
        _kernels()[1].bn_update_running(running_mean, running_var, mean, var, momentum, unbias, num_batches_tracked)
    changed_in_place(running_mean, running_var, num_batches_tracked)


@custom_op("cnnkern::bn_update_running_stats", mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def bn_update_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: int,
    momentum: float,
    backend: str,
    num_batches_tracked: torch.Tensor | None,
) -> None:
    # (``num_batches_tracked`` has no default: torch 2.11's version bump of a custom op's mutated
    # arguments indexes every one of them in the call's arguments, from which the dispatcher drops
    # a trailing argument equal to its default)
    record_miss(again=False)  # a route's plan would keep this momentum: the route that calls the op is not planned
    update_running_stats(
        running_mean, running_var, mean, var, momentum, count / (count - 1), backend, num_batches_tracked
    )


@bn_update_running_stats.register_fake
def _(running_mean, running_var, mean, var, count, momentum, backend, num_batches_tracked):
    return None


@custom_op("cnnkern::conv_bn_relu_backward", mutates_args=())
def conv_bn_relu_backward(
    grad: torch.Tensor,
    out: torch.Tensor | None,
    y: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    bn_weight: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_backend(backend)
    _, kb = _kernels()
    cl = _y_channels_last(y, y)
    grad = in_layout(grad, cl)  # the kernels read grad, out and y through one dense layout
    dy = new_output(y.shape, y, cl)
    pdt = bn_weight.dtype if bn_weight is not None else y.dtype
    if backend == "cuda":
        k = y.shape[1]
        part = cuda_ops().bn_backward_reduce_cuda(grad, out, y)
        a, b, c = (new_workspace(k, mean.dtype, y.device) for _ in range(3))
        sg, sgx = (new_workspace(k, pdt, y.device) for _ in range(2))
        cuda_ops().bn_backward_coefficients_cuda(
            part, mean, invstd, bn_weight, y.numel() // max(k, 1), a, b, c, sg, sgx
        )
        cuda_ops().bn_backward_dy_cuda(grad, out, y, dy, a, b, c)
    else:
        sg, sgx = kb.bn_backward(grad, out, y, dy, mean, invstd, bn_weight, pdt)
    return dy, sgx, sg


@conv_bn_relu_backward.register_fake
def _(grad, out, y, mean, invstd, bn_weight, backend):
    pdt = bn_weight.dtype if bn_weight is not None else y.dtype
    k = y.shape[1]
    return new_output(y.shape, y, _y_channels_last(y, y)), y.new_empty((k,), dtype=pdt), y.new_empty((k,), dtype=pdt)


def _setup_context(ctx, inputs, output):
    x, w, bias, residual, bn_weight, bn_bias, eps, stride, padding, dilation, groups, relu, precision, backend = inputs
    out, y, mean, invstd, var = output
    ctx.mark_non_differentiable(y, mean, invstd, var)  # (what the backward keeps, and the statistics)
    ctx.save_for_backward(x, w, y, out if relu else None, mean, invstd, bn_weight)
    ctx.conv = (stride, padding, dilation, groups)
    ctx.has = (bias is not None, bn_weight is not None, bn_bias is not None)
    ctx.precision, ctx.backend = precision, backend
    ctx.layouts = (_y_channels_last(x, x), _y_channels_last(w, w))


def _backward(ctx, grad_out, _grad_y, _grad_mean, _grad_invstd, _grad_var):
    x, w, y, out, mean, invstd, bn_weight = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    has_bias, has_gamma, has_beta = ctx.has
    need = ctx.needs_input_grad
    g_res = None
    if need[3]:  # the residual's gradient is the ReLU-masked one: formed once, then BatchNorm's input
        g_res = grad_out
        if out is not None:
            from .residual_add import residual_add_backward  # threshold_backward, as in conv2d's ReLU

            g_res = residual_add_backward(grad_out, out, ctx.backend)
        grad_out, out = g_res, None
    dy, dgamma, dbeta = conv_bn_relu_backward(grad_out, out, y, mean, invstd, bn_weight, ctx.backend)
    gx = gw = gb = None
    if need[0]:
        gx = conv2d_backward_input(
            dy, w, list(x.shape), stride, padding, dilation, groups, ctx.layouts[0], ctx.precision, ctx.backend
        )
    if need[1] or (has_bias and need[2]):
        gw, gb = conv2d_backward_weight(
            dy,
            x,
            list(w.shape),
            stride,
            padding,
            dilation,
            groups,
            has_bias,
            ctx.layouts[1],
            ctx.precision,
            ctx.backend,
        )
        gw = gw if need[1] else None
        gb = gb if has_bias and need[2] else None
    return (
        gx,
        gw,
        gb,
        g_res,
        dgamma if has_gamma and need[4] else None,
        dbeta if has_beta and need[5] else None,
        *([None] * 8),
    )


register_autograd(conv_bn_relu_train, _backward, _setup_context)
