"""Any timm or torchvision classification model by name: ``"timm:NAME"``, ``"torchvision:NAME"``.

    >>> from kd2m.models import build_model
    >>> net = build_model("timm:resnet10t", num_classes=10, in_channels=1, image_size=32)  # doctest: +SKIP
    >>> net.feature_dim                                                                  # doctest: +SKIP
    512

Always randomly initialised: nothing is ever downloaded (``pretrained=False`` / ``weights=None``;
load weights with :func:`kd2m.models.load_pretrained`).

- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, num_classes=, in_chans=,
  img_size=image_size)``; ``img_size`` is passed only to models that take it (ViTs and other
  fixed-grid models) and dropped for the others (CNNs).
- ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None, num_classes=)``;
  ViTs (``vit_*``) also get ``image_size``; for ``in_channels != 3`` the first ``Conv2d`` is
  replaced by a freshly initialised one with ``in_channels`` inputs (same kernel, stride, padding).

Contract, as for kd2m's own models: logits ``(n, num_classes)``, and the model's *last*
``nn.Linear`` (in registration order) is its classifier, whose input width is set as
``feature_dim`` (``FeatureTap``'s ``"penultimate"`` taps that input: for a ViT, the class token
after the final norm, the input of ``head`` / ``heads.head``). A model whose classifier is not an
``nn.Linear`` (torchvision's SqueezeNet: a 1×1 conv) is refused.
"""
from __future__ import annotations

from torch import nn

__all__ = ["PREFIXES", "is_external", "build_external", "classifier_width", "describe_external"]

PREFIXES = ("timm:", "torchvision:")


def is_external(name: str) -> bool:
    """Whether ``name`` names a timm or torchvision model (has one of :data:`PREFIXES`)."""
    return isinstance(name, str) and name.startswith(PREFIXES)


def build_external(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32, **options) -> nn.Module:
    """A freshly initialised ``"timm:NAME"`` or ``"torchvision:NAME"`` model with ``feature_dim`` set.

    Raises ValueError (one line) for an unknown name, saying how to list the names.
    """
    source, _, arch = name.partition(":")
    if not arch:
        raise ValueError(f"model {name!r}: give a name after the prefix, e.g. 'timm:resnet10t'")
    if source == "timm":
        model = _timm(arch, num_classes, in_channels, image_size, **options)
    else:
        model = _torchvision(arch, num_classes, in_channels, image_size, **options)
    model.feature_dim = classifier_width(model, name)  # type: ignore[assignment]  # Module.__setattr__'s stub: Tensor | Module only
    return model


def classifier_width(model: nn.Module, name: str) -> int:
    """Input width of the model's last ``nn.Linear`` (its classifier); ValueError when it has none."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"model {name!r} has no nn.Linear classifier (kd2m taps the classifier's input as the "
                         "penultimate features); pick another model")
    return int(linears[-1].in_features)


def _timm(arch: str, num_classes: int, in_channels: int, image_size: int, **options) -> nn.Module:
    import timm
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm model {arch!r}; list names with timm.list_models('*{arch[:6]}*') "
                         "(random init only)")
    kwargs = dict(pretrained=False, num_classes=num_classes, in_chans=in_channels, **options)
    try:
        return timm.create_model(arch, img_size=image_size, **kwargs)
    except TypeError as err:  # a model without a fixed input grid takes no img_size
        if "img_size" not in str(err):
            raise
    return timm.create_model(arch, **kwargs)


def _torchvision(arch: str, num_classes: int, in_channels: int, image_size: int, **options) -> nn.Module:
    import torchvision
    names = torchvision.models.list_models(module=torchvision.models)  # classification models only
    if arch not in names:
        raise ValueError(f"unknown torchvision model {arch!r}; list names with "
                         "torchvision.models.list_models(module=torchvision.models) (random init only)")
    kwargs = {"image_size": image_size} if arch.startswith("vit_") else {}
    kwargs.update(options)
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the first ``Conv2d`` for one reading ``in_channels`` channels (fresh init, same geometry)."""
    for path, conv in model.named_modules():  # noqa: B007 (path is read after the loop: the one found)
        if isinstance(conv, nn.Conv2d):
            break
    else:
        raise ValueError(f"{type(model).__name__} has no Conv2d stem to adapt to {in_channels} input channels")
    # _ConvNd types kernel_size, stride, padding and dilation as tuple[int, ...]; a Conv2d's are pairs
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,  # type: ignore[arg-type]
                    groups=1, bias=conv.bias is not None, padding_mode=conv.padding_mode)
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)


def describe_external() -> str:
    """The ``timm:`` / ``torchvision:`` part of ``kd2m metrics --models``."""
    return ("Any timm or torchvision classification model, randomly initialised (never downloaded):\n"
            "  timm:NAME          e.g. timm:resnet10t, timm:vit_tiny_patch16_224 (ViTs get img_size=image_size);\n"
            "                     list names with python -c \"import timm; print(timm.list_models('*vit*'))\"\n"
            "  torchvision:NAME   e.g. torchvision:mobilenet_v3_small, torchvision:vit_b_16; list names with\n"
            "                     python -c \"import torchvision as tv; print(tv.models.list_models(module=tv.models))\"\n"
            "  feature_dim is the classifier's input width; load weights with --pretrained-teacher / kd2m.models.load_pretrained.")
