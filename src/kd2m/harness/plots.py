"""The figures of a grid's results, drawn with matplotlib's Agg canvas on ``Figure`` objects (no
pyplot, no global backend switch), so they work headless and inside a user's interactive session alike.

:func:`plot_accuracy`, :func:`plot_curves`, :func:`plot_diagnostics` and :func:`plot_embedding`
are the pictures of ``kd2m report`` (:mod:`kd2m.harness.report`); :func:`plot_sweep` is the
``sweep.png`` of a grid with ``--sweep``.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np

from ..catalog import CE, TEACHER
from ..training.methods import method_label
from . import results as R
from .paired import best_separated, summarize, verdict

__all__ = ["plot_accuracy", "plot_curves", "DIAG_PANELS", "diagnostic_curves", "plot_diagnostics", "plot_embedding",
           "plot_sweep", "EMBED_SEED"]

#: the seed of the embedding's fit (and of the report's fixed subset of test samples)
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


def plot_sweep(rows: list[dict], key: str, path: Path):
    """The task's test figure (:func:`kd2m.harness.results.figure_of`: accuracy in %, or perplexity), mean
    ± std over seeds, against the swept value, one line per metric. Returns the figure drawn."""
    figure = R.figure_of(rows)
    lines: dict[str, dict[float, list[float]]] = {}
    ce = [figure.scale * r[figure.key] for r in rows if r["method"] == CE]
    for r in rows:
        base, _, val = r["method"].partition("@")
        if not val:
            continue
        v = float(val.split("=")[-1].replace("auto*", ""))
        lines.setdefault(base, {}).setdefault(v, []).append(figure.scale * r[figure.key])
    fig = _figure((6, 4))  # its own Agg canvas: no pyplot, so the caller's matplotlib backend is untouched
    ax = fig.subplots()
    for base, pts in sorted(lines.items()):
        xs = sorted(pts)
        ys = [statistics.fmean(pts[x]) for x in xs]
        es = [statistics.stdev(pts[x]) if len(pts[x]) > 1 else 0.0 for x in xs]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method_label(base))
    if ce:
        ax.axhline(statistics.fmean(ce), color="gray", ls="--", label="student (CE only)")
    ax.set_xscale("log")
    ax.set_xlabel(key if key != "weight" else "λ (distillation weight)")
    ax.set_ylabel(f"test {figure.name} ({figure.direction})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return fig
