"""kd2m: knowledge distillation through distribution matching.

Entry points: ``kd2m.Distiller`` (a student, a frozen teacher and any terms, for your own loop),
``kd2m.KD2MLoss`` (one distance as an ``nn.Module``), ``kd2m.metrics.get(name, **options)`` (a
distance between feature batches), ``kd2m.losses.get(name, ctx, **options)`` (any term, the
field's baselines included) and ``kd2m.FeatureTap`` (features from any named layer).

Every name is imported on first use, so that ``import kd2m`` (and the command line's ``--help``)
loads neither torch nor POT until something needs them.
"""
from __future__ import annotations

import importlib

#: the package's version, its one home (pyproject.toml reads it: [tool.setuptools.dynamic])
__version__ = "0.1.0"

#: public name → the module that defines it
_HOMES = {
    "Distiller": "kd2m.training.distiller",
    "DistillerOutput": "kd2m.training.distiller",
    "KD2MLoss": "kd2m.losses.distance_loss",
    "hinton_kd": "kd2m.losses.distance_loss",
    "FeatureTap": "kd2m.features",
}
_SUBMODULES = ("losses", "metrics", "models", "data", "features", "tasks")


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"kd2m.{name}")
    raise AttributeError(f"module 'kd2m' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES, *_SUBMODULES])


__all__ = ["Distiller", "DistillerOutput", "KD2MLoss", "FeatureTap", "hinton_kd", "losses", "metrics",
           "__version__"]
