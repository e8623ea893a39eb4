"""VGG-11/13/16/19 (Simonyan and Zisserman, 2014), optionally with BatchNorm, in torchvision's layout
and parameter names (``features.N``, ``classifier.N``). ``features`` is a cnnkern.nn.Sequential:
every Conv2d[->BatchNorm2d]->ReLU run executes as one fused cnnkern layer."""

from __future__ import annotations

import torch
from torch import nn

from .. import nn as cnn

__all__ = ["VGG", "vgg11", "vgg13", "vgg16", "vgg19"]

# channels per conv layer, "M" = 2x2/2 max pool (the paper's configurations A, B, D, E)
CFGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(cnn._NoScript, nn.Module):
    def __init__(
        self,
        depth: int,
        num_classes: int = 1000,
        batch_norm: bool = False,
        dropout: float = 0.5,
        backend: str | None = None,
    ):
        super().__init__()
        if depth not in CFGS:
            raise ValueError(f"VGG: depth must be one of {sorted(CFGS)}, got {depth!r}")
        layers, cin = [], 3
        for v in CFGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers.append(nn.Conv2d(cin, v, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            cin = v
        self.features = cnn.Sequential(*layers, backend=backend)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def vgg11(num_classes=1000, batch_norm=False, backend=None) -> VGG:
    return VGG(11, num_classes, batch_norm, backend=backend)


def vgg13(num_classes=1000, batch_norm=False, backend=None) -> VGG:
    return VGG(13, num_classes, batch_norm, backend=backend)


def vgg16(num_classes=1000, batch_norm=False, backend=None) -> VGG:
    """VGG-16 (configuration D): the seed's per-layer table."""
    return VGG(16, num_classes, batch_norm, backend=backend)


def vgg19(num_classes=1000, batch_norm=False, backend=None) -> VGG:
    return VGG(19, num_classes, batch_norm, backend=backend)
