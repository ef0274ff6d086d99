"""λ chosen on a holdout of the training split (`--holdout`, `--select-k`, kd2m.harness.select_k)."""
import json

import pytest
import torch

from kd2m.data import build_dataset
from kd2m.data.registry import holdout_split
from kd2m.errors import ConfigError
from kd2m.harness.cli import main
from kd2m.harness.config import RunConfig
from kd2m.harness.select_k import choose

from helpers import REPO_ROOT


def test_holdout_split_is_a_fixed_partition():
    train, held = holdout_split(1797, 0.2)
    assert len(held) == 359 and len(train) == 1797 - 359  # round(0.2 · 1797)
    assert sorted(train + held) == list(range(1797))
    assert train == sorted(train) and held == sorted(held)
    assert holdout_split(1797, 0.2) == (train, held)  # the same split for every run and seed
    torch.manual_seed(123)  # torch's global RNG does not move it
    assert holdout_split(1797, 0.2) == (train, held)
    assert len(holdout_split(5, 1e-9)[1]) == 1 and len(holdout_split(5, 0.999)[0]) == 1  # never an empty part


def test_a_holdout_bundle_trains_on_the_rest_and_scores_on_plain_training_items():
    """The test split is replaced by held-out training items, as the test split would see them
    (no augmentation), and they are not in the training part."""
    full = build_dataset("digits")
    bundle = build_dataset("digits", holdout=0.25)
    train, held = holdout_split(len(full.train), 0.25)
    assert len(bundle.train) == len(train) and len(bundle.test) == len(held)
    for j in (0, 7, len(held) - 1):
        x, y = bundle.test[j]
        fx, fy = full.train[held[j]]
        assert torch.equal(x, fx) and y == fy
    assert torch.equal(bundle.train[3][0], full.train[train[3]][0])
    with pytest.raises(ValueError, match="holdout"):
        build_dataset("digits", holdout=1.0)


def test_holdout_is_checked_and_stored_only_when_set():
    with pytest.raises(ConfigError, match="holdout"):
        RunConfig(holdout=1.5).resolved()
    with pytest.raises(ConfigError, match="holdout"):
        RunConfig(holdout=-0.1).resolved()
    from kd2m.training.state import run_settings
    cfg = RunConfig(metrics=["cw2"], baselines=[]).resolved()
    method = cfg.methods()[0]
    assert "holdout" not in run_settings(cfg, method, 0, 1)  # runs made before keep their settings
    held = RunConfig(metrics=["cw2"], baselines=[], holdout=0.2).resolved()
    assert run_settings(held, method, 0, 1)["holdout"] == 0.2


def _row(method, seed, acc=None, ppl=None):
    r = {"method": method, "seed": seed, "test_acc": acc}
    if ppl is not None:
        r["test_ppl"] = ppl
    return r


def test_choose_takes_the_best_mean_and_never_a_k_that_diverged():
    rows = [_row("cw2@auto*1", 0, 0.80), _row("cw2@auto*1", 1, 0.90),   # mean 0.85
            _row("cw2@auto*3", 0, 0.95), _row("cw2@auto*3", 1, 0.80),   # mean 0.875: the best
            _row("cw2@auto*10", 0, 0.99),                                # seed 1 diverged: no candidate
            _row("w2@auto*1", 0, 0.5), _row("w2@auto*1", 1, 0.7),       # a tie: the smaller K
            _row("w2@auto*3", 0, 0.7), _row("w2@auto*3", 1, 0.5),
            _row("ce", 0, 0.1), _row("ce", 1, 0.1)]
    got = choose(rows, ["cw2", "w2", "mmd_rbf"], [1, 3, 10], [0, 1])
    assert got["cw2"]["k"] == 3 and got["cw2"]["means"] == {"1": pytest.approx(0.85), "3": pytest.approx(0.875),
                                                           "10": None}
    assert got["w2"]["k"] == 1
    assert got["mmd_rbf"] is None  # no run at all


