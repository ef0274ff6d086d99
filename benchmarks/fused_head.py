"""Language-model distillation at a real vocabulary: the fused student head against the plain
computation (peak host memory and tokens/s, V = 49 152 and V = 128 256), and the error of the
sparse top-k teacher against the full vocabulary.

    OMP_NUM_THREADS=1 python benchmarks/fused_head.py            # 1024 tokens, d = 512, k = 64
    OMP_NUM_THREADS=1 python benchmarks/fused_head.py --quick    # 256 tokens, d = 256: seconds

Speed and memory: one forward + backward of CE + forward KL (τ = 1) against a sparse teacher
(top-k log-probabilities, :class:`kd2m.losses.sparse_teacher.SparseTeacher`), from float32 hidden
states ``(tokens, d)`` and an output layer ``(V, d)`` that both require grad. "unfused" builds the
``(tokens, V)`` logits, ``F.cross_entropy`` and the registered ``fkl`` term (itself chunked);
"fused" is :func:`kd2m.losses.fused_head.fused_head_loss` at its default chunk (2²² logits). Each
row runs in a fresh subprocess with one thread: it builds its inputs, records its resident set
size, resets the kernel's high-water mark (``/proc/self/clear_refs`` ← 5), runs the step and
reports VmHWM − the RSS before (what the step needed at its peak, the gradients of the hidden
states and the output layer included) and tokens / second (the fastest of ``--repeats`` steps:
timings on a shared machine are noisy). Ratios are fused over unfused,
measured side by side in one run.

JSD against a dense teacher given as its hidden states and output layer (TRL's
``DistillationTrainer`` setting): the same measurement for both models' whole logits, kd2m's fused
head with a :class:`~kd2m.losses.fused_head.LinearTeacher`, and TRL's chunked divergence
(``trl.trainer.distillation_trainer._chunked_divergence_loss``, where TRL is installed; equal in
value and gradient, ``tests/unit/losses/test_fused_head.py``).

Sparse-teacher error: a random model with a Zipfian unigram prior (teacher logits
``hW_Tᵀ − 1.5·log(rank)``, the student's a perturbed copy), V = 49 152; each divergence's relative
error (full − sparse) / full of the ghost-token estimate at several k, and for comparison the
forward KL with the tail dropped and the teacher renormalised over its top k (DistillKit's
``missing=ZERO``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from host_memory import reset_peak, status_kib
from table_output import emit

VOCABS = (49_152, 128_256)
MiB = 2**20


def sparse_teacher(tokens: int, vocab: int, k: int, generator):
    """A SparseTeacher from random logits, built 64 rows at a time (no (tokens, V) tensor)."""
    import torch

    from kd2m.losses.sparse_teacher import SparseTeacher
    parts = [SparseTeacher.from_logits(2 * torch.randn(min(64, tokens - i), vocab, generator=generator), k)
             for i in range(0, tokens, 64)]
    return SparseTeacher(torch.cat([p.ids for p in parts]), torch.cat([p.logprobs for p in parts]),
                         torch.cat([p.tail_logprob for p in parts]), vocab)


def step(method: str, h, w, labels, teacher):
    """One loss: CE + forward KL against a sparse teacher, fused or from whole logits; or (``jsd-*``)
    GKD's JSD against a teacher given as hidden states and output layer (TRL's setting), from both
    models' whole logits, kd2m's fused head, or TRL's chunked divergence."""
    import torch.nn.functional as F

    from kd2m import losses
    from kd2m.losses.fused_head import LinearTeacher, fused_head_loss
    if method == "jsd-unfused":
        return losses.get("jsd")(student_logits=h @ w.T, teacher_logits=teacher.hidden @ teacher.weight.T)
    if method == "jsd-fused":
        return fused_head_loss(h, w, labels, LinearTeacher(*teacher), kind="jsd", ce_weight=0.0).loss
    if method == "jsd-trl":
        import torch
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
        return _chunked_divergence_loss(h[None], teacher.hidden[None], w, teacher.weight,
                                        torch.ones(1, h.shape[0]), beta=0.5)[0]
    if method == "fused":
        return fused_head_loss(h, w, labels, teacher, kind="fkl").loss
    z = h @ w.T
    return F.cross_entropy(z, labels) + losses.get("fkl")(student_logits=z, teacher_logits=teacher, labels=labels)


