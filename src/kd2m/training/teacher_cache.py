"""Teacher outputs computed once and looked up every step (offline distillation).

The teacher is frozen and in eval mode, so its features and logits for a given image never
change. A teacher forward costs about two thirds of a student's train step when the teacher
is twice the student (ResNet-34 → ResNet-18), which caps online distillation at 0.6–0.7× the
speed of plain training whatever the metric (measured on CPU, README "Speed"). With ``teacher_cache: K`` the engine computes
the teacher's outputs once, for K fixed *views* of every training image, and each step looks
them up by key instead of running the teacher: a distillation step then costs what a CE step
costs plus the distance.

Views. View ``v`` of image ``i`` is the dataset's own transform run with the torch RNG seeded
from ``(seed, i, v)``, so it is the same image every time it is drawn. Each epoch every image
is shown in one of its K views, a hash of (seed, epoch, image) (:class:`ViewSampler`): no RNG
state, so a resumed run, any number of loader workers and every rank draw the same views.
Without random augmentation (the digits) K=1 is exact: the student sees what it would see
online and gets the teacher's outputs to float rounding. With augmentation, K views replace
a fresh crop per epoch: fewer distinct augmentations (the price offline distillation pays),
and K·N teacher forwards up front instead of epochs·N. Transforms must draw their randomness
from torch's RNG (torchvision's do); a transform using Python's ``random`` is not pinned.

Memory: ``N·K·(d + classes)·4`` bytes on the training device (CIFAR-10, d=512, K=4: 418 MB).
A language model's logits are ``4·V`` bytes per token (196 KiB at V = 49 152); with ``topk`` the
table keeps each position's top-k ids and log-probabilities and the log-mass of the rest instead
(:class:`SparseTable`, read as a :class:`~kd2m.losses.sparse_teacher.SparseTeacher`): ``12·k + 4``
bytes per token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from .. import distributed as dist_ctx
from ..catalog import EVAL_BATCH_SIZE
from ..data.registry import logits_batch_size
from ..features import FeatureTap
from ..losses.sparse_teacher import SparseTeacher, check_k
from ..runtime import autocast, progress, to_device

__all__ = ["view_seed", "FixedViews", "ViewSampler", "SparseTable", "bytes_per_token", "TeacherCache",
           "build_teacher_cache"]

_M64 = 2**64 - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def view_seed(seed: int, index: int, view: int) -> int:
    """The RNG seed that pins view ``view`` of image ``index``: splitmix64 over the triple, 63 bits."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _M64) ^ index) ^ view) >> 1


