"""How a benchmark hands over its Markdown table: printed, and written to ``--out`` when given
(its folder made), ending in one newline.

Imported as a sibling module: ``python benchmarks/X.py`` puts this directory first on ``sys.path``.
"""
from __future__ import annotations

from pathlib import Path


def emit(table: str, out: str | None) -> str:
    """Print ``table``; write it to ``out`` (if given); return it."""
    print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(table.rstrip("\n") + "\n")
    return table
