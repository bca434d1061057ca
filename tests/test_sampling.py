"""Tests for hypsegcli.sampling: normalization, patch resampling, triplet sampling.

References are independent: numpy percentiles, scipy.ndimage.map_coordinates
(order=1, mode='nearest' is trilinear with clamp to the border) at points built
by hand from the patch definition, and box geometry checked directly.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from scipy import ndimage, stats

from hypsegcli.config import SamplingConfig
from hypsegcli.errors import BadInputError
from hypsegcli.sampling import (
    NORM_CLIP,
    Triplets,
    TripletSampler,
    _sample_outside,
    interpolate,
    normalize,
    normalize_volume,
    patch_grid,
    sample_patches,
)

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 2e-5, torch.float64: 1e-11}
GEOM_TOL = 1e-9  # boxes are float64


def _ref_points(center, side, m):
    """Patch sample points by the definition, as three 1D numpy arrays (x, y, z)."""
    j = np.arange(m)
    return [center[a] - side / 2 + (j + 0.5) * side / m for a in range(3)]


def _ref_patch(vol: np.ndarray, center, side, m) -> np.ndarray:
    px, py, pz = _ref_points(np.asarray(center, float), float(side), m)
    gx, gy, gz = np.meshgrid(px, py, pz, indexing="ij")
    coords = np.stack([gx.ravel(), gy.ravel(), gz.ravel()])
    return ndimage.map_coordinates(vol, coords, order=1, mode="nearest").reshape(m, m, m)


# --------------------------------------------------------------------------
# normalize_volume
# --------------------------------------------------------------------------


def test_normalize_matches_percentile_formula_unclipped():
    rng = np.random.default_rng(0)
    arr = rng.gamma(2.0, 3.0, size=(12, 9, 7)).astype(np.float64)
    out = normalize_volume(arr, 1.0, 99.0)
    p1, p99 = np.percentile(arr, [1, 99])
    assert out.dtype == np.float32 and out.shape == arr.shape
    np.testing.assert_allclose(out, (arr - p1) / (p99 - p1), rtol=1e-5, atol=1e-6)
    assert out.min() < 0 and out.max() > 1  # not clipped
    assert np.mean((out >= 0) & (out <= 1)) > 0.97


def test_normalize_integer_input_and_custom_levels():
    arr = np.arange(101, dtype=np.int16).reshape(101, 1, 1)
    out = normalize_volume(arr, low=10, high=60)
    np.testing.assert_allclose(out.ravel(), (np.arange(101) - 10) / 50, atol=1e-6)
    assert arr.dtype == np.int16  # input untouched


@pytest.mark.parametrize("method", ["percentile", "zscore"])
def test_normalize_intensities_float32_holds_as_subnormal_numbers(method):
    """Voxels of about 1e-42 (finite; float32 holds them as subnormal numbers): the scale
    1/range overflowed float32 to inf and 0 * inf made NaN, reported as "non-finite
    voxels". Scaled in float64 now, equal to the float64 formula."""
    rng = np.random.default_rng(0)
    arr = (rng.random((12, 10, 8)) * 1e-42).astype(np.float32)
    assert np.isfinite(arr).all() and 0 < arr.max() < np.finfo(np.float32).tiny
    out = normalize(arr, method)
    x = arr.astype(np.float64)
    if method == "percentile":
        lo, hi = np.percentile(x, [1.0, 99.0])
        ref = np.clip((x - lo) / (hi - lo), -NORM_CLIP, 1 + NORM_CLIP)
    else:
        ref = (x - x.mean()) / x.std()
    assert out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_normalize_constant_volume_names_file():
    with pytest.raises(BadInputError, match=r"^a\.nii: constant"):
        normalize_volume(np.full((4, 4, 4), 3.0), name="a.nii")


def test_normalize_constant_between_percentiles():
    arr = np.zeros((10, 10, 10), np.float32)
    arr[0, 0, 0] = 5.0  # 0.1 % of voxels: P1 == P99 == 0
    with pytest.raises(BadInputError, match="constant between percentiles 1 and 99"):
        normalize_volume(arr)
    out = normalize_volume(arr, 0, 100)
    assert out.max() == 1.0 and out.min() == 0.0


