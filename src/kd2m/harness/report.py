"""Plots and a Markdown report for a finished run directory (``kd2m report RUN_DIR``).

:func:`make_report` writes into ``RUN_DIR/report/``:

- ``accuracy.png``: the task's test figure per method (accuracy in %, or perplexity: lower is
  better; :attr:`kd2m.tasks.Task.figure_name`), mean ± sample std over seeds (each seed a dot),
  the teacher and the CE-only student drawn apart (dark / hatched bars, dashed reference lines);
- ``curves.png``: that figure per epoch and the distillation loss D per epoch (log scale),
  mean over seeds, one line per method;
- ``diagnostics.png`` (when the runs logged them, :mod:`kd2m.harness.monitor`): per epoch, the exact W2
  between student and teacher features on a fixed test batch, and the share of its optimal
  plan's mass that pairs samples of the same class (chance level dashed), mean over seeds;
- ``embedding.png``: a joint 2-D embedding (UMAP if ``umap`` is importable, else scikit-learn's
  t-SNE) of the penultimate *features* of the teacher, the CE-only student and the best
  distilled student (highest mean accuracy among the feature-distillation methods), first
  seed, on a fixed subset of ≤ 500 test samples, coloured by label; one panel per model,
  the three fitted together so the panels share coordinates;
- ``report.md``: the results table (:func:`kd2m.harness.tables.markdown_table`) and the figures
  (and Theorem 1's table when ``kd2m bound`` has written ``RUN_DIR/bound.md``).

Figures are drawn with matplotlib's Agg canvas on ``Figure`` objects (no pyplot, no global
backend switch), so this works headless and inside a user's interactive session alike.
"""
from __future__ import annotations

import math
import statistics
import warnings
from pathlib import Path

import numpy as np
import torch

from ..atomic_io import atomic_write_text, read_jsonl
from ..catalog import CE, TEACHER
from . import results as R
from .paired import best_separated, summarize, verdict
from .rundir import LOG_JSONL, RunDir
from .tables import markdown_table, note

__all__ = ["make_report", "plot_accuracy", "plot_curves", "plot_diagnostics", "plot_embedding", "embedding_features",
           "best_distilled", "EMBED_SAMPLES"]

#: Test samples embedded per model (a fixed seeded subset of the test set).
EMBED_SAMPLES = 500
EMBED_SEED = 0

TEACHER_COLOR = "#333333"
CE_COLOR = "#bbbbbb"


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    import io

    from ..atomic_io import atomic_write_bytes
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())


def _order(methods: list[str]) -> list[str]:
    """The tables' order (:func:`kd2m.harness.results.table_order`), so plots and tables agree."""
    return R.table_order(methods)


def _colors(methods: list[str]) -> dict[str, str]:
    import matplotlib
    cmap = matplotlib.colormaps["tab10"]
    out, i = {}, 0
    for m in methods:
        if m == TEACHER:
            out[m] = TEACHER_COLOR
        elif m == CE:
            out[m] = CE_COLOR
        else:
            out[m] = matplotlib.colors.to_hex(cmap(i % 10))
            i += 1
    return out


