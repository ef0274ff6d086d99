"""Training throughput: plain student steps vs distillation steps per metric, as ratios in one run.

    python benchmarks/throughput.py                       # CPU, CIFAR-size ResNet-18 student / ResNet-34 teacher
    python benchmarks/throughput.py --device cuda --amp bf16 --channels-last
    python benchmarks/throughput.py --student digits_mlp --teacher digits_cnn --image-size 8 --channels 1

Every configuration runs the same number of optimizer steps on the same synthetic batch
(random images, so data loading is excluded), interleaved round-robin over several rounds so
drift on a shared machine hits all of them alike; the median images/s per configuration is
reported with its ratio to the plain (CE-only) student. Two reference rows separate what the
metric costs from what the teacher's forward pass costs (any online distillation pays it):
``ce+teacher`` (CE plus a teacher forward, no distance) and each metric.

``--teacher-mode cached`` rows measure the steady state of ``--teacher-cache K`` (offline
distillation): the teacher's features and logits are looked up by key from a precomputed
table, as the engine does, instead of being computed every step. The one-off cost of filling
the table (K teacher passes over the training set) is not in these rows.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kd2m import KD2MLoss
from kd2m.features import FeatureTap
from kd2m.models import build_model
from kd2m.runtime import autocast
from kd2m.teacher_cache import TeacherCache

DEFAULT_METRICS = "w2,cw2,jw2,gauss_w2,gauss_cw2,gauss_kl,mmd_rbf,sliced_w2,sinkhorn"
EXACT_OT = {"w2", "cw2", "jw2", "gw2"}


def make_step(kind, student, teacher, s_tap, t_tap, opt, x, y, amp_dtype, metric=None, cache=None, keys=None):
    """One optimizer step; ``kind`` is "ce" (no teacher), "online" (teacher forward) or "cached" (lookup)."""
    loss_fn = KD2MLoss(metric, weight=1e-4) if metric else None

    def step():
        t_feats = t_logits = None
        if kind == "cached":
            t_feats, t_logits = cache.lookup(keys)
        with autocast(x.device, amp_dtype):
            logits = student(x)
            loss = F.cross_entropy(logits.float(), y)
            if kind == "online":
                with torch.no_grad():
                    t_logits = teacher(x)
                t_feats = t_tap.feature
        if loss_fn is not None:
            loss = loss + loss_fn(s_tap.feature, t_feats, y, logits, t_logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="cifar_resnet18")
    p.add_argument("--teacher", default="cifar_resnet34")
    p.add_argument("--metrics", default=DEFAULT_METRICS)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=3, help="steps per configuration per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=["none", "bf16"], default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--teacher-mode", default="online,cached",
                   help="teacher modes for the metric rows: online (forward every step), cached (--teacher-cache lookup)")
    p.add_argument("--out", help="also write the Markdown table here")
    a = p.parse_args(argv)

    device = torch.device(a.device)
    torch.manual_seed(0)
    amp_dtype = torch.bfloat16 if a.amp == "bf16" else None
    student = build_model(a.student, a.classes, a.channels, a.image_size).to(device)
    teacher = build_model(a.teacher, a.classes, a.channels, a.image_size).to(device).eval()
    for q in teacher.parameters():
        q.requires_grad_(False)
    x = torch.randn(a.batch_size, a.channels, a.image_size, a.image_size, device=device)
    y = torch.arange(a.batch_size, device=device) % a.classes
    if a.channels_last:
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    s_tap, t_tap = FeatureTap(student), FeatureTap(teacher)
    net = torch.compile(student) if a.compile else student
    opt = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
    modes = [t for t in a.teacher_mode.split(",") if t]
    if not modes or set(modes) - {"online", "cached"}:
        p.error(f"--teacher-mode: a comma list of online, cached; got {a.teacher_mode!r}")
    cache, keys = None, None
    if "cached" in modes:  # a table as large as a training set's views, filled from real teacher outputs
        with torch.no_grad():
            t_logits = teacher(x)
        rows = 64 * a.batch_size
        cache = TeacherCache(t_tap.feature.float().repeat(64, 1), t_logits.float().repeat(64, 1))
        keys = torch.randperm(rows, device=device)[: a.batch_size]
    configs = [("ce", "ce", None), ("ce+teacher", "online", None)]
    configs += [(m if mode == "online" else f"{m} (cached teacher)", mode, m)
                for m in a.metrics.split(",") if m for mode in modes]
    steps = {name: make_step(kind, net, teacher, s_tap, t_tap, opt, x, y, amp_dtype, m, cache, keys)
             for name, kind, m in configs}

    for name, fn in steps.items():  # warm-up (compilation, allocator, solver imports)
        fn()
    sync(device)
    rates = {name: [] for name in steps}
    for _ in range(a.rounds):
        for name, fn in steps.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(a.steps):
                fn()
            sync(device)
            rates[name].append(a.steps * a.batch_size / (time.perf_counter() - t0))

    base = statistics.median(rates["ce"])
    with_teacher = statistics.median(rates["ce+teacher"])
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    lines = [f"student {a.student}, teacher {a.teacher}, batch {a.batch_size}, {a.image_size}px, {dev}, "
             f"amp {a.amp}, channels_last {a.channels_last}, compile {a.compile}; median of {a.rounds} rounds "
             f"× {a.steps} steps", "",
             "| configuration | images/s | × plain student | × CE+teacher forward | goal (× plain) |",
             "|---|---|---|---|---|"]
    for name in steps:
        r = statistics.median(rates[name])
        goal = "" if name in ("ce", "ce+teacher") else ("≥ 0.8" if name.split()[0] in EXACT_OT else "≥ 0.9")
        lines.append(f"| {name} | {r:.1f} | {r / base:.2f} | {r / with_teacher:.2f} | {goal} |")
    table = "\n".join(lines)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
