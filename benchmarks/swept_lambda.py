"""Which λ a hand sweep on tuning seeds picks, per distance: the rule behind configs/mnist1d-swept.yaml.

    kd2m bench configs/mnist1d.yaml --sweep auto_weight=0.1,0.3,1,3,10 --baselines ce --seeds 100,101,102 --out DIR
    python benchmarks/swept_lambda.py DIR

reads every ``METRIC@auto*K/seedS/final.json`` of that sweep and prints, per metric, the mean test
accuracy over the seeds for each K, the best K (a K whose run diverged on any seed is out: a λ that
diverges is no candidate), and the fixed λ a hand-tuner would then write: best K × the mean
calibrated scale on those seeds (``auto_scales`` in final.json), to one significant digit. Last,
the ``weights:`` line for a config, and the mean accuracy over all metrics per K (what a single
global K would give on these seeds).

    python benchmarks/swept_lambda.py DIR --as-k w2=0.01,cw2=0.1

reads a fixed λ the other way: in units of the mean calibrated scale of the sweep's runs, i.e. the
K of ``auto*K`` that λ amounts to on that benchmark (how the README compares the digits' swept λ
with MNIST-1D's best K).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

VARIANT = re.compile(r"^(?P<metric>[a-z0-9_]+)@auto\*(?P<k>[0-9.eE+-]+)$")


def read_sweep(root: Path) -> dict:
    """{metric: {K: {seed: (test_acc, calibrated scale) or None if the run did not finish}}}."""
    found: dict = {}
    for d in sorted(root.iterdir()):
        m = VARIANT.match(d.name)
        if not m or not d.is_dir():
            continue
        metric, k = m["metric"], float(m["k"])
        for seed_dir in sorted(d.glob("seed*")):
            final = seed_dir / "final.json"
            run = None
            if final.exists():
                res = json.loads(final.read_text())
                run = (res["test_acc"], res["auto_scales"][metric])
            found.setdefault(metric, {}).setdefault(k, {})[int(seed_dir.name[4:])] = run
    return found


def mean_scale(runs_by_k: dict) -> float:
    """The mean calibrated scale over the finished runs (it does not depend on K: calibration
    measures the pull at K = 1, and K multiplies it)."""
    return statistics.fmean(r[1] for runs in runs_by_k.values() for r in runs.values() if r)


def pick(runs_by_k: dict) -> tuple[dict, float, float]:
    """(mean accuracy per K, None where a seed diverged; the best K; its fixed λ to 1 significant digit)."""
    seeds = set().union(*(r.keys() for r in runs_by_k.values()))
    means = {}
    for k, runs in sorted(runs_by_k.items()):
        done = [runs.get(s) for s in seeds]
        means[k] = statistics.fmean(r[0] for r in done) if all(done) else None
    candidates = {k: v for k, v in means.items() if v is not None}
    if not candidates:
        raise SystemExit("no K finished on every seed")
    best = max(candidates, key=candidates.get)
    return means, best, float(f"{best * mean_scale(runs_by_k):.1g}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sweep_dir")
    p.add_argument("--as-k", metavar="METRIC=λ,...", help="print each fixed λ as the K it amounts to here")
    a = p.parse_args(argv)
    sweep = read_sweep(Path(a.sweep_dir))
    if not sweep:
        raise SystemExit(f"{a.sweep_dir}: no METRIC@auto*K run directories (made by --sweep auto_weight=...)")
    if a.as_k:
        for item in a.as_k.split(","):
            metric, lam = item.split("=")
            if metric not in sweep:
                raise SystemExit(f"--as-k: no {metric}@auto*K runs in {a.sweep_dir}")
            print(f"{metric:10s} λ = {float(lam):g} is K = {float(lam) / mean_scale(sweep[metric]):.3g}")
        return 0
    weights, per_k = {}, {}
    for metric, runs_by_k in sweep.items():
        means, best, lam = pick(runs_by_k)
        weights[metric] = lam
        for k, v in means.items():
            per_k.setdefault(k, []).append(v)
        cells = ", ".join(f"K={k:g}: " + ("diverged" if v is None else f"{100 * v:.2f}") for k, v in means.items())
        print(f"{metric:10s} {cells}  → best K={best:g}, λ = {lam:g}")
    print("weights: {" + ", ".join(f"{m}: {w:g}" for m, w in weights.items()) + "}")
    for k, vs in sorted(per_k.items()):
        ok = [v for v in vs if v is not None]
        print(f"global K={k:g}: mean over {len(ok)}/{len(vs)} metrics "
              + (f"{100 * statistics.fmean(ok):.2f}%" if ok else "—") + (" (some diverged)" if len(ok) < len(vs) else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
