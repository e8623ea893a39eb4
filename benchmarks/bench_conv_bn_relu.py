"""Benchmark of the fused conv -> BatchNorm -> ReLU against PyTorch eager (cuDNN conv + BN + ReLU).

Layers: every distinct convolution followed by a BatchNorm in ResNet-50, VGG-16-BN and GoogLeNet
(torchvision's variant, whose BasicConv2d is conv-BN-ReLU), taken from the models, at batch 32;
a ResNet block's last convolution also as the block's end, ``relu(bn(conv(x)) + shortcut)``
(case "... + shortcut": eager runs conv, BatchNorm, add and ReLU, cnnkern one fused layer that
adds the shortcut in its own kernel);
bf16 and fp16 in channels_last, fp32 (TF32 as PyTorch's default says) in NCHW. Directions:
inference (eval: BatchNorm folded, one cnnkern kernel) as "fwd", and a training step (train-mode
forward + backward of input, weight and BatchNorm parameters) as "fwd+bwd". Providers:
``"torch"`` (``nn.Sequential(Conv2d, BatchNorm2d, ReLU)`` in eager mode, the baseline), cnnkern's
GPU backends with the fused op, ``"inductor"``: the same three modules under
``torch.compile(mode="max-autotune...")`` (see :func:`harness.compile_reference`), and, when asked
for, ``"compile"``: ``torch.compile`` in its default mode
(``run(providers=["torch", "triton", "compile"])``).

FLOPs are the convolution's (2*N*K*P*Q*(C/groups)*R*S; x3 for forward+backward).

    python -m cnnkern.benchmarks.bench_conv_bn_relu [--quick] [--out DIR]
"""

from __future__ import annotations

import copy
import dataclasses

import torch

import cnnkern
from cnnkern import models

from . import harness
from .bench_conv2d import network_layers

OP = "conv_bn_relu"
NETWORKS = {
    "resnet50": (lambda: models.resnet50(), (3, 224, 224)),
    "vgg16_bn": (lambda: models.vgg16(batch_norm=True), (3, 224, 224)),
    "googlenet": (lambda: models.googlenet(variant="torchvision"), (3, 224, 224)),
}
# --nets names (the four networks of the seed) -> this benchmark's tables: VGG-16's BN version
NETS = {"resnet50": "resnet50", "vgg16": "vgg16_bn", "googlenet": "googlenet"}


def _reference(layer, dtype, device, fmt=torch.channels_last) -> torch.nn.Sequential:
    conv = torch.nn.Conv2d(
        layer.x_shape[1],
        layer.w_shape[0],
        layer.w_shape[2:],
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.groups,
        bias=False,
    )
    bn = torch.nn.BatchNorm2d(layer.w_shape[0])
    with torch.no_grad():
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    return torch.nn.Sequential(conv, bn, torch.nn.ReLU()).to(device, dtype).to(memory_format=fmt)


class BlockEnd(torch.nn.Module):
    """A ResNet block's end as torchvision writes it: ``out = bn(conv(x)); out += shortcut;
    relu(out)`` (eager: a convolution, a BatchNorm, an add and a ReLU)."""

    def __init__(self, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x, shortcut):
        out = self.bn(self.conv(x))
        out += shortcut
        return torch.relu(out)


def _module(ref: torch.nn.Sequential, provider: str, shortcut: bool = False) -> torch.nn.Module:
    """The provider's version of ``ref`` (``shortcut``: of its block end, called as m(x, s)), with a
    copy of its parameters and statistics."""
    if shortcut:
        ref = BlockEnd(ref[0], ref[1])
    if provider == "torch":
        return ref
    if provider == "compile":
        return torch.compile(copy.deepcopy(ref))
    if provider == harness.INDUCTOR:
        return harness.compile_reference(copy.deepcopy(ref))
    conv, bn = (ref.conv, ref.bn) if shortcut else (ref[0], ref[1])
    return cnnkern.nn.ConvBNReLU2d.from_modules(copy.deepcopy(conv), copy.deepcopy(bn), backend=provider)


def _variants(layer) -> tuple[bool, ...]:
    # every layer as conv-BN-ReLU; a block's last layer also with its shortcut (the fused add)
    return (False, True) if layer.shortcut else (False,)


def _plan(providers, quick, networks, layers, batch):
    providers = harness.providers(OP, providers, extra=("compile",))
    if layers is None:
        nets = [NETS.get(n, n) for n in networks] if networks else (["resnet50"] if quick else list(NETWORKS))
        layers = network_layers((batch,), nets, NETWORKS, followed_by_bn=True)
        if quick:  # --quick keeps to the conv-BN-ReLU layers (its block ends need their own autotuning)
            layers = [dataclasses.replace(layer, shortcut=None) for layer in layers]
    return providers, layers


