"""Guards on what a user compares and trains: two grids paired only when their runs differ in λ
alone, the Hugging Face Trainer snippet (docs/integrations.md) as written, warm-ups given in epochs against the
run's length, and a non-finite step named for what went non-finite (and where, under torchrun)."""
import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kd2m import metrics
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


# ----------------------------------------------------------------------------- warm-ups and the run's length
def _dkd_row(card: str) -> str:
    section = card.split("\n### dkd — ", 1)[1].split("\n### ", 1)[0]
    return next(line for line in section.splitlines() if line.startswith("| dkd ("))


def test_the_authors_dkd_warmup_is_scaled_to_a_shorter_run(tmp_path, capsys):
    """DKD's 20-epoch warm-up is mdistiller's for 240 epochs; on the paper configs' 15 it kept λ
    at 0.75 of its value in the last epoch, and the card said "warm-up 20 epochs (authors'
    default)". Now the same share of the run (1 of 15), said on the card, in config.json and the
    run's settings, and trained with."""
    from kd2m.config import RunConfig
    assert main(["bench", str(ROOT / "configs/paper/cifar100.yaml"), "--baselines", "ce,dkd", "--dry-run",
                 "--out", str(tmp_path / "never")]) == 0
    row = _dkd_row(capsys.readouterr().out)
    assert "warm-up 1 epochs (the authors' 20 of 240 epochs, scaled to this run's 15)" in row
    (dkd,) = [m for m in RunConfig(dataset="cifar100", baselines=["ce", "dkd"]).resolved().methods() if m.key == "dkd"]
    assert [dkd.terms[0].weight_at(e, 15) for e in (0, 14)] == [1.0, 1.0]
    # a digits grid whose own term_options replace the dataset's: the registered 20 epochs before
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"out: {tmp_path / 'r'}\nepochs: 2\nteacher_epochs: 1\nseeds: [0]\nbaselines: [ce, dkd]\n"
                   "metrics: []\nparallel: 1\nprogress: false\nterm_options: {dkd: {beta: 2}}\n")
    assert main(["bench", str(cfg)]) == 0
    assert json.loads((tmp_path / "r/config.json").read_text())["term_options"] == {"dkd": {"beta": 2, "warmup": 1}}
    run = tmp_path / "r/dkd/seed0"
    assert json.loads((run / "final.json").read_text())["settings"]["terms"][0]["warmup"] == 1
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [e["weights"]["dkd"] for e in log] == [0.1, 0.1]   # digits' λ of DKD from the first epoch


def test_the_crd_configs_keep_the_authors_warmup_of_their_240_epochs():
    from kd2m.config import load_yaml
    for path in sorted((ROOT / "configs/crd").glob("*.yaml")):
        cfg = load_yaml(path).resolved()
        warmups = {m.key: t.warmup_epochs for m in cfg.methods() for t in m.terms if t.name == "dkd"}
        assert cfg.epochs == 240 and warmups == {"dkd": 20, "ls_dkd": 20}, path.name


def test_a_warmup_as_long_as_the_run_is_refused_before_training(tmp_path, capsys):
    """A warm-up written in the config is the user's: kept as given, unless it reaches the run's
    epochs (λ would never get to its value): then one line naming both numbers, exit 2, before
    anything is trained or written — the dry-run card included."""
    cfg = tmp_path / "c.yaml"
    out = tmp_path / "r"
    cfg.write_text(f"out: {out}\nepochs: 15\nteacher_epochs: 1\nseeds: [0]\nbaselines: [ce, dkd]\nmetrics: []\n"
                   "progress: false\nterm_options: {dkd: {warmup: 20}}\n")
    for extra in (["--dry-run"], []):
        code = main(["bench", str(cfg), *extra])
        line = one_line_error(code, capsys.readouterr().err, "term_options: dkd: warmup 20 reaches the run's 15 epochs",
                              "only 0.75 of its value", "give a warmup below 15",
                              "the authors' 20 of 240 epochs, scaled to this run: 1")
        assert len(line) <= 300
        assert not out.exists()
    cfg.write_text(f"out: {out}\nepochs: 3\nseeds: [0]\nbaselines: [ce]\nmetrics: []\nprogress: false\n"
                   "students:\n  s: [{term: dkd, weight: 0.3, warmup: 3}]\n")
    one_line_error(main(["bench", str(cfg)]), capsys.readouterr().err, "students: s[0]: warmup 3 reaches the run's 3 "
                   "epochs: λ of 'dkd' would get to its value only in the last epoch")
    assert not out.exists()


