"""Where does a cnnkern convolution's time go on a GPU: kernel time or host (launch) time?

For a few ResNet-50 layers (bf16, channels_last, batch 32), against cuDNN in the same run:
  * eager    -- triton.testing.do_bench median (events around each call, L2 flushed): what a user sees;
  * graph    -- do_bench_cudagraph median: the kernels alone, no launch cost;
  * host     -- host microseconds per call when calls are queued back to back (no sync between);
  * launcher -- host microseconds of cnnkern.kernels.conv2d.conv2d_forward alone (no op dispatch);
the CUDA C++ backend's call too when the extension is built; then one conv-BN-ReLU training step
(forward + backward, bf16) per provider; then a cProfile of the public call, so a host-bound path
shows where its time is spent.

    python scripts/gpu_overhead.py            # needs a CUDA GPU
"""

import cProfile
import io
import pstats
import time

import torch
import triton.testing

import cnnkern
from cnnkern import functional as F
from cnnkern.kernels import conv2d as K

LAYERS = [  # (name, N, C, H, W, K, R, stride, pad)
    ("layer1.0.conv1", 32, 64, 56, 56, 64, 1, 1, 0),
    ("layer1.0.conv2", 32, 64, 56, 56, 64, 3, 1, 1),
    ("layer2.1.conv2", 32, 128, 28, 28, 128, 3, 1, 1),
    ("layer3.0.conv1", 32, 512, 28, 28, 256, 1, 1, 0),
    ("layer4.1.conv2", 32, 512, 7, 7, 512, 3, 1, 1),
]


def host_us(fn, n=200):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def _row(name, prov, fn, flops):
    try:
        fn()
        eager = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        graph = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        hu = host_us(fn)
    except Exception as exc:  # a diagnostic: report and go on
        print(f"{name:16s} {prov:7s} failed: {type(exc).__name__}: {exc}")
        return
    print(f"{name:16s} {prov:7s} {eager:9.4f} {graph:9.4f} {hu:8.1f} {flops / graph / 1e9:13.1f}")


def _conv_rows(name, n, c, h, w_, k, r, s, p, dev):
    """One layer's rows: cuDNN, the Triton call, its launcher alone and the CUDA C++ backend.
    Returns the Triton call on that layer (profiled after the last layer)."""
    x = torch.randn(n, c, h, w_, device=dev, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    w = (torch.randn(k, c, r, r, device=dev, dtype=torch.bfloat16) * (c * r * r) ** -0.5).to(
        memory_format=torch.channels_last
    )
    ours = lambda: F.conv2d(x, w, stride=s, padding=p, backend="triton")  # noqa: E731
    cudnn = lambda: torch.nn.functional.conv2d(x, w, stride=s, padding=p)  # noqa: E731
    y = ours()
    out_hw = y.shape[2] * y.shape[3]
    flops = 2 * n * k * out_hw * c * r * r
    pad = [p, p, p, p]
    launcher = lambda: K.conv2d_forward(x, w, None, y, [s, s], pad[:2], [1, 1], 1, False, "ieee")  # noqa: E731
    provs = [("cudnn", cudnn), ("triton", ours), ("launch", launcher)]
    if cnnkern.available_backends().count("cuda"):
        provs.append(("cuda", lambda: F.conv2d(x, w, stride=s, padding=p, backend="cuda")))
    for prov, fn in provs:
        _row(name, prov, fn, flops)
    return ours


def _train_rows(name, n, c, h, w_, k, r, s, p, dev):
    """One conv-BN-ReLU layer's training step (forward + backward), one row per provider."""
    x = torch.randn(n, c, h, w_, device=dev, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    x.requires_grad_()
    ref = (
        torch.nn.Sequential(torch.nn.Conv2d(c, k, r, s, p, bias=False), torch.nn.BatchNorm2d(k), torch.nn.ReLU())
        .to(dev, torch.bfloat16)
        .to(memory_format=torch.channels_last)
    )
    flops = 3 * 2 * n * k * (h // s) * (w_ // s) * c * r * r
    for prov in ["torch", "triton", *(["cuda"] if "cuda" in cnnkern.available_backends() else [])]:
        mod = ref if prov == "torch" else cnnkern.nn.ConvBNReLU2d.from_modules(ref[0], ref[1], backend=prov)

        def step(mod=mod):
            mod(x).sum().backward()

        _row(name + " train", prov, step, flops)


def main():
    torch.backends.cudnn.benchmark = True
    dev = "cuda"
    print(f"{'layer':16s} {'prov':7s} {'eager ms':>9s} {'graph ms':>9s} {'host us':>8s} {'TFLOP/s graph':>13s}")
    for layer in LAYERS:
        ours = _conv_rows(*layer, dev)
    # a training step of one conv-BN-ReLU layer (forward + backward): launches per layer matter here
    for layer in LAYERS[1:3]:
        _train_rows(*layer, dev)
    # where the host time goes, for the last layer
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(200):
        ours()
    pr.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(25)
    print(buf.getvalue())


if __name__ == "__main__":
    main()