def test_k_0_is_the_term_off_read_from_the_ce_only_student():
    """A term that helps at no K is switched off: K = 0 scores as the CE-only student (auto*0
    trains bit-identical to it: tests/integration/test_auto_weight.py), with no pilot of its own."""
    rows = [_row("ce", 0, 0.62), _row("ce", 1, 0.64),
            _row("mmd_rbf@auto*1", 0, 0.60), _row("mmd_rbf@auto*1", 1, 0.61),
            _row("cw2@auto*1", 0, 0.70), _row("cw2@auto*1", 1, 0.72)]
    got = choose(rows, ["mmd_rbf", "cw2"], [0, 1], [0, 1])
    assert got["mmd_rbf"] == {"k": 0, "means": {"0": pytest.approx(0.63), "1": pytest.approx(0.605)}}
    assert got["cw2"]["k"] == 1


def test_choose_takes_the_lowest_perplexity_for_text():
    rows = [_row("w2@auto*0.3", 0, 0.4, 9.0), _row("w2@auto*1", 0, 0.5, 9.5)]
    assert choose(rows, ["w2"], [0.3, 1], [0])["w2"]["k"] == 0.3  # perplexity decides, not token accuracy


def _cfg(tmp_path, extra=""):
    out = tmp_path / "g"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"out: {out}\nepochs: 1\nteacher_epochs: 1\nseeds: [0]\nbaselines: [kd]\nmetrics: [cw2]\n"
                   f"weight: auto\nparallel: 1\nprogress: false\n{extra}")
    return cfg, out


def test_select_k_chooses_on_the_holdout_and_reports_at_that_k(tmp_path):
    """One command: a pilot grid on the selection seed, trained without the holdout and scored on
    it, chooses K; the reported grid then trains at auto*K on the full training split."""
    cfg, out = _cfg(tmp_path, "select_k: [0, 1]\nselect_seeds: [100]\n"  # in the config, as any setting
                    "students: {pair: [{term: w2, weight: 0.01}, {term: kd, weight: 0.5}]}\n")
    assert main(["bench", str(cfg)]) == 0
    pilot = out / "select-k"
    sel = json.loads((pilot / "selected.json").read_text())
    assert not (pilot / "cw2@auto*0").exists()  # K = 0 is the CE-only student: no pilot of its own
    accs = {k: json.loads((pilot / run / "seed100/final.json").read_text())["test_acc"]
            for k, run in (("0", "ce"), ("1", "cw2@auto*1"))}
    best = max(accs, key=lambda k: (accs[k], -float(k)))
    assert sel["chosen"]["cw2"] == {"k": float(best), "means": {k: pytest.approx(v) for k, v in accs.items()}}
    assert sel["holdout"] == 0.2 and sel["seeds"] == [100]
    # the pilot: 80% of the training split, scored on the other 20%, the teacher likewise
    assert json.loads((pilot / "teacher/seed100/final.json").read_text())["settings"]["holdout"] == 0.2
    from kd2m.models import build_model
    teacher = build_model("digits_cnn", 10, 1, 8)
    teacher.load_state_dict(torch.load(pilot / "teacher/seed100/model.pt", weights_only=True))
    teacher.eval()
    held = build_dataset("digits", holdout=0.2).test
    with torch.no_grad():
        x = torch.stack([held[i][0] for i in range(len(held))])
        y = torch.tensor([held[i][1] for i in range(len(held))])
        acc = float((teacher(x).argmax(1) == y).float().mean())
    assert json.loads((pilot / "teacher/seed100/final.json").read_text())["test_acc"] == pytest.approx(acc)
    assert not (pilot / "kd").exists()  # a baseline at a fixed λ has nothing to choose
    assert not (pilot / "pair").exists()  # nor a named student, its λ written out
    assert (out / "pair/seed0/final.json").exists()
    # the reported grid: the full training split, the test split, the chosen K
    final = json.loads((out / "cw2/seed0/final.json").read_text())
    assert "holdout" not in final["settings"]
    assert final["settings"]["terms"][0]["weight"] == float(best) and final["settings"]["terms"][0]["auto"]
    assert json.loads((out / "config.json").read_text())["select_k"] == [0.0, 1.0]  # how its λ was chosen
    assert (out / "kd/seed0/final.json").exists()


