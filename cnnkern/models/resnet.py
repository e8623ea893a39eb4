"""ResNet (He et al., 2015) as in the seed: ResNet-18/34/50/101/152 with shortcut options A, B and C,
the plain 18/34-layer networks, and the CIFAR-10 networks of the degradation experiment.

Parameter names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``,
``fc``...), so torchvision's state_dicts load with ``strict=True``. Every conv->BN(->ReLU) runs as
one fused cnnkern layer (cnnkern.nn.conv_bn_forward); a block's shortcut is added by its last fused
layer (or, for option A's subsampled, zero-padded shortcut, by cnnkern's residual add). The fused
layers are ``FusedConv2d`` views (``fused``, ``layer1.0.fused1``...) over torchvision's modules;
a hook on any of those modules makes its fused layer run them one by one.

``variant``: "torchvision" (ResNet v1.5: a bottleneck's stride is on its 3x3 convolution) or
"paper" (the original: the stride is on the first 1x1). Shortcuts (the seed's options):
    A: parameter-free: identity, or (when the shape changes) subsample + zero-pad channels;
    B: a projection (1x1 conv + BN) where the shape changes, identity elsewhere (torchvision);
    C: a projection in every block.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import nn as cnn

__all__ = [
    "ResNet",
    "BasicBlock",
    "Bottleneck",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "plain18",
    "plain34",
    "cifar_resnet",
    "cifar_plain",
]


def _conv(cin, cout, k, stride=1):
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


def _projection(cin, cout, stride, backend):
    # a fusing Sequential: conv + BN as one cnnkern layer, torchvision's names (downsample.0/.1)
    return cnn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout), backend=backend)


class _Fused(cnn._NoScript):
    """The fused layers of a block or network: ``FusedConv2d`` views over its own modules."""

    def _fuse(self, name, conv, bn, residual=False, backend=None):
        names = {"conv": conv, "bn": bn, "relu": "relu", "shortcut": "downsample", "join": "join"}
        mods = {k: getattr(self, v, None) for k, v in names.items()}
        if not residual:
            mods["shortcut"] = mods["join"] = None
        setattr(
            self,
            name,
            cnn.FusedConv2d(
                mods["conv"],
                mods["bn"],
                mods["relu"],
                shortcut=mods["shortcut"],
                join=mods["join"],
                residual=residual,
                backend=backend,
                names=names,
            ),
        )


class BasicBlock(_Fused, nn.Module):
    """Two 3x3 conv-BN layers and a shortcut (``shortcut=None``: a plain block, no shortcut).

    Runs as torchvision's block (conv1, bn1, relu, conv2, bn2, downsample, add, relu) on two fused
    layers: ``fused1`` (conv1-bn1-relu) and ``fused2`` (conv2-bn2, the shortcut added in its kernel,
    relu; option A's subsampled, zero-padded shortcut goes through ``join``, a ResidualAdd)."""

    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None, shortcut="B", backend=None, variant="torchvision"):
        super().__init__()
        self.conv1 = _conv(cin, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = nn.BatchNorm2d(planes)
        self._shortcut(downsample, stride, shortcut, backend)
        self._fuse("fused1", "conv1", "bn1", backend=backend)
        self._fuse("fused2", "conv2", "bn2", residual=shortcut is not None, backend=backend)

    def _shortcut(self, downsample, stride, shortcut, backend):
        self.downsample = downsample
        self.stride = stride
        self.shortcut = shortcut
        self.backend = backend
        if shortcut == "A":
            self.join = cnn.ResidualAdd(relu=True, backend=backend)

    def forward(self, x):
        m = self._modules  # (what ``self.fused1`` reads, without Module.__getattr__: nn._member says why)
        out = m["fused1"](x)
        return m["fused2"](out, x) if self.shortcut is not None else m["fused2"](out)


class Bottleneck(BasicBlock):
    """1x1 reduce, 3x3, 1x1 expand (x4), and a shortcut; fused layers ``fused1``..``fused3``."""

    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None, shortcut="B", backend=None, variant="torchvision"):
        nn.Module.__init__(self)
        s1, s3 = (stride, 1) if variant == "paper" else (1, stride)
        self.conv1 = _conv(cin, planes, 1, s1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, s3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv(planes, planes * 4, 1)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self._shortcut(downsample, stride, shortcut, backend)
        self._fuse("fused1", "conv1", "bn1", backend=backend)
        self._fuse("fused2", "conv2", "bn2", backend=backend)
        self._fuse("fused3", "conv3", "bn3", residual=shortcut is not None, backend=backend)

    def forward(self, x):
        m = self._modules
        out = m["fused2"](m["fused1"](x))
        return m["fused3"](out, x) if self.shortcut is not None else m["fused3"](out)


class ResNet(_Fused, nn.Module):
    """The ImageNet ResNet: 7x7/2 conv, 3x3/2 max pool, four stages, global average pool, fc.

    Args:
        block: BasicBlock or Bottleneck.
        layers: blocks per stage, e.g. [3, 4, 6, 3] for ResNet-50.
        num_classes: size of the classifier.
        shortcut: "A", "B", "C", or None for a plain network (no shortcuts).
        variant: "torchvision" or "paper" (where a bottleneck puts its stride).
        backend: cnnkern backend of every layer (None: the current default).
        stem: "imagenet" (7x7/2 conv + max pool, 64 channels) or "cifar" (3x3 conv, 16 channels,
            three stages of 16/32/64 channels, as in the paper's CIFAR-10 experiments).
    """

    def __init__(
        self, block, layers, num_classes=1000, shortcut="B", variant="torchvision", backend=None, stem="imagenet"
    ):
        super().__init__()
        if shortcut not in ("A", "B", "C", None):
            raise ValueError(f"ResNet: shortcut must be 'A', 'B', 'C' or None (plain), got {shortcut!r}")
        if variant not in ("paper", "torchvision"):
            raise ValueError(f"ResNet: variant must be 'paper' or 'torchvision', got {variant!r}")
        self.backend = backend
        self.shortcut = shortcut
        widths = (64, 128, 256, 512) if stem == "imagenet" else (16, 32, 64)
        if len(layers) != len(widths):
            raise ValueError(f"ResNet: {stem} stem takes {len(widths)} stages, got layers={layers}")
        self.inplanes = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self._fuse("fused", "conv1", "bn1", backend=backend)  # the stem: conv1-bn1-relu
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        for i, (w, n) in enumerate(zip(widths, layers)):
            setattr(self, f"layer{i + 1}", self._stage(block, w, n, 1 if i == 0 else 2, variant))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)
        self.num_stages = len(widths)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _stage(self, block, planes, blocks, stride, variant):
        layers = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            cout = planes * block.expansion
            reshape = s != 1 or self.inplanes != cout
            downsample = None
            if self.shortcut == "C" or (self.shortcut == "B" and reshape):
                downsample = _projection(self.inplanes, cout, s, self.backend)
            layers.append(block(self.inplanes, planes, s, downsample, self.shortcut, self.backend, variant))
            self.inplanes = cout
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.fused(x))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet(block, layers, num_classes, shortcut, variant, backend):
    return ResNet(block, layers, num_classes, shortcut, variant, backend)


