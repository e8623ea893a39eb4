"""Benchmark of the convolution against cuDNN, on every distinct conv layer of the networks.

Layers come from the models themselves (cnnkern.summary.conv_layers on ResNet-50, VGG-16,
GoogLeNet and, when it exists, AlexNet), at batch 1 and 32. Providers: ``"torch"`` (the baseline:
``torch.nn.functional.conv2d``, cuDNN with ``cudnn.benchmark=True``, same dtype, layout and TF32
setting), cnnkern's GPU backends with a convolution kernel, and ``"inductor"``: the same
``F.conv2d`` (and ReLU) under ``torch.compile(mode="max-autotune...")``, see
:func:`harness.compile_reference`. Layouts: bf16 and fp16 in
channels_last, fp32 in NCHW (TF32 as PyTorch's default ``cudnn.allow_tf32`` says). Directions:
forward, forward+backward (input, weight and bias gradients), and the forward with the fused
bias+ReLU epilogue against cuDNN's conv followed by a separate ReLU ("+relu" cases).

FLOPs: 2*N*K*P*Q*(C/groups)*R*S per forward; forward+backward is three times that (dgrad and
wgrad each cost one forward).

    python -m cnnkern.benchmarks.bench_conv2d [--dtypes bfloat16] [--quick] [--no-inductor] [--out DIR]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cnnkern import models
from cnnkern.functional import conv2d
from cnnkern.summary import conv_layers

from . import harness

OP = "conv2d"
NETWORKS = {  # name -> (factory, input size per image)
    "resnet50": (lambda: models.resnet50(), (3, 224, 224)),
    "vgg16": (lambda: models.vgg16(), (3, 224, 224)),
    "googlenet": (lambda: models.googlenet(variant="paper"), (3, 224, 224)),
}
if hasattr(models, "alexnet"):
    NETWORKS["alexnet"] = (lambda: models.alexnet(variant="paper"), (3, 227, 227))
NETS = tuple(NETWORKS)  # the --nets names this benchmark takes layers from
BATCHES = (1, 32)


@dataclass(frozen=True)
class Layer:
    network: str
    name: str
    x_shape: tuple
    w_shape: tuple
    stride: tuple
    padding: object
    dilation: tuple
    groups: int
    macs: int  # N*K*P*Q*(C/groups)*R*S, from cnnkern.summary
    shortcut: str | None = None  # where it ends a ResNet block (conv-BN + shortcut): that layer's name

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def shape(self) -> str:
        n, c, h, w = self.x_shape
        k, _, r, s = self.w_shape
        return f"N{n} C{c} {h}x{w} K{k} {r}x{s}/{self.stride[0]}" + (f" g{self.groups}" if self.groups > 1 else "")


def network_layers(batches=(1, 32), networks=None, table=None, followed_by_bn=False) -> list[Layer]:
    """Every distinct convolution of the networks (``table``: name -> (factory, input size),
    default NETWORKS), at each batch size, taken from the models."""
    table = table or NETWORKS
    out = []
    for net in networks or table:
        factory, size = table[net]
        model = factory()
        for n in batches:
            for r in conv_layers(model, (n, *size), followed_by_bn):
                c = r.conv
                k = r.output_shape[1]
                w_shape = (k, r.input_shape[1] // c["groups"], *c["kernel"])
                out.append(
                    Layer(
                        net,
                        r.name,
                        r.input_shape,
                        w_shape,
                        tuple(c["stride"]),
                        c["padding"],
                        tuple(c["dilation"]),
                        c["groups"],
                        r.macs,
                        r.joins_shortcut,
                    )
                )
    return out


def _check(got, want, what):
    # A kernel that is fast because it is wrong must not produce a figure: compare with cuDNN's
    # result, relative to its norm (cuDNN and ours accumulate in different orders).
    err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()
    if not err < 2e-2:
        raise harness.WrongResult(
            f"{OP} benchmark: {what} differs from cuDNN by {err:.2e} (relative norm); not timing it"
        )


def _plan(providers, dtypes, quick, networks, layers, batches):
    providers = harness.providers(OP, providers)
    if layers is None:
        if quick:
            layers = network_layers(tuple(batches or (32,)), networks or ["resnet50"])
        else:
            layers = network_layers(tuple(batches or BATCHES), networks=networks)
    directions = ("fwd", "fwd+relu") if quick else ("fwd", "fwd+relu", "fwd+bwd")
    return providers, layers, directions


def count(
    providers=None,
    dtypes=("bfloat16", "float16", "float32"),
    quick: bool = False,
    networks=None,
    layers=None,
    batches=None,
) -> int:
    """How many timings :func:`run` makes with these arguments (the suite's progress bar)."""
    providers, layers, directions = _plan(providers, dtypes, quick, networks, layers, batches)
    return len(layers) * len(dtypes) * len(directions) * len(providers)


def _forward_fn(p, direction, x, w, b, args):
    """Provider ``p``'s forward on (x, w, b): cuDNN, a cnnkern backend, or the compiled reference."""
    relu = direction == "fwd+relu"

    def ref(x, w, b):
        y = torch.nn.functional.conv2d(x, w, b, **args)
        return torch.relu(y) if relu else y

    if p == harness.BASELINE:
        return lambda: ref(x, w, b)
    if p == harness.INDUCTOR:
        compiled = harness.compile_reference(ref)
        return lambda: compiled(x, w, b)
    return lambda: conv2d(x, w, b, **args, activation="relu" if relu else None, backend=p)


def _verified(records, providers, baseline, check, **fields) -> list[str]:
    """The providers that pass ``check(p, want)``, ``want = baseline()`` (the baseline always
    passes); ``want`` is freed on return, before anything is timed."""
    want = baseline()
    return [
        p
        for p in providers
        if p == harness.BASELINE or harness.verify(records, p, lambda p=p: check(p, want), **fields)
    ]


def run(
    providers=None,
    dtypes=("bfloat16", "float16", "float32"),
    quick: bool = False,
    progress: bool = True,
    device: torch.device | str = "cuda",
    networks=None,
    layers=None,
    batches=None,
) -> list[harness.Result]:
    """Time every layer, dtype, direction and provider. ``quick``: ResNet-50 at batch 32 only (or
    ``networks``/``batches`` when given), the forward and the fused epilogue, with shorter timing
    budgets. ``layers`` replaces the networks' layer list (the tests drive the loop on CPU with a
    few tiny layers). ``batches``: batch sizes of the network layers (default 1 and 32)."""
    providers, layers, directions = _plan(providers, dtypes, quick, networks, layers, batches)
    budget = dict(warmup_ms=10, rep_ms=40) if quick else dict(warmup_ms=25, rep_ms=100)
    device = torch.device(device)
    records = harness.new_records()
    bar = harness.progress_bar(len(layers) * len(dtypes) * len(directions) * len(providers), OP, progress)
    for layer in layers:
        for dname in dtypes:
            dtype = getattr(torch, dname)
            fmt = torch.contiguous_format if dtype == torch.float32 else torch.channels_last
            layout = "NCHW" if fmt is torch.contiguous_format else "NHWC"
            x = torch.randn(layer.x_shape, dtype=dtype, device=device).contiguous(memory_format=fmt)
            w = (
                torch.randn(layer.w_shape, dtype=dtype, device=device)
                * (layer.w_shape[1] * layer.w_shape[2] * layer.w_shape[3]) ** -0.5
            )
            w = w.contiguous(memory_format=fmt)
            b = torch.randn(layer.w_shape[0], dtype=dtype, device=device)
            args = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
            for direction in directions:
                _run_direction(records, bar, providers, budget, layer, dname, layout, direction, (x, w, b), args)
    bar.close()
    return records


def _run_direction(records, bar, providers, budget, layer, dname, layout, direction, inputs, args):
    """One layer, dtype and direction: every provider checked against cuDNN, then timed."""
    x, w, b = inputs
    case = f"{layer.network} {layer.name}" + (" +bias+relu" if direction == "fwd+relu" else "")
    common = dict(
        op=OP,
        case=case,
        shape=layer.shape,
        dtype=dname,
        layout=layout,
        direction="fwd" if direction != "fwd+bwd" else "fwd+bwd",
    )
    flops = layer.flops
    leaves = []
    if direction == "fwd+bwd":
        xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))
        leaves = [xg, wg, bg]
        g = torch.randn_like(torch.nn.functional.conv2d(x, w, b, **args))
        fwd = {p: _forward_fn(p, "fwd", xg, wg, bg, args) for p in providers}
        fns = {p: (lambda f=f: f().backward(g)) for p, f in fwd.items()}
        flops *= 3

        def grads(p):
            fwd[p]().backward(g)
            got = [t.grad for t in leaves]
            for t in leaves:
                t.grad = None
            return got

        def check(p, want):
            for nm, a, c in zip(("grad input", "grad weight", "grad bias"), grads(p), want):
                _check(a, c, f"{p} {nm}, {case} {dname}")

        ok = _verified(records, providers, lambda: grads("torch"), check, **common)
    else:
        fns = {p: _forward_fn(p, direction, x, w, b, args) for p in providers}

        def check(p, want):
            _check(fns[p](), want, f"{p} {direction}, {case} {dname}")

        ok = _verified(records, providers, fns["torch"], check, **common)
    for p in providers:
        bar.set_postfix_str(f"{case} {dname} {direction} {p}")
        if p in ok:
            harness.measure(records, fns[p], provider=p, flops=flops, grad_to_none=leaves or None, **budget, **common)
        bar.update()


def main(argv=None) -> int:
    return harness.bench_main(OP, argv)


if __name__ == "__main__":
    raise SystemExit(main())