@pytest.mark.parametrize("args, says", [
    (["--select-k", "1,3", "--select-seeds", "0,"], "would both choose λ and be reported"),
    (["--select-k", "3"], "at least two K"),
    (["--select-k", "1,x"], "comma list of numbers"),
    (["--select-k", "1,3", "--sweep", "auto_weight=1,3"], "not both"),
    (["--select-k", "1,3", "--select-holdout", "1"], "select_holdout"),
])
def test_bad_selections_are_refused_before_anything_is_written(tmp_path, capsys, args, says):
    cfg, out = _cfg(tmp_path)
    assert main(["bench", str(cfg)] + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("kd2m: error: ") and says in err and err.count("\n") == 1
    assert not out.exists()


def test_the_reproduction_card_says_the_lambda_will_be_chosen(capsys):
    assert main(["run", "--dry-run", "--select-k", "0,1,3", "--metrics", "cw2,w2", "--baselines", "ce,kd"]) == 0
    out = capsys.readouterr().out
    assert ("λ of cw2, w2: chosen before the grid by `select_k` among auto×0, auto×1, auto×3 (0: the term off), "
            "on a holdout of 0.2 of the training split, seeds [100, 101, 102]") in out


def test_a_bare_auto_is_chosen_by_default_and_auto_k_written_out_is_kept(tmp_path, capsys):
    """`weight: auto` in a grid means K chosen on the holdout among DEFAULT_K, with no option
    given; a term at `auto*K` written out keeps its K (no pilot of its own)."""
    from kd2m.harness.select_k import DEFAULT_K
    cfg, out = _cfg(tmp_path, "select_seeds: [100]\nweights: {w2: auto*1}\n")
    cfg.write_text(cfg.read_text().replace("metrics: [cw2]", "metrics: [cw2, w2]").replace("baselines: [kd]",
                                                                                              "baselines: [ce]"))
    assert main(["bench", str(cfg)]) == 0
    pilot = out / "select-k"
    sel = json.loads((pilot / "selected.json").read_text())
    assert sel["candidates"] == list(DEFAULT_K) == [0.0, 0.3, 1.0, 3.0, 10.0]
    assert list(sel["chosen"]) == ["cw2"] and sorted(sel["chosen"]["cw2"]["means"]) == ["0", "0.3", "1", "10", "3"]
    assert sorted(p.name for p in pilot.iterdir() if p.is_dir()) == \
        ["ce", "cw2@auto*0.3", "cw2@auto*1", "cw2@auto*10", "cw2@auto*3", "teacher"]  # no w2: its K is written out
    terms = {m: json.loads((out / m / "seed0/final.json").read_text())["settings"]["terms"][0] for m in ("cw2", "w2")}
    assert terms["cw2"]["weight"] == sel["chosen"]["cw2"]["k"] and terms["cw2"]["auto"]
    assert terms["w2"]["weight"] == 1.0 and terms["w2"]["auto"]
    assert json.loads((out / "config.json").read_text())["select_k"] == list(DEFAULT_K)
    printed = capsys.readouterr().out
    assert "cw2: K=0: " in printed  # every K's holdout score is printed
    k = sel["chosen"]["cw2"]["k"]  # and under the table, the K each chosen term trained at
    assert f"λ chosen on a holdout (select-k/selected.json): CW2 (E) auto×{k:g}" + \
        (" (the term off)." if k == 0 else ".") in printed


@pytest.mark.parametrize("off", ["--select-k none", "--select-k off", "config: select_k: off"])
def test_select_k_none_keeps_auto_at_one_calibration(tmp_path, off):
    """`--select-k none` (`select_k: off` in YAML, which reads it as False): no pilot grid, and
    `auto` trains at auto*1, what it meant before the choice was its meaning."""
    cfg, out = _cfg(tmp_path, off[len("config: "):] + "\n" if off.startswith("config:") else "")
    cfg.write_text(cfg.read_text().replace("baselines: [kd]", "baselines: []"))
    assert main(["bench", str(cfg)] + ([] if off.startswith("config:") else off.split())) == 0
    assert not (out / "select-k").exists()
    term = json.loads((out / "cw2/seed0/final.json").read_text())["settings"]["terms"][0]
    assert term["weight"] == 1.0 and term["auto"]


def test_plan_names_the_terms_and_the_candidates():
    from kd2m.harness.select_k import DEFAULT_K, plan
    base = dict(metrics=["cw2", "w2", "mmd_rbf"], baselines=["ce", "kd", "dkd", "dist"], weight="auto",
                weights={"w2": "auto*3", "mmd_rbf": 10.0, "kd": "auto", "dkd": "auto*1"})
    cfg = RunConfig(**base).resolved()
    assert plan(cfg) == (["cw2", "kd"], list(DEFAULT_K))  # bare auto only: not auto*K, not a number
    assert plan(cfg, sweep=("auto_weight", [1.0, 3.0])) is None  # a sweep sets K
    assert plan(cfg, sweep=("lr", [0.1])) is None
    assert plan(RunConfig(**base, select_k="none").resolved()) is None
    assert plan(RunConfig(**base, select_k=[]).resolved()) is None
    # given: every distance and every baseline at auto, its fixed λ overridden (as an auto_weight sweep)
    assert plan(RunConfig(**base, select_k="0,1").resolved()) == (["cw2", "w2", "mmd_rbf", "kd", "dkd"], [0.0, 1.0])
    with pytest.raises(ConfigError, match="not both"):
        plan(RunConfig(**base, select_k="0,1").resolved(), sweep=("auto_weight", [1.0]))
    assert plan(RunConfig(metrics=["cw2"], baselines=["ce"], weight=0.1).resolved()) is None  # nothing at auto


def test_a_default_choice_on_the_reported_seeds_is_refused_with_the_way_out(tmp_path, capsys):
    cfg, out = _cfg(tmp_path)
    assert main(["bench", str(cfg), "--seeds", "100,"]) == 2
    err = capsys.readouterr().err
    assert "would both choose λ and be reported" in err and "--select-k none" in err and err.count("\n") == 1
    assert not out.exists()


def test_a_command_line_weight_replaces_a_configs_per_distance_lambda(capsys):
    """`kd2m bench configs/digits.yaml --weight auto` trained the config's swept λ: its `weights:`
    entries per distance won over the command line silently (over a dataset's defaults, --weight
    already replaced them). The baselines' λ stay the config's."""
    config = REPO_ROOT / "configs/digits.yaml"
    assert main(["bench", str(config), "--weight", "auto*3", "--dry-run", "--metrics", "cw2,w2"]) == 0
    card = capsys.readouterr().out
    rows = {line.split(" (")[0].strip("| "): line.split(" | ")[1] for line in card.splitlines()
            if line.startswith(("| cw2 (", "| w2 (", "| kd (", "| dkd ("))}
    assert rows["cw2"].startswith("auto×3") and rows["w2"].startswith("auto×3")
    assert rows["kd"].startswith("1 ") and rows["dkd"].startswith("0.1 ")  # configs/digits.yaml's own


def test_select_k_true_is_refused_naming_the_forms():
    with pytest.raises(ConfigError, match="select_k: a comma list of K .*or none; got true"):
        RunConfig(select_k=True).resolved()
