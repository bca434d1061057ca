"""Tests of hypsegcli.kmeans: Fréchet mean, Poincaré distances, PoincareKMeans.

References are computed independently in float64: distances by the Möbius
form d = (2/√c) artanh(√c‖(−x) ⊕ y‖) in numpy, Fréchet means by a generic
scipy minimisation of Σ w d² with torch autograd gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from clitools import blob_and_two_specks
from scipy.optimize import linear_sum_assignment, minimize
from sklearn.metrics import adjusted_rand_score, silhouette_score

import hypsegcli.kmeans as km_mod
from hypsegcli.errors import BadInputError, HypsegError
from hypsegcli.kmeans import (
    ConvergenceWarning,
    NotFittedError,
    PoincareKMeans,
    frechet_mean,
    mean_silhouette,
    poincare_dist,
    poincare_pdist2,
)

# ----------------------------------------------------------------------------- references


def _expmap0(u: np.ndarray, c: float) -> np.ndarray:
    nu = np.linalg.norm(u, axis=-1, keepdims=True).clip(1e-300)
    return np.tanh(np.sqrt(c) * nu) * u / (np.sqrt(c) * nu)


def _mobius_add(x: np.ndarray, y: np.ndarray, c: float) -> np.ndarray:
    xy = (x * y).sum(-1, keepdims=True)
    x2 = (x * x).sum(-1, keepdims=True)
    y2 = (y * y).sum(-1, keepdims=True)
    return ((1 + 2 * c * xy + c * y2) * x + (1 - c * x2) * y) / (1 + 2 * c * xy + c * c * x2 * y2)


def _ref_dist(x: np.ndarray, y: np.ndarray, c: float) -> np.ndarray:
    """Möbius/artanh form, float64, broadcasting over rows."""
    w = _mobius_add(-np.asarray(x, np.float64), np.asarray(y, np.float64), c)
    return 2 / np.sqrt(c) * np.arctanh(np.sqrt(c) * np.linalg.norm(w, axis=-1))


def _ball_points(
    rng: np.random.Generator, n: int, d: int, c: float, max_cnorm: float
) -> np.ndarray:
    """n points with √c‖x‖ uniform-ish in (0, max_cnorm)."""
    u = rng.normal(size=(n, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    r = rng.uniform(0.05, max_cnorm, size=(n, 1))
    return u * r / np.sqrt(c)


def _scipy_frechet(x: np.ndarray, w: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    """argmin_y Σ w d(x, y)² by BFGS over y = expmap0(v), gradients by autograd (float64)."""
    X = torch.tensor(x, dtype=torch.float64)
    W = torch.tensor(w, dtype=torch.float64)
    sc = c**0.5

    def f(v: np.ndarray) -> tuple[float, np.ndarray]:
        vt = torch.tensor(v, dtype=torch.float64, requires_grad=True)
        nv = vt.norm()
        y = torch.tanh(sc * nv) * vt / (sc * nv)
        mx = -X
        xy = (mx * y).sum(1)
        x2 = (mx * mx).sum(1)
        y2 = (y * y).sum()
        num = (1 + 2 * c * xy + c * y2)[:, None] * mx + (1 - c * x2)[:, None] * y
        den = (1 + 2 * c * xy + c * c * x2 * y2)[:, None]
        dist = 2 / sc * torch.atanh(sc * (num / den).norm(dim=1))
        obj = (W * dist**2).sum()
        obj.backward()
        return float(obj.detach()), vt.grad.numpy().copy()

    e = (w[:, None] * x).sum(0) / w.sum()
    ne = np.linalg.norm(e) * sc
    v0 = e * np.arctanh(min(ne, 0.9)) / max(ne, 1e-12) / sc + 1e-3
    res = minimize(f, v0, jac=True, method="BFGS", options={"gtol": 1e-12, "maxiter": 2000})
    return _expmap0(res.x, c), float(res.fun)


def _objective(x: np.ndarray, w: np.ndarray, y: np.ndarray, c: float) -> float:
    return float((w * _ref_dist(x, y[None], c) ** 2).sum())


def _blobs(
    rng, k: int, per: int, *, d: int = 2, c: float = 1.0, radius: float = 2.0, spread: float = 0.12
):
    """k blobs: expmap0 of Gaussians around distinct tangent directions."""
    if d == 2:
        ang = 2 * np.pi * np.arange(k) / k
        dirs = np.stack([np.cos(ang), np.sin(ang)], 1)
    else:
        dirs = np.linalg.qr(rng.normal(size=(d, d)))[0][:, :k].T if k <= d else None
        if dirs is None:
            dirs = np.concatenate([np.eye(d), -np.eye(d)])[:k]
    centers = radius * dirs / np.sqrt(c)
    labels = np.repeat(np.arange(k), per)
    u = centers[labels] + spread / np.sqrt(c) * rng.normal(size=(k * per, d))
    perm = rng.permutation(k * per)
    return _expmap0(u, c)[perm], labels[perm]


# ----------------------------------------------------------------------------- g and distances


def test_g_closed_form_series_and_limit():
    g = km_mod._g
    assert float(g(torch.zeros(1, dtype=torch.float64))) == 4.0
    t = np.concatenate([np.logspace(-12, -3, 40), np.logspace(-3, 6, 40)])
    got = g(torch.tensor(t)).numpy()
    ref = (
        4 * np.arcsinh(np.sqrt(t)) / np.sqrt(t * (1 + t))
    )  # numpy's asinh: accurate for small args
    np.testing.assert_allclose(got, ref, rtol=1e-13)
    big = t >= 1e-3  # the METHOD.md form, where arccosh(1 + 2t) is accurate
    np.testing.assert_allclose(
        got[big], 2 * np.arccosh(1 + 2 * t[big]) / np.sqrt(t[big] ** 2 + t[big]), rtol=1e-12
    )
    # continuous across the series threshold
    th = km_mod._G_SERIES_BELOW
    lo, hi = g(torch.tensor([th * (1 - 1e-9), th], dtype=torch.float64)).numpy()
    assert abs(lo - hi) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [1.0, 0.37, 2.5])
def test_pdist_matches_mobius_form(dtype, c):
    rng = np.random.default_rng(1)
    x = _ball_points(rng, 20, 3, c, 0.95)
    y = _ball_points(rng, 7, 3, c, 0.95)
    ref = _ref_dist(x[:, None, :], y[None, :, :], c)
    got = poincare_dist(torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype), c=c)
    assert isinstance(got, torch.Tensor) and got.dtype == dtype and got.shape == (20, 7)
    rtol = 1e-4 if dtype == torch.float32 else 1e-11
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=rtol, atol=rtol)
    got2 = poincare_pdist2(x, y, c=c)
    assert isinstance(got2, np.ndarray)
    np.testing.assert_allclose(got2, ref**2, rtol=1e-11)
    # tiny distances keep relative precision (asinh form, differences not expansion)
    x0 = x[:1]
    xe = x0 + 1e-9
    np.testing.assert_allclose(poincare_dist(x0, xe, c=c)[0, 0], _ref_dist(x0, xe, c)[0], rtol=1e-6)
    assert poincare_dist(x0, x0, c=c)[0, 0] == 0.0


@pytest.mark.parametrize("block", [None, 50])
@pytest.mark.parametrize("d", [1, 2, 5])
def test_pdist_chunks_and_self_distances(monkeypatch, block, d):
    """Row chunks of any size give the bits of the matching-column form (``_col_t``),
    and ``y=None`` gives an exactly symmetric matrix equal to ``poincare_pdist2(x, x)``."""
    if block is not None:  # chunks of 7 rows against 7 centres, self blocks of one row
        monkeypatch.setattr(km_mod, "_ASSIGN_BLOCK", block)
    rng = np.random.default_rng(2)
    c = 0.7
    x = torch.tensor(_ball_points(rng, 61, d, c, 0.99))
    y = torch.tensor(_ball_points(rng, 7, d, c, 0.99))
    got = poincare_pdist2(x, y, c=c)
    cols = km_mod._t_to_d2(
        km_mod._col_t(x.T.repeat_interleave(7, 1), y.T.repeat(1, 61), c), c
    ).view(61, 7)
    assert torch.equal(got, cols)
    np.testing.assert_allclose(
        got.numpy(), _ref_dist(x.numpy()[:, None], y.numpy()[None], c) ** 2, rtol=1e-11
    )
    own = poincare_pdist2(x, c=c)
    assert torch.equal(own, poincare_pdist2(x, x, c=c))  # else blocks of 8 rows, a last of 5
    assert torch.equal(own, own.T) and not own.diagonal().any()
    dist = poincare_dist(x.numpy(), c=c)
    assert isinstance(dist, np.ndarray) and np.array_equal(dist, np.sqrt(own.numpy()))
    assert poincare_pdist2(x[:0], c=c).shape == (0, 0)
    assert poincare_pdist2(x, y[:0], c=c).shape == (61, 0)
    no_dims = poincare_pdist2(np.zeros((3, 0)), np.zeros((2, 0)), c=c)  # R^0: one point
    assert no_dims.shape == (3, 2) and not no_dims.any()


# ----------------------------------------------------------------------------- Fréchet mean


@pytest.mark.parametrize(
    "c, d, max_cnorm, seed",
    [
        (1.0, 2, 0.8, 0),
        (1.0, 3, 0.999, 1),
        (0.3, 2, 0.9995, 2),
        (2.5, 3, 0.99, 3),
        (1.0, 5, 0.95, 4),
    ],
)
def test_frechet_mean_matches_scipy(c, d, max_cnorm, seed):
    rng = np.random.default_rng(seed)
    x = _ball_points(rng, 9, d, c, max_cnorm)
    w = rng.uniform(0.1, 2.0, size=9)
    ref, ref_obj = _scipy_frechet(x, w, c)
    got = frechet_mean(x, w, c=c)
    assert isinstance(got, np.ndarray) and got.shape == (d,) and got.dtype == np.float64
    assert _ref_dist(got, ref, c) < 1e-5
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # never worse than the generic optimiser
    assert _objective(x, w, got, c) <= ref_obj * (1 + 1e-12) + 1e-12


def test_frechet_mean_torch_in_torch_out_and_float32():
    rng = np.random.default_rng(5)
    x = _ball_points(rng, 30, 2, 1.0, 0.9)
    m64 = frechet_mean(torch.tensor(x), c=1.0)
    m32 = frechet_mean(torch.tensor(x, dtype=torch.float32), c=1.0)
    assert isinstance(m64, torch.Tensor) and m64.dtype == torch.float64
    assert m32.dtype == torch.float32
    np.testing.assert_allclose(m32.numpy(), m64.numpy(), atol=1e-6)


def test_frechet_mean_near_origin_is_euclidean_mean():
    rng = np.random.default_rng(6)
    x = 1e-6 * rng.normal(size=(15, 3))
    w = rng.uniform(0.5, 1.5, size=15)
    eu = (w[:, None] * x).sum(0) / w.sum()
    got = frechet_mean(x, w, c=1.0)
    # curvature corrections are O(‖x‖³): 1e-18 here
    np.testing.assert_allclose(got, eu, rtol=0, atol=1e-15)


def test_frechet_mean_with_point_at_iterate_uses_g0_limit(monkeypatch):
    """Start the iteration exactly on a data point: t = 0 there, g(0) must be 4."""
    rng = np.random.default_rng(7)
    c = 1.0
    x = _ball_points(rng, 6, 2, c, 0.9)
    w = np.ones(6)
    ref, _ = _scipy_frechet(x, w, c)
    got = frechet_mean(x, w, c=c, init=x[2])
    assert _ref_dist(got, ref, c) < 1e-5

    # a clamp like the authors' (g(0) ≈ 2e6 instead of 4) pins the mean to that point
    def clamped_g(t):
        num = 2 * torch.arccosh((1 + 2 * t).clamp_min(1 + 1e-12))
        return num / torch.sqrt(t * t + t).clamp_min(1.4e-12)

    assert 1e6 < float(clamped_g(torch.zeros(1, dtype=torch.float64))) < 1e7

    monkeypatch.setattr(km_mod, "_g", clamped_g)
    bad = frechet_mean(x, w, c=c, init=x[2], max_iter=10)
    assert _ref_dist(bad, ref, c) > 1e-3


def test_frechet_mean_single_point_zero_weights_and_fixed_point():
    rng = np.random.default_rng(8)
    x = _ball_points(rng, 5, 2, 1.0, 0.99)
    np.testing.assert_allclose(frechet_mean(x[:1]), x[0], atol=1e-15)
    w = np.array([0.0, 0.0, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(frechet_mean(x, w), x[2], atol=1e-14)
    # a tight cluster near the boundary: the converged mean is a fixed point to the last bits
    centre = np.array([0.995, 0.0])
    pts = _mobius_add(centre[None], _expmap0(0.05 * rng.normal(size=(2000, 2)), 1.0), 1.0)
    m = frechet_mean(pts)
    again = frechet_mean(pts, init=m, max_iter=3, tol=0.0)
    assert _ref_dist(m, again, 1.0) < 1e-12


def test_frechet_mean_bad_inputs():
    x = np.array([[0.1, 0.2], [0.3, -0.1]])
    with pytest.raises(BadInputError, match="weights"):
        frechet_mean(x, np.array([1.0, -1.0]))
    with pytest.raises(BadInputError, match="weights"):
        frechet_mean(x, np.zeros(2))
    with pytest.raises(BadInputError, match="outside the Poincaré ball"):
        frechet_mean(np.array([[2.0, 0.0]]))
    with pytest.raises(BadInputError, match="c="):
        frechet_mean(x, c=-1.0)


def test_lou_step_equals_method_formula():
    """The centred, cancellation-free step equals METHOD.md's y+ = ((A − √(A² − 4c‖b‖²)) / (2c‖b‖²)) b."""
    rng = np.random.default_rng(9)
    for c in (1.0, 0.4, 3.0):
        x = _ball_points(rng, 12, 3, c, 0.9)
        w = rng.uniform(0.2, 1.0, size=12)
        y = _ball_points(rng, 1, 3, c, 0.7)[0]
        # the plain formula, numpy float64
        xx = (x * x).sum(1)
        t = c * ((x - y) ** 2).sum(1) / ((1 - c * xx) * (1 - c * y @ y))
        g = 2 * np.arccosh(1 + 2 * t) / np.sqrt(t * t + t)
        alpha = w * g / (1 - c * xx)
        a, b, s = alpha.sum(), (alpha[:, None] * x).sum(0), (alpha * xx).sum()
        big_a = a + c * s
        ref = (big_a - np.sqrt(big_a**2 - 4 * c * b @ b)) / (2 * c * b @ b) * b
        xT = torch.tensor(x.T.copy())
        gap_x = 1 - c * torch.tensor(xx)
        got = km_mod._lou_step(
            xT,
            gap_x,
            torch.tensor(w) / gap_x,
            torch.zeros(12, dtype=torch.int64),
            torch.tensor(y[None]),
            c,
        )
        np.testing.assert_allclose(got[0].numpy(), ref, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- k-means


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return adjusted_rand_score(a, b) == 1.0


@pytest.mark.parametrize(
    "k, d, c, seed", [(4, 2, 1.0, 0), (8, 2, 1.0, 1), (8, 2, 0.5, 2), (6, 3, 2.0, 3)]
)
def test_recovers_separated_blobs(k, d, c, seed):
    rng = np.random.default_rng(seed)
    x, truth = _blobs(rng, k, 60, d=d, c=c, radius=2.2)
    model = PoincareKMeans(k, random_state=seed, c=c)
    labels = model.fit_predict(x)
    assert labels.dtype == np.int64 and labels.shape == (len(x),)
    assert _same_partition(labels, truth)
    # Hungarian on the confusion matrix: the matching is perfect
    conf = np.zeros((k, k))
    np.add.at(conf, (labels, truth), 1)
    r, col = linear_sum_assignment(-conf)
    assert conf[r, col].sum() == len(x)
    # centres are the (converged) Fréchet means of their clusters
    assert model.cluster_centers_.shape == (k, d) and model.cluster_centers_.dtype == np.float64
    for j in range(k):
        m = frechet_mean(x[labels == j], c=c)
        assert _ref_dist(model.cluster_centers_[j], m, c) < 1e-9


def test_fit_predict_equals_fit_then_predict_and_seeding():
    rng = np.random.default_rng(10)
    x = _ball_points(rng, 300, 2, 1.0, 0.98).astype(np.float32)  # no clear clusters: many optima
    a = PoincareKMeans(5, random_state=3, n_init=2)
    la = a.fit_predict(x)
    b = PoincareKMeans(5, random_state=3, n_init=2).fit(x)
    np.testing.assert_array_equal(la, b.predict(x))
    np.testing.assert_array_equal(la, b.labels_)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)  # bitwise: same seed
    assert a.inertia_ == b.inertia_ and a.n_iter_ == b.n_iter_
    # different seeds reach different local optima on structureless data
    fits = [PoincareKMeans(5, random_state=s, n_init=1).fit(x) for s in range(4)]
    assert len({round(f.inertia_, 9) for f in fits}) > 1
    # a numpy Generator works as random_state
    PoincareKMeans(5, random_state=np.random.default_rng(0), n_init=1).fit(x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inertia_is_sum_of_squared_distances(dtype):
    rng = np.random.default_rng(11)
    c = 0.7
    x, _ = _blobs(rng, 5, 120, c=c, radius=2.5, spread=0.4)
    x = x.astype(dtype)
    model = PoincareKMeans(5, random_state=0, c=c).fit(x)
    ref = (_ref_dist(x.astype(np.float64), model.cluster_centers_[model.labels_], c) ** 2).sum()
    np.testing.assert_allclose(model.inertia_, ref, rtol=1e-10)
    # and every point is at its nearest centre (float64 brute force)
    dist = _ref_dist(x.astype(np.float64)[:, None, :], model.cluster_centers_[None], c)
    chosen = dist[np.arange(len(x)), model.labels_]
    assert np.all(chosen <= dist.min(1) * (1 + 1e-5) + 1e-6)


def _spy_lloyd(monkeypatch) -> list:
    """Record every ``PoincareKMeans._lloyd`` call as (polish, starting centres, run)."""
    calls = []
    original = PoincareKMeans._lloyd

    def spy(self, xT, xx, centers, *, polish, max_iter, **kw):
        start = centers.clone()
        run = original(self, xT, xx, centers, polish=polish, max_iter=max_iter, **kw)
        calls.append((polish, start, run))
        return run

    monkeypatch.setattr(PoincareKMeans, "_lloyd", spy)
    return calls


def test_best_of_n_init_keeps_min_inertia(monkeypatch):
    rng = np.random.default_rng(12)
    x = _ball_points(rng, 400, 2, 1.0, 0.97)
    calls = _spy_lloyd(monkeypatch)
    seen = []
    model = PoincareKMeans(6, random_state=4, n_init=5).fit(
        x, callback=lambda i, inertia: seen.append(inertia)
    )
    restarts = [run for polish, _, run in calls if not polish]
    assert len(restarts) == 5 and seen == [r.inertia for r in restarts]
    assert len({round(r.inertia, 9) for r in restarts}) > 1  # the restarts do differ here
    best = min(restarts, key=lambda r: r.inertia)
    (refine,) = [(start, run) for polish, start, run in calls if polish]
    assert torch.equal(refine[0], best.centers)  # the refinement starts from the best restart
    assert model.inertia_ <= best.inertia * (1 + 1e-12)  # refining never loses (all points fitted)


def test_restarts_stop_once_few_points_change_cluster(monkeypatch):
    """A restart stops at the first iteration that moves at most ``settled`` points to
    another cluster, where Lloyd run to the end goes on; ``fit`` gives its restarts
    ``_RESTART_SETTLED`` of the restart sample and its refinement nothing."""
    x = _ball_points(np.random.default_rng(3), 6000, 2, 1.0, 0.9)
    km = PoincareKMeans(5, random_state=0, tol=0.0)  # tol 0: only the labels stop a run
    xT = torch.from_numpy(x.T.copy())
    xx = km_mod._sqnorm_cols(xT)
    init = km._kmeans_pp(xT, xx, np.random.default_rng(1))
    history = [km._assign_cols(xT, xx, init.clone())[0]]
    for j in range(1, 200):  # the labels after each iteration, from runs cut short
        run = km._lloyd(xT, xx, init.clone(), polish=False, max_iter=j)
        if run.n_iter < j:
            break
        history.append(run.labels)
    changes = [int((a != b).sum()) for a, b in zip(history, history[1:], strict=False)]
    settled = 6
    stop = next(j for j, moved in enumerate(changes, 1) if moved <= settled)
    assert 1 < stop < len(changes) and sum(changes[stop:]) > 0  # a full run goes on moving
    run = km._lloyd(xT, xx, init.clone(), polish=False, max_iter=200, settled=settled)
    assert run.n_iter == stop and torch.equal(run.labels, history[stop])

    seen = []
    original = PoincareKMeans._lloyd

    def spy(self, *args, polish, **kw):
        seen.append((polish, kw.get("settled", 0)))
        return original(self, *args, polish=polish, **kw)

    monkeypatch.setattr(PoincareKMeans, "_lloyd", spy)
    PoincareKMeans(3, n_init=2, random_state=0).fit(x)
    assert seen == [(False, int(km_mod._RESTART_SETTLED * 6000))] * 2 + [(True, 0)]


@pytest.mark.parametrize("seed", range(4))
def test_mean_silhouette_matches_sklearn_on_poincare_distances(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    x = _ball_points(rng, n, 3, 1.0, 0.95)
    dist = _ref_dist(x[:, None, :], x[None, :, :], 1.0)
    np.fill_diagonal(dist, 0.0)
    labels = rng.integers(0, int(rng.integers(2, min(n - 1, 7) + 1)), size=n)
    labels[0] = 99  # a cluster of one point scores 0, as in scikit-learn
    if len(np.unique(labels)) < 2:
        labels[1] = 98
    ref = silhouette_score(dist, labels, metric="precomputed")
    assert mean_silhouette(dist, labels) == pytest.approx(ref, rel=1e-12, abs=1e-15)
    assert mean_silhouette(torch.from_numpy(dist), torch.from_numpy(labels)) == pytest.approx(ref)


def test_mean_silhouette_edge_cases():
    dist = np.array([[0.0, 1.0, 4.0], [1.0, 0.0, 3.0], [4.0, 3.0, 0.0]])
    assert mean_silhouette(dist, [5, 5, 5]) == -1.0  # one cluster: nothing is separated
    assert mean_silhouette(dist, [0, 1, 2]) == 0.0  # every point alone
    # by hand: a = (1, 1), b = (4, 3) for the pair; the single point scores 0
    assert mean_silhouette(dist, [0, 0, 1]) == pytest.approx(((4 - 1) / 4 + (3 - 1) / 3) / 3)
    assert mean_silhouette(np.zeros((2, 2)), [0, 1]) == 0.0  # a = b = 0
    with pytest.raises(BadInputError, match=r"dist should be \(3, 3\)"):
        mean_silhouette(np.zeros((2, 2)), [0, 1, 1])


def test_select_silhouette_keeps_the_restart_of_largest_silhouette(monkeypatch):
    x = blob_and_two_specks()
    monkeypatch.setattr(km_mod, "_SILHOUETTE_SAMPLES", 10_000)  # every point: no subset drawn
    calls = _spy_lloyd(monkeypatch)
    PoincareKMeans(3, n_init=6, random_state=0, select="silhouette").fit(x)
    restarts = [run for polish, _, run in calls if not polish]
    (start,) = [start for polish, start, _ in calls if polish]
    dist = _ref_dist(x[:, None, :], x[None, :, :], 1.0)
    np.fill_diagonal(dist, 0.0)
    scores = []
    for run in restarts:
        centers = run.centers.numpy()
        labels = _ref_dist(x[:, None, :], centers[None, :, :], 1.0).argmin(axis=1)
        scores.append(silhouette_score(dist, labels, metric="precomputed"))
    kept = int(np.argmax(scores))
    assert torch.equal(start, restarts[kept].centers)  # the refinement starts from it
    least = min(range(len(restarts)), key=lambda i: restarts[i].inertia)
    assert restarts[kept].inertia > restarts[least].inertia * 1.01  # not inertia's pick here


def test_select_silhouette_with_one_restart_is_inertia_and_is_seeded():
    rng = np.random.default_rng(3)
    x = _ball_points(rng, 500, 2, 1.0, 0.9)
    for n_init in (1, 3):
        a = PoincareKMeans(4, n_init=n_init, random_state=7).fit(x)
        b = PoincareKMeans(4, n_init=n_init, random_state=7, select="silhouette").fit(x)
        if n_init == 1:  # nothing to choose from: the same fit
            np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
        again = PoincareKMeans(4, n_init=n_init, random_state=7, select="silhouette").fit(x)
        np.testing.assert_array_equal(b.cluster_centers_, again.cluster_centers_)  # seeded
    assert "select='silhouette'" in repr(b)


def test_fit_samples_subsample_assigns_all_points():
    rng = np.random.default_rng(13)
    x, truth = _blobs(rng, 4, 300, radius=2.0)
    model = PoincareKMeans(4, random_state=0, fit_samples=60).fit(x)
    assert model.labels_.shape == (1200,)
    assert _same_partition(model.labels_, truth)
    np.testing.assert_array_equal(model.labels_, model.predict(x))
    ref = (_ref_dist(x, model.cluster_centers_[model.labels_], 1.0) ** 2).sum()
    np.testing.assert_allclose(model.inertia_, ref, rtol=1e-10)


def test_torch_input_and_predict_with_loaded_centres():
    rng = np.random.default_rng(14)
    x, truth = _blobs(rng, 3, 100)
    xt = torch.tensor(x, dtype=torch.float32)
    model = PoincareKMeans(3, random_state=0).fit(xt)
    assert isinstance(model.labels_, np.ndarray) and model.labels_.dtype == np.int64
    assert model.cluster_centers_.dtype == np.float64
    assert _same_partition(model.labels_, truth)
    fresh = PoincareKMeans(3)
    fresh.cluster_centers_ = model.cluster_centers_.tolist()  # centres loaded from a file
    np.testing.assert_array_equal(fresh.predict(x), model.labels_)


def test_empty_cluster_takes_farthest_point_deterministically():
    x = torch.tensor(
        [[0.0, 0.0], [0.1, 0.0], [0.2, 0.0], [0.5, 0.0], [-0.3, 0.0]], dtype=torch.float64
    )
    xT = x.T.contiguous()
    centers = torch.tensor([[0.05, 0.0], [0.9, 0.0], [-0.9, 0.0]], dtype=torch.float64)
    labels = torch.zeros(5, dtype=torch.int64)  # clusters 1 and 2 empty
    t = km_mod._col_t(xT, centers.T.index_select(1, labels), 1.0)
    PoincareKMeans(3)._relocate_empty(xT, labels, t, centers)
    # farthest from centre 0 is 0.5 (-> cluster 1), then -0.3 (-> cluster 2)
    assert labels.tolist() == [0, 0, 0, 1, 2]
    np.testing.assert_array_equal(centers[1].numpy(), [0.5, 0.0])
    np.testing.assert_array_equal(centers[2].numpy(), [-0.3, 0.0])


def test_duplicates_warn_and_n_samples_equal_k():
    x = np.repeat(np.array([[0.1, 0.1], [-0.2, 0.3], [0.4, -0.4]]), 4, axis=0)
    with pytest.warns(km_mod.ConvergenceWarning, match="distinct clusters"):
        PoincareKMeans(5, random_state=0).fit(x)
    y = np.array([[0.1, 0.1], [-0.2, 0.3], [0.4, -0.4]])
    model = PoincareKMeans(3, random_state=0).fit(y)
    assert sorted(model.labels_.tolist()) == [0, 1, 2] and model.inertia_ == 0.0


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: PoincareKMeans(8).fit(np.zeros((3, 2))),
            r"^n_samples=3 should be >= n_clusters=8$",
        ),
        (
            lambda: PoincareKMeans(2).fit(np.array([[0.1, np.nan], [0.2, 0.1], [0.0, 0.0]])),
            "1 non-finite",
        ),
        (
            lambda: PoincareKMeans(2).fit(np.array([[0.1, 0.2], [1.0, 0.0], [0.0, 2.0]])),
            "has 2 of 3 points outside",
        ),
        (lambda: PoincareKMeans(2, c=4.0).fit(np.array([[0.1, 0.2], [0.6, 0.0]])), "curvature -4"),
        (lambda: PoincareKMeans(2).fit(np.zeros(5)), "2D array"),
        (lambda: PoincareKMeans(2).fit(np.array([["a", "b"], ["c", "d"]])), "numeric"),
        (lambda: PoincareKMeans(0).fit(np.zeros((3, 2))), "n_clusters=0"),
        (lambda: PoincareKMeans(2, n_init=0).fit(np.zeros((3, 2))), "n_init=0"),
        (lambda: PoincareKMeans(2, c=-1).fit(np.zeros((3, 2))), "c=-1"),
        (lambda: PoincareKMeans(2, tol=-1.0).fit(np.zeros((3, 2))), "tol=-1.0"),
        (lambda: PoincareKMeans(3, fit_samples=2).fit(np.zeros((5, 2))), "fit_samples=2"),
        (lambda: PoincareKMeans(2, random_state="x").fit(np.zeros((3, 2))), "random_state"),
        (lambda: PoincareKMeans(2, select="best").fit(np.zeros((3, 2))), "select='best'"),
    ],
)
def test_bad_inputs_one_line_errors(make, match):
    with pytest.raises(BadInputError, match=match) as info:
        make()
    assert "\n" not in str(info.value)


