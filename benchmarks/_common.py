"""Shared by the benchmark scripts: the machine's reference FLOP rate."""

from __future__ import annotations

import time

import torch


def matmul_rate(n: int = 2048, repeat: int = 5) -> float:
    """Best float32 FLOP/s of an n x n matrix product (2 n^3 FLOPs)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best
