"""Training you can watch (kd2m.harness.monitor): diagnostics in log.jsonl, TensorBoard event files, the report figure."""
import json
import re
import sys
from pathlib import Path

import numpy as np
import ot
import pytest
import torch
from torch import nn

from kd2m.data import build_dataset
from kd2m.harness.cli import main
from kd2m.harness.config import RunConfig
from kd2m.harness.monitor import FeatureGapProbe, plan_mass
from kd2m.training.methods import Method

TINY = ["--epochs", "2", "--teacher-epochs", "1", "--seeds", "1", "--baselines", "ce", "--metrics", "cw2",
        "--no-progress"]


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- the quantities
@pytest.mark.parametrize("labels, same_class, chance", [([0, 1, 0, 1], 0.5, 0.5), ([0, 1, 1, 2], 1.0, 6 / 16)])
def test_plan_mass_on_a_case_with_a_known_plan(labels, same_class, chance):
    # Two clusters on a line; the teacher lists its points as 0.1, 10.1, 1.1, 11.1. The optimal
    # plan moves each student point by 0.1: s0→t0, s1→t2, s2→t1, s3→t3 (any other pairing crosses
    # the 9-unit gap). Same input: pairs (0,0) and (3,3) → 1/2. Same class: pairs (0,0), (1,2),
    # (2,1), (3,3) compared by label. W2² = mean of 0.1² = 0.01.
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [11.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.1, 0.0], [10.1, 0.0], [1.1, 0.0], [11.1, 0.0]], dtype=torch.float64)
    y = torch.tensor(labels)
    out = plan_mass(s, t, y)
    pairs = [(0, 0), (1, 2), (2, 1), (3, 3)]
    assert out["same_class_mass"] == pytest.approx(sum(labels[i] == labels[j] for i, j in pairs) / 4)
    assert out["same_class_mass"] == pytest.approx(same_class)
    assert out["same_input_mass"] == pytest.approx(0.5)
    assert out["chance_same_class"] == pytest.approx(chance)
    assert out["w2_sq"] == pytest.approx(0.01, rel=1e-9)


def test_plan_mass_matches_pot_emd():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(40, 5, generator=g), torch.randn(40, 5, generator=g) + 0.5
    y = torch.randint(0, 4, (40,), generator=g)
    out = plan_mass(s, t, y)
    a = np.full(40, 1 / 40)
    M = ot.dist(s.double().numpy(), t.double().numpy())  # squared Euclidean
    assert out["w2_sq"] == pytest.approx(ot.emd2(a, a, M), rel=1e-10)
    G = ot.emd(a, a, M)  # continuous random data: the optimal plan is unique
    yn = y.numpy()
    assert out["same_class_mass"] == pytest.approx(G[yn[:, None] == yn[None, :]].sum(), abs=1e-12)
    assert out["same_input_mass"] == pytest.approx(np.trace(G), abs=1e-12)
    assert out["chance_same_class"] == pytest.approx(sum((np.bincount(yn) / 40) ** 2))


def test_probe_matches_bound_terms_and_skips_w2_across_widths():
    from kd2m.harness.theorem import bound_terms
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(6, generator=g), int(i % 3)) for i in range(20)]
    teacher = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    student = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    student.train()
    diag = FeatureGapProbe(teacher, data, "cpu", samples=16)(student)
    assert student.training  # its mode is given back
    x, y = torch.stack([d[0] for d in data[:16]]), torch.tensor([d[1] for d in data[:16]])
    ref = bound_terms(teacher, student, (x, y), samples=16)
    for key in ("w2", "l2", "risk_student", "risk_teacher", "ce_student", "ce_gap", "coupling_holds"):
        assert diag[key] == pytest.approx(ref[key], rel=1e-9), key
    assert diag["n"] == 16 and 0.0 <= diag["same_class_mass"] <= 1.0
    wide = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    diag = FeatureGapProbe(teacher, data, "cpu", samples=16)(wide)
    assert diag["w2"] is None and diag["same_class_mass"] is None and "dims differ" in diag["skipped"]
    assert diag["risk_student"] is not None

    class Blowup(nn.Module):
        def forward(self, x):
            return x * float("inf")
    broken = nn.Sequential(nn.Linear(6, 8), Blowup(), nn.Linear(8, 3))
    diag = FeatureGapProbe(teacher, data, "cpu", samples=16)(broken)  # no exception: the run goes on
    assert "non-finite" in diag["skipped"] and "w2" not in diag


