"""Results rows: ``results.csv`` on disk, and the figure and the order their tables show them in.

``results.csv`` holds one row per (method, seed); it is rewritten atomically after every
finished run, keyed so a resumed grid never duplicates a row. Accuracies are those of the last
epoch (the honest number: no early stopping on the test set); ``best_acc`` (best epoch) is kept
in results.csv for reference only. This module also reads back what :func:`kd2m.harness.tables.write_reports`
wrote beside it (``results.json``'s rows, ``summary.csv``). The paired statistics over seeds
are :mod:`kd2m.harness.paired`'s, the Markdown tables :mod:`kd2m.harness.tables`'.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from .. import losses, tasks
from ..atomic_io import atomic_write_text, read_json
from ..catalog import BASELINE_ORDER, CE, PAPER_METRICS, TEACHER
from ..training.methods import method_label
from .rundir import RESULTS_CSV, RESULTS_JSON

__all__ = ["FIELDS", "LM_FIELDS", "NUMBER_FIELDS", "Figure", "ACCURACY", "PERPLEXITY", "task_of", "figure_of", "label",
           "table_order", "row_key", "typed_row", "read_rows", "write_rows", "upsert", "per_seed_figures",
           "read_reported", "read_summary"]


FIELDS = ["dataset", "method", "label", "metric", "weight", "seed", "test_acc", "best_acc", "best_epoch", "epochs",
          "seconds", "run_dir"]


#: columns only language-model rows have (written where a row has them: image tables keep their columns)
LM_FIELDS = ["test_ppl", "best_ppl"]


@dataclass(frozen=True)
class Figure:
    """The held-out figure a table compares, as its task (:class:`kd2m.tasks.Task`) defines it: its
    results-row key (:attr:`~kd2m.tasks.Task.primary`), its scale in the tables, whether a larger
    value is better, its column title and what Δ is counted in. Built from the task only
    (:meth:`of`): the task is the one home of these."""
    key: str
    scale: float
    higher_is_better: bool
    name: str       # the table's column title
    unit: str       # what Δ is counted in
    direction: str  # "higher is better" / "lower is better", as tables and plots say it

    @classmethod
    def of(cls, task) -> Figure:
        return cls(task.primary, task.figure_scale, task.higher_is_better, task.figure_name, task.figure_unit,
                   task.direction)


ACCURACY = Figure.of(tasks.get("classification"))


PERPLEXITY = Figure.of(tasks.get("lm"))


def task_of(rows: list[dict]):
    """The task ``rows`` were trained for: their dataset's (:func:`kd2m.data.dataset_task`) where
    they name one known dataset, else the task whose own figure every row records (only a language
    model's rows hold perplexity; every task's rows hold accuracy); classification otherwise."""
    from ..data import dataset_task, is_dataset
    names = {r.get("dataset") for r in rows} - {None, ""}
    if len(names) == 1:
        name = next(iter(names))
        if is_dataset(name):
            return tasks.get(dataset_task(name))
    own = [t for t in map(tasks.get, tasks.available())
           if t.primary != tasks.Task.primary and rows and all(r.get(t.primary) not in (None, "") for r in rows)]
    return own[0] if own else tasks.get("classification")


def figure_of(rows: list[dict]) -> Figure:
    """The figure the tables of ``rows`` compare: their task's (:func:`task_of`)."""
    return Figure.of(task_of(rows))


def label(method: str) -> str:
    """The table label of a method key (``"cw2"`` → ``"CW2 (E)"``, ``"cw2@0.1"`` → ``"CW2 (E) λ=0.1"``)."""
    return method_label(method)


def table_order(methods) -> list[str]:
    """teacher, CE-only, then the baselines, then the distances in the paper's order, then the rest
    (first-seen order), each sweep value after its base."""
    order = [TEACHER, CE] + BASELINE_ORDER + losses.available("baseline") + PAPER_METRICS + losses.available("kd2m")
    seen = list(dict.fromkeys(methods))

    def rank(m):
        base = m.partition("@")[0]
        return (order.index(base) if base in order else len(order), seen.index(m))
    return sorted(seen, key=rank)


def row_key(row: dict) -> tuple:
    return (str(row["method"]), int(row["seed"]))


#: The numeric columns of a results row and their types (CSV holds every cell as text).
NUMBER_FIELDS = {"seed": int, "test_acc": float, "best_acc": float, "best_epoch": int, "weight": float, "epochs": int,
                 "seconds": float, "test_ppl": float, "best_ppl": float}


def typed_row(row: dict) -> dict:
    """A copy of ``row`` with its numeric columns as numbers (``weight`` missing or empty: 0.0;
    ``epochs``/``seconds`` missing or empty: None). Raises ValueError naming a bad cell."""
    out = dict(row)
    for key, typ in NUMBER_FIELDS.items():
        value = out.get(key)
        if value is None or value == "":
            if key in ("seed", "test_acc"):
                raise ValueError(f"results row of {out.get('method')!r} has no {key}")
            if key in LM_FIELDS:  # absent from image rows: left out, not None
                out.pop(key, None)
                continue
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
        return [typed_row(r) for r in csv.DictReader(f)]


def write_rows(path: str | Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    extra = [k for k in LM_FIELDS if any(r.get(k) not in (None, "") for r in rows)]
    w = csv.DictWriter(buf, fieldnames=FIELDS + extra, extrasaction="ignore")
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


def per_seed_figures(rows: list[dict], fig: Figure) -> dict[str, dict[int, float]]:
    """{method: {seed: the run's figure in its table unit}} (accuracy in %, or perplexity)."""
    groups: dict[str, dict[int, float]] = {}
    for r in rows:
        groups.setdefault(r["method"], {})[int(r["seed"])] = fig.scale * float(r[fig.key])
    return groups


def read_reported(run_dir: str | Path) -> tuple[list[dict], dict]:
    """The rows results.md was made from (results.json), and that file's metadata. Falls back to
    results.csv for directories written before results.json held them."""
    run_dir = Path(run_dir)
    js = run_dir / RESULTS_JSON
    if js.exists():
        data = read_json(js, "delete it and rerun the same command to rebuild it from the runs")
        if not isinstance(data, dict):
            raise ValueError(f"{js}: not a kd2m results file (expected a JSON object); delete it and rerun the "
                             "same command to rebuild it from the runs")
        rows = data.get("rows") or []
        if rows and isinstance(rows[0], dict) and "method" in rows[0]:
            return [typed_row(r) for r in rows], data
    csv_path = run_dir / RESULTS_CSV
    if not csv_path.exists():
        raise FileNotFoundError(f"{csv_path} does not exist: is {run_dir} a kd2m run directory?")
    return read_rows(csv_path), {}


def read_summary(path: str | Path) -> list[dict]:
    """The rows of a ``summary.csv`` (:func:`kd2m.harness.tables.write_reports`), numbers as numbers (empty Δ cells: NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        t = {"method": r["method"], "label": r["label"], "n": int(r["n_seeds"])}
        for k in ("mean", "std", "delta", "delta_ci_low", "delta_ci_high", "p_value"):
            t[k] = float(r[k]) if r.get(k, "") != "" else float("nan")
        t["wins"] = int(r["wins"]) if r.get("wins", "") != "" else None
        out.append(t)
    return out
