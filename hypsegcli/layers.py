r"""Gyroplane layers: affine maps of Poincaré-ball points to real numbers (paper Eq. 5-7).

:class:`GyroplaneLayer` maps one ball point to ``out_features`` signed, scaled
distances to learned gyroplanes; :class:`GyroplaneConv3d` is the gyroplane
convolution of Eq. 7: a spatial grid of ball points (one point of dimension
``dim`` per input channel and voxel) goes to real-valued feature maps, with
nn.Conv3d's kernel, stride, padding and dilation semantics.

Evaluation without Möbius additions
-----------------------------------
With :math:`w = (-p)\oplus z` the gyroplane map is (see
:func:`hypsegcli.geometry.gyroplane`)

.. math::
    f_{a,p}(z) = s\,\operatorname{asinh}\Big(\frac{2\sqrt c\,
        [(1 - c\|p\|^2)\langle z,a\rangle
         - (1 - 2c\langle p,z\rangle + c\|z\|^2)\langle p,a\rangle]}
        {(1 - c\|p\|^2)(1 - c\|z\|^2)\|a\|}\Big),
    \qquad s = \frac{\lambda_p\|a\|}{\sqrt c}.

The asinh argument is *linear* in the lifted point

.. math::
    \hat z = \Big(\frac{z}{1 - c\|z\|^2},\;
                  \frac{1 + c\|z\|^2}{1 - c\|z\|^2}\Big) \in \mathbb R^{d+1}

with the kernel vector (``κ = 2√c / ((1 - c‖p‖²)‖a‖)``)

.. math::
    \hat g = \big(\kappa[(1 - c\|p\|^2)\,a + 2c\langle p,a\rangle\,p],\;
                   -\kappa\langle p,a\rangle\big),
    \qquad f_{a,p}(z) = s\,\operatorname{asinh}(\langle\hat z, \hat g\rangle).

The convolution therefore gathers, for every in-bounds (output position,
kernel offset) pair, the lifted input point it reads (pairs grouped by
offset, as a precomputed index; no Python loop over positions or offsets),
evaluates all (offset, input channel, output channel) arguments with one
batched matrix product against the lifted kernels, applies ``asinh`` and the
scale ``s``, sums over input channels and scatters (index_add) into the output
positions. Padded (out-of-bounds) inputs contribute exactly 0, as zero
padding does in nn.Conv3d: every offset gets as many slots as the offset with
the most in-bounds pairs, and slots without a pair read a zero lifted point,
for which ``⟨ẑ, ĝ⟩ = 0`` and ``asinh(0) = 0``. So padding costs little: the
"transposed" use (a 1x1x1 input, kernel k, padding k - 1) evaluates one
gyroplane per (output position, in/out channel pair), not k³. Work is done
in blocks of bounded size; under autograd each block is checkpointed, so
memory stays bounded in training too.

Guards: ``‖a‖`` is clamped at ``_MIN_NORM``, ``1 - c‖p‖²`` and ``1 - c‖z‖²``
at ``_ball_gap(dtype)`` (both from :mod:`hypsegcli.geometry`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .geometry import _MIN_NORM, _ball_gap, ball, expmap0, geoopt

__all__ = [
    "GyroplaneLayer",
    "GyroplaneConv3d",
    "gyroplane_conv3d",
    "gyroplane_lift",
    "gyroplane_kernel",
]

# Largest number of gyroplane evaluations (samples x pair slots x offsets x
# in-channels x out-channels) held at once; bigger problems run in blocks.
CHUNK_ELEMENTS = 1 << 22
# Tangent-space std (in units of 1/sqrt(c)) of the initial gyroplane offsets p.
P_INIT_STD = 0.05

_Int3 = int | Sequence[int]


def gyroplane_lift(z: torch.Tensor, *, c: float = 1.0) -> torch.Tensor:
    """Lift ball points (..., d) to ``ẑ = (z, 1 + c‖z‖²) / (1 - c‖z‖²)`` (..., d + 1)."""
    z_sq = z.pow(2).sum(-1, keepdim=True)
    z_gap = (1 - c * z_sq).clamp_min(_ball_gap(z.dtype))
    return torch.cat([z, 1 + c * z_sq], dim=-1) / z_gap


def gyroplane_kernel(
    p: torch.Tensor, a: torch.Tensor, *, c: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lifted kernels ``ĝ`` (..., d + 1) and scales ``s = λ_p‖a‖/√c`` (...) of gyroplanes (p, a)."""
    sqrt_c = math.sqrt(c)
    p_gap = (1 - c * p.pow(2).sum(-1, keepdim=True)).clamp_min(_ball_gap(p.dtype))
    a_norm = a.pow(2).sum(-1, keepdim=True).clamp_min(_MIN_NORM**2).sqrt()
    pa = (p * a).sum(-1, keepdim=True)
    kappa = 2 * sqrt_c / (p_gap * a_norm)
    g = torch.cat([kappa * (p_gap * a + 2 * c * pa * p), -kappa * pa], dim=-1)
    s = (2 * a_norm / (p_gap * sqrt_c)).squeeze(-1)
    return g, s


