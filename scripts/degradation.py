"""The seed's degradation experiment: plain vs residual CIFAR-style networks, depth 20 and 56.

    python scripts/degradation.py --epochs 40 --out benchmarks/results/degradation-cpu
    python scripts/degradation.py --epochs 40 --seeds 0,1,2 --channels-last      # on a GPU

Trains ``cifar_plain(d)`` and ``cifar_resnet(d)`` for each depth d with ``cnnkern.train`` (same
data, optimizer, schedule and seeds for all four) and writes into ``--out``:

* ``log.jsonl``: one line per network, seed and epoch (train loss, train error, test error, time);
* ``degradation.png``: training error (left) and test error (right) per epoch, as in the seed's
  figure (the mean over the seeds, with the min-max range shaded when there are several);
* ``degradation.md``: the final-epoch errors, and whether the deeper plain network ended with a
  higher training error than the shallower one (the degradation problem) while the deeper
  residual network did not.

The training error is that of the running epoch (the model changes during it), as in the paper's
curves; the data are the bundled digits (cnnkern.train), not CIFAR-10, which needs a download.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict


def _run(net: str, depth: int, seed: int, args, log: str, scratch: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "cnnkern.train",
        net,
        "--depth",
        str(depth),
        "--epochs",
        str(args.epochs),
        "--seed",
        str(seed),
        "--lr",
        str(args.lr),
        "--batch",
        str(args.batch),
        "--log",
        log,
        "--no-progress",
        "--checkpoint",
        os.path.join(scratch, f"{net}{depth}-seed{seed}.pt"),
    ]  # checkpoints are not results
    if args.backend:
        cmd += ["--backend", args.backend]
    if args.channels_last:
        cmd.append("--channels-last")
    print(" ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


def _curves(rows):
    """{(net, depth): {metric: [[value per epoch] per seed]}}"""
    by = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        by[(r["net"], r["depth"])][r["seed"]][r["epoch"]] = r
    out = {}
    for key, seeds in by.items():
        out[key] = {
            m: [[seeds[s][e][m] for e in sorted(seeds[s])] for s in sorted(seeds)]
            for m in ("train_error", "test_error")
        }
    return out


def _final(curves, key, metric):
    """Mean over seeds of the metric averaged over the last 3 epochs (less noisy than one epoch)."""
    vals = [sum(c[-3:]) / len(c[-3:]) for c in curves[key][metric]]
    return sum(vals) / len(vals)


def _plot(curves, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    style = {"cifar_plain": "--", "cifar_resnet": "-"}
    for ax, metric, title in zip(axes, ("train_error", "test_error"), ("training error", "test error")):
        for (net, depth), c in sorted(curves.items()):
            runs = c[metric]
            n = min(len(r) for r in runs)
            epochs = list(range(1, n + 1))
            mean = [sum(r[i] for r in runs) / len(runs) for i in range(n)]
            label = f"{'plain' if net == 'cifar_plain' else 'ResNet'}-{depth}"
            (line,) = ax.plot(epochs, [100 * v for v in mean], style[net], label=label)
            if len(runs) > 1:
                ax.fill_between(
                    epochs,
                    [100 * min(r[i] for r in runs) for i in range(n)],
                    [100 * max(r[i] for r in runs) for i in range(n)],
                    color=line.get_color(),
                    alpha=0.15,
                )
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{title} (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", default="20,56")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--out", default="degradation")
    ap.add_argument("--report-only", action="store_true", help="redo the plot and summary from OUT/log.jsonl")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    log = os.path.join(args.out, "log.jsonl")
    depths = [int(d) for d in args.depths.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    if not args.report_only:
        if os.path.exists(log):
            os.remove(log)
        with tempfile.TemporaryDirectory() as scratch:
            for seed in seeds:
                for depth in depths:
                    for net in ("cifar_plain", "cifar_resnet"):
                        _run(net, depth, seed, args, log, scratch)
    with open(log) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    curves = _curves(rows)
    _plot(curves, os.path.join(args.out, "degradation.png"))

    lo, hi = min(depths), max(depths)
    lines = [
        "# Degradation experiment (plain vs residual)",
        "",
        f"Data: scikit-learn digits upsampled to 32x32 (1,500 train / 297 test), {args.epochs} epochs, "
        f"SGD lr {args.lr} momentum 0.9, batch {args.batch}, seeds {args.seeds}; device "
        f"{rows[0]['device']}, backend {rows[0]['backend']}; {platform.node() or 'host'}"
        + (f", {time.time() - t0:.0f} s in all" if not args.report_only else "")
        + ".",
        "",
        "Errors are the mean over seeds of the last 3 epochs (training error: of the running epoch).",
        "",
        "| network | training error | test error |",
        "|---|---|---|",
    ]
    for net, depth in sorted(curves):
        lines.append(
            f"| {'plain' if net == 'cifar_plain' else 'ResNet'}-{depth} | "
            f"{100 * _final(curves, (net, depth), 'train_error'):.2f}% | "
            f"{100 * _final(curves, (net, depth), 'test_error'):.2f}% |"
        )
    if len(depths) >= 2 and all((n, d) in curves for n in ("cifar_plain", "cifar_resnet") for d in (lo, hi)):
        p_lo, p_hi = (_final(curves, ("cifar_plain", d), "train_error") for d in (lo, hi))
        r_lo, r_hi = (_final(curves, ("cifar_resnet", d), "train_error") for d in (lo, hi))
        lines += [
            "",
            f"Plain: {hi} layers {'HIGHER' if p_hi > p_lo else 'not higher'} training error than {lo} "
            f"({100 * p_hi:.2f}% vs {100 * p_lo:.2f}%): degradation "
            f"{'shown' if p_hi > p_lo else 'not shown'}.",
            f"Residual: {hi} layers {'higher' if r_hi > r_lo else 'lower or equal'} training error than {lo} "
            f"({100 * r_hi:.2f}% vs {100 * r_lo:.2f}%).",
        ]
    lines += ["", "![training and test error](degradation.png)", ""]
    with open(os.path.join(args.out, "degradation.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
