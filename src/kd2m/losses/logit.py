r"""Logit distillation baselines: KD, DKD, DIST, WKD-L.

Each term reads ``student_logits`` / ``teacher_logits`` ``(n, C)`` (and ``labels`` ``(n,)``
for DKD and WKD-L) and returns its unweighted value; the engine multiplies it by λ.
Semantics follow the authors' released code, named in each docstring.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .inputs import check_flag, check_labels, check_logits, check_nonnegative, check_positive, in_full_precision
from .registry import Term, TermContext, register_term

__all__ = ["STANDARDIZE_EPS", "standardize_logits", "kd", "dkd", "DIST_EPS", "pearson_rows", "dist", "WKD_EPS",
           "class_cost_from_head", "WKDLogit"]

#: added to the per-sample std in logit standardization (Sun et al.'s ``normalize``)
STANDARDIZE_EPS = 1e-7


def standardize_logits(logits: Tensor) -> Tensor:
    r"""Z-score each sample's logits: :math:`(z - \bar z) / (s_z + 10^{-7})`, with :math:`s_z`
    the *unbiased* standard deviation over the C classes.

    Logit standardization, Sun et al., "Logit Standardization in Knowledge Distillation", CVPR
    2024; checked against ``mdistiller/distillers/KD.py`` (``normalize``) of
    sunshangquan/logit-standardization-KD: ``logit.std(dim=-1)`` (Bessel-corrected) plus 1e-7.

    Shapes: ``(n, C)`` -> ``(n, C)``. Cost: O(nC).
    """
    return (logits - logits.mean(dim=-1, keepdim=True)) / (logits.std(dim=-1, keepdim=True) + STANDARDIZE_EPS)


def _options_kd(term: str, temperature, standardize) -> None:
    check_positive(term, temperature=temperature)
    check_flag(term, standardize=standardize)


# mdistiller's KD (CE_WEIGHT 0.1, KD_WEIGHT 0.9) and RepDistiller's (-r 0.1 -a 0.9)
@register_term("kd", label="KD", needs=("logits",), paper="Hinton, Vinyals & Dean, NIPS-W 2015", weight=0.9,
               ce_weight=0.1)
@in_full_precision
def kd(*, student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0, standardize: bool = False,
       **_) -> Tensor:
    r"""Hinton knowledge distillation: :math:`T^2 \cdot \frac1n\sum_i \mathrm{KL}(p^T_i \,\|\, p^S_i)`,
    :math:`p_i = \mathrm{softmax}(z_i / T)`.

    With ``standardize=True`` both logits are first z-scored per sample
    (:func:`standardize_logits`, Sun et al. CVPR 2024) and the same formula applies, T² included.

    Checked against mdistiller ``mdistiller/distillers/KD.py`` (``kd_loss``: KL summed over
    classes, mean over the batch, times T²) and sunshangquan/logit-standardization-KD
    ``mdistiller/distillers/KD.py`` (``logit_stand``).

    Parameters
    ----------
    student_logits, teacher_logits : Tensor (n, C)  (teacher detached here)
    temperature : float > 0   (mdistiller ``KD.TEMPERATURE`` = 4)
    standardize : bool        (logit standardization before the temperature)

    Returns
    -------
    0-dim Tensor ≥ 0.

    Cost: O(nC).
    """
    _options_kd("kd", temperature, standardize)
    zs, zt = check_logits("kd", student_logits, teacher_logits)
    zt = zt.detach()
    if standardize:
        zs, zt = standardize_logits(zs), standardize_logits(zt)
    t = float(temperature)
    log_p_s = F.log_softmax(zs / t, dim=1)
    # the teacher as log-probabilities (mdistiller passes softmax probabilities; equal up to
    # rounding, and exactly 0 when the logits coincide)
    log_p_t = F.log_softmax(zt / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1).mean() * t * t


#: DKD's mask offset: 1000 is subtracted from the target logit after dividing by T, so its
#: softmax weight underflows to exactly 0 (mdistiller's ``- 1000.0 * gt_mask``)
_DKD_MASK = 1000.0


@register_term("dkd", label="DKD", needs=("logits", "labels"), paper="Zhao et al., CVPR 2022", warmup=20,
               warmup_of=240)
@in_full_precision
def dkd(*, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float = 1.0, beta: float = 8.0,
        temperature: float = 4.0, standardize: bool = False, **_) -> Tensor:
    r"""Decoupled KD: :math:`\alpha\,\mathrm{TCKD} + \beta\,\mathrm{NCKD}`.

    With :math:`p = \mathrm{softmax}(z/T)` and y the label,

    .. math::
        \mathrm{TCKD} = \frac{T^2}{n}\sum_i \mathrm{KL}\big(b^T_i \,\|\, b^S_i\big),\quad
        b_i = (p_{i,y_i},\ 1 - p_{i,y_i}) \\
        \mathrm{NCKD} = \frac{T^2}{n}\sum_i \mathrm{KL}\big(\hat p^T_i \,\|\, \hat p^S_i\big),\quad
        \hat p_i = \mathrm{softmax}_{c \ne y_i}(z_{i,c}/T)

    Checked against mdistiller ``mdistiller/distillers/DKD.py`` (``dkd_loss``): the binary
    probabilities are masked sums of the softmax (``cat_mask``) and their plain ``log``; the
    non-target softmax subtracts 1000 from the target logit after dividing by T; both KLs are
    summed and divided by n (``size_average=False`` / batch). ``standardize`` as
    sunshangquan/logit-standardization-KD ``mdistiller/distillers/DKD.py``. mdistiller's
    ``min(epoch / WARMUP, 1)`` ramp (epochs counted from 1; WARMUP = 20 in ``mdistiller/engine/cfg.py``
    for its 240-epoch CIFAR-100 schedule; its ImageNet configs set 1 of 100) is a schedule, not part
    of this value: it is the registration's ``warmup=20, warmup_of=240`` and the engine applies it
    to λ. A run of another length gets the same share of its epochs, rounded, at least 1 — 15
    epochs: 1 (20 epochs would leave λ at 0.75 of its value in the last one), 60: 5 — stored in the
    resolved config's ``term_options`` and the run's settings and said on the ``--dry-run`` card; a
    warm-up given in the config (``term_options: {dkd: {warmup: N}}``, or a term entry's
    ``warmup``) is kept as given, and refused when N > 1 reaches the run's epochs.

    Parameters
    ----------
    student_logits, teacher_logits : Tensor (n, C)
    labels : Tensor (n,) int in [0, C)
    alpha, beta : float ≥ 0   (weights of TCKD and NCKD; mdistiller CIFAR-100 defaults 1 and 8)
    temperature : float > 0   (4)
    standardize : bool

    Returns
    -------
    0-dim Tensor ≥ 0 (up to the ``log`` of a probability that underflows: then inf, as in mdistiller).

    Cost: O(nC).
    """
    check_nonnegative("dkd", alpha=alpha, beta=beta)
    _options_kd("dkd", temperature, standardize)
    zs, zt = check_logits("dkd", student_logits, teacher_logits)
    n, c = zs.shape
    y = check_labels("dkd", labels, n, c)
    zt = zt.detach()
    if standardize:
        zs, zt = standardize_logits(zs), standardize_logits(zt)
    tckd, nckd = _dkd_parts(zs, zt, y, float(temperature))
    return alpha * tckd + beta * nckd


def _dkd_parts(zs: Tensor, zt: Tensor, y: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """DKD's (TCKD, NCKD) of logits ``zs``, ``zt`` (n, C) at temperature ``t`` for labels ``y``
    (:func:`dkd`), each summed over the batch and divided by n, times T², as mdistiller's ``dkd_loss``."""
    n = zs.shape[0]
    # scatter, not F.one_hot: one_hot reads the labels' range back to the host on every call
    target = torch.zeros_like(zs).scatter_(1, y[:, None], 1.0)
    other = 1.0 - target

    def binary(p: Tensor) -> Tensor:  # (p_target, p_rest) as masked sums, as mdistiller's cat_mask
        return torch.stack(((p * target).sum(1), (p * other).sum(1)), dim=1)

    b_s = binary(F.softmax(zs / t, dim=1))
    b_t = binary(F.softmax(zt / t, dim=1))
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * (t * t) / n
    log_q_s = F.log_softmax(zs / t - _DKD_MASK * target, dim=1)
    q_t = F.softmax(zt / t - _DKD_MASK * target, dim=1)
    nckd = F.kl_div(log_q_s, q_t, reduction="sum") * (t * t) / n
    return tckd, nckd


