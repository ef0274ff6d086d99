r"""Theorem 1 as a measurement: estimate every term of the bound for a trained teacher/student pair.

For a teacher :math:`h_T\circ g_T` and a student :math:`h_S\circ g_S`, on held-out data
:math:`x_1..x_n \sim P`, :func:`bound_terms` estimates

* the risks :math:`R_T, R_S` (0-1 error) and :math:`|R_S - R_T|`, and the cross-entropy
  risks :math:`\mathbb E\,CE_T, \mathbb E\,CE_S` and their gap — on **all** the data given;
* :math:`W_2(g_S\sharp\hat P, g_T\sharp\hat P)`: exact optimal transport between the two
  empirical feature measures (``kd2m.metrics.get("w2")``, an exact assignment problem; it
  returns :math:`W_2^2`, we report the square root) — on a fixed subset of ``samples`` points;
* :math:`\|g_S - g_T\|_{L^2(\hat P)} = \sqrt{\frac1N\sum_i \|g_S(x_i) - g_T(x_i)\|^2}` on the
  **same** subset, and whether :math:`W_2 \le \|g_S - g_T\|_{L^2(\hat P)}` holds.

:func:`evaluate_run` does this for every student × seed of a run directory against that
seed's teacher and writes ``RUN_DIR/bound.json`` and ``RUN_DIR/bound.md``
(CLI: ``kd2m bound RUN_DIR --samples N``).

What the estimate checks, and what it does not
----------------------------------------------
The chain in the paper is
:math:`|R_{P_S}(h) - R_{P_T}(h)| \overset{\text{Lemma}}{\le} W_2(P_S, P_T)
\overset{\text{coupling}}{\le} \|g_S - g_T\|_{L^2(P)}`.

* **The coupling inequality** :math:`W_2 \le \|g_S - g_T\|_{L^2(P)}` needs only finite second
  moments: :math:`(g_S, g_T)\sharp P` is one coupling of the two feature laws and :math:`W_2`
  is the infimum over couplings. It holds *exactly* for the empirical measures too (the
  identity matching :math:`x_i \mapsto x_i` is a feasible assignment), so a violation beyond
  float rounding would be a bug in the solver or in the bookkeeping. We check it
  (``coupling_holds``, relative tolerance ``TOL``).
* **The Lemma** (Redko et al. 2017) needs a cost induced by an RKHS :math:`\mathcal H_k` with a
  bounded kernel :math:`0 \le k \le K` and a loss with :math:`\|L\|_{\mathcal H_k} \le 1`. We do
  **not** check these, and for our setting they do not hold as stated: the features are ReLU
  vectors compared under the plain Euclidean cost (not a bounded-kernel RKHS distance), and
  the 0-1 loss is not an element of any such RKHS (nor is cross-entropy with a unit norm).
  So :math:`|\Delta R| \le W_2` is **not guaranteed**; we report whether it held empirically
  (``risk_bound_holds``, ``ce_bound_holds``). Note also that the Lemma compares one
  hypothesis :math:`h` on two feature laws, whereas a KD pair has two heads :math:`h_S \ne h_T`;
  and W2 is in feature units while risks are in [0, 1], so "holds" depends on the features'
  scale (rescaling :math:`g` and :math:`h` leaves the risks unchanged and scales W2).
* **Finite samples.** :math:`W_2^2` between two N-point empirical measures is biased upward
  as an estimate of :math:`W_2^2` between the underlying feature laws (joint convexity of
  :math:`W_2^2` and Jensen: :math:`\mathbb E\,W_2^2(\hat P_N, \hat Q_N) \ge W_2^2(P, Q)`), and the
  bias shrinks slowly, like :math:`N^{-2/d}` in dimension d; so compare W2 values only at the
  same N. :math:`\|g_S-g_T\|^2_{L^2(\hat P)}` is
  an unbiased mean with the usual :math:`O(N^{-1/2})` error. The risks are test-set errors with
  binomial standard error :math:`\sqrt{R(1-R)/n}`. Both feature measures are push-forwards of
  the *same* N inputs, so a model measured against itself gives exactly 0, and the empirical
  inequality :math:`W_2 \le \|g_S-g_T\|_{L^2(\hat P_N)}` is exact for every N.
* The features are those the run matched (``student_layer``/``teacher_layer`` of its config,
  default the penultimate layer) in eval mode (BatchNorm running statistics, no dropout).
  Student and teacher features must have the same width for W2 and the L2 distance; when
  they do not (a projector was trained), those terms are skipped and the reason recorded.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import results as R
from .atomic_io import atomic_write_json, atomic_write_text, load_checkpoint, read_json
from .features import FeatureTap
from .rundir import MODEL_PT, RunDir

__all__ = ["bound_terms", "model_outputs", "terms_from_outputs", "evaluate_run", "ModelOutputs", "TOL"]

#: Relative float tolerance for the (exact) coupling inequality W2 ≤ ‖g_S − g_T‖.
TOL = 1e-9
#: Seed of the fixed subset of held-out samples used for the transport terms.
SUBSET_SEED = 0


@dataclass
class ModelOutputs:
    """What :func:`model_outputs` keeps of one model's pass over held-out data.

    ``correct`` and ``ce`` cover all ``n`` samples; ``feats`` (float64, ``(N, d)``) only the
    transport subset ``subset`` (sorted indices into the data), so the same subset of two
    models' outputs pairs the same inputs.
    """
    correct: Tensor   # (n,) bool
    ce: Tensor        # (n,) float64 per-sample cross-entropy
    labels: Tensor    # (n,) int64
    feats: Tensor     # (N, d) float64
    subset: Tensor    # (N,) int64

    @property
    def n(self) -> int:
        return int(self.correct.numel())

    @property
    def risk(self) -> float:
        return 1.0 - float(self.correct.double().mean())


def _batches(data, batch_size: int = 512) -> tuple[Iterable, int | None]:
    """(iterable of (x, y) batches in a fixed order, number of samples or None)."""
    from torch.utils.data import DataLoader, Dataset
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if len(x) != len(y):
            raise ValueError(f"bound_terms: {len(x)} inputs but {len(y)} labels")
        return ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)), len(x)
    if isinstance(data, Dataset):
        data = DataLoader(data, batch_size=batch_size, shuffle=False)
    n = None
    if isinstance(data, DataLoader):
        from torch.utils.data import SequentialSampler
        if data.batch_sampler is not None and not isinstance(data.sampler, SequentialSampler):
            raise ValueError("bound_terms: the DataLoader must not shuffle (teacher and student must see the "
                             "held-out samples in the same order)")
        try:
            n = len(data.dataset)
        except TypeError:
            n = None
    return data, n


def _subset(n: int, samples: int) -> Tensor:
    """Sorted indices of a fixed random subset of ``min(samples, n)`` of ``range(n)``."""
    if samples >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(SUBSET_SEED)
    return torch.randperm(n, generator=g)[:samples].sort().values


@torch.no_grad()
def model_outputs(model: nn.Module, data, samples: int = 1000, device: str | torch.device = "cpu",
                  layer: str = "penultimate") -> ModelOutputs:
    """One pass of ``model`` (in eval mode) over held-out ``data``.

    Args:
        model: any classifier; its features are tapped at ``layer`` (see :class:`kd2m.features.FeatureTap`).
        data: an unshuffled ``DataLoader``, a ``Dataset``, or a pair of tensors ``(x, y)``.
        samples: size N of the fixed subset whose features are kept (all data if N ≥ n).
        device: where to run the model. Its training mode is restored afterwards.
    """
    if samples < 1:
        raise ValueError(f"samples must be ≥ 1, got {samples}")
    device = torch.device(device)
    batches, n = _batches(data)
    keep = None if n is None else torch.zeros(n, dtype=torch.bool).index_fill_(0, _subset(n, samples), True)
    was_training = model.training
    model.eval()
    correct, ce, labels, feats = [], [], [], []
    offset = 0
    try:
        with FeatureTap(model, layer) as tap:
            for x, y in batches:
                x, y = x.to(device), torch.as_tensor(y).to(device)
                logits = model(x).double()
                correct.append((logits.argmax(1) == y).cpu())
                ce.append(F.cross_entropy(logits, y, reduction="none").cpu())
                labels.append(y.cpu())
                f = tap.feature.detach().double().cpu()
                if keep is not None:
                    f = f[keep[offset:offset + len(y)]]
                feats.append(f)
                offset += len(y)
    finally:
        model.train(was_training)
    if offset == 0:
        raise ValueError("bound_terms: the held-out data is empty")
    if n is not None and offset != n:
        raise ValueError(f"bound_terms: the loader yielded {offset} samples but its dataset has {n}")
    feats = torch.cat(feats)
    subset = _subset(offset, samples)
    if n is None:  # length unknown up front: every feature was kept, subsample now
        feats = feats[subset]
    return ModelOutputs(torch.cat(correct), torch.cat(ce), torch.cat(labels), feats, subset)


def terms_from_outputs(teacher: ModelOutputs, student: ModelOutputs, w2_sq: float | None = None) -> dict:
    """Theorem 1's terms from two :func:`model_outputs` on the same data (see :func:`bound_terms`).

    ``w2_sq``: the exact W2² of the two feature sets when the caller has already solved their
    transport plan (:mod:`kd2m.monitor` reads the plan itself); solved here otherwise."""
    if teacher.n != student.n or not torch.equal(teacher.labels, student.labels):
        raise ValueError("bound_terms: teacher and student outputs are not on the same held-out data")
    if not torch.equal(teacher.subset, student.subset):
        raise ValueError("bound_terms: teacher and student transport subsets differ (use the same samples)")
    r_t, r_s = teacher.risk, student.risk
    ce_t, ce_s = float(teacher.ce.mean()), float(student.ce.mean())
    out = {"n": teacher.n, "samples": int(teacher.subset.numel()),
           "risk_teacher": r_t, "risk_student": r_s, "risk_gap": abs(r_s - r_t),
           "ce_teacher": ce_t, "ce_student": ce_s, "ce_gap": abs(ce_s - ce_t),
           "dim_teacher": int(teacher.feats.shape[1]), "dim_student": int(student.feats.shape[1]),
           "w2": None, "w2_sq": None, "l2": None, "coupling_holds": None, "risk_bound_holds": None,
           "ce_bound_holds": None, "skipped": None}
    zs, zt = student.feats, teacher.feats
    if zs.shape[1] != zt.shape[1]:
        out["skipped"] = (f"feature dims differ (student d={zs.shape[1]}, teacher d={zt.shape[1]}): "
                          "W2 and ‖g_S − g_T‖ need features in the same space")
        return out
    from . import metrics
    w2_sq = max(float(metrics.get("w2")(zs, zt) if w2_sq is None else w2_sq), 0.0)
    l2 = math.sqrt(float(((zs - zt) ** 2).sum(1).mean()))
    w2 = math.sqrt(w2_sq)
    out.update(w2=w2, w2_sq=w2_sq, l2=l2, coupling_holds=bool(w2 <= l2 * (1 + TOL) + TOL),
               risk_bound_holds=bool(out["risk_gap"] <= w2), ce_bound_holds=bool(out["ce_gap"] <= w2))
    return out


def bound_terms(teacher: nn.Module, student: nn.Module, loader_or_tensors, samples: int = 1000, *,
                device: str | torch.device = "cpu", teacher_layer: str = "penultimate",
                student_layer: str = "penultimate") -> dict:
    r"""Estimate Theorem 1's terms for one trained pair on held-out data.

    Args:
        teacher, student: trained classifiers (any ``nn.Module`` with a last ``nn.Linear``, or
            name ``*_layer`` explicitly). Their training mode is restored afterwards.
        loader_or_tensors: held-out data: an unshuffled ``DataLoader`` of ``(x, y)``, a
            ``Dataset``, or a pair of tensors ``(x (n, ...), y (n,))``.
        samples: N, the size of the fixed subset (seeded, the same for both models) on which
            the transport terms are computed; exact OT costs :math:`O(N^3)` (N=1000: ~0.1 s).

    Returns:
        dict with ``risk_teacher`` :math:`R_T`, ``risk_student`` :math:`R_S` (0-1 error on all
        n samples), ``risk_gap`` :math:`|R_S - R_T|`, ``ce_teacher``, ``ce_student``,
        ``ce_gap`` (mean cross-entropy and its gap), ``w2`` (:math:`W_2`, exact, on N samples),
        ``w2_sq``, ``l2`` (:math:`\|g_S-g_T\|_{L^2(\hat P)}` on the same N samples),
        ``coupling_holds`` (:math:`W_2 \le \|g_S-g_T\|`, must be True), ``risk_bound_holds`` and
        ``ce_bound_holds`` (:math:`|\Delta R| \le W_2`: not guaranteed, see the module doc),
        ``n``, ``samples``, feature dims, and ``skipped`` (why W2/L2 are None, if they are).

    Example::

        >>> terms = bound_terms(teacher, student, (x_test, y_test), samples=500)  # doctest: +SKIP
        >>> terms["w2"] <= terms["l2"]                                            # doctest: +SKIP
        True
    """
    t = model_outputs(teacher, loader_or_tensors, samples, device, teacher_layer)
    s = model_outputs(student, loader_or_tensors, samples, device, student_layer)
    return terms_from_outputs(t, s)


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
    one) and load the weights of the results row ``row``."""
    from .models import build_model
    path = RunDir(run_dir).run_of_row(row) / MODEL_PT
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (the run of {row['method']} seed {row['seed']} has no weights)")
    model = build_model(name, bundle.num_classes, bundle.in_channels, bundle.image_size, **(options or {}))
    model.load_state_dict(load_checkpoint(path))
    return model.to(device).eval()


def test_loader(bundle, cfg: dict, batch_size: int = 512):
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
    from .data import build_dataset
    from .train import resolve_device
    run_dir = Path(run_dir)
    cfg, rows = load_run(run_dir)
    dev = resolve_device(device)
    bundle = build_dataset(cfg["dataset"], data_root=data_root or cfg.get("data_root"), download=False,
                           augment=False, image_size=cfg.get("image_size"))
    loader = test_loader(bundle, cfg)
    t_layer, s_layer = cfg.get("teacher_layer", "penultimate"), cfg.get("student_layer", "penultimate")
    teachers = {r["seed"]: r for r in rows if r["method"] == "teacher"}
    pairs = []
    for seed in sorted({r["seed"] for r in rows}):
        students = [r for r in rows if r["seed"] == seed and r["method"] != "teacher"]
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
