"""Pins on the engine and the tables: each test here fails on a realistic one-line bug that the
rest of the suite let through (a mutation test found them): λ ignored, the cosine schedule off
by an epoch, the Δ-vs-CE sign flipped, the teacher shown as the best student, a teacher's logits
not detached."""
import json
import math

import pytest
import torch

from kd2m import losses
from kd2m import results as R
from kd2m.cli import main


def _log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_loss_is_ce_plus_weighted_terms_and_lr_follows_the_cosine(tmp_path):
    """Non-default λ for two terms of one student: every epoch's logged loss is CE + Σ λ_k·term_k
    with the configured λ (not 1, not the other term's), and the lr each epoch trained with is the
    cosine closed form lr_min + (lr − lr_min)(1 + cos(π e/E))/2, reaching lr_min after E epochs."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"out: {tmp_path / 'r'}\nepochs: 4\nteacher_epochs: 1\nseeds: [0]\nbaselines: []\nmetrics: []\n"
                   "lr: 0.08\nlr_min: 0.001\nprogress: false\n"
                   "students:\n  combo: [{term: gauss_w2, weight: 0.3}, {term: kd, weight: 0.7, options: {temperature: 2.0}}]\n")
    assert main(["bench", str(cfg)]) == 0
    log = _log(tmp_path / "r/combo/seed0/log.jsonl")
    assert [e["epoch"] for e in log] == [1, 2, 3, 4]
    for e in log:
        assert e["weights"] == {"gauss_w2": 0.3, "kd": 0.7}
        assert e["terms"]["gauss_w2"] > 0 and e["terms"]["kd"] > 0
        want = e["ce"] + 0.3 * e["terms"]["gauss_w2"] + 0.7 * e["terms"]["kd"]
        assert e["loss"] == pytest.approx(want, rel=1e-6)
        assert e["distill"] == pytest.approx(want - e["ce"], rel=1e-6)
    E = 4
    lrs = [0.001 + (0.08 - 0.001) * (1 + math.cos(math.pi * e / E)) / 2 for e in range(E + 1)]
    assert [e["lr"] for e in log] == pytest.approx(lrs[:E], rel=1e-9)
    assert lrs[E] == pytest.approx(0.001)


def test_multistep_schedule_decays_at_the_milestones(tmp_path):
    out = tmp_path / "m"
    assert main(["run", "--epochs", "4", "--teacher-epochs", "1", "--seeds", "0", "--baselines", "ce", "--metrics", "",
                 "--lr", "0.1", "--lr-schedule", "multistep", "--lr-milestones", "2,3", "--lr-gamma", "0.5",
                 "--out", str(out), "--no-progress"]) == 0
    assert [e["lr"] for e in _log(out / "ce/seed0/log.jsonl")] == pytest.approx([0.1, 0.1, 0.05, 0.025])


def _rows(accs):
    return [{"dataset": "x", "method": m, "seed": s, "test_acc": a, "weight": 0.0}
            for m, per in accs.items() for s, a in enumerate(per)]


def test_golden_markdown_table_with_hand_computed_paired_deltas():
    rows = _rows({"teacher": [0.99, 0.99, 0.99], "ce": [0.80, 0.82, 0.81], "cw2": [0.85, 0.86, 0.88],
                  "w2": [0.78, 0.79, 0.79], "gauss_w2": [0.81, 0.81, 0.83]})
    # cw2 − ce per seed: +5, +4, +7 points: mean 5.333…, sd 1.5275…, t(0.975, 2) = 4.302652729911275
    t2 = 4.302652729911275
    d = [5.0, 4.0, 7.0]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    lo, hi = mean - t2 * sd / math.sqrt(3), mean + t2 * sd / math.sqrt(3)
    table = R.markdown_table(rows, "x")
    lines = {ln.split("|")[1].strip(): ln for ln in table.splitlines()[2:] if ln.startswith("|")}
    assert list(lines) == ["teacher", "student (CE only)", "W2 (E)", "CW2 (E)", "W2 (G)"]
    assert lines["CW2 (E)"] == (f"| CW2 (E) | **86.33 ± 1.53** | 3 | +{mean:.2f} [+{lo:.2f}, +{hi:.2f}] | "
                                f"{_p(d):.3f} | 3/3 | better |")
    # w2 − ce: −2, −3, −2: mean −2.33, sd 0.577, half-width 4.303·0.333 = 1.43: [−3.77, −0.90] excludes 0
    assert lines["W2 (E)"].startswith("| W2 (E) | 78.67 ± 0.58 | 3 | -2.33 [-3.77, -0.90] |")
    assert lines["W2 (E)"].endswith("| 0/3 | worse |")
    # gauss_w2 − ce: +1, −1, +2: the interval straddles 0, no verdict
    assert lines["W2 (G)"].endswith("| 2/3 | — |")
    assert "**" not in lines["teacher"]  # the teacher is never the best student


def _p(d):
    from scipy import stats
    return stats.ttest_1samp(d, 0.0).pvalue


def test_summary_csv_matches_the_hand_computation(tmp_path):
    rows = _rows({"ce": [0.50, 0.60, 0.55, 0.58], "dkd": [0.52, 0.61, 0.58, 0.57]})
    R.write_reports(tmp_path, rows, "x")
    import csv
    got = {r["method"]: r for r in csv.DictReader((tmp_path / "summary.csv").open())}
    d = [2.0, 1.0, 3.0, -1.0]
    from scipy import stats
    ci = stats.t.interval(0.95, 3, loc=sum(d) / 4, scale=stats.sem(d))
    assert float(got["dkd"]["delta"]) == pytest.approx(1.25)
    assert float(got["dkd"]["delta_ci_low"]) == pytest.approx(ci[0])
    assert float(got["dkd"]["delta_ci_high"]) == pytest.approx(ci[1])
    assert float(got["dkd"]["p_value"]) == pytest.approx(stats.ttest_rel([52, 61, 58, 57], [50, 60, 55, 58]).pvalue)
    assert got["dkd"]["wins"] == "3" and got["ce"]["delta"] == ""


@pytest.mark.parametrize("name", ["kd", "dkd", "dist"])
def test_logit_terms_never_send_gradient_into_the_teacher(name):
    zs = torch.randn(8, 5, requires_grad=True)
    zt = torch.randn(8, 5, requires_grad=True)
    y = torch.arange(8) % 5
    v = losses.get(name)(student_logits=zs, teacher_logits=zt, labels=y)
    v.backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert zt.grad is None or float(zt.grad.abs().sum()) == 0.0


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


@pytest.mark.parametrize("match", ["global", "local"])
def test_the_engine_builds_distances_with_the_configured_match(tmp_path, match):
    """--match local reached the config but not the terms (they always gathered the global batch)."""
    from kd2m.config import RunConfig
    from kd2m.data import build_dataset
    from kd2m.train import Trainer, build_student, build_teacher
    cfg = RunConfig(metrics=["cw2"], baselines=[], match=match, epochs=1, progress=False).resolved()
    bundle = build_dataset("digits")
    tr = Trainer(build_student(cfg, bundle, 0), bundle, cfg, cfg.methods()[0], 0, tmp_path / "r",
                 torch.device("cpu"), teacher=build_teacher(cfg, bundle, 0))
    tr._setup()
    assert [b.module.loss.match for b in tr.terms] == [match]


def test_term_schedules_warmup_and_linear():
    """λ_k(epoch): DKD's warm-up min((e+1)/w, 1) (epochs counted from 1, as mdistiller), then
    linear growth or decay over the run; the engine logs exactly these per epoch."""
    from kd2m.methods import TermConfig
    dkd = TermConfig("dkd", 2.0)  # registered warm-up: 20 epochs
    assert [dkd.weight_at(e, 240) for e in (0, 9, 19, 100)] == pytest.approx([0.1, 1.0, 2.0, 2.0])
    up = TermConfig("cw2", 1.0, schedule="linear_up")
    down = TermConfig("cw2", 1.0, schedule="linear_down", warmup=2)
    assert [up.weight_at(e, 4) for e in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert [down.weight_at(e, 4) for e in range(4)] == pytest.approx([0.5 * 1.0, 1.0 * 0.75, 0.5, 0.25])


def test_logged_weights_follow_the_schedule(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"out: {tmp_path / 'r'}\nepochs: 3\nteacher_epochs: 1\nseeds: [0]\nbaselines: [ce]\nmetrics: []\n"
                   "progress: false\nstudents:\n  s: [{term: dkd, weight: 0.3, warmup: 2}, "
                   "{term: cw2, weight: 0.1, schedule: linear_down}]\n")
    assert main(["bench", str(cfg)]) == 0
    log = _log(tmp_path / "r/s/seed0/log.jsonl")
    assert [e["weights"]["dkd"] for e in log] == pytest.approx([0.15, 0.3, 0.3])
    assert [e["weights"]["cw2"] for e in log] == pytest.approx([0.1, 0.1 * 2 / 3, 0.1 / 3])


@pytest.mark.parametrize("negatives", ["other_class", "uniform"])
def test_the_engine_gives_crd_the_training_labels_it_draws_negatives_by(tmp_path, negatives):
    """CRD drew its negatives uniformly; RepDistiller's default draws them from other classes,
    which needs every training sample's label from the engine (and a run's draws stay on the
    global RNG, so resumes replay them)."""
    from kd2m.config import RunConfig
    from kd2m.data import build_dataset
    from kd2m.train import Trainer, build_student, build_teacher
    cfg = RunConfig(baselines=["crd"], metrics=[], epochs=1, progress=False,
                    term_options={"crd": {"negatives": negatives, "nce_k": 50}}).resolved()
    bundle = build_dataset("digits")
    tr = Trainer(build_student(cfg, bundle, 0), bundle, cfg, cfg.methods()[0], 0, tmp_path / "r",
                 torch.device("cpu"), teacher=build_teacher(cfg, bundle, 0))
    tr._setup()
    (crd,) = [b.module for b in tr.terms]
    assert crd.negatives == negatives
    labels = bundle.train.labels
    index = torch.arange(0, 40)
    idx = crd.contrast_index(index)
    same = labels[idx[:, 1:]] == labels[index][:, None]
    if negatives == "other_class":
        assert torch.equal(crd.train_labels, labels) and not same.any()
    else:  # uniform over 10 classes: about a tenth of the 2000 draws share the anchor's class
        assert 100 < int(same.sum()) < 300


def test_ce_weight_scales_ce_in_the_loss_and_is_part_of_a_runs_settings(tmp_path, capsys):
    """mdistiller's and RepDistiller's KD is 0.1·CE + 0.9·KD: a student's CE weight (the term's
    registered one, or ``ce_weights``) multiplies CE in the loss every epoch, is stored with the run,
    and a run made with another CE weight is not silently reused."""
    out = tmp_path / "r"
    cfg = tmp_path / "c.yaml"
    body = (f"out: {out}\nepochs: 2\nteacher_epochs: 1\nseeds: [0]\nbaselines: [ce, kd, dkd]\nmetrics: []\n"
            "progress: false\nweights: {{kd: 0.9, dkd: 0.1}}\n{extra}"
            "students:\n  combo: [{{term: gauss_w2, weight: 0.3}}, {{term: kd, weight: 0.7}}]\n")
    cfg.write_text(body.format(extra="ce_weights: {combo: 0.25}\n"))
    assert main(["bench", str(cfg)]) == 0
    for key, w_ce, lam in (("kd", 0.1, {"kd": 0.9}), ("dkd", 1.0, {"dkd": 0.1}),
                           ("combo", 0.25, {"gauss_w2": 0.3, "kd": 0.7})):
        for e in _log(out / key / "seed0/log.jsonl"):
            if key != "dkd":  # dkd warms its λ up
                assert e["weights"] == pytest.approx(lam)
            want = w_ce * e["ce"] + sum(e["weights"][k] * e["terms"][k] for k in e["terms"])
            assert e["loss"] == pytest.approx(want, rel=1e-6), key
        settings = json.loads((out / key / "seed0/final.json").read_text())["settings"]
        assert settings.get("ce_weight", 1.0) == w_ce and ("ce_weight" in settings) == (w_ce != 1.0)
    assert "ce_weight" not in json.loads((out / "ce/seed0/final.json").read_text())["settings"]
    header = (out / "results.md").read_text().split("\n\n")[1]
    assert "kd 0.9 (CE×0.1)" in header and "combo auto×0.3" not in header and "combo 0.3 + 0.7 (CE×0.25)" in header
    # the same directory with kd's CE weight changed: refused, not reused
    cfg.write_text(body.format(extra="ce_weights: {combo: 0.25, kd: 0.2}\n"))
    assert main(["bench", str(cfg)]) == 2
    assert "ce_weight 0.1 there, 0.2 now" in capsys.readouterr().err


@pytest.mark.parametrize("ce_weights, message", [
    ({"ce": 0.5}, "'ce' trains on CE alone"),
    ({"kdd": 0.5}, "'kdd' names no student"),
    ({"kd": 0}, "CE weight of 'kd' must be a finite number > 0"),
    ({"kd": float("nan")}, "must be a finite number > 0"),
    ({"kd": True}, "must be a finite number > 0"),
    ([0.1], "expected a mapping of student names"),
])
def test_bad_ce_weights_are_refused(ce_weights, message):
    from kd2m.config import ConfigError, RunConfig
    with pytest.raises(ConfigError, match=message):
        RunConfig(ce_weights=ce_weights).resolved()


def test_ce_weight_defaults():
    """KD's registered CE weight is the authors' 0.1 (with λ 0.9); the digits grid keeps CE at 1 with
    its swept KD λ = 1, and drops both the moment the user sets their own `weights:`. `--weight` sets
    the distances' λ only: the baselines keep their λ and CE weights (issue 22, item 10: it used to
    turn KD's CE weight 1 into 0.1 and DKD's λ 0.1 into 1 on the digits)."""
    from kd2m.config import RunConfig
    assert (losses.spec("kd").weight, losses.spec("kd").ce_weight) == (0.9, 0.1)
    assert {losses.spec(n).ce_weight for n in losses.available() if n != "kd"} == {1.0}

    def ce(cfg):
        return {m.key: m.ce_weight for m in cfg.resolved().methods()}
    assert ce(RunConfig()) == {"ce": 1.0, "kd": 1.0, "dkd": 1.0, "dist": 1.0, **{m: 1.0 for m in RunConfig().metrics}}
    assert ce(RunConfig(weight="auto"))["kd"] == 1.0
    lam = {m.key: m.terms[0].weight for m in RunConfig(weight=0.5).resolved().methods() if m.terms}
    assert (lam["kd"], lam["dkd"], lam["dist"]) == (1.0, 0.1, 1.0) and lam["w2"] == lam["cw2"] == 0.5
    assert ce(RunConfig(weights={"kd": 0.9}))["kd"] == 0.1
    assert ce(RunConfig(weights={"kd": 0.9}, ce_weights={"kd": 0.5}))["kd"] == 0.5
    both = RunConfig(metrics=[], baselines=[], students={"two": ["kd", "cw2"]}, ce_weights={}).resolved()
    assert [m.ce_weight for m in both.methods()] == [1.0]  # several terms: 1 unless given


def test_a_run_copied_under_a_sweep_variants_name_is_that_variants_row(tmp_path):
    """Runs made elsewhere with the same settings are reused by copying their directories in (the
    README's merged MNIST-1D grid). A `cw2` run copied to `cw2@auto*1` has identical settings, but
    its row took the method key stored in its final.json, so it overwrote `cw2`'s own row in
    results.csv (found comparing auto with swept λ on MNIST-1D)."""
    import shutil
    out = tmp_path / "r"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"out: {out}\nepochs: 1\nteacher_epochs: 1\nseeds: [0]\nbaselines: [ce]\nmetrics: [cw2]\n"
                   "weight: auto*1\nprogress: false\n")  # auto*1: a bare auto would choose its K first
    assert main(["bench", str(cfg)]) == 0
    auto_acc = R.read_rows(out / "results.csv")
    auto_acc = {r["method"]: r["test_acc"] for r in auto_acc}["cw2"]
    shutil.copytree(out / "cw2", out / "cw2@auto*1")
    cfg.write_text(cfg.read_text().replace("weight: auto*1\n", "weight: 0.001\n"))   # cw2 itself: another λ
    shutil.rmtree(out / "cw2")
    assert main(["bench", str(cfg)]) == 0
    assert main(["bench", str(cfg), "--sweep", "auto_weight=1"]) == 0          # trains nothing new
    rows = {r["method"]: r for r in R.read_rows(out / "results.csv")}
    assert rows["cw2@auto*1"]["test_acc"] == auto_acc
    assert rows["cw2"]["test_acc"] == json.loads((out / "cw2/seed0/final.json").read_text())["test_acc"]
    assert rows["cw2"]["run_dir"] == "cw2/seed0" and rows["cw2@auto*1"]["run_dir"] == "cw2@auto*1/seed0"


def test_an_auto_weight_sweep_sweeps_the_baselines_at_auto_alike():
    """Issue 21: the baselines get the distances' sweep budget and rule — `--sweep auto_weight=…`
    varies K of every term at `auto` (MNIST-1D's baselines), and leaves a baseline at a number alone."""
    from kd2m.config import RunConfig
    from kd2m.grid import sweep_variants
    cfg = RunConfig(dataset="mnist1d", metrics=["cw2"], baselines=["ce", "kd", "dkd"], seeds=[100],
                    weights={"kd": "auto", "dkd": 0.1}).resolved()
    got = {m.key: [(t.weight, t.auto) for t in m.terms] for _, m in sweep_variants(cfg, ("auto_weight", [0.3, 3.0]))}
    assert got == {"ce": [], "kd@auto*0.3": [(0.3, True)], "kd@auto*3": [(3.0, True)], "dkd": [(0.1, False)],
                   "cw2@auto*0.3": [(0.3, True)], "cw2@auto*3": [(3.0, True)]}