#: DIST's eps in the cosine similarity's denominator (hunto/DIST_KD ``cosine_similarity``)
DIST_EPS = 1e-8


def pearson_rows(a: Tensor, b: Tensor, eps: float = DIST_EPS) -> Tensor:
    r"""Row-wise Pearson correlation, the cosine similarity of the centred rows:
    :math:`\rho_i = \frac{\langle a_i - \bar a_i,\ b_i - \bar b_i\rangle}{\|a_i - \bar a_i\|\,\|b_i - \bar b_i\| + \epsilon}`.

    Shapes: ``(m, k)``, ``(m, k)`` -> ``(m,)``. A constant row gives 0 (not NaN). Cost: O(mk).
    """
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@register_term("dist", label="DIST", needs=("logits",), paper="Huang et al., NeurIPS 2022")
@in_full_precision
def dist(*, student_logits: Tensor, teacher_logits: Tensor, beta: float = 1.0, gamma: float = 1.0,
         temperature: float = 1.0, **_) -> Tensor:
    r"""DIST: inter- and intra-class Pearson relations of the softened predictions.

    With :math:`Y = \mathrm{softmax}(z/\tau)` ``(n, C)`` for student and teacher,

    .. math::
        \tau^2\Big[\beta\Big(1 - \frac1n\sum_i \rho(Y^S_{i,:}, Y^T_{i,:})\Big)
        + \gamma\Big(1 - \frac1C\sum_c \rho(Y^S_{:,c}, Y^T_{:,c})\Big)\Big]

    with ρ the Pearson correlation (:func:`pearson_rows`, eps 1e-8 in the denominator).

    Checked against hunto/DIST_KD (``DIST``: ``inter_class_relation`` = 1 − mean row Pearson,
    ``intra_class_relation`` on the transposes, both times τ², eps 1e-8), as mirrored in
    torchdistill's ``DISTLoss``.

    Parameters
    ----------
    student_logits, teacher_logits : Tensor (n, C)
    beta, gamma : float ≥ 0   (inter- and intra-class weights; 1 and 1 on ImageNet)
    temperature : float > 0   (τ = 1 on ImageNet)

    Returns
    -------
    0-dim Tensor in [0, 2τ²(β+γ)].

    Cost: O(nC).
    """
    check_nonnegative("dist", beta=beta, gamma=gamma)
    check_positive("dist", temperature=temperature)
    zs, zt = check_logits("dist", student_logits, teacher_logits)
    t = float(temperature)
    y_s = F.softmax(zs / t, dim=1)
    y_t = F.softmax(zt.detach() / t, dim=1)
    inter = (1.0 - pearson_rows(y_s, y_t).mean()) * (t * t)
    intra = (1.0 - pearson_rows(y_s.t(), y_t.t()).mean()) * (t * t)
    return beta * inter + gamma * intra


