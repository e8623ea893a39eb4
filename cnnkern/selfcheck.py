"""Correctness self-check of every Triton kernel, through the public ops, against float64 PyTorch.

    python -m cnnkern.selfcheck [--ops residual_add,conv2d]

Without a GPU the kernels run on small CPU tensors under Triton's interpreter (the process
re-executes itself with ``TRITON_INTERPRET=1`` when that is not already set: Triton decides
interpreter-or-GPU when a kernel is defined, so it must be in the environment before cnnkern's
kernels are imported). With a GPU they run on CUDA tensors, bf16 included, and so does the CUDA
C++ backend where ``cnnkern._C`` is loaded. Outputs are NaN-poisoned (``CNNKERN_POISON=1``), so an
element a kernel never writes fails.

Each comparison is the relative error norm ``||out - ref|| / ||ref||`` against the op computed in
float64 on the same (rounded) inputs; tolerances: fp32 1e-5 (TF32 3e-3), fp16 1e-3, bf16 1e-2.
One line per check, then a summary; exit status 1 if any check fails (or none ran).

Checks live in :data:`CHECKS`, a list of check functions per op. A new op adds its own with
``@register("op")``: the function takes a :class:`Context` and yields ``(label, thunk)`` pairs;
each thunk runs one configuration and returns a :class:`Result`.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

import cnnkern
from cnnkern import _backend, reference

_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class Result:
    """One configuration's comparisons: ``errors`` maps a tensor's name ("out", "grad_x", ...) to
    its relative error norm; ``problems`` lists anything else that is wrong (layout, dtype)."""

    errors: dict[str, float]
    tol: float
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        # `err <= tol` is False for NaN: a poisoned element that was never written fails here.
        return not self.problems and all(err <= self.tol for err in self.errors.values())


@dataclass
class Context:
    """Where the checks run: ``device`` (cpu under the interpreter, else cuda) and ``dtypes``."""

    device: torch.device
    dtypes: tuple[torch.dtype, ...]

    def backends(self, op: str) -> list[str]:
        """The GPU backends with a kernel for ``op`` that can run on this device."""
        return [
            b
            for b in ("triton", "cuda")
            if b in _backend.AUTO_ORDER.get(op, ()) and _backend.unavailable_reason(b, self.device) is None
        ]

    def tol(self, dtype: torch.dtype, tf32: bool = False) -> float:
        """Relative-error-norm tolerance; ``tf32``: an fp32 matmul-like op that PyTorch would run
        in TF32 here (CUDA and ``torch.backends.cudnn.allow_tf32``)."""
        if dtype == torch.float32:
            return 3e-3 if tf32 and self.device.type == "cuda" and torch.backends.cudnn.allow_tf32 else 1e-5
        return {torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]

    def randn(self, shape, dtype: torch.dtype, channels_last: bool = False, scale: float = 1.0) -> torch.Tensor:
        """Fresh normal values (never zeros) rounded to ``dtype``, in NCHW or channels_last."""
        t = (torch.randn(shape, dtype=torch.float64, device=self.device) * scale).to(dtype)
        return t.contiguous(memory_format=torch.channels_last) if channels_last else t


Thunk = Callable[[], Result]
CHECKS: dict[str, list[Callable[[Context], Iterator[tuple[str, Thunk]]]]] = {}


def register(op: str):
    """Decorator: add a check function for ``op`` to :data:`CHECKS`."""

    def deco(fn):
        CHECKS.setdefault(op, []).append(fn)
        return fn

    return deco


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (NaN when ``out`` holds a NaN)."""
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        return float("inf")
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num / den if den > 0 else num


