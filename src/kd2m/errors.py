"""The errors a user can fix, in the one low module every refusing module imports.

Each is a ``ValueError``: the command line turns it into one line ``kd2m: error: …`` and exit
code 2 (:mod:`kd2m.harness.cli`). Nothing here imports the rest of kd2m, so any module may raise them
without an import circle.
"""
from __future__ import annotations

__all__ = ["ConfigError", "NonFiniteLossError"]


class ConfigError(ValueError):
    """A config file or option is wrong; the message names the key."""


class NonFiniteLossError(ValueError):
    """The training loss (or the matched features) became NaN/inf; the last good checkpoint is kept.
    A ValueError: the user fixes it (a lower lr or λ), so the CLI exits 2 with one line.

    ``where``: the bare cause (epoch, step, values), recorded in the run's ``diverged.json``, so a
    grid can report the run as diverged and go on (:func:`kd2m.harness.grid.run_grid`)."""

    def __init__(self, message: str, where: str | None = None):
        super().__init__(message)
        self.where = where or message
