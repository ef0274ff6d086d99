"""Pretrained teacher and student files: a replaced file is not the old one, other classes refused or re-headed."""
import json

import torch

from helpers import ONE_EPOCH_GRID, one_line_error, run_cli


def _teacher_file(path, seed, num_classes=10):
    from kd2m.models import build_model
    torch.manual_seed(seed)
    torch.save(build_model("digits_cnn", num_classes, 1, 8).state_dict(), path)


def test_a_replaced_pretrained_teacher_is_not_the_old_one(tmp_path, capsys, monkeypatch):
    """The settings held the teacher file's path: a new file under the same name reused the old
    teacher's run (also from another working directory). They hold its content's digest now."""
    out = tmp_path / "o"
    argv = ["run", *ONE_EPOCH_GRID, "--teacher-epochs", "0", "--pretrained-teacher", "t.pt", "--baselines", "ce",
            "--metrics", "cw2", "--out", out]
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    _teacher_file(tmp_path / "a" / "t.pt", 0)
    _teacher_file(tmp_path / "b" / "t.pt", 1)
    monkeypatch.chdir(tmp_path / "a")
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    settings = json.loads((out / "cw2/seed0/final.json").read_text())["settings"]
    assert settings["pretrained_teacher"].startswith("sha256:")
    monkeypatch.chdir(tmp_path / "b")               # same name, other weights
    code, _, err = run_cli(argv, capsys)
    one_line_error(code, err, "holds a run made with other settings", "pretrained")
    monkeypatch.chdir(tmp_path / "a")               # the same file again: everything is reused
    code, out_text, err = run_cli(argv, capsys)
    assert code == 0 and out_text.count("(finished earlier)") == 3, err


def test_a_teacher_file_for_other_classes_is_refused_with_no_teacher_training(tmp_path, capsys):
    _teacher_file(tmp_path / "t5.pt", 0, num_classes=5)
    code, _, err = run_cli(["run", *ONE_EPOCH_GRID, "--teacher-epochs", "0", "--pretrained-teacher", tmp_path / "t5.pt",
                            "--baselines", "ce", "--metrics", "cw2", "--out", tmp_path / "o"], capsys)
    one_line_error(code, err, "t5.pt", "do not fit", "shape mismatch")
    assert not (tmp_path / "o" / "ce").exists()


def test_a_student_file_for_other_classes_gets_a_new_head_said_in_one_line(tmp_path, capsys):
    from kd2m.models import build_model
    torch.manual_seed(0)
    torch.save(build_model("digits_mlp", 5, 1, 8).state_dict(), tmp_path / "s5.pt")
    code, _, err = run_cli(["run", *ONE_EPOCH_GRID, "--pretrained-student", tmp_path / "s5.pt", "--baselines", "ce",
                            "--metrics", "", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    notes = [ln for ln in err.splitlines() if "s5.pt" in ln]
    assert len(notes) == 1 and "new randomly initialised head" in notes[0] and "(5, 64)" in notes[0]
