"""The convolution benchmarks without a GPU: the layer lists come from the networks, and the timing
loop (checks, providers, directions, FLOP counts) runs on tiny CPU layers with a fake timer."""

import pytest
import torch

from cnnkern.benchmarks import bench_conv2d, bench_conv_bn_relu, harness


def test_layer_lists_are_taken_from_the_networks():
    layers = bench_conv2d.network_layers()
    nets = {(layer.network, layer.x_shape[0]) for layer in layers}
    assert {("resnet50", 1), ("resnet50", 32), ("vgg16", 32), ("googlenet", 32)} <= nets
    r50 = [layer for layer in layers if layer.network == "resnet50" and layer.x_shape[0] == 32]
    assert len(r50) == 23  # ResNet-50's distinct convolutions
    assert r50[0].name == "conv1" and r50[0].flops == 2 * 32 * 64 * 112 * 112 * 3 * 7 * 7
    fused = bench_conv2d.network_layers((32,), None, bench_conv_bn_relu.NETWORKS, followed_by_bn=True)
    assert {layer.network for layer in fused} == {"resnet50", "vgg16_bn", "googlenet"}  # GoogLeNet's BasicConv2d has BN
    assert all(layer.x_shape[0] == 32 for layer in fused)


def _tiny():
    # the last field is the MAC count N*K*P*Q*C*R*S
    return [
        bench_conv2d.Layer(
            "tiny", "conv", (2, 8, 6, 6), (16, 8, 3, 3), (1, 1), (1, 1), (1, 1), 1, 2 * 16 * 6 * 6 * 8 * 9
        ),
        bench_conv2d.Layer("tiny", "proj", (2, 16, 6, 6), (8, 16, 1, 1), (2, 2), (0, 0), (1, 1), 1, 2 * 8 * 3 * 3 * 16),
    ]


