r"""Exact optimal transport between the empirical feature measures of a batch.

For uniform empirical measures :math:`\hat P_S = \frac1{n_s}\sum_i \delta_{s_i}` and
:math:`\hat P_T = \frac1{n_t}\sum_j \delta_{t_j}` the squared 2-Wasserstein distance is the
linear programme

.. math::
    W_2^2(\hat P_S, \hat P_T) = \min_{\gamma \in \Pi(a, b)} \sum_{ij} \gamma_{ij} \|s_i - t_j\|^2,
    \qquad a = \mathbf 1/n_s,\ b = \mathbf 1/n_t.

How it is computed here

* The plan :math:`\gamma^*` is found without gradient, in float64 on the CPU, by an exact
  solver: for :math:`n_s = n_t` the optimum is a permutation matrix divided by n (Birkhoff),
  so it is an assignment problem solved by :func:`scipy.optimize.linear_sum_assignment`
  (several times faster than the network simplex at these sizes); otherwise POT's network
  simplex :func:`ot.emd`.
* The loss is :math:`\sum_{ij} \gamma^*_{ij} C_{ij}(\theta)` with :math:`\gamma^*` fixed. By the
  envelope (Danskin) theorem its gradient is the gradient of the OT value wherever the
  optimal plan is unique (a subgradient otherwise): the standard, correct OT gradient.
* An optimal vertex plan has at most :math:`n_s + n_t - 1` non-zero entries, so the loss is
  summed over those pairs only: :math:`O((n_s+n_t)d)` forward and backward through autograd,
  instead of :math:`O(n_s n_t d)` through a dense cost matrix.

References
----------
.. [1] Peyré, G., Cuturi, M. (2019). Computational Optimal Transport. Foundations and Trends
   in Machine Learning, 11(5-6), 355-607.
.. [2] Bonneel, N., van de Panne, M., Paris, S., Heidrich, W. (2011). Displacement
   interpolation using Lagrangian mass transport. ACM ToG 30(6) (network simplex, ``ot.emd``).
.. [3] Crouse, D. F. (2016). On implementing 2D rectangular assignment algorithms. IEEE TAES
   52(4) (the solver behind ``linear_sum_assignment``).
.. [4] Montesuma, E. F. (2025). KD²M: An unifying framework for feature knowledge
   distillation. arXiv:2504.01757.
"""
from __future__ import annotations

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .. import value_checks
from ._base import class_indices, metric

__all__ = ["exact_plan", "plan_cost", "feature_plan", "feature_plans", "w2", "cw2", "jw2", "LABEL_COSTS"]

LABEL_COSTS = ("labels", "sqeuclidean", "kl")


# ----------------------------------------------------------------------------- the solver
def _reduce(M: np.ndarray) -> np.ndarray:
    """Subtract row minima then column minima (Hungarian pre-reduction).

    Adding a constant to a row or a column changes every feasible plan's cost by the same
    amount (the marginals are fixed), so the optimal plan is unchanged; the reduced matrix is
    >= 0 with a zero in every row and column, a feasible dual start that makes the
    shortest-augmenting-path solver 3-4x faster on feature costs.
    """
    M = M - M.min(axis=1, keepdims=True)
    return M - M.min(axis=0, keepdims=True)


