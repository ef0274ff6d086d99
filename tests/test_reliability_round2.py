"""Issue 22, "never silently wrong, round two": configs, teachers, tables and parallel runs that
used to give a wrong result with exit 0, two hangs, and inputs refused before training. Each test
failed before its fix. BASE is a 1-epoch digits grid of one seed."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from kd2m import metrics
from kd2m.config import ConfigError, RunConfig, from_mapping, load_yaml
from test_reliability import one_line_error, run_cli  # the one-line-error contract, written once

BASE = ["--epochs", "1", "--teacher-epochs", "1", "--seeds", "1", "--no-progress"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def resolved(**values):
    return from_mapping({"metrics": [], "baselines": ["ce"], **values}).resolved()


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- 1, 2: configs
def test_distill_is_refused_where_a_student_has_its_name():
    with pytest.raises(ConfigError, match="distill: its student is named 'cw2'.*students: has a student 'cw2'"):
        resolved(students={"cw2": [{"term": "cw2", "weight": 0.1}]}, distill=[{"term": "cw2", "weight": 1.0}])
    both = resolved(students={"mine": [{"term": "cw2", "weight": 0.1}]}, distill=[{"term": "cw2", "weight": 1.0}])
    assert {m.key: m.terms[0].weight for m in both.methods() if m.terms} == {"mine": 0.1, "cw2": 1.0}


@pytest.mark.parametrize("text, key, lines", [
    ("students:\n  mine: [{term: cw2}]\n  mine: [{term: kd}]\n", "'mine'", "lines 2 and 3"),
    ("epochs: 1\nlr: 0.1\nepochs: 3\n", "'epochs'", "lines 1 and 3"),
    ("term_options: {dkd: {beta: 1, beta: 2}}\n", "'beta'", "lines 1 and 1"),
])
def test_a_yaml_key_given_twice_is_refused_naming_it_and_both_lines(tmp_path, text, key, lines):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=f"c.yaml: key {key} is given twice.*{lines}"):
        load_yaml(p)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("base: &b {beta: 1, alpha: 2}\nterm_options: {dkd: {<<: *b, beta: 8}}\n".replace("base", "x_base"))
    with pytest.raises(ConfigError, match="unknown key 'x_base'"):  # merged fine; the extra key is what is refused
        load_yaml(p)


def test_exponent_numbers_in_yaml_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) read `lr: 1e-2` as the string '1e-2', refused as 'expected float'; the
    command line's --lr 1e-2 was a number. Now both are."""
    p = tmp_path / "c.yaml"
    p.write_text("lr: 1e-2\nweights: {cw2: 5E-3}\nlr_min: 1.5e-5\n")
    cfg = load_yaml(p)
    assert (cfg.lr, cfg.weights, cfg.lr_min) == (0.01, {"cw2": 0.005}, 1.5e-5)


@pytest.mark.parametrize("values, needle", [
    (dict(distill=[{"weight": 1.0}]), "distill[0]: the entry {'weight': 1.0} names no term"),
    (dict(students={"a": [{"term": "cw2", "options": [1]}]}), "options of 'cw2' must be a mapping"),
    (dict(students={"a": [{"term": ["cw2"]}]}), "term must be one name (a string), got ['cw2']"),
    (dict(students={".": ["cw2"]}), "'.' cannot name a student"),
    (dict(students={"..": ["cw2"]}), "'..' cannot name a student"),
    (dict(students={"results.csv": ["cw2"]}), "'results.csv' cannot name a student"),
    (dict(students={"a b": ["cw2"]}), "'a b' cannot name a student"),
])
def test_bad_student_entries_are_one_clear_config_error(values, needle):
    with pytest.raises(ConfigError) as e:
        resolved(**values)
    assert needle in str(e.value)


