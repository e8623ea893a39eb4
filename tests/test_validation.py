"""Input validation of every public op, for every backend: each rule of cnnkern/_checks.py raises
TypeError/ValueError with a message that names the argument and the values, in the same words
whichever backend was asked for (validation runs before the backend is chosen). Also: an empty
batch (N = 0) gives an empty result forward and backward like PyTorch, and NaN/Inf propagate as in
PyTorch, on every backend that runs here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from helpers import DEVICE, backends_for

from cnnkern import _backend
from cnnkern import functional as F

OPS = ("conv2d", "conv_bn_relu", "local_response_norm", "residual_add")


def _runnable(op: str) -> list[str]:
    """The backends that run ``op`` on DEVICE here (torch always; triton under the interpreter;
    cuda where built and a GPU is present), plus "auto"."""
    out = ["auto", "torch"]
    for name in ("triton", "cuda"):
        if name in _backend.AUTO_ORDER.get(op, ()) and _backend.unavailable_reason(name, DEVICE) is None:
            out.append(name)
    return out


def _t(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(shape, device=device).to(dtype)


META = torch.device("meta")  # a second device that costs nothing, to test device mismatches


# ------------------------------------------------------------------------------------------------
# the rules, op by op: (id, call(backend), exception, message fragments)
# ------------------------------------------------------------------------------------------------
def _conv_like(op):
    """Cases shared by conv2d and conv_bn_relu (whose convolution is validated by the same code)."""

    def call(x, w, bias=None, **kw):
        if op == "conv2d":
            return lambda be: F.conv2d(x, w, bias, backend=be, **kw)
        k = w.shape[0] if isinstance(w, torch.Tensor) and w.dim() >= 1 else 8
        bn = dict(
            running_mean=torch.zeros(k, device=DEVICE),
            running_var=torch.ones(k, device=DEVICE),
            bn_weight=torch.ones(k, device=DEVICE),
            bn_bias=torch.zeros(k, device=DEVICE),
        )
        return lambda be: F.conv_bn_relu(x, w, bias, **bn, backend=be, **kw)

    x, w = _t(1, 4, 5, 5), _t(8, 4, 3, 3)
    return [
        ("input-not-tensor", call([[1.0]], w), TypeError, ["input must be a torch.Tensor, got list"]),
        (
            "input-2d",
            call(_t(4, 5), w),
            ValueError,
            ["input must be 4-D (N, C, H, W) or 3-D (C, H, W), got 2-D", "(4, 5)"],
        ),
        ("input-5d", call(_t(1, 4, 5, 5, 1), w), ValueError, ["got 5-D with shape (1, 4, 5, 5, 1)"]),
        ("input-int", call(x.int(), w), TypeError, ["input must be a floating-point tensor", "got dtype int32"]),
        ("input-bool", call(x > 0, w), TypeError, ["input must be a floating-point tensor", "got dtype bool"]),
        ("weight-3d", call(x, _t(8, 4, 3)), ValueError, ["weight must be 4-D, got 3-D with shape (8, 4, 3)"]),
        ("weight-int", call(x, w.long()), TypeError, ["weight must be a floating-point tensor", "int64"]),
        ("weight-dtype", call(x, w.double()), TypeError, ["weight has dtype float64 but input has dtype float32"]),
        ("weight-device", call(x, w.to(META)), ValueError, ["weight is on meta but input is on"]),
        ("bias-2d", call(x, w, _t(8, 1)), ValueError, ["bias must be 1-D, got 2-D with shape (8, 1)"]),
        ("bias-int", call(x, w, _t(8).int()), TypeError, ["bias must be a floating-point tensor"]),
        ("bias-dtype", call(x, w, _t(8).half()), TypeError, ["bias has dtype float16 but input has dtype float32"]),
        ("bias-device", call(x, w, _t(8).to(META)), ValueError, ["bias is on meta but input is on"]),
        ("bias-length", call(x, w, _t(7)), ValueError, ["bias has 7 elements but weight (8, 4, 3, 3) has 8 output"]),
        (
            "channels",
            call(x, _t(8, 3, 3, 3)),
            ValueError,
            ["weight (8, 3, 3, 3) expects 3 input channels with groups=1, but input (1, 4, 5, 5) has 4"],
        ),
        (
            "channels-groups",
            call(x, _t(8, 4, 3, 3), groups=2),
            ValueError,
            ["weight (8, 4, 3, 3) expects 8 input channels with groups=2, but input (1, 4, 5, 5) has 4"],
        ),
        (
            "groups-input",
            call(_t(1, 6, 5, 5), _t(8, 2, 3, 3), groups=4),
            ValueError,
            ["groups=4 must divide both the input channels (6) and the output channels (8)"],
        ),
        (
            "groups-output",
            call(x, _t(6, 1, 3, 3), groups=4),
            ValueError,
            ["groups=4 must divide both the input channels (4) and the output channels (6)"],
        ),
        ("groups-zero", call(x, w, groups=0), ValueError, ["groups must be a positive int, got 0"]),
        ("groups-float", call(x, w, groups=1.0), ValueError, ["groups must be a positive int, got 1.0"]),
        ("stride-zero", call(x, w, stride=0), ValueError, ["stride must be positive, got 0"]),
        ("stride-negative", call(x, w, stride=(1, -2)), ValueError, ["stride must be positive, got (1, -2)"]),
        ("stride-float", call(x, w, stride=1.5), TypeError, ["stride must be an int or a pair of ints, got 1.5"]),
        ("dilation-zero", call(x, w, dilation=(0, 1)), ValueError, ["dilation must be positive, got (0, 1)"]),
        ("padding-negative", call(x, w, padding=-1), ValueError, ["padding must be non-negative, got -1"]),
        ("padding-triple", call(x, w, padding=(1, 1, 1)), TypeError, ["padding must be an int or a pair of ints"]),
        (
            "padding-string",
            call(x, w, padding="full"),
            ValueError,
            ["padding must be an int, a pair, 'same' or 'valid', got 'full'"],
        ),
        (
            "padding-same-strided",
            call(x, w, padding="same", stride=2),
            ValueError,
            ["padding='same' is not supported for strided convolutions (stride=(2, 2))"],
        ),
        (
            "kernel-larger",
            call(_t(1, 4, 2, 2), _t(8, 4, 5, 5), padding=1),
            ValueError,
            [
                "the kernel (5x5 with dilation (1, 1)) is larger than the padded input (4x4; input (1, 4, 2, 2)",
                "padding 1",
            ],
        ),
        (
            "dilated-kernel-larger",
            call(x, w, dilation=3),
            ValueError,
            ["the kernel (7x7 with dilation (3, 3)) is larger than the padded input (5x5"],
        ),
    ]


def _conv2d_only():
    x, w = _t(1, 4, 5, 5), _t(8, 4, 3, 3)
    return [
        (
            "activation",
            lambda be: F.conv2d(x, w, activation="gelu", backend=be),
            ValueError,
            ["activation must be None or 'relu', got 'gelu'"],
        )
    ]


def _conv_bn_relu_only():
    x, w = _t(2, 4, 5, 5), _t(8, 4, 3, 3)

    def call(training=False, momentum=0.1, eps=1e-5, relu=True, **bn):
        args = dict(
            running_mean=torch.zeros(8, device=DEVICE),
            running_var=torch.ones(8, device=DEVICE),
            bn_weight=torch.ones(8, device=DEVICE),
            bn_bias=torch.zeros(8, device=DEVICE),
        )
        args.update(bn)
        return lambda be: F.conv_bn_relu(
            x,
            w,
            None,
            args["running_mean"],
            args["running_var"],
            args["bn_weight"],
            args["bn_bias"],
            training=training,
            momentum=momentum,
            eps=eps,
            padding=1,
            relu=relu,
            backend=be,
        )

    return [
        (
            "running_mean-length",
            call(running_mean=torch.zeros(7)),
            ValueError,
            ["running_mean has 7 elements but the convolution has 8 output channels"],
        ),
        ("running_var-2d", call(running_var=torch.ones(8, 1)), ValueError, ["running_var must be 1-D, got 2-D"]),
        (
            "bn_weight-int",
            call(bn_weight=torch.ones(8, dtype=torch.int64)),
            TypeError,
            ["bn_weight must be a floating-point tensor", "int64"],
        ),
        (
            "bn_bias-dtype",
            call(bn_bias=torch.zeros(8, dtype=torch.float64)),
            TypeError,
            ["bn_bias has dtype float64 but input has dtype float32; BatchNorm tensors must be float32"],
        ),
        (
            "running_mean-half-for-fp32",
            call(running_mean=torch.zeros(8, dtype=torch.float16)),
            TypeError,
            ["running_mean has dtype float16 but input has dtype float32"],
        ),
        (
            "bn_weight-device",
            call(bn_weight=torch.ones(8, device=META)),
            ValueError,
            ["bn_weight is on meta but input is on"],
        ),
        (
            "running-stats-half-given",
            call(running_var=None),
            ValueError,
            ["running_mean and running_var must both be tensors or both be None"],
        ),
        ("momentum-none", call(training=True, momentum=None), ValueError, ["momentum=None", "cnnkern.nn.ConvBNReLU2d"]),
        ("momentum-string", call(momentum="0.1"), TypeError, ["momentum must be a real number, got str '0.1'"]),
        ("eps-none", call(eps=None), TypeError, ["eps must be a real number, got NoneType None"]),
        ("training-int", call(training=1), TypeError, ["training must be a bool, got int 1"]),
        ("relu-none", call(relu=None), TypeError, ["relu must be a bool, got NoneType None"]),
        (
            "one-value-per-channel",
            lambda be: F.conv_bn_relu(_t(1, 4, 3, 3), w, None, None, None, None, None, training=True, backend=be),
            ValueError,
            ["expected more than 1 value per channel when training, got output of 1 value(s) per channel"],
        ),
    ]


def _lrn():
    x = _t(2, 6, 3, 3)

    def call(inp=x, size=3, **kw):
        return lambda be: F.local_response_norm(inp, size, backend=be, **kw)

    return [
        ("input-not-tensor", call(inp=3.0), TypeError, ["input must be a torch.Tensor, got float"]),
        (
            "input-2d",
            call(inp=_t(2, 6)),
            ValueError,
            ["input must have 3 or more dimensions (N, C, *), got 2-D with shape (2, 6)"],
        ),
        ("input-int", call(inp=x.int()), TypeError, ["input must be a floating-point tensor", "int32"]),
        ("size-zero", call(size=0), ValueError, ["size must be >= 1, got 0"]),
        ("size-float", call(size=2.5), TypeError, ["size must be an int, got float 2.5"]),
        ("size-bool", call(size=True), TypeError, ["size must be an int, got bool True"]),
        ("alpha-string", call(alpha="1e-4"), TypeError, ["alpha must be a real number, got str '1e-4'"]),
        ("beta-none", call(beta=None), TypeError, ["beta must be a real number, got NoneType None"]),
        ("k-tensor", call(k=torch.tensor(1.0)), TypeError, ["k must be a real number, got Tensor"]),
    ]


def _residual_add():
    x = _t(2, 8, 4, 4)

    def call(a=x, s=x, **kw):
        return lambda be: F.residual_add(a, s, backend=be, **kw)

    return [
        ("x-not-tensor", call(a=None), TypeError, ["x must be a torch.Tensor, got NoneType"]),
        ("x-3d", call(a=_t(8, 4, 4)), ValueError, ["x must be 4-D, got 3-D with shape (8, 4, 4)"]),
        ("shortcut-5d", call(s=_t(2, 8, 4, 4, 1)), ValueError, ["shortcut must be 4-D, got 5-D"]),
        ("x-int", call(a=x.int()), TypeError, ["x must be a floating-point tensor", "int32"]),
        ("shortcut-int", call(s=x.to(torch.int8)), TypeError, ["shortcut must be a floating-point tensor", "int8"]),
        (
            "dtype",
            call(s=x.double()),
            TypeError,
            ["shortcut has dtype float64 but x has dtype float32", "no implicit promotion"],
        ),
        ("device", call(s=x.to(META)), ValueError, ["shortcut is on meta but x is on"]),
        ("batch", call(s=_t(3, 8, 4, 4)), ValueError, ["shortcut has batch size 3 but x has 2"]),
        (
            "channels",
            call(s=_t(2, 16, 8, 8)),
            ValueError,
            ["shortcut has 16 channels, more than x's 8", "use a projection (1x1 conv) shortcut"],
        ),
        (
            "option-a-smaller",
            call(s=_t(2, 4, 2, 2)),
            ValueError,
            ["no option-A stride maps the shortcut's spatial size 2x2 onto x's 4x4"],
        ),
        (
            "option-a-no-stride",
            call(a=_t(2, 8, 4, 4), s=_t(2, 4, 9, 9)),
            ValueError,
            ["need an integer s with ceil(9/s) == 4 and ceil(9/s) == 4"],
        ),
        (
            "option-a-anisotropic",
            call(a=_t(2, 8, 4, 4), s=_t(2, 4, 8, 12)),
            ValueError,
            ["no option-A stride maps the shortcut's spatial size 8x12 onto x's 4x4"],
        ),
        ("relu-int", call(relu=1), TypeError, ["relu must be a bool, got int 1"]),
    ]


CASES = (
    [("conv2d", *c) for c in _conv_like("conv2d") + _conv2d_only()]
    + [("conv_bn_relu", *c) for c in _conv_like("conv_bn_relu") + _conv_bn_relu_only()]
    + [("local_response_norm", *c) for c in _lrn()]
    + [("residual_add", *c) for c in _residual_add()]
)


@pytest.mark.parametrize("op,name,call,exc,fragments", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_input_same_words_on_every_backend(op, name, call, exc, fragments):
    messages = {}
    for be in _runnable(op):
        with pytest.raises(exc) as info:
            call(be)
        messages[be] = str(info.value)
    msg = messages["torch"]
    assert msg.startswith(f"{op}: "), msg
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    assert len(set(messages.values())) == 1, messages


def test_every_rule_has_a_case():
    """The rules the issue lists, each covered for each op it applies to."""
    ids = {(c[0], c[1]) for c in CASES}
    conv_rules = [
        "input-2d",
        "input-int",
        "weight-dtype",
        "weight-device",
        "bias-dtype",
        "bias-device",
        "channels",
        "channels-groups",
        "groups-input",
        "stride-zero",
        "dilation-zero",
        "padding-negative",
        "kernel-larger",
    ]
    for op in ("conv2d", "conv_bn_relu"):
        for rule in conv_rules:
            assert (op, rule) in ids, (op, rule)
    for rule in ("bn_bias-dtype", "bn_weight-device", "running_mean-length"):
        assert ("conv_bn_relu", rule) in ids
    for rule in ("input-2d", "input-int", "size-zero"):
        assert ("local_response_norm", rule) in ids
    for rule in ("x-3d", "x-int", "dtype", "device", "option-a-no-stride"):
        assert ("residual_add", rule) in ids


def test_unknown_backend_is_rejected_by_name():
    with pytest.raises(ValueError, match="residual_add: backend: unknown backend 'gpu'"):
        F.residual_add(_t(1, 2, 2, 2), _t(1, 2, 2, 2), backend="gpu")


def test_fp32_bn_tensors_with_half_input_are_accepted():
    """AMP's usual mix (fp16 activations, fp32 BatchNorm parameters and statistics) is valid."""
    x, w = _t(2, 4, 5, 5, dtype=torch.float16), _t(8, 4, 3, 3, dtype=torch.float16)
    if DEVICE.type == "cpu":
        x, w = x.float(), w.float()  # PyTorch's CPU conv has no fp16 path in every build: check the rule only
        from cnnkern import _checks

        _checks.bn_args("conv_bn_relu", x.half(), 8, running_mean=torch.zeros(8), bn_weight=torch.ones(8))
        return
    y = F.conv_bn_relu(
        x,
        w,
        None,
        torch.zeros(8, device=DEVICE),
        torch.ones(8, device=DEVICE),
        torch.ones(8, device=DEVICE),
        torch.zeros(8, device=DEVICE),
        padding=1,
    )
    assert y.dtype == torch.float16


