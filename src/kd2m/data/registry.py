"""The dataset registry: a name → a builder returning a :class:`DataBundle`.

A new dataset is one function plus one decorator line::

    @register_dataset("mnist")
    def mnist(data_root, download, augment) -> DataBundle: ...

``data_root`` is what the user gave (``None`` when they gave nothing); a builder that reads
files calls :func:`resolve_root` to get the default, ``$KD2M_DATA_ROOT`` or
``~/.cache/kd2m/data``.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from ..catalog import EVAL_BATCH_SIZE, EVAL_LOGITS_MIB
from ..registry import registrar

__all__ = ["DEFAULT_DATA_ROOT", "DatasetNotFoundError", "DataBundle", "eval_batch_size", "logits_batch_size",
           "dataset_labels", "register_dataset_prefix", "available_datasets", "dataset_task", "is_dataset",
           "resolve_root", "build_dataset", "HOLDOUT_SEED", "holdout_split"]

#: Where datasets live when no ``data_root`` is given (``$KD2M_DATA_ROOT`` overrides it).
DEFAULT_DATA_ROOT = Path("~/.cache/kd2m/data")


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where we looked; the message (one line) says where and what to do."""


@dataclass
class DataBundle:
    """Train and test splits plus what a model needs to know about them.

    Items of ``train``/``test`` are ``(image, label)``: a float32 tensor ``(in_channels,
    image_size, image_size)``, normalised, and an ``int`` in ``[0, num_classes)``.
    """

    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    name: str
    classes: list[str] | None = None  # class names in label order, where the data has them
    task: str = "classification"      # how its batches are learned and scored (kd2m.tasks)


def eval_batch_size(bundle: DataBundle, limit: int = EVAL_BATCH_SIZE) -> int:
    """Items per held-out batch: ``limit``, fewer where one item's float32 logits (a text block's
    ``image_size`` positions × ``num_classes`` tokens) would make a batch's logits exceed
    :data:`~kd2m.catalog.EVAL_LOGITS_MIB`; at least 1."""
    positions = bundle.image_size if bundle.task == "lm" else 1
    return logits_batch_size(positions * bundle.num_classes, limit)


