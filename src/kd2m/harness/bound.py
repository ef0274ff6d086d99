"""``kd2m bound RUN_DIR``: Theorem 1's terms (:mod:`kd2m.harness.theorem`) for every student × seed of a
run directory against that seed's teacher, written to ``RUN_DIR/bound.json`` and
``RUN_DIR/bound.md`` (CLI: ``kd2m bound RUN_DIR --samples N``). The mathematics, and what the
estimate checks and what it does not, are in :mod:`kd2m.harness.theorem`.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from torch import nn

from .. import tasks
from ..atomic_io import atomic_write_json, atomic_write_text, load_checkpoint, read_json
from ..catalog import EVAL_BATCH_SIZE, TEACHER
from ..features import PENULTIMATE
from ..runtime import resolve_device
from . import results as R
from .rundir import FINAL_JSON, MODEL_PT, RunDir
from .theorem import TOL, model_outputs, terms_from_outputs

__all__ = ["evaluate_run", "load_run", "load_model", "test_loader", "summarize", "markdown"]


# ----------------------------------------------------------------------------- a run directory
def load_run(run_dir: str | Path) -> tuple[dict, list[dict]]:
    """(config dict, results rows) of a run directory; a clear error if it is not one."""
    layout = RunDir(run_dir)
    run_dir, csv_path, cfg_path = layout.root, layout.results_csv, layout.config_json
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path} not found: {run_dir} is not a finished kd2m run directory "
                                "(make one with `kd2m run --out DIR` or `kd2m bench CONFIG`)")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {run_dir} has results but no config.json")
    rows, _ = R.read_reported(run_dir)  # the rows results.md was made from, not stale ones of other settings
    if not rows:
        raise ValueError(f"{csv_path} has no results rows yet")
    cfg = read_json(cfg_path, "rerun the grid's command to rewrite it")
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: not a kd2m config (expected a JSON object); rerun the grid's command to "
                         "rewrite it")
    return cfg, rows


def load_model(run_dir: Path, row: dict, name: str, bundle, device, options: dict | None = None) -> nn.Module:
    """Rebuild model ``name`` with its constructor ``options`` (the run's ``teacher_options`` or
    ``student_options``: a ViT built with ``patch_size: 2`` has other weights than the default
    one) and load the weights of the results row ``row``: its ``model.pt``, or the pretrained
    file its final.json references in place of one (a teacher no epoch trained)."""
    from ..models import build_model
    run = RunDir(run_dir).run_of_row(row)
    path = run / MODEL_PT
    if not path.is_file():
        result = read_json(run / FINAL_JSON, "rerun the grid's command") if (run / FINAL_JSON).is_file() else None
        if isinstance(result, dict) and isinstance(result.get("weights"), dict):
            from ..training.build import build_referenced
            return build_referenced(result["weights"], name, bundle, options).to(device).eval()
        raise FileNotFoundError(f"{path} not found (the run of {row['method']} seed {row['seed']} has no weights)")
    model = build_model(name, bundle.num_classes, bundle.in_channels, bundle.image_size, **(options or {}))
    model.load_state_dict(load_checkpoint(path))
    return model.to(device).eval()


def test_loader(bundle, cfg: dict, batch_size: int = EVAL_BATCH_SIZE):
    from torch.utils.data import DataLoader
    return DataLoader(bundle.test, batch_size=batch_size, shuffle=False, num_workers=min(cfg.get("num_workers") or 0, 4))


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarize(pairs: list[dict]) -> list[dict]:
    """Per method (first-seen order): means over seeds and how many seeds satisfied each inequality."""
    groups: dict[str, list[dict]] = {}
    for p in pairs:
        groups.setdefault(p["method"], []).append(p)
    out = []
    for method, ps in groups.items():
        row = {"method": method, "label": R.label(method), "seeds": len(ps)}
        for key in ("risk_student", "risk_teacher", "risk_gap", "ce_gap", "w2", "l2"):
            row[key] = _mean(p[key] for p in ps)
        for key in ("coupling_holds", "risk_bound_holds", "ce_bound_holds"):
            checked = [p[key] for p in ps if p[key] is not None]
            row[key] = f"{sum(checked)}/{len(checked)}" if checked else "—"
        row["skipped"] = next((p["skipped"] for p in ps if p["skipped"]), None)
        out.append(row)
    return out


def markdown(summary: list[dict]) -> str:
    def f(v, digits=4):
        return "—" if v is None else f"{v:.{digits}f}"
    lines = ["| method | seeds | R_S | R_T | \\|ΔR\\| | \\|ΔCE\\| | W2 | ‖g_S−g_T‖ | W2 ≤ ‖g_S−g_T‖ | \\|ΔR\\| ≤ W2 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['label']} | {s['seeds']} | {f(s['risk_student'])} | {f(s['risk_teacher'])} | "
                     f"{f(s['risk_gap'])} | {f(s['ce_gap'])} | {f(s['w2'], 3)} | {f(s['l2'], 3)} | "
                     f"{s['coupling_holds']} | {s['risk_bound_holds']} |")
    return "\n".join(lines) + "\n"


NOTES = """\
R = 0-1 test error over the whole test set (n samples); |ΔCE| = gap of the mean test cross-entropy.
W2 = exact 2-Wasserstein distance between the N-sample empirical feature measures; ‖g_S−g_T‖ =
sqrt(mean_i ‖g_S(x_i) − g_T(x_i)‖²) on the same N samples. Means over seeds; the last two columns
count the seeds where the inequality held. W2 ≤ ‖g_S−g_T‖ is exact (the identity coupling) and must
always hold. |ΔR| ≤ W2 is Theorem 1's Lemma, whose assumptions (a bounded-kernel RKHS cost, a loss of
RKHS norm ≤ 1) our setting does not meet (Euclidean cost on ReLU features, 0-1 loss), so it is only
an empirical observation here; W2 is in feature units, risks in [0, 1]. See docs/bound.md.
"""


def evaluate_run(run_dir: str | Path, samples: int = 1000, device: str = "auto",
                 data_root: str | None = None) -> tuple[str, Path]:
    """Theorem 1's terms for every student × seed of ``run_dir`` against that seed's teacher.

    Writes ``run_dir/bound.json`` (every pair, the per-method summary, the settings) and
    ``run_dir/bound.md``; returns (the Markdown table, the path of bound.json).
    """
    from ..data import build_dataset
    run_dir = Path(run_dir)
    cfg, rows = load_run(run_dir)
    from ..data import dataset_task
    task = tasks.get(dataset_task(cfg["dataset"]))
    if not task.diagnostics:  # Theorem 1 is about a classifier's risk on pooled features (Task.diagnostics)
        raise ValueError(f"kd2m bound: Theorem 1 bounds a classifier's risk; {run_dir} trained a {task.name} task "
                         f"({cfg['dataset']}): its paired test {task.figure_name} is in results.md")
    dev = resolve_device(device)
    bundle = build_dataset(cfg["dataset"], data_root=data_root or cfg.get("data_root"), download=False,
                           augment=False, image_size=cfg.get("image_size"), holdout=cfg.get("holdout") or 0.0)
    loader = test_loader(bundle, cfg)
    t_layer, s_layer = cfg.get("teacher_layer", PENULTIMATE), cfg.get("student_layer", PENULTIMATE)
    teachers = {r["seed"]: r for r in rows if r["method"] == TEACHER}
    pairs = []
    for seed in sorted({r["seed"] for r in rows}):
        students = [r for r in rows if r["seed"] == seed and r["method"] != TEACHER]
        if not students:
            continue
        if seed not in teachers:
            raise ValueError(f"{run_dir}: seed {seed} has students but no teacher row in results.csv")
        teacher = load_model(run_dir, teachers[seed], cfg["teacher"], bundle, dev, cfg.get("teacher_options"))
        t_out = model_outputs(teacher, loader, samples, dev, t_layer)
        del teacher
        for r in students:
            student = load_model(run_dir, r, cfg["student"], bundle, dev, cfg.get("student_options"))
            terms = terms_from_outputs(t_out, model_outputs(student, loader, samples, dev, s_layer))
            terms.update(method=r["method"], seed=seed, acc_results=r["test_acc"],
                         acc_results_teacher=teachers[seed]["test_acc"])
            pairs.append(terms)
    if not pairs:
        raise ValueError(f"{run_dir}: results.csv has no student runs to compare with a teacher")
    summary = summarize(pairs)
    table = markdown(summary)
    skipped = sorted({p["skipped"] for p in pairs if p["skipped"]})
    n, n_ot = pairs[0]["n"], pairs[0]["samples"]
    header = (f"# Theorem 1 on held-out data: {cfg['dataset']}\n\nteacher `{cfg['teacher']}` → student "
              f"`{cfg['student']}`; risks on the n = {n} test samples, transport terms on N = {n_ot} of them "
              f"(features: teacher `{t_layer}`, student `{s_layer}`).\n\n")
    md = header + table + "\n" + NOTES + "".join(f"\nSkipped: {s}\n" for s in skipped)
    json_path = RunDir(run_dir).bound_json
    atomic_write_json(json_path, {"run_dir": str(run_dir), "dataset": cfg["dataset"], "samples": samples,
                                  "n_test": n, "n_transport": n_ot, "teacher_layer": t_layer,
                                  "student_layer": s_layer, "tolerance": TOL, "pairs": pairs, "summary": summary})
    atomic_write_text(RunDir(run_dir).bound_md, md)
    return table, json_path
