"""cnnkern._host (csrc/host/host.cpp), the C++ half of warm calls: keys and replays on the CPU.

What a replayed Triton launch passes is checked under the stand-in driver
(benchmarks/host/check_launches.py, tests/test_host_cost.py) and what replays compute on the CUDA
emulator and GPUs (tests/test_plan.py); here, the key's contents and a program's allocations,
views, op steps and errors, with plain CPU tensors.
"""

import pytest
import torch

from cnnkern.ops import _plan

host = _plan._host
pytestmark = pytest.mark.skipif(host is None, reason="cnnkern._host is not built")


def _cl(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).to(memory_format=torch.channels_last)


def test_key_tells_apart_what_a_plan_depends_on():
    x = _cl(2, 8, 5, 5)
    key = host.tensors_key(x, None)
    assert key == host.tensors_key(_cl(2, 8, 5, 5), None)  # another tensor, the same description
    others = [
        (_cl(2, 8, 5, 6), None),  # shape
        (x.contiguous(), None),  # strides
        (_cl(2, 8, 5, 5, dtype=torch.float64), None),  # dtype
        (x.detach().requires_grad_(), None),  # requires_grad
        (torch.nn.Parameter(x, requires_grad=False), None),  # class
        (None, x),  # which argument is None
        (x,),  # how many arguments
    ]
    for args in others:
        assert host.tensors_key(*args) != key, args
    with torch.no_grad():  # the global state
        assert host.tensors_key(x, None) != key
    assert host.tensors_key(torch.empty(3, device="meta")) != host.tensors_key(torch.empty(3))
    base = torch.randn(401)  # 16-byte alignment: the same shape and strides, 4 bytes apart
    assert host.tensors_key(base[:400].view(2, 8, 5, 5)) != host.tensors_key(base[1:].view(2, 8, 5, 5))


@pytest.mark.parametrize("arg", [3, "x", torch.Size([2])])
def test_key_refuses_other_objects(arg):
    with pytest.raises(TypeError):
        host.tensors_key(arg)


def test_key_refuses_tensor_subclasses_as_the_python_key_does(monkeypatch):
    class Sub(torch.Tensor):
        pass

    t = torch.ones(2).as_subclass(Sub)
    with pytest.raises(TypeError):
        host.tensors_key(t)
    monkeypatch.setattr(_plan, "_host", None)
    with pytest.raises(TypeError):
        _plan.tensors_key(t)


def test_program_allocates_views_and_calls_its_ops():
    x = torch.randn(4, 6)
    allocs = (
        ((2, 3, 4), (12, 1, 3), torch.float32, torch.device("cpu"), False),
        ((5,), (1,), torch.float64, torch.device("cpu"), True),
    )
    views = ((2, (3, 2), (1, 3), 4),)  # a view of the first allocation (pool place 2), 4 elements in
    # an op step: torch.add(pool[0], pool[0]) appended to the pool
    steps = ((2, torch.add, ((True, 0), (True, 0)), 1),)
    run = host.bind(host.Program(allocs, views, steps))
    pool = run((x, None), None)
    assert len(pool) == 6 and pool[0] is x and pool[1] is None
    assert pool[2].shape == (2, 3, 4) and pool[2].stride() == (12, 1, 3) and pool[2].dtype == torch.float32
    assert pool[3].dtype == torch.float64 and torch.equal(pool[3], torch.zeros(5, dtype=torch.float64))
    assert pool[4].data_ptr() == pool[2].data_ptr() + 4 * 4 and pool[4].stride() == (1, 3)
    assert torch.equal(pool[5], 2 * x)
    again = run((x, None), None)
    assert again[2].data_ptr() != pool[2].data_ptr()  # every run allocates its own


def test_program_errors_are_python_errors():
    run = host.bind(host.Program((), (), ((2, lambda t: 7, ((True, 0),), 1),)))
    with pytest.raises(TypeError, match="tensors, floats or None"):
        run((3,), None)
    with pytest.raises(TypeError, match="other than tensors"):
        run((torch.ones(1),), None)
    failing = host.bind(host.Program((), (), ((2, lambda t: 1 / 0, ((True, 0),), 1),)))
    with pytest.raises(ZeroDivisionError):
        failing((torch.ones(1),), None)
    with pytest.raises(TypeError):
        host.bind(3)


def test_program_passes_a_calls_scalars_as_they_are():
    """A float among a program's inputs (a call's scalar, e.g. a momentum) reaches the launches
    and op calls that use it as the float itself, a tensor as its device address or itself."""
    seen = []
    x = torch.arange(4.0)
    steps = (
        (1, lambda *a: seen.append(a), (1, 2, 3, "fn", "meta", None, None, None), (0, 1), ("tail",), None),
        (2, lambda t, s: t * s, ((True, 0), (True, 1)), 1),
    )
    run = host.bind(host.Program((), (), steps))
    for momentum in (0.25, 0.5):
        pool = run((x, momentum), 7)
        assert seen[-1] == (1, 2, 3, 7, "fn", "meta", None, None, None, x.data_ptr(), momentum, "tail")
        assert pool[1] is momentum and torch.equal(pool[2], x * momentum)


