"""Input validation for the public ops, in one place, with the same words for every backend.

Each check raises ``TypeError`` (wrong kind of thing, wrong dtype) or ``ValueError`` (wrong shape,
device or value) with a message that names the argument and the values involved. Nothing is
broadcast or converted in silence.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fmt_dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tensor(op: str, name: str, t, ndim: int | None = None) -> None:
    """``t`` is a floating-point tensor (of ``ndim`` dimensions when given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be a floating-point tensor (float16, bfloat16, float32 or "
            f"float64), got dtype {_fmt_dtype(t.dtype)}"
        )
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got {t.dim()}-D with shape {tuple(t.shape)}")


def same_dtype_device(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in ``others`` (``None`` skipped) has ``ref``'s dtype and device."""
    for name, t in others.items():
        if t is None:
            continue
        if t.dtype != ref.dtype:
            raise TypeError(
                f"{op}: {name} has dtype {_fmt_dtype(t.dtype)} but {ref_name} has dtype "
                f"{_fmt_dtype(ref.dtype)}; convert one of them (no implicit promotion)"
            )
        if t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def flag(op: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def option_a_stride(op: str, x: torch.Tensor, shortcut: torch.Tensor) -> int:
    """The stride that maps ``shortcut`` (N, Cs, Hs, Ws) onto ``x`` (N, C, H, W) as ResNet's
    option-A shortcut (subsample by the stride, zero-pad channels), or 1 for the identity.

    The stride is the smallest s >= 1 with ceil(Hs/s) == H and ceil(Ws/s) == W: the output size of
    a stride-s convolution with "same"-style padding (3x3/pad 1, 1x1/pad 0) over Hs x Ws.
    """
    n, c, h, w = x.shape
    ns, cs, hs, ws = shortcut.shape
    if ns != n:
        raise ValueError(
            f"{op}: shortcut has batch size {ns} but x has {n} (shortcut {tuple(shortcut.shape)}, x {tuple(x.shape)})"
        )
    if cs > c:
        raise ValueError(
            f"{op}: shortcut has {cs} channels, more than x's {c}: an option-A shortcut can "
            f"only be zero-padded up to x's channels (shortcut {tuple(shortcut.shape)}, "
            f"x {tuple(x.shape)}); use a projection (1x1 conv) shortcut instead"
        )
    if (hs, ws) == (h, w):
        return 1
    if h > 0 and w > 0:
        for s in range(2, max(hs, ws) + 1):
            if -(-hs // s) == h and -(-ws // s) == w:
                return s
    raise ValueError(
        f"{op}: no option-A stride maps the shortcut's spatial size {hs}x{ws} onto x's {h}x{w}: "
        f"need an integer s with ceil({hs}/s) == {h} and ceil({ws}/s) == {w} "
        f"(shortcut {tuple(shortcut.shape)}, x {tuple(x.shape)})"
    )


def _pair(op: str, name: str, value, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as a pair."""
    if type(value) is int and value >= minimum:  # the common cases, on every call's host path
        return value, value
    if (
        type(value) is tuple
        and len(value) == 2
        and type(value[0]) is int
        and type(value[1]) is int
        and value[0] >= minimum
        and value[1] >= minimum
    ):
        return value
    vals = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    ok = (
        isinstance(vals, (tuple, list))
        and len(vals) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in vals)
    )
    if not ok:
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if min(vals) < minimum:
        what = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{op}: {name} must be {what}, got {value!r}")
    return int(vals[0]), int(vals[1])


def conv_args(op: str, x: torch.Tensor, weight: torch.Tensor, bias, stride, padding, dilation, groups):
    """Validates a conv2d call (x already 4-D) and returns (stride, padding, dilation) with
    padding as [top, left, bottom, right]."""
    tensor(op, "weight", weight, ndim=4)
    same_dtype_device(op, "input", x, weight=weight)
    if bias is not None:
        tensor(op, "bias", bias, ndim=1)
        same_dtype_device(op, "input", x, bias=bias)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    n, c, h, w = x.shape
    k, cg, r, s = weight.shape
    if c % groups or k % groups:
        raise ValueError(
            f"{op}: groups={groups} must divide both the input channels ({c}) and the output "
            f"channels ({k}) (input {tuple(x.shape)}, weight {tuple(weight.shape)})"
        )
    if cg != c // groups:
        raise ValueError(
            f"{op}: weight {tuple(weight.shape)} expects {cg * groups} input channels with "
            f"groups={groups}, but input {tuple(x.shape)} has {c}"
        )
    if bias is not None and bias.shape[0] != k:
        raise ValueError(
            f"{op}: bias has {bias.shape[0]} elements but weight {tuple(weight.shape)} has {k} output channels"
        )
    if min(r, s) < 1:
        raise ValueError(f"{op}: weight {tuple(weight.shape)} has an empty kernel")
    stride = _pair(op, "stride", stride, 1)
    dilation = _pair(op, "dilation", dilation, 1)
    if isinstance(padding, str):
        if padding == "valid":
            pad = [0, 0, 0, 0]
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(
                    f"{op}: padding='same' is not supported for strided convolutions (stride={stride}), as in PyTorch"
                )
            th, tw = dilation[0] * (r - 1), dilation[1] * (s - 1)
            pad = [th // 2, tw // 2, th - th // 2, tw - tw // 2]
        else:
            raise ValueError(f"{op}: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    else:
        ph, pw = _pair(op, "padding", padding, 0)
        pad = [ph, pw, ph, pw]
    eff_h, eff_w = dilation[0] * (r - 1) + 1, dilation[1] * (s - 1) + 1
    if eff_h > h + pad[0] + pad[2] or eff_w > w + pad[1] + pad[3]:
        raise ValueError(
            f"{op}: the kernel ({eff_h}x{eff_w} with dilation {dilation}) is larger than the padded "
            f"input ({h + pad[0] + pad[2]}x{w + pad[1] + pad[3]}; input {tuple(x.shape)}, "
            f"padding {padding!r})"
        )
    return list(stride), pad, list(dilation)


def residual(op: str, residual, x: torch.Tensor, out_shape, unbatched: bool):
    """A fused residual (or None): a floating tensor of exactly the output's shape (3-D for an
    unbatched input; no broadcasting), with the input's dtype and device. Returns it 4-D."""
    if residual is None:
        return None
    tensor(op, "residual", residual)
    same_dtype_device(op, "input", x, residual=residual)
    want = tuple(out_shape[1:]) if unbatched else tuple(out_shape)
    if tuple(residual.shape) != want:
        raise ValueError(
            f"{op}: residual must have the output's shape {want}, got {tuple(residual.shape)} "
            "(no broadcasting; an option-A shortcut goes through residual_add)"
        )
    return residual.unsqueeze(0) if unbatched else residual


def real(op: str, name: str, value) -> float:
    """A real number (int or float, not bool)."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def bn_args(op: str, x: torch.Tensor, channels: int, **tensors) -> None:
    """BatchNorm tensors (running_mean, running_var, bn_weight, bn_bias; None allowed): floating
    (K,) vectors on x's device, in x's dtype or, for float16/bfloat16 inputs, float32 (fp32
    parameters and statistics with half activations, as PyTorch's batch_norm accepts under AMP)."""
    allowed = (x.dtype, torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else (x.dtype,)
    for name, t in tensors.items():
        if t is None:
            continue
        tensor(op, name, t, ndim=1)
        if t.dtype not in allowed:
            raise TypeError(
                f"{op}: {name} has dtype {_fmt_dtype(t.dtype)} but input has dtype {_fmt_dtype(x.dtype)}; "
                f"BatchNorm tensors must be {' or '.join(_fmt_dtype(d) for d in allowed)}"
            )
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but input is on {x.device}")
        if t.shape[0] != channels:
            raise ValueError(
                f"{op}: {name} has {t.shape[0]} elements but the convolution has {channels} output channels"
            )


def batch_count(op: str, num_batches_tracked, running_mean) -> None:
    """``num_batches_tracked``: None, or an int64 tensor of one element on the running statistics'
    device, given with them (it counts their updates)."""
    if num_batches_tracked is None:
        return
    if not isinstance(num_batches_tracked, torch.Tensor):
        raise TypeError(f"{op}: num_batches_tracked must be a torch.Tensor, got {type(num_batches_tracked).__name__}")
    if num_batches_tracked.dtype != torch.int64 or num_batches_tracked.numel() != 1:
        raise TypeError(
            f"{op}: num_batches_tracked must be an int64 tensor of one element, got "
            f"{_fmt_dtype(num_batches_tracked.dtype)} of shape {tuple(num_batches_tracked.shape)}"
        )
    if running_mean is None:
        raise ValueError(f"{op}: num_batches_tracked counts the running statistics' updates: give running_mean too")
    if num_batches_tracked.device != running_mean.device:
        raise ValueError(
            f"{op}: num_batches_tracked is on {num_batches_tracked.device} but running_mean is on {running_mean.device}"
        )


def lrn_args(op: str, input, size, alpha, beta, k) -> tuple[int, float, float, float]:
    """Local Response Normalization: ``input`` a floating tensor of 3 or more dimensions, ``size``
    a positive int, ``alpha``, ``beta``, ``k`` real numbers (any value PyTorch accepts). Returns
    (size, alpha, beta, k) as (int, float, float, float)."""
    tensor(op, "input", input)
    if input.dim() < 3:
        raise ValueError(
            f"{op}: input must have 3 or more dimensions (N, C, *), got {input.dim()}-D with shape {tuple(input.shape)}"
        )
    import numbers

    if not isinstance(size, numbers.Integral) or isinstance(size, bool):
        raise TypeError(f"{op}: size must be an int, got {type(size).__name__} {size!r}")
    if size < 1:
        raise ValueError(f"{op}: size must be >= 1, got {size}")
    vals = []
    for name, v in (("alpha", alpha), ("beta", beta), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{op}: {name} must be a real number, got {type(v).__name__} {v!r}")
        vals.append(float(v))
    return (int(size), *vals)
