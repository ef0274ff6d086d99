"""The engine and the `kd2m` command end to end on the embedded digits data."""
import json
import subprocess

import pytest
import torch

from kd2m.atomic_io import load_checkpoint
from kd2m.catalog import PAPER_METRICS
from kd2m.harness.cli import main
from kd2m.harness.config import RunConfig, load_yaml

from helpers import ENV, REPO_ROOT, kd2m_cmd, read_csv


def test_run_one_epoch_every_paper_metric(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--epochs", "1", "--teacher-epochs", "2", "--seeds", "1", "--out", str(out), "--no-progress"])
    assert code == 0
    rows = read_csv(out / "results.csv")
    methods = [r["method"] for r in rows]
    assert methods == ["teacher", "ce", "kd", "dkd", "dist", *PAPER_METRICS]
    for r in rows:
        assert 0.0 <= float(r["test_acc"]) <= 1.0
        assert (out / r["run_dir"] / "final.json").exists()
        assert (out / r["run_dir"] / "model.pt").exists()
        assert not (out / r["run_dir"] / "checkpoint.pt").exists()  # resume state removed once final
        log = [json.loads(line) for line in (out / r["run_dir"] / "log.jsonl").read_text().splitlines()]
        epochs = 2 if r["method"] == "teacher" else 1
        assert [e["epoch"] for e in log] == list(range(1, epochs + 1))
        if r["method"] in PAPER_METRICS:
            assert log[0]["distill"] > 0  # the distance was really computed and logged
    printed = capsys.readouterr().out
    assert "| W2 (E) |" in printed and "| teacher |" in printed and "results.csv" in printed
    assert (out / "results.md").read_text().count("\n|") >= 10


def test_accuracy_is_counted_over_all_test_samples(tmp_path):
    from kd2m.data import build_dataset
    from kd2m.harness.trainer import evaluate
    from kd2m.models import build_model
    bundle = build_dataset("digits")
    model = build_model("digits_mlp", bundle.num_classes, bundle.in_channels, bundle.image_size)
    loader = torch.utils.data.DataLoader(bundle.test, batch_size=97)  # uneven last batch
    acc = evaluate(model, loader, torch.device("cpu"))
    x = torch.stack([bundle.test[i][0] for i in range(len(bundle.test))])
    y = torch.tensor([bundle.test[i][1] for i in range(len(bundle.test))])
    with torch.no_grad():
        assert acc == pytest.approx(float((model(x).argmax(1) == y).double().mean()), abs=1e-12)


def test_students_share_initialisation_and_teacher_is_reused(tmp_path, monkeypatch):
    from kd2m.data import build_dataset
    from kd2m.training.build import build_student
    cfg = RunConfig().resolved()
    bundle = build_dataset("digits")
    a, b = build_student(cfg, bundle, 0), build_student(cfg, bundle, 0)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    c = build_student(cfg, bundle, 1)
    assert not all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))
    # a second grid in the same output directory trains no new teacher and no finished student
    out = tmp_path / "r"
    main(["run", "--epochs", "1", "--seeds", "1", "--metrics", "cw2", "--out", str(out), "--no-progress"])
    stamp = (out / "teacher/seed0/model.pt").stat().st_mtime_ns
    import kd2m.harness.trainer
    loaded = []
    real_load = kd2m.harness.trainer.load_checkpoint
    monkeypatch.setattr(kd2m.harness.trainer, "load_checkpoint", lambda p: loaded.append(p) or real_load(p))
    main(["run", "--epochs", "1", "--seeds", "1", "--metrics", "cw2,w2", "--out", str(out), "--no-progress"])
    assert (out / "teacher/seed0/model.pt").stat().st_mtime_ns == stamp
    # of the finished runs only the teacher's weights are read back (students' results come from final.json)
    assert [p.relative_to(out).as_posix() for p in loaded] == ["teacher/seed0/model.pt"]
    rows = read_csv(out / "results.csv")
    assert sorted(r["method"] for r in rows) == ["ce", "cw2", "dist", "dkd", "kd", "teacher", "w2"]


