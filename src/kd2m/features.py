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
classifier), i.e. the features the paper matches.

Layouts. A tapped output is one of

- ``(n, d)`` vectors: used as they are;
- ``(n, c, h, w)`` conv maps: channels first, positions last;
- ``(n, L, d)`` tokens (transformer blocks, ViT encoders): positions first, channels last;
- ``(n, c, L)`` channels-first sequences (``Conv1d``, ``BatchNorm1d``, ``*Pool1d`` outputs).

A 3-D output is ambiguous, so its layout is decided per tapped module from the module itself
(:func:`infer_layout`: a ``Conv1d``/``BatchNorm1d``/``*Pool1d``, or a container whose last
layout-defining layer is a ``Conv1d``/``*Pool1d``, is channels-first; anything else is tokens)
unless ``layout="tokens"`` or ``"channels_first"`` says so. Tuple outputs (Hugging Face blocks
return ``(hidden_states, attentions)``) use their first element; dict/``ModelOutput`` outputs
their ``last_hidden_state`` (else their first tensor).

Pooling (``pool=``): ``"avg"`` averages over the positions (h·w, or the L tokens) to ``(n, c)``;
``"cls"`` takes the first token of a token output (the class token; maps fall back to ``avg``);
``"flatten"`` flattens to ``(n, c·h·w)``; ``"none"`` keeps the per-position vectors with their
graph, for map-based terms and ``KD2MLoss(unit="spatial")``: maps stay ``(n, c, h, w)``, tokens
stay ``(n, L, d)`` and a channels-first sequence is returned as tokens ``(n, L, c)`` (a
transposed view), so downstream every 3-D tensor is ``(n, L, d)`` and every 4-D one a map.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

__all__ = ["PENULTIMATE", "POOLS", "LAYOUTS", "last_linear_name", "output_tensor", "infer_layout", "to_matrix",
           "FeatureTap", "last_map_layer"]

PENULTIMATE = "penultimate"
POOLS = ("avg", "cls", "flatten", "none")
LAYOUTS = ("tokens", "channels_first")

# layers whose 3-D output is (n, c, L) by definition (their input/output convention)
_CHANNELS_FIRST = (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d, nn.InstanceNorm1d, nn.MaxPool1d,
                   nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d)
# inside a container, the last of these decides (BatchNorm1d is left out there: token models
# such as LeViT apply it to flattened (n·L, d) tokens inside a Linear+BN block)
_CHANNELS_FIRST_INNER = (nn.Conv1d, nn.ConvTranspose1d, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d,
                         nn.AdaptiveMaxPool1d, nn.LPPool1d)
_TOKENS_INNER = (nn.Linear, nn.MultiheadAttention, nn.Embedding, nn.TransformerEncoderLayer,
                 nn.TransformerDecoderLayer)


def last_linear_name(model: nn.Module) -> str:
    """Module path of the last ``nn.Linear`` registered in ``model`` (its classifier)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier; name the feature layer explicitly")
    return names[-1]


def output_tensor(out) -> Tensor:
    """The feature tensor of a module's output: a tensor itself, the first element of a tuple/list
    (``(hidden_states, attentions)``), or a mapping's ``last_hidden_state`` (else its first tensor)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):  # dicts and Hugging Face ModelOutput (an OrderedDict subclass)
        if isinstance(out.get("last_hidden_state"), Tensor):
            return out["last_hidden_state"]
        for value in out.values():
            if isinstance(value, Tensor):
                return value
    elif isinstance(out, (tuple, list)) and out:
        return output_tensor(out[0])
    raise TypeError(f"cannot take features from a layer output of type {type(out).__name__}; "
                    "tap a layer that returns a tensor")


def infer_layout(module: nn.Module) -> str:
    """``"channels_first"`` or ``"tokens"``: how a 3-D output of ``module`` is laid out.

    The module itself if it is a 1-D conv/norm/pool layer; otherwise the last layout-defining
    layer in registration order (``Conv1d``/``*Pool1d`` → channels-first; ``Linear``, attention,
    ``Embedding`` → tokens); ``"tokens"`` when nothing decides. A heuristic over the module
    tree (no model-specific code); pass ``layout=`` to :class:`FeatureTap` when it is wrong.
    """
    if isinstance(module, _CHANNELS_FIRST):
        return "channels_first"
    for sub in reversed(list(module.modules())):
        if isinstance(sub, _CHANNELS_FIRST_INNER):
            return "channels_first"
        if isinstance(sub, _TOKENS_INNER):
            return "tokens"
    return "tokens"


