"""The task seam: what differs between kinds of supervised learning, in one small object each.

The engine (:mod:`kd2m.training`, :mod:`kd2m.harness.trainer`), the ``weight: auto`` calibration, the
preflight and the monitor never name a loss or a score: they ask the run's :class:`Task`

- how a batch's outputs meet its targets (:meth:`Task.supervised_loss`: cross-entropy over the
  classes for a classifier);
- what the loss terms see (:meth:`Task.term_view`: the logits and labels a term is called with);
- what evaluation reports (:meth:`Task.evaluate`: held-out figures, the first of which,
  :attr:`Task.primary`, is the one tables compare, "higher is better" or not; its name, unit and
  direction in tables and plots are :attr:`Task.figure_name`, :attr:`Task.figure_unit`,
  :attr:`Task.higher_is_better`: every output reads them here);
- what a model must return (:meth:`Task.check_outputs`).

A dataset names its task (``DataBundle.task``); :func:`get` returns it. Classification is the
first task; a new one is one class and one registration line.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed as dist_ctx
from .losses.sparse_teacher import SparseTeacher
from .metrics._base import at_least_float32
from .registry import add_entry
from .runtime import to_device

__all__ = ["Task", "Classification", "LanguageModeling", "get", "available", "register_task"]

_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make ``task`` available under ``task.name``."""
    add_entry(_TASKS, "task", task.name, task)
    return task


def get(name: str) -> Task:
    """The registered task ``name``; ValueError listing them when unknown."""
    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(available())}") from None


def available() -> list[str]:
    return sorted(_TASKS)


class Task:
    """What a kind of supervised learning decides (see the module's docstring)."""

    name: str = ""
    #: the held-out figure tables compare (a key of :meth:`evaluate`'s result and of results.csv)
    primary: str = "test_acc"
    #: whether a larger :attr:`primary` is better
    higher_is_better: bool = True
    #: how tables and plots title :attr:`primary`, its unit included ("accuracy (%)")
    figure_name: str = "accuracy (%)"
    #: :attr:`primary` as tables and plots show it = ``figure_scale`` × as recorded (a fraction → %)
    figure_scale: float = 100.0
    #: what a difference of :attr:`primary` (a paired Δ) is counted in
    figure_unit: str = "accuracy points"
    #: whether Theorem 1's per-epoch diagnostics (:mod:`kd2m.harness.monitor`) apply to its models
    diagnostics: bool = True

    #: the key of the best epoch's :attr:`primary` in a run's result (``final.json``)
    best_key: str = "best_acc"
    #: whether a step may compute the supervised loss and the token divergences from the model's
    #: last hidden states and output layer (:mod:`kd2m.training.head`) instead of its logits
    fuses_head: bool = False

    def supervised_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The supervised part of the loss (0-dim, float32 or wider)."""
        raise NotImplementedError

    def better(self, a: float, b: float) -> bool:
        """Whether figure :attr:`primary` value ``a`` is better than ``b``."""
        return a > b if self.higher_is_better else a < b

    @property
    def direction(self) -> str:
        """"higher is better" or "lower is better", as tables and plots say it."""
        return "higher is better" if self.higher_is_better else "lower is better"

    def describe(self, figures: dict) -> str:
        """A run's figures in a few characters for a progress line ("acc 95.12%")."""
        raise NotImplementedError

    def term_view(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, labels) as the loss terms receive them."""
        return logits, targets

    def evaluate(self, model: nn.Module, loader, device: torch.device, channels_last: bool = False) -> dict:
        """Held-out figures of ``model`` over ``loader`` (eval mode, no gradients), reduced over
        ranks under torchrun; :attr:`primary` first."""
        raise NotImplementedError

    def check_outputs(self, out, n: int, num_classes: int) -> str | None:
        """Why ``out`` (a model's output on ``n`` inputs) is not what this task trains on, or None."""
        raise NotImplementedError


class Classification(Task):
    """Images (or signals) to one of ``num_classes`` labels: cross-entropy, accuracy."""

    name = "classification"
    primary = "test_acc"
    higher_is_better = True
    figure_name, figure_scale, figure_unit = "accuracy (%)", 100.0, "accuracy points"
    diagnostics = True

    def supervised_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(at_least_float32(logits), targets)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device, channels_last: bool = False) -> dict:
        """Accuracy counted over every test sample (not a mean of per-batch accuracies), on the
        device: one read at the end. Under DDP the DistributedSampler pads the test set to a
        multiple of the world size; the few duplicated samples are counted, as torch's own
        reference scripts do."""
        model.eval()
        correct = torch.zeros((), dtype=torch.long, device=device)
        total = 0
        for x, y in loader:
            x, y = to_device(x, device, channels_last), y.to(device, non_blocking=True)
            correct += (model(x).argmax(1) == y).sum()
            total += y.numel()
        counts = dist_ctx.all_reduce_tensor(torch.stack([correct, correct.new_tensor(total)]), "sum").tolist()
        return {"test_acc": counts[0] / max(counts[1], 1)}

    def describe(self, figures: dict) -> str:
        return f"acc {100 * figures['test_acc']:.2f}%"

    def check_outputs(self, out, n: int, num_classes: int) -> str | None:
        if not isinstance(out, Tensor):
            return f"returns a {type(out).__name__}, not a tensor of logits"
        if tuple(out.shape) != (n, num_classes):
            return f"gives outputs of shape {tuple(out.shape)} for a batch of {n}, expected ({n}, {num_classes}) logits"
        return None


