"""The front door for your own training loop: a student, a frozen teacher and any number of
terms, composed as ``w_CE · supervised + Σ_k λ_k · term_k``.

::

    distiller = kd2m.Distiller(student, teacher, terms=["cw2", {"term": "dkd", "weight": 1.0}],
                               example=next(iter(loader))[0])
    opt = torch.optim.SGD([*student.parameters(), *distiller.parameters()], lr=0.05)
    for epoch in range(epochs):
        distiller.set_epoch(epoch, epochs)            # warm-ups and schedules (DKD's, WKD's)
        for x, y in loader:
            out = distiller(x, y)                     # out.loss, out.ce, out.terms, out.logits
            opt.zero_grad(); out.loss.backward(); opt.step()

It is kd2m's own engine step (:class:`~kd2m.training.step.Step`, the terms bound to their layers
by :func:`~kd2m.training.binding.bind_terms`, the teacher run by
:class:`~kd2m.training.teacher.OnlineTeacher`): :class:`kd2m.harness.trainer.Trainer` builds one for every
run, so a user's loop and ``kd2m run`` compute the same loss.

What belongs to whom: the teacher is frozen (``eval()``, no gradients) by construction and stays
in eval mode whatever ``distiller.train()`` does; the student is yours and is not a submodule
(its weights are not in the distiller's ``state_dict``). The terms' projectors and buffers (CRD's
memory, a running statistic) are the distiller's own: its ``parameters()`` are what the optimiser
needs besides the student's, and its ``state_dict()`` is what a checkpoint saves besides the
student's.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import tasks
from ..features import last_linear_name
from .binding import BoundTerm, Taps, bind_terms, wanted_layers
from .methods import Method, TermConfig, term_from_entry
from .step import Step
from .teacher import OnlineTeacher, TeacherOutputs

__all__ = ["Distiller", "DistillerOutput", "parse_terms"]

#: the key of the method a Distiller optimises (its error messages name it)
DISTILLER_KEY = "distiller"


@dataclass
class DistillerOutput:
    """What one call of a :class:`Distiller` gives.

    ``loss``: ``w_CE · ce + distill``, the value to back-propagate (0-dim); ``ce``: the task's
    supervised loss (cross-entropy over classes, or over next tokens for ``task="lm"``);
    ``distill``: ``Σ_k λ_k · term_k``; ``terms``: each term's **unweighted** value by its key
    (the term's name, ``name@layer`` where a name repeats); ``weights``: the λ each term had in
    this call; ``logits``: the student's output, None where its cross-entropy and token
    divergences were computed from its hidden states by the fused head (``task="lm"``)."""
    loss: Tensor
    ce: Tensor
    distill: Tensor
    terms: dict
    weights: dict
    logits: Tensor | None


def parse_terms(terms: Iterable[str | Mapping | TermConfig]) -> tuple[TermConfig, ...]:
    """:class:`~kd2m.training.methods.TermConfig` of each entry: a name (``"cw2"``: the term's default λ),
    a mapping with the keys of a config's term entry (``term``, ``weight`` — a number, ``"auto"``
    or ``"auto*K"`` —, ``options``, ``student_layer``, ``teacher_layer``, ``unit``, ``warmup``,
    ``schedule``), or a ready TermConfig. ValueError naming the entry otherwise."""
    if isinstance(terms, (str, Mapping, TermConfig)):
        terms = [terms]
    out = []
    for i, entry in enumerate(terms):
        out.append(entry if isinstance(entry, TermConfig) else term_from_entry(entry, f"Distiller terms[{i}]"))
    return tuple(out)


def _num_classes(teacher: nn.Module) -> int:
    """The teacher's output width: its last ``nn.Linear``'s (the classifier, or a language model's head)."""
    return int(dict(teacher.named_modules())[last_linear_name(teacher)].out_features)


class Distiller(nn.Module):
    """``student`` learns from the frozen ``teacher`` under ``terms`` (see the module docstring).

    Args:
        student: the network to train; returns logits ``(n, C)`` (or ``(B, L, V)`` for ``task="lm"``).
        teacher: the network to learn from; frozen here (``eval()``, ``requires_grad_(False)``).
        terms: names, config-style mappings or :class:`~kd2m.training.methods.TermConfig` (:func:`parse_terms`).
        example: a batch of inputs ``(n ≥ 2, …)`` on the networks' device: one forward of each
            network (eval mode, RNG and batch-norm statistics untouched) gives the shapes the
            terms' projectors are built for.
        ce_weight: ``w_CE``, the supervised loss's weight (mdistiller's KD pairs 0.1·CE with 0.9·KD).
        task: ``"classification"`` or ``"lm"`` (next-token cross-entropy; −100 labels ignored).
        num_classes: the logit width (default: the teacher's last ``nn.Linear``'s output width).
        num_data: the training set's size, for terms with a memory bank keyed by sample (CRD).
        train_labels: ``(num_data,)`` every training sample's label, for CRD's negatives.
        match: ``"global"`` (default: under torchrun the distances see the features of every
            rank's batch, as one large batch would) or ``"local"``.
        fused_head: for ``task="lm"``, compute the cross-entropy and the token divergences from
            the student's last hidden states and output layer, chunk by chunk, where the student
            allows (:mod:`kd2m.training.head`; an ``hf:`` model); False: from its logits.
    """

    # set in _build with object.__setattr__: plain attributes, not submodules
    student: nn.Module
    teacher: nn.Module | None

    def __init__(self, student: nn.Module, teacher: nn.Module | None, terms: Sequence = (), *, example: Tensor,
                 ce_weight: float = 1.0, task: str = "classification", num_classes: int | None = None,
                 num_data: int | None = None, train_labels: Tensor | None = None, match: str = "global",
                 fused_head: bool = True):
        super().__init__()
        method = Method(DISTILLER_KEY, parse_terms(terms), float(ce_weight))
        if method.terms and teacher is None:
            raise ValueError("Distiller: its terms need a teacher; give teacher= (or no terms for CE only)")
        if num_classes is None and teacher is not None:
            num_classes = _num_classes(teacher)
        needs_index = [t.name for t in method.terms if "index" in t.spec.needs]
        if needs_index and num_data is None:
            raise ValueError(f"Distiller: {', '.join(needs_index)} keep a memory row per training sample; give "
                             "num_data= (the training set's size) and pass index= (each sample's position) per call")
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        bound = bind_terms(method, student, teacher, example, num_classes, num_data or len(example), match,
                           train_labels)
        # projectors in the student's precision (a float64 student gets float64 projectors)
        dtype = next((p.dtype for p in student.parameters() if p.is_floating_point()), None)
        for b in bound:
            b.module.to(dtype=dtype)
        self._build(student, teacher, method, bound, tasks.get(task), example.device, fused_head=fused_head)

    @classmethod
    def from_bound(cls, student: nn.Module, teacher: nn.Module | None, method: Method, bound: list[BoundTerm],
                   task, device: torch.device, *, teacher_out: TeacherOutputs | None = None, views: int = 1,
                   amp=None) -> Distiller:
        """A Distiller over terms the engine has bound already, reading the teacher from
        ``teacher_out`` (a cache) when given: how :class:`kd2m.harness.trainer.Trainer` builds its step."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._build(student, teacher, method, bound, task, device, teacher_out=teacher_out, views=views, amp=amp)
        return self

    def _build(self, student, teacher, method, bound, task, device, *, teacher_out=None, views=1, amp=None,
               fused_head=True):
        # neither network is a submodule: the student's weights are the user's, the teacher's frozen
        object.__setattr__(self, "student", student)
        object.__setattr__(self, "teacher", teacher)
        self.method, self.bound, self.task = method, bound, task
        self.term_modules = nn.ModuleList([b.module for b in bound])
        self.term_modules.to(device)
        if teacher_out is None and teacher is not None and method.uses_teacher:
            teacher_out = OnlineTeacher(teacher, wanted_layers(bound, "teacher"))
        want = wanted_layers(bound, "student")
        self.s_taps = Taps(student, want) if want else None
        self.step = Step(student, bound, task, teacher_out=teacher_out, s_taps=self.s_taps, views=views,
                         device=device, amp=amp, ce_weight=method.ce_weight, fused_head=fused_head)
        self.scales = [1.0] * len(bound)
        self.calibrated = False
        self.epoch: int | None = None
        self.epochs: int | None = None

    # -- λ ---------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Where training is: 0-based ``epoch`` of ``epochs``, for the terms' warm-ups and schedules
        (DKD's λ grows over its first epochs; WKD's decays on a half cosine)."""
        if not (isinstance(epoch, int) and isinstance(epochs, int) and 0 <= epoch < epochs):
            raise ValueError(f"set_epoch: need 0 ≤ epoch < epochs (ints), got epoch={epoch!r}, epochs={epochs!r}")
        self.epoch, self.epochs = epoch, epochs

    def calibrate(self, train_set, batch_size: int) -> list[float]:
        """Set the λ of ``auto`` terms against CE on the student as it is now (its first batches of
        ``train_set``, a dataset of ``(x, y)``: :func:`kd2m.training.auto_weight.calibrate`); returns each
        term's scale (1 for the others)."""
        from .auto_weight import calibrate
        self.scales = calibrate(self.step, train_set, batch_size, DISTILLER_KEY)
        self.calibrated = True
        return list(self.scales)

    def weights(self) -> list[float]:
        """Each term's λ now (its weight × schedule × calibrated scale); ValueError where a term's λ
        would silently be wrong (a warm-up with no epoch given, ``auto`` not calibrated)."""
        for b in self.bound:
            t = b.config
            if t.auto and not self.calibrated:
                raise ValueError(f"Distiller: term {t.name!r} has weight auto: call distiller.calibrate(train_set, "
                                 "batch_size) once before training, or give a number")
            if self.epoch is None and (t.warmup_epochs or t.schedule != "constant"):
                raise ValueError(f"Distiller: term {t.name!r} has a schedule (warm-up {t.warmup_epochs} epochs, "
                                 f"{t.schedule}): call distiller.set_epoch(epoch, epochs) at the start of each epoch, "
                                 "or give warmup: 0")
        epoch, epochs = (self.epoch, self.epochs) if self.epoch is not None else (0, 1)
        return [b.config.weight_at(epoch, epochs) * s for b, s in zip(self.bound, self.scales)]

    # -- the step --------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Distiller:
        """The terms' modules (projectors) follow ``mode``; the teacher stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> DistillerOutput:
        """The loss on batch ``(x, y)``; ``index``: each sample's position in the training set
        (needed by memory-bank terms such as CRD; default ``0 … n−1``)."""
        lam = self.weights()
        if self.teacher is not None and self.teacher.training:  # a user's .train() on the whole model tree
            self.teacher.eval()
        if index is None:
            if any("index" in b.needs for b in self.bound):
                raise ValueError("Distiller: a memory-bank term (CRD) needs index= (each sample's training-set index)")
            index = torch.arange(x.shape[0], device=x.device)
        out = self.step.forward(x, y, index * self.step.views, lam=lam)
        loss, distill = self.step.loss(out, lam)
        return DistillerOutput(loss, out.ce, distill, {b.key: v for b, v in zip(self.bound, out.values)},
                               {b.key: w for b, w in zip(self.bound, lam)}, out.logits)

    def remove(self) -> None:
        """Take the forward hooks off both networks (the distiller is unusable afterwards)."""
        for hooks in (self.s_taps, self.step.teacher_out):
            if hooks is not None:
                hooks.remove()

    def extra_repr(self) -> str:
        terms = ", ".join(f"{b.key}: λ={b.config.weight:g}{' (auto)' if b.config.auto else ''}" for b in self.bound)
        return f"ce_weight={self.method.ce_weight:g}, task={type(self.task).__name__}, terms=[{terms}]"
