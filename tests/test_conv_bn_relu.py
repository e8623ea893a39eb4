"""conv_bn_relu / ConvBNReLU2d against a float64 nn.Sequential(Conv2d, BatchNorm2d, ReLU) with the same
parameters: several training steps (outputs, every gradient, running statistics after each step),
eval (folded BatchNorm), momentum=None, relu on/off, layouts, dtypes; registration; bad input."""

import copy

import pytest
import torch
from helpers import (
    DEVICE,
    EMULATED_CUDA,
    HAS_CUDA,
    REL_TOL,
    assert_as_close_as_pytorch,
    assert_rel_close,
    backends_for,
    cuda_kernel_test,
    ieee_fp32,
    make,
    merge_stats,
    rel_err,
)
from test_conv2d import FAMILIES

import cnnkern
from cnnkern import functional as F
from cnnkern.ops._common import cuda_ops

BACKENDS = backends_for(DEVICE, "conv_bn_relu")
FUSED_FAMILIES = ["3x3s1p1", "3x3s2p1", "1x1s1", "1x1s2", "first_7x7s2", "groups2", "same_even"]


def _pair(family, dtype, relu=True, momentum=0.1, backend=None):
    xs, k, ks, stride, pad, dil, groups = FAMILIES[family]
    ours = cnnkern.nn.ConvBNReLU2d(
        xs[1], k, ks, stride, pad, dil, groups, bias=False, momentum=momentum, relu=relu, backend=backend
    ).to(DEVICE)
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        ours.bn.weight.uniform_(0.5, 1.5)
        ours.bn.bias.uniform_(-0.5, 0.5)
        ours.bn.running_mean.uniform_(-0.2, 0.2)
        ours.bn.running_var.uniform_(0.5, 1.5)
    ref = torch.nn.Sequential(
        copy.deepcopy(ours.conv), copy.deepcopy(ours.bn), torch.nn.ReLU() if relu else torch.nn.Identity()
    ).double()
    ours = ours.to(dtype)
    return ours, ref, xs


def _seq_params(seq):
    return [seq[0].weight, seq[1].weight, seq[1].bias]


def _params(ours, ref):
    return [(ours.conv.weight, ref[0].weight), (ours.bn.weight, ref[1].weight), (ours.bn.bias, ref[1].bias)]


def _train_steps(backend, family, dtype, layout, relu=True, momentum=0.1, steps=3):
    if dtype == torch.float32:
        with ieee_fp32():  # TF32 flips near-zero ReLU mask elements (see helpers.ieee_fp32)
            return _train_steps_in(backend, family, dtype, layout, relu, momentum, steps)
    return _train_steps_in(backend, family, dtype, layout, relu, momentum, steps)


