"""kd2m's terms in a Lightning ``LightningModule``: :class:`KD2MMixin`.

::

    import lightning.pytorch as pl
    from kd2m.integrations.lightning import KD2MMixin

    class Student(KD2MMixin, pl.LightningModule):
        def __init__(self, teacher, example):
            super().__init__()
            self.net = make_student()
            self.configure_kd2m(teacher, ["kd", {"term": "w2", "weight": 0.5}], example=example)
        def forward(self, x):
            return self.net(x)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)   # the projectors are among them

    pl.Trainer(max_epochs=10).fit(Student(teacher, x[:8]), loader)

The mixin's ``training_step`` returns :class:`kd2m.Distiller`'s loss on ``(x, y)``
(``w_CE · supervised + Σ_k λ_k · term_k``) and logs it, its CE and each term (``kd2m/<key>``); a
``training_step`` of one's own can call :meth:`KD2MMixin.distill_step` instead.

What belongs to whom: the Distiller is a submodule (``self.distiller``), so its projectors are in
``self.parameters()`` — an optimiser over them trains them — and in the checkpoint (restored on
resume), and under DDP their gradients are synchronised with the student's. An optimiser that
was given other parameters gets them as one more group at the start of ``fit``. The teacher is
not a submodule: it is not in the checkpoint, it is moved to the module's device at the start of
``fit``, and it stays frozen and in eval mode (the Distiller's contract). The student is the
module itself (``self(x)``, its ``forward``): a term's ``student_layer`` is a name in the module
(``net.3``). Schedules and warm-ups follow ``current_epoch`` of ``max_epochs``.

Needs the optional extra ``pip install "kd2m[lightning]"``.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

try:
    import lightning.pytorch  # noqa: F401  (the library this mixin's hooks belong to)
except ImportError:
    raise ImportError('kd2m.integrations.lightning needs Lightning: pip install "kd2m[lightning]"') from None

from ..training.distiller import Distiller, DistillerOutput

__all__ = ["KD2MMixin"]


class KD2MMixin:
    """Mix into a ``LightningModule`` (before it in the bases): :meth:`configure_kd2m` once in
    ``__init__``, then the mixin's ``training_step`` (or :meth:`distill_step` in one's own) trains
    on ``w_CE · supervised + Σ_k λ_k · term_k`` (see the module docstring)."""

    distiller: Distiller

    def configure_kd2m(self, teacher: nn.Module, terms: Iterable = (), *, example: Tensor, ce_weight: float = 1.0,
                       task: str = "classification", **options: Any) -> Distiller:
        """Build ``self.distiller``: this module as the student, ``teacher`` frozen, ``terms``
        (names or config-style entries). ``example``: a batch of inputs ``(n ≥ 2, …)`` the
        projectors are sized on; ``options``: :class:`kd2m.Distiller`'s others (``num_classes``,
        ``num_data``, ``train_labels``, ``match``). Call after the student's layers exist."""
        if not isinstance(self, nn.Module):
            raise TypeError("KD2MMixin: mix it into a LightningModule (class Student(KD2MMixin, LightningModule))")
        self.distiller = Distiller(self, teacher, list(terms), example=example, ce_weight=ce_weight, task=task,
                                   **options)
        return self.distiller

    def _distiller(self) -> Distiller:
        distiller = getattr(self, "distiller", None)
        if not isinstance(distiller, Distiller):
            raise RuntimeError(f"{type(self).__name__}: call self.configure_kd2m(teacher, terms, example=…) in "
                               "__init__ before training")
        return distiller

    def distill_step(self, x: Tensor, y: Tensor, index: Tensor | None = None, log: bool = True) -> DistillerOutput:
        """The Distiller's output on ``(x, y)`` (``.loss`` to return from ``training_step``);
        ``log``: log the loss, CE and each term (``kd2m/<key>``, unweighted) on the step and epoch."""
        out = self._distiller()(x, y, index)
        if log:
            n = x.shape[0]
            self.log("train_loss", out.loss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
            self.log("kd2m/ce", out.ce.detach(), on_step=True, on_epoch=True, batch_size=n)
            for key, value in out.terms.items():
                self.log(f"kd2m/{key}", value.detach(), on_step=True, on_epoch=True, batch_size=n)
        return out

    def training_step(self, batch, batch_idx: int) -> Tensor:
        """``batch``: ``(x, y)`` or ``(x, y, index)`` (each sample's training-set index, for CRD)."""
        x, y, *rest = batch
        return self.distill_step(x, y, rest[0] if rest else None).loss

    def on_fit_start(self) -> None:
        """The teacher onto this module's device; the projectors into the optimiser if it lacks them."""
        distiller = self._distiller()
        if distiller.teacher is not None:
            distiller.teacher.to(self.device).eval()
        params = [p for p in distiller.parameters() if p.requires_grad]
        for opt in self.trainer.optimizers:
            have = {id(p) for group in opt.param_groups for p in group["params"]}
            if params and not any(id(p) in have for p in params):
                opt.add_param_group({"params": params})
        super().on_fit_start()

    def on_train_epoch_start(self) -> None:
        """Where training is, for the terms' warm-ups and schedules."""
        epochs = self.trainer.max_epochs
        if epochs is not None and epochs > 0:
            self._distiller().set_epoch(min(self.current_epoch, epochs - 1), epochs)
        super().on_train_epoch_start()
