"""Benchmark harness: timing, the device's measured ceilings, environment metadata, result records,
JSON results and text tables. One ``bench_<op>.py`` per op builds its cases on top of this.

Every figure is a GPU time from ``triton.testing.do_bench`` (median and p20/p80 of many runs, L2
flushed before each run), or from ``do_bench_cudagraph`` for kernels so short that launch overhead
would otherwise be timed. Throughput is derived from a per-op formula for the bytes (or FLOPs) the
operation needs, and set against ceilings measured on the same device in the same process (device
copy bandwidth, bf16 matmul rate), not against datasheet numbers.

Results go to ``benchmarks/results/<gpu-slug>-<YYYY-MM-DD>/<op>.json`` with the environment (GPU,
versions, TF32 settings, commit) and the ceilings, so a committed file says what produced it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import glob
import importlib
import json
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import torch

# Ops that have a benchmark module; each module has ``run(providers, dtypes, quick, progress)``
# returning a list of :class:`Result` (timings only: :func:`finalize` derives the rest).
OPS = {
    "residual_add": "cnnkern.benchmarks.bench_residual_add",
    "conv2d": "cnnkern.benchmarks.bench_conv2d",
    "conv_bn_relu": "cnnkern.benchmarks.bench_conv_bn_relu",
    "local_response_norm": "cnnkern.benchmarks.bench_local_response_norm",
    "models": "cnnkern.benchmarks.bench_models",  # whole networks: images/s, not one op
}

BASELINE = "torch"  # PyTorch eager / cuDNN: the provider every speedup is measured against
# The second peer: torch.compile(mode="max-autotune") of the same reference computation (Inductor's
# autotuned Triton templates, cuDNN/cuBLAS where they win). Per-op benchmarks compile with
# "max-autotune-no-cudagraphs": the same autotuned kernels, without Inductor wrapping the call in
# its own CUDA graph. Every provider of an op is then timed the same way (one event pair per call,
# or one CUDA graph for the tiny cases, whose capture would fail inside Inductor's graph). Whole
# networks (bench_models) use plain "max-autotune", CUDA graphs included, as a user would.
INDUCTOR = "inductor"
INDUCTOR_MODE = "max-autotune-no-cudagraphs"
WIDE_SPREAD = 0.1  # (p80 - p20) / median above this marks a timing as noisy
# Benchmarks live in <repo>/benchmarks; realpath so that a symlinked package (cnnkern/benchmarks ->
# ../benchmarks, used on machines where the package is not pip-installed) still finds the repo.
HERE = os.path.dirname(os.path.realpath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
REPO_ROOT = os.path.dirname(HERE)
SCHEMA = 1


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
# Set by run_ops(graph=True) (`cnnkern bench --graph`) while the per-op modules run: every timing
# is then a CUDA-graph replay (kernel time without the host's launch cost, for every provider).
# The whole-network benchmark keeps its own timer (its "+graph" providers capture inference).
_FORCE_GRAPH = False


def time_fn(
    fn,
    *,
    warmup_ms: float = 25,
    rep_ms: float = 100,
    cudagraph: bool = False,
    grad_to_none: list[torch.Tensor] | None = None,
) -> dict:
    """GPU time of ``fn()`` in milliseconds.

    Args:
        fn: a callable that launches work on the current CUDA stream.
        warmup_ms, rep_ms: time budgets for the warm-up and the timed runs (Triton's units).
        cudagraph: capture ``rep_ms`` worth of calls in one CUDA graph and replay it
            (``triton.testing.do_bench_cudagraph``): no launch overhead and no L2 flush, for
            kernels of a few microseconds (and every case under ``cnnkern bench --graph``).
            Otherwise ``do_bench``: one event pair per call, L2 flushed before each.
        grad_to_none: tensors whose ``.grad`` is reset before each call, so a timed backward pass
            writes fresh gradients instead of accumulating into old ones (an extra add).

    Returns:
        ``{"median_ms", "p20_ms", "p80_ms", "wide_spread", "timer"}``; ``wide_spread`` is True when
        (p80 - p20) / median > 0.1; ``timer`` is "cudagraph" or "do_bench".
    """
    import triton.testing

    # Only arguments that triton 3.6 (the GPU machine's) and 3.8 both accept.
    quantiles = [0.5, 0.2, 0.8]
    if (cudagraph or _FORCE_GRAPH) and hasattr(triton.testing, "do_bench_cudagraph"):
        median, p20, p80 = triton.testing.do_bench_cudagraph(
            fn, rep=rep_ms, grad_to_none=grad_to_none, quantiles=quantiles
        )
        timer = "cudagraph"
    else:
        median, p20, p80 = triton.testing.do_bench(
            fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=quantiles
        )
        timer = "do_bench"
    return {
        "median_ms": float(median),
        "p20_ms": float(p20),
        "p80_ms": float(p80),
        "wide_spread": is_wide_spread(median, p20, p80),
        "timer": timer,
    }


def providers(op: str, requested=None, extra: tuple = (), inductor: bool = True) -> list[str]:
    """The providers a benchmark of ``op`` runs: the ``"torch"`` baseline first (always: every
    speedup is relative to it), then the requested ones (default: every GPU backend with a kernel
    for ``op`` that can run here, then ``"inductor"`` unless ``inductor`` is False). ``"inductor"``
    is :func:`compile_reference` of the baseline's own computation. ``extra``: providers the module
    adds itself (e.g. "compile")."""
    import cnnkern

    gpu = [b for b in cnnkern._backend.AUTO_ORDER.get(op, ()) if b in cnnkern.available_backends()]
    if requested is None:
        return [BASELINE, *gpu, *([INDUCTOR] if inductor else [])]
    known = {BASELINE, INDUCTOR, "triton", "cuda", *extra}
    bad = [p for p in requested if p not in known]
    if bad:
        raise ValueError(f"unknown provider(s) {bad}; choose from {', '.join(sorted(known))}")
    missing = [p for p in requested if p not in (BASELINE, INDUCTOR, *extra) and p not in gpu]
    if missing:
        raise ValueError(f"provider(s) {missing} cannot run {op} here (available: {', '.join(gpu) or 'none'})")
    out = [BASELINE]
    for p in requested:
        if p not in out:
            out.append(p)
    return out


def suite_providers(op: str, backends=None, inductor: bool = True) -> list[str]:
    """The providers of ``op`` in a suite run (``cnnkern bench``): the baseline, those of
    ``backends`` (default: all) that have a kernel for ``op`` and can run here, then "inductor"
    when ``inductor``. Unlike :func:`providers`, a backend without a kernel for this op is left
    out instead of being an error: ``--backends triton,cuda`` means "each where it exists"."""
    import cnnkern

    gpu = [b for b in cnnkern._backend.AUTO_ORDER.get(op, ()) if b in cnnkern.available_backends()]
    chosen = gpu if backends is None else [b for b in backends if b in gpu]
    return [BASELINE, *chosen, *([INDUCTOR] if inductor else [])]


def compile_reference(fn, mode: str | None = None):
    """``torch.compile(fn, mode=INDUCTOR_MODE, dynamic=False)``: the "inductor" provider.

    Dynamo's compile cache is cleared first. Every case of a benchmark compiles a closure with the
    same code object, and past Dynamo's recompile limit (8) a new shape would silently run eagerly;
    a reset per case keeps each "inductor" timing a compiled one. Call it once per case, before
    any of that case's other compiled callables (a reset drops theirs too).
    """
    import torch._dynamo

    torch._dynamo.reset()
    return torch.compile(fn, mode=mode or INDUCTOR_MODE, dynamic=False)


def is_wide_spread(median: float, p20: float, p80: float) -> bool:
    """True when the p20-p80 band is wider than 10% of the median (a noisy measurement)."""
    return median > 0 and (p80 - p20) / median > WIDE_SPREAD


# ------------------------------------------------------------------------------------------------
# ceilings
# ------------------------------------------------------------------------------------------------
def _copy_gbps(device: torch.device) -> float:
    # Device copy: 1 GiB of bf16 (far beyond any L2), fewer bytes on a GPU with little free memory.
    # A copy reads and writes every byte: 2 * nbytes moved.
    free, _ = torch.cuda.mem_get_info(device)
    nbytes = min(1 << 30, (free // 4) & ~0xFFFF)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), rep_ms=200)
    return 2 * nbytes / (t["median_ms"] * 1e6)


def _matmul_tflops(device: torch.device) -> float:
    # Dense bf16 GEMM, 8192^3: large enough to reach the tensor cores' sustained rate.
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    c = torch.empty(n, n, dtype=torch.bfloat16, device=device)
    t = time_fn(lambda: torch.mm(a, b, out=c), rep_ms=200)
    return 2 * n**3 / (t["median_ms"] * 1e9)


@functools.lru_cache(maxsize=None)
def _ceilings(index: int) -> tuple[float, float]:
    device = torch.device("cuda", index)
    with torch.cuda.device(device):
        copy_gbps = _copy_gbps(device)
        tflops = _matmul_tflops(device)
        torch.cuda.empty_cache()  # give the 2 GiB back to the benchmarks that follow
    return copy_gbps, tflops


def measure_ceilings(device: torch.device | str | int | None = None) -> dict:
    """The device's measured ceilings, once per process and device.

    Returns:
        ``{"copy_GBps": float, "bf16_matmul_TFLOPs": float}``: the median rate of a 1 GiB bf16
        device-to-device ``copy_`` (bytes = read + write) and of an 8192^3 bf16 ``torch.mm``.
    """
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    copy_gbps, tflops = _ceilings(index)
    return {"copy_GBps": copy_gbps, "bf16_matmul_TFLOPs": tflops}


# ------------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------------
def git_commit(root: str = REPO_ROOT) -> str:
    """``git rev-parse HEAD`` of ``root`` plus "-dirty" when ``git status --porcelain`` lists
    anything; ``CNNKERN_GIT_COMMIT`` when set (for a copy of the tree without .git, e.g. on a GPU
    machine); "unknown" when neither works."""
    forced = os.environ.get("CNNKERN_GIT_COMMIT", "").strip()
    if forced:
        return forced
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", root, "status", "--porcelain"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if status else "") if head else "unknown"


def environment() -> dict:
    """What produced a measurement: GPU, versions, numerics settings, commit, host and time.

    Keys: gpu_name, sm_count, compute_capability, gpu_memory_GiB (None without CUDA), torch,
    triton, cuda, cudnn, python, allow_tf32_matmul, allow_tf32_cudnn, cudnn_benchmark, commit,
    hostname, timestamp_utc (ISO 8601), extension_loaded, extension_archs, cnnkern_env (every
    CNNKERN_* environment variable set: kernel pins, split-K, tuning).
    """
    from cnnkern import _backend

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {"gpu_name": None, "sm_count": None, "compute_capability": None, "gpu_memory_GiB": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(
            gpu_name=props.name,
            sm_count=props.multi_processor_count,
            compute_capability=f"{props.major}.{props.minor}",
            gpu_memory_GiB=round(props.total_memory / 2**30, 1),
        )
    env.update(
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        python=platform.python_version(),
        allow_tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32),
        allow_tf32_cudnn=bool(torch.backends.cudnn.allow_tf32),
        cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
        commit=git_commit(),
        hostname=socket.gethostname(),
        timestamp_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        extension_loaded=_backend.has_extension(),
        extension_archs=getattr(_backend._C, "cuda_archs", None),
        cnnkern_env={k: v for k, v in sorted(os.environ.items()) if k.startswith("CNNKERN_")},
    )
    return env


# ------------------------------------------------------------------------------------------------
# records
# ------------------------------------------------------------------------------------------------
@dataclass
class Result:
    """One timing of one provider on one case.

    ``bytes`` / ``flops`` are what the operation needs (each op's formula, in its bench module);
    :func:`finalize` turns them into ``gbps`` / ``tflops``, the fraction of the matching ceiling
    and the speedup over the ``"torch"`` record of the same case, dtype, layout and direction.
    """

    op: str
    case: str
    shape: str  # e.g. "32x256x56x56", or "x 128x32x16x16, s 128x16x32x32"
    dtype: str  # "bfloat16" | "float16" | "float32"
    layout: str  # "NCHW" | "NHWC" (channels_last)
    provider: str  # "torch" (PyTorch eager / cuDNN) | "triton" | "cuda"
    direction: str  # "fwd" | "fwd+bwd"
    median_ms: float
    p20_ms: float
    p80_ms: float
    wide_spread: bool = False
    timer: str = "do_bench"
    bytes: int | None = None
    flops: int | None = None
    gbps: float | None = None
    tflops: float | None = None
    ceiling_fraction: float | None = None
    speedup: float | None = None
    speedup_inductor: float | None = None  # "inductor" median / this median, where it was measured
    images: int | None = None  # whole networks: images per timed call (the batch)
    images_per_s: float | None = None

    @classmethod
    def from_timing(cls, timing: dict, **fields) -> Result:
        """A record from :func:`time_fn`'s dict plus the descriptive fields."""
        return cls(
            median_ms=timing["median_ms"],
            p20_ms=timing["p20_ms"],
            p80_ms=timing["p80_ms"],
            wide_spread=timing["wide_spread"],
            timer=timing["timer"],
            **fields,
        )

    def key(self) -> tuple:
        """What makes two records comparable: the same work, differing only in provider."""
        return self.op, self.case, self.dtype, self.layout, self.direction


def _as_result(r) -> Result:
    if isinstance(r, Result):
        return r
    known = {f.name for f in dataclasses.fields(Result)}
    return Result(**{k: v for k, v in r.items() if k in known})


def finalize(records: list[Result], ceilings: dict | None) -> list[Result]:
    """Fill in the derived fields, in place, once every provider of every case has run.

    GB/s = bytes / median time; TFLOP/s = flops / median time. ``ceiling_fraction`` is TFLOP/s over
    the measured bf16 matmul rate for ops with a FLOP count, else GB/s over the measured copy
    bandwidth. ``speedup`` = baseline median / this median (the baseline's own is 1.0);
    ``speedup_inductor`` the same against the "inductor" record of the same key, where there is
    one. ``images_per_s`` = images / median time, for records that count images.
    """
    base = {r.key(): r.median_ms for r in records if r.provider == BASELINE}
    ind = {r.key(): r.median_ms for r in records if r.provider == INDUCTOR}
    for r in records:
        if r.images is not None and r.median_ms > 0:
            r.images_per_s = r.images / (r.median_ms * 1e-3)
        if r.median_ms > 0:
            if r.bytes is not None:
                r.gbps = r.bytes / (r.median_ms * 1e6)
            if r.flops is not None:
                r.tflops = r.flops / (r.median_ms * 1e9)
        if ceilings:
            if r.tflops is not None and ceilings.get("bf16_matmul_TFLOPs"):
                r.ceiling_fraction = r.tflops / ceilings["bf16_matmul_TFLOPs"]
            elif r.gbps is not None and ceilings.get("copy_GBps"):
                r.ceiling_fraction = r.gbps / ceilings["copy_GBps"]
        b = base.get(r.key())
        r.speedup = b / r.median_ms if b is not None and r.median_ms > 0 else None
        i = ind.get(r.key())
        r.speedup_inductor = i / r.median_ms if i is not None and r.median_ms > 0 else None
    return records


# ------------------------------------------------------------------------------------------------
# failures and the time limit: one provider's wrong result or error does not end the suite
# ------------------------------------------------------------------------------------------------
class WrongResult(AssertionError):
    """A provider's result disagrees with the baseline's: it gets no timing on that case."""


class TimeLimitReached(Exception):
    """The suite's time limit (:func:`run_ops` ``time_limit``) passed: no further timing starts."""


class DeviceFault(RuntimeError):
    """After a provider's error the CUDA context is unusable (e.g. an illegal address): nothing
    after it can run in this process. ``provider``: the one whose error it followed."""

    def __init__(self, message: str, provider: str | None = None):
        super().__init__(message)
        self.provider = provider


class Records(list):
    """One benchmark module's :class:`Result` records, plus ``failures``: one dict per provider
    check or timing that failed (the case's fields, ``provider``, ``stage`` ("check" | "timing")
    and ``error``). :func:`run_ops` writes both; a failed provider has no timing on that case."""

    def __init__(self):
        super().__init__()
        self.failures: list[dict] = []


_CURRENT: Records | None = None  # the running module's records (kept when it stops early)
_DEADLINE: float | None = None  # time.monotonic() after which no check or timing starts
_FAILURE_FIELDS = ("op", "case", "shape", "dtype", "layout", "direction")
_clock = time.monotonic  # the time limit's clock (tests replace it)
# a run resumed after a device fault (run_ops run_id=): _RUN (below), the op under way, holds
# its timings made before the fault, by _ident, reused instead of timed again, and the providers
# that faulted the device in it, not run again in it


def _ident(provider: str, fields: dict) -> tuple:
    return (provider, *(fields.get(k) for k in _FAILURE_FIELDS))


# the hang watchdog (run_ops watchdog=True, in the worker process of `cnnkern bench`): a check or
# timing that has not returned after hang_limit(provider, op) seconds is taken for a hung kernel
HANG_S = 180.0  # a kernel check or timing: far more than any case takes, first compilation included
HANG_COMPILE_S = 1800.0  # what compiles a lot inside one check: Inductor (max-autotune), and a whole
# network, whose first pass compiles and autotunes every layer's kernels
HANG_EXIT = 3  # the worker's exit status after the watchdog saved a hung op
_ACTIVE: tuple[str, str, dict, float] | None = None  # (provider, stage, fields, start) under way


def hang_limit(provider: str, op: str | None = None) -> float:
    """Seconds a check or timing of ``provider`` (in op ``op``) may take before the watchdog calls
    it hung."""
    return HANG_COMPILE_S if provider == INDUCTOR or op == "models" else HANG_S


@contextlib.contextmanager
def _active(provider: str, stage: str, fields: dict):
    global _ACTIVE
    _ACTIVE = (provider, stage, fields, _clock())
    try:
        yield
    finally:
        _ACTIVE = None


def new_records() -> Records:
    """The list a benchmark module collects its records (and failures) in. :func:`run_ops` keeps
    what it holds when the module stops at the time limit or on a device fault."""
    global _CURRENT
    _CURRENT = Records()
    return _CURRENT


def _check_deadline() -> None:
    if _DEADLINE is not None and _clock() > _DEADLINE:
        raise TimeLimitReached("the time limit passed")


def _device_usable() -> bool:
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return True
    try:
        torch.cuda.synchronize()
        return True
    except Exception:
        return False


def describe_failure(f: dict) -> str:
    """One line for a ``failures`` entry: provider (stage) on case dtype direction: error."""
    return (
        f"{f.get('provider')} ({f.get('stage')}) on {f.get('case')} {f.get('dtype')} {f.get('direction')}: "
        f"{f.get('error')}"
    )


def _record_failure(records: Records, stage: str, provider: str, exc: BaseException, fields: dict) -> None:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    text = text if len(text) <= 600 else text[:597] + "..."
    failure = {
        **{k: fields[k] for k in _FAILURE_FIELDS if k in fields},
        "provider": provider,
        "stage": stage,
        "error": text,
    }
    records.failures.append(failure)
    print(f"\n!! FAILED, not timed: {describe_failure(failure)}", file=sys.stderr, flush=True)
    if not _device_usable():
        raise DeviceFault(
            f"the CUDA context is unusable after {provider} failed on {fields.get('case')}: {text}", provider
        ) from exc


def verify(records: Records, provider: str, check, **fields) -> bool:
    """Run ``check()``, a provider's correctness check on one case (it raises, typically
    :class:`WrongResult`, when the provider's output is wrong). On any error the failure is
    recorded in ``records.failures`` and False returned: the caller does not time that provider
    on that case. Raises :class:`TimeLimitReached` past the time limit, and :class:`DeviceFault`
    when the error left the CUDA context unusable. In a resumed run a check that passed before
    the fault is not run again (True), and a provider that faulted the device in this op is not
    run at all (False; its failure is already recorded)."""
    if _RUN is not None and _ident(provider, fields) in _RUN.prior:
        return True
    if _RUN is not None and provider in _RUN.faulted:
        return False
    _check_deadline()
    try:
        with _active(provider, "check", fields):
            check()
        return True
    except Exception as exc:
        _record_failure(records, "check", provider, exc, fields)
        return False


def measure(
    records: Records,
    fn,
    *,
    provider: str,
    warmup_ms: float,
    rep_ms: float,
    cudagraph: bool = False,
    grad_to_none=None,
    **fields,
) -> bool:
    """Time ``fn`` (:func:`time_fn`) and append its :class:`Result` (``provider`` and ``fields``)
    to ``records``; True when it did. An error while timing is recorded as a failure instead
    (False). Raises :class:`TimeLimitReached` past the time limit (before timing), and
    :class:`DeviceFault` as :func:`verify` does. In a resumed run a timing made before the fault
    is reused, not repeated."""
    prior = _RUN.prior.get(_ident(provider, fields)) if _RUN is not None else None
    if prior is not None:
        records.append(prior)
        return True
    _check_deadline()
    try:
        with _active(provider, "timing", fields):
            t = time_fn(fn, warmup_ms=warmup_ms, rep_ms=rep_ms, cudagraph=cudagraph, grad_to_none=grad_to_none)
    except Exception as exc:
        _record_failure(records, "timing", provider, exc, fields)
        return False
    records.append(Result.from_timing(t, provider=provider, **fields))
    return True


# ------------------------------------------------------------------------------------------------
# JSON results
# ------------------------------------------------------------------------------------------------
def slug(text: str) -> str:
    """ "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def default_out_dir(env: dict) -> str:
    """``benchmarks/results/<gpu-name-slug>-<YYYY-MM-DD>`` for the run described by ``env``."""
    day = (env.get("timestamp_utc") or "")[:10] or datetime.date.today().isoformat()
    return os.path.join(RESULTS_DIR, f"{slug(env.get('gpu_name') or 'no-gpu')}-{day}")


def write_results(
    records: list[Result],
    env: dict,
    ceilings: dict | None,
    out_dir: str | None = None,
    *,
    op: str | None = None,
    failures: list[dict] | None = None,
    stopped: str | None = None,
    faulted: list[str] | None = None,
    resumed: list[str] | None = None,
) -> str:
    """Write one op's records, with ``env`` and ``ceilings``, to ``<out_dir>/<op>.json``.

    Args:
        records: finalized records, all of one op.
        env: :func:`environment`'s dict. ceilings: :func:`measure_ceilings`'s dict.
        out_dir: default :func:`default_out_dir` (under benchmarks/results/).
        op: the op's name (needed only when ``records`` is empty).
        failures: :class:`Records` ``failures`` (providers that failed a check or a timing).
        stopped: why the op's run ended before its last case (time limit, device fault).
        faulted: the providers after whose error the CUDA context was unusable (a resumed run
            leaves them out of this op). resumed: the ``stopped`` reasons of the earlier
            processes of this op, each followed by a resumed run (:func:`run_ops` ``run_id``).

    Returns:
        The path written.
    """
    ops = {r.op for r in records} | ({op} if op else set())
    if len(ops) != 1:
        raise ValueError(f"write_results takes the records of exactly one op, got {sorted(ops) or 'none'}")
    (op,) = ops
    out_dir = out_dir or default_out_dir(env)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{op}.json")
    data = {
        "schema": SCHEMA,
        "op": op,
        "env": env,
        "ceilings": ceilings,
        "results": [dataclasses.asdict(r) for r in records],
        "failures": list(failures or []),
        "stopped": stopped,
        "faulted": list(faulted or []),
        "resumed": list(resumed or []),
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    return path


def latest_results(results_dir: str | None = None, op: str | None = None) -> tuple[str, dict] | None:
    """The most recent results file under ``results_dir`` (default benchmarks/results/), by the
    timestamp recorded inside it, optionally only files of ``op``.

    Returns:
        ``(path, data)`` with ``data`` the parsed JSON (keys op, env, ceilings, results), or None
        when there is none. Files that are not cnnkern results are skipped.
    """
    results_dir = results_dir or RESULTS_DIR
    best = None
    for path in glob.glob(os.path.join(results_dir, "**", "*.json"), recursive=True):
        try:
            with open(path) as f:
                data = json.load(f)
            stamp = data["env"]["timestamp_utc"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not isinstance(stamp, str) or not isinstance(data.get("results"), list):
            continue
        if op is not None and data.get("op") != op:
            continue
        if best is None or stamp > best[0]:
            best = (stamp, path, data)
    return None if best is None else (best[1], best[2])


# ------------------------------------------------------------------------------------------------
# text table
# ------------------------------------------------------------------------------------------------
_SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


def format_table(records) -> str:
    """An aligned text table of records (:class:`Result` or their JSON dicts), one row each.

    Columns: case, shape, dtype, layout, direction, provider, median ms (``~`` marks a p20-p80
    spread wider than 10% of the median), p20-p80 ms, images/s, GB/s or TFLOP/s, % of the
    measured ceiling, speedup over the torch baseline, speedup over "inductor" (only when some
    record has one), and the timer ("graph" for CUDA-graph timings).
    """
    records = [_as_result(r) for r in records]
    with_ind = any(r.speedup_inductor is not None for r in records)
    head = (
        [
            "case",
            "shape",
            "dtype",
            "layout",
            "dir",
            "provider",
            "median ms",
            "p20-p80 ms",
            "throughput",
            "% ceil",
            "speedup",
        ]
        + (["vs inductor"] if with_ind else [])
        + ["timer"]
    )
    rows = [tuple(head)]
    prev = None
    spacer = []
    for r in records:
        if prev is not None and (r.case, r.dtype, r.layout) != prev:
            spacer.append(len(rows))
        prev = (r.case, r.dtype, r.layout)
        if r.images_per_s is not None:
            rate = f"{r.images_per_s:.0f} img/s"
        elif r.tflops is not None:
            rate = f"{r.tflops:.1f} TFLOP/s"
        elif r.gbps is not None:
            rate = f"{r.gbps:.0f} GB/s"
        else:
            rate = "-"
        row = [
            r.case,
            r.shape,
            _SHORT_DTYPE.get(r.dtype, r.dtype),
            r.layout,
            r.direction,
            r.provider,
            ("~" if r.wide_spread else "") + f"{r.median_ms:#.4g}",
            f"{r.p20_ms:#.4g}-{r.p80_ms:#.4g}",
            rate,
            "-" if r.ceiling_fraction is None else f"{100 * r.ceiling_fraction:.1f}%",
            "-" if r.speedup is None else f"{r.speedup:.2f}x",
        ]
        if with_ind:
            row.append("-" if r.speedup_inductor is None else f"{r.speedup_inductor:.2f}x")
        row.append("graph" if r.timer == "cudagraph" else "")
        rows.append(tuple(row))
    right = set(range(6, len(head) - 1))  # numbers right-aligned
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        if n in spacer:
            lines.append("")
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("-" * len(lines[-1]))
    if any(r.wide_spread for r in records):
        lines.append("~ : p20-p80 spread above 10% of the median (noisy timing)")
    return "\n".join(lines)


def describe_run(data: dict) -> str:
    """One line naming the device, date, commit and ceilings of a results file's ``data``."""
    env, ceil = data.get("env", {}), data.get("ceilings") or {}
    parts = [
        f"{env.get('gpu_name') or 'unknown GPU'}",
        f"{env.get('timestamp_utc', '?')}",
        f"commit {env.get('commit', 'unknown')}",
        f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}",
    ]
    if ceil:
        parts.append(
            f"ceilings: copy {ceil.get('copy_GBps', 0):.0f} GB/s, "
            f"bf16 matmul {ceil.get('bf16_matmul_TFLOPs', 0):.0f} TFLOP/s"
        )
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------
# progress
# ------------------------------------------------------------------------------------------------
class _PlainProgress:
    """tqdm's interface subset used here, for machines without tqdm: a line on stderr at most
    every 10 s with the count and an ETA from the mean time per step so far."""

    def __init__(self, total: int, desc: str):
        import time

        self._time = time.monotonic
        self.total, self.desc, self.n = total, desc, 0
        self.start = self.last = self._time()
        self.postfix = ""

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self._time()
        if now - self.last >= 10 or self.n == self.total:
            eta = (now - self.start) / self.n * (self.total - self.n)
            print(
                f"{self.desc}: {self.n}/{self.total}, ETA {int(eta) // 60}m{int(eta) % 60:02d}s  {self.postfix}",
                file=sys.stderr,
                flush=True,
            )
            self.last = now

    def close(self) -> None:
        pass


class _NoProgress(_PlainProgress):
    def update(self, n: int = 1) -> None:
        self.n += n


class _SuiteChild:
    """One module's view of the suite-wide bar: its updates advance the suite's count (and ETA)."""

    def __init__(self, suite, desc: str):
        self.suite, self.desc = suite, desc

    def set_postfix_str(self, text: str) -> None:
        self.suite.set_postfix_str(f"{self.desc}: {text}")

    def update(self, n: int = 1) -> None:
        self.suite.update(n)

    def close(self) -> None:
        pass


_SUITE = None  # the suite-wide bar while run_ops runs several modules


def _make_bar(total: int, desc: str, unit: str = "timing"):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainProgress(total, desc)
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)


