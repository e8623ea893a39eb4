"""The public ops, with ``torch.nn.functional``-style signatures.

Every op validates its arguments (cnnkern/_checks.py), picks a backend (cnnkern/_backend.py:
``backend=None`` means the current default, see :func:`cnnkern.set_backend`), and then calls the
registered op (cnnkern/ops/), or the pure-PyTorch reference for ``backend="torch"``.

Under ``torch.autocast`` the inputs are first cast as PyTorch's autocast would cast the PyTorch op
each one replaces (cnnkern/ops/_autocast.py: convolutions in the autocast dtype, LRN in fp32,
residual add promoted to the widest input dtype), for every backend alike. An empty batch (N = 0)
gives an empty result, forward and backward, as PyTorch does; NaN and Inf propagate as in
PyTorch.
"""

from __future__ import annotations

import torch

from . import _backend, _checks, reference
from . import ops as _ops  # registers torch.ops.cnnkern.*
from .ops import _autocast, _plan

_Tensor = torch.Tensor

__all__ = ["conv2d", "conv_bn_relu", "residual_add", "local_response_norm"]


def residual_add(
    x: torch.Tensor, shortcut: torch.Tensor, relu: bool = True, backend: str | None = None
) -> torch.Tensor:
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
    key = None
    if type(x) is _Tensor and _plan.eager():
        try:
            key = (
                "residual_add",
                _plan.tensors_key(x, shortcut),
                type(relu),
                relu,
                backend or _backend.get_backend(),
            )
            plan = _plan.PLANS.get(key)
        except (AttributeError, TypeError):  # the full path says what is wrong
            key = plan = None
        if plan is not None and (y := plan(x, shortcut)) is not None:
            return y
    return _plan.run_and_plan(key, lambda: _residual_add(x, shortcut, relu, backend), (x, shortcut))


def _residual_add(x, shortcut, relu, backend):
    op = "residual_add"
    _checks.tensor(op, "x", x, ndim=4)
    _checks.tensor(op, "shortcut", shortcut, ndim=4)
    x, shortcut = _autocast.cast(op, x.device.type, x, shortcut)  # promotes mixed dtypes under autocast only
    _checks.same_dtype_device(op, "x", x, shortcut=shortcut)
    _checks.flag(op, "relu", relu)
    stride = _checks.option_a_stride(op, x, shortcut)
    name = _backend.resolve(op, backend, x.device)
    if name == "torch":
        return reference.residual_add(x, shortcut, relu, stride)
    return _plan.op_call(_ops.residual_add.residual_add, x, shortcut, stride, relu, name)


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """2-D convolution with the semantics of ``torch.nn.functional.conv2d``, plus an optional fused
    epilogue: ``activation(conv2d(input, weight, bias) + residual)``.

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
        residual: None, or a tensor of the output's shape (no broadcasting), dtype and device,
            any layout, added in the epilogue before the activation (cuDNN's
            conv-bias-add-activation; a ResNet block's shortcut): the sum is never written out
            and read back. Differentiable (its gradient is the activation's masked gradient).
        backend: "auto" | "triton" | "cuda" | "torch", or None for the default.

    Returns:
        (N, K, P, Q) (or (K, P, Q)) with P = (H + pad_top + pad_bottom - dilation*(R-1) - 1) // stride + 1;
        channels_last when the input or the weight is. fp32 inputs multiply in TF32 exactly when
        PyTorch's conv would (CUDA tensors and ``torch.backends.cudnn.allow_tf32``), with fp32
        accumulation; fp16/bf16 accumulate in fp32, fp64 in fp64. Differentiable in input,
        weight and bias (the backend's own backward kernels; the weight gradient is deterministic).
    """
    key = None
    if type(input) is _Tensor and _plan.eager():
        try:
            key = (
                "conv2d",
                _plan.tensors_key(input, weight, bias, residual),
                stride,
                padding,
                dilation,
                type(groups),
                groups,
                activation,
                backend or _backend.get_backend(),
            )
            plan = _plan.PLANS.get(key)
        except (AttributeError, TypeError):  # not tensors, unhashable arguments: the full path says what is wrong
            key = plan = None
        if plan is not None and (y := plan(input, weight, bias, residual)) is not None:
            return y
    return _plan.run_and_plan(
        key,
        lambda: _conv2d(input, weight, bias, stride, padding, dilation, groups, activation, residual, backend),
        (input, weight, bias, residual),
    )


