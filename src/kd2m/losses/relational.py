r"""Relational and contrastive baselines on pooled features: PKT, RKD, CRD.

Each reads ``student_feats`` ``(n, d_s)`` and ``teacher_feats`` ``(n, d_t)`` (widths may differ:
PKT and RKD compare n×n relations, CRD embeds both sides) and returns its unweighted value.
Semantics follow the authors' released code, named in each docstring.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .inputs import check_feats, check_flag, check_index, check_nonnegative, check_positive, in_full_precision
from .registry import Term, TermContext, register_term

__all__ = ["pkt", "rkd_pairwise_distances", "rkd", "CRD_EPS", "NEGATIVES", "CRD"]


def _cosine_conditional(x: Tensor, eps: float) -> Tensor:
    """PKT's conditional probabilities from the cosine kernel: rows of ((cos + 1)/2) normalised to sum 1."""
    x = x / (x.norm(dim=1, keepdim=True) + eps)
    k = (x @ x.t() + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


# pairwise_factor: measured peak of forward + backward (float32, d = 512, CPU): 6.3 float64 n×n
# buffers at n = 2048, 4.1 at n = 4096 (peak VmHWM - VmRSS, the method of benchmarks/memory.py)
@register_term("pkt", label="PKT", needs=("feats",), paper="Passalis & Tefas, ECCV 2018", pairwise_factor=7, weight=30000)
@in_full_precision
def pkt(*, student_feats: Tensor, teacher_feats: Tensor, eps: float = 1e-7, **_) -> Tensor:
    r"""Probabilistic knowledge transfer: KL between the teacher's and student's conditional
    probabilities under the cosine kernel, averaged over all n² entries.

    .. math::
        q_{j|i} = \frac{K(x_i, x_j)}{\sum_k K(x_i, x_k)},\quad K(a, b) = \tfrac12\Big(\tfrac{a^\top b}{(\|a\|+\epsilon)(\|b\|+\epsilon)} + 1\Big)
        \\
        \mathrm{PKT} = \frac1{n^2}\sum_{i,j} q^T_{j|i}\,\log\frac{q^T_{j|i} + \epsilon}{q^S_{j|i} + \epsilon}

    Checked against mdistiller ``mdistiller/distillers/PKT.py`` (``pkt_loss``, from
    passalis/probabilistic_kt): eps = 1e-7 both in the norm and in the log ratio, ``torch.mean``
    over the n×n matrix (not a per-row sum). mdistiller also zeroes NaNs after the
    normalisation; with ε > 0 they only arise from NaN inputs, which are not hidden here.

    Parameters
    ----------
    student_feats : Tensor (n, d_s)
    teacher_feats : Tensor (n, d_t)
    eps : float > 0

    Returns
    -------
    0-dim Tensor (≈ ≥ 0; the ε in the ratio lets it dip below 0 by O(ε)).

    Cost: O(n²(d_s + d_t)) time, a few n×n buffers.
    """
    check_positive("pkt", eps=eps)
    s, t = check_feats("pkt", student_feats, teacher_feats)
    q_s = _cosine_conditional(s, eps)
    q_t = _cosine_conditional(t.detach(), eps)
    return torch.mean(q_t * torch.log((q_t + eps) / (q_s + eps)))


def rkd_pairwise_distances(x: Tensor, squared: bool = False, eps: float = 1e-12) -> Tensor:
    r"""RKD's pairwise distances: :math:`\max(\|x_i\|^2 + \|x_j\|^2 - 2x_i^\top x_j,\ \epsilon)`,
    square-rooted unless ``squared``, with a zero diagonal.

    Checked against mdistiller ``mdistiller/distillers/RKD.py`` (``_pdist``). Shapes:
    ``(n, d)`` -> ``(n, n)``. Cost: O(n²d).
    """
    sq = x.square().sum(1)
    d = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.t())).clamp(min=eps)
    if not squared:
        d = d.sqrt()
    return d * (1.0 - torch.eye(len(x), dtype=d.dtype, device=d.device))


def _rkd_angles(x: Tensor) -> Tensor:
    """cos of the angle at each i between x_j - x_i and x_k - x_i, flattened (n³,) (zero vectors give 0)."""
    e = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=2)
    return torch.bmm(e, e.transpose(1, 2)).reshape(-1)


