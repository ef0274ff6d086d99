"""The CIFAR ResNets of RepDistiller / mdistiller: resnet8 … resnet110, resnet8x4, resnet32x4.

Three stages of BasicBlocks (``depth = 6n + 2``) after a 3×3 stride-1 stem, stages 2 and 3 at
stride 2, global average pooling and a linear ``fc``. Widths ``[16, 16, 32, 64]`` (resnet8…110)
or ``[32, 64, 128, 256]`` (the "x4" nets). Parameter names, order and shapes are those of
``mdistiller/models/cifar/resnet.py`` (= ``RepDistiller/models/resnet.py``), checked against
that file, so the released CIFAR-100 teachers (``{"model": state_dict}``) load unchanged with
:func:`kd2m.models.load_pretrained`.

Differences with the authors' module that change no weight and no 32×32 output: the forward
returns logits only (kd2m taps features with hooks; ``stage_info`` says where: the stem's ``relu``
and ``layer1``-``layer3``, all post-ReLU, the authors' ``feat[0..3]``), and ``AvgPool2d(8)`` is an adaptive
average pool, so other input sizes work too (at 32×32 the last map is 8×8 and both are equal).
"""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from .authors_init import init_like_authors
from .registry import register_family
from .stage_info import Stage

__all__ = ["conv3x3", "BasicBlock", "CifarResNet", "THIN", "WIDE", "CIFAR_RESNETS"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); shortcut = 1×1 conv + BN (key
    ``downsample``) when the stride or the width changes, else the identity."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """``depth = 6n + 2``: stem conv3×3(in_channels → widths[0]), stages of n BasicBlocks to
    widths[1..3] (strides 1, 2, 2), global average pool, ``fc``: widths[3] → num_classes.

    Input ``(N, in_channels, H, W)``; ``feature_dim = widths[3]``. Cost per 32×32 image:
    resnet56 ≈ 0.13 G, resnet8x4 ≈ 0.18 G, resnet32x4 ≈ 1.08 G multiply-adds.
    """

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 20, 32, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(widths[0], widths[1], n, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], n, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_dim = widths[3]
        # RepDistiller's forward(is_feat=True) feat[0..3]: relu(bn1(conv1)), then each stage's last
        # BasicBlock output relu(out + shortcut); all post-ReLU (preact=False)
        self.stage_info = [Stage("relu", widths[0], 1), Stage("layer1", widths[1], 1),
                           Stage("layer2", widths[2], 2), Stage("layer3", widths[3], 4)]
        init_like_authors(self)  # Linear keeps PyTorch's default

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(in_planes, planes, stride),
                             *(BasicBlock(planes, planes) for _ in range(blocks - 1)))

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


THIN = (16, 16, 32, 64)
WIDE = (32, 64, 128, 256)
#: name → (depth, widths), as in mdistiller/models/cifar/resnet.py.
CIFAR_RESNETS = {"resnet8": (8, THIN), "resnet20": (20, THIN), "resnet32": (32, THIN), "resnet56": (56, THIN),
                 "resnet110": (110, THIN), "resnet8x4": (8, WIDE), "resnet32x4": (32, WIDE)}


register_family(CIFAR_RESNETS, CifarResNet, "RepDistiller's {name}: depth {args[0]}, widths {args[1]}.")
