"""conv2d: forward and the three gradients against float64 PyTorch, for every conv layer family of
AlexNet, VGG, GoogLeNet and ResNet at reduced spatial size, in every backend that can run here;
layouts, dtypes, groups, dilation, "same" padding, the fused ReLU; registration; bad input."""

import json
import os

import pytest
import torch
from helpers import (
    DEVICE,
    EMULATED_CUDA,
    HAS_CUDA,
    LAYOUTS,
    assert_rel_close,
    backends_for,
    cuda_kernel_test,
    ieee_fp32,
    make,
    merge_stats,
    wgmma_here,
)

import cnnkern
from cnnkern import functional as F
from cnnkern.ops._common import cuda_ops

# name: (input shape, out channels, kernel, stride, padding, dilation, groups) -- why it is here
FAMILIES = {
    "alexnet_11x11s4": ((1, 3, 19, 19), 8, 11, 4, 2, 1, 1),  # AlexNet CONV1, C=3: small-C kernel
    "first_7x7s2": ((2, 3, 12, 11), 8, 7, 2, 3, 1, 1),  # GoogLeNet/ResNet conv1, C=3, odd W
    "vgg_first_3x3": ((2, 3, 6, 6), 8, 3, 1, 1, 1, 1),  # VGG conv1_1, C=3
    "5x5s1p2": ((2, 16, 7, 7), 12, 5, 1, 2, 1, 1),  # GoogLeNet 5x5 branch, AlexNet CONV2
    "3x3s1p1": ((2, 16, 7, 7), 24, 3, 1, 1, 1, 1),  # VGG / ResNet body
    "3x3s2p1": ((2, 16, 8, 8), 24, 3, 2, 1, 1, 1),  # ResNet stage entry (B/C, v1.5)
    "1x1s1": ((2, 32, 5, 5), 16, 1, 1, 0, 1, 1),  # bottleneck / Inception reduce: a GEMM
    "1x1s2": ((2, 32, 8, 8), 16, 1, 2, 0, 1, 1),  # ResNet projection shortcut
    "odd_3x3": ((1, 17, 9, 7), 19, 3, 1, 1, 1, 1),  # channel counts off every block size
    "dilated": ((1, 16, 9, 9), 8, 3, 1, 2, 2, 1),  # dilation 2
    "groups2": ((2, 16, 6, 6), 8, 3, 1, 1, 1, 2),  # AlexNet's two-GPU split
    "groups4": ((2, 16, 6, 5), 8, 3, 2, 1, 1, 4),
    "rect": ((2, 8, 6, 9), 8, (3, 5), (2, 1), (1, 2), 1, 1),  # non-square kernel, stride, padding
    "same_even": ((1, 8, 6, 6), 8, 4, 1, "same", 1, 1),  # asymmetric "same" padding
}
BACKENDS = backends_for(DEVICE, "conv2d")
GRAD_DTYPES = [torch.float32, torch.float16, torch.float64]


