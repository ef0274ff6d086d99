"""MobileNetV2 as RepDistiller / mdistiller use it on CIFAR (``mobile_half``: T = 6, width 0.5).

A 3×3 stride-2 stem (16 channels), seven stages of inverted residual blocks
``(t, c, n, s) = (1,16,1,1) (6,24,2,1) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1)``
with ``c`` halved, a 1×1 conv to 1280 channels, global average pooling and
``classifier = Sequential(Linear(1280, classes))`` (key ``classifier.0.weight``). Every inverted
residual has its 1×1 expansion conv, even at ``t = 1`` (the authors' choice). Names and shapes
follow ``mdistiller/models/cifar/mobilenetv2.py`` (= RepDistiller's ``models/mobilenetv2.py``),
checked against that file. Logits only; the ``AvgPool2d(H, ceil_mode=True)`` became an adaptive
average pool (equal at 32×32, where the last map is 2×2), so any input size works.

Stages (``stage_info``, :func:`kd2m.models.stages`): ``conv1`` (conv-BN-ReLU, post-ReLU), then
``blocks.1``, ``blocks.2``, ``blocks.4``, ``blocks.6``: exactly RepDistiller's
``forward(is_feat=True)`` ``feat[0..4]`` (it ignores ``preact``). The four block outputs are
*not* post-activation: an inverted residual ends in its linear 1×1 projection + BN (plus the
residual), so they can be negative; they are what the authors feed AT, NST, FitNet and WKD-F.
"""
from __future__ import annotations

from torch import Tensor, nn

from .authors_init import init_like_authors
from .registry import register_model
from .stage_info import Stage

__all__ = ["STAGES", "LAST_CHANNELS", "STAGE_BLOCKS", "conv_bn_relu", "InvertedResidual", "MobileNetV2", "mobilenet_v2"]

#: (expansion t, output channels c, blocks n, first stride s) before width scaling.
STAGES = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
LAST_CHANNELS = 1280
#: the ``blocks`` whose outputs RepDistiller's forward returns as feat[1..4]
STAGE_BLOCKS = (1, 2, 4, 6)


def conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(oup),
                         nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """1×1 expand (×t) → 3×3 depthwise (stride s) → 1×1 project, BN after each, ReLU after the
    first two; ``x + conv(x)`` when the stride is 1 and the width is unchanged."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """Input ``(N, in_channels, H, W)``; ``feature_dim = 1280``. ``mobile_half`` has 0.81M
    parameters at 100 classes and costs ≈ 6.5 M multiply-adds per 32×32 image."""

    def __init__(self, num_classes: int, in_channels: int = 3, width_mult: float = 0.5):
        super().__init__()
        channels = int(32 * width_mult)
        self.conv1 = conv_bn_relu(in_channels, channels, 3, 2)
        self.stage_info = [Stage("conv1", channels, 2)]
        reduction = 2
        self.blocks = nn.ModuleList()
        for index, (t, c, n, s) in enumerate(STAGES):
            out = int(c * width_mult)
            stage = []
            for i in range(n):
                stage.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
            self.blocks.append(nn.Sequential(*stage))
            reduction *= s
            if index in STAGE_BLOCKS:
                self.stage_info.append(Stage(f"blocks.{index}", out, reduction, post_activation=False))
        last = int(LAST_CHANNELS * width_mult) if width_mult > 1.0 else LAST_CHANNELS
        self.conv2 = conv_bn_relu(channels, last, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = last
        init_like_authors(self, linear=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return self.classifier(self.avgpool(self.conv2(x)).flatten(1))


@register_model("MobileNetV2")
def mobilenet_v2(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """RepDistiller's "MobileNetV2" student = ``mobile_half`` (T = 6, width 0.5)."""
    return MobileNetV2(num_classes, in_channels)
