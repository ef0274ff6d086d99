r"""Gaussian measure modelling: fit N(μ, Σ) to each batch and compare the two Gaussians.

Metrics: ``gauss_w2`` (Bures-Wasserstein), ``gauss_cw2`` (its class-conditional mean),
``gauss_kl`` (KL(N_S ‖ N_T)), ``gauss_ckl`` (its class-conditional mean). Each offers the full
covariance (default, the paper's formulas) or ``diagonal=True`` (the reference code's choice).

Fitting. μ is the batch mean and Σ the biased (1/n) covariance, plus a ridge

.. math::
    \Sigma + r I_d,\qquad r = \rho \cdot \max(\tau, 10^{-20}),\qquad
    \tau = \tfrac1d \textstyle\sum_j \mathrm{Var}_j([X_S; X_T])\ \text{(detached)}

with ρ = ``ridge`` (default 1e-5) and τ the mean per-channel variance of the pooled
student+teacher batch (the whole batch, also in class-conditional metrics). The ridge keeps the
loss and its gradient finite when a channel is dead, when a class has fewer samples than
dimensions or when n = 1; being the same for student and teacher, it keeps D(P, P) = 0 and
gauss_w2 symmetric; being proportional to τ, it is scale-aware. ``ridge=0`` gives the plain
formulas (and an error when a covariance is singular).

τ is detached: the gradient is that of the metric at a fixed ridge (the ridge is a numerical
scale, not something for the student to optimise).

Precision. Computations run in float64 whatever the input dtype (float32 Cholesky and
eigenvalues of covariances whose condition number reaches d/ρ lose too many digits); the
result is cast back to the inputs' dtype, and the gradient flows back in it. Two steps that
only need the inputs' precision use it: τ (a scale), and in ``gauss_w2``/``gauss_cw2`` the last
(n × d)·(d × d) product of the backward pass, whose d × d factor I − T is formed in float64.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import value_checks
from ._base import metric
from .linalg import (
    DEFAULT_RIDGE,
    bures_trace,
    class_gaussian_factors,
    gaussian_factor,
    gaussian_kl,
    ridge_scale,
    singular_covariance_message,
)

__all__ = ["gauss_w2", "gauss_cw2", "gauss_kl", "gauss_ckl"]


def _prepare(name: str, s: Tensor, t: Tensor, diagonal, ridge) -> tuple[Tensor, Tensor, Tensor, torch.dtype]:
    if not isinstance(diagonal, bool):
        raise TypeError(f"{name}: diagonal must be True or False, got {diagonal!r}")
    try:
        r = ridge_scale(s, t, ridge)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    out_dtype = torch.promote_types(s.dtype, t.dtype)
    return s.to(torch.float64), t.to(torch.float64), r, out_dtype


def _diag_variances(Z: Tensor, r: Tensor, who: str) -> Tensor:
    """Per-channel variances + ridge, (..., d); the full route's singular-covariance error if one is 0.

    Only reachable with ridge=0 (r > 0 otherwise): a dead channel or a one-sample class gives a
    zero variance, whose log (KL) is −inf and whose square root (W2) has an infinite derivative.
    """
    v = Z.square().sum(-2) + r
    if value_checks.eager() and float(r) == 0.0 and not bool((v > 0).all()):
        raise ValueError(singular_covariance_message(who))
    return v


def _diag_w2(mu_s: Tensor, Zs: Tensor, mu_t: Tensor, Zt: Tensor, r: Tensor, who: str) -> Tensor:
    # variances + ridge, then Σ_j (√σ²_S − √σ²_T)²: the Bures term for commuting (diagonal) Σ
    vs = _diag_variances(Zs, r, who)
    vt = _diag_variances(Zt, r, who)
    return (mu_s - mu_t).square().sum(-1) + (vs.sqrt() - vt.sqrt()).square().sum(-1)


def _diag_kl(mu_s: Tensor, Zs: Tensor, mu_t: Tensor, Zt: Tensor, r: Tensor, who: str) -> Tensor:
    vs = _diag_variances(Zs, r, who)
    vt = _diag_variances(Zt, r, who)
    # log of the ridged variances, never of an unfloored std (the reference code's NaN)
    terms = vs / vt + (mu_t - mu_s).square() / vt - 1.0 + vt.log() - vs.log()
    return 0.5 * terms.sum(-1)


def _w2(mu_s, Zs, mu_t, Zt, r, diagonal: bool, who: str, out: torch.dtype) -> Tensor:
    if diagonal:
        return _diag_w2(mu_s, Zs, mu_t, Zt, r, who)
    # the gradient leaves in the inputs' dtype, so its last product may run in it (at least float32)
    grad_dtype = torch.promote_types(out, torch.float32)
    return (mu_s - mu_t).square().sum(-1) + bures_trace(Zs, Zt, r, who, grad_dtype)


def _kl(mu_s, Zs, mu_t, Zt, r, diagonal: bool, who: str) -> Tensor:
    if diagonal:
        return _diag_kl(mu_s, Zs, mu_t, Zt, r, who)
    return gaussian_kl(mu_s, Zs, mu_t, Zt, r, who)


@metric("gauss_w2", label="W2 (G)")
def gauss_w2(student_feats: Tensor, teacher_feats: Tensor, labels=None, student_logits=None, teacher_logits=None,
             *, diagonal: bool = False, ridge: float = DEFAULT_RIDGE) -> Tensor:
    r"""Squared 2-Wasserstein (Bures-Wasserstein) distance between Gaussians fitted to the batches.

    .. math::
        W_2^2 = \|\mu_S - \mu_T\|^2 + \mathrm{Tr}\big(\Sigma_S + \Sigma_T
                 - 2(\Sigma_S^{1/2}\Sigma_T\Sigma_S^{1/2})^{1/2}\big)

    with ridged covariances Σ + r·I (module docstring: r = ρ·max(τ, 1e-20), τ the pooled mean
    channel variance, detached). The root term is computed as
    :math:`\sum_i\sqrt{\lambda_i(L_S^\top\Sigma_T L_S)}`, :math:`\Sigma_S = L_SL_S^\top`: one
    Cholesky and one symmetric eigendecomposition (eigenvalues floored before the square root),
    in float64, and a closed-form gradient through the optimal-transport maps
    (:class:`kd2m.metrics.linalg._BuresTerm`), finite for repeated eigenvalues.
    When :math:`n_S + n_T \le 0.75 d` it runs exactly on (n_S+n_T)-sized matrices (the shared
    ridge makes the rest of the space contribute 0). With ``diagonal=True``:
    :math:`\|\mu_S-\mu_T\|^2 + \sum_j(\sigma_{S,j} - \sigma_{T,j})^2`, σ² = variance + r.

    Parameters
    ----------
    student_feats : Tensor (n_s, d)
    teacher_feats : Tensor (n_t, d)   (n_t may differ from n_s)
    labels, student_logits, teacher_logits : ignored
    diagonal : bool, default False
        diagonal covariances instead of full ones.
    ridge : float, default 1e-5
        ρ ≥ 0, relative ridge; 0 for the unregularised formula (needs definite covariances
        when ``diagonal=False``, i.e. n > d and no dead channel).

    Returns
    -------
    0-dim Tensor in the inputs' dtype, ≥ 0 (clamped against round-off).

    Cost: O((n_s+n_t) d² + d³) full covariance (O(k d² + k³), k = n_s + n_t, on the low-rank
    route); O((n_s+n_t) d) diagonal.

    References
    ----------
    Peyré & Cuturi (2019), Computational Optimal Transport, Remark 2.31.
    Montesuma (2025), KD²M: an unifying framework for feature knowledge distillation.
    """
    s, t, r, out = _prepare("gauss_w2", student_feats, teacher_feats, diagonal, ridge)
    mu_s, Zs = gaussian_factor(s)
    mu_t, Zt = gaussian_factor(t)
    return _w2(mu_s, Zs, mu_t, Zt, r, diagonal, "gauss_w2", out).clamp_min(0.0).to(out)


@metric("gauss_cw2", needs_labels=True, label="CW2 (G)", label_free="gauss_w2")
def gauss_cw2(student_feats: Tensor, teacher_feats: Tensor, labels=None, student_logits=None, teacher_logits=None,
              *, diagonal: bool = False, ridge: float = DEFAULT_RIDGE) -> Tensor:
    r"""Class-conditional Bures-Wasserstein: mean of :func:`gauss_w2` over the classes present.

    .. math::
        \frac1C\sum_{c} W_2^2\big(\mathcal N(\mu_{S,c},\Sigma_{S,c}+rI),\ \mathcal N(\mu_{T,c},\Sigma_{T,c}+rI)\big)

    Class statistics use the samples with ``labels == c`` (1/n_c covariance); the ridge r is
    computed once from the whole batch, so a one-sample class (Σ_c = 0) still gets a finite
    loss and gradient. All classes are processed in one batched Cholesky/eigh (zero-padded
    to the largest class; exact low-rank route when 2·n_max ≤ 0.75 d).

    Parameters
    ----------
    student_feats, teacher_feats : Tensor (n, d)
    labels : Tensor (n,) int
    diagonal : bool, default False
    ridge : float, default 1e-5 (see :func:`gauss_w2`)

    Returns
    -------
    0-dim Tensor in the inputs' dtype.

    Cost: O(C·(n_max d² + d³)) full covariance, O(C·(n_max² d + n_max³)) on the low-rank route.
    """
    s, t, r, out = _prepare("gauss_cw2", student_feats, teacher_feats, diagonal, ridge)
    ((mu_s, Zs), (mu_t, Zt)), _ = class_gaussian_factors((s, t), labels)
    return _w2(mu_s, Zs, mu_t, Zt, r, diagonal, "gauss_cw2", out).clamp_min(0.0).mean().to(out)


@metric("gauss_kl", label="KL (G)")
def gauss_kl(student_feats: Tensor, teacher_feats: Tensor, labels=None, student_logits=None, teacher_logits=None,
             *, diagonal: bool = False, ridge: float = DEFAULT_RIDGE) -> Tensor:
    r"""KL divergence KL(N_S ‖ N_T) between Gaussians fitted to the batches.

    .. math::
        \tfrac12\Big[\mathrm{Tr}(\Sigma_T^{-1}\Sigma_S) + (\mu_T-\mu_S)^\top\Sigma_T^{-1}(\mu_T-\mu_S)
        - d + \log\det\Sigma_T - \log\det\Sigma_S\Big]

    with ridged covariances (see :func:`gauss_w2`), by Cholesky factors: the trace is
    :math:`\|L_T^{-1}L_S\|_F^2`, the Mahalanobis term :math:`\|L_T^{-1}(\mu_T-\mu_S)\|^2`
    (triangular solves) and the log-determinants come from the factors' diagonals, in float64.
    Exact low-rank route when n_s + n_t + 1 ≤ 0.75 d. With ``diagonal=True``:
    :math:`\tfrac12\sum_j[\sigma^2_{S,j}/\sigma^2_{T,j} + (\mu_{T,j}-\mu_{S,j})^2/\sigma^2_{T,j}
    - 1 + \log\sigma^2_{T,j} - \log\sigma^2_{S,j}]`, σ² = variance + r, finite on a dead channel.

    Not symmetric. Note that when n < d the fitted covariances are rank-deficient and the
    value is dominated by the ridge (directions the teacher does not span cost ~ 1/ρ each).

    Parameters
    ----------
    student_feats : Tensor (n_s, d)
    teacher_feats : Tensor (n_t, d)
    labels, student_logits, teacher_logits : ignored
    diagonal : bool, default False
    ridge : float, default 1e-5
        ρ ≥ 0; 0 needs definite covariances (full: n > d; diagonal: no dead channel).

    Returns
    -------
    0-dim Tensor in the inputs' dtype, ≥ 0 (clamped against round-off).

    Cost: O((n_s+n_t) d² + d³) full (O(k d² + k³) low-rank), O((n_s+n_t) d) diagonal.

    References
    ----------
    Montesuma (2025), KD²M: an unifying framework for feature knowledge distillation.
    """
    s, t, r, out = _prepare("gauss_kl", student_feats, teacher_feats, diagonal, ridge)
    mu_s, Zs = gaussian_factor(s)
    mu_t, Zt = gaussian_factor(t)
    return _kl(mu_s, Zs, mu_t, Zt, r, diagonal, "gauss_kl").clamp_min(0.0).to(out)


@metric("gauss_ckl", needs_labels=True, label="CKL (G)", label_free="gauss_kl")
def gauss_ckl(student_feats: Tensor, teacher_feats: Tensor, labels=None, student_logits=None, teacher_logits=None,
              *, diagonal: bool = False, ridge: float = DEFAULT_RIDGE) -> Tensor:
    r"""Class-conditional Gaussian KL: mean of :func:`gauss_kl` over the classes present.

    .. math::
        \frac1C\sum_c \mathrm{KL}\big(\mathcal N(\mu_{S,c},\Sigma_{S,c}+rI)\,\|\,\mathcal N(\mu_{T,c},\Sigma_{T,c}+rI)\big)

    Ridge r from the whole batch (see :func:`gauss_cw2`); classes batched in one call.

    Parameters
    ----------
    student_feats, teacher_feats : Tensor (n, d)
    labels : Tensor (n,) int
    diagonal : bool, default False
    ridge : float, default 1e-5

    Returns
    -------
    0-dim Tensor in the inputs' dtype.

    Cost: as :func:`gauss_cw2`.
    """
    s, t, r, out = _prepare("gauss_ckl", student_feats, teacher_feats, diagonal, ridge)
    ((mu_s, Zs), (mu_t, Zt)), _ = class_gaussian_factors((s, t), labels)
    return _kl(mu_s, Zs, mu_t, Zt, r, diagonal, "gauss_ckl").clamp_min(0.0).mean().to(out)
