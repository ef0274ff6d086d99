"""The experiment harness: run configs, grids over seeds, λ selection, the reproduction card,
results and statistics, reports, Theorem 1's bound, output directories and the command line.
Built on the engine (:mod:`kd2m.training`) and the library; nothing below it imports it."""

__all__ = []