def _train_steps_in(backend, family, dtype, layout, relu, momentum, steps):
    """Several training steps of ours, of the float64 reference and of PyTorch eager in ``dtype``
    (the same parameters throughout): ours must be within twice eager's own error (BatchNorm's
    gradients over a small batch amplify rounding, so a fixed tolerance would measure the data)."""
    ours, ref, xs = _pair(family, dtype, relu, momentum, backend)
    eager = copy.deepcopy(ref).to(dtype)
    for m in (ours, ref, eager):
        m.train()
    for step in range(steps):
        x = make(xs, dtype, DEVICE, layout, requires_grad=True)
        xr = x.detach().double().requires_grad_()
        xe = x.detach().clone().requires_grad_()
        out, base = ours(x), eager(xe)
        pre = ref[1](ref[0](xr))  # the reference before its ReLU
        close = lambda a, e, r, what, step=step: assert_as_close_as_pytorch(a, e, r, dtype, f"step {step} {what}")  # noqa: E731
        close(out, base, pre.relu() if relu else pre, "output")
        # The gradients are compared given our forward's ReLU decisions: an element whose exact
        # pre-activation lies within rounding of zero may land on either side in fp16/bf16 (in
        # PyTorch eager too), and each such flip moves the input gradient by a whole |grad| through
        # BatchNorm's amplification (one flip in 768 elements measured 1.5e-2 in bf16). The output
        # comparison above already checks the decisions themselves.
        want = pre * (out.detach() > 0) if relu else pre
        g = make(tuple(out.shape), dtype, DEVICE)
        for m in (ours, ref, eager):
            m.zero_grad()
        out.backward(g)
        want.backward(g.double())
        base.backward(g)
        close(x.grad, xe.grad, xr.grad, "grad input")
        for name, (a, b), e in zip(["conv.weight", "bn.weight", "bn.bias"], _params(ours, ref), _seq_params(eager)):
            close(a.grad, e.grad, b.grad, f"grad {name}")
        # the module was cast to dtype, running statistics included
        close(ours.bn.running_mean, eager[1].running_mean, ref[1].running_mean, "running_mean")
        close(ours.bn.running_var, eager[1].running_var, ref[1].running_var, "running_var")
        assert int(ours.bn.num_batches_tracked) == int(ref[1].num_batches_tracked) == step + 1
        with torch.no_grad():  # an optimizer step, so the next step sees new weights (the same in all three)
            for (a, b), e in zip(_params(ours, ref), _seq_params(eager)):
                a.sub_(0.1 * a.grad)
                b.copy_(a)
                e.copy_(a)
    for m in (ours, ref, eager):
        m.eval()
    x = make(xs, dtype, DEVICE, layout)
    with torch.no_grad():
        assert_as_close_as_pytorch(ours(x), eager(x), ref(x.double()), dtype, "eval output")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_training_steps_fp32(backend, layout, family):
    _train_steps(backend, family, torch.float32, layout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("family", ["3x3s2p1", "1x1s1"])
def test_training_steps_fp16_fp64(backend, dtype, family):
    _train_steps(backend, family, dtype, "channels_last" if dtype == torch.float16 else "strided")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("res_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("family", ["3x3s1p1", "3x3s2p1", "1x1s1"])
def test_fused_residual_training_and_eval(backend, family, res_layout, relu):
    """[relu](BN(conv(x)) + residual), a ResNet block's end: two training steps (output, the
    gradients of input, weight, gamma, beta and the residual, running statistics) and eval (the
    residual in the folded convolution's epilogue), against float64 PyTorch."""
    ours, ref, xs = _pair(family, torch.float32, relu, backend=backend)
    ref[2] = torch.nn.Identity()  # the reference's ReLU comes after the residual
    ours.train(), ref.train()
    with ieee_fp32():
        for step in range(3):
            training = step < 2
            ours.train(training), ref.train(training)
            x = make(xs, torch.float32, DEVICE, "channels_last", requires_grad=True)
            with torch.no_grad():
                shape = ref[0](x.detach().double()).shape
            r = make(tuple(shape), torch.float32, DEVICE, res_layout, requires_grad=True)
            xr, rr = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
            out = ours(x, r)
            want = ref(xr) + rr
            want = want.relu() if relu else want
            assert_rel_close(out, want, torch.float32, f"step {step} output")
            g = make(tuple(out.shape), torch.float32, DEVICE)
            for m in (ours, ref):
                m.zero_grad()
            gx, gr = torch.autograd.grad(out, (x, r), g, retain_graph=True)
            rgx, rgr = torch.autograd.grad(want, (xr, rr), g.double(), retain_graph=True)
            assert_rel_close(gx, rgx, torch.float32, f"step {step} grad input")
            assert_rel_close(gr, rgr, torch.float32, f"step {step} grad residual")
            out.backward(g)
            want.backward(g.double())
            for name, (a, b) in zip(["conv.weight", "bn.weight", "bn.bias"], _params(ours, ref)):
                assert_rel_close(a.grad, b.grad, torch.float32, f"step {step} grad {name}")
            assert_rel_close(ours.bn.running_mean, ref[1].running_mean, torch.float32, "running_mean")
            assert_rel_close(ours.bn.running_var, ref[1].running_var, torch.float32, "running_var")


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_none_and_no_relu(backend):
    _train_steps(backend, "3x3s1p1", torch.float32, "channels_last", relu=False, momentum=None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_running_stats_uses_batch_statistics_in_eval(backend):
    ours, ref, xs = _pair("3x3s1p1", torch.float32, backend=backend)
    ours.bn = torch.nn.BatchNorm2d(ours.bn.num_features, track_running_stats=False).to(DEVICE)
    ref[1] = copy.deepcopy(ours.bn).double()
    ours.eval()
    ref.eval()
    x = make(xs, torch.float32, DEVICE, "channels_last")
    assert_rel_close(ours(x), ref(x.double()), torch.float32, matmul=True)


def test_eval_fold_is_cached_and_never_stale():
    # (a call with a residual keeps its fold on the module; one without, in its plan on a GPU
    # backend: tests/test_plan.py)
    ours, ref, xs = _pair("3x3s1p1", torch.float32, backend="triton")
    ours.eval()
    ref.eval()
    x = make(xs, torch.float32, DEVICE)
    r = torch.zeros_like(ours(x))
    with torch.no_grad():
        ours(x, r)
        first = ours.bn._cnnkern_folded
        ours(x, r)
        assert ours.bn._cnnkern_folded is first  # nothing changed: the fold is reused
        for m in (ours.bn, ref[1]):
            m.running_var.mul_(2.0)  # an in-place change bumps the version: refold
        assert_rel_close(ours(x, r), ref(x.double()), torch.float32, matmul=True)
        assert ours.bn._cnnkern_folded is not first
        assert_rel_close(ours(x), ref(x.double()), torch.float32, matmul=True)
    # with autograd recording, the fold is recomputed differentiably
    out = ours(x)
    out.sum().backward()
    assert ours.bn.weight.grad is not None and ours.conv.weight.grad is not None


def test_state_dict_matches_torchvision_basicconv2d_and_from_modules():
    m = cnnkern.nn.ConvBNReLU2d(16, 32, 3, padding=1)
    assert list(m.state_dict()) == [
        "conv.weight",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    ]
    conv, bn = torch.nn.Conv2d(16, 32, 3, padding=1, bias=False), torch.nn.BatchNorm2d(32)
    fused = cnnkern.nn.ConvBNReLU2d.from_modules(conv, bn, relu=False)
    assert fused.conv.weight is conv.weight and fused.bn.running_mean is bn.running_mean
    assert "relu=False" in repr(fused)
    with pytest.raises(ValueError, match="bn has 16 features but conv has 32"):
        cnnkern.nn.ConvBNReLU2d.from_modules(conv, torch.nn.BatchNorm2d(16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_value_per_channel_in_training_is_an_error(backend):
    m = cnnkern.nn.ConvBNReLU2d(4, 8, 3, backend=backend).to(DEVICE).train()
    with pytest.raises(ValueError, match="more than 1 value per channel when training"):
        m(torch.randn(1, 4, 3, 3, device=DEVICE))
    m.eval()
    assert m(torch.randn(1, 4, 3, 3, device=DEVICE)).shape == (1, 8, 1, 1)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "torch"])
def test_opcheck(backend):
    x = make((2, 8, 5, 5), torch.float32, DEVICE, "channels_last", requires_grad=True)
    w = make((16, 8, 3, 3), torch.float32, DEVICE, requires_grad=True)
    gamma = torch.rand(16, device=DEVICE, requires_grad=True)
    beta = torch.randn(16, device=DEVICE, requires_grad=True)
    ops = torch.ops.cnnkern
    args = (x, w, None, None, gamma, beta, 1e-5, [1, 1], [1, 1, 1, 1], [1, 1], 1, True, "ieee", backend)
    torch.library.opcheck(ops.conv_bn_relu_train.default, args)
    res = torch.randn(2, 16, 5, 5, device=DEVICE, requires_grad=True)  # NCHW: the op re-lays it out
    torch.library.opcheck(ops.conv_bn_relu_train.default, (x, w, None, res, *args[4:]))
    out, y, mean, invstd, var = ops.conv_bn_relu_train(*args)
    g = torch.randn_like(out)
    torch.library.opcheck(
        ops.conv_bn_relu_backward.default,
        (g, out.detach(), y.detach(), mean.detach(), invstd.detach(), gamma.detach(), backend),
    )
    rm, rv = torch.zeros(16, device=DEVICE), torch.ones(16, device=DEVICE)
    torch.library.opcheck(
        ops.bn_update_running_stats.default, (rm, rv, mean.detach(), var.detach(), 50, 0.1, backend, None)
    )
    tracked = torch.tensor(3, device=DEVICE)
    stats = (rm, rv, mean.detach(), var.detach(), 50, 0.1, backend, tracked)
    torch.library.opcheck(ops.bn_update_running_stats.default, stats)


def _t(*shape):
    return torch.randn(shape)


BAD = [
    ({"running_mean": _t(7)}, ValueError, "running_mean has 7 elements but the convolution has 8 output channels"),
    ({"running_var": None}, ValueError, "running_mean and running_var must both be tensors or both be None"),
    ({"bn_weight": _t(8, 1)}, ValueError, "bn_weight must be 1-D, got 2-D"),
    ({"bn_bias": _t(8).long()}, TypeError, "bn_bias must be a floating-point tensor"),
    ({"momentum": None}, ValueError, "momentum=None (a cumulative moving average) needs the number of batches"),
    ({"training": 1}, TypeError, "training must be a bool, got int"),
    (
        {"num_batches_tracked": torch.tensor(1.0), "training": True},
        TypeError,
        "num_batches_tracked must be an int64 tensor of one element, got float32",
    ),
    (
        {"num_batches_tracked": torch.tensor(1), "running_mean": None, "running_var": None, "training": True},
        ValueError,
        "num_batches_tracked counts the running statistics' updates",
    ),
    ({"backend": "cuda"}, cnnkern.BackendUnavailableError, "backend 'cuda' is unavailable"),
]


@pytest.mark.parametrize("kwargs,exc,msg", BAD, ids=[b[-1][:40] for b in BAD])
def test_bad_input(kwargs, exc, msg):
    if kwargs.get("backend") == "cuda" and EMULATED_CUDA:
        pytest.skip("the CUDA emulator makes the cuda backend available for CPU tensors")
    args = dict(running_mean=_t(8), running_var=_t(8).abs(), bn_weight=_t(8), bn_bias=_t(8))
    args.update(kwargs)
    with pytest.raises(exc) as info:
        F.conv_bn_relu(
            _t(2, 4, 5, 5),
            _t(8, 4, 3, 3),
            None,
            args.pop("running_mean"),
            args.pop("running_var"),
            args.pop("bn_weight"),
            args.pop("bn_bias"),
            **args,
        )
    assert msg in str(info.value)


@pytest.mark.gpu
@pytest.mark.emulated
@pytest.mark.skipif(not (HAS_CUDA or EMULATED_CUDA), reason="needs CUDA")
@pytest.mark.parametrize("family", FUSED_FAMILIES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_bf16_training_steps(family, backend):
    """bf16 channels_last on the GPU (the interpreter cannot run bf16): outputs, gradients and running
    statistics over several training steps against the float64 reference."""
    if backend == "triton" and not HAS_CUDA:
        pytest.skip("the Triton interpreter cannot run bf16")
    if cnnkern._backend.unavailable_reason(backend, DEVICE):
        pytest.skip(cnnkern._backend.unavailable_reason(backend, DEVICE))
    _train_steps(backend, family, torch.bfloat16, "channels_last")


@cuda_kernel_test
@pytest.mark.parametrize("algo", ["direct", "igemm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "shape", [((4, 64, 9, 9), 72, 3, 1, 1), ((3, 32, 15, 15), 40, 1, 2, 0), ((2, 3, 17, 17), 8, 7, 2, 3)]
)
def test_gpu_cuda_conv_statistics_epilogue(shape, dtype, algo):
    """The CUDA convolution's per-block (count, mean, M2), merged, equal the batch mean and biased
    variance of the output it wrote, for each forward kernel (the implicit GEMM also on the
    3-channel layer's zero-padded copy; split-K's statistics: test_conv2d.py)."""
    xs, k, ks, stride, pad = shape
    from cnnkern.ops.conv2d import output_size

    x = make(xs, dtype, DEVICE, "channels_last")
    w = make((k, xs[1], ks, ks), dtype, DEVICE) * (xs[1] * ks * ks) ** -0.5
    b = torch.randn(k, dtype=dtype, device=DEVICE) + 3.0  # a mean far from zero
    y = torch.full(
        output_size(x.shape, w.shape, [stride] * 2, [pad] * 4, [1, 1]), float("nan"), dtype=dtype, device=DEVICE
    ).contiguous(memory_format=torch.channels_last)
    stats = cuda_ops().conv2d_forward_cuda(
        x, w, b, y, [stride] * 2, [pad] * 2, [1, 1], 1, False, algo, True, dtype == torch.float32
    )
    count, mean, var = merge_stats(stats)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), stride=stride, padding=pad)
    assert torch.all(count == y.numel() // k)
    if dtype == torch.float32 and algo == "igemm":  # TF32 products
        assert rel_err(mean, ref.mean((0, 2, 3))) < 3e-3
        assert rel_err(var, ref.var((0, 2, 3), unbiased=False)) < 3e-3
        return
    assert_rel_close(mean, ref.mean((0, 2, 3)), dtype, "mean", matmul=True)
    assert_rel_close(var, ref.var((0, 2, 3), unbiased=False), dtype, "variance", matmul=True)


# ------------------------------------------------------------------------------------------------
# the per-channel finishing kernels (one launch each): statistics -> scale/shift, and partial
# sums -> backward coefficients; against a float64 PyTorch oracle, for each kernel backend
# ------------------------------------------------------------------------------------------------
KERNEL_BACKENDS = [p for p in BACKENDS if p.values[0] != "torch"]
# (acc dtype, parameter dtype): bf16 parameters only on a GPU (the interpreter's bf16 is unreliable)
FINALIZE_DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.float16), (torch.float64, torch.float64)] + (
    [(torch.float32, torch.bfloat16)] if torch.cuda.is_available() else []
)


def _finalize(backend, stats, gamma, beta, eps):
    if backend == "triton":
        from cnnkern.kernels import conv_bn_relu as kb

        return kb.bn_finalize(stats, gamma, beta, eps)
    k = stats.shape[2]
    outs = [torch.full((k,), float("nan"), dtype=stats.dtype, device=stats.device) for _ in range(5)]
    cuda_ops().bn_finalize_cuda(stats, gamma, beta, eps, *outs)
    return tuple(outs)


def _coefficients(backend, part, mean, invstd, gamma, m, pdt):
    if backend == "triton":
        from cnnkern.kernels import conv_bn_relu as kb

        return kb.bn_backward_coefficients(part, mean, invstd, gamma, m, pdt)
    k = part.shape[2]
    outs = [torch.full((k,), float("nan"), dtype=d, device=part.device) for d in [part.dtype] * 3 + [pdt] * 2]
    cuda_ops().bn_backward_coefficients_cuda(part, mean, invstd, gamma, m, *outs)
    return tuple(outs)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("acc,pdt", FINALIZE_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("rows,k,affine", [(1, 3, True), (75, 70, True), (40, 129, False)])
def test_bn_finalize_kernel(backend, acc, pdt, rows, k, affine):
    g = torch.Generator().manual_seed(rows * 1000 + k)
    cnt = torch.randint(1, 60, (rows, k), generator=g).to(acc)
    cnt[1::7] = 0  # tiles a larger block left unwritten: count 0, mean 0, M2 0
    mean_t = (torch.randn(rows, k, generator=g, dtype=acc) * 2 + 40) * (cnt > 0)  # means far from zero
    m2_t = torch.rand(rows, k, generator=g, dtype=acc) * cnt
    stats = torch.stack([cnt, mean_t, m2_t], 1).contiguous().to(DEVICE)
    gamma = (torch.rand(k, generator=g) + 0.5).to(pdt).to(DEVICE) if affine else None
    beta = torch.randn(k, generator=g).to(pdt).to(DEVICE) if affine else None
    eps = 1e-3
    mean, invstd, var, scale, shift = _finalize(backend, stats, gamma, beta, eps)
    _, mean_r, var_r = merge_stats(stats)
    invstd_r = (var_r + eps).rsqrt()
    scale_r = invstd_r * (gamma.double() if affine else 1.0)
    shift_r = (beta.double() if affine else 0.0) - mean_r * scale_r
    for got, want, what in [
        (mean, mean_r, "mean"),
        (var, var_r, "var"),
        (invstd, invstd_r, "invstd"),
        (scale, scale_r, "scale"),
        (shift, shift_r, "shift"),
    ]:
        assert got.dtype == acc and got.shape == (k,)
        assert rel_err(got, want) < (1e-12 if acc == torch.float64 else 1e-5), what
    again = _finalize(backend, stats, gamma, beta, eps)
    assert all(torch.equal(a, b) for a, b in zip(again, (mean, invstd, var, scale, shift)))  # fixed order


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("acc,pdt", FINALIZE_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("rows,k,affine", [(1, 3, True), (75, 70, True), (40, 129, False)])
def test_bn_backward_coefficients_kernel(backend, acc, pdt, rows, k, affine):
    g = torch.Generator().manual_seed(rows * 1000 + k + 1)
    part = torch.randn(rows, 2, k, generator=g, dtype=acc).to(DEVICE)
    mean = torch.randn(k, generator=g, dtype=acc).to(DEVICE)
    invstd = (torch.rand(k, generator=g, dtype=acc) + 0.5).to(DEVICE)
    gamma = (torch.rand(k, generator=g) + 0.5).to(pdt).to(DEVICE) if affine else None
    m = 3 * rows + 1
    a, b, c, sg, sgx = _coefficients(backend, part, mean, invstd, gamma, m, pdt)
    sg_r, sgy_r = part.double().sum(0)
    md, inv = mean.double(), invstd.double()
    sgx_r = inv * (sgy_r - md * sg_r)
    a_r = inv * (gamma.double() if affine else 1.0)
    b_r = -a_r * inv * sgx_r / m
    c_r = a_r * (md * inv * sgx_r - sg_r) / m
    tol_acc = 1e-12 if acc == torch.float64 else 1e-5
    for got, want, dt, what in [
        (a, a_r, acc, "a"),
        (b, b_r, acc, "b"),
        (c, c_r, acc, "c"),
        (sg, sg_r, pdt, "sg"),
        (sgx, sgx_r, pdt, "sgx"),
    ]:
        assert got.dtype == dt and got.shape == (k,), what
        assert rel_err(got, want) < max(tol_acc, REL_TOL[dt]), what


# (statistics dtype, running_mean dtype, running_var dtype); bf16 running statistics only on a GPU
RUNNING_DTYPES = [
    (torch.float32, torch.float32, torch.float32),
    (torch.float32, torch.float16, torch.float32),
    (torch.float64, torch.float64, torch.float64),
] + ([(torch.float32, torch.bfloat16, torch.bfloat16)] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("acc,dm,dv", RUNNING_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("k,stride", [(1, 1), (70, 1), (129, 3)])
def test_bn_update_running_kernel(backend, acc, dm, dv, k, stride):
    """running += momentum * (batch - running), the batch variance unbiased, in place, for running
    statistics of any float dtype and stride; a new momentum on every call (a cumulative average)
    reuses the one kernel; the elements between strided ones are left alone; the batch count,
    where given, incremented by one with each update (versions bumped, as in-place ops bump them)."""
    from cnnkern.ops.conv_bn_relu import update_running_stats

    g = torch.Generator().manual_seed(k * 10 + stride)
    base_m = torch.randn(k * stride, generator=g, dtype=torch.float64)
    base_v = torch.rand(k * stride, generator=g, dtype=torch.float64) + 0.5
    rm_buf, rv_buf = base_m.to(dm).to(DEVICE), base_v.to(dv).to(DEVICE)
    rm, rv = rm_buf[::stride], rv_buf[::stride]
    want_m, want_v = rm.double().cpu().clone(), rv.double().cpu().clone()
    count = 37
    tracked = torch.tensor(5, device=DEVICE)
    for step in range(1, 4):
        mean = torch.randn(k, generator=g, dtype=acc).to(DEVICE)
        var = (torch.rand(k, generator=g, dtype=acc) + 0.1).to(DEVICE)
        momentum = 1.0 / step if step > 1 else 0.1
        versions = rm._version, rv._version, tracked._version
        update_running_stats(rm, rv, mean, var, momentum, count / (count - 1), backend, tracked if step > 1 else None)
        assert int(tracked) == 5 + (step - 1) and tracked.dtype == torch.int64
        assert rm._version > versions[0] and rv._version > versions[1]
        assert (tracked._version > versions[2]) == (step > 1)
        want_m = want_m + momentum * (mean.double().cpu() - want_m)
        want_v = want_v + momentum * (var.double().cpu() * count / (count - 1) - want_v)
        assert rm.dtype == dm and rv.dtype == dv
        for got, want, dt, what in [(rm, want_m, dm, "running_mean"), (rv, want_v, dv, "running_var")]:
            tol = 1e-13 if dt == torch.float64 else 4 * REL_TOL[dt] if dt != torch.float32 else 1e-6
            assert rel_err(got, want) < tol, f"step {step} {what}"
            want.copy_(got.double().cpu())  # each step from what the last one stored, as PyTorch's
    if stride > 1:  # the elements in between are untouched
        keep = torch.ones(k * stride, dtype=torch.bool)
        keep[::stride] = False
        assert torch.equal(rm_buf.cpu()[keep], base_m.to(dm)[keep])
        assert torch.equal(rv_buf.cpu()[keep], base_v.to(dv)[keep])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_bn_update_running_refuses_stride_zero(backend):
    from cnnkern.ops.conv_bn_relu import update_running_stats

    stats = torch.zeros(4, device=DEVICE)
    shared = torch.zeros(1, device=DEVICE).expand(4)
    with pytest.raises(RuntimeError, match="running_mean has stride 0"):
        update_running_stats(shared, stats.clone(), stats, stats, 0.1, 1.1, backend)
    with pytest.raises(RuntimeError, match="running_var has stride 0"):
        update_running_stats(stats.clone(), shared, stats, stats, 0.1, 1.1, backend)
    for bad in (torch.tensor(1.0, device=DEVICE), torch.zeros(2, dtype=torch.int64, device=DEVICE)):
        with pytest.raises((ValueError, RuntimeError), match="num_batches_tracked must be an int64 tensor of one"):
            update_running_stats(stats.clone(), stats.clone(), stats, stats, 0.1, 1.1, backend, bad)


@cuda_kernel_test
def test_gpu_cuda_finalize_ops_refuse_bad_tensors():
    stats = torch.zeros(4, 3, 8, device=DEVICE)
    outs = [torch.empty(8, device=DEVICE) for _ in range(5)]
    with pytest.raises(RuntimeError, match="stats must be a contiguous"):
        cuda_ops().bn_finalize_cuda(stats[:, :2], None, None, 1e-5, *outs)
    with pytest.raises(RuntimeError, match="gamma must be a contiguous"):
        cuda_ops().bn_finalize_cuda(stats, torch.ones(7, device=DEVICE), None, 1e-5, *outs)
    with pytest.raises(RuntimeError, match="scale must be a contiguous"):
        cuda_ops().bn_finalize_cuda(stats, None, None, 1e-5, *outs[:3], outs[3].double(), outs[4])
    part = torch.zeros(4, 2, 8, device=DEVICE)
    with pytest.raises(RuntimeError, match="count must be positive"):
        cuda_ops().bn_backward_coefficients_cuda(part, outs[0], outs[1], None, 0, *outs)
