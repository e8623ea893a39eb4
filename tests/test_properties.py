"""Property-based tests (hypothesis): random shapes, strides, paddings, dilations, groups, layouts
and dtypes for every op, forward and gradients against the float64 PyTorch reference.

Kept small and bounded so the file runs in well under 90 s on a 2-core CPU machine under Triton's
interpreter. The "cnnkern" hypothesis profile is reproducible (derandomize=True: the examples are
a function of the test alone; no example database), so a CI failure fails the same way on a
developer's machine, and print_blob=True prints the ``@reproduce_failure`` line to replay it.
``CNNKERN_FUZZ=N`` runs N random (not derandomized) examples per test instead, for a longer search.

bf16 is GPU-only (the interpreter computes it wrongly); on a CPU machine the dtypes are fp32, fp64
and fp16.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from helpers import (
    DEVICE,
    EMULATED_CUDA,
    HAS_CUDA,
    REL_TOL,
    as_close_as_pytorch_limit,
    assert_as_close_as_pytorch,
    assert_rel_close,
    backends_for,
    cuda_kernel_test,
    ieee_fp32,
    make,
    merge_stats,
    tol,
    wgmma_here,
)

from cnnkern import _checks, reference
from cnnkern import functional as F
from cnnkern.ops._common import cuda_ops

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, event, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# CNNKERN_FUZZ=N: a longer, random search for a developer's machine: N examples per test, drawn
# afresh each run (the failure still prints the blob that replays it)
FUZZ = int(os.environ.get("CNNKERN_FUZZ", "0"))
settings.register_profile(
    "cnnkern",
    deadline=None,  # the interpreter's first call of a kernel compiles nothing but is slow
    derandomize=FUZZ == 0,  # examples depend only on the test: reproducible in CI
    database=None,  # no example database: nothing persists between runs
    print_blob=True,  # a failure prints @reproduce_failure(...) to replay it exactly
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile("cnnkern")


def _examples(n: int) -> int:
    """n examples per test, or CNNKERN_FUZZ's number."""
    return FUZZ if FUZZ > 0 else n


# Each example seeds torch's generator with a drawn seed, so its random tensors are part of the
# example: hypothesis replays (and shrinks) a failure on the same values.
SEEDS = st.integers(0, 2**31 - 1)

