"""The checks of :meth:`kd2m.harness.config.RunConfig.resolved`, in the order it runs them.

:func:`resolve` fills a config's dataset-dependent defaults (:func:`kd2m.harness.recipes.fill_defaults`)
and checks every value before anything is trained or written: the dataset and task, the models,
the lists and numbers, the term names and their λ, the named students
(:func:`kd2m.harness.students.named_students`), warm-ups against the run's length, CE weights, the
students as built (teacher cache, TensorBoard, a teacher to learn from), the top-K teacher cache
and what text needs. A value it cannot use is a ConfigError naming its key.
"""
from __future__ import annotations

import math

from .. import losses
from ..catalog import BASELINE_ORDER, CE, TEACHER
from ..data import available_datasets, dataset_task, is_dataset
from ..errors import ConfigError
from ..models import available_models
from ..models.user import is_user_factory, load_factory
from ..training.methods import UNITS, cache_problem, parse_weight
from .config_values import float_list, int_list, seed_list, str_list
from .monitor import require_tensorboard
from .recipes import SELECT_SEEDS, fill_defaults
from .students import entry_name, named_students

__all__ = ["resolve"]


def resolve(c) -> None:
    """``c`` (a RunConfig, changed in place) with dataset-dependent defaults filled in and every value checked."""
    if c.dataset is None:  # --task lm alone: the offline text benchmark
        c.dataset = "python_docs" if c.task == "lm" else "digits"
    _check_dataset(c)
    cache_by_default = c.teacher_cache is None
    fill_defaults(c)
    _check_models(c)
    _check_lists_and_numbers(c)
    _check_terms(c)
    c.students = named_students(c)
    _scale_warmups(c)
    _check_ce_weights(c)
    _check_methods(c, cache_by_default)
    _check_lm(c)  # before the top-k check: a distance's unit decides whether it reads the full logits
    _check_topk(c)


def _check_dataset(c) -> None:
    """A dataset kd2m knows, checked before anything is written or loaded, and the task it is for."""
    if not is_dataset(c.dataset):
        raise ConfigError(f"dataset: unknown {c.dataset!r}; available: {', '.join(available_datasets())}")
    if c.task is not None and c.task != dataset_task(c.dataset):
        raise ConfigError(f"task: {c.task!r}, but dataset {c.dataset!r} is for {dataset_task(c.dataset)}; text "
                          "datasets (python_docs, text:PATH) are for lm, the others for classification")


def _check_models(c) -> None:
    """Teacher and student models kd2m can build: registered, ``timm:``/``torchvision:``/``hf:``, or
    the user's own factory, imported now (an import error is said before the teacher trains)."""
    for key in ("teacher", "student"):
        name = getattr(c, key)
        if is_user_factory(name):
            try:
                load_factory(name)  # an import error is said now, not after the teacher trained
            except ValueError as e:
                raise ConfigError(f"{key}: {e}") from None
            continue
        if not (name in available_models() or str(name).startswith(("timm:", "torchvision:", "hf:"))):
            raise ConfigError(f"{key}: unknown model {getattr(c, key)!r}; available: "
                              f"{', '.join(available_models())} (or timm:NAME, torchvision:NAME, hf:MODEL_TYPE, "
                              "package.module:factory for your own)")


def _check_lists_and_numbers(c) -> None:
    """The output directory, the lists read (seeds, select_k, names, milestones) and every number."""
    if not str(c.out).strip():
        raise ConfigError("out: an empty output directory; give a directory, e.g. --out runs/mine")
    c.seeds = seed_list(c.seeds)
    _read_select_k(c)
    c.select_seeds = list(SELECT_SEEDS) if c.select_seeds is None else seed_list(c.select_seeds, "select_seeds")
    c.metrics = str_list("metrics", c.metrics)
    c.baselines = str_list("baselines", c.baselines)
    if all(isinstance(m, str) for m in c.lr_milestones):  # "150,180,210" from the command line
        c.lr_milestones = int_list("lr_milestones", ",".join(c.lr_milestones))
    _check_numbers(c)


