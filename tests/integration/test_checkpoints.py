"""Run checkpoints and weight files that are corrupt, malicious or unwritable: one clear line, nothing run."""
import os

import pytest
import torch

import kd2m.atomic_io as ckpt_mod
from kd2m.atomic_io import atomic_write_bytes, load_checkpoint

from helpers import TINY_GRID, fail_writes, one_line_error, run_cli


def _evil_pickle(path, marker):
    """A torch file whose unpickling would run ``touch marker`` (if loaded with weights_only=False)."""
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"model": Evil()}, path)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_disk_full_during_training_is_one_line_and_keeps_epoch_one(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    run_dir = out / "cw2" / "seed0"
    snapshot = {}
    real = atomic_write_bytes

    def spy(path, data, durable=True):  # remember the last checkpoint that reached the disk
        real(path, data, durable)
        if str(path).endswith("cw2/seed0/checkpoint.pt"):
            snapshot["bytes"] = bytes(data)
    monkeypatch.setattr(ckpt_mod, "atomic_write_bytes", spy)
    fail_writes(monkeypatch, "cw2/seed0/.checkpoint.pt.", fail_on=2)
    code, _, err = run_cli(["run", *TINY_GRID, "--epochs", "2", "--out", out], capsys)
    one_line_error(code, err, "No space left on device", "checkpoint.pt")
    assert (run_dir / "checkpoint.pt").read_bytes() == snapshot["bytes"]
    assert load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == 1
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_pickle_that_runs_code_is_refused_as_pretrained_student(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    _evil_pickle(tmp_path / "evil.pt", marker)
    code, _, err = run_cli(["run", *TINY_GRID, "--pretrained-student", tmp_path / "evil.pt", "--out", tmp_path / "o"],
                           capsys)
    one_line_error(code, err, "evil.pt")
    assert not marker.exists()


def test_pickle_that_runs_code_is_refused_as_a_run_checkpoint(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    from kd2m.harness.rundir import RunDir
    RunDir(tmp_path / "o").mark()
    run_dir = tmp_path / "o" / "cw2" / "seed0"
    run_dir.mkdir(parents=True)
    _evil_pickle(run_dir / "checkpoint.pt", marker)
    code, _, err = run_cli(["run", *TINY_GRID, "--out", tmp_path / "o"], capsys)
    line = one_line_error(code, err, str(run_dir / "checkpoint.pt"), "weights_only=True")
    assert "weights_only=False" not in line  # never advise the unsafe load
    assert not marker.exists()
    with pytest.raises(ValueError, match="refused"):
        load_checkpoint(run_dir / "checkpoint.pt")
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage", None], ids=["empty", "bad-pickle", "random"])
def test_corrupt_run_checkpoint_is_a_clear_error(tmp_path, capsys, content):
    from kd2m.harness.rundir import RunDir
    RunDir(tmp_path / "o").mark()  # a kd2m output directory whose run checkpoint got corrupted
    run_dir = tmp_path / "o" / "cw2" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(os.urandom(2048) if content is None else content)
    code, _, err = run_cli(["run", *TINY_GRID, "--out", tmp_path / "o"], capsys)
    one_line_error(code, err, "checkpoint.pt", "corrupt")
