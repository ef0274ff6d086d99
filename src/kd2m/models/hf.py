"""Causal language models from Hugging Face ``transformers`` by name: ``"hf:MODEL_TYPE"``.

    >>> import torch
    >>> from kd2m.models import build_model
    >>> lm = build_model("hf:gpt2", num_classes=257, in_channels=1, image_size=64, n_layer=2, n_embd=64, n_head=2)
    >>> ids = torch.randint(0, 257, (3, 64))     # (B, L) int64 token ids
    >>> lm(ids).shape                            # -> next-token logits (B, L, vocab)
    torch.Size([3, 64, 257])

``MODEL_TYPE`` is a ``transformers`` model type (``gpt2``, ``llama``, ``qwen2``, …); the options are
its config's (``n_layer``, ``n_embd``, ``hidden_size`` …) and the model is built from that config
with random weights (``AutoModelForCausalLM.from_config``): never a hub download. The vocabulary is
the data's (``num_classes``) and the longest sequence its block length (``image_size``) unless
the options say otherwise (a different vocabulary size, or fewer positions than a block, is
refused). Needs the optional extra: ``pip install -e ".[lm]"``.

Every model is causal: position ``i``'s logits depend on tokens ``0..i`` only. Encoder families
that ``transformers`` also builds as causal LMs (``bert``, ``roberta`` …) see the whole sequence
unless their config says ``is_decoder``; kd2m sets it, and refuses any model whose logits still
change when a later token does (:func:`~kd2m.models.hf_logits.check_causal`), since it would be
scored on tokens it sees.

A local model directory (``save_pretrained``'s layout: ``config.json`` and weights) given as
``--pretrained-teacher DIR`` / ``--pretrained-student DIR`` is loaded with
``from_pretrained(DIR, local_files_only=True)`` (:func:`load_hf_directory`), its architecture from
the directory's config.

A GGUF file (llama.cpp's format, e.g. a quantised ``SmolLM2-135M-Instruct.Q4_1.gguf``) given as
``--pretrained-teacher FILE.gguf`` is loaded the same way, from the local file only
(``from_pretrained(its folder, gguf_file=its name)``, which needs the ``gguf`` package): its
quantised weights are dequantised, and the model computes in :data:`GGUF_DTYPE` (float32); its
tokenizer, read from the same file, is the data's unless ``--tokenizer`` names another
(:func:`load_hf_gguf`, :func:`hf_gguf_config`).

The module kd2m trains is the ``transformers`` model itself, with its class swapped for a
subclass whose ``forward(input_ids)`` returns the logits tensor ``(B, L, V)`` instead of a
``ModelOutput``: every module keeps its name (``transformer.h.3``, ``model.layers.0`` — tap any of
them), every ``state_dict`` key is the library's (``save_pretrained`` directories load), and the
engine, which calls ``model(x)`` and reads a tensor of logits, needs no special case.
``feature_dim`` is the width of the final hidden states (the ``lm_head``'s input).

Where each part lives: this module holds the names (:func:`is_hf`) and the local files (a
``save_pretrained`` directory, a GGUF file); :mod:`kd2m.models.hf_build` builds ``hf:MODEL_TYPE``
from its config; :mod:`kd2m.models.hf_logits` swaps the class and probes the built model
(causal, positions for a block, fused output layer).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from pathlib import Path

import torch
from torch import nn

from .hf_logits import checked_positions

__all__ = ["PREFIX", "INSTALL_HINT", "SAVE_KEYS", "WEIGHT_SUFFIXES", "is_hf", "import_transformers",
           "hf_directory_config", "load_hf_directory", "TOKENIZER_FILES", "has_tokenizer_files",
           "GGUF_SUFFIX", "GGUF_DTYPE", "GGUF_INSTALL_HINT", "GGUF_SAVE_KEYS", "is_gguf", "is_hf_pretrained",
           "hf_pretrained_config", "load_hf_pretrained", "gguf_storage", "hf_gguf_config", "load_hf_gguf",
           "describe_hf"]

PREFIX = "hf:"
INSTALL_HINT = 'pip install -e ".[lm]"'
#: config.json keys that describe how a directory was saved, not the architecture
SAVE_KEYS = ("architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path")
#: the weights files a save_pretrained directory may hold
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def is_hf(name) -> bool:
    """Whether ``name`` is an ``"hf:MODEL_TYPE"`` model name."""
    return isinstance(name, str) and name.startswith(PREFIX)


def import_transformers():
    """The ``transformers`` package, quietened (no config advice, no progress bars); a ValueError
    with the install hint when the optional extra is missing."""
    try:
        import transformers
    except ImportError:
        raise ValueError(f"hf: models need Hugging Face transformers: {INSTALL_HINT}") from None
    transformers.logging.set_verbosity_error()  # its advice on unused config keys is not the user's concern here
    transformers.logging.disable_progress_bar()  # a bar per directory loaded: stderr keeps kd2m's lines only
    return transformers


def hf_directory_config(path: str | os.PathLike) -> dict | None:
    """The architecture a ``save_pretrained`` directory holds: its ``config.json`` without the keys
    that say how it was saved (:data:`SAVE_KEYS`), or None when ``path`` is no such directory."""
    file = Path(path) / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        return None
    if "is_decoder" in config:
        config["is_decoder"] = True  # as load_hf_directory builds it
    return {k: v for k, v in config.items() if k not in SAVE_KEYS}


def load_hf_directory(path: str | os.PathLike, num_classes: int | None = None,
                      block: int | None = None) -> nn.Module:
    """The causal LM saved in the local directory ``path`` (``config.json`` + weights), never from a
    hub (``local_files_only=True``); its vocabulary must be the data's (``num_classes``), and its
    positions, where its config counts them, must hold a block of ``block`` tokens."""
    transformers = import_transformers()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; a Hugging Face model directory (save_pretrained's "
                                "layout) is expected")
    weights = sorted(p.name for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        if hasattr(config, "is_decoder"):  # an encoder family (BERT …) is built causal, as by name
            config.is_decoder = True
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), config=config, local_files_only=True)
    except Exception as e:  # noqa: BLE001 (safetensors' and torch's errors are no OSError: one line, the file named)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        where = f"{path / weights[0]}" if len(weights) == 1 else f"{path} ({', '.join(weights) or 'no weights file'})"
        raise ValueError(f"{where}: not a loadable causal LM ({reason}); save the model again with "
                         "save_pretrained") from None
    vocab = model.get_output_embeddings().weight.shape[0]
    if num_classes is not None and vocab != num_classes:
        hint = (f"give the data this directory's tokenizer (tokenizer: {path})" if has_tokenizer_files(path) else
                f"{path} holds no tokenizer files: give the data (tokenizer: DIR) the tokenizer this model was "
                "trained with")
        raise ValueError(f"{path}: its vocabulary has {vocab} tokens, the data's {num_classes}; {hint}")
    return checked_positions(model, path, block, "its config.json")


# ------------------------------------------------------------------------------- GGUF files
#: the suffix that makes a pretrained path a GGUF file
GGUF_SUFFIX = ".gguf"
#: the dtype a GGUF model computes in: transformers dequantises every tensor (Q4_1, Q8_0 …) to it
GGUF_DTYPE = torch.float32
GGUF_INSTALL_HINT = 'pip install gguf (or pip install -e ".[lm]")'


#: the files a Hugging Face tokenizer is saved as (one of them at least, whatever its kind)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "merges.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def has_tokenizer_files(path: str | Path) -> bool:
    """Whether the directory ``path`` holds a saved tokenizer (not only a model's config and weights)."""
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


def is_gguf(path) -> bool:
    """Whether ``path`` names a GGUF file (by its ``.gguf`` suffix; it need not exist)."""
    return isinstance(path, (str, os.PathLike)) and str(path).lower().endswith(GGUF_SUFFIX)


def is_hf_pretrained(path) -> bool:
    """Whether ``path`` is a Hugging Face model kd2m builds itself from (its own architecture): a
    ``save_pretrained`` directory or a GGUF file."""
    return bool(path) and (Path(path).is_dir() or is_gguf(path))


def hf_pretrained_config(path) -> dict | None:
    """The architecture ``path`` holds (:func:`hf_directory_config` or :func:`hf_gguf_config`)."""
    return hf_gguf_config(path) if is_gguf(path) else hf_directory_config(path)


def load_hf_pretrained(path, num_classes: int | None = None, block: int | None = None) -> nn.Module:
    """The causal LM of a ``save_pretrained`` directory or a GGUF file (:func:`is_hf_pretrained`)."""
    return load_hf_gguf(path, num_classes, block) if is_gguf(path) else load_hf_directory(path, num_classes, block)


def _gguf_reader(path: str | os.PathLike):
    """``gguf.GGUFReader`` of the local file ``path`` (memory-mapped: nothing is loaded); a
    ValueError naming the file when it is missing, not a GGUF file, or cut short."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file (--pretrained-teacher takes a local file; never a hub "
                                "name)")
    try:
        import gguf
    except ImportError:
        raise ValueError(f"{path}: GGUF files need the gguf package: {GGUF_INSTALL_HINT}") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 (a bad magic, a short read, numpy's errors on a cut file: one line)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise ValueError(f"{path}: not a readable GGUF file, corrupt or truncated ({reason}); download or convert "
                         "it again") from None
    return reader


def gguf_storage(path: str | os.PathLike) -> str:
    """How the GGUF file ``path`` stores its weights, e.g. ``"Q4_1 ×210, F32 ×61, Q8_0 ×1"`` (tensor
    types by count, most first): what dequantising to :data:`GGUF_DTYPE` starts from. Memoised
    per file version (each seed's teacher result states it)."""
    from collections import Counter
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _GGUF_STORAGE:
        kinds = Counter(t.tensor_type.name for t in _gguf_reader(path).tensors)
        _GGUF_STORAGE[key] = ", ".join(f"{k} ×{n}" for k, n in kinds.most_common())
    return _GGUF_STORAGE[key]


#: gguf_storage's memo: (real path, size, mtime in ns) -> its description
_GGUF_STORAGE: dict[tuple, str] = {}


#: the keys of a config read from a GGUF file that say how it was stored, not the architecture
GGUF_SAVE_KEYS = ("quantization_config", "_model_name_or_path")


def hf_gguf_config(path: str | os.PathLike) -> dict:
    """The architecture the GGUF file ``path`` holds, as ``transformers`` reads it from the file's
    metadata (``model_type``, ``hidden_size`` …; what :func:`hf_directory_config` gives for a
    directory). ValueError naming the file when it is no readable GGUF file or holds an
    architecture ``transformers`` cannot load. Memoised per file version (a run resolves its
    config several times; reading a 100 MB file's metadata takes seconds)."""
    st = os.stat(path) if Path(path).is_file() else None
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns) if st else None
    if key not in _GGUF_CONFIGS:
        config = _read_gguf_config(path)
        if key is None:
            return config
        _GGUF_CONFIGS[key] = config
    return copy.deepcopy(_GGUF_CONFIGS[key])


#: hf_gguf_config's memo: (real path, size, mtime in ns) -> config
_GGUF_CONFIGS: dict[tuple, dict] = {}


def _read_gguf_config(path: str | os.PathLike) -> dict:
    reader = _gguf_reader(path)  # a corrupt or cut file is said as such, before transformers' own message
    field = reader.fields.get("general.architecture")
    architecture = field.contents() if field is not None else None
    transformers = import_transformers()
    path = Path(path)
    try:
        config = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         local_files_only=True)
    except Exception as e:  # noqa: BLE001 (transformers' refusal of an architecture is a ValueError or a KeyError)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise ValueError(f"{path}: a GGUF of architecture {architecture!r}, which transformers cannot load "
                         f"({reason}); give a GGUF of a supported architecture (llama, mistral, qwen2, …) or a "
                         "save_pretrained folder") from None
    if hasattr(config, "is_decoder"):
        config.is_decoder = True  # as load_hf_gguf builds it
    return {k: v for k, v in config.to_diff_dict().items() if k not in SAVE_KEYS + GGUF_SAVE_KEYS}


