"""One experiment's settings: a dataclass, filled from defaults < YAML file < command line.

Unknown keys and wrongly typed values are refused with a message naming the key, so a typo
in a config never silently runs the default.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

#: The paper's grid (its Table) plus MMD, in table order.
PAPER_METRICS = ["w2", "cw2", "jw2", "gauss_w2", "gauss_cw2", "gauss_kl", "mmd_rbf"]

#: Per-dataset defaults, used where the user left a field unset (None).
DATASET_DEFAULTS = {
    # Tiny models: one CPU thread is as fast as two when idle and 10-100x faster when the cores
    # are shared (OpenMP barriers spin against the other load).
    # The student trains 10 epochs against a 30-epoch teacher: a budget-limited student, the
    # regime where a teacher has something to add. λ per metric (distances differ by orders of
    # magnitude in scale) was picked by `kd2m bench --sweep weight=...` on seeds 100-102, which
    # are never reported; gauss_kl gets ridge 0.1 because the teacher has dead ReLU channels
    # that make KL(N_S‖N_T) ~1e5 with the library's 1e-5 ridge. See README "Digits defaults".
    "digits": dict(teacher="digits_cnn", student="digits_mlp", epochs=10, teacher_epochs=30, lr=0.05,
                   weight=0.01, num_workers=0, threads=1,
                   weights={"w2": 0.01, "cw2": 0.1, "jw2": 0.001, "gauss_w2": 0.01, "gauss_cw2": 0.1,
                            "gauss_kl": 0.03, "gauss_ckl": 0.03, "mmd_rbf": 10.0, "cmmd_rbf": 10.0},
                   metric_options={"gauss_kl": {"ridge": 0.1}, "gauss_ckl": {"ridge": 0.1}}),
}
IMAGE_DEFAULTS = dict(teacher="cifar_resnet34", student="cifar_resnet18", epochs=15, lr=1e-2, weight=1e-4,
                      num_workers=2, threads=0)


class ConfigError(ValueError):
    """A config file or option is wrong; the message names the key."""


@dataclass
class RunConfig:
    dataset: str = "digits"
    data_root: str | None = None
    download: bool = False
    teacher: str | None = None
    student: str | None = None
    metrics: list = field(default_factory=lambda: list(PAPER_METRICS))
    baselines: list = field(default_factory=lambda: ["ce", "kd"])
    weight: float | None = None
    weights: dict | None = None
    metric_options: dict | None = None
    kd_temperature: float = 4.0
    kd_weight: float = 1.0
    epochs: int | None = None
    teacher_epochs: int | None = None
    seeds: typing.Any = 3
    batch_size: int = 128
    lr: float | None = None
    lr_min: float = 1e-4
    lr_schedule: str = "cosine"      # "cosine" (lr -> lr_min over the epochs) or "multistep"
    lr_milestones: list = field(default_factory=list)  # multistep: epochs where lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    device: str = "auto"
    out: str | None = None
    num_workers: int | None = None
    threads: int | None = None
    student_layer: str = "penultimate"
    teacher_layer: str = "penultimate"
    match: str = "global"
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    teacher_cache: int = 0
    max_cache_mb: float = 8192.0
    pretrained_teacher: str | None = None
    pretrained_student: str | None = None
    max_pairwise_mb: float = 2048.0
    progress: bool = True

    # ------------------------------------------------------------------
    def resolved(self) -> "RunConfig":
        """A copy with dataset-dependent defaults filled in and every value checked."""
        c = dataclasses.replace(self)
        from .data import available_datasets
        if c.dataset not in available_datasets():  # checked before anything is written or loaded
            raise ConfigError(f"dataset: unknown {c.dataset!r}; available: {', '.join(available_datasets())}")
        defaults = dict(DATASET_DEFAULTS.get(c.dataset, IMAGE_DEFAULTS))
        # Per-metric λ defaults apply only while the user set no λ at all: an explicit --weight
        # means "this λ for every metric".
        default_weights = defaults.pop("weights", {})
        if c.weights is None:
            c.weights = dict(default_weights) if c.weight is None else {}
        default_options = defaults.pop("metric_options", {})
        if c.metric_options is None:
            c.metric_options = {m: dict(o) for m, o in default_options.items() if m in c.metrics}
        for key, value in defaults.items():
            if getattr(c, key) is None:
                setattr(c, key, value)
        from .models import available_models
        for key in ("teacher", "student"):
            if getattr(c, key) not in available_models():
                raise ConfigError(f"{key}: unknown model {getattr(c, key)!r}; "
                                  f"available: {', '.join(available_models())}")
        if c.teacher_epochs is None:
            c.teacher_epochs = c.epochs
        if c.out is None:
            c.out = str(Path("runs") / c.dataset)
        if isinstance(c.seeds, int):
            if c.seeds < 1:
                raise ConfigError(f"seeds: a count must be at least 1, got {c.seeds} "
                                  "(to run seed 0 alone give a list: --seeds 0, or seeds: [0])")
            c.seeds = list(range(c.seeds))
        elif isinstance(c.seeds, str):
            c.seeds = _int_list("seeds", c.seeds)
        elif not (isinstance(c.seeds, list) and all(isinstance(s, int) for s in c.seeds) and c.seeds):
            raise ConfigError(f"seeds: expected a count or a list of integers, got {c.seeds!r}")
        c.metrics = _str_list("metrics", c.metrics)
        c.baselines = _str_list("baselines", c.baselines)
        bad = sorted(set(c.baselines) - {"ce", "kd"})
        if bad:
            raise ConfigError(f"baselines: unknown {', '.join(bad)}; valid: ce, kd")
        from . import metrics
        for m in c.metrics:
            try:
                metrics.get(m, **c.metric_options.get(m, {}))
            except ValueError as e:
                raise ConfigError(f"metrics: {e}") from None
        for m, w in c.weights.items():
            if not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0:
                raise ConfigError(f"weights: λ for {m!r} must be a number ≥ 0, got {w!r}")
        unknown_opts = sorted(set(c.metric_options) - set(c.metrics))
        if unknown_opts:
            raise ConfigError(f"metric_options: given for {', '.join(unknown_opts)}, which is not in metrics")
        for key, low in (("epochs", 1), ("teacher_epochs", 0), ("batch_size", 1), ("teacher_cache", 0)):
            if getattr(c, key) < low:
                raise ConfigError(f"{key}: must be ≥ {low}, got {getattr(c, key)}")
        for key in ("lr", "weight", "lr_min", "max_pairwise_mb", "max_cache_mb"):
            if getattr(c, key) < 0:
                raise ConfigError(f"{key}: must be ≥ 0, got {getattr(c, key)}")
        if c.lr_schedule not in ("cosine", "multistep"):
            raise ConfigError(f"lr_schedule: 'cosine' or 'multistep', got {c.lr_schedule!r}")
        if all(isinstance(m, str) for m in c.lr_milestones):  # "150,180,210" from the command line
            c.lr_milestones = _int_list("lr_milestones", ",".join(c.lr_milestones))
        if c.lr_schedule == "multistep":
            ms = c.lr_milestones
            if not (ms and all(isinstance(m, int) and not isinstance(m, bool) and 0 < m for m in ms)
                    and ms == sorted(set(ms))):
                raise ConfigError(f"lr_milestones: expected increasing epochs ≥ 1 for lr_schedule multistep, got {ms!r}")
        if c.match not in ("global", "local"):
            raise ConfigError(f"match: 'global' or 'local', got {c.match!r}")
        if c.amp not in ("none", "bf16", "fp16"):
            raise ConfigError(f"amp: 'none', 'bf16' or 'fp16', got {c.amp!r}")
        return c

    def weight_for(self, metric: str) -> float:
        """λ for ``metric``: its entry in ``weights``, else ``weight``."""
        return float((self.weights or {}).get(metric, self.weight))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def _str_list(key, value) -> list:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: expected a list of names or a comma list, got {value!r}")
    return value


def _int_list(key, value: str) -> list:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{key}: expected integers, got {value!r}") from None


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
    if list in types and isinstance(value, str):  # "w2,cw2" from the command line
        value = _str_list(name, value)
    if value is None and type(None) in types:
        return value
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(f"{name}: expected {_type_names(types)}, got a boolean {value!r}")
    if not isinstance(value, types):
        raise ConfigError(f"{name}: expected {_type_names(types)}, got {type(value).__name__} {value!r}")
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value


def _type_names(types) -> str:
    return " or ".join(sorted({"null" if t is type(None) else t.__name__ for t in types}))


def from_mapping(values: dict, base: RunConfig | None = None, source: str = "config") -> RunConfig:
    """Apply ``values`` (keys with '-' or '_') over ``base``; refuse unknown keys and bad types."""
    cfg = dataclasses.replace(base) if base is not None else RunConfig()
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key not in FIELDS:
            raise ConfigError(f"{source}: unknown key {raw_key!r}; valid keys: {', '.join(FIELDS)}")
        setattr(cfg, key, _check_value(key, value))
    return cfg


def load_yaml(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return from_mapping(data, base, source=str(path))