#: WKD-L's floor on the ground cost and in Sinkhorn's divisions (JiamingLv/WKD ``wkd_logit_loss``, ``sinkhorn``)
WKD_EPS = 1e-8


def class_cost_from_head(head: Tensor, sharpen: float = 1.0) -> Tensor:
    r"""WKD-L's class-to-class ground cost from the teacher classifier's class weights.

    :math:`D_{jk} = 1 - \cos(w_j, w_k)`, then, when ``sharpen`` κ > 0, :math:`D \leftarrow 1 - e^{-\kappa D}`.

    Checked against JiamingLv/WKD ``mdistiller/distillers/WKD.py`` (``COST_MATRIX == "fc"``: the
    teacher's ``fc.weight`` rows L2-normalised, 1 − cosine; ``COST_MATRIX_SHARPEN`` default 1.0).

    Shapes: ``head (C, d)`` -> ``(C, C)``. Cost: O(C²d).
    """
    w = F.normalize(head, p=2, dim=-1)
    cost = 1.0 - w @ w.t()
    if sharpen != 0:
        cost = 1.0 - torch.exp(-sharpen * cost)
    return cost


@register_term("wkd_l", label="WKD-L", needs=("logits", "labels"), paper="Lv, Yang & Li, NeurIPS 2024")
class WKDLogit(Term):
    r"""WKD-L: cross-entropy on the target class plus γ · an entropic Wasserstein distance between
    the student's and teacher's non-target predictions, under a class-to-class cost.

    .. math::
        -\frac1n\sum_i p^T_{i,y_i}\log p^S_{i,y_i}
        \;+\; \gamma\,\frac1n\sum_i \langle P_i, M\rangle,\qquad
        P_i = \mathrm{Sinkhorn}_{\varepsilon, L}\big(\hat p^S_i, \hat p^T_i; M\big)

    with :math:`p = \mathrm{softmax}(z)` (no temperature), :math:`\hat p_i = \mathrm{softmax}_{c \ne y_i}(z_{i,c}/T)`,
    :math:`M = \max(D, 0) + 10^{-8}` restricted to the non-target classes, and P the plan after L
    Sinkhorn iterations from :math:`u = 1/(C-1)`, :math:`K = e^{-M/\varepsilon}`,
    :math:`v \leftarrow \hat p^T / (K^\top u + 10^{-8})`, :math:`u \leftarrow \hat p^S / (K v + 10^{-8})`,
    :math:`P = \mathrm{diag}(u) K \mathrm{diag}(v)`; gradients flow through the unrolled iterations.

    Checked against JiamingLv/WKD ``mdistiller/distillers/WKD.py`` (``wkd_logit_loss_with_speration``,
    ``wkd_logit_loss``, ``sinkhorn``) and its CIFAR-100 WKD-L config
    (``configs/cifar100/wkd_l/res32x4_res8x4.yaml`` at commit 214cf88, the repository's HEAD: T = 8,
    λ_Sinkhorn = 0.05, 10 iterations, WKD_LOGIT_WEIGHT γ = 600 — 800 in the first commit 0ef7a28,
    changed by 3829f2f "Update config" —, sharpen 1.0). γ weighs the Wasserstein part against the
    target-class part inside the authors' loss, so it is an option here; the engine's λ multiplies
    the whole (λ = 1 reproduces the authors up to epoch 150).

    WKD decays γ alone (``WKD_LOGIT_WEIGHT``, cosine to 0 after ``COSINE_DECAY_EPOCH`` 150), never the
    target-class part. λ schedules multiply a whole term, so the exact authors' loss is two
    entries: ``{term: wkd_l, options: {gamma: 0}}`` (the target-class part, λ = 1, constant) and
    ``{term: wkd_l, weight: γ, options: {gamma: 1, target: false}, schedule: cosine_after:150}``
    (the Wasserstein part); ``configs/crd/`` does this. ``target=False`` leaves the target-class part
    out; ``gamma=0`` skips the Sinkhorn iterations.

    Computed on all C classes with the target's mass set to 0 and u started at 0 on the target:
    the iterates on the other C−1 classes are then exactly the authors' (C−1)-class ones, and the
    per-sample (C−1)² cost copies are never built. Memory O(nC + C²), time O(L·nC²).

    The cost comes from ``ctx.teacher_head`` (C, d), the weight of the teacher's last
    ``nn.Linear`` (the authors' ``"fc"`` prototypes); their CIFAR config instead loads a cost
    precomputed offline from the teacher's class-wise logits (CKA), which needs a pass over the
    training set before training.
    """

    cost: Tensor  # buffer (C, C), registered in __init__

    def __init__(self, ctx: TermContext, *, temperature: float = 8.0, gamma: float = 600.0,
                 sinkhorn_reg: float = 0.05, sinkhorn_iter: int = 10, sharpen: float = 1.0, target: bool = True):
        super().__init__(ctx)
        check_positive("wkd_l", temperature=temperature, sinkhorn_reg=sinkhorn_reg)
        check_nonnegative("wkd_l", gamma=gamma, sharpen=sharpen)
        check_flag("wkd_l", target=target)
        if not target and gamma == 0:
            raise ValueError("loss term 'wkd_l': target=False and gamma=0 leave nothing to compute (the term would "
                             "be 0); keep the target-class part or give gamma > 0")
        if isinstance(sinkhorn_iter, bool) or not isinstance(sinkhorn_iter, int) or sinkhorn_iter < 1:
            raise ValueError(f"loss term 'wkd_l': sinkhorn_iter must be an int ≥ 1, got {sinkhorn_iter!r}")
        head = self.ctx.teacher_head
        if head is None:
            raise ValueError("loss term 'wkd_l' needs the teacher's classifier weight (C, d) in "
                             "TermContext.teacher_head to build its class-to-class cost")
        if not isinstance(head, Tensor) or head.ndim != 2 or head.shape[0] < 2:
            raise ValueError(f"loss term 'wkd_l': TermContext.teacher_head must be a (C, d) tensor with C ≥ 2, "
                             f"got {getattr(head, 'shape', type(head).__name__)}")
        if self.ctx.num_classes is not None and head.shape[0] != self.ctx.num_classes:
            raise ValueError(f"loss term 'wkd_l': teacher_head has {head.shape[0]} rows but num_classes="
                             f"{self.ctx.num_classes}")
        self.temperature, self.gamma, self.target = float(temperature), float(gamma), target
        self.sinkhorn_reg, self.sinkhorn_iter, self.sharpen = float(sinkhorn_reg), sinkhorn_iter, float(sharpen)
        self.register_buffer("cost", class_cost_from_head(head.detach().float(), self.sharpen))

    @in_full_precision
    def forward(self, *, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, **_) -> Tensor:
        zs, zt = check_logits("wkd_l", student_logits, teacher_logits)
        n, c = zs.shape
        if c != self.cost.shape[0]:
            raise ValueError(f"loss term 'wkd_l': logits have {c} classes but the cost (teacher_head) has "
                             f"{self.cost.shape[0]}")
        y = check_labels("wkd_l", labels, n, c)
        zt = zt.detach()
        target = torch.zeros(zs.shape, dtype=torch.bool, device=zs.device).scatter_(1, y[:, None], True)

        # target-class part, at temperature 1
        loss_target = zs.new_zeros(())
        if self.target:
            p_t_target = F.softmax(zt, dim=1).gather(1, y[:, None])
            log_p_s_target = F.log_softmax(zs, dim=1).gather(1, y[:, None])
            loss_target = -(p_t_target * log_p_s_target).mean()
        if self.gamma == 0:
            return loss_target

        # non-target part: softmax over the other C-1 classes (target mass exactly 0)
        t = self.temperature
        a = F.softmax((zs / t).masked_fill(target, float("-inf")), dim=1)
        b = F.softmax((zt / t).masked_fill(target, float("-inf")), dim=1)
        m = F.relu(self.cost.to(zs.dtype)) + WKD_EPS
        k = torch.exp(-m / self.sinkhorn_reg)
        u = (~target).to(zs.dtype) / (c - 1)
        for _iteration in range(self.sinkhorn_iter):
            v = b / (u @ k + WKD_EPS)            # (Kᵀu)_j = Σ_i u_i K_ij
            u = a / (v @ k.t() + WKD_EPS)        # (K v)_i = Σ_j K_ij v_j
        transport = ((u @ (k * m)) * v).sum(1)   # Σ_ij u_i K_ij M_ij v_j
        return loss_target + self.gamma * transport.mean()

    def extra_repr(self) -> str:
        return (f"classes={self.cost.shape[0]}, temperature={self.temperature:g}, gamma={self.gamma:g}, "
                f"sinkhorn_reg={self.sinkhorn_reg:g}, sinkhorn_iter={self.sinkhorn_iter}, sharpen={self.sharpen:g}, "
                f"target={self.target}")

