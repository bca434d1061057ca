"""Shared by the benchmark scripts: the machine's reference FLOP rate."""

from __future__ import annotations

import time

import torch


def matmul_rate(n: int = 2048, repeat: int = 5, device: str | torch.device = "cpu") -> float:
    """Best float32 FLOP/s of an n x n matrix product (2 n^3 FLOPs) on ``device`` (a GPU's
    is measured with its default TF32 setting, as the tool runs)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)

    def sync() -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    torch.matmul(a, b)
    sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best
