"""Tests for hypsegcli.geometry: identities over many seeds in float32 and
float64, references computed independently in numpy float64 / scipy, numerical
quadrature of the wrapped normal, finite gradients from 1e-15 to the ball edge."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mpref import mp_sample_dist0
from scipy import optimize

from hypsegcli import geometry as g

DTYPES = [torch.float32, torch.float64]
CURVATURES = [1.0, 0.5, 2.3]
SEEDS = range(8)
# (rtol, atol) per dtype for identities whose conditioning is O(1)
TOL = {torch.float32: (2e-4, 2e-5), torch.float64: (1e-10, 1e-12)}
# geoopt's projection margin: the farthest a point sits, as a fraction of 1/sqrt(c)
EDGE = {torch.float32: 1 - 4e-3, torch.float64: 1 - 1e-5}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ball_points(n, d, c, dtype, seed, max_frac=0.95):
    """Points spread over the ball, radii up to max_frac / sqrt(c)."""
    gen = _gen(seed)
    direction = torch.randn(n, d, generator=gen, dtype=torch.float64)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    radius = torch.rand(n, 1, generator=gen, dtype=torch.float64) * max_frac / math.sqrt(c)
    return (direction * radius).to(dtype)


def _close(actual, expected, dtype, scale=1.0):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(
        actual, expected.to(actual.dtype), rtol=rtol * scale, atol=atol * scale
    )


# ---------------------------------------------------------------- numpy refs
def np_mobius_add(x, y, c):
    """METHOD.md: ((1 + 2c<x,y> + c|y|^2) x + (1 - c|x|^2) y) / (1 + 2c<x,y> + c^2|x|^2|y|^2)."""
    xy = np.sum(x * y, -1, keepdims=True)
    x2 = np.sum(x * x, -1, keepdims=True)
    y2 = np.sum(y * y, -1, keepdims=True)
    num = (1 + 2 * c * xy + c * y2) * x + (1 - c * x2) * y
    return num / (1 + 2 * c * xy + c**2 * x2 * y2)


def np_dist(x, y, c):
    w = np_mobius_add(-x, y, c)
    return 2 / np.sqrt(c) * np.arctanh(np.sqrt(c) * np.linalg.norm(w, axis=-1))


def np_gyroplane_method(z, p, a, c):
    """METHOD.md's formula verbatim, via w = (-p) ⊕ z."""
    w = np_mobius_add(-p, z, c)
    wa = np.sum(w * a, -1)
    a_norm = np.linalg.norm(a, axis=-1)
    lam_p = 2 / (1 - c * np.sum(p * p, -1))
    inner = 2 * np.sqrt(c) * np.abs(wa) / ((1 - c * np.sum(w * w, -1)) * a_norm)
    return np.sign(wa) * lam_p * a_norm / np.sqrt(c) * np.arcsinh(inner)


# ---------------------------------------------------------------- basics
def test_ball_has_curvature_minus_c():
    m = g.ball(2.5)
    assert isinstance(m, g.geoopt.PoincareBall)
    assert float(m.k) == pytest.approx(-2.5)
    x = torch.tensor([0.3, -0.2], dtype=torch.float64)
    y = torch.tensor([-0.1, 0.25], dtype=torch.float64)
    torch.testing.assert_close(m.dist(x, y), g.dist(x, y, c=2.5))
    param = g.geoopt.ManifoldParameter(torch.zeros(3, 2), manifold=g.ball(1.0))
    assert param.manifold is not None
    with pytest.raises(ValueError, match="c=0"):
        g.ball(0)


