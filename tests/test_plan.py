"""Plans (cnnkern/ops/_plan.py): warm calls replayed from the recorded work of a first call give
the same results as the route, forward and backward, and calls a plan cannot replay are not planned.

Replays compute only where kernels really run: on a GPU (both backends), and on the CPU emulator
of the CUDA C++ kernels (backend "cuda", CNNKERN_EMULATE_CUDA=1). Under Triton's interpreter
nothing is planned (the launches are not direct); benchmarks/host/check_launches.py checks the
Triton replays' launch arguments under the stand-in driver (tests/test_host_cost.py).
"""

import copy

import pytest
import torch
from conftest import EMULATE_CUDA, HAS_CUDA
from helpers import rel_err

from cnnkern import functional as F
from cnnkern.ops import _common, _plan

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
BACKENDS = ["triton", "cuda"] if HAS_CUDA else ["cuda"] if EMULATE_CUDA else []
TOL = 5e-3 if HAS_CUDA else 1e-5  # (fp32 convolutions multiply in TF32 on a GPU, as PyTorch's do)
pytestmark = pytest.mark.skipif(not BACKENDS, reason="plans replay compiled kernels: a GPU or the CUDA emulator")


@pytest.fixture(params=["C++", "Python"])
def planning(monkeypatch, request):
    """Plans on (the tests' NaN-poisoned outputs turn them off), starting from none; keys and
    replays in C++ (cnnkern._host) or in Python (its stand-in where it is not built)."""
    if request.param == "C++" and _plan._host is None:
        pytest.skip("cnnkern._host is not built")
    if request.param == "Python":
        monkeypatch.setattr(_plan, "_host", None)
    monkeypatch.setattr(_common, "_POISON", False)
    monkeypatch.setattr(_plan, "PLANS", {})
    return _plan


def _t(*shape, dtype=torch.float32, cl=True, grad=False):
    t = torch.randn(*shape, dtype=dtype, device=DEVICE)
    if cl and t.dim() == 4:
        t = t.to(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


def _f64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


CASES = {
    "conv bias relu": (
        lambda a, b: F.conv2d(*a, padding=1, activation="relu", backend=b),
        lambda a: F.conv2d(*a, padding=1, activation="relu", backend="torch"),
        lambda g: (_t(2, 8, 6, 6, grad=g), _t(12, 8, 3, 3, grad=g) * 0.2, _t(12, grad=g, cl=False)),
    ),
    "conv 1x1 residual relu": (
        lambda a, b: F.conv2d(*a[:2], activation="relu", residual=a[2], backend=b),
        lambda a: F.conv2d(*a[:2], activation="relu", residual=a[2], backend="torch"),
        lambda g: (_t(2, 8, 5, 5, grad=g), _t(12, 8, 1, 1, grad=g) * 0.3, _t(2, 12, 5, 5, grad=g)),
    ),
    "conv stride 2 groups": (
        lambda a, b: F.conv2d(*a, stride=2, padding=1, groups=2, backend=b),
        lambda a: F.conv2d(*a, stride=2, padding=1, groups=2, backend="torch"),
        lambda g: (_t(2, 8, 7, 7, grad=g, cl=False), _t(6, 4, 3, 3, grad=g, cl=False)),
    ),
    "residual add": (
        lambda a, b: F.residual_add(*a, backend=b),
        lambda a: F.residual_add(*a, backend="torch"),
        lambda g: (_t(2, 8, 4, 4, grad=g), _t(2, 8, 4, 4, grad=g)),
    ),
    "residual add option A": (
        lambda a, b: F.residual_add(*a, relu=False, backend=b),
        lambda a: F.residual_add(*a, relu=False, backend="torch"),
        lambda g: (_t(2, 8, 4, 4, grad=g), _t(2, 4, 8, 8, grad=g)),
    ),
    "local response norm": (
        lambda a, b: F.local_response_norm(*a, 5, 1e-2, 0.75, 2.0, backend=b),
        lambda a: F.local_response_norm(*a, 5, 1e-2, 0.75, 2.0, backend="torch"),
        lambda g: (_t(2, 9, 5, 5, grad=g),),
    ),
}


@pytest.mark.gpu
@pytest.mark.emulated
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("case", list(CASES))
def test_replayed_calls_match_the_reference(planning, case, grad, backend):
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend!r} does not run compiled kernels here")
    call, ref, make = CASES[case]
    kinds = []
    for _ in range(5):  # new tensors of the same metadata each time: one call key
        args = make(grad)
        y = call(args, backend)
        args64 = [_f64(a) for a in args]
        want = ref(args64)
        assert rel_err(y, want) < TOL
        kinds.append(type(y.grad_fn).__name__ if grad else "")
        if grad:
            g = torch.randn_like(y)
            got = torch.autograd.grad(y, args, g)
            for a, e in zip(got, torch.autograd.grad(want, args64, g.double())):
                assert rel_err(a, e) < TOL
    plans = [p for p in planning.PLANS.values() if p is not None]
    assert len(plans) == 1, planning.PLANS
    if grad:
        assert isinstance(plans[0], _plan.GradPlan) and plans[0].bwd, "the backward was not planned"
        assert kinds[-1] == "_ReplayedBackward", kinds
    else:
        assert isinstance(plans[0], _plan.OpPlan)


