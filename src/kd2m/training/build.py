"""The networks and loaders of a run: every method of a seed starts from the same weights and
sees the same data order."""
from __future__ import annotations

import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .. import distributed as dist_ctx
from ..data.registry import eval_batch_size
from ..models import build_model, load_pretrained
from ..models.hf import is_hf, is_hf_pretrained, load_hf_pretrained
from .teacher_cache import FixedViews, ViewSampler

__all__ = ["IndexedDataset", "make_loaders", "build_net", "build_student", "build_teacher", "build_referenced",
           "freeze"]


class IndexedDataset(Dataset):
    """``(x, y)`` items as ``(x, y, index)``: the key the engine passes on (CRD's memory bank),
    the same item shape as :class:`~kd2m.training.teacher_cache.FixedViews` (whose key is ``index·K + view``)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        x, y = self.base[index]
        return x, y, index


def make_loaders(bundle, cfg, seed: int, device: torch.device, views: FixedViews | None = None):
    """Train loader of ``(x, y, key)`` with a seeded shuffle (DistributedSampler under torchrun)
    and a test loader of ``(x, y)``.

    With ``views`` (the teacher cache) the keys are those of the views (``index·K + view``): the
    same image order, each image in the view :class:`ViewSampler` picks for the epoch; without,
    the key is the image's index."""
    g = torch.Generator().manual_seed(seed)
    pin = device.type == "cuda"
    workers = cfg.num_workers or 0
    # Workers are not persistent: a DataLoader iterator draws its workers' base seed when it is
    # created (train: from `g`; test: from the global RNG, which also drives dropout). Created
    # every epoch, those draws are the same in a resumed run as in the uninterrupted one; a
    # persistent iterator draws once, in the first epoch a process runs, so after a resume every
    # later shuffle, crop and dropout mask would shift. Costs a worker start per epoch.
    common = dict(num_workers=workers, pin_memory=pin, persistent_workers=False)
    if dist_ctx.is_distributed():
        from torch.utils.data.distributed import DistributedSampler
        sampler = DistributedSampler(bundle.train, shuffle=True, seed=seed)
        test_sampler = DistributedSampler(bundle.test, shuffle=False, drop_last=False)
        test = DataLoader(bundle.test, batch_size=eval_batch_size(bundle), sampler=test_sampler, **common)
    else:
        sampler = RandomSampler(bundle.train, generator=g)  # what shuffle=True builds
        test = DataLoader(bundle.test, batch_size=eval_batch_size(bundle), shuffle=False, **common)
    if views is not None:
        train = DataLoader(views, batch_size=cfg.batch_size, sampler=ViewSampler(sampler, views.views, views.seed),
                           generator=g, **common)
    else:
        train = DataLoader(IndexedDataset(bundle.train), batch_size=cfg.batch_size, sampler=sampler, generator=g,
                           **common)
    return train, test


_INIT_SEED = {"student": 1_000_003, "teacher": 2_000_003}


def build_net(cfg, bundle, seed: int, role: str) -> nn.Module:
    """The seed's ``role`` ("student" or "teacher") network, freshly initialised (or from its
    ``pretrained_<role>`` file): the same weights for every method of that seed."""
    torch.manual_seed(_INIT_SEED[role] * (seed + 1))
    name, weights = getattr(cfg, role), getattr(cfg, f"pretrained_{role}")
    if is_hf(name) and is_hf_pretrained(weights):  # a save_pretrained directory or GGUF file: its own architecture
        return load_hf_pretrained(weights, bundle.num_classes, bundle.image_size)
    model = build_model(name, bundle.num_classes, bundle.in_channels, bundle.image_size,
                        **(getattr(cfg, f"{role}_options") or {}))
    if weights:
        # A student may start from a backbone under a new head (its training learns the head); a
        # teacher may only if it is trained here: with --teacher-epochs 0 a random head would be
        # distilled from as if it were the teacher (its accuracy at chance), so its head must load.
        head_learned = role == "student" or cfg.teacher_epochs > 0
        load_pretrained(model, weights, new_head=head_learned, on_new_head=_say_once)
    return model


def build_referenced(reference: dict, name: str, bundle, options: dict | None = None) -> nn.Module:
    """The network of a run whose final.json references a pretrained file in place of a
    ``model.pt`` of its own (a teacher no epoch trained: :meth:`kd2m.harness.trainer.Trainer._finish`),
    built as :func:`build_net` built it. A file gone, or changed since the run (its content
    digest, ``reference["identity"]``), is refused, never another teacher scored as the run's."""
    from ..models.pretrained import weights_identity
    file = reference.get("file")
    if not file or not os.path.exists(file):
        raise FileNotFoundError(f"{file}: the pretrained weights this run's teacher references (in place of a "
                                "model.pt) are gone; restore the file, or rerun the grid")
    now = weights_identity(file)
    if now != reference.get("identity"):
        raise ValueError(f"{file}: changed since the run (its content is {now[:23]}…, the run's "
                         f"{str(reference.get('identity'))[:23]}…); restore the file the run used, or rerun the grid")
    if is_hf(name) and is_hf_pretrained(file):
        return load_hf_pretrained(file, bundle.num_classes, bundle.image_size)
    model = build_model(name, bundle.num_classes, bundle.in_channels, bundle.image_size, **(options or {}))
    return load_pretrained(model, file)


_SAID: set = set()


def _say_once(message: str) -> None:
    """One line on stderr, once per process (a grid builds the same network once per seed)."""
    if message not in _SAID:
        _SAID.add(message)
        print(f"kd2m: {message}", file=sys.stderr)


def build_student(cfg, bundle, seed: int) -> nn.Module:
    return build_net(cfg, bundle, seed, "student")


def build_teacher(cfg, bundle, seed: int) -> nn.Module:
    return build_net(cfg, bundle, seed, "teacher")


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
