"""residual_add: forward and both gradients against the float64 reference, in every backend that
can run here, every dtype and layout; option A; registration (opcheck, torch.compile); bad input."""

import pytest
import torch
from helpers import DEVICE, DTYPES, EMULATED_CUDA, HAS_CUDA, LAYOUTS, assert_rel_close, backends_for, make

import cnnkern
from cnnkern import functional as F
from cnnkern import reference

# (x shape, shortcut shape): why each is here
CASES = {
    "identity": ((2, 8, 6, 5), (2, 8, 6, 5)),  # the common block end; odd W
    "optA_s2": ((2, 16, 4, 4), (2, 8, 8, 8)),  # CIFAR ResNet stage change: C x2, H/2
    "optA_odd": ((2, 12, 4, 3), (2, 5, 7, 5)),  # odd sizes: ceil(7/2)=4, ceil(5/2)=3
    "optA_s1": ((1, 16, 5, 5), (1, 6, 5, 5)),  # channel padding only
    "optA_s3": ((2, 8, 3, 3), (2, 8, 9, 9)),  # stride 3, no channel padding
    "cl_vec": ((2, 32, 3, 3), (2, 16, 6, 6)),  # NHWC runs long enough to vectorise
}
BACKENDS = backends_for(DEVICE)


def _ref(x, s, relu):
    stride = cnnkern._checks.option_a_stride("test", x, s)
    return reference.residual_add(x.detach().double(), s.detach().double(), relu, stride)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "sum"])
def test_forward(backend, dtype, layout, case, relu):
    xs, ss = CASES[case]
    x, s = make(xs, dtype, DEVICE, layout), make(ss, dtype, DEVICE, layout)
    out = F.residual_add(x, s, relu=relu, backend=backend)
    assert out.dtype == dtype and out.device == x.device
    assert_rel_close(out, _ref(x, s, relu), dtype)
    if relu:
        assert (out >= 0).all()
    # channels_last in, channels_last out; the kernels give anything else a contiguous output
    # (the "torch" backend keeps whatever layout PyTorch's own add picks for a strided input).
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    elif backend != "torch":
        assert out.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", ["identity", "optA_s2", "optA_odd", "optA_s3"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "sum"])
