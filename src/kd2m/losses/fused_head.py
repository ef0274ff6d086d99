r"""The student's output layer, its next-token cross-entropy and a token divergence to the
teacher in one pass over chunks of positions: the ``(n, V)`` student logits never exist whole.

At a vocabulary of V = 128 256 the logits of 8 192 positions are 4 GiB in float32, and the plain
computation holds them, their softmaxes and their gradient at once. :func:`fused_head_loss` takes
the student's last hidden states ``h`` (n, d) and its output layer ``W`` (V, d) (and bias ``b``)
instead, and for each chunk of ``chunk_size`` positions builds :math:`z = hW^\top + b` (chunk, V),
takes the chunk's loss and its gradient :math:`g = \partial \ell / \partial z` at once, and
keeps only :math:`g W` (chunk, d) and :math:`W`'s accumulated :math:`g^\top h` (V, d): Liger's
``LigerFusedLinearCrossEntropy`` / ``FusedLinearJSD`` scheme, and TRL's chunked lm_head loss in
its ``DistillationTrainer``. The extra memory is a few ``chunk_size × V`` temporaries plus the
gradients of ``h`` and ``W`` (each the size of its input), whatever n.

The loss, with :math:`N` the positions whose label is not ``-100``,

.. math:: \ell = \frac{w_{CE}}{N} \sum_{i\,\mathrm{kept}} -\log \mathrm{softmax}(z_i)_{y_i}
          \;+\; \frac{w_D}{N} \sum_{i\,\mathrm{kept}} D\big(p_T(i) \,\|\, \mathrm{softmax}(z_i/\tau)\big),

the cross-entropy at temperature 1 (the supervised loss, as Hugging Face's causal-LM loss) and
the divergence ``kind`` of :mod:`kd2m.losses.divergences` at τ, the same per-position value and
mean as the registered term. ``labels[i]`` is the token that follows position ``i`` (shift
before flattening, as Hugging Face's models do). The teacher is dense logits ``(n, V)``, a
:class:`~kd2m.losses.sparse_teacher.SparseTeacher`, or a :class:`LinearTeacher` (its hidden
states and output layer, whose logits are built chunk by chunk too), or None (cross-entropy only).

``benchmarks/fused_head.py`` measures the peak memory and the throughput against the plain
computation at V = 49 152 and V = 128 256.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .divergences import CHUNK_ELEMENTS, against_teacher, check_sparse_temperature
from .inputs import check_nonnegative, check_positive
from .sparse_teacher import SparseTeacher

__all__ = ["DIVERGENCES", "LinearTeacher", "HeadLoss", "fused_head_loss", "TokenDivergence", "fused_head_terms"]

DIVERGENCES = ("fkl", "rkl", "jsd", "skew_kl", "skew_rkl", "tvd")


class LinearTeacher(NamedTuple):
    """A teacher given as its last hidden states ``hidden`` (n, d_T) and output layer ``weight``
    (V, d_T), ``bias`` (V,) or None: its logits are built one chunk of positions at a time."""
    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None

    def rows(self, start: int, stop: int) -> Tensor:
        z = self.hidden[start:stop] @ self.weight.T
        return z if self.bias is None else z + self.bias


class HeadLoss(NamedTuple):
    """``loss`` (0-dim, differentiable): :math:`w_{CE}\\,\\mathrm{ce} + w_D\\,\\mathrm{divergence}`;
    ``ce`` and ``divergence``: the two means over kept positions, detached (for logging)."""
    loss: Tensor
    ce: Tensor
    divergence: Tensor


class _Spec(NamedTuple):
    kind: str
    temperature: float
    beta: float
    alpha: float
    ce_scale: Tensor       # w_CE / N
    divergence_scale: Tensor  # w_D / N


def _teacher_rows(teacher, start: int, stop: int):
    if teacher is None or isinstance(teacher, Tensor):
        return None if teacher is None else teacher[start:stop].detach()
    return teacher.rows(start, stop)


def _chunk_sums(z: Tensor, labels: Tensor, teacher, spec: _Spec) -> tuple[Tensor, Tensor]:
    """Σ over the chunk's kept positions of the cross-entropy and of the divergence, from its
    (m, V) logits: two 0-dim tensors."""
    if teacher is None:
        return F.cross_entropy(z, labels, ignore_index=-100, reduction="sum"), z.new_zeros(())
    if not isinstance(teacher, SparseTeacher):
        teacher = teacher.to(z.dtype)
    keep = labels != -100
    ls = F.log_softmax(z if spec.temperature == 1.0 else z / spec.temperature, dim=-1)
    # at τ = 1 the cross-entropy reads the divergence's log-softmax: one (m, V) pass and buffer less
    ls1 = ls if spec.temperature == 1.0 else F.log_softmax(z, dim=-1)
    ce = -torch.where(keep, ls1.gather(-1, labels.clamp_min(0)[:, None])[:, 0], 0.0).sum()
    div = against_teacher(spec.kind, ls, teacher, spec.temperature, spec.beta, spec.alpha)
    return ce, (div * keep.to(z.dtype)).sum()


class _FusedHead(torch.autograd.Function):
    """Numerical kernel (the loop over chunks, forward and gradient together). Each chunk's logits
    and their gradient live only inside its iteration; the gradients of ``hidden``, ``weight`` and
    ``bias`` are accumulated in the forward (float32 at least) and scaled by the incoming gradient
    in the backward, so the backward recomputes nothing. First-order gradients only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, teacher, spec, chunk_size):
        work = torch.promote_types(hidden.dtype, torch.float32)
        w = weight.to(work)
        b = None if bias is None else bias.to(work)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros(hidden.shape, dtype=work, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=work, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=work, device=bias.device) if need_b else None
        ce_sum = torch.zeros((), dtype=work, device=hidden.device)
        div_sum = torch.zeros((), dtype=work, device=hidden.device)
        for i in range(0, hidden.shape[0], chunk_size):
            h = hidden[i:i + chunk_size].to(work)
            z = (h @ w.T if b is None else torch.addmm(b, h, w.T)).requires_grad_(need_h or need_w or need_b)
            with torch.enable_grad(), torch.autocast(hidden.device.type, enabled=False):
                ce, div = _chunk_sums(z, labels[i:i + chunk_size], _teacher_rows(teacher, i, i + chunk_size), spec)
                value = spec.ce_scale * ce + spec.divergence_scale * div
            if z.requires_grad:
                g, = torch.autograd.grad(value, z)
                if grad_h is not None:  # allocated where need_h, need_w, need_b
                    grad_h[i:i + chunk_size] = g @ w
                if grad_w is not None:
                    grad_w.addmm_(g.T, h)
                if grad_b is not None:
                    grad_b += g.sum(0)
            ce_sum += ce.detach()
            div_sum += div.detach()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        total = spec.ce_scale * ce_sum + spec.divergence_scale * div_sum
        n_kept = (labels != -100).sum().clamp_min(1).to(work)
        ce_mean, div_mean = ce_sum / n_kept, div_sum / n_kept
        ctx.mark_non_differentiable(ce_mean, div_mean)
        return total, ce_mean, div_mean

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_div):
        # the usual incoming gradient is 1 (the loss is the graph's root): hand the buffers back
        # as they are rather than a scaled copy, one (V, d) buffer less at the peak
        scale = None if bool(grad_total == 1) else grad_total
        grads = [None if g is None else (g if scale is None else g * scale).to(dtype)
                 for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None, None, None, None)


