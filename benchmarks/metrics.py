"""Forward+backward time of every registered metric, beside POT's equivalent where there is one.

    python benchmarks/metrics.py            # n in {128, 256, 512, 1024}, d = 512
    python benchmarks/metrics.py --quick    # n in {128, 256}, fewer repeats
    python benchmarks/metrics.py --out results/metrics_bench.md --device cuda
    python benchmarks/metrics.py --threads 1     # steadier numbers on a small, shared CPU box
    python benchmarks/metrics.py --features correlated   # student ≈ teacher, as late in training
    python benchmarks/metrics.py --threads 1 --metrics sinkhorn --sizes 512 1024   # ours vs POT and geomloss

Each cell: float32 student features (n, d) requiring grad, float32 teacher features (two
independent Gaussian clouds, the teacher's shifted and anisotropic; with ``--features
correlated`` each teacher row is its student row plus 0.3·noise, the regime of a student that
has learnt to follow its teacher, where exact OT solvers find the plan faster), 10 classes
of labels, random (n, 10) logits; one timed call = forward + backward. Ours and POT's are
warmed up, then timed alternately (ours, POT, ours, POT, ...) so that machine load hits both
alike, and the median is reported. POT runs with its torch backend on the same tensors and
the same options (ε, projections, ridge); where POT has no counterpart the cell shows '—'.

POT counterparts (forward + backward through POT's torch backend):
  w2         ot.emd2(a, b, cdist(s, t)²)
  cw2        mean over classes of ot.emd2 on the class's cdist²
  jw2        ot.emd2 on cdist² + β·2·[y_i ≠ y_j]  (the default label cost)
  gw2        ot.gromov.gromov_wasserstein2(cdist(s, s)², cdist(t, t)²)
  sinkhorn   ot.bregman.empirical_sinkhorn_divergence(s, t, ε, method="sinkhorn_log"),
             same ε, numIterMax = our max_iter, stopThr = our tol (POT's value is the "sharp"
             ⟨γ, C⟩ form and its gradient is autodiff through the iterations: same work, not
             the same estimator)
  sliced_w2  ot.sliced.sliced_wasserstein_distance(s, t, projections=θ, p=2)², same θ
             (ours timed through sliced_w2_projections with that θ)
  gauss_w2   ot.gaussian.empirical_bures_wasserstein_distance(s, t, reg=r)², r = our ridge
  gauss_cw2  mean over classes of the above

geomloss counterpart (an extra row per n for sinkhorn, "sinkhorn vs geomloss"):
  geomloss.SamplesLoss("sinkhorn", p=2, blur=√(ε/2), scaling=σ, debias=True, backend="tensorized"),
  value × 2. geomloss's cost is ‖x−y‖²/2 and its temperature blur^p, and
  OT_{ε/2}(C/2) = ½ OT_ε(C) for the same plan, so 2·geomloss(blur = √(ε/2)) is our S_ε with
  C = ‖x−y‖². geomloss runs a fixed ε-scaling schedule (from diameter² down by σ² per
  iteration) with no convergence check, so its accuracy is set by σ: the row uses the
  coarsest σ in GEOMLOSS_SCALINGS whose value is within 1e-7 (relative) of our converged
  value (tol 1e-12, float64; computed once per cell, untimed), and names σ and the difference.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import ot
import torch
from table_output import emit

from kd2m import metrics

EXPECTED = ["w2", "cw2", "jw2", "gw2", "sinkhorn", "sliced_w2", "gauss_w2", "gauss_cw2", "gauss_kl",
            "gauss_ckl", "mmd_linear", "mmd_rbf", "cmmd_rbf"]
D, N_CLASSES = 512, 10


def make_batch(n: int, seed: int, device: str, features: str = "independent"):
    g = torch.Generator().manual_seed(seed)
    # independent random clouds (the harder assignment problems; a student correlated with its
    # teacher makes exact OT easier for both solvers): teacher shifted and anisotropic
    s = torch.randn(n, D, generator=g)
    if features == "correlated":
        t = s + 0.3 * torch.randn(n, D, generator=g)
    else:
        t = torch.randn(n, D, generator=g) * torch.linspace(0.5, 1.5, D) + 0.2
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    sl = torch.randn(n, N_CLASSES, generator=g)
    tl = torch.randn(n, N_CLASSES, generator=g)
    return (s.to(device).requires_grad_(), t.to(device), y.to(device), sl.to(device).requires_grad_(), tl.to(device))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], torch.Tensor], leaves, device: str) -> float:
    for x in leaves:
        x.grad = None
    _sync(device)
    t0 = time.perf_counter()
    fn().backward()
    _sync(device)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- POT counterparts
def _sqcdist(x, y):
    return torch.cdist(x, y) ** 2


def _unif(n, like):
    return torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device)


def pot_counterpart(name: str, batch, opts: dict):
    """(callable, note) computing POT's version of ``name``; None where POT has none."""
    s, t, y, sl, tl = batch
    n = s.shape[0]
    if name == "w2":
        return lambda: ot.emd2(_unif(n, s), _unif(n, t), _sqcdist(s, t))
    if name == "cw2":
        groups = [torch.nonzero(y == c).flatten() for c in torch.unique(y)]

        def f():
            vals = [ot.emd2(_unif(len(i), s), _unif(len(i), t), _sqcdist(s[i], t[i])) for i in groups]
            return torch.stack(vals).mean()
        return f
    if name == "jw2":
        lab = 2.0 * (y[:, None] != y[None, :]).to(s.dtype)
        return lambda: ot.emd2(_unif(n, s), _unif(n, t), _sqcdist(s, t) + 1.0 * lab)
    if name == "gw2":
        return lambda: ot.gromov.gromov_wasserstein2(_sqcdist(s, s), _sqcdist(t, t), _unif(n, s), _unif(n, t))
    if name == "sinkhorn":
        return lambda: ot.bregman.empirical_sinkhorn_divergence(
            s, t, opts["eps"], numIterMax=opts["max_iter"], stopThr=opts["tol"], method="sinkhorn_log")
    if name == "sliced_w2":
        theta = opts["projections"]
        return lambda: ot.sliced.sliced_wasserstein_distance(s, t, projections=theta, p=2) ** 2
    if name == "gauss_w2":
        return lambda: ot.gaussian.empirical_bures_wasserstein_distance(s, t, reg=opts["reg"]) ** 2
    if name == "gauss_cw2":
        groups = [torch.nonzero(y == c).flatten() for c in torch.unique(y)]
        return lambda: torch.stack([ot.gaussian.empirical_bures_wasserstein_distance(s[i], t[i], reg=opts["reg"]) ** 2
                                    for i in groups]).mean()
    return None


