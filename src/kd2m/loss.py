"""The module users drop into their own training loop.

    loss = ce(student_logits, y) + kd2m_loss(student_feats, teacher_feats, y, student_logits, teacher_logits)

``KD2MLoss`` = λ · D(student feature distribution, teacher feature distribution), D any
metric of :mod:`kd2m.metrics`. The teacher's inputs are detached (it is frozen).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import metrics


class KD2MLoss(nn.Module):
    """λ · D(g_S♯P̂, g_T♯P̂) on a batch.

    Args:
        metric: a name from ``kd2m.metrics.available()`` (default ``"cw2"``, the paper's best family:
            label-aware).
        weight: λ.
        student_dim, teacher_dim: feature widths. When both are given and differ, a learnable
            linear projector ``student_dim -> teacher_dim`` is applied to the student features
            (put ``loss.parameters()`` in your optimizer). Not needed for ``gw2``.
        match: ``"global"`` (default) gathers features from all ranks under torch.distributed so
            the metric sees the global batch; ``"local"`` uses each rank's batch. A no-op when not
            distributed.
        **metric_options: passed to ``metrics.get`` (e.g. ``eps=0.1`` for sinkhorn).

    Shapes: feats ``(n, d)``, labels ``(n,)`` int, logits ``(n, C)``; returns a 0-dim tensor.
    """

    def __init__(self, metric: str = "cw2", weight: float = 1.0, *, student_dim: int | None = None,
                 teacher_dim: int | None = None, match: str = "global", **metric_options):
        super().__init__()
        self.metric = metrics.get(metric, **metric_options)
        self.weight = float(weight)
        if match not in ("global", "local"):
            raise ValueError(f"match must be 'global' or 'local', got {match!r}")
        self.match = match
        self.projector = None
        if student_dim and teacher_dim and student_dim != teacher_dim and self.metric.same_dim:
            self.projector = nn.Linear(student_dim, teacher_dim, bias=False)

    def forward(self, student_feats: Tensor, teacher_feats: Tensor, labels: Tensor | None = None,
                student_logits: Tensor | None = None, teacher_logits: Tensor | None = None) -> Tensor:
        return self.weight * self.distance(student_feats, teacher_feats, labels, student_logits, teacher_logits)

    def distance(self, student_feats, teacher_feats, labels=None, student_logits=None, teacher_logits=None) -> Tensor:
        """D itself, unweighted (what the engine logs)."""
        teacher_feats = teacher_feats.detach()
        teacher_logits = teacher_logits.detach() if teacher_logits is not None else None
        if self.projector is not None:
            student_feats = self.projector(student_feats)
        if self.match == "global":
            from .distributed import gather_batch
            student_feats, teacher_feats, labels, student_logits, teacher_logits = gather_batch(
                student_feats, teacher_feats, labels, student_logits, teacher_logits)
        # Distances are computed in at least float32 even under autocast: OT plans and matrix
        # square roots are not meaningful in bf16/fp16.
        with torch.autocast(device_type=student_feats.device.type, enabled=False):
            return self.metric(_f32(student_feats), _f32(teacher_feats), labels,
                               _f32(student_logits), _f32(teacher_logits))

    def extra_repr(self) -> str:
        return f"metric={self.metric!r}, weight={self.weight:g}, match={self.match!r}"


def _f32(x):
    if x is None or x.dtype in (torch.float32, torch.float64):
        return x
    return x.float()


def hinton_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton et al. (2015) logit distillation: T² · KL(softmax(z_T/T) ‖ softmax(z_S/T)), batch mean,
    computed in float32: the ``"kd"`` term of :mod:`kd2m.losses` (:func:`kd2m.losses.logit.kd`).

    KL(teacher ‖ student) — the direction of the original paper (the reference code of KD²M used
    the reverse).
    """
    from .losses.logit import kd  # here, not at the top: kd2m.losses imports this module
    return kd(student_logits=student_logits.float(), teacher_logits=teacher_logits.detach().float(),
              temperature=temperature)