def test_unfitted_predict_and_feature_mismatch():
    with pytest.raises(NotFittedError, match="not fitted") as info:
        PoincareKMeans(2).predict(np.zeros((3, 2)))
    assert isinstance(info.value, HypsegError) and "\n" not in str(info.value)
    model = PoincareKMeans(2, random_state=0).fit(np.array([[0.1, 0.0], [-0.1, 0.0], [0.0, 0.5]]))
    with pytest.raises(BadInputError, match="3 features"):
        model.predict(np.zeros((2, 3)))


def test_init_stores_hyperparameters_only():
    model = PoincareKMeans(3, n_init=2, random_state=5, c=0.5, fit_samples=10, frechet_iters=2)
    assert vars(model) == {
        "n_clusters": 3,
        "n_init": 2,
        "max_iter": 100,
        "tol": 1e-6,
        "random_state": 5,
        "c": 0.5,
        "fit_samples": 10,
        "frechet_iters": 2,
        "device": None,
        "select": "inertia",
    }
    assert not hasattr(model, "labels_")


def test_more_frechet_iters_and_max_iter_one_still_give_frechet_means():
    rng = np.random.default_rng(15)
    x, _ = _blobs(rng, 4, 80, radius=2.0)
    for kw in ({"frechet_iters": 4}, {"max_iter": 1}):
        model = PoincareKMeans(4, random_state=0, **kw).fit(x)
        for j in range(4):
            assert (
                _ref_dist(model.cluster_centers_[j], frechet_mean(x[model.labels_ == j]), 1.0)
                < 1e-9
            )


