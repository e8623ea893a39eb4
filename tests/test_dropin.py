"""Drop-in fidelity of the networks and of cnnkern.convert: module hooks fire as in PyTorch (fusion
yields to them), torch.fx / torchvision feature extraction / torch.export work and still run cnnkern,
what prints is what runs, and the usual model plumbing (copy, save, dtype, functional_call, trace)."""

import copy
import io
import math
import warnings

import pytest
import torch
from helpers import DEVICE, backends_for, randomise_bn, rel_err

import cnnkern
from cnnkern import models as M
from cnnkern import nn as cnn
from cnnkern.convert import ResidualReLU

tv = pytest.importorskip("torchvision")
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402

# (cnnkern network, torchvision twin or None, input shape): small inputs, float64, "torch" backend
NETS = {
    "alexnet_paper": (lambda: M.alexnet(num_classes=10), None, (1, 3, 67, 67)),
    "alexnet": (lambda: M.alexnet(variant="torchvision"), lambda: tv.models.alexnet(), (1, 3, 64, 64)),
    "vgg16": (lambda: M.vgg16(), lambda: tv.models.vgg16(), (1, 3, 32, 32)),
    "vgg16_bn": (lambda: M.vgg16(batch_norm=True), lambda: tv.models.vgg16_bn(), (1, 3, 32, 32)),
    "googlenet": (
        lambda: M.googlenet(),
        lambda: tv.models.GoogLeNet(aux_logits=False, transform_input=False, init_weights=True),
        (1, 3, 32, 32),
    ),
    "googlenet_paper": (lambda: M.googlenet(variant="paper", num_classes=10), None, (1, 3, 32, 32)),
    "resnet18": (lambda: M.resnet18(), lambda: tv.models.resnet18(), (1, 3, 32, 32)),
    "resnet18_paper": (lambda: M.resnet18(variant="paper"), lambda: tv.models.resnet18(), (1, 3, 32, 32)),
    "resnet50": (lambda: M.resnet50(), lambda: tv.models.resnet50(), (1, 3, 32, 32)),
    "resnet50_paper": (lambda: M.resnet50(variant="paper"), None, (1, 3, 32, 32)),
    "cifar_resnet20": (lambda: M.cifar_resnet(20), None, (1, 3, 16, 16)),
}


def _pair(name):
    make, make_tv, shape = NETS[name]
    torch.manual_seed(0)
    ours = make()
    ref = make_tv() if make_tv is not None else None
    if ref is not None:
        ours.load_state_dict(ref.state_dict(), strict=True)
        randomise_bn(ref, ours)
        ref.double().eval()
    else:
        randomise_bn(ours)
    return ours.double().eval(), ref, torch.randn(shape, dtype=torch.float64)


def _record(model, x, names=None):
    """(name, kind, output shape, output) of every forward hook and (name, input shape) of every
    forward pre-hook on every module (or those in ``names``), in firing order."""
    log, handles = [], []
    for n, m in model.named_modules():
        if not n or (names is not None and n not in names):
            continue
        handles.append(
            m.register_forward_pre_hook(
                lambda m, a, n=n: log.append((n, "pre", tuple(a[0].shape) if a and torch.is_tensor(a[0]) else None))
            )
        )
        handles.append(
            m.register_forward_hook(lambda m, a, o, n=n: log.append((n, "out", tuple(o.shape), o.detach().clone())))
        )
    try:
        with torch.no_grad(), cnnkern.use_backend("torch"):
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return log, out


def _same_log(a, b):
    assert [e[:3] for e in a] == [e[:3] for e in b]
    for ea, eb in zip(a, b):
        if ea[1] == "out":
            assert rel_err(ea[3], eb[3]) < 1e-12, ea[0]


def _fused_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, cnn.FusedConv2d)}


SLOW = {"vgg16", "vgg16_bn", "googlenet", "resnet50"}  # large state_dicts or many layers: seconds each


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


@pytest.mark.parametrize("name", _params(n for n, v in NETS.items() if v[1] is not None))
def test_hooks_on_every_module_match_torchvision(name):
    ours, ref, x = _pair(name)
    tv_names = {n for n, _ in ref.named_modules()}
    extra = {n for n, _ in ours.named_modules()} - tv_names
    assert extra <= _fused_names(ours)  # only cnnkern's fused layers are not torchvision's modules
    got, y = _record(ours, x)
    want, y_ref = _record(ref, x)
    assert {e[0] for e in got if e[0] in extra} == extra  # the fused layers are called, and their hooks fire
    _same_log([e for e in got if e[0] in tv_names], want)
    assert rel_err(y, y_ref) < 1e-12