# ------------------------------------------------------------------------------------------------
# empty batch: an empty result, forward and backward, like PyTorch
# ------------------------------------------------------------------------------------------------
def _empty_cases():
    def conv(be, x, w, b):
        return F.conv2d(x, w, b, stride=2, padding=1, backend=be), TF.conv2d(x, w, b, stride=2, padding=1)

    def cbr(be, x, w, b):
        args = (torch.zeros(8, dtype=x.dtype, device=DEVICE), torch.ones(8, dtype=x.dtype, device=DEVICE))
        return (
            F.conv_bn_relu(x, w, b, *args, None, None, training=False, padding=1, backend=be),
            torch.relu(TF.batch_norm(TF.conv2d(x, w, b, padding=1), *args, training=False)),
        )

    def lrn(be, x, w, b):
        return F.local_response_norm(x, 3, backend=be), TF.local_response_norm(x, 3)

    def res(be, x, w, b):
        s = x[:, :2].repeat_interleave(2, 2).repeat_interleave(2, 3)  # (0, 2, 10, 10): option A, stride 2
        return F.residual_add(x, s, backend=be), torch.relu(x + TF.pad(s[:, :, ::2, ::2], (0, 0, 0, 0, 0, 2)))

    return {"conv2d": conv, "conv_bn_relu": cbr, "local_response_norm": lrn, "residual_add": res}


