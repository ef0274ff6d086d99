"""Matrix functions behind the Gaussian metrics: the ridge rule, batch Gaussian fits, the Bures
trace term and the Gaussian KL divergence.

Everything here works on *centred factors* instead of covariances: a batch ``x`` of shape
(n, d) is stored as its mean μ (d,) and ``Z = (x − μ) / √n`` (n, d), so that the biased
(1/n) covariance is ``Σ = ZᵀZ`` and the ridged one ``Σ + r·I``. Factors can be padded with
zero rows (a zero row adds nothing to ``ZᵀZ``), which lets classes of different sizes share
one batched computation, and they expose the rank of Σ, which the low-rank route uses.

All functions expect float64 tensors (the metrics cast to it): Cholesky, ``eigh`` and the
square roots of small eigenvalues lose too many digits in float32 once Σ is rank-deficient and
only the ridge keeps it definite (condition number up to ~ d / ridge).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import value_checks

__all__ = ["DEFAULT_RIDGE", "TAU_FLOOR", "LOWRANK_FRACTION", "ridge_scale", "gaussian_factor", "class_gaussian_factors",
           "singular_covariance_message", "bures_trace", "gaussian_kl"]

DEFAULT_RIDGE = 1e-5
"""Default relative ridge ρ: Σ + ρ·τ·I with τ the mean per-channel variance of the batch."""

TAU_FLOOR = 1e-20
"""Absolute floor on τ, so an all-constant batch (τ = 0) still gets a positive ridge."""

LOWRANK_FRACTION = 0.75
"""Use the low-rank route when the number of factor rows k satisfies k ≤ this · d."""


def ridge_scale(student: Tensor, teacher: Tensor, ridge: float) -> Tensor:
    r"""The ridge ``r = ρ · max(τ, 1e-20)`` added to every covariance of one metric call.

    .. math::
        \tau = \frac{1}{d}\sum_{j=1}^d \mathrm{Var}_j\big([X_S; X_T]\big)

    is the mean per-channel (1/n) variance of the pooled student+teacher batch, detached. The
    same ``r`` is used for student and teacher and, in class-conditional metrics, for every
    class (τ from the whole batch, so a one-sample class gets a sensible ridge). Being
    proportional to the data's variance, the ridge is scale-aware: scaling all features by
    ``a`` scales ``r`` by ``a²``, like the covariances.

    Parameters
    ----------
    student : Tensor (n_s, d)
    teacher : Tensor (n_t, d)
    ridge : float
        ρ ≥ 0 (0 disables the ridge).

    Returns
    -------
    r : 0-dim float64 Tensor, no gradient.
    """
    if not isinstance(ridge, (int, float)) or isinstance(ridge, bool) or not ridge >= 0.0:
        raise ValueError(f"ridge must be a float >= 0, got {ridge!r}")
    # τ only sets a scale: the inputs' precision is plenty (float32 at least, so half-precision
    # features cannot overflow), and no float64 copy of the batch is made
    pooled = torch.cat([student.detach(), teacher.detach()])
    pooled = pooled.to(torch.promote_types(pooled.dtype, torch.float32))
    tau = pooled.var(0, unbiased=False).mean().to(torch.float64).clamp_min(TAU_FLOOR)
    return float(ridge) * tau


def gaussian_factor(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (d,) and centred factor ``Z = (x − μ)/√n`` (n, d) of a batch, so Σ = ZᵀZ (1/n)."""
    mu = x.mean(0)
    return mu, (x - mu) / x.shape[0] ** 0.5