def progress_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm progress bar with an ETA on stderr (a plain-line fallback where tqdm is not
    installed; a silent one when ``enabled`` is False). Inside :func:`run_ops` every module's bar
    is a view of one suite-wide bar, whose ETA is that of the whole suite."""
    if not enabled:
        return _NoProgress(total, desc)
    if _SUITE is not None:
        return _SuiteChild(_SUITE, desc)
    return _make_bar(total, desc)


# ------------------------------------------------------------------------------------------------
# running benchmark modules
# ------------------------------------------------------------------------------------------------
def _accepted(fn, kwargs: dict) -> dict:
    """The items of ``kwargs`` that ``fn`` takes as keyword arguments (modules differ: only conv
    benchmarks take networks, only bench_models takes backends, ...)."""
    import inspect

    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params and v is not None}


def op_networks(op: str) -> set[str] | None:
    """The networks (``--nets`` names) whose layers ``op``'s benchmark measures, from the
    module's NETS; None when the module does not say (then --nets does not skip it)."""
    module = importlib.import_module(OPS[op])
    nets = getattr(module, "NETS", None)
    return None if nets is None else set(nets)


def suite_plan(
    ops=None, *, dtypes=None, quick: bool = False, backends=None, inductor: bool | None = None, nets=None, batches=None
) -> list[tuple[str, dict, int]]:
    """What :func:`run_ops` will run: ``(op, run keyword arguments, number of timings)`` per op.

    ``inductor`` None means on for a full run and off with ``quick`` (max-autotune compiles every
    case, minutes per op); ``quick`` without ``dtypes`` means bf16 only. An op none of whose networks
    is in ``nets`` is left out. Needs no GPU except for the provider lists (which backends are
    available here).
    """
    ops = list(OPS) if ops is None else list(ops)
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise ValueError(f"no benchmark for {', '.join(unknown)}; known: {', '.join(OPS)}")
    if inductor is None:
        inductor = not quick
    if quick and not dtypes:
        dtypes = ("bfloat16",)  # the quick subset: bf16 channels_last only
    plan = []
    for op in ops:
        module = importlib.import_module(OPS[op])
        used = op_networks(op)
        if nets and used is not None and not (used & set(nets)):
            continue
        kwargs = {
            "quick": quick,
            "dtypes": tuple(dtypes) if dtypes else None,
            "networks": [n for n in nets if n in used] if nets and used is not None else None,
            "batches": tuple(batches) if batches else None,
            "backends": backends,
            "inductor": inductor,
        }
        if hasattr(module, "suite_providers"):  # bench_models: providers of its own
            kwargs["providers"] = module.suite_providers(backends, inductor)
        else:
            kwargs["providers"] = suite_providers(op, backends, inductor)
        kwargs = _accepted(module.run, kwargs)
        count = module.count(**_accepted(module.count, kwargs)) if hasattr(module, "count") else 0
        plan.append((op, kwargs, count))
    return plan


