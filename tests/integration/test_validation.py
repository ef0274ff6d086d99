"""Refuse, never guess: everything a grid needs is checked before the first epoch, so nothing
fails after the teacher trained, and nothing ever runs on a silently wrong setting.
Each case must fail with one line, exit 2, and leave no trained teacher behind."""
import json

import pytest
import torch

from kd2m.harness.cli import main

TINY = ["--epochs", "1", "--teacher-epochs", "1", "--seeds", "0", "--no-progress"]


def _yaml(tmp, text):
    p = tmp / "c.yaml"
    p.write_text(text)
    return ["bench", str(p)]


def _wrong_student(tmp):
    from kd2m.models import build_model
    torch.save(build_model("digits_cnn", 10, 1, 8).state_dict(), tmp / "cnn.pt")
    return tmp / "cnn.pt"


REFUSED = [
    ("nan-max-pairwise", lambda t, o: ["run", "--max-pairwise-mb", "nan", "--out", o, *TINY], ["max_pairwise_mb"]),
    ("nan-weight", lambda t, o: ["run", "--weight", "nan", "--out", o, *TINY], ["weight"]),
    ("inf-lr", lambda t, o: ["run", "--lr", "inf", "--out", o, *TINY], ["lr"]),
    ("weights-typo", lambda t, o: _yaml(t, f"out: {o}\nweights: {{cw_2: 0.1}}\n"), ["weights", "'cw_2'", "cw2"]),
    ("empty-seeds", lambda t, o: ["run", "--seeds", "", "--out", o, "--epochs", "1"], ["seeds"]),
    ("bool-seeds", lambda t, o: _yaml(t, f"out: {o}\nseeds: [true]\n"), ["seeds"]),
    ("random-teacher", lambda t, o: ["run", "--teacher-epochs", "0", "--out", o, "--epochs", "1"],
     ["teacher_epochs", "random", "--pretrained-teacher"]),
    ("zero-temperature", lambda t, o: ["run", "--kd-temperature", "0", "--out", o, *TINY], ["kd_temperature"]),
    ("negative-sweep", lambda t, o: ["bench", "--sweep", "weight=0.1,-1", "--out", o, *TINY],
     ["--sweep weight", "-1"]),
    ("bad-metric-option-value", lambda t, o: _yaml(t, f"out: {o}\nepochs: 1\nseeds: [0]\nmetrics: [sinkhorn]\n"
                                                      "baselines: [ce]\nterm_options: {sinkhorn: {eps: -1}}\n"),
     ["sinkhorn"]),
    ("student-layer-typo", lambda t, o: ["run", "--student-layer", "nope", "--metrics", "cw2", "--out", o, *TINY],
     ["nope"]),
    ("wrong-arch-student", lambda t, o: ["run", "--pretrained-student", _wrong_student(t), "--out", o, *TINY],
     ["cnn.pt"]),
    ("map-term-on-an-mlp", lambda t, o: ["run", "--baselines", "ce,at", "--metrics", "", "--out", o, *TINY],
     ["at", "4-D"]),
    ("unknown-baseline-is-a-metric", lambda t, o: ["run", "--baselines", "cw2", "--out", o, *TINY],
     ["baselines", "'cw2'", "metrics"]),
    ("empty-out", lambda t, o: ["run", "--out", "", *TINY], ["out"]),
    ("ce-weight-typo", lambda t, o: _yaml(t, f"out: {o}\nce_weights: {{kdd: 0.1}}\n"), ["ce_weights", "'kdd'"]),
    ("negative-ce-weight", lambda t, o: _yaml(t, f"out: {o}\nce_weights: {{kd: -1}}\n"), ["ce_weights", "> 0"]),
    ("crd-negatives-typo", lambda t, o: _yaml(t, f"out: {o}\nepochs: 1\nseeds: [0]\nmetrics: []\nbaselines: [ce, crd]\n"
                                                 "term_options: {crd: {negatives: hard}}\n"),
     ["crd", "negatives", "other_class, uniform"]),
]


