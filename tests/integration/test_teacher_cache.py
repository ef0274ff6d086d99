"""Teacher cache (offline distillation): pinned views, exact cached outputs, no teacher forward per step."""
import json

import pytest
import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from kd2m.data import DataBundle, build_dataset
from kd2m.errors import ConfigError
from kd2m.features import FeatureTap
from kd2m.harness.config import RunConfig
from kd2m.harness.trainer import Trainer, fit
from kd2m.models import build_model
from kd2m.training.build import freeze
from kd2m.training.methods import Method, TermConfig
from kd2m.training.teacher_cache import FixedViews, ViewSampler, build_teacher_cache

from helpers import REPO_ROOT


class Augmented(Dataset):
    """Random 10×10 images, cropped (padding 2) and flipped at random like CIFAR's training split."""

    def __init__(self, n=40, classes=4):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 10, 10, generator=g)
        self.y = torch.arange(n) % classes
        self.t = T.Compose([T.RandomCrop(10, padding=2), T.RandomHorizontalFlip()])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.t(self.x[i]), int(self.y[i])


def test_a_view_is_the_same_image_every_time_and_leaves_the_rng_alone():
    views = FixedViews(Augmented(), views=3, seed=7)
    before = torch.get_rng_state()
    a = views.view(5, 1)[0]
    assert torch.equal(torch.get_rng_state(), before)  # pinning a view draws nothing from the caller's stream
    torch.rand(100)  # whatever happened in between
    assert torch.equal(views.view(5, 1)[0], a)
    others = [views.view(5, v)[0] for v in (0, 2)] + [FixedViews(Augmented(), 3, seed=8).view(5, 1)[0]]
    assert not any(torch.equal(a, o) for o in others)  # other views, other seeds: other crops


