"""scripts/gpu_validate.sh and scripts/gpu_lease.sh without a GPU: their step logic (order, time
caps, the deadline, skipping, stopping a step in its own process group, packing) with a stub in
place of Python that stands for the slow commands. What the steps measure needs a GPU."""

import os
import subprocess
import sys
import tarfile
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VALIDATE = os.path.join(ROOT, "scripts", "gpu_validate.sh")
LEASE = os.path.join(ROOT, "scripts", "gpu_lease.sh")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="bash scripts")


@pytest.fixture
def stub(tmp_path):
    """A PYTHON for the scripts: pytest sleeps until SIGINT (then exits 2, as pytest does when
    interrupted), the build and pip succeed at once, the prebuilt extension's check exits
    STUB_PREBUILT_RC (default 1: none usable), the bench prints its arguments; everything
    else (the scripts' small probes) runs on the real interpreter."""
    path = tmp_path / "python"
    path.write_text(
        textwrap.dedent(f"""\
        #!/usr/bin/env bash
        case "$*" in
          *"-m pytest"*) echo "stub pytest $*"; trap 'echo "stub pytest: SIGINT"; exit 2' INT; sleep 60 & wait ;;
          *setup.py*) echo "stub build"; exit 0 ;;
          *prebuilt.py*) echo "stub prebuilt $*"; exit "${{STUB_PREBUILT_RC:-1}}" ;;
          *"pip install"*) exit 0 ;;
          *"cnnkern.cli bench"*) echo "stub bench split_k=${{CNNKERN_CONV_SPLIT_K:-auto}} $*"; exit 0 ;;
          *) exec {sys.executable} "$@" ;;
        esac
        """)
    )
    path.chmod(0o755)
    return str(path)


def _run(script, args, stub, **env):
    full = dict(os.environ, PYTHON=stub, TEST_WORKERS="0", **env)
    return subprocess.run(["bash", script, *args], capture_output=True, text=True, env=full, timeout=120, cwd=ROOT)


def _summary(out_dir):
    lines = open(os.path.join(out_dir, "summary.txt")).read().splitlines()
    return {ln.split()[0]: ln.split()[1] for ln in lines[1:] if ln.startswith("  ")}


def test_steps_run_in_the_order_given_with_time_caps(stub, tmp_path):
    out = str(tmp_path / "out")
    archive = str(tmp_path / "all.tgz")
    r = _run(VALIDATE, [out], stub, STEPS="bench-quick pytest-cuda-conv:3 bench-mma", PACK=archive)
    assert r.returncode == 1, r.stdout + r.stderr  # pytest-cuda-conv was stopped: a failure
    status = _summary(out)
    assert status["build"] == "ok" and status["importable"] == "ok"
    assert (status["bench-quick"], status["pytest-cuda-conv"], status["bench-mma"]) == ("ok", "TIMEOUT", "ok")
    order = [
        ln.split()[0] for ln in open(os.path.join(out, "summary.txt")).read().splitlines()[1:] if ln.startswith("  ")
    ]
    assert order[-3:] == ["bench-quick", "pytest-cuda-conv", "bench-mma"]
    log = open(os.path.join(out, "pytest-cuda-conv.log")).read()
    assert "stub pytest: SIGINT" in log and "time share of 3 s used up" in log  # pytest got to write its XML
    assert "--time-limit" not in open(os.path.join(out, "bench-quick.log")).read()  # no cap, no deadline
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "out/summary.txt" in names and "out/pytest-cuda-conv.log" in names


def test_the_deadline_shortens_a_cap_and_the_bench_stops_in_time(stub, tmp_path):
    out = str(tmp_path / "out")
    r = _run(VALIDATE, [out], stub, DEADLINE_S="100", RESERVE_S="2", STEPS="bench-quick:150")
    assert _summary(out)["bench-quick"] == "ok", r.stdout + r.stderr
    args = open(os.path.join(out, "bench-quick.log")).read().split()
    limit = int(args[args.index("--time-limit") + 1])
    # its share is what is left of the deadline after the first steps (under 98 s), not its cap
    # of 150; under two minutes the bench gets half of its share, above, the share less a minute
    # (how far under 49 depends on how long the first steps took on this machine)
    assert 0 < limit <= 49


def test_a_step_past_the_deadline_is_skipped_and_listed(stub, tmp_path):
    out = str(tmp_path / "out")
    r = _run(VALIDATE, [out], stub, DEADLINE_S="5", RESERVE_S="1", STEP_MIN_S="60", STEPS="bench-quick")
    assert _summary(out)["bench-quick"] == "SKIP"
    assert "bench-quick: skipped" in r.stdout


