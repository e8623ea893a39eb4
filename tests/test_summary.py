"""cnnkern.summary against the seed's tables: VGG-16's per-layer memory and parameters, GoogLeNet's
per-row params and ops, ResNet's FLOPs row. Where the seed disagrees with the architecture it
describes, the test pins the architecture's number and the README says so."""

import pytest

import cnnkern
from cnnkern import models as M
from cnnkern.summary import conv_layers, summary


def test_vgg16_per_layer_memory_and_params_match_the_seed():
    s = summary(M.vgg16(), (1, 3, 224, 224))
    convs = [r for r in s.rows if r.kind == "conv"]
    pools = [r for r in s.rows if r.kind == "maxpool"]
    # the seed's "memory" column: output elements of each layer
    assert [r.activations for r in convs] == [224 * 224 * 64] * 2 + [112 * 112 * 128] * 2 + [56 * 56 * 256] * 3 + [
        28 * 28 * 512
    ] * 3 + [14 * 14 * 512] * 3
    assert [r.activations for r in pools] == [112 * 112 * 64, 56 * 56 * 128, 28 * 28 * 256, 14 * 14 * 512, 7 * 7 * 512]
    assert [r.weights for r in convs][:4] == [1728, 36864, 73728, 147456]
    fcs = [r for r in s.rows if r.kind == "linear"]
    assert [r.weights for r in fcs] == [102760448, 16777216, 4096000]
    assert [r.activations for r in fcs] == [4096, 4096, 1000]
    assert sum(r.weights for r in s.rows) == 138344128  # the seed's total, without biases
    assert s.params == 138357544


# GoogLeNet (seed table): row -> (params in K = 1024 weights, ops in 10^6 multiply-accumulates)
SEED_GOOGLENET = {
    "inception3a": (159, 128),
    "inception3b": (380, 304),
    "inception4a": (364, 73),
    "inception4b": (437, 88),
    "inception4d": (580, 119),
    "inception4e": (840, 170),
    "inception5b": (1388, 71),
    "fc": (1000, 1),
}


def test_googlenet_rows_match_the_seed():
    rows = {r.name: r for r in summary(M.googlenet(variant="paper"), (1, 3, 224, 224)).group(1)}
    for name, (params_k, ops_m) in SEED_GOOGLENET.items():
        r = rows[name]
        assert abs(r.weights / 1024 - params_k) / params_k < 0.02, (name, r.weights / 1024)
        assert abs(r.macs / 1e6 - ops_m) / ops_m < 0.02 or abs(r.macs / 1e6 - ops_m) < 1, (name, r.macs / 1e6)
    # "convolution 3x3/1, #3x3 reduce 64, #3x3 192": conv2 + conv3 together, 112K and 360M
    pair = rows["conv2"].weights + rows["conv3"].weights
    assert round(pair / 1024) == 112 and round((rows["conv2"].macs + rows["conv3"].macs) / 1e6) == 360
    # Where the seed's table disagrees with the architecture (see README): conv1 is 7x7x3x64 =
    # 9408 weights (9.2K, 118M ops), not 2.7K/34M; 4c has 497.5K weights (its 100M ops agree with
    # that, not with the table's 463K); 5a has 1018K weights and 51M ops, not 1072K/54M.
    assert rows["conv1"].weights == 7 * 7 * 3 * 64
    assert round(rows["inception4c"].weights / 1024, 1) == 497.5 and round(rows["inception4c"].macs / 1e6) == 100
    assert round(rows["inception5a"].weights / 1024) == 1018


@pytest.mark.parametrize(
    "factory,gflops", [(M.resnet18, 1.8), (M.resnet34, 3.6), (M.resnet50, 3.8), (M.resnet101, 7.6), (M.resnet152, 11.3)]
)
def test_resnet_flops_row(factory, gflops):
    # The seed's FLOPs row counts multiply-adds of the paper's design (a bottleneck's stride on its
    # first 1x1). torchvision's v1.5 (stride on the 3x3) costs ~0.23 G more for ResNet-50/101/152.
    macs = summary(factory(variant="paper"), (1, 3, 224, 224)).macs / 1e9
    assert abs(macs - gflops) / gflops < 0.03, macs


def test_rows_and_table():
    s = summary(M.resnet18(), (3, 224, 224))
    kinds = {r.kind for r in s.rows}
    assert {"conv", "batchnorm", "maxpool", "residual_add", "avgpool", "linear"} <= kinds
    assert s.rows[0].name == "conv1" and s.rows[0].output_shape == (1, 64, 112, 112)
    assert s.params == sum(p.numel() for p in M.resnet18().parameters())
    text = s.table()
    assert "layer1.0.conv1" in text and "total" in text and "GMACs" in text


def test_conv_layers_are_distinct_and_from_the_model():
    layers = conv_layers(M.resnet50(), (32, 3, 224, 224))
    assert len(layers) == len({(r.input_shape, r.output_shape, str(r.conv)) for r in layers})
    assert layers[0].name == "conv1" and layers[0].input_shape == (32, 3, 224, 224)
    assert all(r.input_shape[0] == 32 for r in layers)


def test_summary_leaves_the_model_alone():
    model = M.resnet18()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary(model, (1, 3, 64, 64))
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    assert all((before[k] == v).all() for k, v in model.state_dict().items())
    assert cnnkern.get_backend() == "auto"


def test_alexnet_output_sizes_match_the_seed():
    rows = [r for r in summary(M.alexnet(), (1, 3, 227, 227)).rows if r.kind != "avgpool"]
    # the seed's table: CONV1, POOL1, NORM1, CONV2, POOL2, NORM2, CONV3, CONV4, CONV5, POOL3, FC6-8
    want = [
        ("conv", (96, 55, 55)),
        ("maxpool", (96, 27, 27)),
        ("lrn", (96, 27, 27)),
        ("conv", (256, 27, 27)),
        ("maxpool", (256, 13, 13)),
        ("lrn", (256, 13, 13)),
        ("conv", (384, 13, 13)),
        ("conv", (384, 13, 13)),
        ("conv", (256, 13, 13)),
        ("maxpool", (256, 6, 6)),
        ("linear", (4096,)),
        ("linear", (4096,)),
        ("linear", (1000,)),
    ]
    assert [(r.kind, r.output_shape[1:]) for r in rows] == want


def test_cli_summary(capsys):
    from cnnkern import cli

    assert cli.main(["summary", "vgg16"]) == 0
    out = capsys.readouterr().out
    assert "vgg16, input 1x3x224x224" in out and "138,357,544" in out
    assert cli.main(["summary", "resnet50", "--variant", "paper", "--depth", "1"]) == 0
    assert "layer4" in capsys.readouterr().out
    assert cli.main(["summary", "resnet9"]) == 2
    assert "no network 'resnet9'" in capsys.readouterr().err
