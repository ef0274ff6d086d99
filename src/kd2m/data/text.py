"""Text for language models: your own (``text:PATH``) or Python's documentation (``python_docs``),
tokenized, packed into fixed-length blocks, with a deterministic held-out split.

    >>> from kd2m.data import build_dataset
    >>> bundle = build_dataset("python_docs", image_size=64)      # blocks of 64 next-token pairs
    >>> x, y = bundle.train[0]                                    # (64,) ids, (64,) their next tokens

- ``text:PATH``: a ``.txt``/``.jsonl`` file, or a folder of them (files in sorted order; a
  ``.jsonl`` line's ``"text"`` field is a document, a ``.txt`` file one document).
- ``python_docs``: the topics of Python's own reference documentation (``pydoc_data.topics``,
  shipped with every CPython, PSF License v2; about 465 000 characters of English prose with
  code), one document per distinct topic. Nothing is downloaded; the text is that of the running
  Python (it changes a little between patch releases).

Tokens: a Hugging Face tokenizer from a local model directory or GGUF file (``tokenizer: DIR`` or
``tokenizer: FILE.gguf``; never a hub),
or by default bytes: each UTF-8 byte is a token (0–255) and 256 ends a document, a 257-token
vocabulary for models trained from scratch. Documents are joined with the end-of-document token
and cut into blocks of ``block + 1`` tokens; item ``(x, y)`` is the block's first ``block`` tokens
and their successors (next-token targets; no padding, so no position is ignored). Block ``i`` is
held out when ``i % 10 == 9``: every tenth block, spread over the whole corpus, the same on every
run.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .registry import DataBundle, DatasetNotFoundError, register_dataset, register_dataset_prefix

__all__ = ["BYTE_VOCAB", "END_OF_DOCUMENT", "DEFAULT_BLOCK", "TokenBlocks", "ByteTokenizer", "HFTokenizer",
           "tokenizer_for", "text_files", "text_identity", "read_documents", "pack", "text_bundle",
           "python_docs_documents", "python_docs", "user_text"]

#: the byte-level vocabulary: 256 byte values and one end-of-document token
BYTE_VOCAB = 257
END_OF_DOCUMENT = 256
#: a block is held out when its index modulo this is HELD_OUT_INDEX
HELD_OUT_EVERY, HELD_OUT_INDEX = 10, 9
#: default block length (tokens per training sequence)
DEFAULT_BLOCK = 64


class TokenBlocks(Dataset):
    """Items ``(x, y)``: ``x = block[:-1]``, ``y = block[1:]`` of each row of ``blocks`` (N, block + 1)."""

    #: an item is the same whatever the random stream (no augmentation): a teacher cache of these
    #: items is the same for every seed (:class:`~kd2m.training.teacher_cache.FixedViews`)
    draws_randomness = False

    def __init__(self, blocks: Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int):
        row = self.blocks[i]
        return row[:-1], row[1:]


class ByteTokenizer:
    """UTF-8 bytes as tokens (0–255) and 256 as the end of a document."""

    vocab_size = BYTE_VOCAB
    eos_token_id = END_OF_DOCUMENT
    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class HFTokenizer:
    """A Hugging Face tokenizer read from a local directory, or from a GGUF file's metadata (the
    vocabulary and merges llama.cpp stores there); ``local_files_only=True``."""

    def __init__(self, path: str):
        self.name = str(path)
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ValueError('tokenizer: a model directory\'s tokenizer needs transformers: pip install -e ".[lm]"') \
                from None
        from ..models.hf import TOKENIZER_FILES, has_tokenizer_files, hf_gguf_config, is_gguf
        if is_gguf(path):
            hf_gguf_config(path)  # a missing, corrupt or unsupported file said as such, not as a tokenizer error
            try:
                self.tok = AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name,
                                                         local_files_only=True)
            except Exception as e:  # noqa: BLE001 (its metadata converted by transformers: any error, one line)
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
                raise ValueError(f"tokenizer: {path}: no loadable tokenizer in this GGUF file ({reason}); give "
                                 "--tokenizer DIR, the tokenizer its model was trained with") from None
            self._check_size()
            return
        if not Path(path).is_dir():
            raise DatasetNotFoundError(f"tokenizer: {path} is not a directory (a Hugging Face model directory "
                                       "with its tokenizer files is expected)")
        if not has_tokenizer_files(path):
            # transformers would build a tokenizer of one token from config.json alone, which
            # encodes every text to nothing: every perplexity 1 and every accuracy 100%
            raise ValueError(f"tokenizer: {path} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, …); "
                             "give the directory of the tokenizer the model was trained with, or leave tokenizer "
                             "out for bytes")
        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"tokenizer: {path}: no loadable tokenizer ({str(e).splitlines()[0][:120]})") from None
        self._check_size()

    def _check_size(self) -> None:
        self.vocab_size = len(self.tok)
        if self.vocab_size < 2:
            raise ValueError(f"tokenizer: {self.name}: its vocabulary has {self.vocab_size} token(s); give the "
                             "directory of a real tokenizer, or leave tokenizer out for bytes")
        self.eos_token_id = self.tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)


def tokenizer_for(spec: str | None):
    """``None`` or ``"bytes"``: :class:`ByteTokenizer`; else a model directory's (or GGUF file's) tokenizer."""
    return ByteTokenizer() if spec in (None, "bytes") else HFTokenizer(spec)


def text_files(path: str | Path) -> list[Path]:
    """The files ``text:PATH`` reads: the file itself, or a folder's ``.txt``/``.jsonl`` files (sorted)."""
    path = Path(path).expanduser()
    if path.is_dir():
        # hidden entries (.ipynb_checkpoints/, .git/, editors' .#backups) are copies, not documents;
        # suffixes are matched case-insensitively (B.TXT is text)
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".txt", ".jsonl") and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DatasetNotFoundError(f"dataset 'text:{path}': no .txt or .jsonl file in {path}")
    elif path.is_file():
        files = [path]
    else:
        raise DatasetNotFoundError(f"dataset 'text:{path}': {path} does not exist; give a .txt/.jsonl file or a "
                                   "folder of them")
    return files


