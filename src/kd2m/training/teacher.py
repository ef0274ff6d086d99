"""The teacher's outputs for a batch: its features by layer and its logits, run online or looked
up in a :class:`~kd2m.training.teacher_cache.TeacherCache`."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import distributed as dist_ctx
from ..errors import ConfigError
from ..losses.fused_head import DIVERGENCES
from ..runtime import amp_dtype, fork_rng
from .binding import Taps
from .methods import cache_problem
from .teacher_cache import FixedViews, build_teacher_cache

__all__ = ["TeacherOutputs", "OnlineTeacher", "CachedTeacher", "cached_layer", "teacher_cache", "sparse_temperature"]


class TeacherOutputs:
    """The teacher's features (by layer) and logits for a batch: run online, or looked up in a cache."""

    #: runs the teacher on the batch (under the step's autocast), rather than looking it up by key
    online = True

    def __call__(self, x: Tensor, key: Tensor) -> tuple[dict, Tensor]:
        raise NotImplementedError

    def remove(self) -> None:
        pass


class OnlineTeacher(TeacherOutputs):
    """Runs the frozen teacher on every batch (under the run's autocast) and reads its taps."""

    def __init__(self, teacher: nn.Module, wanted: set):
        self.teacher = teacher
        self.taps = Taps(teacher, wanted)

    def __call__(self, x, key):
        with torch.no_grad():
            logits = self.teacher(x)
        return self.taps.features(), logits

    def remove(self) -> None:
        self.taps.remove()


class CachedTeacher(TeacherOutputs):
    """Looks the teacher's outputs up by key in a :class:`~kd2m.training.teacher_cache.TeacherCache`
    (``raw``: its features are per position, for terms with a per-position unit)."""

    online = False

    def __init__(self, cache, layer: str, raw: bool = False):
        self.cache, self.layer, self.raw = cache, layer, raw

    def __call__(self, x, key):
        feats, logits = self.cache.lookup(key)
        return {(self.layer, self.raw): feats}, logits


def cached_layer(cfg, method, bound: list) -> tuple[str, bool]:
    """The one teacher layer a cache holds for ``method``, and whether per position (refused up
    front by RunConfig.resolved when a method needs more; checked again here, on the layers the
    terms were bound to, for runs built through the API)."""
    problem = cache_problem(method)
    if problem:
        raise ConfigError(f"teacher_cache: {problem}")
    layers = {(tl, b.raw) for b in bound if b.needs & {"feats", "maps"} for _, tl in b.pairs}
    if len(layers) > 1:
        raise ConfigError(f"teacher_cache: {method.key}: its terms read teacher layers "
                          f"{', '.join(sorted(str(layer) for layer, _ in layers))}; the teacher cache holds one; use "
                          "teacher_cache: 0")
    return layers.pop() if layers else (cfg.teacher_layer, False)


def teacher_cache(teacher, views: FixedViews, layer: str, cfg, device, memo: dict | None, raw: bool = False,
                  temperature: float = 1.0):
    """The teacher's outputs on every view of ``views`` at ``layer`` (``raw``: per position), its
    logits as their top ``cfg.teacher_topk`` at ``temperature`` where that is set; ``memo`` (a
    dict) shares one table between the students that read the same layer: those of a seed, or
    of every seed where the teacher and the views are the same for all (a pretrained teacher no
    epoch trains, on data that draws no randomness).

    A table belongs to its teacher's weights and its corpus: the memo's key holds the teacher and
    the dataset (kept alive by the entry, so their ids cannot pass to other objects) and every
    teacher tensor's storage and in-place version, so a teacher trained or loaded again, or
    another corpus, gets a table of its own, never the one built before."""
    topk = getattr(cfg, "teacher_topk", None)
    key = (id(teacher), id(views.base), _weights_version(teacher), views.views, views.pinned_by, layer, raw, cfg.amp,
           cfg.channels_last, topk, temperature if topk else None)
    if memo is not None and key in memo:
        return memo[key][-1]
    with fork_rng(device):  # building draws no randomness the training run would see
        cache = build_teacher_cache(teacher, views, layer, device, amp_dtype=amp_dtype(cfg.amp),
                                    channels_last=cfg.channels_last, num_workers=cfg.num_workers or 0,
                                    show_progress=cfg.progress and dist_ctx.is_main(), max_mb=cfg.max_cache_mb,
                                    raw=raw, topk=topk, temperature=temperature)
    if memo is not None:
        memo[key] = (teacher, views.base, cache)
    return cache


def _weights_version(model: nn.Module) -> tuple:
    """Where each parameter and buffer lives and how often it was written in place: changes when
    an optimiser steps, a state dict is loaded, or the model moves."""
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


def sparse_temperature(method) -> float:
    """The one temperature of ``method``'s token divergences, at which a top-k cache keeps the
    teacher's log-probabilities (1 where it has none); ConfigError where they differ (a top-k
    table holds one temperature: its tail cannot be re-tempered)."""
    taus = sorted({float({**dict(t.spec.defaults), **t.option_dict}.get("temperature", 1.0))
                   for t in method.terms if t.name in DIVERGENCES})
    if len(taus) > 1:
        raise ConfigError(f"teacher_topk: {method.key}: its divergences ask for temperatures "
                          f"{', '.join(f'{x:g}' for x in taus)}; the top-K cache holds the teacher's log-probabilities "
                          "at one: give them one temperature, or leave teacher_topk out (every logit)")
    return taus[0] if taus else 1.0