def to_matrix(x, pool: str = "avg", layout: str = "tokens") -> Tensor:
    """(n, ...) activations -> (n, d) features (``pool="none"``: maps (n, c, h, w) or tokens (n, L, d)).

    ``layout`` says how a 3-D ``x`` is laid out: ``"tokens"`` (n, L, d) or ``"channels_first"``
    (n, c, L); 4-D and higher are channels-first maps.
    """
    x = output_tensor(x)
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; use one of {', '.join(POOLS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use 'tokens' or 'channels_first'")
    if x.dim() < 2:
        raise ValueError(f"cannot use an activation of shape {tuple(x.shape)} as (n, d) features")
    if x.dim() == 2:
        return x
    if x.dim() == 3 and layout == "tokens":
        if pool == "avg":
            return x.mean(1)
        if pool == "cls":
            return x[:, 0]
        if pool == "flatten":
            return x.flatten(1)
        return x
    # channels-first: (n, c, L) or (n, c, h, w, ...)
    if pool in ("avg", "cls"):
        return x.flatten(2).mean(-1)
    if pool == "flatten":
        return x.flatten(1)
    return x.transpose(1, 2) if x.dim() == 3 else x


class FeatureTap:
    """Record the outputs of ``layers`` (module paths, e.g. ``"layer4"``) on every forward.

    ``layers=None`` taps ``"penultimate"``: the *input* of the last Linear layer.
    After ``model(x)``, ``tap.features[name]`` is an ``(n, d)`` tensor (``pool="none"``: a map
    ``(n, c, h, w)`` or tokens ``(n, L, d)``) that keeps its autograd graph (so a loss on it
    trains the model); ``tap.feature`` is the only one when one layer is tapped. Use as a
    context manager or call :meth:`remove` to detach the hooks. What is recorded is the layer's
    own output: where the record would share memory with it (no pooling), the rest of the
    network runs on a copy, so a later in-place op (``ReLU(inplace=True)`` after a ``Linear`` or
    ``BatchNorm2d``) cannot rewrite it into the next layer's values.

    Args:
        pool: ``"avg"`` (mean over positions/tokens), ``"cls"`` (class token of token outputs),
            ``"flatten"`` or ``"none"`` (see the module docstring).
        layout: ``None`` (decide per layer with :func:`infer_layout`), ``"tokens"`` or
            ``"channels_first"``: how 3-D outputs are laid out; ``tap.layouts[name]`` records it.
    """

    def __init__(self, model: nn.Module, layers: Iterable[str] | str | None = None, pool: str = "avg",
                 layout: str | None = None):
        if isinstance(layers, str):
            layers = [layers]
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; use one of {', '.join(POOLS)}")
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; use None (inferred), 'tokens' or 'channels_first'")
        self.layers = list(layers) if layers else [PENULTIMATE]
        self.pool = pool
        self.features: dict[str, Tensor] = {}
        self.layouts: dict[str, str] = {}
        self._handles = []
        modules = dict(model.named_modules())
        for name in self.layers:
            if name == PENULTIMATE:
                target = modules[last_linear_name(model)]
                self.layouts[name] = layout or "tokens"  # a Linear's input: vectors or (n, L, d) tokens
                self._handles.append(target.register_forward_pre_hook(self._pre_hook(name)))
                continue
            if name not in modules:
                near = [m for m in modules if m and (name in m or m in name)][:8]
                hint = f" (close: {', '.join(near)})" if near else ""
                raise ValueError(f"{type(model).__name__} has no layer {name!r}{hint}; "
                                 f"top-level layers: {', '.join(n for n in modules if n and '.' not in n)}")
            self.layouts[name] = layout or infer_layout(modules[name])
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, inputs, output):
            feats = to_matrix(output, self.pool, self.layouts[name])
            self.features[name] = feats
            if isinstance(output, Tensor) and _shares_storage(feats, output):
                # The rest of the network gets a copy: a later in-place op (a ReLU(inplace=True)
                # right after a Linear or BatchNorm) would otherwise rewrite the recorded
                # features, and the tap of a Linear would silently give its post-ReLU values.
                return output.clone()
            return None
        return hook

    def _pre_hook(self, name):
        def hook(module, inputs):
            self.features[name] = to_matrix(inputs[0], self.pool, self.layouts[name])
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


def _shares_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def last_map_layer(model: nn.Module, example_input: Tensor) -> str:
    """Module path of the last 4-D feature map ``(n, c, h, w)`` with h·w > 1 before global pooling
    or flatten, found by forward hooks on one forward of ``example_input`` (no model-specific code).

    Hooks fire when a module's forward ends, inner modules before their containers, so the
    map-producing module that ends last is the outermost block of the last map stage (e.g.
    ``"layer4"`` of a ResNet, not its last ReLU). Maps of 1×1 (a ResNet's last stage at 32×32
    inputs) do not count. The model runs once in eval mode under ``torch.no_grad``; its mode is
    restored.

    Raises ValueError when no module outputs a 4-D map with h·w > 1 (e.g. an MLP): name a layer.
    """
    order: list[str] = []
    shapes: dict[str, tuple] = {}
    handles = []
    for name, module in model.named_modules():
        def hook(mod, inputs, output, name=name):
            try:
                x = output_tensor(output)
            except TypeError:
                return
            shapes[name] = tuple(x.shape)
            order.append(name)
        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    ends = {name: i for i, name in enumerate(order)}  # a shared module (a reused ReLU): its last call
    maps = [name for name in ends if name and len(shapes[name]) == 4 and shapes[name][2] * shapes[name][3] > 1]
    if not maps:
        raise ValueError(f"{type(model).__name__} has no 4-D feature map (n, c, h, w) with h·w > 1 "
                         "(e.g. an MLP); name a layer")
    return max(maps, key=ends.__getitem__)
