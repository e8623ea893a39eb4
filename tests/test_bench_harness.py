"""The benchmark harness without a GPU: environment metadata, derived figures (GB/s, fraction of
the ceiling, speedup), the JSON round trip, the text table, and residual add's bytes formula."""

import json
import os
import re

import pytest
import torch
from helpers import bench_cli_in_process, write_run_json

from cnnkern.benchmarks import bench_residual_add, harness

ENV_KEYS = {
    "gpu_name",
    "sm_count",
    "compute_capability",
    "gpu_memory_GiB",
    "torch",
    "triton",
    "cuda",
    "cudnn",
    "python",
    "allow_tf32_matmul",
    "allow_tf32_cudnn",
    "cudnn_benchmark",
    "commit",
    "hostname",
    "timestamp_utc",
    "extension_loaded",
    "extension_archs",
    "cnnkern_env",
}


def _rec(provider, median, case="c1", direction="fwd", p20=None, p80=None, nbytes=3 * 2**30):
    return harness.Result(
        op="residual_add",
        case=case,
        shape="32x256x56x56",
        dtype="bfloat16",
        layout="NHWC",
        provider=provider,
        direction=direction,
        median_ms=median,
        p20_ms=median * 0.99 if p20 is None else p20,
        p80_ms=median * 1.01 if p80 is None else p80,
        wide_spread=harness.is_wide_spread(
            median, median * 0.99 if p20 is None else p20, median * 1.01 if p80 is None else p80
        ),
        bytes=nbytes,
    )


def test_environment_has_every_key():
    env = harness.environment()
    assert ENV_KEYS <= set(env), ENV_KEYS - set(env)
    assert env["torch"] and env["python"].count(".") == 2
    assert env["timestamp_utc"].endswith("Z") and len(env["timestamp_utc"]) == 20
    assert isinstance(env["allow_tf32_cudnn"], bool) and isinstance(env["extension_loaded"], bool)
    # a commit hash (maybe "-dirty") in this checkout, or "unknown" without git
    assert env["commit"] == "unknown" or len(env["commit"].split("-")[0]) == 40


def test_git_commit_override(monkeypatch):
    monkeypatch.setenv("CNNKERN_GIT_COMMIT", "abc123")
    assert harness.environment()["commit"] == "abc123"
    monkeypatch.setenv("CNNKERN_CUDA_CONV_ALGO", "tune")  # (the settings a run was made with)
    assert harness.environment()["cnnkern_env"]["CNNKERN_CUDA_CONV_ALGO"] == "tune"
    monkeypatch.delenv("CNNKERN_GIT_COMMIT")
    assert harness.git_commit("/nonexistent-dir") == "unknown"


def test_wide_spread_threshold():
    assert not harness.is_wide_spread(1.0, 0.96, 1.05)  # 9% band
    assert harness.is_wide_spread(1.0, 0.90, 1.11)  # 21% band


def test_finalize_derives_rates_fractions_and_speedups():
    recs = [
        _rec("torch", 2.0),
        _rec("triton", 1.0),
        _rec("cuda", 0.8),
        _rec("triton", 4.0, direction="fwd+bwd"),
    ]  # no baseline for this key: no speedup
    harness.finalize(recs, {"copy_GBps": 3000.0, "bf16_matmul_TFLOPs": 800.0})
    torch_r, triton_r, cuda_r, lone = recs
    assert triton_r.gbps == pytest.approx(3 * 2**30 / 1e6)  # bytes / (1 ms) in GB/s
    assert triton_r.ceiling_fraction == pytest.approx(triton_r.gbps / 3000.0)
    assert (torch_r.speedup, triton_r.speedup, cuda_r.speedup) == pytest.approx((1.0, 2.0, 2.5))
    assert lone.speedup is None
    flop = harness.Result(
        op="conv2d",
        case="k",
        shape="s",
        dtype="bfloat16",
        layout="NHWC",
        provider="triton",
        direction="fwd",
        median_ms=2.0,
        p20_ms=2.0,
        p80_ms=2.0,
        flops=10**12,
    )
    harness.finalize([flop], {"copy_GBps": 3000.0, "bf16_matmul_TFLOPs": 800.0})
    assert flop.tflops == pytest.approx(500.0) and flop.ceiling_fraction == pytest.approx(500 / 800)


