"""The teacher's outputs for a batch: its features by layer and its logits, run online or looked
up in a :class:`~kd2m.teacher_cache.TeacherCache`."""
from __future__ import annotations

from torch import Tensor, nn
import torch

from .. import distributed as dist_ctx
from ..errors import ConfigError
from ..methods import cache_problem
from ..runtime import amp_dtype, fork_rng
from ..teacher_cache import FixedViews, build_teacher_cache
from .binding import Taps

__all__ = ["TeacherOutputs", "OnlineTeacher", "CachedTeacher", "cached_layer", "teacher_cache"]


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
    """Looks the teacher's outputs up by key in a :class:`~kd2m.teacher_cache.TeacherCache`
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


def teacher_cache(teacher, views: FixedViews, layer: str, cfg, device, memo: dict | None, raw: bool = False):
    """The teacher's outputs on every view of ``views`` at ``layer`` (``raw``: per position);
    ``memo`` (a dict) shares one table between the students of a seed that read the same layer."""
    key = (id(teacher), views.views, views.seed, layer, raw, cfg.amp, cfg.channels_last)
    if memo is not None and key in memo:
        return memo[key]
    with fork_rng(device):  # building draws no randomness the training run would see
        cache = build_teacher_cache(teacher, views, layer, device, amp_dtype=amp_dtype(cfg.amp),
                                    channels_last=cfg.channels_last, num_workers=cfg.num_workers or 0,
                                    show_progress=cfg.progress and dist_ctx.is_main(), max_mb=cfg.max_cache_mb,
                                    raw=raw)
    if memo is not None:
        memo[key] = cache
    return cache