def _resumed_state(out_dir: str, run_id: str, op: str) -> dict | None:
    """The JSON an earlier process of run ``run_id`` wrote for ``op`` in ``out_dir``, or None (a
    file of another run, however recent, is not this run's)."""
    try:
        with open(os.path.join(out_dir, f"{op}.json")) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and (data.get("env") or {}).get("run_id") == run_id else None


def new_run_id() -> str:
    """An id for one ``cnnkern bench`` run (the time and this process), kept in every JSON of it."""
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}-{os.getpid()}"


class _OpRun:
    """One op's run in this process: what an earlier process of the run left of it, and how its
    JSON is written (by run_ops, or by the hang watchdog while the main thread is stuck)."""

    def __init__(self, op: str, before: dict | None, later: list[str], env: dict, ceilings: dict, out_dir: str | None):
        before = before or {}
        self.op, self.later, self.env, self.ceilings, self.out_dir = op, later, env, ceilings, out_dir
        self.prior = {_ident(r["provider"], r): _as_result(r) for r in before.get("results", [])}
        self.faulted = list(before.get("faulted", []))
        self.failures = list(before.get("failures", []))
        self.resumed = list(before.get("resumed", [])) + ([before["stopped"]] if before.get("stopped") else [])

    def fault(self, provider: str | None, what: str) -> str:
        """The ``stopped`` reason of a device fault after ``provider``; it is left out on resume."""
        if provider and provider not in self.faulted:
            self.faulted.append(provider)
        return f"device fault: {what}; not run: the rest of this op and {', '.join(self.later) or 'nothing'}"

    def save(self, got, stopped: str | None, echo=print) -> str:
        failures = self.failures + list(getattr(got, "failures", []))
        records = finalize(list(got), self.ceilings)
        echo(f"\n{self.op}")
        echo(format_table(records) if records else "(no timings)")
        for f in failures:
            echo(f"  FAILED, not timed: {describe_failure(f)}")
        path = write_results(
            records,
            self.env,
            self.ceilings,
            self.out_dir,
            op=self.op,
            failures=failures,
            stopped=stopped,
            faulted=self.faulted,
            resumed=self.resumed,
        )
        echo(f"wrote {path}")
        if stopped:
            echo(f"STOPPED: {stopped}")
        return path


