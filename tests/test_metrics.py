"""Scoring: Dice matrix, Hungarian matching, Hausdorff / HD95 (hand-computed and brute force)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from hypsegcli.errors import BadInputError
from hypsegcli.metrics import (
    CaseScore,
    dice_matrix,
    match_labels,
    score_case,
    surface_distances,
)


def _cube(shape, lo, hi):
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    return m


def _brute_surface(mask):
    """Voxels with a face neighbour outside the mask; outside the array is background."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    all_in = np.ones_like(mask)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            all_in &= np.roll(padded, step, axis=axis)[inner]
    return mask & ~all_in


def _brute_hd(a, b, spacing):
    pa = np.argwhere(_brute_surface(a)) * np.asarray(spacing)
    pb = np.argwhere(_brute_surface(b)) * np.asarray(spacing)
    d = cdist(pa, pb)
    both = np.concatenate([d.min(axis=1), d.min(axis=0)])
    return both.max(), np.percentile(both, 95)


def _blobs(rng, shape, k):
    """A label volume of k classes from a smoothed random field (every class present)."""
    from scipy import ndimage

    f = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    return np.digitize(f, np.quantile(f, np.linspace(0, 1, k + 1)[1:-1]))


# --------------------------------------------------------------------------- Dice


def test_dice_matrix_two_boxes_by_hand():
    shape = (10, 10, 10)
    a = _cube(shape, (0, 0, 0), (4, 4, 4))  # 64 voxels
    b = _cube(shape, (2, 1, 0), (6, 5, 3))  # 48 voxels; a & b: 2 * 3 * 3 = 18
    pred, gt = a.astype(np.int16), b.astype(np.int16)
    d, pl, gl = dice_matrix(pred, gt)
    assert pl.tolist() == [0, 1] and gl.tolist() == [0, 1]
    # |pred 0| = 936, |gt 0| = 952, |bg & bg| = 1000 - (64 + 48 - 18) = 906,
    # |a \ b| = 46, |b \ a| = 30.
    expected = np.array(
        [[2 * 906 / (936 + 952), 2 * 30 / (936 + 48)], [2 * 46 / (64 + 952), 2 * 18 / (64 + 48)]]
    )
    np.testing.assert_allclose(d, expected, rtol=0, atol=1e-15)
    assert d[1, 1] == pytest.approx(36 / 112)


def test_dice_matrix_matches_formula_per_pair():
    """The docstring formula, pair by pair, against the one-pass confusion matrix."""
    rng = np.random.default_rng(3)
    pred = rng.integers(0, 5, size=(9, 8, 7))
    gt = rng.integers(2, 6, size=(9, 8, 7))
    d, pl, gl = dice_matrix(pred, gt, pred_labels=[4, 0, 9], gt_labels=[5, 2, 7])
    for i, lab in enumerate([4, 0, 9]):
        for j, cls in enumerate([5, 2, 7]):
            p, g = pred == lab, gt == cls
            den = p.sum() + g.sum()
            ref = 1.0 if den == 0 else 2 * (p & g).sum() / den
            assert d[i, j] == pytest.approx(ref, abs=1e-15)
    assert d[2, 2] == 1.0  # both absent: both-empty convention
    assert pl.tolist() == [4, 0, 9] and gl.tolist() == [5, 2, 7]


def test_dice_matrix_wide_label_range_uses_general_path():
    pred = np.array([[[-5, 10**12], [10**12, -5]]], dtype=np.int64)
    gt = np.array([[[0, 1], [1, 1]]], dtype=np.uint8)
    d, pl, gl = dice_matrix(pred, gt)
    assert pl.tolist() == [-5, 10**12] and gl.tolist() == [0, 1]
    np.testing.assert_allclose(d, [[2 / 3, 2 * 1 / 5], [0.0, 2 * 2 / 5]])
    d2, _, _ = dice_matrix(pred, gt, pred_labels=[10**12, 3])
    np.testing.assert_allclose(d2, [[0.0, 0.8], [0.0, 0.0]])


def test_match_labels_is_optimal_not_greedy():
    d = np.array([[0.9, 0.8], [0.85, 0.1]])  # greedy: 0.9 + 0.1; optimal: 0.8 + 0.85
    assert match_labels(d) == [(0, 1), (1, 0)]
    assert match_labels(np.zeros((0, 3))) == []
    assert match_labels(np.array([[0.1, 0.7, 0.2]])) == [(0, 1)]
    with pytest.raises(BadInputError, match="2-D"):
        match_labels(np.zeros(3))


# --------------------------------------------------------------------------- score_case