# pairwise_factor: RKD's memory is not a multiple of n²: its angle relation holds n×n×d differences
# and n³ cosines. Measured peak (float32, d = 512, CPU): 216 MiB at n = 128, 768 MiB at n = 256, i.e.
# ≈ 3·d float64 n×n buffers at d = 512 plus an n³ part; 1800 covers d ≤ 512 up to n ≈ 256 only.
@register_term("rkd", label="RKD", needs=("feats",), paper="Park et al., CVPR 2019", pairwise_factor=1800)
@in_full_precision
def rkd(*, student_feats: Tensor, teacher_feats: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0,
        eps: float = 1e-12, squared: bool = False, **_) -> Tensor:
    r"""Relational KD: Huber (smooth-L1, δ = 1) losses between the student's and teacher's
    distance relations (each normalised by its mean off-diagonal distance) and angle relations.

    .. math::
        w_d\,\mathrm{mean}_{ij}\,\ell_1^{\mathrm{smooth}}\Big(\frac{d^S_{ij}}{\mu^S}, \frac{d^T_{ij}}{\mu^T}\Big)
        + w_a\,\mathrm{mean}_{ijk}\,\ell_1^{\mathrm{smooth}}\big(\cos\angle^S_{ijk}, \cos\angle^T_{ijk}\big)

    with :math:`d_{ij}` from :func:`rkd_pairwise_distances`, μ the mean of the positive entries of
    d, and :math:`\cos\angle_{ijk} = \langle e_{ij}, e_{ik}\rangle`,
    :math:`e_{ij} = (x_j - x_i)/\|x_j - x_i\|` (0 when x_j = x_i).

    Checked against mdistiller ``mdistiller/distillers/RKD.py`` (``rkd_loss``: eps 1e-12 in the
    clamp, ``squared=False``, ``F.smooth_l1_loss`` with mean reduction over n² and n³ entries,
    distance_weight 25, angle_weight 50, teacher relations without gradient).

    Parameters
    ----------
    student_feats : Tensor (n, d_s), n ≥ 2
    teacher_feats : Tensor (n, d_t)
    distance_weight, angle_weight : float ≥ 0
    eps : float > 0   (clamp of the squared distances)
    squared : bool    (compare squared distances)

    Returns
    -------
    0-dim Tensor ≥ 0.

    Cost: O(n²d + n³) time and memory: the angle relation holds n×n×d differences and n³ cosines
    (as the authors' code); at n = 256, d = 512 one forward + backward peaks at ≈ 770 MiB. Its
    ``pairwise_factor`` (a constant number of n×n buffers) is only right for d ≤ 512, n ≲ 256.
    """
    check_nonnegative("rkd", distance_weight=distance_weight, angle_weight=angle_weight)
    check_positive("rkd", eps=eps)
    check_flag("rkd", squared=squared)
    s, t = check_feats("rkd", student_feats, teacher_feats, min_batch=2)
    t = t.detach()
    d_t = rkd_pairwise_distances(t, squared, eps)
    d_t = d_t / d_t[d_t > 0].mean()
    d_s = rkd_pairwise_distances(s, squared, eps)
    d_s = d_s / d_s[d_s > 0].mean()
    loss_distance = F.smooth_l1_loss(d_s, d_t)
    loss_angle = F.smooth_l1_loss(_rkd_angles(s), _rkd_angles(t))
    return distance_weight * loss_distance + angle_weight * loss_angle


#: CRD's eps in the NCE ratios (RepDistiller ``crd/criterion.py``)
CRD_EPS = 1e-7
#: where CRD draws its negatives: RepDistiller's ``--mode exact`` default, or its memory's uniform fallback
NEGATIVES = ("other_class", "uniform")


