r"""A teacher's next-token distributions kept as their top-k entries plus one tail bucket: what
offline distillation stores per token instead of V logits (DistillKit's compressed logprobs,
ModelOpt's top-logits loss, axolotl's top-k logprobs).

At one position, with :math:`p_T = \mathrm{softmax}(z_T/\tau)` over a vocabulary of V tokens
and :math:`K` the ids of its k largest entries, :class:`SparseTeacher` holds

.. math:: \mathrm{ids} = K,\qquad \mathrm{logprobs} = \log p_T(K),\qquad
          \mathrm{tail\_logprob} = \log \sum_{v \notin K} p_T(v) = \log\big(1 - \textstyle\sum_{v\in K} p_T(v)\big).

The tail is stored, not recomputed from the kept entries: from the logits it is a log-sum-exp
over the V − k tail logits, exact even when the kept mass rounds to 1 in float32, where
:math:`\log(1 - \sum)` would be ``log 0``.

Every divergence of :mod:`kd2m.losses.divergences` accepts a :class:`SparseTeacher` in place of
dense teacher logits; it reads the teacher as the (k + 1)-point distribution "the k kept tokens
and one ghost token standing for the tail" (see :func:`ghost_log_probs`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import value_checks

__all__ = ["SparseTeacher", "check_k", "ghost_log_probs"]


@dataclass(frozen=True, eq=False)
class SparseTeacher:
    r"""Top-k log-probabilities of a teacher at n positions, and the log-mass of the rest.

    Parameters
    ----------
    ids : (n, k) int64
        The kept token ids of each position, distinct within a row, in ``[0, vocab_size)``.
    logprobs : (n, k) float
        :math:`\log p_T` of those ids under the teacher's full-vocabulary softmax at
        ``temperature`` (not renormalised over the k ids).
    tail_logprob : (n,) float
        :math:`\log(1 - \sum_{v \in K} p_T(v))`, ``-inf`` where the tail is empty (k = V).
    vocab_size : int
        V, the width of the teacher's (and the student's) logits.
    temperature : float
        τ at which the log-probabilities were taken; a divergence must be asked for at the same τ.

    Memory: ``k·(8 + 4) + 4`` bytes per token as held here (int64 ids, float32 log-probs, one
    float32 tail), e.g. 772 B at k = 64 against ``4·V`` = 192 KiB of float32 logits at
    V = 49 152; stored as int32 ids and bf16 log-probs, ``6k + 2`` bytes (386 B at k = 64).
    """
    ids: Tensor
    logprobs: Tensor
    tail_logprob: Tensor
    vocab_size: int
    temperature: float = 1.0

    def __post_init__(self):
        ids, lp, tail, v = self.ids, self.logprobs, self.tail_logprob, self.vocab_size
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
            raise ValueError(f"SparseTeacher: ids must be an (n, k) int64 tensor, got "
                             f"{tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__}"
                             f"{' ' + str(ids.dtype) if isinstance(ids, Tensor) else ''}")
        if not isinstance(lp, Tensor) or not lp.is_floating_point() or lp.shape != ids.shape:
            raise ValueError(f"SparseTeacher: logprobs must be a floating tensor of the ids' shape "
                             f"{tuple(ids.shape)}, got {tuple(lp.shape) if isinstance(lp, Tensor) else lp!r}")
        if not isinstance(tail, Tensor) or not tail.is_floating_point() or tail.shape != ids.shape[:1]:
            raise ValueError(f"SparseTeacher: tail_logprob must be a floating ({ids.shape[0]},) tensor, got "
                             f"{tuple(tail.shape) if isinstance(tail, Tensor) else tail!r}")
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"SparseTeacher: vocab_size must be a positive integer, got {v!r}")
        check_k(ids.shape[1], v)
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"SparseTeacher: temperature must be a finite number > 0, got {self.temperature!r}")
        if ids.numel() and value_checks.eager() and (int(ids.min()) < 0 or int(ids.max()) >= v):
            raise ValueError(f"SparseTeacher: ids must lie in [0, {v}) (the vocabulary V={v}), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")

    @classmethod
    def from_logits(cls, logits: Tensor, k: int, temperature: float = 1.0) -> SparseTeacher:
        r"""The top-k entries of :math:`\mathrm{softmax}(z/\tau)` of ``logits`` (…, V), flattened to
        (n, V), n the product of the leading dimensions; the tail as a log-sum-exp over the V − k
        logits left out. Computed without gradient (the teacher is frozen)."""
        if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() < 1:
            raise ValueError("SparseTeacher.from_logits: logits must be a floating tensor (…, V)")
        vocab = logits.shape[-1]
        check_k(k, vocab)
        with torch.no_grad():  # half-precision logits: the log-sum-exps in float32
            z = logits.reshape(-1, vocab).to(torch.promote_types(logits.dtype, torch.float32)) / temperature
            lse = z.logsumexp(-1, keepdim=True)
            top, ids = z.topk(k, dim=-1)
            if k == vocab:
                tail = torch.full_like(lse[:, 0], -math.inf)
            else:
                tail = (z.scatter(-1, ids, -math.inf).logsumexp(-1, keepdim=True) - lse)[:, 0]
            return cls(ids, top - lse, tail, vocab, float(temperature))

    @classmethod
    def from_logprobs(cls, ids: Tensor, logprobs: Tensor, vocab_size: int,
                      temperature: float = 1.0) -> SparseTeacher:
        r"""From stored top-k log-probabilities alone: the tail is
        :math:`\log(1 - \exp(\mathrm{logsumexp}(\mathrm{logprobs})))`, computed as ``log(-expm1(·))``
        and floored at the smallest normal number of the dtype where the kept mass rounds to 1
        (the tail is then unknown but tiny; ``-inf`` only when k = V)."""
        kept = logprobs.logsumexp(-1).clamp_max(0.0)
        tail = torch.log(-torch.expm1(kept)).clamp_min(math.log(torch.finfo(logprobs.dtype).tiny))
        if ids.dim() == 2 and ids.shape[1] == vocab_size:
            tail = torch.full_like(tail, -math.inf)
        return cls(ids, logprobs, tail, vocab_size, float(temperature))

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    def rows(self, start: int, stop: int) -> SparseTeacher:
        """Positions ``start:stop`` (views, no copy, no re-validation)."""
        new = object.__new__(SparseTeacher)
        for name, value in (("ids", self.ids[start:stop]), ("logprobs", self.logprobs[start:stop]),
                            ("tail_logprob", self.tail_logprob[start:stop]), ("vocab_size", self.vocab_size),
                            ("temperature", self.temperature)):
            object.__setattr__(new, name, value)
        return new

    def to(self, *args, **kwargs) -> SparseTeacher:
        """Moved like ``Tensor.to`` (ids keep int64; a dtype applies to the log-probabilities)."""
        return SparseTeacher(self.ids.to(*[a for a in args if not isinstance(a, torch.dtype)],
                                         **{k: v for k, v in kwargs.items() if k != "dtype"}),
                             self.logprobs.to(*args, **kwargs), self.tail_logprob.to(*args, **kwargs),
                             self.vocab_size, self.temperature)

    def bytes_per_token(self) -> int:
        """Bytes this object holds per position: ids, log-probs and the tail, at their dtypes."""
        return (self.ids.element_size() + self.logprobs.element_size()) * self.k + self.tail_logprob.element_size()


def check_k(k, vocab_size: int) -> None:
    """``k`` an integer in ``[1, V]``; the ValueError names both."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"SparseTeacher: k must be a positive integer, got {k!r}")
    if k > vocab_size:
        raise ValueError(f"SparseTeacher: k={k} exceeds the vocabulary size V={vocab_size}; keep at most V "
                         f"entries per position")


