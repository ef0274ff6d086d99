"""Peak host memory of one forward + backward of each O(n²) metric, against ``pairwise_bytes``.

    OMP_NUM_THREADS=1 python benchmarks/memory.py                  # n = 4096, d = 512
    OMP_NUM_THREADS=1 python benchmarks/memory.py --n 1024 --timeout 120
    OMP_NUM_THREADS=1 python benchmarks/memory.py --metrics w2,sinkhorn --out results/memory.md

Each metric runs in a fresh subprocess (so one metric's allocator state never hides another's
peak): float32 student features (n, d) requiring grad, float32 teacher features (n, d), 10
classes of labels, (n, 10) logits. The child first calls the metric once at n = 64 (imports,
lazy initialisation), builds the inputs, records its resident set size (VmRSS), resets the
kernel's high-water mark (``/proc/self/clear_refs`` ← 5; if that is refused, the high-water
mark of the warm-up is small anyway), runs forward + backward, and reports VmHWM − the RSS
before the call: the extra resident memory the call needed at its peak, the gradient included.

The parent polls the child's VmHWM while it runs, so a child stopped by ``--timeout`` (gw2 at
n = 4096 runs the exact-OT step of Frank-Wolfe on a 4096² problem many times) still reports a
lower bound ("timed out (≥ X MiB after T s)") instead of hanging the table.

"model MiB" is :func:`kd2m.metrics.memory.pairwise_bytes`, what ``kd2m run`` compares with
``--max-pairwise-mb`` before training; it should be ≥ the measured peak (a conservative model).
Linear-memory metrics (sliced_w2, gauss_w2) are measured for comparison; their model is 0.
CPU only: on CUDA the exact solvers still run on the host, the kernels and Sinkhorn on the GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from host_memory import reset_peak, status_kib
from table_output import emit

QUADRATIC = ["w2", "cw2", "jw2", "gw2", "sinkhorn", "mmd_rbf", "cmmd_rbf"]
LINEAR = ["sliced_w2", "gauss_w2"]
MiB = 2**20


# ----------------------------------------------------------------------------- child
def child(name: str, n: int, d: int, classes: int, seed: int, options: dict) -> None:
    import gc

    import torch

    from kd2m import metrics

    torch.set_num_threads(1)
    fn = metrics.get(name, **options)

    def inputs(m: int):
        g = torch.Generator().manual_seed(seed)
        s = torch.randn(m, d, generator=g).requires_grad_(True)
        t = (1.5 * torch.randn(m, d, generator=g) + 0.5)
        y = torch.randint(0, classes, (m,), generator=g)
        sl, tl = torch.randn(m, classes, generator=g), torch.randn(m, classes, generator=g)
        return s, t, y, sl, tl

    s, t, y, sl, tl = inputs(64)
    fn(s, t, y, sl, tl).backward()             # imports and lazy initialisation, outside the measurement
    del s, t, y, sl, tl
    gc.collect()
    s, t, y, sl, tl = inputs(n)
    base = reset_peak()                       # and VmHWM reset to it
    print(json.dumps({"base_kib": base}), flush=True)
    t0 = time.perf_counter()
    loss = fn(s, t, y, sl, tl)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = status_kib("VmHWM")
    print(json.dumps({"base_kib": base, "peak_kib": peak, "seconds": seconds, "value": float(loss.detach())}),
          flush=True)


# ----------------------------------------------------------------------------- parent
def measure(name: str, n: int, d: int, classes: int, timeout: float, options: str = "{}") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--n", str(n), "--d", str(d),
           "--classes", str(classes), "--options", options]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = proc.stdout.readline()           # the baseline, printed just before the call
    try:
        base = json.loads(first)["base_kib"]
    except (ValueError, KeyError):
        proc.wait()
        return {"error": (proc.stderr.read().strip().splitlines() or ["child failed"])[-1]}
    t0, hwm = time.perf_counter(), 0
    while proc.poll() is None:
        hwm = max(hwm, status_kib("VmHWM", str(proc.pid)) or 0)
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            proc.wait()
            return {"timed_out": True, "seconds": time.perf_counter() - t0, "peak_mib": (hwm - base) / 1024}
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        return {"error": (err.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    res = json.loads(out.strip().splitlines()[-1])
    return {"peak_mib": (res["peak_kib"] - res["base_kib"]) / 1024, "seconds": res["seconds"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="batch size n (student and teacher), default 4096")
    p.add_argument("--d", type=int, default=512, help="feature dimension, default 512")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--metrics", default=",".join(QUADRATIC + LINEAR), help="comma list (default: all measured)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per metric before it is stopped")
    p.add_argument("--options", default="{}", help='metric options as JSON, e.g. \'{"label_cost": "kl"}\' for jw2')
    p.add_argument("--out", help="also write the Markdown table to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.n, args.d, args.classes, args.seed, json.loads(args.options))
        return 0

    from kd2m.metrics.memory import pairwise_bytes

    opts = "" if args.options.strip() in ("", "{}") else f", options {args.options}"
    lines = [f"Peak extra resident memory of one forward + backward, n = {args.n}, d = {args.d}, "
             f"{args.classes} classes, float32 inputs, CPU, one thread{opts}.", "",
             "| metric | peak MiB (measured) | model MiB (`pairwise_bytes`) | model / peak | seconds |",
             "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name in [m.strip() for m in args.metrics.split(",") if m.strip()]:
        r = measure(name, args.n, args.d, args.classes, args.timeout, args.options)
        model = pairwise_bytes(name, args.n) / MiB
        if "error" in r:
            peak, ratio, secs = f"error: {r['error']}", "—", "—"
        elif r.get("timed_out"):
            peak = f"timed out (≥ {r['peak_mib']:.0f} after {r['seconds']:.0f} s)"
            ratio, secs = "—", f"> {args.timeout:g}"
        else:
            peak = f"{r['peak_mib']:.0f}"
            ratio = f"{model / r['peak_mib']:.2f}" if model and r["peak_mib"] > 0 else "—"
            secs = f"{r['seconds']:.1f}"
        line = f"| {name} | {peak} | {model:.0f} | {ratio} | {secs} |"
        lines.append(line)
        print(line, flush=True)
    if args.out:  # the rows were printed as they came
        emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
