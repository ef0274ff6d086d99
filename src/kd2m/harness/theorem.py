r"""Theorem 1's mathematics as a measurement: every term of the bound for a trained teacher/student pair.

For a teacher :math:`h_T\circ g_T` and a student :math:`h_S\circ g_S`, on held-out data
:math:`x_1..x_n \sim P`, :func:`bound_terms` estimates

* the risks :math:`R_T, R_S` (0-1 error) and :math:`|R_S - R_T|`, and the cross-entropy
  risks :math:`\mathbb E\,CE_T, \mathbb E\,CE_S` and their gap — on **all** the data given;
* :math:`W_2(g_S\sharp\hat P, g_T\sharp\hat P)`: exact optimal transport between the two
  empirical feature measures (``kd2m.metrics.get("w2")``, an exact assignment problem; it
  returns :math:`W_2^2`, we report the square root) — on a fixed subset of ``samples`` points;
* :math:`\|g_S - g_T\|_{L^2(\hat P)} = \sqrt{\frac1N\sum_i \|g_S(x_i) - g_T(x_i)\|^2}` on the
  **same** subset, and whether :math:`W_2 \le \|g_S - g_T\|_{L^2(\hat P)}` holds.

The ``kd2m bound`` command (:mod:`kd2m.harness.bound`) runs this for every student × seed of a run
directory; the per-epoch diagnostics (:mod:`kd2m.harness.monitor`) run it on a fixed held-out batch.

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

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import metrics
from ..catalog import EVAL_BATCH_SIZE
from ..features import PENULTIMATE, FeatureTap

__all__ = ["bound_terms", "model_outputs", "terms_from_outputs", "ModelOutputs", "TOL"]

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


def _batches(data, batch_size: int = EVAL_BATCH_SIZE) -> tuple[Iterable, int | None]:
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
                  layer: str = PENULTIMATE) -> ModelOutputs:
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
    transport plan (:mod:`kd2m.harness.monitor` reads the plan itself); solved here otherwise."""
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
    w2_sq = max(float(metrics.get("w2")(zs, zt) if w2_sq is None else w2_sq), 0.0)
    l2 = math.sqrt(float(((zs - zt) ** 2).sum(1).mean()))
    w2 = math.sqrt(w2_sq)
    out.update(w2=w2, w2_sq=w2_sq, l2=l2, coupling_holds=bool(w2 <= l2 * (1 + TOL) + TOL),
               risk_bound_holds=bool(out["risk_gap"] <= w2), ce_bound_holds=bool(out["ce_gap"] <= w2))
    return out


def bound_terms(teacher: nn.Module, student: nn.Module, loader_or_tensors, samples: int = 1000, *,
                device: str | torch.device = "cpu", teacher_layer: str = PENULTIMATE,
                student_layer: str = PENULTIMATE) -> dict:
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
