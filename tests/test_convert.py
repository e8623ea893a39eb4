"""cnnkern.convert on torchvision models and hand-made ones: parameters shared, state_dict keys
unchanged, conv-BN-ReLU chains and residual adds rewritten, same outputs in eval, same training
behaviour, and the module-swap fallback where torch.fx cannot trace."""

import copy

import pytest
import torch
from helpers import DEVICE, rel_err

import cnnkern
from cnnkern import nn as cnn
from cnnkern.convert import ResidualReLU

tv = pytest.importorskip("torchvision")

MODELS = {
    "resnet18": lambda: tv.models.resnet18(),
    "resnet50": lambda: tv.models.resnet50(),
    "vgg11_bn": lambda: tv.models.vgg11_bn(),
    "alexnet": lambda: tv.models.alexnet(),
    "googlenet": lambda: tv.models.googlenet(aux_logits=False, init_weights=True),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_eval_outputs_keys_and_shared_parameters(name):
    ref = MODELS[name]().double().eval()
    conv = cnnkern.convert(ref)
    assert list(conv.state_dict()) == list(ref.state_dict())
    assert all(a is b for a, b in zip(conv.parameters(), ref.parameters()))
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in ref.modules())
    fused = [m for m in conv.modules() if isinstance(m, cnn.FusedConv2d)]
    joins = sum(m.residual for m in fused)  # conv-BN + shortcut + ReLU in one layer
    assert len(fused) == n_convs  # every convolution rewritten, one fused layer each
    assert not any(
        n.op == "call_module" and isinstance(conv.get_submodule(n.target), torch.nn.Conv2d) for n in conv.graph.nodes
    )
    if name.startswith("resnet"):  # every block ends in its last conv-BN, the shortcut added in its kernel
        blocks = sum(len(getattr(ref, f"layer{i}")) for i in range(1, 5))
        assert joins == blocks and not any(isinstance(m, ResidualReLU) for m in conv.modules())
    else:
        assert joins == 0
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad(), cnnkern.use_backend("torch"):
        assert rel_err(conv(x), ref(x)) < 1e-12


def test_residual_join_falls_back_where_the_shortcut_does_not_fit():
    """relu(bn(conv(x)) + s) with an option-A shortcut s (subsampled, fewer channels): the fused
    layer cannot take it, so the join runs as cnnkern's residual add, with the same result."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
            self.bn = torch.nn.BatchNorm2d(8)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)) + x)

    ref = Block().double().eval()
    conv = cnnkern.convert(ref)
    assert sum(isinstance(m, cnn.FusedConv2d) and m.residual for m in conv.modules()) == 1
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad(), cnnkern.use_backend("torch"):
        want = torch.relu(ref.bn(ref.conv(x)) + cnnkern.reference.option_a_shortcut(x, 8, 2))
        assert rel_err(conv(x), want) < 1e-12


def test_training_behaviour_matches():
    ref = tv.models.resnet18().double().train()
    twin = copy.deepcopy(ref)
    conv = cnnkern.convert(twin)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with cnnkern.use_backend("torch"):
        a, b = conv(x), ref(x)
        a.square().mean().backward()
        b.square().mean().backward()
    assert rel_err(a, b) < 1e-12
    assert rel_err(twin.conv1.weight.grad, ref.conv1.weight.grad) < 1e-10
    assert rel_err(twin.layer4[1].bn2.running_var, ref.layer4[1].bn2.running_var) < 1e-12
    assert int(twin.bn1.num_batches_tracked) == int(ref.bn1.num_batches_tracked) == 1


@pytest.mark.slow
@pytest.mark.skipif(cnnkern._backend.unavailable_reason("triton", DEVICE) is not None, reason="Triton unavailable")
def test_converted_resnet18_on_triton():
    ref = tv.models.resnet18().double().eval().to(DEVICE)
    conv = cnnkern.convert(ref, backend="triton")
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        assert rel_err(conv(x), ref(x)) < 1e-10


def test_lrn_and_sequential_chains():
    ref = (
        torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.LocalResponseNorm(3),
            torch.nn.Conv2d(8, 8, 1),
            torch.nn.BatchNorm2d(8),
        )
        .double()
        .eval()
    )
    conv = cnnkern.convert(ref)
    assert isinstance(conv.get_submodule("2"), cnn.LocalResponseNorm)
    assert sum(isinstance(m, cnn.FusedConv2d) for m in conv.modules()) == 2
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad(), cnnkern.use_backend("torch"):
        assert rel_err(conv(x), ref(x)) < 1e-12
    assert isinstance(ref[2], torch.nn.LocalResponseNorm)  # the original is left as it was


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.body(x)
        if y.mean() > 100:  # data-dependent: torch.fx cannot trace this
            y = y * 0
        return self.head(y)


def test_fallback_swaps_modules_where_tracing_fails():
    ref = _DataDependent().double().eval()
    with pytest.warns(UserWarning, match="could not trace"):
        conv = cnnkern.convert(ref)
    assert conv is not ref and isinstance(conv.body, cnn.Sequential) and isinstance(conv.head, cnn.Conv2d)
    assert conv.body[0].weight is ref.body[0].weight
    assert list(conv.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad(), cnnkern.use_backend("torch"):
        assert rel_err(conv(x), ref(x)) < 1e-12
    same = cnnkern.convert(ref, inplace=True, trace=False)
    assert same is ref and isinstance(ref.body, cnn.Sequential)