def load_hf_gguf(path: str | os.PathLike, num_classes: int | None = None, block: int | None = None) -> nn.Module:
    """The causal LM stored in the local GGUF file ``path`` (never a hub), its weights dequantised to
    :data:`GGUF_DTYPE`; its vocabulary must be the data's (``num_classes``) and its positions hold
    a block of ``block`` tokens."""
    hf_gguf_config(path)  # readable, and an architecture transformers loads: said as such
    transformers = import_transformers()
    path = Path(path)
    try:
        # its dequantising bar is a bare tqdm on stderr, which disable_progress_bar does not reach
        with contextlib.redirect_stderr(io.StringIO()):
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                      dtype=GGUF_DTYPE, local_files_only=True)
    except Exception as e:  # noqa: BLE001 (a cut tensor, an unknown quantisation: one line, the file named)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(f"{path}: not a loadable causal LM ({reason}); download or convert it again") from None
    model.config.quantization_config = None  # dequantised: nothing of the file's storage is left to describe
    vocab = model.get_output_embeddings().weight.shape[0]
    if num_classes is not None and vocab != num_classes:
        raise ValueError(f"{path}: its vocabulary has {vocab} tokens, the data's tokenizer {num_classes}; leave "
                         f"--tokenizer out (the file's own tokenizer is used) or give the tokenizer this model was "
                         "trained with")
    return checked_positions(model, path, block, "its metadata")


def describe_hf() -> str:
    return ("Causal language models of Hugging Face transformers, randomly initialised from their config:\n"
            "  hf:MODEL_TYPE      e.g. hf:gpt2 with options {n_layer: 4, n_embd: 128, n_head: 4}, hf:llama with\n"
            "                     {hidden_size: 64, num_hidden_layers: 2, ...}; a save_pretrained directory loads\n"
            "                     with --pretrained-teacher DIR, a GGUF file with --pretrained-teacher FILE.gguf\n"
            f"                     (local files only). Needs {INSTALL_HINT}.")
