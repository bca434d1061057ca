"""Cost of Potts smoothing (``hypseg cluster --smooth``) against the plain assignment it replaces.

Data: a volume of side --side (default 128, 2.1 million voxels) whose voxels
carry 2-D Poincaré-ball features, as the default model's embeddings do: 8
blocky regions (random boxes painted in turn) with noise, the centres being
the regions' means. Per k, times in the same process and on the same
features:

- ``assign``: the nearest-centre labels ``hypseg cluster`` writes with
  ``--smooth 0 --snap 0`` (chunked Poincaré assignment);
- ``smooth``: the Potts-smoothed labels of ``--smooth BETA`` (a temperature
  pass, then 10 mean-field updates in slabs);
- the ratio smooth / assign, and the k-means fit on 200 000 voxels (the other
  part of clustering) for scale;
- how many labels smoothing changed;
- the edge snap after it (``cluster --snap``, on an image of the same regions)
  and how many labels it changed;
- the intensity MRF after that (``cluster --mrf``) and how many labels it
  changed;
- the speck removal after that (``cluster --min-size``) and how many labels it
  changed.

Then the nesting (``cluster --nest 4``) in the k = 2 labels after the MRF, as
``cluster`` takes them: the band by shifted runs (what ``cluster`` runs) against
the band by one Euclidean distance transform per label (the reference; the same
band is asserted), and the fill's sources (once per volume).

Then what the prior costs thin structures: 48^3 volumes of unit Gaussian noise
with four sheets of thickness 1, 2, 3, 5 or 8 voxels every 10 voxels, CNR
(sheet brightness over the noise's standard deviation) 1, 2 or 4, clustered
with k = 2 at the true centres; per beta the fraction of sheet voxels labelled
sheet (recall) and of background voxels labelled sheet (false positives), and
the same after beta 0.8 and the edge snap (``cluster --snap 2``), and after
those and the intensity MRF (``cluster --mrf 0.5``), and after those and the
speck removal (``cluster --min-size 50``).

Run: python benchmarks/smooth_speed.py [--side 128] [--beta 0.8] [--snap 2] [--mrf 0.5]
[--min-size 50] [--nest 4] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does (before torch loads)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hypsegcli.cli import N_INIT_DEFAULT  # noqa: E402
from hypsegcli.components import remove_small_components  # noqa: E402
from hypsegcli.edges import refine_labels, snap_labels  # noqa: E402
from hypsegcli.nesting import _band_mask_edt, band_mask, band_sources  # noqa: E402
from hypsegcli.pipeline import _Clusterer  # noqa: E402
from hypsegcli.smoothing import SLAB_ELEMENTS, SMOOTH_ITERS  # noqa: E402


def make_features(side: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(side, side, side, 2) float32 points on the unit ball: 8 noisy box-shaped regions;
    and an image of the same regions (region j at intensity 0.1 j, noise 0.2), float32."""
    rng = np.random.default_rng(seed)
    region = np.zeros((side,) * 3, dtype=np.int64)
    for j in range(1, 8):
        for _ in range(6):
            lo = rng.integers(0, side, 3)
            hi = lo + rng.integers(side // 8, side // 3, 3)
            region[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = j
    angle = 2 * np.pi * np.arange(8) / 8
    mean = 0.6 * np.stack([np.cos(angle), np.sin(angle)], 1)
    x = mean[region] + rng.normal(0, 0.25, (*region.shape, 2))
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    image = (0.1 * region + rng.normal(0, 0.2, region.shape)).astype(np.float32)
    return (x * np.minimum(1, 0.95 / np.maximum(norm, 1e-12))).astype(np.float32), image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=128)
    ap.add_argument("--beta", type=float, default=0.8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--snap", type=float, default=2.0, help="sigma of cluster --snap")
    ap.add_argument("--mrf", type=float, default=0.5, help="beta of cluster --mrf")
    ap.add_argument("--min-size", type=int, default=50, help="N of cluster --min-size")
    ap.add_argument("--nest", type=float, default=4.0, help="W of cluster --nest")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    feats, image = make_features(args.side, args.seed)
    flat = feats.reshape(-1, 2)
    print(
        f"volume {args.side}^3 = {flat.shape[0]:,} voxels, 2-D ball features, beta {args.beta}, "
        f"{SMOOTH_ITERS} updates, slabs of {SLAB_ELEMENTS:,} voxels x clusters, "
        f"{torch.get_num_threads()} threads"
    )
    # the fit `hypseg cluster` makes by default (its --n-init and --fit-samples)
    cl = _Clusterer(
        "ball", curvature=1.0, n_init=N_INIT_DEFAULT, fit_samples=200_000, seed=0, device="cpu"
    )
    for k in (2, 4, 8):
        t0 = time.perf_counter()
        centers = cl.fit(flat, k)
        fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        plain = cl.labels(feats, centers, 0.0)
        assign = time.perf_counter() - t0
        t0 = time.perf_counter()
        smooth = cl.labels(feats, centers, args.beta)
        smoothed = time.perf_counter() - t0
        changed = float((plain != smooth).mean())
        t0 = time.perf_counter()
        snapped = snap_labels(smooth, image, sigma=args.snap)
        snap_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        refined = refine_labels(snapped, image, beta=args.mrf)
        mrf_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cleaned = remove_small_components(refined, args.min_size)
        min_size_s = time.perf_counter() - t0
        print(
            f"k={k}: fit {fit:.2f} s, assign {assign:.2f} s, smooth {smoothed:.2f} s "
            f"({smoothed / assign:.1f}x assign, {smoothed / (fit + assign):.2f}x fit + assign), "
            f"{flat.shape[0] / smoothed / 1e6:.2f} M voxels/s, {changed:.1%} labels changed; "
            f"snap {snap_s:.2f} s ({snap_s / (fit + assign):.2f}x fit + assign), "
            f"{float((snapped != smooth).mean()):.1%} labels changed; "
            f"mrf {mrf_s:.2f} s ({mrf_s / (fit + assign):.2f}x fit + assign), "
            f"{float((refined != snapped).mean()):.1%} labels changed; "
            f"min-size {min_size_s:.2f} s ({min_size_s / (fit + assign):.2f}x fit + assign, "
            f"{min_size_s / flat.shape[0] * 1e9:.0f} ns/voxel), "
            f"{float((cleaned != refined).mean()):.2%} labels changed"
        )
        if k == 2:
            coarse = refined  # the coarse labels of --nest
    t0 = time.perf_counter()
    band = band_mask(coarse, args.nest)
    shifts = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference = _band_mask_edt(coarse, args.nest, np.unique(coarse), None)
    transforms = time.perf_counter() - t0
    assert np.array_equal(band, reference), "the band by shifts differs from the transforms'"
    t0 = time.perf_counter()
    band_sources(coarse, band)
    sources = time.perf_counter() - t0
    print(
        f"nest {args.nest:g} in k=2's labels ({band.mean():.1%} of voxels in the band): band "
        f"by shifts {shifts:.3f} s, by distance transforms {transforms:.2f} s "
        f"({transforms / shifts:.0f}x, the same band); the fill's sources {sources:.2f} s"
    )
    thin_sheets(args.seed, snap=args.snap, mrf=args.mrf, min_size=args.min_size)


def thin_sheets(
    seed: int,
    betas=(0.0, 0.4, 0.8, 1.2, 1.6, 2.4),
    snap: float = 2.0,
    mrf: float = 0.5,
    min_size: int = 50,
) -> None:
    """Recall of one- to eight-voxel sheets after smoothing, per beta, and after
    beta 0.8 plus ``cluster --snap``, after those plus ``cluster --mrf`` and after
    those plus ``cluster --min-size`` (sheets every 10 voxels: a 5-voxel sheet has
    5-voxel gaps)."""
    rng = np.random.default_rng(seed)
    cl = _Clusterer("line", curvature=1.0, n_init=1, fit_samples=100, seed=0, device="cpu")
    print("thin sheets, k = 2: recall / false-positive rate per beta")
    print(
        "CNR thick | "
        + " | ".join(f"beta {b:g}" for b in betas)
        + f" | beta 0.8 + snap {snap:g} | + mrf {mrf:g} | + min-size {min_size}"
    )
    for cnr in (1.0, 2.0, 4.0):
        for thick in (1, 2, 3, 5, 8):
            truth = np.zeros((48, 48, 48), dtype=np.int64)
            for start in range(4, 44, 10):
                truth[start : start + thick] = 1
            feats = (truth * cnr + rng.normal(0, 1, truth.shape))[..., None]
            centers = np.array([[0.0], [cnr]])
            cells = []
            for b in betas:
                lab = cl.labels(feats, centers, b)
                cells.append(
                    f"{(lab[truth == 1] == 1).mean():.2f} / {(lab[truth == 0] == 1).mean():.3f}"
                )
            lab = snap_labels(cl.labels(feats, centers, 0.8), feats[..., 0], sigma=snap)
            refined = refine_labels(lab, feats[..., 0].astype(np.float32), beta=mrf)
            for done in (lab, refined, remove_small_components(refined, min_size)):
                cells.append(
                    f"{(done[truth == 1] == 1).mean():.2f} / {(done[truth == 0] == 1).mean():.3f}"
                )
            print(f"{cnr:g} {thick} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
