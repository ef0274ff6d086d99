"""Atomic file writes (checkpoints, logs, CSV, JSON, PNG) and safe checkpoint loading: a crash or a full disk never leaves a torn file.

Every write goes to a temporary file in the same directory, is flushed and fsync'ed, then
``os.replace``-d over the target (atomic on POSIX), and the directory is fsync'ed so the rename
itself survives a power loss. If anything fails before the rename, the temporary file is removed
and the previous version of the target is untouched.
"""
from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from pathlib import Path

import torch

__all__ = ["atomic_write_bytes", "fsync_directory", "atomic_write_text", "atomic_write_json", "read_json", "read_jsonl",
           "save_checkpoint", "load_checkpoint", "describe_load_error"]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` all or nothing. ``durable=False`` skips the two fsyncs (file and
    directory): still atomic against a crash of the process, but a power loss may keep the old
    version — for files rebuilt from a durable one (a run's log.jsonl, rewritten from its
    checkpoint on resume), where the fsyncs cost more than the write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results should be readable like any file
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.errno is not None:  # e.g. ENOSPC: say which file could not be written
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e} (the previous version, if any, "
                                   "is unchanged)") from e
        raise
    if durable:
        fsync_directory(path.parent)


def fsync_directory(directory: str | os.PathLike) -> None:
    """``fsync`` a directory, so a rename or new file in it reaches the disk (POSIX; a file's own
    fsync does not cover its directory entry). A no-op where directories cannot be opened
    (Windows) or the filesystem does not support it (EINVAL/ENOTSUP, e.g. some network mounts)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (PermissionError, IsADirectoryError):  # Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise OSError(e.errno, f"cannot sync directory {directory}: {e.strerror or e}") from e
    finally:
        os.close(fd)


def atomic_write_text(path, text: str, durable: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), durable)


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path, fix: str = "delete it and rerun to rebuild it") -> object:
    """The JSON value in ``path``; an unreadable or corrupt file is a ValueError naming it and ``fix``
    (a JSON traceback names neither)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({str(e)[:80]}); {fix}") from None


def read_jsonl(path, fix: str = "delete it and rerun to rebuild it") -> list:
    """One JSON value per non-empty line of ``path``; a corrupt (e.g. cut) line is a ValueError
    naming the file and the line."""
    path = Path(path)
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file; {fix}") from None
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {i}: not valid JSON ({str(e)[:60]}); {fix}") from None
    return out


def save_checkpoint(path, state: dict) -> None:
    """``torch.save`` into memory, then an atomic write (the old checkpoint survives any failure)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path, map_location="cpu") -> dict:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # unpickling errors, truncated zip, foreign objects
        raise ValueError(f"checkpoint {path} is corrupt or not a kd2m/torch weights file; "
                         f"{describe_load_error(e)}") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation of torch.load")


def describe_load_error(err: BaseException) -> str:
    """One line for a failed ``torch.load(weights_only=True)``.

    torch's weights-only error starts with a paragraph suggesting ``weights_only=False`` (which
    would run the file's code); keep only the specific reason (e.g. "Unsupported operand 222"
    for random bytes, "unsupported GLOBAL posix.system" for a pickle that would run code).
    """
    text = str(err)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if text.startswith("Weights only load failed"):
        reason = next((ln for ln in lines if not ln.startswith(_TORCH_BOILERPLATE)
                       and not ln.startswith("WeightsUnpickler error")), "")
        head = "the safe loader (weights_only=True, tensors only, never code) refused it"
        return f"{head}: {reason}" if reason else head
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
