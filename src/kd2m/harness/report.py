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

The figures are drawn by :mod:`kd2m.harness.plots` (matplotlib's Agg canvas on ``Figure``
objects: no pyplot, no global backend switch), so this works headless and inside a user's
interactive session alike.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from ..atomic_io import atomic_write_text, read_jsonl
from ..catalog import CE, TEACHER
from ..features import PENULTIMATE
from . import results as R
from .paired import summarize
from .plots import EMBED_SEED, plot_accuracy, plot_curves, plot_diagnostics, plot_embedding
from .rundir import LOG_JSONL, RunDir
from .tables import markdown_table, note

__all__ = ["make_report", "read_logs", "embedding_features", "best_distilled", "EMBED_SAMPLES"]

#: Test samples embedded per model (a fixed seeded subset of the test set).
EMBED_SAMPLES = 500


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


def embedding_features(model, dataset, indices, device, layer: str = PENULTIMATE) -> np.ndarray:
    """Features of ``model`` (eval mode) at ``layer`` for ``dataset[indices]``, as an (N, d) float32 array."""
    from torch.utils.data import Subset

    from .theorem import model_outputs  # the one held-out pass, also used by `kd2m bound`
    out = model_outputs(model, Subset(dataset, [int(i) for i in indices]), samples=len(indices), device=device,
                        layer=layer)
    return out.feats.float().numpy()


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
        layer = cfg.get("teacher_layer" if m == TEACHER else "student_layer") or PENULTIMATE
        options = cfg.get("teacher_options" if m == TEACHER else "student_options")
        model = load_model(run_dir, by_key[(m, seed)], arch, bundle, dev, options)
        feats = embedding_features(model, bundle.test, idx, dev, layer)
        role = "teacher" if m == TEACHER else "CE-only student" if m == CE else f"{R.label(m)} student"
        panels.append((f"{role} ({arch})\nacc {accs[m]['mean']:.2f}%", feats))
    layers = {cfg.get("teacher_layer") or PENULTIMATE, cfg.get("student_layer") or PENULTIMATE}
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
