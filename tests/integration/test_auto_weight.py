"""`weight: auto`: λ calibrated on the initial student against CE (kd2m.training.auto_weight)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from kd2m.atomic_io import load_checkpoint
from kd2m.data import build_dataset
from kd2m.errors import ConfigError
from kd2m.harness.cli import main
from kd2m.harness.config import RunConfig
from kd2m.harness.trainer import Trainer
from kd2m.models import build_model
from kd2m.training.build import freeze
from kd2m.training.methods import parse_weight


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


def _oracle_scale(tr, metric):
    """Σ_b ‖∇θ CE(b)‖ / Σ_b ‖∇θ D(b)‖ over the first 4 batches of 128 in index order, the student
    of ``tr`` as it is now, in train mode, written out here independently of the engine."""
    from kd2m import FeatureTap, metrics
    params = list(tr.model.parameters())
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
    return ce_sum / term_sum


@pytest.mark.parametrize("metric", ["cw2", "mmd_rbf"])
def test_scale_is_the_ratio_of_gradient_norms_on_the_first_batches(tmp_path, metric):
    """λ = K · Σ_b ‖∇θ CE(b)‖ / Σ_b ‖∇θ D(b)‖ over the first 4 batches in index order, recomputed
    here independently of the engine (the same student, teacher and batches)."""
    tr = _trainer(tmp_path, metric, "auto*0.5")
    tr._setup()
    scale = tr.scales[0]
    assert scale == pytest.approx(_oracle_scale(tr, metric), rel=1e-4)
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


def test_auto_every_recalibrates_on_the_student_as_it_is_at_that_epoch(tmp_path):
    """auto_every=1: the λ of epoch 2 is K times the gradient-norm ratio on the student after
    epoch 1 (recomputed here with the same oracle as at initialisation), not the initial one."""
    import dataclasses
    tr = _trainer(tmp_path, "cw2", "auto*0.5")
    tr.cfg = dataclasses.replace(tr.cfg, auto_every=1)
    tr.epochs = 2
    tr._setup()
    first = tr._epoch(tr.model, 0)["weights"]["cw2"]
    state = {k: v.clone() for k, v in tr.model.state_dict().items()}
    expected = 0.5 * _oracle_scale(tr, "cw2")
    tr.model.load_state_dict(state)  # the oracle's forward passes moved no weights, only BN statistics (none here)
    second = tr._epoch(tr.model, 1)["weights"]["cw2"]
    assert second == pytest.approx(expected, rel=1e-4)
    assert abs(second / first - 1) > 0.05  # the student moved: the recalibrated λ is another one


def test_auto_every_resumes_with_the_last_recalibrated_lambda(tmp_path, monkeypatch):
    """auto_every=2 over 4 epochs, killed in epoch 4 (not a recalibration epoch): the resumed run
    trains that epoch with the λ recalibrated at epoch 3 (kept in the checkpoint), so it ends
    bit-identical to the uninterrupted run. Reading the initial λ back instead changes the weights."""
    from kd2m.harness.trainer import fit
    bundle = build_dataset("digits")
    cfg = RunConfig(metrics=["cw2"], baselines=[], weights={"cw2": "auto"}, epochs=4, auto_every=2,
                    progress=False, diagnostics=False).resolved()
    torch.manual_seed(0)
    teacher = freeze(build_model("digits_cnn", 10, 1, 8))
    method = cfg.methods()[0]

    def run(name):
        torch.manual_seed(1)
        student = build_model("digits_mlp", 10, 1, 8)
        return fit(student, bundle, cfg, method, 0, tmp_path / name, torch.device("cpu"), teacher=teacher)

    ref = run("ref")
    weights = [json.loads(line)["weights"]["cw2"] for line in (tmp_path / "ref/log.jsonl").read_text().splitlines()]
    assert weights[0] == weights[1] != weights[2] == weights[3]  # recalibrated at epochs 1 and 3 (1-based)
    real_epoch = Trainer._epoch

    def dies_in_epoch_4(self, net, epoch):
        if epoch == 3:
            raise KeyboardInterrupt
        return real_epoch(self, net, epoch)

    monkeypatch.setattr(Trainer, "_epoch", dies_in_epoch_4)
    with pytest.raises(KeyboardInterrupt):
        run("killed")
    monkeypatch.setattr(Trainer, "_epoch", real_epoch)
    got = run("killed")
    a, b = load_checkpoint(tmp_path / "ref/model.pt"), load_checkpoint(tmp_path / "killed/model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert got["test_acc"] == ref["test_acc"]
    logged = [json.loads(line)["weights"]["cw2"] for line in (tmp_path / "killed/log.jsonl").read_text().splitlines()]
    assert logged == weights


def test_auto_every_is_a_setting_of_auto_runs_only_and_refused_below_zero():
    from kd2m.training.state import run_settings
    cfg = RunConfig(metrics=["cw2"], baselines=["ce"], weights={"cw2": "auto"}, auto_every=1).resolved()
    by_key = {m.key: m for m in cfg.methods()}
    assert run_settings(cfg, by_key["cw2"], 0, 10)["auto_every"] == 1
    assert "auto_every" not in run_settings(cfg, by_key["ce"], 0, 10)
    once = RunConfig(metrics=["cw2"], baselines=[], weights={"cw2": "auto"}).resolved()
    assert "auto_every" not in run_settings(once, once.methods()[0], 0, 10)
    with pytest.raises(ConfigError, match="auto_every"):
        RunConfig(auto_every=-1).resolved()


def test_a_term_that_goes_flat_mid_run_is_that_runs_divergence_not_the_grids_error(tmp_path, monkeypatch):
    """With auto_every, a recalibration after training started can find the term flat (a student
    whose features collapsed under the term's pull: seen at auto*10 on the digits, MMD's gradient
    exactly 0). That is the run's divergence, recorded, and the grid trains its other students;
    before, the calibration's ConfigError ended the whole grid at that run."""
    import kd2m.harness.trainer as train_module
    real, real_epoch = train_module.calibrate, Trainer._epoch
    now = {"epoch": 0}

    def flat_after_start(step, *args, **kw):
        if now["epoch"] > 0 and step.terms and step.terms[0].config.name == "cw2":
            raise ConfigError("cw2: weight auto for term 'cw2': its gradient on the initial student is 0")
        return real(step, *args, **kw)

    def epoch_seen(self, net, epoch):
        now["epoch"] = epoch
        try:
            return real_epoch(self, net, epoch)
        finally:
            now["epoch"] = 0

    monkeypatch.setattr(train_module, "calibrate", flat_after_start)
    monkeypatch.setattr(Trainer, "_epoch", epoch_seen)
    out = tmp_path / "g"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"out: {out}\nepochs: 2\nteacher_epochs: 1\nseeds: [0]\nbaselines: [ce]\nmetrics: [cw2, w2]\n"
                   "weight: auto\nauto_every: 1\nparallel: 1\nprogress: false\n")
    assert main(["bench", str(cfg)]) == 2  # the grid finishes, then says which run diverged
    assert "recalibrating λ at epoch 2" in json.loads((out / "cw2/seed0/diverged.json").read_text())["where"]
    assert (out / "w2/seed0/final.json").exists()


def test_a_recalibrated_student_compares_with_the_ce_only_student(tmp_path, capsys):
    """auto_every is how a student's λ is set, its method's own setting like its terms: `kd2m
    compare cw2:ce` pairs it with the CE-only student (which has no auto term, so no auto_every),
    and still refuses a pair that differs in anything else. Before, it refused the pair."""
    from kd2m.harness.paired import settings_difference
    out = tmp_path / "g"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"out: {out}\nepochs: 1\nteacher_epochs: 1\nseeds: 2\nbaselines: [ce]\nmetrics: [cw2]\n"
                   "weight: auto\nauto_every: 1\nparallel: 1\nprogress: false\n")
    assert main(["bench", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["compare", str(out), "cw2:ce"]) == 0
    assert "CW2 (E)" in capsys.readouterr().out
    assert settings_difference({"auto_every": 1, "epochs": 1}, {"epochs": 2}) == ["epochs 1 vs 2"]
