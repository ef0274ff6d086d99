r"""Training you can watch: TensorBoard event files and live feature-gap diagnostics.

Two things a run can do each epoch, neither of which changes what it trains:

* **Diagnostics** (``RunConfig.diagnostics``, on by default) — for a student with a teacher, on
  a fixed held-out batch (the first :data:`DIAG_SAMPLES` test images, the same every epoch, for
  every method and seed), :class:`FeatureGapProbe` measures the exact
  :math:`W_2` between the student's and the teacher's features, where the optimal plan puts its
  mass (:func:`plan_mass`: same class? same input?) and the rest of Theorem 1's terms exactly as
  ``kd2m bound`` computes them (:func:`kd2m.harness.theorem.terms_from_outputs`). The values land in the
  epoch's ``log.jsonl`` row under ``diag``; ``kd2m report`` draws them (``diagnostics.png``).
* **TensorBoard** (``RunConfig.tensorboard``) — :class:`TensorBoardLog` writes every value of
  the epoch's ``log.jsonl`` row (accuracy, losses, each term's raw value and its λ, the learning
  rate, the diagnostics) as a scalar to ``<run_dir>/tb/``, and the run's settings as text, so
  ``tensorboard --logdir OUT`` shows every run of a grid.

Why the same-class mass matters: a label-free distance (``w2``) matches the student's batch to
the teacher's by the cheapest plan, whatever the labels. When the plan pairs a student feature
with a teacher feature of another class, the loss pulls the student towards the wrong class's
region; ``same_class_mass`` is the share of the plan that does not. ``chance_same_class``
(:math:`\sum_c p_c^2`) is what a random pairing would give.

:class:`Monitor` is what the engine (:class:`kd2m.harness.trainer.Trainer`) holds: it exists on the main
process only, and only when one of the two is wanted.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import distributed as dist_ctx
from ..atomic_io import read_jsonl
from ..errors import ConfigError
from ..features import PENULTIMATE
from ..metrics.exact import exact_plan
from ..runtime import fork_rng
from .rundir import LOG_JSONL
from .theorem import model_outputs, terms_from_outputs

__all__ = ["plan_mass", "fixed_batch", "FeatureGapProbe", "TensorBoardLog", "Monitor", "backfill_tensorboard",
           "require_tensorboard", "row_scalars",
           "DIAG_SAMPLES", "INSTALL_HINT", "TB_DIR"]

#: Held-out samples of the diagnostics batch: the first min(DIAG_SAMPLES, len(test)) test images.
DIAG_SAMPLES = 256
#: Where a run's event files go, inside its run directory.
TB_DIR = "tb"
INSTALL_HINT = 'pip install -e ".[tensorboard]"'


# ----------------------------------------------------------------------------- the quantities
def plan_mass(student_feats: Tensor, teacher_feats: Tensor, labels: Tensor) -> dict:
    r"""Exact :math:`W_2^2` between two empirical feature measures of the same inputs, and where
    its optimal plan puts the mass.

    Student feature :math:`s_i` and teacher feature :math:`t_i` come from the same input
    :math:`x_i` with label :math:`y_i`. With :math:`\gamma^*` the optimal plan of

    .. math::
        W_2^2 = \min_{\gamma\in\Pi(\mathbf 1/n, \mathbf 1/n)} \sum_{ij}\gamma_{ij}\|s_i - t_j\|^2

    returns ``w2_sq`` (:math:`W_2^2`), ``same_class_mass``
    (:math:`\sum_{ij}\gamma^*_{ij}[y_i = y_j]`: the share of the plan that pairs samples of one
    class), ``same_input_mass`` (:math:`\sum_i\gamma^*_{ii}`: the share that pairs a sample with
    itself) and ``chance_same_class`` (:math:`\sum_c p_c^2`, :math:`p_c` the class frequencies:
    the expected ``same_class_mass`` of a uniformly random permutation).

    Shapes: student_feats (n, d), teacher_feats (n, d), labels (n,) int. The plan is solved
    without gradient in float64 (:func:`kd2m.metrics.exact.exact_plan`; for equal sizes a
    permutation, so each share is a count divided by n). When the optimal plan is not unique the
    shares are those of the plan the solver returns.

    Cost: :math:`O(n^2 d)` for the cost matrix, then the exact assignment, :math:`O(n^3)` worst case.
    """
    if student_feats.dim() != 2 or teacher_feats.dim() != 2 or student_feats.shape != teacher_feats.shape:
        raise ValueError(f"plan_mass: expected two (n, d) feature matrices of one shape, got "
                         f"{tuple(student_feats.shape)} and {tuple(teacher_feats.shape)}")
    if labels.shape != (student_feats.shape[0],):
        raise ValueError(f"plan_mass: expected {student_feats.shape[0]} labels, got shape {tuple(labels.shape)}")
    with torch.no_grad():
        s, t = student_feats.detach().double().cpu(), teacher_feats.detach().double().cpu()
        y = labels.detach().cpu()
        cost = ((s * s).sum(1)[:, None] + (t * t).sum(1)[None, :] - 2.0 * s @ t.T).clamp_min_(0.0)
        rows, cols, w = exact_plan(cost)
        rows, cols, w = rows.cpu(), cols.cpu(), w.cpu()
        # the value from the matched differences, not the expanded cost (no cancellation)
        w2_sq = float((w * ((s[rows] - t[cols]) ** 2).sum(1)).sum())
        p = torch.bincount(y).double() / y.numel()
        return {"w2_sq": w2_sq, "same_class_mass": float(w[y[rows] == y[cols]].sum()),
                "same_input_mass": float(w[rows == cols].sum()), "chance_same_class": float((p * p).sum())}


def fixed_batch(dataset, samples: int = DIAG_SAMPLES) -> tuple[Tensor, Tensor]:
    """The first ``min(samples, len(dataset))`` items of ``dataset`` as ``(x (N, ...), y (N,))``:
    no randomness, so every epoch, method and seed sees the same batch."""
    n = min(samples, len(dataset))
    if n == 0:
        raise ValueError("diagnostics: the test set is empty")
    items = [dataset[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


class FeatureGapProbe:
    """Theorem 1's terms and the plan's class agreement, student vs teacher, on a fixed batch.

    The teacher's outputs are computed once (it is frozen); :meth:`__call__` runs the student in
    eval mode on the batch and returns the ``diag`` dict of a ``log.jsonl`` row:
    :func:`kd2m.harness.theorem.terms_from_outputs`'s keys (``w2``, ``w2_sq``, ``l2``, ``risk_*``, ``ce_*``,
    ``coupling_holds``, ``skipped``, ...; risks on these N samples only), :func:`plan_mass`'s
    shares, and ``seconds`` (its own wall time).

    Changes nothing a training run sees: no gradient, eval mode (no dropout, no BatchNorm
    statistics update) then the model's previous mode, and any random draw inside
    ``torch.random.fork_rng``. When student and teacher features differ in width there is no
    projector-free W2: the transport terms are None and ``skipped`` says why (likewise, with only
    ``n`` and ``seconds``, when the student's features are not finite).

    Cost per call: one eval forward of N samples, an :math:`O(N^2 d)` cost matrix and one exact
    assignment of size N (N = 256: a few ms on a CPU).
    """

    def __init__(self, teacher: nn.Module, test_set, device: torch.device, student_layer: str = PENULTIMATE,
                 teacher_layer: str = PENULTIMATE, samples: int = DIAG_SAMPLES):
        self.device, self.student_layer = torch.device(device), student_layer
        with self._quiet():  # reading items may draw randomness (a dataset that augments): none leaks out
            x, y = fixed_batch(test_set, samples)
            self.batch = (x.to(self.device), y.to(self.device))
            self.teacher_out = model_outputs(teacher, self.batch, len(y), self.device, teacher_layer)

    def _quiet(self):
        return fork_rng(self.device)

    def __call__(self, student: nn.Module) -> dict:
        t0 = time.perf_counter()
        with self._quiet():
            s_out = model_outputs(student, self.batch, len(self.batch[1]), self.device, self.student_layer)
        t_out = self.teacher_out
        if not bool(torch.isfinite(s_out.feats).all()):  # a diagnostic never stops a run; the engine judges the loss
            return {"n": s_out.n, "skipped": "non-finite student features on the diagnostics batch",
                    "seconds": time.perf_counter() - t0}
        shares = {"same_class_mass": None, "same_input_mass": None, "chance_same_class": None}
        w2_sq = None
        if s_out.feats.shape[1] == t_out.feats.shape[1]:
            mass = plan_mass(s_out.feats, t_out.feats, s_out.labels)
            w2_sq = mass.pop("w2_sq")
            shares.update(mass)
        diag = terms_from_outputs(t_out, s_out, w2_sq=w2_sq)
        diag.update(shares)
        diag["seconds"] = time.perf_counter() - t0
        return diag


# ----------------------------------------------------------------------------- TensorBoard
def require_tensorboard() -> None:
    """Refuse ``--tensorboard`` up front, with the install command, when the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError(f"tensorboard: the tensorboard package is not installed; install it with "
                          f"{INSTALL_HINT} (or pip install tensorboard), or drop --tensorboard") from None


#: top-level keys of a log.jsonl row and their TensorBoard tags
ROW_TAGS = {"test_acc": "accuracy/test", "loss": "loss/total", "ce": "loss/ce", "distill": "loss/distill",
            "lr": "lr"}
#: nested keys of a log.jsonl row ({name: value}) and the prefix of their tags
NESTED_TAGS = {"terms": "term/", "weights": "lambda/", "diag": "diag/"}
#: diagnostics that are counts or shapes, not curves
_NOT_CURVES = {"n", "samples", "dim_teacher", "dim_student"}


def row_scalars(row: dict) -> dict[str, float]:
    """The TensorBoard scalars of one ``log.jsonl`` row: ``{tag: value}`` (booleans and None left out)."""
    out = {}
    for key, tag in ROW_TAGS.items():
        if _is_number(row.get(key)):
            out[tag] = float(row[key])
    for key, prefix in NESTED_TAGS.items():
        for name, value in (row.get(key) or {}).items():
            if name not in _NOT_CURVES and _is_number(value):
                out[prefix + name] = float(value)
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class TensorBoardLog:
    """One run's event files in ``<run_dir>/tb/``: each epoch's row at step = epoch, the settings as text.

    Scalars are stored in float64 (``new_style``, ``double_precision``), so they read back equal
    to ``log.jsonl``. A resumed run writes its whole history again from the checkpoint (the one
    complete record: a kill can leave an event file a step short or half-flushed) into a fresh
    file, after deleting the earlier sessions' files, so every step is on disk once; the new file
    also starts with ``purge_step=0``, which tells a TensorBoard already watching the directory
    to drop what it read from them. Flushed every epoch.
    """

    def __init__(self, run_dir: Path, title: str, settings: dict, history: list[dict]):
        from torch.utils.tensorboard import SummaryWriter
        log_dir = Path(run_dir) / TB_DIR
        earlier = sorted(log_dir.glob("events.out.tfevents.*"))
        for path in earlier:
            path.unlink()
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=0 if earlier else None)
        self.writer.add_text("settings", f"{title}\n\n```\n{json.dumps(settings, indent=2)}\n```", global_step=0)
        for row in history:
            self._write(row)
        self.writer.flush()

    def _write(self, row: dict) -> None:
        for tag, value in row_scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=int(row["epoch"]), new_style=True, double_precision=True)

    def epoch(self, row: dict) -> None:
        self._write(row)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# ----------------------------------------------------------------------------- what the engine holds