@pytest.mark.parametrize("name", ["alexnet_paper", "googlenet_paper", "resnet50_paper", "cifar_resnet20"])
def test_hooks_without_twin_match_the_unfused_run(name):
    """Networks without a torchvision twin: hooks see the values of the fused run's layers."""
    ours, _, x = _pair(name)
    with torch.no_grad(), cnnkern.use_backend("torch"):
        want = ours(x)
    log, got = _record(ours, x)
    assert rel_err(got, want) < 1e-12
    convs = [n for n, m in ours.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert [e[0] for e in log if e[0] in convs and e[1] == "out"] == convs  # every conv, in definition order


def test_hooks_on_some_modules_fuse_the_rest(monkeypatch):
    ours, ref, x = _pair("resnet18")
    calls = []
    real = cnn.conv_bn_forward
    monkeypatch.setattr(cnn, "conv_bn_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    names = {"layer2.0.conv2", "layer2.0.downsample.0", "layer3.1.relu"}
    got, _ = _record(ours, x, names)
    want, _ = _record(ref, x, names)
    _same_log(got, want)
    # 20 convs; layer2.0's fused2 and downsample, layer3.1's two fused layers run their modules one by one
    assert len(calls) == 20 - 4


def test_global_hooks_and_summary():
    ours, ref, x = _pair("resnet18")
    log = []
    h = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: log.append(type(m).__name__))
    try:
        with torch.no_grad(), cnnkern.use_backend("torch"):
            ours(x)
            n_ours = [t for t in log if t != "FusedConv2d"]
            log.clear()
            ref(x)
    finally:
        h.remove()
    assert [t for t in n_ours if t not in ("ResNet",)] == [t for t in log if t not in ("ResNet",)]
    s = cnnkern.summary(M.resnet18(), (1, 3, 224, 224))
    assert round(s.macs / 1e9, 1) == 1.8


def test_full_backward_hooks_match_torchvision():
    ours, ref, x = _pair("resnet18")
    ours.train()
    ref.train()
    res = []
    for model in (ours, ref):
        log = []
        for n, m in model.named_modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.register_full_backward_hook(lambda m, gi, go, n=n, log=log: log.append((n, go[0].clone())))
                m.register_full_backward_pre_hook(lambda m, go, n=n, log=log: log.append((n + ":pre", go[0].clone())))
        with cnnkern.use_backend("torch"):
            model(x.repeat(2, 1, 1, 1)).square().sum().backward()
        res.append(log)
    assert [n for n, _ in res[0]] == [n for n, _ in res[1]] and len(res[0]) == 2 * 21
    for (n, a), (_, b) in zip(*res):
        assert rel_err(a, b) < 1e-10, n


def test_alexnet_paper_conv_shapes_by_hook():
    model = M.alexnet(variant="paper").eval()
    shapes = []
    for m in model.features:
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda m, a, o: shapes.append(tuple(o.shape[1:])))
    with torch.no_grad(), cnnkern.use_backend("torch"):
        model(torch.randn(1, 3, 227, 227))
    assert shapes == [(96, 55, 55), (256, 27, 27), (384, 13, 13), (384, 13, 13), (256, 13, 13)]


@pytest.mark.parametrize(
    "factory,gmacs", [(M.resnet18, 1.8), (M.resnet34, 3.6), (M.resnet50, 3.8), (M.resnet101, 7.6), (M.resnet152, 11.3)]
)
def test_resnet_multiply_adds_counted_by_hooks(factory, gmacs):
    """The seed's table (He et al., Table 1) at 224x224, counted from the hooks' outputs: conv
    K*Cg*R*S*P*Q plus the fc layer. The counts are 1.814, 3.664, 3.858, 7.570 and 11.282 G: the
    table truncates some (3.6, 3.8) and rounds others (7.6), so each entry is the count to one
    decimal, rounded down or up; cnnkern.summary counts exactly the same total."""
    model = factory(variant="paper").to("meta").eval()
    macs = []

    def count(m, a, o):
        if isinstance(m, torch.nn.Conv2d):
            k, cg, r, s = m.weight.shape
            macs.append(k * cg * r * s * o.shape[2] * o.shape[3])
        else:
            macs.append(m.in_features * m.out_features)

    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_hook(count)
    with torch.no_grad(), cnnkern.use_backend("torch"):
        model(torch.empty(1, 3, 224, 224, device="meta"))
    g = sum(macs) / 1e9
    assert gmacs in (math.floor(g * 10) / 10, math.ceil(g * 10) / 10), g
    assert sum(macs) == cnnkern.summary(factory(variant="paper"), (1, 3, 224, 224)).macs


