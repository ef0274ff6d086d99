"""Results rows -> CSV/JSON on disk and Markdown tables (mean ± std over seeds).

``results.csv`` holds one row per (method, weight, seed); it is rewritten atomically after
every finished run, keyed so a resumed grid never duplicates a row.
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

from .checkpoint import atomic_write_json, atomic_write_text

#: Display names, in the paper's row order (ours add MMD, GW, Sinkhorn, sliced, KL variants).
LABELS = {
    "teacher": "teacher",
    "ce": "student (CE only)",
    "kd": "Hinton KD",
    "w2": "W2 (E)",
    "cw2": "CW2 (E)",
    "jw2": "JW2 (E)",
    "gauss_w2": "W2 (G)",
    "gauss_cw2": "CW2 (G)",
    "gauss_kl": "KL (G)",
    "gauss_ckl": "CKL (G)",
    "mmd_linear": "MMD (linear)",
    "mmd_rbf": "MMD (RBF)",
    "cmmd_rbf": "CMMD (RBF)",
    "gw2": "GW (E)",
    "sinkhorn": "Sinkhorn (E)",
    "sliced_w2": "SW2 (E)",
}

#: The paper's reported accuracies (%), one seed (from shared/PAPER.md).
PAPER = {
    "svhn": {"ce": 93.10, "teacher": 94.41, "w2": 94.00, "cw2": 94.06, "jw2": 94.00, "gauss_w2": 93.94,
             "gauss_cw2": 93.95, "gauss_kl": 94.05},
    "cifar10": {"ce": 85.11, "teacher": 86.98, "w2": 86.45, "cw2": 86.54, "jw2": 86.60, "gauss_w2": 86.63,
                "gauss_cw2": 86.25, "gauss_kl": 86.44},
    "cifar100": {"ce": 56.66, "teacher": 62.21, "w2": 61.07, "cw2": 61.47, "jw2": 61.07, "gauss_w2": 60.68,
                 "gauss_cw2": 61.43, "gauss_kl": 60.66},
}

FIELDS = ["dataset", "method", "label", "metric", "weight", "seed", "test_acc", "epochs", "seconds", "run_dir"]


def label(method: str) -> str:
    base, _, weight = method.partition("@")
    name = LABELS.get(base, base)
    return f"{name} λ={weight}" if weight else name


def row_key(row: dict) -> tuple:
    return (str(row["method"]), int(row["seed"]))


#: The numeric columns of a results row and their types (CSV holds every cell as text).
NUMBER_FIELDS = {"seed": int, "test_acc": float, "weight": float, "epochs": int, "seconds": float}


def _typed(row: dict) -> dict:
    """A copy of ``row`` with its numeric columns as numbers (``weight`` missing or empty: 0.0;
    ``epochs``/``seconds`` missing or empty: None). Raises ValueError naming a bad cell."""
    out = dict(row)
    for key, typ in NUMBER_FIELDS.items():
        value = out.get(key)
        if value is None or value == "":
            if key in ("seed", "test_acc"):
                raise ValueError(f"results row of {out.get('method')!r} has no {key}")
            out[key] = 0.0 if key == "weight" else None
            continue
        try:
            out[key] = typ(value)
        except (TypeError, ValueError):
            raise ValueError(f"results row of {out.get('method')!r}: {key} {str(value)[:40]!r} is not "
                             f"{'an integer' if typ is int else 'a number'}") from None
    return out


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a ``results.csv``, numeric columns (:data:`NUMBER_FIELDS`) as numbers; [] if missing."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [_typed(r) for r in csv.DictReader(f)]


def write_rows(path: str | Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_text(path, buf.getvalue())


def upsert(path: str | Path, row: dict) -> list[dict]:
    """Add ``row`` to the CSV at ``path`` (replacing a row with the same method and seed)."""
    rows = [r for r in read_rows(path) if row_key(r) != row_key(row)]
    rows.append(row)
    write_rows(path, rows)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per method (first-seen order): mean and sample std of accuracy over seeds, in %."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(r["method"], []).append(100.0 * float(r["test_acc"]))
    out = []
    for method, accs in groups.items():
        std = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        out.append({"method": method, "label": label(method), "mean": statistics.fmean(accs), "std": std,
                    "n": len(accs), "accs": accs})
    return out


def fmt(mean: float, std: float) -> str:
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def markdown_table(rows: list[dict], dataset: str | None = None) -> str:
    """Methods × (accuracy mean ± std, seeds, Δ vs CE[, paper]) with the best student in bold."""
    stats = summarize(rows)
    ce = next((s["mean"] for s in stats if s["method"] == "ce"), None)
    students = [s for s in stats if s["method"] != "teacher"]
    best = max((s["mean"] for s in students), default=None)
    paper = PAPER.get(dataset or "", {})
    head = "| method | accuracy (%) | seeds | Δ vs CE |" + (" paper (1 seed) |" if paper else "")
    sep = "|---|---|---|---|" + ("---|" if paper else "")
    lines = [head, sep]
    for s in stats:
        cell = fmt(s["mean"], s["std"])
        if s["method"] != "teacher" and best is not None and s["mean"] == best:
            cell = f"**{cell}**"
        delta = "" if ce is None or s["method"] in ("ce", "teacher") else f"{s['mean'] - ce:+.2f}"
        line = f"| {s['label']} | {cell} | {s['n']} | {delta} |"
        if paper:
            p = paper.get(s["method"].partition("@")[0])
            line += f" {p:.2f} |" if p is not None else " — |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def write_reports(out_dir: str | Path, rows: list[dict], dataset: str, header: str = "") -> str:
    """results.md and results.json beside results.csv; returns the Markdown table."""
    out_dir = Path(out_dir)
    rows = [_typed(r) for r in rows]  # numbers in JSON, whoever built the rows
    table = markdown_table(rows, dataset)
    atomic_write_text(out_dir / "results.md", (header + "\n\n" if header else "") + table)
    # NaN (the std of one seed) is not JSON: null
    summary = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in s.items()}
               for s in summarize(rows)]
    atomic_write_json(out_dir / "results.json", {"dataset": dataset, "rows": rows, "summary": summary})
    return table


def paper_table(runs: dict[str, list[dict]]) -> str:
    """The paper's layout over several datasets: methods as rows, one column per dataset with
    our mean ± std (best student per column in bold), then the paper's one-seed numbers.

    ``runs`` maps a dataset name to its results rows (e.g. from several run directories).
    """
    stats = {ds: {s["method"]: s for s in summarize(rows)} for ds, rows in runs.items()}
    methods: list[str] = []
    for per in stats.values():
        methods += [m for m in per if m not in methods]
    order = list(LABELS)
    methods.sort(key=lambda m: (order.index(m.partition("@")[0]) if m.partition("@")[0] in order else len(order), m))
    best = {ds: max((s["mean"] for m, s in per.items() if m != "teacher"), default=None) for ds, per in stats.items()}
    paper_cols = [ds for ds in runs if ds in PAPER]
    head = "| method | " + " | ".join(f"{ds} (ours)" for ds in runs) + "".join(f" | {ds} (paper)" for ds in paper_cols) + " |"
    lines = [head, "|---" * (1 + len(runs) + len(paper_cols)) + "|"]
    for m in methods:
        cells = []
        for ds, per in stats.items():
            s = per.get(m)
            if s is None:
                cells.append("—")
                continue
            cell = fmt(s["mean"], s["std"])
            cells.append(f"**{cell}**" if m != "teacher" and s["mean"] == best[ds] else cell)
        for ds in paper_cols:
            p = PAPER[ds].get(m)
            cells.append(f"{p:.2f}" if p is not None else "—")
        lines.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
