"""The MNIST-1D paper's baselines (Greydanus & Kobak): a 1-D CNN teacher and an MLP student.

Both take ``(N, in_channels, L)`` sequences (``L = image_size``, 40 for MNIST-1D) and end in a
linear ``fc`` fed ``feature_dim`` penultimate features.

- ``mnist1d_cnn`` follows ``ConvBase`` of ``greydanus/mnist1d`` ``notebooks/models.py`` (checked
  against it): Conv1d(in, 25, 5, stride 2, pad 1) → ReLU → Conv1d(25, 25, 3, 2, 1) → ReLU →
  Conv1d(25, 25, 3, 2, 1) → ReLU → flatten → ``fc``. At L = 40 the maps have lengths 19, 10, 5,
  so ``feature_dim = 25·5 = 125`` (the authors' ``linear_in``); other L give ``25·L₃``.
  5,210 parameters at 10 classes. The paper reports ≈ 94% test accuracy.
- ``mnist1d_mlp`` follows ``MLPBase`` there: Linear(in·L, 100) → ReLU, then a second hidden
  layer of 100 units *added to the first* (``h + relu(linear2(h))``, the authors' residual),
  → ``fc`` (the authors' ``linear3``). ``feature_dim = 100``. 15,210 parameters at 10 classes.
  The paper reports ≈ 68% test accuracy.
"""
from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model
from .stage_info import Stage

__all__ = ["CHANNELS", "HIDDEN", "conv_length", "MNIST1DConvNet", "MNIST1DMLP", "mnist1d_cnn", "mnist1d_mlp"]

CHANNELS = 25
HIDDEN = 100


def conv_length(length: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a Conv1d: ``⌊(L + 2p − k) / s⌋ + 1``."""
    return (length + 2 * padding - kernel) // stride + 1


class MNIST1DConvNet(nn.Module):
    """Three strided Conv1d + ReLU layers, flattened into ``fc`` (MNIST-1D's ``ConvBase``)."""

    def __init__(self, num_classes: int, in_channels: int = 1, length: int = 40, channels: int = CHANNELS):
        super().__init__()
        out = conv_length(conv_length(conv_length(length, 5, 2, 1), 3, 2, 1), 3, 2, 1)
        if out < 1:
            raise ValueError(f"mnist1d_cnn needs sequences of length ≥ 3 (its three stride-2 convs), got {length}")
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, channels, 5, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Flatten(),
        )
        self.feature_dim = channels * out
        self.fc = nn.Linear(self.feature_dim, num_classes)
        # the three ReLU outputs, 1-D maps (n, channels, L_i) at strides 2, 4, 8
        self.stage_info = [Stage(f"features.{i}", channels, r) for i, r in ((1, 2), (3, 4), (5, 8))]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class MNIST1DMLP(nn.Module):
    """Flatten → ``relu(linear1)`` → ``h + relu(linear2(h))`` → ``fc`` (MNIST-1D's ``MLPBase``)."""

    def __init__(self, num_classes: int, in_channels: int = 1, length: int = 40, hidden: int = HIDDEN):
        super().__init__()
        self.linear1 = nn.Linear(in_channels * length, hidden)
        self.linear2 = nn.Linear(hidden, hidden)
        self.fc = nn.Linear(hidden, num_classes)
        self.feature_dim = hidden
        self.stage_info: list[Stage] = []  # no feature maps

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear1(x.flatten(1)).relu()
        h = h + self.linear2(h).relu()
        return self.fc(h)


@register_model("mnist1d_cnn")
def mnist1d_cnn(num_classes: int, in_channels: int = 1, image_size: int = 40) -> nn.Module:
    """MNIST-1D's ConvBase teacher; ``image_size`` is the sequence length."""
    return MNIST1DConvNet(num_classes, in_channels, image_size)


@register_model("mnist1d_mlp")
def mnist1d_mlp(num_classes: int, in_channels: int = 1, image_size: int = 40) -> nn.Module:
    """MNIST-1D's MLPBase student (2 hidden layers of 100); ``image_size`` is the sequence length."""
    return MNIST1DMLP(num_classes, in_channels, image_size)
