"""Two grids of the same benchmark, method by method: paired Δ between them over their shared seeds.

    python benchmarks/compare_grids.py SELECTED_DIR SWEPT_DIR [--methods w2,cw2,...]

`kd2m compare` pairs two students of one grid. Two grids that differ in a method's λ (λ chosen by
``--select-k`` in one, hand-swept in the other) hold that method under the same key, so they live
in two directories; this pairs them. For each method both grids hold: A − B, A − CE (A's CE-only
student) and B − CE, each a paired mean over the seeds both have with its 95% Student-t interval
(:func:`kd2m.harness.paired.paired_delta`); then, per seed, the mean over those methods of A − B, and
the mean Δ vs CE of each grid. Accuracy in points, or perplexity (lower is better) for text.
A and B must be the same benchmark, each method trained alike in both but for how its λ was set:
every run of a shared seed is checked against its counterpart by its stored settings (final.json),
as ``kd2m compare`` checks a pair (:func:`kd2m.harness.paired.settings_difference`), allowing only each
term's λ (``weight``, ``auto``) and ``auto_every`` to differ — the teacher's settings are checked
too, which the CE-only student, trained without a teacher, cannot show; and the two grids' CE-only
runs must agree exactly. Otherwise the pairing means nothing, and is refused, naming the difference.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from kd2m.atomic_io import atomic_write_text, read_json
from kd2m.catalog import CE, TEACHER
from kd2m.harness.paired import fmt_delta, paired_delta, settings_difference, verdict
from kd2m.harness.results import figure_of, label, per_seed_figures, read_reported
from kd2m.harness.rundir import FINAL_JSON

#: what a method's runs in the two grids may differ in: how its λ was set (each term's weight and
#: whether it is `auto`, compared apart from the terms' other settings; ``auto_every``) and the seed
LAMBDA_SELECTION = frozenset({"seed", "auto_every"})
TERM_LAMBDA = ("weight", "auto")


def fmt(d: dict) -> str:
    """The table's Δ [interval], in bold where the interval excludes 0."""
    bold = "**" if verdict(d) != "—" else ""
    return f"{bold}{fmt_delta(d)}{bold}"


def run_settings(grid: str, rows: list[dict]) -> dict:
    """{(method, seed): the settings the run stored in its final.json}, terms without their λ."""
    out = {}
    for r in rows:
        if r["method"] == TEACHER:
            continue
        if not r.get("run_dir"):
            raise SystemExit(f"{grid}: the row of {r['method']} seed {r['seed']} names no run directory: its "
                             "settings cannot be compared; rerun that grid to rebuild its results")
        path = Path(grid) / r["run_dir"] / FINAL_JSON
        if not path.exists():
            raise SystemExit(f"{path} does not exist: the settings of {r['method']} seed {r['seed']} cannot be "
                             "compared; rerun that grid to rebuild its results")
        settings = dict((read_json(path, "rerun that grid to redo the run") or {}).get("settings") or {})
        if "terms" in settings:
            settings["terms"] = [{k: v for k, v in t.items() if k not in TERM_LAMBDA} for t in settings["terms"]]
        out[(r["method"], int(r["seed"]))] = settings
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--methods", help="comma list (default: every method both grids hold, CE and teacher aside)")
    p.add_argument("--out", help="also write the Markdown table to this file (it writes nothing else)")
    args = p.parse_args(argv)
    rows_a, rows_b = read_reported(args.a)[0], read_reported(args.b)[0]
    fig = figure_of(rows_a)
    a, b = per_seed_figures(rows_a, fig), per_seed_figures(rows_b, fig)
    if CE not in a or CE not in b:
        raise SystemExit("both grids need their CE-only student (ce)")
    shared = sorted(set(a[CE]) & set(b[CE]))
    if len(shared) < 2:
        raise SystemExit(f"the grids share {len(shared)} seed(s); a paired interval needs 2")
    if any(a[CE][s] != b[CE][s] for s in shared):
        raise SystemExit("the two grids' CE-only students differ on a shared seed: not the same benchmark and "
                         "settings, so their methods cannot be paired")
    methods = args.methods.split(",") if args.methods else [m for m in a if m in b and m not in (CE, TEACHER)]
    settings_a, settings_b = run_settings(args.a, rows_a), run_settings(args.b, rows_b)
    for m in [CE] + methods:
        for s in shared:
            if (m, s) in settings_a and (m, s) in settings_b:
                diff = settings_difference(settings_a[m, s], settings_b[m, s], own=LAMBDA_SELECTION)
                if diff:
                    raise SystemExit(f"{label(m)} seed {s} was trained with other settings in the two grids "
                                     f"({'; '.join(diff)}), not only another λ: its runs cannot be paired")
    better = fig.higher_is_better
    lines = ["| method | A − B | A − CE | B − CE |", "|---|---|---|---|"]
    per_seed = {s: [] for s in shared}
    mean_a, mean_b = [], []
    for m in methods:
        if m not in a or m not in b:
            raise SystemExit(f"{m}: not in both grids")
        ma = {s: a[m][s] for s in shared if s in a[m] and s in b[m]}
        mb = {s: b[m][s] for s in ma}
        da, db = paired_delta(ma, a[CE], better), paired_delta(mb, b[CE], better)
        lines.append(f"| {label(m)} | {fmt(paired_delta(ma, mb, better))} | {fmt(da)} | {fmt(db)} |")
        for s in ma:
            per_seed[s].append(ma[s] - mb[s])
        mean_a.append(da["delta"])
        mean_b.append(db["delta"])
    whole = {s: statistics.fmean(v) for s, v in per_seed.items() if len(v) == len(methods)}
    lines += ["", f"mean over the {len(methods)} methods of A − B, per seed ({len(whole)} seeds): "
              + fmt(paired_delta(whole, {s: 0.0 for s in whole}, better)), "",
              f"mean Δ vs CE: A {statistics.fmean(mean_a):+.2f}, B {statistics.fmean(mean_b):+.2f}"]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
