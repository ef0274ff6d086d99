"""A student's terms bound to the layers they read, with the shapes they need, and the forward
hooks that read those layers on every step."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import losses
from ..errors import ConfigError
from ..features import PENULTIMATE, FeatureTap, last_linear_name, last_map_layer, to_matrix
from ..losses.sparse_teacher import SparseTeacher
from ..models import stages
from ..runtime import fork_rng
from .methods import Method, TermConfig

__all__ = ["BoundTerm", "bind_terms", "term_keys", "Taps", "wanted_layers", "default_layers"]


class BoundTerm:
    """One term of a run: its config, its module(s), the layer pairs it reads, and its log key.

    A term reads one ``(student_layer, teacher_layer)`` pair, or several (AT and NST over the
    authors' intermediate stages): then one module per pair (built with that pair's shapes), and
    the term's value is the sum over the pairs, as the authors sum ``feat[1:-1]``. ``module`` is
    what holds the parameters and state (the one module, or an ``nn.ModuleList`` of them)."""

    def __init__(self, config: TermConfig, modules: list, pairs: list[tuple[str, str]], key: str):
        self.config, self.key, self.pairs = config, key, list(pairs)
        self.modules = list(modules)
        self.module = self.modules[0] if len(self.modules) == 1 else nn.ModuleList(self.modules)
        self.needs = config.spec.needs
        self.raw = config.uses_maps  # reads raw maps/tokens, not pooled features

    @property
    def student_layer(self) -> str:
        """The student layer(s) it reads, joined by "+" where several (its name in logs)."""
        return "+".join(sl for sl, _ in self.pairs)

    @property
    def teacher_layer(self) -> str:
        return "+".join(tl for _, tl in self.pairs)

    def inputs(self, s_feats: dict, t_feats: dict, y: Tensor, logits: Tensor, t_logits, index,
               pair: int = 0) -> dict:
        """The keyword inputs of the module of layer pair ``pair``."""
        kw = {}
        if self.needs & {"feats", "maps"}:
            sl, tl = self.pairs[pair]
            kw["student_feats"] = s_feats[(sl, self.raw)]
            kw["teacher_feats"] = t_feats[(tl, self.raw)].detach()
        if "logits" in self.needs and self.config.reads_logits:
            # a SparseTeacher holds no graph (taken without gradient from a frozen teacher)
            kw["student_logits"] = logits
            kw["teacher_logits"] = t_logits if isinstance(t_logits, SparseTeacher) else t_logits.detach()
        if "labels" in self.needs:
            kw["labels"] = y
        if "index" in self.needs:
            kw["index"] = index
        return kw

    def __call__(self, s_feats: dict, t_feats: dict, y: Tensor, logits: Tensor, t_logits, index) -> Tensor:
        """The term's unweighted value: its module on its layers (summed over the layer pairs)."""
        value = self.modules[0](**self.inputs(s_feats, t_feats, y, logits, t_logits, index))
        for i in range(1, len(self.modules)):
            value = value + self.modules[i](**self.inputs(s_feats, t_feats, y, logits, t_logits, index, i))
        return value


def wanted_layers(terms: list[BoundTerm], side: str) -> set:
    """The ``(layer, raw)`` pairs the ``side`` ("student" or "teacher") network must be tapped at."""
    k = 0 if side == "student" else 1
    return {(pair[k], b.raw) for b in terms if b.needs & {"feats", "maps"} for pair in b.pairs}


def default_layers(model: nn.Module, example: Tensor, term: TermConfig) -> list[str]:
    """Where ``term`` reads on ``model`` when its entry names no layer.

    Pooled features: the penultimate layer. Map terms: their authors' layers
    (:data:`kd2m.losses.registry.LAYER_DEFAULTS`, from :func:`kd2m.models.stages`): AT and NST
    every stage after the stem, FitNets stage 2, WKD-F the last stage. A distance over spatial
    positions: the last stage where it is post-activation, else the last map before pooling (a
    WRN's last block is a pre-activation sum; its post-ReLU map is the final ``relu``). A model
    whose stages are not known: its last map before pooling (:func:`kd2m.features.last_map_layer`);
    a distance on a model with no map at all (a transformer language model): the per-token inputs
    of its classifier (the final hidden states, ``(n, L, d)``)."""
    if not term.uses_maps:
        return [PENULTIMATE]
    found = stages(model)
    if term.spec.needs_maps:
        kind = term.spec.layers
        if found and kind == "intermediate_stages" and len(found) > 1:
            return [s.module for s in found[1:]]
        if found and kind == "hint" and len(found) > 2:
            return [found[2].module]
        if found and kind in ("last_stage", "intermediate_stages", "hint"):
            return [found[-1].module]
    elif found and found[-1].post_activation is not False:
        return [found[-1].module]
    try:
        return [last_map_layer(model, example)]
    except ValueError:
        if term.spec.needs_maps:
            raise
        return [PENULTIMATE]


def _layer_pairs(method: Method, student: nn.Module, teacher: nn.Module, example: Tensor) -> dict:
    """``{id(term): [(student_layer, teacher_layer), ...]}``: each term's layers, named or default,
    paired by index (a term given lists of layers, or defaulting to several stages, reads them
    pairwise; the two sides must then list as many)."""
    out = {}
    for t in method.terms:
        sides = []
        for side, model in (("student", student), ("teacher", teacher)):
            given = getattr(t, f"{side}_layer")
            sides.append(list(given) if isinstance(given, tuple) else
                         [given] if given is not None else default_layers(model, example, t))
        s_layers, t_layers = sides
        if len(s_layers) != len(t_layers):
            raise ConfigError(f"{method.key}: term {t.name!r} reads {len(s_layers)} student layer(s) "
                              f"({', '.join(s_layers)}) and {len(t_layers)} teacher layer(s) ({', '.join(t_layers)}); "
                              "they are paired in order: give student_layer and teacher_layer lists of one length")
        out[id(t)] = list(zip(s_layers, t_layers))
    return out


