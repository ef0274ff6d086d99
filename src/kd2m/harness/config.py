"""One experiment's settings: a dataclass, filled from defaults < YAML file < command line.

Every field is a YAML key and (except the mappings) a command-line option of ``kd2m run`` /
``kd2m bench`` with the same name (``lr_min`` ↔ ``--lr-min``); its help text lives on the field.
Unknown keys and wrongly typed values are refused with a message naming the key, and
:meth:`RunConfig.resolved` checks every value before anything is trained, so a typo in a config
never silently runs the default.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .. import losses
from ..catalog import BASELINE_ORDER, CE, PAPER_METRICS, TEACHER
from ..data import available_datasets, dataset_task, is_dataset
from ..errors import ConfigError
from ..models import available_models
from ..models.user import is_user_factory, load_factory
from ..training.methods import UNITS, cache_problem, parse_weight
from .config_values import float_list, int_list, quote, seed_list, str_list
from .config_yaml import read_yaml_mapping
from .monitor import require_tensorboard
from .recipes import SELECT_SEEDS, fill_defaults
from .students import build_methods, build_term, entry_name, named_students


def _opt(default, help: str, **kw):
    """A config field with its command-line help (``cli=False``: YAML only, e.g. mappings)."""
    factory = kw.pop("factory", None)
    meta = {"help": help, **kw}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    dataset: str | None = _opt(None, "digits (embedded, default), mnist1d (generated locally), cifar10, cifar100, "
                                  "svhn, imagefolder, python_docs (Python's documentation as text), text:PATH "
                                  "(your .txt/.jsonl files)")
    task: str | None = _opt(None, "classification or lm (default: the dataset's); --task lm alone runs the "
                                  "offline text benchmark (python_docs)")
    tokenizer: str | None = _opt(None, "text: a local model directory or GGUF file whose tokenizer to use "
                                       "(default: a GGUF --pretrained-teacher's own, else bytes, a 257-token "
                                       "vocabulary)")
    data_root: str | None = _opt(None, "where datasets live (imagefolder: a dir with train/ and test/)")
    download: bool = _opt(False, "download the dataset if missing", flag=True)
    holdout: float = _opt(0.0, "evaluate on this fraction of the training split instead of the test split (a "
                               "fixed random part, the same for every run; the rest trains, the teacher "
                               "included): for choosing λ without touching the test set (--select-k)")
    image_size: int | None = _opt(None, "imagefolder: resize every image to this size (unset: the most common "
                                        "size); text: the block length in tokens")
    teacher: str | None = _opt(None, "teacher model (`kd2m metrics --models`; timm:NAME, torchvision:NAME, "
                                      "hf:MODEL_TYPE, or package.module:factory: your own code, called with "
                                      "num_classes=, in_channels=, image_size= and teacher_options)")
    student: str | None = _opt(None, "student model (as --teacher; options from student_options)")
    teacher_options: dict | None = _opt(None, "keyword options of the teacher's constructor, e.g. {patch_size: 2} "
                                              "for a timm ViT on 8×8 images", cli=False)
    student_options: dict | None = _opt(None, "keyword options of the student's constructor", cli=False)
    metrics: list = _opt(None, "comma list of KD²M distances, one student each (e.g. w2,cw2,gauss_kl)",
                         factory=lambda: list(PAPER_METRICS))
    baselines: list | None = _opt(None, "comma list: ce (the CE-only student) and/or baseline terms, one student "
                                        "each (e.g. ce,kd,dkd,dist,pkt,rkd,crd)")
    students: dict | None = _opt(None, "named students with several terms: {name: [{term, weight, options, "
                                       "student_layer, teacher_layer, unit, warmup, schedule}, ...]}", cli=False)
    distill: list | None = _opt(None, "one student with these terms (layer pairs), named after them", cli=False)
    weight: str | float | None = _opt(None, "λ for every KD²M distance (in a config file, those without an entry in "
                                            "`weights`; on the command line, it replaces those entries): a number, or "
                                            "auto (calibrated against CE at initialisation, K of auto*K chosen on a "
                                            "holdout in a grid: select_k) or auto*K (K times the calibration)")
    weights: dict | None = _opt(None, "λ per term name (distances and baselines)", cli=False)
    ce_weights: dict | None = _opt(None, "weight of CE per student name (default: the authors' CE weight of a "
                                         "single-term student's term — 0.1 for kd, as mdistiller — else 1)", cli=False)
    term_options: dict | None = _opt(None, "options per term name, e.g. {sinkhorn: {eps: 0.1}, dkd: {beta: 4, "
                                           "warmup: 2}} (warmup/schedule set the term's λ schedule)", cli=False)
    auto_every: int = _opt(0, "weight auto: recalibrate every `auto` term's λ at the start of every N-th epoch, on the "
                              "student as it is then (0 = once, at initialisation: the default; every epoch was measured to run "
                              "away on the digits: README)")
    select_k: list | str | bool | None = _opt(
        None, "the K of auto*K a grid chooses among for the terms at weight auto, without the test split: a pilot "
              "grid at each K (default 0,0.3,1,3,10; 0 = the term off) on select_seeds, trained on the training "
              "split minus a holdout (select_holdout) and scored on it; each term then runs at its best K. Given, "
              "it chooses for every distance and every baseline at auto. none: choose nothing (auto is auto*1, one "
              "calibration). README: λ chosen on a holdout")
    select_seeds: typing.Any = _opt(None, "seeds of the select_k pilot grid, never the reported ones, read as "
                                          "--seeds: a count (3: seeds 0,1,2) or a comma list (one seed: 100,)")
    select_holdout: float = _opt(0.2, "the share of the training split the select_k pilot grid is scored on")
    kd_temperature: float = _opt(4.0, "temperature of the kd baseline")
    epochs: int | None = _opt(None, "student epochs")
    teacher_epochs: int | None = _opt(None, "teacher epochs (0 = use --pretrained-teacher as is; unset: --epochs)")
    seeds: typing.Any = _opt(None, "number of seeds (e.g. 3: seeds 0,1,2) or a comma list (e.g. 5,7; one seed: 5,)")
    batch_size: int | None = _opt(None, "batch size per process")
    lr: float | None = _opt(None, "initial learning rate")
    teacher_lr: float | None = _opt(None, "learning rate of the teacher's training (unset: --lr)")
    lr_min: float = _opt(1e-4, "final learning rate of the cosine schedule")
    lr_schedule: str = _opt("cosine", "cosine (lr → lr-min) or multistep (×lr-gamma at lr-milestones)")
    lr_milestones: list = _opt(None, "multistep: comma list of epochs where lr is multiplied by --lr-gamma",
                               factory=list)
    lr_gamma: float = _opt(0.1, "multistep factor")
    optimizer: str | None = _opt(None, "sgd (with momentum and weight decay) or adamw")
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(5e-4, "SGD weight decay")
    device: str = _opt("auto", "auto, cpu, cuda, cuda:1")
    out: str | None = _opt(None, "output directory (default runs/<dataset>)")
    num_workers: int | None = _opt(None, "data loader workers")
    threads: int | None = _opt(None, "CPU threads for torch (0 = torch's default)")
    unit: str | None = _opt(None, "what one sample of the metrics' distributions is: batch (an image), "
                                  "spatial (each map's positions), sequence (each sequence's tokens), tokens (every "
                                  "token of the batch)")
    student_layer: str = _opt("penultimate", "student layer the distances match (module path)")
    teacher_layer: str = _opt("penultimate", "teacher layer the distances match (module path)")
    match: str = _opt("global", "global (gather features over ranks) or local")
    amp: str = _opt("none", "none, bf16 or fp16 autocast for the networks (distances stay fp32/fp64)")
    channels_last: bool = _opt(False, "channels_last memory format", flag=True)
    compile: bool = _opt(False, "torch.compile the student", flag=True)
    teacher_cache: int | None = _opt(None, "K > 0: compute the teacher's outputs once for K fixed views of each training "
                                 "image and look them up each step (offline distillation; 1 is exact without "
                                 "augmentation)")
    teacher_topk: int | None = _opt(None, "K ≥ 1: the teacher cache keeps each token's top-K ids and log-probabilities "
                                          "and the log-mass of the rest (12·K + 4 bytes per token instead of 4·V; "
                                          "read by fkl, rkl, jsd, skew_kl, skew_rkl, tvd; terms on the full logits "
                                          "are refused); default: every logit")
    max_cache_mb: float = _opt(8192.0, "refuse a --teacher-cache table larger than this (MiB)")
    pretrained_teacher: str | None = _opt(None, "local weights file for the teacher (loaded with weights_only=True); "
                                               "lm: a save_pretrained folder or a .gguf file")
    pretrained_student: str | None = _opt(None, "local weights file for the student initialisation")
    max_pairwise_mb: float = _opt(2048.0, "refuse O(n²) distances whose buffers would exceed this (MiB)")
    progress: bool = _opt(True, "progress bars (--no-progress: none)", flag=True)
    parallel: int | None = _opt(None, "seeds trained at once, each in its own process with one thread (1 under "
                                      "torchrun, whatever is given); results are the same as "
                                      "sequential runs at the same thread count: each worker uses --threads "
                                      "(0: 1 thread), and a CPU run's thread count is part of its stored settings")
    # kd2m.harness.monitor (neither changes what a run trains, so neither is part of a run's settings)
    tensorboard: bool = _opt(False, "TensorBoard event files for every run in <run_dir>/tb/ (tensorboard --logdir "
                                    "OUT); needs pip install -e \".[tensorboard]\"", flag=True)
    diagnostics: bool = _opt(True, "each epoch, a student's exact W2 to its teacher, the share of the OT plan "
                                   "within a class and Theorem 1's terms on a fixed test batch (log.jsonl `diag`; "
                                   "--no-diagnostics: off)", flag=True)

    # ------------------------------------------------------------------
    def resolved(self) -> RunConfig:
        """A copy with dataset-dependent defaults filled in and every value checked."""
        c = dataclasses.replace(self)
        if c.dataset is None:  # --task lm alone: the offline text benchmark
            c.dataset = "python_docs" if c.task == "lm" else "digits"
        if not is_dataset(c.dataset):  # checked before anything is written or loaded
            raise ConfigError(f"dataset: unknown {c.dataset!r}; available: {', '.join(available_datasets())}")
        if c.task is not None and c.task != dataset_task(c.dataset):
            raise ConfigError(f"task: {c.task!r}, but dataset {c.dataset!r} is for {dataset_task(c.dataset)}; text "
                              "datasets (python_docs, text:PATH) are for lm, the others for classification")
        cache_by_default = c.teacher_cache is None
        fill_defaults(c)
        _check_models(c)
        _check_lists_and_numbers(c)
        _check_terms(c)
        c.students = named_students(c)
        _scale_warmups(c)
        _check_ce_weights(c)
        _check_methods(c, cache_by_default)
        _check_topk(c)
        _check_lm(c)
        return c

    def teacher_config(self) -> RunConfig:
        """The settings the teacher trains with: these, with ``teacher_lr`` where given."""
        return dataclasses.replace(self, lr=self.teacher_lr) if self.teacher_lr else self

    def weight_for(self, name: str):
        """λ for term ``name`` as written (a number, or "auto"/"auto*K"): its entry in ``weights``,
        else ``weight`` (distances) or the term's registered default (baselines)."""
        if name in (self.weights or {}):
            return self.weights[name]
        spec = losses.spec(name)
        if spec.family == "kd2m":
            return self.weight if self.weight is not None else 1.0
        return float(getattr(spec, "weight", 1.0))

    def options_for(self, name: str) -> dict:
        opts = dict((self.term_options or {}).get(name, {}))
        if name == "kd":
            opts.setdefault("temperature", self.kd_temperature)
        return opts

    def term(self, name: str):
        """The single-term entry of a ``metrics`` or ``baselines`` name with this config's λ, options, layers."""
        return build_term(self, name)

    def methods(self) -> list:
        """The students of this configuration, in table order: baselines, metrics, named students
        (:mod:`kd2m.harness.students`)."""
        return build_methods(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------- RunConfig.resolved's phases
def _check_models(c: RunConfig) -> None:
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


def _check_lm(c: RunConfig) -> None:
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


def _check_lists_and_numbers(c: RunConfig) -> None:
    if not str(c.out).strip():
        raise ConfigError("out: an empty output directory; give a directory, e.g. --out runs/mine")
    c.seeds = seed_list(c.seeds)
    def off(v) -> bool:  # `select_k: none`, `off` (YAML reads it as False), `--select-k none` (a list of one)
        return v is False or (isinstance(v, str) and v.strip().lower() in ("none", "off"))
    if off(c.select_k) or (isinstance(c.select_k, list) and len(c.select_k) == 1 and off(c.select_k[0])):
        c.select_k = []  # nothing chosen: auto is auto*1
    elif c.select_k is True:
        raise ConfigError("select_k: a comma list of K (e.g. 0,0.3,1,3,10), or none; got true")
    elif c.select_k is not None:
        c.select_k = float_list("select_k", c.select_k)
    c.select_seeds = list(SELECT_SEEDS) if c.select_seeds is None else seed_list(c.select_seeds, "select_seeds")
    c.metrics = str_list("metrics", c.metrics)
    c.baselines = str_list("baselines", c.baselines)
    if all(isinstance(m, str) for m in c.lr_milestones):  # "150,180,210" from the command line
        c.lr_milestones = int_list("lr_milestones", ",".join(c.lr_milestones))
    _check_numbers(c)


def _check_terms(c: RunConfig) -> None:
    """The names in metrics/baselines/weights/term_options, and every λ as written."""
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
    # Options for a registered term no student runs are kept, not refused: a config file's
    # settings stay valid when the command line narrows --baselines/--metrics (typos of a
    # term's name are refused here, typos of an option name when it is built).
    for m, opts in c.term_options.items():
        if m not in losses.available():
            raise ConfigError(f"term_options: {m!r} is not a loss term; valid: {', '.join(losses.available())}")
        if not isinstance(opts, dict):
            raise ConfigError(f"term_options: options of {m!r} must be a mapping, got {opts!r:.60}")


def _scale_warmups(c: RunConfig) -> None:
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


def _check_ce_weights(c: RunConfig) -> None:
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


def _check_methods(c: RunConfig, cache_by_default: bool) -> None:
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


def _check_topk(c: RunConfig) -> None:
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


def _check_fraction(key: str, v, zero: bool) -> None:
    """A share of the training split: a number in [0, 1) (``zero``) or (0, 1)."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (0 <= v if zero else 0 < v) and v < 1
    if not ok:
        raise ConfigError(f"{key}: a fraction of the training split in {'[' if zero else '('}0, 1) (e.g. 0.2), "
                          f"got {v!r}")


def _check_numbers(c: RunConfig) -> None:
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


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
#: older key names still read from YAML files
ALIASES = {"metric_options": "term_options"}


def _expected_types(name: str) -> tuple:
    hint = typing.get_type_hints(RunConfig)[name]
    args = typing.get_args(hint) or (hint,)
    out = []
    for a in args:
        origin = typing.get_origin(a) or a
        if a is typing.Any:
            return (object,)
        out.append(origin)
    if float in out:
        out.append(int)  # 1 is a fine float
    return tuple(out)


def _check_value(name: str, value):
    types = _expected_types(name)
    if name == "select_k" and isinstance(value, str) and not value.replace(",", "").strip():
        # an empty comma list would read as [], which is `none`: nothing chosen, silently
        raise ConfigError(f"select_k: no K in {quote(value)}; give a comma list of K (e.g. 0,0.3,1,3,10), or none "
                          "to choose nothing")
    if list in types and isinstance(value, str):  # "w2,cw2" from the command line
        value = str_list(name, value)
    if value is None and type(None) in types:
        return value
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(f"{name}: expected {_type_names(types)}, got a boolean {quote(value)}")
    if not isinstance(value, types):
        raise ConfigError(f"{name}: expected {_type_names(types)}, got {type(value).__name__} {quote(value)}")
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{name}: got NaN; give a number")
    if name == "seeds" and isinstance(value, list) and any(isinstance(s, bool) or not isinstance(s, int)
                                                           for s in value):
        # bool is an int in Python: [true] would silently run seed 1
        raise ConfigError(f"seeds: a list must hold integers, got {quote(value)}")
    return value


def _type_names(types) -> str:
    return " or ".join(sorted({"null" if t is type(None) else t.__name__ for t in types}))


def from_mapping(values: dict, base: RunConfig | None = None, source: str = "config") -> RunConfig:
    """Apply ``values`` (keys with '-' or '_') over ``base``; refuse unknown keys and bad types."""
    cfg = dataclasses.replace(base) if base is not None else RunConfig()
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        key = ALIASES.get(key, key)
        if key not in FIELDS:
            raise ConfigError(f"{source}: unknown key {quote(raw_key)}; valid keys: {', '.join(FIELDS)}")
        setattr(cfg, key, _check_value(key, value))
    return cfg


def load_yaml(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    """``base`` updated from the YAML mapping in ``path`` (see :func:`from_mapping`).

    Refuses, with a ConfigError naming ``path``: what :func:`kd2m.harness.config_yaml.read_yaml_mapping`
    refuses (a missing file, one over its size limit, invalid YAML, aliases that expand beyond its
    node limit (an alias bomb), a document that is not a mapping), unknown keys and wrongly typed values.
    """
    return from_mapping(read_yaml_mapping(path), base, source=str(path))


def given_keys(values: dict) -> set[str]:
    """The RunConfig fields a mapping (a YAML file's, the command line's) sets, by their field names."""
    return {ALIASES.get(str(k).replace("-", "_"), str(k).replace("-", "_")) for k in values}
