"""kd2m.data: the real torchvision loaders on tiny files written in the real on-disk formats.

torchvision md5-checks every file. Instead of switching that check off, the tests register the
checksums of the files they write (monkeypatching the class's checksum table), so the check
still runs; with the real checksums the same files are reported as corrupted.
"""
import urllib.error

import numpy as np
import pytest
import scipy.io
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

from kd2m.data import DataBundle, DatasetNotFoundError, available_datasets, build_dataset, dataset_labels, resolve_root
from kd2m.data.torchvision_sets import CIFAR10_STATS, CIFAR100_STATS, SVHN_STATS
from kd2m.models import build_model

from helpers import md5, pixels, register_checksums, write_cifar  # shared with the paper-config run


def write_svhn(root, n=12):
    rng = np.random.default_rng(1)
    written = {}
    for split in ("train", "test"):
        x = pixels(rng, n, SVHN_STATS).transpose(1, 2, 3, 0)  # (32, 32, 3, n), the .mat layout
        y = rng.permutation(np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 1..10, '10' is digit 0
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
        written[split] = (x, y)
    return written


def register_svhn_checksums(monkeypatch, root):
    table = {split: [url, name, md5(root / name) if (root / name).exists() else md5_]
             for split, (url, name, md5_) in datasets.SVHN.split_list.items()}
    monkeypatch.setattr(datasets.SVHN, "split_list", table)


def random_ops(transform) -> set:
    return {type(t) for t in transform.transforms if isinstance(t, (T.RandomCrop, T.RandomHorizontalFlip))}


def channel_moments(dataset):
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))


def check_labels(dataset):
    """dataset_labels reads, without loading an image, the label each item has."""
    labels = dataset_labels(dataset)
    assert labels.dtype == torch.int64
    assert labels.tolist() == [int(dataset[i][1]) for i in range(len(dataset))]


def check_items(bundle: DataBundle, channels: int, size: int):
    image, label = bundle.train[0]
    assert image.dtype == torch.float32 and tuple(image.shape) == (channels, size, size)
    assert isinstance(label, int) and 0 <= label < bundle.num_classes
    assert (bundle.in_channels, bundle.image_size) == (channels, size)
    x, y = next(iter(DataLoader(bundle.test, batch_size=4)))
    assert tuple(x.shape) == (4, channels, size, size) and y.dtype == torch.int64


def test_available_and_unknown():
    assert available_datasets() == ["cifar10", "cifar100", "digits", "imagefolder", "mnist1d", "python_docs", "svhn",
                                    "text:PATH"]
    with pytest.raises(ValueError, match="available: cifar10, cifar100, digits, imagefolder, mnist1d, python_docs, "
                                         "svhn, text:PATH"):
        build_dataset("mnist")
    with pytest.raises(ValueError, match="unknown dataset 'text:'"):
        build_dataset("text:")  # a prefix needs its path


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.delenv("KD2M_DATA_ROOT", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_root(None) == (tmp_path / ".cache" / "kd2m" / "data").resolve()
    monkeypatch.setenv("KD2M_DATA_ROOT", str(tmp_path / "elsewhere"))
    assert resolve_root(None) == (tmp_path / "elsewhere").resolve()


# ---------------------------------------------------------------- digits
def test_digits_split_and_normalisation():
    bundle = build_dataset("digits")
    assert (len(bundle.train), len(bundle.test)) == (1437, 360)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size, bundle.name) == (10, 1, 8, "digits")
    check_items(bundle, 1, 8)
    train_counts = torch.bincount(bundle.train.labels, minlength=10)
    test_counts = torch.bincount(bundle.test.labels, minlength=10)
    expected = 0.2 * (train_counts + test_counts).float()
    assert torch.all((test_counts - expected).abs() <= 1), "the split is stratified"
    assert abs(bundle.train.images.mean().item()) < 1e-5 and abs(bundle.train.images.std().item() - 1) < 1e-5
    assert abs(bundle.test.images.mean().item()) < 0.1  # normalised with the train statistics
    again = build_dataset("digits", data_root="/ignored", augment=False)
    assert torch.equal(again.test.images, bundle.test.images) and torch.equal(again.test.labels, bundle.test.labels)


