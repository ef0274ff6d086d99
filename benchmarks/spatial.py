"""Time and peak memory of ``KD2MLoss(unit="spatial")``: batched over images vs a per-image loop.

    OMP_NUM_THREADS=1 python benchmarks/spatial.py                      # n = 128, 8×8×256 maps
    OMP_NUM_THREADS=1 python benchmarks/spatial.py --n 32 --repeats 2 --out results/spatial.md

For each metric (gauss_w2 full and diagonal, mmd_rbf, sliced_w2) and each mode, a fresh
subprocess warms up on 2 images, builds float32 student maps (n, c, h, w) requiring grad and
teacher maps of the same shape, measures the extra resident memory at the peak of one forward +
backward (VmHWM after resetting the high-water mark, minus the RSS before; as in
``benchmarks/memory.py``), then times ``--repeats`` more passes (median reported).

Modes: ``batched`` is ``KD2MLoss(metric, unit="spatial")``; ``loop`` is the oracle of the
tests: ``metrics.get(metric)`` on each image's (h·w, c) samples in a Python loop, averaged.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from host_memory import reset_peak, status_kib
from table_output import emit

CASES = [("gauss_w2", {}), ("gauss_w2", {"diagonal": True}), ("mmd_rbf", {}), ("sliced_w2", {})]
MiB = 2**20


def child(metric: str, options: dict, mode: str, n: int, c: int, h: int, w: int, repeats: int) -> dict:
    import statistics
    import time

    import torch

    from kd2m import KD2MLoss, metrics
    torch.set_num_threads(1)
    loss = KD2MLoss(metric, unit="spatial", **options)
    m = metrics.get(metric, **options)

    def step(s, t):
        s.grad = None
        if mode == "batched":
            value = loss(s, t)
        else:
            value = torch.stack([m(s[i].flatten(1).T, t[i].flatten(1).T) for i in range(s.shape[0])]).mean()
        value.backward()

    def maps(k):
        g = torch.Generator().manual_seed(k)
        return (torch.randn(k, c, h, w, generator=g).requires_grad_(True),
                torch.randn(k, c, h, w, generator=g) + 0.5)

    step(*maps(2))  # warm-up on 2 images: imports, lazy initialisation, without pre-growing the heap
    s, t = maps(n)
    rss = reset_peak()
    step(s, t)
    peak = (status_kib("VmHWM") - rss) * 1024 / MiB
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(s, t)
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak_mib": max(peak, 0.0)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--c", type=int, default=256)
    p.add_argument("--hw", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="also write the Markdown table here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        metric, options, mode = json.loads(a.child)
        print(json.dumps(child(metric, options, mode, a.n, a.c, a.hw, a.hw, a.repeats)))
        return
    rows = [f"unit='spatial', n = {a.n} images, {a.hw}×{a.hw}×{a.c} float32 maps, forward + backward, "
            f"1 thread, median of {a.repeats}", "",
            "| metric | batched s | loop s | speed-up | batched peak MiB | loop peak MiB |", "|---|---|---|---|---|---|"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for metric, options in CASES:
        res = {}
        for mode in ("batched", "loop"):
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps([metric, options, mode]),
                                  "--n", str(a.n), "--c", str(a.c), "--hw", str(a.hw), "--repeats", str(a.repeats)],
                                 capture_output=True, text=True, env=env, check=True)
            res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        label = metric + "".join(f" {k}={v}" for k, v in options.items())
        b, lp = res["batched"], res["loop"]
        rows.append(f"| {label} | {b['seconds']:.3f} | {lp['seconds']:.3f} | {lp['seconds'] / b['seconds']:.1f}× | "
                    f"{b['peak_mib']:.0f} | {lp['peak_mib']:.0f} |")
        print(rows[-1], flush=True)
    print()
    emit("\n".join(rows), a.out)


if __name__ == "__main__":
    main()