# ----------------------------------------------------------------------------- changes nothing
def _fit(tmp: Path, diagnostics: bool, student: str):
    from kd2m.harness.trainer import fit
    from kd2m.training.build import build_student, build_teacher, freeze
    cfg = RunConfig(dataset="digits", epochs=2, metrics=["w2"], baselines=[], seeds=[0], student=student,
                    progress=False, diagnostics=diagnostics).resolved()
    bundle = build_dataset("digits")
    teacher = freeze(build_teacher(cfg, bundle, 0))
    model = build_student(cfg, bundle, 0)
    method = Method("w2", (cfg.term("w2"),))
    fit(model, bundle, cfg, method, 0, tmp, torch.device("cpu"), teacher=teacher)
    return torch.load(tmp / "model.pt", weights_only=True), _log(tmp)


@pytest.mark.parametrize("student", ["digits_mlp", "digits_cnn"])  # dropout; BatchNorm statistics
def test_diagnostics_leave_training_bit_identical(tmp_path, student):
    with_diag, log_on = _fit(tmp_path / "on", True, student)
    without, log_off = _fit(tmp_path / "off", False, student)
    assert with_diag.keys() == without.keys()
    for k in with_diag:
        assert torch.equal(with_diag[k], without[k]), k
    assert all("diag" in r for r in log_on) and not any("diag" in r for r in log_off)
    for a, b in zip(log_on, log_off):
        assert {k: v for k, v in a.items() if k not in ("diag", "seconds")} == \
            {k: v for k, v in b.items() if k != "seconds"}


