"""The epoch's on-device tally and the handling of non-finite steps, by the values a user reads:
the logged per-sample means of an epoch whose last batch is short, the step a divergence message
names and the values it quotes, which steps count as bad.

Each test fails on a one-line bug the rest of the suite let through: batch means summed without
their batch size, the first bad step overwritten by every later one, the message's ``ce=``
reading the loss's slot, a step with a finite loss but non-finite gradients not counted, the
gradient check on the 2-norm (which overflows for large finite gradients)."""
import json
import math

import pytest
import torch

from kd2m.data import build_dataset
from kd2m.errors import NonFiniteLossError
from kd2m.harness.config import RunConfig
from kd2m.harness.trainer import Trainer
from kd2m.training.build import build_student, build_teacher, freeze
from kd2m.training.step import EpochTally, Step, StepOutputs, zero_nonfinite_gradients

CPU = torch.device("cpu")
T = torch.tensor


def _out(n, ce, *terms, s_feats=None):
    """What a step hands the tally: a batch of ``n`` (the logits' first dimension), its CE and term values."""
    return StepOutputs(torch.zeros(n, 3), T(ce, dtype=torch.float32), [T(v, dtype=torch.float32) for v in terms],
                       s_feats or {"penultimate": torch.ones(n, 2)}, {"penultimate": torch.ones(n, 2)})


OK = torch.ones((), dtype=torch.bool)
NOT_OK = torch.zeros((), dtype=torch.bool)


# ---------------------------------------------------------------------------------- epoch means
def test_epoch_means_weigh_each_batch_by_its_size():
    """10 samples in batches of 4, 4 and 2: each mean is Σ_b n_b·v_b / 10, the short batch weighing
    half as much as a full one."""
    batches = [(4, 2.0, 0.5, 1.0), (4, 1.0, 0.25, 3.0), (2, 4.0, 2.0, 0.5)]   # n, ce, distill, term
    tally = EpochTally(1, CPU)
    for step, (n, ce, distill, term) in enumerate(batches):
        tally.add(step, _out(n, ce, term), T(ce + distill), T(distill), OK)
    got = tally.read()
    want_ce = (4 * 2.0 + 4 * 1.0 + 2 * 4.0) / 10                       # 2.0 (the batch means average 2.33)
    want_distill = (4 * 0.5 + 4 * 0.25 + 2 * 2.0) / 10                  # 0.7
    want_term = (4 * 1.0 + 4 * 3.0 + 2 * 0.5) / 10                      # 1.7
    assert got["seen"] == 10 and got["bad_steps"] == 0 and got["first_bad"] is None
    assert got["means"] == pytest.approx([want_ce + want_distill, want_ce, want_distill, want_term], rel=1e-12)


def _trainer(tmp_path, name="r", epochs=1, **fields):
    cfg = RunConfig(epochs=epochs, progress=False, diagnostics=False, metrics=["gauss_w2"], baselines=[],
                    weights={"gauss_w2": 0.5}, **fields).resolved()
    bundle = build_dataset("digits")
    teacher = freeze(build_teacher(cfg, bundle, 0))
    return Trainer(build_student(cfg, bundle, 0), bundle, cfg, cfg.methods()[0], 0, tmp_path / name, CPU,
                   teacher=teacher)


def _spy_steps(monkeypatch, change=None):
    """Record (batch size, loss, ce, distill, term) of every training step; ``change(i, out)`` may
    alter the i-th step's outputs before the loss is composed."""
    seen, real_forward, real_loss = [], Step.forward, Step.loss

    def forward(self, x, y, key, **kw):
        out = real_forward(self, x, y, key, **kw)
        if change is not None and kw.get("net") is not None:   # a training step (calibration passes no net)
            change(len(seen), out)
        return out

    def loss(self, out, lam):
        total, distill = real_loss(self, out, lam)
        seen.append((out.logits.shape[0], total.item(), out.ce.item(), distill.item(), out.values[0].item()))
        return total, distill
    monkeypatch.setattr(Step, "forward", forward)
    monkeypatch.setattr(Step, "loss", loss)
    return seen


