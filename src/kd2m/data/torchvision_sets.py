"""CIFAR-10, CIFAR-100 and SVHN through torchvision, in torchvision's on-disk layouts.

``data_root`` is torchvision's ``root``: it holds ``cifar-10-batches-py/``,
``cifar-100-python/`` or ``train_32x32.mat`` + ``test_32x32.mat`` (SVHN). Files are
md5-checked by torchvision; a missing or corrupted file becomes a one-line
:class:`DatasetNotFoundError`.
"""
from __future__ import annotations

from pathlib import Path

from torchvision import datasets
from torchvision import transforms as T

from .registry import DataBundle, DatasetNotFoundError, register_dataset, resolve_root

__all__ = ["CIFAR10_STATS", "CIFAR100_STATS", "SVHN_STATS", "image_transforms", "SHAPES", "cifar10", "cifar100", "svhn"]

# Per-channel pixel mean/std of each train split (values in [0, 1]).
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
SVHN_STATS = ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))


def image_transforms(stats, augment: bool, flip: bool, size: int = 32) -> T.Compose:
    """ToTensor + Normalize, after RandomCrop(size, padding=size//8) [+ flip] when ``augment``."""
    steps = []
    if augment:
        steps.append(T.RandomCrop(size, padding=size // 8))
        if flip:
            steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(*stats)]
    return T.Compose(steps)


def _open(name: str, folder: Path, root: Path, holds: str, download: bool, factory):
    """``factory()`` with torchvision's missing-file and download errors turned into one clear line.

    ``folder`` is where the files were looked for, ``holds`` what ``--data-root`` must contain.
    """
    hint = f"pass --download to fetch it, or point --data-root at a directory that holds {holds}"
    try:
        return factory()
    except RuntimeError as err:
        if "not found or corrupted" not in str(err):
            raise
        what = "still missing or corrupted after --download" if download else "not found (or corrupted)"
        raise DatasetNotFoundError(f"dataset '{name}' {what} in {folder}; {hint}") from err
    except OSError as err:  # no network, refused connection, disk full during --download
        if not download:
            raise
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DatasetNotFoundError(
            f"dataset '{name}' could not be downloaded into {root} ({reason}); "
            f"copy the files to {folder} and point --data-root at {root}") from err


def _cifar(name: str, cls, stats, data_root, download, augment) -> DataBundle:
    root = resolve_root(data_root)
    folder = root / cls.base_folder

    def factory():
        return (cls(str(root), train=True, download=download, transform=image_transforms(stats, augment, flip=True)),
                cls(str(root), train=False, download=download, transform=image_transforms(stats, False, flip=True)))

    train, test = _open(name, folder, root, f"{cls.base_folder}/", download, factory)
    return DataBundle(train=train, test=test, num_classes=len(train.classes), in_channels=3, image_size=32,
                      name=name, classes=list(train.classes))


#: (classes, channels, image size) of each dataset here, known without its files (the
#: reproduction card resolves layers on models of these shapes)
SHAPES = {"cifar10": (10, 3, 32), "cifar100": (100, 3, 32), "svhn": (10, 3, 32)}


@register_dataset("cifar10")
def cifar10(data_root=None, download=False, augment=True) -> DataBundle:
    """CIFAR-10: 50k/10k 32×32 RGB images, 10 classes; crop + flip augmentation."""
    return _cifar("cifar10", datasets.CIFAR10, CIFAR10_STATS, data_root, download, augment)


@register_dataset("cifar100")
def cifar100(data_root=None, download=False, augment=True) -> DataBundle:
    """CIFAR-100 (fine labels): 50k/10k 32×32 RGB images, 100 classes; crop + flip augmentation."""
    return _cifar("cifar100", datasets.CIFAR100, CIFAR100_STATS, data_root, download, augment)


@register_dataset("svhn")
def svhn(data_root=None, download=False, augment=True) -> DataBundle:
    """SVHN: 73,257/26,032 32×32 RGB house-number digits, label 0..9 (torchvision maps '10' to 0).

    Crop augmentation only: a mirrored digit is not the same digit.
    """
    root = resolve_root(data_root)

    def factory():
        return (datasets.SVHN(str(root), split="train", download=download,
                              transform=image_transforms(SVHN_STATS, augment, flip=False)),
                datasets.SVHN(str(root), split="test", download=download,
                              transform=image_transforms(SVHN_STATS, False, flip=False)))

    train, test = _open("svhn", root, root, "train_32x32.mat and test_32x32.mat", download, factory)
    return DataBundle(train=train, test=test, num_classes=10, in_channels=3, image_size=32, name="svhn",
                      classes=[str(d) for d in range(10)])
