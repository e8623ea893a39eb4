"""CUDA streams and graphs (GPU only): every op, on every backend, launches its kernels on
PyTorch's current stream (so it orders correctly with work queued on a side stream), and can be
captured in a CUDA graph after warm-up, forward and backward; replaying the graph on new inputs
gives the eager result.

Warm-up matters for the Triton backend: the first call of a shape runs Triton's autotuner, which
times configurations (and so synchronizes); it must not happen inside a capture. After warm-up the
chosen configuration is reused (kernels/conv2d.py: _launch).
"""

from __future__ import annotations

import pytest
import torch
from helpers import HAS_CUDA, backends_for, make

from cnnkern import functional as F

pytestmark = pytest.mark.gpu

OPS = ("conv2d", "conv_bn_relu_train", "conv_bn_relu_eval", "local_response_norm", "residual_add")


def _base(op):
    return "conv_bn_relu" if op.startswith("conv_bn_relu") else op


def _params():
    out = []
    for op in OPS:
        for p in (
            backends_for(torch.device("cuda"), _base(op))
            if HAS_CUDA
            else [pytest.param("triton", marks=pytest.mark.gpu)]
        ):
            out.append(pytest.param(op, p.values[0], marks=p.marks, id=f"{op}-{p.values[0]}"))
    return out


class _Case:
    """An op with its static inputs: ``run()`` is forward + backward, returns (out, grads)."""

    def __init__(self, op, backend, dtype=torch.float16):
        self.op, self.backend = op, backend
        dev = "cuda"
        self.x = make((4, 16, 10, 10), dtype, dev, "channels_last", requires_grad=True)
        self.w = (torch.randn(16, 16, 3, 3, device=dev, dtype=dtype) * 0.1).requires_grad_()
        self.b = torch.randn(16, device=dev, dtype=dtype, requires_grad=True)
        self.gamma = torch.rand(16, device=dev).add(0.5).requires_grad_()
        self.beta = torch.randn(16, device=dev, requires_grad=True)
        self.rm, self.rv = torch.zeros(16, device=dev), torch.ones(16, device=dev)
        self.s = make((4, 8, 20, 20), dtype, dev, "contiguous", requires_grad=True)  # option A shortcut
        self.g = torch.randn(4, 16, 10, 10, device=dev, dtype=dtype)

    def leaves(self):
        return {
            "conv2d": (self.x, self.w, self.b),
            "conv_bn_relu_train": (self.x, self.w, self.gamma, self.beta),
            "conv_bn_relu_eval": (self.x, self.w, self.gamma, self.beta),
            "local_response_norm": (self.x,),
            "residual_add": (self.x, self.s),
        }[self.op]

    def forward(self):
        be = self.backend
        if self.op == "conv2d":
            return F.conv2d(self.x, self.w, self.b, padding=1, activation="relu", backend=be)
        if self.op.startswith("conv_bn_relu"):
            return F.conv_bn_relu(
                self.x,
                self.w,
                None,
                self.rm,
                self.rv,
                self.gamma,
                self.beta,
                training=self.op.endswith("train"),
                padding=1,
                backend=be,
            )
        if self.op == "local_response_norm":
            return F.local_response_norm(self.x, 5, alpha=1e-2, k=2.0, backend=be)
        return F.residual_add(self.x, self.s, backend=be)

    def run(self):
        for t in self.leaves():
            t.grad = None
        out = self.forward()
        out.backward(self.g)
        return out, [t.grad for t in self.leaves()]

    def refill(self, seed):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        with torch.no_grad():
            for t in (*self.leaves(), self.g):
                t.copy_(torch.randn(t.shape, device="cuda", generator=gen, dtype=torch.float32).to(t.dtype))
            if self.op.startswith("conv_bn_relu"):
                self.gamma.abs_().add_(0.5)
                self.w.mul_(0.1)


