r"""Kernel maximum mean discrepancy (MMD²) between the student's and the teacher's batches.

Metrics: ``mmd_linear`` (linear kernel: the squared distance between means), ``mmd_rbf``
(Gaussian kernel, median-heuristic or fixed bandwidth, one or several bandwidths, biased or
unbiased estimator) and ``cmmd_rbf`` (its class-conditional mean).

.. math::
    \mathrm{MMD}^2_k(P_S, P_T) = \mathbb E\,k(x, x') + \mathbb E\,k(y, y') - 2\,\mathbb E\,k(x, y),
    \qquad x, x' \sim P_S,\ y, y' \sim P_T

Reference: Gretton, Borgwardt, Rasch, Schölkopf & Smola (2012), A kernel two-sample test, JMLR 13.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._base import metric, sqdist

__all__ = ["mmd_linear", "median_bandwidth", "mmd_rbf", "cmmd_rbf"]


@metric("mmd_linear", label="MMD (linear)")
def mmd_linear(student_feats: Tensor, teacher_feats: Tensor, labels=None, student_logits=None,
               teacher_logits=None) -> Tensor:
    r"""MMD² with the linear kernel k(x, y) = xᵀy: the squared distance between the batch means.

    .. math::
        \mathrm{MMD}^2 = \Big\|\frac1{n_S}\sum_i x_i - \frac1{n_T}\sum_j y_j\Big\|^2

    Parameters
    ----------
    student_feats : Tensor (n_s, d)
    teacher_feats : Tensor (n_t, d)   (n_t may differ from n_s)
    labels, student_logits, teacher_logits : ignored

    Returns
    -------
    0-dim Tensor, ≥ 0.

    Cost: O((n_s + n_t) d).
    """
    return (student_feats.mean(0) - teacher_feats.mean(0)).square().sum()


def _check_options(name: str, bandwidth, multipliers, unbiased) -> tuple[float, ...]:
    if bandwidth is not None:
        if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)) \
                or not math.isfinite(bandwidth) or bandwidth <= 0:
            raise ValueError(f"{name}: bandwidth must be None (median heuristic) or a float > 0, got {bandwidth!r}")
    try:
        mults = tuple(float(m) for m in multipliers)
    except TypeError:
        raise ValueError(f"{name}: multipliers must be a sequence of floats > 0, got {multipliers!r}") from None
    if not mults or not all(math.isfinite(m) and m > 0 for m in mults):
        raise ValueError(f"{name}: multipliers must be a non-empty sequence of floats > 0, got {multipliers!r}")
    if not isinstance(unbiased, bool):
        raise TypeError(f"{name}: unbiased must be True or False, got {unbiased!r}")
    return mults


#: Squared distances below ``_ROUNDOFF_FACTOR · √d · eps(dtype) · max sq`` are round-off of
#: coinciding points (‖x‖² + ‖y‖² − 2xᵀy leaves ~eps·‖x‖² for x = y, growing like √d with the
#: length of the dot products), not a distance: a median below it counts as 0.
_ROUNDOFF_FACTOR = 16.0


def median_bandwidth(sq: Tensor, d: int = 1) -> Tensor:
    """Median heuristic σ from the pooled squared-distance matrix ``sq`` (m, m), detached.

    σ = lower median of the m(m−1)/2 distances ‖z_i − z_j‖, i < j (``torch.median`` returns
    the lower of the two middle values). If that median is 0 (more than half the pairs
    coincide) σ is the mean pairwise distance (1/#pairs) Σ_{i<j} ‖z_i − z_j‖, and if all points
    coincide σ = 1 (then MMD² = 0 for any σ). "0" is relative to the data: a squared median
    below 16·√d·eps·max(sq) (``d`` the feature width, eps of sq's dtype) is the round-off that
    the expansion ‖x‖² + ‖y‖² − 2xᵀy leaves for coinciding points, and counts as 0 (else σ
    comes out ~1e-8, the kernel degenerates to the identity and the biased MMD² goes negative).
    """
    m = sq.shape[0]
    if m < 2:  # a single pooled point cannot happen (n_s, n_t ≥ 1), kept for safety
        return sq.new_ones(())
    pairs = m * (m - 1) // 2
    sq = sq.detach()
    # The off-diagonal entries hold every pair twice, and the lower median of a list with every
    # value doubled is the lower median of the list. Setting ceil(m/2) diagonal entries to -inf and
    # the rest to +inf puts that element exactly at the lower median of all m² entries, so one
    # median over a copy of sq finds it: no m²/2 index pairs (8·m² bytes) and no gathered triangle.
    dm = sq.clone()
    diag = dm.diagonal()
    diag.fill_(float("inf"))
    diag[: (m + 1) // 2] = float("-inf")
    med = dm.median()
    del dm
    # Both branches are computed and chosen by torch.where: no value is read back to the host (a
    # read per step would wait for the device). The arithmetic is that of Python floats (the
    # floor and the mean in float64, the comparisons with sq in sq's dtype), so σ is the same.
    floor = (_ROUNDOFF_FACTOR * math.sqrt(max(d, 1)) * torch.finfo(sq.dtype).eps) * sq.max().double()
    # the mean distance, with round-off of coinciding pairs counted as 0 (diagonal included: 0)
    mean = torch.where(sq > floor.to(sq.dtype), sq, 0.0).sqrt_().sum().double() / (2 * pairs)
    fallback = torch.where(mean > 0, mean, 1.0).to(sq.dtype)
    # sqrt after choosing: the median of distances is the sqrt of the median of squared distances
    return torch.where(med.double() > floor, med.sqrt(), fallback)


def _pooled_kernel(s: Tensor, t: Tensor, bandwidth, mults: tuple[float, ...]) -> Tensor:
    """Mean over multipliers m of exp(−‖z_i − z_j‖² / (2 (σ m)²)) on the pooled batch [s; t]."""
    z = torch.cat([s, t])
    # distances are translation-invariant: centring first avoids cancellation in ‖x‖²+‖y‖²−2xᵀy
    # when features share a large offset (the detached shift changes neither value nor gradient)
    z = z - z.detach().mean(0)
    sq = sqdist(z, z)   # clamped at 0
    sigma = median_bandwidth(sq, z.shape[1]) if bandwidth is None else sq.new_tensor(float(bandwidth))
    return torch.stack([torch.exp(-sq / (2.0 * (sigma * m) ** 2)) for m in mults]).mean(0)


def _block_sums(K: Tensor, onehot: Tensor) -> Tensor:
    """(C,) sums of K[i, j] over the pairs i, j that both belong to class c; onehot is (n, C)."""
    return ((K @ onehot) * onehot).sum(0)


def _mmd_from_sums(sss: Tensor, stt: Tensor, sst: Tensor, dss: Tensor, dtt: Tensor, ns, nt,
                   unbiased: bool) -> Tensor:
    """MMD² from within/cross kernel sums (ss, tt, st), kernel-diagonal sums and sample counts."""
    ns = torch.as_tensor(ns, dtype=sss.dtype, device=sss.device)
    nt = torch.as_tensor(nt, dtype=sss.dtype, device=sss.device)
    # A squared RKHS norm: ≥ 0 in exact arithmetic; the clamp removes round-off below 0.
    biased = (sss / ns**2 + stt / nt**2 - 2.0 * sst / (ns * nt)).clamp_min(0.0)
    if not unbiased:
        return biased
    # U-statistic: drop the i == i' terms; where a side has one sample it is undefined, and the
    # biased value is kept (only reachable from cmmd_rbf, mmd_rbf raises before)
    u = ((sss - dss) / (ns * (ns - 1).clamp_min(1)) + (stt - dtt) / (nt * (nt - 1).clamp_min(1))
         - 2.0 * sst / (ns * nt))
    return torch.where((ns > 1) & (nt > 1), u, biased)


@metric("mmd_rbf", label="MMD (RBF)", pairwise_factor=13)
def mmd_rbf(student_feats: Tensor, teacher_feats: Tensor, labels=None, student_logits=None, teacher_logits=None,
            *, bandwidth: float | None = None, multipliers: Sequence[float] = (1.0,),
            unbiased: bool = False) -> Tensor:
    r"""Squared MMD with the Gaussian (RBF) kernel, one or several bandwidths.

    .. math::
        k(x, y) = \frac1{|M|}\sum_{m\in M}\exp\Big(-\frac{\|x-y\|^2}{2(\sigma m)^2}\Big)

        \widehat{\mathrm{MMD}}^2_b = \frac1{n_S^2}\sum_{i,i'}k(x_i,x_{i'}) + \frac1{n_T^2}\sum_{j,j'}k(y_j,y_{j'})
            - \frac2{n_Sn_T}\sum_{i,j}k(x_i,y_j)

    The unbiased U-statistic replaces the first two sums by sums over i ≠ i' divided by
    n(n − 1); it can be slightly negative.

    Parameters
    ----------
    student_feats : Tensor (n_s, d)
    teacher_feats : Tensor (n_t, d)   (n_t may differ from n_s)
    labels, student_logits, teacher_logits : ignored
    bandwidth : float or None, default None
        σ; None = median heuristic: the (lower) median pairwise distance of the pooled
        student+teacher batch, detached (the mean pairwise distance if that median is 0 up to
        round-off; see :func:`median_bandwidth`).
    multipliers : sequence of float, default (1.0,)
        M; the kernel is the mean of RBF kernels at σ·m, e.g. (0.25, 0.5, 1, 2, 4).
    unbiased : bool, default False
        False: biased V-statistic (≥ 0, clamped against round-off); True: U-statistic, needs
        n_s ≥ 2 and n_t ≥ 2.

    Returns
    -------
    0-dim Tensor.

    Cost: O((n_s + n_t)² (d + |M|)) time, O((n_s + n_t)²) memory.

    References
    ----------
    Gretton et al. (2012), A kernel two-sample test, JMLR 13, Eq. 3-5; median heuristic §8.
    """
    mults = _check_options("mmd_rbf", bandwidth, multipliers, unbiased)
    ns, nt = student_feats.shape[0], teacher_feats.shape[0]
    if unbiased and (ns < 2 or nt < 2):
        raise ValueError(f"mmd_rbf: unbiased=True needs at least 2 samples per side, got n_s={ns}, n_t={nt}")
    K = _pooled_kernel(student_feats, teacher_feats, bandwidth, mults)
    Kss, Ktt, Kst = K[:ns, :ns], K[ns:, ns:], K[:ns, ns:]
    return _mmd_from_sums(Kss.sum(), Ktt.sum(), Kst.sum(), Kss.diagonal().sum(), Ktt.diagonal().sum(),
                          ns, nt, unbiased)


@metric("cmmd_rbf", needs_labels=True, label="CMMD (RBF)", pairwise_factor=13, label_free="mmd_rbf")
def cmmd_rbf(student_feats: Tensor, teacher_feats: Tensor, labels=None, student_logits=None, teacher_logits=None,
             *, bandwidth: float | None = None, multipliers: Sequence[float] = (1.0,),
             unbiased: bool = False) -> Tensor:
    r"""Class-conditional RBF MMD²: mean of :func:`mmd_rbf` over the classes present.

    .. math::
        \frac1C\sum_c \widehat{\mathrm{MMD}}^2\big(\{x_i : y_i = c\}, \{x'_i : y_i = c\}\big)

    The bandwidth (median heuristic when None) is computed once from the whole pooled batch, so
    every class is measured with the same kernel and the terms are comparable. With
    ``unbiased=True`` a class with a single sample falls back to the biased estimator (the
    U-statistic needs two); no error is raised for it.

    Parameters
    ----------
    student_feats, teacher_feats : Tensor (n, d)
    labels : Tensor (n,) int
    bandwidth, multipliers, unbiased : as :func:`mmd_rbf`

    Returns
    -------
    0-dim Tensor.

    Cost: O(n² (d + |M| + C)): one pooled kernel matrix, class blocks summed with one-hot products.
    """
    mults = _check_options("cmmd_rbf", bandwidth, multipliers, unbiased)
    n = student_feats.shape[0]
    K = _pooled_kernel(student_feats, teacher_feats, bandwidth, mults)
    _, inv, counts = torch.unique(labels.to(K.device), return_inverse=True, return_counts=True)
    C = counts.shape[0]
    Kss, Ktt, Kst = K[:n, :n], K[n:, n:], K[:n, n:]
    onehot = torch.nn.functional.one_hot(inv, C).to(K.dtype)  # (n, C)
    sss, stt, sst = (_block_sums(B, onehot) for B in (Kss, Ktt, Kst))
    dss = Kss.diagonal() @ onehot
    dtt = Ktt.diagonal() @ onehot
    cnt = counts.to(K.dtype)
    return _mmd_from_sums(sss, stt, sst, dss, dtt, cnt, cnt, unbiased).mean()