@pytest.mark.parametrize("c", CURVATURES)
def test_mobius_add_matches_numpy_formula(c):
    for seed in SEEDS:
        x = _ball_points(50, 3, c, torch.float64, seed)
        y = _ball_points(50, 3, c, torch.float64, seed + 100)
        expected = np_mobius_add(x.numpy(), y.numpy(), c)
        np.testing.assert_allclose(
            g.mobius_add(x, y, c=c).numpy(), expected, rtol=1e-12, atol=1e-14
        )
        # left cancellation (-x) ⊕ (x ⊕ y) = y
        back = g.mobius_add(-x, g.mobius_add(x, y, c=c), c=c)
        torch.testing.assert_close(back, y, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("c", CURVATURES)
def test_dist_lambda_match_numpy(c):
    x = _ball_points(200, 2, c, torch.float64, 1)
    y = _ball_points(200, 2, c, torch.float64, 2)
    np.testing.assert_allclose(
        g.dist(x, y, c=c).numpy(), np_dist(x.numpy(), y.numpy(), c), rtol=1e-10
    )
    lam = 2 / (1 - c * (x.numpy() ** 2).sum(-1))
    np.testing.assert_allclose(g.lambda_x(x, c=c).numpy(), lam, rtol=1e-12)
    assert g.lambda_x(x, c=c, keepdim=True).shape == (200, 1)
    assert g.dist(x, y, c=c, keepdim=True).shape == (200, 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", CURVATURES)
def test_exp_log_roundtrip_at_origin(dtype, c):
    for seed in SEEDS:
        gen = _gen(seed)
        # tangent norms up to 3/sqrt(c): expmap0 stays well inside float32's ball
        u = torch.randn(64, 3, generator=gen, dtype=dtype)
        u = (
            u
            / u.norm(dim=-1, keepdim=True)
            * torch.rand(64, 1, generator=gen, dtype=dtype)
            * 3
            / math.sqrt(c)
        )
        x = g.expmap0(u, c=c)
        assert (x.norm(dim=-1) * math.sqrt(c) < 1).all()
        _close(g.logmap0(x, c=c), u, dtype, scale=10 if dtype == torch.float32 else 1)
        x2 = _ball_points(64, 3, c, dtype, seed, max_frac=0.9)
        _close(g.expmap0(g.logmap0(x2, c=c), c=c), x2, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", CURVATURES)
def test_exp_log_roundtrip_at_points(dtype, c):
    for seed in SEEDS:
        x = _ball_points(64, 2, c, dtype, seed, max_frac=0.7)
        gen = _gen(seed + 1000)
        # tangent vectors with Riemannian norm lambda_x ‖u‖ up to ~3/sqrt(c)
        u = (
            torch.randn(64, 2, generator=gen, dtype=dtype)
            / g.lambda_x(x, c=c, keepdim=True)
            / math.sqrt(c)
        )
        y = g.expmap(x, u, c=c)
        scale = 50 if dtype == torch.float32 else 100
        _close(g.logmap(x, y, c=c), u, dtype, scale=scale)
        # d(x, exp_x(u)) = lambda_x ‖u‖
        _close(g.dist(x, y, c=c), g.lambda_x(x, c=c) * u.norm(dim=-1), dtype, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", CURVATURES)
def test_logmap0_norm_is_half_dist0(dtype, c):
    for seed in SEEDS:
        x = _ball_points(64, 3, c, dtype, seed, max_frac=0.99)
        d0 = g.dist0(x, c=c)
        _close(2 * g.logmap0(x, c=c).norm(dim=-1), d0, dtype, scale=10)
        _close(g.dist(torch.zeros_like(x), x, c=c), d0, dtype, scale=10)
        assert g.dist0(x, c=c, keepdim=True).shape == (64, 1)


def test_project_keeps_points_inside():
    for dtype in DTYPES:
        for c in CURVATURES:
            x = torch.tensor([[10.0, 0.0], [0.1, 0.1]], dtype=dtype)
            y = g.project(x, c=c)
            assert (y.norm(dim=-1) * math.sqrt(c) <= EDGE[dtype] + 1e-7).all()
            torch.testing.assert_close(y[1], x[1])


# ---------------------------------------------------------------- gyroplane
@pytest.mark.parametrize("c", CURVATURES)
def test_gyroplane_matches_method_formula_and_geoopt(c):
    z = _ball_points(300, 3, c, torch.float64, 3, max_frac=0.99)
    p = _ball_points(300, 3, c, torch.float64, 4, max_frac=0.9)
    a = torch.randn(300, 3, generator=_gen(5), dtype=torch.float64)
    f = g.gyroplane(z, p, a, c=c)
    expected = np_gyroplane_method(z.numpy(), p.numpy(), a.numpy(), c)
    np.testing.assert_allclose(f.numpy(), expected, rtol=1e-8, atol=1e-10)
    # geoopt's dist2plane(signed, scaled) scales by ‖a‖ only: f = lambda_p · dist2plane
    k = torch.tensor(-c, dtype=torch.float64)
    d2p = g._gm.dist2plane(z, p, a, k=k, signed=True, scaled=True)
    torch.testing.assert_close(f, g.lambda_x(p, c=c) * d2p, rtol=1e-8, atol=1e-10)


def test_gyroplane_broadcasts():
    z = _ball_points(5, 2, 1.0, torch.float64, 0)[:, None, :]  # (5, 1, 2)
    p = _ball_points(4, 2, 1.0, torch.float64, 1)  # (4, 2)
    a = torch.randn(4, 2, dtype=torch.float64, generator=_gen(2))
    f = g.gyroplane(z, p, a, c=1.0)
    assert f.shape == (5, 4)
    torch.testing.assert_close(f[2, 3], g.gyroplane(z[2, 0], p[3], a[3], c=1.0))


def _min_dist_to_gyroplane(z, p, a, c):
    """Minimise d(z, w) over w = p ⊕ y, y ⊥ a (every point of H_{a,p}), y = exp_0(t)."""
    d = z.shape[0]
    # orthonormal basis of a-perp
    q, _ = np.linalg.qr(np.column_stack([a, np.eye(d)]))
    basis = q[:, 1:d]

    def y_of(t):
        u = basis @ t
        n = np.linalg.norm(u)
        if n < 1e-300:
            return u
        return np.tanh(np.sqrt(c) * n) * u / (np.sqrt(c) * n)

    def objective(t):
        return np_dist(z, np_mobius_add(p, y_of(t), c), c)

    best = math.inf
    for start in range(4):
        t0 = np.random.default_rng(start).normal(size=d - 1) * (0 if start == 0 else 1.0)
        # start from the projection of (-p) ⊕ z onto a-perp
        if start == 0:
            w = np_mobius_add(-p, z, c)
            w_perp = basis.T @ w
            n = np.linalg.norm(w_perp)
            t0 = w_perp / max(n, 1e-12) * np.arctanh(min(np.sqrt(c) * n, 0.999)) / np.sqrt(c)
        res = optimize.minimize(
            objective,
            t0,
            method="Nelder-Mead",
            options=dict(xatol=1e-12, fatol=1e-14, maxiter=20000),
        )
        best = min(best, res.fun)
    return best


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("c", [1.0, 0.5, 2.3])
def test_gyroplane_distance_matches_direct_minimisation(d, c):
    rng = np.random.default_rng(int(10 * c) + d)
    for _ in range(4):

        def point(max_frac):
            v = rng.normal(size=d)
            return v / np.linalg.norm(v) * rng.uniform(0, max_frac) / np.sqrt(c)

        z, p, a = point(0.9), point(0.7), rng.normal(size=d)
        f = g.gyroplane(torch.tensor(z), torch.tensor(p), torch.tensor(a), c=c).item()
        lam_p = 2 / (1 - c * p @ p)
        distance = abs(f) / (lam_p * np.linalg.norm(a))
        assert distance == pytest.approx(_min_dist_to_gyroplane(z, p, a, c), rel=1e-7, abs=1e-9)
        side = np.sign(np_mobius_add(-p, z, c) @ a)
        assert np.sign(f) == side


# ---------------------------------------------------------------- wrapped normal
def test_log_sinhc_reference():
    import mpmath

    xs = torch.cat(
        [
            torch.tensor([0.0, 1e-15, 1e-8]),
            torch.logspace(-4, 2.5, 300, dtype=torch.float64),
            torch.tensor([0.1 - 1e-12, 0.1, 0.1 + 1e-12], dtype=torch.float64),
        ]
    )
    with mpmath.workdps(40):
        ref = [
            float(mpmath.log(mpmath.sinh(mpmath.mpf(float(x))) / mpmath.mpf(float(x))))
            if x > 0
            else 0.0
            for x in xs
        ]
    torch.testing.assert_close(
        g.log_sinhc(xs.to(torch.float64)),
        torch.tensor(ref, dtype=torch.float64),
        rtol=1e-12,
        atol=1e-15,
    )
    torch.testing.assert_close(
        g.log_sinhc(xs.float()), torch.tensor(ref, dtype=torch.float32), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", CURVATURES)
def test_wrapped_normal_sample_distance_and_inverse(dtype, c):
    for seed in SEEDS:
        loc = _ball_points(16, 2, c, dtype, seed, max_frac=0.8)
        scale = (torch.rand(16, 2, generator=_gen(seed), dtype=dtype) * 0.8 + 0.05) / math.sqrt(c)
        wn = g.WrappedNormal(loc, scale, c=c)
        z, v = wn.rsample_tangent((5,), generator=_gen(seed + 1))
        assert z.shape == v.shape == (5, 16, 2)
        scale_tol = 20 if dtype == torch.float32 else 100
        _close(g.dist(loc, z, c=c), v.norm(dim=-1), dtype, scale=scale_tol)
        _close(wn.to_tangent(z), v, dtype, scale=scale_tol)
        # v = lambda_mu log_mu(z)
        _close(
            g.lambda_x(loc, c=c, keepdim=True) * g.logmap(loc, z, c=c), v, dtype, scale=scale_tol
        )
        assert wn.log_prob(z).shape == (5, 16)
        # the same generator state gives the same sample
        z2 = wn.rsample((5,), generator=_gen(seed + 1))
        torch.testing.assert_close(z2, z)


@pytest.mark.parametrize("c", CURVATURES)
def test_wrapped_normal_closed_form_is_transport_then_exp(c):
    """z = mu ⊕ (tanh(√c‖v‖/2) v/(√c‖v‖)) equals exp_mu(PT_{0→mu}(v/lambda_0)), lambda_0 = 2."""
    k = torch.tensor(-c, dtype=torch.float64)
    for seed in SEEDS:
        loc = _ball_points(32, 3, c, torch.float64, seed, max_frac=0.9)
        scale = torch.full((32, 3), 0.7, dtype=torch.float64)
        z, v = g.WrappedNormal(loc, scale, c=c).rsample_tangent(generator=_gen(seed))
        u = g._gm.parallel_transport0(loc, v / 2, k=k)  # geoopt: (0 -> loc)
        expected = g._gm.expmap(loc, u, k=k)
        torch.testing.assert_close(z, expected, rtol=1e-10, atol=1e-12)
        sqrt_c = math.sqrt(c)
        vn = v.norm(dim=-1, keepdim=True)
        closed = g.mobius_add(loc, torch.tanh(sqrt_c * vn / 2) * v / (sqrt_c * vn), c=c)
        torch.testing.assert_close(z, closed, rtol=1e-10, atol=1e-12)


def _polar_grid(c, s_max, n_s=200, n_theta=384):
    """Gauss-Legendre in geodesic radius s around the origin, trapezoid in angle.

    z = tanh(√c s/2)/√c (cos θ, sin θ); Riemannian area element sinh(√c s)/√c ds dθ.
    """
    nodes, weights = np.polynomial.legendre.leggauss(n_s)
    s = 0.5 * s_max * (nodes + 1)
    ws = 0.5 * s_max * weights
    theta = np.arange(n_theta) * 2 * np.pi / n_theta
    wt = np.full(n_theta, 2 * np.pi / n_theta)
    S, T = np.meshgrid(s, theta, indexing="ij")
    rho = np.tanh(np.sqrt(c) * S / 2) / np.sqrt(c)
    z = np.stack([rho * np.cos(T), rho * np.sin(T)], -1)
    w = ws[:, None] * wt[None, :] * np.sinh(np.sqrt(c) * S) / np.sqrt(c)
    return torch.tensor(z), torch.tensor(w)


CASES = [  # (loc, scale, c)
    ((0.0, 0.0), (1.0, 1.0), 1.0),
    ((0.5, -0.3), (0.3, 0.6), 1.0),
    ((0.8, 0.1), (0.25, 0.25), 1.0),
    ((0.3, 0.4), (0.5, 0.2), 2.3),
    ((-0.9, 0.6), (0.8, 0.4), 0.5),
]


@pytest.mark.parametrize("loc,scale,c", CASES)
def test_wrapped_normal_density_integrates_to_one(loc, scale, c):
    loc_t = torch.tensor(loc, dtype=torch.float64)
    scale_t = torch.tensor(scale, dtype=torch.float64)
    wn = g.WrappedNormal(loc_t, scale_t, c=c)
    s_max = g.dist0(loc_t, c=c).item() + 12 * max(scale)
    z, w = _polar_grid(c, s_max)
    density = wn.log_prob(z).exp()
    total = (density * w).sum().item()
    assert total == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("loc,scale,c", CASES[1:4])
def test_wrapped_normal_samples_follow_density(loc, scale, c):
    """Monte Carlo moments of rsample match quadrature moments of exp(log_prob)."""
    loc_t = torch.tensor(loc, dtype=torch.float64)
    scale_t = torch.tensor(scale, dtype=torch.float64)
    wn = g.WrappedNormal(loc_t, scale_t, c=c)
    samples = wn.sample((100_000,), generator=_gen(0))
    z, w = _polar_grid(c, g.dist0(loc_t, c=c).item() + 12 * max(scale))
    pw = wn.log_prob(z).exp() * w
    feats = lambda x: torch.stack([x[..., 0], x[..., 1], (x * x).sum(-1)], -1)  # noqa: E731
    quad = (feats(z) * pw[..., None]).sum((0, 1))
    f = feats(samples)
    mc, se = f.mean(0), f.std(0) / math.sqrt(len(f))
    assert ((mc - quad).abs() < 5 * se + 1e-9).all(), (mc, quad, se)


def test_wrapped_normal_log_prob_float32_matches_float64():
    loc = _ball_points(32, 2, 1.0, torch.float64, 0, max_frac=0.8)
    scale = torch.rand(32, 2, generator=_gen(1), dtype=torch.float64) + 0.1
    z = g.WrappedNormal(loc, scale).sample((4,), generator=_gen(2))
    lp64 = g.WrappedNormal(loc, scale).log_prob(z)
    lp32 = g.WrappedNormal(loc.float(), scale.float()).log_prob(z.float())
    torch.testing.assert_close(lp32, lp64.float(), rtol=1e-3, atol=1e-3)


def test_wrapped_normal_log_prob_at_mean_is_gaussian_peak():
    for d in (2, 3):
        for dtype in DTYPES:
            loc = torch.full((d,), 0.2, dtype=dtype)
            scale = torch.full((d,), 0.5, dtype=dtype)
            lp = g.WrappedNormal(loc, scale, c=1.5).log_prob(loc)
            expected = -d * (math.log(0.5) + 0.5 * math.log(2 * math.pi))
            assert lp.item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- gradients
def _radii(dtype):
    edge = EDGE[dtype]
    return [1e-15, 1e-10, 1e-6, 1e-3, 0.1, 0.5, 0.9, 0.99, edge]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [1.0, 2.3])
def test_gradients_finite_from_tiny_to_edge(dtype, c):
    direction = torch.tensor([0.6, -0.8], dtype=dtype)
    other = torch.tensor([0.3, 0.1], dtype=dtype) / math.sqrt(c)
    p0 = torch.tensor([-0.2, 0.5], dtype=dtype) / math.sqrt(c)
    a0 = torch.tensor([1.5, -0.4], dtype=dtype)
    for r in _radii(dtype):
        x = (direction * r / math.sqrt(c)).requires_grad_()
        y = other.clone().requires_grad_()
        p = p0.clone().requires_grad_()
        a = a0.clone().requires_grad_()
        loc = other.clone().requires_grad_()
        scale = torch.tensor([0.4, 0.9], dtype=dtype, requires_grad=True)
        wn = g.WrappedNormal(loc, scale, c=c)
        outputs = {
            "dist": g.dist(x, y, c=c),
            "dist_self": g.dist(x, x.detach().clone(), c=c),
            "dist0": g.dist0(x, c=c),
            "expmap0": g.expmap0(x * 20, c=c).sum(),
            "logmap0": g.logmap0(x, c=c).sum(),
            "gyroplane": g.gyroplane(x, p, a, c=c),
            "gyroplane_tiny_a": g.gyroplane(x, p, a * 1e-15, c=c),
            "gyroplane_at_p": g.gyroplane(x, x, a, c=c),
            "log_prob": wn.log_prob(x),
            "log_prob_at_loc": g.WrappedNormal(x, scale, c=c).log_prob(x.detach().clone()),
        }
        for name, out in outputs.items():
            assert torch.isfinite(out).all(), (name, r, out)
            grads = torch.autograd.grad(out, [x, y, p, a, loc, scale], allow_unused=True)
            for grad in grads:
                if grad is not None:
                    assert torch.isfinite(grad).all(), (name, r, grads)


def test_rsample_gradients_finite_and_reparameterized():
    for dtype in DTYPES:
        loc = torch.tensor([[0.0, 0.0], [0.3, -0.5], [0.0, 1e-12]], dtype=dtype, requires_grad=True)
        scale = torch.tensor(
            [[1e-5, 1e-5], [0.5, 0.5], [2.0, 1.0]], dtype=dtype, requires_grad=True
        )
        wn = g.WrappedNormal(loc, scale)
        z = wn.rsample((7,), generator=_gen(0))
        loss = (
            z.sum()
            + wn.log_prob(z).sum()
            - g.WrappedNormal(torch.zeros_like(loc), torch.ones_like(scale)).log_prob(z).sum()
        )
        gl, gs = torch.autograd.grad(loss, [loc, scale])
        assert torch.isfinite(gl).all() and torch.isfinite(gs).all()
        assert gl.abs().sum() > 0 and gs.abs().sum() > 0


@pytest.mark.parametrize("c", CURVATURES)
def test_sample_dist0_matches_high_precision_far_beyond_the_ball(c):
    """The law of cosines gives d(0, z) of a wrapped-normal sample from loc and v, also where
    z itself is beyond float64's ball (d0 up to ~300/√c): 400-digit arithmetic is the
    reference."""
    rng = np.random.default_rng(int(c * 10))
    locs = _ball_points(24, 3, c, torch.float64, 1, max_frac=0.995)
    locs[0] = 0.0  # the origin: no direction
    cases, got_in = [], []
    for i, loc in enumerate(locs):
        direction = rng.normal(size=3)
        if i % 4 == 1:  # towards the origin: d0 far below a + r
            direction = -loc.numpy() + 1e-3 * direction
        length = [1e-3, 0.5, 3.0, 15.0, 40.0, 300.0][i % 6] / math.sqrt(c)
        v = torch.from_numpy(direction / np.linalg.norm(direction) * length)
        cases.append((loc, v))
        got_in.append(v)
    loc = torch.stack([a for a, _ in cases])
    v = torch.stack(got_in)
    got = g.sample_dist0(loc, v, c=c)
    want = torch.tensor([mp_sample_dist0(a, b, c) for a, b in cases], dtype=torch.float64)
    far = want * math.sqrt(c) > 1.0
    torch.testing.assert_close(got[far], want[far], rtol=1e-12, atol=0)
    torch.testing.assert_close(got[~far], want[~far], rtol=0, atol=1e-7)  # arcosh near 1
    # the ordinary path agrees where z is representable
    z = g.WrappedNormal(loc, torch.ones_like(loc), c=c)
    ok = want * math.sqrt(c) < 10
    drawn = g.mobius_add(loc, g.expmap0(v / 2, c=c), c=c)
    torch.testing.assert_close(g.dist0(drawn, c=c)[ok], want[ok], rtol=1e-9, atol=1e-9)
    assert z.log_prob_tangent(v).shape == (24,)
    # finite gradients everywhere, the origin and v = 0 included
    loc_g, v_g = loc.clone().requires_grad_(), v.clone().requires_grad_()
    v_g.data[2] = 0.0
    g.sample_dist0(loc_g, v_g, c=c).sum().backward()
    assert torch.isfinite(loc_g.grad).all() and torch.isfinite(v_g.grad).all()
