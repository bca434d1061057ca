"""Speed of the Poincaré distance matrices (hypsegcli.kmeans.poincare_pdist2 / poincare_dist).

Its two uses in ``hypseg cluster``, timed on float64 points of the unit ball (c = 1):

- ``--select silhouette``: the distances among 2 000 points of a restart sample
  (``poincare_dist(x)``, one call per k-means fit), latent dimension 2 and 8;
- the spatial steps: every voxel against k = 8 centres, for a 50^3 volume and for
  a million voxels.

References measured in the same run: geoopt's ``PoincareBall.dist`` on broadcast
(n, 1, d) and (1, m, d) tensors in row chunks (an independent implementation; the
largest difference to it is printed), and scipy's Euclidean ``cdist`` (the floor:
no hyperbolic terms at all). Best of ``--repeats`` runs each.

Run: python benchmarks/pdist_speed.py [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does (before torch loads)

import geoopt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.spatial.distance import cdist  # noqa: E402

from hypsegcli.kmeans import poincare_dist  # noqa: E402

_CHUNK = 1 << 20  # elements per geoopt chunk, as hypseg's own row chunks


def _ball(n: int, d: int, rng: np.random.Generator) -> torch.Tensor:
    """(n, d) float64 points of the unit ball, norms spread up to 0.999."""
    u = rng.normal(size=(n, d))
    r = rng.uniform(0.0, 3.8, size=(n, 1))  # tanh(3.8) ≈ 0.999
    return torch.from_numpy(np.tanh(r) * u / np.linalg.norm(u, axis=1, keepdims=True))


def _geoopt(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    ball = geoopt.PoincareBall(c=1.0)
    rows = max(1, _CHUNK // len(y))
    return torch.cat([ball.dist(x[i : i + rows, None], y[None]) for i in range(0, len(x), rows)])


def _best(fn, repeats: int) -> tuple[float, object]:
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"load average (1 min) before: {os.getloadavg()[0]:.2f}")
    rng = np.random.default_rng(0)
    cases = [
        ("silhouette, 2000 points, d=2, among themselves", 2000, None, 2),
        ("silhouette, 2000 points, d=8, among themselves", 2000, None, 8),
        ("spatial steps, 50^3 voxels x 8 centres, d=2", 125_000, 8, 2),
        ("spatial steps, 10^6 voxels x 8 centres, d=2", 1_000_000, 8, 2),
    ]
    for name, n, m, d in cases:
        x = _ball(n, d, rng)
        y = x if m is None else _ball(m, d, rng)
        t_ours, ours = _best(
            lambda x=x, y=y, m=m: poincare_dist(x, None if m is None else y), args.repeats
        )
        t_geo, ref = _best(lambda x=x, y=y: _geoopt(x, y), args.repeats)
        xn, yn = x.numpy(), y.numpy()
        t_cd, _ = _best(lambda xn=xn, yn=yn: cdist(xn, yn), args.repeats)
        dev = float((ours - ref).abs().max())
        print(f"{name}:")
        print(f"  hypseg poincare_dist (ms): {t_ours * 1e3:.1f}")
        print(
            f"  geoopt PoincareBall.dist (ms): {t_geo * 1e3:.1f}  ratio geoopt / hypseg: {t_geo / t_ours:.2f}"
        )
        print(
            f"  scipy cdist, Euclidean (ms): {t_cd * 1e3:.1f}  ratio hypseg / cdist: {t_ours / t_cd:.2f}"
        )
        print(f"  largest |hypseg - geoopt|: {dev:.1e}")
    print(f"load average (1 min) after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