# ---------------------------------------------------------------- CIFAR / SVHN
@pytest.mark.parametrize("name, cls, num_classes, label_key, stats", [
    ("cifar10", datasets.CIFAR10, 10, "labels", CIFAR10_STATS),
    ("cifar100", datasets.CIFAR100, 100, "fine_labels", CIFAR100_STATS),
])
def test_cifar(monkeypatch, tmp_path, name, cls, num_classes, label_key, stats):
    test_images, test_labels = write_cifar(tmp_path, cls, num_classes, label_key, stats)
    register_checksums(monkeypatch, tmp_path, cls)
    bundle = build_dataset(name, data_root=tmp_path)
    assert (bundle.name, bundle.num_classes) == (name, num_classes)
    assert (len(bundle.train), len(bundle.test)) == (10 * len(cls.train_list), 10)
    assert bundle.classes[:2] == ["class0", "class1"]
    check_items(bundle, 3, 32)
    assert [bundle.test[i][1] for i in range(10)] == test_labels
    mean, std = torch.tensor(stats[0]).view(3, 1, 1), torch.tensor(stats[1]).view(3, 1, 1)
    restored = (bundle.test[0][0] * std + mean).permute(1, 2, 0) * 255  # undo Normalize + ToTensor
    assert torch.allclose(restored, torch.from_numpy(test_images[0]).float(), atol=1e-3)
    mu, sigma = channel_moments(bundle.test)
    assert mu.abs().max() < 0.1 and (sigma - 1).abs().max() < 0.15
    assert random_ops(bundle.train.transform) == {T.RandomCrop, T.RandomHorizontalFlip}
    assert random_ops(bundle.test.transform) == set()
    assert random_ops(build_dataset(name, data_root=tmp_path, augment=False).train.transform) == set()
    check_labels(bundle.train)
    check_labels(bundle.test)


def test_svhn(monkeypatch, tmp_path):
    written = write_svhn(tmp_path)
    register_svhn_checksums(monkeypatch, tmp_path)
    bundle = build_dataset("svhn", data_root=tmp_path)
    assert (bundle.name, bundle.num_classes, len(bundle.train), len(bundle.test)) == ("svhn", 10, 12, 12)
    check_items(bundle, 3, 32)
    x, y = written["test"]
    assert [bundle.test[i][1] for i in range(12)] == (y[:, 0] % 10).tolist()  # '10' → 0
    mean, std = torch.tensor(SVHN_STATS[0]).view(3, 1, 1), torch.tensor(SVHN_STATS[1]).view(3, 1, 1)
    restored = (bundle.test[3][0] * std + mean).permute(1, 2, 0) * 255
    assert torch.allclose(restored, torch.from_numpy(x[..., 3]).float(), atol=1e-3)
    mu, sigma = channel_moments(bundle.test)
    assert mu.abs().max() < 0.1 and (sigma - 1).abs().max() < 0.15
    assert random_ops(bundle.train.transform) == {T.RandomCrop}, "digits are not mirrored"
    check_labels(bundle.train)  # SVHN's '10' read as 0 here too


@pytest.mark.parametrize("name, where", [
    ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("svhn", ""),
])
def test_missing_dataset_is_one_clear_line(tmp_path, name, where):
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset(name, data_root=tmp_path / "data")
    message = str(info.value)
    assert "\n" not in message and f"'{name}'" in message and "--download" in message and "--data-root" in message
    assert str((tmp_path / "data" / where).resolve()) in message


def test_failed_download_is_one_clear_line(monkeypatch, tmp_path):
    def offline(*args, **kwargs):  # stands in for the network: no test ever downloads
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    monkeypatch.setattr(torchvision.datasets.svhn, "download_url", offline)
    for name in ("cifar10", "svhn"):
        with pytest.raises(DatasetNotFoundError, match=f"'{name}' could not be downloaded into .*no network") as info:
            build_dataset(name, data_root=tmp_path, download=True)
        assert "\n" not in str(info.value)


