"""Does k-means on a product of Poincaré balls beat one ball? (issue 5's lever)

Each voxel gets several embeddings, one per inference patch side (e.g.
``hypseg embed -p 5 -o e5`` and ``-p 10 -o e10`` with the same model), and the
tuple is a point of the product of balls. Its squared distance is the sum of
the factors' squared Poincaré distances, so a k-means step assigns by that sum
and moves each factor's centroid to the Fréchet mean of that factor
(``hypsegcli.kmeans.poincare_pdist2`` and ``frechet_mean``, the tool's own).
Each factor alone is clustered by the same code as a reference in the same
run, at k = 2, 4, 8 against the ``_L1``, ``_L2``, ``_L3`` ground truth, and
scored by ``hypsegcli.metrics.score_case`` (mean matched Dice, background
included), without spatial steps. The same seeded k-means++ start, restarts
and fit subsample for every run.

Run: python benchmarks/product_balls.py LABELS_DIR EMB_DIR [EMB_DIR ...]
        [--fit-samples 20000] [--n-init 2] [--iters 40] [--seed 0] [--cases N]

Prints one line per run (each factor alone, then the product): mean Dice at
levels 1 / 2 / 3 over the cases and the difference of the product from the
best single factor. Measured on the validation split (full model, seeds 0 and
1 of a paper_tables run, sides 5 and 10, 20 volumes): the product was 0.886 /
0.498 / 0.319 and 0.968 / 0.458 / 0.239 against side 5 alone 0.908 / 0.563 /
0.313 and 0.968 / 0.493 / 0.262, so it was not added to ``hypseg cluster``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from hypsegcli.kmeans import frechet_mean, poincare_pdist2
from hypsegcli.metrics import score_case

LEVELS = ((2, 1), (4, 2), (8, 3))  # (k, level)


def product_d2(factors: list[np.ndarray], centroids: list[np.ndarray]) -> np.ndarray:
    """(n, k) squared product distances: the sum over factors of squared Poincaré distances."""
    return sum(poincare_pdist2(f, c) for f, c in zip(factors, centroids, strict=True))


def product_kmeans(
    factors: list[np.ndarray],
    k: int,
    rng: np.random.Generator,
    *,
    fit_samples: int,
    n_init: int,
    iters: int,
) -> np.ndarray:
    """Labels of every point: Lloyd iterations on a subsample, best of ``n_init`` by inertia."""
    n = factors[0].shape[0]
    rows = rng.choice(n, min(n, fit_samples), replace=False)
    fit = [f[rows] for f in factors]
    best: tuple[float, list[np.ndarray]] | None = None
    for _ in range(n_init):
        chosen = [int(rng.integers(len(rows)))]  # k-means++ on the product distance
        for _ in range(1, k):
            d2 = product_d2(fit, [f[chosen] for f in fit]).min(1)
            chosen.append(int(rng.choice(len(rows), p=d2 / d2.sum())))
        cents = [f[chosen].copy() for f in fit]
        for _ in range(iters):
            labels = product_d2(fit, cents).argmin(1)
            for f, c in zip(fit, cents, strict=True):
                for j in range(k):
                    members = labels == j
                    if members.any():
                        c[j] = frechet_mean(f[members], init=c[j], max_iter=10)
        inertia = float(product_d2(fit, cents).min(1).sum())
        if best is None or inertia < best[0]:
            best = (inertia, cents)
    assert best is not None
    return product_d2(factors, best[1]).argmin(1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("labels", type=Path, help="folder of <case>_L1/_L2/_L3.nii.gz ground truth")
    ap.add_argument("emb", type=Path, nargs="+", help="folders of <case>.npy (hypseg embed -o)")
    ap.add_argument("--fit-samples", type=int, default=20000)
    ap.add_argument("--n-init", type=int, default=2)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", type=int, default=0, help="only the first N cases (0: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    cases = sorted(p.stem for p in args.emb[0].glob("*.npy"))
    if args.cases:
        cases = cases[: args.cases]
    if not cases:
        print(f"error: no <case>.npy in {args.emb[0]}", file=sys.stderr)
        return 2
    runs = [[i] for i in range(len(args.emb))] + (
        [list(range(len(args.emb)))] if len(args.emb) > 1 else []
    )
    scores = np.zeros((len(runs), len(cases), len(LEVELS)))
    for c, case in enumerate(cases):
        emb = [np.load(d / f"{case}.npy") for d in args.emb]
        flat = [e.reshape(-1, e.shape[-1]).astype(np.float64) for e in emb]
        for lv, (k, level) in enumerate(LEVELS):
            gt = np.asarray(nib.load(args.labels / f"{case}_L{level}.nii.gz").dataobj)
            for r, run in enumerate(runs):
                labels = product_kmeans(
                    [flat[i] for i in run],
                    k,
                    np.random.default_rng(args.seed),
                    fit_samples=args.fit_samples,
                    n_init=args.n_init,
                    iters=args.iters,
                )
                scores[r, c, lv] = score_case(
                    labels.reshape(gt.shape), gt, surface_distances=False
                ).mean_dice
        print(f"{case} done ({c + 1}/{len(cases)})", file=sys.stderr)
    means = scores.mean(1)
    for r, run in enumerate(runs):
        name = " x ".join(args.emb[i].name for i in run)
        line = f"{name}: " + " / ".join(f"{m:.4f}" for m in means[r])
        if len(run) > 1:
            best = means[: len(args.emb)].max(0)
            line += (
                "  (product - best single: "
                + " / ".join(f"{d:+.4f}" for d in means[r] - best)
                + ")"
            )
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
