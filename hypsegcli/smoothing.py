"""Potts (Markov random field) smoothing of a cluster assignment.

k-means labels every voxel on its own. On noisy volumes a voxel's
neighbours are evidence too: a Potts prior rewards a label that agrees with
the labels around it, as Atropos' MRF term does. hypseg uses mean-field
inference, synchronous over the whole volume:

.. math::

    q_{ik} \\propto \\exp\\Big(-\\frac{d^2(x_i, \\mu_k)}{T}
        + \\beta \\sum_{j \\in N(i)} q_{jk}\\Big)

with :math:`d^2` the squared distance of voxel i's features to centre k
(Poincaré or Euclidean, the one k-means used), :math:`N(i)` its 26
neighbours (none outside the volume), the temperature T the mean squared
distance of the voxels to their nearest centre (so that beta does not depend
on the scale of the features), q initialised from the unary term alone and
updated ``iters`` times; the label is the argmax of q. beta = 0 gives the
k-means labels.

The volume is processed in slabs along its first axis with a halo of
``iters`` planes on each inner side: after t synchronous updates a plane's
values depend only on planes within t of it, so the slabs' labels equal
those of the whole volume at once, in bounded memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from .errors import BadInputError

#: Mean-field updates of :func:`smooth_labels`.
SMOOTH_ITERS = 10
#: Voxels x clusters of one slab (float32: 4 bytes each, a few copies at once).
SLAB_ELEMENTS = 1 << 25

SqDist = Callable[[np.ndarray, np.ndarray], np.ndarray]


def neighbour_sum(
    q: torch.Tensor, work: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """Sum of ``q`` (k, X, Y, Z) over each voxel's 26 neighbours (zero outside the volume).

    A separable 3x3x3 box sum (two shifted adds per axis) minus the voxel
    itself; it made the whole prior 2.0-2.6x faster than a 3-D convolution did on
    the CPU (128^3, k = 2-8, ``benchmarks/smooth_speed.py``). ``work``: two
    tensors of ``q``'s shape and dtype to compute in (the result is one of
    them); without them two are allocated. With them :func:`meanfield`
    allocates nothing per update: on the CPU a fresh array of over 32 MiB is
    mapped anew by glibc and page-faulted in each time, and reusing two made the
    updates 2.0-2.7x faster at 128^3, k = 2-8, with the same bits.
    """
    a, b = work if work is not None else (torch.empty_like(q), torch.empty_like(q))
    src, dst = q, a
    for dim in (1, 2, 3):
        n = src.shape[dim]
        if n > 1:  # dst = src + src shifted by one each way, added in that order
            torch.add(
                src.narrow(dim, 1, n - 1), src.narrow(dim, 0, n - 1), out=dst.narrow(dim, 1, n - 1)
            )
            dst.narrow(dim, 0, 1).copy_(src.narrow(dim, 0, 1))
            dst.narrow(dim, 0, n - 1).add_(src.narrow(dim, 1, n - 1))
        else:
            dst.copy_(src)
        src, dst = dst, (b if dst is a else a)
    return src.sub_(q)


def meanfield(
    unary: torch.Tensor,
    beta: float,
    iters: int = SMOOTH_ITERS,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean-field Potts marginals q (k, X, Y, Z) from scaled unary energies ``unary`` (k, X, Y, Z).

    ``q = softmax(-unary + beta * (sum of q over the 26 neighbours))``,
    updated ``iters`` times from ``q = softmax(-unary)``, over the class axis.
    ``keep`` (X, Y, Z, bool): q is zero elsewhere (voxels outside a mask are
    nobody's neighbours, as if beyond the volume's border). Each update is
    computed in two work tensors allocated once, and written over the last q.
    """
    if unary.ndim != 4:
        raise BadInputError(f"unary energies should be (k, X, Y, Z), got {tuple(unary.shape)}")
    q = torch.softmax(-unary, dim=0)
    if keep is not None:
        q.mul_(keep)
    if beta == 0 or iters == 0:
        return q
    work = (torch.empty_like(q), torch.empty_like(q))
    for _ in range(iters):
        logits = neighbour_sum(q, work).mul_(beta).sub_(unary)
        torch.softmax(logits, 0, out=q)  # written over the last q, which the logits used
        if keep is not None:
            q.mul_(keep)
    return q


def first_argmax(q: torch.Tensor) -> torch.Tensor:
    """``q.argmax(0)`` of marginals ``q`` (k, ...): the first class of the largest value.

    torch's ``argmax`` over the first axis reads it with a stride of the whole
    volume and took about 200 ms at 128^3 for k = 2-8 (2 threads); a maximum
    and one comparison per class take 9-26 ms. The same indices, ties to the
    first class included; where a value is NaN, ``argmax`` itself decides.
    """
    best = q.amax(0)
    if torch.isnan(best).any():
        return q.argmax(0)
    idx = torch.full(best.shape, q.shape[0] - 1, dtype=torch.int64, device=q.device)
    for i in range(q.shape[0] - 2, -1, -1):  # downwards: the first class of a tie is kept
        idx.masked_fill_(q[i] == best, i)
    return idx


def temperature(features: np.ndarray, centers: np.ndarray, sq_dist: SqDist, block: int) -> float:
    """Mean over the rows of ``features`` (n, d) of the squared distance to the nearest centre.

    In chunks of ``block`` rows; 1.0 when every row sits on a centre.
    """
    total, n = 0.0, len(features)
    for start in range(0, n, block):
        chunk = np.asarray(features[start : start + block], dtype=np.float64)
        total += float(sq_dist(chunk, centers).min(axis=1).sum())
    return _mean_min(total, n)


