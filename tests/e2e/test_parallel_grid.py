"""A parallel grid whose worker is killed ends naming the seed it trained."""
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import ENV, one_line_error


def _children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _cmdline(pid):
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_a_killed_parallel_worker_ends_the_grid_naming_its_seed(tmp_path):
    """multiprocessing.Pool waited forever for a SIGKILLed worker (what the OOM killer does)."""
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "kd2m", "run", "--epochs", "30", "--teacher-epochs", "30",
                             "--seeds", "2", "--parallel", "2", "--baselines", "ce", "--metrics", "",
                             "--no-progress", "--out", str(out)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        workers = []
        deadline = time.time() + 60
        while time.time() < deadline and len(workers) < 2:
            workers = [p for p in _children(proc.pid) if "spawn_main" in _cmdline(p)
                       and "resource_tracker" not in _cmdline(p)]
            time.sleep(0.2)
        assert len(workers) == 2, "the seed workers did not start"
        time.sleep(3)                                   # both are training now
        os.kill(workers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    one_line_error(proc.returncode, err, "the worker training seed ", "died (killed by signal 9", "rerun")