register_task(Classification())


class LanguageModeling(Task):
    """Next-token prediction on token blocks ``(x, y)`` (``y``: the next tokens, ``-100`` where a
    position is ignored): cross-entropy over the kept positions; held-out perplexity (lower is
    better) and next-token accuracy. The model returns logits ``(B, L, V)``; the loss terms see
    them flattened to ``(B·L, V)`` with the next tokens ``(B·L,)`` as labels (a label-aware distance
    conditions a token's feature on the token that follows it)."""

    name = "lm"
    primary = "test_ppl"
    higher_is_better = False
    figure_name, figure_scale, figure_unit = "perplexity", 1.0, "perplexity"
    diagnostics = False     # Theorem 1 is about a classifier's risk on pooled features
    best_key = "best_ppl"
    fuses_head = True

    def supervised_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(at_least_float32(logits.reshape(-1, logits.shape[-1])), targets.reshape(-1),
                               ignore_index=-100)

    def term_view(self, logits, targets: Tensor) -> tuple:
        """Logits (B, L, V) as (B·L, V) and the targets as (B·L,); a teacher's
        :class:`~kd2m.losses.sparse_teacher.SparseTeacher` (already per position) and the
        student's absent logits (None: the fused head) as they are."""
        if logits is not None and not isinstance(logits, SparseTeacher):
            logits = logits.reshape(-1, logits.shape[-1])
        return logits, targets.reshape(-1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device, channels_last: bool = False) -> dict:
        """Perplexity exp(mean NLL) and next-token accuracy over every kept held-out position,
        summed on the device (one read at the end)."""
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # NLL, correct, positions
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x).float()
            flat, target = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
            kept = target != -100
            nll = F.cross_entropy(flat, target, ignore_index=-100, reduction="sum")
            correct = ((flat.argmax(-1) == target) & kept).sum()
            sums += torch.stack([nll.double(), correct.double(), kept.sum().double()])
        nll, correct, n = dist_ctx.all_reduce_tensor(sums, "sum").tolist()
        mean = nll / max(n, 1)
        return {"test_ppl": math.exp(min(mean, 700.0)), "test_acc": correct / max(n, 1), "test_nll": mean}

    def describe(self, figures: dict) -> str:
        return f"ppl {figures['test_ppl']:.3f}"

    def check_outputs(self, out, n: int, num_classes: int) -> str | None:
        if not isinstance(out, Tensor):
            return f"returns a {type(out).__name__}, not a tensor of logits"
        if out.dim() != 3 or out.shape[0] != n or out.shape[2] != num_classes:
            return (f"gives outputs of shape {tuple(out.shape)} for a batch of {n} sequences, expected "
                    f"({n}, length, {num_classes}) next-token logits over the data's vocabulary")
        return None


register_task(LanguageModeling())
