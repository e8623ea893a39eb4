"""`cnnkern inspect`: the Triton kernels compile ahead of time for sm_90 and sm_80 without a GPU,
the main conv kernels use wgmma (sm_90) / mma (sm_80), and no kernel spills."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report():
    # a fresh process without the interpreter: interpreted kernels cannot be compiled
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "cnnkern._inspect", "--json"], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=600)
    assert res.stdout, res.stderr
    return res.returncode, json.loads(res.stdout)


def test_inspect_passes(report):
    rc, data = report
    bad = [r for r in data["triton"] if not r["ok"]]
    assert rc == 0 and not bad, bad


def test_main_bf16_conv_kernel_uses_wgmma_on_hopper(report):
    _, data = report
    rows = [r for r in data["triton"] if r["label"].startswith("conv2d forward 3x3, bf16") and r["arch"] == 90]
    assert rows, "the main conv kernel was not compiled"
    for r in rows:
        assert r["wgmma"] > 0, r
        assert r["stack"] == 0 and r["local"] == 0, r


def test_every_kernel_and_arch_was_compiled(report):
    _, data = report
    labels = {r["label"] for r in data["triton"]}
    assert {"conv2d forward 3x3, bf16 NHWC", "conv2d forward 1x1 (GEMM), bf16 NHWC", "conv2d dgrad 3x3, bf16 NHWC",
            "conv2d wgrad 3x3, bf16 NHWC", "conv2d wgrad split-K sum, bf16 weight",
            "conv2d forward 3x3 split-K partials, bf16 NHWC", "conv2d forward split-K sum + residual + ReLU, bf16 NHWC",
            "conv2d forward split-K sum + BatchNorm statistics, bf16 NHWC",
            "conv2d dgrad 3x3 split-K partials, bf16 NHWC",
            "conv_bn_relu finalize, fp32 stats, bf16 params", "conv_bn_relu finalize, fp64",
            "conv_bn_relu backward coefficients, bf16 params", "conv_bn_relu apply + ReLU, bf16 NHWC",
            "conv_bn_relu backward reductions, bf16 NHWC", "conv_bn_relu backward dy, bf16 NHWC"} <= labels
    assert {r["arch"] for r in data["triton"]} == {80, 90}
    sm80_main = [r for r in data["triton"] if r["arch"] == 80 and r["label"].startswith("conv2d forward 3x3")]
    assert all(r["mma"] > 0 for r in sm80_main)
