"""Tests for the synthetic hierarchical volume generator (hypsegcli.synth)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment
from scipy.spatial import ConvexHull, Delaunay
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from hypsegcli import synth
from hypsegcli.errors import BadInputError
from hypsegcli.synth import (
    CLASS_MEAN_INTENSITY,
    CLASSES,
    N_CLASSES,
    SynthCase,
    dataset_description,
    generate_case,
    parent_lut,
)


@pytest.fixture(scope="module")
def cases() -> dict[bool, list[SynthCase]]:
    """A few 50^3 cases of each variant, shared by the slower tests."""
    return {
        irregular: [
            generate_case(np.random.default_rng(seed), irregular=irregular) for seed in range(6)
        ]
        for irregular in (False, True)
    }


def _mean_matched_dice(pred: np.ndarray, truth: np.ndarray, n: int) -> float:
    """Dice of every (cluster, class) pair, Hungarian matching on -Dice, mean over classes."""
    cm = np.bincount(pred.ravel().astype(np.int64) * n + truth.ravel(), minlength=n * n).reshape(
        n, n
    )
    dice = 2.0 * cm / np.maximum(cm.sum(1)[:, None] + cm.sum(0)[None, :], 1)
    rows, cols = linear_sum_assignment(-dice)
    return float(dice[rows, cols].sum() / n)


def _hull_deficit(mask: np.ndarray) -> float:
    """1 - |mask| / |voxels inside the convex hull of the mask's voxel centres|."""
    boundary = np.argwhere(mask & ~ndi.binary_erosion(mask)).astype(np.float64)
    hull = ConvexHull(boundary)
    box = tuple(
        slice(int(lo), int(hi) + 1) for lo, hi in zip(boundary.min(0), boundary.max(0), strict=True)
    )
    grid = np.stack(np.meshgrid(*(np.arange(s.start, s.stop) for s in box), indexing="ij"), -1)
    inside = Delaunay(boundary[hull.vertices]).find_simplex(grid.reshape(-1, 3), tol=1e-6) >= 0
    return 1.0 - mask.sum() / inside.sum()


# --------------------------------------------------------------------------- classes


def test_class_table_is_a_three_level_tree():
    for level, n in ((1, 2), (2, 4), (3, 8)):
        ids = sorted(c.id for c in CLASSES if c.level == level)
        assert ids == list(range(n)) == list(range(N_CLASSES[level]))
        names = [c.name for c in CLASSES if c.level == level]
        assert len(set(names)) == n
    for c in CLASSES:
        if c.level == 1:
            assert c.parent is None
        else:
            assert c.parent in range(N_CLASSES[c.level - 1])
    # every level-2 class splits into exactly two level-3 classes, backgrounds chain
    for parent in range(4):
        assert sum(c.level == 3 and c.parent == parent for c in CLASSES) == 2
    assert [c.parent for c in CLASSES if c.id == 0 and c.level > 1] == [0, 0]


def test_parent_lut_matches_classes():
    for level in (2, 3):
        lut = parent_lut(level)
        expected = {c.id: c.parent for c in CLASSES if c.level == level}
        assert lut.dtype == np.uint8
        assert {i: int(p) for i, p in enumerate(lut)} == expected
    lut = parent_lut(3)
    lut[:] = 0  # a copy: the module's table is untouched
    assert parent_lut(3).any()
    with pytest.raises(BadInputError, match="level"):
        parent_lut(1)


def test_dataset_description_is_json_and_matches_classes():
    desc = dataset_description()
    text = json.dumps(desc)  # plain JSON types only
    back = json.loads(text)
    assert [lv["level"] for lv in back["levels"]] == [1, 2, 3]
    got = {
        (lv["level"], c["id"]): (c["name"], c["parent"])
        for lv in back["levels"]
        for c in lv["classes"]
    }
    assert got == {(c.level, c.id): (c.name, c.parent) for c in CLASSES}
    assert back["description"]
    shapes = back["generator"]["shapes"]  # README: dataset.json holds the generator's parameters
    assert shapes["organelle_a"]["count"] and shapes["vesicles"]["radius"]
    assert synth.__doc__ and "irregular" in synth.__doc__


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "size", [15, 0, -50, (50, 50, 15), (50, 50), (50, 50, 50, 50), "50", 50.0, True, None]
)
def test_bad_size_is_rejected_in_one_line(size):
    with pytest.raises(BadInputError) as info:
        generate_case(np.random.default_rng(0), size)
    msg = str(info.value)
    assert "size" in msg and "\n" not in msg