def test_identical_volumes_score_one_and_zero_distance():
    gt = _blobs(np.random.default_rng(0), (16, 14, 12), 4)
    s = score_case(gt, gt.copy(), (1.0, 2.0, 0.5))
    assert s.mean_dice == 1.0
    assert s.mapping == {0: 0, 1: 1, 2: 2, 3: 3} and s.unmatched_labels == ()
    for c in s.classes:
        assert (c.dice, c.hd, c.hd95) == (1.0, 0.0, 0.0)
        assert c.label == c.class_id and c.gt_voxels == c.pred_voxels == (gt == c.class_id).sum()


def test_permuted_labels_are_matched():
    gt = _blobs(np.random.default_rng(1), (12, 12, 12), 4)
    perm = np.array([7, 3, 0, 5])  # class k is predicted as label perm[k]
    s = score_case(perm[gt], gt)
    assert s.mean_dice == 1.0
    assert s.mapping == {7: 0, 3: 1, 0: 2, 5: 3}
    assert [c.label for c in s.classes] == [7, 3, 0, 5]
    assert all(c.hd == 0.0 and c.hd95 == 0.0 for c in s.classes)


def test_fewer_predicted_labels_than_classes():
    shape = (12, 6, 6)
    gt = np.zeros(shape, dtype=np.int32)
    gt[4:7] = 1  # 108 voxels
    gt[7:] = 2  # 180 voxels
    pred = np.zeros(shape, dtype=np.int32)
    pred[4:] = 9  # classes 1 and 2 merged into one label of 288 voxels
    s = score_case(pred, gt, (1.0, 1.0, 1.0))
    assert s.mapping == {0: 0, 9: 2} and s.unmatched_labels == ()
    by_class = {c.class_id: c for c in s.classes}
    assert by_class[0].dice == 1.0
    # Dice(9, 1) = 216 / 396 < Dice(9, 2) = 360 / 468: class 1 is left unmatched, scored
    # against an empty prediction (Dice 0, the diagonal as distance), and counts in the mean.
    missed = by_class[1]
    assert missed.label is None and missed.dice == 0.0 and missed.pred_voxels == 0
    assert missed.hd == missed.hd95 == pytest.approx(math.sqrt(12**2 + 6**2 + 6**2))
    assert by_class[2].dice == pytest.approx(360 / 468)
    assert s.mean_dice == pytest.approx((1.0 + 0.0 + 360 / 468) / 3)


def test_more_predicted_labels_than_classes():
    shape = (12, 6, 6)
    gt = np.zeros(shape, dtype=np.int32)
    gt[6:] = 1
    pred = np.zeros(shape, dtype=np.int32)
    pred[6:9] = 1
    pred[9:] = 2
    pred[0:2] = 3  # background over-segmented too
    s = score_case(pred, gt)
    assert s.mapping == {0: 0, 1: 1} and s.unmatched_labels == (2, 3)
    assert s.classes[0].dice == pytest.approx(2 * 144 / (144 + 216))
    assert s.classes[1].dice == pytest.approx(2 * 108 / (108 + 216))
    assert s.mean_dice == pytest.approx((s.classes[0].dice + s.classes[1].dice) / 2)


def test_requested_classes_absent_from_gt():
    gt = np.zeros((6, 6, 6), dtype=np.uint8)
    gt[2:4, 2:4, 2:4] = 1
    pred = gt.copy()
    pred[0, 0, 0] = 2  # an extra label where gt has no class 5 voxels
    diag = math.sqrt(3 * 6.0**2)
    s = score_case(pred, gt, classes=[1, 0, 5])
    assert [c.class_id for c in s.classes] == [1, 0, 5]  # the order asked for
    c5 = s.classes[2]
    assert (c5.label, c5.dice, c5.hd, c5.hd95, c5.gt_voxels) == (2, 0.0, diag, diag, 0)
    # Absent from both: the both-empty convention.
    s = score_case(gt, gt, classes=[0, 1, 5])
    c5 = s.classes[2]
    assert (c5.label, c5.dice, c5.hd, c5.hd95, c5.pred_voxels) == (None, 1.0, 0.0, 0.0, 0)
    assert s.mean_dice == 1.0


def test_absent_class_score_does_not_depend_on_the_order_of_classes():
    # label 8 is left over by every class; the empty class 2 takes it (Dice 0) whatever its
    # place in the list (the Hungarian assignment once left this to tie-breaking: Dice 1 or 0)
    gt = np.zeros((6, 6, 6), dtype=np.int64)
    gt[4], gt[5] = 1, 3
    pred = np.zeros_like(gt)
    pred[0, 0, 0] = 8
    means = set()
    for classes in itertools.permutations([0, 1, 2, 3]):
        s = score_case(pred, gt, classes=classes, surface_distances=False)
        by_id = {c.class_id: c for c in s.classes}
        assert (by_id[2].label, by_id[2].dice) == (8, 0.0)
        assert (by_id[1].label, by_id[3].label) == (None, None)
        means.add(round(s.mean_dice, 12))
    assert means == {round(2 * 143 / (215 + 144) / 4, 12)}  # class 0: 143 of 144 voxels
    # two empty classes, one label left over: the smaller id takes it
    s = score_case(pred, gt, classes=[7, 0, 2], surface_distances=False)
    assert [(c.class_id, c.label, c.dice) for c in s.classes[::2]] == [(7, None, 1.0), (2, 8, 0.0)]


