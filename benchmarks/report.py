"""Benchmark report: a Markdown page and PNG plots from the JSON a run left in a results directory,
and the per-layer change between two runs. Needs no GPU: it reads only the JSON.

    cnnkern bench --report benchmarks/results/<gpu>-<date>/     # report.md + speedup_*.png + roofline.png
    cnnkern bench --compare OLD.json NEW.json                    # regressions first
    python -m cnnkern.benchmarks.report DIR

What the page holds: the device, versions, commit and the ceilings measured in the run; per op a
summary (geometric mean, worst and best speedup over PyTorch/cuDNN and over Inductor, per network,
provider, dtype/layout and pass) and per-layer tables (median with its p20-p80 spread, TFLOP/s or
GB/s, fraction of the measured ceiling, speedups); the whole-network throughputs; plots of the
per-layer speedups per network and a roofline of arithmetic intensity against achieved TFLOP/s
under the measured ceilings. A timing whose p20-p80 spread exceeds harness.WIDE_SPREAD of its
median is marked ``~`` and counted, never dropped.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from collections import defaultdict

from . import harness

REPORT = "report.md"
ROOFLINE = "roofline.png"
# How each op's baseline ("torch" provider) is called in the report.
BASELINE_LABEL = {
    "conv2d": "cuDNN",
    "conv_bn_relu": "eager (cuDNN)",
    "residual_add": "eager",
    "local_response_norm": "eager",
    "models": "torchvision eager",
}
OP_ORDER = ["conv2d", "conv_bn_relu", "residual_add", "local_response_norm", "models"]
_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}
_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}
REGRESSION = 0.05
# One colour per provider in every plot.
COLORS = {
    "torch": "tab:orange",
    "triton": "tab:green",
    "cuda": "tab:blue",
    "inductor": "tab:red",
    "cnnkern": "tab:purple",
    "compile": "tab:brown",
}


def _color(provider: str, i: int = 0) -> str:
    return COLORS.get(
        provider, f"C{(i + 5) % 10}"
    )  # --compare: a change beyond 5% whose p20-p80 bands do not overlap is real


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------
def load(path: str) -> list[dict]:
    """The results files at ``path`` (one JSON file, or every results JSON in a directory), each
    as its parsed dict (keys op, env, ceilings, results), ordered as :data:`OP_ORDER`."""
    paths = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "*.json")))
    out = []
    for p in paths:
        try:
            with open(p) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("results"), list) and "op" in data:
            data["_path"] = p
            out.append(data)
    if not out:
        raise FileNotFoundError(f"no benchmark results (JSON with op/env/results) at {path}")
    rank = {op: i for i, op in enumerate(OP_ORDER)}
    return sorted(out, key=lambda d: (rank.get(d["op"], len(rank)), d["op"]))


def records(data: dict) -> list[harness.Result]:
    """A results file's records, with every derived field recomputed from the timings and the
    file's own ceilings (so reports from older files carry the newer fields, e.g. vs Inductor)."""
    return harness.finalize([harness._as_result(r) for r in data["results"]], data.get("ceilings"))


def network_of(case: str) -> str:
    """ "resnet50 layer1.0.conv1 +bias+relu" -> "resnet50"; "large" -> "large"."""
    return case.split()[0]


def layer_of(case: str) -> str:
    """The case without its network and pass suffix: "resnet50 layer1.0.conv1 +bias+relu" -> "layer1.0.conv1"."""
    rest = case.split(None, 1)[1] if " " in case else case
    return rest.removesuffix(" +bias+relu")


def pass_of(r) -> str:
    """The kind of work timed: fwd, fwd+bias+relu, fwd+bwd, or for whole networks inference/train."""
    if r.op == "models":
        return "inference" if r.direction == "fwd" else "train"
    return r.direction + ("+bias+relu" if r.case.endswith(" +bias+relu") else "")


def geomean(values) -> float | None:
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


# ------------------------------------------------------------------------------------------------
# derived figures
# ------------------------------------------------------------------------------------------------
_CONV_SHAPE = re.compile(r"N(\d+) C(\d+) (\d+)x(\d+) K(\d+) (\d+)x(\d+)/(\d+)(?: g(\d+))?")