@pytest.mark.parametrize("op,backend", _params())
def test_runs_on_the_current_stream(op, backend):
    """Inputs are written on a side stream behind a long sleep, then the op runs on that stream. A
    kernel launched on any other stream would read the inputs before they are written."""
    case = _Case(op, backend)
    case.refill(1)
    out, grads = case.run()  # eager on the default stream: the expected result
    want_out, want_grads = out.detach().clone(), [g.clone() for g in grads]
    sources = [t.detach().clone() for t in (*case.leaves(), case.g)]
    with torch.no_grad():
        for t in (*case.leaves(), case.g):
            t.zero_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time before the inputs are written
        with torch.no_grad():
            for t, src in zip((*case.leaves(), case.g), sources):
                t.copy_(src)
        out, grads = case.run()
        done = torch.cuda.Event()
        done.record(side)
    done.synchronize()
    torch.testing.assert_close(out, want_out, rtol=0, atol=0) if backend != "torch" else torch.testing.assert_close(
        out, want_out
    )
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("op,backend", _params())
def test_cuda_graph_capture_and_replay(op, backend):
    case = _Case(op, backend)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (autotuning, lazy init) outside the capture
        for _ in range(3):
            case.run()
    torch.cuda.current_stream().wait_stream(side)
    rm0, rv0 = case.rm.clone(), case.rv.clone()

    graph = torch.cuda.CUDAGraph()
    for t in case.leaves():
        t.grad = None
    with torch.cuda.graph(graph):
        static_out = case.forward()
        static_out.backward(case.g)
    static_grads = [t.grad for t in case.leaves()]

    for seed in (11, 12):
        case.refill(seed)
        case.rm.copy_(rm0)
        case.rv.copy_(rv0)
        graph.replay()
        torch.cuda.synchronize()
        got_out = static_out.detach().clone()
        got_grads = [g.clone() for g in static_grads]
        got_stats = (case.rm.clone(), case.rv.clone())
        case.rm.copy_(rm0)
        case.rv.copy_(rv0)
        want_out, want_grads = case.run()  # eager, same inputs
        torch.testing.assert_close(got_out, want_out.detach(), rtol=1e-3, atol=1e-3)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-3)
        if op == "conv_bn_relu_train":  # the in-place running-statistics update is replayed too
            torch.testing.assert_close(got_stats[0], case.rm)
            torch.testing.assert_close(got_stats[1], case.rv)


# ------------------------------------------------------------------------------------------------
# whole networks: a manual capture of the eval forward and of a training step, and
# torch.compile(mode="reduce-overhead") (which captures the compiled forward in a CUDA graph)
# ------------------------------------------------------------------------------------------------
NETWORKS = ("resnet18", "resnet50 option A", "alexnet (paper)", "vgg11-bn", "googlenet (paper)", "cifar resnet20")


def _network(name, backend):
    import cnnkern
    from benchmarks.host.check_capture import networks  # (the same list the CPU capture check runs)

    make, size = networks()[name]
    torch.manual_seed(0)
    model = make().cuda().half().to(memory_format=torch.channels_last)
    for m in model.modules():  # backend per layer: the network's own default is "auto"
        if hasattr(m, "backend"):
            m.backend = backend
    x = torch.randn(2, 3, size, size, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    return model, x, cnnkern


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name", NETWORKS)
def test_network_forward_and_training_step_capture(name, backend):
    model, x, cnnkern = _network(name, backend)
    if backend == "cuda" and not cnnkern._backend.has_extension():
        pytest.skip("cnnkern._C is not built")
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        model.eval()
        for _ in range(3):
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = model(static_x)
    for seed in (1, 2):
        static_x.copy_(torch.randn(static_x.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))
        graph.replay()
        with torch.no_grad():
            want = model(static_x)
        torch.testing.assert_close(static_out, want, rtol=2e-2, atol=2e-2)

    # a training step: forward and backward captured (the BatchNorm running statistics updated in it)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        out = model(static_x)
        out = out.logits if hasattr(out, "logits") else out
        return torch.autograd.grad(out.float().square().mean(), params)

    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_grads = step()
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.isfinite(g).all() for g in static_grads)


@pytest.mark.parametrize("name", ["resnet18", "googlenet (paper)"])
def test_network_reduce_overhead_compile(name):
    model, x, _ = _network(name, "triton")
    model.eval()
    compiled = torch.compile(model, mode="reduce-overhead")
    with torch.no_grad():
        want = model(x)
        for _ in range(3):
            got = compiled(x)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
