"""The networks of the seed, built from cnnkern layers: AlexNet, VGG, GoogLeNet, ResNet (+ plain and
CIFAR-10 variants). Every factory takes ``num_classes`` and ``backend=None``; parameter names follow
torchvision wherever torchvision has the network, so its state_dicts load with ``strict=True``."""

from .alexnet import AlexNet, alexnet
from .googlenet import GoogLeNet, GoogLeNetOutputs, googlenet
from .resnet import (
    ResNet,
    cifar_plain,
    cifar_resnet,
    plain18,
    plain34,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
)
from .vgg import VGG, vgg11, vgg13, vgg16, vgg19

__all__ = [
    "AlexNet",
    "alexnet",
    "GoogLeNet",
    "GoogLeNetOutputs",
    "googlenet",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "plain18",
    "plain34",
    "cifar_resnet",
    "cifar_plain",
    "VGG",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
]
