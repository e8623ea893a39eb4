"""Determinism: with ``torch.use_deterministic_algorithms(True)`` every op's forward and backward
is bitwise reproducible run to run, on every backend; where PyTorch itself has no deterministic
path (the "torch" backend's LRN on CUDA differentiates through avg_pool3d), it raises as PyTorch
does.

None of cnnkern's kernels uses atomics (checked below over kernels/*.py and csrc/**/*.cu): every
reduction is ordered (conv wgrad: split-K partials summed by the launcher in a fixed order;
BatchNorm statistics: per-tile partials merged in order; LRN: a sequential walk over channels),
so none needs a deterministic alternative. A kernel that adds an atomic reduction must either
keep an ordered alternative for deterministic mode or make its op raise there (call
``torch._C._alert_not_deterministic("cnnkern.<op>")`` before the launch, which raises under
``torch.use_deterministic_algorithms(True)`` and warns under ``warn_only=True``), and be listed
in NONDETERMINISTIC below.

Bitwise reproducibility holds within a process. On a GPU, Triton's autotuner chooses the
convolution's tile sizes by timing them once per shape, and another process may choose another
tile (another summation order); as with ``torch.backends.cudnn.benchmark``, that can change the
last bits between processes.
"""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
from helpers import DEVICE, backends_for, make

from cnnkern import functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPS = ("conv2d", "conv_bn_relu", "local_response_norm", "residual_add")

# kernel source files that use atomics, with the op that raises in deterministic mode for them
NONDETERMINISTIC: dict[str, str] = {}


@pytest.fixture
def deterministic():
    saved = torch.are_deterministic_algorithms_enabled()
    saved_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved, warn_only=saved_warn)


def test_no_kernel_uses_atomics():
    """Every Triton and CUDA C++ kernel reduces in a fixed order (or is listed as nondeterministic)."""
    pattern = re.compile(
        r"\batomic\w*\s*\(|\btl\.atomic_|\batomicAdd|\batomicCAS|\bred\.global|\batom\."
    )  # PTX red/atom too
    files = (
        sorted((ROOT / "kernels").glob("*.py"))
        + sorted((ROOT / "csrc").rglob("*.cu"))
        + sorted((ROOT / "csrc").rglob("*.cuh"))
        + sorted((ROOT / "csrc").rglob("*.h"))
    )
    assert any(f.suffix == ".py" for f in files)
    found = {str(f.relative_to(ROOT)) for f in files if pattern.search(f.read_text())}
    assert found <= set(NONDETERMINISTIC), (
        f"atomics in {sorted(found - set(NONDETERMINISTIC))}: add a "
        "deterministic path or make the op raise in deterministic mode"
    )


def _run(op, backend, inputs):
    """One forward and backward of ``op``: (output, gradients..., state...)."""
    x, w, b, gamma, beta, rm, rv, s, g = [
        t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in inputs
    ]
    if op == "conv2d":
        out = F.conv2d(x, w, b, stride=2, padding=1, activation="relu", backend=backend)
        leaves, state = (x, w, b), ()
    elif op == "conv_bn_relu":
        out = F.conv_bn_relu(x, w, None, rm, rv, gamma, beta, training=True, padding=1, backend=backend)
        leaves, state = (x, w, gamma, beta), (rm, rv)
    elif op == "local_response_norm":
        out = F.local_response_norm(x, 5, alpha=1e-2, k=2.0, backend=backend)
        leaves, state = (x,), ()
    else:
        out = F.residual_add(x, s, backend=backend)
        leaves, state = (x, s), ()
    grads = torch.autograd.grad(out, leaves, g[: out.numel()].view_as(out))
    return (out, *grads, *state)


def _inputs(op):
    # big enough that the conv wgrad splits its reduction (split-K) and LRN splits channels
    x = make((4, 16, 9, 9), torch.float32, DEVICE, "channels_last", requires_grad=True)
    w = make((16, 16, 3, 3), torch.float32, DEVICE, requires_grad=True)
    b = torch.randn(16, device=DEVICE, requires_grad=True)
    gamma = torch.rand(16, device=DEVICE).add(0.5).requires_grad_()
    beta = torch.randn(16, device=DEVICE, requires_grad=True)
    rm, rv = torch.randn(16, device=DEVICE), torch.rand(16, device=DEVICE) + 0.5
    s = make((4, 8, 18, 17), torch.float32, DEVICE, "strided", requires_grad=True)  # option A, stride 2
    x_res = make((4, 16, 9, 9), torch.float32, DEVICE, "contiguous", requires_grad=True)
    g = torch.randn(4 * 16 * 9 * 9, device=DEVICE)
    return (x_res if op == "residual_add" else x), w, b, gamma, beta, rm, rv, s, g


