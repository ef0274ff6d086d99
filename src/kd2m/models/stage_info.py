"""Where a model's stages are: the feature maps the field's map terms read (timm's ``feature_info`` idea).

    >>> from kd2m.models import build_model, stages
    >>> [(s.module, s.channels, s.reduction) for s in stages(build_model("resnet8x4", 100))]
    [('relu', 32, 1), ('layer1', 64, 1), ('layer2', 128, 2), ('layer3', 256, 4)]

``stages(model)`` lists, in forward order, the outputs that RepDistiller's
``model(x, is_feat=True, preact=False)`` returns as ``feat[0] … feat[-2]`` (every map; ``feat[-1]``
is the pooled vector): ``stages[0]`` is the stem, ``stages[1:]`` are what AT, NST, VID and KDSVD
read (RepDistiller's ``feat[1:-1]``, mdistiller's ``feats[1:]``), ``stages[2]`` is FitNet's
default hint (``--hint_layer 2``), ``stages[-1]`` is the last stage (WKD-F's ``HINT_LAYER: -1``).
Each :class:`Stage` names a module whose forward output *is* that feature, so a forward hook on
``model.get_submodule(stage.module)`` (:class:`kd2m.features.FeatureTap` with ``pool="none"``)
records exactly the tensor the authors' code hands to those terms.

Where it comes from, first match wins:

1. the model's own ``stage_info`` attribute (kd2m's registered models set it; the MLPs set ``[]``);
2. timm's ``model.feature_info`` (a list of dicts with ``module``, ``num_chs``, ``reduction``, or
   the ``FeatureInfo`` object of a ``features_only`` model);
3. a torchvision ``ResNet`` (kd2m's ``resnet18``/``resnet34``/``cifar_resnet*`` and
   ``"torchvision:resnet*"``): the stem ReLU (timm's ``act1``; RepDistiller's ResNet50 ``f0``)
   then ``layer1`` … ``layer4``;
4. anything else: ``[]`` (no known stages; name a layer).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["Stage", "stages"]


@dataclass(frozen=True)
class Stage:
    """One stage output of a model.

    ``module``: the module path whose forward output is the feature (``model.get_submodule``,
    forward hooks). ``channels``: its channel count. ``reduction``: input size / output size
    (the stride from the input) at the model's usual input (32×32 for the CIFAR zoo).
    ``post_activation``: True where the feature is the output of a ReLU (non-negative); False
    where the authors' feature is not (a WRN block's residual sum, a MobileNetV2 block's linear
    bottleneck, a WRN stem conv): the module still gives the authors' tensor, pre-activation;
    None where the source does not say (timm's ``feature_info``).
    """
    module: str
    channels: int
    reduction: int
    post_activation: bool | None = True


def stages(model: nn.Module) -> list[Stage]:
    """The stage outputs of ``model``, in forward order (see the module docstring); ``[]`` when it
    has none (an MLP) or none is known for it."""
    own = getattr(model, "stage_info", None)
    if own is not None:
        return list(own)
    info = getattr(model, "feature_info", None)
    if info is not None:
        # timm's FeatureInfo (features_only=True: its out_indices) or the plain list of dicts
        dicts = info.get_dicts() if hasattr(info, "get_dicts") else info
        return [Stage(str(d["module"]), int(d["num_chs"]), int(d["reduction"]), None) for d in dicts]
    return _torchvision_resnet(model)


def _torchvision_resnet(model: nn.Module) -> list[Stage]:
    try:
        from torchvision.models import ResNet
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return []
    if not isinstance(model, ResNet):
        return []
    reduction = _stride(model.conv1)
    out = [Stage("relu", model.conv1.out_channels, reduction)]
    if isinstance(model.maxpool, nn.MaxPool2d):
        reduction *= _stride(model.maxpool)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        layer = getattr(model, name)
        reduction *= int(getattr(layer[0], "stride", 1))  # BasicBlock and Bottleneck keep their stride
        last = layer[-1]
        norm = last.bn3 if hasattr(last, "bn3") else last.bn2
        out.append(Stage(name, int(norm.num_features), reduction))
    return out


def _stride(module: nn.Conv2d | nn.MaxPool2d) -> int:
    s = module.stride
    return int(s[0] if isinstance(s, tuple) else s)
