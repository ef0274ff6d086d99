"""Learnable projectors that bring the student's features to the teacher's width (and grid).

Built once from the per-sample shapes at the tapped layers (``TermContext.student_shape`` /
``teacher_shape``): ``(d,)`` pooled vectors, ``(c, h, w)`` conv maps, ``(L, d)`` tokens.

- ``unit="batch"`` (pooled ``(n, d)`` features): ``nn.Linear(d_S, d_T, bias=False)`` when the
  widths differ (the width of a map is its channel count c, of tokens their d).
- ``unit="spatial"``, map → map: :class:`MapProjector`: the *student* map is resized to the
  teacher's h×w (adaptive average pooling when it is larger in both sides, a coarsening that
  keeps each teacher position's region; bilinear interpolation otherwise), then a 1×1
  convolution + BatchNorm maps c_S → c_T channels (as the 1×1 "ConvReg" of FitNets-style
  methods and WKD-F). Each of the two steps only when needed.
- ``unit="spatial"``, tokens ↔ map (a ViT layer against a conv layer): both sides are treated
  as sets of position vectors, nothing is reshaped or resized; the student's channels are
  projected (a map: 1×1 conv + BN; tokens: a bias-free Linear). A class token is dropped from
  the token side when L = h·w + 1 (see :func:`kd2m.losses.distance_loss.spatial_sets`).
- ``unit="spatial"``, tokens → tokens: a bias-free Linear d_S → d_T on every token; different
  token counts need nothing (the distance compares distributions of different sizes).

No projector is built when the metric compares across widths (``gw2``).
"""
from __future__ import annotations

from typing import cast

import torch.nn.functional as F
from torch import Tensor, nn

from .catalog import PER_POSITION_UNITS

__all__ = ["feature_width", "MapProjector", "build_projector"]


def feature_width(shape: tuple[int, ...]) -> int:
    """The channel width of a per-sample shape: d of (d,), c of (c, h, w), d of (L, d)."""
    if len(shape) == 1:
        return int(shape[0])
    if len(shape) == 3:
        return int(shape[0])
    if len(shape) == 2:
        return int(shape[1])
    raise ValueError(f"a per-sample feature shape is (d,), (c, h, w) or (L, d), got {tuple(shape)}")


class MapProjector(nn.Module):
    """Student map (n, c_S, h_S, w_S) → (n, c_T, h_T, w_T): resize to the teacher's grid, then 1×1 conv + BN.

    Resizing: adaptive average pooling when h_S ≥ h_T and w_S ≥ w_T (each output position
    averages the student positions of its region), bilinear interpolation (align_corners=False)
    otherwise. ``size=None`` keeps the student's grid (tokens ↔ map). Cost: O(n c_S c_T h_T w_T).
    """

    def __init__(self, in_channels: int, out_channels: int, size: tuple[int, int] | None = None):
        super().__init__()
        # cast: tuple() of the (h, w) pair is typed tuple[int, ...]
        self.size = cast("tuple[int, int]", tuple(size)) if size is not None else None
        self.conv: nn.Conv2d | None = None
        self.bn: nn.BatchNorm2d | None = None
        if in_channels != out_channels:
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
            self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            h, w = x.shape[-2:]
            if h >= self.size[0] and w >= self.size[1]:
                x = F.adaptive_avg_pool2d(x, self.size)
            else:
                x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        if self.conv is not None and self.bn is not None:  # both or neither
            x = self.bn(self.conv(x))
        return x

    def extra_repr(self) -> str:
        return f"size={self.size}"


def build_projector(student_shape, teacher_shape, unit: str = "batch") -> nn.Module | None:
    """The projector for these per-sample shapes and unit, or None when none is needed.

    See the module docstring for the choices. Raises ValueError for a pooled ``(d,)`` shape
    with ``unit="spatial"`` (per-position features are needed).
    """
    if student_shape is None or teacher_shape is None:
        return None
    s, t = tuple(int(v) for v in student_shape), tuple(int(v) for v in teacher_shape)
    ws, wt = feature_width(s), feature_width(t)
    if unit not in PER_POSITION_UNITS:
        return nn.Linear(ws, wt, bias=False) if ws != wt else None
    for who, shape in (("student", s), ("teacher", t)):
        if len(shape) == 1:
            raise ValueError(f"unit={unit!r} needs per-position features, but the {who} shape is {shape} "
                             "(pooled); tap a map (c, h, w) or tokens (L, d), e.g. FeatureTap(..., pool='none')")
    if len(s) == 3:  # student map
        size = t[1:] if len(t) == 3 else None
        if ws == wt and (size is None or size == s[1:]):
            return None
        return MapProjector(ws, wt, size)
    return nn.Linear(ws, wt, bias=False) if ws != wt else None  # student tokens
