"""The 13 KD²M distances of :mod:`kd2m.metrics` as loss terms (family ``"kd2m"``).

Each metric's facts (label, class-conditional or not, memory factor) are on its ``@metric``
line; this module only makes them terms: a :class:`~kd2m.losses.distance_loss.KD2MLoss` with weight 1 (the
engine applies λ), a learnable projector when the student's and teacher's widths (or grids)
differ, and two options next to the metric's own: ``match`` (global-batch matching under
torchrun) and ``unit`` (what one sample is: ``"batch"``, ``"spatial"``, ``"class"``).
"""
from __future__ import annotations

import functools

from torch import Tensor

from .. import metrics
from ..catalog import PER_POSITION_UNITS
from ..metrics import batched
from .distance_loss import MAX_TOKENS, TOKEN_SEED, KD2MLoss
from .registry import Term, TermContext, TermSpec, add_spec, spec

__all__ = ["COMMON_OPTIONS", "EXTRA_OPTIONS", "MetricTerm"]

#: options every distance term takes besides its metric's own
COMMON_OPTIONS = (("match", "global"), ("unit", "batch"), ("max_tokens", MAX_TOKENS), ("token_seed", TOKEN_SEED))

#: options only some terms take, beyond their metric's own (WKD-F's conventions, unit="spatial")
EXTRA_OPTIONS = {"gauss_w2": tuple(batched.GAUSS_W2_SET_OPTIONS.items())}


class MetricTerm(Term):
    """D(student features, teacher features) for one metric, unweighted.

    ``unit``: ``"batch"`` (pooled ``(n, d)`` features, the paper), ``"spatial"`` (per image,
    the positions of a map ``(n, c, h, w)`` or its tokens ``(n, L, d)``; D averaged over the
    images) or ``"class"`` (class-conditional metrics); see :class:`kd2m.losses.distance_loss.KD2MLoss`.
    A projector is built from ``ctx.student_shape`` / ``ctx.teacher_shape`` when widths (or,
    spatial maps, grids) differ (:mod:`kd2m.projectors`). :attr:`needs` says what the engine
    must pass: ``"maps"`` (raw per-position features) instead of ``"feats"`` when spatial.
    """

    def __init__(self, ctx: TermContext, *, metric: str, match: str = "global", unit: str = "batch",
                 max_tokens: int = MAX_TOKENS, token_seed: int = TOKEN_SEED, **metric_options):
        super().__init__(ctx)
        self.loss = KD2MLoss(metric, 1.0, unit=unit, student_shape=ctx.student_shape,
                             teacher_shape=ctx.teacher_shape, match=match, max_tokens=max_tokens,
                             token_seed=token_seed, **metric_options)
        base = spec(metric).needs
        self.needs = (base - {"feats"}) | {"maps"} if unit in PER_POSITION_UNITS else base

    @property
    def unit(self) -> str:
        return self.loss.unit

    @property
    def projector(self):
        return self.loss.projector

    def forward(self, *, student_feats: Tensor, teacher_feats: Tensor, labels=None, student_logits=None,
                teacher_logits=None, **_) -> Tensor:
        return self.loss.distance(student_feats, teacher_feats, labels, student_logits, teacher_logits)


def _register(name: str) -> None:
    m = metrics.spec(name)
    needs = {"feats", "logits"} | ({"labels"} if m.uses_labels else set())
    defaults = tuple((o, None) for o in m.options) + EXTRA_OPTIONS.get(name, ()) + COMMON_OPTIONS
    add_spec(TermSpec(name, m.label, m.fn, frozenset(needs), tuple(k for k, _ in defaults), m.pairwise_factor,
                      "kd2m", "Montesuma, GSI 2025 (KD²M)", defaults,
                      factory=functools.partial(MetricTerm, metric=name)))


for _name in metrics.available():
    _register(_name)
