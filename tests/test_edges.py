"""Edge snapping of label boundaries (``cluster --snap``): against voxel loops, and the CLI."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from clitools import run
from scipy import ndimage as ndi

from hypsegcli import edges


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int64, np.float32])
def test_box_max_is_scipys_maximum_and_minimum_filter(dtype):
    """On random arrays of 1 to 3 axes, sides down to 1 and sizes beyond them, the shifted
    slices give scipy's filters exactly (mode 'nearest'; and 'constant' for the maximum of
    bool and unsigned arrays), in the input's dtype, and leave the input as it was."""
    rng = np.random.default_rng(np.dtype(dtype).itemsize)
    for shape in [(1, 1, 1), (2, 3, 1), (5, 1, 7), (9, 8, 7), (3, 20, 2), (13,), (4, 6)]:
        if dtype is bool:
            a = rng.random(shape) > 0.7
        else:
            a = rng.integers(-4 if dtype is np.int64 else 0, 9, shape).astype(dtype)
        before = a.copy()
        for size in (1, 3, 5, 7, 9):
            for smallest, scipy_filter in ((False, ndi.maximum_filter), (True, ndi.minimum_filter)):
                got = edges.box_max(a, size, smallest=smallest)
                assert got.dtype == a.dtype
                np.testing.assert_array_equal(got, scipy_filter(a, size=size, mode="nearest"))
            if dtype in (bool, np.uint8):
                np.testing.assert_array_equal(
                    edges.box_max(a, size), ndi.maximum_filter(a, size=size, mode="constant")
                )
        np.testing.assert_array_equal(a, before)
    for size in (0, 2, -1):
        with pytest.raises(ValueError, match="odd"):
            edges.box_max(np.zeros((3, 3)), size)


def _ball_footprint(radius: float) -> np.ndarray:
    """Offsets within ``radius`` (math.sqrt of the squared length, as the module tests them)."""
    r = int(math.floor(radius))
    d = np.arange(-r, r + 1)
    d2 = d[:, None, None] ** 2 + d[None, :, None] ** 2 + d[None, None, :] ** 2
    return np.vectorize(lambda v: math.sqrt(v) <= radius)(d2)


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int16, np.float32])
def test_ball_max_is_scipys_filter_with_a_ball_footprint(dtype):
    """On random arrays with sides down to 1 and radii beyond them, the shifted runs give
    scipy's maximum and minimum filters over a ball footprint, with nothing beyond the border
    (the dtype's least value for the maximum, its largest for the minimum), in the input's
    dtype, and leave the input as it was."""
    rng = np.random.default_rng(np.dtype(dtype).itemsize)
    if dtype is bool:
        low, high = False, True
    elif dtype is np.float32:
        low, high = -np.inf, np.inf
    else:
        low, high = np.iinfo(dtype).min, np.iinfo(dtype).max
    for shape in [(1, 1, 1), (2, 3, 1), (5, 1, 7), (9, 8, 7), (3, 12, 2), (6, 6, 6)]:
        if dtype is bool:
            a = rng.random(shape) > 0.8
        elif dtype is np.float32:
            a = rng.normal(size=shape).astype(dtype)
        else:
            a = rng.integers(-4 if dtype is np.int16 else 0, 9, shape).astype(dtype)
        before = a.copy()
        for radius in (0.0, 0.5, 1.0, 1.5, math.sqrt(2), math.sqrt(3), 2.0, 2.9, 4.0, 5.5):
            foot = _ball_footprint(radius)
            for smallest, scipy_filter, cval in (
                (False, ndi.maximum_filter, low),
                (True, ndi.minimum_filter, high),
            ):
                got = edges.ball_max(a, radius, smallest=smallest)
                assert got.dtype == a.dtype and got is not a
                want = scipy_filter(a, footprint=foot, mode="constant", cval=cval)
                np.testing.assert_array_equal(got, want, err_msg=f"{shape} r={radius}")
        np.testing.assert_array_equal(a, before)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="radius"):
            edges.ball_max(np.zeros((3, 3, 3)), bad)
    with pytest.raises(ValueError, match="3-D"):
        edges.ball_max(np.zeros((3, 3)), 1.0)


