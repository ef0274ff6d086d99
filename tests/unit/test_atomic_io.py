"""kd2m.atomic_io: atomic writes leave ordinary files, flush and fsync in order, keep the old file when the
disk is full, and name the path they cannot write."""
import errno
import os

import pytest
import torch

import kd2m.atomic_io as ckpt_mod
from kd2m.atomic_io import atomic_write_bytes, load_checkpoint, save_checkpoint

from helpers import fail_writes


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_disk_full_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    fail_writes(monkeypatch, ".state.pt.")
    save_checkpoint(path, {"w": torch.arange(1000.0)})
    before = path.read_bytes()
    with pytest.raises(OSError) as info:
        save_checkpoint(path, {"w": torch.zeros(1000)})
    assert info.value.errno == errno.ENOSPC and str(path) in str(info.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]   # no temp file left behind
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(1000.0))


def test_atomic_write_into_a_missing_parent_under_a_file_names_the_path(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OSError) as info:
        atomic_write_bytes(tmp_path / "f" / "x.bin", b"data")
    assert str(tmp_path / "f") in str(info.value)


def test_atomic_writes_make_ordinary_readable_files(tmp_path):
    """mkstemp creates 0600 files; results and checkpoints must get the usual umask-based mode."""
    import os
    import stat

    from kd2m.atomic_io import atomic_write_text
    target = tmp_path / "results.md"
    atomic_write_text(target, "x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_atomic_write_fsyncs_the_directory_after_the_rename(tmp_path, monkeypatch):
    """Without the directory's fsync a power loss can undo the rename (the new name never reached the disk)."""
    import stat
    target = tmp_path / "sub" / "final.json"
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        st = os.fstat(fd)
        synced.append((stat.S_ISDIR(st.st_mode), st.st_ino, target.exists()))
        return real_fsync(fd)
    monkeypatch.setattr(ckpt_mod.os, "fsync", spy)
    atomic_write_bytes(target, b"{}")
    directory = target.parent.stat().st_ino
    assert synced[0][0] is False                     # the data file first
    assert synced[-1] == (True, directory, True)     # then its directory, after the rename


# 7 ---------------------------------------------------------------------------------------------
def test_the_atomic_writer_flushes_before_it_fsyncs(tmp_path, monkeypatch):
    """At the fsync of the temp file, the file on disk already holds every byte (a small write
    stays in Python's buffer until flushed: an fsync before the flush makes an empty file durable)."""
    import kd2m.atomic_io as aio
    sizes = []
    real_fsync = os.fsync

    def spy(fd):
        sizes.append(os.fstat(fd).st_size)
        return real_fsync(fd)
    monkeypatch.setattr(aio.os, "fsync", spy)
    data = b"x" * 1000  # far below the 8 KiB buffer
    aio.atomic_write_bytes(tmp_path / "f.bin", data)
    assert sizes and sizes[0] == len(data)
    assert (tmp_path / "f.bin").read_bytes() == data
