"""A killed run or grid resumes: to the bit-identical result of an uninterrupted run, with nothing finished
redone or duplicated."""
import json
import signal
import subprocess
import time

import pytest
import torch

from kd2m.atomic_io import load_checkpoint

from helpers import ENV, kd2m_cmd, read_csv


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
    keys = [(row["method"], int(row["seed"])) for row in read_csv(out / "results.csv")]
    assert sorted(keys) == sorted({(m, s) for m in ("teacher", "cw2", "gauss_w2") for s in (0, 1)})
    assert len(keys) == len(set(keys)) == 6


def _wait_for(predicate, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False



def _ckpt_epoch(path):
    try:
        return load_checkpoint(path)["epoch"]
    except Exception:
        return 0



@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_identical_result(tmp_path, sig):
    args = ["run", "--metrics", "cw2", "--baselines", "ce", "--seeds", "1", "--epochs", "6", "--no-progress"]
    ref = tmp_path / "ref"
    subprocess.run(kd2m_cmd(*args, "--out", str(ref)), check=True, env=ENV, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(kd2m_cmd(*args, "--out", str(out)), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ckpt = out / "cw2/seed0/checkpoint.pt"
    assert _wait_for(lambda: ckpt.exists() and _ckpt_epoch(ckpt) >= 2, proc), "run ended before it could be killed"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    if sig == signal.SIGTERM:
        assert "rerun the same command to resume" in err
    assert not (out / "cw2/seed0/final.json").exists()
    done = subprocess.run(kd2m_cmd(*args, "--out", str(out)), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    want = {r["method"]: r["test_acc"] for r in read_csv(ref / "results.csv")}
    got = {r["method"]: r["test_acc"] for r in read_csv(out / "results.csv")}
    assert got == want
    a = load_checkpoint(ref / "cw2/seed0/model.pt")
    b = load_checkpoint(out / "cw2/seed0/model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical weights after the resume
    log = (out / "cw2/seed0/log.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in log] == [1, 2, 3, 4, 5, 6]

