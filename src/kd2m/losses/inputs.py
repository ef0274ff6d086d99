"""What a baseline term receives: shape checks with errors that name the fix, and the precision
it computes in.

Every check raises ``ValueError`` naming the term, the input and what was expected, so the CLI
can print it as one line. Terms compute in at least float32 with autocast off
(:func:`in_full_precision`): relations, Sinkhorn iterations and softmax ratios are not
meaningful in bf16/fp16, and the baselines' authors computed them in float32.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import value_checks

__all__ = ["check_logits", "check_labels", "check_feats", "check_maps", "check_index", "check_positive",
           "check_nonnegative", "check_flag", "in_full_precision"]


def _present(term: str, name: str, x) -> Tensor:
    if x is None:
        raise ValueError(f"loss term {term!r} needs {name}, got None (the engine passes what the term's "
                         f"`needs` names; check its registration)")
    if not isinstance(x, Tensor):
        raise TypeError(f"loss term {term!r}: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _floating(term: str, name: str, x: Tensor) -> Tensor:
    if not x.is_floating_point():
        raise TypeError(f"loss term {term!r}: {name} must be a floating tensor, got {x.dtype}")
    return x


def check_logits(term: str, student_logits, teacher_logits) -> tuple[Tensor, Tensor]:
    """Both ``(n, C)``, same shape, C ≥ 2."""
    s = _floating(term, "student_logits", _present(term, "student_logits", student_logits))
    t = _floating(term, "teacher_logits", _present(term, "teacher_logits", teacher_logits))
    if s.ndim != 2 or t.ndim != 2:
        raise ValueError(f"loss term {term!r} needs logits of shape (n, C); got student {tuple(s.shape)}, "
                         f"teacher {tuple(t.shape)}")
    if s.shape != t.shape:
        raise ValueError(f"loss term {term!r}: student logits {tuple(s.shape)} and teacher logits "
                         f"{tuple(t.shape)} differ; both must be (n, C) over the same classes")
    if s.shape[1] < 2:
        raise ValueError(f"loss term {term!r} needs at least 2 classes, got logits of shape {tuple(s.shape)}")
    if s.shape[0] < 1:
        raise ValueError(f"loss term {term!r} got an empty batch")
    return s, t


def check_labels(term: str, labels, n: int, num_classes: int) -> Tensor:
    """``(n,)`` integer class indices in ``[0, num_classes)``."""
    return value_checks.check_labels(f"loss term {term!r}", _present(term, "labels", labels), n,
                                     f"the batch has n={n} samples", num_classes)


def check_feats(term: str, student_feats, teacher_feats, *, min_batch: int = 1) -> tuple[Tensor, Tensor]:
    """Pooled features ``(n, d_s)`` and ``(n, d_t)``: same n, widths may differ."""
    s = _floating(term, "student_feats", _present(term, "student_feats", student_feats))
    t = _floating(term, "teacher_feats", _present(term, "teacher_feats", teacher_feats))
    if s.ndim != 2 or t.ndim != 2:
        raise ValueError(f"loss term {term!r} needs pooled features of shape (n, d); got student "
                         f"{tuple(s.shape)}, teacher {tuple(t.shape)} (flatten or pool feature maps first)")
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"loss term {term!r}: student batch n={s.shape[0]} and teacher batch "
                         f"n={t.shape[0]} differ; both must hold the same samples")
    if s.shape[0] < min_batch:
        raise ValueError(f"loss term {term!r} needs a batch of at least {min_batch} samples, got {s.shape[0]}")
    return s, t


def check_maps(term: str, student_feats, teacher_feats) -> tuple[Tensor, Tensor]:
    """Feature maps ``(n, c, h, w)`` for student and teacher, same n."""
    s = _floating(term, "student_feats", _present(term, "student_feats", student_feats))
    t = _floating(term, "teacher_feats", _present(term, "teacher_feats", teacher_feats))
    for who, x in (("student", s), ("teacher", t)):
        if x.ndim != 4:
            raise ValueError(f"loss term {term!r} needs (n, c, h, w) feature maps; the {who} has no 4-D layer "
                             f"here (got shape {tuple(x.shape)}). Tap a convolutional layer of the {who}, or "
                             f"use a pooled-feature term (pkt, rkd, crd) or a logit term (kd, dkd, dist)")
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"loss term {term!r}: student batch n={s.shape[0]} and teacher batch "
                         f"n={t.shape[0]} differ; both must hold the same samples")
    return s, t


def check_index(term: str, index, n: int, num_data: int) -> Tensor:
    """``(n,)`` integer indices of the batch's samples in the training set, in ``[0, num_data)``."""
    i = _present(term, "index", index)
    if i.is_floating_point() or i.dtype == torch.bool or i.is_complex():
        raise TypeError(f"loss term {term!r}: index must be an integer tensor of sample indices, got {i.dtype}")
    if i.shape != (n,):
        raise ValueError(f"loss term {term!r}: index must have shape ({n},) to match the batch, got {tuple(i.shape)}")
    if n and value_checks.eager() and (int(i.min()) < 0 or int(i.max()) >= num_data):
        raise ValueError(f"loss term {term!r}: index must lie in [0, {num_data}) (the training set's size "
                         f"TermContext.num_data), got values in [{int(i.min())}, {int(i.max())}]")
    return i.long()


def check_positive(term: str, **options) -> None:
    """Each option a finite real number > 0."""
    for name, v in options.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v == float("inf"):
            raise ValueError(f"loss term {term!r}: {name} must be a finite number > 0, got {v!r}")


def check_nonnegative(term: str, **options) -> None:
    """Each option a finite real number ≥ 0."""
    for name, v in options.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
            raise ValueError(f"loss term {term!r}: {name} must be a finite number ≥ 0, got {v!r}")


def check_flag(term: str, **options) -> None:
    for name, v in options.items():
        if not isinstance(v, bool):
            raise TypeError(f"loss term {term!r}: {name} must be True or False, got {v!r}")


def _widen(x):
    if isinstance(x, Tensor) and x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def in_full_precision(fn):
    """Run a term (function or ``forward``) with autocast off and half-precision inputs as float32.

    float32 and float64 inputs are kept as they are (float64 for gradcheck).
    """
    @functools.wraps(fn)
    def run(*args, **kwargs):
        kwargs = {k: _widen(v) for k, v in kwargs.items()}
        device = next((v.device.type for v in kwargs.values() if isinstance(v, Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return fn(*args, **kwargs)
    return run
