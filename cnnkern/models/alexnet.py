"""AlexNet (Krizhevsky et al., 2012) in two variants, in torchvision's layout (``features.N``,
``avgpool``, ``classifier.N``).

* ``variant="paper"``: the seed's table ("Full (simplified) AlexNet"): 227x227 input; CONV1 96
  11x11/4 pad 0 -> 55x55; MAX POOL1 3x3/2 -> 27x27; NORM1; CONV2 256 5x5 pad 2; MAX POOL2 -> 13x13;
  NORM2; CONV3 384, CONV4 384, CONV5 256 (3x3 pad 1); MAX POOL3 -> 6x6; FC6 4096, FC7 4096, FC8.
  NORM1/NORM2 are LRN with the paper's constants k=2, n=5, alpha=1e-4, beta=0.75, i.e.
  ``LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2)`` in PyTorch's convention (which divides alpha
  by n). As in the seed's simplified table, there is no two-GPU channel grouping.
* ``variant="torchvision"``: torchvision's AlexNet (64-192-384-256-256 channels, no LRN); its
  weights load with ``strict=True``.

Every convolution runs with its ReLU fused (``features`` is a cnnkern.nn.Sequential).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import nn as cnn

__all__ = ["AlexNet", "alexnet"]


class AlexNet(cnn._NoScript, nn.Module):
    def __init__(self, num_classes: int = 1000, variant: str = "paper", dropout: float = 0.5, backend=None):
        super().__init__()
        if variant not in ("paper", "torchvision"):
            raise ValueError(f"AlexNet: variant must be 'paper' or 'torchvision', got {variant!r}")
        self.variant = variant
        if variant == "paper":
            lrn = lambda: cnn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0, backend=backend)  # noqa: E731
            layers = [
                nn.Conv2d(3, 96, 11, stride=4, padding=0),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2),
                lrn(),
                nn.Conv2d(96, 256, 5, padding=2),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2),
                lrn(),
                nn.Conv2d(256, 384, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(384, 384, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(384, 256, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2),
            ]
        else:
            layers = [
                nn.Conv2d(3, 64, 11, stride=4, padding=2),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2),
                nn.Conv2d(64, 192, 5, padding=2),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2),
                nn.Conv2d(192, 384, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(384, 256, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(256, 256, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2),
            ]
        self.features = cnn.Sequential(*layers, backend=backend)
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def alexnet(num_classes: int = 1000, variant: str = "paper", backend=None) -> AlexNet:
    return AlexNet(num_classes, variant, backend=backend)
