"""A training run that goes non-finite (loss, gradient, features, a solver) stops naming the epoch and step,
keeps the last good checkpoint, is recorded as diverged, and the grid finishes the other runs."""
import json
import subprocess

import pytest
import torch

from kd2m import metrics
from kd2m.atomic_io import load_checkpoint
from kd2m.harness.cli import main

from helpers import (
    ENV,
    ONE_EPOCH_GRID,
    TINY_GRID,
    kd2m_cmd,
    one_line_error,
    one_line_exit_2,
    run_cli,
)


def test_huge_learning_rate_stops_with_epoch_and_step(tmp_path):
    """A subprocess, so that any warning printed on the way would break the one-line contract."""
    r = subprocess.run(kd2m_cmd("run", *TINY_GRID, "--lr", "1e6", "--out", str(tmp_path / "o")),
                       env=ENV, capture_output=True, text=True, timeout=120)
    line = one_line_error(r.returncode, r.stderr, "teacher s0: non-finite", "at epoch 1, step ", "lower --lr")
    assert "no checkpoint was written yet" in line


def test_nan_metric_at_epoch_two_keeps_the_epoch_one_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    ckpt = out / "cw2" / "seed0" / "checkpoint.pt"
    seen = {}
    real_call = metrics.Metric.__call__

    def nan_from_epoch_two(self, *args):
        value = real_call(self, *args)
        if ckpt.exists():       # written at the end of epoch 1: we are in epoch 2
            seen.setdefault("bytes", ckpt.read_bytes())
            return value * float("nan")
        return value
    monkeypatch.setattr(metrics.Metric, "__call__", nan_from_epoch_two)
    argv = ["run", *TINY_GRID, "--epochs", "2", "--out", out]
    code, _, err = run_cli(argv, capsys)
    # a lower λ or lr changes the run's settings, which a resume refuses: the advice says so (it used
    # to say "lower --weight and rerun to resume from it"), within the 300-character line even at
    # pytest's long tmp paths (the fix first, one path)
    line = one_line_error(code, err, "cw2 s0: non-finite loss at epoch 2, step 1", "cw2=nan",
                          f"to lower --weight or --lr, delete {ckpt.parent} first",
                          "the same command resumes from its last good checkpoint, kept there")
    assert "ce=" in line
    assert ckpt.read_bytes() == seen["bytes"]            # untouched by the failed epoch
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (out / "cw2" / "seed0" / "final.json").exists()
    assert not list(ckpt.parent.glob(".*.tmp"))
    # once the cause is gone, the same command resumes from epoch 1 and finishes
    monkeypatch.setattr(metrics.Metric, "__call__", real_call)
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    log = (out / "cw2" / "seed0" / "log.jsonl").read_text().splitlines()
    assert len(log) == 2


def test_non_finite_student_features_name_the_epoch_and_step(tmp_path, capsys, monkeypatch):
    """Features that blow up reach the engine's check (with epoch and step), not the metric's."""
    from kd2m.training.binding import Taps
    real = Taps.features

    def poisoned(self):
        return {k: f * float("inf") if f.requires_grad else f for k, f in real(self).items()}  # the student's taps
    monkeypatch.setattr(Taps, "features", poisoned)
    code, _, err = run_cli(["run", *TINY_GRID, "--out", tmp_path / "o"], capsys)
    one_line_error(code, err, "cw2 s0: non-finite student features at epoch 1, step 1")


def test_finite_features_too_large_for_a_float32_cost_read_as_a_non_finite_loss(tmp_path, capsys, monkeypatch):
    """A diverging student's features, finite but ~1e20, overflowed the float32 cost GEMM of exact
    OT: the solver's bare "exact_plan: cost contains NaN/inf" stopped the grid without naming the
    run, epoch or step (seen in an MNIST-1D λ sweep). The plan's cost now falls back to float64,
    the loss reads inf, and the engine says where."""
    from kd2m.metrics.exact import exact_plan, feature_plan
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    big = s * 1e20                                            # float32, finite
    c = torch.cat([big.double(), t.double()]).mean(0)
    want = exact_plan(-2 * (big.double() - c) @ (t.double() - c).T)   # the plan of the float64 cost
    assert all(torch.equal(a, b) for a, b in zip(feature_plan(big, t), want))
    for name in ("w2", "cw2", "jw2"):
        value = metrics.get(name)(s * 1e20, t, torch.arange(16) % 2)
        assert torch.isinf(value), name   # ~1e41 overflows the float32 result: inf, not a solver error
    from kd2m.training.binding import Taps
    real = Taps.features

    def huge(self):
        return {k: f * 1e20 if f.requires_grad else f for k, f in real(self).items()}  # the student's taps
    monkeypatch.setattr(Taps, "features", huge)
    code, _, err = run_cli(["run", *TINY_GRID, "--out", tmp_path / "o"], capsys)
    one_line_error(code, err, "cw2 s0: non-finite loss at epoch 1, step 1", "cw2=inf")


