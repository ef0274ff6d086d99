"""What the λ selection pilot (`weight: auto` in a grid, kd2m.harness.select_k) and the dry-run card say
is what trains: named students, K = 0, sweeps, torchrun, and the inputs refused before training."""
import json

import pytest

from kd2m.harness.cli import main


def _write(tmp_path, extra: str = "", name: str = "c.yaml"):
    """A tiny digits grid (1 epoch, seed 0, pilot seed 100) with the YAML lines ``extra`` after it."""
    out = tmp_path / "g"
    cfg = tmp_path / name
    cfg.write_text(f"out: {out}\nepochs: 1\nteacher_epochs: 1\nseeds: [0]\nparallel: 1\nprogress: false\n"
                   f"select_seeds: [100]\n{extra}")
    return cfg, out


def _final(out, method, seed=0):
    return json.loads((out / method / f"seed{seed}" / "final.json").read_text())


@pytest.fixture(scope="module")
def off_grid(tmp_path_factory):
    """A grid whose pilot switches its terms off: K = 10⁶ collapses every student to chance, so
    K = 0 wins for KD (CE weight 0.1 by default) and CW2; a named student and the ``distill:`` one
    give CW2 no weight."""
    tmp = tmp_path_factory.mktemp("off")
    cfg, out = _write(tmp, "metrics: [cw2]\nbaselines: [ce, kd]\nweight: auto\nweights: {kd: auto}\n"
                           "select_k: [0, 1000000]\nstudents: {pair: [{term: cw2}]}\ndistill: [cw2, {term: kd, weight: 1}]\n")
    assert main(["bench", str(cfg)]) == 0
    return out


def test_a_named_student_without_a_weight_trains_at_auto_times_one(off_grid):
    """Named students are never chosen for: their `auto` is auto×1 (README, the card, results.md),
    not the K the pilot chose for the single-term student of the same term."""
    chosen = json.loads((off_grid / "select-k/selected.json").read_text())["chosen"]
    assert chosen["cw2"]["k"] == 0
    assert _final(off_grid, "cw2")["settings"]["terms"][0]["weight"] == 0.0
    pair = _final(off_grid, "pair")["settings"]["terms"][0]
    assert pair["weight"] == 1.0 and pair["auto"]
    assert "pair auto×1" in (off_grid / "results.md").read_text()
    both = _final(off_grid, "cw2+kd")["settings"]["terms"]  # distill's student too (it ended the grid before)
    assert (both[0]["weight"], both[0]["auto"], both[1]["weight"]) == (1.0, True, 1.0)


def test_k_0_reports_the_student_the_pilot_scored(off_grid):
    """K = 0 was scored by the CE-only student (CE weight 1): a KD chosen at K = 0 trains as that
    student, not as 0.1·CE + 0·KD, a student no pilot scored."""
    assert json.loads((off_grid / "select-k/selected.json").read_text())["chosen"]["kd"]["k"] == 0
    kd, ce = _final(off_grid, "kd"), _final(off_grid, "ce")
    assert "ce_weight" not in kd["settings"]  # CE weight 1
    assert kd["test_acc"] == ce["test_acc"]


def test_a_grid_run_again_for_some_terms_keeps_the_other_terms_choice(off_grid, tmp_path):
    """More seeds of a few students, into the same directory (a grid of a subset of its terms):
    selected.json kept only that subset's choice, and the record of the others was lost."""
    import shutil
    again = tmp_path / "g"
    shutil.copytree(off_grid, again)
    cfg, out = _write(tmp_path, "metrics: [cw2]\nbaselines: [ce]\nweight: auto\nselect_k: [0, 1000000]\n")
    assert out == again
    assert main(["bench", str(cfg)]) == 0
    chosen = json.loads((again / "select-k/selected.json").read_text())["chosen"]
    assert set(chosen) == {"cw2", "kd"} and chosen["kd"]["k"] == 0
    assert chosen == json.loads((off_grid / "select-k/selected.json").read_text())["chosen"]


@pytest.mark.parametrize("weight, sweep, lam", [("auto", "auto_weight=0.3,3", (1.0, True)),
                                                ("0.05", "weight=0.01,0.1", (0.05, False))])
