"""`kd2m report`, `kd2m bound` / Theorem 1's terms, and the shipped configs, on one real digits run.

The run (2 seeds × teacher, CE, KD, W2, CW2; 5 epochs; the digits default λ = 0.05) is made once
per module. Torch and OpenMP are held to one thread while it trains and embeds: these models
are tiny, and on a busy 2-core machine two spinning threads are ~10× slower than one.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from kd2m.data import build_dataset
from kd2m.harness import results as R
from kd2m.harness import tables
from kd2m.harness.bound import evaluate_run, load_model, load_run
from kd2m.harness.cli import main
from kd2m.harness.config import load_yaml
from kd2m.harness.report import make_report
from kd2m.harness.theorem import bound_terms

from helpers import REPO_ROOT

REPO = REPO_ROOT
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEEDS = (0, 1)
METHODS = ("ce", "kd", "w2", "cw2")


@pytest.fixture(scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, single_thread) -> Path:
    out = tmp_path_factory.mktemp("kd2m") / "run"
    rc = main(["run", "--dataset", "digits", "--metrics", "w2,cw2", "--baselines", "ce,kd", "--seeds", "2",
               "--epochs", "5", "--device", "cpu", "--out", str(out), "--no-progress"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def pairs(run_dir):
    """{(method, seed): (teacher, student, acc_student, acc_teacher)} rebuilt from the run's files."""
    cfg, rows = load_run(run_dir)
    bundle = build_dataset("digits", augment=False)
    by_key = {(r["method"], r["seed"]): r for r in rows}
    out = {}
    for seed in SEEDS:
        teacher = load_model(run_dir, by_key["teacher", seed], cfg["teacher"], bundle, "cpu")
        for m in METHODS:
            student = load_model(run_dir, by_key[m, seed], cfg["student"], bundle, "cpu")
            out[m, seed] = (teacher, student, by_key[m, seed]["test_acc"], by_key["teacher", seed]["test_acc"])
    return bundle, out


def _png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    assert len(data) > 10_000, f"{path.name} is suspiciously small ({len(data)} bytes)"


# ----------------------------------------------------------------------------- report
def test_report_writes_figures_and_markdown(run_dir, single_thread):
    path = make_report(run_dir, embedding=True, device="cpu", embed_samples=150)
    out = run_dir / "report"
    assert path == out / "report.md"
    for name in ("accuracy.png", "curves.png", "embedding.png"):
        _png(out / name)
        assert f"]({name})" in path.read_text()
    md = path.read_text()
    rows = R.read_rows(run_dir / "results.csv")
    assert tables.markdown_table(rows, "digits") in md
    assert "150 fixed test samples" in md


def test_report_cli_without_embedding(run_dir, tmp_path, capsys):
    assert main(["report", str(run_dir), "--no-embedding", "--device", "cpu"]) == 0
    assert "report.md" in capsys.readouterr().out
    md = (run_dir / "report" / "report.md").read_text()
    assert "accuracy.png" in md and "curves.png" in md and "embedding.png" not in md


