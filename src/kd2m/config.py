"""One experiment's settings: a dataclass, filled from defaults < YAML file < command line.

Unknown keys and wrongly typed values are refused with a message naming the key, so a typo
in a config never silently runs the default.
"""
from __future__ import annotations

import dataclasses
import math
import reprlib
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
        raise ConfigError(f"{key}: expected a list of names or a comma list, got {_quote(value)}")
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
        raise ConfigError(f"{name}: expected {_type_names(types)}, got a boolean {_quote(value)}")
    if not isinstance(value, types):
        raise ConfigError(f"{name}: expected {_type_names(types)}, got {type(value).__name__} {_quote(value)}")
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{name}: got NaN; give a number")
    if name == "seeds" and isinstance(value, list) and any(isinstance(s, bool) or not isinstance(s, int)
                                                           for s in value):
        # bool is an int in Python: [true] would silently run seed 1
        raise ConfigError(f"seeds: a list must hold integers, got {_quote(value)}")
    return value


#: How much of a value an error message quotes: a few items, a few levels, short strings.
_QUOTE = reprlib.Repr()  # (keyword arguments need Python 3.12)
_QUOTE.maxlevel, _QUOTE.maxstring, _QUOTE.maxother = 3, 60, 60
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxdict = _QUOTE.maxset = 6
MAX_QUOTE_CHARS = 100


def _quote(value) -> str:
    """``repr(value)`` for an error message, bounded in time and length (never the whole of a huge
    value: a YAML alias bomb's repr runs to gigabytes)."""
    text = _QUOTE.repr(value)
    return text if len(text) <= MAX_QUOTE_CHARS else text[:MAX_QUOTE_CHARS - 1] + "…"


def _type_names(types) -> str:
    return " or ".join(sorted({"null" if t is type(None) else t.__name__ for t in types}))


def from_mapping(values: dict, base: RunConfig | None = None, source: str = "config") -> RunConfig:
    """Apply ``values`` (keys with '-' or '_') over ``base``; refuse unknown keys and bad types."""
    cfg = dataclasses.replace(base) if base is not None else RunConfig()
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key not in FIELDS:
            raise ConfigError(f"{source}: unknown key {_quote(raw_key)}; valid keys: {', '.join(FIELDS)}")
        setattr(cfg, key, _check_value(key, value))
    return cfg


#: A kd2m config is a few hundred bytes and nodes; these bounds are far above any real one.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 10_000


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a document whose aliases expand it beyond
    :data:`MAX_YAML_NODES` nodes, or that refers to itself, before constructing anything.

    An alias (``*a``) is a reference to an anchored node, so a 444-byte file of nested aliases
    (``a: &a [x, x, ...]``, ``b: &b [*a, *a, ...]``, …) composes to a small graph that expands
    to billions of nodes: cheap to load, but any walk over it (a deep copy, an error message's
    ``repr``) runs out of memory. The size is counted on the composed graph, each shared node
    once (memoised): O(graph size), not O(expansion).
    """

    def construct_document(self, node):
        _check_expansion(node, MAX_YAML_NODES)
        return super().construct_document(node)


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root, limit: int) -> int:
    """Number of nodes of ``root`` with every alias expanded; a ConfigError beyond ``limit`` or on
    a cycle. Iterative depth-first walk (no recursion limit), each distinct node sized once."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in _children(node))
            if sizes[key] > limit:
                raise ConfigError(f"the YAML's aliases (*name) expand it to more than {limit} values "
                                  f"(at line {node.start_mark.line + 1}); a kd2m config needs far fewer: "
                                  "write the values out")
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise ConfigError(f"a YAML alias at line {node.start_mark.line + 1} refers to a value that contains "
                              "it (a recursive structure); write the values out")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)
    return sizes[id(root)]


def load_yaml(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    """``base`` updated from the YAML mapping in ``path`` (see :func:`from_mapping`).

    Refuses, with a ConfigError naming ``path``: a missing file, one over :data:`MAX_YAML_BYTES`,
    invalid YAML, aliases that expand beyond :data:`MAX_YAML_NODES` values (an alias bomb), a
    document that is not a mapping, unknown keys and wrongly typed values.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: {size} bytes is not a kd2m config (the limit is {MAX_YAML_BYTES} bytes)")
    try:
        data = yaml.load(path.read_bytes(), Loader=_BoundedLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0][:200]})") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{path}: nested too deeply to be a kd2m config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return from_mapping(data, base, source=str(path))