def test_argmin_small_and_large_paths_agree_with_first_index_ties():
    rng = np.random.default_rng(16)
    for m in (50, 20_000):  # 8 * m below / above the small-reduction threshold
        s = torch.tensor(rng.integers(0, 4, size=(8, m)).astype(np.float64))  # many ties
        vals, idx = km_mod._argmin0(s)
        ref = s.numpy().argmin(0)  # numpy: first occurrence
        np.testing.assert_array_equal(idx.numpy(), ref)
        np.testing.assert_array_equal(vals.numpy(), s.numpy().min(0))


def test_equal_centres_tie_to_the_lowest_index_wherever_the_point_sits():
    """k above the number of distinct points leaves equal centres; the expanded scores of
    equal centres rounded differently from column to column, so one point went to either
    copy depending on its place in the chunk (review: labels 4 4 ... 2 2 for one point)."""
    x = np.array([[0.1, 0.0], [0.5, 0.0], [-0.4, 0.2]] * 10)
    with pytest.warns(ConvergenceWarning, match=r"distinct clusters \(3\)"):
        km = PoincareKMeans(5, random_state=0).fit(x)
    centers = km.cluster_centers_
    first = {}
    for j, row in enumerate(map(tuple, centers)):
        first.setdefault(row, j)
    assert len(first) == 3  # two centres repeat
    want = [first[tuple(centers[j])] for j in km.labels_]
    np.testing.assert_array_equal(km.labels_, want)
    for n in (1, 40, 1000):
        for point in x[:3]:
            labels = km.predict(np.repeat(point[None], n, 0))
            assert set(labels.tolist()) == {first[tuple(centers[labels[0]])]}
            assert labels[0] == first[tuple(centers[labels[0]])]


