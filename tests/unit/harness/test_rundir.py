"""The output-directory contract (kd2m.harness.rundir): layout, ownership, the lock, leftover temp files."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from kd2m.harness.rundir import LOCK, LOCK_INFO, MARKER, OutputDirError, OutputDirInUseError, RunDir, clean_temp_files


def test_layout_paths(tmp_path):
    d = RunDir(str(tmp_path / "o"))
    root = tmp_path / "o"
    assert d.run("teacher", 0) == root / "teacher" / "seed0"
    assert d.run("w2@1e-05", 12) == root / "w2@1e-05" / "seed12"
    assert (d.results_csv, d.summary_csv, d.results_md, d.results_json, d.config_json) == tuple(
        root / n for n in ("results.csv", "summary.csv", "results.md", "results.json", "config.json"))
    assert d.run_of_row({"method": "cw2", "seed": "3", "run_dir": ""}) == root / "cw2" / "seed3"
    assert d.run_of_row({"method": "cw2", "seed": 3, "run_dir": "elsewhere/seed3"}) == root / "elsewhere" / "seed3"
    for bad in ("../../etc", "/etc"):
        with pytest.raises(ValueError, match="outside"):
            d.run_of_row({"method": "cw2", "seed": 3, "run_dir": bad})
    for key in ("", "a/b", ".."):
        with pytest.raises(ValueError, match="method key"):
            d.run(key, 0)
    with pytest.raises(TypeError, match="seed must be an int"):
        d.run("cw2", True)
    assert not root.exists()  # building paths touches nothing


@pytest.mark.parametrize("out", ["", "   ", None])
def test_empty_out_is_refused(out, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputDirError, match="--out must name a directory"):
        RunDir(out)
    assert list(tmp_path.iterdir()) == []


def test_new_and_empty_dirs_get_the_marker_and_the_lock_is_released(tmp_path):
    for out in (tmp_path / "new" / "deep", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        with RunDir(str(out)).locked() as d:
            assert json.loads((out / MARKER).read_text())["version"] == 1
            info = json.loads((out / LOCK_INFO).read_text())
            assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert not (out / LOCK_INFO).exists()
        with d.locked():  # released: the same process takes it again
            pass


def test_foreign_directory_is_refused_and_left_untouched(tmp_path):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "config.json").write_text('{"latex": true}')
    (out / "results.csv").write_text("a,b,extra\n1,2,3\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputDirError, match=r"not empty \(config.json, results.csv\) and not a kd2m output"):
        with RunDir(str(out)).locked():
            raise AssertionError("entered a foreign directory")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no lock, no marker, nothing


def test_file_as_out_and_bad_marker_are_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputDirError, match="is a file"):
        RunDir(str(tmp_path / "f")).check_usable()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / MARKER).write_text("garbage")
    with pytest.raises(OutputDirError, match="not a kd2m marker"):
        RunDir(str(tmp_path / "m")).check_usable()
    (tmp_path / "m" / MARKER).write_text('{"version": 99}')
    with pytest.raises(OutputDirError, match="newer kd2m"):
        RunDir(str(tmp_path / "m")).check_usable()


def test_output_of_an_older_kd2m_is_accepted_and_marked(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    keys = ["dataset", "teacher", "student", "metrics", "baselines", "seeds", "epochs", "lr"]
    (out / "config.json").write_text(json.dumps({k: 1 for k in keys}))
    (out / "results.csv").write_text("method,seed\n")
    with RunDir(str(out)).locked():
        pass
    assert (out / MARKER).is_file()


def test_unwritable_directory_names_it(tmp_path):
    with pytest.raises(OutputDirError, match="cannot write to output directory /proc/forbidden"):
        with RunDir("/proc/forbidden").locked():
            pass
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputDirError, match="afile"):
        with RunDir(str(tmp_path / "afile" / "sub")).locked():
            pass


HOLD = """
import sys, time
from kd2m.harness.rundir import RunDir
with RunDir(sys.argv[1]).locked():
    print("locked", flush=True)
    time.sleep(120)
"""


def _start_holder(out):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), "--marker-arg"], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_process_is_refused_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "o"
    proc = _start_holder(out)
    try:
        t0 = time.perf_counter()
        with pytest.raises(OutputDirInUseError) as info:
            with RunDir(str(out)).locked():
                raise AssertionError("two processes hold the lock")
        assert time.perf_counter() - t0 < 2
        msg = str(info.value)
        assert msg.startswith(f"{out} is in use by pid {proc.pid} on {socket.gethostname()} (")
        assert "--marker-arg" in msg and msg.endswith("; wait for it or use another --out")
        assert len(msg.splitlines()) == 1
        assert json.loads((out / LOCK_INFO).read_text())["pid"] == proc.pid  # the refused one wrote nothing
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_a_killed_holder_does_not_block(tmp_path):
    out = tmp_path / "o"
    proc = _start_holder(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (out / LOCK).exists() and (out / LOCK_INFO).exists()  # stale files of the dead holder
    with RunDir(str(out)).locked():
        assert json.loads((out / LOCK_INFO).read_text())["pid"] == os.getpid()


def test_cli_error_line_for_a_busy_directory(tmp_path, capsys, monkeypatch):
    """The engine's grid runs inside locked(); the CLI turns the refusal into one line, exit 2."""
    import kd2m.harness.cli
    out = tmp_path / "o"
    proc = _start_holder(out)
    try:
        def grid(args):
            with RunDir(str(out)).locked():
                return 0
        monkeypatch.setattr(kd2m.harness.cli, "cmd_metrics", grid)
        code = kd2m.harness.cli.main(["metrics"])
        err = capsys.readouterr().err
        assert code == 2
        assert err.startswith(f"kd2m: error: {out} is in use by pid {proc.pid} on ") and err.count("\n") == 1
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_clean_temp_files_removes_only_killed_atomic_writes(tmp_path):
    import tempfile

    from kd2m.atomic_io import atomic_write_text
    run = tmp_path / "cw2" / "seed0"
    run.mkdir(parents=True)
    fd, killed = tempfile.mkstemp(prefix=".checkpoint.pt.", suffix=".tmp", dir=run)  # what a SIGKILL leaves
    os.close(fd)
    fd, top = tempfile.mkstemp(prefix=".results.csv.", suffix=".tmp", dir=tmp_path)
    os.close(fd)
    keep = [tmp_path / "notes.tmp", tmp_path / ".hidden", run / "checkpoint.pt", tmp_path / ".x.tmp"]
    for p in keep:
        p.write_text("x")
    atomic_write_text(run / "final.json", "{}")
    removed = clean_temp_files(tmp_path)
    assert removed == sorted([tmp_path / os.path.basename(top), run / os.path.basename(killed)])
    assert all(p.exists() for p in keep + [run / "final.json"])
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") and p not in keep]