def _conv2d(input, weight, bias, stride, padding, dilation, groups, activation, residual, backend):
    op = "conv2d"
    x = _batched(op, input)
    x, weight, bias, residual = _autocast.cast(op, x.device.type, x, weight, bias, residual)
    if activation not in (None, "relu"):
        raise ValueError(f"{op}: activation must be None or 'relu', got {activation!r}")
    stride_, pad, dilation_ = _checks.conv_args(op, x, weight, bias, stride, padding, dilation, groups)
    res = None
    if residual is not None:  # (the output's shape: only then, this is every call's host path)
        res = _checks.residual(
            op, residual, x, _ops.conv2d.output_size(x.shape, weight.shape, stride_, pad, dilation_), input.dim() == 3
        )
    name = _backend.resolve(op, backend, x.device)
    if name == "torch":
        y = reference.conv2d(x, weight, bias, stride, padding, dilation, groups, activation, res)
    else:
        y = _plan.op_call(
            _ops.conv2d.conv2d,
            x,
            weight,
            bias,
            res,
            stride_,
            pad,
            dilation_,
            groups,
            activation == "relu",
            _precision(x),
            name,
        )
    return y.squeeze(0) if input.dim() == 3 else y


def _batched(op: str, input: torch.Tensor) -> torch.Tensor:
    _checks.tensor(op, "input", input)
    if input.dim() not in (3, 4):
        raise ValueError(
            f"{op}: input must be 4-D (N, C, H, W) or 3-D (C, H, W), got {input.dim()}-D with shape "
            f"{tuple(input.shape)}"
        )
    return input.unsqueeze(0) if input.dim() == 3 else input