def test_rng_must_be_a_generator():
    with pytest.raises(BadInputError, match="rng"):
        generate_case(0, 32)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- shapes, determinism


@pytest.mark.parametrize(
    "size, shape", [(32, (32, 32, 32)), ((40, 32, 24), (40, 32, 24)), (16, (16, 16, 16))]
)
@pytest.mark.parametrize("irregular", [False, True])
def test_shapes_and_dtypes(size, shape, irregular):
    case = generate_case(np.random.default_rng(3), size, irregular=irregular)
    assert case.image.shape == shape and case.image.dtype == np.float32
    assert np.isfinite(case.image).all()
    assert sorted(case.labels) == [1, 2, 3]
    for level, lab in case.labels.items():
        assert lab.shape == shape and lab.dtype == np.uint8
        assert lab.max() < N_CLASSES[level]
    assert (case.labels[1] == 1).any() and (case.labels[1] == 0).any()


def test_default_size_is_50(cases):
    case = cases[False][0]
    assert case.image.shape == (50, 50, 50)


@pytest.mark.parametrize("irregular", [False, True])
def test_same_seed_same_bytes(irregular):
    a = generate_case(np.random.default_rng(12345), 40, irregular=irregular)
    b = generate_case(np.random.default_rng(12345), 40, irregular=irregular)
    assert a.image.tobytes() == b.image.tobytes()
    for level in (1, 2, 3):
        assert a.labels[level].tobytes() == b.labels[level].tobytes()
    c = generate_case(np.random.default_rng(12346), 40, irregular=irregular)
    assert a.image.tobytes() != c.image.tobytes()
    assert not np.array_equal(a.labels[3], c.labels[3])


def test_global_numpy_state_is_untouched():
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    generate_case(np.random.default_rng(0), 24)
    assert np.array_equal(np.random.get_state()[1], before)


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize("irregular", [False, True])
def test_labels_nest(cases, irregular):
    lut2, lut3 = parent_lut(2), parent_lut(3)
    for case in cases[irregular]:
        assert np.array_equal(lut3[case.labels[3]], case.labels[2])
        assert np.array_equal(lut2[case.labels[2]], case.labels[1])


@pytest.mark.parametrize("irregular", [False, True])
def test_every_class_present_at_50(cases, irregular):
    # All 8 level-3 classes appeared in 30 of 30 seeds of each variant when
    # calibrated; at 16^3 inclusions and granules may find no room.
    for case in cases[irregular]:
        for level in (1, 2, 3):
            counts = np.bincount(case.labels[level].ravel(), minlength=N_CLASSES[level])
            assert (counts > 0).all(), (level, counts)
        counts = np.bincount(case.labels[3].ravel(), minlength=8)
        assert counts[[1, 3, 5, 7]].min() >= 14  # level-3 objects are a few voxels at least
        assert 0.2 < (case.labels[1] == 1).mean() < 0.5


def test_objects_scale_with_volume():
    small = generate_case(np.random.default_rng(1), 32)
    large = generate_case(np.random.default_rng(1), 64)
    for level in (1, 2):
        f_small = (
            np.bincount(small.labels[level].ravel(), minlength=N_CLASSES[level])
            / small.labels[level].size
        )
        f_large = (
            np.bincount(large.labels[level].ravel(), minlength=N_CLASSES[level])
            / large.labels[level].size
        )
        np.testing.assert_allclose(f_small, f_large, atol=0.06)


def test_irregular_differs_and_is_not_convex(cases):
    regular = [_hull_deficit(c.labels[1] == 1) for c in cases[False][:3]]
    irregular = [_hull_deficit(c.labels[1] == 1) for c in cases[True][:3]]
    assert max(regular) < 0.01  # ellipsoid: convex up to rasterisation
    assert min(irregular) > 0.03  # perturbed: hull a few percent larger
    assert not np.array_equal(cases[False][0].labels[3], cases[True][0].labels[3])


# --------------------------------------------------------------------------- intensity