def _mean_min(total: float, n: int) -> float:
    """Temperature from the sum ``total`` of n nearest-centre squared distances (1.0 if not positive)."""
    t = float(total) / max(n, 1)
    return t if t > 0 and np.isfinite(t) else 1.0


def slab_planes(plane: int, k: int, iters: int, slab_elements: int = SLAB_ELEMENTS) -> int:
    """Planes in the core of each slab of :func:`smooth_labels` (halos of ``iters`` each side).

    About ``slab_elements`` voxels x clusters per slab, but cores of at least
    4 * iters planes, so the halos add at most half the work.
    """
    return max(4 * iters, 1, slab_elements // max(plane * k, 1) - 2 * iters)


def slabs(planes: int, core: int, iters: int) -> Iterator[tuple[int, int, int, int]]:
    """The slabs of a volume of ``planes`` planes: ``(a, b, lo, hi)`` per slab, its core
    ``[a, b)`` of at most ``core`` planes and that core with halos of ``iters`` planes,
    clipped at the volume's ends, ``[lo, hi)``."""
    for a in range(0, planes, core):
        b = min(planes, a + core)
        yield a, b, max(0, a - iters), min(planes, b + iters)


def smooth_labels(
    features: np.ndarray,
    centers: np.ndarray,
    sq_dist: SqDist,
    *,
    beta: float,
    iters: int = SMOOTH_ITERS,
    temp: float | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    slab_elements: int = SLAB_ELEMENTS,
    inside: np.ndarray | None = None,
) -> np.ndarray:
    """Potts-smoothed labels (X, Y, Z) of per-voxel ``features`` (X, Y, Z, d) and ``centers`` (k, d).

    ``sq_dist(rows, centers)`` gives squared distances (n, k) in float64;
    ``temp`` defaults to :func:`temperature` over the whole volume. With
    ``inside`` (X, Y, Z, bool; ``cluster --mask``) the voxels outside it are
    nobody's neighbours and do not count for the temperature; they get label
    0 (meaningless: the caller sets them). The
    volume is processed in slabs of about ``slab_elements`` voxels x
    clusters with halos of ``iters`` planes (same labels as one slab); a
    volume that fits one slab has its distances computed once, for the
    temperature and the updates (11-12% faster at 128^3, k = 4 and 8).
    Labels are in the smallest unsigned dtype that holds k - 1.
    """
    if features.ndim != 4:
        raise BadInputError(f"features should be (X, Y, Z, d), got {tuple(features.shape)}")
    if not beta >= 0:
        raise BadInputError(f"smoothing beta={beta} should be >= 0")
    centers = np.asarray(centers, dtype=np.float64)
    X, Y, Z, d = features.shape
    given = len(centers)
    # repeated centres (k above the distinct feature values): the copies would share their
    # voxels' marginals, and a label with a single centre would outweigh them in every
    # neighbourhood. One copy each, labelled at the end as k-means does: the first.
    first = np.sort(np.unique(centers, axis=0, return_index=True)[1]) if given else None
    if first is not None and len(first) < given:
        centers = centers[first]
    else:
        first = None
    k = len(centers)
    flat = features.reshape(-1, d)
    plane = Y * Z
    out = np.empty((X, Y, Z), dtype=np.min_scalar_type(max(k - 1, 0)))
    step = slab_planes(plane, k, iters, slab_elements)
    if inside is not None:
        inside = np.asarray(inside, dtype=bool)
        if inside.shape != (X, Y, Z):
            raise BadInputError(f"mask {inside.shape} and features {(X, Y, Z)} differ in shape")
    whole = None
    if step >= X:  # one slab: its distances also give the temperature, computed once
        whole = sq_dist(np.asarray(flat, dtype=np.float64), centers)
        if temp is None:
            nearest = whole.min(axis=1)
            if inside is not None:
                nearest = nearest[inside.reshape(-1)]
            temp = _mean_min(nearest.sum(), len(nearest))
    elif temp is None and inside is None:
        temp = temperature(flat, centers, sq_dist, max(plane, 1 << 16))
    elif temp is None:  # over the voxels inside only, in chunks of planes
        rows = max(1, (1 << 16) // max(plane, 1))
        total, count = 0.0, 0
        for a in range(0, X, rows):
            sel = inside[a : a + rows].reshape(-1)
            chunk = np.asarray(flat[a * plane : (a + rows) * plane][sel], dtype=np.float64)
            if len(chunk):
                total += float(sq_dist(chunk, centers).min(axis=1).sum())
                count += len(chunk)
        temp = _mean_min(total, count)
    for a, b, lo, hi in slabs(X, step, iters):
        if whole is None:
            d2 = sq_dist(np.asarray(flat[lo * plane : hi * plane], dtype=np.float64), centers)
        else:
            d2, whole = whole, None
        d2 /= temp  # (rows, k)
        unary = torch.from_numpy(d2).to(device=device, dtype=dtype).T.reshape(k, hi - lo, Y, Z)
        del d2
        keep = None
        if inside is not None:
            keep = torch.from_numpy(inside[lo:hi]).to(device=device, dtype=dtype)
        q = meanfield(unary, beta, iters, keep)
        del unary
        out[a:b] = first_argmax(q[:, a - lo : b - lo]).cpu().numpy()  # 0 outside ``inside``
    if first is not None:  # the copies' labels as the caller numbers them
        return first[out].astype(np.min_scalar_type(max(given - 1, 0)))
    return out
