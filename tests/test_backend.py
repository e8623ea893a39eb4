"""Backend selection: names, defaults, the env var, set_backend/use_backend, "auto" routing and the
errors for unavailable backends."""

import pytest
import torch
from helpers import HAS_CUDA, make

import cnnkern
from cnnkern import _backend
from cnnkern import functional as F


def test_available_backends_here():
    names = cnnkern.available_backends()
    assert names[0] == "torch"
    assert set(names) <= {"torch", "triton", "cuda"}
    # the test harness turns the interpreter on without a GPU, so Triton always runs here
    assert "triton" in names
    assert ("cuda" in names) == (HAS_CUDA and _backend.has_extension())


def test_default_is_auto_and_env_var(monkeypatch):
    monkeypatch.delenv("CNNKERN_BACKEND", raising=False)
    assert cnnkern.get_backend() == "auto"
    monkeypatch.setenv("CNNKERN_BACKEND", "torch")
    assert cnnkern.get_backend() == "torch"
    monkeypatch.setenv("CNNKERN_BACKEND", "tpu")
    with pytest.raises(ValueError, match="CNNKERN_BACKEND: unknown backend 'tpu'"):
        cnnkern.get_backend()


def test_set_backend_and_nested_use_backend(monkeypatch):
    monkeypatch.setenv("CNNKERN_BACKEND", "torch")
    cnnkern.set_backend("triton")  # overrides the env var
    assert cnnkern.get_backend() == "triton"
    with cnnkern.use_backend("torch"):
        assert cnnkern.get_backend() == "torch"
        with cnnkern.use_backend("auto"):
            assert cnnkern.get_backend() == "auto"
        assert cnnkern.get_backend() == "torch"
    assert cnnkern.get_backend() == "triton"
    with pytest.raises(ValueError, match="set_backend: unknown backend 'fast'"):
        cnnkern.set_backend("fast")
    with pytest.raises(ValueError, match="use_backend: unknown backend None"):
        with cnnkern.use_backend(None):
            pass


def test_use_backend_restores_after_an_exception():
    with pytest.raises(RuntimeError):
        with cnnkern.use_backend("torch"):
            raise RuntimeError("boom")
    assert cnnkern.get_backend() == "auto"


def test_auto_routes_cpu_tensors_to_torch():
    assert _backend.resolve("residual_add", "auto", torch.device("cpu")) == "torch"
    assert _backend.resolve("residual_add", None, torch.device("cpu")) == "torch"


def test_auto_on_cuda_prefers_the_op_order_and_never_raises(monkeypatch):
    dev = torch.device("cuda")
    monkeypatch.setattr(_backend, "unavailable_reason", lambda name, device=None: None)
    assert _backend.resolve("residual_add", "auto", dev) == _backend.AUTO_ORDER["residual_add"][0]
    monkeypatch.setattr(
        _backend, "unavailable_reason", lambda name, device=None: None if name in ("triton", "torch") else "absent"
    )
    assert _backend.resolve("residual_add", "auto", dev) == "triton"  # Triton when the extension is absent
    monkeypatch.setattr(_backend, "unavailable_reason", lambda name, device=None: None if name == "torch" else "absent")
    assert _backend.resolve("residual_add", "auto", dev) == "torch"


def test_backend_keyword_beats_the_default(monkeypatch):
    calls = []
    real = cnnkern.reference.residual_add
    monkeypatch.setattr(cnnkern.reference, "residual_add", lambda *a: calls.append(a) or real(*a))
    x = make((1, 2, 2, 2), torch.float32, "cpu")
    with cnnkern.use_backend("torch"):
        F.residual_add(x, x)
        assert len(calls) == 1
        F.residual_add(x, x, backend="triton")
        assert len(calls) == 1  # went to the Triton op, not the reference


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    import cnnkern.kernels

    monkeypatch.setattr(cnnkern.kernels, "INTERPRET", False)
    with pytest.raises(cnnkern.BackendUnavailableError) as info:
        F.residual_add(torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2), backend="triton")
    assert "TRITON_INTERPRET=1" in str(info.value)
    # auto never raises for availability: CPU tensors go to the reference
    out = F.residual_add(torch.ones(1, 2, 2, 2), torch.ones(1, 2, 2, 2))
    assert torch.equal(out, torch.full((1, 2, 2, 2), 2.0))


def test_missing_extension_message_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_backend, "_C", None)
    monkeypatch.setattr(_backend, "_C_ERROR", "cnnkern._C is not built (...). Build it with a CUDA toolkit: ...")
    reason = _backend.unavailable_reason("cuda", "cuda")
    assert "not built" in reason and "Build it" in reason
    assert "cuda" not in cnnkern.available_backends()


# ------------------------------------------------------------------------------------------------
# one route: every call that is not replayed from a plan goes through the registered ops
# ------------------------------------------------------------------------------------------------
def _conv_and_grads(x, w, b):
    out = F.conv2d(x, w, b, padding=1, activation="relu", backend="triton")
    return (out, *torch.autograd.grad(out, (x, w, b), torch.ones_like(out)))


def test_calls_go_through_the_registered_ops():
    from torch.utils._python_dispatch import TorchDispatchMode

    device = torch.device("cuda" if HAS_CUDA else "cpu")
    x = make((2, 4, 5, 5), torch.float32, device, "channels_last", requires_grad=True)
    w = make((6, 4, 3, 3), torch.float32, device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    plain = _conv_and_grads(x, w, b)

    class Record(TorchDispatchMode):  # a dispatch mode sees the ops (and no plan replays under it)
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record() as rec:
        via_mode = _conv_and_grads(x, w, b)
    assert any("cnnkern.conv2d." in op for op in rec.ops), rec.ops
    assert any("cnnkern.conv2d_backward_input" in op for op in rec.ops), rec.ops
    assert any("cnnkern.conv2d_backward_weight" in op for op in rec.ops), rec.ops
    for a, o in zip(plain, via_mode):
        assert torch.equal(a, o)


def test_double_backward_goes_through_the_ops():
    # residual_add's backward is differentiable (its backward ops carry formulas): with
    # create_graph the backward calls the ops, so the second derivative exists.
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    x = make((1, 3, 4, 4), torch.float64, device, requires_grad=True)
    s = make((1, 3, 4, 4), torch.float64, device, requires_grad=True)
    out = F.residual_add(x, s, relu=True, backend="triton")
    (gx,) = torch.autograd.grad(out, x, torch.ones_like(out), create_graph=True)
    assert gx.requires_grad
    torch.autograd.grad(gx.sum(), s, allow_unused=True)