def test_yaml_config_and_command_line_override(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("dataset: digits\nmetrics: [w2, gauss_kl]\nepochs: 7\nseeds: [3, 4]\nweight: 0.5\n"
                        "metric_options:\n  gauss_kl: {diagonal: true}\n")
    from kd2m.harness.cli import build_parser
    from kd2m.harness.commands import config_from_args
    args = build_parser().parse_args(["run", "--config", str(cfg_file), "--epochs", "2", "--metrics", "cw2,w2"])
    cfg = config_from_args(args)
    assert cfg.epochs == 2 and cfg.metrics == ["cw2", "w2"] and cfg.seeds == [3, 4] and cfg.weight == 0.5
    file_only = load_yaml(cfg_file)
    assert file_only.term_options == {"gauss_kl": {"diagonal": True}}
    assert file_only.resolved().teacher == "digits_cnn"


def test_python_dash_m_lists_components():
    r = subprocess.run(kd2m_cmd("metrics"), capture_output=True, text=True, env=ENV, check=True)
    assert "cw2" in r.stdout and "cifar_resnet18" in r.stdout and "imagefolder" in r.stdout


def test_imagefolder_tree_through_the_cli(tmp_path):
    """A user's own PNGs (train/ and test/, a folder per class): size, channels and classes come
    from the data and the models adapt to them."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 12), ("test", 4)):
        for k, name in enumerate(["cat", "dog", "owl"]):
            d = tmp_path / "imgs" / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 60, size=(12, 12, 3), dtype=np.uint8)
                img[:, :, k] += 180  # one colour channel per class: learnable
                Image.fromarray(img).save(d / f"{i}.png")
    out = tmp_path / "run"
    code = main(["run", "--dataset", "imagefolder", "--data-root", str(tmp_path / "imgs"), "--teacher", "digits_cnn",
                 "--student", "digits_mlp", "--epochs", "3", "--teacher-epochs", "3", "--seeds", "1",
                 "--metrics", "cw2", "--baselines", "ce", "--batch-size", "8", "--lr", "0.05",
                 "--num-workers", "0", "--out", str(out), "--no-progress"])
    assert code == 0
    rows = {r["method"]: float(r["test_acc"]) for r in read_csv(out / "results.csv")}
    assert set(rows) == {"teacher", "ce", "cw2"}
    assert rows["teacher"] > 0.5  # 3 classes: chance is 1/3


def test_bf16_autocast_and_channels_last_run(tmp_path):
    """The GPU-path options also run on CPU: networks under bf16 autocast, distances in fp32."""
    out = tmp_path / "amp"
    code = main(["run", "--epochs", "2", "--teacher-epochs", "2", "--seeds", "1", "--metrics", "cw2,gauss_w2",
                 "--baselines", "ce", "--amp", "bf16", "--channels-last", "--out", str(out), "--no-progress"])
    assert code == 0
    rows = {r["method"]: float(r["test_acc"]) for r in read_csv(out / "results.csv")}
    assert rows["teacher"] > 0.5 and all(0.1 < v <= 1.0 for v in rows.values())


def test_changed_settings_never_reuse_old_runs(tmp_path, capsys):
    """`kd2m run --epochs 1` then `kd2m run --epochs 2` into the same directory must not report
    the 1-epoch results as 2-epoch ones: the stored settings are compared, and a mismatch is a
    clear error."""
    out = str(tmp_path / "r")
    base = ["run", "--teacher-epochs", "1", "--seeds", "1", "--metrics", "cw2", "--baselines", "ce",
            "--out", out, "--no-progress"]
    assert main(base + ["--epochs", "1"]) == 0
    capsys.readouterr()
    assert main(base + ["--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other settings" in err and "epochs 1 there, 2 now" in err
    assert main(base + ["--epochs", "1"]) == 0  # the same settings: everything reused
    assert "(finished earlier)" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["digits", "mnist1d"])
def test_shipped_config_equals_the_dataset_defaults(name):
    """One home for the defaults: configs/<name>.yaml writes DATASET_DEFAULTS out, and the two agree
    on every field (they disagreed on gauss_ckl/cmmd_rbf once)."""
    import dataclasses
    path = REPO_ROOT / "configs" / f"{name}.yaml"
    from_file = load_yaml(path).resolved()
    from_defaults = RunConfig(dataset=name, metrics=from_file.metrics, baselines=from_file.baselines).resolved()
    a, b = dataclasses.asdict(from_file), dataclasses.asdict(from_defaults)
    a.pop("out"), b.pop("out")
    for key in ("weights", "term_options"):  # entries for terms a grid does not run are moot
        used = set(from_file.metrics) | set(from_file.baselines)
        a[key] = {k: v for k, v in a[key].items() if k in used}
        b[key] = {k: v for k, v in b[key].items() if k in used}
    assert a == b


def test_parallel_seeds_give_the_sequential_results(tmp_path):
    """--parallel 2 trains two seeds at once in separate processes: the same rows, bit for bit, as
    one process training them in turn (each run seeds itself)."""
    args = ["run", "--seeds", "2", "--epochs", "1", "--teacher-epochs", "1", "--metrics", "cw2", "--baselines", "ce",
            "--no-progress"]
    assert main(args + ["--parallel", "2", "--out", str(tmp_path / "p")]) == 0
    assert main(args + ["--parallel", "1", "--out", str(tmp_path / "s")]) == 0
    par = {(r["method"], r["seed"]): r["test_acc"] for r in read_csv(tmp_path / "p/results.csv")}
    seq = {(r["method"], r["seed"]): r["test_acc"] for r in read_csv(tmp_path / "s/results.csv")}
    assert len(par) == 6 and par == seq
    a = load_checkpoint(tmp_path / "p/cw2/seed1/model.pt")
    b = load_checkpoint(tmp_path / "s/cw2/seed1/model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
