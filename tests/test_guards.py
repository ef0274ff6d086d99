"""Guards on what a user compares and trains: two grids paired only when their runs differ in λ
alone, the README's Hugging Face Trainer snippet as written, warm-ups given in epochs against the
run's length, and a non-finite step named for what went non-finite (and where, under torchrun)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from kd2m.cli import main

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(code, err, *needles):
    """``code`` is 2 and ``err`` is exactly one ``kd2m: error:`` line containing every needle."""
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kd2m: error: "), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# ----------------------------------------------------------------------------- compare_grids
def _compare_grids():
    spec = importlib.util.spec_from_file_location("bench_compare_grids", ROOT / "benchmarks" / "compare_grids.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _grid(out, *extra):
    argv = ["run", "--epochs", "1", "--seeds", "2", "--baselines", "ce", "--metrics", "cw2", "--parallel", "1",
            "--no-progress", "--out", str(out), *extra]
    assert main(argv) == 0


def test_compare_grids_refuses_grids_distilled_from_different_teachers(tmp_path, capsys):
    """The CE-only students of two grids agree whatever the teacher (CE never sees it), so that
    check alone paired students of a 1-epoch teacher with students of a 2-epoch one. Every stored
    setting but the method's λ must agree; grids that differ in cw2's λ alone still pair."""
    _grid(tmp_path / "a", "--teacher-epochs", "1", "--weight", "0.1")
    _grid(tmp_path / "other_teacher", "--teacher-epochs", "2", "--weight", "0.1")
    _grid(tmp_path / "other_lambda", "--teacher-epochs", "1", "--weight", "0.3")
    capsys.readouterr()
    cg = _compare_grids()
    with pytest.raises(SystemExit) as refused:
        cg.main([str(tmp_path / "a"), str(tmp_path / "other_teacher")])
    assert "teacher_epochs 1 vs 2" in str(refused.value) and "CW2 (E) seed 0" in str(refused.value)
    assert "| CW2 (E) |" not in capsys.readouterr().out
    assert cg.main([str(tmp_path / "a"), str(tmp_path / "other_lambda")]) == 0
    assert "| CW2 (E) |" in capsys.readouterr().out


def test_a_settings_difference_names_the_nested_entry_that_differs():
    """A difference inside a mapping or list of settings (the teacher's options, a term's options)
    is named down to its entry, not cut at 40 characters of the whole value."""
    from kd2m.results import settings_difference
    a = {"teacher_options": {"n_layer": 2, "n_embd": 128, "n_head": 4, "resid_pdrop": 0.1}}
    b = {"teacher_options": {"n_layer": 2, "n_embd": 128, "n_head": 4, "resid_pdrop": 0.0}}
    assert settings_difference(a, b) == ["teacher_options.resid_pdrop 0.1 vs 0.0"]
    terms = [{"term": "dkd", "options": {"beta": 8}}]
    assert settings_difference({"terms": terms}, {"terms": [{"term": "dkd", "options": {"beta": 2}}]},
                               own=frozenset()) == ["terms[0].options.beta 8 vs 2"]
