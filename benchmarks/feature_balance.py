"""Balancing λ at the features instead of the parameters: what it would change, measured at initialisation.

    python benchmarks/feature_balance.py configs/digits.yaml  --seeds 100,101,102 --out DIR
    python benchmarks/feature_balance.py configs/mnist1d.yaml --seeds 100,101,102 --out DIR

`weight: auto` balances the gradient norms on the student's parameters θ (kd2m.training.auto_weight):
λ_θ = E‖∇_θ CE‖ / E‖∇_θ D‖. The issue's alternative balances them on the features f the term reads
(the student's penultimate features here): λ_f = E‖∇_f CE‖ / E‖∇_f D‖, over the same first four
batches of the same initial student. This trains each config's teacher (as the config says; a
teacher already in DIR is reused), then calibrates every distance's student at ``auto`` both ways
(one training epoch each: calibration happens before it) and prints, per distance, the mean of
λ_θ, λ_f and their ratio over the seeds. If the ratio is one number for every distance of a
benchmark, balancing at the features multiplies every λ of that benchmark alike: it can move the
benchmark's K, not the K one metric needs relative to another.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections import defaultdict

from torch.utils.data import DataLoader

import kd2m.harness.trainer as train_module
import kd2m.training.auto_weight as auto_weight
from kd2m.harness.cli import main as kd2m_main
from kd2m.runtime import fork_rng
from kd2m.training.build import IndexedDataset

METRICS = "w2,cw2,jw2,gauss_w2,gauss_cw2,gauss_kl,mmd_rbf"


def feature_scales(step, train_set, batch_size: int) -> list[float | None]:
    """λ_f per term of ``step``: E_b‖∇_f CE(b)‖ / E_b‖∇_f D(b)‖ over the calibration batches,
    f the student's tapped features; the student is left as it was."""
    model = step.net
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    loader = DataLoader(IndexedDataset(train_set), batch_size=batch_size, shuffle=False)
    ce_norm, term_norm = 0.0, [0.0] * len(step.terms)
    try:
        with fork_rng(step.device):
            model.train()
            for b, (x, y, index) in enumerate(loader):
                if b == auto_weight.CALIBRATION_BATCHES:
                    break
                out = step.forward(x, y, index * step.views, amp=None)
                feats = [f for f in out.s_feats.values() if f.requires_grad]
                ce_norm += auto_weight.grad_norm(out.ce, feats)
                for k, v in enumerate(out.values):
                    term_norm[k] += auto_weight.grad_norm(v, feats)
    finally:
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)
    return [step.ce_weight * ce_norm / t if t > 0 else None for t in term_norm]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("--seeds", default="100,101,102")
    p.add_argument("--metrics", default=METRICS)
    p.add_argument("--out", required=True, help="a grid directory (its teacher is reused)")
    a = p.parse_args(argv)
    found = defaultdict(list)  # term -> [(λ_θ, λ_f)]
    real = auto_weight.calibrate

    def both(step, train_set, batch_size, name, channels_last=False):
        scales = real(step, train_set, batch_size, name, channels_last)
        if any(b.config.auto for b in step.terms):
            for b, s, f in zip(step.terms, scales, feature_scales(step, train_set, batch_size)):
                if b.config.auto:
                    found[b.config.name].append((s, f))
        return scales

    train_module.calibrate = both  # the engine's one call site (Trainer._calibrate)
    try:
        rc = kd2m_main(["bench", a.config, "--metrics", a.metrics, "--baselines", "", "--sweep", "auto_weight=1",
                        "--epochs", "1", "--seeds", a.seeds, "--parallel", "1", "--out", a.out])
    finally:
        train_module.calibrate = real
    if rc:
        return rc
    print(f"{'distance':10s} {'λ_θ (params)':>13s} {'λ_f (features)':>15s} {'λ_f / λ_θ':>10s}")
    for term, pairs in found.items():
        # every calibration of a run is recorded (the grid's pre-check and the run's own): equal values
        ratios = [f / s for s, f in pairs if f]
        print(f"{term:10s} {statistics.fmean(s for s, _ in pairs):13.4g} "
              f"{statistics.fmean(f for _, f in pairs if f):15.4g} {math.exp(statistics.fmean(map(math.log, ratios))):10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
