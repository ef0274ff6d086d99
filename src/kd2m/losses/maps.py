r"""Feature-map baselines: FitNets, attention transfer (AT), neuron selectivity transfer (NST).

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

from .inputs import check_maps, check_positive, in_full_precision
from .registry import Term, TermContext, register_term


def _map_shape(who: str, shape) -> tuple[int, int, int]:
    if shape is None or len(shape) != 3:
        raise ValueError(f"loss term 'fitnet' needs (n, c, h, w) feature maps; the {who} has no 4-D layer here "
                         f"(TermContext.{who}_shape = {shape!r}, expected (c, h, w)). Tap a convolutional layer "
                         f"of the {who}, or use a pooled-feature term (pkt, rkd, crd) or a logit term")
    return tuple(int(v) for v in shape)


def conv_regressor(student_shape: tuple[int, int, int], teacher_shape: tuple[int, int, int]) -> nn.Module:
    """FitNets' learnable regressor from the student's map ``(c_s, h_s, w_s)`` to the teacher's
    ``(c_t, h_t, w_t)``: a convolution, BatchNorm and ReLU.

    As mdistiller ``mdistiller/distillers/_common.py`` (``ConvReg``, ``use_relu=True``):
    h_s = 2h_t: 3×3 conv, stride 2, padding 1; 2h_s = h_t: 4×4 transposed conv, stride 2,
    padding 1; h_s ≥ h_t: a (1 + h_s − h_t) × (1 + w_s − w_t) conv (1×1 for equal sizes);
    otherwise a ValueError (mdistiller raises too).
    """
    (cs, hs, ws), (ct, ht, wt) = student_shape, teacher_shape
    if hs == 2 * ht:
        conv = nn.Conv2d(cs, ct, kernel_size=3, stride=2, padding=1)
    elif hs * 2 == ht:
        conv = nn.ConvTranspose2d(cs, ct, kernel_size=4, stride=2, padding=1)
    elif hs >= ht and ws >= wt:
        conv = nn.Conv2d(cs, ct, kernel_size=(1 + hs - ht, 1 + ws - wt))
    else:
        raise ValueError(f"loss term 'fitnet': no regressor maps a student map of {hs}×{ws} onto a teacher map "
                         f"of {ht}×{wt} (the student map must be at least as large, or half the size); tap "
                         f"layers with compatible resolutions")
    return nn.Sequential(conv, nn.BatchNorm2d(ct), nn.ReLU())


@register_term("fitnet", label="FitNets", needs=("maps",), paper="Romero et al., ICLR 2015", weight=100)
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
        dtype = self.regressor[0].weight.dtype
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


@register_term("at", label="AT", needs=("maps",), paper="Zagoruyko & Komodakis, ICLR 2017", weight=1000)
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


@register_term("nst", label="NST", needs=("maps",), paper="Huang & Wang, arXiv 2017", weight=50)
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
