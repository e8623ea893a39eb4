"""The `cnnkern` command on a machine without a GPU: it says so, runs the Triton self-check under
the interpreter, shows committed GPU results (or says there are none), and never prints a timing."""

import os
import re
import subprocess
import sys

import pytest
import torch

from cnnkern import cli
from cnnkern.benchmarks import harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, `cnnkern bench` benchmarks for real")


def _cnnkern(*args, timeout=300):
    env = dict(os.environ)
    # The command must set up the interpreter itself, whatever the test harness put in the environment.
    for var in ("TRITON_INTERPRET", "CNNKERN_POISON"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "cnnkern.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _checks(out):
    return [line for line in out.splitlines() if line.startswith(("ok ", "FAIL"))]


def test_bench_without_gpu_runs_the_selfcheck():
    p = _cnnkern("bench")
    out = p.stdout
    assert p.returncode == 0, out + p.stderr
    assert out.splitlines()[0].startswith("no CUDA GPU: cnnkern bench measures nothing here")
    assert "on CPU tensors under Triton's interpreter" in out
    assert re.search(r"cnnkern\._C: (loaded \(cuda_archs .+\)|not loaded: .+)", out)
    checks = _checks(out)
    assert checks and all(line.startswith("ok") for line in checks), checks
    for op in ("residual_add", "conv2d", "conv_bn_relu"):  # every op with Triton kernels is checked
        assert any(line.split()[1] == op for line in checks), op
    m = re.search(r"self-check passed: (\d+) of (\d+) checks", out)
    assert m and m.group(1) == m.group(2) == str(len(checks))
    assert "residual_add: no GPU results committed yet" in out or "residual_add: latest GPU results" in out
    # no "<number> ms" / "s" / "GB/s" before the committed GPU results
    assert not re.search(r"\d\s*(ms|s|us|GB/s|TFLOP/s)\b", out.split("\nresidual_add: ")[0]), "printed a CPU timing"


def test_bench_ops_restricts_the_selfcheck():
    p = _cnnkern("bench", "--ops", "residual_add", "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    checks = _checks(p.stdout)
    # identity and option A x fp32, fp16 x NCHW, NHWC, on the Triton backend
    assert len(checks) == 8 and all(line.split()[1] == "residual_add" for line in checks), checks


def test_bench_rejects_unknown_op_and_dtype():
    p = _cnnkern("bench", "--ops", "nonesuch", timeout=120)
    assert p.returncode == 2 and "no benchmark for nonesuch" in p.stderr
    assert cli.main(["bench", "--dtypes", "float8"]) == 2


def test_bench_shows_the_latest_committed_results(tmp_path, monkeypatch, capsys):
    env = dict(harness.environment(), gpu_name="NVIDIA H100 80GB HBM3", timestamp_utc="2025-03-04T05:06:07Z",
               commit="0123abc")
    ceilings = {"copy_GBps": 3000.0, "bf16_matmul_TFLOPs": 800.0}
    recs = [harness.Result(op="residual_add", case="large", shape="64x256x64x64", dtype="bfloat16", layout="NCHW",
                           provider=p, direction="fwd", median_ms=t, p20_ms=t, p80_ms=t, bytes=3 << 27)
            for p, t in (("torch", 0.2), ("triton", 0.14))]
    harness.write_results(harness.finalize(recs, ceilings), env, ceilings, str(tmp_path / "h100-2025-03-04"))
    monkeypatch.setattr(harness, "RESULTS_DIR", str(tmp_path))
    monkeypatch.setattr(cli, "_selfcheck", lambda ops: 0)  # covered by the tests above
    assert cli.main(["bench"]) == 0
    out = capsys.readouterr().out
    assert "residual_add: latest GPU results" in out
    assert "NVIDIA H100 80GB HBM3" in out and "2025-03-04T05:06:07Z" in out and "commit 0123abc" in out
    assert re.search(r"large .* triton .* 1\.43x", out)