# ------------------------------------------------------------------------------------------------
# torch.fx, feature extraction, torch.export
# ------------------------------------------------------------------------------------------------
def _runs_cnnkern(gm):
    return any(n.op == "call_function" and n.target is cnn.fused_conv for n in gm.graph.nodes)


@pytest.mark.parametrize("name", _params(NETS))
def test_symbolic_trace_runs_cnnkern_and_matches(name):
    ours, ref, x = _pair(name)
    gm = torch.fx.symbolic_trace(ours)
    assert _runs_cnnkern(gm)
    assert not any(
        n.op == "call_module" and isinstance(gm.get_submodule(n.target), torch.nn.Conv2d) for n in gm.graph.nodes
    )
    with torch.no_grad(), cnnkern.use_backend("torch"):
        assert rel_err(gm(x), ours(x)) < 1e-12
    assert set(gm.state_dict()) <= set(ours.state_dict())


FEATURES = {
    "resnet18": {"layer2": "l2", "layer4": "l4"},
    "resnet50": {"layer1": "l1", "layer3": "l3"},
    "vgg16_bn": {"features": "f", "classifier.1": "c"},
    "alexnet": {"features": "f", "avgpool": "p"},
    "googlenet": {"inception3b": "i3", "inception4e": "i4", "avgpool": "p"},
}


@pytest.mark.parametrize("name", _params(FEATURES))
def test_create_feature_extractor_matches_torchvision(name):
    ours, ref, x = _pair(name)
    fe, fe_ref = create_feature_extractor(ours, FEATURES[name]), create_feature_extractor(ref, FEATURES[name])
    assert _runs_cnnkern(fe)
    with torch.no_grad(), cnnkern.use_backend("torch"):
        got, want = fe(x), fe_ref(x)
    assert list(got) == list(want)
    for k in want:
        assert rel_err(got[k], want[k]) < 1e-12, k


def test_torch_export_matches_eager():
    ours, _, x = _pair("resnet18")
    with cnnkern.use_backend("torch"):
        ep = torch.export.export(ours, (x,))
        with torch.no_grad():
            assert rel_err(ep.module()(x), ours(x)) < 1e-12


# ------------------------------------------------------------------------------------------------
# what prints is what runs; torch.jit.script; model plumbing
# ------------------------------------------------------------------------------------------------
def test_print_shows_the_fused_layers_and_state_dict_stays_torchvisions():
    ours, ref, _ = _pair("resnet18")
    text = repr(ours)
    assert "(fused1): ConvBNReLU2d(conv=conv1, bn=bn1, relu=relu)" in text
    assert "(fused2): ConvBNAddReLU2d(conv=conv2, bn=bn2, relu=relu, shortcut=downsample)" in text
    assert "fused: ConvBN2d(0, 1)" in text  # the projection shortcut
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert "fused: ConvBNReLU2d(0, 1, 2)" in repr(M.vgg16(batch_norm=True).features)
    assert "(fused): ConvReLU2d(conv=conv, relu=True)" in repr(M.googlenet(variant="paper").conv1)


@pytest.mark.parametrize("factory", [M.resnet18, M.alexnet, M.vgg11, M.googlenet])
def test_jit_script_names_the_alternatives(factory):
    with pytest.raises(TypeError, match=r"torch\.compile.*torch\.export\.export"):
        torch.jit.script(factory(num_classes=10))


