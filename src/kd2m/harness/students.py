"""The students compiler: a config's ``baselines``, ``metrics``, ``students`` and ``distill`` as
the :class:`~kd2m.training.methods.Method` objects a grid trains.

A student is a baseline or a distance alone (one term, the config's λ, options and layers), or a
named student with several terms (``students: {name: [entries]}``, or the one ``distill:``
student, named after its terms). Its name is its directory in the output directory, so
:func:`named_students` refuses a name kd2m uses there.
"""
from __future__ import annotations

from .. import losses
from ..catalog import CE, TEACHER
from ..errors import ConfigError
from ..features import PENULTIMATE
from ..training.methods import Method, distinct_labels, term_from_entry
from . import rundir
from .config_values import quote

__all__ = ["build_methods", "build_term", "named_students", "entry_name"]


def build_term(c, name: str):
    """The single-term entry of a ``metrics`` or ``baselines`` name with the λ, options and layers
    of ``c`` (a RunConfig)."""
    opts, schedule = _split_schedule(c.options_for(name))
    entry = {"term": name, "weight": c.weight_for(name), **schedule}
    if losses.spec(name).family == "kd2m":
        unit = c.unit or "batch"
        entry["unit"] = unit
        # per-position units read their model's last map or tokens unless a layer is named
        for key in ("student_layer", "teacher_layer"):
            if unit == "batch" or getattr(c, key) != PENULTIMATE:
                entry[key] = getattr(c, key)
    return term_from_entry(entry, name, options=opts)


def build_methods(c) -> list:
    """The students of ``c`` (a RunConfig), in table order: baselines, metrics, named students."""
    out = [Method(CE) if b == CE else _distilled(c, b, (build_term(c, b),)) for b in c.baselines]
    out += [_distilled(c, m, (build_term(c, m),)) for m in c.metrics]
    for name, entries in (c.students or {}).items():
        terms = tuple(_entry_term(c, name, i, e) for i, e in enumerate(entries))
        out.append(_distilled(c, name, terms))
    return distinct_labels(out)


def _entry_term(c, student: str, i: int, e):
    """Term ``i`` of named student ``student``: its entry ``e`` over the config's λ, options and layers."""
    tname = entry_name(e)
    # the run's layers for a distance on pooled features; a spatial one defaults to the
    # last stage's map (kd2m.training.binding.default_layers), not the pooled penultimate
    spatial = isinstance(e, dict) and e.get("unit", "batch") != "batch"
    defaults = dict(student_layer=c.student_layer, teacher_layer=c.teacher_layer) \
        if isinstance(tname, str) and tname in _kd2m_names() and not spatial else {}
    known = isinstance(tname, str) and tname in _all_names()
    opts, schedule = _split_schedule(c.options_for(tname) if known else {})
    entry = {**defaults, **schedule, **({"term": e} if isinstance(e, str) else e)}
    if known and "weight" not in entry:
        entry["weight"] = c.weight_for(tname)
    return term_from_entry(entry, f"students: {student}[{i}]", options=opts)


def _distilled(c, key: str, terms: tuple):
    """A distilled student: its terms and its CE weight (``ce_weights``, else the authors' CE
    weight of its only term, else 1)."""
    given = c.ce_weights or {}
    if key in given:
        ce_weight = given[key]
    elif len(terms) == 1:
        ce_weight = terms[0].spec.ce_weight
    else:
        ce_weight = 1.0
    return Method(key, terms, float(ce_weight))


def named_students(c) -> dict:
    """``students:`` and the one ``distill:`` student of ``c`` (a RunConfig), checked: {name: entries}."""
    if c.students is not None and not isinstance(c.students, dict):
        raise ConfigError("students: expected a mapping of names to lists of terms")
    students = dict(c.students or {})
    for name, entries in students.items():
        _check_student_name(name, "students")
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"students: {name}: expected a non-empty list of terms")
        for i, e in enumerate(entries):
            _check_entry_name(e, f"students: {name}[{i}]")
    if c.distill is not None:
        if not isinstance(c.distill, list) or not c.distill:
            raise ConfigError("distill: expected a non-empty list of terms")
        for i, e in enumerate(c.distill):
            _check_entry_name(e, f"distill[{i}]")
        name = "+".join(entry_name(e) for e in c.distill)
        if name in students:
            # the distill: student would silently replace (or be replaced by) that one
            raise ConfigError(f"distill: its student is named {name!r} after its terms, and students: has a "
                              f"student {name!r} too; rename that one, or move distill's terms under students:")
        students[name] = c.distill
    return students


def _split_schedule(opts: dict) -> tuple[dict, dict]:
    """A term's options without the schedule keys (``warmup``, ``schedule``) that may be given among them."""
    sched = {k: opts.pop(k) for k in ("warmup", "schedule") if k in opts}
    return opts, sched


def _kd2m_names():
    return losses.available("kd2m")


def _all_names():
    return losses.available()


def entry_name(entry):
    """The term a student's entry names: the entry itself, or its ``term`` (``metric``) key."""
    if isinstance(entry, dict):
        return entry.get("term", entry.get("metric"))
    return entry


def _check_entry_name(entry, where: str) -> None:
    """A term entry is a name or a mapping whose ``term`` is a name (the rest is checked by
    :func:`kd2m.training.methods.term_from_entry`)."""
    name = entry_name(entry)
    if not isinstance(entry, (str, dict)):
        raise ConfigError(f"{where}: a term is a name or a mapping with a 'term' key, got {quote(entry)}")
    if name is None:
        raise ConfigError(f"{where}: the entry {quote(entry)} names no term; give term: NAME "
                          f"(e.g. {{term: cw2, weight: 0.1}})")
    if not isinstance(name, str):
        raise ConfigError(f"{where}: term must be one name (a string), got {quote(name)}; one entry per term")


#: Names in an output directory that a student's directory must not take (or climb out of it).
_RESERVED_NAMES = {".", "..", TEACHER, CE, "report", "tb"}


def _check_student_name(name, where: str) -> None:
    """A student's name is its directory under ``out`` and its results key: a plain file name
    (letters, digits and ``_+-=.,``), not '.', '..', a name kd2m uses in ``out`` (``teacher``,
    ``ce``, ``results.csv`` …), and no '@' (the key's variant separator)."""
    taken = _RESERVED_NAMES | {v for k, v in vars(rundir).items() if k.isupper() and isinstance(v, str)}
    ok = isinstance(name, str) and bool(name) and all(ch.isalnum() or ch in "_+-=.," for ch in name)
    if not ok or name in taken or name.startswith("."):
        raise ConfigError(f"{where}: {quote(name)} cannot name a student (it names its directory in the output "
                          "directory): use letters, digits and _+-=., not starting with '.', and no name kd2m "
                          "uses there (teacher, ce, results.csv, config.json, report, select-k, …)")