def logits_batch_size(logits_per_item: int, limit: int = EVAL_BATCH_SIZE) -> int:
    """At most ``limit`` items, and no more than keep ``logits_per_item`` float32 logits each under
    :data:`~kd2m.catalog.EVAL_LOGITS_MIB` a batch; at least 1."""
    return max(1, min(limit, EVAL_LOGITS_MIB * 2**20 // (4 * max(1, logits_per_item))))


def dataset_labels(dataset: Dataset) -> Tensor | None:
    """``(len(dataset),)`` int64: every sample's label by index, read without loading a sample.

    From the attribute the dataset keeps them in: ``targets`` (torchvision's CIFAR and
    ImageFolder), ``labels`` (SVHN, :class:`~kd2m.data.digits.TensorImageDataset`), through
    ``Subset``s. None for a dataset that keeps them nowhere (the caller decides; CRD's
    other-class negatives then ask for ``negatives="uniform"``) — never a pass over the images.
    """
    if isinstance(dataset, Subset):
        inner = dataset_labels(dataset.dataset)
        return None if inner is None else inner[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    for name in ("targets", "labels"):
        values = getattr(dataset, name, None)
        if values is None:
            continue
        labels = torch.as_tensor(np.asarray(values))
        if labels.shape == (len(cast(Sized, dataset)),) and not labels.is_floating_point() and labels.dtype != torch.bool:
            return labels.long()
    return None


Builder = Callable[[str | os.PathLike | None, bool, bool], DataBundle]
_DATASETS: dict[str, Builder] = {}


#: Decorator: ``@register_dataset(name)`` makes ``builder(data_root, download, augment)`` available.
register_dataset = registrar(_DATASETS, "dataset")


#: Datasets named by a prefix and a path (``text:PATH``): prefix -> builder(path, data_root,
#: download, augment, **options). A builder's ``task`` and ``options`` attributes say what it is for
#: and which of build_dataset's options it takes, as for registered builders.
_PREFIXED: dict[str, Builder] = {}


def register_dataset_prefix(prefix: str):
    """Decorator: ``@register_dataset_prefix("text:")`` makes ``text:PATH`` a dataset."""
    def add(builder):
        from ..registry import add_entry
        add_entry(_PREFIXED, "dataset prefix", prefix, builder)
        return builder
    return add


def available_datasets() -> list[str]:
    """Registered dataset names, sorted, then the prefixed ones (``text:PATH``)."""
    return sorted(_DATASETS) + [f"{p}PATH" for p in sorted(_PREFIXED)]


def _builder(name):
    """(builder, its path argument or None) of a dataset name; (None, None) when unknown."""
    if not isinstance(name, str):
        return None, None
    if name in _DATASETS:
        return _DATASETS[name], None
    for prefix, builder in _PREFIXED.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            return builder, name[len(prefix):]
    return None, None


def dataset_task(name: str) -> str:
    """The task a dataset is for (:mod:`kd2m.tasks`), known without building it: its builder's
    ``task`` (``"lm"`` for text), else ``"classification"``."""
    return getattr(_builder(name)[0], "task", "classification")


def is_dataset(name) -> bool:
    """Whether ``name`` names a dataset: a registered one, or a prefixed one (``text:PATH``)."""
    return _builder(name)[0] is not None


def resolve_root(data_root: str | os.PathLike | None) -> Path:
    """``data_root`` as an absolute path; the default is ``$KD2M_DATA_ROOT`` or ``~/.cache/kd2m/data``."""
    if data_root is None:
        data_root = os.environ.get("KD2M_DATA_ROOT") or DEFAULT_DATA_ROOT
    return Path(data_root).expanduser().resolve()


def build_dataset(name: str, data_root: str | os.PathLike | None = None, download: bool = False,
                  augment: bool = True, image_size: int | None = None, tokenizer: str | None = None,
                  holdout: float = 0.0) -> DataBundle:
    """Build the train/test splits of dataset ``name``.

    Args:
        name: one of :func:`available_datasets`.
        data_root: directory holding the data (ignored by ``digits``); see :func:`resolve_root`.
        download: fetch the files into ``data_root`` if missing (torchvision datasets only).
        augment: random crop (+ flip where the classes allow it) on the train split; the test
            split is never augmented.
        image_size: resize every image to this size (``imagefolder``; default: the most common
            size among its files), or the block length in tokens of text datasets (``text:PATH``,
            ``python_docs``; default 64).
        tokenizer: text datasets: a local model directory whose tokenizer to use (default: bytes).
        holdout: a fraction in [0, 1): that share of the training split (:func:`holdout_split`)
            becomes the evaluation split, ``test``, never augmented; the rest trains. The test
            split is not used at all: choosing λ on it would make it a tuning set. Text: whole
            blocks are held out, at random, so a held-out block's neighbours in its document may
            be in the training part (a holdout, not a test set: it only ranks candidates).

    Raises:
        ValueError: unknown ``name``.
        DatasetNotFoundError: the files are missing; the message names the directory.
    """
    builder, path = _builder(name)
    if builder is None:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
    options = getattr(builder, "options", ())
    if path is not None:
        builder = functools.partial(builder, path)
    if tokenizer is not None and "tokenizer" not in options:
        raise ValueError(f"tokenizer applies to text datasets, not to {name!r}")
    if image_size is not None and "image_size" not in options:
        raise ValueError(f"image_size applies to imagefolder data and text, not to {name!r} (its size is fixed)")
    kwargs = {k: v for k, v in (("image_size", image_size), ("tokenizer", tokenizer)) if v is not None}
    if not holdout:
        return builder(data_root, download, augment, **kwargs)
    if not 0 < holdout < 1:
        raise ValueError(f"holdout: a fraction of the training split in (0, 1), got {holdout!r}")
    bundle = builder(data_root, download, augment, **kwargs)
    # the held-out items as the test split sees them (no augmentation); a second build, since a
    # dataset's transform is part of it
    plain = builder(data_root, download, False, **kwargs) if augment else bundle
    train_idx, held_idx = holdout_split(len(bundle.train), holdout)
    return dataclasses.replace(bundle, train=Subset(bundle.train, train_idx), test=Subset(plain.train, held_idx))


#: the seed of :func:`holdout_split`'s permutation: one split for every run, so runs stay paired
HOLDOUT_SEED = 0


def holdout_split(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """(train, held-out) indices of a training split of ``n`` items: a fixed random permutation
    (:data:`HOLDOUT_SEED`, the same for every run and seed, so students stay paired), its first
    ``round(fraction·n)`` items held out (at least 1, at most n − 1), each part in index order."""
    k = min(max(round(fraction * n), 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    return perm[k:].sort().values.tolist(), perm[:k].sort().values.tolist()