def text_identity(path: str | Path) -> str:
    """``"sha256:<hex>"`` of the files ``text:PATH`` reads (each one's name within ``path`` and its
    content's digest): what a run's settings hold for its text, so that text edited under the same
    name is other settings, never the old run's teacher and students."""
    import hashlib

    from ..models.pretrained import weights_identity
    root = Path(path).expanduser()
    files = text_files(root)
    if files == [root]:  # one file: its content alone (as a weights file)
        return weights_identity(root)
    h = hashlib.sha256()
    for f in files:  # a folder: the files' order is the documents' order
        h.update(str(f.relative_to(root)).encode() + b"\0" + weights_identity(f).encode())  # memoised per version
    return "sha256:" + h.hexdigest()


def read_documents(path: str | Path) -> list[str]:
    """The documents of a ``.txt``/``.jsonl`` file or of a folder of them (sorted by name)."""
    docs = []
    for f in text_files(path):
        try:
            text = f.read_text(encoding="utf-8-sig")  # a leading byte-order mark is not text
        except UnicodeDecodeError:
            raise ValueError(f"dataset 'text:{path}': {f} is not UTF-8 text") from None
        if f.suffix.lower() == ".jsonl":
            # lines end at '\n' only (JSON Lines): str.splitlines would also split inside a string
            # at U+2028/U+2029 and other separators valid JSON holds unescaped
            for i, line in enumerate(text.split("\n"), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"dataset 'text:{path}': {f}, line {i}: not valid JSON") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"dataset 'text:{path}': {f}, line {i}: expected an object with a \"text\" "
                                     "string")
                docs.append(record["text"])
        else:
            docs.append(text)
    return [d for d in docs if d]


def pack(documents: list[str], tokenizer, block: int, name: str = "text") -> Tensor:
    """(N, block + 1) int64: the documents' tokens, joined by the end-of-document token, cut into
    consecutive blocks (the last, partial block dropped).

    Raises:
        ValueError: the documents' own tokens (end-of-document tokens not counted) do not fill one
            block: a corpus of end-of-document tokens alone would train to perplexity 1.
    """
    ids: list[int] = []
    text_tokens = 0
    for doc in documents:
        tokens = tokenizer.encode(doc)
        text_tokens += len(tokens)
        ids += tokens
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    if text_tokens < block + 1:
        raise ValueError(f"dataset {name!r}: its {len(documents)} documents encode to {text_tokens} tokens with "
                         f"tokenizer {getattr(tokenizer, 'name', 'bytes')}: too little text for one block of "
                         f"{block + 1}; give more text, a shorter block (image_size) or another tokenizer")
    n = len(ids) // (block + 1)
    return torch.tensor(ids[:n * (block + 1)], dtype=torch.long).view(n, block + 1)


def text_bundle(name: str, documents: list[str], block: int | None, tokenizer: str | None) -> DataBundle:
    """Train/test blocks of ``documents`` (see the module docstring)."""
    block = DEFAULT_BLOCK if block is None else int(block)
    if block < 2:
        raise ValueError(f"dataset {name!r}: the block length (image_size) must be at least 2 tokens, got {block}")
    tok = tokenizer_for(tokenizer)
    blocks = pack(documents, tok, block, name)
    held = torch.arange(blocks.shape[0]) % HELD_OUT_EVERY == HELD_OUT_INDEX
    if int(held.sum()) == 0 or int((~held).sum()) == 0:
        raise ValueError(f"dataset {name!r}: {blocks.shape[0]} blocks of {block + 1} tokens is too little text for a "
                         f"held-out split (at least {HELD_OUT_EVERY}); give more text or a shorter block (image_size)")
    return DataBundle(train=TokenBlocks(blocks[~held]), test=TokenBlocks(blocks[held]), num_classes=tok.vocab_size,
                      in_channels=1, image_size=block, name=name, task="lm")


def python_docs_documents() -> list[str]:
    """One document per distinct topic of Python's reference documentation, in topic-name order."""
    from pydoc_data.topics import topics
    return list(dict.fromkeys(topics[k] for k in sorted(topics)))


@register_dataset("python_docs")
def python_docs(data_root=None, download=False, augment=True, image_size: int | None = None,
                tokenizer: str | None = None) -> DataBundle:
    """Python's reference documentation (pydoc_data.topics, PSF License v2) as next-token blocks."""
    return text_bundle("python_docs", python_docs_documents(), image_size, tokenizer)


python_docs.options = ("image_size", "tokenizer")  # type: ignore[attr-defined]  # a function attribute: build_dataset passes these through
python_docs.task = "lm"  # type: ignore[attr-defined]  # a function attribute, read by dataset_task


@register_dataset_prefix("text:")
def user_text(path: str, data_root=None, download=False, augment=True, image_size: int | None = None,
              tokenizer: str | None = None) -> DataBundle:
    """``text:PATH``: your ``.txt``/``.jsonl`` file, or a folder of them, as next-token blocks."""
    return text_bundle(f"text:{path}", read_documents(path), image_size, tokenizer)


user_text.options = ("image_size", "tokenizer")
user_text.task = "lm"