def _snap_loops(labels: np.ndarray, image: np.ndarray, sigma: float, band: int, z: float):
    """The rule of hypsegcli.edges written voxel by voxel over explicit windows, float64."""
    x = image.astype(np.float64)
    g = ndi.gaussian_filter(x, sigma, mode="nearest")
    X, Y, Z = labels.shape

    def window(v, h):
        return tuple(slice(max(0, c - h), c + h + 1) for c in v)

    in_band = np.zeros(labels.shape, dtype=bool)
    for v in itertools.product(range(X), range(Y), range(Z)):
        in_band[v] = len(np.unique(labels[window(v, band)])) > 1
    # noise: box mean with 'nearest' borders, as in the module
    padded = np.pad(x, 1, mode="edge")
    box = np.zeros_like(x)
    for v in itertools.product(range(X), range(Y), range(Z)):
        box[v] = padded[v[0] : v[0] + 3, v[1] : v[1] + 3, v[2] : v[2] + 3].mean()
    resid = (x - box).ravel()
    step = max(1, resid.size // edges.NOISE_SAMPLES)
    noise = 1.4826 * np.median(np.abs(resid[::step]))
    overall = {int(v): x[labels == v].mean() for v in np.unique(labels)}
    r = math.ceil(2 * sigma) + band
    out = labels.copy()
    for v in zip(*np.nonzero(in_band), strict=True):
        w = window(v, r)
        lab_w, g_w, core_w = labels[w], g[w], ~in_band[w]
        near = {int(val) for val in np.unique(labels[window(v, band)])}  # v's boundary's labels
        local = {}
        for value in overall:
            if value not in near:
                continue
            sel = (lab_w == value) & core_w
            if sel.any():
                local[value] = g_w[sel].mean()
        a = int(labels[v])
        if a not in local:
            continue
        b = min(sorted(local), key=lambda val: abs(local[val] - g[v]))
        if b != a and abs(overall[a] - overall[b]) > z * noise:
            out[v] = b
    return out


@pytest.mark.parametrize("sigma,band,z", [(1.0, 1, 1.0), (1.5, 2, 0.5), (0.7, 1, 0.0)])
def test_snap_matches_voxel_loops(sigma, band, z):
    rng = np.random.default_rng(int(10 * sigma) + band)
    shape = (18, 16, 15)
    # a bright block and a dim one on a dark background, labels off by a voxel or so
    truth = np.zeros(shape, dtype=np.uint8)
    truth[2:12, 1:12, 2:13] = 1
    truth[10:17, 5:15, 1:8] = 2
    image = (np.array([0.0, 1.0, 0.5])[truth] + rng.normal(0, 0.2, shape)).astype(np.float32)
    labels = ndi.grey_dilation(truth, size=(2, 1, 2)) if band == 1 else truth.copy()
    labels[rng.random(shape) < 0.01] = 0
    fast = edges.snap_labels(labels, image, sigma=sigma, band=band, min_contrast=z)
    slow = _snap_loops(labels, image, sigma, band, z)
    assert fast.dtype == labels.dtype
    # the slow path ties on the smallest label in sorted order, as argmin does
    assert np.array_equal(fast, slow)
    assert (fast != labels).any()
    # the noise of the image, computed once by cluster for every k, is the one it computes
    noise = edges.noise_std(image)
    given = edges.snap_labels(labels, image, sigma=sigma, band=band, min_contrast=z, noise=noise)
    assert np.array_equal(given, fast)
    if z > 0:  # and is the noise it uses: a far larger one stops every move
        huge = edges.snap_labels(labels, image, sigma=sigma, band=band, min_contrast=z, noise=1e9)
        assert np.array_equal(huge, labels)


def _blurred_ball(shift: int, side: int = 40, radius: float = 11.0):
    grid = np.indices((side,) * 3).astype(np.float64) - (side - 1) / 2
    dist = np.sqrt((grid**2).sum(0))
    truth = (dist <= radius).astype(np.uint8)
    rng = np.random.default_rng(3)
    image = ndi.gaussian_filter(truth * 0.4, 0.8) + rng.normal(0, 0.1, truth.shape)
    labels = (dist <= radius + shift).astype(np.uint8)
    return truth, image.astype(np.float32), labels


@pytest.mark.parametrize("sigma", [1.0, 2.0])
@pytest.mark.parametrize("shift", [2, 1, -1, -2])
def test_snap_moves_a_displaced_boundary_onto_the_edge(shift, sigma):
    # a ball (radius 11, PSF 0.8, noise 0.1) labelled one or two voxels too wide or narrow;
    # a wide Gaussian erodes convex shapes a little, hence the looser bound at sigma 2
    truth, image, labels = _blurred_ball(shift)
    before_image, before_labels = image.copy(), labels.copy()
    snapped = edges.snap_labels(labels, image, sigma=sigma)
    errors_before = int((labels != truth).sum())
    errors_after = int((snapped != truth).sum())
    assert errors_after < (0.2 if sigma == 1.0 else 0.6) * errors_before
    # inputs untouched
    assert np.array_equal(image, before_image) and np.array_equal(labels, before_labels)


def test_snap_leaves_thin_and_texture_only_structures_alone():
    rng = np.random.default_rng(0)
    # a one-voxel bright sheet: no core of its own, so it is not dissolved
    truth = np.zeros((30, 30, 30), dtype=np.uint8)
    truth[14] = 1
    image = (truth * 1.0 + rng.normal(0, 0.2, truth.shape)).astype(np.float32)
    assert np.array_equal(edges.snap_labels(truth, image, sigma=2.0), truth)
    # two halves of equal mean intensity (texture only): the boundary stays
    halves = np.zeros((30, 30, 30), dtype=np.uint8)
    halves[:, :, 13:] = 1
    flat = rng.normal(0, 0.2, halves.shape).astype(np.float32)
    shifted = np.zeros_like(halves)
    shifted[:, :, 15:] = 1
    assert np.array_equal(edges.snap_labels(shifted, flat, sigma=2.0), shifted)


def test_snap_single_label_and_bad_arguments():
    labels = np.zeros((6, 6, 6), dtype=np.uint8)
    image = np.random.default_rng(0).random((6, 6, 6)).astype(np.float32)
    assert np.array_equal(edges.snap_labels(labels, image, sigma=1.0), labels)
    with pytest.raises(Exception, match="same shape"):
        edges.snap_labels(labels, image[:5], sigma=1.0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(Exception, match="sigma"):
            edges.snap_labels(labels, image, sigma=bad)


def test_cli_snap_is_recorded_and_redone_when_changed(tiny_trained, tmp_path, capsys):
    images = tiny_trained / "data" / "images"
    base = ["--quiet", "cluster", images, "-m", tiny_trained / "model.pt", "--k", "3", "--json"]
    seg = tmp_path / "seg"
    code, _, err = run([*base, "-o", seg, "--snap", "0"], capsys)
    assert code == 0, err
    assert json.loads((seg / "centroids.json").read_text())["snap"] == 0.0
    code, out, err = run([*base, "-o", seg], capsys)  # the default snaps
    assert code == 0, err
    assert all(r["status"] == "done" for r in json.loads(out)["volumes"])
    assert json.loads((seg / "centroids.json").read_text())["snap"] == 2.0
    code, out, err = run([*base, "-o", seg], capsys)  # same options: skipped
    assert code == 0, err
    assert all(r["status"] == "skipped" for r in json.loads(out)["volumes"])
    code, _, err = run([*base, "-o", tmp_path / "bad", "--snap", "-1"], capsys)
    assert code == 2 and "--snap" in err and "Traceback" not in err


def test_plan_counts_the_snap(tiny_trained, tmp_path, capsys, monkeypatch):
    from hypsegcli import batch
    from hypsegcli.batch import SNAP_BYTES, SNAP_BYTES_PER_LABEL, estimate_snap

    monkeypatch.setattr(batch, "measure_flop_rate", lambda *a, **k: batch.REFERENCE_RATE)
    seconds, peak = estimate_snap((50, 50, 50), [2, 4, 8])
    big_s, big_peak = estimate_snap((100, 50, 50), [2, 4, 8])
    assert seconds > 0 and big_s == pytest.approx(2 * seconds)
    assert peak == pytest.approx((SNAP_BYTES + 8 * SNAP_BYTES_PER_LABEL) * 50**3)
    argv = ["--quiet", "cluster", tiny_trained / "data" / "images", "-m", tiny_trained / "model.pt"]
    argv += ["--k", "3", "-o", tmp_path / "seg", "--dry-run", "--json"]
    plans = {}
    for snap in ("0", "2"):
        code, out, err = run([*argv, "--snap", snap], capsys)
        assert code == 0, err
        plans[snap] = json.loads(out)["volumes"][0]
    snap_s, _ = estimate_snap(plans["0"]["shape"], [3])
    assert plans["2"]["seconds"] - plans["0"]["seconds"] == pytest.approx(snap_s, abs=2e-3)


def test_snap_gives_no_voxel_a_label_its_boundary_does_not_touch():
    """Review: a dark region A, a bright one B and a mid-grey slab C four voxels from the
    A|B edge: the voxels along that edge were given C (C's core lay in the window, and the
    smoothed image there was C's grey), a false sheet the MRF could not undo (596 voxels,
    0 of them touching C)."""
    rng = np.random.default_rng(0)
    truth = np.zeros((30, 30, 30), np.uint8)
    truth[15:] = 1
    truth[4:10] = 2
    image = np.array([0.0, 1.0, 0.5], np.float32)[truth]
    image = ndi.gaussian_filter(image, 0.7) + rng.normal(0, 0.05, truth.shape).astype(np.float32)
    snapped = edges.snap_labels(truth, image, sigma=2.0)
    far = ndi.distance_transform_edt(truth != 2) > edges.SNAP_BAND  # out of C's band
    assert not (far & (snapped == 2)).any()
    assert (snapped != truth).sum() < 200  # (the old rule: ~690, the sheet among them)
