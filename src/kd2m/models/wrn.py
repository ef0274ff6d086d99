"""Wide ResNets of RepDistiller / mdistiller: wrn_16_2, wrn_40_1, wrn_40_2.

WRN-d-k (Zagoruyko & Komodakis): ``n = (d - 4) / 6`` pre-activation blocks per stage, widths
``[16, 16k, 32k, 64k]``, then BN-ReLU, global average pooling and ``fc``. Parameter names
(``block1.layer.0.convShortcut.weight`` …) and shapes follow
``mdistiller/models/cifar/wrn.py`` (= ``RepDistiller/models/wrn.py``), checked against that
file, so the released teachers load unchanged. Logits only; ``avg_pool2d(8)`` became an
adaptive average pool (equal at 32×32, where the last map is 8×8). Dropout rate 0, as there.

Stages (``stage_info``, :func:`kd2m.models.stages`): ``conv1``, ``block1``, ``block2``, ``block3``,
exactly RepDistiller's ``forward(is_feat=True, preact=False)`` ``feat[0..3]``. None of them is
post-activation: the stem is a bare conv, and WRN is a pre-activation network whose blocks end in
the residual sum ``x + conv2(...)`` (its BN-ReLU comes at the start of the next block, or in
``bn1``/``relu`` after ``block3``), so these maps can be negative. They are what the authors feed
AT, NST, FitNet and WKD-F; RepDistiller's ``preact=True`` (used only by AB) would instead be the
next block's ``bn1`` output, BN without ReLU.
"""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from .authors_init import init_like_authors
from .registry import register_family
from .stage_info import Stage

__all__ = ["WideBasicBlock", "NetworkBlock", "WideResNet", "WIDE_RESNETS"]


class WideBasicBlock(nn.Module):
    """Pre-activation block: ``conv2(relu(bn2(conv1(a)))) + shortcut`` with ``a = relu(bn1(x))``.

    When the width is unchanged the shortcut is ``x``; otherwise it is ``convShortcut(a)`` (a
    1×1 conv of the *activated* input, the authors' choice).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(
            in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(a))))
        return out + (x if self.convShortcut is None else self.convShortcut(a))  # None: equal_in_out


class NetworkBlock(nn.Module):
    """One stage: ``n`` blocks under the key ``layer`` (kept for the checkpoints' names)."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*(WideBasicBlock(in_planes if i == 0 else out_planes, out_planes,
                                                    stride if i == 0 else 1) for i in range(n)))

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen: input ``(N, in_channels, H, W)``, ``feature_dim = 64·widen``.

    Cost per 32×32 image: wrn_40_2 ≈ 0.33 G, wrn_16_2 ≈ 0.10 G multiply-adds.
    """

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 (16, 40), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_dim = widths[3]
        self.stage_info = [Stage("conv1", widths[0], 1, False), Stage("block1", widths[1], 1, False),
                           Stage("block2", widths[2], 2, False), Stage("block3", widths[3], 4, False)]
        init_like_authors(self, linear="zero_bias")

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


#: name → (depth, widen factor), as in mdistiller/models/cifar/wrn.py.
WIDE_RESNETS = {"wrn_16_2": (16, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}


register_family(WIDE_RESNETS, WideResNet, "WRN-{args[0]}-{args[1]} as in RepDistiller.")
