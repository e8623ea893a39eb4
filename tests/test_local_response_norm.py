"""local_response_norm: forward and input gradient against float64 torch.nn.functional.local_response_norm,
in every backend that can run here, every dtype and layout, odd and even window sizes (even sizes
have an asymmetric window, mirrored in the backward), a window wider than the channels, 3-D and
5-D inputs; numerics (cancellation, non-finite values); registration (opcheck, gradcheck,
torch.compile); the module; bad input.

Shapes are small because the Triton kernels run under the interpreter here: its cost grows with
programs x channel steps, not with elements."""

import random

import pytest
import torch
from helpers import DEVICE, DTYPES, EMULATED_CUDA, HAS_CUDA, LAYOUTS, assert_rel_close, backends_for, make

import cnnkern
from cnnkern import functional as F

OP = "local_response_norm"
BACKENDS = backends_for(DEVICE, OP)
GPU_OPS_BACKENDS = [b for b in ("triton", "cuda") if cnnkern._backend.unavailable_reason(b, DEVICE) is None]

SHAPE = (2, 7, 5, 4)  # 7 channels: windows clipped at both ends for every size below; odd H*W
# size: why it is here
SIZES = {
    1: "window of the channel alone (P = Q = 0)",
    2: "smallest even size: window [c-1, c], backward window [c, c+1]",
    3: "odd, symmetric",
    4: "even: two channels before, one after",
    5: "AlexNet's n",
    7: "as wide as the channels",
    11: "wider than the channels (P, Q clipped to C - 1)",
}


def _params(seed: int):
    """Random alpha, beta, k (alpha large enough that the window sum matters)."""
    r = random.Random(seed)
    return r.uniform(0.2, 2.0), r.uniform(0.3, 1.2), r.uniform(0.5, 2.5)


def _ref(x, size, alpha, beta, k):
    return torch.nn.functional.local_response_norm(x.detach().double(), size, alpha, beta, k)


def _ref_grad(x, g, size, alpha, beta, k):
    xr = x.detach().double().requires_grad_()
    y = torch.nn.functional.local_response_norm(xr, size, alpha, beta, k)
    (gx,) = torch.autograd.grad(y, xr, g.detach().double())
    return gx


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", [1, 2, 4, 5, 11])
def test_forward(backend, dtype, layout, size):
    alpha, beta, k = _params(size)
    x = make(SHAPE, dtype, DEVICE, layout)
    out = F.local_response_norm(x, size, alpha, beta, k, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    ref = _ref(x, size, alpha, beta, k)
    assert_rel_close(out, ref, dtype)
    if dtype in (torch.float32, torch.float64):
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    if backend != "torch":
        assert (
            out.is_contiguous(memory_format=torch.channels_last) if layout == "channels_last" else out.is_contiguous()
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", list(SIZES), ids=[f"size{s}" for s in SIZES])
def test_forward_every_size_fp64(backend, size):
    alpha, beta, k = _params(100 + size)
    x = make(SHAPE, torch.float64, DEVICE)
    out = F.local_response_norm(x, size, alpha, beta, k, backend=backend)
    torch.testing.assert_close(out, _ref(x, size, alpha, beta, k), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 6, 9), (1, 5, 2, 3, 4)], ids=["3d", "5d"])