def _rim_clusters(rng, k: int, r0: float, c: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """k centres at radius ~r0/√c in directions a few (1 − r0) apart, and n float32 points
    around them (spread 0.3 (1 − r0)): tight clusters where the expanded float32 score cancels."""
    gap = 1.0 - r0
    angles = rng.uniform(-gap, gap, k)
    radii = r0 + gap * rng.uniform(-0.5, 0.5, k)
    centers = np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
    x = centers[rng.integers(0, k, n)] + rng.normal(0, 0.3 * gap, (n, 2))
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.where(norm > 1 - gap / 20, x / norm * (1 - gap / 20), x)
    return centers / np.sqrt(c), (x / np.sqrt(c)).astype(np.float32)


@pytest.mark.parametrize("r0,c", [(0.99, 1.0), (0.999, 1.0), (0.9999, 1.0), (0.999, 4.0)])
def test_float32_assignment_near_the_rim_matches_float64_distances(r0, c):
    """Tight clusters near the rim: float32 expanded scores misassigned 1-70% of the points
    (review: 72 of 60 000; 0.05-73% here); the points the error bound cannot settle are redone exactly."""
    rng = np.random.default_rng(int(r0 * 1e4) + int(c))
    centers, x = _rim_clusters(rng, 4, r0, c, 20_000)
    dist = _ref_dist(x.astype(np.float64)[:, None, :], centers[None], c)
    ref = dist.argmin(1)
    top2 = np.sort(dist, 1)[:, :2]
    clear = top2[:, 1] - top2[:, 0] > 1e-9 * top2[:, 1]
    assert clear.mean() > 0.99
    km = PoincareKMeans(4, c=c)
    km.cluster_centers_ = centers
    for data in (x, x.astype(np.float64), torch.from_numpy(x)):
        labels = km.predict(data)
        np.testing.assert_array_equal(labels[clear], ref[clear])
    # and through fit: labels_ are the nearest of the fitted centres
    fitted = PoincareKMeans(4, c=c, random_state=0).fit(x)
    dist = _ref_dist(x.astype(np.float64)[:, None, :], fitted.cluster_centers_[None], c)
    top2 = np.sort(dist, 1)[:, :2]
    clear = top2[:, 1] - top2[:, 0] > 1e-9 * top2[:, 1]
    np.testing.assert_array_equal(fitted.labels_[clear], dist.argmin(1)[clear])


def test_centres_equal_only_in_float32_are_told_apart():
    """Two centres 1e-12 apart are one float32 centre: float32 scores would send every
    point to the first; the assignment then runs in float64."""
    centers = np.array([[0.3, 0.1], [0.3 + 1e-12, 0.1], [-0.5, 0.2]])
    assert np.float32(centers[0, 0]) == np.float32(centers[1, 0])
    x = np.array([[0.2, 0.1], [0.4, 0.1], [-0.4, 0.2], [0.31, 0.05]], dtype=np.float32)
    km = PoincareKMeans(3)
    km.cluster_centers_ = centers
    ref = _ref_dist(x.astype(np.float64)[:, None, :], centers[None], 1.0).argmin(1)
    np.testing.assert_array_equal(ref, [0, 1, 2, 1])
    np.testing.assert_array_equal(km.predict(x), ref)


def test_predict_refuses_centres_set_from_elsewhere_that_are_not_ball_points():
    """NaN centres gave out-of-range labels (2 for k = 2) or 0 depending on n; a centre
    outside the ball was silently never chosen."""
    for centres, message in [
        ([[np.nan, 0.0], [0.0, 0.0]], "non-finite"),
        ([[1.5, 0.0], [0.0, 0.0]], "outside the Poincaré ball"),
    ]:
        km = PoincareKMeans(2)
        km.cluster_centers_ = np.array(centres)
        with pytest.raises(BadInputError, match=message):
            km.predict(np.zeros((10, 2)))
