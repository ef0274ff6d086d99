r"""kd2m's hidden-state terms added to TRL's GKD loss: :class:`KD2MGKDTrainer`.

::

    from trl.experimental.gkd import GKDConfig
    from kd2m.integrations.trl import KD2MGKDTrainer

    trainer = KD2MGKDTrainer(model=student, teacher_model=teacher, args=GKDConfig(...),
                             train_dataset=data, processing_class=tokenizer,
                             kd2m_terms=[{"term": "gauss_w2", "weight": 0.1, "unit": "tokens"}])

The loss of a batch is TRL's own (the generalized JSD between the student's and the teacher's
next-token distributions, on- or off-policy as ``GKDConfig`` says) plus ``Σ_k λ_k · term_k``, each
term a kd2m distance between the student's and the teacher's hidden states: by default the final
ones (the LM head's input, per token with ``unit: tokens``), or the layers a term names
(``student_layer: transformer.h.0``; the model's own names). The terms read what GKD's own
forward passes computed — forward hooks on the student's and the (unwrapped) teacher's modules,
placed by a :class:`kd2m.Distiller` built as :class:`kd2m.integrations.hf.KD2MTrainer` builds its
own — so a step runs each network once, as TRL's loss alone does.

Only terms on features are taken (GKD's JSD is already the logit term); a memory-bank term
(CRD) is refused. The projectors are the Distiller's parameters: added to the optimiser, saved
beside the student (:data:`kd2m.integrations.hf.DISTILLER_FILE`), restored on resume, averaged
over ranks before each step, as in ``KD2MTrainer``. Each term is scaled ``1 / (micro-batches)``
under gradient accumulation (TRL's JSD is normalised over the accumulated batch's tokens).

Needs the optional extra ``pip install "kd2m[trl]"`` (TRL ≥ 1.16: ``trl.experimental.gkd``).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

try:
    from trl.experimental.gkd import GKDTrainer
except ImportError:
    raise ImportError('kd2m.integrations.trl needs TRL (with trl.experimental.gkd): pip install "kd2m[trl]"') from None

from ..runtime import fork_rng
from ..training.distiller import Distiller, parse_terms
from .distiller_trainer import DistillerTrainerMixin
from .hf import CausalLMLogits, causal_targets, on_adapter, parse_term_list

__all__ = ["KD2MGKDTrainer"]


class KD2MGKDTrainer(DistillerTrainerMixin, GKDTrainer):
    """TRL's ``GKDTrainer`` with kd2m hidden-state terms added to its loss (see the module docstring).

    Args:
        args, kwargs: ``GKDTrainer``'s (``model=``, ``teacher_model=`` an instantiated causal LM,
            ``args=`` a ``GKDConfig``, ``train_dataset=``, ``processing_class=`` …).
        kd2m_terms: the terms (names, config-style mappings, a JSON list or names separated by
            commas); each must read features (``needs`` feats or maps).
        kd2m_example: a batch (mapping with ``input_ids``, or the ids ``(n, L)``) the projectors are
            sized on (default: the first two samples of ``train_dataset`` through the collator).

    ``trainer.distiller`` is the :class:`kd2m.Distiller`; ``trainer.last_terms`` each term's
    unweighted value at the last ``compute_loss``."""

    def __init__(self, *args: Any, kd2m_terms: Iterable | str, kd2m_example: Mapping | Tensor | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        parsed = on_adapter(parse_terms(parse_term_list(kd2m_terms)))
        if not parsed:
            raise ValueError("KD2MGKDTrainer: kd2m_terms is empty; name at least one feature term (e.g. "
                             "[{\"term\": \"gauss_w2\", \"weight\": 0.1, \"unit\": \"tokens\"}]), or use GKDTrainer")
        for t in parsed:
            if not t.spec.needs & {"feats", "maps"}:
                raise ValueError(f"KD2MGKDTrainer: term {t.name!r} does not read hidden states (GKD's JSD is already "
                                 "the loss on the logits); give distances on features such as gauss_w2 or cw2")
            if "index" in t.spec.needs:
                raise ValueError(f"KD2MGKDTrainer: term {t.name!r} keeps a memory row per training sample, which "
                                 "on-policy generation has no index for; use another feature term")
            if t.auto:
                raise ValueError(f"KD2MGKDTrainer: term {t.name!r} has weight auto, which this trainer does not "
                                 "calibrate; give it a number")
        device = self.args.device
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        ids = self._example_ids(kd2m_example).to(device)
        self.student_lm = CausalLMLogits(self.model)
        self.teacher_lm = CausalLMLogits(teacher)
        with fork_rng(device):  # sizing the projectors must not shift what training draws
            self._attach_distiller(Distiller(self.student_lm, self.teacher_lm, parsed, example=ids, ce_weight=0.0,
                                             task="lm"))
        self.last_terms: dict = {}
        # the teacher's logits of GKD's own forward, for the terms that also take logits
        self._teacher_logits: list = [None]
        teacher.register_forward_hook(lambda module, args, out: self._teacher_logits.__setitem__(0, out.logits))

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Tensor | int | None = None):
        """TRL's GKD loss, plus ``Σ_k λ_k · term_k`` on the hidden states its forward passes left
        in the Distiller's hooks (the term's part divided by the micro-batches while training)."""
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        d = self.distiller
        s_feats = d.s_taps.features()
        t_feats = d.step.teacher_out.taps.features()
        labels = causal_targets(inputs["labels"]).reshape(-1)
        s_logits, t_logits = outputs.logits, self._teacher_logits[0]
        s_logits, t_logits = (z.reshape(-1, z.shape[-1]) for z in (s_logits, t_logits))
        index = torch.arange(inputs["input_ids"].shape[0], device=labels.device)
        distill = loss.new_zeros(())
        values = {}
        for b, lam in zip(d.bound, d.weights()):
            v = b(s_feats, t_feats, labels, s_logits, t_logits, index)
            values[b.key] = v.detach()
            distill = distill + lam * v.to(torch.promote_types(v.dtype, torch.float32))
        self.last_terms = values
        if model.training:
            distill = distill / max(int(getattr(self, "current_gradient_accumulation_steps", 1) or 1), 1)
        loss = loss + distill
        return (loss, outputs) if return_outputs else loss