def plot_accuracy(rows: list[dict], path: Path, title: str = ""):
    """Left: bar per method, the task's figure (:func:`kd2m.harness.results.figure_of`: test accuracy in %,
    test perplexity) as mean ± sample std over seeds, seeds as dots, zoomed y-range (capped at 100
    for a percentage only). Right: the paired Δ vs the CE-only student with its 95% interval per
    method (the numbers of summary.csv), in the figure's unit; an interval clear of 0 is drawn
    solid, one that crosses 0 hollow. The axes say which direction is better. The best student
    by :func:`kd2m.harness.paired.best_separated` (the tables' rule) has its label in bold; without one,
    the x axis says why.

    Returns the matplotlib figure drawn (also saved to ``path``)."""
    fig_ = R.figure_of(rows)
    summary = summarize(rows)
    stats = {s["method"]: s for s in summary}
    best, why_not = best_separated(rows, summary, fig_)
    methods = _order(list(stats))
    colors = _colors(methods)
    width = max(5.0, 0.8 * len(methods) + 2)
    fig = _figure((2 * width, 4.2))
    ax = fig.add_subplot(1, 2, 1)
    _plot_deltas(fig.add_subplot(1, 2, 2), stats, [m for m in methods if "delta" in stats[m]], colors, fig_, best)
    xs = np.arange(len(methods))
    lo, hi = math.inf, -math.inf
    for x, m in zip(xs, methods):
        s = stats[m]
        std = 0.0 if math.isnan(s["std"]) else s["std"]
        ax.bar(x, s["mean"], yerr=std, capsize=4, color=colors[m], edgecolor="black", linewidth=0.6,
               hatch="//" if m == CE else None, zorder=2)
        ax.scatter(np.full(len(s["accs"]), x) + np.linspace(-0.15, 0.15, len(s["accs"])), s["accs"], s=10,
                   color="black", alpha=0.6, zorder=3)
        ax.annotate(f"{s['mean']:.1f}", (x, s["mean"] + std), textcoords="offset points", xytext=(0, 3),
                    ha="center", fontsize=7)
        lo = min(lo, s["mean"] - std, *s["accs"])
        hi = max(hi, s["mean"] + std, *s["accs"])
    for m, style, name in ((TEACHER, "-", "teacher"), (CE, "--", "CE only")):
        if m in stats:
            y = stats[m]["mean"]
            ax.axhline(y, color="black" if m == TEACHER else "gray", ls=style, lw=0.8, zorder=1)
            ax.annotate(name, (1.0, y), xycoords=("axes fraction", "data"), xytext=(2, 0),
                        textcoords="offset points", va="center", ha="left", fontsize=7,
                        color="black" if m == TEACHER else "dimgray", annotation_clip=False)
    pad = max(0.5, 0.15 * (hi - lo))
    top = hi + 1.5 * pad
    ax.set_ylim(max(0.0, lo - pad), min(100.0, top) if fig_.scale == 100.0 else top)  # a percentage stops at 100
    ax.set_xticks(xs)
    ax.set_xticklabels([R.label(m) for m in methods], rotation=30, ha="right", fontsize=8)
    _bold_label(ax, methods, best)
    if why_not:  # the tables say the same under them
        ax.set_xlabel("no label in bold: the best mean is not separated from the runner-up by a paired interval",
                      fontsize=7)
    ax.set_ylabel(f"test {fig_.name} ({fig_.direction})")
    ax.set_title(title or f"test {fig_.name}: mean ± std over seeds", fontsize=10)
    ax.grid(axis="y", alpha=0.3, zorder=0)
    fig.tight_layout()
    _save(fig, path)
    return fig


def _bold_label(ax, methods: list[str], best: str | None) -> None:
    """The x tick label of ``best`` (the tables' bold row) in bold."""
    for m, tick in zip(methods, ax.get_xticklabels()):
        if m == best:
            tick.set_fontweight("bold")


