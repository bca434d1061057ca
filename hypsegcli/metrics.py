"""Scoring a predicted label volume against ground truth: Dice, matching, Hausdorff.

Pure functions on numpy arrays; no file I/O (pairing files, tables and the
command line live in the pipeline and CLI layers).

Definitions
-----------
* **Labels.** ``pred`` and ``gt`` are integer label arrays of one shape
  (integer or bool dtypes; float arrays whose values are all integral are cast,
  any other values are rejected with :class:`~hypsegcli.errors.BadInputError`).
  Every value present in ``pred`` is a candidate label (background cluster
  included). The ground-truth classes scored are ``classes`` (default: the
  values present in ``gt``, background included).
* **Dice** of a predicted label ``l`` and a class ``k`` with masks ``P = (pred
  == l)``, ``G = (gt == k)``::

      Dice(P, G) = 2 |P ∩ G| / (|P| + |G|),   and 1.0 when |P| = |G| = 0.

  All pairs come from one confusion matrix, ``np.bincount`` over
  ``pred_index * (n_classes + 1) + gt_index`` (one extra row/column collects
  voxels of labels/classes that were not asked for, so ``|P|`` and ``|G|`` are
  always the full mask sizes).
* **Matching** (as the paper's evaluation): a one-to-one assignment of labels to
  classes maximising the total Dice, ``scipy.optimize.linear_sum_assignment``
  on ``-Dice``; where several matchings reach the best sum (within
  ``TIE_TOLERANCE``), the one with the most pairs that share voxels, so that
  the scores depend neither on the order of ``classes`` nor on the labels'
  values (tied matchings with as many such pairs give the same mean; which
  class takes which label among them follows the classes' ids and the labels'
  values). With more labels than classes, the labels left over are
  reported as ``unmatched_labels``. With more classes than labels, a class left
  over is scored against an *empty* prediction: Dice 0 (a class the
  segmentation missed is a failure, and it counts in the mean). A class empty
  in ``gt`` (possible only when ``classes`` names it) takes a label left over
  by the other classes where there is one (the smallest, empty classes taken in
  increasing id), as a false
  positive of that class: Dice 0 and HD the diagonal; where none is left, the
  both-empty convention below gives it Dice 1. ``mean_dice`` is the plain mean
  of the per-class Dice over all scored classes, background included.
* **Surfaces.** The surface of a mask ``M`` is ``M & ~binary_erosion(M, S)``
  with ``S`` the 6-connected (face-neighbour) structuring element
  (``generate_binary_structure(ndim, 1)``) and voxels outside the volume
  treated as background, so mask voxels on the volume's border are surface.
* **Directed distances.** For every surface voxel of ``A``, the Euclidean
  distance in physical units to the nearest surface voxel of ``B`` (a k-d tree
  query on the surface voxels' physical coordinates, exact); likewise from
  ``B`` to ``A``. Physical coordinates are the voxel indices mapped by
  ``linear``, the 3x3 linear part of the volume's affine (oblique and sheared
  grids included), or else scaled by ``spacing`` per axis.
* **HD** = the maximum over both directed sets. **HD95** = the 95th percentile
  (``np.percentile``, linear interpolation) of the union (concatenation) of
  both directed sets, as MedPy's ``hd95``.
* **Empty masks.** Both empty: Dice 1.0, HD = HD95 = 0.0. Exactly one empty:
  Dice 0.0, HD = HD95 = the volume's diagonal in physical units,
  ``sqrt(sum((shape[i] * spacing[i])**2))`` (the BraTS convention of a finite
  worst case, e.g. 373.13 mm for 240 x 240 x 155 at 1 mm), which exceeds any
  distance between two voxels of the volume; with ``linear``, the longest of
  the grid's four body diagonals. A class matched to a label with which it
  shares no voxel (Dice 0) is reported with no label and its distances are
  those of an empty prediction, so they do not depend on which of several
  disjoint labels the matching happened to pick.

The erosions run on the bounding box of ``A | B`` grown by one voxel (clipped to
the volume), which is exact: every surface voxel of both masks lies in that box,
and the one voxel margin keeps the erosion at the box's faces identical to the
erosion in the whole volume.

HD95 pools both directions as MedPy does; Google DeepMind's ``surface-distance``
(``compute_robust_hausdorff``) instead takes the larger of the two directed 95th
percentiles, weighted by surface area, so the two libraries' HD95 differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from .errors import BadInputError

__all__ = [
    "HD_PERCENTILE",
    "CaseScore",
    "ClassScore",
    "dice_matrix",
    "match_labels",
    "score_case",
    "surface_distances",
]

HD_PERCENTILE = 95.0
"""Percentile of the pooled directed surface distances reported as HD95."""

# Label ranges up to this many values (or up to the array size, if larger) are
# indexed with a lookup table (O(n)); wider ranges fall back to np.unique (sort).
_LUT_MIN_SPAN = 1 << 16


@dataclass(frozen=True)
class ClassScore:
    """The score of one ground-truth class after matching.

    ``label`` is the predicted label matched to ``class_id`` (``None`` when no
    label was left for it). ``hd`` and ``hd95`` are in the physical units of
    ``spacing`` (``None`` when surface distances were skipped).
    ``pred_voxels`` is the size of the matched label's mask (0 when unmatched).
    """

    class_id: int
    label: int | None
    dice: float
    hd: float | None
    hd95: float | None
    gt_voxels: int
    pred_voxels: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; ``None`` for skipped distances or no label."""
        return {
            "class_id": self.class_id,
            "label": self.label,
            "dice": self.dice,
            "hd": self.hd,
            "hd95": self.hd95,
            "gt_voxels": self.gt_voxels,
            "pred_voxels": self.pred_voxels,
        }


