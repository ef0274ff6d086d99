"""The output directory of a kd2m grid: where every file lives, and who may write there.

One home for the layout (the engine, :mod:`kd2m.bench`, :mod:`kd2m.harness.bound` and :mod:`kd2m.harness.report`
all ask :class:`RunDir`)::

    OUT/
      .kd2m                 marker: JSON {"format": "kd2m-output", "version": 1}; "this is kd2m's"
      .kd2m.lock            flock(2) lock held by the one process writing here
      .kd2m.lock.info       pid, host and command line of that process (for the error message)
      config.json           the resolved RunConfig of the last run
      env.json              where it ran: kd2m/torch versions, git commit, CPU, kernel path, threads
      results.csv           one row per method × seed (summary.csv, results.md, results.json beside it)
      select-k/             the pilot grid that chose the K of `weight: auto` (a grid of this layout)
      <method_key>/seed<seed>/   one training run ("teacher" for the teacher)
          final.json  model.pt  checkpoint.pt  log.jsonl
          (a pretrained teacher no epoch trains has no model.pt: its final.json's
          ``weights`` references the file by path and content digest)

The contract of :meth:`RunDir.locked` (the engine wraps a whole grid in it):

* ``--out ""`` is refused (it would write into the current directory);
* a directory that is not kd2m's is refused before anything is written into it: it is
  non-empty and has no marker (a directory of an older kd2m, with ``config.json`` holding
  kd2m's keys, counts as kd2m's and gets the marker);
* an unwritable directory is refused with the OS's reason;
* a second process is refused at once, naming the holder; the lock is ``flock``-based, so the
  kernel drops it when its holder dies, however it dies (SIGKILL included).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import socket
import sys
from pathlib import Path

__all__ = ["RunDir", "OutputDirError", "OutputDirInUseError", "clean_temp_files", "MARKER",
           "FINAL_JSON", "MODEL_PT", "CHECKPOINT_PT", "LOG_JSONL", "DIVERGED_JSON", "LAYOUT_VERSION"]

#: Per-run file names.
FINAL_JSON = "final.json"
MODEL_PT = "model.pt"
CHECKPOINT_PT = "checkpoint.pt"
LOG_JSONL = "log.jsonl"
DIVERGED_JSON = "diverged.json"   # a run whose loss went non-finite: where, and the settings it had
#: Top-level file names.
RESULTS_CSV = "results.csv"
SUMMARY_CSV = "summary.csv"
RESULTS_MD = "results.md"
RESULTS_JSON = "results.json"
CONFIG_JSON = "config.json"
ENV_JSON = "env.json"
SWEEP_PNG = "sweep.png"
BOUND_JSON = "bound.json"
BOUND_MD = "bound.md"
REPORT_DIR = "report"
SELECT_DIR = "select-k"           # kd2m.harness.select_k's pilot grid
#: The marker that says "this directory is a kd2m output", its lock and the lock holder's description.
MARKER = ".kd2m"
LOCK = ".kd2m.lock"
LOCK_INFO = ".kd2m.lock.info"
#: Version of the layout above, written into the marker; a newer one is refused, not guessed at.
LAYOUT_VERSION = 1
#: Keys every config.json of a kd2m before the marker holds (a directory of an older kd2m).
LEGACY_CONFIG_KEYS = frozenset({"dataset", "teacher", "student", "metrics", "baselines", "seeds", "epochs"})
#: Longest command line quoted in the lock's error message.
MAX_COMMAND_CHARS = 120
#: Temp files of :func:`kd2m.atomic_io.atomic_write_bytes`: ``.<name>.<8 random chars>.tmp`` (mkstemp).
_TEMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


class OutputDirError(ValueError):
    """The output directory cannot be used; the message names it and the fix."""


class OutputDirInUseError(OutputDirError):
    """Another process holds the output directory's lock."""


