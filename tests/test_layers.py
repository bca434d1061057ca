"""Tests for hypsegcli.layers: the vectorised gyroplane convolution against a
slow explicit loop over positions and kernel offsets built on
geometry.gyroplane (itself checked against METHOD.md and scipy), gradcheck,
and the "transposed" decoder use."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from hypsegcli import geometry as g
from hypsegcli.layers import GyroplaneConv3d, GyroplaneLayer, gyroplane_conv3d

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ball_input(shape, c, seed, dtype=F64, spread=0.8):
    u = torch.randn(shape, generator=_gen(seed), dtype=dtype) * spread / math.sqrt(c)
    return g.expmap0(u, c=c)


def _out_size(spatial, ksize, stride, padding, dilation):
    return [
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(spatial, ksize, stride, padding, dilation, strict=True)
    ]


def _t3(v):
    return (v,) * 3 if isinstance(v, int) else tuple(v)


def slow_gyroconv(x, p, a, bias, *, c, stride, padding, dilation):
    """Eq. 7 literally: loop over output positions and kernel offsets."""
    stride, padding, dilation = _t3(stride), _t3(padding), _t3(dilation)
    n, c_in, *spatial, _ = x.shape
    c_out, _, *ksize, _ = p.shape
    out_size = _out_size(spatial, ksize, stride, padding, dilation)
    out = torch.zeros(n, c_out, *out_size, dtype=x.dtype)
    for r in itertools.product(*(range(m) for m in out_size)):
        for u in itertools.product(*(range(k) for k in ksize)):
            src = [r[i] * stride[i] + u[i] * dilation[i] - padding[i] for i in range(3)]
            if not all(0 <= src[i] < spatial[i] for i in range(3)):
                continue  # zero padding contributes nothing
            z = x[:, :, src[0], src[1], src[2]]  # (N, C_in, d)
            f = g.gyroplane(z[:, None], p[:, :, u[0], u[1], u[2]], a[:, :, u[0], u[1], u[2]], c=c)
            out[(slice(None), slice(None), *r)] += f.sum(-1)
    if bias is not None:
        out = out + bias.reshape(-1, 1, 1, 1)
    return out


def _random_layer(c_in, c_out, kernel, *, dim, c, seed, **kw):
    layer = GyroplaneConv3d(c_in, c_out, kernel, dim=dim, c=c, **kw).double()
    layer.reset_parameters(generator=_gen(seed))
    with torch.no_grad():  # spread the gyroplanes beyond the small initial offsets
        layer.p.copy_(_ball_input(layer.p.shape, c, seed + 1, spread=0.6))
        layer.a.mul_(5)
    return layer


# ---------------------------------------------------------------- GyroplaneLayer
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("c", [1.0, 0.4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gyroplane_layer_matches_geometry(dtype, c, seed):
    layer = GyroplaneLayer(3, 7, c=c).to(dtype)
    layer.reset_parameters(generator=_gen(seed + 100))
    with torch.no_grad():
        layer.p.copy_(_ball_input((7, 3), c, seed, dtype, spread=0.7))
    z = _ball_input((5, 4, 3), c, seed + 1, dtype, spread=1.0)
    out = layer(z)
    assert out.shape == (5, 4, 7)
    assert out.dtype == dtype
    # float64 reference from the same (rounded) inputs and parameters
    z64, p64, a64 = z.double(), layer.p.detach().double(), layer.a.detach().double()
    expected = g.gyroplane(z64[..., None, :], p64, a64, c=c)
    if dtype == F64:
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
        return
    # float32 error grows with the conditioning near the ball's edge: the lifted
    # dot product cancels terms of size λ_z·λ_p·s (measured over 4000 random
    # layers: at most 1.4 float32 epsilons times that size)
    lam_z = g.lambda_x(z64, c=c, keepdim=True)
    lam_p = g.lambda_x(p64, c=c)
    size = lam_z * lam_p * (lam_p * a64.norm(dim=-1) / math.sqrt(c))
    err = (out.double() - expected).abs()
    assert (err <= 8 * torch.finfo(torch.float32).eps * size).all(), (err / size).max()


def test_gyroplane_layer_parameters():
    layer = GyroplaneLayer(2, 300, c=2.0)
    assert isinstance(layer.p, g.geoopt.ManifoldParameter)
    assert float(layer.p.manifold.k) == pytest.approx(-2.0)
    assert layer.p.shape == layer.a.shape == (300, 2)
    assert (layer.p.norm(dim=-1) * math.sqrt(2.0) < 0.5).all()  # near the origin
    assert layer.a.abs().max() <= 1 / math.sqrt(2)
    with pytest.raises(ValueError, match="dim=2"):
        layer(torch.zeros(4, 3))


# ---------------------------------------------------------------- GyroplaneConv3d
@pytest.mark.parametrize("c", [1.0, 0.3])
def test_gyroplane_through_the_origin_is_linear_in_log0_along_its_normal(c):
    """With p = 0, f_a(t â) = 4‖a‖ artanh(√c t)/√c = 4‖a‖ ‖log_0(t â)‖ (and odd in t):
    why a gyroplane layer that starts near the origin acts like a linear layer on
    log_0(z) (benchmarks/gyroplane_linearity.py)."""
    layer = GyroplaneLayer(3, 5, c=c, p_init_std=0.0).double()
    gen = _gen(7)
    with torch.no_grad():
        layer.a.copy_(torch.randn(5, 3, generator=gen, dtype=torch.float64))
    a = layer.a.detach()
    a_norm = a.norm(dim=1)
    t = torch.linspace(-0.95, 0.95, 11, dtype=torch.float64) / math.sqrt(c)
    for j in range(5):
        z = t[:, None] * (a[j] / a_norm[j])
        got = layer(z)[:, j]
        log_norm = g.logmap0(z, c=c).norm(dim=1) * torch.sign(t)
        torch.testing.assert_close(got, 4 * a_norm[j] * log_norm, rtol=1e-9, atol=1e-12)
        want = 4 * a_norm[j] * torch.atanh(math.sqrt(c) * t) / math.sqrt(c)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_kernel1_equals_pointwise_layer_summed_over_in_channels():
    c = 0.7
    conv = _random_layer(3, 5, 1, dim=2, c=c, seed=0)
    x = _ball_input((2, 3, 4, 3, 5, 2), c, 1)
    out = conv(x)
    assert out.shape == (2, 5, 4, 3, 5)
    expected = conv.bias.reshape(1, 5, 1, 1, 1).expand(2, 5, 4, 3, 5).clone()
    for i in range(3):
        point = GyroplaneLayer(2, 5, c=c).double()
        with torch.no_grad():
            point.p.copy_(conv.p[:, i, 0, 0, 0])
            point.a.copy_(conv.a[:, i, 0, 0, 0])
        expected += point(x[:, i]).permute(0, 4, 1, 2, 3)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


CONFIGS = [  # (input shape, C_out, kernel, stride, padding, dilation, c)
    ((2, 1, 5, 5, 5, 2), 3, 3, 1, 0, 1, 1.0),
    ((2, 2, 5, 4, 3, 2), 3, 3, 1, 1, 1, 1.0),
    ((1, 2, 6, 5, 4, 3), 2, 2, 1, 0, 1, 0.5),
    ((2, 1, 4, 5, 6, 2), 2, 2, 2, 1, 1, 1.0),
    ((1, 3, 7, 6, 5, 2), 2, (3, 2, 1), (2, 1, 3), (1, 0, 2), (1, 2, 1), 2.0),
    ((2, 2, 4, 5, 3, 2), 3, 4, 1, 2, 1, 1.0),
    ((1, 1, 7, 7, 7, 2), 2, 3, 2, 3, 2, 1.0),
    ((2, 1, 3, 2, 4, 2), 2, 5, 1, 2, 1, 1.0),
]


@pytest.mark.parametrize("shape,c_out,kernel,stride,padding,dilation,c", CONFIGS)
def test_matches_slow_loop(shape, c_out, kernel, stride, padding, dilation, c):
    conv = _random_layer(
        shape[1],
        c_out,
        kernel,
        dim=shape[-1],
        c=c,
        seed=sum(shape),
        stride=stride,
        padding=padding,
        dilation=dilation,
    )
    x = _ball_input(shape, c, 3)
    out = conv(x)
    expected = slow_gyroconv(
        x, conv.p, conv.a, conv.bias, c=c, stride=stride, padding=padding, dilation=dilation
    )
    # same output size as nn.Conv3d
    ref_shape = torch.nn.functional.conv3d(
        torch.zeros(shape[:-1]),
        torch.zeros(c_out, shape[1], *_t3(kernel)),
        stride=stride,
        padding=padding,
        dilation=dilation,
    ).shape
    assert out.shape == expected.shape == ref_shape
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # blocked evaluation (blocks of one sample, and of a third of the pair slots
    # of one sample, checkpointed under autograd) gives the same values and gradients
    x1 = x.clone().requires_grad_()
    kw = dict(c=c, stride=stride, padding=padding, dilation=dilation)
    full = gyroplane_conv3d(x1, conv.p, conv.a, conv.bias, **kw)
    weights = torch.randn(full.shape, generator=_gen(9), dtype=F64)
    grads_full = torch.autograd.grad((full * weights).sum(), [x1, conv.p, conv.a])
    per_sample = conv.p[..., 0].numel() * math.prod(full.shape[2:])
    for chunk in (per_sample, max(1, per_sample // 3)):
        x2 = x.clone().requires_grad_()
        blocked = gyroplane_conv3d(x2, conv.p, conv.a, conv.bias, chunk_elements=chunk, **kw)
        torch.testing.assert_close(blocked, full, rtol=1e-12, atol=1e-12)
        grads_blocked = torch.autograd.grad((blocked * weights).sum(), [x2, conv.p, conv.a])
        for gf, gb in zip(grads_full, grads_blocked, strict=True):
            torch.testing.assert_close(gb, gf, rtol=1e-10, atol=1e-12)


def test_float32_matches_float64():
    conv = _random_layer(2, 4, 3, dim=2, c=1.0, seed=5, padding=1)
    x = _ball_input((2, 2, 4, 4, 4, 2), 1.0, 6)
    x32 = x.float()
    out32 = conv.float()(x32)
    assert isinstance(conv.p, g.geoopt.ManifoldParameter) and conv.p.dtype == torch.float32
    assert out32.dtype == torch.float32
    # float64 reference from the same (rounded) inputs and parameters
    p64, a64 = conv.p.detach().double(), conv.a.detach().double()
    expected = gyroplane_conv3d(
        x32.double(), p64, a64, conv.bias.detach().double(), c=1.0, padding=1
    )
    # float32 error grows with the conditioning near the ball's edge: each pair's
    # term cancels parts of size lambda_x * lambda_p^2 * |a| (as in the gyroplane layer
    # test); summed over the kernel, with the padding at the origin (lambda = 2).
    # Measured over 200 random layers and inputs: at most 0.73 float32 epsilons
    # times that size (a fixed 1e-4 tolerance failed on an AVX2 machine: 4.1e-4).
    lam_x = g.lambda_x(x32.double(), c=1.0)
    lam_p = g.lambda_x(p64, c=1.0)
    size = F.conv3d(F.pad(lam_x, (1,) * 6, value=2.0), lam_p * lam_p * a64.norm(dim=-1))
    err = (out32.detach().double() - expected).abs()
    assert (err <= 2 * torch.finfo(torch.float32).eps * size).all(), (err / size).max()


def test_padding_only_receptive_field_gives_bias():
    conv = _random_layer(1, 3, 1, dim=2, c=1.0, seed=2, padding=1)
    out = conv(_ball_input((1, 1, 2, 2, 2, 2), 1.0, 0))
    assert out.shape == (1, 3, 4, 4, 4)
    border = torch.ones(4, 4, 4, dtype=torch.bool)
    border[1:3, 1:3, 1:3] = False
    torch.testing.assert_close(out[0][:, border], conv.bias[:, None].expand(3, int(border.sum())))


@pytest.mark.parametrize("kernel", [2, 3])
def test_transposed_use_on_a_single_latent(kernel):
    """1x1x1 input, kernel k, padding k-1 -> k^3 outputs, each through its own offset."""
    c = 1.0
    conv = _random_layer(1, 6, kernel, dim=2, c=c, seed=kernel, padding=kernel - 1)
    z = _ball_input((5, 2), c, 4)
    out = conv(z.view(5, 1, 1, 1, 1, 2))
    assert out.shape == (5, 6, kernel, kernel, kernel)
    for r in itertools.product(range(kernel), repeat=3):
        u = [kernel - 1 - ri for ri in r]  # input index r + u - (k - 1) = 0
        expected = (
            g.gyroplane(
                z[:, None], conv.p[:, 0, u[0], u[1], u[2]], conv.a[:, 0, u[0], u[1], u[2]], c=c
            )
            + conv.bias
        )
        torch.testing.assert_close(
            out[(slice(None), slice(None), *r)], expected, rtol=1e-10, atol=1e-12
        )
    # every offset is used by exactly one output position: gradients reach all of a
    out.sum().backward()
    assert (conv.a.grad.abs().sum(-1) > 0).all()


def test_gradcheck_input_p_a_bias():
    c = 0.8
    x = _ball_input((1, 2, 3, 2, 3, 2), c, 7, spread=0.6).requires_grad_()
    p = _ball_input((2, 2, 2, 2, 1, 2), c, 8, spread=0.5).requires_grad_()
    a = torch.randn(2, 2, 2, 2, 1, 2, generator=_gen(9), dtype=F64).requires_grad_()
    bias = torch.randn(2, generator=_gen(10), dtype=F64).requires_grad_()
    for kw in (
        dict(padding=1, stride=(2, 1, 1)),
        dict(padding=(0, 1, 1), dilation=(1, 1, 2), chunk_elements=40),
    ):
        assert torch.autograd.gradcheck(
            lambda x, p, a, b, kw=kw: gyroplane_conv3d(x, p, a, b, c=c, **kw), (x, p, a, bias)
        )


def test_gradients_finite_near_origin_and_edge():
    for dtype, edge in ((torch.float32, 1 - 4e-3), (F64, 1 - 1e-5)):
        conv = GyroplaneConv3d(1, 3, 2, dim=2, padding=1).to(dtype)
        for r in (0.0, 1e-15, 1e-6, 0.5, edge):
            x = (torch.tensor([0.6, 0.8], dtype=dtype) * r).view(1, 1, 1, 1, 1, 2).requires_grad_()
            out = conv(x)
            grads = torch.autograd.grad(out.sum(), [x, conv.p, conv.a, conv.bias])
            assert torch.isfinite(out).all() and all(torch.isfinite(gr).all() for gr in grads)


def test_riemannian_adam_keeps_p_on_ball():
    conv = GyroplaneConv3d(1, 4, 2, dim=2, padding=1, c=1.5)
    conv.reset_parameters(generator=_gen(0))
    opt = g.geoopt.optim.RiemannianAdam(conv.parameters(), lr=0.1)
    x = _ball_input((8, 1, 1, 1, 1, 2), 1.5, 0, dtype=torch.float32)
    target = torch.randn(8, 4, 2, 2, 2, generator=_gen(1))
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = (conv(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert (conv.p.norm(dim=-1) * math.sqrt(1.5) < 1).all()
    assert losses[-1] < 0.8 * losses[0]


def test_init_and_validation():
    conv = GyroplaneConv3d(2, 4, (3, 2, 1), dim=2, c=0.5)
    assert conv.p.shape == conv.a.shape == (4, 2, 3, 2, 1, 2)
    assert isinstance(conv.p, g.geoopt.ManifoldParameter)
    assert conv.bias.shape == (4,)
    bound = 1 / math.sqrt(conv.fan_in)
    assert conv.a.abs().max() <= bound and conv.bias.abs().max() <= bound
    assert GyroplaneConv3d(1, 2, 1, dim=2, bias=False).bias is None
    c1 = GyroplaneConv3d(1, 2, 2, dim=2)
    c2 = GyroplaneConv3d(1, 2, 2, dim=2)
    c1.reset_parameters(generator=_gen(3))
    c2.reset_parameters(generator=_gen(3))
    torch.testing.assert_close(c1.p, c2.p)
    with pytest.raises(ValueError, match="input should have shape"):
        conv(torch.zeros(1, 3, 4, 4, 4, 2))
    with pytest.raises(ValueError, match="too small"):
        conv(torch.zeros(1, 2, 2, 4, 4, 2))
    with pytest.raises(ValueError, match="stride"):
        GyroplaneConv3d(1, 2, 2, dim=2, stride=0)
    with pytest.raises(ValueError, match="p_init_std"):
        GyroplaneConv3d(1, 2, 2, dim=2, p_init_std=-1.0)
    with pytest.raises(ValueError, match="p_init_std"):
        GyroplaneLayer(2, 3, p_init_std=float("nan"))
    # p_init_std = 0 puts every offset at the origin; larger values spread them
    assert float(GyroplaneConv3d(1, 2, 2, dim=2, p_init_std=0.0).p.detach().abs().max()) == 0.0
    assert float(GyroplaneLayer(2, 3, p_init_std=0.0).p.detach().abs().max()) == 0.0
    wide = GyroplaneLayer(2, 4000, p_init_std=0.5)
    assert 0.35 < float(wide.p.detach().norm(dim=-1).median()) < 0.7
    with pytest.raises(ValueError, match="kernel_size"):
        GyroplaneConv3d(1, 2, (2, 2), dim=2)
