"""`weight: auto`: λ calibrated on the initial student against CE (kd2m.auto_weight)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from kd2m.atomic_io import load_checkpoint
from kd2m.cli import main
from kd2m.config import ConfigError, RunConfig
from kd2m.data import build_dataset
from kd2m.methods import parse_weight
from kd2m.models import build_model
from kd2m.train import Trainer, freeze


def test_parse_weight():
    assert parse_weight(0.3) == (0.3, False)
    assert parse_weight("auto") == (1.0, True)
    assert parse_weight("auto*0.25") == (0.25, True)
    assert parse_weight("1e-3") == (1e-3, False)
    for bad in ("auto*-1", "nan", "inf", -1, "big", True):
        with pytest.raises(ValueError):
            parse_weight(bad)


def test_bad_auto_weights_are_refused_before_training():
    with pytest.raises(ConfigError, match="auto"):
        RunConfig(weight="autox").resolved()
    with pytest.raises(ConfigError, match="weights: λ for 'kd'"):
        RunConfig(weights={"kd": "automatic"}).resolved()


def _trainer(tmp_path, metric, weight):
    bundle = build_dataset("digits")
    cfg = RunConfig(metrics=[metric], baselines=[], weights={metric: weight}, epochs=1, progress=False).resolved()
    torch.manual_seed(0)
    teacher = freeze(build_model("digits_cnn", 10, 1, 8))
    torch.manual_seed(1)
    student = build_model("digits_mlp", 10, 1, 8)
    for m in student.modules():  # dropout off: the oracle below cannot replay the engine's dropout masks
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    method = cfg.methods()[0]
    return Trainer(student, bundle, cfg, method, 0, tmp_path / metric, torch.device("cpu"), teacher=teacher)


def _grad_norm(value, params):
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float((g ** 2).sum()) for g in grads if g is not None))


@pytest.mark.parametrize("metric", ["cw2", "mmd_rbf"])
def test_scale_is_the_ratio_of_gradient_norms_on_the_first_batches(tmp_path, metric):
    """λ = K · Σ_b ‖∇θ CE(b)‖ / Σ_b ‖∇θ D(b)‖ over the first 4 batches in index order, recomputed
    here independently of the engine (the same student, teacher and batches)."""
    tr = _trainer(tmp_path, metric, "auto*0.5")
    tr._setup()
    scale = tr.scales[0]
    from kd2m import FeatureTap, metrics
    params = [p for p in tr.model.parameters()]
    d = metrics.get(metric, **({"ridge": 0.1} if "gauss" in metric else {}))
    ce_sum = term_sum = 0.0
    x_all = torch.stack([tr.bundle.train[i][0] for i in range(4 * 128)])
    y_all = torch.tensor([tr.bundle.train[i][1] for i in range(4 * 128)])
    tr.model.train()
    with FeatureTap(tr.model) as s_tap, FeatureTap(tr.teacher) as t_tap:
        for b in range(4):
            x, y = x_all[128 * b:128 * (b + 1)], y_all[128 * b:128 * (b + 1)]
            logits = tr.model(x)
            with torch.no_grad():
                tr.teacher(x)
            ce_sum += _grad_norm(F.cross_entropy(logits, y), params)
            term_sum += _grad_norm(d(s_tap.feature, t_tap.feature.detach(), y), params)
    assert scale == pytest.approx(ce_sum / term_sum, rel=1e-4)
    row = tr._epoch(tr.model, 0)
    assert row["weights"][metric] == pytest.approx(0.5 * scale, rel=1e-9)  # K times the calibrated λ


def test_auto_balances_the_term_against_ce_as_weighted_in_the_loss(tmp_path):
    """With CE at weight w (e.g. mdistiller's KD, 0.1·CE), `auto` matches the pull of w·CE: the
    calibrated λ is w times the one at CE weight 1 (the same student, teacher and batches)."""
    import dataclasses
    scales = []
    for w in (1.0, 0.25):
        tr = _trainer(tmp_path / str(w), "cw2", "auto")
        tr.method = dataclasses.replace(tr.method, ce_weight=w)
        tr._setup()
        scales.append(tr.scales[0])
    assert scales[1] == pytest.approx(0.25 * scales[0], rel=1e-9)


def test_calibration_leaves_no_trace_on_training(tmp_path):
    """auto*0 (λ = 0 after calibrating) must end bit-identical to the CE-only student: calibration
    draws no randomness the run sees and restores batch-norm statistics and every term state."""
    out = tmp_path / "r"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"out: {out}\nepochs: 2\nteacher_epochs: 1\nseeds: [0]\nbaselines: [ce]\nmetrics: [cw2]\n"
                   "weights: {cw2: 'auto*0'}\nprogress: false\n")
    assert main(["bench", str(cfg)]) == 0
    a, b = load_checkpoint(out / "ce/seed0/model.pt"), load_checkpoint(out / "cw2/seed0/model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    final = json.loads((out / "cw2/seed0/final.json").read_text())
    assert final["auto_scales"]["cw2"] > 0
