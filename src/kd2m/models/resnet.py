"""ResNet-18/34 in two flavours, both torchvision's ``ResNet`` with 512-d penultimate features.

- ``resnet18`` / ``resnet34``: the ImageNet architecture (7×7 stride-2 stem + max-pool), as in
  the paper (which fed it 32×32 inputs; the last stage then runs at 1×1).
- ``cifar_resnet18`` / ``cifar_resnet34``: the same blocks with a 3×3 stride-1 stem and no
  max-pool, the usual choice when training from scratch at 32×32 (the last stage runs at 4×4).
  Adaptive average pooling makes both work for any input size ≥ 8 (smaller too, at 1×1).
"""
from __future__ import annotations

from torch import nn
from torchvision.models import resnet18 as tv_resnet18
from torchvision.models import resnet34 as tv_resnet34

from .registry import register_model

__all__ = ["FEATURE_DIM", "resnet18", "resnet34", "cifar_resnet18", "cifar_resnet34"]

FEATURE_DIM = 512


def _resnet(factory, num_classes: int, in_channels: int, cifar_stem: bool) -> nn.Module:
    model = factory(weights=None)
    if cifar_stem:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    model.fc = nn.Linear(FEATURE_DIM, num_classes)  # reassigning keeps fc last in the module order
    model.feature_dim = FEATURE_DIM
    return model


@register_model("resnet18")
def resnet18(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """torchvision ResNet-18 (11.2M parameters at 10 classes), ImageNet stem."""
    return _resnet(tv_resnet18, num_classes, in_channels, cifar_stem=False)


@register_model("resnet34")
def resnet34(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """torchvision ResNet-34 (21.3M parameters at 10 classes), ImageNet stem."""
    return _resnet(tv_resnet34, num_classes, in_channels, cifar_stem=False)


@register_model("cifar_resnet18")
def cifar_resnet18(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """ResNet-18, BasicBlocks [2, 2, 2, 2], 3×3 stride-1 stem, no max-pool."""
    return _resnet(tv_resnet18, num_classes, in_channels, cifar_stem=True)


@register_model("cifar_resnet34")
def cifar_resnet34(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """ResNet-34, BasicBlocks [3, 4, 6, 3], 3×3 stride-1 stem, no max-pool."""
    return _resnet(tv_resnet34, num_classes, in_channels, cifar_stem=True)