def test_a_misspelt_step_fails_before_the_build(stub, tmp_path):
    for steps in ("pytest-gpu bench-qick", "pytest-gpu:soon"):
        r = _run(VALIDATE, [str(tmp_path / "out")], stub, STEPS=steps)
        assert r.returncode == 2 and "unknown step or bad time cap" in r.stderr
        assert not os.path.exists(tmp_path / "out" / "build.log")


def test_lease_script_packs_one_archive(stub, tmp_path):
    r = _run(LEASE, [], stub)
    assert r.returncode == 2 and "usage" in r.stderr
    archive = tmp_path / "lease.tgz"
    # (a deadline far from reach and no minimum share: a loaded machine does not skip a step)
    r = _run(
        LEASE,
        [str(archive)],
        stub,
        DEADLINE_S="300",
        RESERVE_S="2",
        STEP_MIN_S="1",
        STEPS="bench-quick pytest-cuda-conv:2",
        CNNKERN_GIT_COMMIT="abc1234",
    )
    assert archive.exists(), r.stdout + r.stderr
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "gpu_validate/summary.txt" in names and "gpu_validate/bench-quick.log" in names


def test_bench_split_times_the_batch_1_layers_with_split_k_on_and_off(stub, tmp_path):
    """bench-split: the quick conv2d layers at batch 1, once as the kernels choose split-K and once
    with CNNKERN_CONV_SPLIT_K=off, into two result directories, each run in half of the step's cap."""
    out = str(tmp_path / "out")
    r = _run(VALIDATE, [out], stub, STEPS="bench-split:100")
    assert _summary(out)["bench-split"] == "ok", r.stdout + r.stderr
    runs = [ln for ln in open(os.path.join(out, "bench-split.log")).read().splitlines() if ln.startswith("stub bench")]
    assert len(runs) == 2, runs
    for line, mode, where in zip(runs, ("auto", "off"), ("results-split", "results-nosplit")):
        args = line.split()
        assert args[2] == f"split_k={mode}" and f"{out}/{where}" in args, line
        assert args[args.index("--batch") + 1] == "1" and args[args.index("--ops") + 1] == "conv2d"
        assert int(args[args.index("--time-limit") + 1]) <= 40, line


@pytest.mark.parametrize("usable, enabled", [(True, "1"), (False, "1"), (True, "0")])
def test_the_build_step_uses_a_carried_extension_only_when_its_key_matches(stub, tmp_path, usable, enabled):
    """A matching prebuilt extension (scripts/prebuilt.py check exits 0) replaces the compile;
    one that does not match, or CNNKERN_PREBUILT=0, leaves the build to setup.py."""
    out = str(tmp_path / "out")
    _run(VALIDATE, [out], stub, STEPS="bench-quick", STUB_PREBUILT_RC="0" if usable else "1", CNNKERN_PREBUILT=enabled)
    assert _summary(out)["build"] == "ok"
    log = open(os.path.join(out, "build.log")).read()
    assert ("stub prebuilt scripts/prebuilt.py check" in log) == (enabled == "1"), log
    assert ("stub build" in log) == (not usable or enabled == "0"), log


def _prebuilt():
    from helpers import load_script

    return load_script("prebuilt")


def test_prebuilt_key_catches_other_sources_torch_or_binary(tmp_path, monkeypatch):
    """The key of a carried extension: it matches only the tree, torch and binary it was written
    for, and a matching binary must still load (this one is not an extension: it fails there)."""
    import torch

    pb = _prebuilt()
    root = str(tmp_path)
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    (tmp_path / "cnnkern").mkdir()
    (tmp_path / "setup.py").write_text("flags = ['-O3']\n")
    (tmp_path / "csrc" / "cuda" / "a.cu").write_text("__global__ void k() {}\n")
    so = pb.extension_path(root)
    for name in pb.NAMES:
        with open(pb.extension_path(root, name), "wb") as f:
            f.write(b"not an ELF file")
    assert pb.check(root) == (False, f"no prebuilt extension ({os.path.relpath(so, root)} with its key)")
    pb.write(root)
    ok, why = pb.check(root)
    assert not ok and why.startswith("prebuilt extension does not load"), why  # key matches; load fails
    (tmp_path / "csrc" / "cuda" / "a.cu").write_text("__global__ void k() { }\n")
    ok, why = pb.check(root)
    assert not ok and "sources: built" in why and "extension" not in why.split("match:")[1], why
    pb.write(root)
    with open(so, "ab") as f:
        f.write(b"!")
    ok, why = pb.check(root)
    assert not ok and "extension: built" in why, why
    pb.write(root)
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130" if torch.__version__ != "2.11.0+cu130" else "2.14.1")
    ok, why = pb.check(root)
    assert not ok and "torch: built" in why, why
