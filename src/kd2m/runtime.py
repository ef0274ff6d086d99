"""What every loop over batches needs: the device (checked), the seeded RNGs, the batch on the
device in the run's memory format, the run's autocast, and a progress bar. Shared by the engine (:mod:`kd2m.harness.trainer`) and the teacher
cache (:mod:`kd2m.training.teacher_cache`), so the cached teacher outputs are computed exactly as an
online step computes them.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch import Tensor

__all__ = ["AMP_DTYPES", "DEVICE_CHOICES", "resolve_device", "seed_everything", "fork_rng", "amp_dtype", "autocast",
           "to_device", "progress"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: What ``--device`` accepts, for the error message.
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps, xpu, xpu:N"


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The ``torch.device`` of a ``--device`` value, refused unless this machine has it.

    ``"auto"`` (or None) is ``cuda`` if CUDA is available, else ``cpu``; ``cpu``; ``cuda`` /
    ``cuda:N`` only if CUDA is available and N < ``torch.cuda.device_count()``; ``mps`` only if
    ``torch.backends.mps.is_available()``; ``xpu`` / ``xpu:N`` likewise for Intel GPUs. Anything
    else (``meta``, which has no data, or a name torch does not know) is refused: an unchecked
    device fails later, deep inside the first batch, or with ``meta`` never computes anything.

    Raises:
        ValueError: naming the value and what is valid on this machine.
    """
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {str(name)[:40]!r} is not a device; valid: {DEVICE_CHOICES}") from None
    if dev.type == "cpu":
        return dev
    if dev.type in ("cuda", "xpu"):
        backend = getattr(torch, dev.type, None)
        label = {"cuda": "CUDA", "xpu": "XPU"}[dev.type]
        if backend is None or not backend.is_available():
            raise ValueError(f"--device {str(name)!r}: {label} is not available on this machine (use --device cpu)")
        count = backend.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {str(name)!r}: this machine has {count} {label} device(s) "
                             f"({dev.type}:0 to {dev.type}:{count - 1})")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {str(name)!r}: MPS (Apple GPU) is not available on this machine "
                             "(use --device cpu)")
        return dev
    raise ValueError(f"--device {str(name)!r} cannot train ({dev.type} is not supported); valid: {DEVICE_CHOICES}")


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python's, NumPy's and torch's RNGs (NumPy takes ``seed mod 2^32``); with ``deterministic``,
    ask torch for deterministic kernels (a warning, not an error, where an op has none)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def fork_rng(device: torch.device | str | None = None):
    """A context in which randomness is drawn from copies of the RNGs: torch's CPU generator, and
    ``device``'s when it is a CUDA device. Everything that must not shift what a run draws (a
    probe batch, λ calibration, a teacher cache's build, the diagnostics) runs inside it."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of an ``--amp`` value ("none" -> None)."""
    return AMP_DTYPES.get(amp)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s type; a no-op context when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def to_device(x: Tensor, device: torch.device, channels_last: bool = False) -> Tensor:
    """``x`` on ``device`` (non-blocking from pinned memory), image batches in channels_last if asked."""
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def progress(it, desc: str, total: int | None = None, initial: int = 0, enabled: bool = True):
    """``it`` with a tqdm bar when ``enabled`` (and stderr is a terminal: no carriage-return noise in
    logs and CI output); ``it`` itself otherwise."""
    if not enabled:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc, total=total, initial=initial, leave=False, dynamic_ncols=True, disable=None)
