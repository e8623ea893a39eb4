"""End-to-end benchmark of the four networks: inference images/s and training-step throughput.

Networks: AlexNet, VGG-16, GoogLeNet and ResNet-50 in torchvision's variants (cnnkern.models
builds each with torchvision's layer names, so the torchvision model's ``state_dict`` loads into
the cnnkern one and both compute the same function with the same weights). Providers:

* ``"torch"``: the torchvision model in eager mode (cuDNN, ``cudnn.benchmark=True``): the baseline;
* ``"cnnkern"``: ``cnnkern.models`` with backend ``"auto"`` (each op on its preferred GPU backend),
  or one provider per requested backend that has a kernel for every op of the networks
  (``--backends triton``);
* ``"<cnnkern provider>+graph"`` (inference only): the same cnnkern model captured in a CUDA graph
  per input shape and replayed (input copied into the graph's static buffer each call, as
  Inductor's CUDA graphs do): the kernels without Python's host time, the fair peer of
  ``"inductor"``, which also replays CUDA graphs;
* ``"inductor"``: ``torch.compile(torchvision model, mode="max-autotune")``, CUDA graphs included,
  as a user would compile it (slow to compile: minutes per network; off with ``--no-inductor``).

Cases: inference (eval mode, ``torch.no_grad``) at batch 1, 32 and 128 and a training step at
batch 64 (train mode: forward, cross-entropy loss, backward, SGD step with momentum), all in bf16
channels_last unless other dtypes are asked for (fp32 runs in NCHW). Every record counts images
(``images_per_s``); FLOPs are 2 x the network's multiply-adds (cnnkern.summary) per image, x3 for
the training step (backward costs two forwards), so TFLOP/s compares with the matmul ceiling.

Before anything is timed, each provider's eval output is compared with the torchvision model's on
the same input: a provider that computes something else is refused, not timed.

    python -m cnnkern.benchmarks.bench_models [--quick] [--no-inductor] [--out DIR]
"""

from __future__ import annotations

import copy

import torch

from cnnkern import _backend, models
from cnnkern.summary import summary

from . import harness

OP = "models"
NETS = ("alexnet", "vgg16", "googlenet", "resnet50")
INFER_BATCHES = (1, 32, 128)
TRAIN_BATCH = 64
COMPILE_MODE = "max-autotune"  # whole networks: Inductor's CUDA graphs are part of what compile gives
# The ops the networks call: a backend can run a whole network only with a kernel for each.
MODEL_OPS = ("conv2d", "conv_bn_relu", "residual_add", "local_response_norm")
# Relative error norm of a provider's eval logits against torchvision's, per dtype. Loose: a whole
# network in bf16 accumulates rounding, and this is a check against wrong results, not a test.
TOL = {"bfloat16": 0.1, "float16": 0.05, "float32": 0.02}
GRAPH = "+graph"  # provider suffix: the provider's model replayed from a CUDA graph (inference)


def _tv(name, **kw):
    import torchvision

    return getattr(torchvision.models, name)(**kw)


# name -> (cnnkern factory(backend), torchvision factory, input size per image)
NETWORKS = {
    "alexnet": (lambda b: models.alexnet(variant="torchvision", backend=b), lambda: _tv("alexnet"), (3, 224, 224)),
    "vgg16": (lambda b: models.vgg16(backend=b), lambda: _tv("vgg16"), (3, 224, 224)),
    "googlenet": (
        lambda b: models.googlenet(variant="torchvision", backend=b),
        lambda: _tv("googlenet", aux_logits=False, init_weights=True),
        (3, 224, 224),
    ),
    "resnet50": (lambda b: models.resnet50(backend=b), lambda: _tv("resnet50"), (3, 224, 224)),
}


def suite_providers(backends=None, inductor: bool = True) -> list[str]:
    """``"torch"``, the cnnkern providers, ``"inductor"`` (when ``inductor``). Without
    ``backends``, one cnnkern provider, "cnnkern" (backend "auto"); with them, each backend that
    has a kernel for every op the networks use and can run here (others are left out)."""
    if backends is None:
        mine = ["cnnkern"]
    else:
        import cnnkern

        avail = cnnkern.available_backends()
        mine = [b for b in backends if b in avail and all(b in _backend.AUTO_ORDER.get(op, ()) for op in MODEL_OPS)]
    return [harness.BASELINE, *mine, *[p + GRAPH for p in mine], *([harness.INDUCTOR] if inductor else [])]


