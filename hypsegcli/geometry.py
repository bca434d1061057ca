"""Poincaré-ball geometry (curvature ``-c``, ``c > 0``) and the wrapped normal.

Every function is a small pure function over tensors: points ``x, y, z`` and
tangent vectors ``u, v`` carry their ``d`` coordinates in the last dimension,
everything else broadcasts, and the curvature magnitude ``c`` (float or
tensor, default 1) is keyword-only. The ball is ``{x : c‖x‖² < 1}``.

The plain operations delegate to geoopt 0.5.1's
``geoopt.manifolds.stereographic.math`` with geoopt's sectional curvature
``k = -c``. geoopt is imported here only, inside ``warnings.catch_warnings()``
because it emits TorchScript deprecation warnings on import; other modules use
``from hypsegcli.geometry import geoopt`` (``geoopt.ManifoldParameter``,
``geoopt.optim.RiemannianAdam``).

The gyroplane map and the wrapped normal are written here, with named
numerical guards:

- ``_MIN_NORM``: lower clamp on norms before dividing by them;
- ``_ball_gap(dtype)``: lower clamp on conformal denominators ``1 - c‖x‖²``
  (the smallest gap a projected point keeps from the boundary is larger);
- ``_LOG_SINHC_TAYLOR_BELOW``: below this value of ``√c r`` the wrapped
  normal's volume correction ``log(sinh(√c r)/(√c r))`` uses its Taylor
  series, so ``r → 0`` (a sample equal to the mean) is exact and has finite
  gradients.
"""

from __future__ import annotations

import math
import warnings

import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import geoopt
    import geoopt.manifolds.stereographic.math as _gm

__all__ = [
    "geoopt",
    "ball",
    "mobius_add",
    "lambda_x",
    "project",
    "expmap0",
    "logmap0",
    "expmap",
    "logmap",
    "dist",
    "dist0",
    "gyroplane",
    "log_sinhc",
    "WrappedNormal",
]

_MIN_NORM = 1e-15
_LOG_SINHC_TAYLOR_BELOW = 0.1
_LOG_2PI = math.log(2.0 * math.pi)


def _ball_gap(dtype: torch.dtype) -> float:
    """Smallest value allowed for a conformal denominator ``1 - c‖x‖²``."""
    return float(torch.finfo(dtype).eps)


