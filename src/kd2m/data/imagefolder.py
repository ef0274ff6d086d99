"""Your own images: ``data_root/train/<class>/*.png`` and ``data_root/test/<class>/*.png``.

The layout is torchvision's ``ImageFolder`` (one sub-folder per class, sorted names give the
labels). Everything else is read from the data:

- channels: 1 if most training images are grayscale, else 3 (every image is converted to match);
- size: the height of the most common (width, height) among the training images (or the
  ``image_size`` argument); every image is resized to ``size × size``, so mixed sizes work, and
  a warning names the chosen size and how many images differ (one 6000 px photo among 8 px
  images no longer decides the size of them all);
- normalisation: per-channel mean/std over (up to :data:`STATS_SAMPLE` evenly spaced) training images;
- 16-bit images are scaled to 8 bits (full scale → 255); a truncated or corrupt file is refused,
  naming it, before training (every file is checked structurally).
"""
from __future__ import annotations

import collections
import functools
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import datasets
from torchvision import transforms as T

from .registry import DataBundle, DatasetNotFoundError, register_dataset
from .torchvision_sets import image_transforms

__all__ = ["STATS_SAMPLE", "SHAPE_SAMPLE", "GRAYSCALE_MODES", "LAYOUT", "WIDE_MODES", "UNSCALED_MODES", "check_images",
           "ImageSizeWarning", "common_shape", "channel_stats", "imagefolder"]

#: How many training images the mean/std are computed from (evenly spaced, deterministic).
STATS_SAMPLE = 512
#: How many training images' headers the size and channels are read from (evenly spaced).
SHAPE_SAMPLE = 4096
GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "F"}
LAYOUT = "expected DATA_ROOT/train/<class>/<image> and DATA_ROOT/test/<class>/<image> (torchvision ImageFolder layout)"


#: Integer modes of more than 8 bits per pixel and the value of their full scale. PIL's
#: ``convert('L')`` clips them to 0/255 (a 16-bit image becomes black and white), so they are
#: scaled to 8 bits first. ("I" is how PIL opens 16-bit grayscale PNGs and TIFFs.)
WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}
#: Modes whose value range the file does not state (float images): refused, naming the file.
UNSCALED_MODES = {"F"}


def _load(path: str, mode: str) -> Image.Image:
    """Open an image in ``mode`` ('L' or 'RGB'); a module-level function so DataLoader workers
    can pickle it. Wide integer images are scaled to 8 bits (full scale → 255); an unreadable
    file is a ValueError naming it."""
    try:
        with open(path, "rb") as f:
            im: Image.Image = Image.open(f)
            if im.mode in UNSCALED_MODES:
                raise ValueError(f"{path}: a {im.mode!r} (floating-point) image has no stated value range; "
                                 "convert it to 8- or 16-bit integers")
            if im.mode in WIDE_MODES:
                wide = np.asarray(im, dtype=np.float64) * (255.0 / WIDE_MODES[im.mode])
                im = Image.fromarray(np.clip(np.rint(wide), 0, 255).astype(np.uint8), mode="L")
            return im.convert(mode)
    except (OSError, SyntaxError) as err:  # PIL: truncated or corrupt file, unknown format
        raise ValueError(f"{path}: not a readable image ({err}); remove or replace it") from None


def check_images(paths: list[str]) -> None:
    """Refuse, naming the file, the first image that is truncated, corrupt or of an unscaled mode:
    a structural check of every file (``Image.verify``: reads each file, decodes no pixels), run
    before training so that a bad file is not met at some step of some epoch."""
    for path in paths:
        try:
            with Image.open(path) as im:
                if im.mode in UNSCALED_MODES:
                    raise ValueError(f"{path}: a {im.mode!r} (floating-point) image has no stated value range; "
                                     "convert it to 8- or 16-bit integers")
                im.verify()
        except (OSError, SyntaxError) as err:
            raise ValueError(f"dataset 'imagefolder': {path}: not a readable image ({err}); remove or "
                             "replace it") from None