def test_report_and_bound_need_results_csv(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="results.csv"):
        make_report(tmp_path)
    with pytest.raises(FileNotFoundError, match="results.csv"):
        evaluate_run(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert main(["bound", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("kd2m: error:") == 2 and "results.csv" in err


# ----------------------------------------------------------------------------- Theorem 1's terms
def test_bound_terms_on_trained_pairs(pairs):
    bundle, models = pairs
    for (method, seed), (teacher, student, acc_s, acc_t) in models.items():
        t = bound_terms(teacher, student, bundle.test, samples=1000)
        assert t["n"] == t["samples"] == len(bundle.test) == 360
        assert 0.0 <= t["risk_student"] <= 1.0 and 0.0 <= t["risk_teacher"] <= 1.0
        # the same test set and eval-mode models as the run's own evaluation
        assert abs(t["risk_student"] - (1.0 - acc_s)) < 1e-9, (method, seed)
        assert abs(t["risk_teacher"] - (1.0 - acc_t)) < 1e-9, (method, seed)
        assert t["risk_gap"] == pytest.approx(abs(t["risk_student"] - t["risk_teacher"]))
        assert t["ce_student"] > 0 and t["ce_teacher"] > 0
        assert t["w2"] > 0 and t["coupling_holds"] is True and t["w2"] <= t["l2"] * (1 + 1e-9)
        assert t["w2"] == pytest.approx(t["w2_sq"] ** 0.5)


def test_w2_of_a_model_against_itself_is_zero(pairs):
    bundle, models = pairs
    teacher, student, _, _ = models["w2", 0]
    for model in (teacher, student):
        t = bound_terms(model, model, bundle.test, samples=1000)
        assert t["w2"] == pytest.approx(0.0, abs=1e-9) and t["l2"] == 0.0
        assert t["risk_gap"] == 0.0 and t["ce_gap"] == 0.0 and t["coupling_holds"]


def test_w2_distillation_shrinks_feature_w2_to_the_teacher(pairs):
    bundle, models = pairs
    w2 = {m: statistics.fmean(bound_terms(*models[m, s][:2], bundle.test)["w2"] for s in SEEDS)
          for m in ("ce", "w2")}
    # measured on digits at λ = 0.05, 5 epochs: CE ≈ 18, W2 (E) ≈ 8
    assert w2["w2"] < 0.7 * w2["ce"], w2


def test_bound_terms_input_forms(pairs):
    bundle, models = pairs
    teacher, student, _, _ = models["cw2", 1]
    x = torch.stack([bundle.test[i][0] for i in range(len(bundle.test))])
    y = torch.tensor([bundle.test[i][1] for i in range(len(bundle.test))])
    a = bound_terms(teacher, student, bundle.test, samples=100)
    b = bound_terms(teacher, student, (x, y), samples=100)
    c = bound_terms(teacher, student, torch.utils.data.DataLoader(bundle.test, batch_size=37), samples=100)
    assert a["samples"] == 100 and a["n"] == 360
    for key in ("risk_student", "risk_teacher", "ce_student", "w2", "l2"):
        assert a[key] == pytest.approx(b[key], rel=1e-9) == pytest.approx(c[key], rel=1e-9)
    assert a["coupling_holds"]
    shuffled = torch.utils.data.DataLoader(bundle.test, batch_size=64, shuffle=True)
    with pytest.raises(ValueError, match="shuffle"):
        bound_terms(teacher, student, shuffled)
    assert student.training is False  # left as found (load_model returns eval-mode models)


def test_bound_terms_skip_transport_terms_across_feature_dims(pairs):
    bundle, models = pairs
    teacher = models["ce", 0][0]
    torch.manual_seed(0)
    narrow = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    t = bound_terms(teacher, narrow, bundle.test, samples=50)
    assert t["w2"] is None and t["l2"] is None and t["coupling_holds"] is None
    assert "dims differ" in t["skipped"] and 0.0 <= t["risk_student"] <= 1.0
    assert narrow.training is True  # training mode restored


def test_evaluate_run_writes_json_and_markdown(run_dir, capsys):
    assert main(["bound", str(run_dir), "--samples", "200", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    data = json.loads((run_dir / "bound.json").read_text())
    assert data["n_test"] == 360 and data["n_transport"] == 200
    assert sorted((p["method"], p["seed"]) for p in data["pairs"]) == sorted(
        (m, s) for m in METHODS for s in SEEDS)
    assert all(p["coupling_holds"] for p in data["pairs"])
    for p in data["pairs"]:
        assert abs(p["risk_student"] - (1 - p["acc_results"])) < 1e-9
    assert [s["method"] for s in data["summary"]] == list(METHODS)
    assert all(s["coupling_holds"] == "2/2" for s in data["summary"])
    md = (run_dir / "bound.md").read_text()
    for m in METHODS:
        assert f"| {R.label(m)} | 2 |" in md and f"| {R.label(m)} | 2 |" in printed
    table, path = evaluate_run(run_dir, samples=200, device="cpu")
    assert path == run_dir / "bound.json" and table in md


# ----------------------------------------------------------------------------- configs
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_the_shipped_configs_exist():
    names = {p.relative_to(REPO / "configs").as_posix() for p in CONFIGS}
    assert {"digits.yaml", "paper/svhn.yaml", "paper/cifar10.yaml", "paper/cifar100.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_every_config_loads_and_resolves(path):
    cfg = load_yaml(path)
    if cfg.teacher_epochs == 0:  # made for a released teacher, given on the command line
        cfg.pretrained_teacher = "teacher.pth"
    cfg = cfg.resolved()
    assert cfg.metrics and cfg.seeds and cfg.epochs >= 1
    if path.parent.name == "paper":
        assert (cfg.teacher, cfg.student, cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight) == \
            ("cifar_resnet34", "cifar_resnet18", 15, 128, 0.01, 1e-4)
        assert cfg.dataset == path.stem and cfg.out == f"runs/paper/{path.stem}"
        assert cfg.metrics == ["w2", "cw2", "jw2", "gauss_w2", "gauss_cw2", "gauss_kl"]


# ----------------------------------------------------------------------------- W2 against POT
def _emd2(a: torch.Tensor, b: torch.Tensor) -> float:
    import ot
    M = ot.dist(a.double().numpy(), b.double().numpy())
    return float(ot.emd2(ot.unif(len(a)), ot.unif(len(b)), M, numItermax=10_000_000))


def test_terms_from_outputs_w2_is_the_exact_ot_value():
    """`kd2m bound`'s W2 is the exact OT value (ot.emd2), not the sample-wise (identity) coupling,
    which equals ‖g_S − g_T‖ and was caught only by an accuracy threshold."""
    from kd2m.harness.theorem import ModelOutputs, terms_from_outputs
    g = torch.Generator().manual_seed(0)
    n = 60
    labels = torch.arange(n) % 4
    zt = torch.randn(n, 5, generator=g, dtype=torch.float64) + 3.0 * torch.nn.functional.one_hot(labels % 5, 5)
    zs = zt[torch.randperm(n, generator=g)] + 0.1 * torch.randn(n, 5, generator=g, dtype=torch.float64)

    def outputs(feats):
        return ModelOutputs(torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.float64), labels,
                            feats, torch.arange(n))
    terms = terms_from_outputs(outputs(zt), outputs(zs))
    want = _emd2(zs, zt)
    identity = float(((zs - zt) ** 2).sum(1).mean())
    assert want < 0.5 * identity                     # the two couplings are far apart here
    assert terms["w2_sq"] == pytest.approx(want, rel=1e-10)
    assert terms["l2"] ** 2 == pytest.approx(identity, rel=1e-10)
    assert terms["w2"] == pytest.approx(want ** 0.5, rel=1e-10) and terms["coupling_holds"]


def test_bound_terms_w2_matches_emd2_on_the_penultimate_features():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    student = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(50, 6)
    y = torch.arange(50) % 3
    terms = bound_terms(teacher, student, (x, y), samples=1000)
    with torch.no_grad():
        ft, fs = teacher[:2](x), student[:2](x)   # the inputs of the last nn.Linear
    assert terms["w2_sq"] == pytest.approx(_emd2(fs, ft), rel=1e-6)
    assert terms["l2"] == pytest.approx(float(((fs - ft).double() ** 2).sum(1).mean()) ** 0.5, rel=1e-6)
