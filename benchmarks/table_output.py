"""How a benchmark hands over its Markdown table: printed, and written to ``--out`` when given
(its folder made), ending in one newline, with where it ran beside it.

``--out DIR/NAME.md`` also writes ``DIR/NAME.env.json``: the fields of
:func:`kd2m.harness.environment.describe_environment` (commit, CPU, torch and its kernel path,
threads), plus the command line as run, ``OMP_NUM_THREADS``, the wall time and the machine's
one-minute load average when the script started and when it ended. A timing is only as good as
the quiet of the machine it ran on, so the load is kept with the table it qualifies.

Imported as a sibling module: ``python benchmarks/X.py`` puts this directory first on ``sys.path``.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

_STARTED = time.time()
_LOAD_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def env_path(out: str | os.PathLike) -> Path:
    """``DIR/NAME.md`` → ``DIR/NAME.env.json``: where the environment of the table at ``out`` is kept."""
    out = Path(out)
    return out.with_name(out.stem + ".env.json")


def describe_run() -> dict:
    """Where and how this benchmark ran (module doc)."""
    from kd2m.harness.environment import describe_environment

    script = Path(sys.argv[0])
    script_name = f"benchmarks/{script.name}" if script.parent.name == "benchmarks" else str(script)
    return {
        **describe_environment(),
        "command": shlex.join(["python", script_name, *sys.argv[1:]]),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "wall_seconds": round(time.time() - _STARTED, 1),
        "load_average_1min_start": _LOAD_AT_START,
        "load_average_1min_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def emit(table: str, out: str | None) -> str:
    """Print ``table``; write it to ``out`` and its environment to :func:`env_path` (if given); return it."""
    print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(table.rstrip("\n") + "\n")
        env_path(out).write_text(json.dumps(describe_run(), indent=2, sort_keys=True) + "\n")
    return table
