r"""Sliced 2-Wasserstein distance: exact 1-D optimal transport along random directions.

.. math::
    SW_2^2(\hat P_S, \hat P_T) = \frac1L \sum_{l=1}^L W_2^2\big(\theta_l{}_\sharp \hat P_S,
    \theta_l{}_\sharp \hat P_T\big), \qquad \theta_l \sim \mathcal U(\mathbb S^{d-1})

In one dimension the optimal plan is the monotone (quantile) coupling, so each term is a sort:
:math:`W_2^2 = \int_0^1 (F_S^{-1}(u) - F_T^{-1}(u))^2\,du`, which for uniform weights is a finite
sum over the merged breakpoints :math:`\{i/n_s\} \cup \{j/n_t\}` (equal to
:math:`\frac1n\sum_i (x_{(i)} - y_{(i)})^2` when :math:`n_s = n_t = n`). The gradient flows
through the sort (the permutation is locally constant), as for exact OT.

References
----------
.. [1] Rabin, J., Peyré, G., Delon, J., Bernot, M. (2011). Wasserstein barycenter and its
   application to texture mixing. SSVM.
.. [2] Bonneel, N., Rabin, J., Peyré, G., Pfister, H. (2015). Sliced and Radon Wasserstein
   barycenters of measures. JMIV 51(1).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._base import metric

__all__ = ["sliced_w2", "sliced_w2_projections", "random_projections", "wasserstein_1d_sq"]


def random_projections(d: int, n_projections: int, seed: int | None = None, *,
                       device=None, dtype=torch.float32) -> Tensor:
    """``n_projections`` directions drawn uniformly on the unit sphere of R^d, shape (d, L).

    Drawn on the CPU in float64 then moved, so a seed gives the same directions on every
    device. ``seed=None`` uses torch's global RNG (``torch.manual_seed`` makes it
    reproducible); an int uses a private ``torch.Generator`` seeded with it, leaving the
    global RNG untouched.
    """
    if d < 1 or n_projections < 1:
        raise ValueError(f"random_projections: need d >= 1 and n_projections >= 1, got d={d}, L={n_projections}")
    gen = None
    if seed is not None:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(seed))
    theta = torch.randn(d, n_projections, generator=gen, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True).clamp_min(1e-300)
    return theta.to(device=device, dtype=dtype)


def _quantile_pairs(n_s: int, n_t: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Indices and masses of the 1-D monotone coupling between n_s and n_t uniform atoms.

    Breakpoints of both quantile functions, in integer units of 1/(n_s n_t) so that equal
    fractions (1/2 = 2/4) merge exactly: B = {i n_t} ∪ {j n_s}. On the interval (B_{k-1}, B_k]
    the sorted source atom is ceil(B_k / n_t) − 1 and the sorted target atom ceil(B_k / n_s) − 1.
    """
    bs = torch.arange(1, n_s + 1, dtype=torch.long) * n_t
    bt = torch.arange(1, n_t + 1, dtype=torch.long) * n_s
    B = torch.unique(torch.cat([bs, bt]))  # sorted
    prev = torch.cat([B.new_zeros(1), B[:-1]])
    i = torch.div(B + n_t - 1, n_t, rounding_mode="floor") - 1
    j = torch.div(B + n_s - 1, n_s, rounding_mode="floor") - 1
    w = (B - prev).to(torch.float64) / float(n_s * n_t)
    return i.to(device), j.to(device), w.to(device)


def wasserstein_1d_sq(x: Tensor, y: Tensor) -> Tensor:
    r"""Exact :math:`W_2^2` between uniform 1-D empirical measures, column by column.

    Parameters
    ----------
    x : Tensor, shape (n_s, L)
    y : Tensor, shape (n_t, L)

    Returns
    -------
    Tensor, shape (L,): :math:`\int_0^1 (F_x^{-1}(u) - F_y^{-1}(u))^2 du` for each column.

    Cost: :math:`O(L (n_s \log n_s + n_t \log n_t))` for the sorts, :math:`O(L (n_s + n_t))` after.
    """
    xs = torch.sort(x, dim=0).values
    ys = torch.sort(y, dim=0).values
    n_s, n_t = xs.shape[0], ys.shape[0]
    if n_s == n_t:
        return ((xs - ys) ** 2).mean(0)
    i, j, w = _quantile_pairs(n_s, n_t, xs.device)
    return (w.to(xs.dtype)[:, None] * (xs[i] - ys[j]) ** 2).sum(0)


def sliced_w2_projections(student_feats: Tensor, teacher_feats: Tensor, projections: Tensor) -> Tensor:
    r"""Sliced :math:`W_2^2` along given directions: :math:`\frac1L\sum_l W_2^2(S\theta_l, T\theta_l)`.

    Same quantity as ``ot.sliced.sliced_wasserstein_distance(S, T, projections=θ, p=2) ** 2``.

    Parameters
    ----------
    student_feats : Tensor, shape (n_s, d)
    teacher_feats : Tensor, shape (n_t, d)
    projections : Tensor, shape (d, L)
        Directions (columns); used as given (not re-normalised).

    Returns
    -------
    Tensor, 0-dim.

    Cost: :math:`O((n_s + n_t) d L)` for the projections plus the sorts.
    """
    if projections.dim() != 2 or projections.shape[0] != student_feats.shape[1]:
        raise ValueError(f"sliced_w2: projections must have shape (d={student_feats.shape[1]}, L), "
                         f"got {tuple(projections.shape)}")
    theta = projections.to(device=student_feats.device, dtype=student_feats.dtype)
    return wasserstein_1d_sq(student_feats @ theta, teacher_feats.to(theta.dtype) @ theta).mean()


@metric("sliced_w2", label="SW2 (E)")
def sliced_w2(student_feats: Tensor, teacher_feats: Tensor, labels=None, student_logits=None, teacher_logits=None,
              *, n_projections: int = 128, seed: int | None = None) -> Tensor:
    r"""Monte-Carlo sliced squared 2-Wasserstein distance with L random directions.

    .. math::
        SW_2^2 \approx \frac1L\sum_{l=1}^L W_2^2\big(\{\langle\theta_l, s_i\rangle\}_i,
                                                \{\langle\theta_l, t_j\rangle\}_j\big)

    Parameters
    ----------
    student_feats : Tensor, shape (n_s, d)
    teacher_feats : Tensor, shape (n_t, d)
        ``n_s`` and ``n_t`` may differ.
    n_projections : int, default 128
        Number L of directions.
    seed : int or None, default None
        ``None``: fresh directions at every call from torch's global RNG (reproducible under
        ``torch.manual_seed``; an unbiased estimate of the sliced distance at each training
        step). An int: a private generator seeded with it at every call, so the metric is a
        deterministic function of its inputs (the same L directions every call, on every
        device) — for evaluation and bounds; it does not touch the global RNG.

    Returns
    -------
    Tensor, 0-dim.

    Cost: :math:`O((n_s + n_t) d L + L\,n \log n)`. See :func:`sliced_w2_projections` to pass
    the directions explicitly.
    Reference: Bonneel et al. (2015), JMIV 51(1).
    """
    L = int(n_projections)
    if L < 1:
        raise ValueError(f"sliced_w2: n_projections must be >= 1, got {n_projections}")
    theta = random_projections(student_feats.shape[1], L, seed, device=student_feats.device,
                               dtype=student_feats.dtype)
    return sliced_w2_projections(student_feats, teacher_feats, theta)
