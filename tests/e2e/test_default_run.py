"""`kd2m run` with no options, end to end: the full default grid on the embedded digits data."""
import subprocess
import time

import pytest

from kd2m.catalog import PAPER_METRICS

from helpers import ENV, kd2m_cmd, read_csv


@pytest.mark.slow
def test_full_default_run_distillation_helps(tmp_path):
    """`kd2m run` with no options, end to end (10 seeds): the claims the README makes of it hold on
    the paired intervals of summary.csv."""
    out = tmp_path / "default"
    t0 = time.time()
    r = subprocess.run(kd2m_cmd("run", "--out", str(out), "--no-progress"), env=ENV, capture_output=True, text=True)
    elapsed = time.time() - t0
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    print(f"default run took {elapsed:.1f}s")
    rows = read_csv(out / "results.csv")
    assert {int(row["seed"]) for row in rows} == set(range(10))
    summary = {row["method"]: row for row in read_csv(out / "summary.csv")}
    assert set(summary) == {"teacher", "ce", "kd", "dkd", "dist", *PAPER_METRICS}
    assert float(summary["teacher"]["mean"]) > float(summary["ce"]["mean"])
    for m in ("cw2", "gauss_cw2", "kd"):  # label-aware matching and KD: the interval excludes 0, above
        assert float(summary[m]["delta_ci_low"]) > 0, summary[m]

