"""What a diverged run says: where its loss, features or gradients went non-finite, and how to go on.

:class:`kd2m.harness.trainer.Trainer` raises :class:`~kd2m.errors.NonFiniteLossError` with these
messages; the grid records the run as diverged and goes on (:func:`kd2m.harness.grid.run_grid`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import distributed as dist_ctx
from ..errors import NonFiniteLossError
from ..training.step import TermFailure

__all__ = ["term_failure", "nonfinite_where", "diverged_error"]


def term_failure(failure: TermFailure, epoch: int, step: int, s_taps) -> Exception:
    """What a term's error during training means. Inside the engine the terms skip their value
    checks (no host reads per step), so non-finite features reach them, and a solver may fail
    on them (an eigensolver that does not converge on NaN) before the loss could read NaN: the
    run diverged, said as such (the grid records it and goes on). Looked at here, on the
    failure path only; any other error is the term's own, raised as it was. ``s_taps``: the
    student's feature taps (their last features), or None."""
    at = f"at epoch {epoch + 1}, step {step + 1}"
    taps = s_taps.features() if s_taps is not None else {}
    if any(not bool(torch.isfinite(v).all()) for v in taps.values() if v.is_floating_point()):
        return NonFiniteLossError(f"non-finite student features {at}")
    if isinstance(failure.error, torch.linalg.LinAlgError):
        # finite but extreme features (a student blowing up under a large λ) can still defeat a
        # ridge-regularised eigensolver: the run diverged, named with the solver's own words
        reason = str(failure.error).splitlines()[0][:120]
        return NonFiniteLossError(f"term {failure.term.config.name!r} could not be computed on the student's "
                                  f"features {at} ({reason})")
    return failure.error


def nonfinite_where(epoch: int, totals: dict, terms: list, param_names: list[str]) -> str:
    """Where an epoch went non-finite: its first bad step, and what was non-finite there —
    the student's or the teacher's features, the loss (its values), or, the loss being finite,
    the gradients (which); under torchrun, the rank whose loss it was when it was another's
    (its NaN reaches this rank's gradients through DDP's all-reduce). ``terms``: the run's bound
    terms; ``param_names``: its optimiser's parameters by name, in its order."""
    at = f"at epoch {epoch + 1}, step {totals['first_bad'] + 1}"
    others = [r for r in totals["nonfinite_loss_ranks"] or () if r != dist_ctx.rank()]
    if not totals["first_is_local"] or (others and not totals["first_loss_nonfinite"]):
        return f"non-finite loss {at} (on {'rank ' + ', '.join(map(str, others)) if others else 'another rank'})"
    if totals["first_student_nonfinite"]:
        return f"non-finite student features {at}"
    if totals["first_teacher_nonfinite"]:
        return f"non-finite teacher features {at}"
    ce, *values = totals["first_values"]
    parts = ", ".join([f"ce={ce:.4g}"] + [f"{b.key}={v:.4g}" for b, v in zip(terms, values)])
    if totals["first_loss_nonfinite"] or totals["first_bad_gradient"] is None:
        return f"non-finite loss {at} ({parts})"
    name = param_names[totals["first_bad_gradient"]]
    return (f"non-finite gradient {at} (in {totals['bad_gradients']} of {len(param_names)} parameters, "
            f"the first {name}; the loss was finite: {parts})")


def diverged_error(name, run_dir: Path, ckpt_path: Path, where: str) -> NonFiniteLossError:
    """The error a diverged run ends with: ``where`` it went non-finite, and how to go on (a
    checkpoint kept in ``run_dir`` resumes; a lower λ or lr needs the run directory deleted first).
    ``name``: how the run is named in the message."""
    if ckpt_path.exists():
        # a lower λ or lr changes the run's settings, which a resume refuses: say so
        # the fix first, one path: the error line is capped at 300 characters and run paths can be long
        advice = (f"to lower --weight or --lr, delete {run_dir} first; else the same command resumes from "
                  "its last good checkpoint, kept there")
    else:
        advice = "no checkpoint was written yet: lower --lr or --weight and rerun"
    return NonFiniteLossError(f"{name}: {where}; {advice}", where)