def _base(provider: str) -> str:
    return provider[: -len(GRAPH)] if provider.endswith(GRAPH) else provider


def _backend_of(provider: str):
    p = _base(provider)
    return None if p == "cnnkern" else p


class _Graphed:
    """``model(x)`` replayed from a CUDA graph captured, per input shape/dtype/strides, on the first
    call (after warm-up calls on a side stream, so Triton's compilation and autotuning and
    cnnkern's BatchNorm folding happen before the capture). Each call copies ``x`` into the graph's
    input buffer and returns the graph's output buffer (overwritten by the next call). Inference
    only (call it under ``torch.no_grad``)."""

    def __init__(self, model):
        self.model = model
        self.graphs = {}

    def __call__(self, x):
        key = (tuple(x.shape), x.dtype, x.stride())
        entry = self.graphs.get(key)
        if entry is None:
            static_x = x.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.model(static_x)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_y = self.model(static_x)
            entry = self.graphs[key] = (graph, static_x, static_y)
        graph, static_x, static_y = entry
        static_x.copy_(x)
        graph.replay()
        return static_y


def _plan(providers, quick, networks, batches, train_batch):
    if providers is None:
        providers = suite_providers(None, not quick)
    providers = list(providers)
    if harness.BASELINE not in providers:
        providers.insert(0, harness.BASELINE)
    nets = list(networks) if networks else (["resnet50"] if quick else list(NETS))
    batches = tuple(batches) if batches else ((32,) if quick else INFER_BATCHES)
    return providers, nets, batches, train_batch


def cases(
    providers=None,
    dtypes=("bfloat16",),
    quick: bool = False,
    networks=None,
    batches=None,
    train_batch: int = TRAIN_BATCH,
) -> list[tuple]:
    """``(network, mode, batch, dtype, provider)`` in the order :func:`run` times them; mode is
    "inference" or "train"."""
    providers, nets, batches, train_batch = _plan(providers, quick, networks, batches, train_batch)
    out = []
    for net in nets:
        for dname in dtypes:
            for n in batches:
                out += [(net, "inference", n, dname, p) for p in providers]
            if train_batch:
                out += [(net, "train", train_batch, dname, p) for p in providers if not p.endswith(GRAPH)]
    return out


def count(
    providers=None,
    dtypes=("bfloat16",),
    quick: bool = False,
    networks=None,
    batches=None,
    train_batch: int = TRAIN_BATCH,
) -> int:
    """How many timings :func:`run` makes with these arguments (the suite's progress bar)."""
    return len(cases(providers, dtypes, quick, networks, batches, train_batch))