def _plumbing_checks(model, x):
    """deepcopy, whole-model and state_dict save/load, dtype, requires_grad_, train/eval, functional_call, jit.trace."""
    with torch.no_grad():
        want = model(x)
        assert rel_err(copy.deepcopy(model)(x), want) < 1e-12
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        assert rel_err(torch.load(buf, weights_only=False)(x), want) < 1e-12
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        buf.seek(0)
        twin = copy.deepcopy(model)
        for p in twin.parameters():
            p.zero_()
        twin.load_state_dict(torch.load(buf))
        assert rel_err(twin(x), want) < 1e-12
        f32 = copy.deepcopy(model).to(torch.float32)
        assert f32(x.float()).dtype == torch.float32 and rel_err(f32(x.float()), want) < 1e-4
        params = {n: p * 2 for n, p in model.named_parameters()}
        scaled = copy.deepcopy(model)
        for p in scaled.parameters():
            p.mul_(2)
        assert rel_err(torch.func.functional_call(model, params, (x,)), scaled(x)) < 1e-12
        traced = torch.jit.trace(model, (x,), check_trace=False)
        assert rel_err(traced(x), want) < 1e-12
    model.requires_grad_(False)
    assert model(x).requires_grad is False
    model.requires_grad_(True)
    model.train()
    y = model(x)
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert rel_err(model(x), want) > 0  # running statistics moved in the training call
        model.load_state_dict(twin.state_dict())
        assert rel_err(model(x), want) < 1e-12


def test_network_plumbing():
    ours, _, x = _pair("resnet18")
    with cnnkern.use_backend("torch"):
        _plumbing_checks(ours, torch.randn(2, 3, 16, 16, dtype=torch.float64))


def test_converted_model_plumbing():
    ref = tv.models.resnet18().double().eval()
    randomise_bn(ref)
    conv = cnnkern.convert(ref)
    with cnnkern.use_backend("torch"):
        _plumbing_checks(conv, torch.randn(2, 3, 16, 16, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# cnnkern.convert
# ------------------------------------------------------------------------------------------------
def _converted(make):
    ref = make().double().eval()
    randomise_bn(ref)
    return cnnkern.convert(ref), ref


CONVERTED = {"resnet18": lambda: tv.models.resnet18(), "alexnet": lambda: tv.models.alexnet()}


@pytest.mark.parametrize("name", list(CONVERTED))
def test_converted_model_hooks_match_the_original(name):
    """Every leaf module of the converted model fires its hooks as in the original (fx traced
    through the containers, so theirs do not fire in a GraphModule, as with any traced model)."""
    conv, ref = _converted(CONVERTED[name])
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    leaves = {n for n, m in ref.named_modules() if not list(m.children())}
    got, y = _record(conv, x, leaves)
    want, y_ref = _record(ref, x, leaves)
    _same_log(got, want)
    assert rel_err(y, y_ref) < 1e-12
    views = {n for n, m in conv.named_modules() if isinstance(m, cnn.FusedConv2d)}
    assert views and views.isdisjoint(leaves)
    assert (
        "(conv1_fused): ConvBNReLU2d(conv=conv1, bn=bn1, relu=relu)" in repr(conv)
        if name == "resnet18"
        else "(0_fused): ConvReLU2d(conv=features.0, relu=features.1)" in repr(conv)
    )


def test_converted_model_traces_and_extracts_features():
    conv, ref = _converted(CONVERTED["resnet18"])
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    gm = torch.fx.symbolic_trace(conv)
    assert _runs_cnnkern(gm)
    ret = {"layer2.1.conv2_fused": "l2", "fc": "fc"}
    fe = create_feature_extractor(conv, ret)
    fe_ref = create_feature_extractor(ref, {"layer2.1.relu_1": "l2", "fc": "fc"})
    with torch.no_grad(), cnnkern.use_backend("torch"):
        assert rel_err(gm(x), ref(x)) < 1e-12
        got, want = fe(x), fe_ref(x)
    for k in want:
        assert rel_err(got[k], want[k]) < 1e-12, k


def test_convert_warns_instead_of_falling_back_in_silence(monkeypatch):
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
            self.relu = torch.nn.ReLU()

        def forward(self, x, y):
            return self.relu(self.conv(x) + y)

    ref = Odd().double()
    with pytest.warns(UserWarning, match=r"left in PyTorch: conv \(padding_mode='reflect'\)"):
        conv = cnnkern.convert(ref)
    x, y = torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)  # y broadcasts
    with cnnkern.use_backend("torch"), torch.no_grad():
        with pytest.warns(UserWarning, match=r"relu_add runs relu\(a \+ b\) in PyTorch.*not 4-D"):
            assert rel_err(conv(x, y), ref(x, y)) < 1e-12
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            conv(x, y)  # once per layer
    # an error inside cnnkern's residual add (a bug) is not swallowed
    join = ResidualReLU(torch.nn.ReLU(), name="join")

    def bug(*a, **k):
        raise ValueError("a bug")

    monkeypatch.setattr(cnnkern.functional, "residual_add", bug)
    with torch.no_grad(), pytest.raises(ValueError, match="a bug"):
        join(x, x)


@pytest.mark.slow
@pytest.mark.skipif(
    cnnkern._backend.unavailable_reason("triton", torch.device("cpu")) is not None, reason="Triton unavailable"
)
def test_hooks_on_triton_kernels():
    """The Triton kernels (interpreter on CPU): hooked chains run their modules, the rest fuse."""
    model = M.cifar_resnet(20).double().eval()
    randomise_bn(model)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad(), cnnkern.use_backend("torch"):
        want = model(x)
    log = []
    model.layer2[0].conv1.register_forward_hook(lambda m, a, o: log.append(o.clone()))
    with torch.no_grad(), cnnkern.use_backend("triton"):
        assert rel_err(model(x), want) < 1e-10
    with torch.no_grad(), cnnkern.use_backend("torch"):
        assert rel_err(log[0], model.layer2[0].conv1(model.layer1(model.fused(x)))) < 1e-12


@pytest.mark.slow
@pytest.mark.skipif(
    cnnkern._backend.unavailable_reason("triton", torch.device("cpu")) is not None, reason="Triton unavailable"
)
@pytest.mark.parametrize("name", ["alexnet-paper", "vgg11-bn", "googlenet-paper"])
def test_hooks_on_triton_kernels_in_every_family(name):
    """The other families on the Triton kernels (interpreter on CPU, the smallest inputs the
    networks take): the output and a hooked convolution's output as on the torch backend."""
    make, size = {
        "alexnet-paper": (lambda: M.alexnet(variant="paper", num_classes=10), 67),
        "vgg11-bn": (lambda: M.vgg11(batch_norm=True, num_classes=10), 32),
        "googlenet-paper": (lambda: M.googlenet(variant="paper", num_classes=10), 32),
    }[name]
    model = make().double().eval()
    randomise_bn(model)
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][1]
    logs = {"torch": [], "triton": []}
    for backend, log in logs.items():
        handle = conv.register_forward_hook(lambda m, a, o, log=log: log.append(o.clone()))
        with torch.no_grad(), cnnkern.use_backend(backend):
            log.append(model(x))
        handle.remove()
    (hook_t, out_t), (hook_k, out_k) = logs["torch"], logs["triton"]
    assert rel_err(out_k, out_t) < 1e-10 and rel_err(hook_k, hook_t) < 1e-10