def _c_like(c: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(c, dtype=x.dtype, device=x.device)


def _k(c: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """geoopt's sectional curvature ``k = -c`` as a tensor like ``x``."""
    return -_c_like(c, x)


def ball(c: float = 1.0) -> geoopt.PoincareBall:
    """The geoopt manifold of the Poincaré ball of curvature ``-c`` (``k = -c``).

    Use it for ``geoopt.ManifoldParameter(data, manifold=ball(c))`` so that
    ``geoopt.optim.RiemannianAdam`` keeps the parameter on the ball.
    """
    if not (float(c) > 0):
        raise ValueError(f"c={c} should be > 0 (the ball has curvature -c)")
    return geoopt.PoincareBall(c=float(c))


def mobius_add(x: torch.Tensor, y: torch.Tensor, *, c: float | torch.Tensor = 1.0) -> torch.Tensor:
    r"""Möbius addition.

    .. math::
        x \oplus y = \frac{(1 + 2c\langle x,y\rangle + c\|y\|^2)\,x + (1 - c\|x\|^2)\,y}
                          {1 + 2c\langle x,y\rangle + c^2\|x\|^2\|y\|^2}
    """
    return _gm.mobius_add(x, y, k=_k(c, x))


def lambda_x(
    x: torch.Tensor, *, c: float | torch.Tensor = 1.0, keepdim: bool = False
) -> torch.Tensor:
    r"""Conformal factor :math:`\lambda_x = 2 / (1 - c\|x\|^2)`."""
    return _gm.lambda_x(x, k=_k(c, x), keepdim=keepdim)


def project(x: torch.Tensor, *, c: float | torch.Tensor = 1.0) -> torch.Tensor:
    r"""Pull points back inside the ball: :math:`\|x\| \le (1 - \epsilon)/\sqrt{c}`.

    The projection margin is geoopt's per dtype: ``4e-3`` (float32), ``1e-5``
    (float64).
    """
    return _gm.project(x, k=_k(c, x))


def expmap0(u: torch.Tensor, *, c: float | torch.Tensor = 1.0) -> torch.Tensor:
    r"""Exponential map at the origin: :math:`\tanh(\sqrt c\|u\|)\,u/(\sqrt c\|u\|)`."""
    return _gm.expmap0(u, k=_k(c, u))


def logmap0(x: torch.Tensor, *, c: float | torch.Tensor = 1.0) -> torch.Tensor:
    r"""Logarithmic map at the origin: :math:`\operatorname{artanh}(\sqrt c\|x\|)\,x/(\sqrt c\|x\|)`.

    So :math:`\|\log_0 x\| = d(0, x) / 2` (:math:`\lambda_0 = 2`).
    """
    return _gm.logmap0(x, k=_k(c, x))


def expmap(x: torch.Tensor, u: torch.Tensor, *, c: float | torch.Tensor = 1.0) -> torch.Tensor:
    r"""Exponential map at ``x``:
    :math:`x \oplus \tanh(\sqrt c \lambda_x\|u\|/2)\,u/(\sqrt c\|u\|)`.
    """
    return _gm.expmap(x, u, k=_k(c, x))


def logmap(x: torch.Tensor, y: torch.Tensor, *, c: float | torch.Tensor = 1.0) -> torch.Tensor:
    r"""Logarithmic map at ``x`` of ``y``, with :math:`w = (-x) \oplus y`:
    :math:`\frac{2}{\sqrt c\lambda_x}\operatorname{artanh}(\sqrt c\|w\|)\,w/\|w\|`.
    """
    return _gm.logmap(x, y, k=_k(c, x))


def dist(
    x: torch.Tensor, y: torch.Tensor, *, c: float | torch.Tensor = 1.0, keepdim: bool = False
) -> torch.Tensor:
    r"""Geodesic distance :math:`d(x,y) = \frac{2}{\sqrt c}\operatorname{artanh}(\sqrt c\|(-x)\oplus y\|)`."""
    return _gm.dist(x, y, k=_k(c, x), keepdim=keepdim)


def dist0(x: torch.Tensor, *, c: float | torch.Tensor = 1.0, keepdim: bool = False) -> torch.Tensor:
    r"""Distance to the origin :math:`\frac{2}{\sqrt c}\operatorname{artanh}(\sqrt c\|x\|)`."""
    return _gm.dist0(x, k=_k(c, x), keepdim=keepdim)


def gyroplane(
    z: torch.Tensor, p: torch.Tensor, a: torch.Tensor, *, c: float | torch.Tensor = 1.0
) -> torch.Tensor:
    r"""Signed, scaled distance of ``z`` to the gyroplane :math:`H_{a,p}` (Ganea et al. 2018).

    .. math::
        f_{a,p}(z) = \operatorname{sign}(\langle w, a\rangle)\,
            \frac{\lambda_p\|a\|}{\sqrt c}\,
            \operatorname{asinh}\Big(\frac{2\sqrt c\,|\langle w, a\rangle|}
                                        {(1 - c\|w\|^2)\,\|a\|}\Big),
        \qquad w = (-p) \oplus z,

    with :math:`H_{a,p} = \{x : \langle (-p)\oplus x, a\rangle = 0\}`; the factor
    after :math:`\lambda_p\|a\|` is the geodesic distance :math:`d(z, H_{a,p})`.
    ``sign(s)·asinh(|s|) = asinh(s)``, and with
    :math:`D = 1 - 2c\langle p,z\rangle + c^2\|p\|^2\|z\|^2` the Möbius
    difference expands to

    .. math::
        \langle w, a\rangle = \big[(1 - c\|p\|^2)\langle z,a\rangle
            - (1 - 2c\langle p,z\rangle + c\|z\|^2)\langle p,a\rangle\big] / D,
        \qquad 1 - c\|w\|^2 = (1 - c\|p\|^2)(1 - c\|z\|^2) / D,

    so ``D`` cancels and the map is evaluated without forming ``w``:

    .. math::
        f_{a,p}(z) = \frac{\lambda_p\|a\|}{\sqrt c}\operatorname{asinh}\Big(
            \frac{2\sqrt c\,[(1 - c\|p\|^2)\langle z,a\rangle
                  - (1 - 2c\langle p,z\rangle + c\|z\|^2)\langle p,a\rangle]}
                 {(1 - c\|p\|^2)(1 - c\|z\|^2)\,\|a\|}\Big).

    geoopt's ``dist2plane(z, p, a, signed=True, scaled=True)`` equals
    ``f_{a,p}(z) / λ_p`` (it scales by ``‖a‖``, not ``λ_p‖a‖``).

    Shapes: ``z``, ``p``, ``a`` broadcast on ``(..., d)``; returns ``(...)``.
    Guards: ``‖a‖`` clamped at ``_MIN_NORM``; ``1 - c‖p‖²`` and ``1 - c‖z‖²``
    clamped at ``_ball_gap(dtype)``.
    """
    cc = _c_like(c, z)
    sqrt_c = cc.sqrt()
    gap = _ball_gap(z.dtype)
    a_norm = a.pow(2).sum(-1).clamp_min(_MIN_NORM**2).sqrt()
    p_gap = (1 - cc * p.pow(2).sum(-1)).clamp_min(gap)  # 1 - c‖p‖² = 2 / λ_p
    z_sq = z.pow(2).sum(-1)
    z_gap = (1 - cc * z_sq).clamp_min(gap)
    za = (z * a).sum(-1)
    zp = (z * p).sum(-1)
    pa = (p * a).sum(-1)
    num = p_gap * za - (1 - 2 * cc * zp + cc * z_sq) * pa
    arg = 2 * sqrt_c * num / (p_gap * z_gap * a_norm)
    return (2 / p_gap) * a_norm / sqrt_c * torch.asinh(arg)


def log_sinhc(x: torch.Tensor) -> torch.Tensor:
    r""":math:`\log(\sinh(x)/x)` for ``x >= 0``, exact and smooth at ``x = 0``.

    Below ``_LOG_SINHC_TAYLOR_BELOW`` the series
    :math:`x^2/6 - x^4/180 + x^6/2835 - x^8/37800` (next term < 3e-16 there);
    above it :math:`x - \log 2 + \operatorname{log1p}(-e^{-2x}) - \log x`, which
    never overflows. Both branches see only safe inputs, so gradients are finite.
    """
    small = x < _LOG_SINHC_TAYLOR_BELOW
    xs = torch.where(small, x, torch.zeros_like(x))
    x2 = xs * xs
    taylor = x2 * (1.0 / 6 + x2 * (-1.0 / 180 + x2 * (1.0 / 2835 - x2 / 37800)))
    xl = torch.where(small, torch.full_like(x, _LOG_SINHC_TAYLOR_BELOW), x)
    large = xl - math.log(2.0) + torch.log1p(-torch.exp(-2 * xl)) - torch.log(xl)
    return torch.where(small, taylor, large)


def sample_dist0(
    loc: torch.Tensor, v: torch.Tensor, *, c: float | torch.Tensor = 1.0
) -> torch.Tensor:
    r"""Distance to the origin of the wrapped-normal sample :math:`z = \mu \oplus \exp_0(v/2)`,
    from ``loc`` = :math:`\mu` and ``v`` alone (broadcast over their leading dimensions).

    The hyperbolic law of cosines in the triangle :math:`0, \mu, z`, whose sides at
    :math:`\mu` are :math:`a = d(0, \mu)` and :math:`r = \|v\| = d(\mu, z)`; parallel
    transport along the geodesic from 0 keeps the angle with it, so the angle at
    :math:`\mu` has cosine :math:`-\langle\hat v, \hat\mu\rangle`:

    .. math::
        \cosh(\sqrt c\, d_0) = \cosh(\sqrt c\, a)\cosh(\sqrt c\, r)
            + \sinh(\sqrt c\, a)\sinh(\sqrt c\, r)\,\langle\hat v, \hat\mu\rangle,

    evaluated in the log domain, so it holds for any :math:`r` where :math:`z` itself
    would leave the dtype's ball (:func:`project` moves it). Near :math:`d_0 = 0`
    (:math:`\operatorname{arcosh}` at 1) it keeps only ~half the digits: use
    :func:`dist0` of ``z`` there. Gradients are finite everywhere.
    """
    sqrt_c = _c_like(c, v).sqrt()
    a = sqrt_c * dist0(loc, c=c)
    v_norm = v.pow(2).sum(-1).clamp_min(_MIN_NORM**2).sqrt()
    loc_norm = loc.pow(2).sum(-1).clamp_min(_MIN_NORM**2).sqrt()
    cos = ((v * loc).sum(-1) / (v_norm * loc_norm)).clamp(-1.0, 1.0)
    r = sqrt_c * v_norm
    tiny = torch.finfo(v.dtype).tiny
    ea, er = torch.exp(-2 * a), torch.exp(-2 * r)
    # cosh(a)cosh(r) + sinh(a)sinh(r)cos = e^(a+r)/4 · [(1+ea)(1+er) + cos(1-ea)(1-er)]
    bracket = (1 + ea) * (1 + er) + cos * (1 - ea) * (1 - er)
    log_cosh = (a + r - math.log(4.0) + torch.log(bracket.clamp_min(tiny))).clamp_min(0.0)
    # arcosh(X) = log X + log(1 + sqrt(1 - X^-2))
    root = (-torch.expm1(-2 * log_cosh)).clamp_min(tiny).sqrt()
    return (log_cosh + torch.log1p(root)) / sqrt_c


class WrappedNormal:
    r"""Wrapped normal :math:`\mathcal N_P(\mu, \operatorname{diag}\sigma^2)` on the ball
    (Mathieu et al. 2019; paper Eq. 4).

    Sampling: :math:`v \sim \mathcal N(0, \operatorname{diag}\sigma^2)` in
    orthonormal coordinates of the tangent space at 0 (i.e. the tangent
    vector :math:`v/\lambda_0 = v/2`), parallel transport to :math:`\mu`
    (:math:`PT_{0\to\mu}(v/2) = v/\lambda_\mu`), then :math:`\exp_\mu`. In
    closed form

    .. math::
        z = \mu \oplus \frac{\tanh(\sqrt c\|v\|/2)\,v}{\sqrt c\|v\|}
          = \mu \oplus \exp_0(v/2),
        \qquad d(\mu, z) = \|v\|.

    The inverse map is :math:`v = \lambda_\mu \log_\mu(z) = 2\log_0((-\mu)\oplus z)`.
    The log-density with respect to the Riemannian volume
    (:math:`dV = \lambda_z^d\,dz`) is

    .. math::
        \log p(z) = \log\mathcal N(v; 0, \operatorname{diag}\sigma^2)
            - (d - 1)\log\frac{\sinh(\sqrt c\, r)}{\sqrt c\, r},
        \qquad r = d(\mu, z) = \|v\|,

    summed over the last dimension. ``r → 0`` is handled by :func:`log_sinhc`.

    ``loc``: (..., d) points on the ball; ``scale``: (..., d) positive standard
    deviations; both broadcast.
    """

    has_rsample = True

    def __init__(
        self, loc: torch.Tensor, scale: torch.Tensor, *, c: float | torch.Tensor = 1.0
    ) -> None:
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        self.c = c

    @property
    def dim(self) -> int:
        return self.loc.shape[-1]

    def _extended_shape(self, sample_shape: torch.Size | tuple[int, ...]) -> torch.Size:
        return torch.Size(sample_shape) + self.loc.shape

    def rsample_tangent(
        self,
        sample_shape: torch.Size | tuple[int, ...] = torch.Size(),
        *,
        generator: torch.Generator | None = None,
        projected: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterized samples ``z`` and their tangent vectors ``v`` (same shape).

        ``z`` is projected into the ball (:func:`project`), which only moves
        samples beyond the dtype's margin (``d(0, z)`` above ~6/√c in float32,
        ~12/√c in float64); elsewhere ``d(loc, z) = ‖v‖`` and
        ``to_tangent(z) = v``. Where ``z`` was moved, score the sample from ``v``
        (:meth:`log_prob_tangent`, :func:`sample_dist0`). ``projected=False``
        returns ``z`` as computed, before the projection. ``generator=None`` draws
        from torch's default generator.
        """
        eps = torch.randn(
            self._extended_shape(sample_shape),
            generator=generator,
            dtype=self.loc.dtype,
            device=self.loc.device,
        )
        v = eps * self.scale
        z = mobius_add(self.loc, expmap0(v / 2, c=self.c), c=self.c)
        return (project(z, c=self.c) if projected else z), v

    def rsample(
        self,
        sample_shape: torch.Size | tuple[int, ...] = torch.Size(),
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Reparameterized samples of shape ``(*sample_shape, *loc.shape)``."""
        return self.rsample_tangent(sample_shape, generator=generator)[0]

    def sample(
        self,
        sample_shape: torch.Size | tuple[int, ...] = torch.Size(),
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape, generator=generator)

    def to_tangent(self, z: torch.Tensor) -> torch.Tensor:
        r"""Inverse of the sampling map: :math:`v = \lambda_\mu\log_\mu(z) = 2\log_0((-\mu)\oplus z)`."""
        return 2 * logmap0(mobius_add(-self.loc, z, c=self.c), c=self.c)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log-density (Riemannian volume) of ``z`` (..., d); returns ``z.shape[:-1]`` broadcast."""
        return self.log_prob_tangent(self.to_tangent(z))

    def log_prob_tangent(self, v: torch.Tensor) -> torch.Tensor:
        """Log-density of the sample ``loc ⊕ exp0(v / 2)`` from its tangent vector ``v``
        (..., d): exact also where the sample itself lies beyond the dtype's ball."""
        d = self.dim
        log_normal = (-0.5 * (v / self.scale).pow(2) - torch.log(self.scale) - 0.5 * _LOG_2PI).sum(
            -1
        )
        sqrt_c = _c_like(self.c, v).sqrt()
        # sqrt(c)·r with r = ‖v‖, clamped so the norm's gradient stays finite at 0;
        # log_sinhc is O(r²) there so the clamp changes nothing measurable.
        scaled_r = sqrt_c * v.pow(2).sum(-1).clamp_min(_MIN_NORM**2).sqrt()
        return log_normal - (d - 1) * log_sinhc(scaled_r)

    def __repr__(self) -> str:
        return f"WrappedNormal(loc: {tuple(self.loc.shape)}, scale: {tuple(self.scale.shape)}, c={self.c})"
