"""Facts the whole package shares, each in one place: the method keys of a grid, the order of
its tables, the evaluation batch size, and the units a distance's samples can be. Pure data:
nothing here imports the rest of kd2m.
"""
from __future__ import annotations

__all__ = ["TEACHER", "CE", "PAPER_METRICS", "BASELINE_ORDER", "EVAL_BATCH_SIZE", "EVAL_LOGITS_MIB", "UNITS",
           "PER_POSITION_UNITS", "TEACHER_SETTINGS"]

#: Method key of a grid's teacher runs (also their directory name under ``--out``).
TEACHER = "teacher"
#: Method key of the CE-only student (trained on its supervised loss alone).
CE = "ce"

#: The paper's grid (its Table) plus MMD, in table order: the default ``metrics`` of a grid.
PAPER_METRICS = ["w2", "cw2", "jw2", "gauss_w2", "gauss_cw2", "gauss_kl", "mmd_rbf"]

#: The baselines in the order the field's tables list them: logit methods, then feature methods.
BASELINE_ORDER = ["kd", "dkd", "dist", "wkd_l", "fitnet", "at", "nst", "pkt", "rkd", "crd"]

#: Batch size of every held-out pass (test accuracy, the teacher cache's build, Theorem 1's
#: estimates): no gradients are kept, so it may be larger than the training batch.
EVAL_BATCH_SIZE = 512
#: ... at most as many items as keep a batch's logits under this many MiB: a language model's item
#: is a block of positions × its vocabulary (512 blocks of 128 tokens at V = 49 152 would be 12 GiB)
EVAL_LOGITS_MIB = 256

#: What one sample of a distance's distribution is (:class:`kd2m.losses.distance_loss.KD2MLoss`): an
#: image or sequence, pooled ("batch"); the positions of each one ("spatial"; "sequence" for token
#: models); every position of the batch ("tokens"); or one distribution per class ("class", what
#: the class-conditional distances already are on pooled features).
UNITS = ("batch", "spatial", "sequence", "tokens", "class")
#: The units whose samples are positions of a map or tokens: their distances read raw
#: per-position features (maps ``(n, c, h, w)`` or tokens ``(n, L, d)``), not pooled ones.
PER_POSITION_UNITS = ("spatial", "sequence", "tokens")

#: The run settings recorded only for a run that reads a teacher (the CE-only student has none of
#: them; :func:`kd2m.training.state.run_settings` writes them): a comparison of such a run with one
#: that reads none skips them (:func:`kd2m.harness.paired.settings_difference`).
TEACHER_SETTINGS = frozenset({"teacher", "teacher_options", "teacher_epochs", "pretrained_teacher", "teacher_lr",
                              "match", "teacher_cache", "teacher_topk"})