class Monitor:
    """A run's diagnostics probe and/or TensorBoard log; :meth:`for_run` gives None when neither is wanted.

    The engine calls :meth:`epoch_end` with each epoch's row (before the row is checkpointed, so
    ``diag`` is in ``log.jsonl``) and :meth:`close` when the run stops.
    """

    def __init__(self, probe: FeatureGapProbe | None, board: TensorBoardLog | None):
        self.probe, self.board = probe, board

    @classmethod
    def for_run(cls, cfg, model_role: str, run_dir: Path, title: str, settings: dict, history: list[dict],
                teacher: nn.Module | None, test_set, device, task=None) -> Monitor | None:
        """``model_role``: "teacher" or "student"; ``teacher``: the student's teacher (None for the
        teacher's own run); ``task``: the run's :class:`~kd2m.tasks.Task` (the diagnostics run
        where its ``diagnostics`` says Theorem 1's terms apply). Only the main process monitors
        (under torchrun the ranks hold the same model)."""
        if not dist_ctx.is_main():
            return None
        probe = board = None
        applies = task is None or task.diagnostics
        if getattr(cfg, "diagnostics", False) and applies and model_role == "student" and teacher is not None:
            probe = FeatureGapProbe(teacher, test_set, device, cfg.student_layer, cfg.teacher_layer)
        if getattr(cfg, "tensorboard", False):
            board = TensorBoardLog(run_dir, title, settings, history)
        return cls(probe, board) if (probe or board) else None

    def epoch_end(self, model: nn.Module, row: dict) -> None:
        """Add ``row["diag"]`` (the student ``model`` against its teacher) and log the row."""
        if self.probe is not None:
            row["diag"] = self.probe(model)
        if self.board is not None:
            self.board.epoch(row)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def backfill_tensorboard(cfg, run_dir: Path, title: str, settings: dict) -> None:
    """``--tensorboard`` on a run finished without it: write its event files from its ``log.jsonl``."""
    if not (getattr(cfg, "tensorboard", False) and dist_ctx.is_main()) or (Path(run_dir) / TB_DIR).is_dir():
        return
    log = Path(run_dir) / LOG_JSONL
    history = read_jsonl(log, f"delete {log} (the run's checkpoint or final.json holds what TensorBoard needs)") \
        if log.is_file() else []
    TensorBoardLog(run_dir, title, settings, history).close()
