"""The CIFAR VGGs (with BatchNorm) of RepDistiller / mdistiller: vgg8, vgg13.

Five blocks of 3×3 conv (with bias) + BN + ReLU, the last ReLU of each block left out of the
block (the forward applies it, as the authors do), 2×2 max-pools after blocks 0-2 (and after
block 3 only for 64×64 inputs, as there), global average pooling and ``classifier``: 512 →
classes. ``vgg8`` = config "S" ``[[64], [128], [256], [512], [512]]``; ``vgg13`` = config "B"
``[[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]``; both with ``batch_norm=True``
(RepDistiller's ``model_dict`` maps "vgg8"/"vgg13" to ``vgg8_bn``/``vgg13_bn``). Names and
shapes (``block0.0.weight``, ``block0.1.running_mean``, ``classifier.weight``) follow
``mdistiller/models/cifar/vgg.py``, checked against that file. Logits only.

The ReLU after each block is a parameter-free module of its own, ``relu0`` … ``relu4`` (the
authors apply ``F.relu`` in the forward; the ``state_dict`` is the same, key for key), so the
post-ReLU stage outputs can be tapped by name: ``stage_info`` (:func:`kd2m.models.stages`) is
``relu0`` … ``relu4``, exactly RepDistiller's ``forward(is_feat=True, preact=False)``
``feat[0..4]`` (what AT, NST, FitNet and WKD-F read); tapping ``block<i>`` gives the pre-ReLU
map (the authors' ``preact=True``).
"""
from __future__ import annotations

from torch import Tensor, nn

from .authors_init import init_like_authors
from .registry import register_family
from .stage_info import Stage

__all__ = ["VGG_CONFIGS", "FEATURE_DIM", "CifarVGG"]

#: Per-block conv widths (RepDistiller's ``cfg`` "S" and "B").
VGG_CONFIGS = {"vgg8": [[64], [128], [256], [512], [512]],
               "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]}
FEATURE_DIM = 512


def _block(widths: list[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])  # ends in BN: the pre-activation is the block's output


class CifarVGG(nn.Module):
    """Input ``(N, in_channels, H, W)``; ``feature_dim = 512``. Cost per 32×32 image: vgg13 ≈
    0.28 G, vgg8 ≈ 0.10 G multiply-adds (torch.utils.flop_counter)."""

    def __init__(self, config: list[list[int]], num_classes: int, in_channels: int = 3):
        super().__init__()
        ins = [in_channels] + [widths[-1] for widths in config[:-1]]
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            _block(widths, c) for widths, c in zip(config, ins))
        # the authors' F.relu after each block, as modules (no parameters: the state_dict is unchanged)
        self.relu0, self.relu1, self.relu2, self.relu3, self.relu4 = (nn.ReLU() for _ in range(5))
        self.pool0, self.pool1, self.pool2, self.pool3 = (nn.MaxPool2d(kernel_size=2, stride=2) for _ in range(4))
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(FEATURE_DIM, num_classes)
        self.feature_dim = FEATURE_DIM
        # RepDistiller's feat[0..4], post-ReLU; block4's reduction is 16 for 64×64 inputs (pool3 runs)
        self.stage_info = [Stage(f"relu{i}", widths[-1], r)
                           for i, (widths, r) in enumerate(zip(config, (1, 2, 4, 8, 8)))]
        init_like_authors(self, linear=0.01)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[2]
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if size == 64:  # the authors pool a fourth time only for 64×64 inputs (Tiny-ImageNet)
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        return self.classifier(self.pool4(x).flatten(1))


register_family({name: (widths,) for name, widths in VGG_CONFIGS.items()}, CifarVGG,
                "RepDistiller's {name} (= {name}_bn), conv widths {args[0]}.")
