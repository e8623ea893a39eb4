"""scripts/degradation.py (the seed's plain-vs-residual experiment): its summary and plot from a
training log, on synthetic curves (a real run trains four networks: minutes on a GPU, see README)."""

import json

import pytest
from helpers import load_script


def _script():
    return load_script("degradation")


def _log(path, final):
    with open(path, "w") as f:
        for seed in (0, 1):
            for (net, depth), err in final.items():
                for epoch in range(1, 6):
                    e = err + (5 - epoch) * 0.1 + 0.001 * seed
                    f.write(
                        json.dumps(
                            {
                                "net": net,
                                "depth": depth,
                                "seed": seed,
                                "epoch": epoch,
                                "steps": epoch,
                                "train_loss": e,
                                "train_error": e,
                                "test_error": e + 0.02,
                                "seconds": 1.0,
                                "backend": "torch",
                                "device": "cpu",
                            }
                        )
                        + "\n"
                    )


@pytest.mark.parametrize("plain56,shown", [(0.05, True), (0.0, False)])
def test_report_says_whether_degradation_shows(tmp_path, capsys, plain56, shown):
    pytest.importorskip("matplotlib")
    _log(
        tmp_path / "log.jsonl",
        {
            ("cifar_plain", 20): 0.01,
            ("cifar_plain", 56): plain56,
            ("cifar_resnet", 20): 0.01,
            ("cifar_resnet", 56): 0.005,
        },
    )
    assert _script().main(["--report-only", "--out", str(tmp_path), "--epochs", "5"]) == 0
    md = (tmp_path / "degradation.md").read_text()
    assert ("degradation shown" in md) == shown and ("degradation not shown" in md) == (not shown)
    assert "| plain-56 |" in md and "| ResNet-20 |" in md
    assert "Residual: 56 layers lower or equal training error than 20" in md
    assert (tmp_path / "degradation.png").stat().st_size > 10_000
