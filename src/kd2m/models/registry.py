"""The model registry: a name → ``builder(num_classes, in_channels, image_size) -> nn.Module``.

A new model is one function plus one decorator line::

    @register_model("my_net")
    def my_net(num_classes, in_channels=3, image_size=32) -> nn.Module: ...

Contract every registered model keeps (the engine and :mod:`kd2m.features` rely on it): it
returns logits ``(n, num_classes)`` only; its penultimate features ``(n, feature_dim)`` are the
input of its last ``nn.Linear`` (the classifier, whatever its name: ``fc``, ``classifier``,
``linear``, ``classifier.0``; :func:`kd2m.features.last_linear_name` finds it); and it has an
int attribute ``feature_dim``. Models reproduced from other code keep that code's parameter
names, so its checkpoints load unchanged.

For 1-D data (``mnist1d``) ``image_size`` is the sequence length and inputs are ``(n, c, L)``.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..registry import registrar

Builder = Callable[..., nn.Module]
_MODELS: dict[str, Builder] = {}


#: Decorator: ``@register_model(name)`` makes ``builder(num_classes, in_channels, image_size)`` available.
register_model = registrar(_MODELS, "model")


def available_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_MODELS)


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """A freshly initialised model ``name`` for ``(in_channels, image_size, image_size)`` inputs.

    Raises:
        ValueError: unknown ``name`` or a non-positive size.
    """
    try:
        builder = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}") from None
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if int(value) < 1:
            raise ValueError(f"build_model({name!r}): {key} must be ≥ 1, got {value}")
    return builder(num_classes=int(num_classes), in_channels=int(in_channels), image_size=int(image_size))