def resnet18(num_classes=1000, shortcut="B", variant="torchvision", backend=None) -> ResNet:
    """ResNet-18: BasicBlock x [2, 2, 2, 2] (the seed's 1.8 GFLOPs)."""
    return _resnet(BasicBlock, [2, 2, 2, 2], num_classes, shortcut, variant, backend)


def resnet34(num_classes=1000, shortcut="B", variant="torchvision", backend=None) -> ResNet:
    """ResNet-34: BasicBlock x [3, 4, 6, 3] (3.6 GFLOPs)."""
    return _resnet(BasicBlock, [3, 4, 6, 3], num_classes, shortcut, variant, backend)


def resnet50(num_classes=1000, shortcut="B", variant="torchvision", backend=None) -> ResNet:
    """ResNet-50: Bottleneck x [3, 4, 6, 3] (3.8 GFLOPs)."""
    return _resnet(Bottleneck, [3, 4, 6, 3], num_classes, shortcut, variant, backend)


def resnet101(num_classes=1000, shortcut="B", variant="torchvision", backend=None) -> ResNet:
    """ResNet-101: Bottleneck x [3, 4, 23, 3] (7.6 GFLOPs)."""
    return _resnet(Bottleneck, [3, 4, 23, 3], num_classes, shortcut, variant, backend)


def resnet152(num_classes=1000, shortcut="B", variant="torchvision", backend=None) -> ResNet:
    """ResNet-152: Bottleneck x [3, 8, 36, 3] (11.3 GFLOPs)."""
    return _resnet(Bottleneck, [3, 8, 36, 3], num_classes, shortcut, variant, backend)


def plain18(num_classes=1000, backend=None) -> ResNet:
    """The seed's 18-layer plain network: ResNet-18 without shortcuts."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, None, "torchvision", backend)


def plain34(num_classes=1000, backend=None) -> ResNet:
    """The seed's 34-layer plain network: ResNet-34 without shortcuts."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, None, "torchvision", backend)


_CIFAR_DEPTHS = (20, 32, 44, 56, 110)


def _cifar(depth, num_classes, shortcut, backend):
    if depth not in _CIFAR_DEPTHS:
        raise ValueError(f"CIFAR ResNet depth must be one of {_CIFAR_DEPTHS} (6n+2), got {depth!r}")
    n = (depth - 2) // 6
    return ResNet(BasicBlock, [n, n, n], num_classes, shortcut, "paper", backend, stem="cifar")


def cifar_resnet(depth=20, num_classes=10, backend=None) -> ResNet:
    """The paper's CIFAR-10 ResNet (depth 6n+2 = 20, 32, 44, 56, 110): 3x3 conv with 16 filters,
    three stages of n BasicBlocks with 16/32/64 filters, option A shortcuts, 32x32 input."""
    return _cifar(depth, num_classes, "A", backend)


def cifar_plain(depth=20, num_classes=10, backend=None) -> ResNet:
    """The plain CIFAR-10 network of the degradation experiment: cifar_resnet without shortcuts."""
    return _cifar(depth, num_classes, None, backend)