def test_program_bumps_the_versions_of_its_dirty_inputs():
    """Inputs a program's work writes in place (running statistics) have their versions bumped on
    every run, as PyTorch's in-place ops bump them; a tensor made in inference mode has none."""
    x, y = torch.zeros(3), torch.zeros(3)
    run = host.bind(host.Program((), (), (), (0,)))
    before = (x._version, y._version)
    run((x, y), None)
    run((x, y), None)
    assert (x._version, y._version) == (before[0] + 2, before[1])
    with torch.inference_mode():
        z = torch.zeros(3)
    run((z, y), None)  # (no version to bump, and no error)


def _fake_plan(types, sig, metadata=(4, 1, 1024), coop=False, pdl=False):
    from types import SimpleNamespace

    return SimpleNamespace(types=types, metadata=metadata, function=0x1234, flags=(coop, pdl), codes=sig)


def test_native_launch_packs_parameters_as_tritons_launcher():
    """A replayed Triton launch made in C++ gets its parameters packed here as Triton's C launcher
    packs them: 8 bytes a parameter, each scalar in its type's bytes, constexprs left out, the two
    scratch pointers null at the end; the tensors and the call's floats patched in on each run.
    The same for Triton 3.6's generated launcher (no extractor codes to match).
    (benchmarks/host/check_launches.py compares whole launches with Triton's under the stand-in.)"""
    import struct

    types = ("*fp32", "fp64", "i32", "constexpr", "fp32", "i64", "*fp32", "i1", "u8")
    sig = [1, 13, 4, 12, 5, 1, 4, 6]
    plan = _fake_plan(types, sig)
    tail = (-3, 1, 0.5, 2**40 + 5, None, True, 300)
    native = _plan._native(plan, (7, 2, 1), (0, 1), tail, {1})
    slots = [
        bytes(8),  # the tensor: patched
        bytes(8),  # the call's float: patched
        (2**32 - 3).to_bytes(4, "little"),
        struct.pack("<f", 0.5),
        (2**40 + 5).to_bytes(8, "little"),
        bytes(8),  # a null pointer
        (1).to_bytes(4, "little"),
        (300 & 255).to_bytes(1, "little"),
        bytes(8),
        bytes(8),  # Triton's scratch pointers
    ]
    assert native == (0x1234, 7, 2, 1, 128, 1024, b"".join(s.ljust(8, b"\0") for s in slots), ((0, 0, 0), (1, 1, 2)))
    assert _plan._native(_fake_plan(types, None), (7, 2, 1), (0, 1), tail, {1}) == native  # (Triton 3.6)
    # what Triton's launcher must launch itself
    assert _plan._native(_fake_plan(types, sig, metadata=(4, 2, 1024)), (7, 2, 1), (0, 1), tail, {1}) is None
    assert _plan._native(_fake_plan(types, sig, pdl=True), (7, 2, 1), (0, 1), tail, {1}) is None
    assert _plan._native(_fake_plan(types, sig[:-1] + [8]), (7, 2, 1), (0, 1), tail, {1}) is None
    half = ("*fp16", "fp16")
    assert _plan._native(_fake_plan(half, [1, 10]), (1, 1, 1), (0,), (1.0,), set()) is None
    assert _plan._native(plan, (7, 2, 1), (0, 1), tail, {0, 1}) is None  # a float where a pointer goes
    assert _plan._native(_fake_plan(None, sig), (7, 2, 1), (0, 1), tail, {1}) is None
    assert _plan._native(_fake_plan(types, sig, metadata=(4, 1)), (7, 2, 1), (0, 1), tail, {1}) is None


def test_program_returns_the_inputs_and_the_places_it_keeps():
    """A program made with ``keep`` returns its inputs and the tensors at those places (a plan's
    outputs), None elsewhere: its workspaces are freed without a Python object made for each."""
    x = torch.randn(3)
    allocs = (((3,), (1,), torch.float32, torch.device("cpu"), True),) * 2
    steps = ((2, torch.add, ((True, 0), (True, 1)), 1),)
    pool = host.bind(host.Program(allocs, (), steps, (), (3,)))((x,), None)
    assert pool[0] is x and pool[1] is None and pool[2] is None and torch.equal(pool[3], x)
    every = host.bind(host.Program(allocs, (), steps, (), None))((x,), None)
    assert all(isinstance(t, torch.Tensor) for t in every) and len(every) == 4