def fused_head_loss(hidden: Tensor, weight: Tensor, labels: Tensor, teacher=None, *, bias: Tensor | None = None,
                    kind: str = "fkl", ce_weight: float = 1.0, divergence_weight: float = 1.0,
                    temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
                    chunk_size: int | None = None) -> HeadLoss:
    r"""Cross-entropy and the divergence ``kind`` from the student's hidden states and output
    layer, chunk by chunk (see the module docstring for the formula).

    Parameters
    ----------
    hidden : (n, d) or (B, L, d) float, the student's last hidden states (after its final norm)
    weight : (V, d), the student's output layer (``lm_head.weight``)
    labels : (n,) or (B, L) int, the next token at each position, ``-100`` where ignored
    teacher : (n, V) / (B, L, V) logits, SparseTeacher, LinearTeacher, or None
    bias : (V,) or None
    kind : one of ``fkl rkl jsd skew_kl skew_rkl tvd``; ``beta`` (jsd), ``alpha`` (skew_*)
    ce_weight, divergence_weight : :math:`w_{CE}, w_D \ge 0`
    temperature : τ of the divergence (the cross-entropy is at τ = 1)
    chunk_size : positions per chunk (default: :data:`~kd2m.losses.divergences.CHUNK_ELEMENTS` // V)

    Returns
    -------
    :class:`HeadLoss` ``(loss, ce, divergence)``, 0-dim each; ``loss`` carries the gradients with
    respect to ``hidden``, ``weight`` and ``bias``.
    """
    hidden, labels, teacher = _check(hidden, weight, labels, teacher, bias, kind, temperature, chunk_size)
    check_nonnegative("fused_head_loss", ce_weight=ce_weight, divergence_weight=divergence_weight)
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // weight.shape[0])
    work = torch.promote_types(hidden.dtype, torch.float32)
    n_kept = (labels != -100).sum().clamp_min(1).to(work)
    spec = _Spec(kind, float(temperature), float(beta), float(alpha), ce_weight / n_kept,
                 (divergence_weight if teacher is not None else 0.0) / n_kept)
    return HeadLoss(*_FusedHead.apply(hidden, weight, bias, labels, teacher, spec, chunk_size))


