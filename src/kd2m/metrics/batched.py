r"""Metrics on many small distributions at once: one distance per image, batched.

``KD2MLoss(unit="spatial")`` compares, for every image i of a batch, the distribution of its
h·w position vectors (or L tokens) in the student with the teacher's. The inputs here are sets

    student (B, m_s, d), teacher (B, m_t, d)  ->  (B,) distances

and ``spatial_distance(name, s, t, **options)`` returns the B values of ``metrics.get(name,
**options)(s[i], t[i])``, computed without a Python loop for

- ``gauss_w2``, ``gauss_kl`` (full and diagonal): batched means, factors, Cholesky and ``eigh``
  (:mod:`kd2m.metrics.linalg` is batched over leading dims);
- ``mmd_rbf``, ``mmd_linear``: batched kernel matrices and per-set median bandwidths;
- ``sliced_w2``: one set of directions for all sets, batched sorts.

Other metrics (exact OT ``w2``, ``gw2``, ``sinkhorn``) run one set at a time: POT's exact
solver takes one problem per call. Class-conditional metrics are not defined per set (every
position of an image has the image's label): those that read labels (``MetricSpec.uses_labels``) are refused.

Per-set ridge. A Gaussian metric called on set i alone uses the ridge r_i = ρ·τ_i, τ_i the mean
channel variance of that set's pooled student+teacher samples. The diagonal forms add r_i
elementwise; the batched Cholesky/eigh take one scalar ridge, so each set is divided by √τ_i first and the result multiplied back: with
Σ + ρτ_iI = τ_i(Σ/τ_i + ρI), W₂² is 1-homogeneous in the covariances and the means² and the
KL divergence 0-homogeneous, so the values (and, τ_i being detached, the gradients) are those of
the per-set calls, exactly.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import get, spec
from .linalg import DEFAULT_RIDGE, TAU_FLOOR, bures_trace, gaussian_kl
from .mmd import _check_options
from .sliced import _quantile_pairs, random_projections

__all__ = ["GAUSS_W2_SET_OPTIONS", "set_gauss_w2", "set_gauss_kl", "set_mmd_linear", "set_mmd_rbf", "set_sliced_w2",
           "is_batched", "check_set_metric", "spatial_distance"]

#: options of the spatial ``gauss_w2`` beyond the metric's own (WKD-F's conventions; see
#: :func:`set_gauss_w2`), with their defaults (which give exactly ``metrics.gauss_w2`` per set)
GAUSS_W2_SET_OPTIONS = {"mean_weight": 1.0, "correction": 0, "abs_ridge": None}


def _set_scale(s: Tensor, t: Tensor, ridge, abs_ridge) -> tuple[Tensor, Tensor]:
    """Per-set scale τ_i (B,) and the common ridge r (0-dim), both float64, detached.

    Relative ridge: τ_i = max(mean channel variance of [s_i; t_i], 1e-20) (as
    :func:`kd2m.metrics.linalg.ridge_scale` computes it for one set), r = ρ. Absolute ridge: τ = 1,
    r = ``abs_ridge``.
    """
    B = s.shape[0]
    if abs_ridge is not None:
        if isinstance(abs_ridge, bool) or not isinstance(abs_ridge, (int, float)) or not abs_ridge >= 0:
            raise ValueError(f"abs_ridge must be None or a float >= 0, got {abs_ridge!r}")
        return s.new_ones(B, dtype=torch.float64), torch.tensor(float(abs_ridge), dtype=torch.float64,
                                                                 device=s.device)
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0.0:
        raise ValueError(f"ridge must be a float >= 0, got {ridge!r}")
    pooled = torch.cat([s.detach(), t.detach()], -2)
    pooled = pooled.to(torch.promote_types(pooled.dtype, torch.float32))
    tau = pooled.var(-2, unbiased=False).mean(-1).to(torch.float64).clamp_min(TAU_FLOOR)
    return tau, torch.tensor(float(ridge), dtype=torch.float64, device=s.device)


def _set_factors(x: Tensor, correction: int) -> tuple[Tensor, Tensor]:
    """Means (B, d) and centred factors Z (B, m, d) with Σ = ZᵀZ = Σ_j (x_j − μ)(x_j − μ)ᵀ / (m − correction)."""
    m = x.shape[-2]
    mu = x.mean(-2)
    return mu, (x - mu.unsqueeze(-2)) / math.sqrt(m - correction)


def _check_correction(correction, m: int) -> int:
    if correction not in (0, 1) or isinstance(correction, bool):
        raise ValueError(f"correction must be 0 (1/m covariance) or 1 (1/(m-1), Bessel), got {correction!r}")
    if m - correction < 1:
        raise ValueError(f"correction={correction} needs more than {correction} sample(s) per set, got {m}")
    return correction


def set_gauss_w2(s: Tensor, t: Tensor, *, diagonal: bool = False, ridge: float = DEFAULT_RIDGE,
                 mean_weight: float = 1.0, correction: int = 0, abs_ridge: float | None = None) -> Tensor:
    r"""Bures-Wasserstein W₂² between Gaussians fitted to each set, batched: (B, m_s, d), (B, m_t, d) -> (B,).

    .. math::
        D_i = w\,\|\mu_{S,i}-\mu_{T,i}\|^2 + \mathrm{Tr}\big(\Sigma_{S,i}+\Sigma_{T,i}
              - 2(\Sigma_{S,i}^{1/2}\Sigma_{T,i}\Sigma_{S,i}^{1/2})^{1/2}\big),\quad
        \Sigma = \tfrac{1}{m - c}\textstyle\sum_j (x_j-\mu)(x_j-\mu)^\top + r_i I

    With the defaults (w = 1, c = 0, r_i = ρ·τ_i) each D_i equals ``metrics.gauss_w2(s[i],
    t[i], diagonal=, ridge=)``. The three extra options give WKD-F's conventions (Lv et al.,
    NeurIPS 2024): ``mean_weight`` w (their ``MEAN_COV_RATIO``: 4 on CIFAR-100, 2 on ImageNet),
    ``correction=1`` (their ``torch.var`` is unbiased) and ``abs_ridge`` (their ``eps`` = 1e-5
    added to every variance, instead of the relative ridge); with ``diagonal=True`` these make
    mean_i D_i their feature loss (checked against ``wkd_feature_loss`` with ``grid=1`` in
    ``mdistiller/distillers/WKD.py`` of the WKD repository, the fork hainn2803/WKD).

    Computed in float64, returned in the inputs' dtype, clamped at 0.
    Cost: O(B(m d² + d³)) full (O(B(k d² + k³)), k = m_s + m_t ≤ 0.75 d, on the low-rank route);
    O(B m d) diagonal.
    """
    if not isinstance(diagonal, bool):
        raise TypeError(f"gauss_w2: diagonal must be True or False, got {diagonal!r}")
    if isinstance(mean_weight, bool) or not isinstance(mean_weight, (int, float)) or not mean_weight >= 0:
        raise ValueError(f"gauss_w2: mean_weight must be a float >= 0, got {mean_weight!r}")
    correction = _check_correction(correction, min(s.shape[-2], t.shape[-2]))
    out = torch.promote_types(s.dtype, t.dtype)
    tau, r = _set_scale(s, t, ridge, abs_ridge)
    if diagonal:  # elementwise: the per-set ridge τ_i·r broadcasts, no rescaling needed
        mu_s, Zs = _set_factors(s.to(torch.float64), correction)
        mu_t, Zt = _set_factors(t.to(torch.float64), correction)
        ri = (tau * r)[:, None]
        covs = ((Zs.square().sum(-2) + ri).sqrt() - (Zt.square().sum(-2) + ri).sqrt()).square().sum(-1)
        return (float(mean_weight) * (mu_s - mu_t).square().sum(-1) + covs).clamp_min(0.0).to(out)
    root = tau.sqrt()[:, None, None]
    mu_s, Zs = _set_factors(s.to(torch.float64) / root, correction)
    mu_t, Zt = _set_factors(t.to(torch.float64) / root, correction)
    means = float(mean_weight) * (mu_s - mu_t).square().sum(-1)
    covs = bures_trace(Zs, Zt, r, "gauss_w2", torch.promote_types(out, torch.float32))
    return ((means + covs) * tau).clamp_min(0.0).to(out)


def set_gauss_kl(s: Tensor, t: Tensor, *, diagonal: bool = False, ridge: float = DEFAULT_RIDGE) -> Tensor:
    r"""KL(N_S,i ‖ N_T,i) between Gaussians fitted to each set, batched: (B, m_s, d), (B, m_t, d) -> (B,).

    Each value equals ``metrics.gauss_kl(s[i], t[i], diagonal=, ridge=)`` (1/m covariances,
    ridge ρ·τ_i; the KL divergence is unchanged by the per-set rescaling). Float64 inside.
    Cost: O(B(m d² + d³)) full, O(B m d) diagonal.
    """
    if not isinstance(diagonal, bool):
        raise TypeError(f"gauss_kl: diagonal must be True or False, got {diagonal!r}")
    out = torch.promote_types(s.dtype, t.dtype)
    tau, r = _set_scale(s, t, ridge, None)
    if diagonal:  # elementwise: the per-set ridge τ_i·r broadcasts
        mu_s, Zs = _set_factors(s.to(torch.float64), 0)
        mu_t, Zt = _set_factors(t.to(torch.float64), 0)
        ri = (tau * r)[:, None]
        vs = Zs.square().sum(-2) + ri
        vt = Zt.square().sum(-2) + ri
        kl = 0.5 * (vs / vt + (mu_t - mu_s).square() / vt - 1.0 + vt.log() - vs.log()).sum(-1)
    else:
        root = tau.sqrt()[:, None, None]
        mu_s, Zs = _set_factors(s.to(torch.float64) / root, 0)
        mu_t, Zt = _set_factors(t.to(torch.float64) / root, 0)
        kl = gaussian_kl(mu_s, Zs, mu_t, Zt, r, "gauss_kl")
    return kl.clamp_min(0.0).to(out)


def set_mmd_linear(s: Tensor, t: Tensor) -> Tensor:
    """‖mean(s_i) − mean(t_i)‖² per set: (B, m_s, d), (B, m_t, d) -> (B,). Cost: O(B m d)."""
    return (s.mean(-2) - t.mean(-2)).square().sum(-1)


def _set_median_bandwidth(sq: Tensor) -> Tensor:
    """Per-set median-heuristic σ (B,) from pooled squared distances (B, M, M), detached.

    As :func:`kd2m.metrics.mmd.median_bandwidth` for each set: the lower median of the
    pairwise distances (the diagonal is set to ±∞ in equal halves so one median over the M²
    entries lands on it), else the mean distance, else 1.
    """
    B, M, _ = sq.shape
    if M < 2:
        return sq.new_ones(B)
    d = sq.detach().clone()
    diag = d.diagonal(dim1=-2, dim2=-1)
    diag.fill_(float("inf"))
    diag[:, : (M + 1) // 2] = float("-inf")
    med = d.flatten(1).median(-1).values
    del d
    pairs = M * (M - 1) // 2
    mean = (sq.detach().sum((-2, -1)) - sq.detach().diagonal(dim1=-2, dim2=-1).sum(-1)) / (2 * pairs)
    sigma2 = torch.where(med > 0, med, torch.where(mean > 0, mean, torch.ones_like(mean)))
    return sigma2.sqrt()


def set_mmd_rbf(s: Tensor, t: Tensor, *, bandwidth: float | None = None, multipliers=(1.0,),
                unbiased: bool = False) -> Tensor:
    r"""RBF-kernel MMD² per set, batched: (B, m_s, d), (B, m_t, d) -> (B,).

    Each value equals ``metrics.mmd_rbf(s[i], t[i], bandwidth=, multipliers=, unbiased=)``:
    one kernel matrix per set on the pooled, centred samples; the median-heuristic bandwidth is
    computed per set. Cost: O(B (m_s + m_t)² (d + ``|M|``)) time, O(B (m_s + m_t)²) memory.
    """
    mults = _check_options("mmd_rbf", bandwidth, multipliers, unbiased)
    ns, nt = s.shape[-2], t.shape[-2]
    if unbiased and (ns < 2 or nt < 2):
        raise ValueError(f"mmd_rbf: unbiased=True needs at least 2 samples per side, got n_s={ns}, n_t={nt}")
    z = torch.cat([s, t.to(s.dtype)], -2)
    z = z - z.detach().mean(-2, keepdim=True)  # translation-invariant; avoids cancellation below
    zz = z.square().sum(-1)
    sq = (zz.unsqueeze(-1) + zz.unsqueeze(-2) - 2.0 * z @ z.transpose(-1, -2)).clamp_min(0.0)
    sigma = _set_median_bandwidth(sq) if bandwidth is None else sq.new_full((z.shape[0],), float(bandwidth))
    K = torch.stack([torch.exp(-sq / (2.0 * (sigma * m)[:, None, None] ** 2)) for m in mults]).mean(0)
    Kss, Ktt, Kst = K[:, :ns, :ns], K[:, ns:, ns:], K[:, :ns, ns:]
    sss, stt, sst = Kss.sum((-2, -1)), Ktt.sum((-2, -1)), Kst.sum((-2, -1))
    biased = sss / ns**2 + stt / nt**2 - 2.0 * sst / (ns * nt)
    if not unbiased:
        return biased
    dss = Kss.diagonal(dim1=-2, dim2=-1).sum(-1)
    dtt = Ktt.diagonal(dim1=-2, dim2=-1).sum(-1)
    return (sss - dss) / (ns * (ns - 1)) + (stt - dtt) / (nt * (nt - 1)) - 2.0 * sst / (ns * nt)


def set_sliced_w2(s: Tensor, t: Tensor, *, n_projections: int = 128, seed: int | None = None) -> Tensor:
    r"""Sliced W₂² per set along one shared set of L directions: (B, m_s, d), (B, m_t, d) -> (B,).

    With an int ``seed`` each value equals ``metrics.sliced_w2(s[i], t[i], n_projections=,
    seed=)`` (the same directions at every call). With ``seed=None`` one draw serves all B sets
    (a per-set loop would draw B times): each value is still an unbiased estimate of its sliced
    distance. Cost: O(B (m_s + m_t) d L + B L m log m).
    """
    L = int(n_projections)
    if L < 1:
        raise ValueError(f"sliced_w2: n_projections must be >= 1, got {n_projections}")
    theta = random_projections(s.shape[-1], L, seed, device=s.device, dtype=s.dtype)
    xs = torch.sort(s @ theta, dim=-2).values  # (B, m_s, L)
    ys = torch.sort(t.to(theta.dtype) @ theta, dim=-2).values
    n_s, n_t = xs.shape[-2], ys.shape[-2]
    if n_s == n_t:
        return (xs - ys).square().mean(-2).mean(-1)
    i, j, w = _quantile_pairs(n_s, n_t, xs.device)
    return (w.to(xs.dtype)[:, None] * (xs[:, i] - ys[:, j]).square()).sum(-2).mean(-1)


_BATCHED = {"gauss_w2": set_gauss_w2, "gauss_kl": set_gauss_kl, "mmd_linear": set_mmd_linear,
            "mmd_rbf": set_mmd_rbf, "sliced_w2": set_sliced_w2}


def is_batched(name: str) -> bool:
    """Whether :func:`spatial_distance` runs ``name`` without a loop over sets."""
    return name in _BATCHED


def check_set_metric(name: str, options: dict) -> None:
    """ValueError for a class-conditional metric or options the set version does not take."""
    plain = spec(name).label_free
    if plain is not None:
        raise ValueError(f"{name} is class-conditional and unit='spatial' has no labels per position (every "
                         f"position of an image shares its label, so it reduces to {plain!r}); use {plain!r}")
    extra = set(options) - set(spec(name).options)
    allowed = set(GAUSS_W2_SET_OPTIONS) if name == "gauss_w2" else set()
    if extra - allowed:
        get(name, **{k: v for k, v in options.items() if k not in allowed})  # the metric's own error


def spatial_distance(name: str, s: Tensor, t: Tensor, **options) -> Tensor:
    """``metrics.get(name, **options)`` on each set: (B, m_s, d), (B, m_t, d) -> (B,).

    Batched for the metrics of :func:`is_batched`; the others (exact OT, Gromov-Wasserstein,
    Sinkhorn) loop over the B sets. ``gauss_w2`` also takes :data:`GAUSS_W2_SET_OPTIONS`.
    """
    check_set_metric(name, options)
    if name in _BATCHED:
        return _BATCHED[name](s, t, **options)
    metric = get(name, **options)
    return torch.stack([metric(s[i], t[i]) for i in range(s.shape[0])])