class Taps:
    """Forward hooks on the layers a run's terms read: pooled ``(n, d)`` and raw (maps, tokens) by layer."""

    def __init__(self, model: nn.Module, wanted: set):
        pooled = sorted({layer for layer, raw in wanted if not raw})
        raw = sorted({layer for layer, raw in wanted if raw})
        self.pooled = FeatureTap(model, pooled) if pooled else None
        self.raw = FeatureTap(model, raw, pool="none") if raw else None

    def head_input(self, hidden: Tensor) -> None:
        """Record ``hidden`` as the ``penultimate`` layer (the last ``nn.Linear``'s input) where
        that layer did not run (the fused head, :mod:`kd2m.training.head`), as its hook would."""
        for tap in (self.pooled, self.raw):
            if tap is not None and PENULTIMATE in tap.layers:
                tap.features[PENULTIMATE] = to_matrix(hidden, tap.pool, tap.layouts[PENULTIMATE])

    def features(self) -> dict:
        out = {}
        for tap, raw in ((self.pooled, False), (self.raw, True)):
            if tap is None:
                continue
            for layer in tap.layers:
                if layer not in tap.features:
                    raise RuntimeError("no features recorded yet: run a forward pass first")
                out[(layer, raw)] = tap.features[layer]
        return out

    def remove(self) -> None:
        for tap in (self.pooled, self.raw):
            if tap is not None:
                tap.remove()


def _shape(x: Tensor) -> tuple:
    return tuple(x.shape[1:])


@torch.no_grad()
def _probe(model: nn.Module, x: Tensor, wanted: set) -> tuple[dict, Tensor]:
    """Features and logits of one eval-mode forward on ``x``, leaving the RNG and BN statistics alone."""
    if not wanted:
        return {}, None
    was_training = model.training
    taps = Taps(model, wanted)
    try:
        with fork_rng(x.device):
            model.eval()
            logits = model(x)
        return taps.features(), logits
    finally:
        taps.remove()
        model.train(was_training)


def bind_terms(method: Method, student: nn.Module, teacher: nn.Module | None, example: Tensor,
               num_classes: int | None, num_data: int, match: str = "global",
               train_labels: Tensor | None = None) -> list[BoundTerm]:
    """Build ``method``'s term modules with the shapes they need (from one probe forward on
    ``example``), each with its resolved layers; any error names the method and the term.
    ``match``: where the distances see the batch under torchrun ("global" or "local").
    ``train_labels``: every training sample's label (:func:`kd2m.data.dataset_labels`), or None."""
    if not method.terms:
        return []
    if teacher is None:
        raise ConfigError(f"{method.key}: its terms need a teacher")
    pairs = _layer_pairs(method, student, teacher, example)
    reads = [t for t in method.terms if t.spec.needs & {"feats", "maps"}]
    s_feats, _ = _probe(student, example, {(sl, t.uses_maps) for t in reads for sl, _ in pairs[id(t)]})
    t_feats, _ = _probe(teacher, example, {(tl, t.uses_maps) for t in reads for _, tl in pairs[id(t)]})
    head = dict(teacher.named_modules())[last_linear_name(teacher)].weight.detach()
    bound = []
    for t in method.terms:
        options = t.option_dict
        if t.spec.family == "kd2m" and "match" in t.spec.options:
            options.setdefault("match", match)
        if t.unit != "batch":
            options["unit"] = t.unit
        modules = []
        for sl, tl in pairs[id(t)]:
            s_x, t_x = s_feats.get((sl, t.uses_maps)), t_feats.get((tl, t.uses_maps))
            if t.spec.needs_maps and s_x is not None and (s_x.dim() != 4 or t_x.dim() != 4):
                raise ConfigError(f"{method.key}: term {t.name!r} needs (n, c, h, w) feature maps; layer {sl!r} of "
                                  f"the student gives {tuple(s_x.shape)} and layer {tl!r} of the teacher "
                                  f"{tuple(t_x.shape)}")
            ctx_fields = dict(student_shape=_shape(s_x) if s_x is not None else None,
                              teacher_shape=_shape(t_x) if t_x is not None else None,
                              num_classes=num_classes, num_data=num_data, teacher_head=head,
                              train_labels=train_labels)
            try:
                modules.append(losses.get(t.name, losses.TermContext(**ctx_fields), **options))
            except (ValueError, TypeError) as e:
                raise ConfigError(f"{method.key}: {e}") from None
        bound.append(BoundTerm(t, modules, pairs[id(t)], None))
    for b, key in zip(bound, term_keys([(b.config.name, b.student_layer) for b in bound])):
        b.key = key
    return bound


def term_keys(terms: list[tuple[str, str]]) -> list[str]:
    """One distinct log key per (name, student layer) of a student's terms: the name where it is
    unique, ``name@layer`` where the name repeats over layers, and ``name@layer#i`` (1-based) where
    a name repeats on one layer — two terms must never share a key, or log.jsonl and
    ``auto_scales`` would hold their sum and the last λ."""
    names = [n for n, _ in terms]
    keys = [n if names.count(n) == 1 else f"{n}@{layer}" for n, layer in terms]
    seen: dict[str, int] = {}
    out = []
    for k in keys:
        if keys.count(k) > 1:
            seen[k] = seen.get(k, 0) + 1
            out.append(f"{k}#{seen[k]}")
        else:
            out.append(k)
    return out
