r"""The language-model field's token-level divergences between the student's and the teacher's
next-token distributions, as registered terms: ``fkl``, ``rkl``, ``jsd``, ``skew_kl``,
``skew_rkl``, ``tvd``.

Inputs: ``student_logits`` and ``teacher_logits`` of shape ``(B, L, V)`` or ``(n, V)``, and
optional ``labels`` of shape ``(B, L)`` or ``(n,)`` where ``-100`` marks a position to ignore
(padding, a prompt). With :math:`p_S = \mathrm{softmax}(z_S/\tau)` and
:math:`p_T = \mathrm{softmax}(z_T/\tau)` at one position, each term is the **mean over the kept
positions** of a per-position divergence summed over the vocabulary (TRL's ``batchmean`` with
labels; DistiLLM's token mean); the temperature divides both logits and there is no τ² factor
(TRL ``generalized_jsd_loss``).

Memory: a vocabulary of V entries makes every per-position quantity a ``(positions, V)``
tensor. The positions are processed in chunks of ``chunk_size`` positions (default: as many as
fit :data:`CHUNK_ELEMENTS` = 2²² logits, i.e. 131 positions at V = 32 000, all of them at a small
vocabulary). With more than one chunk, each chunk's value and its gradient with respect to the
student's logits are computed in the forward and the chunk's softmaxes freed at once; the
gradient goes into one buffer the size of the logits, which the backward scales. So the extra
memory of a call is that buffer plus a few ``chunk_size × V`` float32 temporaries (about 5 × 2²²
× 4 bytes ≈ 80 MiB), whatever the number of positions, beside the logits themselves.
``benchmarks/divergences.py`` measures it.

Sparse teacher: ``teacher_logits`` may be a :class:`~kd2m.losses.sparse_teacher.SparseTeacher`
(the teacher's top-k log-probabilities at ``temperature`` and the log-mass of the rest, k·12 + 4
bytes per token instead of 4·V). Each divergence is then taken between the (k + 1)-point
distributions "the kept ids, then one ghost token holding the tail":

.. math:: D\big(\tilde p_T \,\|\, \tilde p_S\big),\quad
          \tilde p_T = \big(p_T(K),\ 1 - \textstyle\sum_K p_T\big),\quad
          \tilde p_S = \big(p_S(K),\ 1 - \textstyle\sum_K p_S\big),

exact on the kept support, the tail compared as one bucket (the student's tail mass is a
log-sum-exp over its V − k other logits). Why this estimator: (i) it is exactly the full
divergence when k = V, and when the student and the teacher spread their tails in the same
proportions; (ii) every divergence here is an f-divergence, and merging tokens can only lower an
f-divergence (data processing), so the estimate is a lower bound of the full value that tends to
it as k grows, never negative, 0 only when the two agree on the kept ids and the tail's mass;
(iii) the student is pulled to put the teacher's tail mass outside the kept ids, where dropping the
tail (or renormalising the kept entries) lets it move that mass onto the kept ids. For the
forward KL it equals DistillKit's ``sparse_kl_div`` with ``missing=SYMMETRIC_UNIFORM`` (the tail
spread uniformly over the missing ids in both models), and the forward and reverse KL equal
ModelOpt's ``TopLogitsKLLoss`` (its ghost token, without top-p).
``benchmarks/fused_head.py`` tabulates its error against the full vocabulary at several k.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .inputs import check_positive, in_full_precision
from .registry import register_term
from .sparse_teacher import SparseTeacher, ghost_log_probs

__all__ = ["CHUNK_ELEMENTS", "rows", "per_position", "against_teacher", "from_log_probs", "token_divergence",
           "check_sparse_temperature", "fkl", "rkl", "jsd", "skew_kl", "skew_rkl", "tvd"]

#: logits per chunk when ``chunk_size`` is not given (see the module docstring)
CHUNK_ELEMENTS = 1 << 22


def _flat(term: str, student_logits, teacher_logits, labels) -> tuple[Tensor, Tensor | SparseTeacher, Tensor]:
    """(n, V) student logits, the (n, V) teacher logits or the n-position :class:`SparseTeacher`,
    and the (n,) float mask of kept positions."""
    for who, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if who == "teacher_logits" and isinstance(x, SparseTeacher):
            continue
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"loss term {term!r}: {who} must be a floating tensor (or, for the teacher, a "
                            f"SparseTeacher)")
        if x.dim() not in (2, 3):
            raise ValueError(f"loss term {term!r}: {who} must be (B, L, V) or (n, V), got {tuple(x.shape)}")
    s = student_logits.reshape(-1, student_logits.shape[-1])
    if isinstance(teacher_logits, SparseTeacher):
        if (len(teacher_logits), teacher_logits.vocab_size) != tuple(s.shape):
            raise ValueError(f"loss term {term!r}: the sparse teacher covers {len(teacher_logits)} positions of a "
                             f"vocabulary of {teacher_logits.vocab_size}, the student logits {tuple(s.shape)} "
                             f"(positions, V); both must cover the same positions and vocabulary")
        t = teacher_logits
    elif student_logits.shape != teacher_logits.shape:
        raise ValueError(f"loss term {term!r}: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; both must cover the same positions and vocabulary")
    else:
        t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).detach()
    if labels is None:
        mask = torch.ones(s.shape[0], dtype=s.dtype, device=s.device)
    else:
        if not isinstance(labels, Tensor) or labels.numel() != s.shape[0] or labels.is_floating_point():
            raise ValueError(f"loss term {term!r}: labels must be an integer tensor with one entry per position "
                             f"({s.shape[0]}), -100 where ignored; got "
                             f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
        mask = (labels.reshape(-1) != -100).to(s.dtype)
    return s, t, mask


def rows(teacher: Tensor | SparseTeacher, start: int, stop: int) -> Tensor | SparseTeacher:
    """Positions ``start:stop`` of dense (n, V) teacher logits or of a :class:`SparseTeacher`."""
    return teacher.rows(start, stop) if isinstance(teacher, SparseTeacher) else teacher[start:stop]


def _kl(p_log: Tensor, q_log: Tensor) -> Tensor:
    """KL(p‖q) per row from log-probabilities, Σ_v p (log p − log q); 0·log 0 = 0. The difference
    is zeroed too where p = 0: there it may be −inf − (−inf) (an entry masked in both), whose NaN
    would reach the gradient through the product even though the value discards it."""
    kept = p_log > -math.inf
    return torch.where(kept, p_log.exp() * torch.where(kept, p_log - q_log, 0.0), 0.0).sum(-1)


def _log_mix(a: Tensor, b: Tensor) -> Tensor:
    """log(e^a + e^b) elementwise: −inf where both are −inf, with a zero gradient there (logsumexp's
    own gradient at −inf, −inf is NaN)."""
    both = (a == -math.inf) & (b == -math.inf)
    mixed = torch.logsumexp(torch.stack([a.masked_fill(both, 0.0), b.masked_fill(both, 0.0)]), dim=0)
    return mixed.masked_fill(both, -math.inf)


def per_position(kind: str, s: Tensor, t: Tensor | SparseTeacher, temperature: float, beta: float,
                 alpha: float) -> Tensor:
    """The divergence of ``kind`` at each row of (m, V) student logits against (m, V) teacher
    logits, or against a :class:`SparseTeacher` of m positions read as its (k + 1)-point ghost-token
    distribution (:func:`kd2m.losses.sparse_teacher.ghost_log_probs`): (m,)."""
    return against_teacher(kind, F.log_softmax(s / temperature, dim=-1), t, temperature, beta, alpha)


def against_teacher(kind: str, ls: Tensor, t: Tensor | SparseTeacher, temperature: float, beta: float,
                    alpha: float) -> Tensor:
    """:func:`per_position` from the student's (m, V) log-probabilities at ``temperature``."""
    if isinstance(t, SparseTeacher):
        return from_log_probs(kind, *ghost_log_probs(ls, t), beta, alpha)
    return from_log_probs(kind, ls, F.log_softmax(t / temperature, dim=-1), beta, alpha)


