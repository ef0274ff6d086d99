"""--compile end to end: torch.compile on several students of one class in one process (its
first compilation takes most of the time; the e2e tier's)."""
import json
import shutil

import pytest

from kd2m.harness.cli import main


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile's CPU backend needs a C++ compiler")
def test_compile_runs_and_the_feature_tap_fires_in_every_run(tmp_path):
    """--compile: several students of one class in one process. Dynamo does not guard on module
    hooks, so without a reset the second student reused the first one's hook-less graph and
    the distillation run failed with 'no features recorded yet'."""
    out = tmp_path / "compiled"
    code = main(["run", "--compile", "--epochs", "1", "--teacher-epochs", "1", "--seeds", "1", "--metrics", "cw2",
                 "--baselines", "ce", "--out", str(out), "--no-progress"])
    assert code == 0
    log = json.loads((out / "cw2/seed0/log.jsonl").read_text().splitlines()[0])
    assert log["distill"] > 0 and log["loss"] > log["ce"]