def _folder(root: Path, split: str, loader=datasets.folder.default_loader, transform=None) -> datasets.ImageFolder:
    path = root / split
    if not path.is_dir():
        raise DatasetNotFoundError(f"dataset 'imagefolder': no {split}/ directory in {root}; {LAYOUT}")
    try:
        return datasets.ImageFolder(str(path), loader=loader, transform=transform)
    except FileNotFoundError as err:  # no class folders, or class folders without images
        reason = str(err).splitlines()[0]
        raise DatasetNotFoundError(f"dataset 'imagefolder': {path} holds no usable images ({reason}); {LAYOUT}") from err


class ImageSizeWarning(UserWarning):
    """The training images do not all have the size the dataset resizes them to."""


def common_shape(paths: list[str], sample: int = SHAPE_SAMPLE) -> tuple[tuple[int, int], str, int, int]:
    """The most common (width, height) and mode ('L' or 'RGB') among up to ``sample`` evenly spaced
    images, read from their headers (``PIL.Image.open`` decodes no pixels).

    Returns:
        ((width, height), mode, how many of the checked images have another size, how many were checked).
        Ties go to the size seen first.
    """
    step = max(1, -(-len(paths) // sample))
    sizes: collections.Counter[tuple[int, int]] = collections.Counter()
    modes: collections.Counter[str] = collections.Counter()
    for path in paths[::step]:
        with Image.open(path) as im:
            sizes[im.size] += 1
            modes["L" if im.mode in GRAYSCALE_MODES else "RGB"] += 1
    (size, count), = sizes.most_common(1)
    checked = sum(sizes.values())
    return size, modes.most_common(1)[0][0], checked - count, checked


def channel_stats(paths: list[str], loader, size: int, sample: int = STATS_SAMPLE) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the pixels (in [0, 1]) of up to ``sample`` evenly spaced images."""
    to_tensor = T.Compose([T.Resize((size, size)), T.ToTensor()])
    step = max(1, len(paths) // sample)
    pixels = torch.cat([to_tensor(loader(p)).flatten(1) for p in paths[::step]], dim=1)  # (c, n·h·w)
    std = pixels.std(dim=1)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # a constant channel: centre it, don't divide by 0
    return pixels.mean(dim=1).tolist(), std.tolist()


@register_dataset("imagefolder")
def imagefolder(data_root=None, download=False, augment=True, image_size: int | None = None) -> DataBundle:
    """Images in ImageFolder layout under ``data_root`` (required); crop + flip augmentation.

    ``image_size``: resize every image to this × this; default the height of the most common
    training image size (see :func:`common_shape`). When the training images' sizes differ, an
    :class:`ImageSizeWarning` names the size used and how many images have another.
    """
    if data_root is None:
        raise DatasetNotFoundError(f"dataset 'imagefolder' needs --data-root; {LAYOUT}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 1):
        raise ValueError(f"dataset 'imagefolder': image_size must be a positive integer, got {image_size!r}")
    root = Path(data_root).expanduser().resolve()
    probe = _folder(root, "train")
    (width, height), mode, differ, checked = common_shape([path for path, _ in probe.samples])
    size = image_size or height
    if differ:
        warnings.warn(f"dataset 'imagefolder' in {root}: {differ} of {checked} training images are not "
                      f"{width}×{height}, the most common size; every image is resized to {size}×{size}"
                      + (" (image_size)" if image_size else " (set image_size to choose)"), ImageSizeWarning,
                      stacklevel=2)
    test_probe = _folder(root, "test")
    check_images([path for path, _ in probe.samples + test_probe.samples])
    loader = functools.partial(_load, mode=mode)
    resize = T.Resize((size, size))
    stats = channel_stats([path for path, _ in probe.samples], loader, size)

    train = _folder(root, "train", loader, T.Compose([resize, image_transforms(stats, augment, flip=True, size=size)]))
    test = _folder(root, "test", loader, T.Compose([resize, image_transforms(stats, False, flip=True, size=size)]))
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise ValueError(f"dataset 'imagefolder' in {root}: train/ and test/ class folders differ "
                         f"(only in train: {only_train or 'none'}; only in test: {only_test or 'none'})")
    return DataBundle(train=train, test=test, num_classes=len(train.classes), in_channels=1 if mode == "L" else 3,
                      image_size=size, name="imagefolder", classes=list(train.classes))


imagefolder.options = ("image_size",)  # type: ignore[attr-defined]  # a function attribute: build_dataset passes these through