@register_term("crd", label="CRD", needs=("feats", "index"), paper="Tian, Krishnan & Isola, ICLR 2020", weight=0.8)
class CRD(Term):
    r"""Contrastive representation distillation with a memory bank of negatives (NCE form).

    Student and teacher features are embedded by learnable ``Linear(d, feat_dim)`` maps and
    L2-normalised, :math:`v^S_i, v^T_i`. Two memory banks hold one unit vector per training
    sample, :math:`m^S` (student side) and :math:`m^T` (teacher side). For each sample i, with
    its index :math:`j_0 = \text{index}_i` and K negatives :math:`j_1..j_K` drawn from the
    training samples of other classes (``negatives="other_class"``, RepDistiller's default
    ``--mode exact``: without replacement unless a class has fewer than K others) or uniformly
    from all N samples with replacement (``negatives="uniform"``, the memory's own fallback),

    .. math::
        h^S_{ik} = \exp(\langle m^T_{j_k}, v^S_i\rangle/\tau)/Z^S,\qquad
        h^T_{ik} = \exp(\langle m^S_{j_k}, v^T_i\rangle/\tau)/Z^T
        \\
        \mathcal L(h) = -\frac1n\sum_i\Big[\log\frac{h_{i0}}{h_{i0} + K/N + \epsilon}
        + \sum_{k=1}^K \log\frac{K/N}{h_{ik} + K/N + \epsilon}\Big],\qquad
        \mathrm{CRD} = \mathcal L(h^S) + \mathcal L(h^T)

    with N = ``ctx.num_data``, ε = 1e-7, and :math:`Z = N\cdot\mathrm{mean}(\exp(\cdot/\tau))`
    fixed at the first call. After each training-mode call the banks move to the new embeddings:
    :math:`m_{j_0} \leftarrow \mathrm{normalize}(\mu\, m_{j_0} + (1-\mu)\, v_i)`.

    Checked against HobbitLong/RepDistiller ``crd/criterion.py`` (``CRDLoss``, ``ContrastLoss``,
    ``Embed``) and ``crd/memory.py`` (``ContrastMemory``: banks initialised uniform in
    ±1/√(feat_dim/3), Z from the first batch, momentum update), same as mdistiller
    ``mdistiller/distillers/CRD.py``. Options as RepDistiller: feat_dim 128, nce_k 16384,
    nce_t 0.07, nce_m 0.5.

    The negatives are drawn inside the term (RepDistiller draws them in its data loader, one
    ``np.random.choice`` per sample; here one ``torch.multinomial`` per batch on the global torch
    RNG, so a resumed run draws the same ones); ``"other_class"`` needs every training sample's
    label, ``TermContext.train_labels`` (the engine passes it). ``nce_k`` is clamped to N − 1 so
    tiny training sets work (RepDistiller would draw 16384 negatives with repeats). The banks update only in
    training mode (``term.train()``, the default), so evaluation calls leave them unchanged.

    Memory: two N × feat_dim float32 banks (N = 50 000: 49 MiB) and two N × n score matrices per
    call (plus the n × N draw weights of ``"other_class"``). Cost: O(N·n·feat_dim) (one GEMM against each bank; the authors' gather of the drawn
    rows costs O(nK·feat_dim) arithmetic but copies n·(K+1)·feat_dim floats).
    """

    # buffers, registered in __init__ (train_labels only for negatives="other_class")
    train_labels: Tensor
    memory_s: Tensor
    memory_t: Tensor
    z_s: Tensor
    z_t: Tensor

    def __init__(self, ctx: TermContext, *, feat_dim: int = 128, nce_k: int = 16384, nce_t: float = 0.07,
                 nce_m: float = 0.5, negatives: str = "other_class"):
        super().__init__(ctx)
        for name, v in (("feat_dim", feat_dim), ("nce_k", nce_k)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"loss term 'crd': {name} must be an int ≥ 1, got {v!r}")
        check_positive("crd", nce_t=nce_t)
        if isinstance(nce_m, bool) or not isinstance(nce_m, (int, float)) or not 0 <= nce_m < 1:
            raise ValueError(f"loss term 'crd': nce_m (memory momentum) must be in [0, 1), got {nce_m!r}")
        dims = []
        for who, shape in (("student", self.ctx.student_shape), ("teacher", self.ctx.teacher_shape)):
            if shape is None or len(shape) != 1:
                raise ValueError(f"loss term 'crd' needs the {who}'s pooled feature width: TermContext."
                                 f"{who}_shape must be (d,), got {shape!r}")
            dims.append(int(shape[0]))
        num_data = self.ctx.num_data
        if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 2:
            raise ValueError(f"loss term 'crd' needs the training set's size (its memory bank has one row per "
                             f"sample): TermContext.num_data must be an int ≥ 2, got {num_data!r}")
        self.num_data = num_data
        self.nce_k = min(nce_k, num_data - 1)
        if negatives not in NEGATIVES:
            raise ValueError(f"loss term 'crd': negatives must be one of {', '.join(NEGATIVES)}, got {negatives!r}")
        self.negatives = negatives
        labels = self.ctx.train_labels
        if negatives == "other_class":
            if labels is None:
                raise ValueError("loss term 'crd' draws its negatives from other classes (RepDistiller's default) "
                                 "and needs every training sample's label: give TermContext.train_labels, or "
                                 "negatives='uniform'")
            labels = torch.as_tensor(labels)
            if (labels.shape != (num_data,) or labels.is_floating_point() or labels.dtype == torch.bool
                    or int(labels.min()) < 0):
                raise ValueError(f"loss term 'crd': TermContext.train_labels must be ({num_data},) integer labels "
                                 f"(one per training sample), got {labels.dtype} {tuple(labels.shape)}")
            if int(labels.unique().numel()) < 2:
                raise ValueError("loss term 'crd': every training sample has the same label, so no sample has a "
                                 "negative of another class; use negatives='uniform'")
            # a buffer, so it follows the term to the device; not in the state_dict (it comes from the data)
            self.register_buffer("train_labels", labels.long().clone(), persistent=False)
            # as RepDistiller: without replacement unless some class has fewer than K others
            self.replace = self.nce_k > num_data - int(labels.bincount().max())
        self.nce_t, self.nce_m, self.feat_dim = float(nce_t), float(nce_m), feat_dim
        self.embed_s = nn.Linear(dims[0], feat_dim)
        self.embed_t = nn.Linear(dims[1], feat_dim)
        bound = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(num_data, feat_dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("memory_t", torch.rand(num_data, feat_dim).mul_(2 * bound).sub_(bound))
        # normalisation constants Z^S, Z^T; negative until the first call sets them
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))

    def contrast_index(self, index: Tensor) -> Tensor:
        """``(n, K+1)``: each sample's own index, then its K negatives' indices in [0, N)."""
        if self.negatives == "uniform":
            negatives = torch.randint(0, self.num_data, (len(index), self.nce_k), device=index.device)
        else:
            # (n, N): 1 on the samples of another class than sample i's
            weights = (self.train_labels[None, :] != self.train_labels[index][:, None]).float()
            negatives = torch.multinomial(weights, self.nce_k, replacement=self.replace)
        return torch.cat((index[:, None], negatives), dim=1)

    def nce_loss(self, h: Tensor) -> Tensor:
        """RepDistiller's ``ContrastLoss`` on scores ``h`` (n, K+1), positive first."""
        noise = self.nce_k / self.num_data  # K · P_n, P_n = 1/N
        log_pos = torch.log(h[:, 0] / (h[:, 0] + noise + CRD_EPS))
        log_neg = torch.log(noise / (h[:, 1:] + noise + CRD_EPS))
        return -(log_pos.sum() + log_neg.sum()) / h.shape[0]

    @in_full_precision
    def forward(self, *, student_feats: Tensor, teacher_feats: Tensor, index: Tensor, **_) -> Tensor:
        s, t = check_feats("crd", student_feats, teacher_feats)
        n = s.shape[0]
        for who, x, d in (("student", s, self.embed_s.in_features), ("teacher", t, self.embed_t.in_features)):
            if x.shape[1] != d:
                raise ValueError(f"loss term 'crd': {who} features have width {x.shape[1]} but TermContext."
                                 f"{who}_shape said {d}")
        index = check_index("crd", index, n, self.num_data)
        dtype = self.embed_s.weight.dtype
        v_s = F.normalize(self.embed_s(s.to(dtype)), dim=1, eps=0.0)
        v_t = F.normalize(self.embed_t(t.detach().to(dtype)), dim=1, eps=0.0)
        idx = self.contrast_index(index)
        # ⟨m_{j_k}, v_i⟩ for the drawn rows: one (N, n) GEMM against the whole bank, then a gather of
        # the (n, K+1) scores. The authors gather the (n, K+1, f) rows first; the same numbers, but
        # that copy is n·(K+1)·f floats (200 MB at n=100, K=3999) and made a CPU step take seconds.
        # The banks are copied: the GEMM's backward reads them after the in-place momentum update below.
        cols = idx.T                                                        # (K+1, n)
        h_s = torch.exp((self.memory_t.detach().clone() @ v_s.T).gather(0, cols).T / self.nce_t)
        h_t = torch.exp((self.memory_s.detach().clone() @ v_t.T).gather(0, cols).T / self.nce_t)
        # Z, the authors' normalisation constant, is set from the first batch (as in RepDistiller's
        # NCEAverage: -1 until then); torch.where, not `if`, so that no step reads it back to the host
        # (the loss divides by these new tensors, never by the buffers, which the next call rewrites in place)
        with torch.no_grad():
            z_s = torch.where(self.z_s < 0, h_s.detach().mean().to(self.z_s.dtype) * self.num_data, self.z_s)
            z_t = torch.where(self.z_t < 0, h_t.detach().mean().to(self.z_t.dtype) * self.num_data, self.z_t)
            self.z_s.copy_(z_s)
            self.z_t.copy_(z_t)
        loss = self.nce_loss(h_s / z_s) + self.nce_loss(h_t / z_t)
        if self.training:
            with torch.no_grad():
                for bank, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                    moved = bank[index] * self.nce_m + v.to(bank.dtype) * (1.0 - self.nce_m)
                    bank.index_copy_(0, index, moved / moved.norm(dim=1, keepdim=True))
        return loss

    def extra_repr(self) -> str:
        return (f"num_data={self.num_data}, feat_dim={self.feat_dim}, nce_k={self.nce_k}, nce_t={self.nce_t:g}, "
                f"nce_m={self.nce_m:g}, negatives={self.negatives}")
