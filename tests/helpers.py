"""Shared test helpers: per-dtype tolerances, float64 comparison by relative error norm, random
inputs in every layout the ops claim, and the backends a test can run here."""

from __future__ import annotations

import contextlib
import importlib.util
import os

import pytest
import torch

import cnnkern
from cnnkern import _backend

HAS_CUDA = torch.cuda.is_available()
# the "cuda" backend running on the CPU through the emulator (tests/conftest.py, CNNKERN_EMULATE_CUDA)
EMULATED_CUDA = bool(getattr(_backend.unavailable_reason, "emulated", False))

# Relative error norm ||out - ref|| / ||ref|| against a float64 reference. fp32 elementwise ops
# round once (~6e-8 per element); fp16/bf16 round to 11/8 bits (~5e-4 / ~4e-3 per element).
REL_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
    # fp32 convolutions on a GPU multiply in TF32 (10-bit mantissa) when PyTorch's own convolution
    # would (torch.backends.cudnn.allow_tf32, on by default): measured 2e-4..6e-4 for cuDNN and ours.
    "tf32": 2e-3,
}

# Dtypes each device can test: the Triton interpreter gives wrong results for bf16 (a known
# Triton limitation), so bf16 runs only on a GPU.
DTYPES = [torch.float32, torch.float16, torch.float64] + ([torch.bfloat16] if HAS_CUDA else [])

LAYOUTS = ["contiguous", "channels_last", "strided"]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| computed in float64 (0 when both are zero)."""
    out, ref = out.detach().double(), ref.detach().double()
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num / den if den > 0 else num


def tol(dtype: torch.dtype, matmul: bool = False, device: torch.device | None = None) -> float:
    """REL_TOL for ``dtype``; ``matmul``: the op multiplies like a convolution, so fp32 on a CUDA
    device gets the TF32 tolerance when cnnkern (like PyTorch) uses TF32 there."""
    device = DEVICE if device is None else torch.device(device)
    if matmul and dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return REL_TOL["tf32"]
    return REL_TOL[dtype]


def assert_rel_close(
    out: torch.Tensor,
    ref: torch.Tensor,
    dtype: torch.dtype,
    what: str = "output",
    matmul: bool = False,
    limit: float | None = None,
) -> None:
    """Shape, finiteness (where the reference is finite) and relative error norm within
    ``limit`` (default ``tol(dtype, matmul, out.device)``)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    finite = torch.isfinite(ref)
    bad = finite & ~torch.isfinite(out.detach().double())
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} non-finite elements where the reference is finite "
        f"(an unwritten, NaN-poisoned element?)"
    )
    err = rel_err(out, ref)
    limit = tol(dtype, matmul, out.device) if limit is None else limit
    assert err <= limit, f"{what}: relative error {err:.3e} > {limit:.1e} for {dtype}"


def assert_as_close_as_pytorch(
    out: torch.Tensor,
    eager: torch.Tensor,
    ref: torch.Tensor,
    dtype: torch.dtype,
    what: str = "output",
    cond: float = 1.0,
) -> None:
    """``out`` within twice PyTorch eager's own error in the same dtype (``eager``, both against the
    float64 ``ref``), and never looser than needed: the floor is ``tol(dtype, matmul=True)`` times
    ``cond``, the result's condition (how much it amplifies relative rounding errors of its inputs,
    where the test can bound that). For ill-conditioned results (BatchNorm's input gradient over a
    small batch amplifies rounding), where eager's error in one rounding order is no bound on
    another's."""
    assert_rel_close(out, ref, dtype, what, limit=as_close_as_pytorch_limit(out, eager, ref, dtype, cond))


def as_close_as_pytorch_limit(
    out: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, cond: float = 1.0
) -> float:
    """The relative error :func:`assert_as_close_as_pytorch` allows."""
    return max(tol(dtype, True, out.device) * cond, 2 * rel_err(eager, ref))


