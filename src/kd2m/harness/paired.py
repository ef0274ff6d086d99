"""Paired statistics over seeds: every student of a seed shares initial weights, data order and
schedule with the CE-only student of that seed, so a difference between two methods is counted
seed by seed.

:func:`summarize` gives per method the figure's mean ± sample std over seeds and Δ vs the CE-only
student as a *paired* quantity (:func:`paired_delta`): mean Δ, its 95% Student-t interval over
seeds (n−1 degrees of freedom), the two-sided paired t-test p-value and the number of seeds where
the method beat CE. :func:`best_separated` is the one rule for the best student printed in bold;
:func:`settings_difference` says whether two runs may be compared at all; :func:`seeds_for_power`
how many seeds a difference of a given size needs.
"""
from __future__ import annotations

import math
import statistics

from ..catalog import CE, TEACHER, TEACHER_SETTINGS
from .results import Figure, figure_of, label, per_seed_figures, table_order

__all__ = ["summarize", "paired_delta", "verdict", "fmt_delta", "best_separated", "OWN_SETTINGS",
           "settings_difference", "seeds_for_power"]


def summarize(rows: list[dict]) -> list[dict]:
    """Per method (table order): the figure's mean and sample std over seeds (:func:`kd2m.harness.results.figure_of`:
    accuracy in %, or perplexity), and the paired Δ vs the CE-only student of the same seeds (see
    :func:`paired_delta`)."""
    fig = figure_of(rows)
    groups = per_seed_figures(rows, fig)
    labels: dict[str, str] = {}
    for r in rows:
        if r.get("label"):
            labels.setdefault(r["method"], r["label"])
    out = []
    for method in table_order(list(groups)):
        per_seed = groups[method]
        accs = list(per_seed.values())
        std = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        row = {"method": method, "label": labels.get(method) or label(method), "mean": statistics.fmean(accs), "std": std,
               "n": len(accs), "accs": accs}
        partner = _ce_partner(method, groups)
        if partner is not None:
            row.update(paired_delta(per_seed, groups[partner], fig.higher_is_better))
        out.append(row)
    return out


def _ce_partner(method: str, groups: dict) -> str | None:
    """The CE-only run a method is paired with: ``ce`` (or ``ce@key=v`` for a student of an ``lr``
    sweep value, which trained with that lr)."""
    if method == TEACHER or method.partition("@")[0] == CE:
        return None
    variant = method.partition("@")[2]
    if "=" in variant and f"ce@{variant}" in groups:
        return f"ce@{variant}"
    return CE if CE in groups else None


def paired_delta(method_accs: dict, ce_accs: dict, higher_is_better: bool = True) -> dict:
    """Δ = method − CE (accuracy points, or perplexity) over the seeds both have.

    Returns ``delta`` (mean Δ), ``delta_ci_low/high`` (95% paired Student-t interval, n−1 degrees
    of freedom: mean ± t₀.₉₇₅,ₙ₋₁ · sd/√n), ``p_value`` (two-sided paired t-test), ``wins`` (seeds
    where the method is better: Δ > 0, or Δ < 0 where lower is better) and ``n_pairs``. With one
    pair the interval and p are NaN; with n ≥ 2 identical differences the interval is that point
    and p is 0 (or 1 when Δ = 0).
    """
    from scipy import stats
    seeds = sorted(set(method_accs) & set(ce_accs))
    d = [method_accs[s] - ce_accs[s] for s in seeds]
    n = len(d)
    out = {"n_pairs": n, "wins": sum((x > 0) if higher_is_better else (x < 0) for x in d),
           "higher_is_better": higher_is_better}
    if n == 0:
        return {**out, "delta": float("nan"), "delta_ci_low": float("nan"), "delta_ci_high": float("nan"),
                "p_value": float("nan")}
    mean = statistics.fmean(d)
    if n == 1:
        return {**out, "delta": mean, "delta_ci_low": float("nan"), "delta_ci_high": float("nan"),
                "p_value": float("nan")}
    sd = statistics.stdev(d)
    if sd == 0.0:
        return {**out, "delta": mean, "delta_ci_low": mean, "delta_ci_high": mean,
                "p_value": 1.0 if mean == 0 else 0.0}
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(0.975, n - 1)) * se
    p = float(2 * stats.t.sf(abs(mean / se), n - 1))
    return {**out, "delta": mean, "delta_ci_low": mean - half, "delta_ci_high": mean + half, "p_value": p}