def ghost_log_probs(student_log_probs: Tensor, teacher: SparseTeacher) -> tuple[Tensor, Tensor]:
    r"""The student's and the teacher's (k + 1)-point log-distributions: the kept ids, then the
    ghost token (the tail) where k < V.

    .. math:: \tilde p_S = \big(p_S(K),\ 1 - \textstyle\sum_{v\in K} p_S(v)\big),\qquad
              \tilde p_T = \big(p_T(K),\ 1 - \textstyle\sum_{v\in K} p_T(v)\big)

    The student's tail is a log-sum-exp over its V − k tail log-probabilities (not ``log(1 − Σ)``),
    so it stays exact, and its gradient finite, when the kept mass is near 1.

    Parameters
    ----------
    student_log_probs : (m, V)
        :math:`\log p_S` at the teacher's temperature.
    teacher : SparseTeacher of m positions

    Returns
    -------
    (m, k + 1) and (m, k + 1) log-probabilities, or (m, k) and (m, k) where k = V.
    """
    ids = teacher.ids
    kept_s = student_log_probs.gather(-1, ids)
    kept_t = teacher.logprobs.to(student_log_probs.dtype)
    if teacher.k == teacher.vocab_size:  # no tail: the kept ids are the vocabulary
        return kept_s, kept_t
    tail_s = student_log_probs.scatter(-1, ids, -math.inf).logsumexp(-1, keepdim=True)
    tail_t = teacher.tail_logprob.to(student_log_probs.dtype)[:, None]
    return torch.cat([kept_s, tail_s], -1), torch.cat([kept_t, tail_t], -1)