# ----------------------------------------------------------------------------- 3: one log key per term
def test_two_same_name_terms_on_one_layer_get_their_own_log_keys(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"out: {tmp_path / 'o'}\nmetrics: []\nbaselines: []\n"
                   "students:\n  two: [{term: cw2, weight: 0.1}, {term: cw2, weight: auto}]\n")
    code, _, err = run_cli(["bench", cfg, *BASE], capsys)
    assert code == 0, err
    row = json.loads((tmp_path / "o/two/seed0/log.jsonl").read_text().splitlines()[0])
    keys = ["cw2@penultimate#1", "cw2@penultimate#2"]
    assert sorted(row["terms"]) == keys and sorted(row["weights"]) == keys
    assert row["weights"][keys[0]] == 0.1 and row["weights"][keys[1]] != 0.1
    assert row["distill"] == pytest.approx(sum(row["weights"][k] * row["terms"][k] for k in keys), rel=1e-6)
    final = json.loads((tmp_path / "o/two/seed0/final.json").read_text())
    assert sorted(final["auto_scales"]) == keys and final["auto_scales"][keys[0]] == 1.0


# ----------------------------------------------------------------------------- 4, 5: teacher files
def _teacher_file(path, seed, num_classes=10):
    from kd2m.models import build_model
    torch.manual_seed(seed)
    torch.save(build_model("digits_cnn", num_classes, 1, 8).state_dict(), path)