def test_write_and_latest_results_round_trip(tmp_path):
    env_old = dict(harness.environment(), gpu_name="NVIDIA H100 80GB HBM3", timestamp_utc="2025-01-02T03:04:05Z")
    env_new = dict(env_old, timestamp_utc="2025-03-04T05:06:07Z")
    ceilings = {"copy_GBps": 3000.0, "bf16_matmul_TFLOPs": 800.0}
    old = harness.finalize([_rec("torch", 2.0), _rec("triton", 1.5)], ceilings)
    new = harness.finalize([_rec("torch", 2.0), _rec("triton", 1.0)], ceilings)

    p_old = harness.write_results(old, env_old, ceilings, str(tmp_path / "a"))
    # the default directory name: <gpu slug>-<date>
    assert os.path.basename(harness.default_out_dir(env_new)) == "nvidia-h100-80gb-hbm3-2025-03-04"
    p_new = harness.write_results(new, env_new, ceilings, str(tmp_path / "b"))
    assert os.path.basename(p_new) == "residual_add.json"
    (tmp_path / "b" / "notes.json").write_text(json.dumps({"not": "a result"}))  # skipped, not an error

    path, data = harness.latest_results(str(tmp_path))
    assert path == p_new and p_old != p_new
    assert data["env"]["timestamp_utc"] == "2025-03-04T05:06:07Z"
    assert data["ceilings"] == ceilings
    assert [r["speedup"] for r in data["results"]] == pytest.approx([1.0, 2.0])
    assert harness.latest_results(str(tmp_path), op="conv2d") is None
    assert harness.latest_results(str(tmp_path / "empty")) is None


def test_write_results_refuses_mixed_ops(tmp_path):
    a = _rec("torch", 1.0)
    b = _rec("torch", 1.0)
    b.op = "conv2d"
    with pytest.raises(ValueError, match="exactly one op"):
        harness.write_results([a, b], harness.environment(), None, str(tmp_path))


def test_format_table_lists_providers_and_marks_wide_spreads():
    recs = harness.finalize(
        [_rec("torch", 2.0), _rec("triton", 1.0, p20=0.8, p80=1.3), _rec("cuda", 0.9)],
        {"copy_GBps": 3000.0, "bf16_matmul_TFLOPs": 800.0},
    )
    table = harness.format_table(recs)
    lines = table.splitlines()
    body = {line.split()[5]: line for line in lines[2:5]}  # provider column
    assert set(body) == {"torch", "triton", "cuda"}
    assert "~1.000 " in body["triton"] and "~" not in body["torch"] and "~" not in body["cuda"]
    assert "2.00x" in body["triton"] and "1.00x" in body["torch"]
    assert "GB/s" in body["cuda"] and "%" in body["cuda"]
    assert "noisy" in lines[-1]
    # the same table from the JSON form of the records
    assert harness.format_table([vars(r) for r in recs]) == table
    # columns line up: every row is as wide as the header's rule
    assert len({len(line) for line in lines[2:5]}) <= 2


def test_option_a_bytes_formula():
    # CIFAR ResNet 16 -> 32 channels: x (128, 32, 16, 16), shortcut (128, 16, 32, 32), bf16.
    x, s, b = (128, 32, 16, 16), (128, 16, 32, 32), 2
    e = 128 * 32 * 16 * 16
    used = 128 * 16 * 16 * 16  # only the 16 shortcut channels at the sampled 16x16 positions are read
    fwd = bench_residual_add.required_bytes(x, s, b, "fwd")
    assert fwd == (e + used + e) * b == 5 * 2**20
    # backward: read grad_out and the saved output, write grad_x and the whole shortcut gradient
    both = bench_residual_add.required_bytes(x, s, b, "fwd+bwd")
    assert both - fwd == (3 * e + 128 * 16 * 32 * 32) * b
    # identity: three tensors forward, four more backward
    assert bench_residual_add.required_bytes(x, x, 4, "fwd") == 3 * e * 4
    assert bench_residual_add.required_bytes(x, x, 4, "fwd+bwd") == 7 * e * 4
    with pytest.raises(ValueError):
        bench_residual_add.required_bytes(x, x, 4, "bwd")


