"""The weight initialisation of the RepDistiller / mdistiller CIFAR zoo, in one place.

Their models share it up to the classifier: convolutions He-normal over fan-out
(N(0, 2/(k²·out)), which is ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``) with zero
bias, batch norm weight 1 and bias 0; the last Linear differs per family (see ``linear``).
The draws happen in module order, as in the authors' loops, so a seeded model is the same.
"""
from __future__ import annotations

import math

from torch import nn

__all__ = ["init_like_authors"]


def init_like_authors(model: nn.Module, linear: str | float = "default") -> None:
    """Initialise ``model`` in place.

    ``linear``: ``"default"`` keeps PyTorch's Linear init (resnet), ``"zero_bias"`` zeroes only its
    bias (wrn), a float ``s`` draws its weight from N(0, s²) and zeroes its bias (vgg, MobileNetV2:
    0.01).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear != "default":
            if not isinstance(linear, str):
                nn.init.normal_(m.weight, 0.0, float(linear))
            nn.init.zeros_(m.bias)