def test_gradients(backend, dtype, layout, case, relu):
    xs, ss = CASES[case]
    x = make(xs, dtype, DEVICE, layout, requires_grad=True)
    s = make(ss, dtype, DEVICE, layout, requires_grad=True)
    out = F.residual_add(x, s, relu=relu, backend=backend)
    g = make(xs, dtype, DEVICE)
    gx, gs = torch.autograd.grad(out, (x, s), g)

    xr = x.detach().double().requires_grad_()
    sr = s.detach().double().requires_grad_()
    ref = reference.residual_add(xr, sr, relu, cnnkern._checks.option_a_stride("t", x, s))
    rgx, rgs = torch.autograd.grad(ref, (xr, sr), g.double())
    assert gx.shape == x.shape and gs.shape == s.shape
    assert gx.dtype == dtype and gs.dtype == dtype
    assert_rel_close(gx, rgx, dtype, "grad x")
    assert_rel_close(gs, rgs, dtype, "grad shortcut")
    if case != "identity":
        # option A: positions the subsampling skipped get exactly zero gradient
        stride = cnnkern._checks.option_a_stride("t", x, s)
        skipped = torch.ones(ss, dtype=torch.bool, device=DEVICE)
        skipped[:, :, ::stride, ::stride] = False
        assert (gs[skipped] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_layouts_and_expanded_grad(backend):
    """x channels_last, shortcut a strided view, and the gradient an expanded (stride-0) tensor, as
    out.sum().backward() produces: read through their strides or copied, never read wrongly."""
    x = make((2, 16, 4, 4), torch.float32, DEVICE, "channels_last", requires_grad=True)
    s = make((2, 8, 8, 8), torch.float32, DEVICE, "strided", requires_grad=True)
    out = F.residual_add(x, s, backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out.sum().backward()
    xr, sr = x.detach().double().requires_grad_(), s.detach().double().requires_grad_()
    ref = reference.residual_add(xr, sr, True, 2)
    ref.sum().backward()
    assert_rel_close(out, ref, torch.float32)
    assert_rel_close(x.grad, xr.grad, torch.float32, "grad x")
    assert_rel_close(s.grad, sr.grad, torch.float32, "grad shortcut")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate_like_pytorch(backend):
    x = make((1, 4, 3, 3), torch.float32, DEVICE)
    s = make((1, 4, 3, 3), torch.float32, DEVICE)
    x[0, 0, 0, 0] = float("nan")
    x[0, 1, 1, 1] = float("inf")
    x[0, 2, 2, 2] = float("-inf")
    out = F.residual_add(x, s, backend=backend)
    want = torch.relu(x + s)
    torch.testing.assert_close(out, want, equal_nan=True, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 8, 4, 4, device=DEVICE, requires_grad=True)
    s = torch.randn(0, 4, 8, 8, device=DEVICE, requires_grad=True)
    out = F.residual_add(x, s, backend=backend)
    assert out.shape == (0, 8, 4, 4)
    out.sum().backward()
    assert s.grad.shape == s.shape


def test_module():
    m = cnnkern.nn.ResidualAdd(relu=False)
    x, s = make((2, 8, 3, 3), torch.float32, DEVICE), make((2, 4, 6, 6), torch.float32, DEVICE)
    assert_rel_close(m(x, s), _ref(x, s, False), torch.float32)
    assert "relu=False" in repr(m)
    assert list(m.parameters()) == [] and m.state_dict() == {}


# ------------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------------
GPU_OPS_BACKENDS = [b for b in ("triton", "cuda") if cnnkern._backend.unavailable_reason(b, DEVICE) is None]


@pytest.mark.parametrize("backend", GPU_OPS_BACKENDS)
@pytest.mark.parametrize("case", ["identity", "optA_s2"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(backend, case, layout):
    xs, ss = CASES[case]
    x = make(xs, torch.float32, DEVICE, layout, requires_grad=True)
    s = make(ss, torch.float32, DEVICE, layout, requires_grad=True)
    stride = cnnkern._checks.option_a_stride("t", x, s)
    ops = torch.ops.cnnkern
    torch.library.opcheck(ops.residual_add.default, (x, s, stride, True, backend))
    out = ops.residual_add(x, s, stride, True, backend).detach()
    g = make(xs, torch.float32, DEVICE, layout)
    torch.library.opcheck(ops.residual_add_backward.default, (g, out, backend))
    cl = layout == "channels_last"
    torch.library.opcheck(ops.residual_add_shortcut_backward.default, (g, list(ss), stride, cl, backend))


@pytest.mark.gpu
@pytest.mark.skipif(not cnnkern._backend.has_extension(), reason="cnnkern._C not built")
@pytest.mark.parametrize("case", ["identity", "optA_s2"])
def test_opcheck_cuda_kernels(case):
    xs, ss = CASES[case]
    x, s = make(xs, torch.float16, DEVICE, "channels_last"), make(ss, torch.float16, DEVICE, "channels_last")
    stride = cnnkern._checks.option_a_stride("t", x, s)
    ops = torch.ops.cnnkern
    torch.library.opcheck(ops.residual_add_cuda.default, (x, s, stride, True))
    out = ops.residual_add_cuda(x, s, stride, True)
    torch.library.opcheck(ops.residual_add_backward_cuda.default, (torch.randn_like(out), out))
    torch.library.opcheck(ops.residual_add_shortcut_backward_cuda.default, (out, list(ss), stride, True))


@pytest.mark.parametrize("backend", GPU_OPS_BACKENDS)
def test_double_backward(backend):
    """The backward ops are differentiable: gradgradcheck in float64 (the interpreter runs fp64)."""
    x = make((1, 4, 2, 2), torch.float64, DEVICE, requires_grad=True)
    s = make((1, 2, 4, 3), torch.float64, DEVICE, requires_grad=True)
    fn = lambda a, b: F.residual_add(a, b, relu=True, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, s))
    assert torch.autograd.gradgradcheck(fn, (x, s))


@pytest.mark.slow
@pytest.mark.parametrize("backend", GPU_OPS_BACKENDS[:1])
def test_torch_compile_fullgraph(backend):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.join = cnnkern.nn.ResidualAdd(backend=backend)

        def forward(self, x, s):
            return self.join(x * 2.0, s)

    torch._dynamo.reset()
    m = Block()
    x, s = make((2, 8, 3, 3), torch.float32, DEVICE), make((2, 4, 6, 6), torch.float32, DEVICE)
    compiled = torch.compile(m, fullgraph=True)
    assert_rel_close(compiled(x, s), _ref(x * 2.0, s, True), torch.float32)


# ------------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, nothing computed
# ------------------------------------------------------------------------------------------------
def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, device=device).to(dtype)


BAD = [
    # (x, shortcut, kwargs, exception, message fragment)
    ([[1.0]], _t(1, 1, 1, 1), {}, TypeError, "x must be a torch.Tensor, got list"),
    (_t(1, 2, 2, 2).int(), _t(1, 2, 2, 2), {}, TypeError, "x must be a floating-point tensor"),
    (_t(1, 2, 2, 2), _t(1, 2, 2, 2).long(), {}, TypeError, "shortcut must be a floating-point tensor"),
    (_t(2, 2, 2), _t(2, 2, 2), {}, ValueError, "x must be 4-D, got 3-D with shape (2, 2, 2)"),
    (_t(1, 2, 2, 2), _t(1, 2, 2, 2, 1), {}, ValueError, "shortcut must be 4-D, got 5-D"),
    (
        _t(1, 2, 2, 2),
        _t(1, 2, 2, 2, dtype=torch.float16),
        {},
        TypeError,
        "shortcut has dtype float16 but x has dtype float32",
    ),
    (_t(1, 2, 2, 2), _t(1, 2, 2, 2, device="meta"), {}, ValueError, "shortcut is on meta but x is on cpu"),
    (_t(2, 4, 2, 2), _t(3, 4, 2, 2), {}, ValueError, "shortcut has batch size 3 but x has 2"),
    (_t(1, 4, 2, 2), _t(1, 8, 4, 4), {}, ValueError, "shortcut has 8 channels, more than x's 4"),
    (_t(1, 4, 4, 4), _t(1, 4, 3, 3), {}, ValueError, "no option-A stride maps the shortcut's spatial size 3x3"),
    (_t(1, 4, 4, 2), _t(1, 4, 8, 8), {}, ValueError, "no option-A stride maps"),  # H and W disagree
    (_t(1, 2, 2, 2), _t(1, 2, 2, 2), {"relu": 1}, TypeError, "relu must be a bool, got int"),
    (_t(1, 2, 2, 2), _t(1, 2, 2, 2), {"backend": "cudnn"}, ValueError, "unknown backend 'cudnn'"),
]


@pytest.mark.parametrize("x,s,kwargs,exc,msg", BAD, ids=[b[-1][:40] for b in BAD])
def test_bad_input(x, s, kwargs, exc, msg):
    with pytest.raises(exc) as info:
        F.residual_add(x, s, **kwargs)
    assert msg in str(info.value)
    assert "residual_add" in str(info.value)


@pytest.mark.skipif(HAS_CUDA or EMULATED_CUDA, reason="checks the error on a machine without a GPU (or its emulator)")
def test_cuda_backend_on_cpu_says_what_is_missing():
    with pytest.raises(cnnkern.BackendUnavailableError) as info:
        F.residual_add(_t(1, 2, 2, 2), _t(1, 2, 2, 2), backend="cuda")
    msg = str(info.value)
    assert "residual_add: backend 'cuda' is unavailable" in msg
    assert ("CUDA tensors" in msg) or ("not built" in msg)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in ("triton", "cuda")])
def test_large_tensor_over_2_31_elements(backend):
    """int64 indexing over > 2^31 elements (fp16: 4 GiB a tensor), in the flat and strided kernels."""
    if cnnkern._backend.unavailable_reason(backend, DEVICE):
        pytest.skip(cnnkern._backend.unavailable_reason(backend, DEVICE))
    free, _ = torch.cuda.mem_get_info()
    if free < 20 * 2**30:
        pytest.skip("needs 20 GiB of free GPU memory")
    n = 2**31 + 2**20
    x = torch.randn(n // (64 * 64 * 64), 64, 64, 64, device="cuda", dtype=torch.float16)
    assert x.numel() > 2**31
    out = F.residual_add(x, x, relu=False, backend=backend)  # the flat kernel
    torch.testing.assert_close(out[-1], (x[-1].float() * 2).half())
    del out
    xt = x.transpose(2, 3)  # not dense NCHW/NHWC: the strided kernel, offsets past 2^31
    out = F.residual_add(xt, x, relu=False, backend=backend)
    torch.testing.assert_close(out[-1], (xt[-1].float() + x[-1].float()).half())