DTYPES = [torch.float32, torch.float64, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
LAYOUTS = ["contiguous", "channels_last", "strided"]


def _gpu_backends(op):
    """triton (and cuda where it has a kernel for op and runs here): the kernels under test."""
    return [p for p in backends_for(DEVICE, op) if p.values[0] != "torch"]


def _make(shape, dtype, layout, requires_grad=True):
    """helpers.make, except that a "strided" tensor too small to be non-contiguous (one element
    per image) is made contiguous."""
    if layout == "strided" and shape[1] * shape[2] * shape[3] <= 1:
        layout = "contiguous"
    return make(shape, dtype, DEVICE, layout, requires_grad=requires_grad)


def _grads(out, inputs, g):
    got = torch.autograd.grad(out, [t for t in inputs if t is not None], g)
    it = iter(got)
    return [next(it) if t is not None else None for t in inputs]


# ------------------------------------------------------------------------------------------------
# conv2d
# ------------------------------------------------------------------------------------------------
@st.composite
def conv_configs(draw, max_groups=3, max_c=3):
    groups = draw(st.integers(1, max_groups))
    c = groups * draw(st.integers(1, max_c))
    k = groups * draw(st.integers(1, 3))
    r, s = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    same = stride == (1, 1) and draw(st.booleans())
    padding = "same" if same else (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    pad = (0, 0) if same else padding
    # smallest input the kernel fits in, plus a little
    h = max(1, dilation[0] * (r - 1) + 1 - 2 * pad[0]) + draw(st.integers(0, 4))
    w = max(1, dilation[1] * (s - 1) + 1 - 2 * pad[1]) + draw(st.integers(0, 4))
    n = draw(st.integers(1, 2))
    return dict(
        x=(n, c, h, w), w=(k, c // groups, r, s), stride=stride, padding=padding, dilation=dilation, groups=groups
    )


@pytest.mark.parametrize("backend", _gpu_backends("conv2d"))
@settings(PROFILE, max_examples=_examples(40))
@given(
    cfg=conv_configs(),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    has_bias=st.booleans(),
    relu=st.booleans(),
    seed=SEEDS,
)
def test_conv2d(backend, cfg, dtype, layout, has_bias, relu, seed):
    torch.manual_seed(seed)
    x = _make(cfg["x"], dtype, layout)
    w = make(
        cfg["w"], dtype, DEVICE, "channels_last" if layout == "channels_last" else "contiguous", requires_grad=True
    )
    b = torch.randn(cfg["w"][0], dtype=dtype, device=DEVICE, requires_grad=True) if has_bias else None
    kw = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=cfg["groups"])
    act = "relu" if relu else None
    with ieee_fp32():  # TF32 would flip near-zero ReLU mask elements on a GPU (helpers.ieee_fp32)
        out = F.conv2d(x, w, b, activation=act, backend=backend, **kw)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    br = b.detach().double().requires_grad_() if b is not None else None
    ref = reference.conv2d(xr, wr, br, activation=act, **kw)
    assert out.dtype == dtype
    g = torch.randn_like(ref).to(dtype)
    with ieee_fp32():
        got = _grads(out, (x, w, b), g)
    want = _grads(ref, (xr, wr, br), g.double())
    limits = _conv_limits(x, w, b, None, g, kw, dtype, _conv_tol(dtype), (ref, *want))
    assert_rel_close(out, ref, dtype, "output", limit=limits[0])
    for name, a, r, lim in zip(("grad input", "grad weight", "grad bias"), got, want, limits[1:]):
        if r is not None:
            assert a.dtype == dtype
            assert_rel_close(a, r, dtype, name, limit=lim)


def _conv_tol(dtype):
    return tol(dtype, matmul=True)


def _conv_limits(x, w, b, res, g, kw, dtype, base, refs, tf32=False):
    """Relative error limits for a convolution's (output, grad input, grad weight, grad bias)
    against the float64 ``refs`` (None where not computed): ``base`` for the output and twice it
    for the gradients, or a worst-case rounding bound where that is larger, as it is where a sum
    of few terms nearly cancels: each result is a sum of n terms in the accumulation type, off by
    at most n u times the sum of their absolute values (u: its unit roundoff), and under TF32
    each product also by 2^-9 of its magnitude (both operands keep 10 mantissa bits). The sums of
    absolute values are the same convolution, with ``|b|`` and ``|res|`` (a residual added in the
    epilogue), and its gradients for ``|g|`` in absolute values."""
    ya, gxa, gwa = _abs_conv(x, w, kw, g.double().abs())
    ya = (
        ya
        + (0 if b is None else b.detach().double().abs().view(1, -1, 1, 1))
        + (0 if res is None else res.double().abs())
    )
    k, cg, r, s = w.shape
    n_, _, p, q = ya.shape
    u = _unit_roundoff(dtype)
    per = 2.0**-9 if tf32 else 0.0
    terms = (cg * r * s + 2, k // kw["groups"] * r * s, n_ * p * q, n_ * p * q)
    bounds = (ya, gxa, gwa, g.double().abs().sum((0, 2, 3)))
    out = []
    for i, (n, bd, ref) in enumerate(zip(terms, bounds, refs)):
        lim = base if i == 0 else 2 * base
        if ref is not None:
            worst = (n * u + (per if i < 3 else 0.0)) * float(bd.norm()) / (float(ref.detach().norm()) or 1.0)
            lim = max(lim, worst)
        out.append(lim)
    return out


# Split-K (forward with bias, residual, ReLU or the BatchNorm statistics, and grad-input) forced
# on random layers: the op picks it only for layers of few tiles and long reductions, which
# random small layers rarely are (up to 40 channels per group here, so that the reductions have
# steps to split). Triton through its launchers; CUDA C++ through the raw ops, on the implicit
# GEMM pinned (16-bit: channels zero-padded where needed).
SPLIT_BACKENDS = [p for p in _gpu_backends("conv2d") if p.values[0] in ("triton", "cuda")]  # (with their skips)
SPLIT_DTYPES = {
    "triton": [torch.float32, torch.float64],
    "cuda": [torch.float16] + ([torch.bfloat16] if HAS_CUDA else []),
}


def _split_conv(
    backend, x, w, b, y, stride, pad, dil, groups, relu, stats, res, splits, algo="igemm", tf32=False, tile=-1
):
    """y = the split forward (returns the statistics rows, or None); CUDA: on the kernel ``algo``
    with ``tile`` (-1: the op's choice)."""
    if backend == "triton":
        from cnnkern.kernels import conv2d as kc

        st_ = (
            torch.zeros(
                kc.stats_rows(y.numel() // y.shape[1]),
                3,
                y.shape[1],
                dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                device=DEVICE,
            )
            if stats
            else None
        )
        kc.conv2d_forward(x, w, b, y, stride, pad, dil, groups, relu, "ieee", stats=st_, residual=res, splits=splits)
        return st_
    st_ = cuda_ops().conv2d_forward_cuda(
        x, w, b, y, list(stride), list(pad), list(dil), groups, relu, algo, stats, tf32, res, splits, tile
    )
    return st_ if stats else None


def _split_dgrad(backend, g, w, gx, stride, pad, dil, groups, splits, algo="igemm", tf32=False, tile=-1):
    if backend == "triton":
        from cnnkern.kernels import conv2d as kc

        kc.conv2d_backward_input(g, w, gx, stride, pad, dil, groups, "ieee", splits=splits)
    else:
        cuda_ops().conv2d_backward_input_cuda(
            g, w, gx, list(stride), list(pad), list(dil), groups, algo, tf32, splits, tile
        )


@pytest.mark.parametrize("backend", SPLIT_BACKENDS)
@settings(PROFILE, max_examples=_examples(25))
@given(
    cfg=conv_configs(max_c=40),
    data=st.data(),
    layout=st.sampled_from(["contiguous", "channels_last"]),
    splits=st.integers(2, 9),
    mode=st.sampled_from(["relu", "residual", "stats"]),
    has_bias=st.booleans(),
    seed=SEEDS,
)
def test_conv2d_split_k(backend, cfg, data, layout, splits, mode, has_bias, seed):
    torch.manual_seed(seed)
    dtype = data.draw(st.sampled_from(SPLIT_DTYPES[backend]), label="dtype")
    x = _make(cfg["x"], dtype, layout, requires_grad=False)
    w = make(cfg["w"], dtype, DEVICE, requires_grad=False) * (cfg["w"][1] * cfg["w"][2] * cfg["w"][3]) ** -0.5
    b = torch.randn(cfg["w"][0], dtype=dtype, device=DEVICE) if has_bias else None
    stride, pad, dil = _checks.conv_args("t", x, w, b, cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"])
    kw = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=cfg["groups"])
    ref = reference.conv2d(x.double(), w.double(), None if b is None else b.double(), **kw)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    y = torch.full(ref.shape, float("nan"), dtype=dtype, device=DEVICE).contiguous(memory_format=fmt)
    res = (
        torch.randn(ref.shape, dtype=dtype, device=DEVICE).contiguous(memory_format=fmt) if mode == "residual" else None
    )
    st_ = _split_conv(
        backend, x, w, b, y, stride, pad[:2], dil, cfg["groups"], mode != "stats", mode == "stats", res, splits
    )
    want = ref if res is None else ref + res.double()
    assert_rel_close(y, want if mode == "stats" else want.relu(), dtype, "output", matmul=True)
    if mode == "stats":
        cnt, mean, var = merge_stats(st_)
        assert cnt.eq(ref.numel() // ref.shape[1]).all()
        assert_rel_close(mean, ref.mean((0, 2, 3)), dtype, "mean", matmul=True)
        assert_rel_close(var, ref.var((0, 2, 3), unbiased=False), dtype, "variance", matmul=True)
    g = torch.randn(ref.shape, dtype=dtype, device=DEVICE).contiguous(memory_format=fmt)
    xr = x.double().requires_grad_()
    (gwant,) = torch.autograd.grad(reference.conv2d(xr, w.double(), None, **kw), xr, g.double())
    gx = torch.full_like(x, float("nan"))
    _split_dgrad(backend, g, w, gx, stride, pad[:2], dil, cfg["groups"], splits)
    assert_rel_close(gx, gwant, dtype, "grad input", matmul=True)


# The CUDA C++ tensor-core kernels pinned on random layers (the op's "auto" sends small random
# layers to the direct kernel): the implicit GEMM on mma.sync or wgmma for the forward (bias,
# ReLU, residual) and grad-input, unsplit or split as the op would choose, on the tile the op
# would choose or on one pinned (as CNNKERN_CUDA_CONV_ALGO=tune pins each), and the tensor-core
# grad-weight with the bias gradient, its pixel splits as it chooses or pinned (one, three, more
# than there are pixels); fp16/bf16, or fp32 as TF32; channels per group up to 40, zero-padded
# where they are not whole 16-byte chunks.
TC_DTYPES = [torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


@cuda_kernel_test
@settings(PROFILE, max_examples=_examples(25))
@given(
    cfg=conv_configs(max_groups=2, max_c=40),
    data=st.data(),
    layout=st.sampled_from(["contiguous", "channels_last"]),
    algo=st.sampled_from(["igemm", "wgmma"]),
    tf32=st.booleans(),
    split=st.sampled_from([0, 1]),
    tile=st.sampled_from([-1, 0, 1, 2]),
    wgrad_splits=st.sampled_from([0, 1, 3, 1 << 20]),
    has_bias=st.booleans(),
    mode=st.sampled_from(["relu", "residual", "stats"]),
    seed=SEEDS,
)
def test_conv2d_cuda_tensor_cores(cfg, data, layout, algo, tf32, split, tile, wgrad_splits, has_bias, mode, seed):
    torch.manual_seed(seed)
    dtype = torch.float32 if tf32 else data.draw(st.sampled_from(TC_DTYPES), label="dtype")
    if algo == "wgmma" and not wgmma_here(dtype):
        algo = "igemm"
    limit = REL_TOL["tf32"] if tf32 else tol(dtype, matmul=True)
    if EMULATED_CUDA:
        cuda_ops().cuemu_stats()  # (reset: the emulator counts the tensor-core operations)
    x = _make(cfg["x"], dtype, layout, requires_grad=False)
    w = make(cfg["w"], dtype, DEVICE, requires_grad=False) * (cfg["w"][1] * cfg["w"][2] * cfg["w"][3]) ** -0.5
    b = torch.randn(cfg["w"][0], dtype=dtype, device=DEVICE) if has_bias else None
    groups = cfg["groups"]
    stride, pad, dil = _checks.conv_args("t", x, w, b, cfg["stride"], cfg["padding"], cfg["dilation"], groups)
    kw = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=groups)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    br = None if b is None else b.double().requires_grad_()
    ref = reference.conv2d(xr, wr, br, **kw)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    y = torch.full(ref.shape, float("nan"), dtype=dtype, device=DEVICE).contiguous(memory_format=fmt)
    res = (
        torch.randn(ref.shape, dtype=dtype, device=DEVICE).contiguous(memory_format=fmt) if mode == "residual" else None
    )
    st_ = _split_conv(
        "cuda", x, w, b, y, stride, pad[:2], dil, groups, mode != "stats", mode == "stats", res, split, algo, tf32, tile
    )
    g = torch.randn(ref.shape, dtype=dtype, device=DEVICE).contiguous(memory_format=fmt)
    gxr, gwr, *gbr = torch.autograd.grad(ref, [t for t in (xr, wr, br) if t is not None], g.double())
    want = ref.detach() + (0 if res is None else res.double())
    want = want if mode == "stats" else want.relu()
    limits = _conv_limits(x, w, b, res, g, kw, dtype, limit, (want, gxr, gwr, gbr[0] if gbr else None), tf32)
    assert_rel_close(y, want, dtype, "output", limit=limits[0])
    if mode == "stats":  # the epilogue's per-channel (count, mean, M2), from the fp32 accumulators
        cnt, mean, var = merge_stats(st_)
        assert cnt.eq(want.numel() // want.shape[1]).all()
        dims = (0, 2, 3)
        mlim, vlim = limit, limit
        if tf32:  # (the mean moves by at most the mean of the bound, the variance by 2 mean(|y - mean| bound))
            ya = 2.0**-9 * _abs_conv(x, w, kw)
            mlim = max(limit, float(ya.mean(dims).norm()) / (float(want.mean(dims).norm()) or 1.0))
            dev = (want - want.mean(dims, keepdim=True)).abs()
            vlim = max(
                limit, 2 * float((dev * ya).mean(dims).norm()) / (float(want.var(dims, unbiased=False).norm()) or 1.0)
            )
        assert_rel_close(mean, want.mean(dims), dtype, "mean", limit=mlim)
        assert_rel_close(var, want.var(dims, unbiased=False), dtype, "variance", limit=vlim)
    gx = torch.full_like(x, float("nan"))
    _split_dgrad("cuda", g, w, gx, stride, pad[:2], dil, groups, split, algo, tf32, tile)
    assert_rel_close(gx, gxr, dtype, "grad input", limit=limits[1])
    if EMULATED_CUDA:  # forward and grad-input ran on the pinned kernel's tensor cores, and only there
        mma, wgmma = cuda_ops().cuemu_stats()[2:4]
        assert (wgmma > 0) == (algo == "wgmma") and (mma > 0) == (algo == "igemm"), (algo, tf32, mma, wgmma)
    gw = torch.full_like(w, float("nan"))
    gb = torch.full_like(b, float("nan")) if b is not None else torch.empty(0, dtype=dtype, device=DEVICE)
    cuda_ops().conv2d_backward_weight_cuda(
        g, x, gw, gb, list(stride), list(pad[:2]), list(dil), groups, "igemm" if tf32 else algo, tf32, wgrad_splits
    )
    assert_rel_close(gw, gwr, dtype, "grad weight", limit=limits[2])
    if b is not None:  # (an fp32 sum of the gradient, also with TF32)
        assert_rel_close(gb, gbr[0], dtype, "grad bias", limit=limits[3])
    if EMULATED_CUDA:  # so did the grad-weight (TF32: on mma.sync)
        mma, wgmma = cuda_ops().cuemu_stats()[2:4]
        wgrad_wgmma = algo == "wgmma" and not tf32
        assert (wgmma > 0) == wgrad_wgmma and (mma > 0) == (not wgrad_wgmma), (algo, tf32, mma, wgmma)


# CNNKERN_CUDA_CONV_ALGO=tune on random layers, through the op and its autograd: the tuner runs
# every candidate configuration of the forward, grad-input and grad-weight (each must run, the
# padded ones included), and the kept one's results must be right.
@cuda_kernel_test
@settings(PROFILE, max_examples=_examples(12))
@given(
    cfg=conv_configs(max_groups=3, max_c=20),
    data=st.data(),
    layout=st.sampled_from(LAYOUTS),
    tf32=st.booleans(),
    has_bias=st.booleans(),
    relu=st.booleans(),
    seed=SEEDS,
)
def test_conv2d_cuda_tuned(cfg, data, layout, tf32, has_bias, relu, seed):
    from cnnkern.ops import _tune
    from cnnkern.ops import conv2d as C

    torch.manual_seed(seed)
    dtype = torch.float32 if tf32 else data.draw(st.sampled_from(TC_DTYPES), label="dtype")
    relu = relu and not tf32  # (a TF32 rounding that flips a mask element is not a kernel error)
    x = _make(cfg["x"], dtype, layout)
    w = (make(cfg["w"], dtype, DEVICE) * (cfg["w"][1] * cfg["w"][2] * cfg["w"][3]) ** -0.5).requires_grad_()
    b = torch.randn(cfg["w"][0], dtype=dtype, device=DEVICE, requires_grad=True) if has_bias else None
    groups = cfg["groups"]
    stride, pad, dil = _checks.conv_args("t", x, w, b, cfg["stride"], cfg["padding"], cfg["dilation"], groups)
    kw = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=groups)
    saved = C.CUDA_ALGO, C.TUNER
    C.CUDA_ALGO, C.TUNER = "tune", _tune.Tuner("property test")
    try:
        out = C.conv2d(
            x, w, b, None, list(stride), list(pad), list(dil), groups, relu, "tf32" if tf32 else "ieee", "cuda"
        )
        g = torch.randn_like(out)
        got = _grads(out, (x, w, b), g)
        kinds = {key[0] for key in C.TUNER.choices}
    finally:
        C.CUDA_ALGO, C.TUNER = saved
    assert kinds == {"fwd", "dgrad", "wgrad"}
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    br = b.detach().double().requires_grad_() if b is not None else None
    ref = reference.conv2d(xr, wr, br, activation="relu" if relu else None, **kw)
    want = _grads(ref, (xr, wr, br), g.double())
    base = REL_TOL["tf32"] if tf32 else tol(dtype, matmul=True)
    limits = _conv_limits(x, w, b, None, g, kw, dtype, base, (ref, *want), tf32)
    assert_rel_close(out, ref, dtype, "output", limit=limits[0])
    for name, a, r, lim in zip(("grad input", "grad weight", "grad bias"), got, want, limits[1:]):
        if r is not None:
            assert_rel_close(a, r, dtype, name, limit=lim)


def _abs_conv(x, w, kw, g=None):
    """conv2d(|x|, |w|) in float64; with ``g`` (non-negative, the output's shape) also its input
    and weight gradients for g: the sums of absolute values that bound a convolution's rounding."""
    xa, wa = x.detach().double().abs(), w.detach().double().abs()
    if g is None:
        return reference.conv2d(xa, wa, None, **kw)
    xa, wa = xa.requires_grad_(), wa.requires_grad_()
    ya = reference.conv2d(xa, wa, None, **kw)
    return (ya.detach(), *torch.autograd.grad(ya, (xa, wa), g))


def _unit_roundoff(dtype):
    """The unit roundoff of the accumulation type: fp64 for fp64, fp32 for the rest."""
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


# ------------------------------------------------------------------------------------------------
# conv_bn_relu (training: batch statistics, running-statistics update; eval: folded BatchNorm)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _gpu_backends("conv_bn_relu"))
@settings(PROFILE, max_examples=_examples(30))
@given(
    cfg=conv_configs(max_groups=2),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    layout=st.sampled_from(LAYOUTS),
    training=st.booleans(),
    relu=st.booleans(),
    has_bias=st.booleans(),
    seed=SEEDS,
)
# (the layer on which torch 2.14.1's oneDNN convolution segfaults: see _eager_conv)
@example(
    cfg=dict(x=(1, 4, 7, 1), w=(6, 2, 3, 1), stride=(1, 2), padding=(1, 1), dilation=(2, 2), groups=2),
    dtype=torch.float32,
    layout="channels_last",
    training=False,
    relu=False,
    has_bias=True,
    seed=2170,
)
def test_conv_bn_relu(backend, cfg, dtype, layout, training, relu, has_bias, seed):
    torch.manual_seed(seed)
    k = cfg["w"][0]
    x = _make(cfg["x"], dtype, layout)
    w = make(cfg["w"], dtype, DEVICE, requires_grad=True)
    b = torch.randn(k, dtype=dtype, device=DEVICE, requires_grad=True) if has_bias else None
    gamma = torch.empty(k, dtype=dtype, device=DEVICE).uniform_(0.5, 1.5).requires_grad_()
    beta = torch.empty(k, dtype=dtype, device=DEVICE).uniform_(-0.5, 0.5).requires_grad_()
    rm = torch.empty(k, dtype=dtype, device=DEVICE).uniform_(-0.2, 0.2)
    rv = torch.empty(k, dtype=dtype, device=DEVICE).uniform_(0.5, 1.5)
    kw = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=cfg["groups"])
    p, q = reference.conv2d(torch.empty(cfg["x"], device="meta"), torch.empty(cfg["w"], device="meta"), **kw).shape[2:]
    if training and cfg["x"][0] * p * q < 2:
        return  # PyTorch's rule: one value per channel cannot be normalised (tested in test_validation)
    if training:
        # A channel whose convolution output is constant (every tap it reads is padding) has zero
        # variance: BatchNorm then multiplies the rounding noise of its mean by 1/sqrt(eps), and no
        # relative error means anything (the finalize kernels form the mean as a weighted
        # average of tile means, not exact for identical values as PyTorch's is).
        yr = torch.nn.functional.conv2d(x.detach().double(), w.detach().double(), None, **kw)
        assume(bool((yr.var(dim=(0, 2, 3), unbiased=False) > 1e-6 * (1 + yr.pow(2).mean(dim=(0, 2, 3)))).all()))
    leaves = (x, w, b, gamma, beta)
    refs = [t.detach().double().requires_grad_() if t is not None else None for t in leaves]
    eagers = [t.detach().clone().requires_grad_() if t is not None else None for t in leaves]
    rm_r, rv_r, rm_e, rv_e = rm.double(), rv.double(), rm.clone(), rv.clone()
    y64 = reference.conv2d(x.detach().double(), w.detach().double(), None if b is None else b.detach().double(), **kw)
    rs_bounds = _running_stat_bounds(y64, x, w, b, rm_r, rv_r, 0.3, dtype, kw) if training else (0.0, 0.0)
    with ieee_fp32():
        out = F.conv_bn_relu(
            x, w, b, rm, rv, gamma, beta, training=training, momentum=0.3, eps=1e-3, relu=relu, backend=backend, **kw
        )
        with _eager_conv():
            eager = reference.conv_bn_relu(*eagers[:3], rm_e, rv_e, *eagers[3:], training, 0.3, 1e-3, relu=relu, **kw)
    ref = reference.conv_bn_relu(*refs[:3], rm_r, rv_r, *refs[3:], training, 0.3, 1e-3, relu=relu, **kw)
    g = torch.randn_like(ref).to(dtype)
    cond = _bn_conditions(y64, x, w, gamma, beta, rm_r, rv_r, g, training, relu, kw)
    assert_as_close_as_pytorch(out, eager, ref, dtype, cond=cond["output"])
    # (a running mean near zero is a difference of larger values: PyTorch's own error, or a bound)
    for name, got_, e, r, bound in (
        ("running_mean", rm, rm_e, rm_r, rs_bounds[0]),
        ("running_var", rv, rv_e, rv_r, rs_bounds[1]),
    ):
        lim = max(as_close_as_pytorch_limit(got_, e, r, dtype), bound / (float(r.norm()) or 1.0))
        assert_rel_close(got_, r, dtype, name, limit=lim)
    with ieee_fp32():
        got = _grads(out, leaves, g)
        with _eager_conv():
            ge = _grads(eager, eagers, g)
    want = _grads(ref, refs, g.double())
    for name, a, e, r in zip(("input", "weight", "bias", "bn_weight", "bn_bias"), got, ge, want):
        if r is None:
            continue
        if name == "bias" and training:
            # batch statistics subtract the conv bias again: its gradient is zero up to rounding,
            # so a relative error means nothing; bound it by the rounding of the sums instead
            scale = torch.finfo(dtype).eps * 64 * float(g.double().abs().sum()) * cond["dy"]
            assert float(a.double().abs().max()) <= scale, f"grad bias {a} not ~0 (bound {scale:.2e})"
            continue
        c = max(1.0, cond[name] / (float(r.norm()) or 1.0))
        if tol(dtype) * c > 0.05:  # a near-zero gradient of large terms: no relative error means anything
            event(f"grad {name}: too ill-conditioned to compare")
            continue
        assert_as_close_as_pytorch(a, e, r, dtype, f"grad {name}", cond=c)


@contextlib.contextmanager
def _eager_conv():
    """Where PyTorch's own fp32 convolution runs as the eager peer on the CPU: without oneDNN
    (mkldnn). torch 2.14.1's oneDNN convolution segfaults on some of these layers, found by this
    file's fuzzing: x (1, 4, 7, 1) channels_last, w (6, 2, 3, 1), stride (1, 2), padding 1,
    dilation 2, groups 2, with a bias that requires grad (see pytorch/pytorch#195394: oneDNN's
    BRGEMM convolution on size-1 spatial dimensions with channels_last strides)."""
    saved = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(saved and DEVICE.type != "cpu")
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(saved)


def _running_stat_bounds(y, x, w, b, rm, rv, momentum, dtype, kw):
    """Norms of worst-case rounding bounds of the running mean and variance after one training
    step (float64; y: the convolution's output; rm, rv: before it): y is off by at most n u of its sum
    of absolute values (n terms, u the fp32 or fp64 unit roundoff), the batch mean and variance
    of N P Q values by those errors plus their own summation's, and each update by two roundings."""
    u = _unit_roundoff(dtype)
    dims = (0, 2, 3)
    ya = _abs_conv(x, w, kw) + (0 if b is None else b.detach().double().abs().view(1, -1, 1, 1))
    n = y.numel() // y.shape[1]
    y_err = (w.shape[1] * w.shape[2] * w.shape[3] + 2) * u * ya + n * u * y.abs()
    mean = y.mean(dims)
    dev = (y - mean.view(1, -1, 1, 1)).abs()
    var_u = y.var(dims, unbiased=True)
    mean_err = y_err.mean(dims)
    var_err = (2 * (dev * y_err).mean(dims) + n * u * dev.pow(2).mean(dims)) * n / max(n - 1, 1)
    m = momentum
    rm_b = m * mean_err + 2 * u * ((1 - m) * rm.abs() + m * mean.abs())
    rv_b = m * var_err + 2 * u * ((1 - m) * rv.abs() + m * var_u.abs())
    return float(rm_b.norm()), float(rv_b.norm())


def _bn_conditions(y, x, w, gamma, beta, rm, rv, g, training, relu, kw):
    """Bounds of how much conv-BN-ReLU amplifies rounding, from float64 values (y: the
    convolution's output, bias included); for each gradient
    the norm of the sum of the absolute values of the terms it is made of, which bounds its error
    relative to that (the caller divides it by the reference gradient's norm and scales the
    dtype's tolerance by the ratio), and two ratios:
    - "output": in training, the largest rms(y) / std(y) of a channel of the convolution output
      y (amp), since rounding relative to |y| becomes an error relative to std(y) in y - mean;
    - "dy": in training, amp times the largest gamma / std: the rounding of dL/dy relative to |g|;
    - "input", "weight": dL/dy's bound in training, amp^2 gamma / std (|g| + |mean(g)| + |y_hat|
      mean(|g y_hat|)) (g after the ReLU's mask; amp squared: the batch variance's rounding, which
      scales the gradients through 1/std, grows with amp too), taken through the convolution's
      backward in absolute values. BatchNorm's input gradient gamma / std (g - mean(g) - y_hat
      mean(g y_hat)) nearly cancels with few values per channel (two: y_hat = +-1, and it is
      O(eps / var)), and the weight gradient is orthogonal to the weight (BatchNorm makes the loss
      invariant to its scale), so a channel with one or two weights has a gradient near zero
      made of large terms. In eval the conv-backward's own error: 1 (the caller's floor);
    - "bn_weight", "bn_bias": sum |g| |y_hat| (times amp) in training, sum |g| (|y| +
      |running_mean|) / std in eval (the folded convolution forms it as two sums that cancel), and
      sum |g|;
    - "bias" (eval; training's is bounded by the caller): sum |g| gamma / std."""
    dims, view = (0, 2, 3), (1, -1, 1, 1)
    gam, gd = gamma.detach().double(), g.double()
    out = {"bn_bias": float(gd.abs().sum(dims).norm()), "bias": 0.0}  # (training: bounded by the caller)
    if not training:
        bound = (gd.abs() * (y.abs() + rm.abs().view(view)) / (rv + 1e-3).sqrt().view(view)).sum(dims)
        # (the conv bias's gradient: the sum of dL/dy = g gamma / std, which may cancel too)
        bias = gd.abs().sum(dims) * gam.abs() / (rv + 1e-3).sqrt()
        return {
            **out,
            "output": 1.0,
            "dy": 1.0,
            "input": 0.0,
            "weight": 0.0,
            "bn_weight": float(bound.norm()),
            "bias": float(bias.norm()),
        }
    z = torch.nn.functional.batch_norm(y, None, None, gam, beta.detach().double(), True, 0.0, 1e-3)
    gm = gd * (z > 0) if relu else gd
    mean, std = y.mean(dims), (y.var(dims, unbiased=False) + 1e-3).sqrt()
    yhat = (y - mean.view(view)) / std.view(view)
    amp = max(1.0, float((y.pow(2).mean(dims).sqrt() / std).max()))
    dy = gm.abs() + gm.mean(dims).abs().view(view) + yhat.abs() * (gm * yhat).abs().mean(dims).view(view)
    dy = amp**2 * dy * (gam / std).view(view)
    _, gx, gw = _abs_conv(x, w, kw, dy)
    return {
        **out,
        "output": amp,
        "dy": amp * max(1.0, float((gam / std).max())),
        "input": float(gx.norm()),
        "weight": float(gw.norm()),
        "bn_weight": float((amp * (gd.abs() * yhat.abs()).sum(dims)).norm()),
    }


# ------------------------------------------------------------------------------------------------
# local_response_norm (3-D, 4-D in every layout, 5-D)
# ------------------------------------------------------------------------------------------------
@st.composite
def lrn_inputs(draw):
    ndim = draw(st.sampled_from([3, 4, 4, 4, 5]))
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 10))
    spatial = tuple(draw(st.integers(1, 5)) for _ in range(ndim - 2))
    layout = draw(st.sampled_from(LAYOUTS)) if ndim == 4 else draw(st.sampled_from(["contiguous", "transposed"]))
    return (n, c, *spatial), layout


def _lrn_input(shape, layout, dtype):
    if len(shape) == 4:
        return _make(shape, dtype, layout)
    if layout == "transposed":  # a non-contiguous view: the last two dims swapped in memory
        t = torch.randn((*shape[:-2], shape[-1], shape[-2]), dtype=torch.float64, device=DEVICE).to(dtype)
        return t.transpose(-1, -2).requires_grad_()
    return torch.randn(shape, dtype=torch.float64, device=DEVICE).to(dtype).requires_grad_()


@pytest.mark.parametrize("backend", _gpu_backends("local_response_norm"))
@settings(PROFILE, max_examples=_examples(40))
@given(
    inp=lrn_inputs(),
    dtype=st.sampled_from(DTYPES),
    size=st.integers(1, 7),
    alpha=st.floats(1e-4, 1.0),
    beta=st.floats(0.5, 1.0),
    k=st.floats(0.5, 2.0),
    seed=SEEDS,
)
def test_local_response_norm(backend, inp, dtype, size, alpha, beta, k, seed):
    torch.manual_seed(seed)
    shape, layout = inp
    x = _lrn_input(shape, dtype=dtype, layout=layout)
    out = F.local_response_norm(x, size, alpha, beta, k, backend=backend)
    xr = x.detach().double().requires_grad_()
    ref = reference.local_response_norm(xr.contiguous(), size, alpha, beta, k)  # PyTorch views 5-D inputs
    assert out.shape == x.shape and out.dtype == dtype
    assert_rel_close(out, ref, dtype)
    g = torch.randn_like(ref).to(dtype)
    (gx,) = torch.autograd.grad(out, x, g)
    (gr,) = torch.autograd.grad(ref, xr, g.double())
    cond = float(_lrn_grad_bound(x, g, size, alpha, beta, k).norm()) / (float(gr.norm()) or 1.0)
    assert_rel_close(gx, gr, dtype, "grad input", limit=2 * _conv_tol(dtype) * max(1.0, cond))


def _lrn_grad_bound(x, g, size, alpha, beta, k):
    """An elementwise bound (float64, in units of the rounding) of the terms of LRN's input gradient
    g_i s_i^-beta - 2 alpha beta / size x_i sum_j g_j x_j s_j^(-beta-1) (s = k + alpha / size *
    the window's sum of x^2; j over the windows that hold i): with one channel and beta > 1/2 the
    two terms cancel where x^2 = k size / (alpha (2 beta - 1)), a zero of the derivative."""
    xd, gd = x.detach().double(), g.double()
    n, c = xd.shape[:2]
    xf, gf = xd.reshape(n, c, -1), gd.reshape(n, c, -1)

    def window_sum(t, before, after):
        t = torch.nn.functional.pad(t, (0, 0, before, after))
        return sum(t[:, i : i + c] for i in range(before + after + 1))

    s = k + alpha / size * window_sum(xf * xf, size // 2, (size - 1) // 2)
    # (a superset of the windows that hold i: the bound may only grow)
    cross = window_sum((gf * xf).abs() * s.pow(-beta - 1), size, size)
    return (gf.abs() * s.pow(-beta) + 2 * alpha * beta / size * xf.abs() * cross).reshape(xd.shape)


# ------------------------------------------------------------------------------------------------
# residual_add (identity and option A, any layouts)
# ------------------------------------------------------------------------------------------------
@st.composite
def residual_shapes(draw):
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 6))
    if draw(st.booleans()):
        h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        return (n, c, h, w), (n, c, h, w)
    s = draw(st.integers(2, 3))
    hs, ws = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    cs = draw(st.integers(1, c))
    return (n, c, -(-hs // s), -(-ws // s)), (n, cs, hs, ws)


@pytest.mark.parametrize("backend", _gpu_backends("residual_add"))
@settings(PROFILE, max_examples=_examples(60))
@given(
    shapes=residual_shapes(),
    dtype=st.sampled_from(DTYPES),
    lx=st.sampled_from(LAYOUTS),
    ls=st.sampled_from(LAYOUTS),
    relu=st.booleans(),
    seed=SEEDS,
)
def test_residual_add(backend, shapes, dtype, lx, ls, relu, seed):
    torch.manual_seed(seed)
    xs, ss = shapes
    x = _make(xs, dtype, lx)
    s = _make(ss, dtype, ls)
    stride = _checks.option_a_stride("residual_add", x, s)
    out = F.residual_add(x, s, relu=relu, backend=backend)
    xr, sr = x.detach().double().requires_grad_(), s.detach().double().requires_grad_()
    ref = reference.residual_add(xr, sr, relu, stride)
    assert out.dtype == dtype
    assert_rel_close(out, ref, dtype)
    if lx == "channels_last" and xs[1] > 1 and xs[2] * xs[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(ref).to(dtype)
    got = torch.autograd.grad(out, (x, s), g)
    want = torch.autograd.grad(ref, (xr, sr), g.double())
    for name, a, r in zip(("grad x", "grad shortcut"), got, want):
        assert a.shape == r.shape
        assert_rel_close(a, r, dtype, name)