_RUN: _OpRun | None = None  # the op under way (verify/measure resume it; the watchdog saves it)


def _current_records() -> Records:
    """What the running benchmark module has recorded so far (empty before its first record)."""
    return _CURRENT if _CURRENT is not None else Records()


def watchdog_tick(echo=print) -> bool:
    """One look of the hang watchdog: when the check or timing under way has taken longer than its
    :func:`hang_limit`, record it as a failure, write the op's JSON as stopped on a device fault
    (that provider left out on resume) and return True; the caller then ends the process."""
    active, run = _ACTIVE, _RUN
    if active is None or run is None:
        return False
    provider, stage, fields, started = active
    limit = hang_limit(provider, fields.get("op"))
    if _clock() - started <= limit:
        return False
    got = _current_records()
    got.failures.append(
        {
            **{k: fields[k] for k in _FAILURE_FIELDS if k in fields},
            "provider": provider,
            "stage": stage,
            "error": f"hung: no result after {limit:.0f} s",
        }
    )
    run.save(
        got,
        run.fault(
            provider, f"{provider} did not finish its {stage} of {fields.get('case')} in {limit:.0f} s (a hung kernel?)"
        ),
        echo=echo,
    )
    return True


def _watch(stop: threading.Event, period: float = 5.0) -> None:
    while not stop.wait(period):
        if watchdog_tick(echo=lambda *a: print(*a, file=sys.stderr, flush=True)):
            os._exit(HANG_EXIT)  # the stuck main thread cannot be interrupted; the supervisor resumes


