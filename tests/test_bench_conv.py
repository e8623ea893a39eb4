"""The convolution benchmarks without a GPU: the layer lists come from the networks, and the timing
loop (checks, providers, directions, FLOP counts) runs on tiny CPU layers with a fake timer."""

import pytest
import torch

from cnnkern.benchmarks import bench_conv2d, bench_conv_bn_relu, harness


def test_layer_lists_are_taken_from_the_networks():
    layers = bench_conv2d.network_layers()
    nets = {(l.network, l.x_shape[0]) for l in layers}
    assert {("resnet50", 1), ("resnet50", 32), ("vgg16", 32), ("googlenet", 32)} <= nets
    r50 = [l for l in layers if l.network == "resnet50" and l.x_shape[0] == 32]
    assert len(r50) == 23  # ResNet-50's distinct convolutions
    assert r50[0].name == "conv1" and r50[0].flops == 2 * 32 * 64 * 112 * 112 * 3 * 7 * 7
    fused = bench_conv2d.network_layers((32,), None, bench_conv_bn_relu.NETWORKS, followed_by_bn=True)
    assert {l.network for l in fused} == {"resnet50", "vgg16_bn"}
    assert all(l.x_shape[0] == 32 for l in fused)


def _tiny():
    # the last field is the MAC count N*K*P*Q*C*R*S
    return [bench_conv2d.Layer("tiny", "conv", (2, 8, 6, 6), (16, 8, 3, 3), (1, 1), (1, 1), (1, 1), 1,
                               2 * 16 * 6 * 6 * 8 * 9),
            bench_conv2d.Layer("tiny", "proj", (2, 16, 6, 6), (8, 16, 1, 1), (2, 2), (0, 0), (1, 1), 1,
                               2 * 8 * 3 * 3 * 16)]


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
    real = bench_conv2d.conv2d
    monkeypatch.setattr(bench_conv2d, "conv2d", lambda *a, **k: real(*a, **k) * 1.1)
    with pytest.raises(AssertionError, match="differs from cuDNN"):
        bench_conv2d.run(providers=["triton"], dtypes=("float32",), progress=False, device="cpu", layers=_tiny())


def test_conv_bn_relu_loop(fake_timer):
    recs = bench_conv_bn_relu.run(providers=["triton"], dtypes=("float32",), progress=False, device="cpu",
                                  layers=_tiny())
    assert len(recs) == 8  # 2 layers x (eval, train) x 2 providers
    assert {(r.provider, r.direction) for r in recs} == {(p, d) for p in ("torch", "triton")
                                                         for d in ("fwd", "fwd+bwd")}
    assert torch.get_default_dtype() == torch.float32
