r"""Hyperbolic k-means on the Poincaré ball, with Fréchet-mean centroids.

The ball of curvature ``-c`` (``c > 0``) is :math:`\{x \in \mathbb R^d : c\|x\|^2 < 1\}`;
points carry their ``d`` coordinates in the last dimension. Everything is
computed in torch; inputs may be numpy arrays or torch tensors.

Distance
--------
With the *distance argument*

.. math::
    t(x, y) = \frac{c\,\|x - y\|^2}{(1 - c\|x\|^2)(1 - c\|y\|^2)},

the geodesic distance is

.. math::
    d(x, y) = \frac{1}{\sqrt c}\operatorname{arccosh}(1 + 2t)
            = \frac{2}{\sqrt c}\operatorname{asinh}(\sqrt t)
            = \frac{2}{\sqrt c}\operatorname{artanh}(\sqrt c\,\|(-x)\oplus y\|),

(``arccosh(1 + 2t) = 2 asinh(√t)`` because ``cosh 2u = 1 + 2 sinh² u``; the
asinh form keeps full relative precision for small ``t``), so
:math:`d^2 = \frac{4}{c}\operatorname{asinh}^2\sqrt t`. Distances are monotone
in ``t``, so the assignment step takes the argmin of ``t``, and because
``1 - c‖x‖²`` is a positive per-point factor, of
:math:`\|x - y_j\|^2 / (1 - c\|y_j\|^2)` over the centres ``j``: no arccosh or
asinh in the hot loop. There ``‖x − y‖²`` is expanded as
``‖x‖² + ‖y‖² − 2⟨x, y⟩`` (one matrix product per chunk of points), clamped
at 0. Exact distances (inertia, convergence) use the difference ``x − y``.

Fréchet mean (Lou et al. 2020, "Differentiating through the Fréchet mean")
---------------------------------------------------------------------------
The weighted Fréchet mean minimises :math:`F(y) = \sum_l w_l\, d(x_l, y)^2`.
From the iterate ``y``:

.. math::
    t_l = t(x_l, y), \qquad
    g(t) = \frac{2\operatorname{arccosh}(1 + 2t)}{\sqrt{t^2 + t}}
         = \frac{4\operatorname{asinh}\sqrt t}{\sqrt{t(1 + t)}}, \qquad g(0) = 4,

    \alpha_l = \frac{w_l\, g(t_l)}{1 - c\|x_l\|^2}, \quad
    a = \sum_l \alpha_l, \quad b = \sum_l \alpha_l x_l, \quad
    s = \sum_l \alpha_l \|x_l\|^2,

    y^+ = \frac{(a + cs) - \sqrt{(a + cs)^2 - 4c\|b\|^2}}{2c\|b\|^2}\, b
        = \frac{2}{(a + cs) + \sqrt{(a + cs)^2 - 4c\|b\|^2}}\, b .

(Setting :math:`\nabla F = 0` with the :math:`\alpha_l` frozen gives
:math:`y\,(a + cs - 2c\langle b, y\rangle) = (1 - c\|y\|^2)\, b`, so
:math:`y = \lambda b` with :math:`c\|b\|^2\lambda^2 - (a + cs)\lambda + 1 = 0`;
``y⁺`` is the smaller root, which lies inside the ball.) The code evaluates
the second, rationalised form (no division by ``‖b‖²`` when the mean is at
the origin), with the sums taken about the iterate (``e_l = x_l − y``, see
:func:`_lou_step`) so that ``(a + cs)² − 4c‖b‖²`` is formed without
cancellation: near the boundary the plain form turns summation rounding into
~1e-9 jitter of the centroid; the centred form converges to the last bit.
``g`` is evaluated by its series ``4(1 − 2t/3 + 8t²/15 − 16t³/35)`` for
``t < _G_SERIES_BELOW``, so a point equal to the iterate gets its correct
weight ``g(0) = 4`` (the authors clamped ``t``, which made ``g(0) ≈ 2·10⁶``
and pinned the mean to that point). Fréchet means are computed in float64.
The iteration converges linearly (about ×0.2 per step on typical clusters).

k-means
-------
:class:`PoincareKMeans`: seeded greedy k-means++ on squared Poincaré distances
(``2 + ⌊ln k⌋`` candidates per centre, as scikit-learn), Lloyd iterations
whose centroid step runs ``frechet_iters`` Lou steps for all clusters at once
(``bincount`` segment sums, warm-started at the previous centroids), and a
polish that runs the Lou iteration to convergence, so the returned centres are
the Fréchet means of their clusters. Work is bounded for large inputs: the
``n_init`` restarts run on at most ``_RESTART_SAMPLES`` points (and stop once
an iteration moves at most ``_RESTART_SETTLED`` of them), the kept run is
refined and polished on at most ``fit_samples`` points, and only the final
assignment (``labels_``) and ``predict`` touch every point, in chunks.

Numerical guards (named):

- ``_G_SERIES_BELOW``: below this ``t``, ``g(t)`` uses its Taylor series;
- ``_MIN_GAP``: lower clamp on conformal denominators ``1 - c‖x‖²`` and on the
  denominators of the Lou step (float64);
- ``_BALL_MAX``: centroids are kept at ``c‖y‖² <= _BALL_MAX`` (float64);
- the discriminant ``(a + cs)² − 4c‖b‖²`` and ``‖x − y‖²`` in expanded form
  are clamped at 0;
- ``_STALL_ITERS``: the Lou iteration also stops when its step has not
  reached a new minimum for this many steps (rounding floor).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hypsegcli.checks import is_whole
from hypsegcli.errors import BadInputError, HypsegError

__all__ = [
    "PoincareKMeans",
    "assign_chunk_rows",
    "NotFittedError",
    "ConvergenceWarning",
    "frechet_mean",
    "mean_silhouette",
    "poincare_dist",
    "poincare_pdist2",
]

ArrayLike = Any  # numpy array or torch tensor (or anything np.asarray takes)

_G_SERIES_BELOW = 1e-4
_MIN_GAP = 1e-300
_BALL_MAX = 1.0 - 4.0 * float(np.finfo(np.float64).eps)

# Rows per chunk of the assignment step: chunk * k scores at a time (8 MiB in float64),
# but at least _MIN_ASSIGN_ROWS rows.
_ASSIGN_BLOCK = 1 << 20
_MIN_ASSIGN_ROWS = 1024
# Coordinates per chunk of the input check (finite, inside the ball): 8 MiB in float64.
_CHECK_BLOCK = 1 << 20
# The n_init restarts (k-means++ and Lloyd) run on a seeded subset of at most this
# many points of the fit sample; the best run is then refined on the whole fit sample.
_RESTART_SAMPLES = 16_384
# A restart stops once an iteration moves at most this fraction of its points to
# another cluster: which restart is kept is settled by then, and the kept one is
# refined to convergence on the fit sample.
_RESTART_SETTLED = 1e-3
# ``select="silhouette"``: each restart is scored by the mean silhouette of its labels on
# a seeded subset of at most this many points of the restart sample (exact distances).
_SILHOUETTE_SAMPLES = 2_000
#: How :class:`PoincareKMeans` keeps one of its restarts (``select``).
SELECT_CHOICES = ("inertia", "silhouette")
# Lou iterations of the final polish (and the default of frechet_mean); the
# iteration converges linearly, usually to 1e-12 in 10-30 steps from a warm start.
_FRECHET_MAX_ITER = 200
_FRECHET_TOL = 1e-12
_STALL_ITERS = 4
# Below this many scores, the assignment's argmin avoids torch's parallel min-with-index.
_SMALL_REDUCTION = 32_768


class NotFittedError(HypsegError):
    """An estimator was used before ``fit`` (exit code 1)."""


class ConvergenceWarning(UserWarning):
    """A degenerate k-means result (fewer distinct clusters than asked)."""


# --------------------------------------------------------------------------- helpers


def _to_tensor(x: ArrayLike, name: str, device: torch.device | str | None = None) -> torch.Tensor:
    """Tensor view of ``x`` (float dtypes kept, others -> float64), on ``device``."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            arr = np.asarray(x)
        except Exception as exc:  # pragma: no cover - exotic inputs
            raise BadInputError(
                f"{name} should be an array of ball points, got {type(x).__name__}"
            ) from exc
        if arr.dtype.kind not in "iuf":
            raise BadInputError(
                f"{name} should be a real numeric array of ball points, got dtype={arr.dtype}"
            )
        if arr.dtype.kind == "f" and arr.dtype not in (np.float32, np.float64):
            arr = arr.astype(np.float32 if arr.itemsize < 4 else np.float64)  # float16 / longdouble
        arr = np.ascontiguousarray(arr)
        with warnings.catch_warnings():
            # read-only inputs (memory-mapped cache entries) are only ever read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(arr)
    if not t.dtype.is_floating_point:
        if t.dtype == torch.bool or t.dtype.is_complex:
            raise BadInputError(f"{name} should be a real float array, got dtype={t.dtype}")
        t = t.to(torch.float64)
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float32)  # float16 / bfloat16: compute in float32
    if device is not None:
        t = t.to(device)
    return t


