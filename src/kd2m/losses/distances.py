"""The 13 KD²M distances of :mod:`kd2m.metrics` as loss terms (family ``"kd2m"``).

Each metric's facts (label, class-conditional or not, memory factor) are on its ``@metric``
line; this module only makes them terms: a :class:`~kd2m.loss.KD2MLoss` with weight 1 (the
engine applies λ), a learnable projector when the student's and teacher's widths differ, and
``match`` (global-batch matching under torchrun) as an option next to the metric's own.
"""
from __future__ import annotations

import functools

from torch import Tensor

from .. import metrics
from ..loss import KD2MLoss
from .registry import Term, TermContext, TermSpec, add_spec

#: options every distance term takes besides its metric's own
COMMON_OPTIONS = (("match", "global"),)


class MetricTerm(Term):
    """D(student features, teacher features) for one metric, unweighted."""

    def __init__(self, ctx: TermContext, *, metric: str, match: str = "global", **metric_options):
        super().__init__(ctx)
        s_dim = ctx.student_shape[0] if ctx.student_shape and len(ctx.student_shape) == 1 else None
        t_dim = ctx.teacher_shape[0] if ctx.teacher_shape and len(ctx.teacher_shape) == 1 else None
        self.loss = KD2MLoss(metric, 1.0, student_dim=s_dim, teacher_dim=t_dim, match=match, **metric_options)

    @property
    def projector(self):
        return self.loss.projector

    def forward(self, *, student_feats: Tensor, teacher_feats: Tensor, labels=None, student_logits=None,
                teacher_logits=None, **_) -> Tensor:
        return self.loss.distance(student_feats, teacher_feats, labels, student_logits, teacher_logits)


def _register(name: str) -> None:
    m = metrics.spec(name)
    needs = {"feats", "logits"} | ({"labels"} if m.needs_labels else set())
    if name == "jw2":
        needs.add("labels")  # its label cost reads labels (or logits) when given
    defaults = tuple((o, None) for o in m.options) + COMMON_OPTIONS
    add_spec(TermSpec(name, m.label, m.fn, frozenset(needs), tuple(k for k, _ in defaults), m.pairwise_factor,
                      "kd2m", "Montesuma, GSI 2025 (KD²M)", defaults,
                      factory=functools.partial(MetricTerm, metric=name)))


for _name in metrics.available():
    _register(_name)
