"""Tensors past 2^31 elements: every kernel either indexes in int64 or refuses the input with a
clear error before launch.

What each kernel does (Triton: kernels/*.py; CUDA C++: csrc/cuda/*.cu):

* residual add: int64 offsets everywhere (Triton: the flat kernel switches to int64 program
  offsets when numel + BLOCK passes 2^31 - 1, the strided and shortcut-backward kernels always
  use int64; CUDA: int64 grid-stride loops). Any size works.
* LRN: int64 memory offsets; the spatial index within one image (H*W) is int32, so the Triton
  launchers refuse H*W + 4096 > 2^31 - 1 (and a grid over 2^31 - 1 programs); the CUDA kernels
  use int64 positions and refuse C >= 2^29.
* conv2d (and conv_bn_relu's convolution): offsets scale with the batch index in int64, so a
  batch may pass 2^31 elements, but one image (or the weight) must span fewer than 2^31 elements:
  larger ones are refused (kernels/conv2d.py: _check_int32_extent).
* conv_bn_relu's BatchNorm kernels: int64 element offsets, and (since this file was written) the
  channels_last reduction's row start j * rows_per_prog is int64 too, so N*P*Q may pass 2^31.

The CPU tests check the refusals and the int64 switches on meta tensors (shapes only, no memory);
the GPU tests run real tensors of more than 2^31 elements, skipped when the GPU lacks the memory.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import DEVICE, HAS_CUDA

import cnnkern
from cnnkern import functional as F

INT32_MAX = 2**31 - 1
META = torch.device("meta")


class _Recorder:
    """Stands in for a @triton.jit kernel: records the launch instead of running it."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, args, kwargs))

        return launch


def _kernels():
    from cnnkern.kernels import conv2d, conv_bn_relu, local_response_norm, residual_add

    return conv2d, conv_bn_relu, local_response_norm, residual_add