def test_tied_matchings_score_the_same_whatever_the_order_or_the_label_values():
    """Review: where two matchings reach the same summed Dice, the solver's choice followed
    the column order (the order of ``classes``) and the labels' values, and the two left a
    different number of labels over, so an absent class scored 1 or 0."""
    gt = np.array([2, 3, 0, 3, 0, 2, 1, 1, 0, 1, 1, 1]).reshape(1, 1, -1)
    pred = np.array([0, 1, 0, 0, 3, 0, 1, 3, 3, 1, 1, 2]).reshape(1, 1, -1)
    means = {
        round(score_case(pred, gt, classes=c, surface_distances=False).mean_dice, 12)
        for c in itertools.permutations([0, 1, 2, 3, 9])
    }
    assert len(means) == 1
    # {10: class 1, 20: class 2} and {10: class 2, 20: class 1} both sum to 0.75; the second
    # matches two overlapping pairs, so no label is left for the absent class 3 (Dice 1)
    gt = np.array([1] * 9 + [2]).reshape(1, 1, -1)
    pred = np.array([10] * 6 + [20] * 3 + [10]).reshape(1, 1, -1)
    swapped = np.where(pred == 10, 20, 10)
    for labels in (pred, swapped):
        s = score_case(labels, gt, classes=[1, 2, 3], surface_distances=False)
        assert s.mean_dice == pytest.approx((0.5 + 0.25 + 1.0) / 3)
    # the tie-break never gives up summed Dice: random cases against brute force
    rng = np.random.default_rng(5)
    for _ in range(300):
        gt = rng.integers(0, 3, size=(1, 1, 9))
        pred = rng.integers(0, 4, size=(1, 1, 9))
        s = score_case(pred, gt, surface_distances=False)
        dice = dice_matrix(pred, gt)[0]
        if dice.shape[0] < dice.shape[1]:
            dice = dice.T  # (a matching pairs min(labels, classes) of them)
        best = max(
            sum(dice[r, c] for c, r in enumerate(perm))
            for perm in itertools.permutations(range(dice.shape[0]), dice.shape[1])
        )
        assert sum(c.dice for c in s.classes) == pytest.approx(best, abs=1e-12)


def test_skip_surface_distances_and_json():
    gt = _blobs(np.random.default_rng(2), (8, 8, 8), 3)
    s = score_case(gt, gt, surface_distances=False)
    assert isinstance(s, CaseScore)
    assert all(c.hd is None and c.hd95 is None for c in s.classes)
    d = s.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["mapping"] == {"0": 0, "1": 1, "2": 2}
    assert d["classes"][0]["hd"] is None and d["classes"][0]["dice"] == 1.0


def test_float_labels_cast_or_rejected():
    gt = _blobs(np.random.default_rng(4), (8, 8, 8), 3)
    a = score_case(gt.astype(np.float32), gt)
    b = score_case(gt, gt.astype(np.float64))
    assert a == b and a.mean_dice == 1.0
    with pytest.raises(BadInputError, match=r"pred should hold integer labels.*0\.5"):
        score_case(gt + 0.5, gt)
    with pytest.raises(BadInputError, match="gt should hold integer labels"):
        score_case(gt, np.where(gt == 1, np.nan, gt))
    with pytest.raises(BadInputError, match="dtype"):
        score_case(gt.astype(complex), gt)
    # labels that int64 cannot hold, or that floats no longer tell apart, are refused rather
    # than wrapped or merged (1e20 and 2e20 became the same int64)
    with pytest.raises(BadInputError, match=r"pred should hold float labels up to 2\^53"):
        score_case(np.where(gt > 0, 1e20, 2e20), gt)
    big = np.where(gt > 0, np.uint64(2**63 + 5), np.uint64(0))
    with pytest.raises(BadInputError, match=r"pred should hold labels up to 2\^63 - 1"):
        score_case(big, gt)
    assert score_case(gt.astype(np.uint64), gt).mean_dice == 1.0


