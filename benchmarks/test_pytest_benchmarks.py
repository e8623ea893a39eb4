"""pytest-benchmark suite of the headline kernels, against PyTorch eager / cuDNN on the same inputs.

    python -m pytest benchmarks/test_pytest_benchmarks.py --benchmark-only
    python -m pytest benchmarks/test_pytest_benchmarks.py --benchmark-only --benchmark-save=h100   # keep a run
    python -m pytest benchmarks/test_pytest_benchmarks.py --benchmark-only --benchmark-compare       # vs the last

Every test is skipped without a CUDA device (this file is outside ``testpaths``, so a plain
``pytest`` run of tests/ never collects it). The timed function launches the kernel and then
synchronizes the device, so each round is one launch's wall time on the host, launch overhead
included (the `cnnkern bench` harness measures GPU time with CUDA events instead; the two answer
different questions and both are useful). Each provider's result is checked against the
baseline's before it is timed. Groups pair a kernel with its baseline: compare within a group.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="pytest-benchmark suite: needs a CUDA device")

BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _restore_cudnn_benchmark():
    """The tests set ``torch.backends.cudnn.benchmark`` for their baselines; it is restored after each."""
    saved = torch.backends.cudnn.benchmark
    yield
    torch.backends.cudnn.benchmark = saved


def _available(provider: str, op: str) -> bool:
    import cnnkern

    if provider == "torch":
        return True
    return provider in cnnkern.available_backends() and provider in cnnkern._backend.AUTO_ORDER.get(op, ())


def _bench(benchmark, fn, rounds: int = 200):
    def timed():
        fn()
        torch.cuda.synchronize()

    timed()  # compile / autotune outside the timing
    benchmark.pedantic(timed, warmup_rounds=10, rounds=rounds, iterations=1)


def _close(got, want, tol):
    got, want = got.float(), want.float()
    err = ((got - want).norm() / want.norm()).item()
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}: not timing a wrong kernel"


@pytest.mark.benchmark(group="residual_add 64x256x64x64 bf16 NHWC fwd")
@pytest.mark.parametrize("provider", ["torch", "triton", "cuda"])
def test_residual_add_large(benchmark, provider):
    from cnnkern.functional import residual_add

    if not _available(provider, "residual_add"):
        pytest.skip(f"{provider} cannot run residual_add here")
    x = torch.randn(64, 256, 64, 64, device="cuda", dtype=BF16).contiguous(memory_format=torch.channels_last)
    s = torch.randn_like(x)
    fn = (lambda: torch.relu(x + s)) if provider == "torch" else (lambda: residual_add(x, s, backend=provider))
    _close(fn(), torch.relu(x + s), 1e-2)
    _bench(benchmark, fn)


@pytest.mark.benchmark(group="conv2d resnet50 layer1.0.conv2 N32 C64 56x56 K64 3x3 bf16 NHWC fwd")
@pytest.mark.parametrize("provider", ["torch", "triton", "cuda"])
def test_conv2d_resnet50_3x3(benchmark, provider):
    from cnnkern.functional import conv2d

    if not _available(provider, "conv2d"):
        pytest.skip(f"{provider} has no conv2d kernel here")
    torch.backends.cudnn.benchmark = True
    x = torch.randn(32, 64, 56, 56, device="cuda", dtype=BF16).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(64, 64, 3, 3, device="cuda", dtype=BF16) / 24).contiguous(memory_format=torch.channels_last)
    ref = lambda: torch.nn.functional.conv2d(x, w, padding=1)  # noqa: E731
    fn = ref if provider == "torch" else (lambda: conv2d(x, w, padding=1, backend=provider))
    _close(fn(), ref(), 2e-2)
    _bench(benchmark, fn)


@pytest.mark.benchmark(group="conv_bn_relu resnet50 layer1.0.conv2 eval bf16 NHWC")
@pytest.mark.parametrize("provider", ["torch", "triton", "cuda"])
def test_conv_bn_relu_eval(benchmark, provider):
    import cnnkern

    if not _available(provider, "conv_bn_relu"):
        pytest.skip(f"{provider} has no conv_bn_relu kernel here")
    torch.backends.cudnn.benchmark = True
    conv, bn = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False), torch.nn.BatchNorm2d(64)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    ref = torch.nn.Sequential(conv, bn, torch.nn.ReLU()).to("cuda", BF16).to(memory_format=torch.channels_last).eval()
    mod = ref if provider == "torch" else cnnkern.nn.ConvBNReLU2d.from_modules(ref[0], ref[1], backend=provider).eval()
    x = torch.randn(32, 64, 56, 56, device="cuda", dtype=BF16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        _close(mod(x), ref(x), 2e-2)
        _bench(benchmark, lambda: mod(x))


@pytest.mark.benchmark(group="local_response_norm alexnet norm1 128x96x55x55 bf16 NCHW fwd")
@pytest.mark.parametrize("provider", ["torch", "triton", "cuda"])
def test_lrn_alexnet_norm1(benchmark, provider):
    from cnnkern.functional import local_response_norm

    if not _available(provider, "local_response_norm"):
        pytest.skip(f"{provider} cannot run local_response_norm here")
    x = torch.randn(128, 96, 55, 55, device="cuda", dtype=BF16)
    args = (5, 5e-4, 0.75, 2.0)  # AlexNet's constants in PyTorch's convention
    ref = lambda: torch.nn.functional.local_response_norm(x, *args)  # noqa: E731
    fn = ref if provider == "torch" else (lambda: local_response_norm(x, *args, backend=provider))
    _close(fn(), torch.nn.functional.local_response_norm(x.float(), *args), 2e-2)
    _bench(benchmark, fn)
