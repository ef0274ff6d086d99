"""The one registry of distillation terms: the KD²M distances and the field's baselines.

A term is one class (an ``nn.Module`` when it holds parameters: projectors, regressors,
embeddings, memory banks) or one function, plus one registration line that carries its facts::

    @register_term("dkd", label="DKD", needs=("logits", "labels"), paper="Zhao et al., CVPR 2022")
    class DKD(Term):
        def __init__(self, ctx: TermContext, *, alpha=1.0, beta=8.0, temperature=4.0): ...
        def forward(self, *, student_logits, teacher_logits, labels, **_): ...

    @register_term("kd", label="KD", needs=("logits",), paper="Hinton et al., 2015")
    def kd(*, student_logits, teacher_logits, temperature=4.0, **_): ...

Every term is called with keywords only,

    term(student_feats=, teacher_feats=, labels=, student_logits=, teacher_logits=, index=) -> 0-dim tensor

and reads what its ``needs`` names (the engine passes ``None`` for the rest):

- ``"feats"``: pooled features ``(n, d)`` at the term's layer (default: the penultimate);
- ``"maps"``: feature maps ``(n, c, h, w)`` at the term's layer (default: the last 4-D map
  before global pooling), passed in ``student_feats`` / ``teacher_feats``;
- ``"logits"``: ``student_logits``, ``teacher_logits`` ``(n, C)``;
- ``"labels"``: ``labels`` ``(n,)`` int;
- ``"index"``: ``index`` ``(n,)`` int, each sample's index in the training set (CRD's memory bank).

The teacher's inputs arrive detached (it is frozen); a term returns its *unweighted* value and
the engine composes ``CE + Σ_k λ_k · term_k``.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..registry import add_entry

__all__ = ["INPUTS", "LAYER_DEFAULTS", "TermContext", "TermSpec", "Term", "FunctionTerm", "register_term", "add_spec",
           "available", "spec", "check_options", "get"]

#: what a term may ask the engine for (see the module docstring)
INPUTS = ("feats", "maps", "logits", "labels", "index")

#: Where a map term reads when its entry names no layer, on a model that lists its stages
#: (:func:`kd2m.models.stages`; a model that does not: its last map before pooling):
#: ``"last_stage"`` (``stages[-1]``: WKD-F's ``HINT_LAYER: -1``), ``"hint"`` (``stages[2]``:
#: FitNets' ``--hint_layer 2``), ``"intermediate_stages"`` (every stage after the stem, paired by
#: index and summed: AT's and NST's ``feat[1:-1]`` in RepDistiller).
LAYER_DEFAULTS = ("last_stage", "hint", "intermediate_stages")


@dataclass(frozen=True)
class TermContext:
    """What a term may need to build its parameters, known before training starts.

    ``student_shape`` / ``teacher_shape``: the per-sample shape at the term's layer, ``(d,)`` for
    pooled features, ``(c, h, w)`` for maps. ``num_classes``: logit width. ``num_data``: the
    training set's size (memory banks keyed by sample index). ``teacher_head``: the weight
    ``(C, d)`` of the teacher's last ``nn.Linear`` (its class prototypes; WKD-L builds its
    class-to-class cost from them), or None. ``train_labels``: ``(num_data,)`` int64, the label of
    every training sample by index (CRD draws its negatives from other classes), or None.
    """
    student_shape: tuple[int, ...] | None = None
    teacher_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    num_data: int | None = None
    # a tensor: left out of == and hash (comparing tensors elementwise has no single truth value)
    teacher_head: Tensor | None = field(default=None, compare=False)
    train_labels: Tensor | None = field(default=None, compare=False)


@dataclass(frozen=True)
class TermSpec:
    """A registered term and its facts: every consumer (engine, tables, memory guard) reads them here."""
    name: str
    label: str                   # how the field writes it in a results table
    builder: Callable            # a Term subclass, or a function computing the value
    needs: frozenset             # subset of INPUTS
    options: tuple[str, ...]     # keyword options and their defaults are the builder's signature
    pairwise_factor: int = 0     # float64 n×n buffers at the peak of forward+backward (0: O(n·d) memory)
    family: str = "baseline"     # "kd2m" (a distribution distance) or "baseline"
    paper: str = ""              # where it comes from
    defaults: tuple = ()         # ((option, default), ...)
    factory: Callable | None = None  # factory(ctx, **options) -> nn.Module; None: bind options to ``builder``
    warmup: int = 0              # epochs over which the engine ramps λ linearly: λ·min(epoch/warmup, 1), epoch ≥ 1
    weight: float = 1.0          # the authors' λ (the loss weight of their released configs), the default
    ce_weight: float = 1.0       # the weight of CE the authors pair the term with (mdistiller's KD: 0.1)
    layers: str = "last_stage"   # where a map term reads by default: one of LAYER_DEFAULTS
    warmup_of: int = 0           # the epochs of the authors' schedule ``warmup`` was set for (0: absolute)

    def warmup_for(self, epochs: int) -> int:
        """The authors' warm-up on a run of ``epochs``: the same share of it as of their schedule,
        round(warmup · epochs / warmup_of), at least 1 epoch (1 ramps nothing); ``warmup`` where
        it is absolute (no ``warmup_of``) or the term has none."""
        if not (self.warmup and self.warmup_of):
            return self.warmup
        return max(1, math.floor(self.warmup * epochs / self.warmup_of + 0.5))

    @property
    def needs_maps(self) -> bool:
        return "maps" in self.needs

    @property
    def needs_teacher(self) -> bool:
        return bool(self.needs & {"feats", "maps", "logits"})


class Term(nn.Module):
    """Base class of class-based terms: ``__init__(self, ctx, *, option=default, ...)`` and a
    keyword-only ``forward`` returning the unweighted value."""

    def __init__(self, ctx: TermContext | None = None):
        super().__init__()
        self.ctx = ctx or TermContext()


class FunctionTerm(Term):
    """A registered function with its options bound, as a module (no parameters)."""

    def __init__(self, spec: TermSpec, ctx: TermContext | None, options: dict):
        super().__init__(ctx)
        self.spec = spec
        self.options = dict(options)

    def forward(self, **inputs) -> Tensor:
        return self.spec.builder(**inputs, **self.options)

    def extra_repr(self) -> str:
        return f"{self.spec.name}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())


_TERMS: dict[str, TermSpec] = {}


def _keyword_options(obj) -> tuple[tuple[str, object], ...]:
    fn = obj.__init__ if isinstance(obj, type) else obj  # type: ignore[misc]  # the class's own __init__, read for its signature
    params = inspect.signature(fn).parameters.values()
    return tuple((p.name, p.default) for p in params if p.kind is p.KEYWORD_ONLY
                 and (isinstance(obj, type) or p.name not in ("student_feats", "teacher_feats", "labels",
                                                              "student_logits", "teacher_logits", "index")))


def register_term(name: str, *, label: str, needs, pairwise_factor: int = 0, family: str = "baseline",
                  paper: str = "", warmup: int = 0, weight: float = 1.0, ce_weight: float = 1.0,
                  layers: str = "last_stage", warmup_of: int = 0):
    """Decorator: register a :class:`Term` subclass or a function under ``name`` with its facts.

    ``weight``: the default λ, as the authors' released configs weight the term against CE
    (e.g. mdistiller's ``FEAT_WEIGHT``); a config's ``weights:`` overrides it. ``ce_weight``: the
    weight of CE in the authors' loss when the term is a student's only term (mdistiller's and
    RepDistiller's KD: 0.1·CE + 0.9·KD); a config's ``ce_weights:`` overrides it.

    ``warmup``: a schedule, not part of the term's value: the engine multiplies the term's λ by
    ``min(epoch / warmup, 1)`` (epochs counted from 1, as mdistiller's trainer does); 0: no warm-up.
    ``warmup_of``: the length in epochs of the authors' schedule their ``warmup`` belongs to; a
    run of another length (:meth:`kd2m.harness.config.RunConfig.resolved`) gets the same share of its own
    epochs (:meth:`TermSpec.warmup_for`). 0: ``warmup`` is a number of epochs whatever the run.

    ``layers``: a map term's default layers, as its authors' code feeds it (:data:`LAYER_DEFAULTS`).
    """
    needs = frozenset(needs)
    bad = needs - set(INPUTS)
    if bad:
        raise ValueError(f"term {name!r}: unknown needs {sorted(bad)}; valid: {INPUTS}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"term {name!r}: warmup must be an int ≥ 0 (epochs), got {warmup!r}")
    if isinstance(warmup_of, bool) or not isinstance(warmup_of, int) or warmup_of < 0:
        raise ValueError(f"term {name!r}: warmup_of must be an int ≥ 0 (epochs), got {warmup_of!r}")
    if layers not in LAYER_DEFAULTS:
        raise ValueError(f"term {name!r}: layers must be one of {LAYER_DEFAULTS}, got {layers!r}")

    def add(obj):
        defaults = _keyword_options(obj)
        factory = obj if isinstance(obj, type) else None
        add_spec(TermSpec(name, label, obj, needs, tuple(k for k, _ in defaults), pairwise_factor, family,
                          paper, defaults, factory, warmup, float(weight), float(ce_weight), layers, warmup_of))
        return obj
    return add


def add_spec(s: TermSpec) -> None:
    """Register a fully described term (what :func:`register_term` does after reading the signature)."""
    add_entry(_TERMS, "loss term", s.name, s)


def available(family: str | None = None) -> list[str]:
    """Registered term names, sorted (``family="kd2m"`` or ``"baseline"`` to filter)."""
    return sorted(n for n, s in _TERMS.items() if family is None or s.family == family)


def spec(name: str) -> TermSpec:
    """The registered facts of ``name``; ValueError listing the names when unknown."""
    if not isinstance(name, str) or name not in _TERMS:
        raise ValueError(f"unknown loss term {name!r}; available: {', '.join(available())}")
    return _TERMS[name]


def check_options(name: str, options) -> None:
    """ValueError naming the term and listing its options when ``options`` has a key it does not take."""
    s = spec(name)
    unknown = sorted(set(options) - set(s.options))
    if unknown:
        raise ValueError(f"loss term {name!r} has no option(s) {', '.join(map(str, unknown))}; its options: "
                         f"{', '.join(s.options) or 'none'}")


def get(name: str, ctx: TermContext | None = None, **options) -> nn.Module:
    """The term ``name`` with ``options`` bound, as an ``nn.Module`` (put its parameters in your
    optimizer); ``ctx`` gives the shapes a term with parameters needs.

    Raises ValueError naming the term and listing its options when an option is unknown.
    """
    s = spec(name)
    check_options(name, options)
    if s.factory is not None:
        return s.factory(ctx or TermContext(), **options)
    return FunctionTerm(s, ctx, options)