def ours(name: str, batch, opts: dict):
    s, t, y, sl, tl = batch
    if name == "sliced_w2":
        from kd2m.metrics.sliced import sliced_w2_projections
        theta = opts["projections"]
        return lambda: sliced_w2_projections(s, t, theta)
    m = metrics.get(name, **opts.get("ours", {}))
    return lambda: m(s, t, y, sl, tl)


def shared_options(name: str, batch) -> dict:
    """Options both sides must agree on, computed once per cell from the batch."""
    s, t = batch[0].detach(), batch[1]
    if name == "sinkhorn":
        from kd2m.metrics._base import sqdist
        from kd2m.metrics.entropic import default_eps
        s64, t64 = s.double(), t.double()
        eps = default_eps(sqdist(s64, s64), sqdist(t64, t64))
        return {"eps": eps, "max_iter": 1000, "tol": 1e-6, "ours": {"eps": eps}}
    if name == "sliced_w2":
        from kd2m.metrics.sliced import random_projections
        return {"projections": random_projections(D, 128, seed=0, device=s.device, dtype=s.dtype)}
    if name in ("gauss_w2", "gauss_cw2"):
        # POT's reg is absolute; ours is ridge·τ (τ = mean pooled channel variance), so pass that r
        ridge = metrics.spec(name).fn.__wrapped__.__kwdefaults__.get("ridge", 1e-5)
        try:
            from kd2m.metrics.linalg import ridge_scale
            r = float(ridge_scale(s, t, ridge))
        except ImportError:
            r = ridge * float(torch.cat([s, t]).double().var(0, unbiased=False).mean())
        return {"reg": r}
    return {}


# ----------------------------------------------------------------------------- geomloss counterpart
GEOMLOSS_SCALINGS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995)
GEOMLOSS_MATCH = 1e-7