def test_standalone_layers_honour_hooks_and_trace_as_leaves():
    fused = cnn.ConvBNReLU2d(3, 4, 3).double().eval()
    randomise_bn(fused)
    lrn = cnn.LocalResponseNorm(3)
    log = []
    fused.bn.register_forward_hook(lambda m, a, o: log.append(o.clone()))
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    with cnnkern.use_backend("torch"), torch.no_grad():
        y = fused(x)
        assert len(log) == 1 and rel_err(y, torch.relu(log[0])) < 1e-12
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(fused, lrn))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1"]


def test_jit_script_of_a_converted_model_names_the_alternatives():
    with pytest.raises(TypeError, match=r"torch\.compile.*torch\.export\.export.*torch\.jit\.trace"):
        torch.jit.script(cnnkern.convert(tv.models.resnet18()))


# ------------------------------------------------------------------------------------------------
# output layouts: PyTorch's own rule (suggest_memory_format), ambiguous strides included
# ------------------------------------------------------------------------------------------------
def _layouts(c=4):
    """(name, tensor) inputs whose layouts PyTorch decides between NCHW and channels_last,
    including the ambiguous ones (one channel, 1x1 pixels, one item, size-1 dims with odd strides)."""

    def t(*shape, cl=False):
        x = torch.randn(*shape, device=DEVICE, dtype=torch.float32)
        return x.to(memory_format=torch.channels_last) if cl else x

    odd = torch.randn(2 * 7 * 25, device=DEVICE).as_strided((2, 1, 5, 5), (175, 3, 5, 1))  # C == 1, stride 3
    spread = torch.randn(2 * 25 * 9, device=DEVICE).as_strided((2, 1, 5, 5), (225, 7, 45, 9))  # C == 1, strided
    return [
        ("nchw", t(2, c, 5, 5)),
        ("channels_last", t(2, c, 5, 5, cl=True)),
        ("one channel", t(2, 1, 6, 6)),
        ("one channel, channels_last", t(2, 1, 6, 6, cl=True)),
        ("1x1 pixels", t(2, c, 1, 1)),
        ("1x1 pixels, channels_last", t(2, c, 1, 1, cl=True)),
        ("one item, channels_last", t(1, c, 5, 5, cl=True)),
        ("channels_last sliced in width", t(2, c, 5, 10, cl=True)[..., ::2]),
        ("nchw sliced in channels", t(2, 2 * c, 5, 5)[:, ::2]),
        ("one channel, odd stride", odd),
        ("one channel, spread out", spread),
    ]


