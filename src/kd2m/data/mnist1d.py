"""MNIST-1D (Greydanus & Kobak): 10 classes of 40-sample 1-D signals, generated locally.

Each digit is a 12-point template, padded, sheared, scaled, translated, smoothed, noised and
resampled to 40 points by the ``mnist1d`` package's ``make_dataset``, with the package's
published default arguments (:data:`GENERATION_ARGS` = ``mnist1d.data.get_dataset_args()``
without its ``url``): 5000 signals, 4000 train / 1000 test, seed 42. The package's download
path (``get_dataset``, which calls ``requests.get`` on a GitHub URL) is never used: the data
are *generated*, so ``download`` is irrelevant and no network is needed.

The generated arrays are cached under ``resolve_root(data_root)`` as
``mnist1d-v{FORMAT}-n5000-split0.8-len40-seed42-{hash}.npz`` (the hash covers every generation
argument; the file is written atomically), so the second build costs a file read (generation
takes seconds, importing the package another few: it imports matplotlib). A cache file that
cannot be read, or does not hold the expected arrays, is regenerated.

Items are ``(signal, label)``: a float32 tensor ``(1, 40)`` and an ``int``; the DataBundle has
``in_channels=1`` and ``image_size=40``: for 1-D data ``image_size`` is the sequence length.
Signals are standardised with the train split's mean and std (scalars over all train values,
as the package standardises its whole array). No augmentation.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic_io import atomic_write_bytes
from .digits import TensorImageDataset
from .registry import DataBundle, register_dataset, resolve_root

__all__ = ["FORMAT_VERSION", "GENERATION_ARGS", "ARRAYS", "cache_path", "generate", "load_arrays", "mnist1d"]

#: Bump when the cached file's content or layout changes.
FORMAT_VERSION = 1
#: ``mnist1d.data.get_dataset_args()`` of mnist1d 0.0.2 (the paper's dataset), ``url`` dropped
#: (never used); pinned so a cache hit needs no import of the package. A test checks the
#: package still publishes these values.
GENERATION_ARGS: dict[str, Any] = {
    "num_samples": 5000, "train_split": 0.8, "template_len": 12, "padding": [36, 60], "scale_coeff": 0.4,
    "max_translation": 48, "corr_noise_scale": 0.25, "iid_noise_scale": 2e-2, "shear_scale": 0.75,
    "shuffle_seq": False, "final_seq_length": 40, "seed": 42,
}
ARRAYS = ("x", "y", "x_test", "y_test")


def cache_path(root: Path, args: dict = GENERATION_ARGS) -> Path:
    """Where the arrays generated with ``args`` are cached: the key arguments in the name, plus
    a hash of all of them and the format version."""
    digest = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:10]
    return root / (f"mnist1d-v{FORMAT_VERSION}-n{args['num_samples']}-split{args['train_split']}"
                   f"-len{args['final_seq_length']}-seed{args['seed']}-{digest}.npz")


def generate(args: dict = GENERATION_ARGS) -> dict[str, np.ndarray]:
    """The package's ``make_dataset(args)`` arrays: ``x (n_train, L)``, ``y (n_train,)``,
    ``x_test``, ``y_test`` (float64 / int64), exactly as the package makes them.

    ``make_dataset`` seeds Python's and NumPy's global generators; their states are restored
    afterwards so building the data never changes the caller's random streams.
    """
    from mnist1d.data import get_templates, make_dataset  # imported here: it pulls in matplotlib
    from mnist1d.utils import ObjectView

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(ObjectView(dict(args)), template=get_templates())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {"x": np.asarray(data["x"], dtype=np.float64), "y": np.asarray(data["y"], dtype=np.int64),
            "x_test": np.asarray(data["x_test"], dtype=np.float64),
            "y_test": np.asarray(data["y_test"], dtype=np.int64)}


def _read_cache(path: Path, args: dict) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the file is missing, unreadable or not what ``args`` make."""
    total = args["num_samples"] // 10 * 10  # make_dataset makes num_samples // 10 signals per class
    n_train = int(total * args["train_split"])
    n_test = total - n_train
    length = args["final_seq_length"]
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ARRAYS}
    except (OSError, KeyError, ValueError, EOFError):  # missing, truncated, not an npz, wrong keys
        return None
    shapes = {"x": (n_train, length), "y": (n_train,), "x_test": (n_test, length), "y_test": (n_test,)}
    if any(arrays[k].shape != shape for k, shape in shapes.items()):
        return None
    return arrays


def load_arrays(data_root=None, args: dict = GENERATION_ARGS) -> dict[str, np.ndarray]:
    """The generated arrays, from the cache under ``resolve_root(data_root)`` or freshly made
    (then cached, atomically)."""
    path = cache_path(resolve_root(data_root), args)
    arrays = _read_cache(path, args)
    if arrays is None:
        arrays = generate(args)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]  # mypy matches **arrays to allow_pickle: bool too; its keys are ARRAYS
        atomic_write_bytes(path, buffer.getvalue())
    return arrays


@register_dataset("mnist1d")
def mnist1d(data_root=None, download=False, augment=True) -> DataBundle:
    """MNIST-1D as ``(1, 40)`` float32 signals, 4000 train / 1000 test; generated (never
    downloaded) and cached under ``data_root``. ``download`` and ``augment`` are ignored."""
    arrays = load_arrays(data_root)
    x_train = torch.as_tensor(arrays["x"]).unsqueeze(1)
    x_test = torch.as_tensor(arrays["x_test"]).unsqueeze(1)
    mean, std = x_train.mean(), x_train.std()
    return DataBundle(
        train=TensorImageDataset(((x_train - mean) / std).float(), torch.as_tensor(arrays["y"])),
        test=TensorImageDataset(((x_test - mean) / std).float(), torch.as_tensor(arrays["y_test"])),
        num_classes=10, in_channels=1, image_size=GENERATION_ARGS["final_seq_length"], name="mnist1d",
        classes=[str(d) for d in range(10)])