@dataclass(frozen=True)
class CaseScore:
    """The score of one predicted volume against its ground truth.

    ``mean_dice`` is the mean of ``classes[i].dice`` over every scored class
    (unmatched classes included, with their Dice of 0). ``mapping`` maps each
    matched predicted label to its class id; ``unmatched_labels`` lists the
    predicted labels (present in the prediction) that no class took, sorted.
    """

    mean_dice: float
    classes: tuple[ClassScore, ...]
    unmatched_labels: tuple[int, ...]
    mapping: dict[int, int]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types. JSON object keys are strings, so ``mapping``'s
        keys (predicted labels) are written as decimal strings."""
        return {
            "mean_dice": self.mean_dice,
            "classes": [c.to_dict() for c in self.classes],
            "unmatched_labels": list(self.unmatched_labels),
            "mapping": {str(k): v for k, v in self.mapping.items()},
        }


# --------------------------------------------------------------------------- validation


def _as_labels(arr: Any, name: str) -> np.ndarray:
    """An integer label array (bool -> uint8, integral floats -> int64)."""
    arr = np.asarray(arr)
    if arr.size == 0:
        raise BadInputError(f"{name} should be a non-empty label volume, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.dtype == np.uint64 and arr.max() > np.iinfo(np.int64).max:
            raise BadInputError(f"{name} should hold labels up to 2^63 - 1, got {arr.max()}")
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.all():
            bad = arr[~finite].flat[0]
            raise BadInputError(f"{name} should hold integer labels, got {arr.dtype} value {bad}")
        frac = arr != np.trunc(arr)
        if frac.any():
            bad = arr[frac].flat[0]
            raise BadInputError(
                f"{name} should hold integer labels, got non-integral {arr.dtype} values (e.g. {bad})"
            )
        if np.abs(arr).max() > 2**53:  # beyond, floats no longer tell integers apart
            raise BadInputError(
                f"{name} should hold float labels up to 2^53, got {np.abs(arr).max():g}"
            )
        return arr.astype(np.int64)
    raise BadInputError(f"{name} should hold integer labels, got dtype {arr.dtype}")


def _as_id_list(values: Any, name: str) -> np.ndarray:
    """A 1-D int64 array of distinct ids (``classes``, ``pred_labels``, ``gt_labels``)."""
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values)
    if arr.ndim != 1 or arr.size == 0:
        raise BadInputError(
            f"{name} should list at least one integer id, got {list(np.ravel(arr))}"
        )
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise BadInputError(f"{name} should list integer ids, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not (
        np.isfinite(arr).all() and (arr == np.trunc(arr)).all()
    ):
        raise BadInputError(f"{name} should list integer ids, got {arr.tolist()}")
    arr = arr.astype(np.int64)
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise BadInputError(
            f"{name} should list distinct ids, got duplicates {uniq[counts > 1].tolist()}"
        )
    return arr


def _as_spacing(spacing: Any, ndim: int) -> tuple[float, ...]:
    """Voxel size per array axis, finite and > 0."""
    try:
        sp = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise BadInputError(f"spacing should be {ndim} positive numbers, got {spacing!r}") from None
    if len(sp) != ndim or not all(math.isfinite(s) and s > 0 for s in sp):
        raise BadInputError(f"spacing should be {ndim} positive numbers (one per axis), got {sp}")
    return sp


def linear_is_usable(linear: Any, ndim: int = 3) -> bool:
    """Whether ``linear`` (a voxel-to-world linear map) is ndim x ndim, finite and far from
    singular (distinct voxels stay distinct: smallest singular value above 1e-6 times the
    largest)."""
    m = np.asarray(linear, dtype=np.float64)
    if m.shape != (ndim, ndim) or not np.isfinite(m).all():
        return False
    sv = np.linalg.svd(m, compute_uv=False)
    return bool(sv.max() > 0 and sv.min() > 1e-6 * sv.max())


def _as_linear(linear: Any, spacing: Any, ndim: int) -> np.ndarray:
    """The voxel-to-world linear map (ndim x ndim): ``linear`` where
    :func:`linear_is_usable`, else ``diag(spacing)`` (checked by :func:`_as_spacing`)."""
    if linear is not None and linear_is_usable(linear, ndim):
        return np.asarray(linear, dtype=np.float64)
    return np.diag(_as_spacing(spacing, ndim))


def _check_shapes(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise BadInputError(
            f"prediction shape {pred.shape} should equal ground-truth shape {gt.shape}"
        )


# --------------------------------------------------------------------------- Dice


def _index(arr: np.ndarray, labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Flat index of every voxel's label in ``labels`` (``len(labels)`` if absent).

    ``labels=None`` takes the values present in ``arr``, sorted.
    """
    flat = arr.ravel()
    lo, hi = int(flat.min()), int(flat.max())
    span = hi - lo + 1
    if span <= max(_LUT_MIN_SPAN, flat.size) and hi <= np.iinfo(np.int64).max:
        shifted = flat.astype(np.intp) - lo
        if labels is None:
            present = np.flatnonzero(np.bincount(shifted, minlength=span))
            lut = np.zeros(span, dtype=np.intp)
            lut[present] = np.arange(present.size)
            return lut[shifted], present.astype(np.int64) + lo
        lut = np.full(span, labels.size, dtype=np.intp)
        inside = (labels >= lo) & (labels <= hi)
        lut[labels[inside] - lo] = np.flatnonzero(inside)
        return lut[shifted], labels
    uniq, inverse = np.unique(flat, return_inverse=True)
    inverse = inverse.ravel()
    if labels is None:
        return inverse, uniq.astype(np.int64)
    order = np.argsort(labels)
    ordered = labels[order]
    pos = np.minimum(np.searchsorted(ordered, uniq), ordered.size - 1)
    where = np.where(ordered[pos] == uniq, order[pos], labels.size)
    return where[inverse], labels


