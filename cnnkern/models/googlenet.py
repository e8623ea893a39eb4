"""GoogLeNet (Szegedy et al., 2014) in two variants, with torchvision's parameter names.

* ``variant="paper"``: the seed's table. Convolutions with bias and ReLU, no BatchNorm; the third
  Inception branch is a real 5x5 convolution; 3x3/2 max pools; 40% dropout.
* ``variant="torchvision"``: torchvision's GoogLeNet (its weights load with ``strict=True``):
  every convolution is BasicConv2d = conv -> BatchNorm(eps=0.001) -> ReLU (here one fused
  ConvBNReLU2d), its third branch uses 3x3 kernels, the last max pool is 2x2/2, 20% dropout.
  Input transformation (torchvision's ``transform_input``) is not part of the model.

Both take ``aux_logits``: in training mode the model then returns ``GoogLeNetOutputs(logits,
aux_logits2, aux_logits1)`` as torchvision does; in eval mode only the logits.
"""

from __future__ import annotations

from collections import namedtuple

import torch
from torch import nn

from .. import nn as cnn

__all__ = ["GoogLeNet", "GoogLeNetOutputs", "Inception", "googlenet"]

GoogLeNetOutputs = namedtuple("GoogLeNetOutputs", ["logits", "aux_logits2", "aux_logits1"])


class BasicConv2d(cnn._NoScript, nn.Module):
    """conv [-> BN] -> ReLU, fused (``fused``, a FusedConv2d view over ``conv`` and ``bn``; a hook on
    either makes it run them one by one). ``bn=False`` (the paper variant) gives the convolution a bias."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0, bn=True, backend=None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=not bn)
        self.bn = nn.BatchNorm2d(cout, eps=0.001) if bn else None
        self.backend = backend
        self.fused = cnn.FusedConv2d(self.conv, self.bn, True, backend=backend, names={"conv": "conv", "bn": "bn"})

    def forward(self, x):
        return self.fused(x)


class Inception(cnn._NoScript, nn.Module):
    """Four branches concatenated on channels: 1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 (or 3x3) | pool -> 1x1."""

    def __init__(self, cin, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj, bn=True, k5=3, backend=None):
        super().__init__()
        conv = lambda *a, **k: BasicConv2d(*a, bn=bn, backend=backend, **k)  # noqa: E731
        self.branch1 = conv(cin, ch1x1, 1)
        self.branch2 = nn.Sequential(conv(cin, ch3x3red, 1), conv(ch3x3red, ch3x3, 3, padding=1))
        self.branch3 = nn.Sequential(conv(cin, ch5x5red, 1), conv(ch5x5red, ch5x5, k5, padding=k5 // 2))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True), conv(cin, pool_proj, 1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    def __init__(self, cin, num_classes, bn=True, dropout=0.7, backend=None):
        super().__init__()
        self.conv = BasicConv2d(cin, 128, 1, bn=bn, backend=backend)
        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        x = self.conv(nn.functional.adaptive_avg_pool2d(x, (4, 4)))
        x = self.dropout(torch.relu(self.fc1(torch.flatten(x, 1))))
        return self.fc2(x)


# (cin, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj): the seed's table
_INCEPTIONS = {
    "3a": (192, 64, 96, 128, 16, 32, 32),
    "3b": (256, 128, 128, 192, 32, 96, 64),
    "4a": (480, 192, 96, 208, 16, 48, 64),
    "4b": (512, 160, 112, 224, 24, 64, 64),
    "4c": (512, 128, 128, 256, 24, 64, 64),
    "4d": (512, 112, 144, 288, 32, 64, 64),
    "4e": (528, 256, 160, 320, 32, 128, 128),
    "5a": (832, 256, 160, 320, 32, 128, 128),
    "5b": (832, 384, 192, 384, 48, 128, 128),
}


class GoogLeNet(cnn._NoScript, nn.Module):
    def __init__(self, num_classes=1000, variant="torchvision", aux_logits=False, backend=None):
        super().__init__()
        if variant not in ("paper", "torchvision"):
            raise ValueError(f"GoogLeNet: variant must be 'paper' or 'torchvision', got {variant!r}")
        paper = variant == "paper"
        bn, k5 = not paper, 5 if paper else 3
        conv = lambda *a, **k: BasicConv2d(*a, bn=bn, backend=backend, **k)  # noqa: E731
        self.variant, self.aux_logits = variant, aux_logits
        self.conv1 = conv(3, 64, 7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = conv(64, 64, 1)
        self.conv3 = conv(64, 192, 3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        for name, cfg in _INCEPTIONS.items():
            setattr(self, f"inception{name}", Inception(*cfg, bn=bn, k5=k5, backend=backend))
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.maxpool4 = nn.MaxPool2d(3 if paper else 2, stride=2, ceil_mode=True)
        if aux_logits:
            self.aux1 = InceptionAux(512, num_classes, bn=bn, backend=backend)
            self.aux2 = InceptionAux(528, num_classes, bn=bn, backend=backend)
        else:
            self.aux1 = self.aux2 = None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.4 if paper else 0.2)
        self.fc = nn.Linear(1024, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        aux1 = self.aux1(x) if self.aux1 is not None and self.training else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if self.aux2 is not None and self.training else None
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))
        x = self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
        if self.training and self.aux_logits:
            return GoogLeNetOutputs(x, aux2, aux1)
        return x


def googlenet(num_classes=1000, variant="torchvision", aux_logits=False, backend=None) -> GoogLeNet:
    return GoogLeNet(num_classes, variant, aux_logits, backend)
