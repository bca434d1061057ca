"""Speed of hyperbolic k-means (hypsegcli.kmeans.PoincareKMeans) on 1 000 000 points.

Data: a mixture of 8 blobs on the 2D Poincaré ball (c = 1): blob j is the
wrapped image ``mu_j ⊕ expmap0(v)``, ``v ~ N(0, s_j² I)``, of a Gaussian
around a centre ``mu_j = expmap0(r_j (cos θ_j, sin θ_j))``, with unequal
sizes, spreads and distances to the origin (two blobs near the boundary), so
some blobs touch. Points are float32, like encoder embeddings.

Prints, one number per line: the wall time of ``fit`` + ``predict`` with the
default settings, quality (adjusted Rand index against the generating blob,
and the inertia relative to a full fit on all points unless --quick), and as
a reference scikit-learn's Euclidean ``KMeans`` (k-means++, its default
``n_init``) on the same points: its time, its ARI, and the time ratio.

Run: python benchmarks/kmeans_speed.py [--n 1000000] [--k 8] [--seed 0] [--quick]
[--n-init N] [--select inertia|silhouette]

``--n-init`` and ``--select`` set PoincareKMeans's restarts and how one is kept
(default: the class's own, 4 and least inertia; ``hypseg cluster``'s defaults are
``--n-init 8 --select silhouette``). The reference full fit takes the same settings.

On a 2-core machine shared with other busy processes, OpenMP's default
spin-waiting makes every parallel torch op cost a scheduler slice (~10 ms), so
this script, as the CLI does, sets ``OMP_WAIT_POLICY=PASSIVE`` unless the
variable is set: compare ``OMP_WAIT_POLICY=ACTIVE python benchmarks/kmeans_speed.py``.
The thread count, wait policy and load average are printed with the timings.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does (before torch loads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from hypsegcli.kmeans import SELECT_CHOICES, PoincareKMeans


def _expmap0(u: np.ndarray) -> np.ndarray:
    nu = np.linalg.norm(u, axis=-1, keepdims=True).clip(1e-15)
    return np.tanh(nu) * u / nu


def _mobius_add(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xy = (x * y).sum(-1, keepdims=True)
    x2 = (x * x).sum(-1, keepdims=True)
    y2 = (y * y).sum(-1, keepdims=True)
    return ((1 + 2 * xy + y2) * x + (1 - x2) * y) / (1 + 2 * xy + x2 * y2)


def make_blobs(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 2) float32 points on the unit-curvature ball and their blob of origin."""
    rng = np.random.default_rng(seed)
    theta = 2 * np.pi * (np.arange(k) + 0.15 * rng.uniform(-1, 1, k)) / k
    radius = rng.uniform(1.0, 2.6, k)  # tangent radius: |mu| = tanh(r) in 0.76..0.99
    radius[:2] = 3.2  # two blobs near the boundary (|mu| ≈ 0.997)
    spread = rng.uniform(0.3, 0.6, k)
    sizes = rng.dirichlet(np.full(k, 3.0))
    labels = rng.choice(k, size=n, p=sizes)
    mu = _expmap0(radius[:, None] * np.stack([np.cos(theta), np.sin(theta)], 1))
    v = rng.normal(size=(n, 2)) * spread[labels, None]
    x = _mobius_add(mu[labels], _expmap0(v))
    return x.astype(np.float32), labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="skip the full-data reference fit")
    ap.add_argument("--n-init", type=int, default=None, help="PoincareKMeans restarts")
    ap.add_argument("--select", choices=SELECT_CHOICES, default=None, help="restart kept")
    args = ap.parse_args()

    x, truth = make_blobs(args.n, args.k, args.seed)
    print(f"points: {args.n}")
    print(f"clusters: {args.k}")
    print(
        f"torch threads: {torch.get_num_threads()} (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})"
    )
    print(f"load average (1 min) before: {os.getloadavg()[0]:.2f}")

    chosen = {
        name: value
        for name, value in (("n_init", args.n_init), ("select", args.select))
        if value is not None
    }
    km = PoincareKMeans(args.k, random_state=args.seed, **chosen)
    print(
        f"PoincareKMeans settings: n_init={km.n_init}, select={km.select}, fit_samples={km.fit_samples}, frechet_iters={km.frechet_iters}"
    )
    t0 = time.perf_counter()
    km.fit(x)
    t1 = time.perf_counter()
    pred = km.predict(x)
    t2 = time.perf_counter()
    hyp_time = t2 - t0
    print(f"PoincareKMeans fit (s): {t1 - t0:.2f}")
    print(f"PoincareKMeans predict (s): {t2 - t1:.2f}")
    print(f"PoincareKMeans fit+predict (s): {hyp_time:.2f}")
    print(f"PoincareKMeans n_iter_: {km.n_iter_}")
    print(f"PoincareKMeans inertia_: {km.inertia_:.6g}")
    print(f"PoincareKMeans ARI vs truth: {adjusted_rand_score(truth, pred):.4f}")
    print(f"predict == labels_: {bool(np.array_equal(pred, km.labels_))}")

    if not args.quick:
        full = PoincareKMeans(args.k, random_state=args.seed, fit_samples=None, **chosen)
        t3 = time.perf_counter()
        full.fit(x)
        t4 = time.perf_counter()
        print(f"reference full fit, fit_samples=None (s): {t4 - t3:.2f}")
        print(f"inertia default / full fit: {km.inertia_ / full.inertia_:.6f}")
        print(f"ARI default vs full fit labels: {adjusted_rand_score(full.labels_, pred):.4f}")

    sk = KMeans(args.k, random_state=args.seed)
    t5 = time.perf_counter()
    sk.fit(x)
    sk_pred = sk.predict(x)
    t6 = time.perf_counter()
    sk_time = t6 - t5
    print(f"sklearn KMeans (Euclidean) fit+predict (s): {sk_time:.2f}")
    print(f"sklearn KMeans n_init: {sk._n_init}")
    print(f"sklearn KMeans ARI vs truth: {adjusted_rand_score(truth, sk_pred):.4f}")
    print(f"time ratio PoincareKMeans / sklearn KMeans: {hyp_time / sk_time:.2f}")
    print(f"load average (1 min) after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
