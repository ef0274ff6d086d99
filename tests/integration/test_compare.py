"""`kd2m compare`: the paired difference of two methods, refused for runs with other settings, teachers or
no common seed."""
import importlib.util

import pytest

from kd2m.harness import results as R
from kd2m.harness.cli import main

from helpers import ONE_EPOCH_GRID, REPO_ROOT, one_line_error, run_cli


def test_compare_refuses_runs_trained_with_other_settings(tmp_path, capsys):
    out = tmp_path / "o"
    assert run_cli(["run", *ONE_EPOCH_GRID, "--baselines", "ce", "--metrics", "", "--out", out], capsys)[0] == 0
    code, _, err = run_cli(["run", *ONE_EPOCH_GRID, "--epochs", "2", "--baselines", "", "--metrics", "cw2", "--out", out],
                           capsys)
    assert code == 0, err
    code, _, err = run_cli(["compare", out, "cw2:ce"], capsys)
    one_line_error(code, err, "compare cw2:ce", "other settings", "epochs 2 vs 1")


def test_compare_without_a_common_seed_says_so(tmp_path, capsys):
    out = tmp_path / "o"
    assert run_cli(["run", *ONE_EPOCH_GRID, "--baselines", "ce", "--metrics", "", "--out", out], capsys)[0] == 0
    code, _, err = run_cli(["run", *ONE_EPOCH_GRID, "--seeds", "1,", "--baselines", "", "--metrics", "cw2", "--out", out],
                           capsys)
    assert code == 0, err
    code, _, err = run_cli(["compare", out, "cw2:ce"], capsys)
    one_line_error(code, err, "no seed has both", "[1]", "[0]")


def _rows(accs):
    return [{"dataset": "x", "method": m, "seed": s, "test_acc": a, "weight": 0.0}
            for m, per in accs.items() for s, a in enumerate(per)]


def test_compare_is_the_paired_difference_of_two_methods(tmp_path, capsys):
    rows = _rows({"ce": [0.50, 0.60, 0.55], "cw2": [0.52, 0.61, 0.58], "cw2@auto*1": [0.55, 0.62, 0.57]})
    R.write_rows(tmp_path / "results.csv", rows)
    assert main(["compare", str(tmp_path), "--suffix", "@auto*1"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| CW2 (E) λ=auto*1")][0]
    d = [3.0, 1.0, -1.0]  # auto − swept per seed
    from scipy import stats
    lo, hi = stats.t.interval(0.95, 2, loc=1.0, scale=stats.sem(d))
    assert line == (f"| CW2 (E) λ=auto*1 | CW2 (E) | 3 | 58.00 | 57.00 | +1.00 [{lo:+.2f}, {hi:+.2f}] | "
                    f"{stats.ttest_rel([55, 62, 57], [52, 61, 58]).pvalue:.3f} | 2/3 | — |")
    assert main(["compare", str(tmp_path), "cw2:nope"]) == 2


def _compare_grids():
    spec = importlib.util.spec_from_file_location("bench_compare_grids", REPO_ROOT / "benchmarks" / "compare_grids.py")
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
    from kd2m.harness.paired import settings_difference
    a = {"teacher_options": {"n_layer": 2, "n_embd": 128, "n_head": 4, "resid_pdrop": 0.1}}
    b = {"teacher_options": {"n_layer": 2, "n_embd": 128, "n_head": 4, "resid_pdrop": 0.0}}
    assert settings_difference(a, b) == ["teacher_options.resid_pdrop 0.1 vs 0.0"]
    terms = [{"term": "dkd", "options": {"beta": 8}}]
    assert settings_difference({"terms": terms}, {"terms": [{"term": "dkd", "options": {"beta": 2}}]},
                               own=frozenset()) == ["terms[0].options.beta 8 vs 2"]


def test_a_top_k_student_compares_with_the_ce_only_student_that_reads_no_teacher():
    # the CE-only student records no teacher settings; every one that only a teacher-reading run
    # records (teacher_topk included) is left out of the comparison, as the grid's own table does
    from types import SimpleNamespace

    from kd2m.catalog import TEACHER_SETTINGS
    from kd2m.harness.config import RunConfig
    from kd2m.harness.paired import settings_difference
    from kd2m.training.methods import Method
    from kd2m.training.state import run_settings
    cfg = RunConfig(dataset="python_docs", task="lm", teacher_topk=8, teacher_cache=1, metrics=[], baselines=["ce", "fkl"])
    cfg = cfg.resolved()
    fkl = next(m for m in cfg.methods() if m.key == "fkl")
    with_teacher = run_settings(cfg, fkl, 0, 1, teacher=SimpleNamespace())
    ce_only = run_settings(cfg, Method("ce"), 0, 1, teacher=SimpleNamespace())
    assert set(with_teacher) - set(ce_only) <= TEACHER_SETTINGS | {"terms"}
    assert with_teacher["teacher_topk"] == 8 and settings_difference(with_teacher, ce_only) == []