def test_normalize_non_finite_counted():
    arr = np.ones((5, 5, 5), np.float32)
    arr[1, 2, 3] = np.nan
    arr[0, 0, 0] = np.inf
    arr[4, 4, 4] = -np.inf
    with pytest.raises(BadInputError, match=r"^b\.mrc: 3 non-finite voxel"):
        normalize_volume(arr, name="b.mrc")


def test_normalize_rejects_empty_and_bad_levels():
    with pytest.raises(BadInputError, match="empty"):
        normalize_volume(np.zeros((0, 3, 3)))
    with pytest.raises(BadInputError, match="low=50"):
        normalize_volume(np.random.default_rng(0).random((3, 3, 3)), 50, 20)


def test_normalize_methods_against_float64_references():
    rng = np.random.default_rng(1)
    arr = (rng.gamma(2.0, 3.0, size=(11, 8, 6)) * 40 + 1000).astype(np.int16)
    ref = arr.astype(np.float64)
    kept = arr.copy()
    z = normalize(arr, "zscore", name="t.mrc")
    assert z.dtype == np.float32 and z.shape == arr.shape
    np.testing.assert_allclose(z, (ref - ref.mean()) / ref.std(), rtol=1e-5, atol=1e-5)
    assert abs(float(z.astype(np.float64).mean())) < 1e-5
    assert abs(float(z.astype(np.float64).std()) - 1) < 1e-5
    raw = normalize(arr, "none")
    assert raw.dtype == np.float32 and np.array_equal(raw, ref.astype(np.float32))
    np.testing.assert_array_equal(normalize(arr, "percentile", 5, 95), normalize_volume(arr, 5, 95))
    assert arr.dtype == np.int16 and np.array_equal(arr, kept)  # input untouched


