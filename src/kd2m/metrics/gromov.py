r"""Gromov-Wasserstein discrepancy between the intra-batch geometries of two feature sets.

Only pairwise distances *within* each batch are compared, so the student and teacher feature
dimensions may differ (e.g. a 256-d student against a 512-d teacher) and the value is
invariant to rotations and translations of either cloud.

.. math::
    GW_2(C^S, C^T) = \min_{\gamma\in\Pi(a,b)} \sum_{i,k,j,l}
        \big(C^S_{ik} - C^T_{jl}\big)^2\,\gamma_{ij}\,\gamma_{kl},
    \qquad C^S_{ik} = \|s_i - s_k\|^2,\ C^T_{jl} = \|t_j - t_l\|^2,\ a = \mathbf 1/n_s,\ b = \mathbf 1/n_t.

How it is computed

* The plan comes from POT's :func:`ot.gromov.gromov_wasserstein` (conditional gradient /
  Frank-Wolfe with exact line search, started from :math:`a b^\top` and, for equal batch
  sizes, also from the sample-wise coupling :math:`\gamma_{ii} = 1/n` — the best of the two is
  kept; every linear step an exact OT problem) on detached float64 copies of the two matrices, without gradient. The
  problem is a non-convex quadratic programme: the solver returns a **local** minimiser (a
  stationary point), so the value is an upper bound on the true GW discrepancy.
* The objective is then evaluated in torch with the plan fixed,

  .. math::
      \sum_{ik} (C^S_{ik})^2 r_i r_k + \sum_{jl} (C^T_{jl})^2 c_j c_l
      - 2\,\langle\gamma, C^S \gamma C^{T\top}\rangle, \quad r = \gamma\mathbf 1,\ c = \gamma^\top\mathbf 1,

  so the gradient reaches the student's features. Differentiating with the plan fixed is the
  envelope-theorem gradient at that (locally optimal) plan, as in POT's
  ``gromov_wasserstein2``.

References
----------
.. [1] Mémoli, F. (2011). Gromov-Wasserstein distances and the metric approach to object
   matching. Foundations of Computational Mathematics 11(4).
.. [2] Peyré, G., Cuturi, M., Solomon, J. (2016). Gromov-Wasserstein averaging of kernel and
   distance matrices. ICML.
.. [3] Vayer, T., Chapel, L., Flamary, R., Tavenard, R., Courty, N. (2019). Optimal transport
   for structured data with application on graphs. ICML (the conditional-gradient solver).
"""
from __future__ import annotations

import numpy as np
import ot
import torch
from torch import Tensor

from ._base import metric, sqdist

__all__ = ["gw2", "gw_plan", "gw_objective"]


def _normalized(C: Tensor) -> Tensor:
    """C / mean(C), in the graph; left as is when C is identically 0 (one point, or all equal)."""
    m = C.mean()
    return C / m if float(m.detach()) > 0 else C


#: POT stops when the objective's relative change is < tol_rel *or* its absolute change is
#: < tol_abs. The stopping rule here is relative only; this absolute threshold only ends the
#: loop when the objective no longer changes at all (e.g. it is exactly 0, where the relative
#: change is undefined and POT would run to max_iter).
_NO_CHANGE = 1e-300


def gw_plan(C_s: Tensor, C_t: Tensor, *, max_iter: int = 10000, tol: float = 1e-9) -> Tensor:
    """Locally optimal square-loss GW plan between uniform weights, shape (n_s, n_t), float64, no gradient.

    POT's conditional gradient from the product coupling (and, for n_s = n_t, from the
    sample-wise coupling), on both matrices divided by their common maximum (the plan does not
    depend on a common scale, the solver's absolute tolerances would). ``tol`` is the relative
    stopping threshold on the objective's change, so the plan of (c·C_s, c·C_t) is that of
    (C_s, C_t) and gw2 is exactly 4-homogeneous in the features. Raises RuntimeError if an
    inner exact OT step stopped before optimality.
    """
    with torch.no_grad():
        A = C_s.detach().to(device="cpu", dtype=torch.float64).numpy()
        B = C_t.detach().to(device="cpu", dtype=torch.float64).numpy()
    # One common positive factor multiplies the objective by its square and leaves every plan's
    # rank unchanged, so solving on matrices scaled to max 1 gives the plan of the raw problem.
    # POT's stopping threshold tol_abs and the network simplex inside each step compare against
    # absolute tolerances; on raw matrices the solver stopped early once the objective was below
    # ~1e-6 (features x 1e-3: 76 % error), breaking gw2(cX, cY) = c^4 gw2(X, Y).
    scale = max(float(A.max(initial=0.0)), float(B.max(initial=0.0)))
    if scale > 0:
        A, B = A / scale, B / scale
    n_s, n_t = A.shape[0], B.shape[0]
    p = np.full(n_s, 1.0 / n_s)
    q = np.full(n_t, 1.0 / n_t)
    # The product coupling is a stationary point for batches with repeated points (GW(x, x) > 0
    # there). For equal sizes the solver also starts from the sample-wise coupling i <-> i, which
    # in distillation pairs the two features of the same input; the lower objective wins.
    starts = [None] + ([np.eye(n_s) / n_s] if n_s == n_t else [])
    best, best_value = None, np.inf
    for G0 in starts:
        G, log = ot.gromov.gromov_wasserstein(A, B, p, q, loss_fun="square_loss", symmetric=True, log=True, G0=G0,
                                              max_iter=int(max_iter), tol_rel=float(tol), tol_abs=_NO_CHANGE,
                                              numItermaxEmd=max(100_000, 50 * n_s * n_t))
        if log.get("result_code", 1) != 1 or log.get("warning") is not None:
            raise RuntimeError(f"gw2: an exact OT step of the Gromov-Wasserstein solver stopped early "
                               f"({log.get('warning')!r}); the plan would not be a stationary point")
        if log["gw_dist"] < best_value:
            best, best_value = G, log["gw_dist"]
    return torch.as_tensor(best, dtype=torch.float64).to(C_s.device)