def _params():
    out = []
    for op in OPS:
        for p in backends_for(DEVICE, op):
            out.append(pytest.param(op, p.values[0], marks=p.marks, id=f"{op}-{p.values[0]}"))
    return out


@pytest.mark.parametrize("op,backend", _params())
def test_bitwise_reproducible(op, backend, deterministic):
    inputs = _inputs(op)
    if backend == "torch" and op == "local_response_norm" and DEVICE.type == "cuda":
        # PyTorch's LRN differentiates through avg_pool3d, whose CUDA backward has no deterministic
        # implementation: PyTorch raises, and so does the torch backend (it *is* PyTorch's LRN)
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            _run(op, backend, inputs)
        return
    first = _run(op, backend, inputs)
    second = _run(op, backend, inputs)
    for i, (a, b) in enumerate(zip(first, second)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), f"{op}/{backend}: result {i} differs between two identical runs"


def test_deterministic_mode_is_restored(deterministic):
    assert torch.are_deterministic_algorithms_enabled()


def test_deterministic_mode_picks_conv_tiles_by_shape_not_by_timing(monkeypatch, deterministic):
    # The autotuner's pick depends on timings, which can differ between processes; in deterministic
    # mode the tile is a function of the shape (and the GPU's SM count) only, and nothing is timed.
    import triton

    from cnnkern.kernels import conv2d as k

    cfgs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn})
        for bm, bn in [(128, 128), (128, 64), (64, 128), (64, 64), (128, 256)]
    ]
    pick = lambda M, N, sms: (lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]))(  # noqa: E731
        k.deterministic_config(cfgs, M, N, sms)
    )
    assert pick(100352, 256, 132) == (128, 256)  # plenty of tiles: the largest
    assert pick(6272, 256, 132) == (128, 64)  # 49 or 98 larger tiles would leave SMs idle; a tie: list order
    assert pick(1568, 512, 132) == (64, 64)  # only the smallest tile gives every SM one
    assert pick(1568, 64, 132) == (64, 64)  # nothing fills the GPU: the smallest
    assert pick(1568, 64, 132) == pick(1568, 64, 132)

    def no_autotune(*a, **kw):
        raise AssertionError("the autotuner ran in deterministic mode")

    monkeypatch.setattr(k, "_TUNED", {})
    monkeypatch.setattr(type(k._fwd_kernel), "run", no_autotune)
    x = torch.randn(2, 8, 6, 6)
    w = torch.randn(4, 8, 3, 3)
    y = torch.empty(2, 4, 6, 6)
    k.conv2d_forward(x, w, None, y, [1, 1], [1, 1], [1, 1], 1, False, "ieee")
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, padding=1), rtol=1e-5, atol=1e-5)
    assert any(key[-1] is True for key in k._TUNED)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, batch", [(torch.float32, 32), (torch.float64, 4)])
def test_deterministic_triton_conv_on_a_large_layer_launches(dtype, batch, deterministic):
    """The shape-based tile of a large layer: ResNet-50's first 3x3 (64 channels, 56x56) would have
    been the 128x256 tile, whose fp32 pipeline (288 KiB) and fp64 one exceed any GPU's shared
    memory per block, and the launch would have failed; the pruning now keeps only tiles that fit.
    Forward and backward, against float64."""
    from helpers import assert_rel_close

    x = make((batch, 64, 56, 56), dtype, DEVICE, "channels_last", requires_grad=True)
    w = make((64, 64, 3, 3), dtype, DEVICE, "channels_last", requires_grad=True)
    y = F.conv2d(x, w, padding=1, backend="triton")
    gy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.nn.functional.conv2d(xd, wd, padding=1)
    gxd, gwd = torch.autograd.grad(ref, (xd, wd), gy.double())
    for out, r, what in ((y, ref, "output"), (gx, gxd, "grad input"), (gw, gwd, "grad weight")):
        assert_rel_close(out, r, dtype, what, matmul=True)
