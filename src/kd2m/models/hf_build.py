"""``"hf:MODEL_TYPE"``: a ``transformers`` causal LM built from its config, randomly initialised
(never a hub download), for the data's vocabulary and block length (see :mod:`kd2m.models.hf`).

:func:`build_hf` checks the options against the config's fields and their types, sets the
vocabulary, the longest sequence and, for encoder families, ``is_decoder``, then refuses a
model that is not causal or holds fewer positions than a block.
"""
from __future__ import annotations

from torch import nn

from .hf import PREFIX, import_transformers
from .hf_logits import check_causal, position_offset, returning_logits

__all__ = ["build_hf", "LENGTH_OPTIONS"]

#: the options that set the longest sequence (GPT-2's config maps one onto the other)
LENGTH_OPTIONS = ("n_positions", "max_position_embeddings")


def _check_options(name: str, config, options: dict) -> None:
    """Each option the type of the config's own default: integers (layers, widths, heads, positions)
    whole and ≥ 1 (≥ 0 for token ids and where the default is 0), numbers numbers, flags booleans."""
    for key, value in options.items():
        default = getattr(config, key, None)
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            low = 0 if key.endswith("_id") or default == 0 else 1
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
            want = f"an integer ≥ {low}"
        elif isinstance(default, float):
            ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        else:
            continue
        if not ok:
            raise ValueError(f"model {name!r}: option {key} must be {want} (its default is {default!r}), got "
                             f"{value!r:.40}")


def build_hf(name: str, num_classes: int, in_channels: int = 1, image_size: int = 64, **options) -> nn.Module:
    """A freshly initialised ``"hf:MODEL_TYPE"`` causal LM for a vocabulary of ``num_classes``
    tokens and sequences of up to ``image_size`` tokens (see :mod:`kd2m.models.hf`)."""
    transformers = import_transformers()
    model_type = name[len(PREFIX):]
    if not model_type:
        raise ValueError(f"model {name!r}: give a transformers model type after 'hf:', e.g. 'hf:gpt2'")
    try:
        config = transformers.AutoConfig.for_model(model_type)
    except ValueError:
        raise ValueError(f"unknown Hugging Face model type {model_type!r} (hf:{model_type}); e.g. hf:gpt2, "
                         "hf:llama") from None
    if options.get("model_type", model_type) != model_type:
        raise ValueError(f"model {name!r}: option model_type {options['model_type']!r} is another model; give "
                         f"hf:{options['model_type']}")
    options.pop("model_type", None)  # a save_pretrained config as options (a run's recorded teacher_options)
    vocab = options.pop("vocab_size", num_classes)
    if vocab != num_classes:
        raise ValueError(f"model {name!r}: vocab_size {vocab} is not the data's vocabulary ({num_classes} tokens); "
                         "leave vocab_size out (the data's is used) or use the model's tokenizer for the data")
    unknown = sorted(k for k in options if not hasattr(config, k))
    if unknown:
        raise ValueError(f"model {name!r} takes no option {unknown[0]!r} (not a field of "
                         f"{type(config).__name__})")
    _check_options(name, config, options)
    given = {k: options[k] for k in LENGTH_OPTIONS if k in options}
    # the block length where no length option is given: one given is honoured (GPT-2 reads
    # max_position_embeddings as n_positions, so injecting the other would replace it)
    lengths = {} if given else {k: image_size for k in LENGTH_OPTIONS if hasattr(config, k)}
    # token ids inside the vocabulary where the defaults (e.g. GPT-2's 50256) are not; a default of
    # None stays None: a pad id is the embedding's padding_idx (Llama's), a row frozen at zero, and
    # every id of the data's vocabulary is a real token
    ids = {k: 0 for k in ("bos_token_id", "eos_token_id", "pad_token_id")
           if isinstance(getattr(config, k, None), int) and getattr(config, k) >= num_classes}
    decoder = {"is_decoder": True} if hasattr(config, "is_decoder") else {}  # encoder families: causal
    if in_channels != 1:
        raise ValueError(f"model {name!r} reads token ids (one channel); the data has {in_channels} channels")

    def build(lengths: dict):
        try:
            built = transformers.AutoConfig.for_model(model_type, vocab_size=num_classes,
                                                      **{**lengths, **ids, **decoder, **options})
            return transformers.AutoModelForCausalLM.from_config(built)
        except Exception as e:  # noqa: BLE001 (transformers' own validation errors: one line, with the model's name)
            reason = str(e).strip().splitlines()
            raise ValueError(f"model {name!r}: its options do not build a {type(config).__name__} "
                             f"({' '.join(reason[:2])[:160] or type(e).__name__})") from None

    model = build(lengths)
    offset = position_offset(model)
    if lengths and offset:  # RoBERTa's family numbers positions from pad_token_id + 1: a block needs more
        model = build({k: v + offset for k, v in lengths.items()})
    for key, value in given.items():  # honoured, so it must hold a block
        if value < image_size + offset:
            numbered = f", numbered from {offset}" if offset else ""
            raise ValueError(f"model {name!r}: {key} {value} is fewer positions than a block of the data needs "
                             f"({image_size} tokens{numbered}); give {key} ≥ {image_size + offset}, or leave it out "
                             "(the block length)")
    check_causal(model, name, min(8, image_size))
    return returning_logits(model)
