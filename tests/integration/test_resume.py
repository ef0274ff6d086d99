"""A killed grid resumes: nothing finished is redone or duplicated."""
import csv
import signal
import subprocess
import time

from helpers import ENV, kd2m_cmd


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_killed_bench_grid_resumes_without_redoing_or_duplicating(tmp_path):
    out = tmp_path / "grid"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"dataset: digits\nepochs: 2\nteacher_epochs: 1\nseeds: 2\nbaselines: []\n"
                   f"metrics: [cw2, gauss_w2]\nout: {out}\nprogress: false\n")
    first = out / "cw2" / "seed0" / "final.json"
    proc = subprocess.Popen(kd2m_cmd("bench", str(cfg)), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while not first.exists() and proc.poll() is None and time.time() - t0 < 120:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the grid finished before it could be killed"
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/final.json")}
    assert first in finished and out / "teacher" / "seed0" / "final.json" in finished
    assert len(finished) < 6
    r = subprocess.run(kd2m_cmd("bench", str(cfg)), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was redone"
    keys = [(row["method"], int(row["seed"])) for row in _read_csv(out / "results.csv")]
    assert sorted(keys) == sorted({(m, s) for m in ("teacher", "cw2", "gauss_w2") for s in (0, 1)})
    assert len(keys) == len(set(keys)) == 6