def _like_input(t: torch.Tensor, ref: ArrayLike) -> ArrayLike:
    """Return ``t`` as numpy if ``ref`` was not a tensor, else as a tensor."""
    if isinstance(ref, torch.Tensor):
        return t
    return t.detach().cpu().numpy()


def _c_value(c: Any) -> float:
    try:
        cf = float(c)
    except (TypeError, ValueError):
        raise BadInputError(
            f"c={c!r} should be a positive float (the ball has curvature -c)"
        ) from None
    if not (math.isfinite(cf) and cf > 0):
        raise BadInputError(
            f"c={c!r} should be a positive finite float (the ball has curvature -c)"
        )
    return cf


def _check_ball_points(x: torch.Tensor, name: str, c: float) -> None:
    """Raise BadInputError unless ``x`` is a finite (n, d) array of points of the ball."""
    if x.ndim != 2:
        raise BadInputError(
            f"{name} should be a 2D array (n_samples, n_features) of ball points, got shape {tuple(x.shape)}"
        )
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise BadInputError(
            f"{name} should have at least one sample and one feature, got shape {tuple(x.shape)}"
        )
    # In row chunks: a float64 copy of all points would cost 8 bytes per coordinate.
    rows = max(1, _CHECK_BLOCK // x.shape[1])
    n_bad = n_out = 0
    max_cn2 = -math.inf
    for i in range(0, x.shape[0], rows):
        chunk = x[i : i + rows]
        n_bad += int((~torch.isfinite(chunk)).sum())
        if n_bad:
            continue
        cn2 = c * (chunk.to(torch.float64) ** 2).sum(-1)
        out = int((cn2 >= 1.0).sum())
        if out:
            n_out += out
            max_cn2 = max(max_cn2, float(cn2.max()))
    if n_bad:
        raise BadInputError(
            f"{name} contains {n_bad} non-finite values (NaN or inf); expected finite ball coordinates"
        )
    if n_out:
        raise BadInputError(
            f"{name} has {n_out} of {x.shape[0]} points outside the Poincaré ball of curvature -{c:g} "
            f"(expected c*||x||^2 < 1, max c*||x||^2 = {max_cn2:.6g})"
        )


def _gap(sq_norm: torch.Tensor, c: float) -> torch.Tensor:
    """Conformal denominator ``1 - c‖x‖²``, clamped at ``_MIN_GAP``."""
    return (1.0 - c * sq_norm).clamp_min(_MIN_GAP)


def _sqnorm_cols(xT: torch.Tensor) -> torch.Tensor:
    """``‖x_l‖²`` of the columns of ``xT`` (d, n): one fused pass per coordinate."""
    out = xT[0].square()
    for j in range(1, xT.shape[0]):
        out.addcmul_(xT[j], xT[j])
    return out


def _asinh_sqrt(t: torch.Tensor) -> torch.Tensor:
    """``asinh(√t) = log1p(√t + t / (1 + √(1 + t)))`` for ``t >= 0``.

    Full relative precision for small ``t`` and several times faster than
    ``torch.asinh`` on CPU (log1p is vectorised).
    """
    return torch.log1p(t.sqrt() + t / (1.0 + (1.0 + t).sqrt()))


def _t_to_d2(t: torch.Tensor, c: float) -> torch.Tensor:
    """Squared distance from the distance argument: ``d² = (4/c) asinh(√t)²``."""
    return _asinh_sqrt(t.clamp_min(0.0)).square_().mul_(4.0 / c)


def _g(t: torch.Tensor) -> torch.Tensor:
    r"""Lou et al.'s weight ``g(t) = 2 arccosh(1 + 2t) / √(t² + t) = 4 asinh(√t) / √(t(1 + t))``.

    ``g(0) = 4``: for ``t < _G_SERIES_BELOW`` the series
    ``4(1 − 2t/3 + 8t²/15 − 16t³/35)`` (truncation error below ``2·t⁴``,
    ~1e-16 relative at the threshold) replaces the 0/0 form.
    """
    small = t < _G_SERIES_BELOW
    t_safe = torch.where(small, 1.0, t)
    direct = _asinh_sqrt(t_safe).mul_(4.0).div_((t_safe * (1.0 + t_safe)).sqrt_())
    series = (t * (-16.0 / 35.0) + 8.0 / 15.0).mul_(t).sub_(2.0 / 3.0).mul_(t).add_(1.0).mul_(4.0)
    return torch.where(small, series, direct)


def _project_centroids(y: torch.Tensor, c: float) -> torch.Tensor:
    """Keep ``c‖y‖² <= _BALL_MAX`` for centroids (k, d) (a no-op for a correctly computed mean)."""
    sq = c * (y * y).sum(-1, keepdim=True)
    scale = torch.where(sq > _BALL_MAX, (_BALL_MAX / sq.clamp_min(_MIN_GAP)).sqrt(), 1.0)
    return y * scale


def _col_t(xT: torch.Tensor, yT: torch.Tensor, c: float) -> torch.Tensor:
    """Distance argument ``t`` between matching columns of (d, n) arrays, from ``x − y``."""
    diff2 = _sqnorm_cols(xT - yT)
    return diff2.mul_(c).div_(_gap(_sqnorm_cols(xT), c) * _gap(_sqnorm_cols(yT), c))


def _max_shift(old: torch.Tensor, new: torch.Tensor, c: float) -> float:
    """Largest Poincaré distance between matching rows of two (k, d) centroid arrays."""
    return float(_t_to_d2(_col_t(old.T, new.T, c), c).max().sqrt())


def assign_chunk_rows(n_clusters: int) -> int:
    """Points per chunk of the assignment step (``labels_``, ``predict``) for ``k`` clusters.

    A caller that splits a large input itself into pieces of a multiple of
    this size gets exactly the chunks (and so the labels) of one call.
    """
    return max(_MIN_ASSIGN_ROWS, _ASSIGN_BLOCK // max(1, int(n_clusters)))


def _argmin0(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column minima of ``s`` (k, m) and the first row index reaching them.

    ``Tensor.min(0)`` always opens a parallel region (milliseconds each on a
    busy machine with OpenMP spin-waiting); below ``_SMALL_REDUCTION``
    elements the index is found with element-wise ops that stay serial.
    """
    if s.numel() > _SMALL_REDUCTION:
        return s.min(0)
    best = s.amin(0)
    return best, (s != best).to(torch.uint8).cumprod(0).sum(0, dtype=torch.int64)


def _repeats(centers: torch.Tensor) -> torch.Tensor | None:
    """(k,) True for each row of ``centers`` equal to an earlier row, or None if none is.

    The expanded scores of two equal centres round differently from column to
    column, so without this a point could go to either copy, not the lowest index.
    """
    same = (centers[:, None, :] == centers[None, :, :]).all(-1).tril(-1)
    repeats = same.any(1)
    return repeats if bool(repeats.any()) else None


def _scores(
    xT: torch.Tensor,
    centers: torch.Tensor,
    y2: torch.Tensor,
    inv_gap_y: torch.Tensor,
    x2: torch.Tensor,
    repeats: torch.Tensor | None = None,
) -> torch.Tensor:
    """(k, m) assignment scores ``‖x − y_j‖² / (1 − c‖y_j‖²)``, ``‖x − y‖²`` expanded and
    clamped at 0; rows flagged in ``repeats`` (:func:`_repeats`) score +inf."""
    s = torch.addmm(y2[:, None] + x2[None, :], centers, xT, alpha=-2.0)
    s = s.clamp_min_(0.0).mul_(inv_gap_y[:, None])
    return s if repeats is None else s.masked_fill_(repeats[:, None], math.inf)


def _near_ties(
    s: torch.Tensor, best: torch.Tensor, xx: torch.Tensor, y_max: float, err: float
) -> torch.Tensor | None:
    """Columns of the scores ``s`` (k, m) whose nearest centre rounding could have changed.

    An expanded score ``(‖x‖² + ‖y‖² − 2⟨x, y⟩) / (1 − c‖y‖²)`` computed in a
    float type of unit roundoff eps is off by at most about (d + 5) eps
    (‖x‖² + ‖y‖² + 2‖x‖‖y‖) / (1 − c‖y‖²) (d products and sums, the rounding of
    the centres and of the factor). ``err`` is twice that per unit of
    (‖x‖ + ‖y‖)² at the largest factor, and ``y_max`` the largest ‖y‖; every
    centre whose score lies within twice the bound of the best one (the error of
    both) is a candidate, and points with two candidates are returned. Near the rim the
    factor grows as 1 / (1 − c‖y‖²) and the cancellation in the expanded form
    with it: there, in float32, such points are many. Returns their indices,
    or None when there is none.
    """
    tol = (xx.sqrt() + y_max).square_().mul_(2.0 * err)
    near = ((s <= best + tol).sum(0) > 1).nonzero().squeeze(1)
    return near if near.numel() else None


def _same_repeats(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether two :func:`_repeats` results flag the same centres."""
    if a is None or b is None:
        return a is None and b is None
    return bool(torch.equal(a, b))


def _exact_argmin(
    xT: torch.Tensor, centers64: torch.Tensor, inv_gap64: torch.Tensor, repeats: torch.Tensor | None
) -> torch.Tensor:
    """Nearest centre of the columns of ``xT`` (d, m) from exact differences in float64.

    The score ``‖x − y‖² / (1 − c‖y‖²)`` orders the centres as the Poincaré
    distance does; ties go to the lowest index, repeated centres score +inf.
    """
    x64 = xT.to(torch.float64)
    s = (x64[None, :, :] - centers64[:, :, None]).square_().sum(1).mul_(inv_gap64[:, None])
    if repeats is not None:
        s.masked_fill_(repeats[:, None], math.inf)
    return _argmin0(s)[1]


def _lou_step(
    xT: torch.Tensor,
    gap_x: torch.Tensor,
    base: torch.Tensor,
    labels: torch.Tensor,
    y: torch.Tensor,
    c: float,
) -> torch.Tensor:
    r"""One Lou et al. step for all clusters at once, in centred (cancellation-free) form.

    ``xT`` (d, n) points, ``gap_x`` = ``1 − c‖x‖²``, ``base`` = ``w / (1 − c‖x‖²)``,
    ``labels`` (n,), ``y`` (k, d) the iterate of every cluster. Segment sums by
    ``bincount`` (no loop over clusters); clusters without weight keep ``y``.

    With ``e_l = x_l − y`` the sums are taken about the iterate,
    :math:`a = \sum\alpha_l`, :math:`u = \sum\alpha_l e_l`,
    :math:`q = \sum\alpha_l\|e_l\|^2`, so that :math:`b = u + a y` and
    :math:`s = q + 2\langle u, y\rangle + a\|y\|^2`; with :math:`\gamma = 1 -
    c\|y\|^2`, :math:`A = a + cs` and :math:`p = q + 2\langle u, y\rangle`,

    .. math::
        A^2 - 4c\|b\|^2 = a^2\gamma^2 + R, \quad
        R = 2acq(2 - \gamma) - 4ac\langle u, y\rangle\gamma + c^2p^2 - 4c\|u\|^2,

        y^+ - y = \frac{2u - \big(cp + R / (a\gamma + \sqrt{a^2\gamma^2 + R})\big)\, y}
                       {A + \sqrt{a^2\gamma^2 + R}},

    algebraically the step :math:`y^+ = 2b / (A + \sqrt{A^2 - 4c\|b\|^2})`, but
    without the cancellation in :math:`A^2 - 4c\|b\|^2` (which, near the
    boundary, turns summation rounding into ~1e-9 jitter of the centroid).
    """
    k, d = y.shape
    yT = y.T.index_select(1, labels)
    eT = xT - yT
    ee = _sqnorm_cols(eT)
    gap_y = _gap((y * y).sum(-1), c)
    t = ee * c / (gap_x * gap_y.index_select(0, labels))
    alpha = base * _g(t)
    a = torch.bincount(labels, weights=alpha, minlength=k)
    q = torch.bincount(labels, weights=alpha * ee, minlength=k)
    u = torch.stack(
        [torch.bincount(labels, weights=alpha * eT[j], minlength=k) for j in range(d)], 1
    ).to(y.dtype)
    uy = (u * y).sum(-1)
    p = q + 2.0 * uy
    big_a = a * (2.0 - gap_y) + c * p  # a + c s, as a (1 + c‖y‖²) + c p
    r = (
        2.0 * a * c * q * (2.0 - gap_y)
        - 4.0 * a * c * uy * gap_y
        + c * c * p * p
        - 4.0 * c * (u * u).sum(-1)
    )
    ag = a * gap_y
    root = (ag * ag + r).clamp_min(0.0).sqrt()
    corr = c * p + r / (ag + root).clamp_min(_MIN_GAP)
    step = (2.0 * u - corr[:, None] * y) / (big_a + root).clamp_min(_MIN_GAP)[:, None]
    y_new = torch.where((a > 0)[:, None], y + step, y)
    return _project_centroids(y_new, c)


def _frechet_iterate(
    xT: torch.Tensor,
    gap_x: torch.Tensor,
    base: torch.Tensor,
    labels: torch.Tensor,
    y: torch.Tensor,
    c: float,
    n_iter: int,
    tol: float,
) -> tuple[torch.Tensor, int, float]:
    """Up to ``n_iter`` Lou steps for all clusters (float64).

    Stops early when no centroid moves by ``tol`` (Poincaré distance), or when
    the largest move has not reached a new minimum for ``_STALL_ITERS`` steps
    (the rounding floor: the iteration itself converges linearly). Returns
    (y, steps run, last largest move).
    """
    shift = math.inf
    best_shift = math.inf
    stalled = 0
    steps = 0
    while steps < n_iter:
        steps += 1
        y_new = _lou_step(xT, gap_x, base, labels, y, c)
        shift = _max_shift(y, y_new, c)
        y = y_new
        if shift < tol:
            break
        if shift < best_shift:
            best_shift, stalled = shift, 0
        else:
            stalled += 1
            if stalled >= _STALL_ITERS:
                break
    return y, steps, shift


# --------------------------------------------------------------------------- public helpers


def _pair_t(
    xc: torch.Tensor, yt: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor, c: float
) -> torch.Tensor:
    """Distance argument ``t`` (r, m) between every row of ``xc`` (r, d) and of ``yt`` (m, d).

    ``gx``, ``gy`` are their gaps ``1 − c‖·‖²``. ``‖x − y‖²`` is summed from the
    differences one coordinate at a time (two (r, m) temporaries, no (r, m, d) one),
    in the order and with the fused multiply-adds of :func:`_col_t`, so the bits
    are those of ``_col_t`` on the matching columns.
    """
    diff = xc[:, 0, None] - yt[None, :, 0]
    diff2 = diff.square()
    for j in range(1, xc.shape[1]):
        torch.sub(xc[:, j, None], yt[None, :, j], out=diff)
        diff2.addcmul_(diff, diff)
    return diff2.mul_(c).div_(gx[:, None] * gy[None, :])


def poincare_pdist2(x: ArrayLike, y: ArrayLike | None = None, *, c: float = 1.0) -> ArrayLike:
    r"""Squared Poincaré distances between all rows of ``x`` (n, d) and ``y`` (m, d): (n, m).

    :math:`d^2 = \frac{4}{c}\operatorname{asinh}^2\sqrt t`,
    :math:`t = c\|x - y\|^2 / ((1 - c\|x\|^2)(1 - c\|y\|^2))`, with ``‖x − y‖²``
    from the differences (accurate near 0), in row chunks of bounded memory.
    Without ``y``, the (n, n) distances among the rows of ``x``: each pair is
    computed once and mirrored, so the result is exactly symmetric with a zero
    diagonal (the same values as ``poincare_pdist2(x, x)``, in about half the time).
    Numpy in, numpy out; torch in, torch out (dtype of ``x``).
    """
    cf = _c_value(c)
    xt = _to_tensor(x, "x")
    yt = xt if y is None else _to_tensor(y, "y", device=xt.device).to(xt.dtype)
    if xt.ndim != 2 or yt.ndim != 2 or xt.shape[1] != yt.shape[1]:
        raise BadInputError(
            f"x and y should be (n, d) and (m, d) arrays, got {tuple(xt.shape)} and {tuple(yt.shape)}"
        )
    n, m = xt.shape[0], yt.shape[0]
    out = torch.empty(n, m, dtype=xt.dtype, device=xt.device)
    if n == 0 or m == 0:
        return _like_input(out, x)
    if xt.shape[1] == 0:
        return _like_input(out.zero_(), x)
    gx = _gap(_sqnorm_cols(xt.T), cf)
    gy = gx if y is None else _gap(_sqnorm_cols(yt.T), cf)
    rows = max(1, _ASSIGN_BLOCK // m)
    if y is None:  # about eight blocks of the upper triangle, each mirrored
        rows = min(rows, -(-n // 8))
        for i in range(0, n, rows):
            blk = _t_to_d2(_pair_t(xt[i : i + rows], xt[i:], gx[i : i + rows], gx[i:], cf), cf)
            out[i : i + rows, i:] = blk
            out[i:, i : i + rows] = blk.T
        return _like_input(out, x)
    for i in range(0, n, rows):
        t = _pair_t(xt[i : i + rows], yt, gx[i : i + rows], gy, cf)
        out[i : i + rows] = _t_to_d2(t, cf)
    return _like_input(out, x)


def poincare_dist(x: ArrayLike, y: ArrayLike | None = None, *, c: float = 1.0) -> ArrayLike:
    r"""Poincaré distances between all rows of ``x`` (n, d) and ``y`` (m, d): (n, m).

    :math:`d(x, y) = \frac{2}{\sqrt c}\operatorname{asinh}\sqrt t`
    :math:`= \frac{1}{\sqrt c}\operatorname{arccosh}\big(1 + \frac{2c\|x - y\|^2}{(1 - c\|x\|^2)(1 - c\|y\|^2)}\big)`.
    Without ``y``, the (n, n) distances among the rows of ``x``, exactly symmetric
    with a zero diagonal (see :func:`poincare_pdist2`).
    Numpy in, numpy out; torch in, torch out.
    """
    d2 = poincare_pdist2(x, y, c=c)
    return np.sqrt(d2) if isinstance(d2, np.ndarray) else d2.sqrt()


def mean_silhouette(dist: ArrayLike, labels: ArrayLike) -> float:
    r"""Mean silhouette of ``labels`` (n,) given pairwise distances ``dist`` (n, n).

    For point ``i`` of cluster ``A``: ``a`` is its mean distance to the other
    points of ``A``, ``b`` the least mean distance to the points of another
    cluster, and :math:`s_i = (b - a) / \max(a, b)` (0 for a point alone in its
    cluster, and where ``a = b = 0``), as scikit-learn's ``silhouette_score``
    with ``metric="precomputed"``. It lies in [-1, 1]; fewer than two clusters
    score -1 (nothing is separated). Float64, numpy in and out; ``dist`` should
    be symmetric with a zero diagonal.
    """
    d = np.asarray(dist.cpu() if isinstance(dist, torch.Tensor) else dist, dtype=np.float64)
    lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    n = len(lab)
    if d.shape != (n, n):
        raise BadInputError(f"dist should be ({n}, {n}) for {n} labels, got {tuple(d.shape)}")
    _, inv = np.unique(lab, return_inverse=True)
    k = int(inv.max()) + 1 if n else 0
    if k < 2:
        return -1.0
    member = np.zeros((n, k))
    member[np.arange(n), inv] = 1.0
    sums = d @ member  # (n, k): summed distance of each point to each cluster
    counts = member.sum(axis=0)
    own = counts[inv]
    rows = np.arange(n)
    a = sums[rows, inv] / np.maximum(own - 1.0, 1.0)
    mean_to = sums / counts
    mean_to[rows, inv] = np.inf
    b = mean_to.min(axis=1)
    top = np.maximum(a, b)
    s = np.zeros(n)
    ok = (own > 1) & (top > 0)
    s[ok] = (b[ok] - a[ok]) / top[ok]
    return float(s.mean())


def _best_by_silhouette(dist: ArrayLike, labelings: list[Any], inertias: list[float]) -> int:
    """Index of the labelling (each (n,), of the points of ``dist``) with the largest mean
    silhouette; ties go to the lower inertia, then the earlier one (``select="silhouette"``,
    here and in ``hypseg cluster``'s Euclidean k-means)."""
    return min(
        range(len(labelings)),
        key=lambda i: (-mean_silhouette(dist, labelings[i]), inertias[i], i),
    )


def frechet_mean(
    x: ArrayLike,
    weights: ArrayLike | None = None,
    *,
    c: float = 1.0,
    max_iter: int = _FRECHET_MAX_ITER,
    tol: float = _FRECHET_TOL,
    init: ArrayLike | None = None,
) -> ArrayLike:
    r"""Weighted Fréchet mean of points ``x`` (n, d) of the ball by Lou et al.'s iteration.

    Minimises :math:`\sum_l w_l\, d(x_l, y)^2`. Each step (see the module
    docstring for the derivation):

    .. math::
        \alpha_l = \frac{w_l\, g(t_l)}{1 - c\|x_l\|^2},\;
        g(t) = \frac{2\operatorname{arccosh}(1 + 2t)}{\sqrt{t^2 + t}},\; g(0) = 4,\;
        y^+ = \frac{2\, b}{(a + cs) + \sqrt{(a + cs)^2 - 4c\|b\|^2}}

    with :math:`a = \sum\alpha_l`, :math:`b = \sum\alpha_l x_l`,
    :math:`s = \sum\alpha_l\|x_l\|^2`, :math:`t_l = c\|x_l - y\|^2 / ((1 -
    c\|x_l\|^2)(1 - c\|y\|^2))`. This is the centroid step of
    :class:`PoincareKMeans` (same code, one cluster).

    Args:
        x: (n, d) points with ``c‖x‖² < 1``.
        weights: (n,) non-negative weights with a positive sum (default: all 1).
        c: curvature magnitude (the ball has curvature ``-c``).
        max_iter: at most this many iterations.
        tol: stop when the iterate moves less than ``tol`` (Poincaré distance).
        init: (d,) starting point (default: the weighted Euclidean mean, which
            lies in the ball by convexity).

    Returns:
        (d,) the mean, computed in float64; numpy in -> numpy out, torch in ->
        torch out, in the dtype of ``x``.
    """
    cf = _c_value(c)
    xt = _to_tensor(x, "x")
    _check_ball_points(xt, "x", cf)
    x64 = xt.to(torch.float64)
    n, d = x64.shape
    if weights is None:
        w = torch.ones(n, dtype=torch.float64, device=x64.device)
    else:
        w = _to_tensor(weights, "weights", device=x64.device).to(torch.float64)
        if w.shape != (n,):
            raise BadInputError(
                f"weights should have shape ({n},) like the rows of x, got {tuple(w.shape)}"
            )
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not float(w.sum()) > 0:
            raise BadInputError("weights should be finite, non-negative and have a positive sum")
    if not is_whole(max_iter, 1):
        raise BadInputError(f"max_iter={max_iter!r} should be an integer >= 1")
    if init is None:
        y0 = (w[:, None] * x64).sum(0) / w.sum()
    else:
        y0 = _to_tensor(init, "init", device=x64.device).to(torch.float64).reshape(-1)
        if y0.shape[0] != d:
            raise BadInputError(f"init should have {d} coordinates like x, got {y0.shape[0]}")
        _check_ball_points(y0[None], "init", cf)
    xT = x64.T.contiguous()
    gap_x = _gap(_sqnorm_cols(xT), cf)
    labels = torch.zeros(n, dtype=torch.int64, device=x64.device)
    y, _, _ = _frechet_iterate(
        xT, gap_x, w / gap_x, labels, y0[None].clone(), cf, int(max_iter), float(tol)
    )
    return _like_input(y[0].to(xt.dtype), x)


# --------------------------------------------------------------------------- k-means


@dataclass
class _Run:
    centers: torch.Tensor
    labels: torch.Tensor
    inertia: float
    n_iter: int


def _as_rng(random_state: Any) -> np.random.Generator:
    if isinstance(random_state, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=random_state))
        return np.random.default_rng(seed)
    if isinstance(random_state, np.random.RandomState):
        return np.random.default_rng(random_state.randint(0, 2**31 - 1, size=4))
    if isinstance(random_state, bool) or isinstance(random_state, float):
        raise BadInputError(
            f"random_state={random_state!r} should be None, an int or a numpy/torch Generator"
        )
    try:
        return np.random.default_rng(random_state)
    except (TypeError, ValueError):
        raise BadInputError(
            f"random_state={random_state!r} should be None, an int or a numpy/torch Generator"
        ) from None


class PoincareKMeans:
    r"""k-means on the Poincaré ball of curvature ``-c`` with Fréchet-mean centroids.

    Minimises the inertia :math:`\sum_i d(x_i, \mu_{\ell_i})^2` (Poincaré
    distance, see the module docstring) by Lloyd iterations:

    1. init: k-means++ on squared Poincaré distances, seeded (greedy:
       ``2 + ⌊ln k⌋`` candidates per centre, keeping the one that lowers the
       potential most, as scikit-learn does);
    2. assign every point to the centre of smallest
       ``‖x − μ_j‖² / (1 − c‖μ_j‖²)`` (the argmin of the distance, no arccosh;
       ties go to the lowest index), in chunks; an empty cluster takes the
       point farthest from its centre (ties: lowest index; never the last point
       of its cluster), empty clusters in increasing order;
    3. update every centroid at once by ``frechet_iters`` Lou et al. steps
       warm-started at the previous centroid;
    4. stop when the labels no longer change or no centroid moves by ``tol``
       (Poincaré distance); a restart stops already when an iteration moves at
       most ``_RESTART_SETTLED`` = 0.1% of its points to another cluster.

    Schedule (seeded by ``random_state``): draw the fit sample (at most
    ``fit_samples`` points) and, from it, the restart sample (at most
    ``_RESTART_SAMPLES`` = 16 384 points); run ``n_init`` restarts (1-4) on
    the restart sample and keep one (``select``): the one of least inertia
    there, or (``"silhouette"``) the one whose labels have the largest mean
    silhouette (:func:`mean_silhouette`, Poincaré distances) on a seeded subset
    of at most ``_SILHOUETTE_SAMPLES`` = 2 000 points of the restart sample,
    drawn after the restarts (so both choose among the same restarts; ties go
    to the lower inertia). Inertia favours splitting a large, spread-out
    cluster; the silhouette favours clusters that lie apart. Refine the
    kept restart by
    Lloyd iterations (1-4) on the fit sample, where each time the labels are
    stable the centroids are polished (Lou iteration to moves below
    ``min(tol, 1e-12)``, at most 200 steps) and the points reassigned, until a
    polish changes no label (or ``max_iter``; the centroids are then polished
    once more). So ``cluster_centers_`` are the Fréchet means of their clusters
    in the fit sample. Finally every input point is assigned (``labels_``,
    ``inertia_``).

    Args:
        n_clusters: number of clusters ``k``.
        n_init: number of k-means++ restarts.
        max_iter: most Lloyd iterations per restart, and for the refinement.
        tol: centroid movement (Poincaré distance) below which a run stops.
        random_state: None (fresh entropy), int, or numpy/torch Generator.
        c: curvature magnitude (the ball has curvature ``-c``).
        fit_samples: the fit uses at most this many points (a seeded random
            subsample); None uses all.
        frechet_iters: Lou steps per Lloyd iteration (the final centroids are
            iterated to convergence regardless; more steps per iteration only
            cost time on typical data).
        device: torch device for the computation (default: that of a tensor
            input, else CPU).
        select: how the kept restart is chosen: ``"inertia"`` (least) or
            ``"silhouette"`` (largest mean silhouette; see above).

    Attributes:
        cluster_centers_: (k, d) float64 numpy array, the Fréchet means.
        labels_: (n,) int64 numpy array, the cluster of every input point.
        inertia_: float, :math:`\sum_i d(x_i, \mu_{\ell_i})^2` over *all* points
            given to ``fit``, with ``labels_`` (float64, exact differences).
        n_iter_: Lloyd iterations of the kept restart plus those of its refinement.
        n_features_in_: ``d``.

    Precision: centroids, k-means++ and the Lloyd iterations on the samples
    are float64. The assignment of all points (``labels_``, ``predict``) runs
    in float32 for float32 (or half) input and in float64 for float64 input;
    a point whose nearest centre the rounding of the expanded scores could
    change (a bound of (d + 5) eps per score) is assigned again from exact
    differences in float64, so the labels are those of float64 arithmetic
    except at ties within its rounding. Near the rim, where the expanded form
    cancels, that is most points of a tight cluster (in float32 alone 7-73% of
    them were misassigned at radius 0.999-0.9999); elsewhere 1e-5 to 7e-4 of
    them. Centres that only float32 makes equal send the whole input to float64.
    """

    def __init__(
        self,
        n_clusters: int = 8,
        *,
        n_init: int = 4,
        max_iter: int = 100,
        tol: float = 1e-6,
        random_state: Any = None,
        c: float = 1.0,
        fit_samples: int | None = 200_000,
        frechet_iters: int = 1,
        device: torch.device | str | None = None,
        select: str = "inertia",
    ) -> None:
        self.n_clusters = n_clusters
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.c = c
        self.fit_samples = fit_samples
        self.frechet_iters = frechet_iters
        self.device = device
        self.select = select

    def __repr__(self) -> str:
        return (
            f"PoincareKMeans(n_clusters={self.n_clusters}, n_init={self.n_init}, max_iter={self.max_iter}, "
            f"tol={self.tol}, random_state={self.random_state!r}, c={self.c}, "
            f"fit_samples={self.fit_samples}, frechet_iters={self.frechet_iters}, device={self.device!r}, "
            f"select={self.select!r})"
        )

    # ------------------------------------------------------------------ validation

    def _check_params(self) -> None:
        def _int_at_least(name: str, value: Any, low: int) -> None:
            if not is_whole(value, low):
                raise BadInputError(f"{name}={value!r} should be an integer >= {low}")

        _int_at_least("n_clusters", self.n_clusters, 1)
        _int_at_least("n_init", self.n_init, 1)
        _int_at_least("max_iter", self.max_iter, 1)
        _int_at_least("frechet_iters", self.frechet_iters, 1)
        if self.fit_samples is not None:
            _int_at_least("fit_samples", self.fit_samples, 1)
        try:
            tol_ok = math.isfinite(float(self.tol)) and float(self.tol) >= 0
        except (TypeError, ValueError):
            tol_ok = False
        if not tol_ok:
            raise BadInputError(f"tol={self.tol!r} should be a float >= 0")
        _c_value(self.c)
        if self.select not in SELECT_CHOICES:
            raise BadInputError(
                f"select={self.select!r} should be one of {', '.join(SELECT_CHOICES)}"
            )

    def _device_for(self, X: ArrayLike) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        if isinstance(X, torch.Tensor):
            return X.device
        return torch.device("cpu")

    def _validate(self, X: ArrayLike) -> torch.Tensor:
        xt = _to_tensor(X, "X", device=self._device_for(X))
        _check_ball_points(xt, "X", float(self.c))
        return xt

    # ------------------------------------------------------------------ core steps

    def _assign_cols(
        self, xT: torch.Tensor, xx: torch.Tensor, centers: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Assign the columns of ``xT`` (d, n) (float64, with ``xx = ‖x‖²``) in chunks.

        Returns labels (n,) and ``t`` of each point to its centre (n,) (expanded form).
        """
        c = float(self.c)
        n, k = xT.shape[1], centers.shape[0]
        y2 = (centers * centers).sum(-1)
        inv_gap_y = 1.0 / _gap(y2, c)
        repeats = _repeats(centers)
        labels = torch.empty(n, dtype=torch.int64, device=xT.device)
        best = torch.empty(n, dtype=xT.dtype, device=xT.device)
        cols = assign_chunk_rows(k)
        for i in range(0, n, cols):
            sl = slice(i, i + cols)
            best[sl], labels[sl] = _argmin0(
                _scores(xT[:, sl], centers, y2, inv_gap_y, xx[sl], repeats)
            )
        return labels, best.mul_(c).div_(_gap(xx, c))

    def _assign_rows(
        self, x: torch.Tensor, centers64: torch.Tensor, *, with_inertia: bool
    ) -> tuple[torch.Tensor, float]:
        """Labels of the rows of ``x`` (n, d), in chunks, in float32 (float32 input) or float64.

        With ``with_inertia``, also ``Σ d(x, centre)²`` from exact differences in float64.
        """
        c = float(self.c)
        n, k = x.shape[0], centers64.shape[0]
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        centers = centers64.to(dtype)
        y2_64 = (centers64 * centers64).sum(-1)
        y2 = y2_64.to(dtype)
        inv_gap_y64 = 1.0 / _gap(y2_64, c)
        inv_gap_y = inv_gap_y64.to(dtype)
        centersT64 = centers64.T
        repeats = _repeats(centers)  # (equal in the working dtype)
        repeats64 = _repeats(centers64)
        if dtype != torch.float64 and not _same_repeats(repeats, repeats64):
            # centres that only float32 merges: their scores would tie, so work in float64
            return self._assign_rows(x.to(torch.float64), centers64, with_inertia=with_inertia)
        labels = torch.empty(n, dtype=torch.int64, device=x.device)
        inertia = 0.0
        # twice the rounding bound (d + 5) eps of one expanded score per unit of
        # (‖x‖ + ‖y‖)², at the largest factor 1 / (1 − c‖y‖²) (see _near_ties)
        err = 2.0 * (x.shape[1] + 5) * torch.finfo(dtype).eps * float(inv_gap_y.max())
        y_max = float(y2_64.max().sqrt())
        rows = assign_chunk_rows(k)
        for i in range(0, n, rows):
            xT = x[i : i + rows].T.to(dtype).contiguous()
            xx = _sqnorm_cols(xT)
            s = _scores(xT, centers, y2, inv_gap_y, xx, repeats)
            best, idx = _argmin0(s)
            near = _near_ties(s, best, xx, y_max, err)
            if near is not None:
                idx[near] = _exact_argmin(xT[:, near], centers64, inv_gap_y64, repeats64)
            labels[i : i + rows] = idx
            if with_inertia:
                x64T = xT.to(torch.float64)
                inertia += float(
                    _t_to_d2(_col_t(x64T, centersT64.index_select(1, idx), c), c).sum()
                )
        return labels, inertia

    def _relocate_empty(
        self, xT: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, centers: torch.Tensor
    ) -> None:
        """Give each empty cluster (increasing order) the farthest point of a cluster of >= 2 points.

        Updates ``labels``, ``t`` and ``centers`` in place. Deterministic: points
        are taken by decreasing ``t``, ties by increasing index.
        """
        k = centers.shape[0]
        counts = torch.bincount(labels, minlength=k)
        empty = torch.nonzero(counts == 0).flatten().tolist()
        if not empty:
            return
        order = torch.sort(t, descending=True, stable=True).indices
        counts_list = counts.tolist()
        pos = 0
        for e in empty:
            while pos < order.numel() and counts_list[int(labels[order[pos]])] < 2:
                pos += 1
            if pos == order.numel():
                break  # fewer distinct points than clusters: leave it empty (fit warns)
            p = int(order[pos])
            pos += 1
            counts_list[int(labels[p])] -= 1
            counts_list[e] += 1
            labels[p] = e
            t[p] = 0.0
            centers[e] = xT[:, p]

    def _kmeans_pp(
        self, xT: torch.Tensor, xx: torch.Tensor, rng: np.random.Generator
    ) -> torch.Tensor:
        """Greedy k-means++ with squared Poincaré distances on the columns of ``xT`` (float64)."""
        c = float(self.c)
        (d, n), k = xT.shape, int(self.n_clusters)
        n_trials = 2 + int(math.log(k))
        gap_x = _gap(xx, c)
        centers = torch.empty(k, d, dtype=xT.dtype, device=xT.device)

        def d2_to(idx: torch.Tensor) -> torch.Tensor:  # (len(idx), n) squared distances
            cand = xT[:, idx].T
            s = torch.addmm(xx[idx][:, None] + xx[None, :], cand, xT, alpha=-2.0).clamp_min_(0.0)
            return _t_to_d2(s.mul_(c).div_(gap_x[idx][:, None] * gap_x[None, :]), c)

        first = int(rng.integers(n))
        centers[0] = xT[:, first]
        closest = d2_to(torch.tensor([first], device=xT.device))[0]
        pot = float(closest.sum())
        for j in range(1, k):
            if pot > 0:
                r = torch.from_numpy(rng.random(n_trials) * pot).to(
                    device=xT.device, dtype=xT.dtype
                )
                cand = torch.searchsorted(torch.cumsum(closest, 0), r).clamp_max_(n - 1)
            else:  # every point coincides with a centre: any point will do
                cand = torch.from_numpy(rng.integers(n, size=n_trials)).to(xT.device)
            d2 = torch.minimum(d2_to(cand), closest[None, :])
            pots = d2.sum(1)
            best = int(torch.argmin(pots))
            centers[j] = xT[:, int(cand[best])]
            closest = d2[best].contiguous()
            pot = float(pots[best])
        return centers

    def _lloyd(
        self,
        xT: torch.Tensor,
        xx: torch.Tensor,
        centers: torch.Tensor,
        *,
        polish: bool,
        max_iter: int,
        settled: int = 0,
    ) -> _Run:
        """Lloyd iterations from ``centers`` on the columns of ``xT`` (float64).

        Stops when at most ``settled`` labels change (none, by default) or no
        centroid moves by ``tol``.
        With ``polish``, the centroids are then iterated to convergence and the
        points reassigned, going on while labels change; the returned centres
        are the converged Fréchet means of the returned labels.
        """
        c = float(self.c)
        tol = float(self.tol)
        gap_x = _gap(xx, c)
        base = 1.0 / gap_x
        polish_tol = min(tol, _FRECHET_TOL)
        labels, t = self._assign_cols(xT, xx, centers)
        self._relocate_empty(xT, labels, t, centers)
        n_iter = 0
        polished = False
        while n_iter < max_iter:
            n_iter += 1
            old = centers
            centers, _, _ = _frechet_iterate(
                xT, gap_x, base, labels, centers, c, int(self.frechet_iters), 0.0
            )
            shift = _max_shift(old, centers, c)
            new_labels, t = self._assign_cols(xT, xx, centers)
            self._relocate_empty(xT, new_labels, t, centers)
            changed = int(torch.count_nonzero(new_labels != labels))
            labels = new_labels
            if changed <= settled or shift < tol:
                if not polish:
                    break
                centers, _, _ = _frechet_iterate(
                    xT, gap_x, base, labels, centers, c, _FRECHET_MAX_ITER, polish_tol
                )
                new_labels, t = self._assign_cols(xT, xx, centers)
                self._relocate_empty(xT, new_labels, t, centers)
                same = bool(torch.equal(new_labels, labels))
                labels = new_labels
                if same:
                    polished = True
                    break
        if polish and not polished:  # max_iter reached: centres = means of the final labels
            centers, _, _ = _frechet_iterate(
                xT, gap_x, base, labels, centers, c, _FRECHET_MAX_ITER, polish_tol
            )
        yT = centers.T.index_select(1, labels)
        inertia = float(_t_to_d2(_col_t(xT, yT, c), c).sum())
        return _Run(centers, labels, inertia, n_iter)

    def _by_silhouette(
        self,
        xrT: torch.Tensor,
        xrx: torch.Tensor,
        runs: list[tuple[torch.Tensor, float, int]],
        rng: np.random.Generator,
    ) -> tuple[torch.Tensor, int]:
        """Centres and Lloyd iterations of the restart whose labels have the largest mean
        silhouette on a seeded subset of the restart sample (ties: lower inertia, then
        the earlier restart)."""
        n = xrT.shape[1]
        size = min(n, _SILHOUETTE_SAMPLES)
        pick = torch.from_numpy(np.sort(rng.choice(n, size=size, replace=False))).to(xrT.device)
        subT, subx = xrT.index_select(1, pick), xrx.index_select(0, pick)
        dist = poincare_dist(subT.T, c=float(self.c))
        labelings = [self._assign_cols(subT, subx, centers)[0] for centers, _, _ in runs]
        kept = _best_by_silhouette(dist, labelings, [inertia for _, inertia, _ in runs])
        return runs[kept][0], runs[kept][2]

    # ------------------------------------------------------------------ public API

    def fit(
        self, X: ArrayLike, y: Any = None, *, callback: Callable[[int, float], None] | None = None
    ) -> PoincareKMeans:
        """Fit on ``X`` (n, d) points of the ball; returns ``self``.

        ``y`` is ignored (scikit-learn convention). ``callback(run, inertia)``,
        if given, is called after each of the ``n_init`` restarts (progress;
        ``run`` counts from 1; ``inertia`` on the restart sample).
        """
        self._check_params()
        xt = self._validate(X)
        n, d = xt.shape
        k = int(self.n_clusters)
        if n < k:
            raise BadInputError(f"n_samples={n} should be >= n_clusters={k}")
        rng = _as_rng(self.random_state)
        fit_n = n if self.fit_samples is None else min(n, int(self.fit_samples))
        if fit_n < k:
            raise BadInputError(f"fit_samples={self.fit_samples} should be >= n_clusters={k}")
        if fit_n < n:
            idx = torch.from_numpy(np.sort(rng.choice(n, size=fit_n, replace=False))).to(xt.device)
            xsT = xt.index_select(0, idx).T.to(torch.float64).contiguous()
        else:
            xsT = xt.T.to(torch.float64).contiguous()
        xx = _sqnorm_cols(xsT)
        # restarts on a smaller seeded subset of the fit sample, refinement on all of it
        restart_n = min(fit_n, _RESTART_SAMPLES)
        if restart_n < fit_n:
            ridx = torch.from_numpy(np.sort(rng.choice(fit_n, size=restart_n, replace=False))).to(
                xt.device
            )
            xrT, xrx = xsT.index_select(1, ridx), xx.index_select(0, ridx)
        else:
            xrT, xrx = xsT, xx
        max_iter = int(self.max_iter)
        # every restart's centres, inertia and iterations (small; n_init >= 1 is checked)
        runs: list[tuple[torch.Tensor, float, int]] = []
        settled = int(_RESTART_SETTLED * restart_n)
        for run in range(int(self.n_init)):
            res = self._lloyd(
                xrT,
                xrx,
                self._kmeans_pp(xrT, xrx, rng),
                polish=False,
                max_iter=max_iter,
                settled=settled,
            )
            runs.append((res.centers, res.inertia, res.n_iter))
            if callback is not None:
                callback(run + 1, res.inertia)
        if self.select == "silhouette" and len(runs) > 1:
            best_centers, best_iter = self._by_silhouette(xrT, xrx, runs, rng)
        else:  # least inertia, the first of equals
            best_centers, _, best_iter = min(runs, key=lambda r: r[1])
        final = self._lloyd(xsT, xx, best_centers.clone(), polish=True, max_iter=max_iter)
        labels, inertia = self._assign_rows(xt, final.centers, with_inertia=True)
        self.cluster_centers_ = final.centers.cpu().numpy()
        self.labels_ = labels.cpu().numpy()
        self.inertia_ = inertia
        self.n_iter_ = best_iter + final.n_iter
        self.n_features_in_ = d
        n_distinct = int(np.unique(self.labels_).size)
        if n_distinct < k:
            warnings.warn(
                f"Number of distinct clusters ({n_distinct}) found smaller than n_clusters ({k}); "
                "possibly due to duplicate points in X",
                ConvergenceWarning,
                stacklevel=2,
            )
        return self

    def predict(self, X: ArrayLike) -> np.ndarray:
        """Cluster index (int64 numpy, (n,)) of every point of ``X``: the nearest centre.

        Uses ``cluster_centers_`` only, so centres loaded from elsewhere and set
        on an unfitted estimator work too.
        """
        if getattr(self, "cluster_centers_", None) is None:
            raise NotFittedError(
                "This PoincareKMeans instance is not fitted yet; call fit(X) before predict(X)"
            )
        centers = torch.from_numpy(np.array(self.cluster_centers_, dtype=np.float64, ndmin=2))
        _check_ball_points(centers, "cluster_centers_", float(self.c))  # (set from elsewhere)
        xt = self._validate(X)
        if xt.shape[1] != centers.shape[1]:
            raise BadInputError(
                f"X has {xt.shape[1]} features, but PoincareKMeans has centres with {centers.shape[1]}"
            )
        labels, _ = self._assign_rows(xt, centers.to(xt.device), with_inertia=False)
        return labels.cpu().numpy()

    def fit_predict(self, X: ArrayLike, y: Any = None) -> np.ndarray:
        """``fit(X)`` and return ``labels_`` (int64 numpy, (n,))."""
        return self.fit(X).labels_
