"""Datasets by name: ``build_dataset(name, data_root=None, download=False, augment=True)``.

    >>> from kd2m.data import build_dataset
    >>> bundle = build_dataset("digits")
    >>> len(bundle.train), len(bundle.test), bundle.num_classes, bundle.in_channels, bundle.image_size
    (1437, 360, 10, 1, 8)

Modules: ``registry`` (``DataBundle``, the registry, default data root), ``digits`` (embedded
8×8 digits), ``mnist1d`` (MNIST-1D, generated locally: 1-D signals ``(1, 40)``; ``image_size`` is
the sequence length), ``torchvision_sets`` (cifar10, cifar100, svhn), ``imagefolder`` (your own images),
``text`` (``python_docs`` and ``text:PATH``: token blocks for language models).
"""
from . import digits, imagefolder, mnist1d, text, torchvision_sets  # noqa: F401,E402  (registers the datasets)
from .registry import (  # noqa: F401
                       DEFAULT_DATA_ROOT,
                       DataBundle,
                       DatasetNotFoundError,
                       available_datasets,
                       build_dataset,
                       dataset_labels,
                       dataset_task,
                       is_dataset,
                       register_dataset,
                       register_dataset_prefix,
                       resolve_root,
)

__all__ = ["build_dataset", "dataset_labels", "available_datasets", "register_dataset", "resolve_root", "DataBundle",
           "DatasetNotFoundError", "DEFAULT_DATA_ROOT"]
