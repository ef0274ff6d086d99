"""The part of a ``transformers.Trainer`` subclass that owns a :class:`kd2m.Distiller`, shared by
:class:`kd2m.integrations.hf.KD2MTrainer` and :class:`kd2m.integrations.trl.KD2MGKDTrainer`: the
projectors' sizing batch, the projectors in the optimiser and in ``max_grad_norm``'s one norm,
saved beside the student and restored on resume, and a callback for their epoch and gradients.

Needs the optional extra ``pip install "kd2m[hf]"`` (transformers and accelerate).
"""
from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint
except ImportError:
    raise ImportError('kd2m.integrations needs Hugging Face transformers and accelerate: '
                      'pip install "kd2m[hf]"') from None

from .. import distributed as dist_ctx
from ..training.distiller import Distiller

__all__ = ["DISTILLER_FILE", "DistillerTrainerMixin"]

#: the file beside a saved student (and in each checkpoint) that holds the Distiller's state
DISTILLER_FILE = "kd2m_distiller.pt"


class _DistillerCallback(TrainerCallback):
    """The Distiller's side of the Trainer's loop: its epoch (for warm-ups and schedules), its
    gradients averaged over ranks before the optimiser steps, and cleared after (the Trainer
    clears the model's only)."""

    def __init__(self, distiller: Distiller):
        self.distiller = distiller
        self.averaged = False  # this step's gradients already averaged (before clipping)

    def average(self) -> None:
        """Average the Distiller's gradients over ranks, once per optimiser step."""
        if not self.averaged:
            dist_ctx.average_gradients(self.distiller)
            self.averaged = True

    def on_epoch_begin(self, args, state, control, **kwargs):
        epochs = max(math.ceil(state.num_train_epochs or args.num_train_epochs or 1), 1)
        self.distiller.set_epoch(min(int(state.epoch or 0), epochs - 1), epochs)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.average()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.distiller.zero_grad(set_to_none=True)
        self.averaged = False


class DistillerTrainerMixin:
    """What a ``transformers.Trainer`` subclass that owns a :class:`kd2m.Distiller` (as
    ``self.distiller``) needs besides its loss: the projectors' sizing batch, the projectors in
    the optimiser, saved beside the student and restored on resume. Mixed in before the Trainer."""

    distiller: Distiller
    _distiller_callback: _DistillerCallback

    def _attach_distiller(self, distiller: Distiller) -> None:
        """Own ``distiller``: its epoch, its gradients' averaging over ranks and clearing (a callback)."""
        self.distiller = distiller
        self._distiller_callback = _DistillerCallback(distiller)
        self.add_callback(self._distiller_callback)
        if self.args.max_grad_norm and any(True for _ in distiller.parameters()) and \
                not hasattr(Trainer, "_clip_grad_norm"):  # older transformers clip inside the loop
            warnings.warn(f"{type(self).__name__}: this transformers version clips the student's gradients only "
                          "(max_grad_norm), not the terms' projectors'; upgrade transformers to clip both",
                          stacklevel=3)

    # -- clipping: one norm over everything the optimiser steps -----------------------------------
    def _clip_grad_norm(self, model):
        """``max_grad_norm`` over the student's parameters and the terms' projectors together, one
        global norm, as if the projectors were part of the model (the Trainer's own clips the
        model's alone, which left the projectors' steps unbounded and changed the ratio between
        the two). The projectors' gradients are averaged over ranks first, so every rank takes
        the same norm. Sharded set-ups (FSDP, DeepSpeed, …) keep the Trainer's own clipping."""
        from accelerate.utils import DistributedType
        projectors = [p for p in self.distiller.parameters() if p.grad is not None]
        plain = self.accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU,
                                                      DistributedType.MULTI_GPU)
        if not projectors or not plain:
            return super()._clip_grad_norm(model)
        self._distiller_callback.average()
        return self.accelerator.clip_grad_norm_([*model.parameters(), *projectors],
                                                self.args.max_grad_norm)

    # -- the projectors' sizes ------------------------------------------------------------------
    def _example_ids(self, example) -> Tensor:
        """``(n ≥ 2, L)`` input ids to size the projectors on (see ``example`` in the class docstring)."""
        if example is None:
            if self.train_dataset is None:
                raise ValueError(f"{type(self).__name__}: the terms' projectors are sized on one batch: give "
                                 "train_dataset= or example= (a batch of input_ids)")
            dataset, collator = self.train_dataset, self.data_collator
            try:
                import datasets
                is_hf_dataset = isinstance(dataset, datasets.Dataset)
            except ImportError:
                is_hf_dataset = False
            if is_hf_dataset:
                dataset = self._remove_unused_columns(dataset, description="training")
            else:
                collator = self._get_collator_with_removed_columns(collator, description="training")
            example = collator(list(itertools.islice(iter(dataset), 2)))
        ids = example["input_ids"] if isinstance(example, Mapping) else example
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            raise ValueError(f"{type(self).__name__}: example= must be a batch of input_ids (B, L) or a mapping "
                             f"holding one, got {getattr(ids, 'shape', type(ids).__name__)}")
        return ids if ids.shape[0] >= 2 else ids.repeat(2, 1)

    # -- the optimiser, saving and resuming ------------------------------------------------------
    def create_optimizer(self, *args: Any, **kwargs: Any):
        """The Trainer's optimiser, with the Distiller's parameters (the projectors) as one more group."""
        opt = super().create_optimizer(*args, **kwargs)
        params = [p for p in self.distiller.parameters() if p.requires_grad]
        have = {id(p) for group in opt.param_groups for p in group["params"]}
        if params and not any(id(p) in have for p in params):
            opt.add_param_group({"params": params, "weight_decay": self.args.weight_decay})
        return opt

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The student's files (``save_pretrained``), and :data:`DISTILLER_FILE` beside them."""
        super().save_model(output_dir, _internal_call)
        folder = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            os.makedirs(folder, exist_ok=True)
            torch.save(self.distiller.state_dict(), os.path.join(folder, DISTILLER_FILE))

    def load_distiller(self, folder: str | os.PathLike) -> None:
        """Load the Distiller's state saved in ``folder`` (a checkpoint or a saved student's folder)."""
        path = os.path.join(folder, DISTILLER_FILE)
        if not os.path.isfile(path):
            if not self.distiller.state_dict():
                return  # nothing to restore: no projector, no buffer
            raise ValueError(f"{type(self).__name__}: {path} is missing (the terms' projectors are saved there by "
                             f"{type(self).__name__}); resume from a checkpoint it saved, or start without resuming")
        state = torch.load(path, map_location=self.args.device, weights_only=True)
        self.distiller.load_state_dict(state)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """``Trainer.train``; resuming also restores the Distiller's state from the checkpoint."""
        folder = resume_from_checkpoint
        if folder is True:
            folder = get_last_checkpoint(self.args.output_dir)
        if isinstance(folder, (str, os.PathLike)):
            self.load_distiller(folder)
        return super().train(resume_from_checkpoint, *args, **kwargs)
