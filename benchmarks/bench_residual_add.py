"""Benchmark of residual add, ``relu(x + A(shortcut))``, against PyTorch eager.

Providers: ``"torch"`` (the baseline: ``torch.relu(x + shortcut)`` in eager mode; for option A
``torch.relu(x + cnnkern.reference.option_a_shortcut(s, C, stride))``, which materialises the
subsampled, zero-padded shortcut as a user without cnnkern would), cnnkern's GPU backends that
can run here (``"triton"``, ``"cuda"``), called through ``cnnkern.functional.residual_add``, and
``"inductor"``: the same expression under ``torch.compile(mode="max-autotune...")`` (see
:func:`harness.compile_reference`), which fuses it into one kernel.

Cases: ResNet-50's identity joins at batch 32 (channels_last, the layout its convolutions run
fastest in), one large synthetic tensor (128 MiB in bf16, far beyond L2) in NCHW and
channels_last, and the CIFAR ResNets' option-A joins (NCHW and channels_last). Each in forward and
forward+backward, in bf16, fp16 and fp32.

    python -m cnnkern.benchmarks.bench_residual_add [--dtypes bfloat16] [--quick] [--out DIR]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cnnkern import reference
from cnnkern.functional import residual_add

from . import harness

OP = "residual_add"
# Forward cases needing fewer bytes than this take a few microseconds: they are timed with CUDA
# graphs (no launch overhead; no L2 flush either, as in a network, where the residual branch has
# just written x) instead of one event pair per launch.
CUDAGRAPH_BELOW_BYTES = 16 << 20


@dataclass(frozen=True)
class Case:
    """x (N, C, H, W) and the shortcut: ``None`` for the identity (x's shape), or (N, Cs, Hs, Ws)
    for option A (subsampled by ``stride``, zero-padded from Cs to C channels)."""

    name: str
    x_shape: tuple[int, int, int, int]
    s_shape: tuple[int, int, int, int] | None
    channels_last: bool
    stride: int = 1

    @property
    def shortcut_shape(self) -> tuple[int, int, int, int]:
        return self.s_shape or self.x_shape

    @property
    def layout(self) -> str:
        return "NHWC" if self.channels_last else "NCHW"

    @property
    def shape(self) -> str:
        fmt = "x".join
        if self.s_shape is None:
            return fmt(map(str, self.x_shape))
        return f"x {fmt(map(str, self.x_shape))}, s {fmt(map(str, self.s_shape))}"


CASES = [
    # ResNet-50's identity joins (the paper's conv2_x..conv5_x outputs) at batch 32.
    Case("resnet50 conv2_x", (32, 256, 56, 56), None, True),
    Case("resnet50 conv3_x", (32, 512, 28, 28), None, True),
    Case("resnet50 conv4_x", (32, 1024, 14, 14), None, True),
    Case("resnet50 conv5_x", (32, 2048, 7, 7), None, True),
    # 64 Mi elements (128 MiB per tensor in bf16): the streaming rate, independent of L2.
    Case("large", (64, 256, 64, 64), None, False),
    Case("large", (64, 256, 64, 64), None, True),
    # CIFAR ResNet (paper section 4.2) stage entries with option A: 16 -> 32 and 32 -> 64 channels.
    Case("cifar option A 16->32", (128, 32, 16, 16), (128, 16, 32, 32), False, 2),
    Case("cifar option A 16->32", (128, 32, 16, 16), (128, 16, 32, 32), True, 2),
    Case("cifar option A 32->64", (128, 64, 8, 8), (128, 32, 16, 16), False, 2),
    Case("cifar option A 32->64", (128, 64, 8, 8), (128, 32, 16, 16), True, 2),
]
QUICK_CASES = [CASES[0], CASES[5], CASES[6]]
NETS = ("resnet50",)  # the --nets names whose layers these cases are (large and CIFAR go along)


def required_bytes(x_shape, s_shape, itemsize: int, direction: str) -> int:
    """Bytes the operation must move at least, the numerator of every GB/s figure.

    With x (N, C, H, W), shortcut (N, Cs, Hs, Ws), E = N*C*H*W, itemsize b:

    * forward: read x (E) + read the shortcut elements the sum uses (N*Cs*H*W: Cs channels at
      the H x W sampled positions; the identity uses all of it, = E) + write out (E).
    * backward adds: read grad_out (E) + read the saved output for the ReLU mask (E) + write
      grad_x (E) + write grad_shortcut (N*Cs*Hs*Ws: all of it, zeros where nothing was sampled).

    Counted once per tensor element, this is a lower bound on DRAM traffic: strided option-A reads
    fetch whole 32-byte sectors, and autograd may copy a gradient that feeds two leaves.
    """
    n, c, h, w = x_shape
    _, cs, hs, ws = s_shape
    e = n * c * h * w
    fwd = (e + n * cs * h * w + e) * itemsize
    if direction == "fwd":
        return fwd
    if direction != "fwd+bwd":
        raise ValueError(f"direction must be 'fwd' or 'fwd+bwd', got {direction!r}")
    return fwd + (3 * e + n * cs * hs * ws) * itemsize


def _forward(provider: str, x: torch.Tensor, s: torch.Tensor, case: Case):
    if provider not in (harness.BASELINE, harness.INDUCTOR):
        return lambda: residual_add(x, s, relu=True, backend=provider)
    c = case.x_shape[1]

    def ref(x, s):
        if case.s_shape is None:
            return torch.relu(x + s)
        return torch.relu(x + reference.option_a_shortcut(s, c, case.stride))

    if provider == harness.INDUCTOR:
        compiled = harness.compile_reference(ref)
        return lambda: compiled(x, s)
    return lambda: ref(x, s)


def count(providers=None, dtypes=("bfloat16", "float16", "float32"), quick: bool = False) -> int:
    """How many timings :func:`run` makes with these arguments (the suite's progress bar)."""
    return len(QUICK_CASES if quick else CASES) * len(dtypes) * 2 * len(harness.providers(OP, providers))


def _fwd_bwd(forward, grad: torch.Tensor):
    def step():
        forward().backward(grad)

    return step


def _check(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    # A kernel that is fast because it is wrong must not produce a figure.
    try:
        torch.testing.assert_close(got, want)
    except AssertionError as exc:
        raise harness.WrongResult(
            f"{OP} benchmark: {what} disagrees with the torch baseline; not timing it.\n{exc}"
        ) from None


def run(
    providers=None,
    dtypes=("bfloat16", "float16", "float32"),
    quick: bool = False,
    progress: bool = True,
    device: torch.device | str = "cuda",
) -> list[harness.Result]:
    """Time every case, dtype, direction and provider on ``device``.

    Args:
        providers: subset of ``"torch" | "triton" | "cuda" | "inductor"`` (default: torch, every
            GPU backend available here, inductor); the torch baseline always runs.
        dtypes: dtype names: "bfloat16", "float16", "float32".
        quick: three cases (one ResNet-50 join, the large NHWC tensor, one option-A join) and
            shorter timing budgets.
        progress: a progress bar with an ETA on stderr.
        device: a CUDA device; the tests pass "cpu" (Triton's interpreter) with a fake timer to
            exercise everything but the timing.

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


def _verified(records, providers, baseline, check, **fields) -> list[str]:
    """The providers that pass ``check(p, want)``, ``want = baseline()`` (the baseline always
    passes); ``want`` is freed on return, before anything is timed."""
    want = baseline()
    return [
        p
        for p in providers
        if p == harness.BASELINE or harness.verify(records, p, lambda p=p: check(p, want), **fields)
    ]


def _run_case(records, bar, providers, budget, case, dtype, fmt, device):
    """One case and dtype: the forward, then forward+backward, of every provider."""
    x = torch.randn(case.x_shape, dtype=dtype, device=device).contiguous(memory_format=fmt)
    s = torch.randn(case.shortcut_shape, dtype=dtype, device=device).contiguous(memory_format=fmt)
    common = dict(op=OP, case=case.name, shape=case.shape, dtype=str(dtype).removeprefix("torch."), layout=case.layout)

    # forward: every provider is checked against the baseline before any is timed
    fns = {p: _forward(p, x, s, case) for p in providers}

    def check_forward(p, want):
        _check(fns[p](), want, f"{p} forward, {case.name} {case.layout} {dtype}")

    ok = _verified(records, providers, fns["torch"], check_forward, direction="fwd", **common)
    nbytes = required_bytes(case.x_shape, case.shortcut_shape, x.element_size(), "fwd")
    for p, fn in fns.items():
        bar.set_postfix_str(f"{case.name} {case.layout} {common['dtype']} fwd {p}")
        if p in ok:
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

    # forward + backward: leaves that require grad, one preallocated incoming gradient
    xg, sg = x.detach().requires_grad_(), s.detach().requires_grad_()
    g = torch.randn(case.x_shape, dtype=dtype, device=device).contiguous(memory_format=fmt)
    steps = {p: _fwd_bwd(_forward(p, xg, sg, case), g) for p in providers}

    def grads(p):
        steps[p]()
        got = (xg.grad, sg.grad)
        xg.grad = sg.grad = None
        return got

    def check_grads(p, want):
        got = grads(p)
        _check(got[0], want[0], f"{p} grad x, {case.name} {case.layout} {dtype}")
        _check(got[1], want[1], f"{p} grad shortcut, {case.name} {case.layout} {dtype}")

    ok = _verified(records, providers, lambda: grads("torch"), check_grads, direction="fwd+bwd", **common)
    nbytes = required_bytes(case.x_shape, case.shortcut_shape, x.element_size(), "fwd+bwd")
    for p, step in steps.items():
        bar.set_postfix_str(f"{case.name} {case.layout} {common['dtype']} fwd+bwd {p}")
        if p in ok:
            harness.measure(
                records,
                step,
                provider=p,
                direction="fwd+bwd",
                bytes=nbytes,
                grad_to_none=[xg, sg],
                **budget,
                **common,
            )
        bar.update()


def main(argv=None) -> int:
    """Command line: see :func:`harness.bench_main`."""
    return harness.bench_main(OP, argv)


if __name__ == "__main__":
    raise SystemExit(main())