def _check(hidden, weight, labels, teacher, bias, kind, temperature, chunk_size):
    """The inputs flattened to positions, or a ValueError/TypeError naming the input and the fix."""
    who = "fused_head_loss"
    if kind not in DIVERGENCES:
        raise ValueError(f"{who}: kind must be one of {', '.join(DIVERGENCES)}, got {kind!r}")
    check_positive(who, temperature=temperature)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{who}: chunk_size must be a positive integer (or None), got {chunk_size!r}")
    for name, x in (("hidden", hidden), ("weight", weight)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"{who}: {name} must be a floating tensor")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1] or hidden.dim() not in (2, 3):
        raise ValueError(f"{who}: hidden (n, d) or (B, L, d) and weight (V, d) must share d; got hidden "
                         f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    vocab = weight.shape[0]
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (vocab,)):
        raise ValueError(f"{who}: bias must be a ({vocab},) tensor or None")
    h = hidden.reshape(-1, hidden.shape[-1])
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.numel() != h.shape[0]:
        raise ValueError(f"{who}: labels must be an integer tensor with one entry per position ({h.shape[0]}), "
                         f"-100 where ignored")
    if isinstance(teacher, Tensor):
        if teacher.shape[-1] != vocab or teacher.numel() != h.shape[0] * vocab:
            raise ValueError(f"{who}: teacher logits {tuple(teacher.shape)} must be ({h.shape[0]}, {vocab}): "
                             f"one row of V = {vocab} logits per position")
        teacher = teacher.reshape(-1, vocab)
    elif isinstance(teacher, SparseTeacher):
        if (len(teacher), teacher.vocab_size) != (h.shape[0], vocab):
            raise ValueError(f"{who}: the sparse teacher covers {len(teacher)} positions of a vocabulary of "
                             f"{teacher.vocab_size}; the student has {h.shape[0]} positions, V = {vocab}")
        check_sparse_temperature(who, teacher, temperature)
    elif isinstance(teacher, LinearTeacher):
        ht = teacher.hidden.reshape(-1, teacher.hidden.shape[-1]).detach()
        if teacher.weight.shape != (vocab, ht.shape[1]) or ht.shape[0] != h.shape[0]:
            raise ValueError(f"{who}: the linear teacher's hidden {tuple(teacher.hidden.shape)} and weight "
                             f"{tuple(teacher.weight.shape)} must cover {h.shape[0]} positions and V = {vocab}")
        teacher = LinearTeacher(ht, teacher.weight.detach(), None if teacher.bias is None else teacher.bias.detach())
    elif teacher is not None:
        raise TypeError(f"{who}: teacher must be logits, a SparseTeacher, a LinearTeacher or None, "
                        f"got {type(teacher).__name__}")
    return h, labels.reshape(-1).long(), teacher


