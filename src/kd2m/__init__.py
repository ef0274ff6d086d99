"""kd2m: knowledge distillation through distribution matching.

Two entry points: ``kd2m.metrics.get(name, **options)`` (a distance between feature batches)
and ``kd2m.KD2MLoss`` (the nn.Module for your training loop); ``kd2m.features.FeatureTap``
gets features from any named layer; ``kd2m.losses.get(name)`` any registered loss term (the
distances and the baselines: ``"dkd"``, ``"crd"``, ...).

Submodules and these names are imported on first use (:func:`__getattr__`), so ``import kd2m``
stays light: ``kd2m --version`` and ``kd2m --help`` do not load torch.
"""
import importlib

#: the package's version: its one home (pyproject.toml reads it from here)
__version__ = "0.1.0"

#: public names and the submodule each lives in
_LAZY = {"KD2MLoss": "loss", "hinton_kd": "loss", "FeatureTap": "features"}

__all__ = ["metrics", "losses", "KD2MLoss", "FeatureTap", "hinton_kd", "__version__"]


def __getattr__(name: str):
    """``kd2m.losses``, ``kd2m.KD2MLoss``, ...: the submodule (or the name in it), imported now."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if not name.startswith("_"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":  # the submodule exists but needs something missing
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
