"""The sparse top-k teacher against the full vocabulary, on a real teacher and student: each
divergence's relative error (full − sparse) / full of the ghost-token estimate at several k.

    python benchmarks/topk_error.py runs/lm-smollm2                  # the CE student of seed 0
    python benchmarks/topk_error.py GRID --student fkl --seed 1 --tokens 8192 --ks 16,64,256

Reads a finished language-model grid (``kd2m run``/``kd2m bench`` output): its teacher (a
pretrained file is loaded from the reference in the teacher's ``final.json``) and one student,
rebuilt as ``kd2m bound`` rebuilds them, on the first ``--tokens`` positions of the grid's held-out
blocks. For each of the six token divergences: the full value (every logit of the teacher), and
the value against :class:`kd2m.losses.sparse_teacher.SparseTeacher` keeping the teacher's top k
log-probabilities and the log-mass of the rest (the estimate the ``--teacher-topk`` cache trains
with). For comparison, forward KL with the tail dropped and the teacher renormalised on its top k
(DistillKit's ``missing=ZERO``), and the teacher's mass the top k keep. Means over positions,
float32 logits, block by block (no ``(tokens, V)`` tensor of the whole sample).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from table_output import emit

from kd2m.losses.fused_head import DIVERGENCES  # the six token divergences a top-k teacher serves


def load_pair(grid: Path, student: str, seed: int):
    """(teacher, student, held-out bundle, grid config) of a finished language-model grid."""
    from kd2m.data import build_dataset
    from kd2m.harness.bound import load_model, load_run
    cfg, rows = load_run(grid)
    row = {r["method"]: r for r in rows if r["seed"] == seed}
    if "teacher" not in row or student not in row:
        sys.exit(f"topk_error: {grid} has no teacher and {student} rows for seed {seed}")
    bundle = build_dataset(cfg["dataset"], data_root=cfg.get("data_root"), download=False, augment=False,
                           image_size=cfg.get("image_size"), tokenizer=cfg.get("tokenizer"))
    import torch
    cpu = torch.device("cpu")
    teacher = load_model(grid, row["teacher"], cfg["teacher"], bundle, cpu, cfg.get("teacher_options"))
    pupil = load_model(grid, row[student], cfg["student"], bundle, cpu, cfg.get("student_options"))
    return teacher, pupil, bundle, cfg


def sums(teacher, student, bundle, tokens: int, ks: list[int], blocks_at_once: int = 4) -> tuple[dict, int, float]:
    """({(divergence, k or None, estimate): Σ over positions}, positions, Σ teacher entropy)."""
    import torch

    from kd2m import losses
    from kd2m.losses.sparse_teacher import SparseTeacher
    total: dict = {}
    seen, entropy = 0, 0.0
    data = bundle.test
    with torch.no_grad():
        for start in range(0, len(data), blocks_at_once):
            if seen >= tokens:
                break
            x = torch.stack([data[i][0] for i in range(start, min(start + blocks_at_once, len(data)))])
            zt = teacher(x).float().flatten(0, -2)[: tokens - seen]
            zs = student(x).float().flatten(0, -2)[: tokens - seen]
            n = zt.shape[0]
            lp_t, lp_s = torch.log_softmax(zt, -1), torch.log_softmax(zs, -1)
            entropy -= float((lp_t.exp() * lp_t).sum())
            batch = {}  # this block's means, weighted by its positions below
            for name in DIVERGENCES:
                batch[name, None, "full"] = losses.get(name)(student_logits=zs, teacher_logits=zt)
            for k in ks:
                sparse = SparseTeacher.from_logits(zt, k)
                for name in DIVERGENCES:
                    batch[name, k, "ghost"] = losses.get(name)(student_logits=zs, teacher_logits=sparse)
                q = sparse.logprobs - sparse.logprobs.logsumexp(-1, keepdim=True)  # renormalised top k
                batch["fkl", k, "dropped"] = (q.exp() * (q - lp_s.gather(-1, sparse.ids))).sum(-1).mean()
                batch["mass", k, "kept"] = sparse.logprobs.exp().sum(-1).mean()
            for key, value in batch.items():
                total[key] = total.get(key, 0.0) + float(value) * n
            seen += n
    return total, seen, entropy


def table(total: dict, seen: int, entropy: float, ks: list[int], what: str) -> str:
    mean = {key: value / seen for key, value in total.items()}
    lines = [f"Sparse top-k teacher vs the full vocabulary: relative error (full − sparse) / full, {what}, "
             f"{seen} held-out positions (teacher entropy {entropy / seen:.2f} nats; full value in brackets)", "",
             "| divergence (full value) | " + " | ".join(f"k = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for name in DIVERGENCES:
        full = mean[(name, None, "full")]
        lines.append(f"| {name} ({full:.4f}) | "
                     + " | ".join(f"{(full - mean[(name, k, 'ghost')]) / full:+.2%}" for k in ks) + " |")
    full = mean[("fkl", None, "full")]
    lines.append("| fkl, tail dropped, teacher renormalised (DistillKit ZERO) | "
                 + " | ".join(f"{(full - mean[('fkl', k, 'dropped')]) / full:+.2%}" for k in ks) + " |")
    lines.append("| teacher mass kept | " + " | ".join(f"{mean[('mass', k, 'kept')]:.3f}" for k in ks) + " |")
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", type=Path, help="a finished language-model grid directory")
    p.add_argument("--student", default="ce", help="the student whose divergences are estimated (default: ce)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens", type=int, default=4096, help="held-out positions measured (default 4096)")
    p.add_argument("--ks", default="16,64,256", help="kept entries per position (default 16,64,256)")
    p.add_argument("--out", help="also write the Markdown table here")
    a = p.parse_args(argv)
    ks = [int(k) for k in a.ks.split(",") if k]
    teacher, student, bundle, cfg = load_pair(a.grid, a.student, a.seed)
    total, seen, entropy = sums(teacher, student, bundle, a.tokens, ks)
    what = f"teacher {cfg['teacher']} ({Path(str(cfg.get('pretrained_teacher') or cfg['teacher'])).name}), " \
           f"student {a.student} seed {a.seed}, V = {bundle.num_classes}"
    return emit(table(total, seen, entropy, ks, what), a.out)


if __name__ == "__main__":
    main()
