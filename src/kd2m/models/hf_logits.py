"""The built side of ``hf:`` models: the class swap that makes a ``transformers`` causal LM return
its logits tensor, and the probes run on the built model before kd2m trains it.

* :func:`returning_logits`: the model's class swapped for a subclass whose ``forward(input_ids)``
  returns the logits ``(B, L, V)`` (or, ``last_hidden=True``, the final hidden states), every
  module name and ``state_dict`` key kept (see :mod:`kd2m.models.hf`);
* :func:`check_causal`: refuses a model whose logits change when a later token does;
* :func:`checked_positions`: a loaded model's positions hold a block, it is causal, and it returns logits;
* :func:`fused_output_layer`: the output layer the engine's fused head may apply itself;
* :func:`position_offset`: how many positions a model numbers before its first token.

Every probe runs on fixed token ids (no random draw) in eval mode without gradients, and puts the
model back in its mode.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["returning_logits", "fused_output_layer", "check_causal", "checked_positions", "position_offset"]

_LOGITS_CLASSES: dict[type, type] = {}


def _logits_forward(self, input_ids: Tensor, last_hidden: bool = False, **kwargs) -> Tensor:
    """``input_ids`` (B, L) -> next-token logits (B, L, V): the ``ModelOutput``'s ``logits``.
    ``last_hidden``: the final hidden states (B, L, d) instead, the output layer's input, its
    logits never built (the engine's fused head, :func:`fused_output_layer`)."""
    if last_hidden:
        return self.base_model(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state
    return super(type(self), self).forward(input_ids=input_ids, use_cache=False, **kwargs).logits


def fused_output_layer(model: nn.Module) -> nn.Linear | None:
    """The output layer of a kd2m ``hf:`` model whose logits are exactly that layer applied to
    ``model(ids, last_hidden=True)`` (GPT-2's, Llama's: tied embeddings included), else None: a
    model that scales or caps its logits after the head (Gemma-2's soft cap, Cohere's scale), or
    any other model. Checked on a fixed probe sequence (eval mode, no gradients, no random draw)."""
    if type(model) not in _LOGITS_CLASSES.values():
        return None
    head = model.get_output_embeddings()  # type: ignore[operator]  # a PreTrainedModel method; Module.__getattr__'s stub: Tensor | Module
    if not isinstance(head, nn.Linear):
        return None
    vocab = head.weight.shape[0]
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 8
    length = max(1, min(8, positions - position_offset(model)))  # within the positions it holds
    ids = ((torch.arange(length) * 7 + 1) % vocab).unsqueeze(0).to(head.weight.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits, hidden = model(ids), model(ids, last_hidden=True)
            same = hidden.shape[-1] == head.in_features and torch.allclose(head(hidden), logits, rtol=1e-5,
                                                                           atol=1e-6)
    finally:
        model.train(was_training)
    return head if same else None


def returning_logits(model: nn.Module) -> nn.Module:
    """``model`` (a ``transformers`` causal LM), its class swapped for one whose forward returns the
    logits tensor (see :mod:`kd2m.models.hf`); ``feature_dim`` set. In place; returns ``model``."""
    cls = type(model)
    if cls not in _LOGITS_CLASSES.values():
        if cls not in _LOGITS_CLASSES:
            _LOGITS_CLASSES[cls] = type(f"{cls.__name__}Logits", (cls,), {"forward": _logits_forward,
                                                                          "__module__": __name__})
        model.__class__ = _LOGITS_CLASSES[cls]
    head = model.get_output_embeddings()  # type: ignore[operator]  # a PreTrainedModel method; Module.__getattr__'s stub: Tensor | Module
    model.feature_dim = int(head.in_features if isinstance(head, nn.Linear) else head.weight.shape[1])  # type: ignore[assignment]  # Module.__setattr__'s stub: Tensor | Module only
    return model


def check_causal(model: nn.Module, name: str, length: int = 8) -> None:
    """ValueError unless ``model`` is causal: on a probe sequence of ``length`` tokens, replacing its
    second half leaves the logits of its first half unchanged. A model that sees the token it must
    predict would train and score as if it could read the answer (perplexity near 1).

    The probe's ids are fixed (no random draw: the runs' RNG is untouched), and the model is run
    in eval mode (no dropout) without gradients, then put back in its mode."""
    vocab = model.get_output_embeddings().weight.shape[0]  # type: ignore[operator]  # a PreTrainedModel method; Module.__getattr__'s stub: Tensor | Module
    half = max(length // 2, 1)
    ids = (torch.arange(2 * half) * 7 + 1) % vocab
    later = ids.clone()
    later[half:] = (later[half:] + 1) % vocab
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            a, b = (model(input_ids=x.unsqueeze(0).to(device)) for x in (ids, later))
            a, b = (getattr(z, "logits", z).float() for z in (a, b))
    finally:
        model.train(was_training)
    leak = float((a[:, :half] - b[:, :half]).abs().max())
    if not leak <= 1e-6 * (1 + float(a.abs().max())):
        raise ValueError(f"model {name}: not causal (a position's logits change by {leak:.2g} when a later token "
                         "does): it would see the tokens it must predict; use a decoder model (hf:gpt2, hf:llama, "
                         "…) or leave is_decoder out of its options")


def position_offset(model: nn.Module) -> int:
    """How many positions a model numbers before its first token: ``padding_idx + 1`` where its
    position embedding has a padding index (RoBERTa and its kin), else 0."""
    embeddings = getattr(getattr(model, "base_model", None), "embeddings", None)
    positions = getattr(embeddings, "position_embeddings", None)
    pad = getattr(positions, "padding_idx", None)
    return pad + 1 if isinstance(positions, nn.Embedding) and pad is not None else 0


def checked_positions(model: nn.Module, path: Path, block: int | None, where: str) -> nn.Module:
    """``model``, causal and with positions (where its config counts them) for a block of ``block``
    tokens, returning logits; ValueError naming ``path`` otherwise."""
    length = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    offset = position_offset(model)
    if block is not None and length is not None and length < block + offset:
        # learned positions would fail on a block; rotary ones would run past what the model was trained on
        numbered = f", numbered from {offset}" if offset else ""
        raise ValueError(f"{path}: {where} holds {length} positions, fewer than a block of the data needs "
                         f"({block} tokens{numbered}); give --image-size {length - offset} or less")
    check_causal(model, f"in {path}", min(8, int(length or 8)))
    return returning_logits(model)
