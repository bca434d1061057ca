"""Patches and triplets: intensity normalization, patch resampling, triplet sampling.

Patch definition (design.md, shared by training and dense inference): a patch
with centre ``c`` (3 floats, voxel coordinates, the centre of voxel ``i`` at
coordinate ``i``) and side ``s`` (voxels, a float) resampled to ``m`` samples
per side is the volume, trilinearly interpolated, at the cell-centred points

    c - s/2 + (j + 0.5) * s / m,   j = 0 .. m-1   (per axis),

with the value of the nearest border voxel outside the volume (clamp). A volume
of size ``X`` spans ``[-0.5, X - 0.5]`` along that axis; a box of side ``s``
and centre ``c`` is ``[c - s/2, c + s/2]`` per axis.

Triplet sampling (paper Sec. 3.2 and Sec. 4; METHOD.md "Triplet sampling as the
authors ran it") draws anchors of side ``r`` at multiple scales, a positive
child of side ``r_c`` inside the anchor and a negative of the same side
``r_c`` that does not overlap the anchor, freshly at every call. Centres and
sides are continuous: the patch definition handles fractional boxes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import NORMALIZATIONS, SamplingConfig
from .errors import BadInputError, HypsegError

__all__ = [
    "Triplets",
    "TripletSampler",
    "interpolate",
    "NORMALIZATIONS",
    "normalize",
    "normalize_volume",
    "patch_grid",
    "sample_patches",
]

# Slack (voxels) when checking that a box leaves room for a negative: rounding
# of the box arithmetic may make a room of exactly r_c come out a hair short.
ROOM_TOLERANCE = 1e-6


# --------------------------------------------------------------------------
# Intensity normalization
# --------------------------------------------------------------------------


def _checked_volume(arr: np.ndarray, what: str) -> np.ndarray:
    """``arr`` as a real array (booleans as float32); BadInputError for an empty
    volume, a non-numeric or complex dtype, non-finite voxels (naming how many)
    or a constant volume (nothing to segment)."""
    arr = np.asarray(arr)
    if arr.size == 0:
        raise BadInputError(f"{what}: empty (shape {arr.shape})")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise BadInputError(f"{what}: dtype {arr.dtype}, expected a numeric array")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise BadInputError(f"{what}: complex dtype {arr.dtype}, expected real values")
    finite = np.isfinite(arr)
    n_bad = arr.size - int(np.count_nonzero(finite))
    if n_bad:
        raise BadInputError(
            f"{what}: {n_bad} non-finite voxel(s) (NaN or inf) out of {arr.size}; expected finite values"
        )
    vmin = float(arr.min())
    if vmin == float(arr.max()):
        raise BadInputError(f"{what}: constant (every voxel = {vmin:g}); nothing to segment")
    return arr


#: ``normalize_volume`` clips to [-NORM_CLIP, 1 + NORM_CLIP] (and ``normalize(..., "zscore")``
#: clips the raw values likewise before its mean and deviation): values more than this many
#: percentile ranges beyond the range are artefacts (hot pixels, gold beads, a stray
#: 1e30) that would otherwise take a k-means cluster of their own and dominate the
#: spatial steps' statistics. The synthetic data reach -0.49 ... 2.70.
NORM_CLIP = 4.0


def normalize_volume(
    arr: np.ndarray, low: float = 1.0, high: float = 99.0, *, name: str | None = None
) -> np.ndarray:
    """Robust percentile scaling of one volume to roughly [0, 1].

    ``out = (x - P_low) / (P_high - P_low)`` with ``P_q`` the q-th percentile of
    all voxels of ``arr`` (numpy's linear interpolation), returned as float32:
    voxels below ``P_low`` or above ``P_high`` fall outside [0, 1], and only
    those more than :data:`NORM_CLIP` ranges outside are clipped there. The
    percentiles are computed per volume, so the same levels ``(low, high)``
    (stored in the model file) reproduce the scaling at inference.

    ``name`` (a file name, say) is put into error messages in place of
    "volume". Raises :class:`BadInputError` for an empty volume, a volume with
    non-finite voxels (naming how many), or a constant one (``P_high == P_low``).
    """
    what = name or "volume"
    if not 0 <= low < high <= 100:
        raise BadInputError(
            f"percentiles low={low} and high={high} should satisfy 0 <= low < high <= 100"
        )
    arr = _checked_volume(arr, what)
    p_low, p_high = (float(v) for v in np.percentile(arr, [low, high]))
    if not p_high > p_low:
        vmin, vmax = float(arr.min()), float(arr.max())
        raise BadInputError(
            f"{what}: constant between percentiles {low:g} and {high:g} "
            f"(both {p_low:g}, range {vmin:g}..{vmax:g}): too few voxels differ for this "
            "intensity scaling (train --norm-range sets the percentiles of a model)"
        )
    out = _scaled(arr, p_low, 1.0 / (p_high - p_low))
    np.clip(out, np.float32(-NORM_CLIP), np.float32(1.0 + NORM_CLIP), out=out)
    return out


def _scaled(arr: np.ndarray, shift: float, scale: float) -> np.ndarray:
    """``(arr - shift) * scale`` as a new float32 array: in float32, or in float64 where
    ``scale`` is beyond float32's range (intensities spanning less than about 3e-39, which
    float32 holds as subnormal numbers: the scale would be infinite, the voxels NaN)."""
    if scale > float(np.finfo(np.float32).max):
        return ((arr.astype(np.float64) - shift) * scale).astype(np.float32)
    out = arr.astype(np.float32, copy=True)
    out -= np.float32(shift)
    out *= np.float32(scale)
    return out


def normalize(
    arr: np.ndarray,
    method: str = "percentile",
    low: float = 1.0,
    high: float = 99.0,
    *,
    name: str | None = None,
) -> np.ndarray:
    """One volume's intensities as the model sees them (float32), by ``method``:

    - ``percentile``: :func:`normalize_volume` with levels ``(low, high)``;
      ``(0, 100)`` is min-max scaling.
    - ``zscore``: ``(x - mean) / std`` over all voxels (computed in float64),
      the usual scaling of cryo-ET tomograms, after clipping the voxels more
      than :data:`NORM_CLIP` 1st-99th percentile ranges beyond those
      percentiles (the outliers ``percentile`` clips; a stray 1e30 would
      otherwise make the standard deviation and flatten every other voxel to
      about 0). Data without such voxels are scaled exactly as plain z-scores.
    - ``none``: the voxel values as stored, for data whose absolute
      intensities mean the same in every volume (CT in Hounsfield units, say).

    Every method rejects empty, non-numeric, complex and non-finite volumes and
    constant ones (nothing to segment), naming ``name`` in the message.
    """
    what = name or "volume"
    if method == "percentile":
        return normalize_volume(arr, low, high, name=name)
    if method not in NORMALIZATIONS:
        raise BadInputError(
            f"normalisation {method!r}: expected one of {', '.join(NORMALIZATIONS)}"
        )
    arr = _checked_volume(arr, what)
    if method == "none":
        return arr.astype(np.float32, copy=True)
    p_low, p_high = (float(v) for v in np.percentile(arr, [1.0, 99.0]))
    span = p_high - p_low
    if span > 0:
        lo, hi = p_low - NORM_CLIP * span, p_high + NORM_CLIP * span
        if float(arr.min()) < lo or float(arr.max()) > hi:
            arr = arr.astype(np.float64)  # a copy: the input is never modified
            np.clip(arr, lo, hi, out=arr)
    mean = float(arr.mean(dtype=np.float64))
    std = float(arr.std(dtype=np.float64))
    return _scaled(arr, mean, 1.0 / std)


# --------------------------------------------------------------------------
# Patch resampling
# --------------------------------------------------------------------------


def _as_volume5d(volume: torch.Tensor) -> torch.Tensor:
    """(X, Y, Z) or (1, 1, X, Y, Z) -> floating (1, 1, X, Y, Z)."""
    if volume.dim() == 3:
        volume = volume[None, None]
    elif not (volume.dim() == 5 and volume.shape[0] == 1 and volume.shape[1] == 1):
        raise ValueError(
            f"volume of shape {tuple(volume.shape)}: expected (X, Y, Z) or (1, 1, X, Y, Z)"
        )
    if not volume.is_floating_point():
        volume = volume.float()
    return volume


def _axis_points(centers: torch.Tensor, sides: torch.Tensor, m: int) -> torch.Tensor:
    """Per-axis sample coordinates (B, 3, m): ``c_a - s/2 + (j + 0.5) s/m``."""
    m = int(m)
    if m < 1:
        raise ValueError(f"m={m} should be >= 1")
    if centers.dim() != 2 or centers.shape[-1] != 3:
        raise ValueError(f"centers of shape {tuple(centers.shape)}: expected (B, 3)")
    if sides.dim() != 1 or sides.shape[0] != centers.shape[0]:
        raise ValueError(
            f"sides of shape {tuple(sides.shape)}: expected ({centers.shape[0]},), one side per patch"
        )
    dtype = torch.promote_types(torch.promote_types(centers.dtype, sides.dtype), torch.float32)
    centers = centers.to(dtype)
    sides = sides.to(device=centers.device, dtype=dtype)
    # (j + 0.5)/m - 1/2, j = 0..m-1: cell centres of [-1/2, 1/2] cut into m cells.
    t = (torch.arange(m, device=centers.device, dtype=dtype) + 0.5) / m - 0.5
    return centers[:, :, None] + sides[:, None, None] * t


def _cube(axes: torch.Tensor, *, reverse: bool = False) -> torch.Tensor:
    """(B, 3, m) per-axis values -> (B, m, m, m, 3), ``[b, i, j, k] = (a0[i], a1[j], a2[k])``.

    ``reverse=True`` lists them as (a2[k], a1[j], a0[i]) (grid_sample's order).
    """
    b, _, m = axes.shape
    parts = (
        axes[:, 0, :, None, None].expand(b, m, m, m),
        axes[:, 1, None, :, None].expand(b, m, m, m),
        axes[:, 2, None, None, :].expand(b, m, m, m),
    )
    return torch.stack(parts[::-1] if reverse else parts, dim=-1)


def patch_grid(centers: torch.Tensor, sides: torch.Tensor, m: int) -> torch.Tensor:
    """Sample points of patches, per the patch definition.

    centers (B, 3) voxel coordinates (x, y, z), sides (B,) -> points
    (B, m, m, m, 3) with ``points[b, i, j, k] = centers[b] - sides[b]/2 +
    ((i, j, k) + 0.5) * sides[b] / m``: the last dimension holds (x, y, z) and
    the patch axes (i, j, k) follow the volume axes (x, y, z). Floating dtype
    of ``centers``/``sides`` (promoted, at least float32).
    """
    return _cube(_axis_points(centers, sides, m))


def _normalize(points: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Voxel coordinates -> grid_sample's align_corners=True coordinates, per axis.

    ``2 p / (size - 1) - 1``, ``size`` broadcasting against ``points``; a
    size-1 axis divides by 1 instead of 0 (grid_sample then reads voxel 0
    whatever the value).
    """
    denom = (size.to(device=points.device, dtype=points.dtype) - 1).clamp_min(1)
    return 2.0 * points / denom - 1.0


def _sampling_grid(
    centers: torch.Tensor,
    sides: torch.Tensor,
    m: int,
    size: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """grid_sample grid (B, m, m, m, 3) of patches in volumes of ``size`` ((3,) or (B, 3)).

    The per-axis coordinates (B, 3, m) are computed and normalized in float64
    (except on MPS, which lacks it), then cast to ``dtype`` and expanded in
    grid_sample's (z, y, x) order, x varying along the first patch axis.
    """
    if centers.device.type != "mps" and torch.device(device).type != "mps":
        centers, sides = centers.to(torch.float64), sides.to(torch.float64)
    axes = _axis_points(centers, sides, m)  # (B, 3, m), x y z
    norm = _normalize(axes, size.reshape(-1, 3)[:, :, None])
    return _cube(norm.to(device=device, dtype=dtype), reverse=True)


def interpolate(volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear interpolation of a volume at voxel coordinates, clamped to the border.

    volume (X, Y, Z) or (1, 1, X, Y, Z); points (..., 3) in voxel coordinates
    (x, y, z), voxel ``i``'s centre at ``i`` -> values (...) in the volume's
    floating dtype (integer volumes are read as float32), on its device.

    Implementation: ``grid_sample(mode='bilinear')`` on a 5D input (trilinear)
    with ``align_corners=True``, ``padding_mode='border'`` and coordinates
    normalized as ``2 * p / (size - 1) - 1``. grid_sample's grid lists
    (x, y, z) = (W, H, D), the input's dims reversed, so our (x, y, z) go in as
    (z, y, x). A size-1 axis uses the divisor 1 (any normalized value reads
    voxel 0 there), never 0.
    """
    vol = _as_volume5d(volume)
    if points.shape[-1] != 3:
        raise ValueError(f"points of shape {tuple(points.shape)}: expected (..., 3)")
    work = torch.promote_types(points.dtype, torch.float32)
    norm = _normalize(points.to(work), torch.tensor(vol.shape[2:]))
    grid = norm.flip(-1).reshape(1, -1, 1, 1, 3).to(device=vol.device, dtype=vol.dtype)
    out = F.grid_sample(vol, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(points.shape[:-1])


def sample_patches(
    volume: torch.Tensor, centers: torch.Tensor, sides: torch.Tensor, m: int
) -> torch.Tensor:
    """Patches resampled to m^3 per the patch definition.

    volume (X, Y, Z) or (1, 1, X, Y, Z) on any device and floating dtype;
    centers (B, 3) voxel coordinates (x, y, z), sides (B,) in voxels, any
    device -> (B, 1, m, m, m) on the volume's device and dtype, with
    ``out[b, 0, i, j, k]`` the volume at ``patch_grid(...)[b, i, j, k]``
    (trilinear, clamp to the border; see :func:`interpolate`). Vectorized: one
    grid_sample call. The per-axis coordinates are computed and normalized in
    float64 before the grid is expanded in the volume's dtype.
    """
    vol = _as_volume5d(volume)
    m = int(m)
    grid = _sampling_grid(centers, sides, m, torch.tensor(vol.shape[2:]), vol.dtype, vol.device)
    b = grid.shape[0]
    out = F.grid_sample(
        vol,
        grid.reshape(1, b * m, m, m, 3),
        mode="bilinear",
        padding_mode="border",
        align_corners=True,
    )
    return out.reshape(b, 1, m, m, m)


# --------------------------------------------------------------------------
# Triplet sampling
# --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Triplets:
    """A batch of (anchor, positive, negative) patches and the boxes they came from.

    ``anchor``, ``positive``, ``negative``: (B, 1, m, m, m) on the sampler's
    device and dtype. Boxes: centres (B, 3) in voxel coordinates (x, y, z) and
    sides (B,) in voxels, on the same device in the box dtype (float64 except
    on devices without it); ``pos_side == neg_side``; ``volume_index`` (B,)
    int64 index into the sampler's volumes.
    """

    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    anchor_center: torch.Tensor
    anchor_side: torch.Tensor
    pos_center: torch.Tensor
    pos_side: torch.Tensor
    neg_center: torch.Tensor
    neg_side: torch.Tensor
    volume_index: torch.Tensor

    def __len__(self) -> int:
        return int(self.anchor.shape[0])


def _uniform(lo: torch.Tensor, hi: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Uniform draws on [lo, hi], elementwise (lo and hi of one shape)."""
    u = torch.rand(lo.shape, generator=gen, device=lo.device, dtype=lo.dtype)
    return lo + u * (hi - lo)


def _sample_outside(
    low: torch.Tensor,
    high: torch.Tensor,
    f_lo: torch.Tensor,
    f_hi: torch.Tensor,
    gen: torch.Generator,
) -> torch.Tensor:
    """Uniform points of a box minus an open box, all (B, 3), one point per row.

    Draws x uniformly from ``[low, high]`` (per axis, a box) minus the open
    box ``prod_a (f_lo_a, f_hi_a)``. The allowed set is cut into six disjoint
    pieces, (k, side) for k = 0, 1, 2: x_a inside the forbidden interval for
    a < k, x_k below ``f_lo_k`` or above ``f_hi_k``, x_a free for a > k. A
    piece is picked with probability proportional to its volume, then each
    coordinate uniformly in its interval. An axis with ``low == high`` counts as
    one position of unit measure. Where the allowed set has no volume (a face
    only, e.g. a box that fits exactly), one of the non-empty slabs "x_k below /
    above" is picked with equal odds instead. Returns x (B, 3).
    """
    f_hi = torch.maximum(
        f_hi, f_lo
    )  # an empty forbidden interval: below and above must not overlap
    full_len = (high - low).clamp_min(0)
    in_lo, in_hi = torch.maximum(low, f_lo), torch.minimum(high, f_hi)
    in_len = (in_hi - in_lo).clamp_min(0)
    # an axis of no length (a box as long as the volume) is one position, of unit
    # measure, inside the forbidden interval or not (so the law stays uniform over the
    # other axes instead of falling back to the faces)
    flat = ~(full_len > 0)
    if bool(flat.any()):
        in_len = torch.where(flat, ((f_lo < low) & (low < f_hi)).to(in_len.dtype), in_len)
        full_len = torch.where(flat, torch.ones_like(full_len), full_len)
    below_hi, above_lo = torch.minimum(high, f_lo), torch.maximum(low, f_hi)
    below_len, above_len = below_hi - low, high - above_lo  # negative: empty

    ones = torch.ones_like(in_len[:, :1])
    prefix = torch.cat(
        (ones, in_len[:, :1], in_len[:, :1] * in_len[:, 1:2]), dim=1
    )  # prod_{a<k} in_len
    suffix = torch.cat((full_len[:, 1:2] * full_len[:, 2:3], full_len[:, 2:3], ones), dim=1)
    side_len = torch.stack((below_len, above_len), dim=2)  # (B, 3, 2)
    weights = (prefix * suffix)[:, :, None] * side_len.clamp_min(0)  # (B, 3, 2)
    weights = weights.reshape(-1, 6)
    degenerate = ~(weights.sum(dim=1) > 0)
    if bool(degenerate.any()):
        fallback = (side_len.reshape(-1, 6) >= -ROOM_TOLERANCE).to(weights.dtype)
        if not bool((fallback[degenerate].sum(dim=1) > 0).all()):
            raise HypsegError("internal error: triplet sampler found no room for a box")
        weights = torch.where(degenerate[:, None], fallback, weights)
    piece = torch.multinomial(weights, 1, generator=gen).squeeze(1)  # (B,)
    k, side = piece // 2, piece % 2

    axis = torch.arange(3, device=low.device)[None, :]
    kk = k[:, None]
    is_k = axis == kk
    before = (axis < kk) & ~degenerate[:, None]
    side_lo = torch.where(side[:, None] == 0, low, above_lo)
    side_hi = torch.where(side[:, None] == 0, below_hi, high)
    lo = torch.where(is_k, side_lo, torch.where(before, in_lo, low))
    hi = torch.where(is_k, side_hi, torch.where(before, in_hi, high))
    x = _uniform(lo, torch.maximum(hi, lo), gen)
    return torch.minimum(torch.maximum(x, low), high)


def _overlap(lo: np.ndarray, hi: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Length of [lo, hi] ∩ [a, b], broadcast (0 where they do not meet)."""
    return np.clip(np.minimum(hi, b) - np.maximum(lo, a), 0.0, None)


#: :func:`mask_acceptance` takes the anchor side r at about this many points (Gauss-
#: Legendre pairs, at least one pair per piece of its range between even integers, where
#: the voxels an anchor can centre on change) and the child side r_c at this many per r
#: (even).
ACCEPT_R_POINTS = 48
ACCEPT_RC_POINTS = 4


def _gauss_nodes(k: int) -> np.ndarray:
    """Two-point Gauss-Legendre nodes on each of ``k`` equal parts of [0, 1] (2k nodes of
    equal weight; exact for cubics on each part)."""
    mid = (np.arange(k) + 0.5) / k
    half = 1 / (2 * k * math.sqrt(3))
    return np.sort(np.concatenate((mid - half, mid + half)))


def _anchor_sides(cfg: SamplingConfig, r_hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Points r of the anchor side's law on [r_min, r_hi] and their weights (summing to
    1): the range is cut at the even integers, and each piece gets pairs of
    Gauss-Legendre nodes in its quantiles in proportion to its probability (a pair at
    least)."""
    lo = float(cfg.r_min)
    if r_hi - lo < 1e-9:
        return np.array([lo]), np.array([1.0])
    log = cfg.scale_sampling == "log"
    cdf = (
        (lambda x: (np.log(x) - np.log(lo)) / (np.log(r_hi) - np.log(lo)))
        if log
        else (lambda x: (x - lo) / (r_hi - lo))
    )
    inverse = (
        (lambda q: np.exp(np.log(lo) + q * (np.log(r_hi) - np.log(lo))))
        if log
        else (lambda q: lo + q * (r_hi - lo))
    )
    cuts = [lo, *(e for e in range(2 * math.floor(lo / 2) + 2, math.ceil(r_hi), 2)), r_hi]
    points, weights = [], []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        qa, qb = cdf(a), cdf(b)
        if qb <= qa:
            continue
        k = max(1, round(ACCEPT_R_POINTS / 2 * (qb - qa)))
        points.append(np.clip(inverse(qa + _gauss_nodes(k) * (qb - qa)), lo, r_hi))
        weights.append(np.full(2 * k, (qb - qa) / (2 * k)))
    w = np.concatenate(weights)
    return np.concatenate(points), w / w.sum()


def _mask_sums(mask: np.ndarray, wx: np.ndarray, wy: np.ndarray, wz: np.ndarray) -> np.ndarray:
    """``sum_ijk mask_ijk wx[n, i] wy[n, j] wz[n, k]`` for every row n, in float64, a slab
    of x at a time (bounded memory)."""
    x_size, y_size, z_size = mask.shape
    rows = wx.shape[0]
    step = max(1, min((1 << 24) // max(1, y_size * rows), (1 << 24) // (y_size * z_size)))
    out = np.zeros(rows)
    for x0 in range(0, x_size, step):
        slab = mask[x0 : x0 + step].reshape(-1, z_size).astype(np.float64)
        t = (slab @ wz.T).reshape(-1, y_size, rows)  # (x, y, n)
        t = np.einsum("xyn,ny->xn", t, wy)
        out += np.einsum("xn,nx->n", t, wx[:, x0 : x0 + step])
    return out


def _centre_weights(size: int, lo: np.ndarray, hi: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Per row, the chance of each voxel along an axis of ``size`` that an anchor of side r
    whose lower corner is uniform on [lo, hi] has its centre nearest to: the corner
    a + r / 2 rounds to voxel i for a in [i - 0.5 - r / 2, i + 0.5 - r / 2). Where
    ``hi <= lo`` the corner is the one position lo, rounded half to even as torch.round."""
    cell = np.arange(size, dtype=np.float64)[None, :] - r[:, None] / 2
    out = _overlap(cell - 0.5, cell + 0.5, lo[:, None], hi[:, None])
    length = hi - lo
    thin = ~(length > 0)
    out[~thin] /= length[~thin, None]
    voxel = np.clip(np.round(lo[thin] + r[thin] / 2).astype(np.int64), 0, size - 1)
    out[thin] = 0.0
    out[np.nonzero(thin)[0], voxel] = 1.0
    return out


def mask_acceptance(mask: np.ndarray, cfg: SamplingConfig, r_hi: float) -> float:
    """The share of anchors drawn (steps 2-4 of :class:`TripletSampler`) whose centre's
    nearest voxel lies inside ``mask`` (bool, the volume's shape); ``r_hi``: the volume's
    largest anchor side.

    Given r and r_c the anchor's lower corner is uniform on a box minus a smaller open
    box (no room for the negative), both products of per-axis intervals, so the chance
    of each voxel is a difference of two products of per-axis overlaps: exact. Where the
    two boxes leave only faces, the corner lies on one of the faces :func:`_sample_outside`
    picks from, with equal odds, as it does. r is taken at the points of
    :func:`_anchor_sides` and r_c at ``ACCEPT_RC_POINTS`` Gauss-Legendre nodes of its
    law given r (no random numbers are drawn).
    """
    shape = mask.shape
    r_pts, r_w = _anchor_sides(cfg, r_hi)
    qc = _gauss_nodes(ACCEPT_RC_POINTS // 2)
    c_hi = np.minimum(np.minimum(r_pts - cfg.r_gap, cfg.child_max), max(shape) - r_pts)
    c_hi = np.maximum(c_hi, cfg.l_min)
    rc = (cfg.l_min + qc[None, :] * (c_hi[:, None] - cfg.l_min)).reshape(-1)
    r = np.repeat(r_pts, ACCEPT_RC_POINTS)
    weight = np.repeat(r_w, ACCEPT_RC_POINTS) / ACCEPT_RC_POINTS
    n = len(r)

    uniform_w, forb_w, box_len, forb_len, lows, highs, f_los, f_his = ([] for _ in range(8))
    for size in shape:
        # lower corner on [-0.5, size - 0.5 - r] (one position where the anchor spans the
        # axis); forbidden (no room on either side): the open (size - 0.5 - r - rc, rc - 0.5)
        low, high = np.full(n, -0.5), size - 0.5 - r
        f_lo, f_hi = high - rc, np.maximum(rc - 0.5, high - rc)
        flat = ~(high - low > 0)
        cut_lo, cut_hi = np.maximum(f_lo, low), np.minimum(f_hi, high)
        in_open = (f_lo < low) & (low < f_hi)  # a flat axis: its one position is forbidden
        lf = np.where(flat, in_open.astype(np.float64), np.clip(cut_hi - cut_lo, 0.0, None))
        uniform_w.append(_centre_weights(size, low, high, r))
        forb_w.append(_centre_weights(size, cut_lo, cut_hi, r) * lf[:, None])
        box_len.append(np.where(flat, 1.0, high - low))
        forb_len.append(lf)
        lows.append(low)
        highs.append(high)
        f_los.append(f_lo)
        f_his.append(f_hi)
    box_vol = np.prod(box_len, axis=0)
    forb_vol = np.all([lf > 0 for lf in forb_len], axis=0) * np.prod(forb_len, axis=0)
    allowed = box_vol - forb_vol
    faces = ~(allowed > 1e-12 * box_vol)  # only faces are left (see _sample_outside)

    # rows of per-axis weights; each row's sum over the mask is one term
    rows: list[list[np.ndarray]] = [[], [], []]
    for axis in range(3):
        rows[axis].append(uniform_w[axis])  # the box, as a probability
        rows[axis].append(forb_w[axis])  # the forbidden box, as lengths
    face_rows = np.nonzero(faces)[0]
    fr = r[face_rows]
    choices = []  # per slab (k, side), the face rows that may pick it
    for k in range(3):
        low, high = lows[k][face_rows], highs[k][face_rows]
        # the slabs below and above the forbidden interval along axis k, the other axes
        # free (as _sample_outside's fallback); a slab of no length is its one position
        below = (low, np.minimum(high, f_los[k][face_rows]))
        above = (np.maximum(low, f_his[k][face_rows]), high)
        for lo, hi in (below, above):
            choices.append(hi - lo >= -ROOM_TOLERANCE)
            # where the sampler clamps a draw of no length
            slab = _centre_weights(shape[k], np.minimum(lo, high), hi, fr)
            for axis in range(3):
                rows[axis].append(slab if axis == k else uniform_w[axis][face_rows])
    t = _mask_sums(mask, *(np.concatenate(rows[a]) for a in range(3)))

    in_box, in_forb = t[:n], t[n : 2 * n]
    hits = np.empty(n)
    regular = ~faces
    # P(inside) = (box mass inside - forbidden mass inside) / allowed volume, where the box
    # mass is in_box * box_vol (uniform_w is normalised) and the forbidden one in_forb
    hits[regular] = (
        in_box[regular] * box_vol[regular] - in_forb[regular] * (forb_vol[regular] > 0)
    ) / allowed[regular]
    if len(face_rows):
        per_face = t[2 * n :].reshape(6, len(face_rows))
        eligible = np.stack(choices)  # (6, F)
        counts = eligible.sum(axis=0)
        if not (counts > 0).all():
            raise HypsegError("internal error: an anchor law with no room for a box")
        hits[face_rows] = (per_face * eligible).sum(axis=0) / counts
    share = float(np.clip(np.dot(weight, hits), 0.0, 1.0))
    return share if share > 1e-12 else 0.0  # below: rounding of the box differences


#: Triplets whose anchor centre lies outside the mask are redrawn, whole: first
#: MASK_CANDIDATES candidates per such triplet, twice as many each further round, the first
#: one inside kept; at most MASK_DRAWS candidates per triplet in all (so a mask holding
#: 1 in 10 000 of the anchor centres fails to fill a batch of 64 with odds below 1e-40),
#: and at most MASK_CHUNK candidates drawn at once (bounded memory).
MASK_CANDIDATES = 32
MASK_DRAWS = 1 << 20
MASK_CHUNK = 1 << 18
#: A mask whose acceptance times MASK_DRAWS is below this is refused before training: a
#: triplet would fail with odds above e^-10, a batch of 64 about once in 300.
MASK_REFUSE = 10.0


class TripletSampler:
    """Draws fresh (anchor, positive, negative) patch triplets from a set of volumes.

    ``volumes``: 3D arrays or tensors (X, Y, Z), normalized already (see
    :func:`normalize_volume`); they are kept as (1, 1, X, Y, Z) tensors on
    ``device`` (default: the first volume's device) in ``dtype`` (default: the
    first volume's dtype if it is a floating torch tensor, float32 otherwise). ``m``: patch samples per
    side. ``generator``: the only source of randomness; boxes are drawn on its
    device and moved to ``device``.

    One triplet (Sec. 4 of the paper, METHOD.md), per call, all vectorized:

    1. volume: uniform over the volumes (each volume counts equally, whatever
       its size, as the paper samples patches "for a given 3D volume");
    2. anchor side r: uniform (``cfg.scale_sampling='uniform'``) or
       log-uniform (``'log'``) on ``[r_min, r_hi(v)]`` with
       ``r_hi(v) = min(r_max, min_a S_a, max_a S_a - l_min)``: the anchor fits
       the volume's shortest side and leaves room for a negative of side
       l_min along its longest one (the range is truncated, not clamped, so no
       mass piles up at the cap);
    3. child side r_c: uniform on ``[l_min, min(child_max, r - r_gap,
       max_a S_a - r)]`` (the last term only binds for anchors almost as long
       as the volume);
    4. anchor box ``[lo, lo + r]`` per axis: uniform over the positions inside
       the volume extent ``[-0.5, S - 0.5]`` that leave a slab of thickness
       >= r_c beside the anchor along at least one axis (room for the
       negative), i.e. the uniform anchor conditioned on the negative
       existing; for the default 50^3 setting this only moves the largest
       anchors toward a border;
    5. positive: side r_c, uniform among boxes inside the anchor box;
    6. negative: side r_c, uniform among boxes inside the volume whose
       interior is disjoint from the anchor box (faces may touch; disjoint
       along at least one axis). Background is allowed: nothing is filtered.

    Centres and sides are continuous floats; patches are resampled to m^3 by
    :func:`sample_patches`, one grid_sample call per distinct volume drawn.

    ``masks`` (``train --mask``): per volume a bool array of its shape, or None.
    A triplet whose anchor centre's nearest voxel lies outside its volume's
    mask is drawn again, whole, for the same volume (steps 2-6; so each volume
    still counts equally): ``MASK_CANDIDATES`` candidates in the first round,
    twice as many in each next, the first inside kept, up to ``MASK_DRAWS`` per
    triplet. A mask with no voxel where an anchor of side >= r_min can be
    centred (all near the border), or one so few anchors centre in
    (:func:`mask_acceptance` times ``MASK_DRAWS`` below ``MASK_REFUSE``), is
    refused here. Positives lie in their anchors; negatives may lie anywhere, as
    without a mask. Without masks the draws are exactly those above.
    """

    def __init__(
        self,
        volumes: Sequence[torch.Tensor | np.ndarray],
        cfg: SamplingConfig,
        m: int,
        *,
        generator: torch.Generator,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        masks: Sequence[np.ndarray | None] | None = None,
    ) -> None:
        if len(volumes) == 0:
            raise BadInputError("no training volumes: expected at least one")
        if masks is not None and len(masks) != len(volumes):
            raise BadInputError(f"{len(masks)} masks for {len(volumes)} volumes")
        if int(m) != m or m < 1:
            raise BadInputError(f"patch size m={m} should be an integer >= 1")
        if cfg.r_gap < 0:
            raise BadInputError(
                f"r_gap={cfg.r_gap} should be >= 0 (a positive child lies inside its anchor)"
            )
        self.cfg = cfg
        self.m = int(m)
        self.generator = generator
        first = volumes[0]
        if device is None:
            device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
        self.device = torch.device(device)
        if dtype is None:
            is_float_tensor = isinstance(first, torch.Tensor) and first.is_floating_point()
            dtype = first.dtype if is_float_tensor else torch.float32
        self.dtype = dtype

        min_longest = cfg.r_min + cfg.l_min
        vols, shapes = [], []
        for i, v in enumerate(volumes):
            if isinstance(v, np.ndarray):
                # torch shares neither read-only memory (memory maps) nor negative strides
                v = np.array(v) if not v.flags.writeable else np.ascontiguousarray(v)
            t = torch.as_tensor(v)
            if t.dim() == 5 and t.shape[0] == 1 and t.shape[1] == 1:
                t = t[0, 0]
            if t.dim() != 3:
                raise BadInputError(
                    f"volume {i} has shape {tuple(t.shape)}, expected 3 axes (X, Y, Z)"
                )
            shape = tuple(int(s) for s in t.shape)
            if min(shape) < cfg.r_min or max(shape) < min_longest:
                raise BadInputError(
                    f"volume {i} of shape {shape} is too small for triplets: every side should be "
                    f">= {cfg.r_min:g} (the smallest anchor, --r-min) and the longest >= "
                    f"{min_longest:g} (room for a negative beside it)"
                )
            t = t.to(device=self.device, dtype=self.dtype)
            if not bool(torch.isfinite(t).all()):
                raise BadInputError(
                    f"volume {i} of shape {shape} has non-finite voxels (NaN or inf)"
                )
            vols.append(t[None, None].contiguous())
            shapes.append(shape)
        self.volumes: list[torch.Tensor] = vols
        self.shapes: list[tuple[int, int, int]] = shapes

        gdev = generator.device
        no_float64 = "mps" in (gdev.type, self.device.type)
        self._box_dtype = torch.float32 if no_float64 else torch.float64
        size = torch.tensor(shapes, dtype=self._box_dtype, device=gdev)  # (V, 3)
        self._size = size
        self._r_hi = torch.clamp(
            torch.minimum(size.amin(dim=1), size.amax(dim=1) - cfg.l_min), max=cfg.r_max
        )  # (V,), >= r_min by the check above
        self.masks: list[torch.Tensor | None] | None = None
        #: per volume, the share of anchors drawn that centre inside its mask (None without
        #: a mask; :func:`mask_acceptance`): each triplet takes about 1 / share draws
        self.mask_acceptance: list[float | None] = [None] * len(vols)
        if masks is not None and any(m is not None for m in masks):
            self.masks = []
            for i, (mask, shape) in enumerate(zip(masks, shapes, strict=True)):
                if mask is None:
                    self.masks.append(None)
                    continue
                mask = np.asarray(mask, dtype=bool)
                if mask.shape != shape:
                    raise BadInputError(
                        f"volume {i}: mask of shape {mask.shape}, the volume has shape {shape}"
                    )
                if not mask.any():
                    raise BadInputError(f"volume {i}: the mask is empty (no non-zero voxel)")
                # anchor centres lie in [r/2 - 0.5, S - 0.5 - r/2] per axis, r >= r_min; their
                # nearest voxels (rounded half to even, as torch.round) at most these
                first = int(np.round(cfg.r_min / 2 - 0.5))
                reach = tuple(
                    slice(first, int(np.round(s - 0.5 - cfg.r_min / 2)) + 1) for s in shape
                )
                if not mask[reach].any():
                    raise BadInputError(
                        f"the mask of volume {i}: all its voxels lie within {first} voxels of "
                        f"the border, where no anchor (side >= --r-min {cfg.r_min:g}) is centred"
                    )
                share = mask_acceptance(mask, cfg, float(self._r_hi[i]))
                if share * MASK_DRAWS < MASK_REFUSE:
                    often = f"about 1 in {1 / share:,.0f}" if share > 0 else "none"
                    raise BadInputError(
                        f"the mask of volume {i}: of the anchors drawn, {often} centre inside "
                        f"it, too few for the {MASK_DRAWS:,} draws a triplet may take "
                        "(enlarge the mask, or place it away from the border)"
                    )
                self.mask_acceptance[i] = share
                self.masks.append(torch.from_numpy(mask).to(gdev))

    def __len__(self) -> int:
        return len(self.volumes)

    def sample_boxes(self, batch_size: int) -> dict[str, torch.Tensor]:
        """Draw the boxes of ``batch_size`` triplets (see the class docstring).

        Returns a dict with the :class:`Triplets` box fields, on the
        generator's device in the box dtype (float64 where supported).
        """
        if int(batch_size) != batch_size or batch_size < 1:
            raise BadInputError(f"batch_size={batch_size} should be an integer >= 1")
        gen, n = self.generator, int(batch_size)
        vidx = torch.randint(len(self.volumes), (n,), generator=gen, device=gen.device)
        boxes = self._draw(vidx)
        if self.masks is None:
            return boxes
        outside = ~self._anchor_inside(boxes)
        per_row, drawn = MASK_CANDIDATES, 0
        while True:
            rows = torch.nonzero(outside).flatten()
            if len(rows) == 0:
                return boxes
            if drawn >= MASK_DRAWS:
                break
            # fresh triplets for each row still outside; the first one inside replaces it
            # (the first success of iid draws: the same conditional law)
            count = min(per_row, max(1, MASK_CHUNK // len(rows)), MASK_DRAWS - drawn)
            again = self._draw(vidx[rows].repeat_interleave(count))
            hit = self._anchor_inside(again).reshape(len(rows), count)
            found = hit.any(dim=1)
            pick = torch.arange(len(rows), device=hit.device) * count + hit.long().argmax(1)
            for key, value in again.items():
                boxes[key][rows[found]] = value[pick[found]]
            outside[rows[found]] = False
            drawn += count
            per_row *= 2
        worst = int(torch.mode(vidx[outside]).values)
        raise BadInputError(
            f"the mask of volume {worst}: after {MASK_DRAWS} draws an anchor still centres "
            "outside it (the mask is too small for anchors to centre in it by chance: enlarge it)"
        )

    def _anchor_inside(self, boxes: dict[str, torch.Tensor]) -> torch.Tensor:
        """Whether each triplet's anchor centre has its nearest voxel inside its mask."""
        assert self.masks is not None
        vidx = boxes["volume_index"]
        inside = torch.ones(len(vidx), dtype=torch.bool, device=vidx.device)
        for v, mask in enumerate(self.masks):
            rows = torch.nonzero(vidx == v).flatten()
            if mask is None or len(rows) == 0:
                continue
            voxel = torch.round(boxes["anchor_center"][rows]).long()
            upper = torch.tensor(mask.shape, device=voxel.device) - 1
            voxel = torch.minimum(torch.clamp(voxel, min=0), upper)
            inside[rows] = mask[voxel[:, 0], voxel[:, 1], voxel[:, 2]]
        return inside

    def _draw(self, vidx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Boxes of one triplet per entry of ``vidx`` (steps 2-6 of the class docstring)."""
        cfg, gen, n = self.cfg, self.generator, len(vidx)
        size = self._size[vidx]  # (B, 3)
        longest = size.amax(dim=1)

        # Anchor side, on [r_min, r_hi(v)].
        r_lo = torch.full((n,), float(cfg.r_min), dtype=size.dtype, device=size.device)
        r_hi = self._r_hi[vidx]
        if cfg.scale_sampling == "log":
            r = torch.exp(_uniform(torch.log(r_lo), torch.log(r_hi), gen))
        else:
            r = _uniform(r_lo, r_hi, gen)
        r = torch.minimum(torch.maximum(r, r_lo), r_hi)  # exp(log(.)) rounding

        # Child side (positive and negative).
        c_lo = torch.full_like(r, float(cfg.l_min))
        c_hi = torch.minimum(torch.clamp(r - cfg.r_gap, max=cfg.child_max), longest - r)
        c_hi = torch.maximum(c_hi, c_lo)  # rounding only: the bounds guarantee c_hi >= l_min
        rc = _uniform(c_lo, c_hi, gen)

        # Anchor lower corner: inside the volume, leaving a slab >= rc beside it
        # on some axis. Forbidden per axis: no room below (lo + 0.5 < rc) and no
        # room above (S - 0.5 - (lo + r) < rc).
        low = torch.full_like(size, -0.5)
        a_high = size - 0.5 - r[:, None]
        no_room_above = a_high - rc[:, None]  # lo beyond this: slab above thinner than rc
        no_room_below = (rc[:, None] - 0.5).expand_as(size)  # lo below this: slab below thinner
        a_lo = _sample_outside(low, a_high, no_room_above, no_room_below, gen)

        # Positive: inside the anchor.
        p_lo = _uniform(a_lo, a_lo + (r - rc)[:, None], gen)

        # Negative: inside the volume, interiors disjoint from the anchor's; with
        # a negative gap g, also within g voxels of the anchor's box per axis.
        n_high = size - 0.5 - rc[:, None]
        n_low = low
        if cfg.negative_gap is not None:
            g = float(cfg.negative_gap)
            n_low = torch.maximum(low, a_lo - rc[:, None] - g)
            n_high = torch.minimum(n_high, a_lo + r[:, None] + g)
        n_lo = _sample_outside(n_low, n_high, a_lo - rc[:, None], a_lo + r[:, None], gen)

        return {
            "anchor_center": a_lo + r[:, None] / 2,
            "anchor_side": r,
            "pos_center": p_lo + rc[:, None] / 2,
            "pos_side": rc,
            "neg_center": n_lo + rc[:, None] / 2,
            "neg_side": rc.clone(),
            "volume_index": vidx,
        }

    def sample(self, batch_size: int) -> Triplets:
        """Draw ``batch_size`` fresh triplets and resample their patches to m^3.

        The triplets come grouped by volume (sorted by ``volume_index``, in
        draw order within a volume). One grid for all 3 B patches is built in
        one pass; each volume's rows are then resampled by grid_sample
        (one call per volume and patch kind) into contiguous rows.
        """
        boxes = self.sample_boxes(batch_size)
        order = torch.argsort(boxes["volume_index"], stable=True)
        boxes = {k: v[order].to(self.device) for k, v in boxes.items()}
        n, m = int(batch_size), self.m
        vidx = boxes["volume_index"]
        centers = torch.cat((boxes["anchor_center"], boxes["pos_center"], boxes["neg_center"]))
        sides = torch.cat((boxes["anchor_side"], boxes["pos_side"], boxes["neg_side"]))
        size = self._size.to(self.device)[vidx].repeat(3, 1)
        grid = _sampling_grid(centers, sides, m, size, self.dtype, self.device)
        grid = grid.reshape(3, n * m, m, m, 3)  # kind (anchor, positive, negative), rows by volume
        out = torch.empty((3, n, 1, m, m, m), device=self.device, dtype=self.dtype)
        counts = torch.bincount(vidx, minlength=len(self.volumes)).tolist()
        start = 0
        for v, count in enumerate(counts):
            if not count:
                continue
            for kind in range(3):
                patches = F.grid_sample(
                    self.volumes[v],
                    grid[kind, start * m : (start + count) * m][None],
                    mode="bilinear",
                    padding_mode="border",
                    align_corners=True,
                )
                out[kind, start : start + count] = patches.reshape(count, 1, m, m, m)
            start += count
        return Triplets(anchor=out[0], positive=out[1], negative=out[2], **boxes)
