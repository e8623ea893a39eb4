"""Benchmark of Local Response Normalization across channels against PyTorch eager.

Providers: ``"torch"`` (the baseline: ``torch.nn.functional.local_response_norm`` in eager mode,
which squares, pads, average-pools over a (size, 1, 1) window, raises to the power and divides:
several passes over the tensor, forward and backward), cnnkern's GPU backends that can run
here (``"triton"``, ``"cuda"``), called through ``cnnkern.functional.local_response_norm``, and
``"inductor"``: the same PyTorch expression under ``torch.compile(mode="max-autotune...")`` (see
:func:`harness.compile_reference`), which fuses it.

Cases: AlexNet's two LRN layers at batch 128 (NORM1 after conv1: 96 x 55 x 55; NORM2 after conv2:
256 x 27 x 27) and one large synthetic tensor (128 MiB in bf16, far beyond L2), each in NCHW and
channels_last, forward and forward+backward, in bf16, fp16 and fp32. Every case uses the AlexNet
paper's constants in PyTorch's convention: size 5, alpha 5e-4 (= 5 x the paper's 1e-4, because
PyTorch divides alpha by size), beta 0.75, k 2.

    python -m cnnkern.benchmarks.bench_local_response_norm [--dtypes bfloat16] [--quick] [--out DIR]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cnnkern.functional import local_response_norm

from . import harness

OP = "local_response_norm"
# Cases needing fewer bytes than this take a few microseconds: they are timed with CUDA graphs
# (no launch overhead, no L2 flush) instead of one event pair per launch. (None of the cases below
# is that small; the rule is the one every cnnkern benchmark follows.)
CUDAGRAPH_BELOW_BYTES = 16 << 20
# AlexNet (Krizhevsky et al. 2012, section 3.3): k=2, n=5, alpha=1e-4, beta=0.75, alpha not divided
# by n; in PyTorch's convention alpha = n * 1e-4.
SIZE, ALPHA, BETA, K = 5, 5e-4, 0.75, 2.0
# Relative-error-norm tolerance of a provider against PyTorch computed in fp32 on the same input.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Case:
    """x (N, C, H, W), normalised across C."""

    name: str
    x_shape: tuple[int, int, int, int]
    channels_last: bool

    @property
    def layout(self) -> str:
        return "NHWC" if self.channels_last else "NCHW"

    @property
    def shape(self) -> str:
        return "x".join(map(str, self.x_shape))


CASES = [
    # AlexNet NORM1 (after conv1 + ReLU) and NORM2 (after conv2 + ReLU), batch 128 as in the paper.
    Case("alexnet norm1", (128, 96, 55, 55), False),
    Case("alexnet norm1", (128, 96, 55, 55), True),
    Case("alexnet norm2", (128, 256, 27, 27), False),
    Case("alexnet norm2", (128, 256, 27, 27), True),
    # 64 Mi elements (128 MiB per tensor in bf16): the streaming rate, independent of L2.
    Case("large", (64, 256, 64, 64), False),
    Case("large", (64, 256, 64, 64), True),
]
QUICK_CASES = [CASES[0], CASES[3], CASES[4]]
NETS = ("alexnet",)  # the --nets names whose layers these cases are (the large tensor goes along)


def required_bytes(x_shape, itemsize: int, direction: str) -> int:
    """Bytes the operation must move at least, the numerator of every GB/s figure.

    With E = N*C*H*W elements of itemsize b:

    * forward: read x (E) + write out (E).
    * backward adds: read grad_out (E) + read x (E; the scale is recomputed from it, nothing else is
      saved) + write grad_in (E).

    Counted once per tensor element, this is a lower bound on DRAM traffic: a kernel that re-reads
    a channel from DRAM (not from cache) when it leaves the window moves more.
    """
    n, c, h, w = x_shape
    e = n * c * h * w
    if direction == "fwd":
        return 2 * e * itemsize
    if direction != "fwd+bwd":
        raise ValueError(f"direction must be 'fwd' or 'fwd+bwd', got {direction!r}")
    return 5 * e * itemsize


def _reference(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.local_response_norm(x, SIZE, ALPHA, BETA, K)


def _forward(provider: str, x: torch.Tensor):
    if provider == harness.BASELINE:
        return lambda: _reference(x)
    if provider == harness.INDUCTOR:
        compiled = harness.compile_reference(_reference)
        return lambda: compiled(x)
    return lambda: local_response_norm(x, SIZE, ALPHA, BETA, K, backend=provider)


def count(providers=None, dtypes=("bfloat16", "float16", "float32"), quick: bool = False) -> int:
    """How many timings :func:`run` makes with these arguments (the suite's progress bar)."""
    return len(QUICK_CASES if quick else CASES) * len(dtypes) * 2 * len(harness.providers(OP, providers))


def _check(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    # A kernel that is fast because it is wrong must not produce a figure. The reference is
    # PyTorch in fp32 on the same input (PyTorch's own fp16 path rounds every intermediate), the
    # measure the relative error norm, the tolerance that of the dtype (TOL).
    got, want = got.detach().float(), want.detach().float()
    err = ((got - want).norm() / want.norm()).item()
    if not err <= TOL[dtype]:  # `not <=`: a NaN fails too
        raise harness.WrongResult(
            f"{OP} benchmark: {what} disagrees with the torch baseline (relative error "
            f"{err:.2e} > {TOL[dtype]:.0e}); not timing it."
        )


def run(
    providers=None,
    dtypes=("bfloat16", "float16", "float32"),
    quick: bool = False,
    progress: bool = True,
    device: torch.device | str = "cuda",
) -> list[harness.Result]:
    """Time every case, dtype, direction and provider on the current CUDA device.

    Args:
        providers: subset of ``"torch" | "triton" | "cuda" | "inductor"`` (default: torch, every
            GPU backend available here, inductor); the torch baseline always runs.
        dtypes: dtype names: "bfloat16", "float16", "float32".
        quick: three cases (NORM1 NCHW, NORM2 NHWC, the large NCHW tensor) and shorter timing
            budgets.
        progress: tqdm progress bar with an ETA on stderr.
        device: a CUDA device; the tests pass "cpu" (Triton's interpreter) with a fake timer.

    Returns:
        :class:`harness.Result` records with timings and required bytes; pass them through
        :func:`harness.finalize` for GB/s, fraction of the copy ceiling and speedups.
    """
    providers = harness.providers(OP, providers)
    dts = [getattr(torch, d) for d in dtypes]
    cases = QUICK_CASES if quick else CASES
    budget = dict(warmup_ms=10, rep_ms=40) if quick else dict(warmup_ms=25, rep_ms=100)
    device = torch.device(device)
    records = harness.new_records()
    bar = harness.progress_bar(len(cases) * len(dts) * 2 * len(providers), OP, progress)
    for case in cases:
        fmt = torch.channels_last if case.channels_last else torch.contiguous_format
        for dtype in dts:
            _run_case(records, bar, providers, budget, case, dtype, fmt, device)
    bar.close()
    return records


def _run_case(records, bar, providers, budget, case, dtype, fmt, device):
    """One case and dtype: the forward, then forward+backward, of every provider."""
    x = torch.randn(case.x_shape, dtype=dtype, device=device).contiguous(memory_format=fmt)
    common = dict(op=OP, case=case.name, shape=case.shape, dtype=str(dtype).removeprefix("torch."), layout=case.layout)

    # forward
    _time_forward(records, bar, providers, budget, case, dtype, x, common)

    # forward + backward: a leaf that requires grad, one preallocated incoming gradient
    nbytes = required_bytes(case.x_shape, x.element_size(), "fwd+bwd")
    xg = x.detach().requires_grad_()
    g = torch.randn(case.x_shape, dtype=dtype, device=device).contiguous(memory_format=fmt)
    xr = x.detach().float().requires_grad_()
    torch.nn.functional.local_response_norm(xr, SIZE, ALPHA, BETA, K).backward(g.float())
    want_grad = xr.grad
    del xr
    for p in providers:
        bar.set_postfix_str(f"{case.name} {case.layout} {common['dtype']} fwd+bwd {p}")
        f = _forward(p, xg)

        def step(f=f):
            f().backward(g)

        def check(p=p, step=step):
            xg.grad = None  # the previous provider's timed runs left their gradient there
            step()
            if p != "torch":
                _check(xg.grad, want_grad, dtype, f"{p} grad x, {case.name} {case.layout} {dtype}")
            xg.grad = None

        if harness.verify(records, p, check, direction="fwd+bwd", **common):
            harness.measure(
                records,
                step,
                provider=p,
                direction="fwd+bwd",
                bytes=nbytes,
                grad_to_none=[xg],
                **budget,
                **common,
            )
        bar.update()


def _time_forward(records, bar, providers, budget, case, dtype, x, common):
    """The forward of every provider, checked against PyTorch in fp32 (all but the baseline) and
    timed; the fp32 reference is freed on return."""
    nbytes = required_bytes(case.x_shape, x.element_size(), "fwd")
    want = torch.nn.functional.local_response_norm(x.float(), SIZE, ALPHA, BETA, K)
    for p in providers:
        bar.set_postfix_str(f"{case.name} {case.layout} {common['dtype']} fwd {p}")
        fn = _forward(p, x)
        if p == "torch" or harness.verify(
            records,
            p,
            lambda fn=fn, p=p: _check(fn(), want, dtype, f"{p} forward, {case.name} {case.layout} {dtype}"),
            direction="fwd",
            **common,
        ):
            harness.measure(
                records,
                fn,
                provider=p,
                direction="fwd",
                bytes=nbytes,
                cudagraph=nbytes < CUDAGRAPH_BELOW_BYTES,
                **budget,
                **common,
            )
        bar.update()


def main(argv=None) -> int:
    """Command line: see :func:`harness.bench_main`."""
    return harness.bench_main(OP, argv)


if __name__ == "__main__":
    raise SystemExit(main())