@contextlib.contextmanager
def ieee_fp32():
    """fp32 convolutions in full IEEE fp32 (no TF32), in cnnkern and in PyTorch alike. For gradient
    tests through a ReLU: TF32's rounding flips the sign of near-zero pre-activations, and each
    flipped mask element moves the gradient by a whole |grad| (measured 1.4e-2 relative on an H100
    for a 16-channel 1x1 conv), which measures the data rather than the kernel."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def make(shape, dtype, device, layout="contiguous", requires_grad=False) -> torch.Tensor:
    """Fresh random normal values (never zeros) with the given logical shape and memory layout:
    "contiguous" (NCHW), "channels_last" (NHWC), or "strided" (a non-contiguous view: every other
    element of a tensor twice as wide, with H and W swapped in memory)."""
    n, c, h, w = shape
    if layout == "contiguous":
        t = torch.randn(shape, dtype=torch.float64, device=device).to(dtype)
    elif layout == "channels_last":
        t = torch.randn(shape, dtype=torch.float64, device=device).to(dtype).to(memory_format=torch.channels_last)
    elif layout == "strided":
        base = torch.randn((n, c, w, 2 * h), dtype=torch.float64, device=device).to(dtype)
        t = base[..., ::2].transpose(2, 3)
        assert t.shape == shape and not t.is_contiguous() and not t.is_contiguous(memory_format=torch.channels_last)
    else:
        raise ValueError(layout)
    return t.requires_grad_(requires_grad)


def backends_for(device: torch.device, op: str | None = None) -> list:
    """pytest params for every backend, skipped (with the reason) where it cannot run or, given
    ``op``, has no kernel for that op."""
    params = []
    for name in ("torch", "triton", "cuda"):
        reason = _backend.unavailable_reason(name, device)
        if op is not None and name != "torch" and name not in _backend.AUTO_ORDER.get(op, ()):
            reason = f"no {name} kernel for {op} yet"
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        if device.type == "cuda" or (name == "cuda" and not EMULATED_CUDA):
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def wgmma_here(dtype) -> bool:
    """Whether the wgmma implicit GEMM runs here: fp16/bf16 (fp32 as TF32) on an sm_90 GPU, or on
    the emulator (an emulated compute capability 9.0 device unless CUEMU_CC says otherwise)."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if HAS_CUDA:
        return torch.cuda.get_device_capability() == (9, 0)
    return EMULATED_CUDA and os.environ.get("CUEMU_CC", "90") == "90"


def cuda_kernel_test(fn):
    """Marks a test that calls the CUDA C++ kernels directly: a `gpu` test that also runs on the
    emulator (`emulated`), skipped where neither CUDA nor the emulator, or cnnkern._C, is there."""
    skip = pytest.mark.skipif(
        not (HAS_CUDA or EMULATED_CUDA) or _backend.unavailable_reason("cuda", DEVICE) is not None,
        reason="needs CUDA and cnnkern._C",
    )
    return pytest.mark.gpu(pytest.mark.emulated(skip(fn)))


__all__ = [
    "HAS_CUDA",
    "EMULATED_CUDA",
    "DEVICE",
    "cuda_kernel_test",
    "wgmma_here",
    "REL_TOL",
    "tol",
    "assert_as_close_as_pytorch",
    "ieee_fp32",
    "DTYPES",
    "LAYOUTS",
    "rel_err",
    "assert_rel_close",
    "make",
    "backends_for",
    "cnnkern",
]


def merge_stats(stats: torch.Tensor):
    """Oracle for the BatchNorm finalize kernels: (count, mean, biased variance) per channel from
    tile statistics (rows, 3, K) of (count, mean, M2), merged in float64 with plain PyTorch
    (Chan et al.: M2 = sum M2_t + sum n_t (mean_t - mean)^2)."""
    cnt, mean_t, m2_t = stats.double().unbind(1)
    n = cnt.sum(0)
    mean = (cnt * mean_t).sum(0) / n
    m2 = m2_t.sum(0) + (cnt * (mean_t - mean) ** 2).sum(0)
    return n, mean, m2 / n


def bench_cli_in_process(monkeypatch) -> None:
    """``cnnkern bench`` as on a GPU machine, with its worker process (``cli._run_worker``) run
    inside this one: the fake ``harness.run_ops`` a test installs is the worker's suite."""
    from cnnkern import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")

    def worker(argv, out_dir, run_id, time_left):
        return cli.main(
            [
                *argv,
                "--out",
                out_dir,
                "--run-id",
                run_id,
                *(["--time-limit", f"{time_left:.0f}"] if time_left is not None else []),
            ]
        )

    monkeypatch.setattr(cli, "_run_worker", worker)


def write_run_json(out_dir, run_id: str, op: str, **fields) -> str:
    """A results file of op ``op`` in run ``run_id`` (``fields`` override its defaults)."""
    import json
    import os

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(str(out_dir), f"{op}.json")
    data = {
        "op": op,
        "env": {"run_id": run_id},
        "results": [],
        "failures": [],
        "stopped": None,
        "faulted": [],
        "resumed": [],
        **fields,
    }
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def load_script(name: str):
    """scripts/<name>.py loaded as a module (the scripts are not a package)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def randomise_bn(*models):
    """Non-trivial BatchNorm statistics and affine parameters, the same in every model."""
    gen = torch.Generator().manual_seed(0)
    named = [dict(m.named_modules()) for m in models]
    for name, mod in named[0].items():
        if isinstance(mod, torch.nn.BatchNorm2d):
            vals = [
                torch.rand(mod.num_features, generator=gen) * s + o
                for s, o in ((0.2, -0.1), (1.0, 0.5), (1.0, 0.5), (0.2, -0.1))
            ]
            for nm in named:
                bn = nm[name]
                with torch.no_grad():
                    for t, v in zip((bn.running_mean, bn.running_var, bn.weight, bn.bias), vals):
                        t.copy_(v)