def _errors(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    return {name: rel_err(got, want) for name, (got, want) in pairs.items()}


def _layout_name(channels_last: bool) -> str:
    return "NHWC" if channels_last else "NCHW"


# ------------------------------------------------------------------------------------------------
# residual_add: identity and option A, forward and both gradients
# ------------------------------------------------------------------------------------------------
# (label, x shape, shortcut shape or None for the identity, option-A stride). Odd sizes on purpose:
# option A maps a 7x5 shortcut onto 4x3 (ceil(7/2), ceil(5/2)) and zero-pads 4 -> 8 channels.
_RESIDUAL_CASES = [
    ("identity", (2, 8, 6, 5), None, 1),
    ("option A", (2, 8, 4, 3), (2, 4, 7, 5), 2),
]


@register("residual_add")
def _residual_add_checks(ctx: Context):
    for backend in ctx.backends("residual_add"):
        for name, xs, ss, stride in _RESIDUAL_CASES:
            for dtype in ctx.dtypes:
                for cl in (False, True):
                    label = f"residual_add [{backend}] {name} {_SHORT[dtype]} {_layout_name(cl)}"
                    yield (
                        label,
                        lambda b=backend, xs=xs, ss=ss, st=stride, dt=dtype, cl=cl: _residual_add_one(
                            ctx, b, xs, ss or xs, st, dt, cl
                        ),
                    )


def _residual_add_one(ctx, backend, x_shape, s_shape, stride, dtype, channels_last) -> Result:
    x = ctx.randn(x_shape, dtype, channels_last).requires_grad_()
    s = ctx.randn(s_shape, dtype, channels_last).requires_grad_()
    out = cnnkern.functional.residual_add(x, s, relu=True, backend=backend)
    g = ctx.randn(x_shape, dtype)
    gx, gs = torch.autograd.grad(out, (x, s), g)
    xr, sr = x.detach().double().requires_grad_(), s.detach().double().requires_grad_()
    ref = reference.residual_add(xr, sr, True, stride)
    rgx, rgs = torch.autograd.grad(ref, (xr, sr), g.double())
    problems = []
    if channels_last and not out.is_contiguous(memory_format=torch.channels_last):
        problems.append("output not channels_last for a channels_last x")
    if out.dtype != dtype:
        problems.append(f"output dtype {out.dtype}")
    return Result(
        _errors({"out": (out, ref), "grad_x": (gx, rgx), "grad_shortcut": (gs, rgs)}), ctx.tol(dtype), problems
    )


# ------------------------------------------------------------------------------------------------
# conv2d: each forward kernel (implicit GEMM, 1x1 GEMM, small-C), dgrad, wgrad + bias grad
# ------------------------------------------------------------------------------------------------
# (label, x shape, out channels, kernel, stride, padding, activation, channels_last)
_CONV_CASES = [  # (label, input, K, kernel, stride, padding, activation, residual, channels_last)
    (
        "3x3 s2 p1 +bias +relu (ResNet stage entry; main kernel, strided dgrad)",
        (2, 16, 8, 8),
        24,
        3,
        2,
        1,
        "relu",
        False,
        False,
    ),
    ("1x1 +bias (bottleneck; GEMM kernel)", (2, 32, 5, 5), 16, 1, 1, 0, None, False, True),
    ("1x1 +bias +residual +relu (a block's end; GEMM kernel)", (2, 32, 5, 5), 16, 1, 1, 0, "relu", True, True),
    ("3x3 C=3 +bias (VGG conv1_1; small-C kernel)", (2, 3, 6, 6), 8, 3, 1, 1, None, False, True),
]


@register("conv2d")
def _conv2d_checks(ctx: Context):
    for backend in ctx.backends("conv2d"):
        for case in _CONV_CASES:
            for dtype in ctx.dtypes:
                label = f"conv2d [{backend}] {case[0]} {_SHORT[dtype]} {_layout_name(case[-1])}"
                yield label, lambda b=backend, case=case, dt=dtype: _conv2d_one(ctx, b, case, dt)


def _conv2d_one(ctx, backend, case, dtype) -> Result:
    _, xs, k, ks, stride, pad, activation, residual, cl = case
    x = ctx.randn(xs, dtype, cl).requires_grad_()
    # Kaiming-like scale keeps fp16 activations far from overflow.
    w = ctx.randn((k, xs[1], ks, ks), dtype, cl, scale=(xs[1] * ks * ks) ** -0.5).requires_grad_()
    b = ctx.randn((k,), dtype).requires_grad_()
    shape = cnnkern.ops.conv2d.output_size(xs, w.shape, (stride, stride), [pad] * 4, (1, 1))
    r = ctx.randn(tuple(shape), dtype, cl).requires_grad_() if residual else None
    out = cnnkern.functional.conv2d(x, w, b, stride, pad, activation=activation, residual=r, backend=backend)
    g = ctx.randn(tuple(out.shape), dtype)
    ins = (x, w, b) + ((r,) if residual else ())
    grads = torch.autograd.grad(out, ins, g)
    refs = [t.detach().double().requires_grad_() for t in ins]
    ref = reference.conv2d(*refs[:3], stride, pad, activation=activation, residual=refs[3] if residual else None)
    rgrads = torch.autograd.grad(ref, refs, g.double())
    pairs = {"out": (out, ref)}
    pairs.update({f"grad_{n}": (a, e) for n, a, e in zip(("x", "w", "b", "residual"), grads, rgrads)})
    return Result(_errors(pairs), ctx.tol(dtype, tf32=True))


# ------------------------------------------------------------------------------------------------
# conv_bn_relu: a training step (statistics from the conv epilogue, normalise + ReLU, fused
# BatchNorm backward, running-statistics update) and eval (BatchNorm folded into the conv)
# ------------------------------------------------------------------------------------------------
@register("conv_bn_relu")
def _conv_bn_relu_checks(ctx: Context):
    for backend in ctx.backends("conv_bn_relu"):
        for dtype in ctx.dtypes:
            label = f"conv_bn_relu [{backend}] 3x3 s1 p1 train step + eval {_SHORT[dtype]} NHWC"
            yield label, lambda b=backend, dt=dtype: _conv_bn_relu_one(ctx, b, dt)


def _conv_bn_relu_one(ctx, backend, dtype) -> Result:
    ours = cnnkern.nn.ConvBNReLU2d(16, 24, 3, padding=1, backend=backend).to(ctx.device)
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        ours.bn.weight.uniform_(0.5, 1.5)
        ours.bn.bias.uniform_(-0.5, 0.5)
        ours.bn.running_mean.uniform_(-0.2, 0.2)
        ours.bn.running_var.uniform_(0.5, 1.5)
    ref = torch.nn.Sequential(copy.deepcopy(ours.conv), copy.deepcopy(ours.bn), torch.nn.ReLU()).double()
    ours = ours.to(dtype).train()
    ref.train()
    x = ctx.randn((2, 16, 7, 7), dtype, channels_last=True).requires_grad_()
    xr = x.detach().double().requires_grad_()
    out, pre = ours(x), ref[1](ref[0](xr))
    # The gradients are compared given our forward's ReLU decisions: a pre-activation within fp16
    # rounding of zero may land on either side, and one such flip moves the input gradient by a
    # whole |grad| through BatchNorm (tests/test_conv_bn_relu.py does the same); the output
    # comparison checks the decisions themselves.
    g = ctx.randn(tuple(out.shape), dtype)
    out.backward(g)
    (pre * (out.detach() > 0)).backward(g.double())
    pairs = {
        "out": (out, pre.relu()),
        "grad_x": (x.grad, xr.grad),
        "grad_w": (ours.conv.weight.grad, ref[0].weight.grad),
        "grad_gamma": (ours.bn.weight.grad, ref[1].weight.grad),
        "grad_beta": (ours.bn.bias.grad, ref[1].bias.grad),
        "running_mean": (ours.bn.running_mean, ref[1].running_mean),
        "running_var": (ours.bn.running_var, ref[1].running_var),
    }
    ours.eval()
    ref.eval()
    xe = ctx.randn((2, 16, 7, 7), dtype, channels_last=True)
    with torch.no_grad():
        pairs["eval_out"] = (ours(xe), ref(xe.double()))
    return Result(_errors(pairs), ctx.tol(dtype, tf32=True))


# ------------------------------------------------------------------------------------------------
# local_response_norm: forward and input gradient, an odd (AlexNet's) and an even window size
# ------------------------------------------------------------------------------------------------
# (label, size, alpha, beta, k, channels_last). 9 channels, odd H*W. Size 5 with alpha 5e-4 and
# k 2 is AlexNet's LRN in PyTorch's convention; the even size 4 has the asymmetric window, whose
# mirror image the backward must use.
_LRN_CASES = [
    ("size 5 (AlexNet constants, inputs x30)", 5, 5e-4, 0.75, 2.0, False),
    ("size 4 (even: asymmetric window)", 4, 0.8, 0.6, 1.5, True),
]


@register("local_response_norm")
def _local_response_norm_checks(ctx: Context):
    for backend in ctx.backends("local_response_norm"):
        for case in _LRN_CASES:
            for dtype in ctx.dtypes:
                label = f"local_response_norm [{backend}] {case[0]} {_SHORT[dtype]} {_layout_name(case[-1])}"
                yield label, lambda b=backend, case=case, dt=dtype: _local_response_norm_one(ctx, b, case, dt)


def _local_response_norm_one(ctx, backend, case, dtype) -> Result:
    _, size, alpha, beta, k, cl = case
    scale = 30.0 if k == 2.0 else 1.0  # AlexNet's alpha is small: large inputs make the window matter
    x = ctx.randn((2, 9, 5, 3), dtype, cl, scale=scale).requires_grad_()
    out = cnnkern.functional.local_response_norm(x, size, alpha, beta, k, backend=backend)
    g = ctx.randn((2, 9, 5, 3), dtype)
    (gx,) = torch.autograd.grad(out, (x,), g)
    xr = x.detach().double().requires_grad_()
    ref = reference.local_response_norm(xr, size, alpha, beta, k)
    (rgx,) = torch.autograd.grad(ref, (xr,), g.double())
    problems = []
    if cl and not out.is_contiguous(memory_format=torch.channels_last):
        problems.append("output not channels_last for a channels_last x")
    if out.dtype != dtype:
        problems.append(f"output dtype {out.dtype}")
    return Result(_errors({"out": (out, ref), "grad_x": (gx, rgx)}), ctx.tol(dtype), problems)


# ------------------------------------------------------------------------------------------------
# runner
# ------------------------------------------------------------------------------------------------
def _needed_env() -> dict[str, str]:
    """Variables that must be in the environment before cnnkern's kernels and ops are imported."""
    need = {}
    if not torch.cuda.is_available() and not _backend.interpreter_enabled():
        need["TRITON_INTERPRET"] = "1"
    if os.environ.get("CNNKERN_POISON", "0") in ("", "0"):
        need["CNNKERN_POISON"] = "1"
    return need


def run(ops: list[str] | None = None, echo=print) -> tuple[int, int]:
    """Run the checks of ``ops`` (default: all in :data:`CHECKS`) in this process, printing one
    line per check. The environment must already be right (see :func:`main`).

    Returns:
        (passed, failed) counts.
    """
    ops = list(CHECKS) if ops is None else ops
    interp = _backend.interpreter_enabled()
    device = torch.device("cpu" if interp or not torch.cuda.is_available() else "cuda")
    # The interpreter computes bf16 wrongly (a Triton limitation): bf16 is checked on GPUs only.
    dtypes = (torch.float32, torch.float16) + ((torch.bfloat16,) if device.type == "cuda" else ())
    ctx = Context(device, dtypes)
    where = (
        "CPU tensors under Triton's interpreter"
        if device.type == "cpu"
        else f"CUDA tensors on {torch.cuda.get_device_name(device)}"
    )
    echo(f"cnnkern self-check: {', '.join(ops)} on {where}; reference: float64 PyTorch")
    if _backend.has_extension():
        echo(f"cnnkern._C: loaded (cuda_archs {getattr(_backend._C, 'cuda_archs', 'unknown')})")
    else:
        echo(f"cnnkern._C: not loaded: {_backend._C_ERROR}")
    from cnnkern.ops import _plan

    if _plan._host is not None:
        echo("cnnkern._host: loaded (warm calls' keys and replays in C++)")
    else:
        echo("cnnkern._host: not loaded: warm calls run their host work in Python (build the package to compile it)")
    torch.manual_seed(0)
    passed, failed = 0, []
    for op in ops:
        labels = 0
        for check in CHECKS[op]:
            for label, thunk in check(ctx):
                labels += 1
                try:
                    res = thunk()
                except Exception as exc:  # a crashing kernel is a failed check, the others still run
                    echo(f"FAIL  {label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                    failed.append(label)
                    continue
                errs = "  ".join(f"{k} {v:.1e}" for k, v in res.errors.items())
                extra = "".join(f"  [{p}]" for p in res.problems)
                echo(f"{'ok  ' if res.ok else 'FAIL'}  {label}: {errs}  (tol {res.tol:.0e}){extra}")
                if res.ok:
                    passed += 1
                else:
                    failed.append(label)
        if labels == 0:
            reasons = "; ".join(
                f"{b}: {_backend.unavailable_reason(b, device)}"
                for b in ("triton", "cuda")
                if b in _backend.AUTO_ORDER.get(op, ())
            )
            echo(f"FAIL  {op}: no backend with a kernel for it can run here ({reasons})")
            failed.append(op)
    total = passed + len(failed)
    if failed:
        echo(f"self-check FAILED: {len(failed)} of {total} checks failed: {', '.join(failed)}")
    else:
        echo(f"self-check passed: {passed} of {total} checks within tolerance")
    return passed, len(failed)


def main(argv=None) -> int:
    """``python -m cnnkern.selfcheck [--ops a,b]``; returns the exit status (1 if a check failed)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m cnnkern.selfcheck", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", help=f"comma-separated subset of: {', '.join(CHECKS)} (default: all)")
    args = ap.parse_args(argv)
    ops = None
    if args.ops:
        ops = [o.strip() for o in args.ops.split(",") if o.strip()]
        unknown = [o for o in ops if o not in CHECKS]
        if unknown:
            ap.error(f"no self-check for {', '.join(unknown)}; known: {', '.join(CHECKS)}")
    need = _needed_env()
    if need:
        # This process imported cnnkern (and maybe Triton kernels) without them: start afresh.
        sys.stdout.flush()
        return subprocess.call([sys.executable, "-m", "cnnkern.selfcheck", *argv], env={**os.environ, **need})
    _, failed = run(ops)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
