"""weight: auto under torchrun: two ranks choose K on the pilot grid, then train the grid (several
processes: the e2e tier's)."""
import csv
import json
import os
import subprocess
import sys


def _final(out, method, seed=0):
    return json.loads((out / method / f"seed{seed}" / "final.json").read_text())


def test_torchrun_two_ranks_choose_k_then_run_the_grid(tmp_path):
    """Under torchrun the pilot took the output directory's lock before the process group existed:
    every rank was rank 0, and rank 1 was told the directory was in use by its own rank 0."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kd2m", "run", "--epochs", "1", "--teacher-epochs", "1", "--seeds", "0,", "--metrics", "cw2",
           "--baselines", "ce", "--weight", "auto", "--select-k", "0,1", "--select-seeds", "100,",
           "--out", str(out), "--no-progress", "--device", "cpu"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "in use by" not in r.stderr
    k = json.loads((out / "select-k/selected.json").read_text())["chosen"]["cw2"]["k"]
    with open(out / "results.csv", newline="") as f:
        assert sorted(row["method"] for row in csv.DictReader(f)) == ["ce", "cw2", "teacher"]
    assert _final(out, "cw2")["settings"]["terms"][0]["weight"] == k
    assert _final(out, "cw2")["settings"]["world_size"] == 2
    assert r.stdout.count("kd2m: cw2: K=0: ") == 1  # the choice is printed once, by rank 0