@pytest.fixture
def fake_timer(monkeypatch):
    calls = []

    def fake_time(fn, *, cudagraph=False, grad_to_none=None, **budget):
        fn()
        calls.append(fn)
        return {"median_ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1, "wide_spread": False, "timer": "fake"}

    monkeypatch.setattr(harness, "time_fn", fake_time)
    return calls


def test_conv2d_loop(fake_timer):
    recs = bench_conv2d.run(providers=["triton"], dtypes=("float32",), progress=False, device="cpu", layers=_tiny())
    # 2 layers x 3 directions x 2 providers
    assert len(recs) == 12 and len(fake_timer) == 12
    assert {r.provider for r in recs} == {"torch", "triton"}
    bwd = [r for r in recs if r.direction == "fwd+bwd"]
    assert all(r.flops == 3 * 2 * (2 * 16 * 6 * 6 * 8 * 9) for r in bwd if r.case == "tiny conv")
    harness.finalize(recs, {"bf16_matmul_TFLOPs": 800.0, "copy_GBps": 3000.0})
    assert all(r.tflops is not None and r.speedup == 1.0 for r in recs)


def test_conv2d_refuses_a_wrong_kernel(fake_timer, monkeypatch):
    # a wrong provider is not timed: the failure is recorded per case and the loop goes on
    real = bench_conv2d.conv2d
    monkeypatch.setattr(bench_conv2d, "conv2d", lambda *a, **k: real(*a, **k) * 1.1)
    recs = bench_conv2d.run(providers=["triton"], dtypes=("float32",), progress=False, device="cpu", layers=_tiny())
    assert {r.provider for r in recs} == {"torch"} and len(recs) == 6  # 2 layers x 3 directions
    assert len(recs.failures) == 6
    assert all(
        f["provider"] == "triton" and f["stage"] == "check" and "differs from cuDNN" in f["error"]
        for f in recs.failures
    )
    assert {f["direction"] for f in recs.failures} == {"fwd", "fwd+bwd"}


def test_conv_bn_relu_loop(fake_timer):
    recs = bench_conv_bn_relu.run(
        providers=["triton"], dtypes=("float32",), progress=False, device="cpu", layers=_tiny()
    )
    assert len(recs) == 8  # 2 layers x (eval, train) x 2 providers
    assert {(r.provider, r.direction) for r in recs} == {
        (p, d) for p in ("torch", "triton") for d in ("fwd", "fwd+bwd")
    }
    assert torch.get_default_dtype() == torch.float32


def test_block_ends_are_timed_with_their_shortcut(fake_timer):
    """ResNet-50's block-ending convolutions are marked (from the network); each such layer is
    also timed as relu(bn(conv(x)) + shortcut), checked against eager, forward and backward."""
    fused = bench_conv2d.network_layers((32,), ["resnet50"], bench_conv_bn_relu.NETWORKS, followed_by_bn=True)
    # (layer1.0.downsample.0 has layer1.0.conv3's shape and runs after it, between bn3 and the add,
    # as in torchvision: one distinct layer; a projection shortcut itself never ends a block)
    ends = {(layer.name, layer.shortcut) for layer in fused if layer.shortcut}
    assert ends == {
        ("layer1.0.conv3", "layer1.0.conv3"),
        ("layer2.0.conv3", "layer2.0.conv3"),
        ("layer3.0.conv3", "layer3.0.conv3"),
        ("layer4.0.conv3", "layer4.0.conv3"),
    }, ends
    layers = [
        bench_conv2d.Layer(
            "tiny",
            "conv3",
            (2, 8, 6, 6),
            (16, 8, 1, 1),
            (1, 1),
            (0, 0),
            (1, 1),
            1,
            2 * 16 * 6 * 6 * 8,
            shortcut="conv3",
        )
    ]
    recs = bench_conv_bn_relu.run(
        providers=["triton"], dtypes=("float32",), progress=False, device="cpu", layers=layers
    )
    assert not recs.failures
    assert {(r.case, r.provider, r.direction) for r in recs} == {
        (c, p, d)
        for c in ("tiny conv3", "tiny conv3 + shortcut")
        for p in ("torch", "triton")
        for d in ("fwd", "fwd+bwd")
    }
    assert bench_conv_bn_relu.count(providers=["triton"], dtypes=("float32",), layers=layers) == 8


@pytest.fixture
def fake_compile(monkeypatch):
    """harness.compile_reference through Dynamo with the eager backend: the provider's plumbing
    (what is compiled, that it is called, checked and timed) without Inductor's CPU codegen."""
    compiled = []

    def compile_reference(fn, mode=None):
        compiled.append((fn, mode))
        return torch.compile(fn, backend="eager")

    monkeypatch.setattr(harness, "compile_reference", compile_reference)
    return compiled


def test_conv2d_loop_with_inductor(fake_timer, fake_compile):
    recs = bench_conv2d.run(
        providers=["triton", "inductor"], dtypes=("float32",), progress=False, device="cpu", layers=_tiny()[:1]
    )
    assert len(recs) == 3 * 3  # 3 directions x (torch, triton, inductor)
    assert [r.provider for r in recs[:3]] == ["torch", "triton", "inductor"]
    assert len(fake_compile) == 3  # one compilation per layer and direction
    harness.finalize(recs, None)
    assert all(r.speedup_inductor == 1.0 for r in recs)
    assert bench_conv2d.count(providers=["triton", "inductor"], dtypes=("float32",), layers=_tiny()[:1]) == 9


def test_conv_bn_relu_layouts_and_inductor(fake_timer, fake_compile):
    recs = bench_conv_bn_relu.run(
        providers=["inductor"], dtypes=("float32",), progress=False, device="cpu", layers=_tiny()[:1]
    )
    assert {(r.provider, r.direction) for r in recs} == {
        (p, d) for p in ("torch", "inductor") for d in ("fwd", "fwd+bwd")
    }
    assert {r.layout for r in recs} == {"NCHW"}  # fp32 runs NCHW (TF32 on a GPU), bf16/fp16 channels_last
    assert len(fake_compile) == 1 and isinstance(fake_compile[0][0], torch.nn.Sequential)


# ------------------------------------------------------------------------------------------------
# whole networks
# ------------------------------------------------------------------------------------------------
def _tiny_nets():
    """One tiny network in two spellings with the same state_dict keys: cnnkern layers (conv-BN-ReLU
    fused, residual add) and plain torch layers."""
    import cnnkern

    class Mine(torch.nn.Module):
        def __init__(self, backend=None):
            super().__init__()
            self.block = cnnkern.nn.ConvBNReLU2d(3, 8, 3, padding=1, backend=backend)
            self.join = cnnkern.nn.ResidualAdd(backend=backend)
            self.fc = torch.nn.Linear(8, 10)

        def forward(self, x):
            y = self.block(x)
            return self.fc(self.join(y, y).mean((2, 3)))

    class Theirs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = torch.nn.Module()
            self.block.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.block.bn = torch.nn.BatchNorm2d(8)
            self.fc = torch.nn.Linear(8, 10)

        def forward(self, x):
            y = torch.relu(self.block.bn(self.block.conv(x)))
            return self.fc(torch.relu(y + y).mean((2, 3)))

    return {"tiny": (lambda backend: Mine(backend), Theirs, (3, 6, 6))}


def test_models_cases_and_records(fake_timer, fake_compile):
    from cnnkern.benchmarks import bench_models

    table = _tiny_nets()
    kw = dict(
        providers=["torch", "triton", "inductor"], dtypes=("float32",), networks=["tiny"], batches=(1, 3), train_batch=2
    )
    recs = bench_models.run(progress=False, device="cpu", table=table, **kw)
    # (2 inference batches + 1 training step) x 3 providers, in the order cases() lists them
    assert [(r.case, r.provider) for r in recs] == [
        (f"{net} {'inference' if mode == 'inference' else 'train'} b{n}", p)
        for net, mode, n, _, p in bench_models.cases(**kw)
    ]
    assert len(recs) == bench_models.count(**kw) == 9
    assert fake_compile and fake_compile[0][1] == "max-autotune"  # whole networks: max-autotune with CUDA graphs
    macs = 8 * 6 * 6 * 3 * 9 + 8 * 10  # conv + linear, per image
    b3 = next(r for r in recs if r.case == "tiny inference b3" and r.provider == "triton")
    assert (b3.images, b3.flops, b3.direction, b3.layout, b3.shape) == (3, 2 * macs * 3, "fwd", "NCHW", "3x3x6x6")
    train = [r for r in recs if r.case == "tiny train b2"]
    assert {r.direction for r in train} == {"train"} and all(r.flops == 3 * 2 * macs * 2 for r in train)
    harness.finalize(recs, {"bf16_matmul_TFLOPs": 800.0, "copy_GBps": 3000.0})
    assert b3.images_per_s == pytest.approx(3000.0) and b3.speedup == 1.0 and b3.speedup_inductor == 1.0


def test_models_graph_provider_is_inference_only(fake_timer, monkeypatch):
    # "<provider>+graph" replays the provider's own model from a CUDA graph: inference cases only,
    # the same module as its base provider, and its output is checked against torchvision too.
    from cnnkern.benchmarks import bench_models

    wrapped = []

    class FakeGraphed:  # CUDA graphs need a GPU; this stands in for the capture and replays eagerly
        def __init__(self, model):
            wrapped.append(model)
            self.model = model

        def __call__(self, x):
            return self.model(x)

    monkeypatch.setattr(bench_models, "_Graphed", FakeGraphed)
    kw = dict(
        providers=["torch", "triton", "triton+graph"],
        dtypes=("float32",),
        networks=["tiny"],
        batches=(2,),
        train_batch=2,
    )
    cases = bench_models.cases(**kw)
    assert [(c[1], c[4]) for c in cases] == [
        ("inference", "torch"),
        ("inference", "triton"),
        ("inference", "triton+graph"),
        ("train", "torch"),
        ("train", "triton"),
    ]
    recs = bench_models.run(progress=False, device="cpu", table=_tiny_nets(), **kw)
    assert [(r.case, r.provider) for r in recs] == [(f"tiny {m} b{n}", p) for _, m, n, _, p in cases]
    assert len(wrapped) == 1 and type(wrapped[0]).__name__ == "Mine"
    assert bench_models._backend_of("triton+graph") == "triton" and bench_models._backend_of("cnnkern+graph") is None
    assert bench_models.suite_providers(None, inductor=False) == ["torch", "cnnkern", "cnnkern+graph"]


def test_models_defaults_and_quick():
    from cnnkern.benchmarks import bench_models

    full = bench_models.cases(providers=["torch", "cnnkern", "inductor"])
    assert {c[0] for c in full} == {"alexnet", "vgg16", "googlenet", "resnet50"}
    assert {(c[1], c[2]) for c in full} == {("inference", 1), ("inference", 32), ("inference", 128), ("train", 64)}
    assert {c[3] for c in full} == {"bfloat16"}
    quick = bench_models.cases(quick=True)
    assert {(c[0], c[1], c[2]) for c in quick} == {("resnet50", "inference", 32), ("resnet50", "train", 64)}
    assert {c[4] for c in quick} == {"torch", "cnnkern", "cnnkern+graph"}  # no Inductor compile in the quick subset
    assert {c[4] for c in quick if c[1] == "train"} == {"torch", "cnnkern"}


def test_models_refuses_a_wrong_network(fake_timer):
    from cnnkern.benchmarks import bench_models

    mine, theirs, size = _tiny_nets()["tiny"]

    def broken(backend=None):
        m = mine(backend)
        m.forward = lambda x: torch.zeros(x.shape[0], 10) + 1.0  # ignores its input
        return m

    recs = bench_models.run(
        providers=["torch", "triton"],
        dtypes=("float32",),
        progress=False,
        device="cpu",
        table={"tiny": (broken, theirs, size)},
        networks=["tiny"],
        batches=(2,),
        train_batch=0,
    )
    assert [r.provider for r in recs] == ["torch"]
    (f,) = recs.failures
    assert f["provider"] == "triton" and "differs from torchvision" in f["error"] and f["case"] == "tiny inference b2"
