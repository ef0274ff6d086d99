"""Learning-rate and term-weight schedules: the cosine and multistep lr, warm-ups and linear ramps, warm-ups
scaled to the run's length or refused."""
import json
import math

import pytest

from kd2m.harness.cli import main

from helpers import REPO_ROOT, one_line_exit_2


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


def test_term_schedules_warmup_and_linear():
    """λ_k(epoch): DKD's warm-up min((e+1)/w, 1) (epochs counted from 1, as mdistiller), then
    linear growth or decay over the run; the engine logs exactly these per epoch."""
    from kd2m.training.methods import TermConfig
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


def _dkd_row(card: str) -> str:
    section = card.split("\n### dkd — ", 1)[1].split("\n### ", 1)[0]
    return next(line for line in section.splitlines() if line.startswith("| dkd ("))


def test_the_authors_dkd_warmup_is_scaled_to_a_shorter_run(tmp_path, capsys):
    """DKD's 20-epoch warm-up is mdistiller's for 240 epochs; on the paper configs' 15 it kept λ
    at 0.75 of its value in the last epoch, and the card said "warm-up 20 epochs (authors'
    default)". Now the same share of the run (1 of 15), said on the card, in config.json and the
    run's settings, and trained with."""
    from kd2m.harness.config import RunConfig
    assert main(["bench", str(REPO_ROOT / "configs/paper/cifar100.yaml"), "--baselines", "ce,dkd", "--dry-run",
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
    from kd2m.harness.config import load_yaml
    for path in sorted((REPO_ROOT / "configs/crd").glob("*.yaml")):
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
        line = one_line_exit_2(code, capsys.readouterr().err, "term_options: dkd: warmup 20 reaches the run's 15 epochs",
                              "only 0.75 of its value", "give a warmup below 15",
                              "the authors' 20 of 240 epochs, scaled to this run: 1")
        assert len(line) <= 300
        assert not out.exists()
    cfg.write_text(f"out: {out}\nepochs: 3\nseeds: [0]\nbaselines: [ce]\nmetrics: []\nprogress: false\n"
                   "students:\n  s: [{term: dkd, weight: 0.3, warmup: 3}]\n")
    one_line_exit_2(main(["bench", str(cfg)]), capsys.readouterr().err, "students: s[0]: warmup 3 reaches the run's 3 "
                   "epochs: λ of 'dkd' would get to its value only in the last epoch")
    assert not out.exists()
