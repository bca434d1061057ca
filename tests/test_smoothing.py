"""Potts smoothing of cluster labels: against brute force, slabs against one piece, and the CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from clitools import run

from hypsegcli import smoothing
from hypsegcli.kmeans import poincare_pdist2
from hypsegcli.pipeline import _Clusterer


def _softmax(e: np.ndarray) -> np.ndarray:
    e = e - e.max(axis=0, keepdims=True)
    p = np.exp(e)
    return p / p.sum(axis=0, keepdims=True)


def _meanfield_loops(unary: np.ndarray, beta: float, iters: int) -> np.ndarray:
    """The mean-field update written voxel by voxel over explicit neighbours, float64."""
    k, X, Y, Z = unary.shape
    q = _softmax(-unary)
    offsets = [o for o in itertools.product((-1, 0, 1), repeat=3) if o != (0, 0, 0)]
    for _ in range(iters):
        nb = np.zeros_like(q)
        for x, y, z in itertools.product(range(X), range(Y), range(Z)):
            for dx, dy, dz in offsets:
                u, v, w = x + dx, y + dy, z + dz
                if 0 <= u < X and 0 <= v < Y and 0 <= w < Z:
                    nb[:, x, y, z] += q[:, u, v, w]
        q = _softmax(beta * nb - unary)
    return q


@pytest.mark.parametrize("beta,iters", [(0.0, 3), (0.7, 1), (0.7, 3), (2.5, 4)])
def test_meanfield_matches_voxel_loops(beta, iters):
    rng = np.random.default_rng(int(beta * 10) + iters)
    unary = rng.exponential(1.0, size=(3, 5, 4, 6))
    got = smoothing.meanfield(torch.from_numpy(unary), beta, iters).numpy()
    np.testing.assert_allclose(got, _meanfield_loops(unary, beta, iters), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "shape", [(2, 1, 1, 1), (3, 1, 5, 2), (2, 6, 1, 4), (4, 2, 3, 1), (3, 5, 4, 6)]
)
def test_neighbour_sum_matches_explicit_neighbours(shape):
    """The 26-neighbour sum computed in its two work tensors, on volumes with sides of 1 and
    2 too, equals explicit neighbours summed in float64; q is left as it was, and the
    result is one of the work tensors (meanfield allocates nothing per update)."""
    rng = np.random.default_rng(sum(shape))
    q = torch.from_numpy(rng.random(shape))
    before = q.clone()
    work = (torch.empty_like(q), torch.empty_like(q))
    got = smoothing.neighbour_sum(q, work)
    k, X, Y, Z = shape
    want = np.zeros(shape)
    for x, y, z in itertools.product(range(X), range(Y), range(Z)):
        for dx, dy, dz in itertools.product((-1, 0, 1), repeat=3):
            u, v, w = x + dx, y + dy, z + dz
            if (dx, dy, dz) != (0, 0, 0) and 0 <= u < X and 0 <= v < Y and 0 <= w < Z:
                want[:, x, y, z] += before.numpy()[:, u, v, w]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-13, atol=1e-13)
    assert torch.equal(q, before)
    assert any(got.data_ptr() == t.data_ptr() for t in work)
    assert torch.equal(smoothing.neighbour_sum(q), got)  # without work tensors: the same


def test_meanfield_float32_and_a_mask_match_voxel_loops():
    """In float32 (as cluster runs it), with sides of 1 and 2, the marginals agree with the
    float64 loops within float32 rounding; with a mask, zero outside it."""
    rng = np.random.default_rng(7)
    unary = rng.exponential(1.0, size=(4, 2, 7, 1))
    got = smoothing.meanfield(torch.from_numpy(unary).float(), 1.3, 5).numpy()
    np.testing.assert_allclose(got, _meanfield_loops(unary, 1.3, 5), rtol=0, atol=2e-6)
    keep = torch.from_numpy(rng.random((2, 7, 1)) > 0.4).float()
    masked = smoothing.meanfield(torch.from_numpy(unary).float(), 1.3, 5, keep).numpy()
    assert (masked[:, keep.numpy() == 0] == 0).all()
    np.testing.assert_allclose(masked.sum(0)[keep.numpy() == 1], 1.0, atol=1e-6)


def test_first_argmax_is_argmax_with_ties_and_nan():
    """The first class of the largest value, as torch's argmax over the first axis: on
    random marginals, on ties (exact copies of a class, and all classes equal) and where a
    value is NaN."""
    rng = np.random.default_rng(3)
    for k in (1, 2, 3, 8):
        q = torch.from_numpy(rng.random((k, 6, 5, 4)).astype(np.float32))
        assert torch.equal(smoothing.first_argmax(q), q.argmax(0))
        if k > 1:
            q[k - 1, :3] = q[0, :3]  # a tie of the first and last class on some voxels
            q[:, 4] = 0.5  # all classes equal on others
            assert torch.equal(smoothing.first_argmax(q), q.argmax(0))
            q[1, 2, 2, 2] = float("nan")
            assert torch.equal(smoothing.first_argmax(q), q.argmax(0))
    view = torch.rand(3, 10, 4, 4)[:, 2:7]  # a slab's core, as smooth_labels passes it
    assert torch.equal(smoothing.first_argmax(view), view.argmax(0))


def _ball_points(rng, shape, d=2):
    x = rng.normal(size=(*shape, d))
    r = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / (1 + r) * rng.uniform(0.2, 0.95, size=(*shape, 1))


def _ball_sq_dist(rows, centers):
    return poincare_pdist2(np.asarray(rows, dtype=np.float64), centers)


@pytest.mark.parametrize("d", [1, 2, 5, 17])
def test_euclidean_sq_dist_matches_broadcast_reference(d):
    """The Euclidean squared distances, one centre at a time, equal the (n, k, d) broadcast bit for bit."""
    rng = np.random.default_rng(d)
    clusterer = _Clusterer("line", curvature=1.0, n_init=1, fit_samples=10, seed=0, device="cpu")
    for k in (1, 3, 8):
        rows = (rng.normal(size=(301, d)) * 50).astype(np.float32)
        centers = rng.normal(size=(k, d))
        want = ((rows.astype(np.float64)[:, None, :] - centers[None]) ** 2).sum(-1)
        got = clusterer.sq_dist(rows, centers)
        assert got.dtype == np.float64 and np.array_equal(got, want)


def test_euclidean_sq_dist_memory_is_about_its_output():
    """No (n, k, d) temporaries: the peak stays within twice the (n, k) result (numpy's
    allocations are traced)."""
    import tracemalloc

    clusterer = _Clusterer("line", curvature=1.0, n_init=1, fit_samples=10, seed=0, device="cpu")
    rows = np.random.default_rng(0).normal(size=(100_000, 2)).astype(np.float32)
    centers = np.random.default_rng(1).normal(size=(8, 2))
    tracemalloc.start()
    try:
        got = clusterer.sq_dist(rows, centers)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.shape == (100_000, 8) and peak < 2 * got.nbytes


def test_temperature_is_mean_squared_distance_to_nearest_centre():
    rng = np.random.default_rng(0)
    rows = _ball_points(rng, (500,))
    centers = _ball_points(rng, (4,))
    brute = np.mean([min(_ball_sq_dist(r[None], centers)[0]) for r in rows])
    assert smoothing.temperature(rows, centers, _ball_sq_dist, block=37) == pytest.approx(
        brute, rel=1e-12
    )
    # every row on a centre: a neutral temperature instead of a division by zero
    assert smoothing.temperature(centers, centers, _ball_sq_dist, block=3) == 1.0


def test_slabs_give_the_labels_of_the_whole_volume():
    rng = np.random.default_rng(1)
    feats = _ball_points(rng, (37, 6, 5))
    centers = _ball_points(rng, (3,))
    kw = dict(beta=0.9, iters=2, dtype=torch.float64)
    calls = []

    def counted(rows, cs):
        calls.append(len(rows))
        return _ball_sq_dist(rows, cs)

    whole = smoothing.smooth_labels(feats, centers, counted, **kw, slab_elements=1 << 30)
    assert calls == [37 * 6 * 5]  # one slab: one distance pass serves the temperature too
    for elements in (1, 6 * 5 * 3 * 12, 6 * 5 * 3 * 20):  # 5, 3 and 2 slabs of 8+ planes
        sl = smoothing.smooth_labels(feats, centers, _ball_sq_dist, **kw, slab_elements=elements)
        np.testing.assert_array_equal(sl, whole)
    assert whole.dtype == np.uint8 and whole.shape == (37, 6, 5)
    # the halo matters: without it the slab borders differ somewhere
    temp = smoothing.temperature(feats.reshape(-1, 2), centers, _ball_sq_dist, 1000)
    pieces = [
        smoothing.smooth_labels(feats[a : a + 8], centers, _ball_sq_dist, **kw, temp=temp)
        for a in range(0, 37, 8)
    ]
    assert not np.array_equal(np.concatenate(pieces), whole)


def test_beta_zero_is_nearest_centre_and_clusterer_labels_agree():
    rng = np.random.default_rng(2)
    feats = _ball_points(rng, (9, 8, 7))
    centers = _ball_points(rng, (4,))
    nearest = _ball_sq_dist(feats.reshape(-1, 2), centers).argmin(1).reshape(9, 8, 7)
    got = smoothing.smooth_labels(feats, centers, _ball_sq_dist, beta=0.0)
    np.testing.assert_array_equal(got, nearest)
    cl = _Clusterer("ball", curvature=1.0, n_init=1, fit_samples=100, seed=0, device="cpu")
    np.testing.assert_array_equal(cl.labels(feats, centers, 0.0), nearest)
    # relabelling the centres relabels the smoothed labels the same way
    perm = np.array([2, 0, 3, 1])
    a = cl.labels(feats, centers, 0.8)
    b = cl.labels(feats, centers[perm], 0.8)
    np.testing.assert_array_equal(perm[b], a)


def test_smoothing_removes_label_noise():
    """Two half-volumes with noisy 1-D features: the prior recovers the halves better."""
    rng = np.random.default_rng(3)
    truth = np.zeros((24, 24, 24), dtype=np.int64)
    truth[12:] = 1
    feats = (truth + rng.normal(0, 0.45, truth.shape))[..., None]
    centers = np.array([[0.0], [1.0]])
    cl = _Clusterer("line", curvature=1.0, n_init=1, fit_samples=100, seed=0, device="cpu")
    plain = (cl.labels(feats, centers, 0.0) == truth).mean()
    smooth = (cl.labels(feats, centers, 0.4) == truth).mean()
    assert plain < 0.9 and smooth > 0.98


def test_bad_beta_is_refused():
    with pytest.raises(Exception, match="beta"):
        smoothing.smooth_labels(np.zeros((2, 2, 2, 1)), np.zeros((2, 1)), _ball_sq_dist, beta=-1)


def test_cli_smooth_is_recorded_and_changes_labels(tiny_trained, tmp_path, capsys):
    images = tiny_trained / "data" / "images"
    base = ["--quiet", "cluster", images, "-m", tiny_trained / "model.pt", "--k", "3", "--json"]
    seg = tmp_path / "seg"
    code, _, err = run([*base, "-o", seg, "--smooth", "0"], capsys)
    assert code == 0, err
    plain = {p.name: p.read_bytes() for p in seg.glob("*_k3.nii.gz")}
    header = json.loads((seg / "centroids.json").read_text())
    assert header["smooth"] == 0.0
    # another beta is another result: not skipped as done, labels recomputed
    code, out, err = run([*base, "-o", seg, "--smooth", "3"], capsys)
    assert code == 0, err
    assert all(r["status"] == "done" for r in json.loads(out)["volumes"])
    assert json.loads((seg / "centroids.json").read_text())["smooth"] == 3.0
    smoothed = {p.name: p.read_bytes() for p in seg.glob("*_k3.nii.gz")}
    assert smoothed.keys() == plain.keys() and smoothed != plain
    code, _, err = run([*base, "-o", tmp_path / "bad", "--smooth", "-1"], capsys)
    assert code == 2 and "--smooth" in err and "Traceback" not in err


@pytest.mark.parametrize("planes", [43, 50, 95])
def test_smooth_estimate_counts_the_planes_smoothing_runs(planes, monkeypatch):
    """The estimate's planes (halos included, clipped at the ends) are those smooth_labels
    passes to the mean-field updates, slab by slab, also when the last slab is short."""
    from hypsegcli import batch

    elements = 64 * 3 * 45  # small slabs: cores of 4 x SMOOTH_ITERS planes
    real_planes, real_meanfield = smoothing.slab_planes, smoothing.meanfield

    def slab_planes(plane, k, iters, slab_elements=elements):
        return real_planes(plane, k, iters, slab_elements)

    seen = []

    def meanfield(unary, *args, **kwargs):
        seen.append(unary.shape[1])
        return real_meanfield(unary, *args, **kwargs)

    monkeypatch.setattr(smoothing, "slab_planes", slab_planes)
    monkeypatch.setattr(smoothing, "meanfield", meanfield)
    feats = _ball_points(np.random.default_rng(planes), (planes, 8, 8))
    centers = feats.reshape(-1, 2)[:3]
    smoothing.smooth_labels(feats, centers, _ball_sq_dist, beta=0.5, slab_elements=elements)
    assert len(seen) > 1
    secs, _ = batch.estimate_smooth((planes, 8, 8), [3], flop_rate=batch.REFERENCE_RATE)
    assert secs == pytest.approx(batch.SMOOTH_S * sum(seen) * 64 * 3)


def test_plan_estimates_for_smoothing():
    from hypsegcli.batch import REFERENCE_RATE, SMOOTH_BYTES, SMOOTH_S, estimate_smooth

    small, _ = estimate_smooth((50, 50, 50), [2, 4, 8], flop_rate=REFERENCE_RATE)
    big, big_bytes = estimate_smooth((512, 512, 300), [2, 4, 8], flop_rate=REFERENCE_RATE)
    assert small == pytest.approx(SMOOTH_S * 50**3 * 14)  # one slab: no halo
    assert big > small * 512 * 512 * 300 / 50**3  # several slabs: halos worked twice
    assert big < 1.5 * small * 512 * 512 * 300 / 50**3
    assert estimate_smooth((50, 50, 50), [2], flop_rate=2 * REFERENCE_RATE)[0] < small / 6
    # memory: one slab of the largest k, not the volume x k
    whole = SMOOTH_BYTES * 512 * 512 * 300 * 8
    assert 0.05 * whole < big_bytes < 0.25 * whole


def test_repeated_centres_smooth_like_one_copy():
    """k above the distinct feature values gives k-means repeated centres; the Potts prior
    must label as with one copy of each (it split their marginals and let the single
    centre's label grow into their region)."""

    def sq(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    rng = np.random.default_rng(0)
    feats = np.zeros((12, 12, 12, 1))
    feats[6:] = 1.0
    feats += rng.normal(0.0, 0.3, feats.shape)
    distinct = smoothing.smooth_labels(feats, np.array([[0.0], [1.0]]), sq, beta=0.8)
    assert (distinct[6:] == 1).mean() > 0.95 and (distinct[:6] == 0).mean() > 0.95
    for centers, names in [
        ([[0.0], [1.0], [1.0], [1.0]], [0, 1]),
        ([[1.0], [0.0], [1.0], [0.0], [0.0]], [1, 0]),
    ]:
        got = smoothing.smooth_labels(feats, np.array(centers), sq, beta=0.8)
        np.testing.assert_array_equal(got, np.asarray(names)[distinct])
        # in slabs, and with a mask, the same
        np.testing.assert_array_equal(
            smoothing.smooth_labels(feats, np.array(centers), sq, beta=0.8, slab_elements=400),
            got,
        )
        inside = np.ones(feats.shape[:3], dtype=bool)
        inside[:, :2] = False
        want = smoothing.smooth_labels(feats, np.array([[0.0], [1.0]]), sq, beta=0.8, inside=inside)
        got = smoothing.smooth_labels(feats, np.array(centers), sq, beta=0.8, inside=inside)
        np.testing.assert_array_equal(got[inside], np.asarray(names)[want][inside])
