"""The ``cnnkern`` command (also ``python -m cnnkern``).

    cnnkern bench [--ops conv2d,models] [--nets resnet50] [--dtypes bfloat16] [--batch 32]
                  [--backends triton] [--quick] [--no-inductor] [--out DIR] [--no-progress]
                  [--time-limit SECONDS]
    cnnkern bench --report DIR            report.md + plots from the JSON in DIR (no GPU needed)
    cnnkern bench --compare A.json B.json per-layer change between two runs, regressions first
    cnnkern inspect [...]     static inspection of the compiled kernels (see cnnkern._inspect)
    cnnkern summary NETWORK   per-layer shapes, parameters, MACs and activation memory
    cnnkern train [...]       train a network on the bundled digits (see cnnkern.train)

``bench`` on a CUDA machine measures the device's ceilings, runs each op's benchmark module
(and the whole networks) against PyTorch/cuDNN and Inductor, prints the tables, writes JSON and
builds report.md with its plots in the results directory; a kernel that leaves the CUDA context
unusable costs its own figures only: the run goes on in a fresh process without it. Without a
GPU it measures nothing (a
CPU timing of GPU kernels says nothing): it runs the Triton self-check under the interpreter
instead, prints the networks' summaries and shows the latest GPU results committed under
benchmarks/results/ with the path of their report.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


DTYPES = ("bfloat16", "float16", "float32")
MAX_RESUMES = 4  # fresh processes a run may go on in after device faults
RESUME_MIN_S = 30.0  # under a time limit: less left than this, and a faulted run is not resumed
GRACE_S = 120.0  # past its time limit, a worker that has not ended (a stuck kernel) is killed


def _run_worker(argv: list[str], out_dir: str, run_id: str, time_left: float | None) -> int:
    """Run (or go on with) run ``run_id`` in a new process: the same ``cnnkern bench`` arguments,
    plus where its JSON goes and what is left of its time limit. Returns the exit status."""
    cmd = [sys.executable, "-m", "cnnkern.cli", *argv, "--out", out_dir, "--run-id", run_id]
    if time_left is not None:
        cmd += ["--time-limit", f"{time_left:.0f}"]
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait(timeout=None if time_left is None else time_left + GRACE_S)
    except subprocess.TimeoutExpired:
        print(f"cnnkern bench: the worker did not end {GRACE_S:.0f} s after its time limit: killed", file=sys.stderr)
        proc.kill()
        return proc.wait()
    except KeyboardInterrupt:  # the worker got it too: it writes what it measured and ends
        return proc.wait()


def _supervise(args, harness) -> int:
    """``cnnkern bench`` on a GPU: the suite runs in a worker process; when it stops on a device
    fault (an error that leaves the CUDA context unusable, or a hung kernel) the run goes on in a
    fresh worker without the provider that faulted, in the op where it faulted."""
    t0 = time.monotonic()
    out_dir = args.out or harness.default_out_dir(
        {"gpu_name": torch.cuda.get_device_name(), "timestamp_utc": time.strftime("%Y-%m-%d", time.gmtime())}
    )
    run_id = harness.new_run_id()
    status = None
    for attempt in range(MAX_RESUMES + 1):
        left = None if args.time_limit is None else args.time_limit - (time.monotonic() - t0)
        if attempt:
            if left is not None and left < RESUME_MIN_S:
                print(f"device fault, and {left:.0f} s of the time limit left: not resumed")
                break
            print(
                f"\ndevice fault ({status['stops'][-1]}): the run goes on in a fresh process, without the "
                f"faulting provider in that op (resume {attempt} of at most {MAX_RESUMES})",
                flush=True,
            )
        rc = _run_worker(args.argv, out_dir, run_id, left)
        paths = harness.run_paths(out_dir, run_id)
        before, status = status, harness.run_status(paths)
        if not status["device_fault"]:
            break
        if before is not None and status["stops"] == before["stops"]:
            print("the resumed process got no further: not resumed again")
            break
    if rc not in (0, harness.HANG_EXIT):
        print(f"cnnkern bench: the benchmark process ended with status {rc}", file=sys.stderr)
    print(f"\nresults: {', '.join(paths) or 'none'}")
    if paths:
        from cnnkern.benchmarks import report

        written = report.build(os.path.dirname(paths[0]))
        print(f"report: {written[0]} (plots: {', '.join(os.path.basename(p) for p in written[1:])})")
    for line in status["stops"]:
        print(f"stopped early: {line}")
    if status["faulted"]:
        print(
            f"device faults after failures of {', '.join(status['faulted'])}"
            + ("" if status["device_fault"] else ": the run went on in fresh processes without them in those ops")
        )
    if status["failures"]:
        print(
            f"cnnkern bench: {status['failures']} provider failure(s) (wrong result or error, not timed): listed above "
            'and under "failures" in the JSON',
            file=sys.stderr,
        )
    # a wrong, crashing or hung kernel, a dead device or a crashed worker fails the command; a time
    # limit the user set does not
    return 1 if status["failures"] or status["device_fault"] or rc not in (0, harness.HANG_EXIT) else 0


def _bench(args) -> int:
    from cnnkern.benchmarks import harness

    if args.report:
        return _report(args.report)
    if args.compare:
        return _compare(*args.compare)
    ops = _split(args.ops)
    unknown = [o for o in ops or () if o not in harness.OPS]
    if unknown:
        print(f"cnnkern bench: no benchmark for {', '.join(unknown)}; known: {', '.join(harness.OPS)}", file=sys.stderr)
        return 2
    dtypes = _split(args.dtypes)
    bad = [d for d in dtypes or () if d not in DTYPES]
    if bad:
        print(f"cnnkern bench: unknown dtype(s) {', '.join(bad)}; choose from {', '.join(DTYPES)}", file=sys.stderr)
        return 2
    nets = _split(args.nets)
    from cnnkern.benchmarks import bench_models

    bad = [n for n in nets or () if n not in bench_models.NETS]
    if bad:
        print(
            f"cnnkern bench: unknown network(s) {', '.join(bad)}; choose from {', '.join(bench_models.NETS)}",
            file=sys.stderr,
        )
        return 2
    backends = _split(args.backends)
    bad = [b for b in backends or () if b not in ("triton", "cuda")]
    if bad:
        print(f"cnnkern bench: unknown backend(s) {', '.join(bad)}; choose from triton, cuda", file=sys.stderr)
        return 2
    try:
        batches = [int(b) for b in _split(args.batch) or ()] or None
    except ValueError:
        batches = [0]
    if batches is not None and min(batches) < 1:
        print(f"cnnkern bench: --batch takes positive integers, e.g. 1,32,128; got {args.batch!r}", file=sys.stderr)
        return 2

    if args.time_limit is not None and not args.time_limit > 0:
        print(
            f"cnnkern bench: --time-limit takes a positive number of seconds, got {args.time_limit:g}", file=sys.stderr
        )
        return 2

    if torch.cuda.is_available():
        if args.run_id:  # the worker process that the command below starts
            harness.run_ops(
                ops,
                dtypes=dtypes,
                quick=args.quick,
                out_dir=args.out,
                progress=not args.no_progress,
                backends=backends,
                inductor=args.inductor,
                nets=nets,
                batches=batches,
                graph=args.graph,
                time_limit=args.time_limit,
                run_id=args.run_id,
                watchdog=True,
            )
            return 0
        return _supervise(args, harness)

    print(
        "no CUDA GPU: cnnkern bench measures nothing here; running the Triton kernels' self-check under "
        "the interpreter instead, then showing the latest GPU results committed in benchmarks/results/",
        flush=True,
    )
    rc = _selfcheck(ops)
    try:
        _network_summaries(nets)
    except Exception as exc:
        print(f"\nnetwork summaries failed: {type(exc).__name__}: {exc}", flush=True)
        rc = rc or 1
    _show_latest(harness, ops or list(harness.OPS))
    return rc


def _report(path: str) -> int:
    from cnnkern.benchmarks import report

    try:
        written = report.build(path)
    except FileNotFoundError as exc:
        print(f"cnnkern bench --report: {exc}", file=sys.stderr)
        return 2
    for p in written:
        print(p)
    return 0


def _compare(a: str, b: str) -> int:
    from cnnkern.benchmarks import report

    try:
        print(report.compare_text(a, b))
    except FileNotFoundError as exc:
        print(f"cnnkern bench --compare: {exc}", file=sys.stderr)
        return 2
    return 0


def _network_summaries(nets=None) -> None:
    """cnnkern.summary of the networks whose layers the benchmarks take: totals per network."""
    from cnnkern.benchmarks.bench_conv2d import NETWORKS
    from cnnkern.summary import conv_layers, summary

    print(
        "\nnetworks benchmarked layer by layer (cnnkern.summary, one image; the conv benchmarks take every "
        "distinct convolution):"
    )
    rows = [
        (
            "network",
            "input",
            "layers",
            "convolutions (distinct)",
            "parameters",
            "GMACs per image",
            "activations (fp32 MiB)",
        )
    ]
    for name in ("alexnet", "vgg16", "googlenet", "resnet50"):
        if name not in NETWORKS or (nets and name not in nets):
            continue
        factory, size = NETWORKS[name]
        model = factory()
        s = summary(model, (1, *size))
        convs = [r for r in s.rows if r.kind == "conv"]
        rows.append(
            (
                name,
                "x".join(map(str, size)),
                str(len(s.rows)),
                f"{len(convs)} ({len(conv_layers(model, (1, *size)))})",
                f"{s.params:,}",
                f"{s.macs / 1e9:.2f}",
                f"{s.activations * 4 / 2**20:.1f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  " + "-" * (sum(widths) + 2 * (len(widths) - 1)))


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


def _shown(harness, path: str) -> str:
    """``path`` relative to the repository when it lies inside it, else absolute."""
    rel = os.path.relpath(path, harness.REPO_ROOT)
    return os.path.abspath(path) if rel.startswith("..") else rel


def _show_latest(harness, ops: list[str]) -> None:
    for op in ops:
        found = harness.latest_results(op=op)
        print()
        if found is None:
            print(
                f"{op}: no GPU results committed yet (run scripts/gpu_validate.sh on a GPU machine and commit "
                f"its results under {os.path.relpath(harness.RESULTS_DIR, harness.REPO_ROOT)}/)"
            )
            continue
        path, data = found
        print(f"{op}: latest GPU results, {_shown(harness, path)}")
        print(f"  {harness.describe_run(data)}")
        if data.get("stopped"):
            print(f"  stopped early: {data['stopped']}")
        print(harness.format_table(data["results"]) if data["results"] else "  (no timings)")
        for f in data.get("failures") or []:
            print(f"  FAILED, not timed: {harness.describe_failure(f)}")
    from cnnkern.benchmarks import report

    page = report.latest_report(harness.RESULTS_DIR)
    print()
    if page is None:
        print("no report.md committed yet (`cnnkern bench --report DIR` builds one from a results directory)")
    else:
        print(f"latest report (tables, geometric means, plots): {_shown(harness, page)}")


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

    b = sub.add_parser(
        "bench",
        help="benchmark the kernels and networks against PyTorch/cuDNN and Inductor (on a GPU); self-check without one",
        description="On a CUDA machine: measure the device's ceilings, benchmark each op on every "
        "distinct layer of AlexNet, VGG-16, GoogLeNet and ResNet-50 and the whole networks against "
        "PyTorch (cuDNN) and torch.compile(mode='max-autotune'), print tables, write JSON, build "
        "report.md and plots. Without a GPU: run the Triton self-check under the interpreter, print "
        "the networks' summaries and show the latest committed GPU results.",
    )
    b.add_argument(
        "--ops", help="comma-separated (default: all: residual_add, conv2d, conv_bn_relu, local_response_norm, models)"
    )
    b.add_argument("--nets", help="comma-separated networks: alexnet, vgg16, googlenet, resnet50 (default: all)")
    b.add_argument(
        "--dtypes",
        help="comma-separated: bfloat16,float16,float32 (default: each op's own; "
        "bf16/fp16 run channels_last, fp32 NCHW with TF32 as PyTorch's default; --quick: bfloat16)",
    )
    b.add_argument(
        "--batch",
        help="comma-separated batch sizes for the conv layers and the networks' inference "
        "(default: layers 1,32; networks 1,32,128)",
    )
    b.add_argument(
        "--backends", help="comma-separated cnnkern backends: triton,cuda (default: each with a kernel for the op)"
    )
    b.add_argument(
        "--inductor",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time torch.compile(mode='max-autotune') of the reference too (default: on, off with "
        "--quick: it compiles every case)",
    )
    b.add_argument(
        "--quick",
        action="store_true",
        help="a subset: ResNet-50 layers at batch 32, bf16, forward passes, shorter timings, no Inductor",
    )
    b.add_argument(
        "--out", metavar="DIR", help="where the JSON, report.md and plots go (default benchmarks/results/<gpu>-<date>/)"
    )
    b.add_argument(
        "--graph",
        action="store_true",
        help="time every per-op case as a CUDA-graph replay: kernel "
        "time without the host's launch cost, for every provider (default: eager calls, as a user "
        "makes them); the networks keep their own '+graph' providers",
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="start no timing after this many seconds: the "
        "op then running writes what it measured (its JSON says where it stopped) and the ops after "
        "it are not run",
    )
    b.add_argument("--run-id", help=argparse.SUPPRESS)  # the worker process's: the run it does or goes on with
    b.add_argument(
        "--report", metavar="DIR", help="only rebuild report.md and the plots from the JSON in DIR (no GPU needed)"
    )
    b.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        help="only print the per-layer change from run A to "
        "run B (JSON files or result directories), regressions first",
    )

    sub.add_parser("inspect", add_help=False, help="ptxas usage of cnnkern._C; Triton kernels compiled for sm_90/sm_80")

    sub.add_parser(
        "train",
        add_help=False,
        help="train a network on the bundled digits (torchrun for DDP); see `cnnkern train --help`",
    )

    sm = sub.add_parser(
        "summary",
        help="per-layer shapes, parameters, MACs and activation memory of a network",
        description="Per-layer summary of one of cnnkern.models' networks (no GPU, no memory: "
        "the model runs on the meta device).",
    )
    sm.add_argument("net", help="a factory in cnnkern.models, e.g. vgg16, resnet50, googlenet, alexnet")
    sm.add_argument(
        "--input", default=None, help="CxHxW (default 3x224x224; 3x227x227 for alexnet, 3x32x32 for the CIFAR networks)"
    )
    sm.add_argument("--batch", type=int, default=1)
    sm.add_argument("--variant", help="the factory's variant argument (paper | torchvision), where it has one")
    sm.add_argument(
        "--depth",
        type=int,
        help="group rows by the first DEPTH name components (e.g. 1: one row per Inception module or ResNet stage)",
    )

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
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return _bench(args)


if __name__ == "__main__":
    raise SystemExit(main())
