"""What every metric shares: input validation, the name registry, class grouping.

A metric is a plain function

    fn(student_feats, teacher_feats, labels=None, student_logits=None, teacher_logits=None, *, **options)
        -> 0-dim tensor

decorated with :func:`metric`, which registers it under a name and checks its inputs, so a
direct call and a call through :func:`get` fail the same clear way on bad input. The wrapper
also runs every metric in at least float32 (half-precision features and logits are upcast,
autocast is off inside) and returns the value in the features' dtype.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import value_checks
from ..registry import add_entry

__all__ = ["MetricSpec", "NonFiniteInputError", "check_inputs", "at_least_float32", "metric", "Metric", "available",
           "get", "spec", "class_indices", "sqdist"]

_REGISTRY: dict[str, MetricSpec] = {}


@dataclass(frozen=True)
class MetricSpec:
    name: str
    fn: Callable[..., Tensor]
    needs_labels: bool
    same_dim: bool
    options: tuple[str, ...]
    label: str = ""              # how the paper's table writes it, e.g. "CW2 (E)"
    pairwise_factor: int = 0     # float64 n×n buffers at the peak of forward+backward (kd2m.metrics.memory)
    label_free: str | None = None  # the same distance without labels, for a metric that reads labels

    @property
    def uses_labels(self) -> bool:
        """Reads labels: required (class-conditional, ``needs_labels``) or when given (``jw2``)."""
        return self.label_free is not None


class NonFiniteInputError(ValueError):
    """Features with NaN/inf; ``who`` is "student" or "teacher" (the engine adds epoch and step)."""

    def __init__(self, message: str, who: str):
        super().__init__(message)
        self.who = who


def check_inputs(name: str, s: Tensor, t: Tensor, labels, s_logits, t_logits, *,
                 needs_labels: bool = False, same_dim: bool = True) -> None:
    """Raise a ValueError/TypeError that names the problem; never let a bad batch become a NaN loss."""
    for what, x in (("student_feats", s), ("teacher_feats", t)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: {what} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name}: {what} must have shape (n, d), got {tuple(x.shape)} "
                             "(flatten or pool conv maps first, e.g. with kd2m.features.FeatureTap)")
        if not x.is_floating_point():
            raise TypeError(f"{name}: {what} must be floating point, got {x.dtype}")
        if x.shape[0] == 0:
            raise ValueError(f"{name}: {what} is an empty batch")
        if value_checks.eager() and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise NonFiniteInputError(f"{name}: {what} contains {bad} NaN/inf value(s); refusing to compute a loss "
                                      "from it", who=what.split("_")[0])
    if same_dim and s.shape[1] != t.shape[1]:
        raise ValueError(f"{name}: feature dims differ: student d={s.shape[1]}, teacher d={t.shape[1]} "
                         "(give KD2MLoss student_dim= and teacher_dim= for a learnable projector, or use the "
                         "'gw2' metric, which compares across dims)")
    if labels is not None:
        sizes = f"student has n={s.shape[0]} and teacher n={t.shape[0]} samples"
        value_checks.check_labels(name, labels, s.shape[0], sizes)
        if t.shape[0] != s.shape[0]:  # one label per pair of samples
            raise ValueError(f"{name}: labels has length {labels.shape[0]} but {sizes}; labels need equal batches")
    elif needs_labels:
        raise ValueError(f"{name}: this metric is class-conditional and needs labels=(n,) integer tensor")
    for what, lg, feats in (("student_logits", s_logits, s), ("teacher_logits", t_logits, t)):
        if lg is None:
            continue
        if not isinstance(lg, Tensor) or lg.dim() != 2 or lg.shape[0] != feats.shape[0]:
            raise ValueError(f"{name}: {what} must have shape (n, C) with n={feats.shape[0]}, got "
                             f"{tuple(lg.shape) if isinstance(lg, Tensor) else type(lg).__name__}")
        if value_checks.eager() and not bool(torch.isfinite(lg).all()):
            raise ValueError(f"{name}: {what} contains NaN/inf values")
    if s_logits is not None and t_logits is not None and s_logits.shape[1] != t_logits.shape[1]:
        raise ValueError(f"{name}: logit widths differ: student C={s_logits.shape[1]}, teacher C={t_logits.shape[1]}")


def at_least_float32(x):
    """x upcast to float32 when it is a half-precision (bf16/fp16) tensor, else x itself.

    Half precision keeps 3-4 significant digits and fp16 overflows at 65504: squared distances
    of 512-d features overflow (w2 = inf), and an RBF kernel's exp(−d²/2σ²) rounds to 1 for
    every pair, so mmd_rbf is exactly 0. Every metric therefore computes in at least float32
    (as ``KD2MLoss`` does); the cast is in the graph, so the gradient returns in the input's dtype.
    """
    if isinstance(x, Tensor) and x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def metric(name: str, *, needs_labels: bool = False, same_dim: bool = True, label: str = "",
           pairwise_factor: int = 0, label_free: str | None = None):
    """Register ``fn`` under ``name`` and wrap it with :func:`check_inputs` and a precision floor.

    The wrapped function sees half-precision features/logits upcast to float32 (see
    :func:`at_least_float32`), runs with autocast disabled, and its value is cast back to the
    promoted feature dtype.

    ``needs_labels``: the metric is class-conditional. ``same_dim``: student and teacher
    features must have the same width (every metric but Gromov-Wasserstein). ``label``: its
    name in a results table. ``pairwise_factor``: how many float64 n×n buffers one forward +
    backward holds at its peak (measured by ``benchmarks/memory.py``; 0 for O(n·d) memory).
    ``label_free``: for a metric that reads labels (required, or when given), the registered name
    of the same distance without them (``cw2`` → ``w2``): the one record of which metrics use
    labels (the engine passes them, the spatial unit refuses them, naming this one instead).
    """
    if needs_labels and label_free is None:
        raise ValueError(f"metric {name!r} needs labels: give label_free, the name of its label-free counterpart")
    def decorate(fn):
        sig = inspect.signature(fn)
        options = tuple(p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY)

        @functools.wraps(fn)
        def checked(student_feats, teacher_feats, labels=None, student_logits=None, teacher_logits=None, **opts):
            check_inputs(name, student_feats, teacher_feats, labels, student_logits, teacher_logits,
                         needs_labels=needs_labels, same_dim=same_dim)
            out_dtype = torch.promote_types(student_feats.dtype, teacher_feats.dtype)
            s, t, sl, tl = (at_least_float32(x) for x in (student_feats, teacher_feats, student_logits, teacher_logits))
            # and no autocast inside: a bf16 GEMM in an OT cost or a kernel's distances changes the
            # value (w2 +4 % on clustered features), as half-precision inputs would
            with torch.autocast(device_type=s.device.type, enabled=False):
                return fn(s, t, labels, sl, tl, **opts).to(out_dtype)

        add_entry(_REGISTRY, "metric", name, MetricSpec(name, checked, needs_labels, same_dim, options,
                                                        label or name, pairwise_factor, label_free))
        checked.metric_name = name  # type: ignore[attr-defined]  # a function attribute
        return checked
    return decorate


class Metric:
    """A registered metric with its options bound: ``Metric(s, t, labels, s_logits, t_logits)``."""

    def __init__(self, spec: MetricSpec, options: dict):
        self.spec = spec
        self.options = dict(options)
        self.__doc__ = spec.fn.__doc__

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def needs_labels(self) -> bool:
        return self.spec.needs_labels

    @property
    def same_dim(self) -> bool:
        return self.spec.same_dim

    def __call__(self, student_feats, teacher_feats, labels=None, student_logits=None, teacher_logits=None):
        return self.spec.fn(student_feats, teacher_feats, labels, student_logits, teacher_logits, **self.options)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"Metric({self.name!r}{', ' if opts else ''}{opts})"


def available() -> list[str]:
    """Names accepted by :func:`get`, sorted."""
    return sorted(_REGISTRY)


def get(name: str, **options) -> Metric:
    """Return the metric ``name`` with ``options`` bound (e.g. ``get("sinkhorn", eps=0.1)``).

    Raises ValueError listing the valid names / options when either is unknown.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(available())}")
    spec = _REGISTRY[name]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        valid = ", ".join(spec.options) or "none"
        raise ValueError(f"metric {name!r} has no option(s) {', '.join(unknown)}; its options: {valid}")
    return Metric(spec, options)