def _inputs(name, dtype, layout, requires_grad=False, bias=True):
    xs, k, ks, stride, pad, dil, groups = FAMILIES[name]
    ks = (ks, ks) if isinstance(ks, int) else ks
    x = make(xs, dtype, DEVICE, layout, requires_grad)
    w = make((k, xs[1] // groups, *ks), dtype, DEVICE, layout, requires_grad)
    # scale like a trained layer (Kaiming): keeps fp16 activations far from overflow
    with torch.no_grad():
        w.mul_((xs[1] // groups * ks[0] * ks[1]) ** -0.5)
    b = make((1, 1, 1, k), dtype, DEVICE).reshape(k).requires_grad_(requires_grad) if bias else None
    return x, w, b, dict(stride=stride, padding=pad, dilation=dil, groups=groups)


def _ref(x, w, b, kw, activation=None):
    d = lambda t: None if t is None else t.detach().double().requires_grad_(t.requires_grad)  # noqa: E731
    xr, wr, br = d(x), d(w), d(b)
    return xr, wr, br, cnnkern.reference.conv2d(xr, wr, br, activation=activation, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward(backend, dtype, layout, family):
    x, w, b, kw = _inputs(family, dtype, layout, bias=len(family) % 2 == 0 or layout == "contiguous")
    out = F.conv2d(x, w, b, **kw, backend=backend)
    _, _, _, ref = _ref(x, w, b, kw)
    assert out.dtype == dtype
    assert_rel_close(out, ref, dtype, matmul=True)
    if layout == "channels_last":  # (float64 on a GPU: NCHW, as cuDNN gives it)
        assert out.is_contiguous(memory_format=torch.channels_last) != (dtype == torch.float64 and out.is_cuda)


def _check_grads(backend, dtype, layout, family, activation=None):
    x, w, b, kw = _inputs(family, dtype, layout, requires_grad=True)
    out = F.conv2d(x, w, b, **kw, activation=activation, backend=backend)
    g = make(tuple(out.shape), dtype, DEVICE)
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), g)
    xr, wr, br, ref = _ref(x, w, b, kw, activation)
    rgx, rgw, rgb = torch.autograd.grad(ref, (xr, wr, br), g.double())
    assert_rel_close(out, ref, dtype, matmul=True)
    assert_rel_close(gx, rgx, dtype, "grad input", matmul=True)
    assert_rel_close(gw, rgw, dtype, "grad weight", matmul=True)
    assert_rel_close(gb, rgb, dtype, "grad bias", matmul=True)
    assert gx.dtype == gw.dtype == gb.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradients_fp32_layouts(backend, layout, family):
    _check_grads(backend, torch.float32, layout, family)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradients_fp16_fp64(backend, dtype, family):
    _check_grads(backend, dtype, "contiguous", family)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["alexnet_11x11s4", "3x3s2p1", "1x1s1", "groups2"])
def test_fused_relu(backend, family):
    with ieee_fp32():  # a TF32 rounding that flips a ReLU mask element is not a kernel error
        _check_grads(backend, torch.float32, "channels_last", family, activation="relu")


# the residual in the other layout than the output (the op re-lays it out), or the same one
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("res_layout", ["same", "other"])
@pytest.mark.parametrize("family", ["alexnet_11x11s4", "3x3s1p1", "3x3s2p1", "1x1s1", "groups2"])
def test_fused_residual(backend, family, res_layout, activation):
    """activation(conv + bias + residual), and the gradients of all four inputs (the residual's:
    the activation's masked gradient), against float64 PyTorch."""
    with ieee_fp32():
        x, w, b, kw = _inputs(family, torch.float32, "channels_last", requires_grad=True)
        shape = cnnkern.reference.conv2d(x.detach(), w.detach(), None, **kw).shape
        r = make(
            tuple(shape),
            torch.float32,
            DEVICE,
            "channels_last" if res_layout == "same" else "contiguous",
            requires_grad=True,
        )
        out = F.conv2d(x, w, b, **kw, activation=activation, residual=r, backend=backend)
        g = make(tuple(out.shape), torch.float32, DEVICE)
        grads = torch.autograd.grad(out, (x, w, b, r), g)
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    rr = r.detach().double().requires_grad_()
    ref = cnnkern.reference.conv2d(xr, wr, br, activation=activation, residual=rr, **kw)
    rgrads = torch.autograd.grad(ref, (xr, wr, br, rr), g.double())
    assert_rel_close(out, ref, torch.float32, matmul=True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    for name, got, want in zip(("input", "weight", "bias", "residual"), grads, rgrads):
        assert_rel_close(got, want, torch.float32, f"grad {name}", matmul=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_fused_residual_dtypes_and_module(backend, dtype):
    """fp16 and fp64 with a residual, through cnnkern.nn.Conv2d's forward(x, residual)."""
    conv = cnnkern.nn.Conv2d(16, 24, 3, padding=1, activation="relu", backend=backend).to(DEVICE, dtype)
    x = make((2, 16, 7, 7), dtype, DEVICE, "channels_last")
    r = make((2, 24, 7, 7), dtype, DEVICE)
    with torch.no_grad():
        conv.weight.mul_((16 * 9) ** -0.5)
        out = conv(x, r)
    ref = cnnkern.reference.conv2d(
        x.double(), conv.weight.double(), conv.bias.double(), padding=1, activation="relu", residual=r.double()
    )
    assert out.dtype == dtype
    assert_rel_close(out, ref, dtype, matmul=True)


@pytest.mark.parametrize("kernel", ["small_c", "main", "1x1"])
@pytest.mark.parametrize("family", ["first_7x7s2", "3x3s2p1", "groups4", "rect", "1x1s2"])
def test_every_forward_kernel_on_the_same_layer(kernel, family):
    """Each forward kernel is correct on layers the dispatcher would give another one."""
    if kernel == "1x1" and family != "1x1s2":
        pytest.skip("the 1x1 kernel serves unpadded 1x1 convolutions only")
    if cnnkern._backend.unavailable_reason("triton", DEVICE):
        pytest.skip("Triton unavailable")
    from cnnkern.kernels import conv2d as kc

    x, w, b, kw = _inputs(family, torch.float32, "channels_last")
    stride, pad, dil = cnnkern._checks.conv_args(
        "t", x, w, b, kw["stride"], kw["padding"], kw["dilation"], kw["groups"]
    )
    _, _, _, ref = _ref(x, w, b, kw)
    y = torch.full(ref.shape, float("nan"), dtype=x.dtype, device=DEVICE)
    kc.conv2d_forward(x, w, b, y, stride, pad[:2], dil, kw["groups"], False, "ieee", kernel=kernel)
    assert_rel_close(y, ref, torch.float32)  # "ieee": full fp32 even on a GPU


@pytest.mark.parametrize("kernel", ["small_c", "main", "1x1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_forward_split_k(kernel, dtype):
    """The Triton forward with its reduction split: each split's partial sums into the workspace,
    added in order by _fwd_split_sum_kernel with bias, residual and ReLU; NCHW and channels_last,
    more splits than reduction steps (empty splits store zeros), into NaN-poisoned outputs."""
    if cnnkern._backend.unavailable_reason("triton", DEVICE):
        pytest.skip("Triton unavailable")
    from cnnkern.kernels import conv2d as kc

    family = {"small_c": "first_7x7s2", "main": "groups4", "1x1": "1x1s2"}[kernel]
    for layout, splits in (("channels_last", 3), ("contiguous", 2), ("channels_last", 50)):
        x, w, b, kw = _inputs(family, dtype, layout)
        stride, pad, dil = cnnkern._checks.conv_args(
            "t", x, w, b, kw["stride"], kw["padding"], kw["dilation"], kw["groups"]
        )
        _, _, _, ref = _ref(x, w, b, kw)
        r = torch.randn(ref.shape, dtype=dtype, device=DEVICE).contiguous(
            memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format
        )
        y = torch.full_like(r, float("nan"))
        kc.conv2d_forward(
            x, w, b, y, stride, pad[:2], dil, kw["groups"], True, "ieee", kernel=kernel, residual=r, splits=splits
        )
        assert not y.isnan().any(), (layout, splits)
        assert_rel_close(y, (ref.double() + r.double()).relu(), dtype)
    with pytest.raises(ValueError, match="splits must be >= 1"):
        kc.conv2d_forward(x, w, b, y, stride, pad[:2], dil, kw["groups"], False, "ieee", kernel=kernel, splits=0)


@pytest.mark.parametrize("kernel", ["small_c", "main", "1x1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_forward_split_k_statistics(kernel, dtype):
    """Split-K with the BatchNorm statistics: _fwd_split_sum_kernel takes them from its summed
    32-row tiles as the unsplit epilogue does from its own: count, mean and M2 per channel (bias
    included) that merge to the float64 reference's, with partial last tiles, into a poisoned
    output; the unsplit launch agrees."""
    if cnnkern._backend.unavailable_reason("triton", DEVICE):
        pytest.skip("Triton unavailable")
    from cnnkern.kernels import conv2d as kc

    family = {"small_c": "first_7x7s2", "main": "groups4", "1x1": "1x1s2"}[kernel]
    x, w, b, kw = _inputs(family, dtype, "channels_last")
    stride, pad, dil = cnnkern._checks.conv_args(
        "t", x, w, b, kw["stride"], kw["padding"], kw["dilation"], kw["groups"]
    )
    _, _, _, ref = _ref(x, w, b, kw)
    K, M = ref.shape[1], ref.numel() // ref.shape[1]
    want = ref.double().transpose(0, 1).reshape(K, M)
    for splits in (1, 3):
        y = torch.full(ref.shape, float("nan"), dtype=dtype, device=DEVICE).contiguous(
            memory_format=torch.channels_last
        )
        st = torch.zeros(kc.stats_rows(M), 3, K, dtype=dtype, device=DEVICE)
        kc.conv2d_forward(
            x, w, b, y, stride, pad[:2], dil, kw["groups"], False, "ieee", kernel=kernel, stats=st, splits=splits
        )
        assert not y.isnan().any(), splits
        assert_rel_close(y, ref, dtype)
        cnt, mu, var = merge_stats(st)
        assert cnt.eq(M).all(), (splits, cnt)
        assert_rel_close(mu, want.mean(1), dtype, "mean")
        assert_rel_close(var, want.var(1, unbiased=False), dtype, "variance")


@pytest.mark.parametrize("family", ["3x3s2p1", "groups4", "dilated", "1x1s2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_backward_input_split_k(family, dtype):
    """The Triton grad-input with each stride phase's reduction split: partials summed in order by
    _fwd_split_sum_kernel through the phase's strided view of grad_x (NCHW and channels_last, more
    splits than steps), into NaN-poisoned gradients; the split choice per phase (None) too."""
    if cnnkern._backend.unavailable_reason("triton", DEVICE):
        pytest.skip("Triton unavailable")
    from cnnkern.kernels import conv2d as kc

    for layout, splits in (("channels_last", 3), ("contiguous", 2), ("channels_last", 50), ("contiguous", None)):
        x, w, b, kw = _inputs(family, dtype, layout, requires_grad=True)
        stride, pad, dil = cnnkern._checks.conv_args(
            "t", x, w, b, kw["stride"], kw["padding"], kw["dilation"], kw["groups"]
        )
        xr, _, _, ref = _ref(x, w, b, kw)
        g = torch.randn(ref.shape, dtype=dtype, device=DEVICE).contiguous(
            memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format
        )
        (want,) = torch.autograd.grad(ref, xr, g.double())
        gx = torch.full_like(x, float("nan"))
        kc.conv2d_backward_input(g, w.detach(), gx, stride, pad[:2], dil, kw["groups"], "ieee", splits=splits)
        assert_rel_close(gx, want, dtype, "grad input")
    with pytest.raises(ValueError, match="splits must be >= 1"):
        kc.conv2d_backward_input(g, w.detach(), gx, stride, pad[:2], dil, kw["groups"], "ieee", splits=0)


def test_split_k_choice(monkeypatch):
    """Which layers split (kernels/conv2d.py: gemm_splits) on a 132-SM GPU: ResNet-50's last
    stage at batch 1 (8 tiles of 64x64) 16 ways, at batch 32 (200 tiles) not at all; a first layer
    with a short reduction (147 values) not at all; never more than 32."""
    from cnnkern.kernels import conv2d as kc

    monkeypatch.setattr(kc, "sm_count", lambda device, interpreted: 132)
    assert kc.gemm_splits(49, 512, 1, 4608, "cuda") == 16
    assert kc.gemm_splits(32 * 49, 512, 1, 4608, "cuda") == 1
    assert kc.gemm_splits(12544, 64, 1, 147, "cuda") == 1
    assert kc.gemm_splits(1, 64, 1, 1 << 20, "cuda") == 32


def test_unbatched_input_and_empty_batch():
    x, w, b, kw = _inputs("3x3s1p1", torch.float32, "contiguous")
    out = F.conv2d(x[0], w, b, **kw, backend="triton")
    assert out.shape == (24, 7, 7)
    assert_rel_close(out, _ref(x[:1], w, b, kw)[3][0], torch.float32, matmul=True)
    empty = torch.randn(0, 16, 7, 7, device=DEVICE, requires_grad=True)
    out = F.conv2d(empty, w, b, **kw, backend="triton")
    assert out.shape == (0, 24, 7, 7)
    out.sum().backward()
    assert empty.grad.shape == empty.shape


def test_deterministic_gradients():
    """Two backward passes give bitwise-equal gradients (split-K partials summed in a fixed order)."""
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            torch.manual_seed(1)
            x, w, b, kw = _inputs("3x3s2p1", torch.float32, "channels_last", requires_grad=True)
            F.conv2d(x, w, b, **kw, backend="triton").square().sum().backward()
            grads.append((x.grad, w.grad, b.grad))
        for a, c in zip(*grads):
            assert torch.equal(a, c)
    finally:
        torch.use_deterministic_algorithms(False)


# ------------------------------------------------------------------------------------------------
# modules and registration
# ------------------------------------------------------------------------------------------------
def test_module_is_a_drop_in_for_torch_conv2d():
    ref = torch.nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=True).to(DEVICE)
    m = cnnkern.nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=True, backend="triton").to(DEVICE)
    assert isinstance(m, torch.nn.Conv2d)
    assert m.state_dict().keys() == ref.state_dict().keys()
    m.load_state_dict(ref.state_dict())
    x = make((2, 16, 8, 8), torch.float32, DEVICE, "channels_last")
    assert_rel_close(m(x), ref(x.double().float()).double(), torch.float32, matmul=True)
    shared = cnnkern.nn.Conv2d.from_torch(ref, activation="relu", backend="triton")
    assert shared.weight is ref.weight and shared.bias is ref.bias
    assert_rel_close(shared(x), torch.relu(ref(x)).double(), torch.float32, matmul=True)
    assert "activation='relu'" in repr(shared)
    with pytest.raises(ValueError, match="padding_mode='reflect' is not supported"):
        cnnkern.nn.Conv2d(3, 8, 3, padding_mode="reflect")


TRITON_OK = cnnkern._backend.unavailable_reason("triton", DEVICE) is None


OPCHECK_BACKENDS = [p for p in backends_for(DEVICE, "conv2d") if p.values[0] != "torch"]


@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
@pytest.mark.parametrize("family", ["3x3s2p1", "first_7x7s2", "same_even"])
def test_opcheck(family, backend):
    x, w, b, kw = _inputs(family, torch.float32, "channels_last", requires_grad=True)
    stride, pad, dil = cnnkern._checks.conv_args(
        "t", x, w, b, kw["stride"], kw["padding"], kw["dilation"], kw["groups"]
    )
    ops = torch.ops.cnnkern
    args = (x, w, b, None, stride, pad, dil, kw["groups"], True, "ieee", backend)
    torch.library.opcheck(ops.conv2d.default, args)
    y = ops.conv2d(*args).detach()
    # with a fused residual (NCHW, where the output is channels_last: the op re-lays it out)
    res = torch.randn(y.shape, device=DEVICE, requires_grad=True)
    torch.library.opcheck(ops.conv2d.default, (x, w, b, res, *args[4:]))
    g = torch.randn_like(y)
    torch.library.opcheck(
        ops.conv2d_backward_input.default,
        (g, w.detach(), list(x.shape), stride, pad, dil, kw["groups"], True, "ieee", backend),
    )
    torch.library.opcheck(
        ops.conv2d_backward_weight.default,
        (g, x.detach(), list(w.shape), stride, pad, dil, kw["groups"], True, True, "ieee", backend),
    )


@pytest.mark.slow
@pytest.mark.skipif(not TRITON_OK, reason="Triton unavailable")
def test_torch_compile_fullgraph_resnet_block():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = cnnkern.nn.Conv2d(8, 8, 3, padding=1, activation="relu", backend="triton")
            self.conv2 = cnnkern.nn.Conv2d(8, 8, 3, padding=1, backend="triton")
            self.join = cnnkern.nn.ResidualAdd(backend="triton")

        def forward(self, x):
            return self.join(self.conv2(self.conv1(x)), x)

    torch._dynamo.reset()
    m = Block().to(DEVICE)
    x = make((2, 8, 5, 5), torch.float32, DEVICE, "channels_last")
    want = torch.relu(
        m.conv2._conv_forward(
            torch.relu(m.conv1._conv_forward(x, m.conv1.weight, m.conv1.bias)), m.conv2.weight, m.conv2.bias
        )
        + x
    )
    got = torch.compile(m, fullgraph=True)(x)
    assert_rel_close(got, want.double(), torch.float32, matmul=True)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def _t(*shape, dtype=torch.float32):
    return torch.randn(shape).to(dtype)


BAD = [
    # (input, weight, kwargs, exception, message fragment)
    (_t(1, 4, 5, 5).int(), _t(8, 4, 3, 3), {}, TypeError, "input must be a floating-point tensor"),
    (_t(4, 5), _t(8, 4, 3, 3), {}, ValueError, "input must be 4-D (N, C, H, W) or 3-D (C, H, W), got 2-D"),
    (_t(1, 4, 5, 5), _t(8, 4, 3), {}, ValueError, "weight must be 4-D, got 3-D"),
    (
        _t(1, 4, 5, 5),
        _t(8, 4, 3, 3, dtype=torch.float64),
        {},
        TypeError,
        "weight has dtype float64 but input has dtype float32",
    ),
    (_t(1, 4, 5, 5), _t(8, 3, 3, 3), {}, ValueError, "expects 3 input channels with groups=1, but input"),
    (_t(1, 4, 5, 5), _t(8, 4, 3, 3), {"bias": _t(7)}, ValueError, "bias has 7 elements but weight"),
    (_t(1, 4, 5, 5), _t(8, 4, 3, 3), {"bias": _t(8, 1)}, ValueError, "bias must be 1-D, got 2-D"),
    (_t(1, 6, 5, 5), _t(8, 2, 3, 3), {"groups": 3}, ValueError, "groups=3 must divide both"),
    (_t(1, 4, 5, 5), _t(8, 4, 3, 3), {"groups": 0}, ValueError, "groups must be a positive int, got 0"),
    (_t(1, 4, 5, 5), _t(8, 4, 3, 3), {"stride": 0}, ValueError, "stride must be positive, got 0"),
    (_t(1, 4, 5, 5), _t(8, 4, 3, 3), {"dilation": (1, -1)}, ValueError, "dilation must be positive"),
    (_t(1, 4, 5, 5), _t(8, 4, 3, 3), {"padding": -1}, ValueError, "padding must be non-negative, got -1"),
    (_t(1, 4, 5, 5), _t(8, 4, 3, 3), {"padding": (1, 2, 3)}, TypeError, "padding must be an int or a pair"),
    (_t(1, 4, 5, 5), _t(8, 4, 3, 3), {"padding": "full"}, ValueError, "padding must be an int, a pair, 'same'"),
    (
        _t(1, 4, 5, 5),
        _t(8, 4, 3, 3),
        {"padding": "same", "stride": 2},
        ValueError,
        "padding='same' is not supported for strided",
    ),
    (_t(1, 4, 2, 2), _t(8, 4, 5, 5), {}, ValueError, "is larger than the padded input (2x2"),
    (_t(1, 4, 5, 5), _t(8, 4, 3, 3), {"activation": "gelu"}, ValueError, "activation must be None or 'relu'"),
    (
        _t(1, 4, 5, 5),
        _t(8, 4, 3, 3),
        {"residual": _t(1, 8, 5, 5)},
        ValueError,
        "residual must have the output's shape (1, 8, 3, 3), got (1, 8, 5, 5)",
    ),
    (
        _t(1, 4, 5, 5),
        _t(8, 4, 3, 3),
        {"residual": _t(8, 3, 3)},
        ValueError,
        "residual must have the output's shape (1, 8, 3, 3), got (8, 3, 3)",
    ),
    (
        _t(1, 4, 5, 5),
        _t(8, 4, 3, 3),
        {"residual": _t(1, 8, 3, 3, dtype=torch.float64)},
        TypeError,
        "residual has dtype float64 but input has dtype float32",
    ),
    (_t(1, 4, 5, 5), _t(8, 4, 3, 3), {"residual": [1.0]}, TypeError, "residual must be a torch.Tensor"),
    (
        _t(1, 4, 5, 5),
        _t(8, 4, 3, 3),
        {"backend": "cuda"},
        cnnkern.BackendUnavailableError,
        "backend 'cuda' is unavailable",
    ),
]


@pytest.mark.parametrize("x,w,kwargs,exc,msg", BAD, ids=[b[-1][:40] for b in BAD])
def test_bad_input(x, w, kwargs, exc, msg):
    if kwargs.get("backend") == "cuda" and EMULATED_CUDA:
        pytest.skip("the CUDA emulator makes the cuda backend available for CPU tensors")
    with pytest.raises(exc) as info:
        F.conv2d(x, w, **kwargs)
    assert msg in str(info.value)
    assert str(info.value).startswith("conv2d:")


# ------------------------------------------------------------------------------------------------
# GPU: bf16 and TF32 against cuDNN
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_16bit_channels_last_vs_cudnn(family, dtype, backend):
    _check_grads(backend, dtype, "channels_last", family)
    x, w, b, kw = _inputs(family, dtype, "channels_last")
    torch.backends.cudnn.benchmark = True
    cudnn = torch.nn.functional.conv2d(x, w, b, **kw)
    ours = F.conv2d(x, w, b, **kw, backend=backend)
    _, _, _, ref = _ref(x, w, b, kw)
    # no worse than cuDNN's own error against float64, within a small factor
    from helpers import rel_err

    assert rel_err(ours, ref) <= 2 * rel_err(cudnn, ref) + 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("family", ["3x3s1p1", "1x1s2", "alexnet_11x11s4"])
def test_gpu_tf32_follows_cudnn_setting(family):
    x, w, b, kw = _inputs(family, torch.float32, "contiguous")
    _, _, _, ref = _ref(x, w, b, kw)
    from helpers import rel_err

    old = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        tf32 = rel_err(F.conv2d(x, w, b, **kw, backend="triton"), ref)
        assert tf32 < 3e-3
        torch.backends.cudnn.allow_tf32 = False
        ieee = rel_err(F.conv2d(x, w, b, **kw, backend="triton"), ref)
        assert ieee < 1e-5
    finally:
        torch.backends.cudnn.allow_tf32 = old


# ------------------------------------------------------------------------------------------------
# GPU: each CUDA C++ kernel pinned, on the small families and on layers large enough to take
# several tiles and pipeline stages (tails in every GEMM dimension, 16 and 8 channel multiples)
# ------------------------------------------------------------------------------------------------
GPU_LAYERS = {
    **FAMILIES,
    "resnet_3x3_c64": ((4, 64, 28, 28), 64, 3, 1, 1, 1, 1),  # 128x64 tiles (K <= 64)
    "vgg_3x3_c128": ((2, 128, 30, 30), 136, 3, 1, 1, 1, 1),  # K off the 128 tile
    "stage_entry_3x3s2": ((3, 96, 23, 23), 128, 3, 2, 1, 1, 1),  # strided gather, odd sizes
    "bottleneck_1x1": ((2, 256, 14, 14), 520, 1, 1, 0, 1, 1),  # a plain GEMM, many k-tiles
    "projection_1x1s2": ((2, 200, 15, 15), 48, 1, 2, 0, 1, 1),  # 1x1 stride 2, C = 25*8
    "googlenet_5x5": ((2, 24, 13, 13), 40, 5, 1, 2, 1, 1),  # 24 channels: chunks of 8
    "grouped_8": ((2, 64, 12, 12), 64, 3, 1, 1, 1, 4),  # 16 channels per group
    "dilated_big": ((1, 32, 20, 20), 32, 3, 1, 3, 3, 1),
    # the strided grad-input phase by phase: a stride larger than the filter (a phase no tap
    # reaches), a 5x5 filter whose phases take 3 or 2 taps, a stride of (2, 1)
    "stride3_k2": ((2, 16, 10, 11), 24, 2, 3, 0, 1, 1),
    "stride2_5x5": ((2, 24, 12, 9), 16, 5, 2, 2, 1, 1),
    "stride2x1": ((1, 16, 9, 8), 16, 3, (2, 1), 1, 1, 1),
}


_BAD_ENV_CALL = """
import torch, cnnkern
x, w = torch.randn(1, 2, 4, 4), torch.randn(2, 2, 3, 3)
print(cnnkern.functional.conv2d(x, w, backend="torch").shape)  # the reference: no kernel, no error
cnnkern.functional.conv2d(x, w, backend="triton")
"""


def test_cuda_conv_algo_env_is_checked():
    """CNNKERN_CUDA_CONV_ALGO pins the CUDA kernel for a process; a wrong name is an error at the
    first convolution on a kernel backend, never at import."""
    import subprocess
    import sys

    env = dict(os.environ, CNNKERN_CUDA_CONV_ALGO="mma", TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _BAD_ENV_CALL], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "torch.Size([1, 2, 2, 2])" in r.stdout, r.stderr
    assert "CNNKERN_CUDA_CONV_ALGO must be one of auto, direct, igemm, wgmma, tune, got 'mma'" in r.stderr
    env["CNNKERN_CUDA_CONV_ALGO"] = "igemm"
    r = subprocess.run(
        [sys.executable, "-c", "import cnnkern.ops.conv2d as c; print(c.CUDA_ALGO)"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and r.stdout.strip() == "igemm", r.stderr


def test_conv_split_k_env(monkeypatch):
    """CNNKERN_CONV_SPLIT_K=off turns split-K off for a process in both backends (a wrong value is
    an error at the first convolution on a kernel backend); with "auto" a layer of one tile and a
    long reduction splits on the interpreter's 4 SMs, forward and grad-input (the split sum runs),
    and with "off" it does not."""
    import subprocess
    import sys

    env = dict(os.environ, CNNKERN_CONV_SPLIT_K="no", TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _BAD_ENV_CALL], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "torch.Size([1, 2, 2, 2])" in r.stdout, r.stderr
    assert "CNNKERN_CONV_SPLIT_K must be 'auto' or 'off', got 'no'" in r.stderr
    env["CNNKERN_CONV_SPLIT_K"] = "off"
    r = subprocess.run(
        [sys.executable, "-c", "import cnnkern.ops.conv2d as c; print(c.CUDA_SPLIT_K, c.TRITON_SPLITS)"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and r.stdout.split() == ["1", "1"], r.stderr
    if cnnkern._backend.unavailable_reason("triton", DEVICE):
        return
    from cnnkern.kernels import conv2d as kc

    sums = []
    real = kc._fwd_split_sum_kernel

    class Recorder:
        def __getitem__(self, grid):
            sums.append(grid)
            return real[grid]

    monkeypatch.setattr(kc, "_fwd_split_sum_kernel", Recorder())
    x = make((1, 64, 2, 2), torch.float32, DEVICE, "channels_last", requires_grad=True)
    w = make((64, 64, 3, 3), torch.float32, DEVICE) / 24
    for setting, want in ((None, 2), (1, 0)):
        sums.clear()
        monkeypatch.setattr(cnnkern.ops.conv2d, "TRITON_SPLITS", setting)
        with ieee_fp32():
            y = F.conv2d(x, w, padding=1, backend="triton")
            (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        assert len(sums) == want, (setting, sums)
        ref = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
        assert_rel_close(y, ref, torch.float32)


def _raw_cuda(x, w, b, kw, relu, algo, tf32=False, residual=None, split_k=1, tile=-1):
    """The CUDA ops called directly with a pinned algorithm: forward (plus ``residual``, a
    function of the output's shape and layout that returns it, or None) and grad-input into
    NaN-filled outputs (every element must be written); ``split_k``: the implicit GEMM's
    (1: unsplit, the epilogue in the kernel; 0: the op's own choice); ``tile``: its tile (-1: the
    op's choice)."""
    stride, pad, dil = cnnkern._checks.conv_args(
        "t", x, w, b, kw["stride"], kw["padding"], kw["dilation"], kw["groups"]
    )
    shape = cnnkern.ops.conv2d.output_size(x.shape, w.shape, stride, pad, dil)
    fmt = (
        torch.channels_last
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        else torch.contiguous_format
    )
    y = torch.full(shape, float("nan"), dtype=x.dtype, device=x.device).contiguous(memory_format=fmt)
    res = residual(shape, fmt) if residual is not None else None
    cuda_ops().conv2d_forward_cuda(
        x, w, b, y, stride, pad[:2], dil, kw["groups"], relu, algo, False, tf32, res, split_k, tile
    )
    if residual is not None:
        return y, res
    g = torch.randn_like(y)
    gx = torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device).contiguous(memory_format=fmt)
    cuda_ops().conv2d_backward_input_cuda(g, w, gx, stride, pad[:2], dil, kw["groups"], algo, tf32, split_k, tile)
    return y, g, gx


@cuda_kernel_test
@pytest.mark.parametrize("algo", ["direct", "igemm", "wgmma"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("layer", list(GPU_LAYERS))
def test_gpu_cuda_kernels_pinned(layer, layout, dtype, algo):
    xs, k, ks, stride, pad, dil, groups = GPU_LAYERS[layer]
    ks = (ks, ks) if isinstance(ks, int) else ks
    cg = xs[1] // groups  # (channels per group off whole 16-byte chunks run zero-padded)
    if algo == "wgmma" and not wgmma_here(dtype):
        pytest.skip("wgmma: a compute capability 9.0 GPU (or the emulator) only")
    tf32 = dtype == torch.float32 and algo != "direct"  # fp32 runs on the tensor cores only as TF32
    x = make(xs, dtype, DEVICE, layout)
    w = make((k, cg, *ks), dtype, DEVICE) * (cg * ks[0] * ks[1]) ** -0.5
    b = torch.randn(k, dtype=dtype, device=DEVICE)
    kw = dict(stride=stride, padding=pad, dilation=dil, groups=groups)
    with ieee_fp32():
        y, g, gx = _raw_cuda(x, w, b, kw, relu=True, algo=algo, tf32=tf32)
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = torch.nn.functional.conv2d(xr, wr, br, **kw)
    (rgx,) = torch.autograd.grad(ref, xr, g.double())
    assert not torch.isnan(y).any() and not torch.isnan(gx).any()
    if tf32:  # TF32 keeps 10 mantissa bits: the same bound as the Triton TF32 test
        from helpers import rel_err

        assert rel_err(y, ref.relu()) < 3e-3 and rel_err(gx, rgx) < 3e-3
        return
    assert_rel_close(y, ref.relu(), dtype, matmul=True)
    assert_rel_close(gx, rgx, dtype, "grad input", matmul=True)


@cuda_kernel_test
@pytest.mark.parametrize("algo", ["igemm", "wgmma"])
@pytest.mark.parametrize("tile", [0, 1, 2], ids=["128x128", "64x128", "128x64"])
@pytest.mark.parametrize("layer", ["vgg_3x3_c128", "stage_entry_3x3s2", "grouped_8"])
def test_gpu_cuda_tiles_pinned(layer, tile, algo):
    """Each tile of the tensor-core kernels pinned (the candidates of CNNKERN_CUDA_CONV_ALGO=tune),
    forward with bias and ReLU and grad-input (phase by phase for the strided layer), on layers
    whose own choice is another tile: tails in rows and columns, groups; bf16 channels_last."""
    xs, k, ks, stride, pad, dil, groups = GPU_LAYERS[layer]
    dtype = torch.bfloat16
    if algo == "wgmma" and not wgmma_here(dtype):
        pytest.skip("wgmma: a compute capability 9.0 GPU (or the emulator) only")
    x = make(xs, dtype, DEVICE, "channels_last")
    w = make((k, xs[1] // groups, ks, ks), dtype, DEVICE) * (xs[1] // groups * ks * ks) ** -0.5
    b = torch.randn(k, dtype=dtype, device=DEVICE)
    kw = dict(stride=stride, padding=pad, dilation=dil, groups=groups)
    y, g, gx = _raw_cuda(x, w, b, kw, relu=True, algo=algo, tile=tile)
    xr = x.detach().double().requires_grad_()
    ref = torch.nn.functional.conv2d(xr, w.double(), b.double(), **kw)
    (rgx,) = torch.autograd.grad(ref, xr, g.double())
    assert_rel_close(y, ref.relu(), dtype, matmul=True)
    assert_rel_close(gx, rgx, dtype, "grad input", matmul=True)


@cuda_kernel_test
@pytest.mark.parametrize("algo", ["direct", "igemm", "wgmma"])
@pytest.mark.parametrize("layer", ["resnet_3x3_c64", "stage_entry_3x3s2", "grouped_8", "odd_3x3"])
def test_gpu_cuda_wgrad_splits_pinned(layer, algo):
    """The grad-weight with its pixel splits pinned (the candidates of CNNKERN_CUDA_CONV_ALGO=tune):
    one, a few that do not divide the pixels, and more splits than pixels; the weight and bias
    gradients against float64, and each split count as the kernels count it (the _splits query)."""
    xs, k, ks, stride, pad, dil, groups = GPU_LAYERS[layer]
    dtype = torch.float32 if algo == "direct" else torch.bfloat16
    if algo == "wgmma" and not wgmma_here(dtype):
        pytest.skip("wgmma: a compute capability 9.0 GPU (or the emulator) only")
    x = make(xs, dtype, DEVICE, "channels_last")
    w = make((k, xs[1] // groups, ks, ks), dtype, DEVICE)
    kw = dict(stride=stride, padding=pad, dilation=dil, groups=groups)
    xr, wr = x.double(), w.double().requires_grad_()
    br = torch.zeros(k, dtype=torch.float64, device=DEVICE, requires_grad=True)
    ref = torch.nn.functional.conv2d(xr, wr, br, **kw)
    g = torch.randn(ref.shape, dtype=dtype, device=DEVICE).contiguous(memory_format=torch.channels_last)
    rgw, rgb = torch.autograd.grad(ref, (wr, br), g.double())
    pixels = ref.shape[0] * ref.shape[2] * ref.shape[3]
    geom = ([stride] * 2, [pad] * 2, [dil] * 2, groups)
    chosen = cuda_ops().conv2d_backward_weight_splits_cuda(g, x, w, *geom, algo)
    assert 1 <= chosen <= pixels
    blocks = {}  # split count -> blocks launched (the emulator counts them)
    for splits in (1, 3, 7, chosen, pixels + 5):
        count = cuda_ops().conv2d_backward_weight_splits_cuda(g, x, w, *geom, algo, False, splits)
        assert count == min(splits, pixels) or (splits not in (1, pixels + 5) and count < splits), (splits, count)
        gw, gb = torch.full_like(w, float("nan")), torch.full((k,), float("nan"), dtype=dtype, device=DEVICE)
        if EMULATED_CUDA:
            cuda_ops().cuemu_stats()
        cuda_ops().conv2d_backward_weight_cuda(g, x, gw, gb, *geom, algo, False, splits)
        if EMULATED_CUDA:
            blocks[count] = cuda_ops().cuemu_stats()[6]
        assert_rel_close(gw, rgw, dtype, f"grad weight, {splits} splits", matmul=True)
        assert_rel_close(gb, rgb, dtype, f"grad bias, {splits} splits", matmul=True)
    if EMULATED_CUDA:  # the same tiles once per split (the reduction and the bias gradient do not depend on it)
        per_split = (blocks[pixels] - blocks[1]) / (pixels - 1)
        assert per_split >= groups and per_split == int(per_split), blocks
        assert all(b - blocks[1] == per_split * (n - 1) for n, b in blocks.items()), blocks
    for op in ("conv2d_backward_weight_cuda", "conv2d_backward_weight_splits_cuda"):
        args = (
            (g, x, w, torch.empty(0, dtype=dtype, device=DEVICE)) if op == "conv2d_backward_weight_cuda" else (g, x, w)
        )
        with pytest.raises(RuntimeError, match=r"splits must be >= 0 \(0: choose\), got -1"):
            getattr(cuda_ops(), op)(*args, *geom, algo, False, -1)


# ------------------------------------------------------------------------------------------------
# CNNKERN_CUDA_CONV_ALGO=tune: the fastest kernel, tile and split setting per layer
# ------------------------------------------------------------------------------------------------
def _tuned_layer(dtype=torch.bfloat16):
    x = make((2, 32, 9, 9), dtype, DEVICE, "channels_last", requires_grad=True)
    w = (make((40, 32, 3, 3), dtype, DEVICE) / 17).requires_grad_()
    b = torch.randn(40, dtype=dtype, device=DEVICE, requires_grad=True)
    return x, w, b, dict(stride=2, padding=1)


def _fwd_bwd(x, w, b, kw, g=None):
    y = F.conv2d(x, w, b, **kw, backend="cuda")
    g = torch.randn_like(y) if g is None else g
    return (y, *torch.autograd.grad(y, (x, w, b), g)), g


@pytest.fixture
def tuning(monkeypatch):
    """CNNKERN_CUDA_CONV_ALGO=tune for one test, starting from no choices."""
    from cnnkern.ops import conv2d as C

    monkeypatch.setattr(C, "CUDA_ALGO", "tune")
    monkeypatch.setattr(C, "TUNER", cnnkern.ops._tune.Tuner("test"))
    return C.TUNER


@cuda_kernel_test
def test_cuda_tune_keeps_the_fastest(tuning, monkeypatch):
    """The first call of a layer times each candidate (here with made-up times, in the order of the
    candidate list) for the forward, grad-input and grad-weight, and returns the winner's result:
    the same bits as that configuration pinned; later calls launch the winners without timing."""
    from cnnkern.ops import _tune
    from cnnkern.ops import conv2d as C

    x, w, b, kw = _tuned_layer()
    gemm = C._gemm_candidates(x, False, 2 * 5 * 5)
    algos = ["direct", "igemm"] + (["wgmma"] if wgmma_here(x.dtype) else [])
    assert gemm[0] == ("direct", 0, -1) and len(gemm) == 1 + 6 * (len(algos) - 1)
    assert {a for a, _, _ in gemm} == set(algos) and {t for _, _, t in gemm[1:]} == {0, 1, 2}
    wgrad = C._wgrad_candidates(
        torch.empty(2, 40, 5, 5, dtype=x.dtype, device=DEVICE), x, w, [2, 2], [1, 1], [1, 1], 1, False
    )
    assert [a for a, _ in wgrad] == [a for a in algos for _ in range(2)]  # (50 pixels: 1 split chosen, or 2)
    assert {n for _, n in wgrad} == {1, 2}
    want = {"fwd": gemm[2], "dgrad": gemm[-1], "wgrad": ("igemm", 2)}  # (not the last timed of the forward)
    times = iter(
        [1.0 - 0.5 * (c == want["fwd"]) for c in gemm]
        + [1.0 - 0.5 * (c == want["dgrad"]) for c in gemm]
        + [1.0 - 0.5 * (c == want["wgrad"]) for c in wgrad]
    )
    calls = []

    def fake_measure(run, device):  # nothing runs while timing: the result is the winner's own launch
        calls.append(device)
        return next(times)

    monkeypatch.setattr(_tune, "measure", fake_measure)
    (y, gx, gw, gb), g = _fwd_bwd(x, w, b, kw)
    assert len(calls) == 2 * len(gemm) + len(wgrad) and next(times, None) is None
    assert sorted(tuning.choices.values(), key=str) == sorted(want.values(), key=str)
    assert {k[0]: v for k, v in tuning.choices.items()} == want
    assert all(min(t, key=t.get) == tuning.choices[k] for k, t in tuning.timings.items())
    # the pinned configurations give the same bits
    stride, pad, dil = [2, 2], [1, 1], [1, 1]
    y_pin = torch.empty_like(y)
    cuda_ops().conv2d_forward_cuda(
        x, w, b, y_pin, stride, pad, dil, 1, False, want["fwd"][0], False, False, None, *want["fwd"][1:]
    )
    gx_pin = torch.empty_like(x)
    cuda_ops().conv2d_backward_input_cuda(
        g, w, gx_pin, stride, pad, dil, 1, want["dgrad"][0], False, *want["dgrad"][1:]
    )
    gw_pin, gb_pin = torch.empty_like(w), torch.empty_like(b)
    cuda_ops().conv2d_backward_weight_cuda(g, x, gw_pin, gb_pin, stride, pad, dil, 1, "igemm", False, 2)
    for got, pinned in ((y, y_pin), (gx, gx_pin), (gw, gw_pin), (gb, gb_pin)):
        assert torch.equal(got, pinned)
    xr, wr, br, ref = _ref(x, w, b, kw)
    assert_rel_close(y, ref, x.dtype, matmul=True)
    for got, r, what in zip((gx, gw, gb), torch.autograd.grad(ref, (xr, wr, br), g.double()), ("x", "w", "b")):
        assert_rel_close(got, r, x.dtype, f"grad {what}", matmul=True)

    def no_timing(run, device):
        raise AssertionError("a known layer was timed again")

    monkeypatch.setattr(_tune, "measure", no_timing)
    again, _ = _fwd_bwd(x, w, b, kw, g)
    assert all(torch.equal(a, b_) for a, b_ in zip(again, (y, gx, gw, gb)))
    # another layer (another batch size) is a new key
    monkeypatch.setattr(_tune, "measure", fake_measure)
    times = iter([1.0] * 100)
    _fwd_bwd(x[:1].detach().requires_grad_(), w, b, kw)
    assert len(tuning.choices) == 6


@cuda_kernel_test
def test_cuda_tune_skips_a_candidate_out_of_memory(tuning, monkeypatch):
    """A candidate that runs out of memory while timed is left out (the others still race); when
    every one does, the error is raised and nothing is kept."""
    from cnnkern.ops import _tune

    x, w, b, kw = _tuned_layer()
    seen = []

    def measure(run, device):
        seen.append(device)
        if len(seen) % 2:  # every other candidate "runs out of memory", the first among them
            raise torch.OutOfMemoryError("test")
        return float(len(seen))

    monkeypatch.setattr(_tune, "measure", measure)
    y = F.conv2d(x.detach(), w.detach(), b.detach(), **kw, backend="cuda")
    ((key, choice),) = tuning.choices.items()
    times = tuning.timings[key]
    assert len(times) == len(seen) // 2 and choice == min(times, key=times.get)
    assert not torch.isnan(y).any()

    def out_of_memory(run, device):
        raise torch.OutOfMemoryError("test")

    monkeypatch.setattr(_tune, "measure", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match="every candidate ran out of memory"):
        F.conv2d(x[:1].detach(), w.detach(), b.detach(), **kw, backend="cuda")
    assert len(tuning.choices) == 1


@cuda_kernel_test
def test_cuda_tune_times_on_this_device(tuning):
    """With the real timer (CUDA events on a GPU, the host clock on the emulator): every candidate
    gets a time, the fastest is kept, and the conv-BN-ReLU's training forward (BatchNorm statistics
    in the epilogue) is tuned as its own layer with the same results as "auto" within rounding."""
    x, w, b, kw = _tuned_layer()
    (y, gx, gw, gb), g = _fwd_bwd(x, w, b, kw)
    assert len(tuning.timings) == 3
    for key, t in tuning.timings.items():
        assert all(v > 0 for v in t.values()) and tuning.choices[key] == min(t, key=t.get), (key, t)
    args = (
        torch.zeros(40, device=DEVICE),
        torch.ones(40, device=DEVICE),
        torch.ones(40, device=DEVICE),
        torch.zeros(40, device=DEVICE),
    )
    out = F.conv_bn_relu(x.detach(), w.detach(), None, *[a.clone() for a in args], training=True, **kw, backend="cuda")
    assert [k[-3:] for k in tuning.choices if k[0] == "fwd"] == [(False, False, False), (False, True, False)]
    cnnkern.ops.conv2d.CUDA_ALGO = "auto"
    want = F.conv_bn_relu(x.detach(), w.detach(), None, *[a.clone() for a in args], training=True, **kw, backend="cuda")
    assert_rel_close(out, want, x.dtype, matmul=True)


@cuda_kernel_test
def test_cuda_tune_is_off_under_deterministic_algorithms(tuning, monkeypatch):
    """Deterministic algorithms: the kernels "auto" chooses (the same on every run), nothing timed
    or kept; a layer with one candidate (the forward and grad-input of fp32 without TF32: the
    direct kernel) is not timed."""
    from cnnkern.ops import _tune

    def no_timing(run, device):
        raise AssertionError("timed")

    monkeypatch.setattr(_tune, "measure", no_timing)
    x, w, b, kw = _tuned_layer()
    torch.use_deterministic_algorithms(True)
    try:
        (y, *_), g = _fwd_bwd(x, w, b, kw)
    finally:
        torch.use_deterministic_algorithms(False)
    assert not tuning.choices
    y_auto = torch.empty_like(y)
    cuda_ops().conv2d_forward_cuda(x, w, b, y_auto, [2, 2], [1, 1], [1, 1], 1, False, "auto")
    assert torch.equal(y, y_auto)
    x, w, b, kw = _tuned_layer(torch.float32)
    with ieee_fp32():
        y = F.conv2d(x.detach(), w.detach(), b.detach(), **kw, backend="cuda")
        torch.autograd.grad(F.conv2d(x, w.detach(), b.detach(), **kw, backend="cuda"), x, torch.randn_like(y))
    assert list(tuning.choices.values()) == [("direct", 0, -1)] * 2 and not tuning.timings


# CNNKERN_TUNE_CACHE: the tuned choices in a file that later processes start from
def _cache_tuner(path, build="build a"):
    from cnnkern.ops import _tune

    return _tune.Tuner("test", _tune.TuneCache(str(path), lambda: {"extension": build}))


_KEY = ("fwd", ((2, 32, 9, 9), (2592, 1, 288, 32), torch.bfloat16, torch.device("cpu"), True), None, (2, 2), True)
_CANDIDATES = [("direct", 0, -1), ("igemm", 0, 1), ("igemm", 1, 2), ("wgmma", 0, 0)]


def _race(tuner, monkeypatch, times, key=_KEY, candidates=_CANDIDATES):
    """tuner.run on made-up times (None: timing is an error); returns (launched choices, times taken)."""
    from cnnkern.ops import _tune

    taken, launched = [], []

    def fake_measure(run, device):
        if times is None:
            raise AssertionError("timed")
        run()
        taken.append(times[len(taken)])
        return taken[-1]

    monkeypatch.setattr(_tune, "measure", fake_measure)
    tuner.run(key, lambda: list(candidates), launched.append, ("auto", 0, -1), torch.device("cpu"))
    return launched, taken


def test_tune_cache_is_read_by_a_later_process(tmp_path, monkeypatch):
    """A choice timed by one tuner is written to the file; a new tuner on that file (a later
    process) launches it without timing, the tuple choice read back as a tuple; a new key is still
    timed, and added to the file beside the first."""
    path = tmp_path / "sub" / "tune.json"  # (the folder is made)
    launched, _ = _race(_cache_tuner(path), monkeypatch, [3.0, 1.0, 2.0, 4.0])
    assert launched == _CANDIDATES + [("igemm", 0, 1)]
    later = _cache_tuner(path)
    launched, _ = _race(later, monkeypatch, None)
    assert launched == [("igemm", 0, 1)] and later.choices == {_KEY: ("igemm", 0, 1)} and not later.timings
    other = (*_KEY[:-1], False)
    launched, taken = _race(later, monkeypatch, [1.0, 2.0, 3.0, 0.5], key=other)
    assert launched[-1] == ("wgmma", 0, 0) and len(taken) == 4
    data = json.loads(path.read_text())
    assert data["format"] == 1 and data["fingerprint"] == {"extension": "build a"}
    entries = data["tuners"]["test"]
    assert sorted(e["choice"] for e in entries.values()) == [["igemm", 0, 1], ["wgmma", 0, 0]]
    assert all(len(e["ms"]) == 4 for e in entries.values())
    assert '"cpu"' in next(iter(entries)) and "torch.bfloat16" in next(iter(entries))  # (devices as their kind)


def test_tune_cache_of_another_build_or_candidate_set_is_not_used(tmp_path, monkeypatch):
    """A file written by another build is ignored (timed anew) and replaced; a recorded choice that
    is no longer a candidate is timed anew and replaced; under deterministic algorithms the file is
    not used (the default runs, as without it)."""
    path = tmp_path / "tune.json"
    _race(_cache_tuner(path, "old build"), monkeypatch, [3.0, 1.0, 2.0, 4.0])
    launched, taken = _race(_cache_tuner(path, "new build"), monkeypatch, [1.0, 3.0, 2.0, 4.0])
    assert launched[-1] == ("direct", 0, -1) and len(taken) == 4
    data = json.loads(path.read_text())
    assert data["fingerprint"] == {"extension": "new build"}
    assert [e["choice"] for e in data["tuners"]["test"].values()] == [["direct", 0, -1]]
    fewer = [c for c in _CANDIDATES if c[0] != "direct"]  # (the recorded choice is gone)
    launched, taken = _race(_cache_tuner(path, "new build"), monkeypatch, [5.0, 1.0, 6.0], candidates=fewer)
    assert launched[-1] == ("igemm", 1, 2) and len(taken) == 3
    torch.use_deterministic_algorithms(True)
    try:
        launched, _ = _race(_cache_tuner(path, "new build"), monkeypatch, None, candidates=fewer)
    finally:
        torch.use_deterministic_algorithms(False)
    assert launched == [("auto", 0, -1)]


def test_tune_cache_that_cannot_be_read_or_written_warns(tmp_path, monkeypatch):
    """A damaged file is a warning naming the variable and the file; tuning goes on and the first
    store replaces it with a valid one. A path that can be neither read nor written is one warning,
    not one per layer; the choices are still kept in the process."""
    path = tmp_path / "tune.json"
    path.write_text("{not json")
    tuner = _cache_tuner(path)
    with pytest.warns(RuntimeWarning, match=f"CNNKERN_TUNE_CACHE={path}: cannot read it"):
        launched, _ = _race(tuner, monkeypatch, [3.0, 1.0, 2.0, 4.0])
    assert launched[-1] == ("igemm", 0, 1)
    assert json.loads(path.read_text())["tuners"]["test"]
    blocked = tmp_path / "a file"
    blocked.write_text("")
    tuner = _cache_tuner(blocked / "tune.json")  # (its folder is a file)
    with pytest.warns(RuntimeWarning, match="cannot read it") as seen:
        _race(tuner, monkeypatch, [3.0, 1.0, 2.0, 4.0])
        _race(tuner, monkeypatch, [3.0, 1.0, 2.0, 0.5], key=(*_KEY[:-1], False))
    assert len([w for w in seen if "CNNKERN_TUNE_CACHE" in str(w.message)]) == 1
    assert list(tuner.choices.values()) == [("igemm", 0, 1), ("wgmma", 0, 0)]


_WRITER = """
import os, sys, time, torch
from cnnkern.ops import _tune
path, first, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tuner = _tune.Tuner("test", _tune.TuneCache(path, lambda: {"extension": "x"}))
_tune.measure = lambda run, device: 1.0
open(go + str(first), "w").close()
while not os.path.exists(go):  # (both start storing together)
    time.sleep(0.001)
for i in range(first, first + 150):
    tuner.run(("layer", i), lambda: ["a", "b"], lambda c: None, "a", torch.device("cpu"))
"""


def test_tune_cache_keeps_what_concurrent_processes_write(tmp_path):
    """Two processes adding choices to one file at the same time (benchmark workers) lose none of
    them (each store re-reads the file under a lock)."""
    import subprocess
    import sys
    import time

    path, go = tmp_path / "tune.json", tmp_path / "go"
    starts = (0, 1000)
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(s), str(go)]) for s in starts]
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"go{s}").exists() for s in starts) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "a writer failed to start"
        time.sleep(0.01)
    go.touch()
    assert all(p.wait(timeout=300) == 0 for p in procs)
    keys = json.loads(path.read_text())["tuners"]["test"]
    assert sorted(json.loads(k)[1] for k in keys) == [i + s for s in starts for i in range(150)]


@cuda_kernel_test
def test_cuda_tune_cache_gives_the_same_kernels_later(tuning, tmp_path, monkeypatch):
    """The conv's forward, grad-input and grad-weight tuned with a cache file: a later tuner (a new
    process) on the file times nothing and returns the same bits."""
    from cnnkern.ops import _tune
    from cnnkern.ops import conv2d as C

    path = str(tmp_path / "tune.json")
    monkeypatch.setattr(C, "TUNER", _tune.Tuner("conv", _tune.TuneCache(path, C._build_fingerprint)))
    x, w, b, kw = _tuned_layer()
    first, g = _fwd_bwd(x, w, b, kw)
    chosen = dict(C.TUNER.choices)
    assert len(chosen) == 3 and set(json.loads(open(path).read())["tuners"]["conv"]) == set(map(_tune._text, chosen))

    def no_timing(run, device):
        raise AssertionError("a recorded layer was timed")

    monkeypatch.setattr(_tune, "measure", no_timing)
    monkeypatch.setattr(C, "TUNER", _tune.Tuner("conv", _tune.TuneCache(path, C._build_fingerprint)))
    again, _ = _fwd_bwd(x, w, b, kw, g)
    assert C.TUNER.choices == chosen
    assert all(torch.equal(a, b_) for a, b_ in zip(again, first))


@cuda_kernel_test
@pytest.mark.parametrize("op", ["forward", "backward_input"])
def test_cuda_tile_argument_is_checked(op):
    """A tile outside -1..2, or a tile pinned for a call that runs the direct kernel, is an error
    that names the argument, before anything runs."""
    x = make((1, 16, 6, 6), torch.float16, DEVICE, "channels_last")
    w = make((16, 16, 3, 3), torch.float16, DEVICE)
    y = torch.empty(1, 16, 4, 4, dtype=torch.float16, device=DEVICE).contiguous(memory_format=torch.channels_last)
    geom = ([1, 1], [0, 0], [1, 1], 1)

    def call(algo, tile):
        if op == "forward":
            cuda_ops().conv2d_forward_cuda(x, w, None, y, *geom, False, algo, False, False, None, 1, tile)
        else:
            cuda_ops().conv2d_backward_input_cuda(y, w, x, *geom, algo, False, 1, tile)

    with pytest.raises(
        RuntimeError,
        match=r"tile must be -1 \(chosen by the layer's size\), 0 \(128x128\), "
        r"1 \(64x128\) or 2 \(128x64\), got 3",
    ):
        call("igemm", 3)
    with pytest.raises(
        RuntimeError, match="tile=0 pins a tile of the tensor-core kernels, but this call runs the direct kernel"
    ):
        call("direct", 0)
    call("igemm", 2)  # (a valid pin runs)


@cuda_kernel_test
@pytest.mark.parametrize("algo", ["direct", "igemm", "wgmma"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "misaligned"])
@pytest.mark.parametrize("layer", ["3x3s1p1", "resnet_3x3_c64", "bottleneck_1x1", "grouped_8"])
def test_gpu_cuda_kernels_pinned_residual(layer, layout, dtype, algo):
    """The residual in each kernel's epilogue: the staged 16-byte stores (channels_last), the
    per-pair stores (NCHW, and a residual that does not start on 16 bytes, which turns the staged
    stores off), added before the ReLU, in every output element (NaN-poisoned)."""
    xs, k, ks, stride, pad, dil, groups = GPU_LAYERS[layer]
    if algo == "wgmma" and not wgmma_here(dtype):
        pytest.skip("wgmma: a compute capability 9.0 GPU (or the emulator) only")
    tf32 = dtype == torch.float32 and algo != "direct"
    x = make(xs, dtype, DEVICE, "contiguous" if layout == "contiguous" else "channels_last")
    w = make((k, xs[1] // groups, ks, ks), dtype, DEVICE) * (xs[1] // groups * ks * ks) ** -0.5
    b = torch.randn(k, dtype=dtype, device=DEVICE)
    kw = dict(stride=stride, padding=pad, dilation=dil, groups=groups)

    def residual(shape, fmt):
        r = make(tuple(shape), dtype, DEVICE).contiguous(memory_format=fmt)
        if layout == "misaligned":  # the same strides, one element past a 16-byte boundary
            buf = torch.empty(r.numel() + 1, dtype=dtype, device=DEVICE)
            r = buf[1:].as_strided(r.shape, r.stride()).copy_(r)
        return r

    with ieee_fp32():
        y, r = _raw_cuda(x, w, b, kw, relu=True, algo=algo, tf32=tf32, residual=residual)
    ref = (torch.nn.functional.conv2d(x.double(), w.double(), b.double(), **kw) + r.double()).relu()
    assert not torch.isnan(y).any()
    if tf32:
        from helpers import rel_err

        assert rel_err(y, ref) < 3e-3
        return
    assert_rel_close(y, ref, dtype, matmul=True)


SPLIT_LAYERS = {  # few output tiles, long reductions: where split-K applies
    "last_stage_3x3": ((1, 64, 7, 7), 72, 3, 1, 1, 1, 1),  # 49 rows, K = 72: a column tail
    "stride2_3x3": ((1, 32, 9, 9), 40, 3, 2, 1, 1, 1),  # strided gather; phased grad-input
    "grouped": ((1, 32, 6, 6), 32, 3, 1, 1, 1, 2),  # splits x groups blocks in z
    "first_3ch_7x7s2": ((1, 3, 15, 15), 16, 7, 2, 3, 1, 1),  # zero-padded channels, split
}


@cuda_kernel_test
@pytest.mark.parametrize("algo", ["igemm", "wgmma"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("layer", list(SPLIT_LAYERS))
def test_gpu_cuda_split_k(layer, dtype, algo):
    """The implicit GEMM with its reduction split (forward and grad-input): every split's fp32
    partials summed in order by the reduction kernel, which adds bias and residual and applies the
    ReLU; NCHW and channels_last outputs, into NaN-poisoned outputs, against float64 and against
    the unsplit kernel (which differs only in the order of the fp32 sums); split_k beyond the
    reduction's steps is capped (every split has work)."""
    if algo == "wgmma" and not wgmma_here(dtype):
        pytest.skip("wgmma: a compute capability 9.0 GPU (or the emulator) only")
    from helpers import rel_err

    xs, k, ks, stride, pad, dil, groups = SPLIT_LAYERS[layer]
    tf32 = dtype == torch.float32
    kw = dict(stride=stride, padding=pad, dilation=dil, groups=groups)
    for layout, split_k in (("channels_last", 3), ("contiguous", 2), ("channels_last", 1000)):
        x = make(xs, dtype, DEVICE, layout)
        w = make((k, xs[1] // groups, ks, ks), dtype, DEVICE) * (xs[1] // groups * ks * ks) ** -0.5
        b = torch.randn(k, dtype=dtype, device=DEVICE)
        with ieee_fp32():
            y, g, gx = _raw_cuda(x, w, b, kw, relu=True, algo=algo, tf32=tf32, split_k=split_k)
            y1, _, _ = _raw_cuda(x, w, b, kw, relu=True, algo=algo, tf32=tf32, split_k=1)
            yr, r = _raw_cuda(
                x,
                w,
                b,
                kw,
                relu=True,
                algo=algo,
                tf32=tf32,
                split_k=split_k,
                residual=lambda shape, fmt: make(tuple(shape), dtype, DEVICE).contiguous(memory_format=fmt),
            )
        xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
        ref = torch.nn.functional.conv2d(xr, wr, br, **kw)
        (rgx,) = torch.autograd.grad(ref, xr, g.double())
        assert not (y.isnan().any() or gx.isnan().any() or yr.isnan().any()), (layout, split_k)
        bound = 3e-3 if tf32 else 2e-2 if dtype == torch.bfloat16 else 3e-3
        for got, want, what in (
            (y, ref.relu(), "output"),
            (gx, rgx, "grad input"),
            (yr, (ref + r.double()).relu(), "output + residual"),
        ):
            assert rel_err(got, want) < bound, (layout, split_k, what, rel_err(got, want))
        assert rel_err(y, y1) < bound / 4, (layout, split_k, rel_err(y, y1))


@cuda_kernel_test
def test_gpu_cuda_split_k_refusals():
    xs, k, ks, stride, pad, dil, groups = SPLIT_LAYERS["last_stage_3x3"]
    x = make(xs, torch.float16, DEVICE, "channels_last")
    w = make((k, xs[1], ks, ks), torch.float16, DEVICE)
    y = torch.empty(1, k, 7, 7, dtype=torch.float16, device=DEVICE).contiguous(memory_format=torch.channels_last)
    args = (x, w, None, y, [1, 1], [1, 1], [1, 1], 1, False, "igemm")
    with pytest.raises(RuntimeError, match="split_k must be >= 0"):
        cuda_ops().conv2d_forward_cuda(*args, False, False, None, -1)


@cuda_kernel_test
@pytest.mark.parametrize("algo", ["igemm", "wgmma"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layer", list(SPLIT_LAYERS))
def test_gpu_cuda_split_k_statistics(layer, dtype, algo):
    """Split-K with the BatchNorm statistics (the training-mode conv-BN-ReLU's forward): the
    reduction kernel takes count, mean and M2 per channel from the summed fp32 values (bias
    added) over the unsplit tile's row blocks, so its statistics rows are those of the unsplit
    epilogue (equal up to the order of the fp32 GEMM sums) and merge to the float64 reference's;
    the output is written whole (NaN-poisoned)."""
    if algo == "wgmma" and not wgmma_here(dtype):
        pytest.skip("wgmma: a compute capability 9.0 GPU (or the emulator) only")
    from helpers import rel_err

    xs, k, ks, stride, pad, dil, groups = SPLIT_LAYERS[layer]
    kw = dict(stride=stride, padding=pad, dilation=dil, groups=groups)
    x = make(xs, dtype, DEVICE, "channels_last")
    w = make((k, xs[1] // groups, ks, ks), dtype, DEVICE) * (xs[1] // groups * ks * ks) ** -0.5
    b = torch.randn(k, dtype=dtype, device=DEVICE)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), **kw)
    rows = ref.numel() // k
    want = ref.transpose(0, 1).reshape(k, rows)
    bound = 3e-3 if dtype == torch.float32 else 2e-2
    got = {}
    for split_k in (1, 3):
        y = torch.full(ref.shape, float("nan"), dtype=dtype, device=DEVICE).contiguous(
            memory_format=torch.channels_last
        )
        with ieee_fp32():
            st = cuda_ops().conv2d_forward_cuda(
                x,
                w,
                b,
                y,
                [stride] * 2,
                [pad] * 2,
                [dil] * 2,
                groups,
                False,
                algo,
                True,
                dtype == torch.float32,
                None,
                split_k,
            )
        assert not y.isnan().any(), split_k
        assert rel_err(y, ref) < bound, (split_k, rel_err(y, ref))
        cnt, mu, var = merge_stats(st)
        assert cnt.eq(rows).all(), (split_k, cnt)
        assert rel_err(mu, want.mean(1)) < bound, (split_k, rel_err(mu, want.mean(1)))
        assert rel_err(var, want.var(1, unbiased=False)) < bound, (split_k, rel_err(var, want.var(1, unbiased=False)))
        got[split_k] = st
    assert got[1].shape == got[3].shape and torch.equal(got[1][:, 0], got[3][:, 0])
    assert rel_err(got[3][:, 1:], got[1][:, 1:]) < 1e-5, rel_err(got[3][:, 1:], got[1][:, 1:])


@cuda_kernel_test
def test_gpu_cuda_pinned_kernel_refuses_what_it_cannot_run():
    xs, k, ks, stride, pad, dil, groups = GPU_LAYERS["resnet_3x3_c64"]
    kw = dict(stride=stride, padding=pad, dilation=dil, groups=groups)
    x = make(xs, torch.float32, DEVICE, "channels_last")
    w = make((k, xs[1], ks, ks), torch.float32, DEVICE)
    for algo in ("igemm", "wgmma"):  # fp32 on the tensor cores: only as TF32
        with pytest.raises(RuntimeError, match=f"algo='{algo}' needs fp16/bf16 \\(or fp32 with tf32=True\\)"):
            _raw_cuda(x, w, None, kw, relu=False, algo=algo, tf32=False)
    with pytest.raises(RuntimeError, match="algo must be 'auto', 'direct', 'igemm' or 'wgmma', got 'fast'"):
        _raw_cuda(x, w, None, kw, relu=False, algo="fast")
    if not wgmma_here(torch.float16):
        with pytest.raises(RuntimeError, match="algo='wgmma' needs a compute capability 9.0 GPU"):
            _raw_cuda(x.half(), w.half(), None, kw, relu=False, algo="wgmma")
    # the grad-weight kernel: the same names, the same refusals
    y = torch.empty(xs[0], k, xs[2], xs[3], device=DEVICE).contiguous(memory_format=torch.channels_last)
    args = (y, x, torch.empty_like(w), torch.empty(0, device=DEVICE), [stride] * 2, [pad] * 2, [dil] * 2, groups)
    with pytest.raises(RuntimeError, match="algo must be 'auto', 'direct', 'igemm' or 'wgmma', got 'fast'"):
        cuda_ops().conv2d_backward_weight_cuda(*args, "fast")
    with pytest.raises(RuntimeError, match="algo='igemm' \\(the tensor-core grad-weight\\) needs fp16/bf16"):
        cuda_ops().conv2d_backward_weight_cuda(*args, "igemm")  # fp32 without tf32
    with pytest.raises(RuntimeError, match="algo='wgmma' \\(the tensor-core grad-weight\\) needs fp16/bf16"):
        cuda_ops().conv2d_backward_weight_cuda(
            y.double(), x.double(), torch.empty_like(w).double(), *args[3:], "wgmma", True
        )  # fp64


@cuda_kernel_test
@pytest.mark.parametrize("layer", ["resnet_3x3_c64", "stage_entry_3x3s2"])
def test_gpu_cuda_tf32_wgmma_rounds_like_mma_sync(layer):
    """TF32 on wgmma reads its operands from shared memory, where the kernel rounds them to tf32
    (to nearest) as the mma.sync kernel rounds them in registers: the two agree far more closely
    than TF32 agrees with fp32 (operands truncated to tf32 instead would differ by ~5e-4)."""
    if not wgmma_here(torch.float32):
        pytest.skip("wgmma: a compute capability 9.0 GPU (or the emulator) only")
    from helpers import rel_err

    xs, k, ks, stride, pad, dil, groups = GPU_LAYERS[layer]
    kw = dict(stride=stride, padding=pad, dilation=dil, groups=groups)
    x = make(xs, torch.float32, DEVICE, "channels_last")
    w = make((k, xs[1] // groups, ks, ks), torch.float32, DEVICE) * (xs[1] * ks * ks) ** -0.5
    y_w, g, gx_w = _raw_cuda(x, w, None, kw, relu=False, algo="wgmma", tf32=True)
    y_i, _, _ = _raw_cuda(x, w, None, kw, relu=False, algo="igemm", tf32=True)
    gx_i = torch.full_like(gx_w, float("nan"))
    stride2, pad2, dil2 = cnnkern._checks.conv_args("t", x, w, None, stride, pad, dil, groups)
    cuda_ops().conv2d_backward_input_cuda(g, w, gx_i, stride2, pad2[:2], dil2, groups, "igemm", True)
    assert rel_err(y_w, y_i) < 1e-5 and rel_err(gx_w, gx_i) < 1e-5, (rel_err(y_w, y_i), rel_err(gx_w, gx_i))
    ref = torch.nn.functional.conv2d(x.double(), w.double(), **kw)
    assert 1e-5 < rel_err(y_w, ref) < 3e-3  # TF32, not fp32


@pytest.mark.gpu
@pytest.mark.emulated
@pytest.mark.skipif(not EMULATED_CUDA, reason="the emulated device's compute capability is set by CUEMU_CC")
def test_emulated_sm80_has_no_wgmma(monkeypatch):
    monkeypatch.setenv("CUEMU_CC", "80")
    xs, k, ks, stride, pad, dil, groups = GPU_LAYERS["resnet_3x3_c64"]
    kw = dict(stride=stride, padding=pad, dilation=dil, groups=groups)
    x = make(xs, torch.float16, DEVICE, "channels_last")
    w = make((k, xs[1], ks, ks), torch.float16, DEVICE)
    with pytest.raises(RuntimeError, match="algo='wgmma' needs a compute capability 9.0 GPU"):
        _raw_cuda(x, w, None, kw, relu=False, algo="wgmma")
    y, _, _ = _raw_cuda(x, w, None, kw, relu=False, algo="auto")  # auto: mma.sync there
    assert_rel_close(y, torch.nn.functional.conv2d(x.double(), w.double(), **kw), torch.float16, matmul=True)


@cuda_kernel_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layer", ["vgg_3x3_c128", "stage_entry_3x3s2", "grouped_8", "first_7x7s2"])
def test_gpu_cuda_weight_grad_is_bitwise_reproducible(layer, dtype):
    xs, k, ks, stride, pad, dil, groups = GPU_LAYERS[layer]
    x = make(xs, dtype, DEVICE, "channels_last", requires_grad=True)
    w = make((k, xs[1] // groups, ks, ks), dtype, DEVICE, requires_grad=True)
    b = torch.randn(k, dtype=dtype, device=DEVICE, requires_grad=True)
    kw = dict(stride=stride, padding=pad, dilation=dil, groups=groups)
    out = F.conv2d(x, w, b, **kw, backend="cuda")
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, (w, b), g, retain_graph=True)
    for _ in range(3):
        again = torch.autograd.grad(out, (w, b), g, retain_graph=True)
        assert all(torch.equal(a, c) for a, c in zip(first, again))
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    rgw, rgb = torch.autograd.grad(torch.nn.functional.conv2d(xr, wr, br, **kw), (wr, br), g.double())
    assert_rel_close(first[0], rgw, dtype, "grad weight", matmul=True)
    assert_rel_close(first[1], rgb, dtype, "grad bias", matmul=True)


# the tensor-core grad-weight's edges: o and j tiles with tails (64 x 128 tiles), taps of one
# channel chunk, strided and dilated gathers, groups, split slices that end mid-step
WGRAD_TC_LAYERS = {
    "tails_3x3": ((2, 24, 9, 9), 40, 3, 1, 1, 1, 1),  # K = 40 < 64, J = 216 = 128 + 88
    "projection_1x1s2": ((2, 64, 7, 7), 72, 1, 2, 0, 1, 1),  # K = 72 = 64 + 8
    "dilated": ((1, 16, 10, 10), 8, 3, 1, 2, 2, 1),
    "groups2": ((2, 32, 6, 6), 16, 3, 2, 1, 1, 2),  # 16 in, 8 out per group
    "first_big": ((1, 8, 33, 33), 16, 7, 2, 3, 1, 1),  # many pixels per split
    "long_split": ((2, 8, 40, 40), 8, 3, 1, 1, 1, 1),  # 400 pixels a split: every stage refilled
    # channels per group off whole 16-byte chunks: run zero-padded (3 -> 8 or 4; 19 -> 24 or 20)
    "first_3ch_7x7s2": ((2, 3, 15, 13), 16, 7, 2, 3, 1, 1),
    "odd_channels": ((1, 17, 9, 7), 19, 3, 1, 1, 1, 1),
    "groups_padded": ((2, 12, 6, 6), 6, 3, 1, 1, 1, 2),  # 6 in, 3 out per group ("auto": SIMT)
}


@cuda_kernel_test
@pytest.mark.parametrize("algo", ["auto", "igemm", "wgmma"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("layer", list(WGRAD_TC_LAYERS))
def test_gpu_cuda_tensor_core_weight_grad(layer, dtype, algo):
    """fp16/bf16 grad-weight runs on a tensor-core kernel (pinned: mma.sync, wgmma; "auto": wgmma
    on sm_90), fp32 with tf32=True on mma.sync (wgmma has no transposed tf32 operands, so pinning
    it is an error); NCHW inputs are copied to channels_last for them. Against float64, into
    NaN-poisoned outputs."""
    tf32 = dtype == torch.float32
    if algo == "wgmma" and not wgmma_here(torch.float16):
        pytest.skip("wgmma: a compute capability 9.0 GPU (or the emulator) only")
    xs, k, ks, stride, pad, dil, groups = WGRAD_TC_LAYERS[layer]
    w_shape = (k, xs[1] // groups, ks, ks)
    stride2, pad2, dil2 = [stride] * 2, [pad] * 2, [dil] * 2
    chunk = 4 if tf32 else 8
    # "auto" does not pad a grouped layer: the SIMT kernel, fp32 in full even with tf32=True
    simt = algo == "auto" and groups > 1 and bool(w_shape[1] % chunk or (k // groups) % chunk)
    for layout in ("channels_last", "contiguous"):
        x = make(xs, dtype, DEVICE, layout)
        shape = cnnkern.ops.conv2d.output_size(x.shape, w_shape, stride2, [pad] * 4, dil2)
        g = make(tuple(shape), dtype, DEVICE, layout)
        gw = torch.full(w_shape, float("nan"), dtype=dtype, device=DEVICE)
        gb = torch.full((k,), float("nan"), dtype=dtype, device=DEVICE)
        if tf32 and algo == "wgmma":
            with pytest.raises(RuntimeError, match="algo='wgmma' has no TF32 grad-weight"):
                cuda_ops().conv2d_backward_weight_cuda(g, x, gw, gb, stride2, pad2, dil2, groups, algo, True)
            return
        cuda_ops().conv2d_backward_weight_cuda(g, x, gw, gb, stride2, pad2, dil2, groups, algo, tf32)
        ref = torch.nn.grad.conv2d_weight(x.double(), w_shape, g.double(), stride, pad, dil, groups)
        if tf32 and not simt:  # TF32 keeps 10 mantissa bits; the bias gradient is an exact fp32 sum
            from helpers import rel_err

            assert not torch.isnan(gw).any() and 1e-6 < rel_err(gw, ref) < 3e-3, (layout, rel_err(gw, ref))
            assert_rel_close(gb, g.double().sum((0, 2, 3)), dtype, f"grad bias ({layout})", matmul=True)
            continue
        assert_rel_close(gw, ref, dtype, f"grad weight ({layout})", matmul=True)
        assert_rel_close(gb, g.double().sum((0, 2, 3)), dtype, f"grad bias ({layout})", matmul=True)


@cuda_kernel_test
@pytest.mark.parametrize("layer", ["tails_3x3", "groups2"])
def test_gpu_cuda_tf32_weight_grad_is_the_rounding_only(layer):
    """The TF32 grad-weight rounds both operands to tf32 and accumulates in fp32: on operands that
    are tf32 values already it agrees with float64 to fp32 accuracy, so the ~1e-3 error of the
    test above is the operand rounding and nothing else (a misplaced fragment word would be off by
    far more)."""
    from helpers import rel_err

    xs, k, ks, stride, pad, dil, groups = WGRAD_TC_LAYERS[layer]
    w_shape = (k, xs[1] // groups, ks, ks)

    def tf32_values(t):  # the 13 low mantissa bits cleared: exactly representable in tf32
        return (t.view(torch.int32) & ~0x1FFF).view(torch.float32)

    x = tf32_values(make(xs, torch.float32, DEVICE, "channels_last"))
    shape = cnnkern.ops.conv2d.output_size(x.shape, w_shape, [stride] * 2, [pad] * 4, [dil] * 2)
    g = tf32_values(make(tuple(shape), torch.float32, DEVICE, "channels_last"))
    gw = torch.full(w_shape, float("nan"), device=DEVICE)
    cuda_ops().conv2d_backward_weight_cuda(
        g, x, gw, torch.empty(0, device=DEVICE), [stride] * 2, [pad] * 2, [dil] * 2, groups, "igemm", True
    )
    ref = torch.nn.grad.conv2d_weight(x.double(), w_shape, g.double(), stride, pad, dil, groups)
    assert rel_err(gw, ref) < 1e-5, rel_err(gw, ref)