# ----------------------------------------------------------------------------- TensorBoard
def _board(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    return acc


def _expected(row: dict) -> dict:
    """What TensorBoard must hold for one log.jsonl row, written out here independently of kd2m."""
    out = {"accuracy/test": row["test_acc"], "loss/total": row["loss"], "loss/ce": row["ce"],
           "loss/distill": row["distill"], "lr": row["lr"]}
    out.update({f"term/{k}": v for k, v in row.get("terms", {}).items()})
    out.update({f"lambda/{k}": v for k, v in row.get("weights", {}).items()})
    for k, v in row.get("diag", {}).items():
        if k not in ("n", "samples", "dim_teacher", "dim_student") and type(v) in (int, float):
            out[f"diag/{k}"] = v
    return out


def _check_board(run: Path) -> None:
    from tensorboard.util import tensor_util
    rows = _log(run)
    acc = _board(run)
    want = {}
    for r in rows:
        for tag, v in _expected(r).items():
            want.setdefault(tag, []).append((r["epoch"], v))
    got_tags = set(acc.Tags()["tensors"]) - {"settings/text_summary"}
    assert got_tags == set(want), sorted(got_tags ^ set(want))
    for tag, points in want.items():
        got = [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in acc.Tensors(tag)]
        assert got == points, tag  # every step once, the exact float64 of log.jsonl
    text = tensor_util.make_ndarray(acc.Tensors("settings/text_summary")[0].tensor_proto).item().decode()
    settings = json.loads(re.search(r"```\n(.*)\n```", text, re.S).group(1))
    assert settings == json.loads((run / "final.json").read_text())["settings"]
    assert len(acc.Tensors("settings/text_summary")) == 1


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tb") / "run"
    assert main(["run", *TINY, "--tensorboard", "--out", str(out)]) == 0
    return out


def test_tensorboard_holds_every_logged_value(tiny_run):
    for name in ("teacher", "ce", "cw2"):
        _check_board(tiny_run / name / "seed0")
    assert "diag/w2" in _board(tiny_run / "cw2" / "seed0").Tags()["tensors"]
    assert "diag/w2" in _board(tiny_run / "ce" / "seed0").Tags()["tensors"]  # the reference student
    assert not any(t.startswith("diag/") for t in _board(tiny_run / "teacher" / "seed0").Tags()["tensors"])


def test_report_draws_the_diagnostics(tiny_run):
    from kd2m.harness.report import make_report
    path = make_report(tiny_run, embedding=False, device="cpu")
    assert (path.parent / "diagnostics.png").stat().st_size > 10_000
    assert "![W2 to the teacher and same-class plan mass per epoch](diagnostics.png)" in path.read_text()


def test_diagnostic_curves_are_means_over_seeds():
    from kd2m.harness.plots import diagnostic_curves, plot_diagnostics
    logs = {"w2": [[{"epoch": 1, "diag": {"w2": 2.0}}, {"epoch": 2, "diag": {"w2": 1.0}}],
                   [{"epoch": 1, "diag": {"w2": 4.0}}, {"epoch": 2, "diag": {"w2": 3.0}}]],
            "teacher": [[{"epoch": 1}]]}
    assert diagnostic_curves(logs, "w2") == {"w2": ([1, 2], [3.0, 2.0])}
    assert plot_diagnostics({"teacher": [[{"epoch": 1}]]}, Path("/nonexistent/x.png")) is None  # nothing drawn


def test_resumed_run_writes_each_step_once(tmp_path, monkeypatch):
    import kd2m.harness.trainer as T
    calls = {"n": 0}
    real = T.Trainer._evaluate

    def dies_in_epoch_two(*a, **k):  # the second evaluation of the student's run: after epoch 1's checkpoint
        calls["n"] += 1
        if calls["n"] == 3:  # teacher (1 epoch), student epoch 1, student epoch 2
            raise RuntimeError("killed")
        return real(*a, **k)

    monkeypatch.setattr(T.Trainer, "_evaluate", dies_in_epoch_two)
    args = ["--debug", "run", "--epochs", "3", "--teacher-epochs", "1", "--seeds", "1", "--baselines", "",
            "--metrics", "w2", "--tensorboard", "--no-progress", "--out", str(tmp_path)]
    with pytest.raises(RuntimeError, match="killed"):
        main(args)
    run = tmp_path / "w2" / "seed0"
    assert (run / "checkpoint.pt").exists() and len(_log(run)) == 1
    monkeypatch.setattr(T.Trainer, "_evaluate", real)
    assert main(args) == 0
    assert [r["epoch"] for r in _log(run)] == [1, 2, 3]
    assert len(list((run / "tb").iterdir())) == 1  # the resumed run rewrote the history into one file
    _check_board(run)


def test_tensorboard_backfills_a_grid_finished_without_it(tmp_path):
    args = ["run", "--epochs", "1", "--teacher-epochs", "1", "--seeds", "1", "--baselines", "ce", "--metrics", "",
            "--no-progress", "--out", str(tmp_path)]
    assert main(args) == 0
    assert not (tmp_path / "ce" / "seed0" / "tb").exists()
    assert main(args + ["--tensorboard"]) == 0  # nothing retrains; the event files come from log.jsonl
    for name in ("teacher", "ce"):
        _check_board(tmp_path / name / "seed0")


def test_missing_tensorboard_is_one_line_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    assert main(["run", *TINY, "--tensorboard", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install -e ".[tensorboard]"' in err
    assert not (tmp_path / "out").exists()


def test_diagnostics_flag_from_the_command_line():
    from kd2m.harness.cli import build_parser
    from kd2m.harness.commands import config_from_args
    assert config_from_args(build_parser().parse_args(["run"])).diagnostics is True
    assert config_from_args(build_parser().parse_args(["run", "--no-diagnostics"])).diagnostics is False
    assert config_from_args(build_parser().parse_args(["run", "--tensorboard"])).tensorboard is True
