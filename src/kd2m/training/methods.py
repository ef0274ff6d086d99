"""What a run optimises: ``w_CE · CE + Σ_k λ_k(epoch) · term_k``, described as data.

A :class:`Method` is a named list of :class:`TermConfig` (empty for the CE-only student); the
grid builds one student per method, and the engine (:mod:`kd2m.harness.trainer`) composes the loss from
it, so "CW2 + KD" or "DKD + W2 (G)" is a config entry, not code::

    students:
      cw2+kd: [{term: cw2, weight: 0.1}, {term: kd, weight: 1.0}]
      two_layers: [{term: gauss_w2, student_layer: layer2, teacher_layer: layer3, unit: spatial, weight: 0.1},
                   {term: cw2, weight: 1.0}]
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from .. import losses
from ..catalog import CE, TEACHER
from ..catalog import UNITS as DISTANCE_UNITS
from ..features import PENULTIMATE

__all__ = ["SCHEDULES", "UNITS", "TERM_KEYS", "TermConfig", "Method", "parse_schedule", "distinct_labels", "term_label",
           "method_label", "term_from_entry", "parse_weight", "cache_problem"]

#: how λ_k moves over the epochs (per term), after the optional warm-up; ``cosine_after:E`` (E an
#: epoch) keeps λ until epoch E, then decays it to 0 along a half cosine (WKD's ``COSINE_DECAY_EPOCH``)
SCHEDULES = ("constant", "linear_up", "linear_down", "cosine_after:E")
#: the units a term entry takes (what one sample of a distance's distribution is, kd2m.catalog.UNITS):
#: all but "class", which the class-conditional distances already are on pooled features
UNITS = tuple(u for u in DISTANCE_UNITS if u != "class")
#: the keys a term entry may have in a config
TERM_KEYS = ("term", "weight", "options", "student_layer", "teacher_layer", "unit", "warmup", "schedule")


@dataclass(frozen=True)
class TermConfig:
    """One weighted term of a student's loss.

    ``weight``: λ. ``options``: the term's keyword options (see ``kd2m.losses.spec(name).options``).
    ``student_layer`` / ``teacher_layer``: module paths, ``"penultimate"`` (the classifier's input),
    a tuple of module paths (read in pairs, in order, the values summed: AT over several stages),
    or ``None`` for the term's default (penultimate for pooled features; for map terms their
    authors' stages, :func:`kd2m.training.binding.default_layers`). ``unit``: what one sample of the distribution is (``"batch"``: an image;
    ``"spatial"`` / ``"sequence"``: a position or token of one image's map or one sequence;
    ``"tokens"``: a position of the batch, all of them in one distribution). ``warmup``: epochs over which λ grows
    linearly from 0 (DKD's schedule; ``None`` = the term's registered default, which
    :meth:`kd2m.harness.config.RunConfig.resolved` scales to its run's epochs). ``schedule``:
    ``"constant"``, ``"linear_up"`` (0 → λ over the run), ``"linear_down"`` (λ → 0) or
    ``"cosine_after:E"`` (λ until epoch E, then a half cosine to 0 at the last epoch: WKD's decay).
    ``auto``: λ is ``weight`` × a scale calibrated on the initial student (:mod:`kd2m.training.auto_weight`):
    at initialisation the term then pulls the student's weights ``weight`` times as hard as CE.
    """
    name: str
    weight: float = 1.0
    options: tuple = ()                 # ((key, value), ...) sorted: hashable and stable on disk
    student_layer: str | tuple | None = None   # a tuple: several layers, paired in order with the other side
    teacher_layer: str | tuple | None = None
    unit: str = "batch"
    warmup: int | None = None
    schedule: str = "constant"
    auto: bool = False

    @property
    def spec(self) -> losses.TermSpec:
        return losses.spec(self.name)

    @property
    def option_dict(self) -> dict:
        return dict(self.options)

    @property
    def uses_maps(self) -> bool:
        """Its inputs are raw maps/tokens (a map term, or a distance over spatial positions)."""
        return self.spec.needs_maps or self.unit != "batch"

    @property
    def reads_logits(self) -> bool:
        """Its value reads the logits: a logit term, or a KD²M distance with unit batch (per
        position, a distance matches features alone and drops the logits)."""
        return "logits" in self.spec.needs and not (self.spec.family == "kd2m" and self.unit != "batch")

    @property
    def warmup_epochs(self) -> int:
        return int(self.warmup if self.warmup is not None else getattr(self.spec, "warmup", 0))

    def weight_at(self, epoch: int, epochs: int) -> float:
        """λ during (0-based) ``epoch`` of ``epochs``: warm-up factor min((epoch+1)/warmup, 1) as in
        mdistiller's DKD, times the schedule's factor.

        ``cosine_after:E``, with e = epoch + 1 the authors' 1-based epoch and N = ``epochs``: factor
        1 while e ≤ E, then ½(1 + cos(π (e − E) / (N − E))), 0 at the last epoch — JiamingLv/WKD
        ``mdistiller/distillers/WKD.py`` ``forward_train`` (``kwargs['epoch'] > decay_start_epoch``,
        epochs counted from 1 by its trainer).
        """
        w = self.weight
        # no warm-up given: the authors' share of the run (DKD's 20 of 240 epochs), as a grid's config gets it
        warmup = self.warmup if self.warmup is not None else self.spec.warmup_for(epochs)
        if warmup > 0:
            w *= min((epoch + 1) / warmup, 1.0)
        kind, start = parse_schedule(self.schedule)
        if kind == "linear_up":
            w *= (epoch + 1) / max(epochs, 1)
        elif kind == "linear_down":
            w *= 1.0 - epoch / max(epochs, 1)
        elif kind == "cosine_after" and epoch + 1 > start:  # then epochs > start: no division by 0
            w *= 0.5 * (1.0 + math.cos(math.pi * (epoch + 1 - start) / (epochs - start)))
        return w

    def describe(self) -> dict:
        """Plain data for run settings and logs."""
        return json.loads(json.dumps({"term": self.name, "weight": self.weight, "options": self.option_dict,
                                      "student_layer": self.student_layer, "teacher_layer": self.teacher_layer,
                                      "unit": self.unit, "warmup": self.warmup_epochs,
                                      "schedule": self.schedule, "auto": self.auto}))


@dataclass(frozen=True)
class Method:
    """A student's loss: ``ce_weight``·CE plus ``terms``. ``key`` names its directory and its
    results rows (``"teacher"`` is the teacher's run, ``"ce"`` the CE-only student)."""
    key: str
    terms: tuple = field(default_factory=tuple)
    ce_weight: float = 1.0
    #: the table's label where the terms' labels alone would not tell it from another student
    display: str | None = None

    @property
    def uses_teacher(self) -> bool:
        return any(t.spec.needs_teacher for t in self.terms)

    @property
    def is_teacher(self) -> bool:
        return self.key == TEACHER

    @property
    def label(self) -> str:
        return self.display or method_label(self.key, self.terms)


def parse_schedule(schedule) -> tuple[str, int | None]:
    """``(kind, start epoch)`` of a schedule as written: ``"constant"``, ``"linear_up"``,
    ``"linear_down"`` (start None) or ``"cosine_after:E"`` with E an int ≥ 0. ValueError otherwise."""
    if isinstance(schedule, str):
        kind, sep, start = schedule.partition(":")
        if not sep and kind in SCHEDULES:
            return kind, None
        if sep and kind == "cosine_after" and start.strip().isdigit():
            return kind, int(start)
    raise ValueError(f"unknown schedule {schedule!r:.40}")


def distinct_labels(methods: list) -> list:
    """``methods`` with every label distinct: students whose terms' labels coincide (``cw2_a`` at
    λ 1 and ``cw2_b`` at λ 0.1 are both "CW2 (E)") get their name appended (``CW2 (E) [cw2_a]``),
    so that no row of a table, and no note attached to a row by its label, is another's."""
    import dataclasses
    labels = [m.label for m in methods]
    return [dataclasses.replace(m, display=f"{m.label} [{m.key}]") if labels.count(m.label) > 1 else m
            for m in methods]


def term_label(term: TermConfig) -> str:
    """The field's label of one term: its registered label, with " + LS" when it standardizes the
    logits first (logit standardization, Sun et al. CVPR 2024: their tables' "KD + Ours")."""
    return term.spec.label + (" + LS" if term.option_dict.get("standardize") is True else "")


def method_label(key: str, terms=()) -> str:
    """How a results table names a method: the field's label of each term, joined by " + " (once
    per term and layers)."""
    base, _, variant = key.partition("@")
    if base == TEACHER:
        name = "teacher"
    elif base == CE:
        name = "student (CE only)"
    elif terms:
        # a term given twice on the same layers is one method split in parts (WKD-L's target and
        # Wasserstein parts, scheduled apart): named once
        parts = dict.fromkeys((term_label(t), t.student_layer, t.teacher_layer, t.unit) for t in terms)
        name = " + ".join(label for label, *_ in parts)
    else:
        parts = base.split("+")
        name = " + ".join(losses.spec(p).label if p in losses.available() else p for p in parts)
    if variant:
        name += f" ({variant})" if "=" in variant else f" λ={variant}"
    return name


def term_from_entry(entry, where: str, default_weight: float | None = None, options: dict | None = None) -> TermConfig:
    """A :class:`TermConfig` from a config entry: a name, or a mapping with :data:`TERM_KEYS`
    (``metric`` is accepted for ``term``). Raises ValueError naming ``where`` and the bad key."""
    if isinstance(entry, str):
        entry = {"term": entry}
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: a term is a name or a mapping with keys {', '.join(TERM_KEYS)}, got {entry!r:.80}")
    entry = dict(entry)
    if "metric" in entry and "term" not in entry:
        entry["term"] = entry.pop("metric")
    unknown = sorted(set(entry) - set(TERM_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; valid: {', '.join(TERM_KEYS)}")
    name = entry.get("term")
    if not isinstance(name, str):
        raise ValueError(f"{where}: term must be one name (a string), got {name!r:.60}; one entry per term")
    try:
        spec = losses.spec(name)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    weight = entry.get("weight", default_weight if default_weight is not None else getattr(spec, "weight", 1.0))
    try:
        weight, auto = parse_weight(weight)
    except ValueError:
        raise ValueError(f"{where}: weight (λ) of {name!r} must be a finite number ≥ 0, 'auto' or 'auto*K', "
                         f"got {weight!r:.40}") from None
    given = entry.get("options") or {}
    if not isinstance(given, dict):
        raise ValueError(f"{where}: options of {name!r} must be a mapping of option names to values "
                         f"(e.g. options: {{temperature: 4}}), got {given!r:.60}")
    opts = {**(options or {}), **given}
    try:
        losses.check_options(name, opts)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    unit = entry.get("unit", "batch")
    if unit not in UNITS:
        raise ValueError(f"{where}: unit of {name!r} must be one of {', '.join(UNITS)}, got {unit!r:.40}")
    if unit != "batch" and spec.family != "kd2m":
        raise ValueError(f"{where}: unit {unit!r} applies to the distribution distances, not to {name!r}")
    warmup = entry.get("warmup")
    if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0):
        raise ValueError(f"{where}: warmup of {name!r} must be a number of epochs ≥ 0, got {warmup!r:.40}")
    schedule = entry.get("schedule", "constant")
    try:
        parse_schedule(schedule)
    except ValueError:
        raise ValueError(f"{where}: schedule of {name!r} must be one of {', '.join(SCHEDULES)} (E an epoch, "
                         f"e.g. cosine_after:150), got {schedule!r:.40}") from None
    s_l, t_l = _entry_layers(entry, where, name, spec, unit)
    return TermConfig(name, float(weight), tuple(sorted(opts.items())), s_l, t_l, unit, warmup, schedule, auto)


def _entry_layers(entry: dict, where: str, name: str, spec, unit: str) -> tuple:
    """The ``(student_layer, teacher_layer)`` of a term entry (:func:`term_from_entry`): each a
    module path, a tuple of them (a list as written, paired in order with the other side's) or
    None. Raises ValueError naming ``where`` for anything else, for a list of layers on pooled
    features, and for lists of two lengths."""
    layers = {}
    for key in ("student_layer", "teacher_layer"):
        value = entry.get(key)
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            value = tuple(value)  # several layers, paired in order with the other side's (AT over stages)
        elif value is not None and not (isinstance(value, str) and value):
            raise ValueError(f"{where}: {key} of {name!r} must be a module path (a string) or a list of them")
        layers[key] = value
    s_l, t_l = layers["student_layer"], layers["teacher_layer"]
    if isinstance(s_l, tuple) or isinstance(t_l, tuple):
        if spec.family == "kd2m" and unit == "batch":
            raise ValueError(f"{where}: lists of layers are for map terms and unit 'spatial'; {name!r} on pooled "
                             "features reads one layer per side (give one entry per layer)")
        n_s = len(s_l) if isinstance(s_l, tuple) else 1
        n_t = len(t_l) if isinstance(t_l, tuple) else 1
        if s_l is not None and t_l is not None and n_s != n_t:
            raise ValueError(f"{where}: {name!r} pairs student_layer and teacher_layer in order; give lists of one "
                             f"length (got {n_s} and {n_t})")
    return s_l, t_l


def parse_weight(value) -> tuple[float, bool]:
    """A λ as written in a config: a number ≥ 0, ``"auto"`` (calibrated, factor 1) or ``"auto*K"``
    (calibrated, factor K). Returns (number or factor, auto). ValueError otherwise."""
    auto = False
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if text == "auto":
            return 1.0, True
        if text.startswith("auto*"):
            text, auto = text[5:], True
        value = float(text)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"bad weight {value!r}")
    return float(value), auto


def cache_problem(method: Method) -> str | None:
    """Why ``method`` cannot read the teacher from a ``--teacher-cache`` table (which holds the
    logits and one teacher layer, pooled or per position), or None: a map term (its authors'
    layers are several stages), or terms reading different layers."""
    maps = [t.name for t in method.terms if t.spec.needs_maps]
    if maps:
        return (f"{method.key}: {', '.join(maps)} read feature maps, which the teacher cache does not store; use "
                "teacher_cache: 0 (the online teacher)")
    layers = {(t.teacher_layer or PENULTIMATE, t.uses_maps) for t in method.terms if t.spec.needs & {"feats", "maps"}}
    if len(layers) > 1:
        names = sorted({f"{layer} ({'per position' if raw else 'pooled'})" for layer, raw in layers})
        return (f"{method.key}: its terms read teacher layers {', '.join(names)}; the teacher cache holds "
                "one; use teacher_cache: 0")
    return None