def conv_bn_relu(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    relu: bool = True,
    *,
    residual: torch.Tensor | None = None,
    num_batches_tracked: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``relu(batch_norm(conv2d(input, weight, bias), ...) + residual)`` with PyTorch's BatchNorm
    semantics.

    Args:
        input, weight, bias, stride, padding, dilation, groups: as :func:`conv2d`.
        running_mean, running_var: (K,) running statistics, or None (then the batch statistics
            are used in eval too, as PyTorch does). Updated in place in training with
            ``momentum`` (the variance update uses the unbiased batch variance).
        bn_weight, bn_bias: (K,) affine parameters (gamma, beta) or None.
        training: normalise with the batch statistics (biased variance) and update the running
            ones; otherwise use the running statistics.
        momentum: a float in [0, 1]. PyTorch's ``momentum=None`` (cumulative average) needs the
            batch count, which only the module keeps: use :class:`cnnkern.nn.ConvBNReLU2d`.
        eps: added to the variance.
        relu: apply the ReLU (after the residual).
        residual: None, or a tensor of the output's shape (no broadcasting), dtype and device, any
            layout: a ResNet block's shortcut, added after BatchNorm and before the ReLU, in the
            kernel that applies them (no separate residual add). Differentiable.
        num_batches_tracked: None, or ``torch.nn.BatchNorm2d``'s batch count (an int64 tensor of
            one element), incremented in place with each training update of the running
            statistics, by the kernel that updates them (as the module increments it).
        backend: "auto" | "triton" | "cuda" | "torch", or None for the default.

    Eval runs one convolution with BatchNorm folded into its weights and bias and the residual
    and ReLU in its epilogue. Training runs the convolution with per-channel statistics computed
    in its epilogue (no extra pass over its output), then one normalise (+ residual) + ReLU
    pass; the backward fuses BatchNorm's two reductions into one pass and reuses the
    convolution's backward kernels.
    """
    if type(input) is _Tensor and training is True and residual is None and _plan.eager():
        return _conv_bn_relu_train(
            input,
            weight,
            bias,
            running_mean,
            running_var,
            bn_weight,
            bn_bias,
            momentum,
            eps,
            stride,
            padding,
            dilation,
            groups,
            relu,
            num_batches_tracked,
            backend,
        )
    key = None
    if type(input) is _Tensor and training is False and residual is None and running_mean is not None and _plan.eager():
        try:
            # (the weight's id: a plan keeps the weights folded from one layer's tensors, so layers of
            # one shape need keys of their own; the plan checks the tensors themselves)
            key = (
                "conv_bn_relu",
                _plan.tensors_key(input, weight),
                id(weight),
                type(momentum),
                momentum,
                type(eps),
                eps,
                stride,
                padding,
                dilation,
                type(groups),
                groups,
                type(relu),
                relu,
                backend or _backend.get_backend(),
            )
            plan = _plan.PLANS.get(key)
        except (AttributeError, TypeError):  # the full path says what is wrong
            key = plan = None
        sources = (weight, bias, running_mean, running_var, bn_weight, bn_bias)
        if plan is not None and (y := plan(input, sources)) is not None:
            return y
    return _plan.run_and_plan_folded(
        key,
        lambda: _conv_bn_relu(
            input,
            weight,
            bias,
            running_mean,
            running_var,
            bn_weight,
            bn_bias,
            training,
            momentum,
            eps,
            stride,
            padding,
            dilation,
            groups,
            relu,
            residual,
            backend,
            tracked=num_batches_tracked,
        ),
        input,
        (weight, bias, running_mean, running_var, bn_weight, bn_bias),
    )


def _conv_bn_relu_train(
    input,
    weight,
    bias,
    running_mean,
    running_var,
    bn_weight,
    bn_bias,
    momentum,
    eps,
    stride,
    padding,
    dilation,
    groups,
    relu,
    tracked,
    backend,
):
    """conv_bn_relu in training (no residual): the convolution with its statistics, the
    normalisation and the running statistics' update (with the batch count's increment) planned
    as one op call. The momentum, which may change from call to call (a cumulative average), is
    the call's scalar: not part of the key, passed to the replayed update as it is."""
    key = plan = None
    # a new float object: a plan finds a call's scalar by identity (cnnkern/ops/_plan.py: build)
    m = float(momentum) * 1.0 if running_mean is not None and type(momentum) in (float, int) else None
    try:
        if running_mean is not None and m is None:
            raise TypeError  # (a momentum of another type: a plan would keep its value)
        key = (
            "conv_bn_relu_train",
            _plan.tensors_key(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, tracked),
            type(momentum),
            type(eps),
            eps,
            stride,
            padding,
            dilation,
            type(groups),
            groups,
            type(relu),
            relu,
            backend or _backend.get_backend(),
        )
        plan = _plan.PLANS.get(key)
    except (AttributeError, TypeError):  # the full path says what is wrong
        key = None
    tensors = (input, weight, bias, bn_weight, bn_bias, running_mean, running_var, tracked, m)
    if plan is not None:
        outs = plan(*tensors)
        if outs is not None:
            return outs[0]

    def full():
        outs = _conv_bn_relu(
            input,
            weight,
            bias,
            running_mean,
            running_var,
            bn_weight,
            bn_bias,
            True,
            momentum,
            eps,
            stride,
            padding,
            dilation,
            groups,
            relu,
            None,
            backend,
            update=False,
            tracked=tracked,
        )
        if type(outs) is tuple and running_mean is not None:  # (other paths update the statistics themselves)
            y, _, mean, _, var = outs
            count = y.shape[-2] * y.shape[-1] * (y.shape[0] if y.dim() == 4 else 1)
            name = _backend.resolve("conv_bn_relu", backend, input.device)
            momentum_ = float(momentum) if m is None else m
            _ops.conv_bn_relu.update_running_stats(
                running_mean, running_var, mean, var, momentum_, count / (count - 1), name, tracked
            )
        return outs

    outs = _plan.run_and_plan(key, full, tensors)
    return outs[0] if type(outs) is tuple else outs