def test_a_diverging_student_is_recorded_and_the_grid_finishes_the_others(tmp_path, capsys, monkeypatch):
    """A λ sweep whose largest λ diverges used to stop the whole grid at that run: the seeds and
    students after it never ran. Now the others finish, the tables flag the diverged run (left out
    of its method's mean), its run directory records where, and then the one-line error (exit 2)
    names it; rerunning retries it (its cause may be gone) and redoes nothing else."""
    out = tmp_path / "o"
    real_call = metrics.Metric.__call__

    def nan_for_seed0_w2(self, *args):
        value = real_call(self, *args)
        if self.name == "w2" and torch.initial_seed() % 1000 == 0:  # seed 0's run of w2 only
            return value * float("nan")
        return value
    monkeypatch.setattr(metrics.Metric, "__call__", nan_for_seed0_w2)
    argv = ["run", "--epochs", "1", "--teacher-epochs", "1", "--seeds", "2", "--baselines", "ce", "--metrics", "w2,cw2",
            "--no-progress", "--parallel", "1", "--out", out]
    code, log, err = run_cli(argv, capsys)
    line = one_line_error(code, err, "w2 s0: non-finite loss at epoch 1, step 1", "no checkpoint was written yet")
    assert "more diverged" not in line
    for key, seed in (("ce", 0), ("ce", 1), ("cw2", 0), ("cw2", 1), ("w2", 1)):   # every other run finished
        assert (out / key / f"seed{seed}" / "final.json").exists(), (key, seed)
    record = json.loads((out / "w2/seed0/diverged.json").read_text())
    assert record["where"].startswith("non-finite loss at epoch 1, step 1") and record["settings"]["seed"] == 0
    assert "seed 0 W2 (E)" in log and "diverged" in log
    md = (out / "results.md").read_text()
    assert "| W2 (E) |" in md and "(!) diverged" in md and "W2 (E) on seed 0." in md
    assert "unfinished" not in md  # diverged is said as such, not as an unfinished run
    assert json.loads((out / "results.json").read_text())["diverged"] == {"w2": {"label": "W2 (E)", "seeds": [0]}}
    # the cause gone: the same command retries the diverged run only, and the record goes
    monkeypatch.setattr(metrics.Metric, "__call__", real_call)
    code, log, err = run_cli(argv, capsys)
    assert code == 0, err
    assert log.count("(finished earlier)") == 2 + 5      # two teachers, five students
    assert (out / "w2/seed0/final.json").exists() and not (out / "w2/seed0/diverged.json").exists()
    assert "diverged" not in (out / "results.md").read_text()


def test_a_huge_learning_rate_flags_the_students_run_as_diverged(tmp_path, capsys):
    """KD's logit check used to end the whole grid on 'student_logits contains NaN'."""
    out = tmp_path / "o"
    code, _, err = run_cli(["run", *ONE_EPOCH_GRID, "--lr", "1e8", "--teacher-lr", "0.05", "--baselines", "ce,kd",
                            "--metrics", "", "--out", out], capsys)
    line = one_line_error(code, err, "non-finite")
    assert "contains NaN" not in line
    assert "diverged" in (out / "results.md").read_text()
    assert (out / "kd/seed0/diverged.json").exists()


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
    line = one_line_exit_2(code, err, "cw2 s0: non-finite gradient at epoch 1, step 1 (in 4 of 6 parameters, "
                          "the first features.1.weight; the loss was finite: ce=")
    assert "non-finite loss" not in line and "cw2=nan" not in line and "cw2=" in line
    where = json.loads((out / "cw2/seed0/diverged.json").read_text())["where"]
    assert where.startswith("non-finite gradient at epoch 1, step 1 (in 4 of 6 parameters")