def count(
    providers=None,
    dtypes=("bfloat16", "float16", "float32"),
    quick: bool = False,
    networks=None,
    layers=None,
    batches=None,
) -> int:
    """How many timings :func:`run` makes with these arguments (the suite's progress bar)."""
    providers, layers = _plan(providers, quick, networks, layers, (batches or (32,))[-1])
    return _timings(providers, dtypes, layers)


def _timings(providers, dtypes, layers) -> int:
    return sum(len(_variants(layer)) for layer in layers) * len(dtypes) * 2 * len(providers)


def run(
    providers=None,
    dtypes=("bfloat16", "float16", "float32"),
    quick: bool = False,
    progress: bool = True,
    device: torch.device | str = "cuda",
    batch: int = 32,
    layers=None,
    networks=None,
    batches=None,
) -> list[harness.Result]:
    """Time every conv-BN(-ReLU) layer in inference and in a training step. ``quick``: ResNet-50
    only, shorter timing budgets. ``networks``: names from NETS or NETWORKS. ``batches``: the last
    one replaces ``batch`` (the layers are timed at one batch size). ``layers`` replaces the
    networks' layer list (tests)."""
    if batches:
        batch = batches[-1]
    providers, layers = _plan(providers, quick, networks, layers, batch)
    budget = dict(warmup_ms=10, rep_ms=40) if quick else dict(warmup_ms=25, rep_ms=100)
    device = torch.device(device)
    records = harness.new_records()
    bar = harness.progress_bar(_timings(providers, dtypes, layers), OP, progress)
    for layer, shortcut, dname in ((lay, v, d) for lay in layers for v in _variants(lay) for d in dtypes):
        dtype = getattr(torch, dname)
        fmt = torch.contiguous_format if dtype == torch.float32 else torch.channels_last
        x = torch.randn(layer.x_shape, dtype=dtype, device=device).contiguous(memory_format=fmt)
        name = f"{layer.shortcut} + shortcut" if shortcut else layer.name
        common = dict(
            op=OP,
            case=f"{layer.network} {name}",
            shape=layer.shape,
            dtype=dname,
            layout="NCHW" if dtype == torch.float32 else "NHWC",
        )
        ref = _reference(layer, dtype, device, fmt)
        mods = {p: _module(ref, p, shortcut) for p in providers}
        s = None
        if shortcut:  # the block's input (or its projection), in the output's shape and layout
            with torch.no_grad():
                s = torch.randn_like(ref[0](x))  # (the convolution alone: no BatchNorm statistics move)
        args = (x, s) if shortcut else (x,)
        _time_layer(records, bar, layer, mods, args, common, budget)
    bar.close()
    return records


def _time_layer(records, bar, layer, mods, args, common, budget):
    """One layer (and dtype, with or without its shortcut): inference, then a training step."""
    # inference
    with torch.no_grad():
        for m in mods.values():
            m.eval()
        ok = _inference_checked(records, mods, args, common)
        for p, m in mods.items():
            bar.set_postfix_str(f"{common['case']} eval {p}")
            if p in ok:
                harness.measure(
                    records, lambda m=m: m(*args), provider=p, direction="fwd", flops=layer.flops, **budget, **common
                )
            bar.update()
    # training step (its outputs, gradients and running statistics are the tests' business;
    # here a provider that raises is recorded and skipped); the shortcut takes its gradient
    grads = [a.detach().requires_grad_() for a in args]
    for m in mods.values():
        m.train()
    g = torch.randn_like(mods["torch"](*grads))
    for p, m in mods.items():
        params = [*grads, *m.parameters()]
        bar.set_postfix_str(f"{common['case']} train {p}")
        harness.measure(
            records,
            lambda m=m: m(*grads).backward(g),
            provider=p,
            direction="fwd+bwd",
            flops=3 * layer.flops,
            grad_to_none=params,
            **budget,
            **common,
        )
        bar.update()


def _inference_checked(records, mods, args, common) -> list[str]:
    """The providers whose inference agrees with eager's (the baseline always does); eager's output
    is freed on return, before anything is timed."""
    want = mods["torch"](*args)

    def check(p):
        got = mods[p](*args)
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        if not err < 2e-2:
            raise harness.WrongResult(f"{OP} benchmark: {p} inference differs from eager by {err:.2e}")

    return [
        p
        for p in mods
        if p == harness.BASELINE or harness.verify(records, p, lambda p=p: check(p), direction="fwd", **common)
    ]


def main(argv=None) -> int:
    return harness.bench_main(OP, argv)


if __name__ == "__main__":
    raise SystemExit(main())