def _read_select_k(c) -> None:
    """``select_k`` as a list of K; ``none``/``off`` (choose nothing) as []."""
    def off(v) -> bool:  # `select_k: none`, `off` (YAML reads it as False), `--select-k none` (a list of one)
        return v is False or (isinstance(v, str) and v.strip().lower() in ("none", "off"))
    if off(c.select_k) or (isinstance(c.select_k, list) and len(c.select_k) == 1 and off(c.select_k[0])):
        c.select_k = []  # nothing chosen: auto is auto*1
    elif c.select_k is True:
        raise ConfigError("select_k: a comma list of K (e.g. 0,0.3,1,3,10), or none; got true")
    elif c.select_k is not None:
        c.select_k = float_list("select_k", c.select_k)


def _check_fraction(key: str, v, zero: bool) -> None:
    """A share of the training split: a number in [0, 1) (``zero``) or (0, 1)."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (0 <= v if zero else 0 < v) and v < 1
    if not ok:
        raise ConfigError(f"{key}: a fraction of the training split in {'[' if zero else '('}0, 1) (e.g. 0.2), "
                          f"got {v!r}")


def _check_numbers(c) -> None:
    """Every number in range, NaN and inf refused (NaN passes every `x < 0` check)."""
    for key, low in (("epochs", 1), ("teacher_epochs", 0), ("batch_size", 1), ("teacher_cache", 0),
                     ("num_workers", 0), ("threads", 0), ("parallel", 1), ("auto_every", 0)):
        v = getattr(c, key)
        if v is not None and v < low:
            raise ConfigError(f"{key}: must be ≥ {low}, got {v}")
    _check_fraction("holdout", c.holdout, zero=True)          # 0: score on the test split
    _check_fraction("select_holdout", c.select_holdout, zero=False)
    if c.image_size is not None and c.image_size < 1:
        raise ConfigError(f"image_size: must be ≥ 1, got {c.image_size}")
    for key in ("lr", "teacher_lr", "lr_min", "max_pairwise_mb", "max_cache_mb", "momentum", "weight_decay",
                "lr_gamma", "kd_temperature"):
        v = getattr(c, key)
        if v is None:
            continue
        if not math.isfinite(v) or v < 0:
            raise ConfigError(f"{key}: must be a finite number ≥ 0, got {v}")
    if c.kd_temperature <= 0:
        raise ConfigError(f"kd_temperature: must be > 0, got {c.kd_temperature}")
    if c.lr is not None and c.lr <= 0:
        raise ConfigError(f"lr: must be > 0, got {c.lr}")
    _check_choices(c)


def _check_choices(c) -> None:
    """The fields that name one of a few choices (and the milestones a multistep schedule needs)."""
    if c.lr_schedule not in ("cosine", "multistep"):
        raise ConfigError(f"lr_schedule: 'cosine' or 'multistep', got {c.lr_schedule!r}")
    if c.lr_schedule == "multistep":
        ms = c.lr_milestones
        if not (ms and all(isinstance(m, int) and not isinstance(m, bool) and 0 < m for m in ms)
                and ms == sorted(set(ms))):
            raise ConfigError(f"lr_milestones: expected increasing epochs ≥ 1 for lr_schedule multistep, got {ms!r}")
    if c.match not in ("global", "local"):
        raise ConfigError(f"match: 'global' or 'local', got {c.match!r}")
    if c.amp not in ("none", "bf16", "fp16"):
        raise ConfigError(f"amp: 'none', 'bf16' or 'fp16', got {c.amp!r}")
    if c.optimizer not in ("sgd", "adamw"):
        raise ConfigError(f"optimizer: 'sgd' or 'adamw', got {c.optimizer!r}")
    if c.unit not in UNITS:
        raise ConfigError(f"unit: one of {', '.join(UNITS)}, got {c.unit!r}")


def _check_terms(c) -> None:
    """The names in metrics/baselines/weights/term_options, and every λ as written."""
    _check_term_names(c)
    _check_weights(c)
    _check_term_options(c)


def _check_term_names(c) -> None:
    """Every name in metrics a distance, every name in baselines ce or a baseline term."""
    kd2m_terms, baseline_terms = losses.available("kd2m"), losses.available("baseline")
    for m in c.metrics:
        if m not in kd2m_terms:
            hint = " (a baseline: put it in baselines)" if m in baseline_terms else ""
            raise ConfigError(f"metrics: unknown distance {m!r}{hint}; available: {', '.join(kd2m_terms)}")
    for b in c.baselines:
        if b != CE and b not in baseline_terms:
            hint = " (a KD²M distance: put it in metrics)" if b in kd2m_terms else ""
            order = [n for n in BASELINE_ORDER if n in baseline_terms] + \
                [n for n in baseline_terms if n not in BASELINE_ORDER]
            raise ConfigError(f"baselines: unknown {b!r}{hint}; valid: ce, {', '.join(order)}")


def _check_weights(c) -> None:
    """``weight`` read (a number, or auto/auto*K written without spaces) and every λ of ``weights``."""
    try:
        if parse_weight(c.weight)[1]:
            c.weight = str(c.weight).strip().lower().replace(" ", "")
        else:
            c.weight = parse_weight(c.weight)[0]
    except ValueError:
        raise ConfigError(f"weight: must be a finite number ≥ 0, 'auto' or 'auto*K', got {c.weight!r:.40}") from None
    for m, w in c.weights.items():
        if m not in losses.available():
            raise ConfigError(f"weights: {m!r} is not a loss term; valid: {', '.join(losses.available())}")
        try:
            parse_weight(w)
        except ValueError:
            raise ConfigError(f"weights: λ for {m!r} must be a finite number ≥ 0, 'auto' or 'auto*K', "
                              f"got {w!r:.40}") from None


def _check_term_options(c) -> None:
    """Every key of ``term_options`` a loss term, its options a mapping. Options for a registered
    term no student runs are kept, not refused: a config file's settings stay valid when the
    command line narrows --baselines/--metrics (typos of a term's name are refused here, typos of
    an option name when it is built)."""
    for m, opts in c.term_options.items():
        if m not in losses.available():
            raise ConfigError(f"term_options: {m!r} is not a loss term; valid: {', '.join(losses.available())}")
        if not isinstance(opts, dict):
            raise ConfigError(f"term_options: options of {m!r} must be a mapping, got {opts!r:.60}")


def _scale_warmups(c) -> None:
    """Warm-ups against the run's length. A term's registered warm-up is its authors' for their
    schedule (DKD: 20 of mdistiller's 240 epochs, :meth:`kd2m.losses.TermSpec.warmup_for`): where
    none is given, the term gets the same share of this run's epochs, written into
    ``term_options`` so that config.json holds what runs. A warm-up given (``term_options`` or a
    student's term entry) that reaches the run's epochs is refused: λ would reach its value only
    in the last epoch, or never (a warm-up of 1 ramps nothing and is kept)."""
    used = set(c.metrics) | set(c.baselines) | {entry_name(e) for es in c.students.values() for e in es}
    used = sorted(n for n in used if isinstance(n, str) and n in losses.available())
    given = [(f"term_options: {n}", n, c.term_options[n]["warmup"]) for n in used
             if "warmup" in c.term_options.get(n, {})]
    given += [(f"students: {s}[{i}]", e.get("term"), e["warmup"]) for s, es in c.students.items()
              for i, e in enumerate(es) if isinstance(e, dict) and "warmup" in e]
    for where, name, w in given:
        if isinstance(w, int) and not isinstance(w, bool) and 1 < w and w >= c.epochs:
            spec = losses.spec(name) if name in losses.available() else None
            scaled = (f" (the authors' {spec.warmup} of {spec.warmup_of} epochs, scaled to this run: "
                      f"{spec.warmup_for(c.epochs)})") if spec is not None and spec.warmup_of else ""
            reach = "its value only in the last epoch" if w == c.epochs else \
                f"only {c.epochs / w:.2g} of its value, in the last epoch"
            raise ConfigError(f"{where}: warmup {w} reaches the run's {c.epochs} epochs: λ of {name!r} would get to "
                              f"{reach}; give a warmup below {c.epochs}, or leave it out{scaled}")
    for n in used:
        spec, opts = losses.spec(n), c.term_options.get(n, {})
        if spec.warmup_of and "warmup" not in opts:
            c.term_options = {**c.term_options, n: {**opts, "warmup": spec.warmup_for(c.epochs)}}


def _check_ce_weights(c) -> None:
    if not isinstance(c.ce_weights, dict):
        raise ConfigError(f"ce_weights: expected a mapping of student names to CE weights, got {c.ce_weights!r:.60}")
    for k, w in c.ce_weights.items():
        if k in (CE, TEACHER):
            raise ConfigError(f"ce_weights: {k!r} trains on CE alone (its weight would only rescale the learning "
                              "rate); give weights of distilled students")
        if k not in losses.available() and k not in c.students:
            raise ConfigError(f"ce_weights: {k!r} names no student (a loss term's name, or a name under "
                              f"students:); valid: {', '.join(losses.available() + sorted(c.students))}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ConfigError(f"ce_weights: the CE weight of {k!r} must be a finite number > 0, got {w!r:.40}")


def _check_methods(c, cache_by_default: bool) -> None:
    """The students as built: distinct names, something to train, a teacher cache they can read
    (dropped where it was only the dataset's default), TensorBoard installed when asked for, a
    teacher to learn from."""
    try:
        methods = c.methods()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    keys = [m.key for m in methods]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ConfigError(f"students: {', '.join(dup)} named twice (metrics, baselines and students share names)")
    if not methods:
        raise ConfigError("nothing to train: metrics, baselines and students are all empty")
    if c.teacher_cache:
        problems = [p for p in map(cache_problem, methods) if p]
        if problems and cache_by_default:
            c.teacher_cache = 0  # the dataset's default, not asked for: every student runs online alike
        elif problems:
            raise ConfigError(f"teacher_cache: {problems[0]}")
    if c.tensorboard:  # refused now, not after the teacher has trained
        require_tensorboard()
    if c.teacher_epochs == 0 and not c.pretrained_teacher and any(m.uses_teacher for m in methods):
        raise ConfigError("teacher_epochs: 0 trains no teacher, and no --pretrained-teacher was given: the "
                          "students would learn from a random network; give --pretrained-teacher FILE or "
                          "--teacher-epochs N")


def _check_topk(c) -> None:
    """``teacher_topk``: an integer ≥ 1, with the teacher cache it belongs to, and students whose
    terms read the teacher's logits only through the token divergences (at one temperature)."""
    k = c.teacher_topk
    if k is None:
        return
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"teacher_topk: must be an integer ≥ 1 (the teacher's tokens kept per position), got {k!r}")
    if not c.teacher_cache:
        raise ConfigError("teacher_topk: the top-K teacher is what the teacher cache keeps, and teacher_cache is 0 "
                          "(the online teacher); give --teacher-cache 1, or leave teacher_topk out")
    from ..losses.fused_head import DIVERGENCES
    from ..training.teacher import sparse_temperature
    for method in c.methods():
        dense = [t.name for t in method.terms if t.reads_logits and t.name not in DIVERGENCES]
        if dense:
            raise ConfigError(f"teacher_topk: {method.key}: {', '.join(dense)} read(s) the teacher's full logits, "
                              f"which a top-{k} cache does not keep (only {', '.join(DIVERGENCES)} read it); "
                              "drop the term, or leave teacher_topk out (every logit)")
        sparse_temperature(method)


def _check_lm(c) -> None:
    """Language models read text, and text's distances need a next token per sample: ``hf:``
    models only on text datasets; no distance pooled per sequence (unit batch) on text."""
    lm = dataset_task(c.dataset) == "lm"
    for role in ("teacher", "student"):
        if str(getattr(c, role)).startswith("hf:") and not lm:
            raise ConfigError(f"{role}: {getattr(c, role)} is a language model, for text datasets (python_docs, "
                              f"text:PATH); {c.dataset!r} is for {dataset_task(c.dataset)}: choose another {role}")
    if not lm:
        return
    valid = "tokens (every token of the batch a sample: the text default) or sequence (each sequence's tokens)"
    for method in c.methods():
        for t in method.terms:
            if t.spec.family == "kd2m" and t.unit == "batch":
                where = "unit: batch" if method.key in (c.metrics or []) else \
                    f"students: {method.key}: {t.name} has unit batch (an entry's default when it gives none)"
                raise ConfigError(f"{where}: a sequence pooled into one sample has no next-token label to match on "
                                  f"text; give unit {valid}")
