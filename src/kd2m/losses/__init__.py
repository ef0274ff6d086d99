"""Every distillation term, one door: ``get(name, ctx, **options)``, ``available()``, ``spec(name)``.

    >>> from kd2m import losses
    >>> term = losses.get("dkd", beta=8.0)                                         # doctest: +SKIP
    >>> value = term(student_logits=zs, teacher_logits=zt, labels=y)              # doctest: +SKIP

The KD²M distances (family ``"kd2m"``, :mod:`kd2m.losses.distances`) and the field's baselines
(family ``"baseline"``: logit terms in :mod:`kd2m.losses.logit`, feature-map terms in
:mod:`kd2m.losses.maps`, relational and contrastive terms in :mod:`kd2m.losses.relational`)
share one registry (:mod:`kd2m.losses.registry`) whose entries carry their facts: table label,
the inputs they need, their O(n²) memory factor, their paper, a warm-up schedule (DKD).
"""
from .registry import (INPUTS, FunctionTerm, Term, TermContext, TermSpec, add_spec, available, check_options, get,
                       register_term, spec)

# the registrations: the 13 KD²M distances; the baselines kd dkd dist wkd_l (logit), fitnet at nst
# wkd_f (maps), pkt rkd crd (relational); the language-model field's token divergences fkl rkl jsd
# skew_kl skew_rkl tvd
from . import distances, divergences, logit, maps, relational  # noqa: F401 (registered on import)

# a teacher's top-k log-probabilities (offline), and the student's head fused with its losses
from .fused_head import HeadLoss, LinearTeacher, TokenDivergence, fused_head_loss, fused_head_terms
from .sparse_teacher import SparseTeacher

__all__ = ["get", "available", "spec", "register_term", "Term", "TermContext", "TermSpec", "INPUTS", "FunctionTerm",
           "add_spec", "check_options", "SparseTeacher", "fused_head_loss", "fused_head_terms", "LinearTeacher",
           "HeadLoss", "TokenDivergence"]