def min_bytes(r) -> int | None:
    """Bytes the record's work must move at least: the record's own ``bytes`` where the benchmark
    counted them, else, for a convolution, each operand once (x, weight, output; the forward's
    P x Q taken from the FLOP count), three times that for forward+backward (dgrad and wgrad each
    read two operands and write one). None where neither applies."""
    if r.bytes:
        return r.bytes
    m = _CONV_SHAPE.fullmatch(r.shape or "")
    if not m or not r.flops or r.dtype not in _ITEMSIZE:
        return None
    n, c, h, w, k, kr, ks, _, g = (int(v) if v else 1 for v in m.groups())
    passes = 3 if r.direction == "fwd+bwd" else 1
    pq = r.flops / passes / (2 * n * k * (c // g) * kr * ks)
    elems = n * c * h * w + k * (c // g) * kr * ks + n * k * pq
    return int(passes * elems * _ITEMSIZE[r.dtype])


def intensity(r) -> float | None:
    """Arithmetic intensity, FLOPs per byte of :func:`min_bytes`."""
    b = min_bytes(r)
    return r.flops / b if r.flops and b else None


def summarize(recs) -> list[dict]:
    """Per (op, network, provider, dtype, layout, pass) over the non-baseline providers: the number
    of layers, geometric mean / worst / best speedup over the baseline and over "inductor" (where
    measured), with the worst layer's name, and how many of the provider's and of the baseline's
    timings in the group were noisy (wide spread)."""
    groups = defaultdict(list)
    for r in recs:
        if r.provider == harness.BASELINE:
            continue
        groups[(r.op, network_of(r.case), r.provider, r.dtype, r.layout, pass_of(r))].append(r)
    noisy = defaultdict(int)  # the baseline's noisy timings per group
    for r in recs:
        if r.wide_spread and r.provider == harness.BASELINE:
            noisy[(r.op, network_of(r.case), r.dtype, r.layout, pass_of(r))] += 1
    out = []
    for (op, net, prov, dtype, layout, kind), rs in groups.items():
        row = dict(
            op=op,
            network=net,
            provider=prov,
            dtype=dtype,
            layout=layout,
            kind=kind,
            n=len(rs),
            noisy=sum(r.wide_spread for r in rs),
            noisy_baseline=noisy[(op, net, dtype, layout, kind)],
        )
        for tag, attr in (("torch", "speedup"), ("inductor", "speedup_inductor")):
            have = [r for r in rs if getattr(r, attr) is not None]
            if have:
                worst = min(have, key=lambda r: getattr(r, attr))
                best = max(have, key=lambda r: getattr(r, attr))
                row[tag] = dict(
                    geomean=geomean(getattr(r, attr) for r in have),
                    n=len(have),
                    worst=getattr(worst, attr),
                    worst_case=worst.case,
                    best=getattr(best, attr),
                    best_case=best.case,
                )
            else:
                row[tag] = None
        out.append(row)
    rank = {op: i for i, op in enumerate(OP_ORDER)}
    out.sort(key=lambda d: (rank.get(d["op"], 99), d["network"], d["dtype"], d["kind"], d["provider"]))
    return out


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------
def _ms(r) -> str:
    return ("~" if r.wide_spread else "") + f"{r.median_ms:#.4g} ({r.p20_ms:#.3g}-{r.p80_ms:#.3g})"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _rate(r) -> str:
    if r.images_per_s is not None:
        return f"{r.images_per_s:,.0f} img/s"
    if r.tflops is not None:
        return f"{r.tflops:.1f} TFLOP/s"
    if r.gbps is not None:
        return f"{r.gbps:,.0f} GB/s"
    return "-"


def _table(head, rows) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def environment_lines(data: dict) -> list[str]:
    env, ceil = data.get("env", {}), data.get("ceilings") or {}
    cudnn = env.get("cudnn")
    extension = f"loaded ({env.get('extension_archs')})" if env.get("extension_loaded") else "not loaded"
    lines = [
        f"- device: **{env.get('gpu_name') or 'unknown'}** ({env.get('sm_count')} SMs, compute capability "
        f"{env.get('compute_capability')}, {env.get('gpu_memory_GiB')} GiB)",
        f"- software: torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, cuDNN {cudnn}, "
        f"Python {env.get('python')}; cnnkern._C {extension}",
        f"- commit `{env.get('commit')}`, measured {env.get('timestamp_utc')} on host `{env.get('hostname')}`",
        f"- numerics: cudnn.benchmark={env.get('cudnn_benchmark')}, cudnn.allow_tf32={env.get('allow_tf32_cudnn')}, "
        f"matmul.allow_tf32={env.get('allow_tf32_matmul')}",
    ]
    settings = {k: v for k, v in (env.get("cnnkern_env") or {}).items() if k != "CNNKERN_GIT_COMMIT"}
    if settings:  # (kernel pins, split-K, tuning: what makes this run differ from the defaults)
        lines.append("- cnnkern settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()))
    if ceil:
        lines.append(
            f"- ceilings measured in the same run: device copy {ceil.get('copy_GBps', 0):,.0f} GB/s "
            f"(1 GiB bf16 copy_, read + write), bf16 matmul {ceil.get('bf16_matmul_TFLOPs', 0):.0f} TFLOP/s "
            "(8192^3 torch.mm)"
        )
    return lines


def summary_table(rows) -> list[str]:
    head = [
        "op",
        "network",
        "provider",
        "dtype",
        "layout",
        "pass",
        "layers",
        "geomean vs baseline",
        "worst vs baseline (layer)",
        "best vs baseline",
        "geomean vs Inductor",
        "worst vs Inductor (layer)",
        "noisy timings (provider / baseline)",
    ]
    body = []
    for s in rows:
        t, i = s["torch"], s["inductor"]
        body.append(
            [
                s["op"],
                s["network"],
                s["provider"],
                _SHORT.get(s["dtype"], s["dtype"]),
                s["layout"],
                s["kind"],
                s["n"],
                _x(t and t["geomean"]),
                f"{_x(t['worst'])} ({layer_of(t['worst_case'])})" if t else "-",
                _x(t and t["best"]),
                _x(i and i["geomean"]),
                f"{_x(i['worst'])} ({layer_of(i['worst_case'])})" if i else "-",
                f"{s['noisy']} / {s['noisy_baseline']}",
            ]
        )
    return _table(head, body)


def op_tables(op: str, recs) -> list[str]:
    """Per (network, dtype, layout, pass): one row per layer and cnnkern provider."""
    base_label = BASELINE_LABEL.get(op, "baseline")
    by = defaultdict(list)
    for r in recs:
        by[(network_of(r.case), r.dtype, r.layout, pass_of(r))].append(r)
    out = []
    for (net, dtype, layout, kind), rs in by.items():
        base = {r.case: r for r in rs if r.provider == harness.BASELINE}
        ind = {r.case: r for r in rs if r.provider == harness.INDUCTOR}
        mine = [r for r in rs if r.provider != harness.BASELINE]
        if not mine:
            continue
        ceiling = "% of matmul ceiling" if any(r.tflops is not None for r in mine) else "% of copy ceiling"
        out += ["", f"### {op}: {net}, {_SHORT.get(dtype, dtype)} {layout}, {kind}", ""]
        head = [
            "layer",
            "shape",
            "provider",
            "median ms (p20-p80)",
            "throughput",
            ceiling,
            f"{base_label} ms",
            f"vs {base_label}",
            "Inductor ms",
            "vs Inductor",
        ]
        rows = []
        for r in mine:
            b, i = base.get(r.case), ind.get(r.case)
            rows.append(
                [
                    layer_of(r.case) if op != "models" else r.case.split(None, 1)[-1],
                    r.shape,
                    r.provider,
                    _ms(r),
                    _rate(r),
                    "-" if r.ceiling_fraction is None else f"{100 * r.ceiling_fraction:.1f}%",
                    _ms(b) if b else "-",
                    _x(r.speedup),
                    (_ms(i) if i else "-") if r.provider != harness.INDUCTOR else "-",
                    _x(r.speedup_inductor) if r.provider != harness.INDUCTOR else "-",
                ]
            )
        out += _table(head, rows)
    return out


def build_markdown(datas: list[dict], plots: list[str]) -> str:
    """The report page for the results files ``datas`` (see :func:`load`); ``plots``: PNG file
    names (relative to the page) to embed."""
    first = datas[0]
    env = first.get("env", {})
    all_recs = {d["op"]: records(d) for d in datas}
    flat = [r for rs in all_recs.values() for r in rs]
    measured_ind = any(r.provider == harness.INDUCTOR for r in flat)
    noisy = sum(r.wide_spread for r in flat)
    day = (env.get("timestamp_utc") or "")[:10]
    lines = [
        f"# cnnkern benchmark report: {env.get('gpu_name') or 'unknown GPU'}, {day}",
        "",
        f"Generated by `cnnkern bench --report` from {', '.join(os.path.basename(d['_path']) for d in datas)} "
        "(no figure on this page is computed from anything but those files).",
        "",
    ]
    lines += environment_lines(first)
    commits = {d.get("env", {}).get("commit") for d in datas}
    if len(commits) > 1:
        lines.append(f"- **note**: the files come from several commits: {', '.join(sorted(map(str, commits)))}")
    for d in datas:
        if d.get("stopped"):
            lines.append(f"- **{d['op']} stopped early**: {d['stopped']}")
        for reason in d.get("resumed") or []:
            lines.append(
                f"- **{d['op']} resumed in a fresh process** after: {reason} (timings made before it were "
                f"kept; left out of the rest of the op: {', '.join(d.get('faulted') or []) or 'nothing'})"
            )
    failures = [(d["op"], f) for d in datas for f in d.get("failures") or []]
    if failures:
        lines.append(
            f"- **{len(failures)} provider failure(s)**: wrong results or errors, not timed (listed under "
            "Failures below)"
        )
    lines += [
        "",
        (
            "**Timer: CUDA graphs** (`cnnkern bench --graph`): every per-op time is a CUDA-graph replay, the "
            "kernels' GPU time without the host's launch cost, for every provider alike. "
            if env.get("timer_mode") == "graph"
            else ""
        )
        + "Every time is the median of many runs (`triton.testing.do_bench`, L2 flushed; `graph` = one CUDA "
        "graph for few-microsecond cases) with its p20-p80 spread in parentheses. `~` marks a spread wider "
        f"than {100 * harness.WIDE_SPREAD:.0f}% of the median (a noisy timing: read it with care); "
        f"{noisy} of the {len(flat)} timings here are noisy. Speedup = baseline median / this median "
        "(above 1: faster). The baseline is PyTorch with cudnn.benchmark=True, same dtype, layout and TF32 "
        "setting.",
        "",
        (
            'Inductor (`torch.compile(mode="max-autotune")` of the same PyTorch computation) was measured in this run.'
            if measured_ind
            else "**Inductor was not measured in this run**: every 'vs Inductor' cell is empty "
            "(`cnnkern bench` without `--quick`, or with `--inductor`, measures it)."
        ),
        "",
        "## Summary: geometric means and worst cases",
        "",
    ]
    lines += summary_table(summarize(flat))
    if failures:
        lines += [
            "",
            "## Failures",
            "",
            "Each of these providers failed its correctness check against the baseline, or raised, on this "
            "case: it has no timing there.",
            "",
        ]
        lines += _table(
            ["op", "case", "dtype", "layout", "dir", "provider", "stage", "error"],
            [
                [
                    op,
                    f.get("case", "?"),
                    _SHORT.get(f.get("dtype"), f.get("dtype", "?")),
                    f.get("layout", "?"),
                    f.get("direction", "?"),
                    f.get("provider", "?"),
                    f.get("stage", "?"),
                    f.get("error", ""),
                ]
                for op, f in failures
            ],
        )
    if plots:
        lines += ["", "## Plots", ""]
        for p in plots:
            lines += [f"![{os.path.splitext(p)[0]}]({p})", ""]
    for d in datas:
        op = d["op"]
        lines += ["", f"## {op}", ""]
        if d.get("env", {}).get("commit") != env.get("commit"):
            lines += [f"(from commit `{d['env'].get('commit')}`, {d['env'].get('timestamp_utc')})", ""]
        lines += op_tables(op, all_recs[op])
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Cases whose first word is not one of these networks (synthetic tensors, CIFAR option-A joins)
# share one speedup figure, "other".
PLOT_NETWORKS = ("alexnet", "vgg16", "vgg16_bn", "googlenet", "resnet50")


def plot_group(case: str) -> str:
    net = network_of(case)
    return net if net in PLOT_NETWORKS else "other"


def plot_speedups(recs, network: str, path: str) -> str | None:
    """Horizontal bars of each layer's speedup over the baseline (and over Inductor, hatched,
    where measured), one panel per (op, dtype/layout, pass) of ``network``; noisy timings are
    outlined in red. Returns ``path``, or None when the network has no speedup to show."""
    panels = defaultdict(list)
    for r in recs:
        if plot_group(r.case) != network or r.provider in (harness.BASELINE, harness.INDUCTOR) or r.speedup is None:
            continue
        panels[(r.op, r.dtype, r.layout, pass_of(r))].append(r)
    if not panels:
        return None
    plt = _pyplot()
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    keys = list(panels)
    heights = [max(1.6, 0.26 * len(panels[k]) + 1.0) for k in keys]
    fig, axes = plt.subplots(
        len(keys), 1, figsize=(11, sum(heights)), squeeze=False, gridspec_kw={"height_ratios": heights}
    )
    for ax, key in zip(axes[:, 0], keys):
        rs = panels[key]
        provs = sorted({r.provider for r in rs})
        name = layer_of if network != "other" else (lambda c: c)
        layers = list(dict.fromkeys(name(r.case) for r in rs))
        height = 0.8 / (len(provs) * (2 if any(r.speedup_inductor is not None for r in rs) else 1))
        k = 0
        allx = []
        for p in provs:
            for attr, hatch, label in (
                ("speedup", None, f"{p} vs {BASELINE_LABEL.get(key[0], 'baseline')}"),
                ("speedup_inductor", "//", f"{p} vs Inductor"),
            ):
                vals = {name(r.case): r for r in rs if r.provider == p and getattr(r, attr) is not None}
                if not vals:
                    continue
                ys = [i + (k - 0.5) * height - 0.4 + height for i, name in enumerate(layers) if name in vals]
                xs = [getattr(vals[name], attr) for name in layers if name in vals]
                edge = ["red" if vals[name].wide_spread else "none" for name in layers if name in vals]
                ax.barh(ys, xs, height=height, hatch=hatch, label=label, edgecolor=edge, linewidth=1.2, color=_color(p))
                for y, v in zip(ys, xs):
                    ax.text(v, y, f" {v:.2f}x", va="center", fontsize=6)
                allx += xs
                k += 1
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        lo, hi = min(allx + [1.0]) / 1.25, max(allx + [1.0]) * 1.4
        ax.set_xlim(lo, hi)
        ticks = [t for t in (0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20) if lo <= t <= hi]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels(layers, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("speedup (log scale; > 1 is faster than the baseline)", fontsize=8)
        op, dtype, layout, kind = key
        ax.set_title(f"{network}: {op}, {_SHORT.get(dtype, dtype)} {layout}, {kind}", fontsize=9)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", which="both", alpha=0.3)
    fig.text(0.01, 0.002, "red outline: p20-p80 spread above 10% of the median (noisy timing)", fontsize=7)
    fig.tight_layout(rect=(0, 0.01, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_roofline(recs, ceilings: dict, path: str) -> str | None:
    """Left: arithmetic intensity (FLOP per byte of :func:`min_bytes`) against achieved TFLOP/s of
    every bf16/fp16 record with a FLOP count, under the measured roofline min(bf16 matmul rate,
    intensity x copy bandwidth). Right: the memory-bound ops' achieved fraction of the measured
    copy bandwidth. Returns ``path``, or None with nothing to plot."""
    pts = [
        r
        for r in recs
        if r.tflops is not None and r.dtype in ("bfloat16", "float16") and intensity(r) and r.op != "models"
    ]
    bw = [r for r in recs if r.flops is None and r.gbps is not None and r.ceiling_fraction is not None]
    if not pts and not bw:
        return None
    plt = _pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [3, 2]})
    copy_gbps, peak = ceilings.get("copy_GBps"), ceilings.get("bf16_matmul_TFLOPs")
    if pts:
        ais = [intensity(r) for r in pts]
        lo, hi = min(ais) / 2, max(ais) * 2
        if copy_gbps and peak:
            xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
            ax.plot(
                xs,
                [min(peak, x * copy_gbps / 1000) for x in xs],
                color="black",
                linewidth=1.5,
                label=f"measured roofline: {copy_gbps:,.0f} GB/s copy, {peak:.0f} TFLOP/s bf16 matmul",
            )
        markers = {"conv2d": "o", "conv_bn_relu": "s"}
        for op, prov in sorted({(r.op, r.provider) for r in pts}):
            sel = [r for r in pts if r.op == op and r.provider == prov]
            ax.scatter(
                [intensity(r) for r in sel],
                [r.tflops for r in sel],
                s=18,
                alpha=0.75,
                color=_color(prov),
                marker=markers.get(op, "^"),
                label=f"{op} {prov} ({len(sel)})",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (FLOP / minimum bytes moved)")
        ax.set_ylabel("achieved TFLOP/s")
        ax.set_title("bf16/fp16 layers against the ceilings measured in the run", fontsize=10)
        ax.grid(which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.set_axis_off()
    if bw:
        labels = [
            f"{r.op.replace('local_response_norm', 'lrn')} {r.case} {r.layout} {_SHORT.get(r.dtype, r.dtype)} "
            f"{r.direction} [{r.provider}]"
            for r in bw
        ]
        vals = [100 * r.ceiling_fraction for r in bw]
        bx.barh(
            range(len(bw)),
            vals,
            color=[_color(r.provider) for r in bw],
            edgecolor=["black" if r.wide_spread else "none" for r in bw],
            linewidth=1.2,
        )
        from matplotlib.patches import Patch

        bx.legend(
            handles=[Patch(color=_color(p), label=p) for p in sorted({r.provider for r in bw})]
            + [Patch(facecolor="white", edgecolor="black", label="noisy (p20-p80 > 10%)")],
            fontsize=7,
            loc="lower right",
        )
        bx.set_yticks(range(len(bw)))
        bx.set_yticklabels(labels, fontsize=6)
        bx.invert_yaxis()
        bx.axvline(100, color="black", linewidth=0.8)
        bx.set_xlabel("% of the measured copy bandwidth (minimum bytes / time)")
        bx.set_title("memory-bound ops", fontsize=10)
        bx.grid(axis="x", alpha=0.3)
    else:
        bx.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------------
def latest_report(results_dir: str) -> str | None:
    """The report.md of the most recent run under ``results_dir`` that has one (by the timestamp
    recorded in the JSON beside it), or None."""
    best = None
    for page in glob.glob(os.path.join(results_dir, "**", REPORT), recursive=True):
        try:
            stamp = max((d.get("env") or {}).get("timestamp_utc") or "" for d in load(os.path.dirname(page)))
        except FileNotFoundError:
            continue
        if best is None or stamp > best[0]:
            best = (stamp, page)
    return None if best is None else best[1]


def build(results_dir: str, out_dir: str | None = None) -> list[str]:
    """Write ``report.md``, ``speedup_<network>.png`` per network and ``roofline.png`` for the
    results JSON in ``results_dir`` (into ``out_dir``, default the same directory).

    Returns:
        The paths written, report.md first.
    """
    out_dir = out_dir or results_dir
    os.makedirs(out_dir, exist_ok=True)
    datas = load(results_dir)
    flat = [r for d in datas for r in records(d)]
    written = []
    for net in dict.fromkeys(plot_group(r.case) for r in flat):
        p = plot_speedups(flat, net, os.path.join(out_dir, f"speedup_{re.sub(r'[^A-Za-z0-9_.-]+', '_', net)}.png"))
        if p:
            written.append(p)
    p = plot_roofline(flat, datas[0].get("ceilings") or {}, os.path.join(out_dir, ROOFLINE))
    if p:
        written.append(p)
    page = os.path.join(out_dir, REPORT)
    with open(page, "w") as f:
        f.write(build_markdown(datas, [os.path.relpath(p, out_dir) for p in written]))
    return [page, *written]


def _keys(path: str) -> list[tuple]:
    return [(r.op, r.case, r.dtype, r.layout, r.direction, r.provider) for d in load(path) for r in records(d)]


def compare(a_path: str, b_path: str, threshold: float = REGRESSION) -> list[dict]:
    """Per-record change from run A to run B (files or directories), matched on op, case, dtype,
    layout, direction and provider: ``change`` = B median / A median - 1 (positive: B is slower).

    ``verdict``: "regression" when B is slower by more than ``threshold`` and B's p20 lies above
    A's p80 (the bands do not overlap), "improvement" the other way round, "noise" when the change
    is beyond the threshold but the bands overlap, else "same". Sorted regressions first (largest
    slowdown first), then noise, same and improvements (largest speedup last)."""

    def index(path):
        out = {}
        for d in load(path):
            for r in records(d):
                out[(r.op, r.case, r.dtype, r.layout, r.direction, r.provider)] = r
        return out

    a, b = index(a_path), index(b_path)
    rows = []
    for key in a.keys() & b.keys():
        ra, rb = a[key], b[key]
        change = rb.median_ms / ra.median_ms - 1 if ra.median_ms > 0 else float("inf")
        if change > threshold:
            verdict = "regression" if rb.p20_ms > ra.p80_ms else "noise"
        elif change < -threshold:
            verdict = "improvement" if rb.p80_ms < ra.p20_ms else "noise"
        else:
            verdict = "same"
        rows.append(dict(key=key, a=ra, b=rb, change=change, verdict=verdict))
    rank = {"regression": 0, "noise": 1, "same": 2, "improvement": 3}
    rows.sort(key=lambda d: (rank[d["verdict"]], -d["change"]))
    return rows


def compare_text(a_path: str, b_path: str, threshold: float = REGRESSION) -> str:
    """:func:`compare` as an aligned text table, with the two runs named and the unmatched counted."""
    rows = compare(a_path, b_path, threshold)
    da, db = load(a_path)[0], load(b_path)[0]
    lines = [f"A: {a_path}: {harness.describe_run(da)}", f"B: {b_path}: {harness.describe_run(db)}"]
    if (da.get("env") or {}).get("gpu_name") != (db.get("env") or {}).get("gpu_name"):
        lines.append("note: A and B ran on different GPUs")
    counts = defaultdict(int)
    for r in rows:
        counts[r["verdict"]] += 1
    only_a = len(set(_keys(a_path)) - {r["key"] for r in rows})
    only_b = len(set(_keys(b_path)) - {r["key"] for r in rows})
    if only_a or only_b:
        lines.append(f"not compared: {only_a} timings only in A, {only_b} only in B")
    lines.append(
        f"{len(rows)} matching timings: {counts['regression']} regressions, {counts['improvement']} "
        f"improvements, {counts['noise']} changes within the noise, {counts['same']} unchanged "
        f"(threshold {100 * threshold:.0f}%, p20-p80 bands must not overlap)"
    )
    table = [("verdict", "op", "case", "dtype", "layout", "dir", "provider", "A ms", "B ms", "change")]
    for r in rows:
        op, case, dtype, layout, direction, prov = r["key"]
        table.append(
            (
                r["verdict"],
                op,
                case,
                _SHORT.get(dtype, dtype),
                layout,
                direction,
                prov,
                ("~" if r["a"].wide_spread else "") + f"{r['a'].median_ms:#.4g}",
                ("~" if r["b"].wide_spread else "") + f"{r['b'].median_ms:#.4g}",
                f"{100 * r['change']:+.1f}%",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for n, row in enumerate(table):
        lines.append(
            "  ".join(c.rjust(w) if i >= 7 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        )
        if n == 0:
            lines.append("-" * len(lines[-1]))
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m cnnkern.benchmarks.report", description="Build report.md and plots from a results directory."
    )
    ap.add_argument("dir")
    ap.add_argument("--out", help="where to write (default: DIR)")
    args = ap.parse_args(argv)
    for p in build(args.dir, args.out):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