def _conv_out_size(spatial, ksize, stride, padding, dilation) -> tuple[int, int, int]:
    """nn.Conv3d's output size: ``(n + 2 pad - dil (k - 1) - 1) // stride + 1`` per axis."""
    return tuple(  # type: ignore[return-value]
        (size + 2 * pad - dil * (k - 1) - 1) // st + 1
        for size, k, st, pad, dil in zip(spatial, ksize, stride, padding, dilation, strict=True)
    )


def _triple(value: _Int3, name: str, minimum: int) -> tuple[int, int, int]:
    if isinstance(value, int):
        out = (value,) * 3
    else:
        out = tuple(int(v) for v in value)
        if len(out) != 3:
            raise ValueError(f"{name}={value!r} should be an int or 3 ints")
    if min(out) < minimum:
        raise ValueError(f"{name}={value!r} should be >= {minimum}")
    return out  # type: ignore[return-value]


@functools.lru_cache(maxsize=64)
def _pair_index(
    spatial: tuple[int, int, int],
    ksize: tuple[int, int, int],
    stride: tuple[int, int, int],
    padding: tuple[int, int, int],
    dilation: tuple[int, int, int],
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """In-bounds (output position, kernel offset) pairs, grouped by offset.

    Returns ``src`` and ``dst`` (K, M) int64 and the output size: for offset
    ``k`` and slot ``m``, output position ``dst[k, m]`` (flat over D'H'W')
    reads input position ``src[k, m]`` (flat over DHW). M is the largest number
    of in-bounds pairs of any offset; the unused slots read the extra position
    ``D·H·W`` (a zero lifted point, whose contribution is exactly 0) and write
    to output 0.
    """
    out_size = _conv_out_size(spatial, ksize, stride, padding, dilation)
    src_ax, ok_ax = [], []
    for ax in range(3):  # (out_ax, k_ax) tables of input index and validity
        r = torch.arange(out_size[ax]).unsqueeze(1)
        u = torch.arange(ksize[ax]).unsqueeze(0)
        idx = r * stride[ax] + u * dilation[ax] - padding[ax]
        ok_ax.append((idx >= 0) & (idx < spatial[ax]))
        src_ax.append(idx.clamp(0, spatial[ax] - 1))

    # (D', H', W', kD, kH, kW) via broadcasting, then (K, L)
    def grid(t0, t1, t2):
        return (
            t0[:, None, None, :, None, None],
            t1[None, :, None, None, :, None],
            t2[None, None, :, None, None, :],
        )

    o0, o1, o2 = grid(*ok_ax)
    ok = (o0 & o1 & o2).reshape(-1, ksize[0] * ksize[1] * ksize[2]).t()
    s0, s1, s2 = grid(*src_ax)
    flat_src = ((s0 * spatial[1] + s1) * spatial[2] + s2).reshape(ok.shape[1], -1).t()
    flat_dst = torch.arange(ok.shape[1]).expand_as(ok)
    n_valid = ok.sum(1)
    m = max(int(n_valid.max()), 1)
    order = torch.sort((~ok).to(torch.int8), dim=1, stable=True).indices[:, :m]  # valid first
    used = torch.arange(m).unsqueeze(0) < n_valid.unsqueeze(1)
    dummy = spatial[0] * spatial[1] * spatial[2]
    src = torch.where(used, flat_src.gather(1, order), torch.full_like(order, dummy))
    dst = torch.where(used, flat_dst.gather(1, order), torch.zeros_like(order))
    return src, dst, out_size  # type: ignore[return-value]


def _conv_block(
    xz: torch.Tensor,
    g: torch.Tensor,
    s: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    n_out: int,
) -> torch.Tensor:
    """One block: xz (DHW + 1, C_in, n, E) lifted input with a zero row last;
    g (K, C_in, E, C_out); s (K, C_in, 1, C_out); src, dst (K, M) pair indices.
    Returns (n_out, n, C_out) = Σ over pairs and channels of s·asinh(⟨ẑ, ĝ⟩).
    """
    k, m = src.shape
    _, c_in, n, e = xz.shape
    c_out = g.shape[-1]
    patches = xz.index_select(0, src.reshape(-1)).view(k, m, c_in, n, e)
    patches = patches.transpose(1, 2).reshape(k * c_in, m * n, e)
    arg = torch.bmm(patches, g.reshape(k * c_in, e, c_out))  # (K·C_in, M·n, C_out)
    f = (torch.asinh(arg) * s.reshape(k * c_in, 1, c_out)).view(k, c_in, m * n, c_out).sum(1)
    out = xz.new_zeros(n_out, n, c_out)
    return out.index_add(0, dst.reshape(-1), f.view(k * m, n, c_out))


def gyroplane_conv3d(
    x: torch.Tensor,
    p: torch.Tensor,
    a: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    c: float = 1.0,
    stride: _Int3 = 1,
    padding: _Int3 = 0,
    dilation: _Int3 = 1,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Functional gyroplane convolution (see :class:`GyroplaneConv3d`).

    x (N, C_in, D, H, W, d); p, a (C_out, C_in, kD, kH, kW, d); bias (C_out,)
    -> (N, C_out, D', H', W').

    Work is split into blocks of samples (and, when one sample is too big, of
    pair slots) holding at most about ``chunk_elements`` asinh evaluations;
    under autograd each block is checkpointed (recomputed in backward), so
    memory is bounded by the block size.
    """
    if x.dim() != 6:
        raise ValueError(f"x should have shape (N, C_in, D, H, W, dim), got {tuple(x.shape)}")
    if p.dim() != 6 or p.shape != a.shape:
        raise ValueError(
            f"p and a should both have shape (C_out, C_in, kD, kH, kW, dim), "
            f"got {tuple(p.shape)} and {tuple(a.shape)}"
        )
    n, c_in, *spatial, d = x.shape
    c_out, pc_in, *ksize, pd = p.shape
    if pc_in != c_in or pd != d:
        raise ValueError(
            f"x with C_in={c_in}, dim={d} does not match kernels with C_in={pc_in}, dim={pd}"
        )
    stride = _triple(stride, "stride", 1)
    padding = _triple(padding, "padding", 0)
    dilation = _triple(dilation, "dilation", 1)
    if min(_conv_out_size(spatial, ksize, stride, padding, dilation)) < 1:
        raise ValueError(
            f"input of spatial size {tuple(spatial)} is too small for kernel {tuple(ksize)} "
            f"with padding {padding} and dilation {dilation}"
        )
    if n == 0:
        return x.new_zeros(0, c_out, *_conv_out_size(spatial, ksize, stride, padding, dilation))
    src, dst, out_size = _pair_index(tuple(spatial), tuple(ksize), stride, padding, dilation)
    src, dst = src.to(x.device), dst.to(x.device)
    n_out = out_size[0] * out_size[1] * out_size[2]
    k_total, m = src.shape

    # lifted input (DHW + 1, C_in, N, E) with a zero point last (the padding)
    xz = gyroplane_lift(x, c=c).permute(2, 3, 4, 1, 0, 5).reshape(-1, c_in, n, d + 1)
    xz = torch.cat([xz, xz.new_zeros(1, c_in, n, d + 1)], dim=0)
    g, s = gyroplane_kernel(p, a, c=c)  # (C_out, C_in, kD, kH, kW, E), (C_out, C_in, kD, kH, kW)
    g = g.reshape(c_out, c_in, k_total, d + 1).permute(2, 1, 3, 0)  # (K, C_in, E, C_out)
    s = s.reshape(c_out, c_in, k_total).permute(2, 1, 0).unsqueeze(2)  # (K, C_in, 1, C_out)

    # blocks of samples x pair slots, each <= chunk_elements asinh evaluations
    per_slot = k_total * c_in * c_out
    if per_slot * m * n <= chunk_elements:
        n_step, m_step = n, m
    elif per_slot * m <= chunk_elements:
        n_step, m_step = chunk_elements // (per_slot * m), m
    else:
        n_step, m_step = 1, max(1, chunk_elements // per_slot)
    single = n_step >= n and m_step >= m
    use_checkpoint = (
        not single
        and torch.is_grad_enabled()
        and (xz.requires_grad or g.requires_grad or s.requires_grad)
    )
    samples = []
    for n0 in range(0, n, n_step):
        total = None
        for m0 in range(0, m, m_step):
            args = (
                xz[:, :, n0 : n0 + n_step],
                g,
                s,
                src[:, m0 : m0 + m_step],
                dst[:, m0 : m0 + m_step],
                n_out,
            )
            part = (
                checkpoint(_conv_block, *args, use_reentrant=False)
                if use_checkpoint
                else _conv_block(*args)
            )
            total = part if total is None else total + part
        samples.append(total)
    out = samples[0] if len(samples) == 1 else torch.cat(samples, dim=1)  # (L, N, C_out)
    out = out.permute(1, 2, 0).reshape(n, c_out, *out_size)
    if bias is not None:
        out = out + bias.reshape(c_out, 1, 1, 1)
    return out


def _init_gyroplanes(
    p: torch.Tensor,
    a: torch.Tensor,
    fan_in: int,
    c: float,
    generator: torch.Generator | None,
    p_std: float = P_INIT_STD,
) -> None:
    """p = expmap0(N(0, (p_std/√c)²)) (near the origin by default); a ~ U(±1/√fan_in) (nn.Conv3d's bound)."""
    with torch.no_grad():
        u = torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device)
        p.copy_(expmap0(u * (p_std / math.sqrt(c)), c=c))
        bound = 1 / math.sqrt(fan_in)
        a.copy_(
            torch.rand(a.shape, generator=generator, dtype=a.dtype, device=a.device) * 2 * bound
            - bound
        )


class GyroplaneLayer(nn.Module):
    """Per-point gyroplane layer: (..., dim) ball points -> (..., out_features).

    ``out_j = f_{a_j, p_j}(z)`` (:func:`hypsegcli.geometry.gyroplane`), evaluated
    as ``s_j asinh(⟨ẑ, ĝ_j⟩)`` with one matrix product (module docstring).
    ``p`` (out_features, dim) is a :class:`geoopt.ManifoldParameter` on the ball
    of curvature ``-c`` (optimise with ``geoopt.optim.RiemannianAdam``), initialised
    as ``expmap0`` of a tangent vector with per-coordinate standard deviation
    ``p_init_std / √c``; ``a`` (out_features, dim) is Euclidean.
    """

    def __init__(
        self, dim: int, out_features: int, *, c: float = 1.0, p_init_std: float = P_INIT_STD
    ) -> None:
        super().__init__()
        if dim < 1 or out_features < 1:
            raise ValueError(f"dim={dim} and out_features={out_features} should be >= 1")
        if not p_init_std >= 0:
            raise ValueError(f"p_init_std={p_init_std} should be >= 0")
        self.dim = int(dim)
        self.out_features = int(out_features)
        self.c = float(c)
        self.p_init_std = float(p_init_std)
        self.p = geoopt.ManifoldParameter(torch.empty(out_features, dim), manifold=ball(self.c))
        self.a = nn.Parameter(torch.empty(out_features, dim))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        _init_gyroplanes(self.p, self.a, self.dim, self.c, generator, self.p_init_std)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[-1] != self.dim:
            raise ValueError(
                f"input's last dimension should be dim={self.dim}, got {tuple(z.shape)}"
            )
        g, s = gyroplane_kernel(self.p, self.a, c=self.c)  # (O, E), (O,)
        return torch.asinh(gyroplane_lift(z, c=self.c) @ g.t()) * s

    def extra_repr(self) -> str:
        return f"dim={self.dim}, out_features={self.out_features}, c={self.c}"


class GyroplaneConv3d(nn.Module):
    """Gyroplane convolution (paper Eq. 7) with nn.Conv3d's geometry.

    Input (N, C_in, D, H, W, dim): one ball point per input channel and voxel.
    Output (N, C_out, D', H', W'), ``D' = (D + 2 pad - dil (k - 1) - 1) // stride + 1``:

        y[o, r, s, t] = bias[o] + Σ_{i, (u, v, w)} f_{a[o,i,u,v,w], p[o,i,u,v,w]}(
                            x[i, r·stride + u·dil - pad, ...])

    with padded (out-of-bounds) positions contributing 0. ``p`` is a
    :class:`geoopt.ManifoldParameter` (C_out, C_in, kD, kH, kW, dim) on the ball,
    initialised as ``expmap0`` of a tangent vector with per-coordinate standard
    deviation ``p_init_std / √c`` (near the origin by default); ``a`` the same
    shape, Euclidean, uniform with nn.Conv3d's bound ``1/√fan_in``
    (``fan_in = C_in·kD·kH·kW·dim``), as is the bias.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _Int3,
        *,
        dim: int,
        stride: _Int3 = 1,
        padding: _Int3 = 0,
        dilation: _Int3 = 1,
        bias: bool = True,
        c: float = 1.0,
        p_init_std: float = P_INIT_STD,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1 or dim < 1:
            raise ValueError(
                f"in_channels={in_channels}, out_channels={out_channels} and dim={dim} should be >= 1"
            )
        if not p_init_std >= 0:
            raise ValueError(f"p_init_std={p_init_std} should be >= 0")
        self.p_init_std = float(p_init_std)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = _triple(kernel_size, "kernel_size", 1)
        self.stride = _triple(stride, "stride", 1)
        self.padding = _triple(padding, "padding", 0)
        self.dilation = _triple(dilation, "dilation", 1)
        self.dim = int(dim)
        self.c = float(c)
        shape = (out_channels, in_channels, *self.kernel_size, dim)
        self.p = geoopt.ManifoldParameter(torch.empty(shape), manifold=ball(self.c))
        self.a = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    @property
    def fan_in(self) -> int:
        k = self.kernel_size
        return self.in_channels * k[0] * k[1] * k[2] * self.dim

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        _init_gyroplanes(self.p, self.a, self.fan_in, self.c, generator, self.p_init_std)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.fan_in)
            with torch.no_grad():
                b = torch.rand(
                    self.bias.shape,
                    generator=generator,
                    dtype=self.bias.dtype,
                    device=self.bias.device,
                )
                self.bias.copy_(b * 2 * bound - bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 6 or x.shape[1] != self.in_channels or x.shape[-1] != self.dim:
            raise ValueError(
                f"input should have shape (N, {self.in_channels}, D, H, W, {self.dim}), "
                f"got {tuple(x.shape)}"
            )
        return gyroplane_conv3d(
            x,
            self.p,
            self.a,
            self.bias,
            c=self.c,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"dim={self.dim}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, bias={self.bias is not None}, c={self.c}"
        )