@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
def test_3d_and_5d(backend, shape, layout):
    alpha, beta, k = 0.9, 0.75, 1.5
    if layout == "contiguous":
        x = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    else:  # channels innermost in memory (channels_last_3d for 5-D; (N, L, C) transposed for 3-D)
        perm = (0, *range(2, len(shape)), 1)
        inv = [perm.index(d) for d in range(len(shape))]
        x = torch.randn([shape[p] for p in perm], dtype=torch.float64, device=DEVICE).permute(inv)
        assert x.shape == shape and not x.is_contiguous()
    x.requires_grad_()
    out = F.local_response_norm(x, 4, alpha, beta, k, backend=backend)
    torch.testing.assert_close(out, _ref(x, 4, alpha, beta, k), rtol=1e-12, atol=1e-12)
    g = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    (gx,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(gx, _ref_grad(x, g, 4, alpha, beta, k), rtol=1e-11, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", list(SIZES), ids=[f"size{s}" for s in SIZES])
def test_gradients_every_size_fp64(backend, size):
    """The backward window is the forward one mirrored: even sizes catch a wrong orientation."""
    alpha, beta, k = _params(200 + size)
    x = make(SHAPE, torch.float64, DEVICE, requires_grad=True)
    g = make(SHAPE, torch.float64, DEVICE)
    (gx,) = torch.autograd.grad(F.local_response_norm(x, size, alpha, beta, k, backend=backend), x, g)
    torch.testing.assert_close(gx, _ref_grad(x, g, size, alpha, beta, k), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else []), ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients(backend, dtype, layout):
    size = 4
    alpha, beta, k = _params(300)
    x = make(SHAPE, dtype, DEVICE, layout, requires_grad=True)
    g = make(SHAPE, dtype, DEVICE, layout)
    (gx,) = torch.autograd.grad(F.local_response_norm(x, size, alpha, beta, k, backend=backend), x, g)
    assert gx.dtype == dtype and gx.shape == x.shape
    assert_rel_close(gx, _ref_grad(x, g, size, alpha, beta, k), dtype, "grad input")


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_grad_and_mixed_layouts(backend):
    """out.sum().backward() hands the backward an expanded (all-zero strides) gradient; x is a
    strided view. Both are read through their strides."""
    x = make((1, 6, 3, 4), torch.float32, DEVICE, "strided", requires_grad=True)
    F.local_response_norm(x, 3, 1.0, 0.75, 1.0, backend=backend).sum().backward()
    ones = torch.ones(x.shape, dtype=torch.float64, device=DEVICE)
    assert_rel_close(x.grad, _ref_grad(x, ones, 3, 1.0, 0.75, 1.0), torch.float32, "grad input")


@pytest.mark.skipif(
    cnnkern._backend.unavailable_reason("triton", DEVICE) is not None, reason="needs the Triton backend"
)
@pytest.mark.parametrize("size", [2, 5])
def test_channel_chunks(size):
    """Few positions and many channels split the channel walk into chunks, each re-entering the
    window of its first channel (CPU shapes are too small to trigger it: forced here, at the
    launcher). Chunks of 1 and 3 channels put chunk boundaries inside every window."""
    from cnnkern.kernels import local_response_norm as K

    x = make((1, 11, 3, 2), torch.float64, DEVICE, "channels_last")
    g = make((1, 11, 3, 2), torch.float64, DEVICE)
    ref, rg = _ref(x, size, 0.8, 0.7, 1.3), _ref_grad(x, g, size, 0.8, 0.7, 1.3)
    for chunk in (1, 3):
        out = torch.full_like(x, float("nan"))
        K.local_response_norm_forward(x, out, size, 0.8, 0.7, 1.3, chunk=chunk)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        gi = torch.full_like(x, float("nan"))
        K.local_response_norm_backward(g, x, gi, size, 0.8, 0.7, 1.3, chunk=chunk)
        torch.testing.assert_close(gi, rg, rtol=1e-11, atol=1e-12)
    # the rule: AlexNet NORM2 at batch 128 on 132 SMs splits 256 channels into 6 chunks; NORM1 into 2
    assert K._channel_chunk(128 * 27 * 27, 256, 5, 132, None) == 43
    assert K._channel_chunk(128 * 55 * 55, 96, 5, 132, None) == 48
    assert K._channel_chunk(2 * 5 * 4, 7, 5, 132, None) == 7  # too few channels to split


# ------------------------------------------------------------------------------------------------
# numerics
# ------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in the interpreter: log2(0), inf * 0
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_square_leaves_no_cancellation_error(backend):
    """A channel 1e4 times larger than the rest: once it has left the window, a plain running sum
    of squares would carry a rounding error of ~1e8 * 2^-24 ~ 6 into sums of order 1."""
    x = make((1, 16, 2, 3), torch.float32, DEVICE)
    x[:, 2] *= 1e4
    out = F.local_response_norm(x, 3, 1.0, 0.75, 0.0, backend=backend)  # k = 0: scale is the bare window sum
    # 1e-5: a few ulp for the GPU's pow (measured 3.8e-6 on an H100), far below the error it guards against
    torch.testing.assert_close(out.double(), _ref(x, 3, 1.0, 0.75, 0.0), rtol=1e-5, atol=0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in the interpreter: log2(0), inf * 0
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_affect_only_their_windows(backend):
    x = make((1, 12, 2, 2), torch.float32, DEVICE)
    x[0, 2, 0, 0] = float("nan")
    x[0, 5, 1, 1] = float("inf")
    x[0, 8, 0, 1] = float("-inf")
    out = F.local_response_norm(x, 3, 0.5, 0.75, 1.0, backend=backend)
    ref = _ref(x, 3, 0.5, 0.75, 1.0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert torch.isfinite(out[0, 10:]).all()  # channels after the last non-finite window


@pytest.mark.parametrize("backend", BACKENDS)
def test_alexnet_paper_constants(backend):
    """The paper's k=2, n=5, alpha=1e-4, beta=0.75 (alpha not divided by n) is size=5, alpha=5e-4 here."""
    x = make((1, 8, 2, 2), torch.float64, DEVICE) * 30
    out = F.local_response_norm(x, 5, 5e-4, 0.75, 2.0, backend=backend)
    c = torch.arange(8)
    paper = torch.empty_like(x)
    for i in range(8):
        win = (c >= i - 2) & (c <= i + 2)
        paper[:, i] = x[:, i] / (2.0 + 1e-4 * (x[:, win] ** 2).sum(1)) ** 0.75
    torch.testing.assert_close(out, paper, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    for shape in [(0, 4, 3, 3), (2, 4, 0, 3), (2, 0, 3, 3), (2, 3, 4, 0, 5)]:
        x = torch.randn(shape, device=DEVICE, requires_grad=True)
        out = F.local_response_norm(x, 3, backend=backend)
        assert out.shape == x.shape
        out.sum().backward()
        assert x.grad.shape == x.shape


# ------------------------------------------------------------------------------------------------
# module
# ------------------------------------------------------------------------------------------------
def test_module_is_a_drop_in():
    torch_m = torch.nn.LocalResponseNorm(4, alpha=0.3, beta=0.6, k=1.5)
    m = cnnkern.nn.LocalResponseNorm(4, alpha=0.3, beta=0.6, k=1.5)
    assert isinstance(m, torch.nn.LocalResponseNorm)
    m.load_state_dict(torch_m.state_dict())
    assert (m.size, m.alpha, m.beta, m.k) == (4, 0.3, 0.6, 1.5)
    x = make(SHAPE, torch.float64, DEVICE)
    torch.testing.assert_close(m(x), torch_m(x), rtol=1e-12, atol=1e-12)
    assert repr(m) == "LocalResponseNorm(4, alpha=0.3, beta=0.6, k=1.5)"
    assert "backend='triton'" in repr(cnnkern.nn.LocalResponseNorm(5, backend="triton"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_backend(backend):
    m = cnnkern.nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0, backend=backend)
    x = make(SHAPE, torch.float32, DEVICE, "channels_last") * 10
    assert_rel_close(m(x), _ref(x, 5, 5e-4, 0.75, 2.0), torch.float32)


# ------------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", GPU_OPS_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(backend, layout):
    x = make((1, 5, 3, 2), torch.float32, DEVICE, layout, requires_grad=True)
    ops = torch.ops.cnnkern
    torch.library.opcheck(ops.local_response_norm.default, (x, 2, 0.8, 0.75, 1.2, backend))
    g = make((1, 5, 3, 2), torch.float32, DEVICE, layout)
    torch.library.opcheck(ops.local_response_norm_backward.default, (g, x.detach(), 2, 0.8, 0.75, 1.2, backend))


@pytest.mark.gpu
@pytest.mark.skipif(not cnnkern._backend.has_extension(), reason="cnnkern._C not built")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_cuda_kernels(layout):
    x = make((2, 9, 5, 3), torch.float16, DEVICE, layout)
    g = make((2, 9, 5, 3), torch.float16, DEVICE, layout)
    ops = torch.ops.cnnkern
    torch.library.opcheck(ops.local_response_norm_cuda.default, (x, 4, 0.8, 0.75, 1.2))
    torch.library.opcheck(ops.local_response_norm_backward_cuda.default, (g, x, 4, 0.8, 0.75, 1.2))


@pytest.mark.gpu
@pytest.mark.skipif(not cnnkern._backend.has_extension(), reason="cnnkern._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_and_triton_agree_on_alexnet_shapes(dtype, layout):
    """NORM1/NORM2-like shapes (reduced batch): many channels, odd H*W, both GPU backends."""
    for shape in [(4, 96, 55, 55), (4, 256, 27, 27)]:
        x = make(shape, dtype, DEVICE, layout, requires_grad=True)
        g = make(shape, dtype, DEVICE, layout)
        ref = _ref(x, 5, 5e-4, 0.75, 2.0)
        rg = _ref_grad(x, g, 5, 5e-4, 0.75, 2.0)
        for backend in ("cuda", "triton"):
            out = F.local_response_norm(x, 5, 5e-4, 0.75, 2.0, backend=backend)
            (gx,) = torch.autograd.grad(out, x, g)
            assert_rel_close(out, ref, dtype)
            assert_rel_close(gx, rg, dtype, "grad input")


@pytest.mark.parametrize("backend", GPU_OPS_BACKENDS)
@pytest.mark.parametrize("size", [2, 3])
def test_gradcheck(backend, size):
    x = make((1, 5, 2, 1), torch.float64, DEVICE, requires_grad=True)
    fn = lambda t: F.local_response_norm(t, size, 0.9, 0.7, 1.3, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)


@pytest.mark.slow
@pytest.mark.parametrize("backend", GPU_OPS_BACKENDS[:1])
def test_torch_compile_fullgraph(backend):
    m = cnnkern.nn.LocalResponseNorm(3, alpha=0.5, backend=backend)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: m(t * 2.0), fullgraph=True)
    x = make((1, 5, 3, 2), torch.float32, DEVICE)
    assert_rel_close(compiled(x), _ref(x * 2.0, 3, 0.5, 0.75, 1.0), torch.float32)


# ------------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument
# ------------------------------------------------------------------------------------------------
def _t(*shape, dtype=torch.float32):
    return torch.randn(shape).to(dtype)


BAD = [
    # (input, size, kwargs, exception, message fragment)
    ([[1.0]], 3, {}, TypeError, "input must be a torch.Tensor, got list"),
    (_t(1, 4, 2, 2).int(), 3, {}, TypeError, "input must be a floating-point tensor"),
    (_t(4, 2), 3, {}, ValueError, "input must have 3 or more dimensions (N, C, *), got 2-D"),
    (_t(1, 4, 2, 2), 0, {}, ValueError, "size must be >= 1, got 0"),
    (_t(1, 4, 2, 2), 2.0, {}, TypeError, "size must be an int, got float"),
    (_t(1, 4, 2, 2), True, {}, TypeError, "size must be an int, got bool"),
    (_t(1, 4, 2, 2), 3, {"alpha": "1"}, TypeError, "alpha must be a real number, got str"),
    (_t(1, 4, 2, 2), 3, {"beta": None}, TypeError, "beta must be a real number, got NoneType"),
    (_t(1, 4, 2, 2), 3, {"k": torch.tensor(1.0)}, TypeError, "k must be a real number, got Tensor"),
    (_t(1, 4, 2, 2), 3, {"backend": "cudnn"}, ValueError, "unknown backend 'cudnn'"),
]


@pytest.mark.parametrize("x,size,kwargs,exc,msg", BAD, ids=[b[-1][:40] for b in BAD])
def test_bad_input(x, size, kwargs, exc, msg):
    with pytest.raises(exc) as info:
        F.local_response_norm(x, size, **kwargs)
    assert msg in str(info.value)
    assert OP in str(info.value)


@pytest.mark.skipif(HAS_CUDA or EMULATED_CUDA, reason="checks the error on a machine without a GPU (or its emulator)")
def test_cuda_backend_on_cpu_says_what_is_missing():
    with pytest.raises(cnnkern.BackendUnavailableError) as info:
        F.local_response_norm(_t(1, 2, 2, 2), 3, backend="cuda")
    assert "local_response_norm: backend 'cuda' is unavailable" in str(info.value)


@pytest.mark.skipif(not cnnkern._backend.has_extension(), reason="cnnkern._C not built")
@pytest.mark.parametrize("op", ["local_response_norm_cuda", "local_response_norm_backward_cuda"])
def test_cuda_ops_registered_with_fake_implementations(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cnnkern::{op}", "CUDA")
    with torch._subclasses.fake_tensor.FakeTensorMode():
        x = torch.empty(2, 8, 4, 4, device="cuda" if HAS_CUDA else "meta").to(memory_format=torch.channels_last)
        args = (x, 5, 1e-4, 0.75, 1.0) if op == "local_response_norm_cuda" else (x, x, 5, 1e-4, 0.75, 1.0)
        out = getattr(torch.ops.cnnkern, op)(*args)
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