@pytest.mark.gpu
@pytest.mark.emulated
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_folded_batchnorm_follows_its_tensors(planning, backend):
    """conv_bn_relu in eval keeps BatchNorm folded into the weights while the tensors it was folded
    from are the same and unchanged: an in-place update, or other tensors, fold again."""
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend!r} does not run compiled kernels here")
    w = _t(12, 8, 3, 3) * 0.2
    bn = [
        torch.randn(12, device=DEVICE),
        torch.rand(12, device=DEVICE) + 0.5,
        torch.randn(12, device=DEVICE),
        torch.randn(12, device=DEVICE),
    ]

    def call(x, w, bn):
        return F.conv_bn_relu(x, w, None, *bn, training=False, padding=1, backend=backend)

    def check(x, w, bn):
        y = call(x, w, bn)
        want = F.conv_bn_relu(_f64(x), _f64(w), None, *map(_f64, bn), training=False, padding=1, backend="torch")
        assert rel_err(y, want) < TOL

    for change in (None, None, "running_var", None, "other tensors", None, "weight", None):
        if change == "running_var":
            bn[1].mul_(2.0)  # in place
        elif change == "other tensors":
            bn = [t.clone() for t in bn]
            bn[2].add_(1.0)
        elif change == "weight":
            w = w.clone().neg_()
        check(_t(2, 8, 6, 6), w, bn)

    def plans_of(w):  # (a plan per layer: the key holds the weight's id)
        return [p for p in planning.PLANS.values() if p is not None and p.refs[0]() is w]

    plans = plans_of(w)
    assert len(plans) == 1 and isinstance(plans[0], _plan.FoldPlan)
    assert plans[0].refs[4]() is bn[2] and plans[0].used

    # another input shape: a plan of its own, the same folded weights (one copy per layer)
    for _ in range(2):
        check(_t(3, 8, 5, 5), w, bn)
    plans = plans_of(w)
    assert len(plans) == 2 and plans[0].weight is plans[1].weight and plans[0].bias is plans[1].bias

    # tensors that change on every call: the key is left unplanned after its plan went unused
    for _ in range(3):
        check(_t(2, 8, 6, 6), w, [t.clone() for t in bn])
    tensors = _plan.tensors_key(_t(2, 8, 6, 6), w)  # (the key's part of an input of that shape)
    assert [
        plan
        for key, plan in planning.PLANS.items()
        if key[0] == "conv_bn_relu" and key[-1] == backend and key[1] == tensors and key[2] == id(w)
    ] == [None]


