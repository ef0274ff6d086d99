"""What a grid ran on: ``OUT/env.json``, written beside ``config.json`` by every grid.

Per-seed numbers of a CPU run depend on the machine's floating-point kernels (torch picks a
vectorised path, e.g. AVX-512 or AVX2, at start-up) and on the thread count (it decides the order
of reductions). ``config.json`` records what was asked for; ``env.json`` records where it ran, so
that two result folders can be told apart before their numbers are compared.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

__all__ = ["describe_environment", "cpu_model", "git_commit"]


def cpu_model(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str | None:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()`` or None."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The commit of the git checkout that holds ``path`` (default: the kd2m package), or None.

    None when the package is not inside a git checkout (an installed wheel), or git is missing."""
    here = Path(path) if path is not None else Path(__file__).resolve().parent
    for d in (here, *here.parents):
        if (d / ".git").exists():
            break
    else:
        return None
    try:
        done = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) == 40 else None


def describe_environment() -> dict:
    """kd2m and torch versions, the git commit, CPU model, torch's CPU kernel path, threads, Python, platform."""
    import torch

    from .. import __version__

    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = None
    return {
        "kd2m_version": __version__,
        "git_commit": git_commit(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "cpu_capability": capability,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
    }
