"""The model registry: a name → ``builder(num_classes, in_channels, image_size) -> nn.Module``.

A new model is one function plus one decorator line::

    @register_model("my_net")
    def my_net(num_classes, in_channels=3, image_size=32) -> nn.Module: ...

Names with a ``timm:`` or ``torchvision:`` prefix build any model of those libraries
(:mod:`kd2m.models.external`), randomly initialised; ``package.module:factory`` calls a factory of
the user's own code (:mod:`kd2m.models.user`).

Contract every registered model keeps (the engine and :mod:`kd2m.features` rely on it): it
returns logits ``(n, num_classes)`` only; its penultimate features ``(n, feature_dim)`` are the
input of its last ``nn.Linear`` (the classifier, whatever its name: ``fc``, ``classifier``,
``linear``, ``classifier.0``; :func:`kd2m.features.last_linear_name` finds it); and it has an
int attribute ``feature_dim``. Models reproduced from other code keep that code's parameter
names, so its checkpoints load unchanged.

For 1-D data (``mnist1d``) ``image_size`` is the sequence length and inputs are ``(n, c, L)``.
External models keep the same contract: their last ``nn.Linear`` is the classifier and
``feature_dim`` its input width.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable

from torch import nn

from ..registry import registrar

__all__ = ["register_family", "available_models", "build_model", "describe_models"]

Builder = Callable[..., nn.Module]
_MODELS: dict[str, Builder] = {}


#: Decorator: ``@register_model(name)`` makes ``builder(num_classes, in_channels, image_size)`` available.
register_model = registrar(_MODELS, "model")


def register_family(variants: dict, make: Callable[..., nn.Module], doc: str) -> None:
    """Register one model per entry of ``variants`` (name → the family's constructor arguments):
    ``make(*args, num_classes, in_channels)`` builds it, ``doc`` (formatted with ``name`` and
    ``args``) is its one-line description. A family is then defined once, e.g. RepDistiller's
    resnet8 … resnet32x4 from their (depth, widths)."""
    for name, args in variants.items():
        def build(num_classes: int, in_channels: int = 3, image_size: int = 32, _args=tuple(args)) -> nn.Module:
            return make(*_args, num_classes, in_channels)
        build.__name__ = name
        build.__doc__ = doc.format(name=name, args=args)
        register_model(name)(build)


def available_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_MODELS)


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32, **options) -> nn.Module:
    """A freshly initialised model ``name`` for ``(in_channels, image_size, image_size)`` inputs.

    ``name``: a registered name (:func:`available_models`), ``"timm:NAME"`` or
    ``"torchvision:NAME"`` (:mod:`kd2m.models.external`), or ``"package.module:factory"`` (your own
    code, :mod:`kd2m.models.user`). ``options``: keyword arguments of the
    model's constructor (``timm.create_model`` / ``torchvision.models.get_model`` for external
    models, e.g. ``patch_size=2`` for a ViT on 8×8 images; config keys ``teacher_options`` and
    ``student_options``).

    Raises:
        ValueError: unknown ``name`` or a non-positive size.
    """
    from .external import build_external, is_external
    from .hf import is_hf
    from .hf_build import build_hf
    from .user import build_user, is_user_factory
    builder: Callable[..., nn.Module]
    if is_external(name):
        builder = functools.partial(build_external, name)
    elif is_user_factory(name):
        builder = functools.partial(build_user, name)
    elif is_hf(name):
        builder = functools.partial(build_hf, name)
    else:
        try:
            builder = _MODELS[name]
        except KeyError:
            raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}, "
                             "or timm:NAME / torchvision:NAME (see `kd2m metrics --models`), or "
                             "package.module:factory for your own") from None
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if int(value) < 1:
            raise ValueError(f"build_model({name!r}): {key} must be ≥ 1, got {value}")
    try:
        return builder(num_classes=int(num_classes), in_channels=int(in_channels), image_size=int(image_size),
                       **options)
    except TypeError as e:
        if options and "unexpected keyword" in str(e):
            # name the option the constructor refused, not every option given (the others may be valid)
            found = re.search(r"unexpected keyword argument '([^']+)'", str(e))
            bad = found.group(1) if found else ", ".join(sorted(options))
            raise ValueError(f"model {name!r} takes no option {bad!r} (its constructor: {e})") from None
        raise


def describe_models() -> str:
    """What ``kd2m metrics --models`` prints: kd2m's own models (one line each, from their
    docstrings) and the ``timm:`` / ``torchvision:`` prefixes."""
    from .external import describe_external
    from .hf import describe_hf
    width = max(len(n) for n in _MODELS)
    lines = ["kd2m's own models (feature_dim: the classifier's input width):"]
    for name in available_models():
        doc = (_MODELS[name].__doc__ or "").strip().splitlines()
        lines.append(f"  {name:<{width}}  {doc[0] if doc else ''}")
    return "\n".join(lines) + "\n" + describe_external() + "\n" + describe_hf()
