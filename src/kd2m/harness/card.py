"""The reproduction card: for every method of a grid, the settings that decide its result and
where each comes from, training nothing (``kd2m bench CONFIG --dry-run``).

"I can't reproduce the paper's number" is the first complaint in every distillation tracker;
the card answers "what exactly would run": the recipe (epochs, batch, learning rate and its
schedule, optimizer, seeds), and per student its CE weight and, per term, λ and its schedule,
every option, and the layers it reads (resolved on the real models where they can be built),
each value marked with its source:

- ``config``: the YAML file or the command line;
- ``dataset default``: :func:`kd2m.harness.recipes.defaults_for` (``DATASET_DEFAULTS``, ``LM_DEFAULTS`` or ``IMAGE_DEFAULTS``);
- ``authors' default``: the term's registration, which carries its authors' value
  (:func:`kd2m.losses.spec`); its docstring names the file it was read from;
- ``kd2m default``: a field of :class:`kd2m.harness.config.RunConfig` nobody set.
"""
from __future__ import annotations

import dataclasses
import inspect

import torch

from .. import metrics
from ..catalog import CE
from ..data import DatasetNotFoundError, build_dataset
from ..data.torchvision_sets import SHAPES
from ..features import PENULTIMATE
from ..models import build_model
from ..training.binding import default_layers
from ..training.methods import Method
from .config import RunConfig
from .recipes import defaults_for

__all__ = ["reproduction_card"]

#: the recipe's fields, in the order the card lists them
RECIPE = ("task", "dataset", "tokenizer", "image_size", "teacher", "teacher_options", "student", "student_options",
          "pretrained_teacher", "pretrained_student", "epochs", "teacher_epochs", "batch_size", "optimizer", "lr",
          "teacher_lr", "lr_schedule", "lr_min", "lr_milestones", "lr_gamma", "momentum", "weight_decay", "amp",
          "unit", "match", "teacher_cache", "teacher_topk", "seeds", "holdout")


def _field_source(user: RunConfig, key: str, given: set = frozenset()) -> str:
    value = getattr(user, key)
    default = next(f for f in dataclasses.fields(RunConfig) if f.name == key)
    default = default.default_factory() if default.default_factory is not dataclasses.MISSING else default.default
    if key in given or (value is not None and value != default):
        return "config"
    dataset = user.resolved().dataset
    if key == "dataset" and user.task == "lm":
        return "task default"  # --task lm alone: the offline text benchmark
    if key in defaults_for(dataset) or key == "task":
        return "dataset default"
    return "kd2m default"


def _pretrained_source(cfg: RunConfig, key: str) -> str | None:
    """``DIR/config.json`` where a role's model and options are those of its ``save_pretrained``
    directory (:func:`kd2m.harness.config.RunConfig.resolved` names them after it), ``FILE.gguf (its
    metadata)`` where those of a GGUF file, ``FILE.gguf (its own tokenizer)`` for the tokenizer a
    GGUF file holds, else None."""
    from ..models.hf import is_gguf
    if key == "tokenizer":
        own = [w for w in (cfg.pretrained_teacher, cfg.pretrained_student) if is_gguf(w) and w == cfg.tokenizer]
        return f"{own[0]} (its own tokenizer)" if own else None
    role = key.split("_")[0]
    if key not in ("teacher", "student", "teacher_options", "student_options"):
        return None
    weights = getattr(cfg, f"pretrained_{role}")
    if not _hf_directory(cfg, role):
        return None
    return f"{weights} (its metadata)" if is_gguf(weights) else f"{weights}/config.json"


def _hf_directory(cfg: RunConfig, role: str) -> bool:
    """Whether ``role`` is built from a ``save_pretrained`` directory or a GGUF file (as
    :func:`kd2m.training.build.build_net` builds it)."""
    from ..models.hf import is_hf, is_hf_pretrained
    return is_hf(getattr(cfg, role)) and is_hf_pretrained(getattr(cfg, f"pretrained_{role}"))


