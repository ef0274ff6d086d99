"""Tests run single-threaded: the models and batches are tiny, and on a shared 2-core machine
OpenMP's spinning threads make them 10-100x slower than one thread.

The suite comes in tiers, one directory each, and each test is marked with its tier's name:
``unit`` (tests/unit: one module at a time, no training), ``integration`` (tests/integration: tiny
grids through the command line or the Trainer) and ``e2e`` (tests/e2e: the default run end to end,
several processes, anything slower). ``python -m pytest -q tests/unit tests/integration`` runs the
fast tiers; ``-m e2e`` or ``-m "not e2e"`` select by marker."""
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the subprocesses the tests start
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import TINY_GRID, one_line_exit_2, run_cli  # noqa: E402

torch.set_num_threads(1)

TIERS = ("unit", "integration", "e2e")
_TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """Mark each test with the tier whose directory holds it; a test module under tests/ but
    outside every tier is refused, since no tier's command would select it."""
    outside = set()
    for item in items:
        try:
            tier = item.path.resolve().relative_to(_TESTS).parts[0]
        except ValueError:
            continue
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
        else:
            outside.add(str(item.path.relative_to(_TESTS.parent)))
    if outside:
        raise pytest.UsageError(f"{', '.join(sorted(outside))}: outside the test tiers; move each under "
                                f"tests/unit, tests/integration or tests/e2e")


@pytest.fixture
def tiny_grid() -> list:
    """The command-line options of the smallest grid that still trains a teacher and a distilled
    student: one epoch each, one seed, CE and cw2, no progress bar."""
    return list(TINY_GRID)


@pytest.fixture
def cli_refuses(capsys):
    """``cli_refuses(argv, *needles)`` runs ``kd2m.harness.cli.main(argv)`` and checks the refusal contract:
    exit 2 and stderr exactly one ``kd2m: error: …`` line (no traceback) holding every needle; it
    returns that line."""
    def refuse(argv, *needles):
        code, _, err = run_cli(argv, capsys)
        return one_line_exit_2(code, err, *needles)
    return refuse
