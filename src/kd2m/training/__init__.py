"""The engine's pieces, each in its own module; :mod:`kd2m.harness.trainer` puts them together in one loop.

- :mod:`~kd2m.training.build`: the seed's networks (the same initial weights for every method),
  the data loaders (seeded order, the teacher cache's views);
- :mod:`~kd2m.training.binding`: a student's terms bound to their layers, with the shapes they
  need, and the forward hooks that read those layers (:class:`~kd2m.training.binding.Taps`);
- :mod:`~kd2m.training.teacher`: the teacher's outputs for a batch, online or from a cache;
- :mod:`~kd2m.training.state`: what decides a run (its settings) and what a resume restores
  (RNG states, the schedule);
- :mod:`~kd2m.training.step`: the one training step, ``(model, batch) → outputs → w·supervised
  + Σ_k λ_k·term_k``, used by training, λ calibration and the preflight, and the epoch's
  on-device tally.
"""

__all__ = []