def _pretrained_value(cfg: RunConfig, key: str, value):
    """A GGUF file's path with how it stores its weights and the dtype the model computes in."""
    from ..models.hf import GGUF_DTYPE, gguf_storage, is_gguf
    if key not in ("pretrained_teacher", "pretrained_student") or not is_gguf(value):
        return value
    return f"{value} (GGUF, stored as {gguf_storage(value)}; dequantised, computes in {str(GGUF_DTYPE)[6:]})"


def _entry_of(user: RunConfig, method: Method, index: int) -> dict:
    """The config entry a term came from (students:/distill:), or {} for a metrics/baselines name."""
    entries = dict(user.students or {})
    if user.distill:
        entries["+".join(e if isinstance(e, str) else str(e.get("term")) for e in user.distill)] = user.distill
    entry = (entries.get(method.key) or [None] * (index + 1))[index]
    return entry if isinstance(entry, dict) else {}


def _weight_source(user: RunConfig, term, entry: dict, swept: bool = False) -> str:
    if swept:
        return "--sweep"
    if "weight" in entry:
        return "config"
    if term.name in (user.weights or {}):
        return "config"
    defaults = defaults_for(user.resolved().dataset)
    if term.spec.family == "kd2m":
        if user.weight is not None:
            return "config"
        return "dataset default" if "weight" in defaults or term.name in defaults.get("weights", {}) else "kd2m default"
    if user.weights is None and term.name in defaults.get("weights", {}):
        return "dataset default"
    return "authors' default"


def _option_sources(user: RunConfig, term, entry: dict, sweep_key: str | None = None) -> list[str]:
    given = dict(entry.get("options") or {})
    from_config = dict((user.term_options or {}).get(term.name, {}))
    from_dataset = defaults_for(user.resolved().dataset).get("term_options", {}).get(term.name, {})
    out = []
    registered = dict(term.spec.defaults)
    for key, value in term.option_dict.items():
        if key in given or key in from_config:
            where = "config"
        elif key in from_dataset:
            where = "dataset default"
        elif sweep_key == "kd_temperature":  # kd's temperature: the run's kd_temperature, here swept
            where = "--sweep"
        else:  # kd's temperature: the run's kd_temperature
            where = _field_source(user, "kd_temperature")
        out.append(f"{key}={value!r} ({where})")
    if term.spec.family == "kd2m":  # the metric's own keyword defaults (its registration lists None)
        registered.update({k: p.default for k, p in inspect.signature(metrics.spec(term.name).fn).parameters.items()
                           if p.kind is p.KEYWORD_ONLY})
    shown = set(term.option_dict)
    for key, value in registered.items():
        if key not in shown and key not in ("match", "unit"):
            out.append(f"{key}={value!r} (authors' default)" if term.spec.family == "baseline"
                       else f"{key}={value!r} (metric default)")
    return out


def _schedule(term, entry: dict, user: RunConfig) -> str:
    parts = []
    opts = (user.term_options or {}).get(term.name, {})
    if term.warmup_epochs:
        where = "config" if "warmup" in entry or "warmup" in opts else "authors' default"
        epochs, spec = user.resolved().epochs, term.spec
        if where != "config" and spec.warmup_of and epochs != spec.warmup_of:  # kd2m.harness.config_checks._scale_warmups
            where = f"the authors' {spec.warmup} of {spec.warmup_of} epochs, scaled to this run's {epochs}"
        parts.append(f"warm-up {term.warmup_epochs} epochs ({where})")
    if term.schedule != "constant":
        where = "config" if "schedule" in entry or "schedule" in opts else "kd2m default"
        parts.append(f"{term.schedule} ({where})")
    return ", ".join(parts) or "constant"