def _confusion(
    pred: np.ndarray,
    gt: np.ndarray,
    pred_labels: np.ndarray | None,
    gt_labels: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts ``(n_pred + 1, n_gt + 1)``: [i, j] = voxels with label i and class j.

    The last row / column gathers voxels whose value is not in the label /
    class list, so row and column sums are the full mask sizes.
    """
    pi, pl = _index(pred, pred_labels)
    gi, gl = _index(gt, gt_labels)
    ncol = gl.size + 1
    counts = np.bincount(pi * ncol + gi, minlength=(pl.size + 1) * ncol)
    return counts.reshape(pl.size + 1, ncol), pl, gl


def _dice_from_counts(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dice matrix (float64), label sizes, class sizes from a confusion matrix."""
    inter = counts[:-1, :-1].astype(np.float64)
    pred_sizes = counts[:-1].sum(axis=1)
    gt_sizes = counts[:, :-1].sum(axis=0)
    denom = (pred_sizes[:, None] + gt_sizes[None, :]).astype(np.float64)
    dice = np.ones_like(inter)  # both empty -> 1.0
    np.divide(2.0 * inter, denom, out=dice, where=denom > 0)
    return dice, pred_sizes, gt_sizes


def dice_matrix(
    pred: np.ndarray,
    gt: np.ndarray,
    pred_labels: Sequence[int] | None = None,
    gt_labels: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dice of every (predicted label, ground-truth class) pair in one pass.

    ``D[i, j] = 2 |P_i ∩ G_j| / (|P_i| + |G_j|)`` with ``P_i = (pred ==
    pred_labels[i])``, ``G_j = (gt == gt_labels[j])``, and 1.0 where both
    masks are empty. Labels default to the values present (sorted); labels
    asked for but absent have empty masks.

    Returns ``(D, pred_labels, gt_labels)``: ``D`` float64 of shape
    ``(len(pred_labels), len(gt_labels))``, the labels as int64 arrays.
    """
    pred = _as_labels(pred, "pred")
    gt = _as_labels(gt, "gt")
    _check_shapes(pred, gt)
    pl = None if pred_labels is None else _as_id_list(pred_labels, "pred_labels")
    gl = None if gt_labels is None else _as_id_list(gt_labels, "gt_labels")
    counts, pl, gl = _confusion(pred, gt, pl, gl)
    dice, _, _ = _dice_from_counts(counts)
    return dice, pl, gl


#: Matchings whose summed Dice differ by less than this count as tied (score_case).
TIE_TOLERANCE = 1e-9


def match_labels(dice: np.ndarray) -> list[tuple[int, int]]:
    """One-to-one (row, column) pairs maximising the summed Dice (Hungarian).

    ``scipy.optimize.linear_sum_assignment(-dice)``; a rectangular matrix
    gives ``min(n_rows, n_cols)`` pairs, sorted by row.
    """
    dice = np.asarray(dice, dtype=np.float64)
    if dice.ndim != 2:
        raise BadInputError(f"dice should be a 2-D matrix, got shape {dice.shape}")
    if not np.isfinite(dice).all():
        raise BadInputError("dice should hold finite values, got NaN or inf")
    if dice.size == 0:
        return []
    rows, cols = linear_sum_assignment(-dice)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True)]


# --------------------------------------------------------------------------- distances


def _diagonal(shape: Sequence[int], linear: np.ndarray) -> float:
    """The volume's longest body diagonal in physical units (for a diagonal ``linear``,
    sqrt(sum((n_i * s_i)^2)))."""
    sides = np.asarray(shape, dtype=np.float64)
    signs = np.array(
        [(1.0, *rest) for rest in np.ndindex(*(2,) * (len(shape) - 1))], dtype=np.float64
    )
    signs[:, 1:] = 1.0 - 2.0 * signs[:, 1:]  # first axis +, the others +/-: every diagonal once
    return float(np.linalg.norm((signs * sides) @ linear.T, axis=1).max())


def _bbox(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Bounding box of a non-empty mask grown by ``margin``, clipped to the array."""
    box = []
    for axis, n in enumerate(mask.shape):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=others) if others else mask)
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, n)))
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a face neighbour outside the mask (or outside the array)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _hausdorff(
    a: np.ndarray, b: np.ndarray, linear: np.ndarray, *, crop: bool = True
) -> tuple[float, float]:
    """(HD, HD95) of two boolean masks of one shape; see the module docstring."""
    a_any, b_any = bool(a.any()), bool(b.any())
    if not a_any and not b_any:
        return 0.0, 0.0
    if not (a_any and b_any):
        worst = _diagonal(a.shape, linear)
        return worst, worst
    if crop:
        box = _bbox(a | b, margin=1)
        a, b = a[box], b[box]
    from scipy.spatial import cKDTree

    # Nearest surface voxel by k-d tree on physical coordinates: exact, and its
    # memory grows with the surfaces, not with the bounding box (~2x faster
    # than two Euclidean distance transforms on 128^3 blobs).
    pts_a = np.argwhere(_surface(a)) @ linear.T
    pts_b = np.argwhere(_surface(b)) @ linear.T
    a_to_b = cKDTree(pts_b).query(pts_a, k=1)[0]
    b_to_a = cKDTree(pts_a).query(pts_b, k=1)[0]
    hd = max(float(a_to_b.max()), float(b_to_a.max()))
    hd95 = float(np.percentile(np.concatenate([a_to_b, b_to_a]), HD_PERCENTILE))
    return hd, hd95


