"""The experiment grid: seeds × (teacher, CE student, Hinton KD, one student per metric).

Used by ``kd2m run`` (defaults: the embedded digits data) and ``kd2m bench CONFIG`` (the paper's
grid from a YAML file). Finished runs are skipped (their ``final.json`` is the marker), every
finished run is written to ``results.csv`` at once, so a killed grid resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from . import distributed as D
from . import results as R
from .checkpoint import atomic_write_json
from .config import RunConfig
from .data import build_dataset
from .train import Method, build_student, build_teacher, fit, freeze, resolve_device


def methods_for(cfg: RunConfig, suffix: str = "", kd_suffix: str = "") -> list[Method]:
    """The students of one configuration; ``suffix`` tags metric runs (and ``kd_suffix`` the KD
    run) of a sweep value, since only they depend on the swept key."""
    out = []
    for b in cfg.baselines:
        if b == "ce":
            out.append(Method("ce"))
        elif b == "kd":
            out.append(Method("kd" + kd_suffix, kd_weight=cfg.kd_weight))
    out += [Method(m + suffix, metric=m, weight=cfg.weight_for(m)) for m in cfg.metrics]
    return out


def run_grid(cfg: RunConfig, sweep: tuple[str, list] | None = None, log=print) -> list[dict]:
    """Run (or resume) the whole grid; return the results rows of this configuration."""
    cfg = cfg.resolved()
    out = Path(cfg.out)
    if D.is_main():
        _prepare_out(out)
        atomic_write_json(out / "config.json", cfg.to_dict())
    if cfg.threads:  # 0 = torch's default
        torch.set_num_threads(cfg.threads)
    device = resolve_device(D.setup(None if cfg.device == "auto" else cfg.device))
    _check_pairwise_memory(cfg)  # before loading any data: fail fast
    bundle = build_dataset(cfg.dataset, data_root=cfg.data_root, download=cfg.download)

    variants = [(cfg, "")]
    if sweep is not None:
        key, values = sweep
        # a swept λ applies to every metric (per-metric defaults are dropped)
        extra = {"weights": {}} if key == "weight" else {}
        variants = [(dataclasses.replace(cfg, **{key: v}, **extra), f"@{key}={v:g}" if key != "weight" else f"@{v:g}")
                    for v in values]
    csv_path = out / "results.csv"
    rows = R.read_rows(csv_path)
    students, seen = [], set()
    for vcfg, suffix in variants:
        kd_suffix = suffix if sweep is not None and sweep[0] != "weight" else ""
        for m in methods_for(vcfg, suffix, kd_suffix):
            if m.key not in seen:  # baselines that do not depend on the swept key run once
                seen.add(m.key)
                students.append((vcfg, m))
    t_start = time.perf_counter()
    for seed in cfg.seeds:
        # Every run goes through fit(): a finished one returns its final.json at once after
        # checking that it was made with the same settings (so a resumed grid redoes nothing,
        # and a changed config never silently reuses old results).
        teacher = build_teacher(cfg, bundle, seed)
        caches: dict = {}  # this seed's teacher outputs, built once for all its students (teacher_cache > 0)
        for vcfg, method in [(cfg, Method("teacher"))] + students:
            run_dir = out / ("teacher" if method.is_teacher else method.key) / f"seed{seed}"
            earlier = (run_dir / "final.json").exists()
            if method.is_teacher:
                res = fit(teacher, bundle, cfg, method, seed, run_dir, device, epochs=cfg.teacher_epochs,
                          desc=f"teacher s{seed}")
                freeze(teacher)
            else:
                res = fit(build_student(vcfg, bundle, seed), bundle, vcfg, method, seed, run_dir, device,
                          teacher=teacher, desc=f"{method.key} s{seed}", load_finished=False,
                          teacher_caches=caches)
            row = {**res, "dataset": cfg.dataset, "label": R.label(method.key),
                   "run_dir": str(run_dir.relative_to(out))}
            if D.is_main() and not any(R.row_key(r) == R.row_key(row) for r in rows):
                rows = R.upsert(csv_path, row)
            log(f"[{time.perf_counter() - t_start:7.1f}s] seed {seed} {R.label(method.key):<24} "
                f"acc {100 * res['test_acc']:.2f}%" + ("  (finished earlier)" if earlier else ""))
    keys = {"teacher"} | {m.key for _, m in students}
    own = [r for r in R.read_rows(csv_path) if r["method"] in keys and r["seed"] in cfg.seeds] if D.is_main() else rows
    if D.is_main():
        R.write_reports(out, own, cfg.dataset, header=_header(cfg))
        if sweep is not None:
            plot_sweep(own, sweep[0], out / "sweep.png")
    return own


def _prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OSError(f"cannot write to output directory {out}: {e.strerror or e}") from None


def _header(cfg: RunConfig) -> str:
    return (f"# kd2m results: {cfg.dataset}\n\nteacher `{cfg.teacher}` → student `{cfg.student}`, "
            f"{cfg.epochs} epochs (teacher {cfg.teacher_epochs}), batch {cfg.batch_size}, lr {cfg.lr:g} cosine → "
            f"{cfg.lr_min:g}, λ = {_weights_text(cfg)}, seeds {cfg.seeds}. Accuracy on the full test set, mean ± sample "
            "std over seeds.")


def _weights_text(cfg: RunConfig) -> str:
    own = {m: cfg.weight_for(m) for m in cfg.metrics if m in (cfg.weights or {})}
    if not own:
        return f"{cfg.weight:g}"
    return f"{cfg.weight:g} (per metric: " + ", ".join(f"{m} {w:g}" for m, w in own.items()) + ")"


def _check_pairwise_memory(cfg: RunConfig) -> None:
    """Refuse a batch whose O(n²) metric buffers would exceed ``max_pairwise_mb`` (before the OS kills us)."""
    from .metrics.memory import pairwise_bytes
    n = cfg.batch_size * (D.world_size() if cfg.match == "global" else 1)
    for m in cfg.metrics:
        need = pairwise_bytes(m, n) / 2**20
        if need > cfg.max_pairwise_mb:
            raise ValueError(f"metric {m!r} at global batch n={n} needs ~{need:.0f} MiB of O(n²) buffers, over "
                             f"--max-pairwise-mb {cfg.max_pairwise_mb:g}; use a smaller --batch-size, --match local, "
                             "or a linear-memory metric: sliced_w2, or the Gaussian ones (gauss_w2, gauss_cw2, "
                             "gauss_kl, gauss_ckl); sinkhorn is no lighter here (it also holds n×n matrices)")


def plot_sweep(rows: list[dict], key: str, path: Path) -> None:
    """Accuracy (mean ± std over seeds) against the swept value, one line per metric."""
    # A Figure on its own Agg canvas: no pyplot, so the caller's matplotlib backend (a notebook's) is untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines: dict[str, dict[float, list[float]]] = {}
    ce = [100 * r["test_acc"] for r in rows if r["method"] == "ce"]
    for r in rows:
        base, _, val = r["method"].partition("@")
        if not val:
            continue
        v = float(val.split("=")[-1])
        lines.setdefault(base, {}).setdefault(v, []).append(100 * r["test_acc"])
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    import statistics
    for base, pts in sorted(lines.items()):
        xs = sorted(pts)
        ys = [statistics.fmean(pts[x]) for x in xs]
        es = [statistics.stdev(pts[x]) if len(pts[x]) > 1 else 0.0 for x in xs]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=R.label(base))
    if ce:
        ax.axhline(statistics.fmean(ce), color="gray", ls="--", label="student (CE only)")
    ax.set_xscale("log")
    ax.set_xlabel(key if key != "weight" else "λ (distillation weight)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