def test_a_sweep_of_lambda_trains_a_named_student_at_its_own_lambda(tmp_path, weight, sweep, lam):
    """A λ sweep runs named students once, at the configuration's λ (results.md's header says so);
    an entry without a weight trained at the first swept value in every variant."""
    cfg, out = _write(tmp_path, f"metrics: [cw2]\nbaselines: [ce]\nweight: {weight}\n"
                                "students: {pair: [{term: cw2}]}\n")
    assert main(["bench", str(cfg), "--sweep", sweep]) == 0
    term = _final(out, "pair")["settings"]["terms"][0]
    assert (term["weight"], term["auto"]) == lam
    header = (out / "results.md").read_text().splitlines()[2]
    auto = "auto×" if lam[1] else ""
    assert f"pair {auto}{lam[0]:g}" in header
    for v in sweep.split("=")[1].split(","):  # and the swept students' λ, each as it trained
        assert f"cw2@{'auto*' if lam[1] else ''}{v} {auto}{v}" in header
    assert not (out / "select-k").exists()  # a sweep chooses nothing


def _card_students(card: str) -> dict:
    """{student key: its section's text} of a reproduction card."""
    parts = card.split("\n### ")[1:]
    return {p.split(" — ")[0]: p for p in parts}


def test_the_dry_run_card_lists_exactly_the_runs_a_sweep_trains(tmp_path, capsys):
    """`--dry-run --sweep lr=…` showed the recipe's lr 0.05 and one student per method, while the
    command trains every student once per swept lr and none at 0.05."""
    args = ["bench", "--metrics", "cw2", "--baselines", "ce,kd", "--seeds", "0,", "--epochs", "1",
            "--teacher-epochs", "1", "--parallel", "1", "--no-progress", "--out", str(tmp_path / "g"),
            "--sweep", "lr=0.01,0.1"]
    assert main(args + ["--dry-run"]) == 0
    card = capsys.readouterr().out
    lr_row = next(line for line in card.splitlines() if line.startswith("| lr |"))
    assert lr_row == "| lr | 0.05 (teacher); students: 0.01, 0.1 | dataset default; --sweep |"
    students = _card_students(card)
    assert students["cw2@lr=0.01"].count("lr 0.01 (--sweep).") == 1
    assert main(args) == 0
    trained = {p.name for p in (tmp_path / "g").iterdir() if p.is_dir()} - {"teacher"}
    assert set(students) == trained == {f"{m}@lr={v}" for m in ("ce", "kd", "cw2") for v in ("0.01", "0.1")}


def test_the_dry_run_card_shows_each_swept_lambda(capsys):
    assert main(["bench", "--dry-run", "--metrics", "cw2", "--baselines", "ce,kd", "--weight", "auto",
                 "--sweep", "auto_weight=0.3,3"]) == 0
    students = _card_students(capsys.readouterr().out)
    assert set(students) == {"ce", "kd", "cw2@auto*0.3", "cw2@auto*3"}  # kd at its number runs once
    assert "| auto×0.3 (--sweep) |" in students["cw2@auto*0.3"] and "| auto×3 (--sweep) |" in students["cw2@auto*3"]


@pytest.mark.parametrize("args, says", [
    (["--select-k", ""], "select_k: no K in ''"),
    (["--select-k", ",,"], "select_k: no K in ',,'"),
    (["--holdout", "0.2"], "holdout 0.2 would report on held-out training images the pilot grid chooses K on"),
    (["--select-seeds", "2"], "seeds [0] would both choose λ and be reported"),  # a count, as --seeds 2
])
def test_selection_inputs_that_would_mislead_are_refused_before_anything_is_written(tmp_path, cli_refuses, args, says):
    """`--select-k ""` silently meant none; `--holdout` with a bare auto chose K on the very
    images it reported on; `--select-seeds 2` meant seed 2 while `select_seeds: 2` meant 0, 1."""
    cfg, out = _write(tmp_path, "metrics: [cw2]\nbaselines: [ce]\nweight: auto\n")
    cli_refuses(["bench", cfg, *args], says)
    assert not out.exists()


def test_select_seeds_reads_a_bare_number_alike_on_the_command_line_and_in_yaml(tmp_path):
    from kd2m.harness.cli import build_parser
    from kd2m.harness.commands import config_from_args
    cfg = tmp_path / "c.yaml"
    cfg.write_text("select_seeds: 2\n")
    from_yaml = config_from_args(build_parser().parse_args(["bench", str(cfg)])).resolved().select_seeds
    cfg.write_text("epochs: 1\n")
    from_cli = config_from_args(build_parser().parse_args(["bench", str(cfg), "--select-seeds", "2"]))
    assert from_yaml == from_cli.resolved().select_seeds == [0, 1]
    one = config_from_args(build_parser().parse_args(["bench", str(cfg), "--select-seeds", "100,"]))
    assert one.resolved().select_seeds == [100]


