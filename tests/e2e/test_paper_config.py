"""The paper's own command, `kd2m bench configs/paper/cifar10.yaml`, end to end on tiny CIFAR-10
files in torchvision's on-disk format: real loader, crop+flip augmentation, CIFAR ResNets,
online and cached teacher. (Accuracy on 50 random images means nothing; the run must complete,
write its rows and match the features it says it matched.)"""
import csv
import json

from torchvision import datasets

from kd2m.data.torchvision_sets import CIFAR10_STATS
from kd2m.harness.cli import main

from helpers import REPO_ROOT, register_checksums, write_cifar  # the tiny-files writers of the data tests

CONFIG = REPO_ROOT / "configs" / "paper" / "cifar10.yaml"


def test_paper_cifar10_config_runs_online_and_cached(tmp_path, monkeypatch):
    write_cifar(tmp_path, datasets.CIFAR10, 10, "labels", CIFAR10_STATS)  # 5 train files × 10 images, 10 test
    register_checksums(monkeypatch, tmp_path, datasets.CIFAR10)
    # a teacher from a weights file, used as is (--teacher-epochs 0), as with a released teacher: halves the time
    import torch

    from kd2m.models import build_model
    torch.save(build_model("cifar_resnet34", 10).state_dict(), tmp_path / "teacher.pt")
    common = ["bench", str(CONFIG), "--data-root", str(tmp_path), "--epochs", "1", "--teacher-epochs", "0",
              "--pretrained-teacher", str(tmp_path / "teacher.pt"), "--seeds", "1",
              "--metrics", "cw2,gauss_w2", "--batch-size", "16", "--num-workers", "0", "--no-progress"]
    for cache in ("0", "2"):
        out = tmp_path / f"out{cache}"
        assert main(common + ["--out", str(out), "--teacher-cache", cache]) == 0
        with open(out / "results.csv", newline="") as f:
            rows = {r["method"]: r for r in csv.DictReader(f)}
        assert set(rows) == {"teacher", "ce", "kd", "cw2", "gauss_w2"}
        assert all(0.0 <= float(r["test_acc"]) <= 1.0 for r in rows.values())
        final = json.loads((out / "cw2/seed0/final.json").read_text())
        assert final["settings"]["model"] == "cifar_resnet18" and final["settings"]["teacher"] == "cifar_resnet34"
        assert final["settings"].get("teacher_cache", 0) == int(cache)
        log = json.loads((out / "gauss_w2/seed0/log.jsonl").read_text().splitlines()[0])
        assert log["distill"] > 0


def test_crd_protocol_config_with_a_released_style_teacher(tmp_path, monkeypatch):
    """`kd2m bench configs/crd/resnet32x4_resnet8x4.yaml --pretrained-teacher ckpt --teacher-epochs 0`
    on tiny CIFAR-100 files: the teacher checkpoint in RepDistiller's `{"model": state_dict}` form
    loads unchanged, the multistep schedule, baselines of every input kind (logits, pooled features
    with indices, maps) and a distance train, and results.md shows the published numbers."""
    import torch

    from kd2m.data.torchvision_sets import CIFAR100_STATS
    from kd2m.models import build_model
    write_cifar(tmp_path, datasets.CIFAR100, 100, "fine_labels", CIFAR100_STATS)
    register_checksums(monkeypatch, tmp_path, datasets.CIFAR100)
    ckpt = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": build_model("resnet32x4", 100).state_dict(), "epoch": 240}, ckpt)
    config = CONFIG.parents[1] / "crd" / "resnet32x4_resnet8x4.yaml"
    out = tmp_path / "crd"
    assert main(["bench", str(config), "--data-root", str(tmp_path), "--pretrained-teacher", str(ckpt),
                 "--teacher-epochs", "0", "--epochs", "1", "--seeds", "0", "--baselines", "ce,dkd,crd,fitnet",
                 "--metrics", "cw2", "--batch-size", "16", "--num-workers", "0", "--out", str(out),
                 "--no-progress"]) == 0
    with open(out / "results.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    # the config's named students (LS-KD, LS-DKD, WKD-L in its two parts, WKD-L + WKD-F) run too
    assert set(rows) == {"teacher", "ce", "dkd", "crd", "fitnet", "cw2", "ls_kd", "ls_dkd", "wkd_l", "wkd_l+wkd_f"}
    both = json.loads((out / "wkd_l+wkd_f/seed0/log.jsonl").read_text().splitlines()[0])
    assert sorted(both["weights"].values()) == [0.08, 1.0, 200.0]  # WKD's wkd_lf λ, before their decay at 150
    assert all(v > 0 for v in both["terms"].values())
    final = json.loads((out / "crd/seed0/final.json").read_text())["settings"]
    assert (final["model"], final["teacher"], final["lr_schedule"], final["lr_milestones"]) == \
        ("resnet8x4", "resnet32x4", "multistep", [150, 180, 210])
    fit = json.loads((out / "fitnet/seed0/log.jsonl").read_text().splitlines()[0])
    assert fit["terms"]["fitnet"] > 0 and fit["weights"]["fitnet"] == 100.0  # the authors' λ
    md = (out / "results.md").read_text()
    assert "published |" in md and "| 79.42 |" in md  # RepDistiller's resnet32x4 teacher, beside ours