# ----------------------------------------------------------------------------- non-finite steps
class _NanGradient(torch.autograd.Function):
    """The identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_a_nan_gradient_of_a_finite_loss_is_named_a_gradient(tmp_path, capsys, monkeypatch):
    """It was reported as "non-finite loss … (ce=2.019, cw2=44.92)": finite values under a name
    that says they are not. The message says the gradient, which parameter first, how many."""
    real_call = metrics.Metric.__call__

    def nan_gradient(self, *args):
        value = real_call(self, *args)
        return _NanGradient.apply(value) if self.name == "cw2" else value
    monkeypatch.setattr(metrics.Metric, "__call__", nan_gradient)
    out = tmp_path / "o"
    code = main(["run", "--epochs", "1", "--teacher-epochs", "1", "--seeds", "1", "--baselines", "ce",
                 "--metrics", "cw2", "--parallel", "1", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    # the student's layers under its penultimate features get NaN; its classifier (fc) only CE's gradient
    line = one_line_error(code, err, "cw2 s0: non-finite gradient at epoch 1, step 1 (in 4 of 6 parameters, "
                          "the first features.1.weight; the loss was finite: ce=")
    assert "non-finite loss" not in line and "cw2=nan" not in line and "cw2=" in line
    where = json.loads((out / "cw2/seed0/diverged.json").read_text())["where"]
    assert where.startswith("non-finite gradient at epoch 1, step 1 (in 4 of 6 parameters")


def _one_rank_nan_worker(rank, init_file, out_dir):
    """Two gloo ranks train a CE-only digits student; CE goes NaN on rank 1 only, at step 2."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    from kd2m import tasks
    from kd2m.config import RunConfig
    from kd2m.data import build_dataset
    from kd2m.methods import Method
    from kd2m.train import NonFiniteLossError, Trainer, build_student
    real, calls = tasks.Classification.supervised_loss, []

    def poisoned(self, logits, targets):
        calls.append(1)
        value = real(self, logits, targets)
        return value * float("nan") if rank == 1 and len(calls) == 2 else value
    tasks.Classification.supervised_loss = poisoned
    torch.set_num_threads(1)
    try:
        cfg = RunConfig(epochs=1, progress=False, diagnostics=False, metrics=[], baselines=["ce"],
                        out=out_dir).resolved()
        tr = Trainer(build_student(cfg, build_dataset("digits"), 0), build_dataset("digits"), cfg, Method("ce"), 0,
                     os.path.join(out_dir, "ce", "seed0"), torch.device("cpu"))
        try:
            tr.fit()
            message = "finished"
        except NonFiniteLossError as e:
            message = e.where
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()


def test_under_torchrun_a_rank_whose_loss_was_finite_records_the_rank_that_diverged(tmp_path):
    """Rank 1's loss is NaN; DDP's all-reduce carries it into rank 0's gradients at the same step,
    and rank 0 wrote its own finite values to diverged.json as if its loss had been non-finite."""
    ctx = mp.start_processes(_one_rank_nan_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.time() + 120
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a rank hung")
    rank0, rank1 = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert rank0 == "non-finite loss at epoch 1, step 2 (on rank 1)"
    assert rank1.startswith("non-finite loss at epoch 1, step 2 (ce=nan")
    recorded = json.loads((tmp_path / "ce/seed0/diverged.json").read_text())["where"]   # written by rank 0
    assert recorded == rank0