@pytest.mark.parametrize("irregular", [False, True])
def test_class_means_match_table_and_are_shared(irregular):
    rng = np.random.default_rng(5)
    l3, clean = synth._generate(rng, (50, 50, 50), irregular)
    counts = np.bincount(l3.ravel(), minlength=8)
    means = np.bincount(l3.ravel(), weights=clean.ravel().astype(np.float64), minlength=8) / counts
    table = np.array([CLASS_MEAN_INTENSITY[i] for i in range(8)])
    # textures are centred per class; membranes and vesicle shells are balanced
    np.testing.assert_allclose(means, table, atol=1e-3)
    # cytosol, vesicles, a_matrix, b_matrix share one mean; inclusions and granules another
    assert table[2] == table[3] == table[4] == table[6]
    assert table[5] == table[7]
    # hence the three level-2 classes inside the cell have nearly equal means
    l2 = parent_lut(3)[l3]
    m2 = np.bincount(
        l2.ravel(), weights=clean.ravel().astype(np.float64), minlength=4
    ) / np.bincount(l2.ravel())
    assert np.ptp(m2[1:]) < 0.08
    assert m2[1] - m2[0] > 0.3  # the cell is denser than the background
    # ... but their textures differ: a_matrix and b_matrix vary far more than cytosol
    std = [clean[l3 == k].std() for k in (2, 4, 6)]
    assert std[1] > 2 * std[0] and std[2] > 2 * std[0]


def test_image_is_noisy_and_blurred(cases):
    case = cases[False][0]
    l1 = case.labels[1]
    bg = case.image[ndi.binary_erosion(l1 == 0, iterations=3)]
    cell = case.image[ndi.binary_erosion(l1 == 1, iterations=3)]
    contrast = cell.mean() - bg.mean()
    assert 0.3 < contrast < 0.6
    assert 0.15 < bg.std() < 0.4  # low SNR: per-voxel noise comparable to the contrast


def test_intensity_kmeans_cannot_solve_levels_2_and_3(cases, capsys):
    """Intensity-only k-means (k = 2, 4, 8) scored by mean matched Dice."""
    scores = {}
    with threadpool_limits(1):  # no oversubscription on a busy 2-core machine
        for irregular in (False, True):
            rows = []
            for case in cases[irregular][:2]:
                x = case.image.reshape(-1, 1)
                fit = x[np.random.default_rng(0).choice(x.shape[0], 20_000, replace=False)]
                row = []
                for level, k in ((1, 2), (2, 4), (3, 8)):
                    km = KMeans(n_clusters=k, n_init=3, random_state=0).fit(fit)
                    row.append(_mean_matched_dice(km.predict(x), case.labels[level], k))
                rows.append(row)
            scores[irregular] = np.mean(rows, axis=0)
    with capsys.disabled():
        for irregular, s in scores.items():
            print(
                f"\nintensity k-means mean matched Dice ({'irregular' if irregular else 'regular'}): "
                f"L1 {s[0]:.3f}  L2 {s[1]:.3f}  L3 {s[2]:.3f}"
            )
    for s in scores.values():
        assert 0.6 < s[0] < 0.9  # level 1 partly from intensity, not solved
        assert s[1] < 0.6  # clearly below 1 (and below the lead's bar of 0.8)
        assert s[2] < 0.3


def test_a_cell_cut_by_the_volume_has_no_membrane_along_the_cut():
    """An irregular cell may cross the volume's faces (as a field of view cuts a cell); the
    membrane is drawn where the cell meets the background, not along the faces."""
    l3, img = synth._generate(np.random.default_rng([1, 0]), (50, 50, 50), True)
    cell, cytosol = l3 > 1, l3 == 2
    face = np.ones(cell.shape, dtype=bool)
    face[1:-1, 1:-1, 1:-1] = False
    cut = cytosol & face & ndi.binary_erosion(cell, iterations=2, border_value=1)
    assert cut.sum() > 100  # this case's cell crosses a face widely
    inner = cytosol & ndi.binary_erosion(cell, iterations=3, border_value=1) & ~face
    # the face carries the cytosol's own texture (was 0.76 there against 0.45 inside)
    assert abs(img[cut].mean() - img[inner].mean()) < 0.05