def teacher_for(method: str, tokens: int, vocab: int, dim: int, k: int, generator):
    """A sparse top-k teacher, or (``jsd-*`` rows) a LinearTeacher: hidden states and an output layer."""
    if not method.startswith("jsd-"):
        return sparse_teacher(tokens, vocab, k, generator)
    import torch

    from kd2m.losses.fused_head import LinearTeacher
    return LinearTeacher(torch.randn(tokens, dim, generator=generator),
                         torch.randn(vocab, dim, generator=generator) / dim ** 0.5)


def child(method: str, tokens: int, vocab: int, dim: int, k: int, repeats: int) -> None:
    import torch
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    small = (torch.randn(8, 16, requires_grad=True), torch.randn(32, 16, requires_grad=True))
    step(method, *small, torch.randint(0, 32, (8,)), teacher_for(method, 8, 32, 16, 4, g)).backward()  # imports
    h = torch.randn(tokens, dim, generator=g).requires_grad_()
    w = (torch.randn(vocab, dim, generator=g) / dim ** 0.5).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    teacher = teacher_for(method, tokens, vocab, dim, k, g)
    release_freed_memory()
    before = reset_peak()
    seconds = []
    for i in range(repeats):
        t0 = time.perf_counter()
        step(method, h, w, labels, teacher).backward()
        seconds.append(time.perf_counter() - t0)
        if i == 0:
            peak_mib = (status_kib("VmHWM") - before) / 1024
        h.grad = w.grad = None
    print(json.dumps({"peak_mib": peak_mib, "tokens_per_s": tokens / min(seconds)}))


