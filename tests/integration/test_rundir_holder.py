"""A run refused by a held output directory leaves the holder's temp files alone."""
import os
import subprocess
import sys

from kd2m.harness.cli import main

# 6 ---------------------------------------------------------------------------------------------
HOLD = """
import sys, time
from kd2m.harness.rundir import RunDir
with RunDir(sys.argv[1]).locked():
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_refused_run_leaves_the_holders_temp_files_alone(tmp_path, capsys):
    """A second `kd2m run` into a busy directory is refused (exit 2) without touching it: the temp
    file of the holder's write in flight is still there (temp files are cleaned only under the lock)."""
    out = tmp_path / "busy"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert proc.stdout.readline().strip() == "locked"
        tmp = out / "ce" / "seed0" / ".final.json.abcd1234.tmp"
        tmp.parent.mkdir(parents=True)
        tmp.write_text("{half a write")
        code = main(["run", "--out", str(out), "--epochs", "1", "--teacher-epochs", "1", "--seeds", "0,",
                     "--baselines", "ce", "--metrics", "", "--no-progress"])
        assert code == 2
        assert "is in use by pid" in capsys.readouterr().err
        assert tmp.read_text() == "{half a write"
    finally:
        proc.kill()
        proc.wait(timeout=30)
