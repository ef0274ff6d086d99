"""Whether the loss terms check their input *values* (NaN/inf features, label ranges) eagerly, and
the one check of labels every metric and term runs.

A value check reads a tensor back to the host (``bool(torch.isfinite(x).all())``): on an
accelerator every such read waits for the device to finish the work queued before it, so one
read per term per step serialises the whole step. Used standalone (``KD2MLoss`` in your own
loop), the terms check eagerly and raise a ValueError that names the bad input. The engine runs
its steps under :func:`deferred`: the terms skip the value checks (shape and dtype checks, which
read no values, stay), a non-finite input flows through to a non-finite loss, and the engine's
per-step device flag (:mod:`kd2m.harness.trainer`) records the first bad step and raises once per epoch,
naming the epoch and the step, as before.
"""
from __future__ import annotations

import contextlib
import threading

__all__ = ["eager", "deferred", "check_labels"]

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


def check_labels(who: str, labels, n: int, batch: str, num_classes: int | None = None):
    """``labels`` as a ``(n,)`` tensor of class indices (int64), or a ValueError/TypeError that
    starts with ``who`` and names the problem: the one label check of the metrics
    (:func:`kd2m.metrics._base.check_inputs`) and the loss terms (:mod:`kd2m.losses.inputs`).

    ``batch`` says what ``n`` is, for the message ("the batch has n=5 samples"). With
    ``num_classes`` the values must lie in ``[0, num_classes)``: checked only when :func:`eager`,
    since it reads the labels back to the host.
    """
    import torch
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ValueError(f"{who}: labels must be a 1-D tensor of class indices, got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{who}: labels must be an integer tensor, got {labels.dtype} (class indices)")
    if labels.shape[0] != n:
        raise ValueError(f"{who}: labels has length {labels.shape[0]} but {batch}; labels must have shape ({n},) "
                         "to match the batch")
    if num_classes is not None and n and eager() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{who}: labels must lie in [0, {num_classes}) (the logits' width), "
                         f"got values in [{int(labels.min())}, {int(labels.max())}]")
    return labels.long()