def release_freed_memory() -> None:
    """Hand the C heap's freed pages back to the kernel (glibc ``malloc_trim``), so that the step
    cannot reuse pages already counted in the resident size before it and look smaller than it is."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(method: str, tokens: int, vocab: int, dim: int, k: int, repeats: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", method, str(tokens), str(vocab), str(dim), str(k),
                          str(repeats)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def speed_table(tokens: int, dim: int, k: int, repeats: int, vocabs=VOCABS) -> list[str]:
    lines = [f"{tokens} tokens, d = {dim}, sparse teacher k = {k}, CE + fkl, float32, forward + backward, "
             f"one thread, best of {repeats} steps", "",
             "| V | logits MiB | unfused: peak MiB | unfused: tok/s | fused: peak MiB | fused: tok/s | "
             "peak ratio | speed ratio |", "|---|---|---|---|---|---|---|---|"]
    for vocab in vocabs:
        plain, fused = (measure(m, tokens, vocab, dim, k, repeats) for m in ("unfused", "fused"))
        lines.append(f"| {vocab} | {tokens * vocab * 4 / MiB:.0f} | {plain['peak_mib']:.0f} | "
                     f"{plain['tokens_per_s']:.0f} | {fused['peak_mib']:.0f} | {fused['tokens_per_s']:.0f} | "
                     f"{fused['peak_mib'] / plain['peak_mib']:.2f} | "
                     f"{fused['tokens_per_s'] / plain['tokens_per_s']:.2f} |")
    return lines


def trl_table(tokens: int, dim: int, repeats: int, vocabs=VOCABS) -> list[str]:
    """GKD's JSD (β = 0.5) against a teacher given as its hidden states and output layer: both
    models' whole logits, kd2m's fused head (``LinearTeacher``), and TRL's chunked divergence
    (its ``DistillationTrainer``'s loss), where TRL is installed."""
    try:
        import trl.trainer.distillation_trainer  # noqa: F401
        methods = ("jsd-unfused", "jsd-fused", "jsd-trl")
    except ImportError:
        methods = ("jsd-unfused", "jsd-fused")
    lines = [f"{tokens} tokens, d = {dim} (student and teacher), GKD JSD β = 0.5 against the teacher's hidden states "
             f"and output layer, float32, forward + backward, one thread, best of {repeats} steps", "",
             "| V | " + " | ".join(f"{m[4:]}: peak MiB | {m[4:]}: tok/s" for m in methods) + " |",
             "|---|" + "---|---|" * len(methods)]
    for vocab in vocabs:
        rows = [measure(m, tokens, vocab, dim, 0, repeats) for m in methods]
        lines.append(f"| {vocab} | " + " | ".join(f"{r['peak_mib']:.0f} | {r['tokens_per_s']:.0f}" for r in rows) + " |")
    return lines


def error_table(tokens: int, vocab: int, ks: list[int]) -> list[str]:
    """Relative error of the ghost-token estimate per divergence and k, on a Zipfian random model."""
    import torch

    from kd2m import losses
    from kd2m.losses.fused_head import DIVERGENCES
    from kd2m.losses.sparse_teacher import SparseTeacher
    g = torch.Generator().manual_seed(1)
    h = torch.randn(tokens, 64, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, 64, generator=g, dtype=torch.float64) / 4
    # a Zipfian prior p ∝ rank^−1.5: about 2.9 nats of entropy, 91 % of the mass in the top 64,
    # a heavier tail than a trained model's next-token distributions
    zt = h @ w.T - 1.5 * torch.log1p(torch.randperm(vocab, generator=g).double())
    zs = zt + 0.5 * torch.randn(tokens, vocab, generator=g, dtype=torch.float64)
    full = {n: float(losses.get(n)(student_logits=zs, teacher_logits=zt)) for n in DIVERGENCES}
    lp = torch.log_softmax(zt, -1)
    entropy = float(-(lp.exp() * lp).sum(-1).mean())
    lines = [f"Sparse teacher vs the full vocabulary: relative error (full − sparse) / full, {tokens} positions, "
             f"V = {vocab}, Zipfian random model (teacher entropy {entropy:.2f} nats; full value in brackets)", "",
             "| divergence (full value) | " + " | ".join(f"k = {k}" for k in ks) + " |",
             "|---|" + "---|" * len(ks)]
    teachers = {k: SparseTeacher.from_logits(zt, k) for k in ks}
    kept = {k: float(teachers[k].logprobs.exp().sum(-1).mean()) for k in ks}
    for n in DIVERGENCES:
        errors = [(full[n] - float(losses.get(n)(student_logits=zs, teacher_logits=teachers[k]))) / full[n]
                  for k in ks]
        lines.append(f"| {n} ({full[n]:.4f}) | " + " | ".join(f"{e:.2e}" for e in errors) + " |")
    ls = torch.log_softmax(zs, -1)
    dropped = []
    for k in ks:  # DistillKit's missing=ZERO: teacher renormalised on its top k, student not, no tail
        t = teachers[k]
        q = t.logprobs - t.logprobs.logsumexp(-1, keepdim=True)
        dropped.append((full["fkl"] - float((q.exp() * (q - ls.gather(-1, t.ids))).sum(-1).mean())) / full["fkl"])
    lines.append("| fkl, tail dropped (DistillKit ZERO) | " + " | ".join(f"{e:.2e}" for e in dropped) + " |")
    lines.append("| teacher mass kept | " + " | ".join(f"{kept[k]:.3f}" for k in ks) + " |")
    return lines


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="256 tokens, d = 256, a shorter error table")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--k", type=int, default=64, help="the sparse teacher's kept entries per token")
    p.add_argument("--repeats", type=int, default=None, help="steps timed per row, the fastest kept (default: "
                                                              "2, --quick 1); the peak is the first step's")
    p.add_argument("--vocabs", default=",".join(map(str, VOCABS)), help="vocabulary sizes of the speed rows; "
                                                                        "the first is the error table's")
    p.add_argument("--out", help="also write the Markdown tables here")
    a = p.parse_args(argv)
    tokens = a.tokens or (256 if a.quick else 1024)
    dim = a.dim or (256 if a.quick else 512)
    ks = [1, 8, 64, 512] if a.quick else [1, 8, 64, 512, 4096]
    repeats = a.repeats or (1 if a.quick else 2)
    vocabs = [int(v) for v in a.vocabs.split(",") if v]
    ks = [k for k in ks if k <= vocabs[0]]
    lines = speed_table(tokens, dim, a.k, repeats, vocabs) + [""] + trl_table(tokens, dim, repeats, vocabs) + [""] \
        + error_table(32 if a.quick else 64, vocabs[0], ks)
    return emit("\n".join(lines), a.out)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], *map(int, sys.argv[3:8]))
    else:
        main()
