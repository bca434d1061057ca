"""The intensity MRF at label boundaries (``cluster --mrf``): against voxel loops, and the CLI."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from clitools import run
from scipy import ndimage as ndi

from hypsegcli import edges


def _noise_loops(x: np.ndarray) -> float:
    """1.4826 x median |x - its 3^3 box mean ('nearest' borders)|, voxel by voxel."""
    padded = np.pad(x, 1, mode="edge")
    box = np.zeros_like(x)
    for v in itertools.product(*(range(n) for n in x.shape)):
        box[v] = padded[v[0] : v[0] + 3, v[1] : v[1] + 3, v[2] : v[2] + 3].mean()
    resid = (x - box).ravel()
    step = max(1, resid.size // edges.NOISE_SAMPLES)
    return float(1.4826 * np.median(np.abs(resid[::step])))


def _mrf_loops(labels, image, *, beta, iters, band, min_contrast, separation, support):
    """The rule of hypsegcli.edges.refine_labels written voxel by voxel, float64."""
    x = image.astype(np.float64)
    shape = labels.shape
    voxels = list(itertools.product(*(range(n) for n in shape)))

    def window(v, h):
        return tuple(slice(max(0, c - h), c + h + 1) for c in v)

    in_band = np.zeros(shape, dtype=bool)
    core = np.zeros(shape, dtype=bool)
    for v in voxels:
        in_band[v] = len(np.unique(labels[window(v, band)])) > 1
        core[v] = len(np.unique(labels[window(v, 1)])) == 1
    noise = _noise_loops(x)
    values = [int(val) for val in np.unique(labels)]
    mu, var = {}, {}
    for val in values:
        inner = (labels == val) & ~in_band
        pick = x[inner] if inner.sum() > edges.MRF_MIN_CORE else x[labels == val]
        mu[val] = pick.mean()
        var[val] = max(pick.var(), (noise / 10) ** 2, 1e-4 * x.var(), 1e-12)

    def separated(a, b):
        gap = abs(mu[a] - mu[b])
        return gap > min_contrast * noise and gap > separation * math.sqrt((var[a] + var[b]) / 2)

    def supported(val, v):
        w = window(v, 1 + support)
        return bool((core[w] & (labels[w] == val)).any())

    cands, nll = {}, {}
    for v in voxels:
        own = int(labels[v])
        nll[v] = {
            val: (x[v] - mu[val]) ** 2 / (2 * var[val]) + math.log(var[val]) / 2 for val in values
        }
        if in_band[v] and supported(own, v):
            near = {int(val) for val in np.unique(labels[window(v, 1)])}
            cands[v] = {own} | {
                b for b in near if b != own and supported(b, v) and separated(own, b)
            }
        else:
            cands[v] = None  # frozen: its own label, with certainty

    def softmax(v, field):
        if cands[v] is None:
            return {val: float(val == labels[v]) for val in values}
        e = {val: -nll[v][val] + beta * field.get(val, 0.0) for val in cands[v]}
        top = max(e.values())
        z = sum(math.exp(t - top) for t in e.values())
        return {val: (math.exp(e[val] - top) / z if val in e else 0.0) for val in values}

    q = {v: softmax(v, {}) for v in voxels}
    for _ in range(iters):
        new = {}
        for v in voxels:
            field: dict[int, float] = {}
            for d in itertools.product((-1, 0, 1), repeat=3):
                n = tuple(c + o for c, o in zip(v, d, strict=True))
                if d == (0, 0, 0) or any(c < 0 or c >= s for c, s in zip(n, shape, strict=True)):
                    continue
                for val, p in q[n].items():
                    field[val] = field.get(val, 0.0) + p
            new[v] = softmax(v, field)
        q = new
    out = labels.copy()
    for v in voxels:
        out[v] = max(values, key=lambda val: (q[v][val], -val))
    return out


def _two_blocks(seed: int, shape=(11, 10, 9)):
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, dtype=np.uint8)
    truth[1:8, 2:9, 1:7] = 1
    truth[6:11, 0:5, 4:9] = 2
    image = (np.array([0.0, 1.0, 0.5])[truth] + rng.normal(0, 0.25, shape)).astype(np.float32)
    labels = truth.copy()
    labels[ndi.binary_dilation(truth == 1) & (rng.random(shape) < 0.4)] = 1
    labels[rng.random(shape) < 0.03] = 2
    return truth, image, labels


@pytest.mark.parametrize(
    "seed,beta,iters,band,separation,support",
    [
        (7, 0.5, 10, 2, 1.0, 2),
        (11, 1.0, 3, 1, 1.0, 1),
        (5, 0.3, 5, 2, 0.0, 1),
        # only labels 0 and 2 are 2 pooled stds apart here (0-1: 1.95, 1-2: 0.66)
        (8, 0.5, 4, 2, 2.0, 2),
    ],
)
def test_mrf_matches_voxel_loops(seed, beta, iters, band, separation, support, monkeypatch):
    truth, image, labels = _two_blocks(seed)
    kw = dict(iters=iters, band=band, min_contrast=1.0, separation=separation, support=support)
    fast = edges.refine_labels(labels, image, beta=beta, **kw)
    slow = _mrf_loops(labels, image, beta=beta, **kw)
    assert fast.dtype == labels.dtype
    assert np.array_equal(fast, slow)
    assert (fast != labels).any()
    # the noise of the image, computed once by cluster for every k, is the one it computes
    noise = edges.noise_std(image)
    assert np.array_equal(edges.refine_labels(labels, image, beta=beta, noise=noise, **kw), fast)
    huge = edges.refine_labels(labels, image, beta=beta, noise=1e9, **kw)
    assert np.array_equal(huge, labels)  # and is the one it uses: no pair separated by 1e9
    # label values that are not 0..k-1, signed
    odd = labels.astype(np.int16) * 3 - 5
    assert np.array_equal(
        edges.refine_labels(odd, image, beta=beta, **kw), fast.astype(np.int16) * 3 - 5
    )
    # in slabs of 2 planes with halos of iters planes: the same labels
    from hypsegcli import smoothing

    monkeypatch.setattr(smoothing, "slab_planes", lambda *args, **kwargs: 2)
    assert np.array_equal(edges.refine_labels(labels, image, beta=beta, **kw), fast)


def _blurred_ball(shift: int, side: int = 40, radius: float = 11.0):
    grid = np.indices((side,) * 3).astype(np.float64) - (side - 1) / 2
    dist = np.sqrt((grid**2).sum(0))
    truth = (dist <= radius).astype(np.uint8)
    rng = np.random.default_rng(3)
    image = ndi.gaussian_filter(truth * 0.4, 0.8) + rng.normal(0, 0.1, truth.shape)
    labels = (dist <= radius + shift).astype(np.uint8)
    return truth, image.astype(np.float32), labels


@pytest.mark.parametrize("shift", [2, 1, -1, -2])
def test_mrf_settles_a_displaced_boundary(shift):
    # a ball (radius 11, PSF 0.8, noise 0.1) labelled one or two voxels too wide or narrow;
    # alone, or after the snap as in `cluster`. The Potts prior erodes a convex shape a
    # little (about 300 voxels of this ball's 1 500-voxel first inner shell), so after the
    # snap, which leaves 81 errors from a shift of 2, it is not better everywhere.
    truth, image, labels = _blurred_ball(shift)
    before_image, before_labels = image.copy(), labels.copy()
    errors_before = int((labels != truth).sum())
    alone = edges.refine_labels(labels, image, beta=0.5)
    assert int((alone != truth).sum()) < 0.35 * errors_before
    after_snap = edges.refine_labels(edges.snap_labels(labels, image, sigma=2.0), image, beta=0.5)
    assert int((after_snap != truth).sum()) < 0.25 * errors_before
    assert np.array_equal(image, before_image) and np.array_equal(labels, before_labels)


def test_mrf_leaves_thin_and_texture_only_structures_alone():
    rng = np.random.default_rng(0)
    # one- and two-voxel bright sheets have no core of their own: never dissolved
    for thick in (1, 2):
        truth = np.zeros((30, 30, 30), dtype=np.uint8)
        truth[14 : 14 + thick] = 1
        image = (truth * 1.0 + rng.normal(0, 0.5, truth.shape)).astype(np.float32)
        out = edges.refine_labels(truth, image, beta=2.0)
        assert np.array_equal(out[truth == 1], truth[truth == 1])
    # two halves of equal mean intensity (texture only): the boundary stays
    flat = rng.normal(0, 0.2, (30, 30, 30)).astype(np.float32)
    shifted = np.zeros((30, 30, 30), dtype=np.uint8)
    shifted[:, :, 15:] = 1
    assert np.array_equal(edges.refine_labels(shifted, flat, beta=1.0), shifted)


def test_mrf_trivial_cases_and_bad_arguments():
    truth, image, labels = _two_blocks(0)
    assert np.array_equal(edges.refine_labels(labels, image, beta=0.0), labels)
    single = np.zeros_like(labels)
    assert np.array_equal(edges.refine_labels(single, image, beta=1.0), single)
    with pytest.raises(Exception, match="same 3-D shape"):
        edges.refine_labels(labels, image[:5], beta=1.0)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(Exception, match="beta"):
            edges.refine_labels(labels, image, beta=bad)


def test_cli_mrf_is_recorded_and_redone_when_changed(tiny_trained, tmp_path, capsys):
    images = tiny_trained / "data" / "images"
    base = ["--quiet", "cluster", images, "-m", tiny_trained / "model.pt", "--k", "3", "--json"]
    seg = tmp_path / "seg"
    code, _, err = run([*base, "-o", seg, "--mrf", "0"], capsys)
    assert code == 0, err
    assert json.loads((seg / "centroids.json").read_text())["mrf"] == 0.0
    code, out, err = run([*base, "-o", seg], capsys)  # the default refines
    assert code == 0, err
    assert all(r["status"] == "done" for r in json.loads(out)["volumes"])
    assert json.loads((seg / "centroids.json").read_text())["mrf"] == 0.5
    code, out, err = run([*base, "-o", seg], capsys)  # same options: skipped
    assert code == 0, err
    assert all(r["status"] == "skipped" for r in json.loads(out)["volumes"])
    code, _, err = run([*base, "-o", tmp_path / "bad", "--mrf", "-1"], capsys)
    assert code == 2 and "--mrf" in err and "Traceback" not in err


def test_plan_counts_the_mrf(tiny_trained, tmp_path, capsys, monkeypatch):
    from hypsegcli import batch
    from hypsegcli.batch import MRF_BYTES, MRF_BYTES_PER_LABEL, estimate_mrf, estimate_smooth

    monkeypatch.setattr(batch, "measure_flop_rate", lambda *a, **k: batch.REFERENCE_RATE)
    rate = batch.REFERENCE_RATE
    seconds, peak = estimate_mrf((50, 50, 50), [2, 4, 8], flop_rate=rate)
    big_s, _ = estimate_mrf((100, 50, 50), [2, 4, 8], flop_rate=rate)
    assert seconds > 0 and big_s == pytest.approx(2 * seconds)
    _, slab = estimate_smooth((50, 50, 50), [2, 4, 8], flop_rate=rate)
    assert peak == pytest.approx((MRF_BYTES + 8 * MRF_BYTES_PER_LABEL) * 50**3 + slab)
    argv = ["--quiet", "cluster", tiny_trained / "data" / "images", "-m", tiny_trained / "model.pt"]
    argv += ["--k", "3", "-o", tmp_path / "seg", "--dry-run", "--json"]
    plans = {}
    for mrf in ("0", "0.5"):
        code, out, err = run([*argv, "--mrf", mrf], capsys)
        assert code == 0, err
        plans[mrf] = json.loads(out)["volumes"][0]
    mrf_s, _ = estimate_mrf(plans["0"]["shape"], [3], flop_rate=rate)
    assert plans["0.5"]["seconds"] - plans["0"]["seconds"] == pytest.approx(mrf_s, abs=2e-3)


@pytest.mark.parametrize("shift", [1, -1])
def test_mrf_with_a_flat_masked_background(shift):
    # background exactly 0 (a masked volume): the noise estimate is 0 and the background's
    # variance too; the floors keep the likelihood finite and the boundary is found
    grid = np.indices((30, 30, 30)) - 14.5
    dist = np.sqrt((grid**2).sum(0))
    truth = (dist <= 9).astype(np.uint8)
    rng = np.random.default_rng(0)
    image = np.where(truth == 1, 1 + rng.normal(0, 0.3, truth.shape), 0).astype(np.float32)
    assert edges.noise_std(image) == 0.0
    labels = (dist <= 9 + shift).astype(np.uint8)
    refined = edges.refine_labels(labels, image, beta=0.5)
    assert int((refined != truth).sum()) < 0.05 * int((labels != truth).sum())