def _plot_deltas(ax, stats: dict, methods: list[str], colors: dict, fig_: R.Figure, best: str | None) -> None:
    ax.axhline(0.0, color="gray", ls="--", lw=0.8)
    for x, m in enumerate(methods):
        s = stats[m]
        lo, hi = s["delta_ci_low"], s["delta_ci_high"]
        clear = verdict(s) != "—"
        if math.isnan(lo):
            ax.plot([x], [s["delta"]], "o", color=colors[m])
            continue
        ax.errorbar([x], [s["delta"]], yerr=[[s["delta"] - lo], [hi - s["delta"]]], fmt="o", capsize=4,
                    color=colors[m], markerfacecolor=colors[m] if clear else "white")
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([R.label(m) for m in methods], rotation=30, ha="right", fontsize=8)
    _bold_label(ax, methods, best)
    better = "above" if fig_.higher_is_better else "below"
    ax.set_ylabel(f"Δ test {fig_.name} vs CE-only ({fig_.unit}; better: {better} 0)")
    ax.set_title(f"paired Δ vs CE, 95% t-interval over seeds ({fig_.direction})", fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def read_logs(run_dir: Path, rows: list[dict]) -> dict[str, list[list[dict]]]:
    """method -> one epoch list per seed (from ``log.jsonl``; missing logs are skipped)."""
    logs: dict[str, list[list[dict]]] = {}
    for r in rows:
        path = RunDir(run_dir).run_of_row(r) / LOG_JSONL
        if path.is_file():
            lines = read_jsonl(path, "delete that run directory and rerun to redo it (log.jsonl is rewritten "
                                     "from the checkpoint on a resume)")
            if lines:
                logs.setdefault(r["method"], []).append(lines)
    return logs


def _mean_curve(runs: list[list[dict]], key: str) -> tuple[list[int], list[float]]:
    by_epoch: dict[int, list[float]] = {}
    for run in runs:
        for e in run:
            v = e.get(key)
            if v is not None and math.isfinite(float(v)):
                by_epoch.setdefault(int(e["epoch"]), []).append(float(v))
    epochs = sorted(by_epoch)
    return epochs, [statistics.fmean(by_epoch[e]) for e in epochs]


def plot_curves(logs: dict[str, list[list[dict]]], path: Path, fig_: R.Figure = R.ACCURACY) -> None:
    """The task's test figure per epoch (``fig_``: accuracy in %, perplexity) and the distillation
    loss D per epoch (log scale), mean over seeds."""
    methods = _order(list(logs))
    colors = _colors(methods)
    fig = _figure((11, 4))
    ax_acc, ax_d = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    any_distill = False
    for m in methods:
        ep, acc = _mean_curve(logs[m], fig_.key)
        style = dict(color=colors[m], lw=2.0 if m in (TEACHER, CE) else 1.3,
                     ls="--" if m == CE else "-", label=R.label(m))
        ax_acc.plot(ep, [fig_.scale * a for a in acc], **style)
        ep, d = _mean_curve(logs[m], "distill")
        if d and any(v > 0 for v in d):
            pos = [(e, v) for e, v in zip(ep, d) if v > 0]
            ax_d.plot([e for e, _ in pos], [v for _, v in pos], **style)
            any_distill = True
    from matplotlib.ticker import MaxNLocator
    for ax in (ax_acc, ax_d):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel(f"test {fig_.name} ({fig_.direction})")
    ax_acc.set_title(f"test {fig_.name} (mean over seeds)", fontsize=10)
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(fontsize=7)
    ax_d.set_xlabel("epoch")
    ax_d.set_ylabel("distillation loss D (train, per sample)")
    ax_d.set_title("distillation loss (mean over seeds)", fontsize=10)
    if any_distill:
        ax_d.set_yscale("log")
        ax_d.legend(fontsize=7)
    else:
        ax_d.text(0.5, 0.5, "no feature-distillation runs", ha="center", va="center", transform=ax_d.transAxes)
    ax_d.grid(alpha=0.3, which="both")
    fig.tight_layout()
    _save(fig, path)


#: the diagnostics drawn by plot_diagnostics: (log.jsonl `diag` key, axis label, panel title)
DIAG_PANELS = (("w2", "W2 to the teacher (feature units)", "student ↔ teacher feature W2"),
               ("same_class_mass", "share of the OT plan within a class", "OT plan mass on same-class pairs"))


def diagnostic_curves(logs: dict[str, list[list[dict]]], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """method -> (epochs, mean over seeds of ``row["diag"][key]``), for methods that logged it."""
    out = {}
    for m, runs in logs.items():
        flat = [[{"epoch": e["epoch"], key: (e.get("diag") or {}).get(key)} for e in run] for run in runs]
        ep, vals = _mean_curve(flat, key)
        if ep:
            out[m] = (ep, vals)
    return out


def plot_diagnostics(logs: dict[str, list[list[dict]]], path: Path) -> dict | None:
    """W2 to the teacher and the same-class share of the OT plan per epoch (mean over seeds), one
    line per method; the share a random pairing would give (Σ_c p_c²) dashed. Returns the curves
    drawn ({diag key: {method: (epochs, means)}}), or None (nothing drawn) when no run logged them."""
    curves = {key: diagnostic_curves(logs, key) for key, _, _ in DIAG_PANELS}
    if not any(curves.values()):
        return None
    methods = _order(list(logs))
    colors = _colors(methods)
    fig = _figure((11, 4))
    from matplotlib.ticker import MaxNLocator
    for i, (key, ylabel, title) in enumerate(DIAG_PANELS):
        ax = fig.add_subplot(1, len(DIAG_PANELS), i + 1)
        for m in methods:
            if m in curves[key]:
                ep, vals = curves[key][m]
                ax.plot(ep, vals, color=colors[m], lw=2.0 if m == CE else 1.3, ls="--" if m == CE else "-",
                        label=R.label(m))
        if key == "same_class_mass":
            chance = [v for c in diagnostic_curves(logs, "chance_same_class").values() for v in c[1]]
            if chance:
                ax.axhline(statistics.fmean(chance), color="gray", ls=":", lw=1.0, label="random pairing")
            ax.set_ylim(0.0, 1.02)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} (mean over seeds)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return curves


def _diagnostics_text(logs: dict[str, list[list[dict]]]) -> str:
    diags = [e["diag"] for runs in logs.values() for run in runs for e in run if e.get("diag")]
    n = diags[0].get("n") if diags else "?"
    text = (f"Each epoch, on a fixed batch of the first {n} test images (the same for every epoch, method and "
            "seed), teacher and student in eval mode: the exact W2 between the student's and the teacher's "
            "features, and the share of its optimal transport plan that pairs samples of the same class (dotted: "
            "what a random pairing gives). A label-free distance pulls each student feature towards the teacher "
            "feature it is paired with, of whatever class. Mean over seeds; the CE-only student is the reference.")
    skipped = sorted({d["skipped"] for d in diags if d.get("skipped")})
    return text + "".join(f" Skipped: {s}." for s in skipped)


def best_distilled(rows: list[dict]) -> str | None:
    """The feature-distillation method (a row with a ``metric``) with the best mean of the task's
    figure (the highest accuracy, the lowest perplexity); else ``kd``."""
    stats = summarize(rows)
    fig_ = R.figure_of(rows)
    metric_methods = {r["method"] for r in rows if r.get("metric")}
    cands = [s for s in stats if s["method"] in metric_methods] or [s for s in stats if s["method"] == "kd"]
    pick = max if fig_.higher_is_better else min
    return pick(cands, key=lambda s: s["mean"])["method"] if cands else None


def embedding_features(model, dataset, indices, device, layer: str = "penultimate") -> np.ndarray:
    """Features of ``model`` (eval mode) at ``layer`` for ``dataset[indices]``, as an (N, d) float32 array."""
    from torch.utils.data import Subset

    from .theorem import model_outputs  # the one held-out pass, also used by `kd2m bound`
    out = model_outputs(model, Subset(dataset, [int(i) for i in indices]), samples=len(indices), device=device,
                        layer=layer)
    return out.feats.float().numpy()


def _embed(z: np.ndarray) -> tuple[np.ndarray, str]:
    """2-D embedding of the rows of ``z``: UMAP if installed, else t-SNE (both seeded)."""
    try:
        import umap  # type: ignore
        return umap.UMAP(n_components=2, random_state=EMBED_SEED).fit_transform(z), "UMAP"
    except ImportError:
        pass
    from sklearn.manifold import TSNE
    perplexity = float(min(30.0, max(2.0, (len(z) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=EMBED_SEED).fit_transform(z), "t-SNE"


def plot_embedding(panels: list[tuple[str, np.ndarray]], labels: np.ndarray, path: Path,
                   class_names: list[str] | None = None, what: str = "penultimate features") -> str:
    """Embed the stacked features of ``panels`` [(title, (N, d) feats)] jointly; one panel each.

    If the feature widths differ, each model is embedded on its own (panels then do not share
    coordinates, and the titles say so). Returns the embedding method's name.
    """
    import matplotlib
    dims = {f.shape[1] for _, f in panels}
    if len(dims) == 1:
        coords, method = _embed(np.concatenate([f for _, f in panels]))
        parts = np.split(coords, len(panels))
        shared = True
    else:
        res = [_embed(f) for _, f in panels]
        parts, method, shared = [c for c, _ in res], res[0][1], False
    k = int(labels.max()) + 1 if len(labels) else 1
    cmap = matplotlib.colormaps["tab10" if k <= 10 else "tab20" if k <= 20 else "nipy_spectral"]
    fig = _figure((4.2 * len(panels), 4.4))
    axes = []
    for i, ((title, _), xy) in enumerate(zip(panels, parts)):
        share = axes[0] if (axes and shared) else None
        ax = fig.add_subplot(1, len(panels), i + 1, sharex=share, sharey=share)
        axes.append(ax)
        ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap=cmap, vmin=-0.5, vmax=k - 0.5, s=6, alpha=0.8, linewidths=0)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if k <= 20:
        from matplotlib.lines import Line2D
        names = class_names or [str(c) for c in range(k)]
        handles = [Line2D([], [], marker="o", ls="", color=cmap(c), markersize=5, label=names[c]) for c in range(k)]
        fig.legend(handles=handles, loc="lower center", ncol=min(k, 10), fontsize=7, frameon=False)
    note = "joint fit, shared coordinates" if shared else "feature dims differ: separate fits"
    fig.suptitle(f"{method} of {what} ({len(labels)} test samples, {note})", fontsize=10)
    fig.tight_layout(rect=(0, 0.08 if k <= 20 else 0, 1, 0.95))
    _save(fig, path)
    return method


def _embedding(run_dir: Path, cfg: dict, rows: list[dict], out: Path, device: str,
               samples: int = EMBED_SAMPLES) -> str:
    """Draw embedding.png; returns a one-line description for report.md."""
    from ..data import build_dataset
    from ..runtime import resolve_device
    from .bound import load_model
    dev = resolve_device(device)
    best = best_distilled(rows)
    seeds = sorted({r["seed"] for r in rows if r["method"] == TEACHER})
    if not seeds:
        raise ValueError("no teacher row in results.csv")
    seed = seeds[0]
    chosen = [m for m in (TEACHER, CE, best) if m is not None]
    by_key = {(r["method"], r["seed"]): r for r in rows}
    missing = [m for m in chosen if (m, seed) not in by_key]
    chosen = [m for m in chosen if (m, seed) in by_key]
    bundle = build_dataset(cfg["dataset"], data_root=cfg.get("data_root"), download=False, augment=False,
                           image_size=cfg.get("image_size"), holdout=cfg.get("holdout") or 0.0)
    n = len(bundle.test)
    g = torch.Generator().manual_seed(EMBED_SEED)
    idx = torch.randperm(n, generator=g)[:min(samples, n)].sort().values
    labels = np.array([int(bundle.test[int(i)][1]) for i in idx])
    accs = {s["method"]: s for s in summarize([r for r in rows if r["seed"] == seed])}
    panels = []
    for m in chosen:
        arch = cfg["teacher"] if m == TEACHER else cfg["student"]
        layer = cfg.get("teacher_layer" if m == TEACHER else "student_layer") or "penultimate"
        options = cfg.get("teacher_options" if m == TEACHER else "student_options")
        model = load_model(run_dir, by_key[(m, seed)], arch, bundle, dev, options)
        feats = embedding_features(model, bundle.test, idx, dev, layer)
        role = "teacher" if m == TEACHER else "CE-only student" if m == CE else f"{R.label(m)} student"
        panels.append((f"{role} ({arch})\nacc {accs[m]['mean']:.2f}%", feats))
    layers = {cfg.get("teacher_layer") or "penultimate", cfg.get("student_layer") or "penultimate"}
    what = f"{'/'.join(sorted(layers))} features"
    method = plot_embedding(panels, labels, out / "embedding.png", bundle.classes, what)
    text = (f"{method} of the {what} of {', '.join(R.label(m) for m in chosen)} (seed {seed}, "
            f"{len(idx)} fixed test samples, fitted jointly), coloured by label.")
    if best is not None and best != "kd":
        text += f" Distilled student shown: the best feature-distillation method by mean accuracy, {R.label(best)}."
    if missing:
        text += f" Not shown (no seed-{seed} run): {', '.join(missing)}."
    return text


def make_report(run_dir, embedding: bool = True, device: str = "auto", embed_samples: int = EMBED_SAMPLES) -> Path:
    """Write accuracy.png, curves.png, embedding.png (unless ``embedding=False``) and report.md into
    ``run_dir/report/``; return the path of report.md.

    ``embed_samples``: test samples embedded per model (a fixed seeded subset; default 500).

    Raises:
        FileNotFoundError: ``run_dir`` has no results.csv (not a kd2m run directory).
    """
    from .bound import load_run
    run_dir = Path(run_dir)
    cfg, rows = load_run(run_dir)
    out = RunDir(run_dir).report_dir
    out.mkdir(parents=True, exist_ok=True)
    dataset = cfg.get("dataset", "")
    fig_ = R.figure_of(rows)
    plot_accuracy(rows, out / "accuracy.png", title=f"{dataset}: test {fig_.name}, mean ± std over seeds")
    logs = read_logs(run_dir, rows)
    plot_curves(logs, out / "curves.png", fig_)
    diagnostics = plot_diagnostics(logs, out / "diagnostics.png")
    if diagnostics is None:
        (out / "diagnostics.png").unlink(missing_ok=True)  # not left over from an earlier report
    embed_text = None
    from ..data import DatasetNotFoundError, dataset_task
    if embedding and dataset_task(cfg["dataset"]) == "lm":
        embedding, embed_text = False, "embedding: not drawn for language models (a t-SNE of token features)"
    if embedding:
        try:
            embed_text = _embedding(run_dir, cfg, rows, out, device, embed_samples)
        except (DatasetNotFoundError, FileNotFoundError) as e:
            embed_text = f"embedding skipped: {e}"
            warnings.warn(embed_text, stacklevel=2)
            (out / "embedding.png").unlink(missing_ok=True)
    _, meta = R.read_reported(run_dir)
    header = (meta.get("header") or f"# kd2m results: {dataset}").split("\n", 1)[-1].strip()
    md = [f"# kd2m report: {dataset}", "", header, "",
          "## Results", "",
          markdown_table(rows, dataset, meta.get("expected_seeds"), meta.get("reference"), meta.get("diverged")),
          note(rows), "",
          f"![test {fig_.name} per method and paired Δ vs CE ({fig_.direction})](accuracy.png)", "",
          "## Training curves", "",
          (f"Test {fig_.name} ({fig_.direction}) and the distillation loss D (per training sample, log scale) per "
           "epoch, mean over seeds."),
          "", "![training curves](curves.png)", ""]
    if diagnostics is not None:
        md += ["## Feature gap during training", "", _diagnostics_text(logs), "",
               "![W2 to the teacher and same-class plan mass per epoch](diagnostics.png)", ""]
    if embed_text is not None:
        md += ["## Feature embedding", "", embed_text, ""]
        if (out / "embedding.png").exists():
            md += ["![feature embedding](embedding.png)", ""]
    bound_md = RunDir(run_dir).bound_md
    if bound_md.is_file():
        body = bound_md.read_text().split("\n", 1)[-1].lstrip()
        md += ["## Theorem 1 on held-out data (`kd2m bound`)", "", body]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(md).rstrip() + "\n")
    return path