class FixedViews(Dataset):
    """Every view of every item of ``base``: key ``index·K + view`` → ``(image, label, key)``.

    ``len`` is N·K; a training epoch does not read them all but one key per image, chosen by
    :class:`ViewSampler`.

    Args:
        base: a dataset of ``(image, label)`` whose transform draws from torch's RNG.
        views: K ≥ 1.
        seed: the run's seed (different seeds pin different views).
    """

    def __init__(self, base: Dataset, views: int, seed: int):
        if views < 1:
            raise ValueError(f"teacher_cache: need at least 1 view per image, got {views}")
        self.base, self.views, self.seed = base, int(views), int(seed)

    @property
    def images(self) -> int:
        return len(self.base)

    def __len__(self) -> int:
        return len(self.base) * self.views

    @property
    def pinned_by(self) -> int | None:
        """The seed that pins the views, or None where ``base`` draws no randomness (its
        ``draws_randomness`` is False, as tokenised text): then every seed's views are the same."""
        return self.seed if getattr(self.base, "draws_randomness", True) else None

    def view(self, index: int, view: int):
        """View ``view`` of item ``index``: ``(image, label)``, identical on every call."""
        # The CPU generator alone: torch.manual_seed would also (lazily) seed every CUDA device, per item.
        gen = torch.default_generator
        state = gen.get_state()
        gen.manual_seed(view_seed(self.seed, index, view))
        try:
            return self.base[index]
        finally:
            gen.set_state(state)

    def __getitem__(self, key: int):
        x, y = self.view(key // self.views, key % self.views)
        return x, y, key


class ViewSampler(Sampler):
    """One key of :class:`FixedViews` per image per epoch: the images in ``base``'s order (a
    shuffling sampler over the N images, e.g. RandomSampler or DistributedSampler), each in view
    ``splitmix64(seed, epoch, index) mod K``.

    The view is a pure function of (seed, epoch, index), drawn in the main process: a resumed
    run, any number of loader workers and every rank agree on it without any RNG state.
    """

    def __init__(self, base: Sampler, views: int, seed: int):
        self.base, self.views, self.seed, self.epoch = base, int(views), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __iter__(self):
        k = self.views
        salt = _splitmix64((self.seed & _M64) ^ _splitmix64(self.epoch))
        for index in self.base:
            yield index * k + (_splitmix64(salt ^ index) % k if k > 1 else 0)

    def __len__(self) -> int:
        return len(self.base)


@dataclass
class SparseTable:
    """The teacher's top-k next-token log-probabilities at ``temperature`` for every key:
    ``ids`` (N·K, …, k) int64, ``logprobs`` (N·K, …, k) and ``tail`` (N·K, …) float32 (see
    :class:`~kd2m.losses.sparse_teacher.SparseTeacher`), over a vocabulary of ``vocab_size``."""

    ids: Tensor
    logprobs: Tensor
    tail: Tensor
    vocab_size: int
    temperature: float

    def lookup(self, keys: Tensor) -> SparseTeacher:
        """The rows of these keys, every position of them one row of a SparseTeacher."""
        k = self.ids.shape[-1]
        return SparseTeacher(self.ids.index_select(0, keys).reshape(-1, k),
                             self.logprobs.index_select(0, keys).reshape(-1, k),
                             self.tail.index_select(0, keys).reshape(-1), self.vocab_size, self.temperature)


def bytes_per_token(topk: int | None, vocab: int) -> int:
    """What the cache keeps per position of the teacher's logits: ``4·V`` (float32 logits), or
    ``12·k + 4`` with ``topk`` = k (int64 ids, float32 log-probabilities, a float32 tail)."""
    return 4 * vocab if topk is None else 12 * topk + 4


@dataclass
class TeacherCache:
    """The teacher's ``features (N·K, d)`` (or per-position ``(N·K, L, d)``) and ``logits (N·K, classes)``
    (a language model's ``(N·K, L, V)``), float32, rows in key order."""

    features: Tensor
    logits: Tensor | SparseTable

    def lookup(self, keys: Tensor) -> tuple[Tensor, Tensor | SparseTeacher]:
        """Features and logits of the items with these keys (a ``(n,)`` int64 tensor on the cache's
        device); a sparse table's as a SparseTeacher over their positions."""
        if isinstance(self.logits, SparseTable):
            return self.features.index_select(0, keys), self.logits.lookup(keys)
        return self.features.index_select(0, keys), self.logits.index_select(0, keys)


@torch.no_grad()
def build_teacher_cache(teacher: nn.Module, views: FixedViews, layer: str, device: torch.device,
                        batch_size: int = EVAL_BATCH_SIZE, amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                        num_workers: int = 0, show_progress: bool = False, max_mb: float | None = None,
                        raw: bool = False, topk: int | None = None, temperature: float = 1.0) -> TeacherCache:
    r"""Run ``teacher`` (eval mode) once over every view of every item and keep its ``layer`` features and logits.

    ``raw``: keep the layer's per-position features (a language model's tokens ``(L, d)``, as
    ``FeatureTap(pool="none")`` gives them) instead of pooled ones; logits keep whatever shape the
    model gives per item. ``topk``: keep, per position, the top-k ids and log-probabilities of
    :math:`\mathrm{softmax}(z/\tau)` at τ = ``temperature`` and the log-mass of the rest
    (:class:`SparseTable`) instead of the logits; a k above the vocabulary is refused (ValueError).

    The same autocast as the training step (``amp_dtype``) is used, so the cached outputs are what
    an online step would have computed; they are stored in float32. A table larger than
    ``max_mb`` MiB is refused (ValueError naming its size and the bytes per token) before it is allocated.

    Under torch.distributed the batches are dealt round-robin to the ranks, each fills its rows
    of a zero table and one all-reduce sums them: every rank ends with the whole table after
    1/W of the work, and the batches are those of a single process (the same values).
    """
    teacher.eval()
    n = len(views)  # every key, in order
    if n == 0:
        raise ValueError("teacher_cache: the training set is empty")

    def forward(x):
        with autocast(device, amp_dtype):
            out = teacher(to_device(x, device, channels_last))
        return tap.feature.float(), out.float()

    with FeatureTap(teacher, layer, pool="none" if raw else "avg") as tap:
        f, out = forward(views[0][0].unsqueeze(0))  # the shapes, before allocating
        if topk is not None:
            check_k(topk, out.shape[-1])
        _check_size(views, f[0], out[0], topk, max_mb)
        batch_size = logits_batch_size(out[0].numel(), batch_size)  # a large vocabulary: fewer items a batch
        feats = torch.zeros(n, *f.shape[1:], device=device)
        logits = _empty_logits(n, out.shape[1:], topk, temperature, device)
        world, rank = dist_ctx.world_size(), dist_ctx.rank()
        mine = [k for k in range(n) if (k // batch_size) % world == rank]  # whole batches, round-robin
        loader = DataLoader(Subset(views, mine), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            pin_memory=device.type == "cuda")
        for x, _, key in progress(loader, f"teacher cache ×{views.views}", enabled=show_progress):
            f, out = forward(x)
            key = key.to(device)
            feats.index_copy_(0, key, f)
            _store(logits, key, out)
    if world > 1:
        dist.all_reduce(feats)
        for table in (logits.ids, logits.logprobs, logits.tail) if topk is not None else (logits,):
            dist.all_reduce(table)
    return TeacherCache(feats, logits)


def _check_size(views: FixedViews, f: Tensor, out: Tensor, topk: int | None, max_mb: float | None) -> None:
    """ValueError where the table of ``views`` would exceed ``max_mb`` MiB (one item's features
    ``f`` and logits ``out``), naming its size and what it keeps per item and per token."""
    positions = out[..., 0].numel()  # tokens per item (1 for a classifier)
    per_token = bytes_per_token(topk, out.shape[-1])
    need = len(views) * (f.numel() * 4 + positions * per_token) / 2**20
    if max_mb is None or need <= max_mb:
        return
    kept = f"{out.numel()} logits" if topk is None else f"{positions} × top-{topk} logits"
    per = f"; {per_token:,} bytes per token" if positions > 1 or topk is not None else ""
    sparse = " or --teacher-topk K (12·K + 4 bytes per token)" if topk is None and positions > 1 else ""
    raise ValueError(
        f"teacher_cache: {views.views} view(s) of {views.images} items × ({f.numel()} features + {kept}) in "
        f"float32 need {need:,.0f} MiB{per}, over --max-cache-mb {max_mb:g}; use fewer views{sparse}, raise "
        "--max-cache-mb, or the online teacher (teacher_cache: 0)")


def _empty_logits(n: int, shape, topk: int | None, temperature: float, device) -> Tensor | SparseTable:
    """A zero table for ``n`` items of logits of ``shape`` (…, V), or their top-``topk`` entries."""
    if topk is None:
        return torch.zeros(n, *shape, device=device)
    *lead, vocab = shape
    return SparseTable(torch.zeros(n, *lead, topk, dtype=torch.long, device=device),
                       torch.zeros(n, *lead, topk, device=device), torch.zeros(n, *lead, device=device),
                       int(vocab), float(temperature))


def _store(table: Tensor | SparseTable, key: Tensor, out: Tensor) -> None:
    """Write the logits ``out`` (b, …, V) of the items ``key`` into ``table``."""
    if not isinstance(table, SparseTable):
        table.index_copy_(0, key, out)
        return
    top = SparseTeacher.from_logits(out, table.ids.shape[-1], table.temperature)
    lead = out.shape[:-1]
    table.ids.index_copy_(0, key, top.ids.reshape(*lead, -1))
    table.logprobs.index_copy_(0, key, top.logprobs.reshape(*lead, -1))
    table.tail.index_copy_(0, key, top.tail_logprob.reshape(lead))