class TokenDivergence(NamedTuple):
    """One token divergence of :func:`fused_head_terms`: its ``kind`` (one of :data:`DIVERGENCES`)
    and options, as the registered term of that name takes them."""
    kind: str
    temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 0.1


def _chunk_values(z: Tensor, labels: Tensor, teacher, divergences: Sequence[TokenDivergence]) -> Tensor:
    """(1 + m,): Σ over the chunk's kept positions of the cross-entropy, then of each divergence,
    from its (c, V) logits; one log-softmax per distinct temperature."""
    keep = labels != -100
    if teacher is not None and not isinstance(teacher, SparseTeacher):
        teacher = teacher.to(z.dtype)
    by_tau = {1.0: F.log_softmax(z, dim=-1)}
    sums = [-torch.where(keep, by_tau[1.0].gather(-1, labels.clamp_min(0)[:, None])[:, 0], 0.0).sum()]
    for d in divergences:
        if d.temperature not in by_tau:
            by_tau[d.temperature] = F.log_softmax(z / d.temperature, dim=-1)
        per = against_teacher(d.kind, by_tau[d.temperature], teacher, d.temperature, d.beta, d.alpha)
        sums.append((per * keep.to(z.dtype)).sum())
    return torch.stack(sums)


def _over_chunks(hidden, weight, bias, labels, teacher, divergences, chunk_size, coef=None, need=(False,) * 3):
    r"""Numerical kernel of :class:`_FusedHeadTerms`: the (1 + m,) sums of the outputs over every
    chunk and, where ``coef`` (1 + m,) is given, the gradients of :math:`\sum_k c_k\,\mathrm{sum}_k`
    with respect to ``hidden``, ``weight`` and ``bias`` (those ``need`` names; else None), one
    chunk's logits at a time."""
    work = torch.promote_types(hidden.dtype, torch.float32)
    w = weight.to(work)
    b = None if bias is None else bias.to(work)
    sums = torch.zeros(1 + len(divergences), dtype=work, device=hidden.device)
    grads = [torch.zeros(x.shape, dtype=work, device=x.device) if coef is not None and n else None
             for x, n in zip((hidden, weight, bias), need)]
    for i in range(0, hidden.shape[0], chunk_size):
        h = hidden[i:i + chunk_size].detach().to(work)
        with torch.set_grad_enabled(coef is not None), torch.autocast(hidden.device.type, enabled=False):
            z = (h @ w.T if b is None else torch.addmm(b, h, w.T)).detach().requires_grad_(coef is not None)
            values = _chunk_values(z, labels[i:i + chunk_size], _teacher_rows(teacher, i, i + chunk_size),
                                   divergences)
            g = torch.autograd.grad((coef * values).sum(), z)[0] if coef is not None else None
        sums += values.detach()
        if g is not None:  # coef given: the grads asked for are allocated
            if grads[0] is not None:
                grads[0][i:i + chunk_size] = g @ w
            if grads[1] is not None:
                grads[1].addmm_(g.T, h)
            if grads[2] is not None:
                grads[2] += g.sum(0)
    return sums, grads


