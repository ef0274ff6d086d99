"""scikit-learn's 8×8 handwritten digits: 1797 images, 10 classes, no download, CPU-fast.

The split is fixed (stratified 80/20, ``random_state=0``: 1437 train / 360 test) so every
run and every seed sees the same test set. Pixels (0..16) are normalised with the train
split's mean and std. No augmentation: a 2-pixel shift or a mirror of an 8×8 digit changes
what digit it looks like.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .registry import DataBundle, register_dataset

__all__ = ["SPLIT_SEED", "TEST_FRACTION", "TensorImageDataset", "digits"]

SPLIT_SEED = 0
TEST_FRACTION = 0.2


class TensorImageDataset(Dataset):
    """Images and labels held in memory.

    Args:
        images: ``(n, c, h, w)`` float32.
        labels: ``(n,)`` int64.
    """

    def __init__(self, images: Tensor, labels: Tensor):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])


@register_dataset("digits")
def digits(data_root=None, download=False, augment=True) -> DataBundle:
    """The 8×8 digits as ``(1, 8, 8)`` tensors; ``data_root``, ``download`` and ``augment`` are ignored."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.images, data.target, test_size=TEST_FRACTION, stratify=data.target, random_state=SPLIT_SEED)
    x_train = torch.as_tensor(x_train, dtype=torch.float32).unsqueeze(1)
    x_test = torch.as_tensor(x_test, dtype=torch.float32).unsqueeze(1)
    mean, std = x_train.mean(), x_train.std()
    return DataBundle(
        train=TensorImageDataset((x_train - mean) / std, torch.as_tensor(y_train, dtype=torch.long)),
        test=TensorImageDataset((x_test - mean) / std, torch.as_tensor(y_test, dtype=torch.long)),
        num_classes=10, in_channels=1, image_size=8, name="digits",
        classes=[str(c) for c in data.target_names])
