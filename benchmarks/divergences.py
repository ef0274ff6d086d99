"""Peak host memory and time of one forward + backward of the LLM divergences, chunked against
unchunked, at a language model's vocabulary (default V = 32 000).

    OMP_NUM_THREADS=1 python benchmarks/divergences.py                       # 4096 tokens, V = 32000
    OMP_NUM_THREADS=1 python benchmarks/divergences.py --tokens 2048 --out results/divergences.md

Each row runs in a fresh subprocess: float32 student logits ``(tokens, V)`` requiring grad and
teacher logits, built first; the child records its resident set size, resets the kernel's
high-water mark (``/proc/self/clear_refs`` ← 5), runs forward + backward of the term and reports
VmHWM − the RSS before: the extra memory the call needed at its peak, the logits' gradient
(tokens·V·4 bytes) included. "chunked" is the default (positions in chunks of 2²² logits, each
chunk's gradient computed in the forward into one buffer, :mod:`kd2m.losses.divergences`);
"whole" sets ``chunk_size`` to the token count.
The ratio column is chunked over whole, measured side by side in one run; ``--chunk`` defaults to
the library's own choice at this vocabulary (2²² logits per chunk).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from host_memory import reset_peak, status_kib
from table_output import emit

from kd2m.losses.fused_head import DIVERGENCES  # the six token divergences, one list for every benchmark

MiB = 2**20


def child(name: str, tokens: int, vocab: int, chunk: int) -> None:
    import torch

    from kd2m import losses
    torch.set_num_threads(1)
    term = losses.get(name, chunk_size=chunk)
    small = torch.randn(8, 16, requires_grad=True)
    term(student_logits=small, teacher_logits=torch.randn(8, 16)).backward()  # imports, lazy set-up
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(tokens, vocab, generator=g).requires_grad_()
    zt = torch.randn(tokens, vocab, generator=g)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    before = reset_peak()
    t0 = time.perf_counter()
    term(student_logits=zs, teacher_logits=zt, labels=labels).backward()
    seconds = time.perf_counter() - t0
    print(json.dumps({"peak_mib": (status_kib("VmHWM") - before) / 1024, "seconds": seconds}))


def measure(name: str, tokens: int, vocab: int, chunk: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", name, str(tokens), str(vocab), str(chunk)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--terms", default=",".join(DIVERGENCES))
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--chunk", type=int, default=None, help="positions per chunk of the chunked rows (default: "
                                                             "the library's, 2^22 logits per chunk)")
    p.add_argument("--out", help="also write the Markdown table here")
    a = p.parse_args(argv)
    if a.chunk is None:
        from kd2m.losses.divergences import CHUNK_ELEMENTS
        a.chunk = max(1, CHUNK_ELEMENTS // a.vocab)
    grad_mib = a.tokens * a.vocab * 4 / MiB
    lines = [f"{a.tokens} tokens, V = {a.vocab}, float32, forward + backward, one thread; the logits' gradient "
             f"alone is {grad_mib:.0f} MiB", "",
             f"| term | whole: peak MiB | whole: s | chunked ({a.chunk}): peak MiB | chunked: s | peak ratio |",
             "|---|---|---|---|---|---|"]
    for name in [t for t in a.terms.split(",") if t]:
        whole = measure(name, a.tokens, a.vocab, a.tokens)
        chunked = measure(name, a.tokens, a.vocab, a.chunk)
        lines.append(f"| {name} | {whole['peak_mib']:.0f} | {whole['seconds']:.2f} | {chunked['peak_mib']:.0f} | "
                     f"{chunked['seconds']:.2f} | {chunked['peak_mib'] / whole['peak_mib']:.2f} |")
    return emit("\n".join(lines), a.out)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
