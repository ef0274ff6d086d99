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
from ..catalog import PAPER_METRICS
from ..errors import ConfigError
from ..features import PENULTIMATE
from .config_checks import resolve
from .config_values import quote, str_list
from .config_yaml import read_yaml_mapping
from .students import build_methods, build_term

__all__ = ["RunConfig", "FIELDS", "ALIASES", "from_mapping", "load_yaml", "given_keys"]


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
    kd_temperature: float = _opt(dict(losses.spec("kd").defaults)["temperature"],
                                 "temperature of the kd baseline (its own option's default: mdistiller's 4)")
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
    student_layer: str = _opt(PENULTIMATE, "student layer the distances match (module path)")
    teacher_layer: str = _opt(PENULTIMATE, "teacher layer the distances match (module path)")
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
        """A copy with dataset-dependent defaults filled in and every value checked
        (:func:`kd2m.harness.config_checks.resolve`)."""
        c = dataclasses.replace(self)
        resolve(c)
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