def test_a_replaced_pretrained_teacher_is_not_the_old_one(tmp_path, capsys, monkeypatch):
    """The settings held the teacher file's path: a new file under the same name reused the old
    teacher's run (also from another working directory). They hold its content's digest now."""
    out = tmp_path / "o"
    argv = ["run", *BASE, "--teacher-epochs", "0", "--pretrained-teacher", "t.pt", "--baselines", "ce",
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
    code, _, err = run_cli(["run", *BASE, "--teacher-epochs", "0", "--pretrained-teacher", tmp_path / "t5.pt",
                            "--baselines", "ce", "--metrics", "cw2", "--out", tmp_path / "o"], capsys)
    one_line_error(code, err, "t5.pt", "do not fit", "shape mismatch")
    assert not (tmp_path / "o" / "ce").exists()


def test_a_student_file_for_other_classes_gets_a_new_head_said_in_one_line(tmp_path, capsys):
    from kd2m.models import build_model
    torch.manual_seed(0)
    torch.save(build_model("digits_mlp", 5, 1, 8).state_dict(), tmp_path / "s5.pt")
    code, _, err = run_cli(["run", *BASE, "--pretrained-student", tmp_path / "s5.pt", "--baselines", "ce",
                            "--metrics", "", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    notes = [ln for ln in err.splitlines() if "s5.pt" in ln]
    assert len(notes) == 1 and "new randomly initialised head" in notes[0] and "(5, 64)" in notes[0]


# ----------------------------------------------------------------------------- 6: images
def _imagefolder(root, make):
    for split in ("train", "test"):
        for c in range(2):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(4):
                make(d / f"{i}.png", c, i)


def test_16_bit_grayscale_pngs_are_scaled_not_clipped(tmp_path):
    from kd2m.data.imagefolder import _load
    values = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)       # 0 … 63000 of 65535
    Image.fromarray(values).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode == "I;16"
    got = np.asarray(_load(str(tmp_path / "i16.png"), "L"))
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.rint(values * (255 / 65535)).astype(np.uint8))
    assert len(np.unique(got)) > 50                                    # convert('L') gave only 0 and 255


def test_a_truncated_image_is_refused_before_training_naming_the_file(tmp_path, capsys):
    def png(path, c, i):
        Image.fromarray(np.full((8, 8, 3), 40 * c + i, dtype=np.uint8)).save(path)
    _imagefolder(tmp_path / "data", png)
    bad = tmp_path / "data/test/c1/2.png"
    bad.write_bytes(bad.read_bytes()[:40])
    code, _, err = run_cli(["run", "--dataset", "imagefolder", "--data-root", tmp_path / "data", *BASE,
                            "--baselines", "ce", "--metrics", "", "--out", tmp_path / "o"], capsys)
    one_line_error(code, err, "c1/2.png", "not a readable image")
    assert not (tmp_path / "o" / "teacher").exists()


# ----------------------------------------------------------------------------- 7, 11: tables
def test_compare_refuses_runs_trained_with_other_settings(tmp_path, capsys):
    out = tmp_path / "o"
    assert run_cli(["run", *BASE, "--baselines", "ce", "--metrics", "", "--out", out], capsys)[0] == 0
    code, _, err = run_cli(["run", *BASE, "--epochs", "2", "--baselines", "", "--metrics", "cw2", "--out", out],
                           capsys)
    assert code == 0, err
    code, _, err = run_cli(["compare", out, "cw2:ce"], capsys)
    one_line_error(code, err, "compare cw2:ce", "other settings", "epochs 2 vs 1")


def test_compare_without_a_common_seed_says_so(tmp_path, capsys):
    out = tmp_path / "o"
    assert run_cli(["run", *BASE, "--baselines", "ce", "--metrics", "", "--out", out], capsys)[0] == 0
    code, _, err = run_cli(["run", *BASE, "--seeds", "1,", "--baselines", "", "--metrics", "cw2", "--out", out],
                           capsys)
    assert code == 0, err
    code, _, err = run_cli(["compare", out, "cw2:ce"], capsys)
    one_line_error(code, err, "no seed has both", "[1]", "[0]")


def test_results_are_rebuilt_from_the_runs_final_json(tmp_path, capsys):
    """A conflicting duplicate row (hand-edited) survived a rerun and entered results.md."""
    out = tmp_path / "o"
    argv = ["run", *BASE, "--baselines", "ce", "--metrics", "cw2", "--out", out]
    assert run_cli(argv, capsys)[0] == 0
    rows = _rows(out / "results.csv")
    fake = dict(next(r for r in rows if r["method"] == "cw2"), test_acc="0.123")
    with open(out / "results.csv", "a", newline="") as f:
        csv.DictWriter(f, fieldnames=list(rows[0])).writerow(fake)
    assert run_cli(argv, capsys)[0] == 0
    again = _rows(out / "results.csv")
    assert len(again) == len(rows) and "0.123" not in {r["test_acc"] for r in again}
    truth = json.loads((out / "cw2/seed0/final.json").read_text())["test_acc"]
    assert [float(r["test_acc"]) for r in again if r["method"] == "cw2"] == [truth]
    assert "12.30" not in (out / "results.md").read_text()


@pytest.mark.parametrize("victim, content, needle", [
    ("cw2/seed0/final.json", "{not json", "final.json: not valid JSON"),
    ("results.json", "[1, 2", "results.json: not valid JSON"),
    ("cw2/seed0/log.jsonl", None, "log.jsonl, line 1: not valid JSON"),
])
def test_corrupt_result_files_are_named(tmp_path, capsys, victim, content, needle):
    out = tmp_path / "o"
    argv = ["run", *BASE, "--baselines", "ce", "--metrics", "cw2", "--out", out]
    assert run_cli(argv, capsys)[0] == 0
    path = out / victim
    path.write_text(content if content is not None else path.read_text()[:25])  # a cut log
    command = argv if victim.endswith("final.json") else ["report", out, "--no-embedding"] \
        if victim.endswith("log.jsonl") else ["table", out]
    code, _, err = run_cli(command, capsys)
    one_line_error(code, err, needle)


# ----------------------------------------------------------------------------- 8: threads
def test_a_cpu_runs_thread_count_is_part_of_its_settings(tmp_path):
    from kd2m.data import build_dataset
    from kd2m.train import Trainer, build_student
    cfg = RunConfig(epochs=1, progress=False, metrics=[], baselines=["ce"]).resolved()
    bundle = build_dataset("digits")
    before = torch.get_num_threads()
    try:
        settings = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            settings[n] = Trainer(build_student(cfg, bundle, 0), bundle, cfg, cfg.methods()[0], 0, tmp_path,
                                  torch.device("cpu")).settings
    finally:
        torch.set_num_threads(before)
    assert "threads" not in settings[1] and settings[2]["threads"] == 2   # one thread: the settings as before
    assert {k: v for k, v in settings[2].items() if k != "threads"} == settings[1]


# ----------------------------------------------------------------------------- 9, 10: labels and λ
def test_students_with_the_same_terms_get_their_own_labels():
    cfg = resolved(students={"cw2_a": [{"term": "cw2", "weight": 1.0}], "cw2_b": [{"term": "cw2", "weight": 0.1}]})
    labels = {m.key: m.label for m in cfg.methods()}
    assert labels["cw2_a"] != labels["cw2_b"] and "cw2_a" in labels["cw2_a"]
    assert resolved(metrics=["cw2"]).methods()[1].label == "CW2 (E)"   # unique labels stay as they were


def test_a_diverged_note_is_attached_to_its_own_row():
    from kd2m import results as R
    rows = [{"method": m, "label": lab, "seed": s, "test_acc": 0.9}
            for m, lab in (("ce", "student (CE only)"), ("cw2_a", "CW2 (E) [cw2_a]")) for s in range(2)]
    rows += [{"method": "cw2_b", "label": "CW2 (E) [cw2_b]", "seed": 0, "test_acc": 0.8}]
    md = R.markdown_table(rows, "digits", expected_seeds=2,
                          diverged={"cw2_b": {"label": "CW2 (E) [cw2_b]", "seeds": [1]}})
    assert "| CW2 (E) [cw2_a] | 90.00 ± 0.00 | 2 |" in md   # tied with CE: no best in bold
    assert "| CW2 (E) [cw2_b] | 80.00 | 1 (!) |" in md and "CW2 (E) [cw2_b] on seed 1" in md


def test_weight_sets_the_distances_lambda_only():
    cfg = RunConfig(weight=0.5).resolved()
    by_key = {m.key: m for m in cfg.methods()}
    default = {m.key: m for m in RunConfig().resolved().methods()}
    for b in ("kd", "dkd", "dist"):
        assert (by_key[b].terms[0].weight, by_key[b].ce_weight) == (default[b].terms[0].weight, default[b].ce_weight)
    assert {by_key[m].terms[0].weight for m in cfg.metrics} == {0.5}


# ----------------------------------------------------------------------------- refused before training
def test_a_model_with_tuple_outputs_or_a_too_small_input_is_refused_before_training():
    from kd2m.grid import check_training_forward

    class Aux(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            out = self.fc(x)
            return (out, out) if self.training else out

    class Small(torch.nn.Module):
        def forward(self, x):
            raise ValueError("input too small")
    x = torch.randn(4, 4)
    check_training_forward(torch.nn.Linear(4, 3), x, 3, "student", "lin")
    with pytest.raises(ConfigError, match="student aux: returns a tuple.*train mode.*aux_logits"):
        check_training_forward(Aux(), x, 3, "student", "aux")
    with pytest.raises(ConfigError, match=r"teacher small: fails .* \(input too small\)"):
        check_training_forward(Small(), x, 3, "teacher", "small")


def test_torchvision_googlenet_is_refused_before_the_teacher_trains(tmp_path, capsys):
    code, _, err = run_cli(["run", *BASE, "--student", "torchvision:googlenet", "--baselines", "ce", "--metrics", "",
                            "--out", tmp_path / "o"], capsys)
    one_line_error(code, err, "student torchvision:googlenet")
    assert not (tmp_path / "o" / "teacher").exists()


@pytest.mark.parametrize("factor, needle", [(0.0, "its gradient on the initial student is 0"),
                                            (1e-12, "the term is flat at initialisation")])
def test_weight_auto_with_a_vanishing_gradient_is_refused_before_any_student_trains(tmp_path, capsys, monkeypatch,
                                                                                   factor, needle):
    real = metrics.Metric.__call__

    def flat(self, *args, **kwargs):
        return real(self, *args, **kwargs) * factor
    monkeypatch.setattr(metrics.Metric, "__call__", flat)
    out = tmp_path / "o"
    code, _, err = run_cli(["run", *BASE, "--baselines", "ce", "--metrics", "w2", "--weight", "auto*1", "--out", out],
                           capsys)
    one_line_error(code, err, "w2: weight auto", needle)
    assert not (out / "ce/seed0/final.json").exists()        # the CE-only student, first in line, never trained


def test_a_huge_learning_rate_flags_the_students_run_as_diverged(tmp_path, capsys):
    """KD's logit check used to end the whole grid on 'student_logits contains NaN'."""
    out = tmp_path / "o"
    code, _, err = run_cli(["run", *BASE, "--lr", "1e8", "--teacher-lr", "0.05", "--baselines", "ce,kd",
                            "--metrics", "", "--out", out], capsys)
    line = one_line_error(code, err, "non-finite")
    assert "contains NaN" not in line
    assert "diverged" in (out / "results.md").read_text()
    assert (out / "kd/seed0/diverged.json").exists()


def test_report_and_bound_rebuild_models_with_their_options(tmp_path, capsys):
    """The README's ViT→CNN run: `kd2m bound`/`report` rebuilt the ViT without its patch_size."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"out: {tmp_path / 'o'}\nteacher: timm:test_vit\nteacher_options: {{patch_size: 2}}\n"
                   "student: digits_cnn\nmetrics: [gauss_w2]\nbaselines: [ce]\nteacher_cache: 0\n")
    assert run_cli(["bench", cfg, *BASE], capsys)[0] == 0
    code, _, err = run_cli(["bound", tmp_path / "o"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["report", tmp_path / "o"], capsys)
    assert code == 0, err


# ----------------------------------------------------------------------------- the hangs
def _children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _cmdline(pid):
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_a_killed_parallel_worker_ends_the_grid_naming_its_seed(tmp_path):
    """multiprocessing.Pool waited forever for a SIGKILLed worker (what the OOM killer does)."""
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "kd2m", "run", "--epochs", "30", "--teacher-epochs", "30",
                             "--seeds", "2", "--parallel", "2", "--baselines", "ce", "--metrics", "",
                             "--no-progress", "--out", str(out)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        workers = []
        deadline = time.time() + 60
        while time.time() < deadline and len(workers) < 2:
            workers = [p for p in _children(proc.pid) if "spawn_main" in _cmdline(p)
                       and "resource_tracker" not in _cmdline(p)]
            time.sleep(0.2)
        assert len(workers) == 2, "the seed workers did not start"
        time.sleep(3)                                   # both are training now
        os.kill(workers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    one_line_error(proc.returncode, err, "the worker training seed ", "died (killed by signal 9", "rerun")


def _one_rank_nan_worker(rank, init_file, out_dir):
    """Two gloo ranks train a CE-only digits student; CE goes NaN on rank 1 only, at step 3."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    from kd2m import tasks
    from kd2m.data import build_dataset
    from kd2m.methods import Method
    from kd2m.train import NonFiniteLossError, Trainer, build_student
    real, calls = tasks.Classification.supervised_loss, []

    def poisoned(self, logits, targets):
        calls.append(1)
        value = real(self, logits, targets)
        return value * float("nan") if rank == 1 and len(calls) == 3 else value
    tasks.Classification.supervised_loss = poisoned
    torch.set_num_threads(1)
    try:
        cfg = RunConfig(epochs=2, progress=False, diagnostics=False, metrics=[], baselines=["ce"],
                        out=out_dir).resolved()
        bundle = build_dataset("digits")
        tr = Trainer(build_student(cfg, bundle, 0), bundle, cfg, Method("ce"), 0,
                     os.path.join(out_dir, "ce", "seed0"), torch.device("cpu"))
        try:
            tr.fit()
            message = "finished"
        except NonFiniteLossError as e:
            message = str(e)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()


def test_a_non_finite_loss_on_one_rank_stops_every_rank_alike(tmp_path):
    """Rank 1 raised before backward() while rank 0 waited in DDP's all-reduce forever."""
    ctx = mp.start_processes(_one_rank_nan_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.time() + 120
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a rank hung")
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert all("non-finite loss at epoch 1, step 3" in m for m in messages), messages
    assert not (tmp_path / "ce/seed0/final.json").exists()


def test_a_solver_failing_on_a_diverged_students_features_is_a_divergence_not_a_crash(tmp_path, capsys, monkeypatch):
    """Inside the engine the terms skip their value checks (no host read per step), so NaN features
    reach them; an eigensolver that fails to converge on them raised its RuntimeError through the
    grid (seen in an MNIST-1D sweep at auto*10: the whole sweep ended). It is the run's divergence:
    recorded, the other runs finish, one line names where."""
    from kd2m import metrics as M
    real = M.Metric.__call__

    def fails_on_nan(self, s, t, *args):
        if self.name == "gauss_w2" and not bool(torch.isfinite(s).all()):
            raise RuntimeError("linalg.eigh: The algorithm failed to converge because the input matrix is "
                               "ill-conditioned or has too many repeated eigenvalues")
        return real(self, s, t, *args)
    monkeypatch.setattr(M.Metric, "__call__", fails_on_nan)
    out = tmp_path / "o"
    argv = ["run", "--epochs", "1", "--teacher-epochs", "1", "--seeds", "1", "--baselines", "ce", "--metrics",
            "gauss_w2,cw2", "--no-progress", "--parallel", "1", "--out", out,
            "--lr", "1e6", "--teacher-lr", "0.05"]   # the students' features blow up, the teacher trains
    code, log, err = run_cli(argv, capsys)
    one_line_error(code, err, "non-finite", "2 more diverged run(s)")   # ce, cw2 and gauss_w2: every student
    where = json.loads((out / "gauss_w2/seed0/diverged.json").read_text())["where"]
    assert where.startswith("non-finite student features at epoch 1, step ")
    assert (out / "cw2/seed0/diverged.json").exists() and "linalg.eigh" not in err


def test_an_error_that_does_not_unpickle_reaches_the_grid_as_its_text():
    """A worker's exception whose constructor takes more than its message pickles but does not
    unpickle: the grid's process got a TypeError about that constructor instead of the error."""
    import pickle

    from kd2m.grid import _sendable
    from kd2m.training.step import TermFailure
    e = TermFailure(object(), ValueError("bad option"))
    with pytest.raises(TypeError):
        pickle.loads(pickle.dumps(e))
    sent = pickle.loads(pickle.dumps(_sendable(e)))
    assert isinstance(sent, RuntimeError) and str(sent) == "TermFailure: bad option"
    plain = ValueError("x")
    assert _sendable(plain) is plain


def test_an_eigensolver_failing_on_finite_extreme_features_is_that_runs_divergence(tmp_path, capsys, monkeypatch):
    """Seen in the MNIST-1D sweep at auto*10: CW2 (G)'s eigensolver failed to converge on a student's
    finite but exploding features and its LinAlgError ended the whole sweep. It is recorded as
    that run's divergence, naming the term, the epoch and step and the solver's words."""
    from kd2m import metrics as M
    from kd2m import value_checks
    real, calls = M.Metric.__call__, []

    def fails_at_step_two(self, *args):
        if self.name == "gauss_w2" and not value_checks.eager():  # inside training's epochs only
            calls.append(1)
            if len(calls) == 2:
                raise torch.linalg.LinAlgError("linalg.eigh: (Batch element 0): The algorithm failed to converge")
        return real(self, *args)
    monkeypatch.setattr(M.Metric, "__call__", fails_at_step_two)
    out = tmp_path / "o"
    code, log, err = run_cli(["run", "--epochs", "1", "--teacher-epochs", "1", "--seeds", "1", "--baselines", "ce",
                              "--metrics", "gauss_w2", "--weight", "auto*1", "--no-progress", "--parallel", "1",
                              "--out", out], capsys)
    one_line_error(code, err, "gauss_w2 s0:", "term 'gauss_w2' could not be computed", "step 2", "failed to converge")
    assert (out / "gauss_w2/seed0/diverged.json").exists() and (out / "ce/seed0/final.json").exists()


def test_w2_on_an_overflowing_cost_in_the_engine_reads_non_finite_not_a_shape_error():
    """In the engine (deferred value checks) a cost that is not finite even in float64 (a student
    blowing up: seen at auto*30 on MNIST-1D, 10 epochs) gets the product plan, n² pairs, so the
    loss reads inf/NaN and the engine records the run's divergence. W2 (E)'s shortcut for n_s =
    n_t assumed a permutation and raised 'size of tensor a (8) must match ... (64)', which ended
    the whole grid. Features at 1e160: finite, their squared distances overflow float64."""
    from kd2m import metrics, value_checks
    torch.manual_seed(0)
    s, t = torch.randn(8, 3, dtype=torch.float64) * 1e160, torch.randn(8, 3, dtype=torch.float64)
    s.requires_grad_(True)
    assert torch.isfinite(s).all()
    with value_checks.deferred():
        for name in ("w2", "cw2", "jw2"):
            value = metrics.get(name)(s, t, torch.tensor([0, 1] * 4))
            assert not torch.isfinite(value), name
    with pytest.raises(ValueError, match="NaN/inf"):  # outside the engine: refused, as before
        metrics.get("w2")(s, t)