def _logits(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _check(got, want, dname, what):
    got, want = _logits(got).detach().float(), _logits(want).detach().float()
    err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    if not err <= TOL[dname]:  # `not <=`: NaN fails too
        raise harness.WrongResult(
            f"{OP} benchmark: {what} differs from torchvision by {err:.2e} (relative norm); not timing it"
        )


def run(
    providers=None,
    dtypes=("bfloat16",),
    quick: bool = False,
    progress: bool = True,
    device: torch.device | str = "cuda",
    networks=None,
    batches=None,
    train_batch: int = TRAIN_BATCH,
    table=None,
) -> list[harness.Result]:
    """Time inference and a training step of every network, dtype, batch and provider.

    Args:
        providers: from :func:`suite_providers` (default: torch, cnnkern, and inductor unless
            ``quick``); the torch baseline always runs.
        dtypes: "bfloat16" and "float16" run in channels_last, "float32" in NCHW.
        quick: ResNet-50 only, inference at batch 32 and the training step, shorter budgets.
        networks: names from NETWORKS (default all four). batches: inference batch sizes (default
            1, 32, 128). train_batch: batch of the training step (0: none).
        device: the tests pass "cpu" with a fake timer. table: replaces NETWORKS (tests).

    Returns:
        :class:`harness.Result` records (op "models") with ``images`` and ``flops``; pass them
        through :func:`harness.finalize` for images/s, TFLOP/s and speedups.
    """
    table = table or NETWORKS
    providers, nets, batches, train_batch = _plan(providers, quick, networks, batches, train_batch)
    budget = dict(warmup_ms=50, rep_ms=200) if quick else dict(warmup_ms=100, rep_ms=500)
    device = torch.device(device)
    todo = cases(providers, dtypes, quick, networks, batches, train_batch)
    bar = harness.progress_bar(len(todo), OP, progress)
    records = harness.new_records()
    for net in nets:
        make_cnnkern, _, size = table[net]
        macs = summary(make_cnnkern(None), (1, *size)).macs  # per image, on the meta device
        for dname in dtypes:
            _run_network(records, bar, providers, budget, device, net, table[net], macs, dname, batches, train_batch)
            if device.type == "cuda":  # (the models and graphs, and their memory pools, went with its locals)
                torch.cuda.empty_cache()
    bar.close()
    return records


def _run_network(records, bar, providers, budget, device, net, entry, macs, dname, batches, train_batch):
    """One network and dtype: inference at each batch size, then the training step (unless
    ``train_batch`` is 0)."""
    make_cnnkern, make_tv, size = entry
    dtype = getattr(torch, dname)
    fmt = torch.contiguous_format if dtype == torch.float32 else torch.channels_last
    layout = "NCHW" if dtype == torch.float32 else "NHWC"
    torch.manual_seed(0)
    tv = make_tv()
    state = tv.state_dict()

    def build(p):
        if p == harness.BASELINE:
            m = tv
        elif p == harness.INDUCTOR:
            m = copy.deepcopy(tv)
        elif p.endswith(GRAPH) and _base(p) in nets_of:
            return nets_of[_base(p)]  # the same module; the graph adds its own buffers
        else:
            m = make_cnnkern(_backend_of(p))
            m.load_state_dict(state)
        return m.to(device=device, dtype=dtype).to(memory_format=fmt)

    nets_of = {}
    for p in providers:
        nets_of[p] = build(p)
    run_of = {p: _Graphed(m) if p.endswith(GRAPH) else m for p, m in nets_of.items()}
    if harness.INDUCTOR in providers:
        run_of[harness.INDUCTOR] = harness.compile_reference(nets_of[harness.INDUCTOR], mode=COMPILE_MODE)

    # inference
    for m in nets_of.values():
        m.eval()
    with torch.no_grad():
        for n in batches:
            x = torch.randn(n, *size, dtype=dtype, device=device).contiguous(memory_format=fmt)
            common = dict(
                op=OP,
                case=f"{net} inference b{n}",
                shape=f"{n}x{'x'.join(map(str, size))}",
                dtype=dname,
                layout=layout,
                direction="fwd",
                images=n,
                flops=2 * macs * n,
            )
            ok = _inference_checked(records, providers, run_of, x, dname, f"{net} inference batch {n} {dname}", common)
            for p in providers:
                bar.set_postfix_str(f"{net} inference b{n} {dname} {p}")
                if p in ok:
                    harness.measure(records, lambda f=run_of[p], x=x: f(x), provider=p, **budget, **common)
                bar.update()
            del x

    # training step: forward, loss, backward, SGD step
    if not train_batch:
        return
    n = train_batch
    x = torch.randn(n, *size, dtype=dtype, device=device).contiguous(memory_format=fmt)
    with torch.no_grad():
        nets_of[harness.BASELINE].eval()
        classes = _logits(nets_of[harness.BASELINE](x[:1])).shape[1]
    y = torch.randint(0, classes, (n,), device=device)
    common = dict(
        op=OP,
        case=f"{net} train b{n}",
        shape=f"{n}x{'x'.join(map(str, size))}",
        dtype=dname,
        layout=layout,
        images=n,
        flops=3 * 2 * macs * n,
    )
    for p in providers:
        if p.endswith(GRAPH):
            continue
        model = nets_of[p]
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step(f=run_of[p], opt=opt):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(_logits(f(x)).float(), y)
            loss.backward()
            opt.step()

        bar.set_postfix_str(f"{net} train b{n} {dname} {p}")
        harness.measure(records, step, provider=p, direction="train", **budget, **common)
        bar.update()


def _inference_checked(records, providers, run_of, x, dname, what, common) -> list[str]:
    """The providers whose eval output on ``x`` agrees with the baseline's (the baseline always
    does); the baseline's output is freed on return, before anything is timed."""
    want = run_of[harness.BASELINE](x)
    return [
        p
        for p in providers
        if p == harness.BASELINE
        or harness.verify(records, p, lambda p=p: _check(run_of[p](x), want, dname, f"{p} {what}"), **common)
    ]


def main(argv=None) -> int:
    return harness.bench_main(OP, argv)


if __name__ == "__main__":
    raise SystemExit(main())