def _models(cfg: RunConfig):
    """(student, teacher, example input) built as a grid builds them, or None where the data's
    shape is unknown here (files missing and the dataset not one of known shape)."""
    try:
        bundle = build_dataset(cfg.dataset, data_root=cfg.data_root, download=False, augment=False,
                               image_size=cfg.image_size, tokenizer=cfg.tokenizer, holdout=cfg.holdout)
        classes, channels, size = bundle.num_classes, bundle.in_channels, bundle.image_size
        example = bundle.train[0][0].unsqueeze(0).repeat(2, *([1] * bundle.train[0][0].dim()))
    except DatasetNotFoundError:
        if cfg.dataset not in SHAPES:
            return None
        classes, channels, size = SHAPES[cfg.dataset]
        example = torch.zeros(2, channels, size, size)

    def build(role: str):
        if _hf_directory(cfg, role):  # its own architecture, as a grid builds it
            from ..models.hf import load_hf_pretrained
            return load_hf_pretrained(getattr(cfg, f"pretrained_{role}"), classes, size)
        return build_model(getattr(cfg, role), classes, channels, size, **(getattr(cfg, f"{role}_options") or {}))

    with torch.random.fork_rng(devices=[]):
        student, teacher = build("student").eval(), build("teacher").eval()
    return student, teacher, example


def _layers(term, models, entry: dict, user: RunConfig, given_keys: set) -> str:
    if not term.spec.needs & {"feats", "maps"}:
        return "—"
    sides = []
    for side, k in (("student", 0), ("teacher", 1)):
        given = getattr(term, f"{side}_layer")
        if given is not None:
            # a distance's layer is the run's student_layer/teacher_layer unless its entry names one
            where = "config" if f"{side}_layer" in entry else _field_source(user, f"{side}_layer", given_keys)
            sides.append(("+".join(given) if isinstance(given, tuple) else given, where))
        elif models is None:
            sides.append(("(default; the data is not here to resolve it)", "default"))
        else:
            sides.append(("+".join(default_layers(models[k], models[2], term)), "default"))
    text = f"{sides[0][0]} ← {sides[1][0]}"
    if "default" in (sides[0][1], sides[1][1]):
        return text + f" ({_default_rule(term)}: default)"
    return text + f" ({sides[0][1]})"


def _default_rule(term) -> str:
    """What a term reads where no layer is named: its authors' stages (map terms), the last map
    (unit spatial), the last hidden states token by token (tokens, sequence), else the pooled
    penultimate features."""
    if term.spec.needs_maps:
        return {"intermediate_stages": "stages after the stem", "hint": "stage 2 (hint)",
                "last_stage": "last stage"}[term.spec.layers]
    if term.unit == "spatial":
        return "last post-activation map"
    if term.uses_maps:
        return "last hidden states, per token"
    return PENULTIMATE


def _recipe(user: RunConfig, cfg: RunConfig, given: set, sweep) -> list[str]:
    """The card's recipe table: every setting of :data:`RECIPE` the run uses, and where it comes from."""
    sweep_key = sweep[0] if sweep is not None else None
    lines = ["## Recipe (teacher and every student)", "", "| setting | value | from |", "|---|---|---|"]
    for key in RECIPE:
        value = getattr(cfg, key)
        if value is None or value == {} or (key == "lr_milestones" and cfg.lr_schedule != "multistep"):
            continue
        if (key == "lr_min" and cfg.lr_schedule != "cosine") or (key == "lr_gamma" and cfg.lr_schedule == "cosine") \
                or (key == "momentum" and cfg.optimizer != "sgd"):
            continue
        if key == "teacher_topk":  # what the top-K cache keeps per token, against the dense 4·V
            value = f"{value} ({12 * value + 4} bytes per token; every logit: 4·V)"
        if key == sweep_key:  # the teacher trains with the recipe's value, every student with each swept one
            lines.append(f"| {key} | {value} (teacher); students: {', '.join(f'{v:g}' for v in sweep[1])} | "
                         f"{_field_source(user, key, given)}; --sweep |")
            continue
        lines.append(f"| {key} | {_pretrained_value(cfg, key, value)} | "
                     f"{_pretrained_source(cfg, key) or _field_source(user, key, given)} |")
    return lines