def from_log_probs(kind: str, ls: Tensor, lt: Tensor, beta: float, alpha: float) -> Tensor:
    """The divergence of ``kind`` per row of (m, W) student and teacher log-probabilities: (m,)."""
    if kind == "fkl":
        return _kl(lt, ls)
    if kind == "rkl":
        return _kl(ls, lt)
    if kind == "jsd":
        if beta == 0.0:
            return _kl(lt, ls)
        if beta == 1.0:
            return _kl(ls, lt)
        # m = (1 − β) p_S + β p_T, in log space
        lm = _log_mix(ls + math.log1p(-beta), lt + math.log(beta))
        return beta * _kl(lt, lm) + (1.0 - beta) * _kl(ls, lm)
    if kind == "skew_kl":   # KL(p_T ‖ α p_T + (1 − α) p_S)
        lm = _log_mix(lt + math.log(alpha), ls + math.log1p(-alpha)) \
            if 0.0 < alpha < 1.0 else (lt if alpha == 1.0 else ls)
        return _kl(lt, lm)
    if kind == "skew_rkl":  # KL(p_S ‖ α p_S + (1 − α) p_T)
        lm = _log_mix(ls + math.log(alpha), lt + math.log1p(-alpha)) \
            if 0.0 < alpha < 1.0 else (ls if alpha == 1.0 else lt)
        return _kl(ls, lm)
    if kind == "tvd":
        return 0.5 * (ls.exp() - lt.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {kind!r}")


def token_divergence(kind: str, student_logits: Tensor, teacher_logits: Tensor, labels=None, *,
                     temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
                     chunk_size: int | None = None) -> Tensor:
    """Mean over kept positions of the per-position divergence ``kind`` (see the module docstring),
    computed over chunks of ``chunk_size`` positions (default: :data:`CHUNK_ELEMENTS` logits). 0-dim."""
    s, t, mask = _flat(kind, student_logits, teacher_logits, labels)
    check_sparse_temperature(kind, t, temperature)
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // s.shape[1])

    def summed(cs, ct, cm):
        return (per_position(kind, cs, ct, temperature, beta, alpha) * cm).sum()
    if s.shape[0] <= chunk_size:  # one chunk: plain autograd
        total = summed(s, t, mask)
    elif torch.is_grad_enabled() and s.requires_grad:
        total = _Chunked.apply(s, t, mask, summed, chunk_size)
    else:
        total = sum(summed(s[i:i + chunk_size], rows(t, i, i + chunk_size), mask[i:i + chunk_size])
                    for i in range(0, s.shape[0], chunk_size))
    return total / mask.sum().clamp_min(1.0)


def check_sparse_temperature(term: str, teacher, temperature: float) -> None:
    """A :class:`SparseTeacher` holds log-probabilities at one temperature; its tail cannot be
    re-tempered exactly (that needs the tail's logits), so a divergence at another τ is refused."""
    if isinstance(teacher, SparseTeacher) and not math.isclose(teacher.temperature, temperature):
        raise ValueError(f"loss term {term!r}: the sparse teacher holds log-probabilities at temperature "
                         f"{teacher.temperature}, the term asks for temperature {temperature}; build it with "
                         f"SparseTeacher.from_logits(logits, k, temperature={temperature}) or set the term's "
                         f"temperature to {teacher.temperature}")


class _Chunked(torch.autograd.Function):
    """Σ over chunks of ``summed(chunk)``, its gradient with respect to the student's logits
    computed chunk by chunk during the forward and written into one buffer of the logits' shape:
    no chunk's softmaxes outlive it, and the backward is a product with that buffer (no
    recomputation, no full-size gradient per chunk). First-order gradients only."""

    @staticmethod
    def forward(ctx, s, t, mask, summed, chunk_size):
        grad = torch.empty_like(s)
        total = s.new_zeros(())
        for i in range(0, s.shape[0], chunk_size):
            leaf = s[i:i + chunk_size].detach().requires_grad_()
            with torch.enable_grad():
                value = summed(leaf, rows(t, i, i + chunk_size), mask[i:i + chunk_size])
            grad[i:i + chunk_size], = torch.autograd.grad(value, leaf)
            total += value.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad, = ctx.saved_tensors
        return grad * grad_output, None, None, None, None


def _check(term: str, temperature, chunk_size, **fractions) -> None:
    check_positive(term, temperature=temperature)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"loss term {term!r}: chunk_size must be a positive integer (or None: from the "
                         f"vocabulary), got {chunk_size!r}")
    for name, value in fractions.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"loss term {term!r}: {name} must be in [0, 1], got {value!r}")




