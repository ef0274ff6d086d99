"""Tap any named layer of a model with forward hooks, no model rewrite.

    >>> import torch, torchvision
    >>> from kd2m.features import FeatureTap
    >>> net = torchvision.models.resnet18(num_classes=10)
    >>> tap = FeatureTap(net, ["layer4", "avgpool"])
    >>> logits = net(torch.randn(2, 3, 32, 32))
    >>> {k: tuple(v.shape) for k, v in tap.features.items()}
    {'layer4': (2, 512), 'avgpool': (2, 512)}
    >>> tap.remove()

The default layer, ``"penultimate"``, is the input of the model's last ``nn.Linear`` (the
classifier), i.e. the features the paper matches. Conv maps ``(n, c, h, w)`` are reduced to
``(n, c)`` by global average pooling (``pool="avg"``) or flattened (``pool="flatten"``).
"""
from __future__ import annotations

from typing import Iterable

from torch import Tensor, nn

PENULTIMATE = "penultimate"


def last_linear_name(model: nn.Module) -> str:
    """Module path of the last ``nn.Linear`` registered in ``model`` (its classifier)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier; name the feature layer explicitly")
    return names[-1]


def to_matrix(x: Tensor, pool: str = "avg") -> Tensor:
    """(n, ...) activations -> (n, d) features."""
    if isinstance(x, (tuple, list)):
        x = x[0]
    if x.dim() == 2:
        return x
    if x.dim() < 2:
        raise ValueError(f"cannot use an activation of shape {tuple(x.shape)} as (n, d) features")
    if pool == "avg" and x.dim() > 2:
        return x.flatten(2).mean(-1)
    if pool == "flatten":
        return x.flatten(1)
    raise ValueError(f"unknown pool {pool!r}; use 'avg' or 'flatten'")


class FeatureTap:
    """Record the outputs of ``layers`` (module paths, e.g. ``"layer4"``) on every forward.

    ``layers=None`` taps ``"penultimate"``: the *input* of the last Linear layer.
    After ``model(x)``, ``tap.features[name]`` is an ``(n, d)`` tensor that keeps its autograd
    graph (so a loss on it trains the model); ``tap.feature`` is the only one when one layer is
    tapped. Use as a context manager or call :meth:`remove` to detach the hooks.
    """

    def __init__(self, model: nn.Module, layers: Iterable[str] | str | None = None, pool: str = "avg"):
        if isinstance(layers, str):
            layers = [layers]
        self.layers = list(layers) if layers else [PENULTIMATE]
        self.pool = pool
        self.features: dict[str, Tensor] = {}
        self._handles = []
        modules = dict(model.named_modules())
        for name in self.layers:
            if name == PENULTIMATE:
                target = modules[last_linear_name(model)]
                self._handles.append(target.register_forward_pre_hook(self._pre_hook(name)))
                continue
            if name not in modules:
                near = [m for m in modules if m and (name in m or m in name)][:8]
                hint = f" (close: {', '.join(near)})" if near else ""
                raise ValueError(f"{type(model).__name__} has no layer {name!r}{hint}; "
                                 f"top-level layers: {', '.join(n for n in modules if n and '.' not in n)}")
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, inputs, output):
            self.features[name] = to_matrix(output, self.pool)
        return hook

    def _pre_hook(self, name):
        def hook(module, inputs):
            self.features[name] = to_matrix(inputs[0], self.pool)
        return hook

    @property
    def feature(self) -> Tensor:
        if len(self.layers) != 1:
            raise ValueError(f"{len(self.layers)} layers tapped; use tap.features[name]")
        try:
            return self.features[self.layers[0]]
        except KeyError:
            raise RuntimeError("no features recorded yet: run a forward pass first") from None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False