def _conv_bn_relu(
    input,
    weight,
    bias,
    running_mean,
    running_var,
    bn_weight,
    bn_bias,
    training,
    momentum,
    eps,
    stride,
    padding,
    dilation,
    groups,
    relu,
    residual,
    backend,
    update=True,
    tracked=None,
):
    op = "conv_bn_relu"
    x = _batched(op, input)
    # the BatchNorm tensors keep their dtypes
    x, weight, bias, residual = _autocast.cast(op, x.device.type, x, weight, bias, residual)
    stride_, pad, dilation_ = _checks.conv_args(op, x, weight, bias, stride, padding, dilation, groups)
    k = weight.shape[0]
    _checks.bn_args(op, x, k, running_mean=running_mean, running_var=running_var, bn_weight=bn_weight, bn_bias=bn_bias)
    _checks.flag(op, "training", training)
    _checks.flag(op, "relu", relu)
    _checks.real(op, "eps", eps)
    if momentum is not None:
        _checks.real(op, "momentum", momentum)
    if momentum is None:
        raise ValueError(
            f"{op}: momentum=None (a cumulative moving average) needs the number of batches seen; "
            "use cnnkern.nn.ConvBNReLU2d, which tracks it, or pass momentum=1/num_batches"
        )
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must both be tensors or both be None")
    _checks.batch_count(op, tracked, running_mean)
    counted = tracked is not None and training  # (the update kernel counts, where it runs)
    batch_stats = training or running_mean is None
    shape = (
        _ops.conv2d.output_size(x.shape, weight.shape, stride_, pad, dilation_)
        if batch_stats or residual is not None
        else None
    )
    res = _checks.residual(op, residual, x, shape, input.dim() == 3)
    empty = False
    if batch_stats:
        _, _, p, q = shape
        if x.shape[0] * p * q == 1:  # PyTorch's rule; an empty batch is allowed (below)
            raise ValueError(
                f"{op}: expected more than 1 value per channel when training, got output of "
                f"{x.shape[0] * p * q} value(s) per channel (input {tuple(input.shape)})"
            )
        empty = x.shape[0] * p * q == 0
    name = _backend.resolve(op, backend, x.device)
    if empty and name != "torch":
        # An empty batch, as PyTorch's batch_norm treats it: an empty output, zero gradients for the
        # parameters, running statistics untouched. BatchNorm folded with neutral statistics gives
        # exactly that through the one convolution (no statistics of zero values are formed).
        neutral = (
            torch.zeros(k, dtype=weight.dtype, device=x.device),
            torch.ones(k, dtype=weight.dtype, device=x.device),
        )
        w, b = fold_bn(weight, bias, *neutral, bn_weight, bn_bias, eps)
        y = _plan.op_call(_ops.conv2d.conv2d, x, w, b, res, stride_, pad, dilation_, groups, relu, _precision(x), name)
        if counted:
            _count_batch(tracked)
    elif name == "torch":
        y = reference.conv_bn_relu(
            x,
            weight,
            bias,
            running_mean,
            running_var,
            bn_weight,
            bn_bias,
            batch_stats,
            momentum,
            eps,
            stride,
            padding,
            dilation,
            groups,
            relu,
            res,
        )
        if counted:
            _count_batch(tracked)
    elif batch_stats:
        outs = _plan.op_call(
            _ops.conv_bn_relu.conv_bn_relu_train,
            x,
            weight,
            bias,
            res,
            bn_weight,
            bn_bias,
            float(eps),
            stride_,
            pad,
            dilation_,
            groups,
            relu,
            _precision(x),
            name,
        )
        if not update:  # the caller updates the running statistics (_conv_bn_relu_train)
            return outs if input.dim() == 4 else (outs[0].squeeze(0), *outs[1:])
        y, _, mean, _, var = outs
        if training and running_mean is not None:
            count = x.shape[0] * y.shape[2] * y.shape[3]
            _ops.conv_bn_relu.bn_update_running_stats(
                running_mean, running_var, mean, var, count, float(momentum), name, tracked
            )
    else:
        w, b = fold_bn(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps)
        y = _plan.op_call(_ops.conv2d.conv2d, x, w, b, res, stride_, pad, dilation_, groups, relu, _precision(x), name)
    return y.squeeze(0) if input.dim() == 3 else y


def _count_batch(tracked):
    """The batch count incremented where no update kernel runs (the torch backend, an empty
    batch): a PyTorch op, which a plan cannot replay."""
    _ops._common.record_miss(again=False)
    tracked.add_(1)