@register_term("fkl", label="FKL", needs=("logits", "labels"), paper="Hinton et al. 2015; token-level (TRL GKD β=0)")
@in_full_precision
def fkl(*, student_logits, teacher_logits, labels=None, temperature: float = 1.0, chunk_size: int | None = None,
        **_) -> Tensor:
    r"""Forward KL per token, :math:`\mathrm{KL}(p_T \,\|\, p_S)`, mean over kept positions: TRL's
    ``generalized_jsd_loss`` with β = 0 (its ``batchmean`` with labels). Shapes: ``(B, L, V)`` or
    ``(n, V)``, labels ``(B, L)``/``(n,)``. Cost: O(positions·V)."""
    _check("fkl", temperature, chunk_size)
    return token_divergence("fkl", student_logits, teacher_logits, labels, temperature=temperature,
                            chunk_size=chunk_size)


@register_term("rkl", label="RKL", needs=("logits", "labels"), paper="Gu et al., MiniLLM, ICLR 2024 (TRL GKD β=1)")
@in_full_precision
def rkl(*, student_logits, teacher_logits, labels=None, temperature: float = 1.0, chunk_size: int | None = None,
        **_) -> Tensor:
    r"""Reverse KL per token, :math:`\mathrm{KL}(p_S \,\|\, p_T)` (mode-seeking), mean over kept
    positions: TRL's ``generalized_jsd_loss`` with β = 1; DistiLLM's ``reverse_kl``."""
    _check("rkl", temperature, chunk_size)
    return token_divergence("rkl", student_logits, teacher_logits, labels, temperature=temperature,
                            chunk_size=chunk_size)


