"""Whether the loss terms check their input *values* (NaN/inf features, label ranges) eagerly.

A value check reads a tensor back to the host (``bool(torch.isfinite(x).all())``): on an
accelerator every such read waits for the device to finish the work queued before it, so one
read per term per step serialises the whole step. Used standalone (``KD2MLoss`` in your own
loop), the terms check eagerly and raise a ValueError that names the bad input. The engine runs
its steps under :func:`deferred`: the terms skip the value checks (shape and dtype checks, which
read no values, stay), a non-finite input flows through to a non-finite loss, and the engine's
per-step device flag (:mod:`kd2m.train`) records the first bad step and raises once per epoch,
naming the epoch and the step, as before.
"""
from __future__ import annotations

import contextlib
import threading

_STATE = threading.local()


def eager() -> bool:
    """True unless the caller is inside :func:`deferred`."""
    return not getattr(_STATE, "deferred", False)


@contextlib.contextmanager
def deferred():
    """Within this block the loss terms skip their value checks (see the module's docstring)."""
    before = getattr(_STATE, "deferred", False)
    _STATE.deferred = True
    try:
        yield
    finally:
        _STATE.deferred = before