@pytest.mark.parametrize("name", ["select-k", "results.md", "report"])
def test_a_student_may_not_take_a_name_the_output_directory_uses(tmp_path, capsys, name):
    """A student named `select-k` trained inside the pilot grid's directory."""
    cfg, out = _write(tmp_path, f"metrics: [cw2]\nbaselines: [ce]\nweight: 0.1\nstudents: {{{name}: [cw2]}}\n")
    assert main(["bench", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kd2m: error: students: '{name}' cannot name a student") and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("args, says", [
    (["--select-holdout", "0.999"], "select_holdout 0.999 leaves 1 training and 1436 held-out items of the 1437"),
    (["--select-holdout", "0.001"], "select_holdout 0.001 leaves 1436 training and 1 held-out items of the 1437"),
    (["--select-k", "none", "--holdout", "0.001"], "holdout 0.001 leaves 1436 training and 1 held-out items"),
])
def test_a_holdout_part_too_small_to_train_or_score_on_is_refused_before_training(tmp_path, capsys, args, says):
    """One training image was reported as the teacher's output shape; one held-out image scored
    every pilot at 0% and chose "the term off" on the tie."""
    cfg, out = _write(tmp_path, "metrics: [cw2]\nbaselines: [ce]\nweight: auto\nselect_k: [0, 1]\n")
    assert main(["bench", str(cfg)] + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("kd2m: error: ") and says in err and err.count("\n") == 1
    assert "each part needs at least 10 (one per class)" in err and "between 0.007 and 0.993" in err
    assert not list(out.glob("**/final.json")) and not list(out.glob("**/checkpoint.pt"))  # nothing trained


def test_a_finished_run_at_a_k_no_candidate_gives_is_refused_before_the_pilot_trains(tmp_path, capsys):
    """With other candidates the pilot trained first, and then the grid refused the finished run
    with a settings diff cut before the field that differs."""
    cfg, out = _write(tmp_path, "metrics: [cw2]\nbaselines: [ce]\nweight: auto\n")
    assert main(["bench", str(cfg), "--select-k", "0,1000000"]) == 0  # K = 10⁶ collapses: cw2 at auto×0
    assert _final(out, "cw2")["settings"]["terms"][0]["weight"] == 0.0
    capsys.readouterr()
    assert main(["bench", str(cfg), "--select-k", "0.3,1"]) == 2
    err = capsys.readouterr().err
    assert err == (f"kd2m: error: select_k: {out / 'cw2/seed0'} was trained at auto×0 (its final.json: "
                   "terms[0].weight 0.0), and no candidate K (0.3, 1) gives it; use another --out, or delete "
                   "that run directory to redo it\n")
    assert not (out / "select-k/cw2@auto*0.3").exists()  # the pilot trained nothing


def test_a_choice_that_moves_off_a_finished_run_names_the_field(tmp_path, capsys):
    cfg, out = _write(tmp_path, "metrics: [cw2]\nbaselines: [ce]\nweight: auto\n")
    assert main(["bench", str(cfg), "--select-k", "0,1000000"]) == 0
    capsys.readouterr()
    assert main(["bench", str(cfg), "--select-k", "0,0.3"]) == 2
    k = json.loads((out / "select-k/selected.json").read_text())["chosen"]["cw2"]["k"]
    assert k == 0.3  # the choice moved (auto×0.3 beats the term off on this holdout)
    err = capsys.readouterr().err
    assert err.startswith(f"kd2m: error: select_k: {out / 'cw2/seed0'} was trained at auto×0 (its final.json: "
                          "terms[0].weight 0.0), and the pilot grid chose auto×0.3 for cw2; ") and err.count("\n") == 1


def test_the_card_says_what_k_0_and_named_students_train_at(capsys):
    assert main(["run", "--dry-run", "--select-k", "0,1", "--metrics", "cw2", "--baselines", "ce,kd"]) == 0
    assert ("A term chosen at K = 0 trains as the CE-only student (CE weight 1), the student its pilot was; "
            "named students keep their λ.") in capsys.readouterr().out


def test_a_run_made_with_other_settings_names_the_nested_field_that_differs(tmp_path):
    """The settings diff cut each value to 60 characters: a term's description ended before its
    weight, so the refusal hid the one field that differed."""
    from kd2m.errors import ConfigError
    from kd2m.training.state import check_settings
    term = {"term": "cw2", "weight": 0.3, "options": {"max_tokens": 256, "token_seed": 0},
            "student_layer": "penultimate", "teacher_layer": "penultimate", "unit": "batch", "warmup": 0,
            "schedule": "constant", "auto": True}
    with pytest.raises(ConfigError) as e:
        check_settings(tmp_path, {"terms": [term], "epochs": 1}, {"terms": [{**term, "weight": 1.0}], "epochs": 2})
    assert f"{tmp_path} holds a run made with other settings (epochs 1 there, 2 now; " \
           "terms[0].weight 0.3 there, 1.0 now);" in str(e.value)