class RunDir:
    """Paths of a kd2m output directory ``out`` and its lock.

    ``out`` is the string the user gave (``--out``/``out:``), not a ``Path`` made of it:
    ``Path("")`` is ``Path(".")``, so an empty ``--out`` could no longer be told apart from an
    explicit ``--out .``. Building a ``RunDir`` touches nothing on disk.

    >>> d = RunDir("runs/digits")
    >>> d.run("cw2", 0), d.run("teacher", 2)
    (PosixPath('runs/digits/cw2/seed0'), PosixPath('runs/digits/teacher/seed2'))

    Raises:
        OutputDirError: ``out`` is empty or only spaces.
    """

    def __init__(self, out: str | os.PathLike):
        if out is None or (isinstance(out, str) and not out.strip()):
            raise OutputDirError(f"--out must name a directory, got {out!r} (an empty --out would write into the "
                                 "current directory; give e.g. --out runs/mine, or --out . explicitly)")
        self.root = Path(out)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # ------------------------------------------------------------------ layout
    def run(self, method_key: str, seed: int) -> Path:
        """Directory of one training run: ``out/<method_key>/seed<seed>`` (``method_key`` "teacher" for the teacher)."""
        if not isinstance(method_key, str) or not method_key or "/" in method_key or method_key in (".", ".."):
            raise ValueError(f"method key must be a non-empty name without '/', got {method_key!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
        return self.root / method_key / f"seed{seed}"

    def run_of_row(self, row: dict) -> Path:
        """Directory of the run a ``results.csv`` row describes: its ``run_dir`` column (relative to
        ``out``), else ``run(row["method"], row["seed"])``; refuses a ``run_dir`` outside ``out``."""
        rel = row.get("run_dir")
        if not rel:
            return self.run(str(row["method"]), int(row["seed"]))
        path = self.root / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"{self.results_csv}: run_dir {str(rel)[:80]!r} of {row.get('method')!r} seed "
                             f"{row.get('seed')} points outside {self.root}")
        return path

    results_csv = property(lambda self: self.root / RESULTS_CSV, doc="one row per method × seed")
    summary_csv = property(lambda self: self.root / SUMMARY_CSV, doc="one row per method (mean ± std)")
    results_md = property(lambda self: self.root / RESULTS_MD, doc="the Markdown table")
    results_json = property(lambda self: self.root / RESULTS_JSON, doc="rows and summary as JSON")
    config_json = property(lambda self: self.root / CONFIG_JSON, doc="the resolved RunConfig")
    env_json = property(lambda self: self.root / ENV_JSON, doc="where the grid ran (kd2m.harness.environment)")
    sweep_png = property(lambda self: self.root / SWEEP_PNG, doc="the --sweep plot")
    bound_json = property(lambda self: self.root / BOUND_JSON, doc="`kd2m bound` results")
    bound_md = property(lambda self: self.root / BOUND_MD, doc="`kd2m bound` table")
    report_dir = property(lambda self: self.root / REPORT_DIR, doc="`kd2m report` output")
    marker = property(lambda self: self.root / MARKER, doc="the kd2m-output marker")
    lock_path = property(lambda self: self.root / LOCK, doc="the flock file")
    lock_info = property(lambda self: self.root / LOCK_INFO, doc="who holds the lock")

    # ------------------------------------------------------------------ ownership
    def check_usable(self) -> None:
        """Refuse a directory that exists, is not empty and is not a kd2m output (see the module doc).

        Reads only; creates nothing. Raises :class:`OutputDirError`.
        """
        root = self.root
        if not root.exists():
            return
        if not root.is_dir():
            raise OutputDirError(f"--out {root} is a file, not a directory; use another --out")
        if self.marker.exists():
            version = _marker_version(self.marker)
            if version is None:
                raise OutputDirError(f"{self.marker} is not a kd2m marker (expected JSON with a version); if {root} "
                                     "is a kd2m output, delete the marker and rerun, else use another --out")
            if version > LAYOUT_VERSION:
                raise OutputDirError(f"{root} was written by a newer kd2m (layout version {version}, this one "
                                     f"reads {LAYOUT_VERSION}); upgrade kd2m or use another --out")
            return
        try:
            entries = [e for e in os.listdir(root) if e not in (LOCK, LOCK_INFO)]
        except OSError as e:
            raise OutputDirError(f"cannot read output directory {root}: {e.strerror or e}") from None
        if not entries or self._is_legacy_output():
            return
        shown = ", ".join(sorted(entries)[:3]) + (", …" if len(entries) > 3 else "")
        raise OutputDirError(f"--out {root} is not empty ({shown}) and not a kd2m output directory (no {MARKER} "
                             "marker, no kd2m config.json); kd2m would overwrite its files: use a new or empty "
                             "--out")

    def _is_legacy_output(self) -> bool:
        """A directory written by a kd2m older than the marker: its config.json holds kd2m's keys."""
        try:
            cfg = json.loads(self.config_json.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(cfg, dict) and LEGACY_CONFIG_KEYS <= set(cfg)

    def check_writable(self) -> None:
        """Create the directory if needed and write/remove a probe file; an :class:`OutputDirError`
        naming the directory and the OS's reason if that fails (read-only, /proc, a file in the way)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test.{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise OutputDirError(f"cannot write to output directory {self.root}: {e.strerror or e}") from None

    def mark(self) -> None:
        """Write the marker (once; an existing one is kept)."""
        if not self.marker.exists():
            from .. import __version__
            from ..atomic_io import atomic_write_json
            atomic_write_json(self.marker, {"format": "kd2m-output", "version": LAYOUT_VERSION,
                                            "kd2m": __version__})

    # ------------------------------------------------------------------ the lock
    @contextlib.contextmanager
    def locked(self):
        """Hold this directory exclusively for the ``with`` block (a whole grid).

        In order: :meth:`check_usable` (nothing is written into a foreign directory),
        :meth:`check_writable`, the lock (``filelock.FileLock`` on ``out/.kd2m.lock``, timeout 0:
        a second process is refused at once), then ``out/.kd2m.lock.info`` with this process's
        pid, host and command line, and the marker. The lock is released (and the info file
        removed) when the block ends, however it ends; a killed holder's lock is dropped by the
        kernel, and its stale info file is overwritten by the next holder.

        Under torchrun only rank 0 should take it (the other ranks write nothing here).

        Yields:
            ``self``.

        Raises:
            OutputDirInUseError: another process holds the lock; the message names it.
            OutputDirError: empty ``--out``, foreign or unwritable directory.
        """
        from filelock import FileLock, Timeout
        self.check_usable()
        self.check_writable()
        lock = FileLock(str(self.lock_path), timeout=0, is_singleton=False)
        try:
            lock.acquire()
        except Timeout:
            raise OutputDirInUseError(f"{self.root} is in use by {self._holder()}; wait for it or use another "
                                      "--out") from None
        try:
            from ..atomic_io import atomic_write_json
            atomic_write_json(self.lock_info, {"pid": os.getpid(), "host": socket.gethostname(),
                                               "command": _command_line()})
            self.mark()
            yield self
        finally:
            with contextlib.suppress(OSError):
                self.lock_info.unlink()
            lock.release()

    def _holder(self) -> str:
        """'pid 1234 on host (kd2m run ...)' from the lock's info file, or 'another process'."""
        try:
            info = json.loads(self.lock_info.read_text())
            text = f"pid {int(info['pid'])} on {str(info['host'])[:64]}"
            command = str(info.get("command") or "")
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"  # it holds the lock but has not written its info yet
        if len(command) > MAX_COMMAND_CHARS:
            command = command[:MAX_COMMAND_CHARS - 1] + "…"
        return f"{text} ({command})" if command else text


def _command_line() -> str:
    """This process's command line as a user would type it (``kd2m run ...`` for the console script)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("kd2m", "__main__.py"):
        argv[0] = "kd2m"
    return shlex.join(argv)


def _marker_version(path: Path) -> int | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    version = data.get("version") if isinstance(data, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def clean_temp_files(root: str | os.PathLike) -> list[Path]:
    """Delete the temp files a killed :func:`kd2m.atomic_io.atomic_write_bytes` left under ``root``.

    They are named ``.<target>.<8 random chars>.tmp`` (``tempfile.mkstemp``); a finished write
    has renamed its temp file over the target, so any left is from a process that died mid-write.
    Call it only while holding the directory's lock (another live writer's temp file would match).
    Symlinks are not followed. Cost: one ``os.walk`` of ``root``.

    Returns:
        The paths deleted (sorted).
    """
    removed = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if _TEMP_FILE.match(name):
                path = Path(dirpath) / name
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return sorted(removed)