def test_the_logged_epoch_means_are_per_sample_with_a_short_last_batch(tmp_path, monkeypatch):
    """1437 digits in batches of 100: 14 full batches and one of 37. The log's loss, ce, distill and
    term are the per-sample means of the step values, Σ n_b·v_b / 1437."""
    tr = _trainer(tmp_path, batch_size=100)
    steps = _spy_steps(monkeypatch)
    tr.fit()
    assert [n for n, *_ in steps] == [100] * 14 + [37]
    row = json.loads((tmp_path / "r/log.jsonl").read_text().splitlines()[0])
    want = [sum(s[0] * s[k] for s in steps) / 1437 for k in (1, 2, 3, 4)]
    got = [row["loss"], row["ce"], row["distill"], row["terms"]["gauss_w2"]]
    assert got == pytest.approx(want, rel=1e-6)
    unweighted = sum(s[2] for s in steps) / len(steps)
    assert abs(unweighted - want[1]) > 1e-4                      # the short batch's weight shows


# ----------------------------------------------------------------------------- non-finite steps
def test_the_first_bad_step_and_its_values_are_kept_not_a_later_ones():
    """Steps 1 and 3 (of 0…4) are non-finite: the tally names step 1 with step 1's CE and term,
    and counts two bad steps."""
    tally = EpochTally(2, CPU)
    plan = [(1.5, 0.25, 0.5), (1.25, math.nan, 0.375), (1.0, 0.125, 0.25), (0.75, 0.5, math.inf), (0.5, 0.25, 0.25)]
    for step, (ce, a, b) in enumerate(plan):
        loss = T(ce + a + b)
        tally.add(step, _out(8, ce, a, b), loss, T(a + b), OK if math.isfinite(float(loss)) else NOT_OK)
    got = tally.read()
    assert got["bad_steps"] == 2 and got["first_bad"] == 1
    assert got["first_values"][0] == 1.25 and math.isnan(got["first_values"][1]) and got["first_values"][2] == 0.375
    assert got["first_is_local"] and not got["first_student_nonfinite"] and not got["first_teacher_nonfinite"]


def test_a_finite_loss_with_non_finite_gradients_is_a_bad_step():
    """A loss of 2.0 whose backward overflowed (its gradients were zeroed, grads_ok False) is a bad
    step: counted, and named with its values."""
    tally = EpochTally(1, CPU)
    tally.add(0, _out(4, 1.0, 0.5), T(1.5), T(0.5), OK)
    tally.add(1, _out(4, 1.5, 0.5), T(2.0), T(0.5), NOT_OK)
    tally.add(2, _out(4, 0.5, 0.5), T(1.0), T(0.5), OK)
    got = tally.read()
    assert got["bad_steps"] == 1 and got["first_bad"] == 1 and got["first_values"] == [1.5, 0.5]


def test_large_finite_gradients_pass_and_non_finite_ones_are_zeroed():
    """Entries of 1e30 (float32): finite, though their 2-norm (√(n·1e60)) overflows float32; the
    step keeps them. A NaN or inf anywhere zeroes every gradient and reports the step bad."""
    big = torch.nn.Parameter(torch.zeros(4, 4))
    small = torch.nn.Parameter(torch.zeros(3))
    big.grad, small.grad = torch.full((4, 4), 1e30), T([1.0, -2.0, 3.0])
    assert math.isinf(float(torch.linalg.vector_norm(big.grad)))   # what a 2-norm check would read
    ok = zero_nonfinite_gradients([big, small])  # one flag per parameter
    assert ok.tolist() == [True, True] and (big.grad == 1e30).all() and small.grad.tolist() == [1.0, -2.0, 3.0]
    for bad in (math.inf, math.nan):
        small.grad = T([1.0, bad, 3.0])
        big.grad = torch.full((4, 4), 1e30)
        assert zero_nonfinite_gradients([big, small]).tolist() == [True, False]  # which one was not finite
        assert (big.grad == 0).all() and (small.grad == 0).all()


def test_a_divergence_message_names_the_first_bad_step_and_its_ce(tmp_path, monkeypatch):
    """The term goes NaN at steps 3 and 5 (1-based) of the first epoch: the run stops naming step 3,
    with that step's CE as the training computed it and the term's NaN."""
    def nan_term(i, out):
        if i in (2, 4):
            out.values[0] = out.values[0] * math.nan
    tr = _trainer(tmp_path, batch_size=128)
    steps = _spy_steps(monkeypatch, nan_term)
    with pytest.raises(NonFiniteLossError) as e:
        tr.fit()
    ce = steps[2][2]
    assert math.isfinite(ce) and math.isnan(steps[2][1]) and math.isnan(steps[4][1])
    assert f"non-finite loss at epoch 1, step 3 (ce={ce:.4g}, gauss_w2=nan)" in str(e.value)
    assert json.loads((tmp_path / "r/diverged.json").read_text())["where"] == \
        f"non-finite loss at epoch 1, step 3 (ce={ce:.4g}, gauss_w2=nan)"
