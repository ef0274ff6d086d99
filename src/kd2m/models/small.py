"""Small CPU-fast models for the embedded 8×8 digits: a CNN teacher and an MLP student.

Both end in a 64-d feature vector (after a ReLU) and a linear ``fc``, so a distribution
distance can compare their features without a projector. The MLP is deliberately narrow
(a 16-unit bottleneck with dropout) so it trails the CNN and distillation has room to help.
Both accept any ``in_channels`` and ``image_size``, so ``imagefolder`` data works with them.
"""
from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model
from .stage_info import Stage

__all__ = ["FEATURE_DIM", "MAX_GRID", "DigitsCNN", "DigitsMLP", "digits_cnn", "digits_mlp"]

FEATURE_DIM = 64
MAX_GRID = 4  # the CNN's conv map is pooled to at most 4×4 before its linear layer


class DigitsCNN(nn.Module):
    """Three 3×3 conv layers (16, 32, 32 channels, one 2×2 max-pool) → Linear → 64 features → fc.

    Input ``(n, in_channels, s, s)``. The conv map ``(n, 32, ⌈s/2⌉, ⌈s/2⌉)`` is flattened as is
    when ``⌈s/2⌉ ≤ 4`` (8×8 digits: 512 values) and average-pooled to 4×4 first for larger
    images, so the first linear layer stays small.
    """

    def __init__(self, num_classes: int, in_channels: int = 1, image_size: int = 8):
        super().__init__()
        grid = -(-image_size // 2)  # ceil: the max-pool uses ceil_mode so odd sizes keep their border
        pool = nn.Identity() if grid <= MAX_GRID else nn.AdaptiveAvgPool2d(MAX_GRID)
        grid = min(grid, MAX_GRID)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            pool, nn.Flatten(),
            nn.Linear(32 * grid * grid, FEATURE_DIM), nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(FEATURE_DIM, num_classes)
        self.feature_dim = FEATURE_DIM
        # the three conv-BN-ReLU outputs (no authors' list exists: kd2m's own model)
        self.stage_info = [Stage("features.2", 16, 1), Stage("features.5", 32, 1), Stage("features.9", 32, 2)]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class DigitsMLP(nn.Module):
    """Flatten → Linear(in, 16) → ReLU → Dropout → Linear(16, 64) → ReLU → 64 features → fc."""

    def __init__(self, num_classes: int, in_channels: int = 1, image_size: int = 8, hidden: int = 16,
                 dropout: float = 0.2):
        super().__init__()
        self.features = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, FEATURE_DIM), nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(FEATURE_DIM, num_classes)
        self.feature_dim = FEATURE_DIM
        self.stage_info: list[Stage] = []  # no feature maps

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


@register_model("digits_cnn")
def digits_cnn(num_classes: int, in_channels: int = 1, image_size: int = 8) -> nn.Module:
    """The digits teacher (~48k parameters at 8×8; 99% test accuracy after 30 epochs)."""
    return DigitsCNN(num_classes, in_channels, image_size)


@register_model("digits_mlp")
def digits_mlp(num_classes: int, in_channels: int = 1, image_size: int = 8) -> nn.Module:
    """The digits student (~2.8k parameters at 8×8; ~96% test accuracy after 30 epochs)."""
    return DigitsMLP(num_classes, in_channels, image_size)
