"""The `cnnkern` command on a machine without a GPU: it says so, runs the Triton self-check under
the interpreter, shows committed GPU results (or says there are none), and never prints a timing."""

import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import bench_cli_in_process, write_run_json

from cnnkern import cli
from cnnkern.benchmarks import harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, `cnnkern bench` benchmarks for real")


def _cnnkern(*args, timeout=300):
    env = dict(os.environ)
    # The command must set up the interpreter itself, whatever the test harness put in the environment.
    for var in ("TRITON_INTERPRET", "CNNKERN_POISON"):
        env.pop(var, None)
    return subprocess.run(
        [sys.executable, "-m", "cnnkern.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


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
    env = dict(
        harness.environment(), gpu_name="NVIDIA H100 80GB HBM3", timestamp_utc="2025-03-04T05:06:07Z", commit="0123abc"
    )
    ceilings = {"copy_GBps": 3000.0, "bf16_matmul_TFLOPs": 800.0}
    recs = [
        harness.Result(
            op="residual_add",
            case="large",
            shape="64x256x64x64",
            dtype="bfloat16",
            layout="NCHW",
            provider=p,
            direction="fwd",
            median_ms=t,
            p20_ms=t,
            p80_ms=t,
            bytes=3 << 27,
        )
        for p, t in (("torch", 0.2), ("triton", 0.14))
    ]
    failure = {
        "op": "residual_add",
        "case": "large",
        "dtype": "bfloat16",
        "direction": "fwd+bwd",
        "provider": "cuda",
        "stage": "check",
        "error": "WrongResult: grad x disagrees",
    }
    harness.write_results(
        harness.finalize(recs, ceilings),
        env,
        ceilings,
        str(tmp_path / "h100-2025-03-04"),
        failures=[failure],
        stopped="time limit: 60 s passed after 61 s",
    )
    monkeypatch.setattr(harness, "RESULTS_DIR", str(tmp_path))
    monkeypatch.setattr(cli, "_selfcheck", lambda ops: 0)  # covered by the tests above
    assert cli.main(["bench"]) == 0
    out = capsys.readouterr().out
    assert "residual_add: latest GPU results" in out
    assert "NVIDIA H100 80GB HBM3" in out and "2025-03-04T05:06:07Z" in out and "commit 0123abc" in out
    assert re.search(r"large .* triton .* 1\.43x", out)
    assert "stopped early: time limit: 60 s passed" in out
    assert "FAILED, not timed: cuda (check) on large bfloat16 fwd+bwd: WrongResult: grad x disagrees" in out


def test_bench_options_reach_the_suite(monkeypatch, capsys, tmp_path):
    from cnnkern.benchmarks import report

    seen = {}
    bench_cli_in_process(monkeypatch)

    def fake_run_ops(ops, **kw):
        seen.update(kw, ops=ops)
        if kw["out_dir"] == str(tmp_path):
            write_run_json(tmp_path, kw["run_id"], "conv2d")

    monkeypatch.setattr(harness, "run_ops", fake_run_ops)
    monkeypatch.setattr(report, "build", lambda d: seen.setdefault("report", d) and [f"{d}/report.md"])
    assert (
        cli.main(
            [
                "bench",
                "--ops",
                "conv2d,models",
                "--nets",
                "resnet50,vgg16",
                "--dtypes",
                "bfloat16",
                "--batch",
                "1,32",
                "--backends",
                "triton",
                "--no-inductor",
                "--quick",
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    run_id = seen.pop("run_id")
    assert re.fullmatch(r"\d{8}T\d{6}Z-\d+", run_id)
    assert seen == dict(
        ops=["conv2d", "models"],
        nets=["resnet50", "vgg16"],
        dtypes=["bfloat16"],
        batches=[1, 32],
        backends=["triton"],
        inductor=False,
        quick=True,
        out_dir=str(tmp_path),
        progress=False,
        graph=False,
        time_limit=None,
        watchdog=True,
        report=str(tmp_path),
    )
    assert f"report: {tmp_path}/report.md" in capsys.readouterr().out
    seen.clear()
    assert cli.main(["bench"]) == 0
    assert seen["inductor"] is None and seen["ops"] is None and seen["nets"] is None and seen["progress"] is True
    assert os.path.basename(seen["out_dir"]).startswith("fake-gpu-")  # benchmarks/results/<gpu>-<date>
    assert cli.main(["bench", "--inductor", "--quick"]) == 0 and seen["inductor"] is True


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nets", "lenet"], "unknown network(s) lenet"),
        (["--batch", "0"], "--batch takes positive integers"),
        (["--batch", "32,x"], "--batch takes positive integers"),
        (["--backends", "opencl"], "unknown backend(s) opencl"),
        (["--dtypes", "float8"], "unknown dtype(s) float8"),
    ],
)
def test_bench_rejects_bad_options(args, message, capsys):
    assert cli.main(["bench", *args]) == 2
    assert message in capsys.readouterr().err


def _run_dir(path, stamp, medians):
    env = dict(harness.environment(), gpu_name="NVIDIA H100 80GB HBM3", timestamp_utc=stamp, commit="0123abc")
    ceilings = {"copy_GBps": 3000.0, "bf16_matmul_TFLOPs": 800.0}
    recs = [
        harness.Result(
            op="residual_add",
            case=case,
            shape="64x256x64x64",
            dtype="bfloat16",
            layout="NCHW",
            provider=p,
            direction="fwd",
            median_ms=t,
            p20_ms=t * 0.99,
            p80_ms=t * 1.01,
            bytes=3 << 27,
        )
        for (case, p), t in medians.items()
    ]
    return harness.write_results(harness.finalize(recs, ceilings), env, ceilings, str(path))


def test_bench_report_and_compare(tmp_path, capsys):
    a = _run_dir(
        tmp_path / "a",
        "2026-01-01T00:00:00Z",
        {("large", "torch"): 0.2, ("large", "triton"): 0.14, ("resnet50 conv2_x", "triton"): 0.05},
    )
    b = _run_dir(
        tmp_path / "b",
        "2026-02-01T00:00:00Z",
        {("large", "torch"): 0.2, ("large", "triton"): 0.10, ("resnet50 conv2_x", "triton"): 0.07},
    )
    assert cli.main(["bench", "--report", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out.split()
    assert out[0] == str(tmp_path / "a" / "report.md") and (tmp_path / "a" / "report.md").exists()
    assert any(p.endswith("roofline.png") for p in out)
    assert cli.main(["bench", "--report", str(tmp_path / "empty")]) == 2
    assert "no benchmark results" in capsys.readouterr().err

    assert cli.main(["bench", "--compare", a, b]) == 0
    lines = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith(("regression", "improvement", "same", "noise"))
    ]
    assert lines[0].startswith("regression") and "resnet50 conv2_x" in lines[0] and "+40.0%" in lines[0]
    assert lines[-1].startswith("improvement") and "large" in lines[-1]


def test_bench_without_gpu_prints_summaries_and_the_latest_report(tmp_path, monkeypatch, capsys):
    from cnnkern.benchmarks import report

    _run_dir(tmp_path / "h100-2026-02-01", "2026-02-01T00:00:00Z", {("large", "torch"): 0.2, ("large", "triton"): 0.1})
    report.build(str(tmp_path / "h100-2026-02-01"))
    monkeypatch.setattr(harness, "RESULTS_DIR", str(tmp_path))
    monkeypatch.setattr(cli, "_selfcheck", lambda ops: 0)
    assert cli.main(["bench", "--ops", "residual_add"]) == 0
    out = capsys.readouterr().out
    head = out.split("\nresidual_add: ")[0]
    # the networks' totals, from cnnkern.summary
    for net, params in (("alexnet", "62,378,344"), ("vgg16", "138,357,544"), ("resnet50", "25,557,032")):
        assert re.search(rf"^\s+{net}\s+3x22[47]x22[47]\s+\d+\s+\d+ \(\d+\)\s+{params}\s", head, re.M), net
    assert "googlenet" in head
    assert not re.search(r"\d\s*(ms|s|us|GB/s|TFLOP/s)\b", head), "printed a CPU timing"
    assert f"latest report (tables, geometric means, plots): {tmp_path / 'h100-2026-02-01' / 'report.md'}" in out
