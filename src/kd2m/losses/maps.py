r"""Feature-map baselines: FitNets, attention transfer (AT), neuron selectivity transfer (NST), WKD-F.

Each reads ``student_feats`` / ``teacher_feats`` as feature maps ``(n, c, h, w)`` (the
registration's ``needs=("maps",)``) and returns its unweighted value; given pooled ``(n, d)``
features it refuses with a ValueError that names the fix. Semantics follow mdistiller
(megvii-research/mdistiller), named in each docstring; mdistiller sums AT and NST over several
stages, a term here is one stage (the engine's layer), and the engine's λ is mdistiller's
``FEAT_WEIGHT``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .inputs import check_maps, check_nonnegative, check_positive, in_full_precision
from .registry import Term, TermContext, register_term

__all__ = ["conv_regressor", "FitNet", "attention_map", "at", "nst", "WKD_BOTTLENECK_WIDTH", "WKD_PROJECTORS",
           "grid_cells", "diagonal_gaussians", "wkd_projector", "WKDFeature"]


def _map_shape(who: str, shape, term: str = "fitnet") -> tuple[int, int, int]:
    if shape is None or len(shape) != 3:
        raise ValueError(f"loss term {term!r} needs (n, c, h, w) feature maps; the {who} has no 4-D layer here "
                         f"(TermContext.{who}_shape = {shape!r}, expected (c, h, w)). Tap a convolutional layer "
                         f"of the {who}, or use a pooled-feature term (pkt, rkd, crd) or a logit term")
    c, h, w = shape
    return int(c), int(h), int(w)


def conv_regressor(student_shape: tuple[int, int, int], teacher_shape: tuple[int, int, int],
                   term: str = "fitnet") -> nn.Sequential:
    """FitNets' learnable regressor from the student's map ``(c_s, h_s, w_s)`` to the teacher's
    ``(c_t, h_t, w_t)``: a convolution, BatchNorm and ReLU.

    As mdistiller ``mdistiller/distillers/_common.py`` (``ConvReg``, ``use_relu=True``):
    h_s = 2h_t: 3×3 conv, stride 2, padding 1; 2h_s = h_t: 4×4 transposed conv, stride 2,
    padding 1; h_s ≥ h_t: a (1 + h_s − h_t) × (1 + w_s − w_t) conv (1×1 for equal sizes);
    otherwise a ValueError (mdistiller raises too).
    """
    (cs, hs, ws), (ct, ht, wt) = student_shape, teacher_shape
    conv: nn.Conv2d | nn.ConvTranspose2d
    if hs == 2 * ht:
        conv = nn.Conv2d(cs, ct, kernel_size=3, stride=2, padding=1)
    elif hs * 2 == ht:
        conv = nn.ConvTranspose2d(cs, ct, kernel_size=4, stride=2, padding=1)
    elif hs >= ht and ws >= wt:
        conv = nn.Conv2d(cs, ct, kernel_size=(1 + hs - ht, 1 + ws - wt))
    else:
        raise ValueError(f"loss term {term!r}: no regressor maps a student map of {hs}×{ws} onto a teacher map "
                         f"of {ht}×{wt} (the student map must be at least as large, or half the size); tap "
                         f"layers with compatible resolutions")
    return nn.Sequential(conv, nn.BatchNorm2d(ct), nn.ReLU())


@register_term("fitnet", label="FitNets", needs=("maps",), paper="Romero et al., ICLR 2015", weight=100, layers="hint")
class FitNet(Term):
    r"""FitNets hint loss: mean squared error between the regressed student map and the teacher map,

    .. math:: \frac1{n c_t h_t w_t}\,\big\|r(F^S) - F^T\big\|_F^2

    with r the learnable :func:`conv_regressor` built from ``ctx.student_shape`` and
    ``ctx.teacher_shape`` (both ``(c, h, w)``); put the term's parameters in the optimizer.

    Checked against mdistiller ``mdistiller/distillers/FitNet.py`` (``F.mse_loss`` with mean
    reduction after ``ConvReg``; ``FEAT_WEIGHT`` = 100 there is the engine's λ here).

    Cost: one convolution of the student map, O(n c_t h_t w_t).
    """

    def __init__(self, ctx: TermContext):
        super().__init__(ctx)
        self.student_shape = _map_shape("student", self.ctx.student_shape)
        self.teacher_shape = _map_shape("teacher", self.ctx.teacher_shape)
        self.regressor = conv_regressor(self.student_shape, self.teacher_shape)

    @in_full_precision
    def forward(self, *, student_feats: Tensor, teacher_feats: Tensor, **_) -> Tensor:
        s, t = check_maps("fitnet", student_feats, teacher_feats)
        for who, x, want in (("student", s, self.student_shape), ("teacher", t, self.teacher_shape)):
            if tuple(x.shape[1:]) != want:
                raise ValueError(f"loss term 'fitnet': {who} maps have shape {tuple(x.shape[1:])} per sample but "
                                 f"the regressor was built for {want} (TermContext.{who}_shape)")
        dtype = next(self.regressor.parameters()).dtype  # its first convolution's weight
        return F.mse_loss(self.regressor(s.to(dtype)), t.detach().to(dtype))

    def extra_repr(self) -> str:
        return f"student={self.student_shape}, teacher={self.teacher_shape}"


def _same_resolution(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger map down to the smaller one's size (mdistiller pools to (h, h):
    the same for the square maps it uses)."""
    hs, ws = s.shape[2:]
    ht, wt = t.shape[2:]
    h, w = min(hs, ht), min(ws, wt)
    if (hs, ws) != (h, w):
        s = F.adaptive_avg_pool2d(s, (h, w))
    if (ht, wt) != (h, w):
        t = F.adaptive_avg_pool2d(t, (h, w))
    return s, t


def attention_map(feats: Tensor, p: float = 2.0) -> Tensor:
    r"""AT's spatial attention: :math:`a = \mathrm{vec}\big(\frac1c\sum_k F_k^{\,p}\big) / \|\cdot\|_2`.

    Shapes: ``(n, c, h, w)`` -> ``(n, hw)``. As mdistiller ``_at`` (``F.normalize``, eps 1e-12).
    """
    return F.normalize(feats.pow(p).mean(1).reshape(feats.shape[0], -1))


@register_term("at", label="AT", needs=("maps",), paper="Zagoruyko & Komodakis, ICLR 2017", weight=1000,
               layers="intermediate_stages")
@in_full_precision
def at(*, student_feats: Tensor, teacher_feats: Tensor, p: float = 2.0, **_) -> Tensor:
    r"""Attention transfer: mean squared difference of the L2-normalised attention maps,

    .. math:: \frac1{n\,hw}\sum_i \big\|a^S_i - a^T_i\big\|^2

    (:func:`attention_map`), after average-pooling the larger map to the smaller resolution.
    Channel counts may differ.

    Checked against mdistiller ``mdistiller/distillers/AT.py`` (``single_stage_at_loss``,
    ``.pow(2).mean()``, ``AT.P`` = 2; FEAT_WEIGHT 1000 there is the engine's λ), which follows
    szagoruyko/attention-transfer.

    Cost: O(n c h w).
    """
    check_positive("at", p=p)
    s, t = check_maps("at", student_feats, teacher_feats)
    s, t = _same_resolution(s, t.detach())
    return (attention_map(s, p) - attention_map(t, p)).pow(2).mean()


def _poly_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """Mean over samples and channel pairs of (⟨a_ik, b_il⟩)²; a (n, c_a, m), b (n, c_b, m)."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


@register_term("nst", label="NST", needs=("maps",), paper="Huang & Wang, arXiv 2017", weight=50,
               layers="intermediate_stages")
@in_full_precision
def nst(*, student_feats: Tensor, teacher_feats: Tensor, **_) -> Tensor:
    r"""Neuron selectivity transfer: squared MMD with the polynomial kernel :math:`k(a, b) = (a^\top b)^2`
    between the student's and teacher's channels, each channel's spatial map a sample,

    .. math::
        \frac1n\sum_i\Big[\overline{k(f^T_i, f^T_i)} + \overline{k(f^S_i, f^S_i)} - 2\,\overline{k(f^S_i, f^T_i)}\Big]

    where :math:`f_i` ``(c, hw)`` holds sample i's channels, each L2-normalised over the hw
    positions, and the bars are means over channel pairs. Maps are average-pooled to the smaller
    resolution first; channel counts may differ.

    Checked against mdistiller ``mdistiller/distillers/NST.py`` (``single_stage_nst_loss``,
    ``poly_kernel``: ``F.normalize`` over positions, teacher-teacher term detached).

    Cost: O(n (c_s + c_t)² hw) time, n (c_s + c_t)² memory.
    """
    s, t = check_maps("nst", student_feats, teacher_feats)
    s, t = _same_resolution(s, t.detach())
    f_s = F.normalize(s.reshape(s.shape[0], s.shape[1], -1), dim=2)
    f_t = F.normalize(t.reshape(t.shape[0], t.shape[1], -1), dim=2)
    return _poly_kernel_mean(f_t, f_t) + _poly_kernel_mean(f_s, f_s) - 2.0 * _poly_kernel_mean(f_s, f_t)


# ---------------------------------------------------------------------------------------------- WKD-F

#: hidden width of WKD-F's "bottleneck" projector (JiamingLv/WKD ``WKD.py``: ``ConvRegBottleNeck(c_hidden=256)``)
WKD_BOTTLENECK_WIDTH = 256
WKD_PROJECTORS = ("conv1x1", "bottleneck")


def grid_cells(size: int, grid: int) -> list[tuple[int, int]]:
    """Adaptive-pool cell bounds ``[⌊i·size/g⌋, ⌈(i+1)·size/g⌉)`` for i < g (cells may overlap when g ∤ size),
    as WKD's ``adaptive_avg_std_pool2d`` and ``nn.AdaptiveAvgPool2d`` cut a map."""
    return [((i * size) // grid, -((-(i + 1) * size) // grid)) for i in range(grid)]


def diagonal_gaussians(feats: Tensor, grid: int = 1, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    r"""Per-channel mean and standard deviation over the positions of each grid cell:
    :math:`\mu = \overline{F}`, :math:`\sigma = \sqrt{\mathrm{var}(F) + \epsilon}` with the *unbiased*
    variance, one diagonal Gaussian over the c channels per sample and cell.

    Shapes: ``(n, c, h, w)`` -> ``(n, c, grid, grid)`` twice. A cell needs at least 2 positions
    (the unbiased variance of one value is undefined). Cost: O(n c h w) (overlapping cells count
    their shared positions again).
    """
    n, c, h, w = feats.shape
    if grid == 1:
        return feats.mean(dim=(2, 3))[..., None, None], torch.sqrt(feats.var(dim=(2, 3)) + eps)[..., None, None]
    rows, cols = grid_cells(h, grid), grid_cells(w, grid)
    cells = [feats[:, :, r0:r1, c0:c1] for r0, r1 in rows for c0, c1 in cols]
    mean = torch.stack([x.mean(dim=(2, 3)) for x in cells], dim=-1).reshape(n, c, grid, grid)
    std = torch.stack([torch.sqrt(x.var(dim=(2, 3)) + eps) for x in cells], dim=-1).reshape(n, c, grid, grid)
    return mean, std


def wkd_projector(student_shape: tuple[int, int, int], teacher_shape: tuple[int, int, int],
                  kind: str = "conv1x1") -> nn.Sequential:
    """WKD-F's learnable projector of the student map onto the teacher's channels and size.

    ``"conv1x1"`` (every CIFAR-100 config of WKD): their ``ConvReg(use_relu=True, use_bn=True)``,
    which is :func:`conv_regressor` (conv → BN → ReLU; a 1×1 conv only when the sizes are equal,
    a 4×4 transposed conv for a student map half the teacher's). ``"bottleneck"`` (WKD's default,
    its ImageNet configs): ``ConvRegBottleNeck`` — 1×1 conv to 256, 3×3 conv, 1×1 conv to c_t,
    BN, ReLU — for maps of equal size only (WKD's branch for a half-size student map chains a
    transposed conv on the wrong width in a ``ModuleList`` and cannot run).
    """
    if kind == "conv1x1":
        return conv_regressor(student_shape, teacher_shape, term="wkd_f")
    (cs, hs, ws), (ct, ht, wt) = student_shape, teacher_shape
    if (hs, ws) != (ht, wt):
        raise ValueError(f"loss term 'wkd_f': the 'bottleneck' projector needs student and teacher maps of one size, "
                         f"got {hs}×{ws} and {ht}×{wt}; use projector 'conv1x1'")
    k = WKD_BOTTLENECK_WIDTH
    return nn.Sequential(nn.Conv2d(cs, k, kernel_size=1), nn.Conv2d(k, k, kernel_size=3, padding=1),
                         nn.Conv2d(k, ct, kernel_size=1), nn.BatchNorm2d(ct), nn.ReLU())


@register_term("wkd_f", label="WKD-F", needs=("maps",), paper="Lv, Yang & Li, NeurIPS 2024", weight=0.08)
class WKDFeature(Term):
    r"""WKD-F: Wasserstein distance between the channel-wise diagonal Gaussians of the projected
    student map and the teacher map,

    .. math::
        \frac1{n g^2}\sum_{i,\text{cell}}
        \Big(\rho\,\big\|\mu^S - \mu^T\big\|^2 + \big\|\sigma^S - \sigma^T\big\|^2\Big)

    — the squared 2-Wasserstein distance of two diagonal Gaussians, with the mean part weighted by
    ρ = ``mean_cov_ratio`` — where μ, σ are each channel's mean and :math:`\sqrt{\mathrm{var} + \epsilon}`
    (unbiased variance) over the positions of each of the g×g cells (``spatial_grid``;
    :func:`diagonal_gaussians`), the student's taken after the learnable :func:`wkd_projector`
    built from ``ctx.student_shape`` / ``ctx.teacher_shape`` (put the term's parameters in the
    optimizer). The teacher map is used as it comes, with no projector and no extra ReLU (as WKD).

    Checked against JiamingLv/WKD (commit 214cf88) ``mdistiller/distillers/WKD.py``
    (``wkd_feature_loss``: ``F.mse_loss(reduction='sum')`` of the means and of the stds, divided by
    the batch and by grid²; ``adaptive_avg_std_pool2d`` for grid > 1; ``forward_train``:
    ``MEAN_COV_RATIO · mean_loss + cov_loss``; ``conv_reg`` on the student only) and
    ``_common.py`` (``ConvReg``, ``ConvRegBottleNeck``). Defaults: their CIFAR-100
    resnet32x4 → resnet8x4 config ``configs/cifar100/wkd_f/res32x4_res8x4.yaml`` (``MEAN_COV_RATIO``
    4.0, ``SPATIAL_GRID`` 1, ``EPS`` 1e-5, ``PROJECTOR`` conv1x1, ``WKD_FEAT_WEIGHT`` 0.08 = the
    registered λ); wrn_40_2 → ShuffleV1 uses ratio 3.0, grid 4, λ 0.3.

    Not part of this value, as elsewhere in kd2m: the layer (WKD's ``HINT_LAYER: -1``, the last
    stage of both networks, :func:`kd2m.models.stages`) is the engine's; WKD's cosine decay of
    ``WKD_FEAT_WEIGHT`` after epoch 150 is the schedule ``cosine_after:150`` on λ
    (:class:`kd2m.training.methods.TermConfig`). WKD computes the networks under autocast and this loss
    in float32; here it is float32 at least (float64 when given float64).

    Cost: the projector's convolution plus O(n c_t h_t w_t).
    """

    def __init__(self, ctx: TermContext, *, mean_cov_ratio: float = 4.0, spatial_grid: int = 1, eps: float = 1e-5,
                 projector: str = "conv1x1"):
        super().__init__(ctx)
        check_nonnegative("wkd_f", mean_cov_ratio=mean_cov_ratio)
        check_positive("wkd_f", eps=eps)
        if isinstance(spatial_grid, bool) or not isinstance(spatial_grid, int) or spatial_grid < 1:
            raise ValueError(f"loss term 'wkd_f': spatial_grid must be an int ≥ 1, got {spatial_grid!r}")
        if projector not in WKD_PROJECTORS:
            raise ValueError(f"loss term 'wkd_f': projector must be one of {', '.join(WKD_PROJECTORS)}, "
                             f"got {projector!r}")
        self.student_shape = _map_shape("student", self.ctx.student_shape, "wkd_f")
        self.teacher_shape = _map_shape("teacher", self.ctx.teacher_shape, "wkd_f")
        _, h, w = self.teacher_shape
        smallest = min((r1 - r0) * (c1 - c0) for r0, r1 in grid_cells(h, spatial_grid)
                       for c0, c1 in grid_cells(w, spatial_grid))
        if smallest < 2:
            raise ValueError(f"loss term 'wkd_f': a {spatial_grid}×{spatial_grid} grid on the teacher's {h}×{w} "
                             "map leaves cells of one position, whose variance is undefined; use a smaller "
                             "spatial_grid")
        self.mean_cov_ratio, self.spatial_grid, self.eps = float(mean_cov_ratio), spatial_grid, float(eps)
        self.projector_kind = projector
        self.projector = wkd_projector(self.student_shape, self.teacher_shape, projector)

    @in_full_precision
    def forward(self, *, student_feats: Tensor, teacher_feats: Tensor, **_) -> Tensor:
        s, t = check_maps("wkd_f", student_feats, teacher_feats)
        for who, x, want in (("student", s, self.student_shape), ("teacher", t, self.teacher_shape)):
            if tuple(x.shape[1:]) != want:
                raise ValueError(f"loss term 'wkd_f': {who} maps have shape {tuple(x.shape[1:])} per sample but "
                                 f"the projector was built for {want} (TermContext.{who}_shape)")
        dtype = next(self.projector.parameters()).dtype  # its first convolution's weight
        mean_s, std_s = diagonal_gaussians(self.projector(s.to(dtype)), self.spatial_grid, self.eps)
        mean_t, std_t = diagonal_gaussians(t.detach().to(dtype), self.spatial_grid, self.eps)
        per = self.spatial_grid ** 2 * s.shape[0]
        mean_loss = (mean_s - mean_t).pow(2).sum() / per
        cov_loss = (std_s - std_t).pow(2).sum() / per
        return self.mean_cov_ratio * mean_loss + cov_loss

    def extra_repr(self) -> str:
        return (f"student={self.student_shape}, teacher={self.teacher_shape}, mean_cov_ratio={self.mean_cov_ratio:g}, "
                f"spatial_grid={self.spatial_grid}, eps={self.eps:g}, projector={self.projector_kind!r}")