def fold_bn(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps):
    """Inference BatchNorm folded into the convolution: ``w' = w * s``, ``b' = beta + (b - mean) * s``
    with ``s = gamma / sqrt(var + eps)`` per output channel, computed in fp32 (fp64 for fp64) and
    returned in the weight's dtype. Differentiable (plain PyTorch ops)."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    s = torch.rsqrt(running_var.to(acc) + eps)
    if bn_weight is not None:
        s = s * bn_weight.to(acc)
    b = -running_mean.to(acc) if bias is None else bias.to(acc) - running_mean.to(acc)
    b = b * s
    if bn_bias is not None:
        b = b + bn_bias.to(acc)
    w = (weight.to(acc) * s.view(-1, 1, 1, 1)).to(weight.dtype)
    return w, b.to(weight.dtype)


def _precision(x: torch.Tensor) -> str:
    """How fp32 inputs multiply: TF32 exactly when PyTorch's conv would."""
    return "tf32" if x.dtype == torch.float32 and x.is_cuda and torch.backends.cudnn.allow_tf32 else "ieee"


def local_response_norm(
    input: torch.Tensor,
    size: int,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 1.0,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Local Response Normalization across channels, with exactly the semantics of
    ``torch.nn.functional.local_response_norm``::

        out[n, c, ...] = input[n, c, ...] * (k + alpha / size * sum_{j in window(c)} input[n, j, ...]^2) ** -beta

    where ``window(c) = [c - size // 2, c + (size - 1) // 2]``, clipped to the existing channels (for
    an even ``size`` the window holds one more channel before ``c`` than after it, as PyTorch's).

    Note that alpha is divided by ``size`` (PyTorch, Caffe and cuDNN do this); the AlexNet paper
    (Krizhevsky et al., 2012, section 3.3) does not: its ``b = a / (k + alpha * sum a^2) ** beta``
    with k=2, n=5, alpha=1e-4, beta=0.75 is, in this convention, ``size=5, alpha=5 * 1e-4 = 5e-4,
    beta=0.75, k=2`` (``alpha_torch = n * alpha_paper``)::

        >>> y = cnnkern.functional.local_response_norm(x, 5, alpha=5e-4, beta=0.75, k=2.0)  # AlexNet's LRN

    Args:
        input: (N, C, *) with at least 3 dimensions, float16, bfloat16, float32 or float64, any
            layout (NCHW, channels_last, strided views). 3-D (N, C, L) and 5-D+ inputs are
            normalised across dim 1 like 4-D ones (they are viewed as (N, C, A, B) first).
        size: positive int, the number of channels in the window.
        alpha, beta, k: real numbers (any values PyTorch accepts).
        backend: ``"auto" | "triton" | "cuda" | "torch"``, or None for the current default.

    Returns:
        input's shape and dtype; channels_last when the input is, contiguous otherwise (kernel
        backends). Differentiable with respect to ``input`` (once: double backward is not
        supported by the kernel backends). The kernels compute in fp32 (fp64 for fp64 inputs)
        with one read and one write of the tensor in the forward and one pass in the backward.
    """
    key = None
    if type(input) is _Tensor and _plan.eager():
        try:
            key = (
                "local_response_norm",
                _plan.tensors_key(input),
                type(size),
                size,
                alpha,
                beta,
                k,
                backend or _backend.get_backend(),
            )
            plan = _plan.PLANS.get(key)
        except (AttributeError, TypeError):  # the full path says what is wrong
            key = plan = None
        if plan is not None and (y := plan(input)) is not None:
            return y
    return _plan.run_and_plan(key, lambda: _local_response_norm(input, size, alpha, beta, k, backend), (input,))


def _local_response_norm(input, size, alpha, beta, k, backend):
    op = "local_response_norm"
    size, alpha, beta, k = _checks.lrn_args(op, input, size, alpha, beta, k)
    (input,) = _autocast.cast(op, input.device.type, input)
    name = _backend.resolve(op, backend, input.device)
    if name == "torch":
        return reference.local_response_norm(input, size, alpha, beta, k)
    shape = input.shape
    if input.dim() == 3:  # (N, C, L) -> (N, C, L, 1), a view
        x = input.unsqueeze(-1)
    elif input.dim() == 4:
        x = input
    else:  # (N, C, D1, ..., Dm) -> (N, C, D1*...*D(m-1), Dm), a view when the dims merge
        inner = 1
        for d in shape[2:-1]:
            inner *= d
        x = input.reshape(shape[0], shape[1], inner, shape[-1])
    y = _plan.op_call(_ops.local_response_norm.local_response_norm, x, size, alpha, beta, k, name)
    return y if input.dim() == 4 else y.reshape(shape)
