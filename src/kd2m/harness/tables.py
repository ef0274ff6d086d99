"""The Markdown tables of a grid's results, and the files written from them.

:func:`markdown_table` is results.md's table (methods × the figure's mean ± std, seeds, the paired
Δ vs CE with its 95% interval, p, wins, verdict); :func:`compare_table` is ``kd2m compare``'s,
:func:`paper_table` ``kd2m table``'s, :func:`headline_table` the README's. :func:`write_reports`
writes results.md, results.json and ``summary.csv`` (one row per method: accuracy mean ± sample
std, and the paired Δ vs the CE-only student: :mod:`kd2m.harness.paired`) beside results.csv.
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

from ..atomic_io import atomic_write_json, atomic_write_text
from ..catalog import CE, TEACHER
from .paired import best_separated, fmt_delta, paired_delta, seeds_for_power, settings_difference, summarize, verdict
from .published import CIFAR100, KD2M_PAPER
from .results import ACCURACY, FIELDS, LM_FIELDS, PERPLEXITY, Figure, figure_of, label, per_seed_figures, table_order, typed_row
from .rundir import RESULTS_JSON, RESULTS_MD, SUMMARY_CSV

__all__ = ["fmt", "reference_numbers", "markdown_table", "compare_table", "power_line", "SUMMARY_FIELDS", "summary_rows",
           "NOTE", "PPL_NOTE", "note", "write_reports", "paper_table", "headline_table"]


def fmt(mean: float, std: float) -> str:
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def reference_numbers(dataset: str, teacher: str | None = None, student: str | None = None) -> dict:
    """Published accuracies (%) to print beside ours: ``{"title": ..., "numbers": {method: acc}}``.

    The KD²M paper's one-seed table for its datasets (svhn, cifar10, cifar100 with its ResNets);
    for a CIFAR-100 pair of the RepDistiller zoo, the field's published numbers of that pair
    (:mod:`kd2m.harness.published`: teacher, student, KD, DKD, CRD, DIST where found)."""
    if dataset == "cifar100" and (teacher, student) in CIFAR100:
        pub = CIFAR100[(teacher, student)]
        return {"title": "published", "numbers": {(CE if m == "student" else m): v.accuracy for m, v in pub.items()}}
    if dataset in KD2M_PAPER:
        return {"title": "paper (1 seed)", "numbers": KD2M_PAPER[dataset]}
    return {}


def markdown_table(rows: list[dict], dataset: str | None = None, expected_seeds: int | None = None,
                   reference: dict | None = None, diverged: dict | None = None) -> str:
    """Methods × (accuracy mean ± std, seeds, paired Δ vs CE with its 95% interval, p, wins,
    verdict[, published]); the best student (highest mean; never the teacher) in bold. With
    ``expected_seeds``, methods with fewer finished seeds are flagged and listed below the table.
    ``reference``: published numbers for a last column (:func:`reference_numbers`; default: the
    KD²M paper's for ``dataset``). ``diverged``: {method key: {"label", "seeds"}} of runs whose loss went non-finite;
    flagged apart from unfinished ones, and a method that diverged on every seed gets a row saying so."""
    diverged = diverged or {}
    stats = summarize(rows)
    fig = figure_of(rows)
    best, bold_note = best_separated(rows, stats, fig)
    if reference is None:
        reference = reference_numbers(dataset or "")
    paper = reference.get("numbers") or {}
    head = f"| method | {fig.name} | seeds | Δ vs CE [95% CI] | p | wins | vs CE |" + \
        (f" {reference.get('title')} |" if paper else "")
    sep = "|---|---|---|---|---|---|---|" + ("---|" if paper else "")
    lines = [head, sep]
    short = []
    for s in stats:
        cell = fmt(s["mean"], s["std"])
        if s["method"] == best:
            cell = f"**{cell}**"
        n = f"{s['n']}"
        lost = len(diverged.get(s["method"], {}).get("seeds", ()))
        if expected_seeds and s["n"] < expected_seeds:
            n += " (!)"
            if s["n"] + lost < expected_seeds:
                short.append(f"{s['label']} ({s['n']}/{expected_seeds})")
        if "delta" in s:
            p = "" if math.isnan(s["p_value"]) else f"{s['p_value']:.3f}"
            extra = f" {fmt_delta(s)} | {p} | {s['wins']}/{s['n_pairs']} | {verdict(s)} |"
        else:
            extra = " | | | |"
        line = f"| {s['label']} | {cell} | {n} |{extra}"
        if paper:
            pv = paper.get(s["method"].partition("@")[0])
            line += f" {pv:.2f} |" if pv is not None else " — |"
        lines.append(line)
    shown = {s["method"] for s in stats}
    for key, d in diverged.items():
        if key not in shown:  # diverged on every seed it ran: no accuracy at all
            lines.append(f"| {d['label']} | diverged | 0 (!) | | | | |" + (" — |" if paper else ""))
    text = "\n".join(lines) + "\n"
    if bold_note:
        text += f"\n{bold_note}\n"
    if short:
        text += f"\n(!) unfinished: {', '.join(short)} seeds; their means are over fewer seeds than the others.\n"
    if diverged:
        which = "; ".join(f"{d['label']} on seed{'s' if len(d['seeds']) > 1 else ''} {', '.join(map(str, d['seeds']))}"
                          for d in diverged.values())
        text += (f"\n(!) diverged (non-finite loss; each run's diverged.json says where): {which}. Those runs are "
                 "left out: the means and paired Δ of these methods are over their other seeds only.\n")
    return text


def compare_table(rows: list[dict], pairs: list[tuple[str, str]], settings: dict | None = None) -> str:
    """Paired Δ = A − B (accuracy points) for each (A, B) of ``pairs``, over the seeds both have:
    mean [95% t-interval], p, wins of A; "A better"/"B better" only when the interval excludes 0.
    E.g. every distance trained with ``weight: auto`` against the same distance with its swept λ.

    ``settings``: {(method, seed): the run's settings}; a pair whose runs of one seed differ in
    anything but their methods (:func:`kd2m.harness.paired.settings_difference`: e.g. 3 epochs against 1 in one
    ``--out``) is refused, naming the difference. A pair without a common seed is refused too."""
    fig = figure_of(rows)
    groups = per_seed_figures(rows, fig)
    what = "(%)" if fig == ACCURACY else f"({fig.name})"
    lines = [f"| A | B | seeds | A {what} | B {what} | Δ A − B [95% CI] | p | A wins | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    needed = []
    for a, b in pairs:
        if a not in groups or b not in groups:
            raise ValueError(f"compare: no rows for {a if a not in groups else b!r}; methods: {', '.join(groups)}")
        seeds = sorted(set(groups[a]) & set(groups[b]))
        if not seeds:
            raise ValueError(f"compare {a}:{b}: no seed has both (seeds of {a}: {sorted(groups[a])}; of {b}: "
                             f"{sorted(groups[b])}); train the missing seeds first")
        for seed in seeds if settings is not None else ():
            diff = settings_difference(settings.get((a, seed)) or {}, settings.get((b, seed)) or {})
            if diff:
                raise ValueError(f"compare {a}:{b}: seed {seed}'s runs were trained with other settings "
                                 f"({'; '.join(diff[:3])}); a paired Δ needs runs that differ only in their "
                                 "method: retrain one of them with the other's settings")
        d = paired_delta(groups[a], groups[b], fig.higher_is_better)
        mean_a = statistics.fmean(groups[a][s] for s in seeds)
        mean_b = statistics.fmean(groups[b][s] for s in seeds)
        v = verdict(d)
        v = "A better" if v == "better" else "B better" if v == "worse" else "—"
        p = "" if math.isnan(d["p_value"]) else f"{d['p_value']:.3f}"
        lines.append(f"| {label(a)} | {label(b)} | {d['n_pairs']} | {mean_a:.2f} | {mean_b:.2f} | {fmt_delta(d)} | {p} | "
                     f"{d['wins']}/{d['n_pairs']} | {v} |")
        needed.append(power_line(label(a), label(b), [groups[a][s] - groups[b][s] for s in seeds], fig))
    return "\n".join(lines) + "\n\n" + "\n".join(needed) + "\n"


def power_line(a: str, b: str, deltas: list[float], fig: Figure) -> str:
    """One sentence: how many seeds a paired comparison of this size and spread needs."""
    n = seeds_for_power(deltas)
    if n is None:
        return f"{a} − {b}: no difference to size a paired test for."
    size = f"|Δ| = {abs(statistics.fmean(deltas)):.2f} {fig.unit}, sd {statistics.stdev(deltas):.2f}"
    more = f"about {n} seeds" if n < 10_000 else "more than 10000 seeds"
    return (f"{a} − {b}: a difference of this size ({size}) needs {more} for an 80% chance that a paired "
            f"95% interval excludes 0 (this comparison has {len(deltas)}).")


SUMMARY_FIELDS = ["method", "label", "n_seeds", "mean", "std", "delta", "delta_ci_low", "delta_ci_high", "p_value",
                  "wins"]


def summary_rows(rows: list[dict]) -> list[dict]:
    """``summary.csv``'s rows: one per method (Δ columns empty for the teacher and CE)."""
    out = []
    for s in summarize(rows):
        r = {"method": s["method"], "label": s["label"], "n_seeds": s["n"], "mean": s["mean"], "std": s["std"]}
        for k in ("delta", "delta_ci_low", "delta_ci_high", "p_value", "wins"):
            r[k] = s.get(k, "")
        out.append(r)
    return out


NOTE = ("Accuracy: last epoch, full test set, mean ± sample std over seeds. Δ vs CE: paired over seeds "
        "(each student shares initial weights, data order and schedule with the CE-only student of its seed), "
        "mean [95% Student-t interval]; p: two-sided paired t-test; wins: seeds where the method beat CE; "
        "vs CE says better/worse only when the interval excludes 0.")


PPL_NOTE = ("Perplexity: exp of the mean next-token cross-entropy over every held-out token, last epoch, mean ± "
            "sample std over seeds; lower is better. Δ vs CE: paired over seeds (each student shares initial "
            "weights, data order and schedule with the CE-only student of its seed), mean [95% Student-t "
            "interval]; p: two-sided paired t-test; wins: seeds where the method's perplexity was below CE's; "
            "vs CE says better/worse only when the interval excludes 0.")


def note(rows: list[dict]) -> str:
    """The explanation printed under a table of ``rows``."""
    return PPL_NOTE if figure_of(rows) == PERPLEXITY else NOTE


def write_reports(out_dir: str | Path, rows: list[dict], dataset: str, header: str = "",
                  expected_seeds: int | None = None, reference: dict | None = None,
                  diverged: dict | None = None) -> str:
    """results.md, results.json and summary.csv beside results.csv; returns the Markdown table.

    results.json holds exactly the rows results.md was computed from (``kd2m report`` and
    ``kd2m table`` read them from there, so every view shows the same numbers)."""
    out_dir = Path(out_dir)
    rows = [typed_row(r) for r in rows]  # numbers in JSON, whoever built the rows
    table = markdown_table(rows, dataset, expected_seeds, reference, diverged)
    atomic_write_text(out_dir / RESULTS_MD, (header + "\n\n" if header else "") + table + "\n" + note(rows) + "\n")
    clean = [{k: r.get(k) for k in FIELDS + [f for f in LM_FIELDS if f in r]} for r in rows]
    atomic_write_json(out_dir / RESULTS_JSON, {"dataset": dataset, "header": header, "expected_seeds": expected_seeds,
                                                 "reference": reference, "rows": clean, "summary": _json_safe(summarize(rows)),
                                                 "diverged": diverged or {}})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS)
    w.writeheader()
    for r in summary_rows(rows):
        w.writerow(r)
    atomic_write_text(out_dir / SUMMARY_CSV, buf.getvalue())
    return table


def _json_safe(obj):
    """NaN → None (JSON has no NaN)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def paper_table(runs: dict[str, list[dict]]) -> str:
    """The paper's layout over several datasets: methods as rows, one column per dataset with
    our mean ± std of its task's figure (named in the column's title: test accuracy in %, test
    perplexity), then the paper's one-seed accuracies. A column's best student is in bold by
    :func:`kd2m.harness.paired.best_separated`, the rule results.md follows; a column without one says why below.

    ``runs`` maps a dataset name to its results rows (e.g. from several run directories).
    """
    figs = {ds: figure_of(rows) for ds, rows in runs.items()}
    summaries = {ds: summarize(rows) for ds, rows in runs.items()}
    stats = {ds: {s["method"]: s for s in summary} for ds, summary in summaries.items()}
    bold = {ds: best_separated(runs[ds], summaries[ds], figs[ds]) for ds in runs}
    methods: list[str] = []
    for per in stats.values():
        methods += [m for m in per if m not in methods]
    methods = table_order(methods)
    paper_cols = [ds for ds in runs if ds in KD2M_PAPER]
    head = ("| method | " + " | ".join(f"{ds} (ours): test {figs[ds].name}" for ds in runs)
            + "".join(f" | {ds} (paper): test {ACCURACY.name}" for ds in paper_cols) + " |")
    lines = [head, "|---" * (1 + len(runs) + len(paper_cols)) + "|"]
    for m in methods:
        cells = []
        for ds, per in stats.items():
            s = per.get(m)
            if s is None:
                cells.append("—")
                continue
            cell = fmt(s["mean"], s["std"])
            cells.append(f"**{cell}**" if m == bold[ds][0] else cell)
        for ds in paper_cols:
            p = KD2M_PAPER[ds].get(m)
            cells.append(f"{p:.2f}" if p is not None else "—")
        lines.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    notes = [f"{ds} ({figs[ds].direction}): {note}" for ds, (_, note) in bold.items() if note]
    return text + "".join(f"\n{n}\n" for n in notes)


def headline_table(summary: list[dict], top: int = 3, figure: str = "accuracy (%)",
                   higher_is_better: bool = True) -> str:
    """A short Markdown table of :func:`kd2m.harness.results.read_summary`'s rows: the teacher, the CE-only student and the
    ``top`` students with the best mean paired Δ vs CE, each with its interval, wins and verdict."""
    fixed = [s for s in summary if s["method"] in (TEACHER, CE)]
    others = [s for s in summary if s["method"] not in (TEACHER, CE) and not math.isnan(s["delta"])]
    others.sort(key=lambda s: -s["delta"] if higher_is_better else s["delta"])
    lines = [f"| method | {figure} | seeds | Δ vs CE [95% CI] | wins | vs CE |", "|---|---|---|---|---|---|"]
    for s in fixed + others[:top]:
        if s["method"] in (TEACHER, CE):
            lines.append(f"| {s['label']} | {fmt(s['mean'], s['std'])} | {s['n']} | | | |")
        else:
            lines.append(f"| {s['label']} | {fmt(s['mean'], s['std'])} | {s['n']} | {fmt_delta(s)} | "
                         f"{s['wins']}/{s['n']} | {verdict({**s, 'higher_is_better': higher_is_better})} |")
    return "\n".join(lines) + "\n"
