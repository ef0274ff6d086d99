"""The experiment grid: seeds × (teacher, then one student per method of the configuration).

Used by ``kd2m run`` (defaults: the embedded digits data) and ``kd2m bench CONFIG`` (a grid from
a YAML file). Everything the grid will need is checked before the first epoch
(:mod:`kd2m.harness.preflight`); finished runs are skipped (their ``final.json`` is the marker),
and every finished run is written to ``results.csv`` at once, so a killed grid resumes where it
stopped. One seed's runs are :mod:`kd2m.harness.seeds`'; with ``--parallel``, seeds train in the
worker processes of :mod:`kd2m.harness.workers`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings

import torch

from .. import distributed as dist_ctx
from .. import tasks
from ..atomic_io import atomic_write_json
from ..catalog import TEACHER
from ..data import build_dataset
from ..errors import ConfigError, NonFiniteLossError
from ..runtime import resolve_device
from ..training.methods import Method, parse_weight
from . import results as R
from .config import RunConfig
from .environment import describe_environment
from .plots import plot_sweep
from .preflight import check_holdout_sizes, check_memory, preflight
from .rundir import DIVERGED_JSON, RunDir, clean_temp_files
from .seeds import train_seed
from .tables import reference_numbers, write_reports
from .workers import parallel_seeds

__all__ = ["SWEEPABLE", "sweep_variants", "run_grid"]


#: keys ``--sweep`` may vary, and the check each value must pass
SWEEPABLE = {"weight": (lambda v: v >= 0, "≥ 0"), "auto_weight": (lambda v: v >= 0, "≥ 0"), "lr": (lambda v: v > 0, "> 0"),
             "kd_temperature": (lambda v: v > 0, "> 0"), "weight_decay": (lambda v: v >= 0, "≥ 0")}


def sweep_variants(cfg: RunConfig, sweep: tuple[str, list] | None) -> list[tuple[RunConfig, Method]]:
    """The students of a grid as (their config, their method).

    A ``weight`` sweep varies λ of the distances only: the baselines and named students run once.
    An ``auto_weight`` sweep (the factor K of ``auto*K``) varies the distances' λ and that of every
    baseline whose λ is ``auto``: the same budget and rule for both (the baselines at a number, and
    named students, run once). What runs once runs at its λ of ``cfg``, as results.md's header says:
    a named student's entry without a ``weight`` takes the configuration's λ, not a swept one.
    Any other key (``lr``, ...) changes every student, so every student — the CE-only one
    included, or its Δ would compare against another lr — runs once per value (keys
    ``method@key=value``). The teacher always trains with the base settings."""
    if sweep is None:
        return [(cfg, m) for m in cfg.methods()]
    key, values = sweep
    check, bound = SWEEPABLE[key]
    out, seen = [], set()
    base = {m.key: m for m in cfg.methods()}
    for v in values:
        if not math.isfinite(v) or not check(v):
            raise ConfigError(f"--sweep {key}: every value must be a finite number {bound}, got {v:g}")
        lam = key in ("weight", "auto_weight")
        extra = {"weights": {k: w for k, w in cfg.weights.items() if k not in cfg.metrics}} if lam else {}
        auto_baselines = set()
        if key == "auto_weight":  # the baselines at `auto` are swept alike
            auto_baselines = {k for k, w in extra["weights"].items() if parse_weight(w)[1] and k in cfg.baselines}
            extra["weights"] = {k: (f"auto*{v:g}" if k in auto_baselines else w) for k, w in extra["weights"].items()}
            vcfg = dataclasses.replace(cfg, weight=f"auto*{v:g}", **extra)
        else:
            vcfg = dataclasses.replace(cfg, **{key: v}, **extra)
        tag = {"weight": f"{v:g}", "auto_weight": f"auto*{v:g}"}.get(key, f"{key}={v:g}")
        for m in vcfg.methods():
            swept = not lam or m.key in cfg.metrics or m.key in auto_baselines
            if swept:
                m = dataclasses.replace(m, key=f"{m.key}@{tag}")
            if m.key not in seen:
                seen.add(m.key)
                out.append((vcfg, m) if swept else (cfg, base[m.key]))
    return out


def run_grid(cfg: RunConfig, sweep: tuple[str, list] | None = None, log=print, holdout_key: str = "holdout") -> list[dict]:
    """Run (or resume) the whole grid; return the results rows of this configuration.

    Everything is checked before anything is written (the config, the memory guard, the data,
    :func:`kd2m.harness.preflight.preflight`); rank 0 then holds the output directory's lock for
    the whole grid, so a second process into the same ``--out`` is refused at once.
    ``holdout_key``: the option that set ``cfg.holdout``, for the message refusing it (the pilot
    grid's is ``select_holdout``)."""
    cfg = cfg.resolved()
    out = RunDir(cfg.out)
    if cfg.threads:  # 0 = torch's default
        torch.set_num_threads(cfg.threads)
    device = dist_ctx.setup(resolve_device(cfg.device))
    students = sweep_variants(cfg, sweep)
    check_memory(cfg, students)
    if dist_ctx.is_main():
        out.check_usable()  # a foreign or newer directory is refused before any data is read
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bundle = build_dataset(cfg.dataset, data_root=cfg.data_root, download=cfg.download, image_size=cfg.image_size,
                               tokenizer=cfg.tokenizer, holdout=cfg.holdout)
    for w in caught:  # e.g. imagefolder's chosen size: one line, not a Python warning
        log(f"kd2m: note: {w.message}")
    check_holdout_sizes(bundle, cfg.holdout, cfg.batch_size, holdout_key)
    shared: dict = {}  # a teacher that no seed trains: the one preflight builds, for every seed
    preflight(cfg, students, bundle, device, shared)
    lock = out.locked() if dist_ctx.is_main() else contextlib.nullcontext()
    with lock:
        if dist_ctx.is_main():
            clean_temp_files(out.root)  # what a killed atomic write left behind
            atomic_write_json(out.config_json, cfg.to_dict())
            atomic_write_json(out.env_json, describe_environment())
        return _run_seeds(cfg, students, bundle, device, out, sweep, log, shared)


def _run_seeds(cfg, students, bundle, device, out: RunDir, sweep, log, shared: dict | None = None) -> list[dict]:
    csv_path = out.results_csv
    rows = R.read_rows(csv_path)
    failures: list[str] = []  # errors of diverged students: the grid finishes the others first
    t_start = time.perf_counter()
    workers = min(cfg.parallel or 1, len(cfg.seeds)) if not dist_ctx.is_distributed() else 1
    if workers > 1:
        if shared is not None:
            shared.clear()  # each worker builds its own: this process need not hold one through the grid
        # Seeds are independent (each run seeds itself), so they train in separate processes, one
        # CPU thread each; this process alone writes results.csv and holds the directory's lock.
        # each worker's first seed calibrates its `weight: auto` students before training any
        jobs = {seed: (cfg, students, seed, str(out.root), str(device), i < workers) for i, seed in enumerate(cfg.seeds)}
        fresh = _collect(parallel_seeds(jobs, workers), rows, csv_path, t_start, log, failures, tasks.get(bundle.task))
    else:
        shared = {} if shared is None else shared  # a teacher that no seed trains, built once for all of them
        results = ((seed, train_seed(cfg, students, bundle, device, out, seed, precheck_auto=seed == cfg.seeds[0],
                                     shared=shared))
                   for seed in cfg.seeds)
        fresh = _collect(results, rows, csv_path, t_start, log, failures, tasks.get(bundle.task))
    own = _settle_rows(csv_path, fresh, {TEACHER} | {m.key for _, m in students}, cfg.seeds) \
        if dist_ctx.is_main() else fresh
    diverged = {}  # method key -> its label and the seeds whose run diverged (each diverged.json says where)
    for _, m in students:
        seeds = [s for s in cfg.seeds if (out.run(m.key, s) / DIVERGED_JSON).exists()]
        if seeds:
            diverged[m.key] = {"label": m.label, "seeds": seeds}
    if dist_ctx.is_main():
        write_reports(out.root, own, cfg.dataset, header=_header(cfg, students, sweep), expected_seeds=len(cfg.seeds),
                      reference=reference_numbers(cfg.dataset, cfg.teacher, cfg.student), diverged=diverged)
        if sweep is not None:
            plot_sweep(own, sweep[0], out.sweep_png)
    if failures:  # every other run has finished and the tables are written: now the one-line error (exit 2)
        more = f" (and {len(failures) - 1} more diverged run(s), flagged in results.md)" if len(failures) > 1 else ""
        raise NonFiniteLossError(failures[0] + more)
    return own


def _collect(results, rows: list[dict], csv_path, t_start: float, log, failures: list, task) -> list[dict]:
    """Write each finished run's row (as each seed completes) and log it; a diverged run's error
    goes to ``failures``. Returns this grid's rows, as its runs' final.json say."""
    fresh = []
    for seed, runs in results:
        for row, label, earlier in runs:
            if isinstance(row, str):  # diverged: no row; the error, raised once the grid has finished
                log(f"[{time.perf_counter() - t_start:7.1f}s] seed {seed} {label:<24} diverged")
                failures.append(row)
                continue
            fresh.append(_csv_view(row))
            if dist_ctx.is_main() and not any(r == {**r, **_csv_view(row)} for r in rows):
                rows = R.upsert(csv_path, row)  # new, or its row changed (a run redone after its directory was deleted)
            log(f"[{time.perf_counter() - t_start:7.1f}s] seed {seed} {label:<24} "
                f"{task.describe(row)}" + ("  (finished earlier)" if earlier else ""))
    return fresh


def _settle_rows(csv_path, fresh: list[dict], keys: set, seeds: list) -> list[dict]:
    """results.csv with this grid's rows exactly as its run directories say (their final.json are
    the truth): a hand-edited or duplicate row of one of its runs, or the row of a run that has
    since diverged, is dropped; rows of other methods or seeds are kept. Returns ``fresh``."""
    mine = {R.row_key(r) for r in fresh}
    kept = [r for r in R.read_rows(csv_path)
            if R.row_key(r) not in mine and not (r["method"] in keys and r["seed"] in seeds)]
    if R.read_rows(csv_path) != kept + fresh:
        R.write_rows(csv_path, kept + fresh)
    return fresh


def _csv_view(row: dict) -> dict:
    """``row`` as results.csv reads it back (its columns, numbers as numbers)."""
    return R.typed_row({k: row.get(k) for k in R.FIELDS + R.LM_FIELDS})


def _header(cfg: RunConfig, students: list | None = None, sweep=None) -> str:
    """results.md's first lines: the recipe, and every student's λ as it trained (``students``, of
    :func:`sweep_variants`; a swept key other than λ is named with its values)."""
    sched = (f"cosine → {cfg.lr_min:g}" if cfg.lr_schedule == "cosine" else
             f"×{cfg.lr_gamma:g} at epochs {', '.join(map(str, cfg.lr_milestones))}")
    swept = (f", students' {sweep[0]} swept: {', '.join(f'{v:g}' for v in sweep[1])}"
             if sweep is not None and sweep[0] not in ("weight", "auto_weight") else "")
    methods = [m for _, m in students] if students is not None else cfg.methods()
    return (f"# kd2m results: {cfg.dataset}\n\nteacher `{cfg.teacher}` → student `{cfg.student}`, "
            f"{cfg.epochs} epochs (teacher {cfg.teacher_epochs}), batch {cfg.batch_size}, lr {cfg.lr:g} {sched}"
            f"{swept}, λ: {_weights_text(methods)}, seeds {cfg.seeds}."
            + (f" **Scored on a holdout of {cfg.holdout:g} of the training split** (trained on the rest, the "
               "teacher too), not on the test split." if cfg.holdout else ""))


def _weights_text(methods: list) -> str:
    """Every student's λ, as it trained (one λ when they share it), and its CE weight where not 1."""
    parts = []
    for m in methods:
        if m.terms:
            parts.append(f"{m.key} " + " + ".join(("auto×" if t.auto else "") + f"{t.weight:g}" for t in m.terms)
                         + (f" (CE×{m.ce_weight:g})" if m.ce_weight != 1.0 else ""))
    lams = {p.split(" ", 1)[1] for p in parts}
    if len(lams) == 1:
        return lams.pop()
    return ", ".join(parts)