def spec(name: str) -> MetricSpec:
    get(name)  # same error for unknown names
    return _REGISTRY[name]


def class_indices(labels: Tensor) -> list[Tensor]:
    """Index tensors, one per class present in ``labels`` (sorted by class)."""
    order = torch.argsort(labels, stable=True)
    classes, counts = torch.unique_consecutive(labels[order], return_counts=True)
    return list(torch.split(order, counts.tolist()))


def sqdist(x: Tensor, y: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances, (n, d) x (m, d) -> (n, m), clamped at 0.

    Uses ‖x‖² + ‖y‖² − 2xᵀy (one GEMM) after subtracting the pooled mean of x and y (detached:
    distances are translation-invariant, so neither the value nor the gradient changes); without
    it, features sharing a large offset lose most of their digits to cancellation (float32 at
    offset 100 and spread 0.01 leaves nothing), which a metric that normalises the distances
    (gw2) or fits a bandwidth to them then amplifies. The clamp removes tiny negatives.
    """
    same = y is x
    c = x.detach().mean(0) if same else (x.detach().sum(0) + y.detach().sum(0)) / (x.shape[0] + y.shape[0])
    x = x - c
    y = x if same else y - c
    xx = (x * x).sum(1, keepdim=True)
    yy = (y * y).sum(1, keepdim=True).T
    return (xx + yy - 2.0 * x @ y.T).clamp_min(0.0)