def verdict(s: dict) -> str:
    """"better" / "worse" than CE only when the paired interval excludes 0, else "—" (a negative
    Δ is better where lower is better: perplexity)."""
    lo, hi = s.get("delta_ci_low", float("nan")), s.get("delta_ci_high", float("nan"))
    higher = s.get("higher_is_better", True)
    if lo > 0:
        return "better" if higher else "worse"
    if hi < 0:
        return "worse" if higher else "better"
    return "—"


def fmt_delta(s: dict) -> str:
    if "delta" not in s or math.isnan(s["delta"]):
        return ""
    if math.isnan(s["delta_ci_low"]):
        return f"{s['delta']:+.2f}"
    return f"{s['delta']:+.2f} [{s['delta_ci_low']:+.2f}, {s['delta_ci_high']:+.2f}]"


def best_separated(rows: list[dict], stats: list[dict] | None = None,
                   fig: Figure | None = None) -> tuple[str | None, str]:
    """The student to print in bold, and a note when there is none: the one bolding rule of every
    output (results.md, ``kd2m run``'s table, ``kd2m table``, the report's plots).

    The best mean in the task's direction (the highest accuracy, the lowest perplexity) is bold only
    when a paired interval over the seeds both have separates it from the runner-up's (a best that
    one more seed, or another CPU, could swap is not a best). ``stats``/``fig``: :func:`summarize`
    and :func:`kd2m.harness.results.figure_of` of ``rows``, when the caller has them."""
    fig = fig or figure_of(rows)
    stats = summarize(rows) if stats is None else stats
    students = sorted((s for s in stats if s["method"] != TEACHER), key=lambda s: s["mean"],
                      reverse=fig.higher_is_better)
    if len(students) < 2:
        return (students[0]["method"] if students else None), ""
    first, second = students[0], students[1]
    per_seed = per_seed_figures([r for r in rows if r["method"] in (first["method"], second["method"])], fig)
    d = paired_delta(per_seed[first["method"]], per_seed[second["method"]], fig.higher_is_better)
    if verdict(d) == "better":
        return first["method"], ""
    return None, (f"No student is in bold: the best mean, {first['label']}, is not separated from the runner-up, "
                  f"{second['label']}, by a paired interval ({fmt_delta(d)}, {d['n_pairs']} seeds).")


#: Settings that are a method's own (a paired comparison is of exactly these), and those that only
#: a student distilled from the teacher has (absent from the CE-only student's settings).
#: (``auto_every``: how the λ of a method's `auto` terms is set, stored only with such terms)
OWN_SETTINGS = frozenset({"terms", "ce_weight", "seed", "auto_every"})


def settings_difference(a: dict, b: dict, own: frozenset = OWN_SETTINGS) -> list[str]:
    """The settings two runs differ in, other than ``own`` (by default their methods' own: terms, CE
    weight, seed) and the teacher's settings where only one of them has a teacher:
    ``["epochs 3 vs 1", "terms[0].options.beta 8 vs 2", ...]`` — a nested setting named down to the
    entry that differs."""
    out = []
    for k in sorted(set(a) | set(b)):
        if k in own or (k in TEACHER_SETTINGS and (k not in a or k not in b)):
            continue
        out += _value_difference(k, a.get(k), b.get(k))
    return out


def _value_difference(name: str, x, y) -> list[str]:
    """``name``'s differences between ``x`` and ``y``, descending into mappings and equal-length lists."""
    if isinstance(x, dict) and isinstance(y, dict):
        return [d for k in sorted(set(x) | set(y), key=str)
                for d in _value_difference(f"{name}.{k}", x.get(k), y.get(k))]
    if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        return [d for i, (u, v) in enumerate(zip(x, y)) for d in _value_difference(f"{name}[{i}]", u, v)]
    return [] if x == y else [f"{name} {x!r:.40} vs {y!r:.40}"]


def seeds_for_power(deltas: list[float], power: float = 0.8, limit: int = 10_000) -> int | None:
    """The smallest number of seeds n at which a two-sided paired t-test at 5% detects a mean
    difference of the observed size with probability ``power``, the differences' spread being the
    observed one: the least n with ``|mean|`` ≥ (t₀.₉₇₅,ₙ₋₁ + t_power,ₙ₋₁)·sd/√n (the usual
    normal-theory approximation). None when there is no spread to judge from (fewer than 2
    differences) or no difference at all; ``limit`` when even that many would not do."""
    from scipy import stats
    if len(deltas) < 2:
        return None
    mean, sd = statistics.fmean(deltas), statistics.stdev(deltas)
    if mean == 0:
        return None
    if sd == 0:
        return 2
    for n in range(2, limit):
        if abs(mean) >= (stats.t.ppf(0.975, n - 1) + stats.t.ppf(power, n - 1)) * sd / math.sqrt(n):
            return n
    return limit
