"""ShuffleNet V1 and V2 as RepDistiller / mdistiller use them on CIFAR: ShuffleV1, ShuffleV2.

Both start with a 1×1 conv to 24 channels (no stride, no max-pool: 32×32 inputs), run three
stride-2 stages, average-pool and classify with ``linear``. Names and shapes follow
``mdistiller/models/cifar/ShuffleNetv1.py`` / ``ShuffleNetv2.py`` (= RepDistiller's), checked
against those files, so checkpoints load unchanged. Logits only; ``avg_pool2d(4)`` became an
adaptive average pool (equal at 32×32, where the last map is 4×4).

- ShuffleV1: groups 3, stage widths 240/480/960, blocks 4/8/4; each stage's first block is
  stride 2 and concatenates a 3×3 average-pooled shortcut, so it outputs ``width - in`` channels.
- ShuffleV2: net size 1 (widths 116/232/464, blocks 3/7/3, then a 1×1 conv to 1024); each stage
  is a DownBlock (two stride-2 branches, concatenated) then split-transform-concat BasicBlocks.

Stages (``stage_info``, :func:`kd2m.models.stages`): the stem's ``relu`` (a parameter-free
module where the authors call ``F.relu``; the ``state_dict`` is unchanged), then ``layer1``,
``layer2``, ``layer3``: exactly RepDistiller's ``forward(is_feat=True, preact=False)``
``feat[0..3]``, all post-ReLU (a ShuffleV1 block ends in ``relu``; a ShuffleV2 block returns a
shuffle of a ReLU output and half of its non-negative input).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .registry import register_model
from .stage_info import Stage

__all__ = ["STEM", "channel_shuffle", "ShuffleV1Bottleneck", "ShuffleNetV1", "ShuffleV2Block", "ShuffleV2DownBlock",
           "ShuffleNetV2", "shuffle_v1", "shuffle_v2"]

STEM = 24


def _stages(widths) -> list[Stage]:
    """The stem's ReLU (stride 1) and the three stride-2 stages (RepDistiller's feat[0..3])."""
    return [Stage("relu", STEM, 1)] + [Stage(f"layer{i + 1}", w, 2 ** (i + 1)) for i, w in enumerate(widths)]


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """(N, C, H, W) → (N, C, H, W): channel ``i·(C/g) + j`` (group i, member j) moves to ``j·g + i``,
    so the next grouped conv sees channels from every group (view as (g, C/g), transpose, flatten)."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Bottleneck(nn.Module):
    """1×1 group conv → shuffle → 3×3 depthwise (stride s) → 1×1 group conv, BN after each.

    Stride 2: ``relu(cat(out, avgpool3x3(x)))``; stride 1: ``relu(out + x)``. The first 1×1 conv
    is ungrouped when it reads the 24-channel stem (the authors' ``g = 1 if in_planes == 24``).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        self.first_groups = 1 if in_planes == STEM else groups
        self.conv1 = nn.Conv2d(in_planes, mid, kernel_size=1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()

    def forward(self, x: Tensor) -> Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(nn.Module):
    """Input ``(N, in_channels, H, W)``; ``feature_dim = 960``; ≈ 39 M multiply-adds per 32×32 image."""

    def __init__(self, num_classes: int, in_channels: int = 3, widths=(240, 480, 960), blocks=(4, 8, 4),
                 groups: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, STEM, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM)
        self.relu = nn.ReLU()  # the authors' F.relu on the stem, as a module: the stage feat[0] by name
        planes = STEM
        stages = []
        for width, n in zip(widths, blocks):
            stage = [ShuffleV1Bottleneck(planes, width - planes, stride=2, groups=groups)]
            stage += [ShuffleV1Bottleneck(width, width, stride=1, groups=groups) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            planes = width
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(widths[-1], num_classes)
        self.feature_dim = widths[-1]
        self.stage_info = _stages(widths)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class ShuffleV2Block(nn.Module):
    """Split channels in halves ``(x1, x2)``; ``x2`` → 1×1 conv-BN-ReLU → 3×3 depthwise-BN →
    1×1 conv-BN-ReLU; concatenate with ``x1`` and shuffle (2 groups)."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, kernel_size=3, stride=1, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: Tensor) -> Tensor:
        half = x.shape[1] // 2
        x1, x2 = x[:, :half], x[:, half:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(out)))))
        return channel_shuffle(torch.cat([x1, out], 1), 2)


class ShuffleV2DownBlock(nn.Module):
    """Two stride-2 branches, each to ``out/2`` channels, concatenated and shuffled: left = 3×3
    depthwise-BN → 1×1-BN-ReLU; right = 1×1-BN-ReLU → 3×3 depthwise-BN → 1×1-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    """Input ``(N, in_channels, H, W)``; ``feature_dim = 1024``; ≈ 45 M multiply-adds per 32×32 image."""

    def __init__(self, num_classes: int, in_channels: int = 3, widths=(116, 232, 464, 1024), blocks=(3, 7, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, STEM, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM)
        self.relu = nn.ReLU()  # the authors' F.relu on the stem, as a module: the stage feat[0] by name
        planes = STEM
        stages = []
        for width, n in zip(widths[:3], blocks):
            stages.append(nn.Sequential(ShuffleV2DownBlock(planes, width), *(ShuffleV2Block(width) for _ in range(n))))
            planes = width
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(widths[2], widths[3], kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.linear = nn.Linear(widths[3], num_classes)
        self.feature_dim = widths[3]
        self.stage_info = _stages(widths[:3])

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register_model("ShuffleV1")
def shuffle_v1(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """RepDistiller's ShuffleV1 (groups 3, widths 240/480/960)."""
    return ShuffleNetV1(num_classes, in_channels)


@register_model("ShuffleV2")
def shuffle_v2(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """RepDistiller's ShuffleV2 (net size 1: widths 116/232/464, 1024 features)."""
    return ShuffleNetV2(num_classes, in_channels)
