r"""kd2m's terms in a ``transformers.Trainer``: ``KD2MTrainer`` and ``KD2MTrainingArguments``.

::

    from kd2m.integrations.hf import KD2MTrainer, KD2MTrainingArguments

    args = KD2MTrainingArguments(output_dir="out", kd2m_terms=["fkl", {"term": "gauss_w2", "weight": 0.1,
                                 "unit": "tokens"}], kd2m_ce_weight=1.0)
    trainer = KD2MTrainer(model=student, args=args, train_dataset=data, teacher=teacher)
    trainer.train()
    trainer.save_model("student")       # the student's own files, and kd2m_distiller.pt beside them

The loss of a batch is :class:`kd2m.Distiller`'s with ``task="lm"``:
``w_CE · CE + Σ_k λ_k · term_k``, where CE is the next-token cross-entropy over the kept positions
(the targets are the batch's ``labels`` shifted by one, ``-100`` at each row's end and wherever a
label is ``-100``): with no terms it is the model's own ``out.loss``.

How the pieces meet:

- the student is run through :class:`CausalLMLogits`, a small module whose ``forward(input_ids)``
  calls the model the Trainer passes to ``compute_loss`` (its DDP/accelerate wrapper when there
  is one, so gradients are synchronised as usual) with the batch's other inputs
  (``attention_mask`` …) and returns ``.logits``. The Distiller is built on the **unwrapped**
  model, so its forward hooks sit on the model's real submodules; a layer named in a term
  (``student_layer: transformer.h.1``) is the model's own name (it is looked up under the
  adapter's ``model.`` prefix);
- the teacher is frozen and in eval mode in every ``compute_loss`` (the Distiller's contract);
- the terms' projectors are the Distiller's parameters, not the student's: ``create_optimizer``
  adds them as one more parameter group (the Trainer's learning rate and weight decay), so
  ``save_pretrained`` / ``save_model`` write the student's files only (``from_pretrained`` finds
  no unexpected key); the Distiller's ``state_dict`` is saved beside them as
  :data:`DISTILLER_FILE` (in every checkpoint too) and loaded back by
  ``train(resume_from_checkpoint=…)``. Under torchrun their gradients are averaged over ranks
  before each optimiser step, as DDP does for the student's; ``max_grad_norm`` clips the
  student's parameters and the projectors together, by one global norm;
- gradient accumulation: the returned loss is already scaled for it (``loss_is_scaled_for_ga``):
  CE is weighted by this micro-batch's share of the kept tokens of the whole accumulated
  (and, with ``average_tokens_across_devices``, all ranks') batch, as the Trainer's own causal-LM
  loss is, and each term by ``1 / (micro-batches)``. A per-token divergence (``fkl``) on
  sequences of one length then gives the gradient of one batch as large as the accumulated
  ones; a distance over a micro-batch is the mean of its values over the micro-batches;
- ``torch.nn.DataParallel`` (several GPUs in one process, ``n_gpu > 1``) is refused: the hooks
  would record every replica's features into one place; launch one process per GPU instead.

Needs the optional extra ``pip install "kd2m[hf]"`` (transformers and accelerate).
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

try:
    from transformers import Trainer, TrainingArguments
except ImportError:
    raise ImportError('kd2m.integrations.hf needs Hugging Face transformers and accelerate: '
                      'pip install "kd2m[hf]"') from None

from ..features import PENULTIMATE
from ..runtime import fork_rng
from ..training.distiller import Distiller, parse_terms
from ..training.methods import TermConfig
from .distiller_trainer import DISTILLER_FILE, DistillerTrainerMixin

__all__ = ["DISTILLER_FILE", "CausalLMLogits", "DistillerTrainerMixin", "KD2MTrainer", "KD2MTrainingArguments",
           "causal_targets", "on_adapter", "parse_term_list"]

_TERMS_HINT = ("give a JSON list such as '[{\"term\": \"fkl\", \"weight\": 0.5}]' or names separated by "
               "commas such as 'fkl,gauss_w2'")


def parse_term_list(value: None | str | Iterable) -> list:
    """The term entries of ``kd2m_terms``: None → ``[]``; a string → a JSON list (or one JSON
    object) of entries, or names separated by commas; a list of names / mappings as it is. Each
    entry is checked (:func:`kd2m.training.distiller.parse_terms`); ValueError naming the bad one."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("[", "{")):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"kd2m_terms: not valid JSON ({e.msg} at character {e.pos}); {_TERMS_HINT}") from None
            if isinstance(value, dict):
                value = [value]
        else:
            value = [name.strip() for name in text.split(",") if name.strip()]
    elif isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"kd2m_terms: a list of term entries, got {type(value).__name__}; {_TERMS_HINT}")
    value = list(value)
    for i, entry in enumerate(value):
        if not isinstance(entry, (str, Mapping, TermConfig)):
            raise ValueError(f"kd2m_terms[{i}]: a term is a name or a mapping (term, weight, options, …), "
                             f"got {entry!r:.60}")
    parse_terms([e for e in value if not isinstance(e, TermConfig)])  # names each bad entry
    return value


@dataclass
class KD2MTrainingArguments(TrainingArguments):
    """``transformers.TrainingArguments`` and kd2m's two: the terms and CE's weight.

    ``kd2m_terms``: a list of term entries (names such as ``"fkl"``, or mappings with the keys of a
    config's term entry: ``term``, ``weight``, ``options``, ``student_layer``, ``teacher_layer``,
    ``unit``, ``warmup``, ``schedule``); on a command line (``HfArgumentParser``), a JSON list or
    names separated by commas. ``kd2m_ce_weight``: ``w_CE``, the next-token cross-entropy's weight."""

    kd2m_terms: None | str | list = field(default=None, metadata={
        "help": "kd2m terms: a JSON list of entries ('[{\"term\": \"fkl\", \"weight\": 0.5}]') or names "
                "separated by commas ('fkl,gauss_w2')"})
    kd2m_ce_weight: float = field(default=1.0, metadata={"help": "weight of the next-token cross-entropy (w_CE)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.kd2m_terms = parse_term_list(self.kd2m_terms)
        w = self.kd2m_ce_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w >= 0):
            raise ValueError(f"kd2m_ce_weight: a finite number ≥ 0, got {w!r:.40}")


def causal_targets(labels: Tensor) -> Tensor:
    """``(B, L)`` next-token targets of ``labels`` ``(B, L)``: position ``t`` predicts
    ``labels[:, t + 1]``; the last position, and every ``-100`` label, is ignored (``-100``)."""
    y = torch.full_like(labels, -100)
    y[:, :-1] = labels[:, 1:]
    return y


def on_adapter(terms: Iterable[TermConfig]) -> tuple[TermConfig, ...]:
    """``terms`` with each named layer moved under :class:`CausalLMLogits`' ``model.`` prefix
    (``transformer.h.1`` → ``model.transformer.h.1``); ``"penultimate"`` and defaults unchanged."""
    def moved(layer):
        if layer is None:
            return None
        if isinstance(layer, tuple):
            return tuple(moved(x) for x in layer)
        return layer if layer == PENULTIMATE else f"model.{layer}"
    return tuple(dataclasses.replace(t, student_layer=moved(t.student_layer), teacher_layer=moved(t.teacher_layer))
                 for t in terms)


class CausalLMLogits(nn.Module):
    """A ``transformers`` causal LM as kd2m's engine calls a network: ``forward(input_ids)`` →
    logits ``(B, L, V)``.

    ``model`` is a submodule (its layers are ``model.<name>``); within :meth:`feeding` the call
    runs ``runner`` instead (the model's DDP/accelerate wrapper) with the batch's other inputs
    (``attention_mask`` …), and :attr:`output` keeps the last ``ModelOutput``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # not submodules: the wrapper holds the model itself (a cycle), the inputs are a batch's
        object.__setattr__(self, "runner", None)
        object.__setattr__(self, "inputs", {})
        object.__setattr__(self, "output", None)

    @contextmanager
    def feeding(self, runner: nn.Module | None, inputs: Mapping[str, Any]) -> Iterator[CausalLMLogits]:
        """Calls inside run ``runner`` (None: :attr:`model`) with ``inputs`` besides ``input_ids``."""
        object.__setattr__(self, "runner", runner)
        object.__setattr__(self, "inputs", dict(inputs))
        try:
            yield self
        finally:
            object.__setattr__(self, "runner", None)
            object.__setattr__(self, "inputs", {})

    def forward(self, input_ids: Tensor) -> Tensor:
        net = self.runner if self.runner is not None else self.model
        out = net(input_ids=input_ids, use_cache=False, **self.inputs)
        object.__setattr__(self, "output", out)
        return out.logits


class KD2MTrainer(DistillerTrainerMixin, Trainer):
    """A ``transformers.Trainer`` whose loss is ``w_CE · CE + Σ_k λ_k · term_k`` against ``teacher``
    (see the module docstring).

    Args:
        args, kwargs: the Trainer's positional and keyword arguments (``model=`` the student, ``args=``,
            ``train_dataset=`` …).
        teacher: the causal LM to learn from (same vocabulary as the student); frozen here.
        terms: the term entries (default: ``args.kd2m_terms`` of a :class:`KD2MTrainingArguments`,
            else none); names, mappings or :class:`~kd2m.training.methods.TermConfig`.
        ce_weight: ``w_CE`` (default: ``args.kd2m_ce_weight``, else 1).
        example: a batch (a mapping with ``input_ids``, or the ``input_ids`` tensor) the terms'
            projectors are sized on (default: the first two samples of ``train_dataset`` through
            the data collator).

    ``trainer.distiller`` is the :class:`kd2m.Distiller`; ``trainer.last_output`` its output on the
    last batch (``terms``: each term's unweighted value); the training logs hold each term's mean
    since the previous log as ``kd2m/<key>`` (and CE's as ``kd2m/ce``)."""

    # compute_loss scales for gradient accumulation itself (see the module docstring)
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, teacher: nn.Module, terms: Iterable | None = None, ce_weight: float | None = None,
                 example: Mapping | Tensor | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.args.n_gpu > 1:
            raise ValueError(f"KD2MTrainer: torch.nn.DataParallel over {self.args.n_gpu} GPUs in one process is not "
                             "supported (the feature hooks would mix replicas); launch one process per GPU with "
                             "torchrun or accelerate launch")
        if not isinstance(teacher, nn.Module):
            raise ValueError(f"KD2MTrainer: teacher= must be a causal LM (an nn.Module), got {type(teacher).__name__}")
        if terms is None:
            terms = getattr(self.args, "kd2m_terms", None) or []
        if ce_weight is None:
            ce_weight = getattr(self.args, "kd2m_ce_weight", 1.0)
        parsed = on_adapter(parse_terms(parse_term_list(terms)))
        auto = [t.name for t in parsed if t.auto]
        if auto:
            raise ValueError(f"KD2MTrainer: term(s) {', '.join(auto)} have weight auto, which this trainer does not "
                             "calibrate; give each a number (kd2m's command line calibrates auto)")
        device = self.args.device
        teacher.to(device)
        ids = self._example_ids(example).to(device)
        self.student_lm = CausalLMLogits(self.model)
        self.teacher_lm = CausalLMLogits(teacher)
        with fork_rng(device):  # sizing the projectors must not shift what training draws
            self._attach_distiller(Distiller(self.student_lm, self.teacher_lm, parsed, example=ids,
                                             ce_weight=float(ce_weight), task="lm"))
        self.last_output = None
        self._term_sums: dict = {}
        self._term_count = 0

    # -- the loss -------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Tensor | int | None = None):
        """The Distiller's loss on the batch, scaled for gradient accumulation while training
        (see the module docstring); in evaluation, the batch's ``w_CE · CE + Σ λ·term``."""
        if "labels" not in inputs:
            raise ValueError("KD2MTrainer: each batch needs labels (the token ids, -100 where ignored); a causal LM's "
                             "collator such as DataCollatorForLanguageModeling(tokenizer, mlm=False) sets them")
        labels = inputs["labels"]
        feed = {k: v for k, v in inputs.items() if k not in ("input_ids", "labels")}
        with self.student_lm.feeding(model, feed), self.teacher_lm.feeding(None, feed):
            out = self.distiller(inputs["input_ids"], causal_targets(labels))
        outputs = self.student_lm.output
        object.__setattr__(self.student_lm, "output", None)
        self.last_output = out
        if model.training:  # each term's value, averaged over the steps until the next log
            for key, value in {"ce": out.ce, **out.terms}.items():
                self._term_sums[key] = self._term_sums.get(key, 0.0) + value.detach()
            self._term_count += 1
        loss = self._scaled(out, labels, num_items_in_batch) if model.training else out.loss
        return (loss, outputs) if return_outputs else loss

    def _scaled(self, out, labels: Tensor, num_items_in_batch) -> Tensor:
        """``w_CE · CE · kept / N + distill / G``: ``kept`` this micro-batch's kept targets, ``N`` the
        accumulated batch's (all ranks' with ``average_tokens_across_devices``, then × the ranks,
        which DDP's averaging divides back), ``G`` the micro-batches per optimiser step."""
        steps = max(int(getattr(self, "current_gradient_accumulation_steps", 1) or 1), 1)
        if num_items_in_batch is None:
            return out.loss / steps
        kept = (causal_targets(labels) != -100).sum()
        share = kept / torch.as_tensor(num_items_in_batch, device=kept.device).clamp_min(1)
        if getattr(self.args, "average_tokens_across_devices", False) and self.args.world_size > 1:
            share = share * self.accelerator.num_processes
        ce = torch.where(kept > 0, out.ce, torch.zeros_like(out.ce))  # an all-ignored micro-batch: CE's 0/0
        return self.distiller.method.ce_weight * ce * share + out.distill / steps

    def log(self, logs: dict, *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, and on a training log each term's mean unweighted value (and CE's) over
        the micro-batches since the last one, on this process: ``kd2m/<key>``."""
        if "loss" in logs and self._term_count:
            for key, total in self._term_sums.items():
                logs[f"kd2m/{key}"] = round(float(total) / self._term_count, 6)
            self._term_sums, self._term_count = {}, 0
        super().log(logs, *args, **kwargs)