def test_cases_cover_the_brief():
    shapes = {(c.x_shape, c.s_shape, c.layout) for c in bench_residual_add.CASES}
    assert ((32, 256, 56, 56), None, "NHWC") in shapes
    big = [c for c in bench_residual_add.CASES if c.name == "large"]
    assert {c.layout for c in big} == {"NCHW", "NHWC"}
    assert all(2 * c.x_shape[0] * c.x_shape[1] * c.x_shape[2] * c.x_shape[3] >= 64 * 2**20 for c in big)
    for c in bench_residual_add.CASES:
        if c.s_shape is not None:  # option A: the stride maps the shortcut onto x
            assert -(-c.s_shape[2] // c.stride) == c.x_shape[2] and c.s_shape[1] < c.x_shape[1]


def test_bench_module_without_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("runs the benchmark on a GPU machine")
    assert bench_residual_add.main([]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA GPU" in out


def test_run_checks_then_times_every_provider_and_direction(monkeypatch):
    """The benchmark loop on tiny CPU cases (Triton's interpreter) with a fake timer: every provider
    and direction is recorded, after its result matched the torch baseline."""
    if torch.cuda.is_available():
        pytest.skip("the CPU path of the loop; on a GPU the real benchmark runs")
    Case = bench_residual_add.Case
    tiny = [Case("identity", (2, 8, 4, 4), None, True), Case("option A", (2, 8, 3, 3), (2, 4, 6, 5), False, 2)]
    monkeypatch.setattr(bench_residual_add, "CASES", tiny)
    calls = []

    def fake_time(fn, *, cudagraph=False, grad_to_none=None, **budget):
        fn()
        calls.append((cudagraph, grad_to_none is not None))
        return {
            "median_ms": 1.0,
            "p20_ms": 0.9,
            "p80_ms": 1.2,
            "wide_spread": True,
            "timer": "cudagraph" if cudagraph else "do_bench",
        }

    monkeypatch.setattr(harness, "time_fn", fake_time)
    recs = bench_residual_add.run(providers=["triton"], dtypes=("float32", "float16"), progress=False, device="cpu")
    assert len(recs) == 2 * 2 * 2 * 2  # cases x dtypes x directions x (torch, triton)
    assert {(r.provider, r.direction) for r in recs} == {
        (p, d) for p in ("torch", "triton") for d in ("fwd", "fwd+bwd")
    }
    # tiny forward cases use CUDA graphs; backward timings reset the leaves' gradients each run
    assert all(c == (True, False) for c, r in zip(calls, recs) if r.direction == "fwd")
    assert all(c == (False, True) for c, r in zip(calls, recs) if r.direction == "fwd+bwd")
    opt_a = next(r for r in recs if r.case == "option A" and r.dtype == "float16" and r.direction == "fwd")
    assert opt_a.bytes == (2 * 8 * 9 * 2 + 2 * 4 * 9) * 2 and opt_a.shape == "x 2x8x3x3, s 2x4x6x5"


def test_run_refuses_a_wrong_kernel(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the CPU path of the loop")
    monkeypatch.setattr(bench_residual_add, "CASES", [bench_residual_add.Case("identity", (2, 8, 4, 4), None, True)])
    monkeypatch.setattr(bench_residual_add, "residual_add", lambda x, s, relu, backend: x + s)  # no ReLU
    monkeypatch.setattr(
        harness,
        "time_fn",
        lambda fn, **kw: {"median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0, "wide_spread": False, "timer": "do_bench"},
    )
    recs = bench_residual_add.run(providers=["triton"], dtypes=("float32",), progress=False, device="cpu")
    # the wrong kernel is not timed, forward or backward (ReLU's mask is missing from its gradient)
    assert {(r.provider, r.direction) for r in recs} == {("torch", "fwd"), ("torch", "fwd+bwd")}
    assert [(f["provider"], f["direction"], f["stage"]) for f in recs.failures] == [
        ("triton", "fwd", "check"),
        ("triton", "fwd+bwd", "check"),
    ]
    assert re.search("triton forward.*disagrees with the torch baseline", recs.failures[0]["error"])
    assert re.search("triton grad x.*disagrees with the torch baseline", recs.failures[1]["error"])


# ------------------------------------------------------------------------------------------------
# the "inductor" provider and the suite plan
# ------------------------------------------------------------------------------------------------
# A fixed kernel table for the provider tests: conv without a CUDA C++ kernel, the rest with both.
AUTO_ORDER = {
    "residual_add": ("cuda", "triton"),
    "local_response_norm": ("cuda", "triton"),
    "conv2d": ("triton",),
    "conv_bn_relu": ("triton",),
}


@pytest.fixture
def kernel_table(monkeypatch):
    import cnnkern

    monkeypatch.setattr(cnnkern, "available_backends", lambda: ["torch", "triton", "cuda"])
    monkeypatch.setattr(cnnkern._backend, "AUTO_ORDER", dict(AUTO_ORDER))


def test_inductor_is_a_provider_of_every_op(kernel_table):
    for op in ("residual_add", "conv2d", "conv_bn_relu", "local_response_norm"):
        default = harness.providers(op)
        assert default[0] == "torch" and default[-1] == "inductor", (op, default)
        assert "inductor" not in harness.providers(op, inductor=False)
        assert harness.providers(op, ["inductor"]) == ["torch", "inductor"]
    assert harness.providers("conv2d") == ["torch", "triton", "inductor"]  # no CUDA C++ conv in this table
    with pytest.raises(ValueError, match="cannot run conv2d"):
        harness.providers("conv2d", ["cuda"])
    # in a suite run a backend without a kernel for the op is left out, not an error
    assert harness.suite_providers("conv2d", ["triton", "cuda"]) == ["torch", "triton", "inductor"]
    assert harness.suite_providers("residual_add", ["cuda"], inductor=False) == ["torch", "cuda"]


def test_compile_reference_resets_dynamo_and_uses_max_autotune(monkeypatch):
    import torch._dynamo

    seen = {}
    monkeypatch.setattr(torch._dynamo, "reset", lambda: seen.setdefault("reset", True))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.update(kw) or fn)
    f = lambda x: x  # noqa: E731
    assert harness.compile_reference(f) is f
    assert seen == {"reset": True, "mode": "max-autotune-no-cudagraphs", "dynamic": False}
    harness.compile_reference(f, mode="max-autotune")
    assert seen["mode"] == "max-autotune"


def test_finalize_speedup_over_inductor_and_images_per_second():
    recs = [_rec("torch", 2.0), _rec("triton", 1.0), _rec("inductor", 1.5), _rec("triton", 3.0, case="c2")]
    recs[0].images = recs[1].images = 32
    harness.finalize(recs, {"copy_GBps": 3000.0, "bf16_matmul_TFLOPs": 800.0})
    assert recs[1].speedup_inductor == pytest.approx(1.5) and recs[2].speedup_inductor == pytest.approx(1.0)
    assert recs[0].speedup_inductor == pytest.approx(0.75)
    assert recs[3].speedup_inductor is None  # no inductor timing of that case
    assert recs[1].images_per_s == pytest.approx(32_000) and recs[2].images_per_s is None
    table = harness.format_table(recs)
    assert "vs inductor" in table.splitlines()[0]
    assert "32000 img/s" in table
    # without any inductor record the column is left out
    plain = harness.finalize([_rec("torch", 2.0), _rec("triton", 1.0)], None)
    assert "vs inductor" not in harness.format_table(plain) and "2.00x" in harness.format_table(plain)


def test_residual_add_loop_times_the_inductor_provider(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the CPU path of the loop")
    compiled = []

    def fake_compile(fn, mode=None):
        compiled.append(fn)
        return torch.compile(fn, backend="eager")  # Dynamo traces it; no Inductor code generation on CPU

    monkeypatch.setattr(harness, "compile_reference", fake_compile)
    monkeypatch.setattr(
        harness,
        "time_fn",
        lambda fn, **kw: (
            fn(),
            {"median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0, "wide_spread": False, "timer": "fake"},
        )[1],
    )
    Case = bench_residual_add.Case
    monkeypatch.setattr(
        bench_residual_add,
        "CASES",
        [Case("identity", (2, 8, 4, 4), None, True), Case("option A", (2, 8, 3, 3), (2, 4, 6, 5), False, 2)],
    )
    recs = bench_residual_add.run(providers=["inductor"], dtypes=("float32",), progress=False, device="cpu")
    assert {r.provider for r in recs} == {"torch", "inductor"} and len(recs) == 2 * 2 * 2
    assert len(compiled) == 4  # one compilation per case and direction
    assert bench_residual_add.count(providers=["inductor"], dtypes=("float32",)) == len(recs)


def test_suite_plan(monkeypatch, kernel_table):
    from cnnkern.benchmarks import bench_conv2d, bench_conv_bn_relu

    # the layer lists themselves are tested in test_bench_conv.py: here 23 layers per batch size
    # (each marked as a block's end, which --quick leaves out: one conv-BN-ReLU case each)
    layer = bench_conv2d.Layer("net", "conv", (1, 1, 1, 1), (1, 1, 1, 1), (1, 1), (0, 0), (1, 1), 1, 1, shortcut="conv")
    fake_layers = lambda batches, networks=None, *a, **k: [layer] * 23 * len(batches)  # noqa: E731
    monkeypatch.setattr(bench_conv2d, "network_layers", fake_layers)
    monkeypatch.setattr(bench_conv_bn_relu, "network_layers", fake_layers)
    plan = {op: (kw, n) for op, kw, n in harness.suite_plan(quick=True)}
    assert list(plan) == list(harness.OPS)
    for op, (kw, _n) in plan.items():
        assert "inductor" not in kw["providers"], op  # --quick leaves Inductor out
        assert kw["dtypes"] == ("bfloat16",), op  # and runs bf16 only
    assert plan["residual_add"] == (
        {"quick": True, "dtypes": ("bfloat16",), "providers": ["torch", "cuda", "triton"]},
        3 * 2 * 3,
    )
    assert plan["conv2d"][1] == 23 * 2 * 2  # layers x (fwd, fwd+relu) x (torch, triton)
    assert plan["models"][0]["providers"] == ["torch", "cnnkern", "cnnkern+graph"]
    full = {
        op: kw
        for op, kw, _ in harness.suite_plan(["conv2d", "models"], backends=["cuda"], nets=["resnet50"], batches=[8])
    }
    assert full["conv2d"]["providers"] == ["torch", "inductor"]  # no CUDA C++ conv: only the peers
    assert full["conv2d"]["networks"] == ["resnet50"] and full["conv2d"]["batches"] == (8,)
    assert full["models"]["providers"] == ["torch", "inductor"]  # cuda cannot run a whole network
    # --nets leaves out the ops that have no layer of those networks
    assert [op for op, _, _ in harness.suite_plan(nets=["alexnet"])] == ["conv2d", "local_response_norm", "models"]
    with pytest.raises(ValueError, match="no benchmark for nonesuch"):
        harness.suite_plan(["nonesuch"])


def test_graph_mode_times_every_case_as_a_cuda_graph(monkeypatch):
    # `cnnkern bench --graph`: time_fn replays a CUDA graph for every case, not only tiny ones
    import triton.testing

    used = []
    monkeypatch.setattr(
        triton.testing, "do_bench", lambda fn, **kw: used.append("eager") or [1.0, 0.9, 1.1], raising=False
    )
    monkeypatch.setattr(
        triton.testing, "do_bench_cudagraph", lambda fn, **kw: used.append("graph") or [1.0, 0.9, 1.1], raising=False
    )
    assert harness.time_fn(lambda: None)["timer"] == "do_bench"
    monkeypatch.setattr(harness, "_FORCE_GRAPH", True)
    assert harness.time_fn(lambda: None)["timer"] == "cudagraph"
    assert used == ["eager", "graph"]


def test_bench_cli_takes_graph(monkeypatch):
    from cnnkern import cli

    seen = {}
    bench_cli_in_process(monkeypatch)
    monkeypatch.setattr(harness, "run_ops", lambda ops, **kw: seen.update(kw) or [])
    assert cli.main(["bench", "--graph", "--ops", "conv2d", "--no-progress", "--out", "/nowhere"]) == 0
    assert seen["graph"] is True


# ------------------------------------------------------------------------------------------------
# failures and the time limit: a wrong or crashing provider, a dead device, a lease that ends
# ------------------------------------------------------------------------------------------------
def test_verify_and_measure_record_failures_instead_of_raising(monkeypatch):
    recs = harness.new_records()
    common = dict(op="conv2d", case="resnet50 conv1", shape="s", dtype="bfloat16", layout="NHWC", direction="fwd")

    def wrong():
        raise harness.WrongResult("cuda fwd differs from cuDNN by 5.0e-01")

    assert harness.verify(recs, "cuda", lambda: None, **common) is True
    assert harness.verify(recs, "cuda", wrong, **common) is False

    def boom(fn, **kw):
        raise RuntimeError("CUDA error: too many resources requested for launch")

    monkeypatch.setattr(harness, "time_fn", boom)
    assert harness.measure(recs, lambda: None, provider="triton", warmup_ms=1, rep_ms=1, **common) is False
    assert list(recs) == []
    assert [(f["provider"], f["stage"]) for f in recs.failures] == [("cuda", "check"), ("triton", "timing")]
    assert recs.failures[0]["error"] == "WrongResult: cuda fwd differs from cuDNN by 5.0e-01"
    assert recs.failures[1]["case"] == "resnet50 conv1" and "too many resources" in recs.failures[1]["error"]
    monkeypatch.setattr(
        harness,
        "time_fn",
        lambda fn, **kw: {"median_ms": 2.0, "p20_ms": 1.9, "p80_ms": 2.1, "wide_spread": False, "timer": "do_bench"},
    )
    assert harness.measure(recs, lambda: None, provider="triton", warmup_ms=1, rep_ms=1, flops=10, **common)
    (r,) = recs
    assert (r.provider, r.median_ms, r.flops, r.direction) == ("triton", 2.0, 10, "fwd")


def _fake_suite(monkeypatch, tmp_path, run):
    """run_ops on CPU over a fake op module ``fake`` (its ``run``) and ``fake2`` after it (four
    timings), with fake environment, ceilings and timer (each timing 10 s of a fake clock)."""
    import sys
    import types

    for name, fn in (("fake_bench", run), ("fake_bench2", _fake_run(4, "fake2"))):
        mod = types.ModuleType(name)
        mod.run = fn
        mod.count = lambda **kw: 4
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(harness, "OPS", {"fake": "fake_bench", "fake2": "fake_bench2"})
    monkeypatch.setattr(harness.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        harness,
        "environment",
        lambda: {
            "gpu_name": "Fake GPU",
            "sm_count": 1,
            "compute_capability": "9.0",
            "torch": "t",
            "triton": "t",
            "cuda": "c",
            "cudnn": 1,
            "commit": "abc",
            "timestamp_utc": "2026-12-01T00:00:00Z",
            "extension_loaded": False,
        },
    )
    monkeypatch.setattr(harness.torch.backends.cudnn, "benchmark", False)  # run_ops sets it
    monkeypatch.setattr(harness, "measure_ceilings", lambda: {"copy_GBps": 1000.0, "bf16_matmul_TFLOPs": 500.0})
    monkeypatch.setattr(harness, "suite_providers", lambda op, backends, inductor: ["torch", "triton"])
    clock = [0.0]
    monkeypatch.setattr(harness, "_clock", lambda: clock[0])

    def fake_time(fn, **kw):
        clock[0] += 10.0  # every timing takes 10 s of the fake clock
        return {"median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0, "wide_spread": False, "timer": "do_bench"}

    monkeypatch.setattr(harness, "time_fn", fake_time)
    return lambda **kw: harness.run_ops(
        ["fake", "fake2"], out_dir=str(tmp_path), progress=False, echo=lambda *a: None, **kw
    )


def _fake_run(n=4, op="fake"):
    def run(providers=None, **kw):
        recs = harness.new_records()
        for i in range(n):
            harness.measure(
                recs,
                lambda: None,
                provider=providers[i % len(providers)],
                warmup_ms=1,
                rep_ms=1,
                op=op,
                case=f"case {i // 2}",
                shape="s",
                dtype="bfloat16",
                layout="NHWC",
                direction="fwd",
                flops=1,
            )
        return recs

    return run


def test_run_ops_time_limit_writes_what_it_measured_and_stops(monkeypatch, tmp_path):
    suite = _fake_suite(monkeypatch, tmp_path, _fake_run())
    with pytest.raises(ValueError, match="time_limit"):
        suite(time_limit=0)
    paths = suite(time_limit=25)  # timings start at t=0, 10, 20; the fourth (t=30) does not
    assert [os.path.basename(p) for p in paths] == ["fake.json"]  # fake2 after it: not run
    data = json.load(open(paths[0]))
    assert len(data["results"]) == 3 and data["failures"] == []
    assert data["stopped"].startswith("time limit: 25 s passed") and "not run: fake2" in data["stopped"]
    status = harness.run_status(paths)
    assert status["stops"] == [f"fake: {data['stopped']}"] and not status["device_fault"] and status["failures"] == 0
    assert harness._DEADLINE is None  # nothing left behind for the next run


def test_run_ops_device_fault_stops_the_suite(monkeypatch, tmp_path):
    def run(providers=None, **kw):
        recs = harness.new_records()
        common = dict(op="fake", case="c", shape="s", dtype="bfloat16", layout="NHWC", direction="fwd")
        harness.measure(recs, lambda: None, provider="torch", warmup_ms=1, rep_ms=1, **common)
        harness.verify(recs, "triton", lambda: 1 / 0, **common)
        raise AssertionError("not reached: the device fault ends the module")

    suite = _fake_suite(monkeypatch, tmp_path, run)
    monkeypatch.setattr(harness, "_device_usable", lambda: False)
    paths = suite()
    data = json.load(open(paths[0]))
    assert [r["provider"] for r in data["results"]] == ["torch"]
    assert data["failures"][0]["error"] == "ZeroDivisionError: division by zero"
    assert data["stopped"].startswith("device fault: the CUDA context is unusable after triton failed on c")
    assert len(paths) == 1 and harness.run_status(paths)["device_fault"]


def test_run_ops_resumes_a_device_fault_in_a_fresh_process(monkeypatch, tmp_path):
    """The op that faulted goes on without the faulting provider, reusing the timings made before the
    fault; the ops after it run; a file of another run in the same directory is not taken as done."""
    usable = [True]
    timed = []

    def run(providers=None, **kw):
        recs = harness.new_records()
        for i in range(3):
            common = dict(op="fake", case=f"c{i}", shape="s", dtype="bfloat16", layout="NHWC", direction="fwd")

            def check(i=i):
                if i == 1:
                    usable[0] = False  # an illegal address: the context is gone
                    raise RuntimeError("CUDA error: an illegal memory access was encountered")

            ok = ["torch"] + (["triton"] if harness.verify(recs, "triton", check, **common) else [])
            for p in ok:
                harness.measure(
                    recs, lambda p=p, i=i: timed.append((p, i)), provider=p, warmup_ms=1, rep_ms=1, **common
                )
        return recs

    suite = _fake_suite(monkeypatch, tmp_path, run)
    monkeypatch.setattr(
        harness,
        "time_fn",
        lambda fn, **kw: (
            fn(),
            {"median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0, "wide_spread": False, "timer": "do_bench"},
        )[1],
    )
    monkeypatch.setattr(harness, "_device_usable", lambda: usable[0])
    (tmp_path / "fake2.json").write_text(
        json.dumps({"op": "fake2", "env": {"run_id": "an older run"}, "results": [], "stopped": None})
    )
    paths = suite(run_id="r1")
    status = harness.run_status(paths)
    assert status["device_fault"] and status["faulted"] == ["fake: triton"] and timed == [("torch", 0), ("triton", 0)]
    run_id = status["run_id"]
    assert run_id == "r1" and harness.run_paths(str(tmp_path), run_id) == paths

    usable[0] = True  # the new process has a working context
    timed.clear()
    paths = suite(run_id=run_id)
    assert paths == harness.run_paths(str(tmp_path), run_id) and [os.path.basename(p) for p in paths] == [
        "fake.json",
        "fake2.json",
    ]
    assert timed == [("torch", 1), ("torch", 2)]  # case 0 reused; triton not run again in this op
    data = json.load(open(paths[0]))
    assert [(r["provider"], r["case"]) for r in data["results"]] == [
        ("torch", "c0"),
        ("triton", "c0"),
        ("torch", "c1"),
        ("torch", "c2"),
    ]
    assert data["stopped"] is None and data["faulted"] == ["triton"] and data["env"]["run_id"] == run_id
    assert len(data["failures"]) == 1 and "illegal memory access" in data["failures"][0]["error"]
    assert len(data["resumed"]) == 1 and data["resumed"][0].startswith("device fault: the CUDA context is unusable")
    assert len(json.load(open(paths[1]))["results"]) == 4  # fake2 ran (the older run's file was not this run's)
    status = harness.run_status(paths)
    assert not status["device_fault"] and status["failures"] == 1 and status["faulted"] == ["fake: triton"]
    assert harness._RUN is None  # no prior timings or skipped providers left for the next run

    timed.clear()  # resumed again: every op finished, nothing runs
    assert suite(run_id=run_id) == paths and timed == []

    from cnnkern.benchmarks import report

    page = report.build_markdown(report.load(str(tmp_path)), [])
    assert "**fake resumed in a fresh process** after: device fault: the CUDA context is unusable" in page
    assert "left out of the rest of the op: triton)" in page


def test_run_ops_saves_a_hung_op_and_an_interrupted_one(monkeypatch, tmp_path):
    """The watchdog takes a check that does not return for a hung kernel: it records the failure and
    writes the op as stopped on a device fault (resumed without that provider); SIGINT writes too."""
    ticks = []

    def run(providers=None, **kw):
        recs = harness.new_records()
        common = dict(op="fake", case="c", shape="s", dtype="bfloat16", layout="NHWC", direction="fwd")
        harness.measure(recs, lambda: None, provider="torch", warmup_ms=1, rep_ms=1, **common)

        def check():  # the main thread stuck in a kernel; the watchdog thread looks meanwhile
            ticks.append(harness.watchdog_tick(echo=lambda *a: None))
            clock[0] += harness.HANG_S + 1
            ticks.append(harness.watchdog_tick(echo=lambda *a: None))
            raise KeyboardInterrupt  # (here the watchdog would have ended the process)

        harness.verify(recs, "cuda", check, **common)

    suite = _fake_suite(monkeypatch, tmp_path, run)
    clock = [0.0]
    monkeypatch.setattr(harness, "_clock", lambda: clock[0])
    assert harness.hang_limit(harness.INDUCTOR) > harness.hang_limit("cuda", "conv2d") == harness.HANG_S
    assert harness.hang_limit("triton", "models") == harness.HANG_COMPILE_S  # a network's first pass compiles
    with pytest.raises(KeyboardInterrupt):
        suite(run_id="r2")
    assert ticks == [False, True]
    data = json.load(open(tmp_path / "fake.json"))  # the interrupt's save came after the watchdog's
    assert data["stopped"].startswith("interrupted after") and [r["provider"] for r in data["results"]] == ["torch"]
    assert harness.watchdog_tick() is False  # nothing under way

    def hang_only(providers=None, **kw):
        recs = harness.new_records()
        common = dict(op="fake", case="c", shape="s", dtype="bfloat16", layout="NHWC", direction="fwd")

        def check():
            clock[0] += harness.HANG_S + 1
            assert harness.watchdog_tick(echo=lambda *a: None)
            raise SystemExit(harness.HANG_EXIT)  # what os._exit does to the process

        harness.verify(recs, "cuda", check, **common)

    suite = _fake_suite(monkeypatch, tmp_path, hang_only)
    monkeypatch.setattr(harness, "_clock", lambda: clock[0])
    with pytest.raises(SystemExit):
        suite(run_id="r3")
    data = json.load(open(tmp_path / "fake.json"))
    assert data["stopped"].startswith(f"device fault: cuda did not finish its check of c in {harness.HANG_S:.0f} s")
    assert data["faulted"] == ["cuda"] and data["failures"][0]["error"].startswith("hung: no result after")
    assert harness.run_status([str(tmp_path / "fake.json")])["device_fault"]  # so cnnkern bench resumes it


def test_bench_cli_resumes_a_faulted_run(monkeypatch, tmp_path, capsys):
    from cnnkern import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("cnnkern.benchmarks.report.build", lambda d: [str(tmp_path / "report.md")])
    fault = "device fault: the CUDA context is unusable after cuda failed on c1: illegal"
    failure = [{"provider": "cuda", "stage": "check", "error": "illegal"}]
    calls = []

    def worker(argv, out_dir, run_id, left):  # first a fault, then the resumed worker finishes
        calls.append((argv, out_dir, run_id, left))
        write_run_json(
            out_dir,
            run_id,
            "conv2d",
            stopped=None if len(calls) > 1 else fault,
            faulted=["cuda"],
            resumed=[fault] if len(calls) > 1 else [],
            failures=failure,
        )
        return harness.HANG_EXIT if len(calls) == 1 else 0

    monkeypatch.setattr(cli, "_run_worker", worker)
    args = ["bench", "--ops", "conv2d", "--no-progress", "--time-limit", "300", "--out", str(tmp_path)]
    assert cli.main(args) == 1  # the fault's failure stays
    assert [c[0] for c in calls] == [args, args] and calls[0][1:3] == calls[1][1:3]
    assert calls[0][1] == str(tmp_path) and 290 < calls[1][3] <= calls[0][3] <= 300
    out = capsys.readouterr().out
    assert "the run goes on in a fresh process" in out and "stopped early" not in out
    assert "device faults after failures of conv2d: cuda: the run went on in fresh processes" in out

    calls.clear()  # a resumed worker that gets no further is not started again and again
    monkeypatch.setattr(
        cli,
        "_run_worker",
        lambda *a: (
            calls.append(a)
            or write_run_json(a[1], a[2], "conv2d", stopped=fault, faulted=["cuda"], failures=failure)
            and 0
        ),
    )
    assert cli.main(args) == 1
    assert len(calls) == 2 and "got no further: not resumed again" in capsys.readouterr().out
    calls.clear()  # too little of the time limit left
    monkeypatch.setattr(cli, "RESUME_MIN_S", 1e9)
    assert cli.main(args) == 1
    assert len(calls) == 1 and "not resumed" in capsys.readouterr().out


def test_run_worker_runs_the_same_command_in_a_new_process(monkeypatch):
    from cnnkern import cli

    seen = {}

    class FakeProc:
        def __init__(self, cmd):
            seen["cmd"] = cmd

        def wait(self, timeout=None):
            seen["timeout"] = timeout
            return 0

    monkeypatch.setattr(cli.subprocess, "Popen", FakeProc)
    assert cli._run_worker(["bench", "--quick"], "/out", "r9", 100.4) == 0
    assert seen["cmd"][1:] == [
        "-m",
        "cnnkern.cli",
        "bench",
        "--quick",
        "--out",
        "/out",
        "--run-id",
        "r9",
        "--time-limit",
        "100",
    ]
    assert seen["timeout"] == 100.4 + cli.GRACE_S
    cli._run_worker(["bench"], "/out", "r9", None)
    assert "--time-limit" not in seen["cmd"] and seen["timeout"] is None


def test_report_lists_failures_and_early_stops(monkeypatch, tmp_path):
    from cnnkern.benchmarks import report

    def run(providers=None, **kw):
        recs = _fake_run(2)(providers)
        harness.verify(
            recs,
            "triton",
            lambda: (_ for _ in ()).throw(harness.WrongResult("off by 10%")),
            op="fake",
            case="case 1",
            shape="s",
            dtype="bfloat16",
            layout="NHWC",
            direction="fwd",
        )
        return recs

    paths = _fake_suite(monkeypatch, tmp_path, run)(time_limit=35)
    assert len(paths) == 2  # fake: 2 timings (t=0, 10); fake2 times at t=20, 30 and stops at t=40
    assert len(json.load(open(paths[1]))["results"]) == 2
    page = report.build_markdown(report.load(str(tmp_path)), [])
    assert "**fake2 stopped early**: time limit: 35 s passed" in page
    assert "**1 provider failure(s)**" in page
    assert "| fake | case 1 | bf16 | NHWC | fwd | triton | check | WrongResult: off by 10% |" in page


def test_bench_cli_time_limit_and_failure_exit_status(monkeypatch, tmp_path):
    from cnnkern import cli

    seen = {}
    bench_cli_in_process(monkeypatch)

    def fake_run_ops(ops, **kw):
        seen.update(kw)
        write_run_json(tmp_path, kw["run_id"], "conv2d", failures=failures)

    monkeypatch.setattr(harness, "run_ops", fake_run_ops)
    monkeypatch.setattr("cnnkern.benchmarks.report.build", lambda d: [str(tmp_path / "report.md")])
    failures = []
    common = ["bench", "--ops", "conv2d", "--no-progress", "--out", str(tmp_path)]
    assert cli.main([*common, "--time-limit", "120"]) == 0
    assert 115 <= seen["time_limit"] <= 120
    failures = [{"provider": "cuda", "stage": "check", "error": "WrongResult: x"}]
    assert cli.main(common) == 1
    assert cli.main(["bench", "--time-limit", "-1"]) == 2
    failures = []  # a worker that crashed fails the command, whatever it wrote
    monkeypatch.setattr(cli, "_run_worker", lambda *a: fake_run_ops(["conv2d"], run_id=a[2]) or 1)
    assert cli.main(common) == 1


def test_lrn_loop_checks_times_and_records_a_wrong_kernel(monkeypatch):
    from cnnkern.benchmarks import bench_local_response_norm as lrn

    if torch.cuda.is_available():
        pytest.skip("the CPU path of the loop")
    monkeypatch.setattr(lrn, "CASES", [lrn.Case("tiny", (2, 8, 3, 3), False), lrn.Case("tiny", (2, 8, 3, 3), True)])

    def fake_time(fn, **kw):
        fn()
        return {"median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0, "wide_spread": False, "timer": "do_bench"}

    monkeypatch.setattr(harness, "time_fn", fake_time)
    recs = lrn.run(providers=["triton"], dtypes=("float32",), progress=False, device="cpu")
    assert len(recs) == 2 * 2 * 2 and not recs.failures  # layouts x directions x (torch, triton)
    real = lrn.local_response_norm
    monkeypatch.setattr(lrn, "local_response_norm", lambda x, *a, **k: real(x, *a, **k) * 1.01)
    recs = lrn.run(providers=["triton"], dtypes=("float32",), progress=False, device="cpu")
    assert {r.provider for r in recs} == {"torch"} and len(recs.failures) == 4
    assert all("disagrees with the torch baseline" in f["error"] for f in recs.failures)
