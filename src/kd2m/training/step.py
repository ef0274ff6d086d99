"""The one training step every part of the engine runs, and the epoch's on-device tally.

A :class:`Step` is ``(model, batch) → outputs → w_CE·supervised + Σ_k λ_k·term_k``:
:meth:`Step.forward` gives the teacher's outputs (looked up before the student runs, or computed
beside it under the run's autocast), the student's logits and taps, the task's supervised loss
(:mod:`kd2m.tasks`) and each bound term's unweighted value; :meth:`Step.loss` composes them.
Training (:meth:`kd2m.harness.trainer.Trainer._epoch`), the ``weight: auto`` calibration
(:func:`kd2m.training.auto_weight.calibrate`) and the grid's probe of every term before training
(:func:`kd2m.harness.preflight.preflight`) all run it, so they cannot disagree about what a term sees. A
causal language model's step computes its cross-entropy and token divergences from its last
hidden states and output layer, never building its logits (:mod:`kd2m.training.head`).

:class:`EpochTally` keeps what an epoch reports — the per-sample sums of the loss, CE, the
distillation part and every term, and whether and where a step went non-finite — in one tensor
on the training device. A step adds to it without reading anything back to the host (a read
waits for the device to finish the work queued so far, so one per step serialises the loop);
the epoch reads it once, at its end, after one all-reduce under torchrun, so that every rank
agrees whether the epoch diverged and stops with the same message.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import distributed as dist_ctx
from ..metrics._base import at_least_float32
from ..runtime import autocast
from .head import FusedHead

__all__ = ["StepOutputs", "TermFailure", "Step", "zero_nonfinite_gradients", "EpochTally"]


@dataclass
class StepOutputs:
    logits: Tensor | None  # None where the fused head computed the losses (see ``hidden``)
    ce: Tensor            # the task's supervised loss (cross-entropy, over classes or next tokens)
    values: list          # one 0-dim tensor per term (None where a term was not asked for)
    s_feats: dict
    t_feats: dict
    hidden: Tensor | None = None  # the output layer's input, where the fused head ran instead of it

    @property
    def batch_size(self) -> int:
        return (self.logits if self.logits is not None else self.hidden).shape[0]


class TermFailure(Exception):
    """A term raised inside :meth:`Step.forward`; ``term`` is its bound term, ``error`` the cause."""

    def __init__(self, term, error: BaseException):
        super().__init__(str(error))
        self.term, self.error = term, error


class Step:
    """The step of one run: its network, its bound terms, its task, where the teacher's outputs
    come from, and how they are composed.

    ``teacher_out``: a :class:`~kd2m.training.teacher.TeacherOutputs` (``online``: run on the
    batch under the autocast; else looked up by key first) or None; ``s_taps``: the student's
    :class:`~kd2m.training.binding.Taps` (or None); ``views``: the teacher cache's views per
    sample (keys are ``index·views + view``); ``amp``: the autocast dtype or None;
    ``fused_head``: compute a causal LM's cross-entropy and token divergences from its hidden
    states and output layer where it allows (:class:`~kd2m.training.head.FusedHead`; False: from
    its logits, the same values)."""

    def __init__(self, net, terms: list, task, *, teacher_out=None, s_taps=None, views: int = 1,
                 device: torch.device, amp=None, ce_weight: float = 1.0, fused_head: bool = True):
        self.net, self.terms, self.task = net, terms, task
        self.teacher_out, self.s_taps, self.views = teacher_out, s_taps, views
        self.device, self.amp, self.ce_weight = device, amp, ce_weight
        self.head = FusedHead.for_step(net, terms, task) if fused_head else None

    def forward(self, x: Tensor, y: Tensor, key: Tensor, *, net=None, amp="run", which: list | None = None,
                lam: list | None = None) -> StepOutputs:
        """The step's forward on batch ``(x, y)`` with training-set keys ``key``. ``net``: the
        network to run (default: the step's; training passes its DDP/compiled wrapper);
        ``amp``: the autocast dtype (default: the run's; calibration passes None); ``which``: a
        flag per term, False to skip it (its value is then None); ``lam``: the λ :meth:`loss`
        will be given, so that the fused head takes the loss's gradient in its one pass (any
        other λ stays exact, at the price of a second pass in the backward)."""
        net = self.net if net is None else net
        amp = self.amp if amp == "run" else amp
        t_feats, t_logits = {}, None
        if self.teacher_out is not None and not self.teacher_out.online:
            t_feats, t_logits = self.teacher_out(x, key)
        logits = hidden = None
        with autocast(self.device, amp):
            if self.head is None:
                logits = net(x)
                ce = self.task.supervised_loss(logits, y)
            else:
                hidden = net(x, last_hidden=True)
            if self.teacher_out is not None and self.teacher_out.online:
                t_feats, t_logits = self.teacher_out(x, key)
        if hidden is not None and self.s_taps is not None:
            self.s_taps.head_input(hidden)  # the output layer did not run: its input, as its hook records it
        s_feats = self.s_taps.features() if self.s_taps is not None else {}
        s_view, labels = self.task.term_view(logits, y)
        t_view = self.task.term_view(t_logits, y)[0] if t_logits is not None else None
        fused = {}
        if hidden is not None:
            ce, fused = self._fused(hidden, labels, t_view, which,
                                    None if lam is None else [self.ce_weight, *lam])
        values = []
        for k, b in enumerate(self.terms):
            if k in fused or (which is not None and not which[k]):
                values.append(fused.get(k))
                continue
            try:
                values.append(b(s_feats, t_feats, labels, s_view, t_view, key // self.views))
            except (ValueError, TypeError, RuntimeError) as e:
                raise TermFailure(b, e) from e
        return StepOutputs(logits, ce, values, s_feats, t_feats, hidden)

    def _fused(self, hidden: Tensor, labels: Tensor, teacher, which, weights) -> tuple[Tensor, dict]:
        """The fused head's cross-entropy and divergence values; an error names the first divergence."""
        try:
            return self.head(hidden, labels, teacher, which, weights)
        except (ValueError, TypeError, RuntimeError) as e:
            first = next((b for b, d in zip(self.terms, self.head.divergences) if d is not None), None)
            if first is None:
                raise
            raise TermFailure(first, e) from e

    def loss(self, out: StepOutputs, lam: list) -> tuple[Tensor, Tensor]:
        """(w_CE·supervised + Σ_k λ_k·term_k, Σ_k λ_k·term_k) for the weights ``lam``."""
        distill = out.ce.new_zeros(())
        for v, w in zip(out.values, lam):
            # at least float32 (a term under bf16 autocast), float64 kept (a float64 student)
            distill = distill + w * at_least_float32(v)
        return self.ce_weight * out.ce + distill, distill


def _any_nonfinite(tensors) -> Tensor | None:
    flags = [~torch.isfinite(t.detach()).all() for t in tensors if isinstance(t, Tensor) and t.is_floating_point()]
    return torch.stack(flags).any() if flags else None


def zero_nonfinite_gradients(params: list) -> Tensor:
    """Whether the gradient of each of ``params`` is finite: a bool device tensor (len(params),),
    True where a parameter has no gradient. Where one is not, every gradient is zeroed in place,
    so the optimiser's step cannot write NaN into the weights (as a gradient scaler skips an
    overflowing step). Under DDP the gradients are already all-reduced here, so every rank gets
    the same answer and stays in step."""
    device = params[0].device if params else "cpu"
    has = [i for i, p in enumerate(params) if p.grad is not None]
    if not has:
        return torch.ones(len(params), dtype=torch.bool, device=device)
    grads = [params[i].grad for i in has]
    # the largest |g| of each gradient (NaN propagates through the max; a finite gradient's
    # max-norm cannot overflow, unlike its 2-norm)
    each = torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(grads, float("inf"))]))
    ok = each.all()
    for g in grads:
        g.masked_fill_(~ok, 0.0)
    if len(has) == len(params):
        return each
    finite = torch.ones(len(params), dtype=torch.bool, device=device)
    finite[torch.tensor(has, device=device)] = each
    return finite


