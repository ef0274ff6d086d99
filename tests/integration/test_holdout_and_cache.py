"""The holdout split and the teacher cache's keys, by what a run sees: how many items are held
out, what a held-out item looks like, which memory rows CRD reads, which view of each image each
epoch shows.

Each test fails on a one-line bug the rest of the suite let through: the holdout size floored
instead of rounded, held-out items read through the training augmentation, the terms given the
cache key (``index·K + view``) instead of the image's index, the sampler's epoch never set (every
epoch showing epoch 0's views)."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import SequentialSampler

from kd2m.data import build_dataset
from kd2m.data.registry import holdout_split
from kd2m.harness.config import RunConfig
from kd2m.harness.trainer import Trainer
from kd2m.losses.relational import CRD
from kd2m.training.build import build_student, build_teacher, freeze
from kd2m.training.step import Step
from kd2m.training.teacher_cache import ViewSampler

N_DIGITS = 1437   # the digits' training split


# ------------------------------------------------------------------------------------- holdout
def test_the_holdout_holds_out_the_rounded_share():
    """0.1 of 1437 digits is 143.7: 144 held out, 1293 trained on, together every index once."""
    bundle = build_dataset("digits", holdout=0.1)
    assert (len(bundle.test), len(bundle.train)) == (144, 1293)
    assert sorted(bundle.train.indices + bundle.test.indices) == list(range(N_DIGITS))
    train, held = holdout_split(9, 0.3)                     # 2.7 → 3
    assert len(held) == 3 and len(train) == 6 and held == sorted(held)
    assert len(holdout_split(10, 0.04)[1]) == 1            # 0.4 → at least one
    assert len(holdout_split(10, 0.99)[1]) == 9            # 9.9 → at most n − 1


def _image_folder(root, per_class=6, size=16):
    """A tiny ImageFolder: two classes of random RGB images, in train/ and test/."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 1)):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


def test_held_out_images_are_read_without_the_training_augmentation(tmp_path):
    """With augmentation on (random crop + flip), a held-out image is the plain image: the same
    tensor on every read, equal to the un-augmented training item at its index."""
    _image_folder(tmp_path)
    torch.manual_seed(0)
    bundle = build_dataset("imagefolder", data_root=tmp_path, holdout=0.25)
    plain = build_dataset("imagefolder", data_root=tmp_path, augment=False)
    _, held = holdout_split(12, 0.25)
    assert bundle.test.indices == held and len(held) == 3
    for k, i in enumerate(held):
        x, y = bundle.test[k]
        x_plain, y_plain = plain.train[i]
        assert y == y_plain and torch.equal(x, x_plain)
        assert torch.equal(bundle.test[k][0], x)
    # the training part is augmented: the same image reads differently (so the check above means something)
    i = bundle.train.indices[0]
    reads = [bundle.train.dataset[i][0] for _ in range(6)]
    assert any(not torch.equal(r, plain.train[i][0]) for r in reads)


# --------------------------------------------------------------------------------- teacher cache
def _trainer(tmp_path, **fields):
    cfg = RunConfig(progress=False, diagnostics=False, **fields).resolved()
    bundle = build_dataset("digits")
    teacher = freeze(build_teacher(cfg, bundle, 0))
    return Trainer(build_student(cfg, bundle, 0), bundle, cfg, cfg.methods()[0], 0, tmp_path / "r",
                   torch.device("cpu"), teacher=teacher)


def _spy_keys(monkeypatch):
    """The keys of every training step (calibration passes no ``net``)."""
    keys, real = [], Step.forward

    def forward(self, x, y, key, **kw):
        if kw.get("net") is not None:
            keys.append(key.clone())
        return real(self, x, y, key, **kw)
    monkeypatch.setattr(Step, "forward", forward)
    return keys


def test_crd_reads_the_memory_rows_of_the_images_not_of_their_cached_views(tmp_path, monkeypatch):
    """With ``teacher_cache: 2`` a step's keys are ``index·2 + view``; CRD's memory bank has one row
    per image, and is given ``key // 2``: every image's row, once per epoch."""
    tr = _trainer(tmp_path, epochs=1, baselines=["crd"], metrics=[], weights={"crd": 0.8}, teacher_cache=2,
                  batch_size=256, term_options={"crd": {"nce_k": 16}})
    keys = _spy_keys(monkeypatch)
    indices, real = [], CRD.forward

    def forward(self, *, index, **kw):
        indices.append(index.clone())
        return real(self, index=index, **kw)
    monkeypatch.setattr(CRD, "forward", forward)
    tr.fit()
    crd = tr.terms[0].module
    assert len(keys) == len(indices) == 6                  # ⌈1437 / 256⌉
    for k, i in zip(keys, indices):
        assert torch.equal(i, k // 2)
    assert bool((torch.cat(keys) % 2 == 1).any())          # view 1 was drawn: a key is not an index
    assert sorted(torch.cat(indices).tolist()) == list(range(N_DIGITS))
    assert crd.memory_s.shape[0] == N_DIGITS


def test_each_epoch_shows_each_image_in_that_epochs_view(tmp_path, monkeypatch):
    """``teacher_cache: 4``, three epochs: epoch e shows image i once, in view
    ``ViewSampler``'s (seed 0, e, i); the epochs' views differ (not epoch 0's forever)."""
    tr = _trainer(tmp_path, epochs=3, baselines=[], metrics=["gauss_w2"], weights={"gauss_w2": 0.5},
                  teacher_cache=4, batch_size=512)
    keys = _spy_keys(monkeypatch)
    tr.fit()
    assert len(keys) == 9                                   # 3 epochs of ⌈1437 / 512⌉ steps
    shown = []
    for e in range(3):
        got = sorted(torch.cat(keys[3 * e:3 * e + 3]).tolist())
        oracle = ViewSampler(SequentialSampler(range(N_DIGITS)), 4, 0)
        oracle.set_epoch(e)
        assert got == list(oracle), e                       # image order ascending: keys index·4 + view ascend
        shown.append(got)
    assert shown[0] != shown[1] and shown[1] != shown[2] and shown[0] != shown[2]
    agree = sum(a == b for a, b in zip(shown[0], shown[1])) / N_DIGITS
    assert agree == pytest.approx(0.25, abs=0.05)          # an independent view each epoch: 1 in 4 repeat
