"""What every loop over batches needs: the batch on the device in the run's memory format, the
run's autocast, and a progress bar. Shared by the engine (:mod:`kd2m.train`) and the teacher
cache (:mod:`kd2m.teacher_cache`), so the cached teacher outputs are computed exactly as an
online step computes them.
"""
from __future__ import annotations

import torch
from torch import Tensor

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