@register_term("jsd", label="GKD-JSD", needs=("logits", "labels"), paper="Agarwal et al., GKD, ICLR 2024")
@in_full_precision
def jsd(*, student_logits, teacher_logits, labels=None, beta: float = 0.5, temperature: float = 1.0,
        chunk_size: int | None = None, **_) -> Tensor:
    r"""GKD's generalised Jensen–Shannon divergence per token, mean over kept positions:

    .. math:: \beta\,\mathrm{KL}(p_T\|m) + (1-\beta)\,\mathrm{KL}(p_S\|m),\quad m = (1-\beta)p_S + \beta p_T,

    with β = 0 the forward KL :math:`\mathrm{KL}(p_T\|p_S)` and β = 1 the reverse KL
    :math:`\mathrm{KL}(p_S\|p_T)` (not the limits: as in TRL). Equal to TRL's
    ``GKDTrainer.generalized_jsd_loss`` (trl/experimental/gkd/gkd_trainer.py, TRL ≥ 0.16, the same
    through 1.16) with ``reduction="batchmean"`` and labels; the mixture in log space as there."""
    _check("jsd", temperature, chunk_size, beta=beta)
    return token_divergence("jsd", student_logits, teacher_logits, labels, temperature=temperature, beta=beta,
                            chunk_size=chunk_size)


@register_term("skew_kl", label="SKL", needs=("logits", "labels"), paper="Ko et al., DistiLLM, ICML 2024")
@in_full_precision
def skew_kl(*, student_logits, teacher_logits, labels=None, alpha: float = 0.1, temperature: float = 1.0,
            chunk_size: int | None = None, **_) -> Tensor:
    r"""DistiLLM's skew KL per token, :math:`\mathrm{KL}(p_T \,\|\, \alpha p_T + (1-\alpha) p_S)`, mean
    over kept positions; α = 0.1 as DistiLLM's ``--skew-alpha``. DistiLLM's ``skewed_forward_kl``
    returns the cross-entropy :math:`-\sum p_T \log(\cdot)`, which is this plus the teacher's
    entropy (the same gradient); this is the divergence itself (0 when the models agree)."""
    _check("skew_kl", temperature, chunk_size, alpha=alpha)
    return token_divergence("skew_kl", student_logits, teacher_logits, labels, temperature=temperature,
                            alpha=alpha, chunk_size=chunk_size)


@register_term("skew_rkl", label="SRKL", needs=("logits", "labels"), paper="Ko et al., DistiLLM, ICML 2024")
@in_full_precision
def skew_rkl(*, student_logits, teacher_logits, labels=None, alpha: float = 0.1, temperature: float = 1.0,
             chunk_size: int | None = None, **_) -> Tensor:
    r"""DistiLLM's skew reverse KL per token, :math:`\mathrm{KL}(p_S \,\|\, \alpha p_S + (1-\alpha) p_T)`,
    mean over kept positions (DistiLLM's ``skewed_reverse_kl``, ``lam`` = α = 0.1; the gradient
    flows through the student inside the mixture, as there)."""
    _check("skew_rkl", temperature, chunk_size, alpha=alpha)
    return token_divergence("skew_rkl", student_logits, teacher_logits, labels, temperature=temperature,
                            alpha=alpha, chunk_size=chunk_size)


@register_term("tvd", label="TVD", needs=("logits", "labels"), paper="Wen et al., f-divergence KD, ACL 2023")
@in_full_precision
def tvd(*, student_logits, teacher_logits, labels=None, temperature: float = 1.0, chunk_size: int | None = None,
        **_) -> Tensor:
    r"""Total variation per token, :math:`\tfrac12 \sum_v |p_T(v) - p_S(v)|`, mean over kept
    positions (DistiLLM's ``tv_distance``)."""
    _check("tvd", temperature, chunk_size)
    return token_divergence("tvd", student_logits, teacher_logits, labels, temperature=temperature,
                            chunk_size=chunk_size)
