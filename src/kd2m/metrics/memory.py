"""Peak-memory model of the O(n²) metrics, so a too-large batch is refused up front.

``pairwise_bytes(name, n)`` is the approximate number of bytes of n×n buffers a metric holds
at global batch size n (student and teacher both of size n). The factors count the float32/
float64 n×n matrices each implementation keeps alive at its peak (cost matrices in torch and
in the solver's float64 copy, kernels, potentials); ``benchmarks/memory.py`` measures the real
peak to keep them honest.
"""
from __future__ import annotations

#: number of float64-sized n×n buffers alive at the peak
_FACTORS = {
    "w2": 4, "cw2": 4, "jw2": 6,
    "gw2": 12, "sinkhorn": 9,
    "mmd_rbf": 8, "cmmd_rbf": 8,
}


def pairwise_bytes(name: str, n: int) -> int:
    """Bytes of n×n buffers for metric ``name`` at batch ``n`` (0 for linear-memory metrics)."""
    return _FACTORS.get(name, 0) * 8 * n * n
