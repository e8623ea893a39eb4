"""The ``cnnkern`` command (also ``python -m cnnkern``).

    cnnkern bench [--ops residual_add] [--dtypes bfloat16,float16] [--quick] [--out DIR] [--no-progress]
    cnnkern inspect [...]     static inspection of the compiled kernels (see cnnkern._inspect)

``bench`` on a CUDA machine measures the device's ceilings, runs each op's benchmark module
against PyTorch, prints the tables and writes JSON. Without a GPU it measures nothing (a CPU
timing of GPU kernels says nothing): it runs the Triton self-check under the interpreter instead
and shows the latest GPU results committed under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _bench(args) -> int:
    from cnnkern.benchmarks import harness

    ops = _split(args.ops)
    unknown = [o for o in ops or () if o not in harness.OPS]
    if unknown:
        print(f"cnnkern bench: no benchmark for {', '.join(unknown)}; known: {', '.join(harness.OPS)}", file=sys.stderr)
        return 2
    dtypes = _split(args.dtypes)
    bad = [d for d in dtypes or () if d not in ("bfloat16", "float16", "float32")]
    if bad:
        print(f"cnnkern bench: unknown dtype(s) {', '.join(bad)}; choose from bfloat16, float16, float32",
              file=sys.stderr)
        return 2

    if torch.cuda.is_available():
        paths = harness.run_ops(ops, dtypes=dtypes, quick=args.quick, out_dir=args.out, progress=not args.no_progress)
        print(f"\nresults: {', '.join(paths)}")
        return 0

    print("no CUDA GPU: cnnkern bench measures nothing here; running the Triton kernels' self-check under "
          "the interpreter instead, then showing the latest GPU results committed in benchmarks/results/",
          flush=True)
    rc = _selfcheck(ops)
    _show_latest(harness, ops or list(harness.OPS))
    return rc


def _selfcheck(ops: list[str] | None) -> int:
    from cnnkern import selfcheck

    cmd = [sys.executable, "-m", "cnnkern.selfcheck"]
    # An explicit --ops restricts the self-check to those ops that have checks (all checks run when
    # none of them has any: the self-check is then the only thing this machine can say).
    if ops:
        checked = [o for o in ops if o in selfcheck.CHECKS]
        if checked:
            cmd += ["--ops", ",".join(checked)]
    # Set here so the child does not have to re-execute itself to get them (see selfcheck.main).
    env = {**os.environ, "TRITON_INTERPRET": "1", "CNNKERN_POISON": "1"}
    print(flush=True)
    return subprocess.call(cmd, env=env)


def _show_latest(harness, ops: list[str]) -> None:
    for op in ops:
        found = harness.latest_results(op=op)
        print()
        if found is None:
            print(f"{op}: no GPU results committed yet (run scripts/gpu_validate.sh on a GPU machine and commit "
                  f"its results under {os.path.relpath(harness.RESULTS_DIR, harness.REPO_ROOT)}/)")
            continue
        path, data = found
        print(f"{op}: latest GPU results, {os.path.relpath(path, harness.REPO_ROOT)}")
        print(f"  {harness.describe_run(data)}")
        print(harness.format_table(data["results"]))


def _summary(args) -> int:
    from cnnkern import models
    from cnnkern.summary import summary

    factory = getattr(models, args.net, None)
    if factory is None or not callable(factory) or args.net[0].isupper():
        names = [n for n in models.__all__ if n[0].islower()]
        print(f"cnnkern summary: no network {args.net!r}; choose from {', '.join(names)}", file=sys.stderr)
        return 2
    default = "3x227x227" if args.net == "alexnet" else "3x32x32" if args.net.startswith("cifar") else "3x224x224"
    try:
        size = tuple(int(v) for v in (args.input or default).lower().split("x"))
    except ValueError:
        size = ()
    if len(size) != 3:
        print(f"cnnkern summary: --input must look like 3x224x224, got {args.input!r}", file=sys.stderr)
        return 2
    model = factory(**({"variant": args.variant} if args.variant else {}))
    s = summary(model, (args.batch, *size))
    print(f"{args.net}{f' ({args.variant})' if args.variant else ''}, input {args.batch}x{'x'.join(map(str, size))}")
    print(s.table(args.depth))
    return 0


def main(argv=None) -> int:
    """Entry point of the ``cnnkern`` console script; returns the exit status."""
    ap = argparse.ArgumentParser(prog="cnnkern", description="cnnkern: Triton and CUDA C++ kernels for classic CNNs")
    sub = ap.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="benchmark the kernels against PyTorch (on a GPU); self-check without one",
                       description="On a CUDA machine: measure the device's ceilings, benchmark each op "
                       "against PyTorch, print tables, write JSON. Without a GPU: run the Triton self-check "
                       "under the interpreter and show the latest committed GPU results.")
    b.add_argument("--ops", help="comma-separated ops (default: every op with a benchmark: "
                   "residual_add, conv2d, conv_bn_relu, local_response_norm)")
    b.add_argument("--dtypes", help="comma-separated: bfloat16,float16,float32 (default: all three)")
    b.add_argument("--quick", action="store_true", help="fewer cases and shorter timings")
    b.add_argument("--out", metavar="DIR", help="where the JSON goes (default benchmarks/results/<gpu>-<date>/)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")

    sub.add_parser("inspect", add_help=False, help="ptxas usage of cnnkern._C; Triton kernels compiled for sm_90/sm_80")

    sub.add_parser("train", add_help=False, help="train a network on the bundled digits (torchrun for DDP); "
                   "see `cnnkern train --help`")

    sm = sub.add_parser("summary", help="per-layer shapes, parameters, MACs and activation memory of a network",
                        description="Per-layer summary of one of cnnkern.models' networks (no GPU, no memory: "
                        "the model runs on the meta device).")
    sm.add_argument("net", help="a factory in cnnkern.models, e.g. vgg16, resnet50, googlenet, alexnet")
    sm.add_argument("--input", default=None, help="CxHxW (default 3x224x224; 3x227x227 for alexnet, "
                    "3x32x32 for the CIFAR networks)")
    sm.add_argument("--batch", type=int, default=1)
    sm.add_argument("--variant", help="the factory's variant argument (paper | torchvision), where it has one")
    sm.add_argument("--depth", type=int, help="group rows by the first DEPTH name components (e.g. 1: one row "
                    "per Inception module or ResNet stage)")

    args, rest = ap.parse_known_args(argv)
    if args.command == "inspect":
        from cnnkern import _inspect
        return _inspect.main(rest)
    if args.command == "train":
        from cnnkern import train
        return train.main(rest)
    if args.command == "summary":
        if rest:
            ap.error(f"unrecognized arguments: {' '.join(rest)}")
        return _summary(args)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    return _bench(args)


if __name__ == "__main__":
    raise SystemExit(main())