@pytest.mark.parametrize("argv, needles", [pytest.param(a, n, id=i) for i, a, n in REFUSED])
def test_refused_before_any_training(tmp_path, capsys, argv, needles):
    out = tmp_path / "out"
    code = main([str(a) for a in argv(tmp_path, out)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("kd2m: error: "), err
    for n in needles:
        assert n in err, (n, err)
    assert not (out / "teacher").exists()  # refused before the teacher trained


def test_lr_sweep_trains_the_ce_student_at_every_lr(tmp_path):
    """Δ vs CE of an lr sweep compares each student with the CE-only student of the same lr."""
    out = tmp_path / "s"
    assert main(["bench", "--sweep", "lr=0.05,0.1", "--metrics", "cw2", "--baselines", "ce", "--out", str(out),
                 *TINY]) == 0
    keys = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert keys == ["ce@lr=0.05", "ce@lr=0.1", "cw2@lr=0.05", "cw2@lr=0.1", "teacher"]
    md = (out / "results.md").read_text()
    assert "student (CE only) (lr=0.05)" in md and "CW2 (E) (lr=0.1)" in md
    from kd2m.harness import paired
    from kd2m.harness import results as R
    stats = {s["method"]: s for s in paired.summarize(R.read_rows(out / "results.csv"))}
    for lr in ("0.05", "0.1"):
        want = stats[f"cw2@lr={lr}"]["mean"] - stats[f"ce@lr={lr}"]["mean"]
        assert stats[f"cw2@lr={lr}"]["delta"] == pytest.approx(want)


def test_finished_teacher_without_weights_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    args = ["run", "--metrics", "cw2", "--baselines", "ce", "--out", str(out), *TINY]
    assert main(args) == 0
    (out / "teacher/seed0/model.pt").unlink()
    (out / "cw2/seed0/final.json").unlink()  # a student still to train needs that teacher
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "model.pt is missing" in err and "teacher/seed0" in err


def test_kill_windows_are_repaired_by_a_rerun(tmp_path):
    """A kill between the last checkpoint and log.jsonl left the log one epoch short for ever; a
    kill after final.json left checkpoint.pt beside it. A rerun repairs both."""
    out = tmp_path / "k"
    base = ["run", "--metrics", "cw2", "--baselines", "ce", "--epochs", "2", "--teacher-epochs", "1", "--seeds", "0",
            "--no-progress"]
    args = base + ["--out", str(out)]
    assert main(args) == 0
    run = out / "cw2/seed0"
    log = run / "log.jsonl"
    full = log.read_text()
    # 1. the checkpoint of the last epoch is on disk, the log is one epoch short, final.json not yet written
    from kd2m.atomic_io import save_checkpoint
    final = json.loads((run / "final.json").read_text())
    (run / "final.json").unlink()
    lines = full.splitlines()
    log.write_text(lines[0] + "\n")
    # rebuild the last checkpoint by rerunning from scratch into a twin directory and copying it
    twin = tmp_path / "twin"
    import kd2m.harness.trainer

    real_finish = kd2m.harness.trainer.Trainer._finish

    def stop_before_final(self, net, history, elapsed):
        if self.method.key != "cw2":
            return real_finish(self, net, history, elapsed)
        raise KeyboardInterrupt
    kd2m.harness.trainer.Trainer._finish = stop_before_final
    try:
        assert main(base + ["--out", str(twin)]) == 130  # interrupted after the last checkpoint
    finally:
        kd2m.harness.trainer.Trainer._finish = real_finish
    (run / "checkpoint.pt").write_bytes((twin / "cw2/seed0/checkpoint.pt").read_bytes())
    assert main(args) == 0
    assert [json.loads(x)["epoch"] for x in log.read_text().splitlines()] == [1, 2]
    assert json.loads((run / "final.json").read_text())["test_acc"] == final["test_acc"]
    assert not (run / "checkpoint.pt").exists()
    # 2. a checkpoint left beside final.json is removed by the next run
    save_checkpoint(run / "checkpoint.pt", {"stale": torch.zeros(1)})
    assert main(args) == 0
    assert not (run / "checkpoint.pt").exists()


def test_map_terms_and_the_teacher_cache(tmp_path, capsys):
    """The digits default the one-view teacher cache, which stores no maps: with a map term in the
    grid the default falls back to the online teacher for every student (alike); an explicit
    --teacher-cache is refused before training."""
    from kd2m.harness.config import RunConfig
    assert RunConfig(student="digits_cnn", baselines=["ce", "at"], metrics=[]).resolved().teacher_cache == 0
    assert RunConfig(baselines=["ce", "kd"], metrics=["cw2"]).resolved().teacher_cache == 1
    out = tmp_path / "o"
    code = main(["run", "--student", "digits_cnn", "--baselines", "ce,at", "--metrics", "", "--teacher-cache", "1",
                 "--out", str(out), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "teacher_cache" in err and "feature maps" in err
    assert not (out / "teacher").exists()


def test_a_redone_run_replaces_its_row(tmp_path):
    """Delete a run's directory and redo it with another λ: results.csv used to keep the old row
    (keyed on method and seed only), so the tables mixed the old result with the new settings."""
    import csv
    out = tmp_path / "r"
    base = ["run", "--metrics", "cw2", "--baselines", "ce", "--out", str(out), *TINY]
    assert main(base + ["--weight", "0.1"]) == 0
    import shutil
    shutil.rmtree(out / "cw2")
    assert main(base + ["--weight", "3.0"]) == 0
    rows = [r for r in csv.DictReader((out / "results.csv").open()) if r["method"] == "cw2"]
    final = json.loads((out / "cw2/seed0/final.json").read_text())
    assert len(rows) == 1 and float(rows[0]["weight"]) == 3.0
    assert float(rows[0]["test_acc"]) == final["test_acc"]
