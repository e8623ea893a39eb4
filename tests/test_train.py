"""cnnkern train: a real (bundled) data set, loss going down, a checkpoint, and DistributedDataParallel
with two CPU processes on gloo."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path, nproc=None):
    ck = tmp_path / "ck.pt"
    cmd = [sys.executable, "-m", "cnnkern.train", *args, "--checkpoint", str(ck), "--no-progress"]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    res = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout, torch.load(ck, weights_only=False)


def test_digits_are_real_images():
    from cnnkern.train import load_digits

    x, y, tx, ty = load_digits(16)
    assert x.shape == (1500, 3, 16, 16) and tx.shape == (297, 3, 16, 16)
    assert set(y.tolist()) == set(range(10)) and x.std() > 0.5


def test_training_learns_and_checkpoints(tmp_path):
    import json

    log = tmp_path / "log.jsonl"
    out, ck = _run(
        [
            "cifar_resnet",
            "--depth",
            "20",
            "--epochs",
            "3",
            "--size",
            "16",
            "--backend",
            "torch",
            "--seed",
            "3",
            "--log",
            str(log),
        ],
        tmp_path,
    )
    accs = [float(line.split("test acc ")[1].split(",")[0]) for line in out.splitlines() if "test acc" in line]
    assert len(accs) == 3 and accs[-1] > 0.6  # ten classes: chance is 0.1
    assert ck["epoch"] == 3 and "conv1.weight" in ck["model"] and "state" in ck["optimizer"]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and {r["seed"] for r in rows} == {3}
    assert rows[-1]["depth"] == 20 and abs(rows[-1]["test_error"] - (1 - accs[-1])) < 1e-3


def test_ddp_two_cpu_processes_on_gloo(tmp_path):
    out, ck = _run(
        ["cifar_plain", "--depth", "20", "--epochs", "1", "--max-steps", "3", "--size", "16", "--backend", "torch"],
        tmp_path,
        nproc=2,
    )
    assert "2 process(es) on cpu" in out and "epoch 1:" in out
    assert ck["epoch"] == 1
