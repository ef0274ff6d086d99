"""Results rebuilt from each run's final.json: corrupt files named, a sweep variant's copied run is its row."""
import csv
import json

import pytest

from kd2m.harness import results as R
from kd2m.harness.cli import main

from helpers import ONE_EPOCH_GRID, one_line_error, run_cli


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_results_are_rebuilt_from_the_runs_final_json(tmp_path, capsys):
    """A conflicting duplicate row (hand-edited) survived a rerun and entered results.md."""
    out = tmp_path / "o"
    argv = ["run", *ONE_EPOCH_GRID, "--baselines", "ce", "--metrics", "cw2", "--out", out]
    assert run_cli(argv, capsys)[0] == 0
    rows = _rows(out / "results.csv")
    fake = dict(next(r for r in rows if r["method"] == "cw2"), test_acc="0.123")
    with open(out / "results.csv", "a", newline="") as f:
        csv.DictWriter(f, fieldnames=list(rows[0])).writerow(fake)
    assert run_cli(argv, capsys)[0] == 0
    again = _rows(out / "results.csv")
    assert len(again) == len(rows) and "0.123" not in {r["test_acc"] for r in again}
    truth = json.loads((out / "cw2/seed0/final.json").read_text())["test_acc"]
    assert [float(r["test_acc"]) for r in again if r["method"] == "cw2"] == [truth]
    assert "12.30" not in (out / "results.md").read_text()


@pytest.mark.parametrize("victim, content, needle", [
    ("cw2/seed0/final.json", "{not json", "final.json: not valid JSON"),
    ("results.json", "[1, 2", "results.json: not valid JSON"),
    ("cw2/seed0/log.jsonl", None, "log.jsonl, line 1: not valid JSON"),
])
def test_corrupt_result_files_are_named(tmp_path, capsys, victim, content, needle):
    out = tmp_path / "o"
    argv = ["run", *ONE_EPOCH_GRID, "--baselines", "ce", "--metrics", "cw2", "--out", out]
    assert run_cli(argv, capsys)[0] == 0
    path = out / victim
    path.write_text(content if content is not None else path.read_text()[:25])  # a cut log
    command = argv if victim.endswith("final.json") else ["report", out, "--no-embedding"] \
        if victim.endswith("log.jsonl") else ["table", out]
    code, _, err = run_cli(command, capsys)
    one_line_error(code, err, needle)


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