def surface_distances(
    a: np.ndarray,
    b: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    crop: bool = True,
    linear: Any = None,
) -> tuple[float, float]:
    """Symmetric Hausdorff distance and HD95 of two masks, in physical units.

    ``a`` and ``b`` are masks of one shape (nonzero = inside); ``spacing`` is
    the voxel size per array axis, used where ``linear`` (the affine's 3x3
    linear part) is not given. With ``S(M) = M & ~erode6(M)`` and
    ``d(x, Y) = min_{y in Y} ||L (x - y)||``, ``L = linear`` or ``diag(spacing)``::

        D_ab = {d(x, S(b)) : x in S(a)},   D_ba = {d(y, S(a)) : y in S(b)}
        HD   = max(max D_ab, max D_ba)
        HD95 = percentile_95(D_ab ++ D_ba)      (MedPy's hd95)

    Both empty: ``(0.0, 0.0)``; exactly one empty: the volume's diagonal,
    ``sqrt(sum((shape * spacing)**2))`` (with ``linear``: the longest body
    diagonal), for both. ``crop=False`` takes the surfaces on the whole volume
    rather than the masks' bounding box (same result, slower; for tests).
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise BadInputError(f"mask a shape {a.shape} should equal mask b shape {b.shape}")
    if a.size == 0:
        raise BadInputError(f"masks should be non-empty arrays, got shape {a.shape}")
    return _hausdorff(a != 0, b != 0, _as_linear(linear, spacing, a.ndim), crop=crop)


# --------------------------------------------------------------------------- one case


def score_case(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    classes: Sequence[int] | None = None,
    surface_distances: bool = True,
    linear: Any = None,
) -> CaseScore:
    """Score one predicted label volume against its ground truth.

    Dice of every (label, class) pair, Hungarian matching on ``-Dice``, then
    per class: Dice, and unless ``surface_distances=False`` HD and HD95 (in the
    units of ``linear``, the 3x3 linear part of the affine, or else of
    ``spacing``, the voxel size per array axis; neither is checked without
    distances). ``classes`` lists the
    ground-truth class ids to score, in the order reported (default: those
    present in ``gt``, sorted, background included). Unmatched classes are
    scored against an empty prediction (Dice 0, HD = HD95 = the volume's
    diagonal); all conventions are in the module docstring.

    Raises :class:`BadInputError` for shapes that differ, non-integer labels,
    bad spacing or bad ``classes``.
    """
    pred = _as_labels(pred, "pred")
    gt = _as_labels(gt, "gt")
    _check_shapes(pred, gt)
    lin = _as_linear(linear, spacing, gt.ndim) if surface_distances else None
    wanted = None if classes is None else _as_id_list(classes, "classes")

    counts, pred_labels, gt_labels = _confusion(pred, gt, None, wanted)
    dice, pred_sizes, gt_sizes = _dice_from_counts(counts)
    # The assignment is among the classes present in gt, in class-id order (rows are the
    # labels, sorted), and among matchings whose summed Dice ties (within TIE_TOLERANCE) it
    # takes the one with the most overlapping pairs, so that neither the order of
    # ``classes`` nor the labels' values decide how many labels are left over (below). A
    # class that shares no voxel with its matched label is as good as unmatched: which of
    # several disjoint labels the assignment picked for it is arbitrary (its Dice is 0).
    present = np.flatnonzero(gt_sizes > 0)
    present = present[np.argsort(gt_labels[present], kind="stable")]
    sub = dice[:, present]
    row_of = {
        int(present[c]): row
        for row, c in match_labels(sub + TIE_TOLERANCE * (sub > 0))
        if dice[row, present[c]] > 0
    }
    # a class empty in gt (named by ``classes``) takes the smallest label no class took, in
    # increasing class id, so that the scores do not depend on the order of ``classes``
    taken = set(row_of.values())
    spare = iter(row for row in range(pred_labels.size) if row not in taken)
    for col in sorted(np.flatnonzero(gt_sizes == 0).tolist(), key=lambda c: gt_labels[c]):
        row = next(spare, None)
        if row is not None:
            row_of[col] = row

    scores = []
    for col, class_id in enumerate(gt_labels.tolist()):
        row = row_of.get(col)
        if row is None:
            label, d, n_pred = None, (1.0 if gt_sizes[col] == 0 else 0.0), 0
        else:
            label, d, n_pred = int(pred_labels[row]), float(dice[row, col]), int(pred_sizes[row])
        hd = hd95 = None
        if surface_distances:
            gt_mask = gt == class_id
            pred_mask = np.zeros_like(gt_mask) if label is None else pred == label
            hd, hd95 = _hausdorff(pred_mask, gt_mask, lin)
        scores.append(ClassScore(class_id, label, d, hd, hd95, int(gt_sizes[col]), n_pred))

    mapping = {int(pred_labels[row]): int(gt_labels[col]) for col, row in sorted(row_of.items())}
    unmatched = tuple(int(x) for x in pred_labels.tolist() if x not in mapping)
    mean = float(np.mean([s.dice for s in scores]))
    return CaseScore(mean, tuple(scores), unmatched, mapping)