def _layout_ids():
    return [name for name, _ in _layouts()]


def _same_layout(got, want):
    """Equal strides on every dim of size > 1 (a size-1 dim's stride never addresses memory)."""
    return got.shape == want.shape and all(a == b for a, b, n in zip(got.stride(), want.stride(), got.shape) if n > 1)


@pytest.mark.parametrize("backend", backends_for(DEVICE))
@pytest.mark.parametrize("case", _layout_ids())
def test_output_layouts_follow_pytorch(case, backend):
    """Every op's output has the layout PyTorch's own op gives for the same inputs: convolutions by
    the inputs' and weights' suggested memory formats, elementwise ops by TensorIterator's rule
    over all their operands (dense NCHW and channels_last outputs; the kernels write no other)."""
    import torch.nn.functional as TF

    from cnnkern import functional as F

    x = dict(_layouts())[case]
    c = x.shape[1]
    w = torch.randn(3, c, 3, 3, device=x.device)
    rm, rv = torch.zeros(3, device=x.device), torch.ones(3, device=x.device)
    for w_layout in (w, w.to(memory_format=torch.channels_last)):
        checks = {
            "conv2d": (TF.conv2d(x, w_layout, padding=1), F.conv2d(x, w_layout, padding=1, backend=backend)),
            "conv_bn_relu": (
                TF.relu(TF.batch_norm(TF.conv2d(x, w_layout, padding=1), rm, rv)),
                F.conv_bn_relu(x, w_layout, None, rm, rv, None, None, padding=1, backend=backend),
            ),
        }
        for op, (want, got) in checks.items():
            assert _same_layout(got, want), (case, op, got.stride(), want.stride())
    for s in (
        torch.randn(x.shape, device=x.device),
        torch.randn(x.shape, device=x.device).to(memory_format=torch.channels_last),
        x.clone(),
    ):
        for relu in (True, False):
            want = torch.relu(x + s) if relu else x + s
            got = F.residual_add(x, s, relu=relu, backend=backend)
            assert _same_layout(got, want), (case, "residual_add", relu, s.stride(), got.stride(), want.stride())
    want, got = TF.local_response_norm(x, 3), F.local_response_norm(x, 3, backend=backend)
    assert _same_layout(got, want), (case, "local_response_norm", got.stride(), want.stride())


def test_output_layout_rule_is_suggest_memory_format():
    """cnnkern's layout rule (cnnkern/ops/_common.py) is PyTorch's suggest_memory_format, on
    random permuted and sliced strides too."""
    from torch._prims_common import suggest_memory_format

    from cnnkern.ops._common import output_channels_last

    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        shape = [int(v) for v in torch.randint(1, 4, (4,), generator=gen)]
        perm = torch.randperm(4, generator=gen).tolist()
        base = torch.empty([shape[i] for i in perm]).permute(*[perm.index(i) for i in range(4)])
        steps = [int(v) for v in torch.randint(1, 3, (4,), generator=gen)]
        for t in (
            base,
            torch.empty([s * k for s, k in zip(shape, steps)])[:: steps[0], :: steps[1], :: steps[2], :: steps[3]],
        ):
            assert output_channels_last(t) == (suggest_memory_format(t) == torch.channels_last), (t.shape, t.stride())
    for _, t in _layouts():
        assert output_channels_last(t) == (suggest_memory_format(t) == torch.channels_last), (t.shape, t.stride())
