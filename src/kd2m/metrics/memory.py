"""Peak-memory model of the O(n²) metrics, so a too-large batch is refused up front.

``pairwise_bytes(name, n)`` is an upper estimate of the extra memory one forward + backward of
metric ``name`` needs at global batch size n (student and teacher both of size n), counted in
float64 n×n buffers (8·n² bytes each): cost matrices in torch and in the solver's float64 copy,
pooled (2n)² kernels (4 buffers' worth in float32 plus the median's index pairs), potentials,
the autograd graph, POT's Frank-Wolfe work arrays.

The factors are calibrated on measurements, and are conservative: ``pairwise_bytes`` is ≥ the
peak resident memory measured by ``benchmarks/memory.py`` (fresh process per metric, peak RSS
minus RSS before the call, float32 inputs, d = 512, CPU) at n = 2048 and n = 4096, with default
options, one class or ten, and the heavier option variants (jw2 ``label_cost="sqeuclidean"``,
gw2 ``normalize=True``). The factor of each metric is on its ``@metric`` line
(``pairwise_factor``). Measured at n = 4096 (MiB; model in brackets): w2 417 [512],
cw2 47 with 10 classes, 429 with one [512], jw2 409, 526 with the softmax label cost [768],
gw2 2050, 2146 normalised [2560], sinkhorn 1470 [1792], mmd_rbf 1374 [1664], cmmd_rbf 1370
[1664]. Below n ≈ 1024 fixed overheads of a few tens of MiB (not modelled) dominate, far below
any useful ``--max-pairwise-mb``. cw2 keeps w2's factor: with a single class in the batch it is
w2. Metrics not listed (sliced_w2, the Gaussian ones, mmd_linear) need O(n·d + d²) memory and
count 0 here. On CUDA the kernels and Sinkhorn run in GPU memory (not measured here); the exact
solvers (w2, cw2, jw2, gw2) still run on the host.
"""
from __future__ import annotations

__all__ = ["pairwise_bytes"]


def pairwise_bytes(name: str, n: int) -> int:
    """Bytes of n×n buffers for term ``name`` at batch ``n`` (0 for linear-memory terms).

    Conservative: ≥ the measured peak of a forward + backward at n = 2048 and 4096 (module doc).
    The factor is a fact of the term's registration (``pairwise_factor``); an unknown name is an
    error, never "free".
    """
    from ..losses import spec
    return spec(name).pairwise_factor * 8 * n * n
