"""Results rows -> CSV/JSON on disk and Markdown tables, with paired statistics over seeds.

``results.csv`` holds one row per (method, seed); it is rewritten atomically after every
finished run, keyed so a resumed grid never duplicates a row. ``summary.csv`` holds one row
per method: accuracy mean ± sample std, and Δ vs the CE-only student as a *paired* quantity
(every student of a seed shares initial weights, data order and schedule with the CE-only
student of that seed): mean Δ, its 95% Student-t interval over seeds (n−1 degrees of freedom),
the two-sided paired t-test p-value and the number of seeds where the method beat CE.
Accuracies are those of the last epoch (the honest number: no early stopping on the test set);
``best_acc`` (best epoch) is kept in results.csv for reference only.
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from .. import losses, tasks
from ..atomic_io import atomic_write_json, atomic_write_text, read_json
from ..catalog import BASELINE_ORDER, CE, PAPER_METRICS, TEACHER
from ..training.methods import method_label
from .published import CIFAR100, KD2M_PAPER
from .rundir import RESULTS_CSV, RESULTS_JSON, RESULTS_MD, SUMMARY_CSV

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


SUMMARY_FIELDS = ["method", "label", "n_seeds", "mean", "std", "delta", "delta_ci_low", "delta_ci_high", "p_value",
                  "wins"]


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


def summarize(rows: list[dict]) -> list[dict]:
    """Per method (table order): the figure's mean and sample std over seeds (:func:`figure_of`:
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


def fmt(mean: float, std: float) -> str:
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def fmt_delta(s: dict) -> str:
    if "delta" not in s or math.isnan(s["delta"]):
        return ""
    if math.isnan(s["delta_ci_low"]):
        return f"{s['delta']:+.2f}"
    return f"{s['delta']:+.2f} [{s['delta_ci_low']:+.2f}, {s['delta_ci_high']:+.2f}]"


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


def best_separated(rows: list[dict], stats: list[dict] | None = None,
                   fig: Figure | None = None) -> tuple[str | None, str]:
    """The student to print in bold, and a note when there is none: the one bolding rule of every
    output (results.md, ``kd2m run``'s table, ``kd2m table``, the report's plots).

    The best mean in the task's direction (the highest accuracy, the lowest perplexity) is bold only
    when a paired interval over the seeds both have separates it from the runner-up's (a best that
    one more seed, or another CPU, could swap is not a best). ``stats``/``fig``: :func:`summarize`
    and :func:`figure_of` of ``rows``, when the caller has them."""
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
TEACHER_SETTINGS = frozenset({"teacher", "teacher_options", "teacher_epochs", "pretrained_teacher", "teacher_lr",
                              "match", "teacher_cache"})


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


def compare_table(rows: list[dict], pairs: list[tuple[str, str]], settings: dict | None = None) -> str:
    """Paired Δ = A − B (accuracy points) for each (A, B) of ``pairs``, over the seeds both have:
    mean [95% t-interval], p, wins of A; "A better"/"B better" only when the interval excludes 0.
    E.g. every distance trained with ``weight: auto`` against the same distance with its swept λ.

    ``settings``: {(method, seed): the run's settings}; a pair whose runs of one seed differ in
    anything but their methods (:func:`settings_difference`: e.g. 3 epochs against 1 in one
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


def power_line(a: str, b: str, deltas: list[float], fig: Figure) -> str:
    """One sentence: how many seeds a paired comparison of this size and spread needs."""
    n = seeds_for_power(deltas)
    if n is None:
        return f"{a} − {b}: no difference to size a paired test for."
    size = f"|Δ| = {abs(statistics.fmean(deltas)):.2f} {fig.unit}, sd {statistics.stdev(deltas):.2f}"
    more = f"about {n} seeds" if n < 10_000 else "more than 10000 seeds"
    return (f"{a} − {b}: a difference of this size ({size}) needs {more} for an 80% chance that a paired "
            f"95% interval excludes 0 (this comparison has {len(deltas)}).")


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


def paper_table(runs: dict[str, list[dict]]) -> str:
    """The paper's layout over several datasets: methods as rows, one column per dataset with
    our mean ± std of its task's figure (named in the column's title: test accuracy in %, test
    perplexity), then the paper's one-seed accuracies. A column's best student is in bold by
    :func:`best_separated`, the rule results.md follows; a column without one says why below.

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


def read_summary(path: str | Path) -> list[dict]:
    """The rows of a ``summary.csv`` (:func:`write_reports`), numbers as numbers (empty Δ cells: NaN)."""
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


def headline_table(summary: list[dict], top: int = 3, figure: str = "accuracy (%)",
                   higher_is_better: bool = True) -> str:
    """A short Markdown table of :func:`read_summary`'s rows: the teacher, the CE-only student and the
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