def test_bad_inputs_name_what_came():
    gt = np.zeros((4, 5, 6), dtype=np.int8)
    with pytest.raises(BadInputError, match=r"\(4, 5, 6\).*\(4, 5, 7\)|\(4, 5, 7\).*\(4, 5, 6\)"):
        score_case(np.zeros((4, 5, 7), dtype=np.int8), gt)
    with pytest.raises(BadInputError, match="spacing"):
        score_case(gt, gt, (1.0, 1.0))
    with pytest.raises(BadInputError, match="spacing"):
        score_case(gt, gt, (1.0, 0.0, 1.0))
    with pytest.raises(BadInputError, match="classes.*duplicates"):
        score_case(gt, gt, classes=[0, 0])
    with pytest.raises(BadInputError, match="classes"):
        score_case(gt, gt, classes=[])
    with pytest.raises(BadInputError, match="shape"):
        surface_distances(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)), (1, 1, 1))


# --------------------------------------------------------------------------- distances


@pytest.mark.parametrize(
    ("axis", "spacing", "expected"),
    [
        (0, (2.0, 1.0, 1.0), 2.0),
        (0, (2.0, 1.0, 0.5), 2.0),
        (2, (2.0, 1.0, 0.5), 0.5),
        (1, (2.0, 1.0, 0.5), 1.0),
    ],
)
def test_one_voxel_shift_of_a_cube(axis, spacing, expected):
    shape = (14, 14, 14)
    a = _cube(shape, (4, 4, 4), (10, 10, 10))
    b = np.roll(a, 1, axis=axis)
    hd, hd95 = surface_distances(a, b, spacing)
    assert hd == expected and hd95 == expected
    s = score_case(b.astype(np.uint8), a.astype(np.uint8), spacing)
    assert s.classes[1].hd == expected and s.classes[1].hd95 == expected


def test_disjoint_cubes_by_hand():
    shape = (10, 4, 4)
    a = _cube(shape, (1, 1, 1), (3, 3, 3))  # every voxel of a 2-cube is surface
    b = _cube(shape, (6, 1, 1), (8, 3, 3))
    # a's x=1 voxels are 5 from b's x=6 face, a's x=2 voxels 4; symmetric for b.
    assert surface_distances(a, b, (1, 1, 1)) == (5.0, 5.0)
    assert surface_distances(a, b, (0.5, 3, 3)) == (2.5, 2.5)
    d, _, _ = dice_matrix(a.astype(int), b.astype(int), pred_labels=[1], gt_labels=[1])
    assert d[0, 0] == 0.0


def test_empty_masks_both_ways():
    shape = (5, 6, 7)
    spacing = (1.0, 2.0, 3.0)
    empty = np.zeros(shape, dtype=bool)
    full = _cube(shape, (1, 1, 1), (3, 3, 3))
    diag = math.sqrt(5**2 + 12**2 + 21**2)
    assert surface_distances(empty, empty, spacing) == (0.0, 0.0)
    assert surface_distances(empty, full, spacing) == pytest.approx((diag, diag), abs=1e-12)
    assert surface_distances(full, empty, spacing) == pytest.approx((diag, diag), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_hausdorff_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(6, 13, size=3))
    spacing = tuple(float(s) for s in rng.uniform(0.3, 2.5, size=3))
    a = rng.random(shape) < rng.uniform(0.05, 0.6)
    b = rng.random(shape) < rng.uniform(0.05, 0.6)
    if seed % 2:  # small compact masks away from the border exercise the crop
        a = a & _cube(shape, (1, 2, 1), (4, 5, 5))
        b = b & _cube(shape, (2, 1, 3), (5, 4, 6))
    hd, hd95 = surface_distances(a, b, spacing)
    ref_hd, ref_hd95 = _brute_hd(a, b, spacing)
    assert hd == pytest.approx(ref_hd, abs=1e-6)
    assert hd95 == pytest.approx(ref_hd95, abs=1e-6)
    assert (hd, hd95) == surface_distances(b, a, spacing)  # symmetric


@pytest.mark.parametrize("seed", range(4))
def test_crop_equals_full_volume(seed):
    rng = np.random.default_rng(100 + seed)
    shape = (30, 26, 22)
    spacing = (0.7, 1.9, 1.1)
    a = np.zeros(shape, dtype=bool)
    b = np.zeros(shape, dtype=bool)
    # Blobs near a corner (crop touches the border) or in the middle (crop is interior).
    lo = (0, 0, 0) if seed % 2 else (9, 7, 5)
    box = tuple(slice(o, o + 10) for o in lo)
    a[box] = rng.random((10, 10, 10)) < 0.5
    b[box] = rng.random((10, 10, 10)) < 0.3
    b[tuple(slice(o + 2, o + 8) for o in lo)] = True
    assert surface_distances(a, b, spacing) == pytest.approx(
        surface_distances(a, b, spacing, crop=False), rel=1e-12
    )
