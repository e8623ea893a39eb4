"""The networks: every factory builds, shapes and parameter counts match the seed and torchvision,
torchvision's state_dicts load with strict=True and give the same outputs (eval, float64, "torch"
backend), and a training-mode forward + backward on the Triton kernels (interpreter on CPU) matches
the "torch" backend."""

import copy

import pytest
import torch
from helpers import DEVICE, randomise_bn, rel_err

import cnnkern
from cnnkern import models as M
from cnnkern.models.resnet import BasicBlock, Bottleneck

tv = pytest.importorskip("torchvision")


TORCHVISION_PAIRS = {
    "alexnet": (lambda: M.alexnet(variant="torchvision"), lambda: tv.models.alexnet()),
    "resnet18": (lambda: M.resnet18(), lambda: tv.models.resnet18()),
    "resnet34": (lambda: M.resnet34(), lambda: tv.models.resnet34()),
    "resnet50": (lambda: M.resnet50(), lambda: tv.models.resnet50()),
    "resnet101": (lambda: M.resnet101(), lambda: tv.models.resnet101()),
    "resnet152": (lambda: M.resnet152(), lambda: tv.models.resnet152()),
    "resnet50_paper": (lambda: M.resnet50(variant="paper"), None),  # same names, stride moved
    "vgg11": (lambda: M.vgg11(), lambda: tv.models.vgg11()),
    "vgg13_bn": (lambda: M.vgg13(batch_norm=True), lambda: tv.models.vgg13_bn()),
    "vgg16": (lambda: M.vgg16(), lambda: tv.models.vgg16()),
    "vgg16_bn": (lambda: M.vgg16(batch_norm=True), lambda: tv.models.vgg16_bn()),
    "vgg19_bn": (lambda: M.vgg19(batch_norm=True), lambda: tv.models.vgg19_bn()),
    "googlenet": (
        lambda: M.googlenet(),
        lambda: tv.models.GoogLeNet(aux_logits=False, transform_input=False, init_weights=True),
    ),
    "googlenet_aux": (
        lambda: M.googlenet(aux_logits=True),
        lambda: tv.models.GoogLeNet(aux_logits=True, transform_input=False, init_weights=True),
    ),
}


@pytest.mark.parametrize("name", [n for n, (_, t) in TORCHVISION_PAIRS.items() if t is not None])
def test_torchvision_state_dict_and_outputs(name):
    make_ours, make_tv = TORCHVISION_PAIRS[name]
    ours, ref = make_ours(), make_tv()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    randomise_bn(ref, ours)
    ours.double().eval()
    ref.double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with cnnkern.use_backend("torch"), torch.no_grad():
        assert rel_err(ours(x), ref(x)) < 1e-12


def test_torchvision_resnet50_loads_into_the_paper_variant():
    ours = M.resnet50(variant="paper")
    ours.load_state_dict(tv.models.resnet50().state_dict(), strict=True)
    # the stride sits on the first 1x1 of each downsampling bottleneck instead of its 3x3
    assert ours.layer2[0].conv1.stride == (2, 2) and ours.layer2[0].conv2.stride == (1, 1)
    assert M.resnet50().layer2[0].conv2.stride == (2, 2)


def _stage_shapes(model, x):
    shapes = {}
    hooks = [
        getattr(model, n).register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape)))
        for n in ("maxpool", "layer1", "layer2", "layer3", "layer4")
    ]
    with cnnkern.use_backend("torch"), torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    return shapes, out


@pytest.mark.parametrize("factory", [M.resnet18, M.resnet34, M.resnet50, M.plain18, M.plain34])
def test_resnet_stage_sizes_match_the_seed_table(factory):
    # conv1 112x112, conv2_x 56x56, conv3_x 28x28, conv4_x 14x14, conv5_x 7x7
    model = factory().eval()
    shapes, out = _stage_shapes(model, torch.randn(1, 3, 224, 224))
    assert [s[-1] for s in shapes.values()] == [56, 56, 28, 14, 7]
    assert out.shape == (1, 1000)


def test_shortcut_options():
    a, b, c = (M.resnet34(shortcut=s) for s in "ABC")
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(a) < n(b) < n(c)  # A is parameter-free; C projects in every block
    assert not any("downsample" in k for k in a.state_dict())
    assert all(blk.downsample is not None for stage in (c.layer1, c.layer4) for blk in stage)
    assert sum(blk.downsample is not None for s in (b.layer1, b.layer2, b.layer3, b.layer4) for blk in s) == 3
    plain = M.plain34()
    assert not any("downsample" in k for k in plain.state_dict())
    with pytest.raises(ValueError, match="shortcut must be 'A', 'B', 'C' or None"):
        M.resnet18(shortcut="D")


def test_blocks_add_their_shortcut_in_their_last_fused_layer(monkeypatch):
    """A shortcut of the block output's shape (identity, projection) goes into the last conv-BN
    layer's kernel; only option A's subsampled, zero-padded shortcuts take the residual add."""
    calls = []
    real = cnnkern.nn.ResidualAdd.forward
    monkeypatch.setattr(
        cnnkern.nn.ResidualAdd, "forward", lambda self, x, s: calls.append(tuple(s.shape)) or real(self, x, s)
    )
    with torch.no_grad(), cnnkern.use_backend("torch"):
        for net in (M.resnet18(num_classes=10), M.resnet50(num_classes=10), M.resnet18(num_classes=10, shortcut="C")):
            net.eval()(torch.randn(1, 3, 32, 32))
        assert calls == []
        M.cifar_resnet(20).eval()(torch.randn(1, 3, 32, 32))
        M.resnet18(num_classes=10, shortcut="A").eval()(torch.randn(1, 3, 32, 32))
    # the stage entries: CIFAR ResNet-20's two, ResNet-18's three
    assert calls == [(1, 16, 32, 32), (1, 32, 16, 16), (1, 64, 8, 8), (1, 128, 4, 4), (1, 256, 2, 2)]