def test_keys_name_views_and_each_epoch_shows_every_image_once_in_one_view():
    views = FixedViews(Augmented(n=40), views=3, seed=0)
    assert len(views) == 120 and views.images == 40
    x, y, key = views[3 * 3 + 2]
    assert key == 11 and y == 3 % 4 and torch.equal(x, views.view(3, 2)[0])
    sampler = ViewSampler(torch.utils.data.RandomSampler(range(40), generator=torch.Generator().manual_seed(1)), 3, 0)
    per_epoch = []
    for epoch in range(6):
        sampler.set_epoch(epoch)
        keys = list(sampler)
        assert sorted(k // 3 for k in keys) == list(range(40))  # every image once
        per_epoch.append({k // 3: k % 3 for k in keys})
    sampler.set_epoch(2)  # a resumed run: the epoch alone decides the views, no RNG state
    assert {k // 3: k % 3 for k in sampler} == per_epoch[2]
    assert per_epoch[0] != per_epoch[1]
    counts = [sum(per_epoch[e][i] == v for e in range(6) for i in range(40)) for v in range(3)]
    assert all(55 <= c <= 105 for c in counts), counts  # 240 picks, about uniform over the 3 views


def test_cached_outputs_are_the_teachers_outputs_on_those_views():
    data = Augmented(n=30)
    teacher = build_model("digits_cnn", 4, 3, 10).eval()
    views = FixedViews(data, views=2, seed=1)
    cache = build_teacher_cache(teacher, views, "penultimate", torch.device("cpu"), batch_size=16)
    assert cache.features.shape == (60, teacher.fc.in_features) and cache.logits.shape == (60, 4)
    keys = torch.tensor([0, 7, 59, 33])
    x = torch.stack([views.view(int(k) // 2, int(k) % 2)[0] for k in keys])
    with FeatureTap(teacher) as tap, torch.no_grad():
        logits = teacher(x)
        feats = tap.feature
    f, lg = cache.lookup(keys)
    torch.testing.assert_close(f, feats, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lg, logits, rtol=1e-5, atol=1e-6)


def test_cache_taps_a_named_layer():
    teacher = build_model("digits_cnn", 4, 3, 10).eval()
    layer = [n for n, m in teacher.named_modules() if isinstance(m, torch.nn.Conv2d)][-1]
    cache = build_teacher_cache(teacher, FixedViews(Augmented(n=8), 1, 0), layer, torch.device("cpu"))
    assert cache.features.shape[0] == 8 and cache.features.shape[1] == dict(teacher.named_modules())[layer].out_channels


def _train(tmp_path, cfg, bundle, teacher, method, name):
    torch.manual_seed(0)  # the same initial student for both runs
    student = build_model(cfg.student, bundle.num_classes, bundle.in_channels, bundle.image_size)
    return fit(student, bundle, cfg, method, 0, tmp_path / name, torch.device("cpu"), teacher=teacher)


def test_training_runs_no_teacher_forward_per_step(tmp_path):
    data = Augmented(n=48)
    bundle = DataBundle(train=data, test=Augmented(n=16), num_classes=4, in_channels=3, image_size=10, name="aug")
    # diagnostics off: their probe runs the teacher once per student on the test batch; counted here is training
    cfg = RunConfig(dataset="digits", teacher="digits_cnn", student="digits_mlp", epochs=3, batch_size=16,
                    teacher_cache=3, progress=False, diagnostics=False).resolved()
    teacher = freeze(build_model("digits_cnn", 4, 3, 10))
    calls = []
    teacher.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    caches = {}
    for method in (Method("cw2", (TermConfig("cw2", 0.1),)), Method("kd", (TermConfig("kd", 1.0),))):
        student = build_model("digits_mlp", 4, 3, 10)
        res = fit(student, bundle, cfg, method, 0, tmp_path / method.key, torch.device("cpu"), teacher=teacher,
                  teacher_caches=caches)
        assert res["settings"]["teacher_cache"] == 3
        log = [json.loads(line) for line in (tmp_path / method.key / "log.jsonl").read_text().splitlines()]
        assert len(log) == 3 and all(e["distill"] > 0 and e["terms"][method.key] > 0 for e in log)
    # 48 images × 3 views = 144 teacher inputs (+1 that probes the widths), once, for both
    # students, and one 2-image probe of the layer cw2 reads (its shapes); none during their 2×3 epochs
    assert sum(calls) == 144 + 1 + 2 and len(caches) == 1


def test_cached_run_matches_online_run_without_augmentation(tmp_path):
    """Digits have no augmentation: K=1 gives the student the same images and the same teacher
    outputs (to float rounding) as the online run, so training follows the same path."""
    bundle = build_dataset("digits")
    base = dict(epochs=2, teacher_epochs=1, progress=False, seeds=1)  # the teacher is given to fit() directly
    teacher = freeze(build_model("digits_cnn", 10, 1, 8))
    out = {}
    for k in (0, 1):
        cfg = RunConfig(teacher_cache=k, **base).resolved()
        for method in (Method("gauss_w2", (TermConfig("gauss_w2", 0.01),)), Method("kd", (TermConfig("kd", 1.0),))):
            out[k, method.key] = _train(tmp_path, cfg, bundle, teacher, method, f"{method.key}{k}")
    for key in ("gauss_w2", "kd"):
        assert out[1, key]["test_acc"] == out[0, key]["test_acc"]
        online = [json.loads(line) for line in (tmp_path / f"{key}0" / "log.jsonl").read_text().splitlines()]
        cached = [json.loads(line) for line in (tmp_path / f"{key}1" / "log.jsonl").read_text().splitlines()]
        for a, b in zip(online, cached):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_teacher_cache_must_be_non_negative():
    with pytest.raises(ConfigError, match="teacher_cache"):
        RunConfig(teacher_cache=-1).resolved()


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("views", [0, 3])
def test_interrupted_run_on_augmented_data_resumes_bit_identical(tmp_path, monkeypatch, workers, views):
    """Augmented data, online (views=0) or cached with K=3 views, in the main process or with 2
    loader workers: the crops (or views) drawn after a resume, and a rebuilt table, are those of
    the uninterrupted run, so the final weights are bit-identical."""
    from kd2m.atomic_io import load_checkpoint
    bundle = DataBundle(train=Augmented(n=48), test=Augmented(n=16), num_classes=4, in_channels=3, image_size=10,
                        name="aug")
    cfg = RunConfig(dataset="digits", teacher="digits_cnn", student="digits_mlp", epochs=4, batch_size=16,
                    teacher_cache=views, progress=False, num_workers=workers).resolved()
    torch.manual_seed(5)
    teacher = freeze(build_model("digits_cnn", 4, 3, 10))
    method = Method("cw2", (TermConfig("cw2", 0.1),))

    def run(name):
        torch.manual_seed(0)
        student = build_model("digits_mlp", 4, 3, 10)
        return fit(student, bundle, cfg, method, 0, tmp_path / name, torch.device("cpu"), teacher=teacher)

    ref = run("ref")
    real_epoch = Trainer._epoch

    def dies_in_epoch_3(self, net, epoch):
        if epoch == 2:  # epoch index: the checkpoint of epoch 2 is on disk
            raise KeyboardInterrupt
        return real_epoch(self, net, epoch)

    monkeypatch.setattr(Trainer, "_epoch", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        run("killed")
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["epoch"] == 2
    monkeypatch.setattr(Trainer, "_epoch", real_epoch)
    torch.rand(7)  # a new process would start from another global RNG state
    got = run("killed")
    assert got["test_acc"] == ref["test_acc"]
    a, b = load_checkpoint(tmp_path / "ref" / "model.pt"), load_checkpoint(tmp_path / "killed" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_readme_own_loop_snippet_runs():
    """The teacher-cache snippet of docs/concepts.md, as written, with a real loss in place of its '...'."""
    import re

    from torch.utils.data import DataLoader, RandomSampler

    from kd2m import FeatureTap, KD2MLoss
    page = (REPO_ROOT / "docs" / "concepts.md").read_text()
    code = next(c for c in re.findall(r"```python\n(.*?)```", page, re.S) if "ViewSampler" in c)
    code = code.replace("        ...", "        losses.append(float(loss_fn(tap(x), t_feats, y).detach()))")
    train_set, K, seed, epochs, device = Augmented(n=20), 2, 0, 2, torch.device("cpu")
    teacher = build_model("digits_cnn", 4, 3, 10).eval()
    student = build_model("digits_mlp", 4, 3, 10)
    s_tap = FeatureTap(student)
    scope = dict(FixedViews=FixedViews, ViewSampler=ViewSampler, build_teacher_cache=build_teacher_cache,
                 DataLoader=DataLoader, RandomSampler=RandomSampler, train_set=train_set, K=K, seed=seed,
                 epochs=epochs, device=device, teacher=teacher, losses=[], loss_fn=KD2MLoss("w2", weight=1.0),
                 tap=lambda x: (student(x), s_tap.feature)[1])
    exec(compile(code, "docs/concepts.md", "exec"), scope)
    assert len(scope["losses"]) == epochs and all(v > 0 for v in scope["losses"])