@pytest.mark.parametrize(
    "op,backend",
    [
        pytest.param(op, be, marks=backends_for(DEVICE, op)[i].marks, id=f"{op}-{be}")
        for op in OPS
        for i, be in enumerate(("torch", "triton", "cuda"))
    ],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_empty_batch_forward_and_backward(op, backend, layout):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(0, 4, 5, 5, device=DEVICE, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(8, 4, 3, 3, device=DEVICE, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    out, ref = _empty_cases()[op](backend, x, w, b)
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.numel() == 0
    leaves = [t for t in (x, w, b) if t is not None]
    used = [t for t in leaves if op in ("conv2d", "conv_bn_relu") or t is x]
    got = torch.autograd.grad(out.sum(), used, allow_unused=True)
    want = torch.autograd.grad(ref.sum(), used, allow_unused=True)
    for g, r, t in zip(got, want, used):
        assert g is not None and g.shape == t.shape
        torch.testing.assert_close(g, r)  # zeros for the weight and bias, empty for the input


@pytest.mark.parametrize("backend", backends_for(DEVICE, "conv_bn_relu"))
def test_empty_batch_in_training_like_pytorch(backend):
    """PyTorch's batch_norm accepts an empty training batch: empty output, zero parameter
    gradients, running statistics untouched."""
    x = torch.randn(0, 4, 5, 5, device=DEVICE, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 4, 3, 3, device=DEVICE, dtype=torch.float64, requires_grad=True)
    gamma = torch.rand(8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(8, device=DEVICE, dtype=torch.float64), torch.rand(8, device=DEVICE, dtype=torch.float64)
    rm0, rv0 = rm.clone(), rv.clone()
    out = F.conv_bn_relu(x, w, None, rm, rv, gamma, beta, training=True, backend=backend)
    ref = torch.relu(TF.batch_norm(TF.conv2d(x, w), rm0.clone(), rv0.clone(), gamma, beta, training=True))
    assert out.shape == ref.shape == (0, 8, 3, 3)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    got = torch.autograd.grad(out.sum(), (x, w, gamma, beta))
    want = torch.autograd.grad(ref.sum(), (x, w, gamma, beta))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


def test_one_value_per_channel_in_training_is_an_error_like_pytorch():
    x, w = _t(1, 4, 3, 3), _t(8, 4, 3, 3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        TF.batch_norm(TF.conv2d(x, w), None, None, training=True)


# ------------------------------------------------------------------------------------------------
# NaN and Inf propagate as in PyTorch
# ------------------------------------------------------------------------------------------------
def _poisoned(shape, dtype=torch.float64):
    x = torch.randn(shape, dtype=dtype, device=DEVICE)
    x[0, 0, 1, 1] = float("nan")
    x[0, 1, 2, 3] = float("inf")
    x[-1, -1, 0, 0] = float("-inf")
    x[-1, 2, 3, 3] = float("inf")
    x[-1, 3, 3, 3] = float("-inf")
    return x


@pytest.mark.parametrize(
    "op,backend",
    [
        pytest.param(op, be, marks=backends_for(DEVICE, op)[i].marks, id=f"{op}-{be}")
        for op in OPS
        for i, be in enumerate(("torch", "triton", "cuda"))
    ],
)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
def test_nan_and_inf_propagate_like_pytorch(op, backend):
    x = _poisoned((2, 6, 6, 6))
    w = torch.randn(8, 6, 3, 3, dtype=torch.float64, device=DEVICE)
    b = torch.randn(8, dtype=torch.float64, device=DEVICE)
    if op == "conv2d":
        out, ref = F.conv2d(x, w, b, padding=1, backend=backend), TF.conv2d(x, w, b, padding=1)
    elif op == "conv_bn_relu":
        stats = (torch.zeros(8, dtype=x.dtype, device=DEVICE), torch.ones(8, dtype=x.dtype, device=DEVICE))
        # eval (folded BatchNorm) keeps the non-finite values local; training spreads them over their channel
        out = F.conv_bn_relu(x, w, b, *stats, None, None, training=False, padding=1, backend=backend)
        ref = torch.relu(TF.batch_norm(TF.conv2d(x, w, b, padding=1), *stats, training=False))
        out_t = F.conv_bn_relu(x, w, b, None, None, None, None, training=True, padding=1, backend=backend)
        ref_t = torch.relu(TF.batch_norm(TF.conv2d(x, w, b, padding=1), None, None, training=True))
        assert torch.equal(out_t.isnan(), ref_t.isnan()) and torch.equal(out_t.isinf(), ref_t.isinf())
    elif op == "local_response_norm":
        out, ref = F.local_response_norm(x, 3, backend=backend), TF.local_response_norm(x, 3)
    else:
        s = _poisoned((2, 6, 6, 6))
        out, ref = F.residual_add(x, s, backend=backend), torch.relu(x + s)
    assert ref.isnan().any() and ref.isinf().any() if op != "local_response_norm" else ref.isnan().any()
    assert torch.equal(out.isnan(), ref.isnan()), "NaN positions differ"
    assert torch.equal(out.isinf(), ref.isinf()) and torch.equal(out.isposinf(), ref.isposinf()), "Inf positions differ"
    torch.testing.assert_close(out, ref, equal_nan=True)