@pytest.mark.parametrize("depth,params_m", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7)])
def test_cifar_networks_match_the_paper(depth, params_m):
    # He et al., Table 6: ResNet-20/32/44/56/110 have 0.27M/0.46M/0.66M/0.85M/1.7M parameters
    model = M.cifar_resnet(depth).eval()
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - params_m) / params_m < 0.03
    assert sum(p.numel() for p in M.cifar_plain(depth).parameters()) == sum(p.numel() for p in model.parameters())
    with cnnkern.use_backend("torch"), torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="depth must be one of"):
        M.cifar_resnet(18)


def test_vgg16_matches_the_seed_parameter_table():
    model = M.vgg16()
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    want = [1728, 36864, 73728, 147456, 294912, 589824, 589824, 1179648, 2359296, 2359296, 2359296, 2359296, 2359296]
    assert [c.weight.numel() for c in convs] == want
    fcs = [m.weight.numel() for m in model.classifier if isinstance(m, torch.nn.Linear)]
    assert fcs == [102760448, 16777216, 4096000]
    assert sum(want) + sum(fcs) == 138344128  # the seed's total, not counting biases


def test_googlenet_variants():
    paper = M.googlenet(variant="paper")
    assert paper.inception3a.branch3[1].conv.kernel_size == (5, 5)
    assert M.googlenet().inception3a.branch3[1].conv.kernel_size == (3, 3)  # torchvision's variant
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in paper.modules())
    paper.eval()
    with cnnkern.use_backend("torch"), torch.no_grad():
        assert paper(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    aux = M.googlenet(aux_logits=True).train()
    with cnnkern.use_backend("torch"):
        out = aux(torch.randn(2, 3, 96, 96))
    assert isinstance(out, M.GoogLeNetOutputs) and out.aux_logits1.shape == (2, 1000)


# ------------------------------------------------------------------------------------------------
# the networks on the Triton kernels (and the CUDA C++ ones where they can run: a GPU, or the
# emulator), training mode, forward + backward, against the torch backend
# ------------------------------------------------------------------------------------------------
# As small as each architecture allows (training BatchNorm needs > 1 value per channel). The
# ResNets and VGG keep every kind of layer of their family (each block type, shortcut and stage
# width) with fewer repeats: [2, 1, 1, 1] blocks per stage (two in the first stage, for an
# identity shortcut) and VGG-11 for VGG-16. On a GPU the full networks run in the capture tests
# (tests/test_cuda_graphs.py) and the network benchmarks.
SMALL = {
    "alexnet_paper": (M.alexnet, (1, 3, 67, 67)),  # LRN with the paper's constants; 67: POOL3 still 1x1; no BN
    "cifar_resnet_211": (  # option A shortcuts
        lambda: M.ResNet(BasicBlock, [2, 1, 1], 10, "A", "paper", stem="cifar"),
        (2, 3, 16, 16),
    ),
    "resnet_basic_2111": (lambda: M.ResNet(BasicBlock, [2, 1, 1, 1]), (2, 3, 32, 32)),  # ResNet-18's blocks
    "resnet_bottleneck_2111": (lambda: M.ResNet(Bottleneck, [2, 1, 1, 1]), (2, 3, 32, 32)),  # ResNet-50's
    "vgg11_bn": (lambda: M.vgg11(batch_norm=True), (1, 3, 32, 32)),  # its last BatchNorm sees 2x2
    "googlenet": (M.googlenet, (2, 3, 32, 32)),
}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name", list(SMALL))
def test_network_on_kernels_matches_torch_backend(name, backend):
    if cnnkern._backend.unavailable_reason(backend, DEVICE) is not None:  # "cuda" on CPU: only the emulator
        pytest.skip(cnnkern._backend.unavailable_reason(backend, DEVICE))
    # float64 (the interpreter runs it): in fp32, training-mode BatchNorm with two images amplifies
    # rounding through twenty-odd layers far beyond any per-op tolerance; in fp64 the two backends
    # agree to ~1e-14, so the comparison can be tight.
    factory, shape = SMALL[name]
    torch.manual_seed(0)
    ref = factory().to(DEVICE, torch.float64).train()
    for m in ref.modules():  # keep dropout out of the comparison
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ours = copy.deepcopy(ref)
    x = torch.randn(shape, device=DEVICE, dtype=torch.float64)
    outs, grads = [], []
    for model, name_ in ((ref, "torch"), (ours, backend)):
        with cnnkern.use_backend(name_):
            y = model(x)
            y.square().mean().backward()
        outs.append(y.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    # fp64 rounding amplified by the conditioning of deep training-mode BatchNorm nets: with two
    # images, the last stages normalise over a handful of values (ResNet-50 at 32x32: 2 per channel),
    # which magnifies the last bits by up to ~1e10. A wrong kernel is off by O(1).
    assert rel_err(outs[1], outs[0]) < 1e-8
    scale = max(g.norm().item() for g in grads[0].values())
    for n, g in grads[0].items():
        if g.norm() < 1e-9 * scale:  # a conv bias followed by BatchNorm: zero in exact arithmetic
            assert grads[1][n].norm() < 1e-9 * scale, n
        else:
            assert rel_err(grads[1][n], g) < 1e-5, n
    ref_bn = dict(ref.named_buffers())
    for n, b in ours.named_buffers():  # running statistics updated alike
        if b.is_floating_point():
            assert rel_err(b, ref_bn[n]) < 1e-8, n
