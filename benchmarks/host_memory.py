"""What a benchmark's child process reads of its own host memory (Linux ``/proc``), for
``memory.py``, ``spatial.py`` and ``divergences.py``: the extra resident memory a call needs at
its peak is ``status_kib("VmHWM") − reset_peak()`` around the call.

Imported as a sibling module: ``python benchmarks/X.py`` puts this directory first on ``sys.path``.
"""
from __future__ import annotations


def status_kib(key: str, pid: str = "self") -> int | None:
    """The ``key`` line of ``/proc/PID/status`` in KiB (``VmRSS``, ``VmHWM``); None when it cannot
    be read (a process that has just ended, no ``/proc``)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> int:
    """This process's resident set size now (KiB), its high-water mark reset to it where the kernel
    allows (``/proc/self/clear_refs`` ← 5; where refused, the mark keeps the warm-up's peak, small by
    design of every caller). RuntimeError where there is no ``/proc``."""
    rss = status_kib("VmRSS")
    if rss is None:
        raise RuntimeError("no VmRSS in /proc/self/status: host-memory benchmarks need Linux")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return rss
