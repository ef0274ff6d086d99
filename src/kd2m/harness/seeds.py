"""One seed of a grid: its teacher, then every student, each run through :func:`kd2m.harness.trainer.fit`.

The grid's process calls :func:`train_seed` for each seed in turn, or a ``--parallel`` worker
(:mod:`kd2m.harness.workers`) for the seeds it is given; both return the same rows.
"""
from __future__ import annotations

import torch

from ..catalog import TEACHER
from ..errors import NonFiniteLossError
from ..runtime import fork_rng
from ..training.build import build_student, build_teacher, freeze
from ..training.methods import Method
from .rundir import FINAL_JSON, RunDir
from .trainer import Trainer, fit

__all__ = ["check_auto_weights", "teacher_of", "train_seed"]


def check_auto_weights(students, bundle, device, out: RunDir, seed: int, teacher, caches: dict) -> None:
    """Calibrate every unfinished ``weight: auto`` student of ``seed`` against the trained teacher
    before any student trains, so that a term calibration refuses (a zero or vanishing gradient)
    ends the grid now, not when that student's turn comes after the others have trained. Draws no
    randomness the runs see; changes no weights (calibration restores what it touches)."""
    for vcfg, method in students:
        if not any(t.auto for t in method.terms) or (out.run(method.key, seed) / FINAL_JSON).exists():
            continue
        with fork_rng(device):
            trainer = Trainer(build_student(vcfg, bundle, seed), bundle, vcfg, method, seed, out.run(method.key, seed),
                              device, teacher=teacher, teacher_caches=caches)
            try:
                trainer._setup()
            finally:
                trainer.remove_hooks()


def teacher_of(cfg, bundle, seed: int, shared: dict | None) -> torch.nn.Module:
    """The seed's teacher. A pretrained one that no epoch trains is its file's weights whatever
    the seed: built once and shared by the seeds of this process (``shared``; frozen, so no seed
    changes it), not loaded again per seed."""
    if shared is None or not (cfg.pretrained_teacher and cfg.teacher_epochs == 0):
        return build_teacher(cfg, bundle, seed)
    if "teacher" not in shared:
        shared["teacher"] = build_teacher(cfg, bundle, seed)
    return shared["teacher"]


def train_seed(cfg, students, bundle, device, out: RunDir, seed: int,
               precheck_auto: bool = True, shared: dict | None = None) -> list[tuple[dict | str, str, bool]]:
    """Teacher, then every student of one seed; (results row, label, finished earlier) per run.

    Every run goes through fit(): a finished one returns its final.json at once after checking
    that it was made with the same settings (so a resumed grid redoes nothing, and a changed
    config never silently reuses old results). A student whose loss goes non-finite is recorded
    (its ``diverged.json``; the row is the reason, a string) and the grid goes on: in a λ sweep
    the largest λ diverging is a result, not the end of the sweep. A diverging teacher stops it."""
    teacher = teacher_of(cfg, bundle, seed, shared)
    # the teacher's outputs, built once for all the students that read them (teacher_cache > 0): a
    # teacher shared by the seeds shares its tables too (their key holds the views' seed where it matters)
    caches: dict = shared.setdefault("caches", {}) if shared is not None and shared.get("teacher") is teacher else {}
    runs = []
    for vcfg, method in [(cfg, Method(TEACHER))] + students:
        if not method.is_teacher and precheck_auto:
            precheck_auto = False
            check_auto_weights(students, bundle, device, out, seed, teacher, caches)
        run_dir = out.run(method.key, seed)
        earlier = (run_dir / FINAL_JSON).exists()
        if method.is_teacher:
            res = fit(teacher, bundle, cfg.teacher_config(), method, seed, run_dir, device,
                      epochs=cfg.teacher_epochs, desc=f"teacher s{seed}")
            freeze(teacher)
        else:
            try:
                res = fit(build_student(vcfg, bundle, seed), bundle, vcfg, method, seed, run_dir, device,
                          teacher=teacher, desc=f"{method.key} s{seed}", load_finished=False,
                          teacher_caches=caches)
            except NonFiniteLossError as e:
                runs.append((str(e), method.label, False))
                continue
        # keyed by where the run lives in this grid, not by the key its final.json was written under
        # (a run directory copied under a sweep variant's name, e.g. `cw2` → `cw2@auto*1`, is that variant)
        row = {**res, "method": method.key, "dataset": cfg.dataset, "label": method.label,
               "run_dir": str(run_dir.relative_to(out.root))}
        runs.append((row, method.label, earlier))
    return runs
