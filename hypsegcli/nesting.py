"""Nest the finer levels in the coarsest one (``cluster --nest``).

A voxel's embedding describes the patch around it. Near a boundary between two
large structures (on the paper's synthetic data: the cell against the
background) the patches straddle both sides and embed between them, and a
k-means with more than two clusters spends one or two of them on this shell
of mixed patches, a few voxels thick, instead of on the small structures
inside (on the validation split at k = 4 with the full model: one cluster of
~15 000 background and ~4 000 cell voxels around the cell, while the two
organelle kinds, ~2 % of the volume each, share one cluster or none).

With several k, the labels of the smallest k (after their spatial steps)
give the coarse regions, and for every larger k:

1. the *band*: voxels within ``width`` voxels (Euclidean distance, in voxels)
   of a voxel with another coarse label (:func:`band_mask`);
2. the k-means of that k is fitted on the voxels outside the band only;
3. every voxel is assigned to its nearest centroid (and Potts-smoothed, as
   without nesting); then each band voxel takes the label of the nearest
   voxel outside the band in its own coarse region (:func:`fill_band`), so
   the finer labels nest in the coarse ones near their boundaries, and
   ``--snap`` and ``--mrf`` then settle the boundary by intensity.

Away from the band the larger k's labels are those of their own k-means, so a
fine label may span several coarse regions there: the nesting holds at the
coarse boundaries, where the straddling patches are, not everywhere. Where a
coarse label lies wholly inside the band (a thin or small region: the fit would
have none of its voxels, and its voxels would take labels made for the others),
or fewer than k voxels lie outside it, the volume's larger k are not nested (a
plain fit on every voxel; the run's record says why). All sizes are in voxels
(anisotropic spacing is not taken into account), as the patches are.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .edges import ball_max, mixed_labels

#: Widths up to this take the band by shifts (:func:`hypsegcli.edges.ball_max`), larger
#: ones by one distance transform per label (the same band). The shifts grow with the
#: width squared: on two labels at 128^3, 45x faster than the transforms at width 4, 5.7x
#: at 16, 1.5x at 32.
BALL_MAX_WIDTH = 16.0


def band_mask(coarse: np.ndarray, width: float, inside: np.ndarray | None = None) -> np.ndarray:
    """Voxels within ``width`` voxels of a voxel whose ``coarse`` label differs (bool, same shape).

    The distance of a voxel of label ``a`` is the Euclidean distance from its
    centre to the nearest voxel centre of a label other than ``a``; a volume
    with one label has no band. With ``inside`` (bool; ``cluster --mask``)
    only the voxels inside have labels: the others are in no band and are no
    other label (the border of the mask is no boundary).
    """
    coarse = np.asarray(coarse)
    if not (np.isfinite(width) and width >= 0):
        raise ValueError(f"width={width} should be a finite number >= 0")
    values = np.unique(coarse if inside is None else coarse[inside])
    if len(values) < 2 or width < 1:
        return np.zeros(coarse.shape, dtype=bool)
    if width > BALL_MAX_WIDTH:
        return _band_mask_edt(coarse, width, values, inside)
    # another label within width: the largest and least label within width differ
    return mixed_labels(
        coarse,
        lambda a, smallest: ball_max(a, width, smallest=smallest),
        None if inside is None else ~np.asarray(inside, dtype=bool),
    )


def _band_mask_edt(
    coarse: np.ndarray, width: float, values: np.ndarray, inside: np.ndarray | None
) -> np.ndarray:
    """:func:`band_mask` by one Euclidean distance transform per label."""
    band = np.zeros(coarse.shape, dtype=bool)
    for value in values:
        member = coarse == value
        if inside is None:
            # distance of each voxel of this label to the nearest voxel of another label
            band |= member & (ndi.distance_transform_edt(member) <= width)
        else:
            member &= inside
            others = inside & ~member
            band |= member & (ndi.distance_transform_edt(~others) <= width)
    return band


def bare_labels(
    coarse: np.ndarray, band: np.ndarray, inside: np.ndarray | None = None
) -> list[int]:
    """The ``coarse`` labels (of the voxels ``inside``, all without it) that have no voxel
    off the ``band``, ascending."""
    coarse = np.asarray(coarse)
    keep = np.ones(coarse.shape, dtype=bool) if inside is None else np.asarray(inside, bool)
    present = np.unique(coarse[keep])
    cored = np.unique(coarse[keep & ~np.asarray(band, dtype=bool)])
    return [int(v) for v in np.setdiff1d(present, cored)]


def band_sources(coarse: np.ndarray, band: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which voxel each ``band`` voxel takes its label from in :func:`fill_band`: flat
    indices ``(targets, sources)``, each source the nearest non-band voxel of its target's
    coarse region.

    The nearest voxel depends on ``coarse`` and ``band`` only, not on the labels filled,
    so ``cluster`` computes it once per volume for every nested k (the Euclidean feature
    transform is most of the nesting's cost). Band voxels of a region with no voxel off
    the band are in neither array. Indices are uint32 below 2^32 voxels, else int64.
    """
    coarse = np.asarray(coarse)
    band = np.asarray(band, dtype=bool)
    if coarse.shape != band.shape:
        raise ValueError(f"shapes differ: {coarse.shape}, {band.shape}")
    index_type = np.uint32 if coarse.size < 2**32 else np.int64
    targets, sources = [], []
    if band.any():
        for value in np.unique(coarse[band]):
            region = coarse == value
            source = region & ~band
            if not source.any():
                continue
            # crop to the region's bounding box: the nearest source voxel of a
            # region lies inside the box of that region
            box = ndi.find_objects(region.astype(np.uint8))[0]
            idx = ndi.distance_transform_edt(
                ~source[box], return_distances=False, return_indices=True
            )
            target = region & band
            inner = target[box]  # (every target lies in the box)
            # (one axis at a time, so that at most one int64 copy per target is made)
            src = np.zeros(int(np.count_nonzero(inner)), dtype=np.int64)
            for axis, (near, part) in enumerate(zip(idx, box, strict=True)):
                src *= coarse.shape[axis]
                src += near[inner]
                src += part.start
            del idx
            targets.append(np.flatnonzero(target).astype(index_type))
            sources.append(src.astype(index_type))
    if not targets:
        return np.empty(0, index_type), np.empty(0, index_type)
    return np.concatenate(targets), np.concatenate(sources)


def fill_band(
    labels: np.ndarray,
    coarse: np.ndarray,
    band: np.ndarray,
    sources: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """``labels`` with each ``band`` voxel's label taken from the nearest non-band voxel of its coarse region.

    Nearest by Euclidean distance in voxels (ties broken as
    ``scipy.ndimage.distance_transform_edt`` does). A coarse region with no
    voxel outside the band keeps its labels. ``sources``: :func:`band_sources`
    of these ``coarse`` and ``band``, computed here when not given. Returns a
    new array.
    """
    labels = np.asarray(labels)
    coarse = np.asarray(coarse)
    band = np.asarray(band, dtype=bool)
    if not (labels.shape == coarse.shape == band.shape):
        raise ValueError(f"shapes differ: {labels.shape}, {coarse.shape}, {band.shape}")
    targets, picked = band_sources(coarse, band) if sources is None else sources
    out = labels.copy()
    out.reshape(-1)[targets] = labels.reshape(-1)[picked]
    return out