def run_ops(
    ops=None,
    *,
    dtypes=None,
    quick: bool = False,
    out_dir: str | None = None,
    progress: bool = True,
    echo=print,
    backends=None,
    inductor: bool | None = None,
    nets=None,
    batches=None,
    graph: bool = False,
    time_limit: float | None = None,
    run_id: str | None = None,
    watchdog: bool = False,
) -> list[str]:
    """Measure the ceilings, run each op's benchmark module, print its table, write its JSON.

    Needs a CUDA device. Sets ``torch.backends.cudnn.benchmark = True`` for the baselines.

    Args:
        ops: op names from :data:`OPS` (default: all, "models" included).
        dtypes: dtype names passed to every module (default: each module's own).
        quick: fewer cases and shorter timings (and no "inductor" unless ``inductor=True``).
        out_dir: where the JSON goes (default :func:`default_out_dir`).
        progress: one progress bar for the whole suite, with its ETA (stderr).
        echo: where the text goes.
        backends: cnnkern backends to measure (default: every one with a kernel for the op).
        inductor: add the torch.compile(mode="max-autotune") provider (default: unless quick).
        nets: restrict to these networks' layers (alexnet, vgg16, googlenet, resnet50).
        batches: batch sizes for the modules that take them (conv layers, whole networks).
        graph: time every per-op case as a CUDA-graph replay (kernel time, no host launch cost)
            instead of one event pair per eager call; recorded as ``env["timer_mode"] = "graph"``.
        time_limit: seconds from the start after which no check or timing starts: the op then
            running writes what it measured, with ``"stopped"`` saying so, and the ops after it
            are not run (a GPU lease of fixed length ends with results, not a killed process).
        run_id: the run's id (``env["run_id"]``; default :func:`new_run_id`). When ``out_dir``
            (required then) holds JSON of this run, an earlier process of it stopped on a device
            fault and this one goes on with it (same arguments otherwise): the finished ops are
            kept as they are, the op that stopped reuses the timings made before the fault and
            leaves out the providers that faulted (``"faulted"``), the ops after it run; env and
            ceilings stay the run's.
        watchdog: end the process (status :data:`HANG_EXIT`) when a check or timing hangs
            (:func:`watchdog_tick`), after writing what the op measured; for a worker process
            whose parent resumes the run (``cnnkern bench`` does).

    A provider that fails a case's correctness check, or raises, gets no timing there: the
    failure is printed and written under ``"failures"`` and the suite goes on. When the error left
    the CUDA context unusable, the running op writes what it has and the suite stops (``cnnkern
    bench`` then goes on in a new process).

    Returns:
        The JSON paths of the run (see :func:`run_status` for their failures and stops).
    """
    global _SUITE, _FORCE_GRAPH, _DEADLINE, _CURRENT, _RUN
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be a positive number of seconds, got {time_limit!r}")
    t0 = _clock()
    if not torch.cuda.is_available():
        raise RuntimeError("run_ops needs a CUDA device")
    plan = suite_plan(ops, dtypes=dtypes, quick=quick, backends=backends, inductor=inductor, nets=nets, batches=batches)
    torch.backends.cudnn.benchmark = True
    earlier = {op: _resumed_state(out_dir, run_id, op) for op, _, _ in plan} if run_id and out_dir else {}
    first = next((d for d in earlier.values() if d), None)
    if first is not None:  # the same run on the same device: its environment and ceilings
        env, ceilings = first["env"], first.get("ceilings")
    else:
        env = environment()
        env.update(inductor_mode=INDUCTOR_MODE, timer_mode="graph" if graph else "eager", run_id=run_id or new_run_id())
        ceilings = None
    echo(
        f"device: {env['gpu_name']} ({env['sm_count']} SMs, sm_{env['compute_capability'].replace('.', '')}); "
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}; "
        f"commit {env['commit']}; cnnkern._C {'loaded' if env['extension_loaded'] else 'not loaded'}"
    )
    todo = []
    paths = []
    for op, kwargs, count in plan:
        done = earlier.get(op)
        if done is not None and not done.get("stopped"):
            echo(f"  {op}: finished by an earlier process of this run: {os.path.join(out_dir, op + '.json')}")
            paths.append(os.path.join(out_dir, f"{op}.json"))
            continue
        todo.append((op, kwargs, count))
        echo(
            f"  {op}: {count} timings; providers {', '.join(kwargs.get('providers', []))}"
            + (f"; resumed after: {done['stopped']}" if done else "")
        )
    if ceilings is None:
        echo("measuring ceilings (1 GiB bf16 copy, 8192^3 bf16 matmul) ...")
        ceilings = measure_ceilings()
    echo(f"ceilings: copy {ceilings['copy_GBps']:.0f} GB/s, bf16 matmul {ceilings['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    if progress:
        _SUITE = _make_bar(sum(c for _, _, c in todo), "cnnkern bench")
    _DEADLINE = None if time_limit is None else t0 + time_limit
    stop_watch = threading.Event()
    if watchdog:
        threading.Thread(target=_watch, args=(stop_watch,), name="cnnkern-bench-watchdog", daemon=True).start()
    try:
        for n, (op, kwargs, _) in enumerate(todo):
            module = importlib.import_module(OPS[op])
            _FORCE_GRAPH = graph and op != "models"
            _CURRENT = None
            _RUN = run = _OpRun(op, earlier.get(op), [o for o, _, _ in todo[n + 1 :]], env, ceilings, out_dir)
            stopped = None
            try:
                got = module.run(progress=progress, **{k: v for k, v in kwargs.items() if k != "progress"})
            except (TimeLimitReached, DeviceFault) as exc:
                got = _current_records()
                if isinstance(exc, TimeLimitReached):
                    stopped = (
                        f"time limit: {time_limit:g} s passed after {_clock() - t0:.0f} s, during this op "
                        f"({len(got)} timings); not run: {', '.join(run.later) or 'nothing'}"
                    )
                else:
                    stopped = run.fault(exc.provider, str(exc))
            except KeyboardInterrupt:  # SIGINT (a lease's end, Ctrl-C): keep what was measured
                _RUN = None
                run.save(
                    _current_records(),
                    f"interrupted after {_clock() - t0:.0f} s; not run: the rest of this op and "
                    f"{', '.join(run.later) or 'nothing'}",
                    echo=echo,
                )
                raise
            _RUN = None
            paths.append(run.save(got, stopped, echo=echo))
            if stopped:
                break
    finally:
        stop_watch.set()
        _FORCE_GRAPH = False
        _DEADLINE = None
        _CURRENT = None
        _RUN = None
        if _SUITE is not None:
            _SUITE.close()
        _SUITE = None
    return paths


def run_status(paths) -> dict:
    """What results files say went wrong: ``{"failures": n, "stops": [...], "device_fault": bool,
    "run_id": str | None, "faulted": [...]}``: the number of provider failures they record, the
    ``"stopped"`` reasons of those that ended early ("<op>: <reason>"), whether one of them ended
    on a device fault (and can be resumed: :func:`run_ops` ``run_id``), the run's id, and the
    providers that faulted the device ("<op>: <provider>"), resumed past or not."""
    status = {"failures": 0, "stops": [], "device_fault": False, "run_id": None, "faulted": []}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        status["failures"] += len(data.get("failures") or [])
        status["run_id"] = status["run_id"] or (data.get("env") or {}).get("run_id")
        status["faulted"] += [f"{data.get('op')}: {p}" for p in data.get("faulted") or []]
        if data.get("stopped"):
            status["stops"].append(f"{data.get('op')}: {data['stopped']}")
            status["device_fault"] |= data["stopped"].startswith("device fault")
    return status


def run_paths(out_dir: str, run_id: str) -> list[str]:
    """The JSON files of run ``run_id`` in ``out_dir``, in :data:`OPS` order."""
    return [os.path.join(out_dir, f"{op}.json") for op in OPS if _resumed_state(out_dir, run_id, op) is not None]


def bench_main(op: str, argv=None) -> int:
    """``python -m cnnkern.benchmarks.bench_<op>``: run one op's benchmark (see :func:`run_ops`)."""
    import argparse

    ap = argparse.ArgumentParser(prog=f"python -m {OPS[op]}", description=f"Benchmark {op} against PyTorch eager.")
    ap.add_argument("--dtypes", help="comma-separated, e.g. bfloat16,float16,float32")
    ap.add_argument("--quick", action="store_true", help="fewer cases, shorter timings")
    ap.add_argument("--backends", help="comma-separated cnnkern backends (default: every one with a kernel)")
    ap.add_argument(
        "--inductor",
        action=argparse.BooleanOptionalAction,
        default=None,
        help='time torch.compile(mode="max-autotune") of the reference too (default: on, off with --quick)',
    )
    ap.add_argument("--out", help="directory for the JSON (default benchmarks/results/<gpu>-<date>)")
    ap.add_argument("--graph", action="store_true", help="time each case as a CUDA-graph replay (no host launch cost)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="start no timing after this many seconds; the JSON holds what was measured",
    )
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            f"no CUDA GPU: the {op} benchmark needs one (nothing measured); "
            "`cnnkern bench` shows the latest committed GPU results"
        )
        return 0

    def split(t):
        return [v.strip() for v in t.split(",") if v.strip()] if t else None

    paths = run_ops(
        [op],
        dtypes=split(args.dtypes),
        quick=args.quick,
        out_dir=args.out,
        progress=not args.no_progress,
        backends=split(args.backends),
        inductor=args.inductor,
        graph=args.graph,
        time_limit=args.time_limit,
    )
    status = run_status(paths)
    return 1 if status["failures"] or status["device_fault"] else 0