class _FusedHeadTerms(torch.autograd.Function):
    r"""The outputs of :func:`fused_head_terms`, each differentiable on its own. Where the caller
    says how it will weigh them (``weights``: the training step's :math:`w_{CE}, \lambda_k`), the
    forward also takes the gradient of that weighted sum chunk by chunk, as :class:`_FusedHead`
    does, and the backward hands it back when the incoming gradients are those weights; any other
    combination (``weight: auto`` takes the cross-entropy's and each term's gradient apart) has the
    backward rebuild each chunk's logits and take it there. First-order gradients only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, teacher, divergences, chunk_size, weights):
        work = torch.promote_types(hidden.dtype, torch.float32)
        n_kept = (labels != -100).sum().clamp_min(1).to(work)
        need = ctx.needs_input_grad[:3]
        coef = None if weights is None or not any(need) else \
            torch.tensor(weights, dtype=work, device=hidden.device) / n_kept
        sums, grads = _over_chunks(hidden, weight, bias, labels, teacher, divergences, chunk_size, coef, need)
        ctx.save_for_backward(hidden, weight, bias, n_kept, *grads)
        ctx.labels, ctx.teacher, ctx.divergences, ctx.chunk_size = labels, teacher, divergences, chunk_size
        ctx.weights = None if coef is None else weights
        return tuple(v.clone() for v in sums / n_kept)  # separate outputs, not views of one tensor

    @staticmethod
    def backward(ctx, *incoming):
        hidden, weight, bias, n_kept, *grads = ctx.saved_tensors
        work = n_kept.dtype
        g = torch.stack([torch.zeros((), dtype=work, device=hidden.device) if x is None else x.to(work)
                         for x in incoming])
        if ctx.weights is None or not torch.equal(g, g.new_tensor(ctx.weights)):  # another combination
            grads = _over_chunks(hidden, weight, bias, ctx.labels, ctx.teacher, ctx.divergences, ctx.chunk_size,
                                 g / n_kept, ctx.needs_input_grad[:3])[1]
        out = [None if d is None else d.to(x.dtype) for d, x in zip(grads, (hidden, weight, bias))]
        return (*out, None, None, None, None, None)


def fused_head_terms(hidden: Tensor, weight: Tensor, labels: Tensor, teacher=None,
                     divergences: Sequence[TokenDivergence] = (), *, bias: Tensor | None = None,
                     chunk_size: int | None = None, weights: Sequence[float] | None = None
                     ) -> tuple[Tensor, list[Tensor]]:
    r"""The next-token cross-entropy and each of ``divergences`` (means over the kept positions,
    the values of the registered terms on the logits :math:`hW^\top + b`) from the student's hidden
    states and output layer, chunk by chunk, as :func:`fused_head_loss`; each returned value is a
    0-dim tensor differentiable on its own, so a caller weighs them as it likes (the training
    step's :math:`w_{CE}\,\mathrm{ce} + \sum_k \lambda_k D_k`). Inputs as :func:`fused_head_loss`'s;
    no ``teacher`` (None) is allowed only with no divergences. ``weights``: the
    :math:`(w_{CE}, \lambda_1, …, \lambda_m)` the caller will back-propagate
    :math:`w_{CE}\,\mathrm{ce} + \sum_k \lambda_k D_k` with: its gradient is then taken in the
    forward, one pass over the chunks (any other combination is still exact, the backward then
    rebuilding each chunk's logits).

    Returns ``(ce, [D_1, …, D_m])``.
    """
    divergences = tuple(TokenDivergence(*d) for d in divergences)
    if not divergences:
        teacher = None  # the cross-entropy alone reads no teacher
    first = divergences[0] if divergences else TokenDivergence("fkl")
    hidden, labels, teacher = _check(hidden, weight, labels, teacher, bias, first.kind, first.temperature, chunk_size)
    for d in divergences:
        if d.kind not in DIVERGENCES:
            raise ValueError(f"fused_head_terms: kind must be one of {', '.join(DIVERGENCES)}, got {d.kind!r}")
        check_positive(d.kind, temperature=d.temperature)
        check_sparse_temperature(d.kind, teacher, d.temperature)
    if divergences and teacher is None:
        raise ValueError("fused_head_terms: the divergences need a teacher (logits, SparseTeacher or LinearTeacher)")
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // weight.shape[0])
    if weights is not None:
        weights = tuple(float(x) for x in weights)
        if len(weights) != 1 + len(divergences):
            raise ValueError(f"fused_head_terms: weights must give the cross-entropy's and each divergence's "
                             f"({1 + len(divergences)} numbers), got {len(weights)}")
    ce, *values = _FusedHeadTerms.apply(hidden, weight, bias, labels, teacher, divergences, chunk_size, weights)
    return ce, values