def test_corrupted_files_are_reported(tmp_path):
    write_cifar(tmp_path, datasets.CIFAR10, 10, "labels", CIFAR10_STATS, n=2)  # real checksums: these differ
    with pytest.raises(DatasetNotFoundError, match="corrupted"):
        build_dataset("cifar10", data_root=tmp_path)


# ---------------------------------------------------------------- imagefolder
def write_tree(root, mode="RGB", classes=("cat", "dog", "fox"), train=4, test=2, size=12, odd_size=(16, 10)):
    rng = np.random.default_rng(2)
    channels = 3 if mode == "RGB" else 1
    for split, count in (("train", train), ("test", test)):
        for c, name in enumerate(classes if count else ()):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                w, h = odd_size if (split == "train" and c == len(classes) - 1 and i == 0) else (size, size)
                arr = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8).squeeze(-1) if channels == 1 \
                    else rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                arr = np.clip(arr.astype(int) + 40 * c, 0, 255).astype(np.uint8)  # classes differ in brightness
                Image.fromarray(arr, mode=mode).save(root / split / name / f"img{i}.png")


@pytest.mark.parametrize("mode, channels", [("RGB", 3), ("L", 1)])
def test_imagefolder(tmp_path, mode, channels):
    write_tree(tmp_path, mode)
    bundle = build_dataset("imagefolder", data_root=tmp_path)
    assert (bundle.num_classes, bundle.classes, bundle.name) == (3, ["cat", "dog", "fox"], "imagefolder")
    assert (len(bundle.train), len(bundle.test)) == (12, 6)
    check_items(bundle, channels, 12)
    assert tuple(bundle.train[11][0].shape) == (channels, 12, 12), "a 16×10 image is resized to 12×12"
    check_labels(bundle.train)
    assert random_ops(bundle.train.transform.transforms[1]) == {T.RandomCrop, T.RandomHorizontalFlip}
    plain = build_dataset("imagefolder", data_root=tmp_path, augment=False)
    mu, sigma = channel_moments(plain.train)
    assert mu.abs().max() < 1e-2 and (sigma - 1).abs().max() < 1e-2
    x, y = next(iter(DataLoader(bundle.train, batch_size=5, shuffle=True)))
    for name in ("digits_cnn", "digits_mlp"):
        model = build_model(name, bundle.num_classes, bundle.in_channels, bundle.image_size)
        assert tuple(model(x).shape) == (5, 3)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="needs --data-root"):
        build_dataset("imagefolder")
    write_tree(tmp_path / "a", test=0)  # train/ only
    with pytest.raises(DatasetNotFoundError, match=r"no test/ directory .*DATA_ROOT/train/<class>"):
        build_dataset("imagefolder", data_root=tmp_path / "a")
    (tmp_path / "b" / "train").mkdir(parents=True)
    (tmp_path / "b" / "test").mkdir()
    with pytest.raises(DatasetNotFoundError, match="holds no usable images"):
        build_dataset("imagefolder", data_root=tmp_path / "b")
    write_tree(tmp_path / "c")
    write_tree(tmp_path / "c", classes=("emu",), train=0)
    with pytest.raises(ValueError, match=r"differ \(only in train: none; only in test: \['emu'\]\)"):
        build_dataset("imagefolder", data_root=tmp_path / "c")


def test_dataset_labels_of_embedded_sets_subsets_and_unknown_datasets():
    from torch.utils.data import Subset, TensorDataset
    bundle = build_dataset("digits")
    check_labels(bundle.train)
    sub = Subset(bundle.train, [5, 2, 9])
    assert dataset_labels(sub).tolist() == [int(bundle.train[i][1]) for i in (5, 2, 9)]
    # a dataset that keeps its labels nowhere readable: None, never a pass over its items
    assert dataset_labels(TensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 0]))) is None

    class Floats(torch.utils.data.Dataset):  # a "labels" attribute that is not class labels
        labels = np.array([0.5, 1.5])

        def __len__(self):
            return 2
    assert dataset_labels(Floats()) is None
