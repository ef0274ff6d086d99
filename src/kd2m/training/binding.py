"""A student's terms bound to the layers they read, with the shapes they need, and the forward
hooks that read those layers on every step."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import losses
from ..errors import ConfigError
from ..features import PENULTIMATE, FeatureTap, last_linear_name, last_map_layer
from ..methods import Method, TermConfig
from ..runtime import fork_rng

__all__ = ["BoundTerm", "bind_terms", "term_keys", "Taps", "wanted_layers"]


class BoundTerm:
    """One term of a run: its config, its module, the layers it reads, and the key it is logged under."""

    def __init__(self, config: TermConfig, module: nn.Module, student_layer: str, teacher_layer: str, key: str):
        self.config, self.module, self.key = config, module, key
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.needs = config.spec.needs
        self.raw = config.uses_maps  # reads raw maps/tokens, not pooled features

    def inputs(self, s_feats: dict, t_feats: dict, y: Tensor, logits: Tensor, t_logits, index) -> dict:
        kw = {}
        if self.needs & {"feats", "maps"}:
            kw["student_feats"] = s_feats[(self.student_layer, self.raw)]
            kw["teacher_feats"] = t_feats[(self.teacher_layer, self.raw)].detach()
        if "logits" in self.needs:
            kw["student_logits"], kw["teacher_logits"] = logits, t_logits.detach()
        if "labels" in self.needs:
            kw["labels"] = y
        if "index" in self.needs:
            kw["index"] = index
        return kw


def wanted_layers(terms: list[BoundTerm], side: str) -> set:
    """The ``(layer, raw)`` pairs the ``side`` ("student" or "teacher") network must be tapped at."""
    return {(getattr(b, f"{side}_layer"), b.raw) for b in terms if b.needs & {"feats", "maps"}}


def _layers(model: nn.Module, example: Tensor, terms, side: str) -> dict:
    """The layer each term reads on ``side`` ("student" or "teacher"), resolved to a module path."""
    out, found_map = {}, None
    for t in terms:
        layer = getattr(t, f"{side}_layer")
        if layer is None:
            if t.uses_maps:
                found_map = found_map or last_map_layer(model, example)
                layer = found_map
            else:
                layer = PENULTIMATE
        out[id(t)] = layer
    return out


class Taps:
    """Forward hooks on the layers a run's terms read: pooled ``(n, d)`` and raw (maps, tokens) by layer."""

    def __init__(self, model: nn.Module, wanted: set):
        pooled = sorted({layer for layer, raw in wanted if not raw})
        raw = sorted({layer for layer, raw in wanted if raw})
        self.pooled = FeatureTap(model, pooled) if pooled else None
        self.raw = FeatureTap(model, raw, pool="none") if raw else None

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
               num_classes: int, num_data: int, match: str = "global",
               train_labels: Tensor | None = None) -> list[BoundTerm]:
    """Build ``method``'s term modules with the shapes they need (from one probe forward on
    ``example``), each with its resolved layers; any error names the method and the term.
    ``match``: where the distances see the batch under torchrun ("global" or "local").
    ``train_labels``: every training sample's label (:func:`kd2m.data.dataset_labels`), or None."""
    if not method.terms:
        return []
    if teacher is None:
        raise ConfigError(f"{method.key}: its terms need a teacher")
    s_layers = _layers(student, example, method.terms, "student")
    t_layers = _layers(teacher, example, method.terms, "teacher")
    s_want = {(s_layers[id(t)], t.uses_maps) for t in method.terms if t.spec.needs & {"feats", "maps"}}
    t_want = {(t_layers[id(t)], t.uses_maps) for t in method.terms if t.spec.needs & {"feats", "maps"}}
    s_feats, _ = _probe(student, example, s_want)
    t_feats, _ = _probe(teacher, example, t_want)
    head = dict(teacher.named_modules())[last_linear_name(teacher)].weight.detach()
    bound = []
    for t in method.terms:
        sl, tl = s_layers[id(t)], t_layers[id(t)]
        s_x, t_x = s_feats.get((sl, t.uses_maps)), t_feats.get((tl, t.uses_maps))
        if t.spec.needs_maps and s_x is not None and (s_x.dim() != 4 or t_x.dim() != 4):
            raise ConfigError(f"{method.key}: term {t.name!r} needs (n, c, h, w) feature maps; layer {sl!r} of the "
                              f"student gives {tuple(s_x.shape)} and layer {tl!r} of the teacher {tuple(t_x.shape)}")
        ctx_fields = dict(student_shape=_shape(s_x) if s_x is not None else None,
                          teacher_shape=_shape(t_x) if t_x is not None else None,
                          num_classes=num_classes, num_data=num_data, teacher_head=head,
                          train_labels=train_labels)
        options = t.option_dict
        if t.spec.family == "kd2m" and "match" in t.spec.options:
            options.setdefault("match", match)
        if t.unit != "batch":
            options["unit"] = t.unit
        try:
            module = losses.get(t.name, losses.TermContext(**ctx_fields), **options)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{method.key}: {e}") from None
        bound.append(BoundTerm(t, module, sl, tl, None))
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
