"""Load weights from a file into a built model, safely and with a useful error."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = ["NESTED_KEYS", "SHOWN", "weights_identity", "load_pretrained"]

#: Wrapper keys under which checkpoints commonly nest the weights.
NESTED_KEYS = ("model", "state_dict")
SHOWN = 5  # how many offending keys an error message lists


def _short(keys: list[str]) -> str:
    more = f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


#: weights_identity's memo: (real path, size, mtime in ns) -> digest
_DIGESTS: dict[tuple, str] = {}


def weights_identity(path: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` of the file's bytes: what a run's settings hold for a weights file, so
    that a file replaced under the same name (or the same relative name seen from another
    working directory) is other settings, never the old run's. Memoised per file version."""
    real = os.path.realpath(path)
    if os.path.isdir(real):  # a model directory (save_pretrained's): every file's name and content
        h = hashlib.sha256()
        for file in sorted(p for p in Path(real).rglob("*") if p.is_file()):
            h.update(str(file.relative_to(real)).encode() + b"\0" + weights_identity(file).encode())
        return "sha256:" + h.hexdigest()
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = "sha256:" + h.hexdigest()
    return _DIGESTS[key]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state_dict stored at ``path`` (:func:`load_pretrained`): read with ``weights_only=True``,
    taken from under ``"model"`` or ``"state_dict"`` where it is nested there, a ``"module."``
    prefix on every key stripped. FileNotFoundError or ValueError naming the file otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path} do not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike: the file is not a safe checkpoint
        from ..atomic_io import describe_load_error
        raise ValueError(f"{path}: not a readable PyTorch weights file; {describe_load_error(err)}") from None
    if isinstance(obj, dict):
        for key in NESTED_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state_dict (names → tensors), optionally under 'model' or 'state_dict'")
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_pretrained(model: nn.Module, path: str | os.PathLike, ignore: Sequence[str] = (),
                    new_head: str | bool | None = None, on_new_head=None) -> nn.Module:
    """Copy the weights stored at ``path`` into ``model`` (in place) and return ``model``.

    The file is read with ``torch.load(..., weights_only=True)``: tensors and plain containers
    only, never code. It may hold a raw ``state_dict`` or a dict with the weights under
    ``"model"`` or ``"state_dict"``; a ``"module."`` prefix (DataParallel/DDP) is stripped.

    Args:
        ignore: key prefixes to leave at their fresh initialisation (e.g. ``("fc.",)`` to load an
            ImageNet backbone under a new classifier head).
        new_head: a key prefix (e.g. ``"fc."``) that is ignored only when the file's weights under it
            have other shapes than the model's: an ImageNet (1000-class) checkpoint then loads its
            backbone under this model's fresh head, while a checkpoint of the same task loads whole.
            ``True`` means the model's classifier, its last ``nn.Linear`` whatever its name
            (``fc.``, ``classifier.``, ``linear.``, ``classifier.0.``: see
            :func:`kd2m.features.last_linear_name`).
        on_new_head: called with one sentence when ``new_head`` replaced the file's head.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: unreadable/corrupt file, or weights that do not fit the architecture (names
            the file and the first missing, unexpected and shape-mismatched keys).
    """
    path = Path(path)
    state = _read_state_dict(path)

    if new_head is True:
        from ..features import last_linear_name
        new_head = last_linear_name(model) + "."
    if new_head:
        own = model.state_dict()
        head = [k for k in state if k.startswith(new_head)]
        differ = [k for k in head if k in own and state[k].shape != own[k].shape]
        if differ:
            ignore = tuple(ignore) + (new_head,)
            if on_new_head is not None:
                k = differ[0]
                on_new_head(f"{path}: its classifier {new_head.rstrip('.')} has shape {tuple(state[k].shape)}, "
                            f"this model's {tuple(own[k].shape)}: loaded without it, under a new randomly "
                            "initialised head")

    def kept(k: str) -> bool:
        return not any(k.startswith(p) for p in ignore)

    state = {k: v for k, v in state.items() if kept(k)}
    expected = {k: v for k, v in model.state_dict().items() if kept(k)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                        for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or mismatched:
        problems = [f"{label}: {_short(keys)}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("shape mismatch (file vs model)", mismatched))
                    if keys]
        raise ValueError(f"{path}: weights do not fit {type(model).__name__} ({'; '.join(problems)})")
    model.load_state_dict(state, strict=not ignore)
    return model