def class_gaussian_factors(xs: tuple[Tensor, ...], labels: Tensor) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """Per-class means (C, d) and zero-padded centred factors (C, n_max, d) for each batch in ``xs``.

    All batches in ``xs`` share ``labels`` (n,). Class c's factor holds its n_c centred rows
    scaled by 1/√n_c followed by n_max − n_c zero rows, so ``Z[c]ᵀZ[c]`` is its 1/n_c
    covariance. Classes are those present in ``labels``, sorted. Cost: O(n d).

    Returns ``[(means, Z) for x in xs]`` and the class counts (C,).
    """
    labels = labels.to(xs[0].device)  # labels may live on the CPU while features are on an accelerator
    _, inv, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    n = labels.shape[0]
    n_classes = counts.shape[0]
    # position of each sample inside its class, so rows can be scattered into a padded tensor
    order = torch.argsort(inv, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(inv)
    pos[order] = torch.arange(n, device=labels.device) - starts[inv[order]]
    n_max = int(counts.max())
    cnt = counts.to(torch.float64)
    out = []
    for x in xs:
        d = x.shape[1]
        means = x.new_zeros(n_classes, d).index_add(0, inv, x) / cnt[:, None].to(x.dtype)
        rows = (x - means[inv]) / cnt[inv].sqrt()[:, None].to(x.dtype)
        Z = x.new_zeros(n_classes, n_max, d).index_put((inv, pos), rows)
        out.append((means, Z))
    return out, counts


def singular_covariance_message(who: str) -> str:
    """The error text for a singular covariance with ridge=0 (full and diagonal routes alike)."""
    return (f"{who}: a covariance is singular (n <= d, a constant channel, a one-sample class or "
            "duplicate samples); use ridge > 0")


def _cholesky(S: Tensor, who: str) -> Tensor:
    """The Cholesky factor of ``S``; a singular ``S`` (only reachable with ridge=0: the ridge makes
    Σ definite) is a ValueError, or, under :func:`kd2m.value_checks.deferred`, a NaN factor (so
    a NaN loss that the engine flags): ``cholesky`` reads its status back to the host to raise,
    ``cholesky_ex`` does not."""
    if value_checks.eager():
        try:
            return torch.linalg.cholesky(S)
        except torch.linalg.LinAlgError as err:
            raise ValueError(singular_covariance_message(who)) from err
    L, info = torch.linalg.cholesky_ex(S)
    return torch.where((info == 0)[..., None, None], L, torch.full_like(L, float("nan")))


def _reduce(factors: list[Tensor]) -> tuple[list[Tensor], int]:
    """Express factors in an orthonormal basis Q (d, k) of a subspace containing all their rows.

    With Σ = ZᵀZ + r·I for every factor and the *same* r, each Σ acts as r·I on the orthogonal
    complement of span(Q), so both the Bures trace term and the KL divergence split exactly into
    a k-dimensional part (computed on ``Z Q``) and a closed-form (d − k) part. Q is built
    without gradient: the exact gradients of both quantities already lie in span(Q) (they are
    ``Z`` times matrices that leave span(Q) invariant), so projecting onto a frozen basis
    leaves them unchanged. Returns the projected factors and m = k, or the inputs and m = d
    when k is too large for the reduction to pay.
    """
    d = factors[0].shape[-1]
    k = sum(f.shape[-2] for f in factors)
    if k > LOWRANK_FRACTION * d or k >= d:
        return factors, d
    G = torch.cat([f.detach() for f in factors], -2).transpose(-1, -2)  # (..., d, k)
    Q = torch.linalg.qr(G).Q  # Householder Q is orthonormal even when G is rank-deficient
    return [f @ Q for f in factors], k


def _ridged_cov(Y: Tensor, r: Tensor) -> Tensor:
    """YᵀY + r·I, (..., m, m)."""
    S = Y.transpose(-1, -2) @ Y
    S.diagonal(dim1=-2, dim2=-1).add_(r)  # in place on a fresh tensor: no eye(m) temporaries
    return S


class _BuresTerm(torch.autograd.Function):
    r"""B² = Tr(Σ_S + Σ_T) − 2 Σ_i √λ_i(L_Sᵀ Σ_T L_S) for Σ = YᵀY + r·I, with a closed-form VJP.

    Forward: one Cholesky Σ_S = L Lᵀ and one symmetric eigendecomposition M = Lᵀ Σ_T L = V Λ Vᵀ
    (M is similar to Σ_S Σ_T, so Σ √λ_i = Tr (Σ_S^{1/2} Σ_T Σ_S^{1/2})^{1/2}).
    Backward uses the optimal-transport maps instead of differentiating through the Cholesky
    and the eigensolver (about half the matrix products of plain autograd):

        ∂B²/∂Σ_S = I − T_{S→T},  T_{S→T} = L^{-ᵀ} M^{1/2} L^{-1};
        ∂B²/∂Σ_T = I − T_{T→S},  T_{T→S} = L M^{-1/2} Lᵀ;           ∂B²/∂Y = 2 Y ∂B²/∂Σ.

    Both maps are spectral functions of M through V, so repeated eigenvalues cause no
    1/(λ_i − λ_j) terms. Eigenvalues are floored at max(r²/4, eps·λ_max, tiny) before the
    roots (exactly λ ≥ r², so the floor only absorbs round-off). I − T is formed in float64 and
    only the last (n × m)·(m × m) product runs in ``grad_dtype`` (the caller's input dtype, the
    gradient's own precision): no cancellation happens in low precision. First-order only.
    """

    @staticmethod
    def forward(ctx, Ys: Tensor, Yt: Tensor, r: Tensor, who: str, grad_dtype: torch.dtype) -> Tensor:
        m = Ys.shape[-1]
        L = _cholesky(_ridged_cov(Ys, r), who)
        M = L.transpose(-1, -2) @ _ridged_cov(Yt, r) @ L
        M = 0.5 * (M + M.transpose(-1, -2))
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        if need_grad:
            lam, V = torch.linalg.eigh(M)
        else:
            lam, V = torch.linalg.eigvalsh(M), None
        floor = torch.maximum(0.25 * r * r, torch.finfo(lam.dtype).eps * lam.abs().amax(-1, keepdim=True))
        lam = lam.clamp_min(floor.clamp_min(torch.finfo(lam.dtype).tiny))
        if need_grad:
            ctx.save_for_backward(Ys, Yt, L, lam, V)
            ctx.grad_dtype = grad_dtype
        trace = Ys.square().sum((-2, -1)) + Yt.square().sum((-2, -1)) + 2 * m * r
        return trace - 2 * lam.sqrt().sum(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        Ys, Yt, L, lam, V = ctx.saved_tensors
        g = 2 * g[..., None, None]
        low = ctx.grad_dtype

        def apply(Y: Tensor, A: Tensor) -> Tensor:  # 2 g · Y (I − A Aᵀ), the product in the gradient's dtype
            E = torch.neg(A @ A.transpose(-1, -2))
            E.diagonal(dim1=-2, dim2=-1).add_(1.0)
            return (Y.to(low) @ E.to(low)).to(Y.dtype) * g

        gs = gt = None
        if ctx.needs_input_grad[0]:
            # T_{S→T} = X Xᵀ with X = L^{-T} V Λ^{1/4}
            X = torch.linalg.solve_triangular(L.transpose(-1, -2), V, upper=True) * lam.pow(0.25).unsqueeze(-2)
            gs = apply(Ys, X)
        if ctx.needs_input_grad[1]:
            # T_{T→S} = W Wᵀ with W = L V Λ^{-1/4}
            W = (L @ V) * lam.pow(-0.25).unsqueeze(-2)
            gt = apply(Yt, W)
        return gs, gt, None, None, None


def bures_trace(Zs: Tensor, Zt: Tensor, r: Tensor, who: str = "gauss_w2",
                grad_dtype: torch.dtype = torch.float64) -> Tensor:
    r"""Squared Bures distance between ridged covariances, batched over leading dims.

    .. math::
        \mathcal{B}^2 = \mathrm{Tr}\big(\Sigma_S + \Sigma_T - 2(\Sigma_S^{1/2}\Sigma_T\Sigma_S^{1/2})^{1/2}\big),
        \qquad \Sigma = Z^\top Z + r I_d

    The root term is :math:`\sum_i \sqrt{\lambda_i(L_S^\top \Sigma_T L_S)}` with
    :math:`\Sigma_S = L_S L_S^\top` (Cholesky): the matrix is similar to
    :math:`\Sigma_S\Sigma_T`. One Cholesky and one symmetric eigendecomposition, and a
    closed-form gradient (see :class:`_BuresTerm`) that stays finite for repeated eigenvalues
    (unlike differentiating through two matrix square roots).

    Low-rank route: when ``k = n_s + n_t ≤ 0.75·d`` the computation runs on k×k matrices in a
    basis of the span of the rows (see :func:`_reduce`); the d − k complement dimensions add
    exactly :math:`(r + r - 2\sqrt{r\cdot r}) = 0` each. Exact, not an approximation, because
    student and teacher share the ridge.

    Parameters
    ----------
    Zs : Tensor (..., n_s, d)   centred student factor, float64 (rows may be zero padding)
    Zt : Tensor (..., n_t, d)   centred teacher factor, float64
    r : 0-dim Tensor            ridge
    grad_dtype : dtype          precision of the gradient's last product (the inputs' dtype)

    Returns
    -------
    Tensor (...,)

    Cost: O(d³ + (n_s + n_t) d²), or O(k³ + k² d) with k = n_s + n_t on the low-rank route.
    """
    (Ys, Yt), _ = _reduce([Zs, Zt])
    return _BuresTerm.apply(Ys, Yt, r, who, grad_dtype)


def gaussian_kl(mu_s: Tensor, Zs: Tensor, mu_t: Tensor, Zt: Tensor, r: Tensor, who: str = "gauss_kl") -> Tensor:
    r"""KL(N(μ_S, Σ_S) ‖ N(μ_T, Σ_T)) with Σ = ZᵀZ + r·I, batched over leading dims.

    .. math::
        \tfrac12\big[\|L_T^{-1}L_S\|_F^2 + \|L_T^{-1}(\mu_T-\mu_S)\|^2 - d
        + 2\textstyle\sum_i\log (L_T)_{ii} - 2\sum_i \log (L_S)_{ii}\big]

    with Cholesky factors Σ = L Lᵀ: two Cholesky factorisations and two triangular solves, no
    explicit inverse. Low-rank route as in :func:`bures_trace`, with the mean difference added
    to the basis (k = n_s + n_t + 1); the complement adds exactly (d − k)(1 − 1 + 0) = 0.

    Parameters
    ----------
    mu_s, mu_t : Tensor (..., d)
    Zs : Tensor (..., n_s, d), Zt : Tensor (..., n_t, d)
    r : 0-dim Tensor

    Returns
    -------
    Tensor (...,)

    Cost: O(m³ + n d m), m = min(d, n_s + n_t + 1) as for :func:`bures_trace`.
    """
    delta = (mu_t - mu_s).unsqueeze(-2)  # (..., 1, d)
    (Ys, Yt, dk), m = _reduce([Zs, Zt, delta])
    Ls = _cholesky(_ridged_cov(Ys, r), who)
    Lt = _cholesky(_ridged_cov(Yt, r), who)
    A = torch.linalg.solve_triangular(Lt, Ls, upper=False)
    b = torch.linalg.solve_triangular(Lt, dk.transpose(-1, -2), upper=False)
    logdet_s = 2 * torch.diagonal(Ls, dim1=-2, dim2=-1).log().sum(-1)
    logdet_t = 2 * torch.diagonal(Lt, dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * (A.square().sum((-2, -1)) + b.square().sum((-2, -1)) - m + logdet_t - logdet_s)