#: "no bad step" in the all-reduce of the first bad step (a minimum); exact in float64
_NO_STEP = 2**31 - 1


class EpochTally:
    """Per-sample sums of an epoch's loss, CE, distillation part and terms, and the first
    non-finite step, all on ``device`` (see the module's docstring)."""

    def __init__(self, n_terms: int, device: torch.device):
        # float64 sums, as Python floats were before (MPS has no float64: float32 there)
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.n_terms, self.device = n_terms, device
        self.sums = torch.zeros(3 + n_terms, dtype=self.dtype, device=device)
        self.seen = 0
        self.bad_steps = torch.zeros((), dtype=self.dtype, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        # at the first bad step: ce and each term, whether the student's / the teacher's features were non-finite
        self.first_values = torch.zeros(1 + n_terms, dtype=self.dtype, device=device)
        self.first_feats = torch.zeros(2, dtype=torch.bool, device=device)
        # and whether the loss itself was non-finite, the index of the first non-finite gradient
        # (-1: none) and how many were
        self.first_loss_bad = torch.zeros((), dtype=torch.bool, device=device)
        self.first_grads = torch.tensor([-1, 0], dtype=torch.long, device=device)

    def add(self, step: int, out: StepOutputs, loss: Tensor, distill: Tensor, grads_finite: Tensor) -> None:
        """Add a step; ``grads_finite``: :func:`zero_nonfinite_gradients`' answer for the step."""
        n = out.batch_size  # a shape, not a value: no read
        values = [loss, out.ce, distill] + list(out.values)
        row = torch.stack([v.detach().to(self.dtype) for v in values])
        self.sums += row * n
        self.seen += n
        loss_ok = torch.isfinite(loss.detach())
        bad = ~(loss_ok & grads_finite.all())
        first = bad & (self.first_bad < 0)
        self.bad_steps += bad.to(self.dtype)
        self.first_bad = torch.where(first, step, self.first_bad)
        self.first_values = torch.where(first, torch.cat([row[1:2], row[3:]]), self.first_values)
        self.first_loss_bad = torch.where(first, ~loss_ok, self.first_loss_bad)
        if grads_finite.numel():  # the first non-finite one (argmax: the first maximum) and the count
            nonfinite = (~grads_finite).long()
            grads = torch.stack([torch.where(nonfinite.any(), nonfinite.argmax(), -1), nonfinite.sum()])
            self.first_grads = torch.where(first, grads, self.first_grads)
        feats = []
        for side in (out.s_feats, out.t_feats):
            flag = _any_nonfinite(side.values())
            feats.append(flag if flag is not None else torch.zeros((), dtype=torch.bool, device=self.device))
        self.first_feats = torch.where(first, torch.stack(feats), self.first_feats)

    def read(self) -> dict:
        """The epoch's totals, read to the host once (after one all-reduce under torchrun): means
        per sample, the number of non-finite steps, the first one and what it held on this rank
        (``first_values``: CE and each term; whether the student's / the teacher's features, the
        loss were non-finite; the index of the first non-finite gradient among the optimiser's
        parameters and how many were), and, under torchrun, the ranks whose own loss was
        non-finite at that step (``nonfinite_loss_ranks``; a NaN on one rank reaches every rank's
        gradients through DDP's all-reduce, so a rank's finite loss there is not the cause)."""
        summed = torch.cat([self.sums, self.sums.new_tensor([self.seen]), self.bad_steps.reshape(1)])
        if dist_ctx.is_distributed():
            summed = dist_ctx.all_reduce_tensor(summed, "sum")
        first = self.first_bad.clone()
        first = torch.where(first < 0, _NO_STEP, first)
        if dist_ctx.is_distributed():
            first = dist_ctx.all_reduce_tensor(first, "min")
        here = self.first_bad == first
        local = torch.cat([self.first_values, self.first_feats.to(self.dtype), here.to(self.dtype).reshape(1),
                           self.first_loss_bad.to(self.dtype).reshape(1), self.first_grads.to(self.dtype),
                           first.to(self.dtype).reshape(1)])
        host = torch.cat([summed, local]).tolist()      # the epoch's one read
        k = 3 + self.n_terms
        seen = host[k]
        means = [v / max(seen, 1) for v in host[:k]]
        first_step = int(host[-1])
        j = k + 3 + self.n_terms  # after the sums, the count of samples and of bad steps, and first_values
        bad_steps = int(host[k + 1])
        ranks = None
        if bad_steps and dist_ctx.is_distributed():  # every rank agrees on bad_steps: all of them reduce
            flags = torch.zeros(dist_ctx.world_size(), dtype=self.dtype, device=self.device)
            flags[dist_ctx.rank()] = (here & self.first_loss_bad).to(self.dtype)
            ranks = [r for r, f in enumerate(dist_ctx.all_reduce_tensor(flags, "sum").tolist()) if f]
        return {"means": means, "seen": seen, "bad_steps": bad_steps,
                "first_bad": None if first_step == _NO_STEP else first_step,
                "first_values": host[k + 2:j],
                "first_student_nonfinite": bool(host[j]),
                "first_teacher_nonfinite": bool(host[j + 1]),
                "first_is_local": bool(host[j + 2]),
                "first_loss_nonfinite": bool(host[j + 3]),
                "first_bad_gradient": None if host[j + 4] < 0 else int(host[j + 4]),
                "bad_gradients": int(host[j + 5]),
                "nonfinite_loss_ranks": ranks}