def _solve(M: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse optimal plan for a float64 (n_s, n_t) numpy cost, uniform marginals."""
    n_s, n_t = M.shape
    M = _reduce(M)
    # Scale to max 1 (the plan is invariant to a positive factor; the value is computed from the
    # features afterwards, so nothing needs undoing). The network simplex compares reduced costs
    # against absolute tolerances: on raw costs of features x 1e-6 it returned a plan 3e-3 off
    # in value, x 1e-8 a plan 9.5x off, and the gradient followed that wrong plan.
    top = M.max()
    if top > 0:
        M = M / top
    if n_s == n_t:
        rows, cols = linear_sum_assignment(M)
        return rows, cols, np.full(n_s, 1.0 / n_s)
    a = np.full(n_s, 1.0 / n_s)
    b = np.full(n_t, 1.0 / n_t)
    # POT's default cap (1e5 pivots) stops short at a few thousand samples (2500 x 3000 does)
    # and returns a feasible, non-optimal plan; a generous cap costs nothing when not reached.
    num_iter = max(1_000_000, 50 * n_s * n_t)
    G, log = ot.emd(a, b, M, numItermax=num_iter, log=True)
    if log.get("result_code", 1) != 1 or log.get("warning") is not None:
        raise RuntimeError(f"exact OT solver (ot.emd) did not reach the optimum for a {n_s}x{n_t} "
                           f"problem: {log.get('warning')!r} (numItermax={num_iter}); the W2 value and "
                           "its gradient would be wrong")
    rows, cols = np.nonzero(G > 0)
    return rows, cols, G[rows, cols]


def exact_plan(cost: Tensor, fallback=None) -> tuple[Tensor, Tensor, Tensor]:
    r"""Optimal transport plan between uniform weights for ``cost``, as a sparse list of pairs.

    Solves :math:`\min_{\gamma\in\Pi(\mathbf 1/n_s, \mathbf 1/n_t)} \langle \gamma, C\rangle`
    exactly, without gradient (``cost`` is detached and copied to float64 on the CPU).
    The plan is invariant to adding a constant to a row or a column of ``cost``, so a caller
    may pass e.g. :math:`-2\langle s_i, t_j\rangle` instead of :math:`\|s_i - t_j\|^2`.

    Parameters
    ----------
    cost : Tensor, shape (n_s, n_t)
        Finite cost matrix.
    fallback : callable, optional
        ``fallback()`` gives the same cost in a wider dtype, for when ``cost`` is not finite
        (float32 products of finite but huge features overflow; see :func:`feature_plan`).

    Returns
    -------
    rows, cols : LongTensor, shape (k,)
        Indices of the non-zero entries of the plan, on ``cost.device``.
    weights : Tensor, shape (k,), float64
        Their masses :math:`\gamma_{\mathrm{rows}[k], \mathrm{cols}[k]}` (sum to 1).
        ``k = n`` (a permutation, every weight 1/n) when :math:`n_s = n_t`, and
        ``k <= n_s + n_t - 1`` otherwise. Inside the engine (deferred value checks) a cost that
        is not finite gets the product plan instead, all ``n_s n_t`` pairs, so the loss reads NaN.

    Cost: :func:`scipy.optimize.linear_sum_assignment`, :math:`O(n^3)` worst case, when
    :math:`n_s = n_t`; network simplex :func:`ot.emd` otherwise. Raises RuntimeError if the
    simplex stops before optimality. The solver runs on the host by design (no GPU solver is
    exact): ``cost`` is read back once per call, the plan's indices go back to its device.
    """
    if cost.dim() != 2 or cost.shape[0] == 0 or cost.shape[1] == 0:
        raise ValueError(f"exact_plan: cost must be a non-empty (n_s, n_t) matrix, got {tuple(cost.shape)}")
    with torch.no_grad():
        M = cost.detach().to(device="cpu", dtype=torch.float64).numpy()
    return _plan_on_host(M, cost.device, fallback)


def _plan_on_host(M: np.ndarray, dev: torch.device, fallback=None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`exact_plan` of the host copy ``M`` of a cost; the plan's tensors on ``dev``."""
    if fallback is not None and not np.isfinite(M).all():  # checked on the host copy: no extra read
        with torch.no_grad():
            M = fallback().detach().to(device="cpu", dtype=torch.float64).numpy()
    if not np.isfinite(M).all():
        if value_checks.eager():
            raise ValueError("exact_plan: cost contains NaN/inf")
        # deferred checks (the engine's step): no plan is optimal for a NaN cost; the product plan
        # gives the loss the NaN it should have, and the engine's flag reports the step
        n_s, n_t = M.shape
        rows, cols = np.repeat(np.arange(n_s), n_t), np.tile(np.arange(n_t), n_s)
        w = np.full(n_s * n_t, 1.0 / (n_s * n_t))
    else:
        rows, cols, w = _solve(M)
    return (torch.as_tensor(rows, dtype=torch.long).to(dev), torch.as_tensor(cols, dtype=torch.long).to(dev),
            torch.as_tensor(w, dtype=torch.float64).to(dev))


def feature_plan(s: Tensor, t: Tensor, extra=None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`exact_plan` of the cost ‖s_i − t_j‖² (up to row/column constants: −2 (s − c)(t − c)ᵀ
    in the inputs' precision, one GEMM, no gradient), plus ``extra()`` (an (n_s, n_t) cost, e.g.
    JW2's label cost) where given; the solver then works on it in float64.

    c is the pooled mean: centring changes the matrix by row/column constants only, and keeps
    the products small when both clouds share a large offset (less cancellation). A float32
    GEMM (as POT's ``cdist``) is 3x cheaper than a float64 one and perturbs the cost by
    ~1e-7 relative, which can only swap near-tied assignments whose costs agree to that
    precision: the value moves by less than the float32 rounding of the result.

    Finite features whose products overflow float32 (entries of about 1e18 or more, e.g. a student diverging) get
    their cost in float64 (checked on the host copy the solver reads anyway: one read per call):
    the plan stays exact, and an overflowing loss then reads inf, which the engine reports with
    its epoch and step (the solver would refuse an inf cost instead).
    """
    def cost(dtype):
        K = _centred_cost(s, t, dtype)
        return K if extra is None else K + extra().to(K.device)
    dtype = torch.promote_types(s.dtype, torch.float32)  # never a bf16/fp16 cost: 3 digits decide no plan
    return exact_plan(cost(dtype), fallback=None if dtype == torch.float64 else lambda: cost(torch.float64))


def feature_plans(pairs: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """:func:`feature_plan` of each ``(s, t)`` of ``pairs`` (CW2's classes), their costs read back
    to the host together: one read per call, not one per pair."""
    if not pairs:
        return []
    dtype = torch.promote_types(pairs[0][0].dtype, torch.float32)
    costs = [_centred_cost(s, t, dtype) for s, t in pairs]
    with torch.no_grad():
        flat = torch.cat([c.reshape(-1) for c in costs]).to(device="cpu", dtype=torch.float64).numpy()
    plans, offset = [], 0
    for (s, t), c in zip(pairs, costs):
        M = flat[offset:offset + c.numel()].reshape(c.shape)
        offset += c.numel()
        fallback = None if dtype == torch.float64 else (lambda s=s, t=t: _centred_cost(s, t, torch.float64))
        plans.append(_plan_on_host(M, c.device, fallback))
    return plans


def _centred_cost(s: Tensor, t: Tensor, dtype: torch.dtype) -> Tensor:
    with torch.no_grad():
        a, b = s.detach().to(dtype), t.detach().to(dtype)
        c = torch.cat([a, b]).mean(0)
        return ((a - c) @ (b - c).T).mul_(-2.0)


def plan_cost(s: Tensor, t: Tensor, rows: Tensor, cols: Tensor, weights: Tensor) -> Tensor:
    r""":math:`\sum_k w_k \|s_{r_k} - t_{c_k}\|^2`, differentiable in ``s`` and ``t`` (plan fixed).

    Shapes: s (n_s, d), t (n_t, d), rows/cols/weights (k,). Cost :math:`O(kd)`.
    """
    diff = s[rows] - t[cols]
    return (weights.to(diff.dtype) * (diff * diff).sum(1)).sum()


# ----------------------------------------------------------------------------- metrics
@metric("w2", label="W2 (E)", pairwise_factor=4)
def w2(student_feats: Tensor, teacher_feats: Tensor, labels=None, student_logits=None, teacher_logits=None) -> Tensor:
    r"""Exact squared 2-Wasserstein distance between the two empirical feature measures.

    .. math::
        W_2^2 = \min_{\gamma\in\Pi(\mathbf 1/n_s, \mathbf 1/n_t)} \sum_{ij}\gamma_{ij}\|s_i - t_j\|^2

    The plan is solved exactly without gradient; the loss is differentiated with the plan
    fixed (envelope theorem), through the plan's non-zero pairs only. For :math:`n_s = n_t`
    this is :math:`\frac1n\sum_i \|s_i - t_{\sigma(i)}\|^2` for the optimal assignment σ.

    Parameters
    ----------
    student_feats : Tensor, shape (n_s, d)
    teacher_feats : Tensor, shape (n_t, d)
        ``n_s`` and ``n_t`` may differ. ``labels`` and logits are ignored.

    Returns
    -------
    Tensor, 0-dim, in the features' dtype.

    Cost: one GEMM :math:`O(n_s n_t d)` for the solver's cost, the exact solver
    (:func:`exact_plan`), then :math:`O((n_s+n_t) d)` for the loss and its backward.
    Reference: Peyré & Cuturi (2019), ch. 3; Montesuma (2025), KD²M "W2 (E)".
    """
    s, t = student_feats, teacher_feats
    rows, cols, w = feature_plan(s, t)
    if s.shape[0] == t.shape[0] and cols.shape[0] == s.shape[0]:
        # a permutation (rows = 0..n-1, weights 1/n): skip the gather on the student side. (Not the
        # product plan a non-finite cost gets inside the engine: n² pairs, so that the loss reads NaN.)
        diff = s - t[cols]
        return (diff * diff).sum() / s.shape[0]
    return plan_cost(s, t, rows, cols, w)


@metric("cw2", needs_labels=True, label="CW2 (E)", pairwise_factor=4, label_free="w2")
def cw2(student_feats: Tensor, teacher_feats: Tensor, labels=None, student_logits=None, teacher_logits=None) -> Tensor:
    r"""Class-conditional exact W2²: mean over the classes present in the batch.

    .. math::
        CW_2^2 = \frac1{|\mathcal C|}\sum_{c\in\mathcal C}
                 W_2^2\big(\hat P_S(z\mid y=c), \hat P_T(z\mid y=c)\big)

    Student and teacher features come from the same batch, so class c has the same count
    :math:`n_c` on both sides and every within-class problem is an assignment. A 1-sample
    class contributes :math:`\|s_i - t_i\|^2` (finite).

    Parameters
    ----------
    student_feats, teacher_feats : Tensor, shape (n, d)
    labels : LongTensor, shape (n,)

    Returns
    -------
    Tensor, 0-dim.

    Cost: per class a GEMM :math:`O(n_c^2 d)` and an assignment of size :math:`n_c` (the
    classes' costs are read back to the host together), then :math:`O(nd)` for the loss and
    its backward.
    Reference: Montesuma (2025), KD²M "CW2 (E)".
    """
    s, t = student_feats, teacher_feats
    groups = class_indices(labels)
    n_classes = len(groups)
    rows, cols, ws = [], [], []
    # one small GEMM per class: Σ_c n_c² d work instead of n² d for the whole batch
    plans = feature_plans([(s[idx], t[idx]) for idx in groups])
    for idx, (r, c, w) in zip(groups, plans):
        rows.append(idx[r])
        cols.append(idx[c])
        ws.append(w / n_classes)
    return plan_cost(s, t, torch.cat(rows), torch.cat(cols), torch.cat(ws))


def _label_cost_pairs(kind: str, labels, s_logits, t_logits, rows: Tensor, cols: Tensor) -> Tensor:
    """ℓ(i_k, j_k) on the plan's pairs only, differentiable in the student logits."""
    if kind == "labels":
        return 2.0 * (labels[rows] != labels[cols]).to(torch.float64)
    if kind == "sqeuclidean":
        d = torch.softmax(s_logits, 1)[rows] - torch.softmax(t_logits, 1)[cols]
        return (d * d).sum(1)
    log_ps = torch.log_softmax(s_logits, 1)[rows]
    log_pt = torch.log_softmax(t_logits, 1)[cols]
    return (log_pt.exp() * (log_pt - log_ps)).sum(1)


def _label_cost_dense(kind: str, labels, s_logits, t_logits) -> Tensor:
    """Full (n_s, n_t) label cost in float64, without gradient, for the solver."""
    with torch.no_grad():
        if kind == "labels":
            return 2.0 * (labels[:, None] != labels[None, :]).to(torch.float64)
        if kind == "sqeuclidean":
            ps = torch.softmax(s_logits.detach().double(), 1)
            pt = torch.softmax(t_logits.detach().double(), 1)
            return (ps * ps).sum(1, keepdim=True) + (pt * pt).sum(1)[None, :] - 2.0 * ps @ pt.T
        log_ps = torch.log_softmax(s_logits.detach().double(), 1)
        log_pt = torch.log_softmax(t_logits.detach().double(), 1)
        pt = log_pt.exp()
        # KL(p_T_j || p_S_i) = Σ_c p_T_jc log p_T_jc − Σ_c p_T_jc log p_S_ic
        return (pt * log_pt).sum(1)[None, :] - log_ps @ pt.T


@metric("jw2", label="JW2 (E)", pairwise_factor=6, label_free="w2")  # its label cost reads labels when given
def jw2(student_feats: Tensor, teacher_feats: Tensor, labels=None, student_logits=None, teacher_logits=None,
        *, beta: float = 1.0, label_cost: str = "labels") -> Tensor:
    r"""Exact OT on the joint feature-label space, :math:`\hat P(Z\times Y)`.

    .. math::
        JW_2^2 = \min_{\gamma\in\Pi(\mathbf 1/n_s, \mathbf 1/n_t)} \sum_{ij}\gamma_{ij}
                 \big(\|s_i - t_j\|^2 + \beta\,\ell_{ij}\big)

    with ``label_cost``:

    * ``"labels"`` (default): :math:`\ell_{ij} = \|e_{y_i} - e_{y_j}\|^2 = 2\,[y_i \ne y_j]`
      (one-hot labels; student and teacher share the batch's labels). Needs ``labels``.
    * ``"sqeuclidean"``: :math:`\ell_{ij} = \|\mathrm{softmax}(u_i^S) - \mathrm{softmax}(u_j^T)\|^2`.
    * ``"kl"``: :math:`\ell_{ij} = \mathrm{KL}(\mathrm{softmax}(u_j^T)\,\|\,\mathrm{softmax}(u_i^S))`
      (teacher first, as in Hinton's KD). Both logit costs need ``student_logits`` and
      ``teacher_logits``.

    The plan is fixed (envelope theorem); the gradient of the feature term reaches
    ``student_feats`` and that of the logit term reaches ``student_logits`` (the reference
    code built a student-vs-student feature cost and detached it, so only logits were matched).

    Parameters
    ----------
    student_feats : Tensor, shape (n_s, d)
    teacher_feats : Tensor, shape (n_t, d)
    labels : LongTensor, shape (n,), optional
    student_logits, teacher_logits : Tensor, shape (n, C), optional
    beta : float, default 1.0
        Weight of the label cost, >= 0.
    label_cost : {"labels", "sqeuclidean", "kl"}, default "labels"

    Returns
    -------
    Tensor, 0-dim.

    Cost: :math:`O(n_s n_t (d + C))` for the solver's dense cost (no gradient), the exact
    solver, then :math:`O((n_s + n_t)(d + C))` for the loss and its backward.
    Reference: Courty et al. (2017), Joint distribution optimal transportation for domain
    adaptation, NeurIPS; Montesuma (2025), KD²M "JW2 (E)".
    """
    if label_cost not in LABEL_COSTS:
        raise ValueError(f"jw2: label_cost must be one of {', '.join(LABEL_COSTS)}; got {label_cost!r}")
    beta = float(beta)
    if not np.isfinite(beta) or beta < 0:
        raise ValueError(f"jw2: beta must be a finite number >= 0, got {beta}")
    if label_cost == "labels" and labels is None:
        raise ValueError("jw2: label_cost='labels' needs labels=(n,) integer tensor "
                         "(or use label_cost='sqeuclidean'/'kl' with student and teacher logits)")
    if label_cost != "labels" and (student_logits is None or teacher_logits is None):
        raise ValueError(f"jw2: label_cost={label_cost!r} needs student_logits and teacher_logits (n, C)")
    s, t = student_feats, teacher_feats
    # ‖s_i − t_j‖² up to row/column constants (which the plan ignores), plus β·ℓ
    extra = (lambda: beta * _label_cost_dense(label_cost, labels, student_logits, teacher_logits)) if beta > 0 else None
    rows, cols, w = feature_plan(s, t, extra)
    loss = plan_cost(s, t, rows, cols, w)
    if beta > 0:
        ell = _label_cost_pairs(label_cost, labels, student_logits, teacher_logits, rows, cols)
        loss = loss + beta * (w.to(ell.dtype) * ell).sum().to(loss.dtype)
    return loss
