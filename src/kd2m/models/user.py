"""Models from the user's own code: ``teacher: package.module:factory`` (YAML) or
``--student package.module:factory`` (command line).

The factory is called with keywords, as kd2m's own builders are::

    factory(num_classes=C, in_channels=c, image_size=s, **options)   # options: teacher_options / student_options

and must return an ``nn.Module`` that keeps kd2m's model contract (:mod:`kd2m.models.registry`):
it returns logits, its last ``nn.Linear`` is the classifier (the penultimate features are that
layer's input). ``feature_dim`` is set from that layer when the model does not define it.

The module is imported as ``python -m`` would import it: the current directory comes first on
``sys.path``, so ``kd2m run --student mymodels:small_cnn`` finds ``./mymodels.py``. A module that
cannot be imported, a missing attribute, something that is not callable, or a factory that does
not return an ``nn.Module`` is refused in one line (``ValueError``) when the config is checked or
the grid's preflight builds the networks, before anything trains.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable

from torch import nn

__all__ = ["is_user_factory", "load_factory", "build_user"]

#: ``package.module:factory``: dotted module path, a colon, a Python name
_PATTERN = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
#: prefixes kd2m reads itself (``timm:NAME`` is not a module called timm)
_OWN_PREFIXES = ("timm:", "torchvision:", "hf:")


def is_user_factory(name: str) -> bool:
    """Whether ``name`` reads as ``package.module:factory`` (and not as one of kd2m's own prefixes)."""
    return isinstance(name, str) and not name.startswith(_OWN_PREFIXES) and bool(_PATTERN.match(name))


def load_factory(name: str) -> Callable[..., nn.Module]:
    """The callable ``name`` (``package.module:factory``) names; ValueError in one line when it
    cannot be imported or is not callable."""
    module_name, _, attr = name.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:  # as `python -m` does: the user's own folder first
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 (any import-time failure of the user's module, said in one line)
        raise ValueError(f"model {name!r}: cannot import {module_name!r} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); run kd2m from the folder that holds it, put "
                         "that folder on PYTHONPATH, or install the package") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ValueError(f"model {name!r}: module {module_name!r} has no {attr!r}; name a function or class of it "
                         "after the colon")
    if not callable(factory):
        raise ValueError(f"model {name!r}: {attr!r} is a {type(factory).__name__}, not a callable; name a "
                         "function or class that returns an nn.Module")
    return factory


def build_user(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32, **options) -> nn.Module:
    """``factory(num_classes=…, in_channels=…, image_size=…, **options)`` with its result checked
    and ``feature_dim`` set (the input width of its last ``nn.Linear``) when missing."""
    from .external import classifier_width
    factory = load_factory(name)
    try:
        model = factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **options)
    except TypeError as e:
        raise ValueError(f"model {name!r}: the factory refused its arguments ({e}); it is called as "
                         "factory(num_classes=, in_channels=, image_size=, **options)") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r}: the factory returned {type(model).__name__!r}, not an nn.Module")
    if not isinstance(getattr(model, "feature_dim", None), int):
        model.feature_dim = classifier_width(model, name)  # type: ignore[assignment]  # Module.__setattr__'s stub: Tensor | Module only
    return model
