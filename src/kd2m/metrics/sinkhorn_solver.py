r"""The log-domain Sinkhorn solver behind :mod:`kd2m.metrics.entropic`: ε-C-transforms and dual potentials.

For a fixed float64 cost C (no gradient) and uniform weights a, b:

* :class:`CTransform`: the two soft-mins :math:`T_C` and :math:`T_{C^\top}` (the ε-C-transforms)
  and the plan they define, as a kernel product at moderate ε (the default) or a logsumexp at
  small ε, stable for any ε;
* :func:`potentials`: the converged dual potential ḡ, by the averaged update for a symmetric
  problem (a self term) and by alternation raced against its Anderson acceleration otherwise,
  stopping on the ℓ1 marginal error;
* :func:`softmin`: the plain one-logsumexp form of the soft-min, the reference the transforms
  are checked against.

What the potentials are for (the semi-dual value, its envelope-theorem gradient, the debiased
divergence) is :mod:`kd2m.metrics.entropic`'s; this module only solves.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["softmin", "CTransform", "potentials", "KERNEL_SPAN", "ANDERSON_MEMORY"]


def softmin(eps: float, C: Tensor, h: Tensor) -> Tensor:
    """T_i = −ε log Σ_j exp(h_j − C_ij/ε): the ε-C-transform with h = log b + g/ε.

    The plain reference form (one logsumexp); the solver uses :class:`CTransform`, which
    computes the same numbers with C/ε formed once and, at moderate ε, one matrix-vector product.
    """
    return -eps * torch.logsumexp(h[None, :] - C / eps, dim=1)


#: Largest row range of C/ε (max_ij (C_ij − min_k C_ik)/ε) for which the soft-min runs as a
#: kernel product in float64. Then the largest term of every sum is >= e^-600, far above the
#: underflow (e^-708), and the terms that do underflow are < e^-100 of it (see CTransform).
KERNEL_SPAN = 600.0


class CTransform:
    r"""The two ε-C-transforms of a fixed cost C (float64, no gradient) and the plan they define.

    ``rows(h)_i = −ε log Σ_j exp(h_j − C_ij/ε)`` (:math:`T_C`, h = log b + g/ε) and
    ``cols(h)_j = −ε log Σ_i exp(h_i − C_ij/ε)`` (:math:`T_{C^\top}`, h = log a + f/ε).

    With the row minima m_i = min_j C_ij split off, K = −(C − m)/ε <= 0 has a 0 in every row.
    When its span max(−K) is at most :data:`KERNEL_SPAN` (ε not small against the cost's row
    ranges: the default ε), the soft-min is a matrix-vector product with the kernel
    E = exp(K), formed once per problem, and the vector exp(h − max h), whose largest entry is
    1: the largest term of every sum is then >= exp(−span) (that of the maximising index), so
    nothing that matters underflows and the result is as accurate as logsumexp, for one read
    of E instead of five n² passes and two n² temporaries per soft-min. Otherwise (small ε)
    each soft-min is the logsumexp of :func:`softmin` over C/ε formed once (bitwise the same
    numbers as :func:`softmin`: the iteration counts quoted in :func:`potentials` are of
    that form). Cost: O(n_s n_t) once, then O(n_s n_t) per transform.
    """

    def __init__(self, C: Tensor, eps: float):
        self.eps = eps
        self.shift = C.amin(1) if C.numel() else C.new_zeros(C.shape[0])
        K = (C - self.shift[:, None]).mul_(-1.0 / eps)
        self.use_kernel = not K.numel() or float(-K.min()) <= KERNEL_SPAN
        if self.use_kernel:
            self.E = K.exp_()
        else:
            self.C_eps = C / eps
            self.C_eps_T = self.C_eps.T.contiguous()

    def rows(self, h: Tensor) -> Tensor:
        """T_C, reduced over j: with the kernel, h_j − C_ij/ε = K_ij + h_j − m_i/ε."""
        if self.use_kernel:
            top = h.max()
            return self.shift - self.eps * (torch.mv(self.E, (h - top).exp_()).log_() + top)
        return -self.eps * torch.logsumexp(h[None, :] - self.C_eps, dim=1)

    def cols(self, h: Tensor) -> Tensor:
        """T_Cᵀ, reduced over i: with the kernel, h_i − C_ij/ε = K_ij + (h_i − m_i/ε)."""
        if self.use_kernel:
            h = h - self.shift / self.eps
            top = h.max()
            return -self.eps * (torch.mv(self.E.T, (h - top).exp_()).log_() + top)
        return -self.eps * torch.logsumexp(h[None, :] - self.C_eps_T, dim=1)

    def plan(self, log_a: Tensor, h: Tensor) -> Tensor:
        r"""γ_ij = a_i b_j exp((f_i + g_j − C_ij)/ε) with f = T_C(g), h = log b + g/ε: the plan
        whose rows sum exactly to a (the gradient of the semi-dual w.r.t. C). Shape (n_s, n_t)."""
        if self.use_kernel:
            w = (h - h.max()).exp_()
            return (self.E * w[None, :]).mul_((log_a.exp() / torch.mv(self.E, w))[:, None])
        L = h[None, :] - self.C_eps
        return L.sub_(torch.logsumexp(L, dim=1, keepdim=True) - log_a[:, None]).exp_()


#: Anderson acceleration memory (number of past residuals mixed) for the cross term.
ANDERSON_MEMORY = 8
#: Iterations per segment over which Anderson and plain alternation are compared (log-error
#: decrease per iteration), and segments of the faster mode between two probes of the other.
_PROBE_LEN = 50
_PROBE_EVERY = 4
#: An extrapolated point is kept only if its marginal error is below this factor times that of
#: the point it came from (1.0 is strictly monotone and too timid; no check diverges at small ε).
_ANDERSON_SLACK = 1.5


def potentials(C: Tensor, eps: float, max_iter: int, tol: float, symmetric: bool,
               transform: CTransform | None = None) -> tuple[Tensor, int, float]:
    """Converged dual potential ḡ (the target-side one), iterations used, final marginal error.

    ``symmetric`` (C symmetric, a = b): the averaged update f ← ½(f + T_C(f)) of Feydy et al.
    Plain alternation on a symmetric problem oscillates and needs thousands of iterations
    when ε is small against the nearest-neighbour gaps; the averaged update needs ~10.

    Otherwise: Sinkhorn's fixed point g = G(g) := T_Cᵀ(T_C(g)) (one alternating iteration),
    with Anderson acceleration (type II, memory ``ANDERSON_MEMORY``) where it helps. Plain
    alternation converges at the rate σ₂² of the plan's second singular value, which is ~1
    whenever the plan is close to a permutation (small ε, low-dimensional or nearby clouds).
    Anderson usually needs several times fewer iterations, but not always: with small ε and
    unequal cluster sizes it was measured slower than plain alternation (16k vs 11.8k
    iterations). So the two are raced: the first ``_PROBE_LEN`` = 50 iterations use Anderson,
    the next 50 plain alternation, and then the faster (log-error decrease per iteration) runs,
    the other being re-probed for 50 iterations after every 200. Measured on 2-3-D clusters of
    unequal sizes at ε = 3e-4..1e-2 of the mean squared distance (tests' ``_clusters``, tol
    1e-6), iterations raced / pure Anderson / plain: 896/596/3116, 818/1418/28892,
    1657/885/11159, 230/170/302, 4719/10497/>40000, 369/359/>40000, 4593/7568/>40000. A
    problem that converges within 50 iterations (the default ε: 2-7) never leaves Anderson. Safeguard: an extrapolated
    point whose marginal error is not below 1.5x that of the point it came from is rejected
    for the plain step, and the history is dropped; if ``max_iter`` is reached, the best point
    seen is returned.
    Any g is a valid dual point (the value is the semi-dual at g), so acceleration can only
    change how fast the certificate below is reached, not what is certified.

    Stops when the ℓ1 error of the plan's marginals is <= tol, checked at no extra cost:
    γ(f, g) with f = T_C(g) has exact row sums and column sums b_j exp((g − G(g))_j / ε).
    """
    n_s, n_t = C.shape
    T = CTransform(C, eps) if transform is None else transform
    log_a = torch.full((n_s,), -math.log(n_s), dtype=C.dtype, device=C.device)
    log_b = torch.full((n_t,), -math.log(n_t), dtype=C.dtype, device=C.device)
    if symmetric:
        return _averaged(T, log_a, eps, max_iter, tol)
    return _raced(T, log_a, log_b, eps, max_iter, tol)


def _averaged(T: CTransform, log_a: Tensor, eps: float, max_iter: int, tol: float) -> tuple[Tensor, int, float]:
    """:func:`potentials` of a symmetric problem: the averaged update f ← ½(f + T_C(f))."""
    err = float("inf")
    f = T.rows(log_a)                     # T_C(0)
    for it in range(1, max_iter + 1):
        Tf = T.rows(log_a + f / eps)
        # γ(f, f) has row (= column) sums a_i exp((f − T_C(f))_i / ε): count both marginals
        err = 2.0 * float((log_a.exp() * torch.expm1((f - Tf) / eps).abs()).sum())
        if err <= tol:
            return f, it, err
        f = 0.5 * (f + Tf)
    return f, max_iter, err


class _Race:
    """Which of Anderson and plain alternation runs (:func:`potentials`): the first segment of
    ``_PROBE_LEN`` iterations uses Anderson, the next one plain alternation, then the faster mode
    (log-error decrease per iteration) runs for ``_PROBE_EVERY`` segments before the other is
    probed again for one segment. Problems that converge within a segment (the default ε) never
    leave Anderson. Reads ``ANDERSON_MEMORY`` when built and at every segment's end (0: plain
    alternation throughout)."""

    def __init__(self):
        self.use_anderson, self.probing = ANDERSON_MEMORY > 0, False
        self.rates: dict[bool, float] = {}
        self.seg_first = self.seg_best = float("nan")
        self.seg_count = self.segs_in_mode = 0

    def switches(self, err: float) -> bool:
        """Count one iteration of marginal error ``err``; True when the mode changes now
        (:attr:`use_anderson` is then the new one)."""
        if self.seg_count == 0:
            self.seg_first, self.seg_best = err, err
        self.seg_best, self.seg_count = min(self.seg_best, err), self.seg_count + 1
        if not (self.seg_count == _PROBE_LEN and ANDERSON_MEMORY > 0):
            return False
        self.rates[self.use_anderson] = math.log(self.seg_first / max(self.seg_best, 1e-300)) / _PROBE_LEN
        self.seg_count, self.segs_in_mode = 0, self.segs_in_mode + 1
        if self.probing:                      # back to whichever mode was faster
            self.probing, switch = False, self.rates[not self.use_anderson] > self.rates[self.use_anderson]
        else:                                 # time to (re)measure the other mode
            self.probing = switch = (not self.use_anderson) not in self.rates or self.segs_in_mode >= _PROBE_EVERY
        if switch:
            self.use_anderson, self.segs_in_mode = not self.use_anderson, 0
        return switch


def _anderson_step(xs: list[Tensor], rs: list[Tensor], r: Tensor) -> Tensor:
    """Type-II Anderson extrapolation from the points ``xs`` and their residuals ``rs`` (``r`` the
    last): x_k + r_k − (ΔX + ΔR) γ, γ the least-squares fit of r_k by the residuals' differences."""
    dX = torch.stack([xs[k + 1] - xs[k] for k in range(len(xs) - 1)], 1)
    dR = torch.stack([rs[k + 1] - rs[k] for k in range(len(rs) - 1)], 1)
    A = dR.T @ dR
    # Tikhonov term relative to A's scale keeps the small least-squares solve sane
    A = A + (1e-10 * float(A.diagonal().max()) + 1e-300) * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    coef = torch.linalg.solve(A, dR.T @ r)
    return xs[-1] + r - (dX + dR) @ coef   # x_k + r_k − (ΔX + ΔR) γ