def _students_intro(cfg: RunConfig, sweep) -> list[str]:
    """What the Students section says before the students: how a λ chosen on a holdout, and a sweep, show."""
    lines = []
    from .select_k import plan
    selection = plan(cfg, sweep)
    if selection:
        names, values = selection
        how = "`weight: auto`" if cfg.select_k is None else "`select_k`"
        lines += [f"λ of {', '.join(names)}: chosen before the grid by {how} among auto×"
                  f"{', auto×'.join(f'{k:g}' for k in values)} (0: the term off), on a holdout of "
                  f"{cfg.select_holdout:g} of the training split, seeds {cfg.select_seeds}; the λ below is "
                  "what they would train at without it (`--select-k none`). A term chosen at K = 0 trains as the "
                  "CE-only student (CE weight 1), the student its pilot was; named students keep their λ.", ""]
    if sweep is not None:
        lines += [f"`--sweep {sweep[0]}={','.join(f'{v:g}' for v in sweep[1])}`: one student per swept value "
                  "(`KEY@value`), as listed; what the sweep does not vary runs once.", ""]
    return lines


def _student(user: RunConfig, vcfg: RunConfig, method: Method, sweep, models, given: set) -> list[str]:
    """One student's section of the card: its CE weight and, per term, λ, schedule, options and layers."""
    sweep_key = sweep[0] if sweep is not None else None
    key = method.key.partition("@")[0]  # the student's name in the config (a swept one is `name@value`)
    varied = "@" in method.key
    swept = [] if not varied or sweep_key in ("weight", "auto_weight") else \
        [f"{sweep_key} {getattr(vcfg, sweep_key):g} (--sweep)."]
    if key == CE:
        return [f"### {method.key} — {method.label}", "", "CE only (weight 1).", *swept, ""]
    given_ce = key in (user.ce_weights or {})
    ce_from = "config" if given_ce else (
        "dataset default" if user.ce_weights is None and key in
        defaults_for(user.resolved().dataset).get("ce_weights", {}) and user.weights is None
        else "authors' default" if len(method.terms) == 1 and method.terms[0].spec.family == "baseline"
        else "kd2m default")
    lines = [f"### {method.key} — {method.label}", "", f"CE weight {method.ce_weight:g} ({ce_from}).", *swept,
             "", "| term | λ | schedule | options | layers (student ← teacher) |", "|---|---|---|---|---|"]
    for i, t in enumerate(method.terms):
        entry = _entry_of(user, dataclasses.replace(method, key=key), i)
        lam = ("auto×" if t.auto else "") + f"{t.weight:g}"
        lam_from = _weight_source(user, t, entry, swept=varied and sweep_key in ("weight", "auto_weight"))
        options = _option_sources(user, t, entry, sweep_key if varied else None)
        lines.append(f"| {t.name} ({t.spec.paper or 'kd2m'}) | {lam} ({lam_from}) | "
                     f"{_schedule(t, entry, user)} | {'; '.join(options) or '—'} | "
                     f"{_layers(t, models, entry, user, given)} |")
    lines.append("")
    return lines


def reproduction_card(user: RunConfig, command: str = "kd2m bench", given: set = frozenset(), sweep=None) -> str:
    """The card (Markdown) of the grid ``user`` describes: ``user`` as loaded (defaults unfilled),
    so each value's source can be told; ``given``: the fields the config file and the command
    line set (a value equal to kd2m's default is then still "config"). Builds the models to
    resolve default layers (no data is needed for datasets of known shape); trains and writes
    nothing."""
    from .grid import sweep_variants
    cfg = user.resolved()
    students = sweep_variants(cfg, sweep)  # exactly the runs the grid trains
    lines = [f"# Reproduction card: what `{command}` would run (nothing is trained)", "",
             *_recipe(user, cfg, given, sweep)]
    models = _models(cfg)
    lines += ["", "## Students", "", *_students_intro(cfg, sweep)]
    for vcfg, method in students:
        lines += _student(user, vcfg, method, sweep, models, given)
    if models is None:
        lines.append(f"(Default layers are named by rule only: {cfg.dataset}'s files are not here to build the "
                     "models on.)")
    return "\n".join(lines).rstrip() + "\n"