def test_zscore_clips_extreme_outliers_before_its_statistics():
    rng = np.random.default_rng(2)
    arr = rng.normal(100.0, 15.0, size=(20, 20, 20))
    arr[1, 2, 3], arr[4, 5, 6] = 1e30, -1e30
    # reference in float64: clip NORM_CLIP 1-99 percentile ranges beyond them, then z-score
    p1, p99 = np.percentile(arr, [1, 99])
    ref = np.clip(arr, p1 - NORM_CLIP * (p99 - p1), p99 + NORM_CLIP * (p99 - p1))
    ref = (ref - ref.mean()) / ref.std()
    kept = arr.copy()
    z = normalize(arr, "zscore")
    np.testing.assert_allclose(z, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(arr, kept)  # the float64 input is clipped in a copy
    others = np.ones(arr.shape, bool)
    others[1, 2, 3] = others[4, 5, 6] = False
    # the other voxels keep unit scale (unclipped, 1e30 made their deviation about 1e-27)
    assert 0.9 < float(z[others].std()) < 1.1
    assert 15 < z[1, 2, 3] < 25 and -25 < z[4, 5, 6] < -15  # the extremes, at the clip
    # a gold bead of -15 standard deviations lies within the clip and is scaled as before
    bead = rng.normal(100.0, 15.0, size=(20, 20, 20))
    bead[8:10, 8:10, 8:10] = 100.0 - 15 * 15
    plain = (bead - bead.mean()) / bead.std()
    np.testing.assert_allclose(normalize(bead, "zscore"), plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["percentile", "zscore", "none"])
def test_normalize_methods_reject_bad_volumes_naming_them(method):
    with pytest.raises(BadInputError, match=r"^c\.nii: constant"):
        normalize(np.full((4, 4, 4), 2.0), method, name="c.nii")
    arr = np.ones((3, 3, 3))
    arr[0, 0, 0] = np.nan
    with pytest.raises(BadInputError, match=r"^c\.nii: 1 non-finite voxel"):
        normalize(arr, method, name="c.nii")
    with pytest.raises(BadInputError, match="empty"):
        normalize(np.zeros((0, 2, 2)), method)


def test_normalize_unknown_method():
    with pytest.raises(BadInputError, match="'minmax': expected one of percentile, zscore, none"):
        normalize(np.arange(8.0).reshape(2, 2, 2), "minmax")


# --------------------------------------------------------------------------
# Patch resampling
# --------------------------------------------------------------------------


def test_patch_grid_matches_definition():
    centers = torch.tensor([[1.25, -3.0, 7.5], [0.0, 0.0, 0.0]], dtype=torch.float64)
    sides = torch.tensor([5.0, 0.7], dtype=torch.float64)
    m = 4
    pts = patch_grid(centers, sides, m)
    assert pts.shape == (2, m, m, m, 3) and pts.dtype == torch.float64
    for b in range(2):
        px, py, pz = _ref_points(centers[b].numpy(), float(sides[b]), m)
        for i in range(m):
            for j in range(m):
                for k in range(m):
                    np.testing.assert_allclose(
                        pts[b, i, j, k].numpy(), [px[i], py[j], pz[k]], atol=1e-12
                    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("five_d", [False, True])
def test_sample_patches_matches_scipy(dtype, five_d):
    rng = np.random.default_rng(1)
    vol = rng.standard_normal((13, 8, 21))  # anisotropic, so axis mix-ups show
    n, m = 40, 6
    centers = rng.uniform(-3, 1, size=(n, 3)) + rng.uniform(0, 1, size=(n, 3)) * np.array(vol.shape)
    sides = rng.uniform(0.3, 14.0, size=n)  # fractional, some patches leave the volume (clamp)
    t = torch.as_tensor(vol, dtype=dtype)
    t = t[None, None] if five_d else t
    out = sample_patches(t, torch.as_tensor(centers), torch.as_tensor(sides), m)
    assert out.shape == (n, 1, m, m, m) and out.dtype == dtype
    ref = np.stack([_ref_patch(vol, centers[b], sides[b], m) for b in range(n)])
    np.testing.assert_allclose(out[:, 0].numpy(), ref, atol=TOL[dtype] * 10, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_interpolate_matches_scipy_and_clamps(dtype):
    rng = np.random.default_rng(2)
    vol = rng.random((6, 9, 4))
    pts = rng.uniform(-3, 11, size=(5, 7, 3))
    out = interpolate(torch.as_tensor(vol, dtype=dtype), torch.as_tensor(pts))
    ref = ndimage.map_coordinates(vol, pts.reshape(-1, 3).T, order=1, mode="nearest").reshape(5, 7)
    assert out.shape == (5, 7)
    np.testing.assert_allclose(out.numpy(), ref, atol=TOL[dtype] * 10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_axis_order_with_ramps(dtype):
    shape = (23, 14, 9)
    x, y, z = np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij")
    centers = torch.tensor([[11.3, 6.6, 4.1], [8.0, 7.0, 4.0]], dtype=torch.float64)
    sides = torch.tensor([5.5, 4.0], dtype=torch.float64)  # inside the volume: the ramps are exact
    m = 5
    pts = patch_grid(centers, sides, m)
    for axis, ramp in enumerate((x, y, z)):
        out = sample_patches(torch.as_tensor(ramp, dtype=dtype), centers, sides, m)[:, 0]
        # Varies only along patch axis `axis`, and equals the sample coordinate.
        for other in {0, 1, 2} - {axis}:
            diff = out.diff(dim=1 + other).abs().max().item()
            assert diff < TOL[dtype] * 10, (axis, other, diff)
        assert out.diff(dim=1 + axis).min().item() > 0
        np.testing.assert_allclose(out.numpy(), pts[..., axis].numpy(), atol=TOL[dtype] * 20)


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_volume_gives_constant_patches(dtype):
    """Exact up to the rounding of trilinear weights (grid_sample: a few ulp, not bitwise)."""
    g = torch.Generator().manual_seed(12)
    value = 0.3712
    vol = torch.full((7, 5, 9), value, dtype=dtype)
    centers = (
        torch.rand(200, 3, generator=g, dtype=torch.float64) * 30 - 10
    )  # many leave the volume
    sides = torch.rand(200, generator=g, dtype=torch.float64) * 20 + 0.1
    out = sample_patches(vol, centers, sides, 8)
    err = (out - torch.tensor(value, dtype=dtype)).abs().max().item()
    assert err <= 4 * torch.finfo(dtype).eps * value


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [1, 3, 5])
def test_voxel_centred_patch_with_m_equal_p_reads_the_voxels(dtype, p):
    rng = np.random.default_rng(13)
    vol = rng.random((9, 12, 7))
    half = (p - 1) // 2
    voxels = [(4, 5, 3), (half, 11 - half, half), (8 - half, half, 6 - half)]
    out = sample_patches(
        torch.as_tensor(vol, dtype=dtype),
        torch.tensor(voxels, dtype=torch.float64),
        torch.full((3,), float(p), dtype=torch.float64),
        p,
    )[:, 0].numpy()
    for b, (x, y, z) in enumerate(voxels):
        block = vol[x - half : x + half + 1, y - half : y + half + 1, z - half : z + half + 1]
        np.testing.assert_allclose(out[b], block, atol=4 * torch.finfo(dtype).eps, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [3, 5])
def test_integer_aligned_patch_is_upsampling_by_hand(dtype, p):
    """Odd side p around voxel v, m = 2p: samples at u -/+ 1/4 for each covered voxel u."""
    rng = np.random.default_rng(3)
    vol = rng.random((9, 10, 11))
    half = (p - 1) // 2
    voxels = [(4, 5, 5), (0, 9, 3), (1, 2, 10)]  # interior and at the borders (clamp)
    centers = torch.tensor(voxels, dtype=torch.float64)
    sides = torch.full((len(voxels),), float(p), dtype=torch.float64)
    out = sample_patches(torch.as_tensor(vol, dtype=dtype), centers, sides, 2 * p)[:, 0].numpy()

    def up(a: np.ndarray, axis: int) -> np.ndarray:
        """Linear x2 upsampling along one axis of an edge-padded block (pad 1 each side)."""
        a = np.moveaxis(a, axis, 0)
        inner, lo, hi = a[1:-1], a[:-2], a[2:]
        res = np.empty((2 * inner.shape[0],) + inner.shape[1:])
        res[0::2] = 0.75 * inner + 0.25 * lo  # at u - 1/4
        res[1::2] = 0.75 * inner + 0.25 * hi  # at u + 1/4
        return np.moveaxis(res, 0, axis)

    padded = np.pad(vol, half + 1, mode="edge")
    for b, v in enumerate(voxels):
        sl = tuple(slice(c, c + 2 * half + 3) for c in v)  # voxel c sits at c + half + 1
        block = padded[sl]  # covered voxels plus one neighbour each side
        expect = block
        for axis in range(3):
            expect = up(expect, axis)  # uses up the neighbours along this axis
        np.testing.assert_allclose(out[b], expect, atol=TOL[dtype] * 10)


def test_size_one_axes():
    rng = np.random.default_rng(4)
    vol = rng.random((1, 6, 1))
    centers = np.array([[0.0, 2.2, 0.0], [0.7, -1.0, -0.3]])
    sides = np.array([3.0, 4.5])
    out = sample_patches(torch.as_tensor(vol), torch.as_tensor(centers), torch.as_tensor(sides), 4)
    assert torch.isfinite(out).all()
    ref = np.stack([_ref_patch(vol, centers[b], sides[b], 4) for b in range(2)])
    np.testing.assert_allclose(out[:, 0].numpy(), ref, atol=1e-12)


def test_sample_patches_shape_errors():
    vol = torch.zeros(5, 5, 5)
    with pytest.raises(ValueError, match=r"expected \(B, 3\)"):
        sample_patches(vol, torch.zeros(3, 2), torch.ones(3), 4)
    with pytest.raises(ValueError, match="one side per patch"):
        sample_patches(vol, torch.zeros(3, 3), torch.ones(3, 3), 4)
    with pytest.raises(ValueError, match="volume of shape"):
        sample_patches(torch.zeros(2, 5, 5, 5), torch.zeros(3, 3), torch.ones(3), 4)


# --------------------------------------------------------------------------
# Box sampler helper
# --------------------------------------------------------------------------


def test_sample_outside_is_uniform_on_box_minus_box():
    n = 60_000
    g = torch.Generator().manual_seed(5)
    low = torch.zeros(n, 3, dtype=torch.float64)
    high = torch.full((n, 3), 10.0, dtype=torch.float64)
    f_lo = torch.tensor([2.0, 3.0, -1.0], dtype=torch.float64).expand(n, 3)
    f_hi = torch.tensor([8.0, 9.0, 7.0], dtype=torch.float64).expand(n, 3)
    x = _sample_outside(low, high, f_lo, f_hi, g).numpy()
    assert ((x >= 0) & (x <= 10)).all()
    inside = np.all((x > f_lo.numpy()) & (x < f_hi.numpy()), axis=1)
    assert not inside.any()
    allowed = 1000 - 6 * 6 * 7
    checks = {  # region -> its volume inside the allowed set
        "x<2": (x[:, 0] < 2, 200),
        "y>9": (x[:, 1] > 9, 100),
        "mid-x, mid-y, z>7": (
            (x[:, 0] > 2) & (x[:, 0] < 8) & (x[:, 1] > 3) & (x[:, 1] < 9) & (x[:, 2] > 7),
            108,
        ),
    }
    for name, (mask, vol) in checks.items():
        p = vol / allowed
        sigma = np.sqrt(p * (1 - p) / n)
        assert abs(mask.mean() - p) < 5 * sigma, name


def test_sample_outside_degenerate_face():
    """Allowed set of zero volume (a box that fits exactly): points on its faces."""
    g = torch.Generator().manual_seed(6)
    n = 200
    low = torch.zeros(n, 3, dtype=torch.float64)
    high = torch.full((n, 3), 4.0, dtype=torch.float64)
    x = _sample_outside(low, high, low.clone(), high.clone(), g)
    on_face = ((x == 0) | (x == 4)).any(dim=1)
    assert on_face.all()


# --------------------------------------------------------------------------
# TripletSampler
# --------------------------------------------------------------------------


def _check_geometry(t: Triplets, shapes, cfg: SamplingConfig, tol: float = GEOM_TOL) -> None:
    size = torch.tensor(shapes, dtype=torch.float64)[t.volume_index]
    r, rc = t.anchor_side, t.pos_side
    assert torch.equal(t.pos_side, t.neg_side)
    a_lo, a_hi = t.anchor_center - r[:, None] / 2, t.anchor_center + r[:, None] / 2
    p_lo, p_hi = t.pos_center - rc[:, None] / 2, t.pos_center + rc[:, None] / 2
    n_lo, n_hi = t.neg_center - rc[:, None] / 2, t.neg_center + rc[:, None] / 2
    # Sizes.
    r_hi = torch.clamp(torch.minimum(size.amin(1), size.amax(1) - cfg.l_min), max=cfg.r_max)
    assert (r >= cfg.r_min - tol).all() and (r <= r_hi + tol).all()
    assert (rc >= cfg.l_min - tol).all()
    assert (rc <= torch.clamp(r - cfg.r_gap, max=cfg.child_max) + tol).all()
    # Anchor and negative inside the volume extent [-0.5, S - 0.5].
    for lo, hi in ((a_lo, a_hi), (n_lo, n_hi), (p_lo, p_hi)):
        assert (lo >= -0.5 - tol).all() and (hi <= size - 0.5 + tol).all()
    # Positive inside the anchor.
    assert (p_lo >= a_lo - tol).all() and (p_hi <= a_hi + tol).all()
    # Negative disjoint from the anchor along at least one axis.
    separated = (n_hi <= a_lo + tol) | (n_lo >= a_hi - tol)
    assert separated.any(dim=1).all()


@pytest.mark.parametrize("scale", ["uniform", "log"])
def test_triplet_constraints_mixed_volumes(scale):
    shapes = [(50, 50, 50), (12, 40, 9), (30, 6, 25), (8, 5, 5)]
    cfg = SamplingConfig(r_min=5, r_max=34, scale_sampling=scale, l_min=3, r_gap=2, child_max=14)
    vols = [torch.rand(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    sampler = TripletSampler(vols, cfg, 6, generator=torch.Generator().manual_seed(7))
    for _ in range(3):
        t = sampler.sample(300)
        _check_geometry(t, shapes, cfg)
    assert set(t.volume_index.tolist()) == {0, 1, 2, 3}
    assert (t.volume_index.diff() >= 0).all()  # grouped by volume
    for img in (t.anchor, t.positive, t.negative):
        assert img.shape == (300, 1, 6, 6, 6) and img.is_contiguous()
    # The patches are those of the boxes.
    for v in range(len(shapes)):
        rows = t.volume_index == v
        for img, c, s in (
            (t.anchor, t.anchor_center, t.anchor_side),
            (t.positive, t.pos_center, t.pos_side),
            (t.negative, t.neg_center, t.neg_side),
        ):
            torch.testing.assert_close(img[rows], sample_patches(vols[v], c[rows], s[rows], 6))


@pytest.mark.parametrize("gap", [0.0, 2.5])
def test_negative_gap_keeps_negatives_beside_the_anchor(gap):
    shapes = [(50, 50, 50), (12, 40, 9), (30, 6, 25)]
    cfg = SamplingConfig(negative_gap=gap)
    vols = [torch.rand(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    sampler = TripletSampler(vols, cfg, 6, generator=torch.Generator().manual_seed(3))
    t = sampler.sample(2000)
    _check_geometry(t, shapes, cfg)  # inside the volume, disjoint from the anchor, ...
    r, rc = t.anchor_side[:, None], t.neg_side[:, None]
    a_lo, n_lo = t.anchor_center - r / 2, t.neg_center - rc / 2
    # ... and within `gap` voxels of the anchor's box on every axis
    outside = torch.maximum(a_lo - (n_lo + rc), n_lo - (a_lo + r)).clamp_min(0)
    assert (outside <= gap + 1e-9).all()
    if gap > 0:  # the gap is used, not just its border
        assert float(outside.amax(dim=1).mean()) > gap / 4
    # without a gap, negatives lie far away on average
    far = TripletSampler(vols, SamplingConfig(), 6, generator=torch.Generator().manual_seed(3))
    t = far.sample(2000)
    a_lo = t.anchor_center - t.anchor_side[:, None] / 2
    n_lo = t.neg_center - t.neg_side[:, None] / 2
    away = torch.maximum(
        a_lo - (n_lo + t.neg_side[:, None]), n_lo - (a_lo + t.anchor_side[:, None])
    )
    assert float(away.amax(dim=1).mean()) > 3.0


def test_triplet_tight_volume_exact_fit():
    """r_min == r_max and a volume that fits anchor + negative exactly along one axis."""
    cfg = SamplingConfig(r_min=5, r_max=5, l_min=3, r_gap=2, child_max=3)
    shapes = [(5, 8, 5)]
    sampler = TripletSampler(
        [np.zeros(shapes[0], np.float32)], cfg, 4, generator=torch.Generator().manual_seed(0)
    )
    t = sampler.sample(300)
    _check_geometry(t, shapes, cfg)
    assert torch.allclose(t.anchor_side, torch.tensor(5.0, dtype=torch.float64))
    lo_y = t.anchor_center[:, 1] - 2.5
    assert set(np.round(lo_y.numpy(), 9).tolist()) <= {-0.5, 2.5}


def test_sizes_uniform_and_log_uniform_distribution():
    shapes = [(50, 50, 50)] * 3
    vols = [torch.zeros(s) for s in shapes]
    for scale, cdf in (
        ("uniform", lambda r: (r - 5) / 29),
        ("log", lambda r: np.log(r / 5) / np.log(34 / 5)),
    ):
        cfg = SamplingConfig(scale_sampling=scale)
        sampler = TripletSampler(vols, cfg, 4, generator=torch.Generator().manual_seed(8))
        r = sampler.sample_boxes(4000)["anchor_side"].numpy()
        assert r.min() >= 5 and r.max() <= 34
        assert stats.kstest(r, cdf).pvalue > 1e-3, scale


def test_r_gap_and_child_max_respected():
    cfg = SamplingConfig(r_min=8, r_max=30, l_min=2, r_gap=6, child_max=100)
    sampler = TripletSampler(
        [torch.zeros(40, 40, 40)], cfg, 4, generator=torch.Generator().manual_seed(9)
    )
    b = sampler.sample_boxes(3000)
    assert (b["pos_side"] <= b["anchor_side"] - 6 + GEOM_TOL).all()
    assert (b["pos_side"] >= 2).all()
    # child sides fill their range: some come close to r - r_gap
    assert ((b["anchor_side"] - 6 - b["pos_side"]) < 0.5).any()


def test_anchor_position_uniform_when_room_everywhere():
    """Big volume: the negative constraint never binds, anchor corners are uniform."""
    cfg = SamplingConfig(r_min=5, r_max=10, l_min=3, r_gap=2, child_max=4)
    shape = (80, 60, 100)
    sampler = TripletSampler(
        [torch.zeros(shape)], cfg, 4, generator=torch.Generator().manual_seed(10)
    )
    b = sampler.sample_boxes(4000)
    r = b["anchor_side"][:, None]
    u = ((b["anchor_center"] - r / 2 + 0.5) / (torch.tensor(shape) - r)).numpy()
    for axis in range(3):
        assert stats.kstest(u[:, axis], "uniform").pvalue > 1e-3


def test_seeded_generators_reproduce():
    vols = [torch.rand(20, 18, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    cfg = SamplingConfig(r_max=15)
    a = TripletSampler(vols, cfg, 5, generator=torch.Generator().manual_seed(11)).sample(64)
    b = TripletSampler(vols, cfg, 5, generator=torch.Generator().manual_seed(11)).sample(64)
    c = TripletSampler(vols, cfg, 5, generator=torch.Generator().manual_seed(12)).sample(64)
    for name in Triplets.__dataclass_fields__:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.anchor_center, c.anchor_center)


def test_fresh_triplets_every_call_and_global_rng_untouched():
    sampler = TripletSampler(
        [torch.zeros(30, 30, 30)],
        SamplingConfig(r_max=20),
        4,
        generator=torch.Generator().manual_seed(0),
    )
    state = torch.random.get_rng_state()
    a, b = sampler.sample(16), sampler.sample(16)
    assert torch.equal(state, torch.random.get_rng_state())
    assert not torch.equal(a.anchor_center, b.anchor_center)


def test_sampler_dtype_and_inputs():
    g = torch.Generator().manual_seed(0)
    cfg = SamplingConfig(r_max=12)
    numpy64 = np.random.default_rng(0).random((20, 20, 20))
    t = TripletSampler([numpy64], cfg, 4, generator=g).sample(3)
    assert t.anchor.dtype == torch.float32 and len(t) == 3  # numpy input: float32 by default
    t = TripletSampler([torch.as_tensor(numpy64)], cfg, 4, generator=g).sample(3)
    assert t.anchor.dtype == torch.float64  # a floating tensor keeps its dtype
    t = TripletSampler([numpy64], cfg, 4, generator=g, dtype=torch.float64).sample(3)
    assert t.anchor.dtype == torch.float64 and t.anchor_center.dtype == torch.float64
    five_d = TripletSampler([torch.zeros(1, 1, 20, 20, 20)], cfg, 4, generator=g)
    assert five_d.sample(2).negative.shape == (2, 1, 4, 4, 4)
    read_only = np.zeros((20, 20, 20), np.float32)
    read_only.flags.writeable = False
    flipped = np.zeros((20, 20, 20), np.float32)[::-1]
    TripletSampler([read_only, flipped], cfg, 4, generator=g).sample(2)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((4, 50, 50), r"volume 1 of shape \(4, 50, 50\) is too small.*>= 5 \(the smallest anchor"),
        ((7, 7, 7), r"volume 1 of shape \(7, 7, 7\) is too small.*longest >= 8 \(room for"),
        ((10, 10), r"volume 1 has shape \(10, 10\), expected 3 axes"),
    ],
)
def test_sampler_rejects_small_or_flat_volumes(shape, message):
    with pytest.raises(BadInputError, match=message):
        TripletSampler(
            [torch.zeros(20, 20, 20), torch.zeros(shape)],
            SamplingConfig(),
            4,
            generator=torch.Generator(),
        )


def test_sampler_rejects_bad_inputs():
    g = torch.Generator()
    bad = torch.zeros(10, 10, 10)
    bad[2, 2, 2] = float("nan")
    with pytest.raises(BadInputError, match="volume 0 of shape .* non-finite"):
        TripletSampler([bad], SamplingConfig(), 4, generator=g)
    with pytest.raises(BadInputError, match="no training volumes"):
        TripletSampler([], SamplingConfig(), 4, generator=g)
    with pytest.raises(BadInputError, match="r_gap=-1"):
        TripletSampler([torch.zeros(10, 10, 10)], SamplingConfig(r_gap=-1, l_min=3), 4, generator=g)
    sampler = TripletSampler([torch.zeros(10, 10, 10)], SamplingConfig(r_max=8), 4, generator=g)
    with pytest.raises(BadInputError, match="batch_size=0"):
        sampler.sample(0)


def test_triplet_batch_timing_report(capsys):
    """128 triplets, m = 10, 20 volumes of 50^3: measured and printed, not asserted."""
    vols = [torch.rand(50, 50, 50, generator=torch.Generator().manual_seed(i)) for i in range(20)]
    sampler = TripletSampler(vols, SamplingConfig(), 10, generator=torch.Generator().manual_seed(0))
    sampler.sample(128)
    wall, cpu = [], []
    for _ in range(5):
        t0, c0 = time.perf_counter(), time.process_time()
        sampler.sample(128)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    with capsys.disabled():
        print(
            f"\n[sampling] 128 triplets m=10 from 20 volumes of 50^3: wall median "
            f"{1e3 * np.median(wall):.1f} ms (min {1e3 * min(wall):.1f}), CPU median "
            f"{1e3 * np.median(cpu):.1f} ms, {torch.get_num_threads()} threads"
        )