def geomloss_counterpart(batch, opts: dict):
    """(callable, scaling, relative difference) for geomloss's debiased Sinkhorn at our ε.

    The scaling is the coarsest that brings geomloss within GEOMLOSS_MATCH of our converged value
    (or the finest tried, with its difference, when none does)."""
    from geomloss import SamplesLoss

    from kd2m.metrics.entropic import sinkhorn
    s, t = batch[0], batch[1]
    eps = opts["eps"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = float(sinkhorn(s.detach().double(), t.double(), eps=eps, tol=1e-12, max_iter=100_000))
    for scaling in GEOMLOSS_SCALINGS:
        loss = SamplesLoss("sinkhorn", p=2, blur=(eps / 2) ** 0.5, scaling=scaling, debias=True, backend="tensorized")
        with torch.no_grad():
            diff = abs(2.0 * float(loss(s, t)) / ref - 1.0)
        if diff <= GEOMLOSS_MATCH:
            break
    return (lambda: 2.0 * loss(s, t)), scaling, diff


def bench_geomloss_cell(n: int, repeats: int, budget_s: float, device: str,
                        features: str = "independent") -> tuple[str, str, str, str]:
    """Our sinkhorn against geomloss at the same ε and matched accuracy, timed interleaved."""
    batch = make_batch(n, seed=n, device=device, features=features)
    leaves = (batch[0],)
    opts = shared_options("sinkhorn", batch)
    f_ours = ours("sinkhorn", batch, opts)
    f_geo, scaling, diff = geomloss_counterpart(batch, opts)
    warm = timed(f_ours, leaves, device) + timed(f_geo, leaves, device)
    reps = max(3, min(repeats, int(budget_s / max(warm, 1e-9))))
    t_ours, t_geo = [], []
    for _ in range(reps):
        t_ours.append(timed(f_ours, leaves, device))
        t_geo.append(timed(f_geo, leaves, device))
    mo, mg = 1e3 * statistics.median(t_ours), 1e3 * statistics.median(t_geo)
    return f"sinkhorn vs geomloss (scaling {scaling}, value diff {diff:.1e})", f"{mo:.2f}", f"{mg:.2f}", f"{mo / mg:.2f}"


# ----------------------------------------------------------------------------- driver
def bench_cell(name: str, n: int, repeats: int, budget_s: float, device: str,
               features: str = "independent") -> tuple[str, str, str]:
    batch = make_batch(n, seed=n, device=device, features=features)
    leaves = (batch[0], batch[3])
    opts = shared_options(name, batch)
    f_ours = ours(name, batch, opts)
    f_pot = pot_counterpart(name, batch, opts)
    # warm-up (allocations, lazy imports, POT's backend dispatch) and a time estimate
    warm = timed(f_ours, leaves, device) + (timed(f_pot, leaves, device) if f_pot else 0.0)
    reps = max(3, min(repeats, int(budget_s / max(warm, 1e-9))))
    t_ours, t_pot = [], []
    for _ in range(reps):
        t_ours.append(timed(f_ours, leaves, device))
        if f_pot:
            t_pot.append(timed(f_pot, leaves, device))
    mo = 1e3 * statistics.median(t_ours)
    if not f_pot:
        return f"{mo:.2f}", "—", "—"
    mp = 1e3 * statistics.median(t_pot)
    return f"{mo:.2f}", f"{mp:.2f}", f"{mo / mp:.2f}"


def _has_geomloss() -> bool:
    import importlib.util
    return importlib.util.find_spec("geomloss") is not None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="n in {128, 256} and fewer repeats")
    ap.add_argument("--out", help="also write the Markdown table to this file")
    ap.add_argument("--device", default="cpu", help="torch device for the features (default cpu)")
    ap.add_argument("--metrics", nargs="*", help="only these metrics (default: all)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice). On a "
                    "small shared machine use 1: a busy core makes every multi-threaded op wait for a "
                    "descheduled worker, adding 5-50 ms stalls to both sides at random")
    ap.add_argument("--features", choices=["independent", "correlated"], default="independent",
                    help="teacher features independent of the student's (default) or student + 0.3·noise")
    ap.add_argument("--sizes", type=int, nargs="*", help="batch sizes n (default 128 256 512 1024)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.sizes or ([128, 256] if args.quick else [128, 256, 512, 1024])
    repeats, budget = (3, 2.0) if args.quick else (9, 8.0)

    names = args.metrics or sorted(set(EXPECTED) | set(metrics.available()), key=lambda m: (
        EXPECTED.index(m) if m in EXPECTED else len(EXPECTED), m))
    registered = set(metrics.available())
    header = (f"Forward+backward time per call, d = {D}, float32 features on {args.device}, "
              f"{args.features} student/teacher features, {torch.get_num_threads()} torch threads; median of interleaved repeats "
              f"(torch {torch.__version__}, POT {ot.__version__}).\n\n"
              "Rows 'sinkhorn vs geomloss': the counterpart column is geomloss at matched accuracy "
              "(module doc).\n\n"
              "| metric | n | ours ms | POT ms | ours/POT |\n|---|---:|---:|---:|---:|")
    rows = []
    warnings.simplefilter("once")
    for name in names:
        for n in sizes:
            if name not in registered:
                cells = ("not registered", "—", "—")
            else:
                try:
                    cells = bench_cell(name, n, repeats, budget, args.device, args.features)
                except Exception as err:  # a benchmark reports a broken metric, it does not stop
                    cells = (f"error: {type(err).__name__}: {err}".replace("|", "/")[:120], "—", "—")
            row = f"| {name} | {n} | {cells[0]} | {cells[1]} | {cells[2]} |"
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
            if name == "sinkhorn" and name in registered and _has_geomloss():
                try:
                    label, *cells = bench_geomloss_cell(n, repeats, budget, args.device, args.features)
                except Exception as err:
                    label, cells = "sinkhorn vs geomloss", (f"error: {type(err).__name__}: {err}"[:120], "—", "—")
                row = f"| {label} | {n} | {cells[0]} | {cells[1]} | {cells[2]} |"
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
    emit(header + "\n" + "\n".join(rows) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