@pytest.mark.gpu
@pytest.mark.emulated
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_folded_batchnorm_sees_the_training_updates(planning, backend):
    """A layer alternating between training steps that change only its running statistics (a
    frozen layer, BatchNorm recalibration) and eval calls: each eval call folds the statistics
    the training steps left, replayed or not."""
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend!r} does not run compiled kernels here")
    from cnnkern import nn as cnn

    layer = cnn.ConvBNReLU2d(8, 12, 3, padding=1, backend=backend).to(DEVICE, memory_format=torch.channels_last)
    ref = copy.deepcopy(torch.nn.Sequential(layer.conv, layer.bn, torch.nn.ReLU())).double()
    with torch.no_grad():
        for _ in range(4):
            for mode in (False, True, True, True):
                layer.train(mode), ref.train(mode)
                x = _t(2, 8, 6, 6)
                y, want = layer(x), ref(x.double())
                assert rel_err(y, want) < TOL, mode
                assert rel_err(layer.bn.running_mean, ref[1].running_mean) < TOL


@pytest.mark.gpu
@pytest.mark.emulated
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
def test_replayed_training_steps_match_the_reference(planning, backend, grad):
    """conv_bn_relu in training, replayed: output, gradients, and the running statistics, which
    are updated after the replay with each call's momentum (cnnkern.nn's momentum=None changes it
    on every call)."""
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend!r} does not run compiled kernels here")
    k = 12
    w, gamma, beta = _t(k, 8, 3, 3, grad=grad) * 0.2, torch.rand(k, device=DEVICE) + 0.5, torch.randn(k, device=DEVICE)
    gamma.requires_grad_(grad)
    stats = [torch.zeros(k, device=DEVICE), torch.ones(k, device=DEVICE)]
    stats64 = [t.double() for t in stats]
    kinds = []
    for step in range(5):
        momentum = 1.0 / (step + 1)
        x = _t(2, 8, 6, 6, grad=grad)
        versions = [t._version for t in stats]
        y = F.conv_bn_relu(
            x, w, None, *stats, gamma, beta, training=True, momentum=momentum, padding=1, backend=backend
        )
        # updated in place, as PyTorch's in-place ops update: each version bumped, replayed or not
        assert all(t._version > v for t, v in zip(stats, versions)), step
        args64 = [_f64(t) for t in (x, w, gamma, beta)]
        want = F.conv_bn_relu(
            args64[0],
            args64[1],
            None,
            *stats64,
            args64[2],
            args64[3],
            training=True,
            momentum=momentum,
            padding=1,
            backend="torch",
        )
        assert rel_err(y, want) < TOL
        for got, exp in zip(stats, stats64):
            assert rel_err(got, exp) < TOL
        kinds.append(type(y.grad_fn).__name__ if grad else "")
        if grad:
            g = torch.randn_like(y)
            got = torch.autograd.grad(y, (x, w, gamma), g)
            exp = torch.autograd.grad(want, args64[:3], g.double())
            for a, e in zip(got, exp):
                assert rel_err(a, e) < TOL
    plans = {key[0]: p for key, p in planning.PLANS.items() if p is not None}
    assert set(plans) == {"conv_bn_relu_train"}
    train = plans["conv_bn_relu_train"]
    if grad:
        assert isinstance(train, _plan.GradPlan) and train.bwd and kinds[-1] == "_ReplayedBackward", kinds
        replay = train.fwd
    else:
        assert isinstance(train, _plan.OpPlan)
        replay = train.replay
    # the update replayed in the same plan, the last step, with each call's momentum (the
    # statistics above match): the statistics' places are the plan's dirty inputs
    last = replay.steps[-1]
    assert (last[0] == 2) == (backend == "cuda") and len(replay.dirty) == 2  # (the backend's update)
    update_places = last[3] if last[0] != 2 else [v for is_place, v in last[2] if is_place]
    assert set(replay.dirty) <= set(update_places)
