"""Automatic mixed precision: inside ``torch.autocast`` the ops cast their inputs like the PyTorch
ops they replace (cnnkern/ops/_autocast.py): conv2d and conv_bn_relu's convolution in the autocast
dtype, LRN in fp32, residual add promoted to the widest input dtype; gradients come back in each
parameter's dtype.

On a CPU machine the rules run under CPU autocast with float16 (the interpreter computes bf16
wrongly), through the public functions (every backend), through the ops' Autocast kernels
(``torch.ops.cnnkern.*``) called directly. The GPU tests compare against
PyTorch's own ops under CUDA autocast, bf16 and fp16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from helpers import DEVICE, HAS_CUDA, assert_rel_close, backends_for, make

import cnnkern
from cnnkern import functional as F
from cnnkern import reference
from cnnkern.ops import _autocast

CPU_AMP = torch.float16


def _cpu_backends(op):
    return [p for p in backends_for(torch.device("cpu"), op)]


def test_autocast_kernels_registered_on_every_forward_op():
    reg = set(_autocast.registered())
    for op in ("conv2d", "conv_bn_relu_train", "local_response_norm", "residual_add"):
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert (f"cnnkern::{op}", key) in reg
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cnnkern::{op}", key)
    # the mutating running-statistics update must never be autocast (a cast copy would drop the update)
    assert not any(op == "cnnkern::bn_update_running_stats" for op, _ in reg)


def test_policy_table():
    assert _autocast.POLICY["conv2d"][0] == "lower"
    assert _autocast.POLICY["conv_bn_relu"][0] == "lower"
    assert _autocast.POLICY["local_response_norm"][0] == "fp32"
    assert _autocast.POLICY["residual_add"][0] == "promote"


def test_cast_rules():
    x32 = torch.randn(2, 3)
    x16, x64 = x32.half(), x32.double()
    assert _autocast.cast("conv2d", "cpu", x32, x16, None) == (x32, x16, None)  # autocast off: unchanged
    with torch.autocast("cpu", dtype=CPU_AMP):
        a, b, c = _autocast.cast("conv2d", "cpu", x32, x32, None)
        assert a.dtype == b.dtype == CPU_AMP and c is None
        (d,) = _autocast.cast("conv2d", "cpu", x64)
        assert d.dtype == torch.float64  # float64 is never cast, as in autocast
        (e,) = _autocast.cast("local_response_norm", "cpu", x16)
        assert e.dtype == torch.float32
        f, g = _autocast.cast("residual_add", "cpu", x16, x32)
        assert f.dtype == g.dtype == torch.float32
        h, i = _autocast.cast("residual_add", "cpu", x16, x16)
        assert h is x16 and i is x16
        # tensors on another device type than the autocast one are left alone
        (j,) = _autocast.cast("conv2d", "cuda", x32)
        assert j is x32


@pytest.mark.parametrize("backend", _cpu_backends("conv2d"))
def test_conv2d_under_cpu_autocast(backend):
    x = make((2, 4, 6, 6), torch.float32, "cpu", "channels_last", requires_grad=True)
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    with torch.autocast("cpu", dtype=CPU_AMP):
        y = F.conv2d(x, w, b, padding=1, activation="relu", backend=backend)
    assert y.dtype == CPU_AMP
    ref = reference.conv2d(*(t.detach().to(CPU_AMP).double() for t in (x, w, b)), padding=1, activation="relu")
    assert_rel_close(y, ref, CPU_AMP)
    y.float().sum().backward()
    assert (x.grad.dtype, w.grad.dtype, b.grad.dtype) == (torch.float32,) * 3


@pytest.mark.parametrize("backend", _cpu_backends("conv_bn_relu"))
@pytest.mark.parametrize("training", [True, False])
def test_conv_bn_relu_under_cpu_autocast(backend, training):
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    gamma, beta = torch.rand(8).add(0.5).requires_grad_(), torch.randn(8, requires_grad=True)
    rm, rv = torch.zeros(8), torch.ones(8)
    with torch.autocast("cpu", dtype=CPU_AMP):
        y = F.conv_bn_relu(x, w, None, rm, rv, gamma, beta, training=training, padding=1, backend=backend)
    assert y.dtype == CPU_AMP
    assert rm.dtype == rv.dtype == torch.float32
    if training:
        assert not torch.equal(rm, torch.zeros(8))  # updated in place, in fp32
    xr, wr = x.detach().half().double(), w.detach().half().double()
    ref = reference.conv_bn_relu(
        xr,
        wr,
        None,
        torch.zeros(8, dtype=torch.float64),
        torch.ones(8, dtype=torch.float64),
        gamma.detach().double(),
        beta.detach().double(),
        training,
        0.1,
        1e-5,
        padding=1,
    )
    assert_rel_close(y, ref, CPU_AMP, limit=3e-3)
    y.float().sum().backward()
    assert (x.grad.dtype, w.grad.dtype, gamma.grad.dtype, beta.grad.dtype) == (torch.float32,) * 4


@pytest.mark.parametrize("backend", _cpu_backends("local_response_norm"))
def test_lrn_runs_in_fp32_under_cpu_autocast(backend):
    x = torch.randn(2, 6, 4, 4).half().requires_grad_()
    with torch.autocast("cpu", dtype=CPU_AMP):
        y = F.local_response_norm(x, 3, backend=backend)
    assert y.dtype == torch.float32
    ref = TF.local_response_norm(x.detach().double(), 3)
    assert_rel_close(y, ref, torch.float32)
    y.sum().backward()
    assert x.grad.dtype == torch.float16


@pytest.mark.parametrize("backend", _cpu_backends("residual_add"))
def test_residual_add_promotes_under_cpu_autocast(backend):
    x = torch.randn(2, 8, 3, 3).half().requires_grad_()
    s = torch.randn(2, 4, 6, 6, requires_grad=True)
    with pytest.raises(TypeError, match="shortcut has dtype float32 but x has dtype float16"):
        F.residual_add(x, s, backend=backend)  # outside autocast: no implicit promotion
    with torch.autocast("cpu", dtype=CPU_AMP):
        y = F.residual_add(x, s, backend=backend)
    assert y.dtype == torch.float32
    ref = reference.residual_add(x.detach().double(), s.detach().double(), True, 2)
    assert_rel_close(y, ref, torch.float32)
    y.sum().backward()
    assert x.grad.dtype == torch.float16 and s.grad.dtype == torch.float32


@pytest.mark.skipif(
    "triton" not in cnnkern.available_backends() and DEVICE.type == "cpu", reason="needs the Triton interpreter"
)
def test_registered_kernels_cast_direct_op_calls():
    """torch.ops.cnnkern.* called directly (as torch.compile's graphs call them) cast too."""
    x, w = torch.randn(1, 4, 5, 5), torch.randn(8, 4, 3, 3)
    with torch.autocast("cpu", dtype=CPU_AMP):
        y = torch.ops.cnnkern.conv2d(x, w, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, False, "ieee", "triton")
        z = torch.ops.cnnkern.local_response_norm(x.half(), 3, 1e-4, 0.75, 1.0, "triton")
        r = torch.ops.cnnkern.residual_add(x.half(), x, 1, True, "triton")
        out = torch.ops.cnnkern.conv_bn_relu_train(
            x,
            w,
            None,
            None,
            torch.ones(8),
            torch.zeros(8),
            1e-5,
            [1, 1],
            [1, 1, 1, 1],
            [1, 1],
            1,
            True,
            "ieee",
            "triton",
        )
    assert y.dtype == CPU_AMP and z.dtype == torch.float32 and r.dtype == torch.float32
    assert out[0].dtype == CPU_AMP and out[2].dtype == torch.float32  # statistics stay fp32
    # outside autocast nothing is cast
    assert (
        torch.ops.cnnkern.conv2d(x, w, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, False, "ieee", "triton").dtype
        == torch.float32
    )


@pytest.mark.skipif(
    "triton" not in cnnkern.available_backends() and DEVICE.type == "cpu", reason="needs the Triton interpreter"
)
def test_the_op_casts_under_autocast():
    """Called directly, the registered op casts its arguments itself (its Autocast kernel)."""
    from cnnkern.ops import conv2d as conv_ops

    x, w = torch.randn(1, 4, 5, 5), torch.randn(8, 4, 3, 3)
    args = (None, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, False, "ieee", "triton")
    with torch.autocast("cpu", dtype=CPU_AMP):
        y = conv_ops.conv2d(x, w, *args)
        z = conv_ops.conv2d(x.to(CPU_AMP), w.to(CPU_AMP), *args)
    assert y.dtype == z.dtype == CPU_AMP
    torch.testing.assert_close(y, z)


# ------------------------------------------------------------------------------------------------
# GPU: against PyTorch's own ops under CUDA autocast
# ------------------------------------------------------------------------------------------------
GPU_DTYPES = [torch.float16, torch.bfloat16]
AMP_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _gpu_params(op):
    return (
        [p for p in backends_for(torch.device("cuda"), op)]
        if HAS_CUDA
        else [pytest.param("triton", marks=pytest.mark.gpu)]
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("backend", _gpu_params("conv2d"))
def test_gpu_conv2d_autocast_like_pytorch(backend, dtype):
    x = make((4, 16, 14, 14), torch.float32, "cuda", "channels_last", requires_grad=True)
    conv = torch.nn.Conv2d(16, 32, 3, padding=1).cuda()
    with torch.autocast("cuda", dtype=dtype):
        want = conv(x)
        got = F.conv2d(x, conv.weight, conv.bias, padding=1, backend=backend)
    assert got.dtype == want.dtype == dtype
    assert_rel_close(got, want.double(), dtype, limit=AMP_TOL[dtype])
    gw = torch.autograd.grad(got.float().sum(), (x, conv.weight, conv.bias))
    assert [g.dtype for g in gw] == [torch.float32] * 3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("backend", _gpu_params("conv_bn_relu"))
def test_gpu_conv_bn_relu_autocast_like_pytorch(backend, dtype):
    ours = cnnkern.nn.ConvBNReLU2d(16, 32, 3, padding=1, backend=backend).cuda().train()
    ref = (
        torch.nn.Sequential(
            torch.nn.Conv2d(16, 32, 3, padding=1, bias=False), torch.nn.BatchNorm2d(32), torch.nn.ReLU()
        )
        .cuda()
        .train()
    )
    ref.load_state_dict({k.replace("conv.", "0.").replace("bn.", "1."): v for k, v in ours.state_dict().items()})
    x = make((4, 16, 14, 14), torch.float32, "cuda", "channels_last")
    with torch.autocast("cuda", dtype=dtype):
        got, want = ours(x), ref(x)
    assert got.dtype == want.dtype
    assert_rel_close(got, want.double(), dtype, limit=2 * AMP_TOL[dtype])
    assert ours.bn.running_mean.dtype == torch.float32
    torch.testing.assert_close(ours.bn.running_mean, ref[1].running_mean, rtol=2e-2, atol=2e-3)
    got.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in ours.parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("backend", _gpu_params("local_response_norm"))
def test_gpu_lrn_autocast_like_pytorch(backend, dtype):
    x = make((4, 16, 7, 7), dtype, "cuda", "channels_last")
    with torch.autocast("cuda", dtype=dtype):
        want = TF.local_response_norm(x, 5, alpha=1e-2, k=2.0)
        got = F.local_response_norm(x, 5, alpha=1e-2, k=2.0, backend=backend)
    assert got.dtype == want.dtype  # fp32: PyTorch's LRN goes through pow, on autocast's fp32 list
    assert_rel_close(got, want.double(), torch.float32, limit=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("backend", _gpu_params("residual_add"))
def test_gpu_residual_add_autocast_like_pytorch(backend, dtype):
    x = make((4, 16, 7, 7), dtype, "cuda", "channels_last", requires_grad=True)
    s = make((4, 16, 7, 7), torch.float32, "cuda", "channels_last", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        want = torch.relu(x + s)
        got = F.residual_add(x, s, backend=backend)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want)
    gx, gs = torch.autograd.grad(got.sum(), (x, s))
    assert gx.dtype == dtype and gs.dtype == torch.float32


@pytest.mark.slow
@pytest.mark.skipif(
    "triton" not in cnnkern.available_backends() and DEVICE.type == "cpu", reason="needs the Triton interpreter"
)
def test_torch_compile_under_autocast_matches_eager():
    """torch.compile traces functional.py's casts and the ops' Autocast kernels alike."""
    torch._dynamo.reset()
    x, w = torch.randn(1, 4, 5, 5), torch.randn(8, 4, 3, 3)

    def f(x, w):
        y = F.conv2d(x, w, padding=1, backend="triton")
        return y, F.local_response_norm(y, 3, backend="triton")

    with torch.autocast("cpu", dtype=CPU_AMP):
        got = torch.compile(f, fullgraph=True)(x, w)
        want = f(x, w)
    assert [t.dtype for t in got] == [t.dtype for t in want] == [CPU_AMP, torch.float32]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
