"""λ chosen without the test set: what ``weight: auto`` means in a grid (``kd2m run``/``kd2m bench``).

No rule computed at initialisation served every metric on both offline benchmarks (README, "λ
without hand-tuning"): the right pull differs by metric, benchmark and training length. This is
what a careful researcher does by hand instead, done by the tool, on data that decides nothing
reported. A term left at a bare ``auto`` gets its K of ``auto*K`` chosen among :data:`DEFAULT_K`;
``select_k: [...]`` (``--select-k``) names other candidates and chooses for every distance and
every baseline at ``auto``; ``auto*K`` written out, a ``--sweep``, or ``select_k: none`` choose
nothing (``auto`` is then ``auto*1``: the calibration of :mod:`kd2m.training.auto_weight` alone):

1. **pilot grid**: every `auto` term's students at ``auto*K`` for each candidate K, on the
   selection seeds (default 100–102, never reported), trained on the training split minus a
   fixed holdout (``select_holdout``, default 0.2) and scored on that holdout. The test split is not
   read; the teacher trains on the same reduced split (it must not have seen the holdout either);
2. **choice**: per term, the K with the best mean holdout score over the selection seeds
   (accuracy, or perplexity for text); a K that diverged on any seed is no candidate; ties go to
   the smaller K. K = 0 is the term switched off: its pilot is the CE-only student (``auto*0``
   trains bit-identical to it unless the term builds a projector, whose initialisation moves the
   random stream: then it differs by that only), so a term that helps at no K is not forced on
   the student; a term chosen at K = 0 then trains as that student (CE at weight 1, whatever the
   term's own CE weight). Named students are never chosen for (``auto`` is ``auto*1`` there).
   Written to ``select-k/selected.json`` with every K's mean (a later grid of some of the terms, on the
   same holdout, seeds and candidates, keeps the others' choice there);
3. **reported grid**: the configuration as given, each of those terms at its ``auto*K``, on the
   reported seeds (which must not overlap the selection seeds).

The pilot grid lives in ``OUT/select-k/`` and resumes like any grid; its cost is one training
run per candidate K, term and selection seed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path

from .. import distributed as dist_ctx
from ..atomic_io import atomic_write_json, read_json
from ..catalog import CE
from ..errors import ConfigError, NonFiniteLossError
from ..training.methods import parse_weight
from .config import RunConfig
from .recipes import SELECT_SEEDS
from .results import figure_of, read_reported
from .rundir import SELECT_DIR, RunDir  # where the pilot grid lives, inside the output directory

__all__ = ["SELECTED_JSON", "DEFAULT_K", "is_bare_auto", "auto_terms", "plan", "check_selection", "check_reused",
           "choose", "select_k", "with_chosen"]

SELECTED_JSON = "selected.json"
#: the candidate K of a bare ``weight: auto`` (0: the term off). Capped at 10, the top of the
#: README's MNIST-1D sweep: with 30 among them the digits' pilot picked K = 30 for CW2, a cliff
#: where 3 of 10 reported seeds collapsed (README "How the rule was arrived at").
DEFAULT_K = (0.0, 0.3, 1.0, 3.0, 10.0)


def is_bare_auto(weight) -> bool:
    """``weight`` written as ``auto`` (no factor): λ left to kd2m, as opposed to ``auto*K``."""
    return isinstance(weight, str) and weight.strip().lower() == "auto"


def auto_terms(cfg: RunConfig, bare_only: bool = False) -> list[str]:
    """The single-term students whose λ the selection chooses: the distances and every baseline
    whose λ is ``auto`` (the terms an ``auto_weight`` sweep varies); ``bare_only``: of those, the
    terms whose λ is written as a bare ``auto``."""
    names = list(cfg.metrics)
    weights = cfg.weights or {}
    names += [b for b in cfg.baselines if b in weights and parse_weight(weights[b])[1]]
    if bare_only:
        names = [n for n in names if is_bare_auto(cfg.weight_for(n))]
    return names


def plan(cfg: RunConfig, sweep=None) -> tuple[list[str], list[float]] | None:
    """(the terms whose K the grid chooses before it trains, the candidate K), or None for none.

    ``select_k`` not given (None): the terms at a bare ``auto``, among :data:`DEFAULT_K`, unless
    ``sweep`` is given (it sets K, or changes the recipe the choice would be made for: ``auto`` is
    then ``auto*1``). ``select_k`` given: every term :func:`auto_terms` names, among its K (with a
    sweep: ConfigError). ``select_k: none`` (``[]``): nothing."""
    if cfg.select_k is None:
        names = auto_terms(cfg, bare_only=True)
        return (names, list(DEFAULT_K)) if names and sweep is None else None
    if not cfg.select_k:
        return None
    if sweep is not None:
        raise ConfigError("--select-k chooses K itself: give it or --sweep, not both")
    return auto_terms(cfg), list(cfg.select_k)


def check_selection(cfg: RunConfig, names: list[str], values: list[float], seeds: list[int]) -> None:
    """ConfigError, before anything trains, for a selection (of :func:`plan`) that cannot be made
    or would report what it chose on."""
    if not values or any(not math.isfinite(v) or v < 0 for v in values) or len(set(values)) != len(values):
        raise ConfigError(f"select_k: distinct finite numbers ≥ 0, e.g. 0,0.3,1,3,10; got {values}")
    if len(values) < 2:
        raise ConfigError("select_k: give at least two K to choose from (one K is `weight: auto*K`)")
    overlap = sorted(set(seeds) & set(cfg.seeds))
    if overlap:
        raise ConfigError(f"select_k: seeds {overlap} would both choose λ and be reported (a grid chooses K of "
                          f"`weight: auto` on select_seeds); give other select_seeds (default "
                          f"{','.join(map(str, SELECT_SEEDS))}) or other seeds, or --select-k none (auto is then "
                          "auto*1, not chosen)")
    if not names:
        raise ConfigError("select_k: no term to choose λ for (no metrics and no baseline at weight auto)")
    if cfg.holdout:  # both holdouts are prefixes of one fixed permutation: the smaller lies inside the larger
        raise ConfigError(f"select_k: holdout {cfg.holdout:g} would report on held-out training images the pilot "
                          f"grid chooses K on (its select_holdout {cfg.select_holdout:g} is taken from the same fixed "
                          "split); give --select-k none (auto is then auto*1, not chosen), or no --holdout")


def check_reused(cfg: RunConfig, candidates: dict[str, list[float]], chosen: bool = False) -> None:
    """ConfigError when a finished run of the reported grid (``cfg``, resolved) holds a term of
    ``candidates`` (name → the K it may train at) at a λ no such K gives: the grid would refuse it
    (other settings) only once its turn came. Called before the pilot grid trains (the candidates:
    a run no candidate can reuse is refused before anything trains) and after it has chosen
    (``chosen``: each term's K), before the reported grid trains; the message names the field."""
    from ..atomic_io import read_json
    from .rundir import FINAL_JSON
    out = RunDir(cfg.out)
    for name, values in candidates.items():
        wanted = {}
        for k in values:
            m = next(m for m in with_chosen(cfg, {name: {"k": k}}).methods() if m.key == name)
            wanted[k] = ([t.describe() for t in m.terms], m.ce_weight)
        for seed in cfg.seeds:
            path = out.run(name, seed) / FINAL_JSON
            if not path.exists():
                continue
            settings = (read_json(path, "delete that run directory to redo it") or {}).get("settings") or {}
            terms, ce_weight = settings.get("terms") or [{}], settings.get("ce_weight", 1.0)
            if any((terms, ce_weight) == want for want in wanted.values()):
                continue
            had, (like, like_ce) = terms[0], wanted[values[0]]  # the fields that differ from the first candidate's
            w = had.get("weight")
            lam = ("auto×" if had.get("auto") else "λ ") + (f"{w:g}" if isinstance(w, (int, float)) else str(w))
            field = ", ".join([f"terms[0].{key} {had.get(key)!r}" for key in sorted(set(had) | set(like[0]))
                               if had.get(key) != like[0].get(key)] +
                              ([f"ce_weight {ce_weight:g}"] if ce_weight != like_ce else [])) or "its terms"
            now = (f"the pilot grid chose auto×{values[0]:g} for {name}" if chosen else
                   f"no candidate K ({', '.join(f'{v:g}' for v in values)}) gives it")
            raise ConfigError(f"select_k: {path.parent} was trained at {lam} (its final.json: {field}), and {now}; "
                              "use another --out, or delete that run directory to redo it")


def choose(rows: list[dict], names: list[str], values: list[float], seeds: list[int]) -> dict:
    """Per term name: ``{"k": chosen K, "means": {K: mean holdout score or None}}`` from the pilot
    grid's results rows (a K with a seed missing — diverged — has mean None and is no candidate;
    K = 0 is read from the CE-only student's rows). None as the whole entry when every K diverged."""
    figure = figure_of(rows)
    by_key = {(r["method"], int(r["seed"])): r for r in rows}
    chosen = {}
    for name in names:
        means = {}
        for k in sorted(values):
            pilot = CE if k == 0 else f"{name}@auto*{k:g}"  # K = 0: the term off, i.e. the CE-only student
            got = [by_key.get((pilot, s)) for s in seeds]
            means[k] = (sum(float(r[figure.key]) for r in got) / len(got)) if all(got) else None
        ok = {k: v for k, v in means.items() if v is not None and math.isfinite(v)}
        if not ok:
            chosen[name] = None
            continue
        pick = (max if figure.higher_is_better else min)(ok, key=lambda k: (ok[k], -k) if figure.higher_is_better
                                                         else (ok[k], k))
        chosen[name] = {"k": pick, "means": {f"{k:g}": v for k, v in means.items()}}
    return chosen


def select_k(cfg: RunConfig, names: list[str], values: list[float], seeds: list[int], log=print) -> dict:
    """Run (or resume) the pilot grid of ``cfg`` (resolved; scored on its ``select_holdout``) for
    the terms ``names`` (of :func:`plan`) and return :func:`choose`'s choice, also written to
    ``OUT/select-k/selected.json``."""
    from ..runtime import resolve_device
    from .grid import run_grid
    # the process group first (under torchrun): only rank 0 may hold the output directory, and
    # before it exists every rank is rank 0 (each would find the lock held by the other)
    dist_ctx.setup(resolve_device(cfg.device))
    pilot_out = Path(cfg.out) / SELECT_DIR
    # the students whose λ is chosen, and the CE-only one (K = 0, and the reference of the pilot's
    # table); terms at a fixed λ and named students (their λ written out) have nothing to choose
    pilot = dataclasses.replace(cfg, seeds=list(seeds), out=str(pilot_out), holdout=cfg.select_holdout, select_k=[],
                                metrics=[m for m in cfg.metrics if m in names],
                                baselines=[CE] + [b for b in cfg.baselines if b in names], students=None, distill=None)
    log(f"kd2m: choosing K of auto*K per term on a holdout of {pilot.holdout:g} of the training split, "
        f"seeds {list(seeds)}, K in {', '.join(f'{v:g}' for v in values)}: {pilot_out}")
    # the output directory is held (checked, marked, locked) while its pilot grid trains inside it
    lock = RunDir(cfg.out).locked() if dist_ctx.is_main() else contextlib.nullcontext()
    with lock:
        try:
            run_grid(pilot, sweep=("auto_weight", [v for v in values if v > 0]), log=log, holdout_key="select_holdout")
        except NonFiniteLossError as e:  # a K that diverges is a result of the pilot, not the end of it
            log(f"kd2m: note: in the pilot grid {e}")
    dist_ctx.barrier()  # every rank reads the tables rank 0 has written
    rows = read_reported(pilot_out)[0]
    chosen = choose(rows, names, values, list(seeds))
    if dist_ctx.is_main():
        _record_choice(pilot_out / SELECTED_JSON, {"holdout": pilot.holdout, "seeds": list(seeds),
                                                   "candidates": [float(v) for v in values], "chosen": chosen})
    lost = [n for n, c in chosen.items() if c is None]
    if lost:
        raise NonFiniteLossError(f"select_k: every K diverged in the pilot grid for {', '.join(lost)} "
                                 f"({pilot_out}); give smaller K")
    for n, c in chosen.items():
        cells = ", ".join(f"K={k}: " + ("diverged" if v is None else f"{v:.4g}") for k, v in c["means"].items())
        edge = (" (the largest candidate: larger K were not tried)" if c["k"] == max(values) else
                " (the smallest candidate above 0: smaller K were not tried)" if 0 < c["k"] == min(values) else "")
        log(f"kd2m: {n}: {cells} → auto*{c['k']:g}{edge}")
    return chosen


def _record_choice(path: Path, record: dict) -> None:
    """Write ``record`` to ``selected.json``, keeping the choices already there for other terms when
    they were made on the same holdout, seeds and candidates: a grid run again into the directory
    for a subset of its terms (more seeds of a few students) would otherwise erase the record of
    the rest, whose pilot runs are still there and whose choice still holds."""
    earlier = read_json(path) if path.exists() else None
    if isinstance(earlier, dict) and all(earlier.get(key) == record[key] for key in ("holdout", "seeds", "candidates")):
        record = {**record, "chosen": {**earlier.get("chosen", {}), **record["chosen"]}}
    atomic_write_json(path, record)


def with_chosen(cfg: RunConfig, chosen: dict) -> RunConfig:
    """``cfg`` (resolved) with each chosen term's single-term student at ``auto*K``.

    Named students are never chosen for: an entry of theirs that gives no ``weight`` keeps the λ it
    had before the choice (``auto``: ``auto*1``), written into the entry, since ``weights`` now
    holds the chosen K. A term chosen at K = 0 (the term off) is reported as the student its pilot
    was scored by, the CE-only one: CE at weight 1, not the term's own CE weight (KD's 0.1 would
    train 0.1·CE, a student no pilot scored)."""
    weights = dict(cfg.weights or {})
    students = {name: [_pinned(e, cfg, chosen) for e in entries] for name, entries in (cfg.students or {}).items()}
    weights.update({n: f"auto*{c['k']:g}" for n, c in chosen.items()})
    ce_weights = dict(cfg.ce_weights or {})
    ce_of = {m.key: m.ce_weight for m in cfg.methods()}
    ce_weights.update({n: 1.0 for n, c in chosen.items() if c["k"] == 0 and ce_of.get(n, 1.0) != 1.0})
    # the resolved ``students`` hold the ``distill:`` student already (resolving again would add it twice)
    return dataclasses.replace(cfg, weights=weights, ce_weights=ce_weights, students=students or None, distill=None)


def _pinned(entry, cfg: RunConfig, chosen: dict):
    """A named student's term entry with its λ written out where it would follow a chosen term's."""
    name = entry if isinstance(entry, str) else entry.get("term", entry.get("metric"))
    if name not in chosen or (isinstance(entry, dict) and "weight" in entry):
        return entry
    return {**({"term": entry} if isinstance(entry, str) else entry), "weight": cfg.weight_for(name)}
