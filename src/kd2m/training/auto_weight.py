"""λ without hand-tuning: calibrate a term's weight against CE on the initial student.

The distances differ by orders of magnitude in scale (W2² in the hundreds on the digits
features, MMD below 1), so one λ means something different for every metric, layer and
dataset. With ``weight: auto*K`` (in one run, ``auto`` = ``auto*1``; a grid first chooses K for a
bare ``auto`` on a holdout: :mod:`kd2m.harness.select_k`) the engine sets, before the first step,

    λ_k = K · w_CE · E_b ‖∇_θ CE(b)‖ / E_b ‖∇_θ term_k(b)‖

with w_CE the student's CE weight (1 unless set), θ the student's parameters and b the first few training batches (in index order, the
student at its initial weights, train mode, no update). **λ = K then means: at initialisation
the term pulls the student's weights K times as hard as the labels do.** It is invariant to any
rescaling of the term (a term multiplied by c gets λ/c), of the features it is computed on
(after the change of the term's value), and needs no held-out seeds.

Why gradients and not values: two terms with equal values can pull with very different force
(a squared distance grows quadratically in the feature scale, its gradient linearly), and the
balance that matters for training is the one between the forces on θ (as in GradNorm, Chen et
al., ICML 2018, which balances gradient norms of task losses; here once, at initialisation, so
the objective is fixed for the whole run and the schedule of each term is unchanged).

Calibration draws no randomness the run sees (``torch.random.fork_rng``), restores every buffer
it touches (batch-norm statistics, memory banks), and is deterministic: a resumed run computes
the same λ again.
"""
from __future__ import annotations

import copy
import math

import torch
from torch.utils.data import DataLoader

from .. import distributed as dist_ctx
from ..errors import ConfigError
from ..runtime import fork_rng, to_device
from .build import IndexedDataset

__all__ = ["CALIBRATION_BATCHES", "MAX_AUTO_SCALE", "calibrate", "grad_norm"]

#: training batches the calibration averages over
CALIBRATION_BATCHES = 4
#: The largest λ multiplier calibration gives. A term whose pull at initialisation is under a
#: millionth of CE's is flat there (its gradient is at the level of the rounding of its value:
#: 1e6 to 1e15 were seen from a constant term), and such a λ would multiply rounding noise. The
#: largest scale of a real term measured so far is PKT's on MNIST-1D, 1.8e4 (50x below).
MAX_AUTO_SCALE = 1e6


def calibrate(step, train_set, batch_size: int, name: str, channels_last: bool = False) -> list[float]:
    """One scale per term of ``step`` (:class:`~kd2m.training.step.Step`): the λ multiplier above
    for ``auto`` terms, 1 for the rest. ``train_set``: the training set (its first batches, in
    index order, view 0 of a cached teacher); ``name``: the student's key, for error messages."""
    terms = step.terms
    auto = [b.config.auto for b in terms]
    if not any(auto):
        return [1.0] * len(terms)
    model = step.net
    params = [p for p in model.parameters() if p.requires_grad]
    saved_model = copy.deepcopy(model.state_dict())
    saved_terms = [copy.deepcopy(b.module.state_dict()) for b in terms]
    loader = DataLoader(IndexedDataset(train_set), batch_size=batch_size, shuffle=False)
    ce_norm, term_norm = 0.0, [0.0] * len(terms)
    batches = 0
    was_training = model.training
    try:
        with fork_rng(step.device):
            model.train()
            for x, y, index in loader:
                if batches == CALIBRATION_BATCHES:
                    break
                x = to_device(x, step.device, channels_last)
                y, index = y.to(step.device), index.to(step.device)
                # the training step's forward (view 0 of a cached table), the auto terms only;
                # no autocast: the balance of forces is measured in the weights' precision
                out = step.forward(x, y, index * step.views, amp=None, which=auto)
                ce_norm += grad_norm(out.ce, params)
                for k, v in enumerate(out.values):
                    if v is not None:
                        term_norm[k] += grad_norm(v, params)
                batches += 1
    finally:
        model.load_state_dict(saved_model)
        for b, sd in zip(terms, saved_terms):
            b.module.load_state_dict(sd)
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    sums = dist_ctx.all_reduce_sum([ce_norm] + term_norm, step.device)
    ce_norm, term_norm = sums[0], sums[1:]
    scales = []
    for k, b in enumerate(terms):
        if not auto[k]:
            scales.append(1.0)
            continue
        if not term_norm[k] > 0 or not math.isfinite(term_norm[k]):
            raise ConfigError(f"{name}: weight auto for term {b.config.name!r}: its gradient on the "
                              f"initial student is {term_norm[k]:g}, so no λ balances it against CE; give a number")
        scale = step.ce_weight * ce_norm / term_norm[k]
        if not scale <= MAX_AUTO_SCALE:
            raise ConfigError(f"{name}: weight auto for term {b.config.name!r}: its gradient on the "
                              f"initial student is {term_norm[k] / (step.ce_weight * ce_norm):.2g} of CE's, "
                              f"so λ would be {scale:.2g} (> {MAX_AUTO_SCALE:g}): the term is flat at initialisation; "
                              "give a number")
        scales.append(scale)
    return scales


def grad_norm(value: torch.Tensor, tensors) -> float:
    """‖∇ value‖ over ``tensors`` (parameters, or any tensors in its graph), the graph kept."""
    grads = torch.autograd.grad(value, tensors, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float(g.detach().pow(2).sum()) for g in grads if g is not None))