# ------------------------------------------------------------------------------------------------
# CPU: refusals and int64 switches, on meta tensors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "numel,int64",
    [(2**20, False), (INT32_MAX - 4096, False), (INT32_MAX - 4095, True), (2**31 + 5, True), (3 * 2**31, True)],
)
def test_residual_flat_kernel_switches_to_int64(monkeypatch, numel, int64):
    _, _, _, kr = _kernels()
    rec = _Recorder()
    monkeypatch.setattr(kr, "_flat_kernel", rec)
    a = torch.empty(numel, device=META, dtype=torch.float16)
    kr._launch_flat(a, a, a, relu_grad=False, relu=True)
    ((grid, args, kwargs),) = rec.calls
    assert kwargs["INT64"] is int64
    assert grid == (-(-numel // kwargs["BLOCK"]),)
    assert grid[0] <= INT32_MAX


def test_residual_strided_kernels_offset_in_int64():
    """The strided forward and the shortcut backward form every offset from an int64 program
    offset (a static check of the kernels' source: their arithmetic cannot be run at 2^31 here)."""
    _, _, _, kr = _kernels()
    for kernel in (kr._strided_kernel, kr._shortcut_bwd_kernel):
        src = inspect.getsource(kernel.fn)
        assert "tl.program_id(0).to(tl.int64) * BLOCK" in src, kernel.fn.__name__


def test_conv_bn_relu_kernels_offset_in_int64():
    _, kb, _, _ = _kernels()
    for kernel in (kb._apply_kernel, kb._dy_kernel):
        assert "tl.program_id(0).to(tl.int64) * BLOCK" in inspect.getsource(kernel.fn)
    src = inspect.getsource(kb._reduce_kernel.fn)
    assert "r0 = j.to(tl.int64) * rows_per_prog" in src
    assert "rows.to(tl.int64)[:, None] * K" in src and "j.to(tl.int64) * K * PQ" in src


@pytest.mark.parametrize("fn", ["forward", "backward"])
def test_lrn_refuses_too_many_positions_per_image_before_launch(monkeypatch, fn):
    _, _, kl, _ = _kernels()
    rec = _Recorder()
    monkeypatch.setattr(kl, "_fwd_kernel", rec)
    monkeypatch.setattr(kl, "_bwd_kernel", rec)
    x = torch.empty(1, 2, 46341, 46341, device=META)  # H*W = 2,147,488,281 > 2^31 - 1
    with pytest.raises(ValueError, match=r"local_response_norm: H\*W = 46341\*46341 = 2147488281 spatial positions"):
        if fn == "forward":
            kl.local_response_norm_forward(x, torch.empty_like(x), 5, 1e-4, 0.75, 1.0)
        else:
            kl.local_response_norm_backward(x, x, torch.empty_like(x), 5, 1e-4, 0.75, 1.0)
    assert rec.calls == []  # refused before launch


def test_lrn_accepts_large_batches_and_the_largest_image(monkeypatch):
    """Many images (3 * 2^31 elements in all) launch, with int64 batch offsets; so does one image of
    2^31 - 1 - 4096 positions."""
    _, _, kl, _ = _kernels()
    rec = _Recorder()
    monkeypatch.setattr(kl, "_fwd_kernel", rec)
    x = torch.empty(3 * 2**10, 64, 256, 128, device=META)
    assert x.numel() == 3 * 2**31
    kl.local_response_norm_forward(x, torch.empty_like(x), 5, 1e-4, 0.75, 1.0)
    ((grid, args, _),) = rec.calls
    assert 0 < grid[0] <= INT32_MAX
    kl._check_index_range(torch.empty(1, 1, 1, INT32_MAX - 4096, device=META))


def test_lrn_refuses_a_grid_over_2_31_programs():
    _, _, kl, _ = _kernels()
    with pytest.raises(ValueError, match="programs exceed the 2"):
        kl._check_grid(2**31, (1, 1, 1, 1))


def test_conv_refuses_an_image_over_2_31_elements_before_launch():
    kc, _, _, _ = _kernels()
    x = torch.empty(1, 2, 32768, 32769, device=META)  # one image: 2^31 + 65536 elements
    w = torch.empty(4, 2, 1, 1, device=META)
    y = torch.empty(1, 4, 32768, 32769, device=META)
    with pytest.raises(ValueError, match="conv2d: one item of input spans 2147549184 elements, more than 2"):
        kc.conv2d_forward(x, w, None, y, (1, 1), (0, 0), (1, 1), 1, False, "ieee")
    gy = torch.empty(1, 4, 32768, 32769, device=META)
    with pytest.raises(ValueError, match="one item of grad_output spans"):
        kc.conv2d_backward_input(gy, w, x, (1, 1), (0, 0), (1, 1), 1, "ieee")
    with pytest.raises(ValueError, match="one item of grad_output spans"):
        kc.conv2d_backward_weight(gy, x, torch.empty_like(w), None, (1, 1), (0, 0), (1, 1), 1, "ieee")


def test_conv_accepts_a_batch_over_2_31_elements():
    """Only one image's extent is limited: a batch of small images passes the check."""
    kc, _, _, _ = _kernels()
    x = torch.empty(2**16, 64, 32, 32, device=META)
    assert x.numel() > 2**31
    kc._check_int32_extent("input", x)
    kc._check_int32_extent("input", x.to(memory_format=torch.channels_last))


def test_cuda_kernels_index_in_int64():
    """Static check of the CUDA C++ sources (compiled and run only on a GPU machine): residual add's
    and LRN's launchers pass int64 sizes and strides, their loops run over int64 items, and LRN
    refuses C >= 2^29 before launch."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda"
    res = (root / "residual_add.cu").read_text()
    assert "int64_t numel" in res and "for (int64_t i = " in res
    assert "int64_t C, H, W, Cs;" in res and "int64_t sx[4];" in res
    lrn = (root / "local_response_norm.cu").read_text()
    assert "for (int64_t item = " in lrn and "int64_t sx[4];" in lrn
    assert "x.size(1) < (int64_t{1} << 29)" in lrn
    assert "static_cast<int64_t>(ch) * stride" in lrn


# ------------------------------------------------------------------------------------------------
# GPU: real tensors past 2^31 elements
# ------------------------------------------------------------------------------------------------
def _need_gib(gib):
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free GPU memory, {free / 2**30:.1f} free")


def _backend_or_skip(backend, op):
    reason = cnnkern._backend.unavailable_reason(backend, DEVICE)
    if backend not in cnnkern._backend.AUTO_ORDER.get(op, ()):
        reason = f"no {backend} kernel for {op}"
    if reason:
        pytest.skip(reason)


@pytest.fixture
def _free_cuda_memory():
    yield
    if HAS_CUDA:
        torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_lrn_over_2_31_elements(backend, _free_cuda_memory):
    _backend_or_skip(backend, "local_response_norm")
    _need_gib(24)
    x = torch.randn(33, 64, 1024, 1000, device="cuda", dtype=torch.float16)  # 2.16e9 elements
    assert x.numel() > 2**31
    x.requires_grad_()
    y = F.local_response_norm(x, 5, alpha=1e-2, k=2.0, backend=backend)
    last = x[-1:].detach().float().requires_grad_()  # the image whose offsets pass 2^31
    ref = torch.nn.functional.local_response_norm(last, 5, alpha=1e-2, k=2.0)
    torch.testing.assert_close(y[-1:].float(), ref, rtol=2e-3, atol=2e-3)
    g = torch.ones_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    del y, g
    (gr,) = torch.autograd.grad(ref, last, torch.ones_like(ref))
    torch.testing.assert_close(gx[-1:].float(), gr, rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_residual_add_backward_over_2_31_elements(backend, _free_cuda_memory):
    """Option A forward and both backward kernels (ReLU mask, shortcut adjoint) past 2^31."""
    _backend_or_skip(backend, "residual_add")
    _need_gib(30)
    n = 2**31 // (64 * 64 * 64) + 2  # x: (n, 64, 64, 64) fp16 > 2^31 elements
    x = torch.randn(n, 64, 64, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    s = torch.randn(n, 32, 128, 128, device="cuda", dtype=torch.float16, requires_grad=True)  # > 2^31 too
    assert x.numel() > 2**31 and s.numel() > 2**31
    y = F.residual_add(x, s, backend=backend)
    want_last = torch.relu(x[-1].float() + torch.nn.functional.pad(s[-1, :, ::2, ::2].float(), (0, 0, 0, 0, 0, 32)))
    torch.testing.assert_close(y[-1].float(), want_last, rtol=1e-3, atol=1e-3)
    gx, gs = torch.autograd.grad(y, (x, s), torch.ones_like(y))
    mask = (want_last > 0).half()
    torch.testing.assert_close(gx[-1], mask)
    torch.testing.assert_close(gs[-1, :, ::2, ::2], mask[:32])
    assert not gs[-1, :, 1::2].any() and not gs[-1, :, :, 1::2].any()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_conv2d_batch_over_2_31_elements(backend, _free_cuda_memory):
    """A batch past 2^31 elements (each image small): forward, input and weight gradients."""
    _backend_or_skip(backend, "conv2d")
    _need_gib(30)
    n = 2**31 // (16 * 128 * 128) + 2
    x = torch.randn(n, 16, 128, 128, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(16, 16, 1, 1, device="cuda", dtype=torch.float16, requires_grad=True)
    assert x.numel() > 2**31
    y = F.conv2d(x, w, backend=backend)
    ref_last = torch.nn.functional.conv2d(x[-1:].detach().float(), w.detach().float())
    torch.testing.assert_close(y[-1:].float(), ref_last, rtol=2e-2, atol=2e-2)
    gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    torch.testing.assert_close(
        gx[-1].float(), w.detach().float().sum(0).view(16, 1, 1).expand(16, 128, 128), rtol=1e-2, atol=1e-2
    )
    want_gw = x.detach().float().sum(dim=(0, 2, 3)).view(1, 16, 1, 1).expand(16, 16, 1, 1)
    torch.testing.assert_close(gw.float(), want_gw, rtol=1e-2, atol=1e-2 * float(want_gw.abs().max()))


@pytest.mark.gpu
def test_gpu_conv_bn_relu_training_over_2_31_rows(_free_cuda_memory):
    """BatchNorm statistics and backward over N*P*Q > 2^31 rows (channels_last reduction)."""
    _backend_or_skip("triton", "conv_bn_relu")
    _need_gib(64)
    n = 2**31 // (64 * 64) + 16  # M = N*64*64 > 2^31 rows, K = 2 channels
    x = torch.randn(n, 2, 64, 64, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.eye(2, device="cuda", dtype=torch.float16).view(2, 2, 1, 1).requires_grad_()
    gamma = torch.ones(2, device="cuda", requires_grad=True)
    beta = torch.zeros(2, device="cuda", requires_grad=True)
    y = F.conv_bn_relu(x, w, None, None, None, gamma, beta, training=True, relu=False, backend="triton")
    assert y.shape[0] * y.shape[2] * y.shape[3] > 2**31
    mean = y.float().mean(dim=(0, 2, 3))
    var = y.float().var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, torch.zeros(2, device="cuda"), atol=1e-2, rtol=0)
    torch.testing.assert_close(var, torch.ones(2, device="cuda"), atol=1e-2, rtol=0)
    # loss = sum(y^2) / 2 with y = xhat: dgamma = sum(xhat^2) = M, dbeta = sum(xhat) = 0, dx = 0
    gx, gg, gb = torch.autograd.grad(y, (x, gamma, beta), y)
    m = y.shape[0] * y.shape[2] * y.shape[3]
    torch.testing.assert_close(gg, torch.full((2,), float(m), device="cuda"), rtol=1e-2, atol=0)
    assert float(gb.abs().max()) < 1e-2 * m
    assert float(gx.float().abs().max()) < 5e-2