def gw_objective(C_s: Tensor, C_t: Tensor, plan: Tensor) -> Tensor:
    r"""Square-loss GW objective :math:`\sum_{ijkl} (C^S_{ik} - C^T_{jl})^2 \gamma_{ij}\gamma_{kl}` at a fixed plan.

    Shapes: C_s (n_s, n_s), C_t (n_t, n_t) symmetric; plan (n_s, n_t). Differentiable in C_s
    and C_t. Cost :math:`O(n_s n_t (n_s + n_t))`.
    """
    G = plan.to(C_s.dtype)
    r, c = G.sum(1), G.sum(0)
    term_s = r @ (C_s * C_s) @ r
    term_t = c @ (C_t * C_t) @ c
    cross = (G * (C_s @ G @ C_t)).sum()   # C_t symmetric, so C_t = C_tᵀ
    # The expansion of a sum of squares can cancel to a tiny negative number.
    return (term_s + term_t - 2.0 * cross).clamp_min(0.0)


@metric("gw2", same_dim=False, label="GW (E)", pairwise_factor=20)
def gw2(student_feats: Tensor, teacher_feats: Tensor, labels=None, student_logits=None, teacher_logits=None,
        *, normalize: bool = False, max_iter: int = 10000, tol: float = 1e-9) -> Tensor:
    r"""Gromov-Wasserstein discrepancy (square loss) between intra-batch squared distances.

    .. math::
        GW_2 = \min_{\gamma\in\Pi(\mathbf 1/n_s, \mathbf 1/n_t)} \sum_{ijkl}
               \big(\|s_i - s_k\|^2 - \|t_j - t_l\|^2\big)^2 \gamma_{ij}\gamma_{kl}

    (a local minimum: the solver is Frank-Wolfe on a non-convex problem; see module doc.)

    Parameters
    ----------
    student_feats : Tensor, shape (n_s, d_s)
    teacher_feats : Tensor, shape (n_t, d_t)
        ``d_s`` and ``d_t`` may differ; so may ``n_s`` and ``n_t``.
    normalize : bool, default False
        Divide each distance matrix by its mean (inside the graph) before matching. The raw
        value (default) is in (squared distance)² units and asks the student to reproduce the
        teacher's distances *including their scale*; with 512-d features from two different
        nets the magnitudes can differ by orders of magnitude, and ``normalize=True`` matches
        the shapes of the two geometries only (scale-invariant).
    max_iter : int, default 10000
        Frank-Wolfe iterations at most (POT's default).
    tol : float, default 1e-9
        Relative stopping threshold on the objective's change between Frank-Wolfe iterations
        (scale-free: ``gw2(c·X, c·Y) = c⁴·gw2(X, Y)``).

    Returns
    -------
    Tensor, 0-dim, in the features' dtype (the objective is evaluated in float64).

    Cost: :math:`O(n^2 d)` for the distance matrices, then per Frank-Wolfe iteration an
    :math:`O(n^3)` product and an exact OT problem; :math:`O(n^3)` for the loss and backward.
    Reference: Mémoli (2011); Peyré et al. (2016).
    """
    s, t = student_feats, teacher_feats
    C_s, C_t = sqdist(s, s), sqdist(t, t)
    if normalize:
        C_s, C_t = _normalized(C_s), _normalized(C_t)
    plan = gw_plan(C_s, C_t, max_iter=max_iter, tol=tol)
    out_dtype = torch.promote_types(C_s.dtype, C_t.dtype)
    # float64: the objective is a difference of terms of size ~C², which float32 would leave
    # with no correct digit when the two geometries nearly agree
    return gw_objective(C_s.to(torch.float64), C_t.to(torch.float64), plan).to(out_dtype)
