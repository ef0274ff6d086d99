"""Causal language models from Hugging Face ``transformers`` by name: ``"hf:MODEL_TYPE"``.

    >>> from kd2m.models import build_model
    >>> lm = build_model("hf:gpt2", num_classes=257, image_size=64, n_layer=2, n_embd=64, n_head=2)  # doctest: +SKIP
    >>> lm(ids).shape            # ids (B, L) int64 -> logits (B, L, vocab)                        # doctest: +SKIP

``MODEL_TYPE`` is a ``transformers`` model type (``gpt2``, ``llama``, ``qwen2``, …); the options are
its config's (``n_layer``, ``n_embd``, ``hidden_size`` …) and the model is built from that config
with random weights (``AutoModelForCausalLM.from_config``): never a hub download. The vocabulary is
the data's (``num_classes``) and the longest sequence its block length (``image_size``) unless
the options say otherwise (a different vocabulary size is refused). Needs the optional extra:
``pip install -e ".[lm]"``.

A local model directory (``save_pretrained``'s layout: ``config.json`` and weights) given as
``--pretrained-teacher DIR`` / ``--pretrained-student DIR`` is loaded with
``from_pretrained(DIR, local_files_only=True)`` (:func:`load_hf_directory`), its architecture from
the directory's config.

The module kd2m trains is the ``transformers`` model itself, with its class swapped for a
subclass whose ``forward(input_ids)`` returns the logits tensor ``(B, L, V)`` instead of a
``ModelOutput``: every module keeps its name (``transformer.h.3``, ``model.layers.0`` — tap any of
them), every ``state_dict`` key is the library's (``save_pretrained`` directories load), and the
engine, which calls ``model(x)`` and reads a tensor of logits, needs no special case.
``feature_dim`` is the width of the final hidden states (the ``lm_head``'s input).
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor, nn

PREFIX = "hf:"
INSTALL_HINT = 'pip install -e ".[lm]"'

_LOGITS_CLASSES: dict[type, type] = {}


def is_hf(name) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError(f"hf: models need Hugging Face transformers: {INSTALL_HINT}") from None
    transformers.logging.set_verbosity_error()  # its advice on unused config keys is not the user's concern here
    return transformers


def _logits_forward(self, input_ids: Tensor, **kwargs) -> Tensor:
    """``input_ids`` (B, L) -> next-token logits (B, L, V): the ``ModelOutput``'s ``logits``."""
    return super(type(self), self).forward(input_ids=input_ids, use_cache=False, **kwargs).logits


def returning_logits(model: nn.Module) -> nn.Module:
    """``model`` (a ``transformers`` causal LM), its class swapped for one whose forward returns the
    logits tensor (see the module docstring); ``feature_dim`` set. In place; returns ``model``."""
    cls = type(model)
    if cls not in _LOGITS_CLASSES.values():
        if cls not in _LOGITS_CLASSES:
            _LOGITS_CLASSES[cls] = type(f"{cls.__name__}Logits", (cls,), {"forward": _logits_forward,
                                                                          "__module__": __name__})
        model.__class__ = _LOGITS_CLASSES[cls]
    head = model.get_output_embeddings()
    model.feature_dim = int(head.in_features if isinstance(head, nn.Linear) else head.weight.shape[1])
    return model


def build_hf(name: str, num_classes: int, in_channels: int = 1, image_size: int = 64, **options) -> nn.Module:
    """A freshly initialised ``"hf:MODEL_TYPE"`` causal LM for a vocabulary of ``num_classes``
    tokens and sequences of up to ``image_size`` tokens (see the module docstring)."""
    transformers = _transformers()
    model_type = name[len(PREFIX):]
    if not model_type:
        raise ValueError(f"model {name!r}: give a transformers model type after 'hf:', e.g. 'hf:gpt2'")
    try:
        config = transformers.AutoConfig.for_model(model_type)
    except ValueError:
        raise ValueError(f"unknown Hugging Face model type {model_type!r} (hf:{model_type}); e.g. hf:gpt2, "
                         "hf:llama") from None
    vocab = options.pop("vocab_size", num_classes)
    if vocab != num_classes:
        raise ValueError(f"model {name!r}: vocab_size {vocab} is not the data's vocabulary ({num_classes} tokens); "
                         "leave vocab_size out (the data's is used) or use the model's tokenizer for the data")
    unknown = sorted(k for k in options if not hasattr(config, k))
    if unknown:
        raise ValueError(f"model {name!r} takes no option {unknown[0]!r} (not a field of "
                         f"{type(config).__name__})")
    # the block length only where the user gave no length: a config may alias the two names (GPT-2
    # maps max_position_embeddings to n_positions), so a default for one would overwrite the other
    length_keys = ("n_positions", "max_position_embeddings")
    lengths = {} if any(k in options for k in length_keys) else \
        {k: image_size for k in length_keys if hasattr(config, k)}
    # token ids inside the vocabulary: the defaults (e.g. GPT-2's 50256) would not be
    ids = {k: 0 for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hasattr(config, k)}
    config = transformers.AutoConfig.for_model(model_type, vocab_size=num_classes, **{**lengths, **ids, **options})
    if in_channels != 1:
        raise ValueError(f"model {name!r} reads token ids (one channel); the data has {in_channels} channels")
    return returning_logits(transformers.AutoModelForCausalLM.from_config(config))


def load_hf_directory(path: str | os.PathLike, num_classes: int | None = None) -> nn.Module:
    """The causal LM saved in the local directory ``path`` (``config.json`` + weights), never from a
    hub (``local_files_only=True``); its vocabulary must be the data's (``num_classes``)."""
    transformers = _transformers()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; a Hugging Face model directory (save_pretrained's "
                                "layout) is expected")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a loadable causal LM ({str(e).splitlines()[0][:160]})") from None
    vocab = model.get_output_embeddings().weight.shape[0]
    if num_classes is not None and vocab != num_classes:
        raise ValueError(f"{path}: its vocabulary has {vocab} tokens, the data's {num_classes}; use its tokenizer "
                         "for the data (tokenizer: the same directory)")
    return returning_logits(model)


def describe_hf() -> str:
    return ("Causal language models of Hugging Face transformers, randomly initialised from their config:\n"
            "  hf:MODEL_TYPE      e.g. hf:gpt2 with options {n_layer: 4, n_embd: 128, n_head: 4}, hf:llama with\n"
            "                     {hidden_size: 64, num_hidden_layers: 2, ...}; a save_pretrained directory loads\n"
            f"                     with --pretrained-teacher DIR (local files only). Needs {INSTALL_HINT}.")