def _raced(T: CTransform, log_a: Tensor, log_b: Tensor, eps: float, max_iter: int,
           tol: float) -> tuple[Tensor, int, float]:
    """:func:`potentials` of a general problem: alternation g ← G(g), Anderson-accelerated while
    that is faster (:class:`_Race`), with the safeguard and the best-point fallback."""
    n_t = log_b.shape[0]
    b = log_b.exp()

    def G(g: Tensor) -> Tensor:
        return T.cols(log_a + T.rows(log_b + g / eps) / eps)

    g = G(torch.zeros(n_t, dtype=log_b.dtype, device=log_b.device))
    xs: list[Tensor] = []
    rs: list[Tensor] = []
    best, g_best = float("inf"), g
    accelerated, err_prev, Gg_prev = False, float("inf"), g
    race = _Race()
    for it in range(2, max_iter + 1):
        Gg = G(g)
        r = Gg - g
        err = float((b * torch.expm1(-r / eps).abs()).sum())
        if err <= tol:
            return g, it, err
        if race.switches(err) and not race.use_anderson:   # continue plainly from the last evaluated point
            xs, rs = [], []
            if err < best:
                best, g_best = err, g
            g, accelerated = Gg, False
            continue
        if accelerated and not err < _ANDERSON_SLACK * err_prev:
            # The extrapolated point is worse than the one it came from: reject it, take the
            # plain Sinkhorn step from that point instead and forget the history.
            g, xs, rs, accelerated = Gg_prev, [], [], False
            continue
        if err < best:
            best, g_best = err, g
        if not race.use_anderson:
            g = Gg
            continue
        xs.append(g)
        rs.append(r)
        if len(xs) > ANDERSON_MEMORY + 1:
            xs.pop(0)
            rs.pop(0)
        err_prev, Gg_prev = err, Gg
        g, accelerated = Gg, False
        if len(xs) >= 2:
            step = _anderson_step(xs, rs, r)
            if bool(torch.isfinite(step).all()):
                g, accelerated = step, True
    return g_best, max_iter, best              # not converged: the best point seen
