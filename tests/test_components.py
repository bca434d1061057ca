"""``cluster --min-size``: small connected pieces of a label relabelled from their surroundings."""

from __future__ import annotations

import itertools
import json
from collections import deque

import numpy as np
import pytest
from clitools import run
from scipy import ndimage as ndi

from hypsegcli import batch, components, io
from hypsegcli.components import remove_small_components, small_component_mask

NEIGHBOURS = [d for d in itertools.product((-1, 0, 1), repeat=3) if d != (0, 0, 0)]


def _components_by_flood_fill(labels: np.ndarray) -> np.ndarray:
    """Component id per voxel, 26-connected within one label: breadth-first search."""
    comp = np.full(labels.shape, -1, dtype=np.int64)
    n = 0
    for start in itertools.product(*map(range, labels.shape)):
        if comp[start] >= 0:
            continue
        comp[start] = n
        queue = deque([start])
        while queue:
            v = queue.popleft()
            for d in NEIGHBOURS:
                w = tuple(a + b for a, b in zip(v, d, strict=True))
                if all(0 <= a < s for a, s in zip(w, labels.shape, strict=True)):
                    if comp[w] < 0 and labels[w] == labels[v]:
                        comp[w] = n
                        queue.append(w)
        n += 1
    return comp


def _random_labels(rng: np.random.Generator, shape, k: int, sigma: float) -> np.ndarray:
    field = ndi.gaussian_filter(rng.normal(size=(k, *shape)), (0, sigma, sigma, sigma))
    return field.argmax(0).astype(np.int16)


@pytest.mark.parametrize("seed,k,sigma,min_size", [(0, 2, 1.0, 5), (1, 3, 0.7, 8), (2, 4, 1.2, 30)])
def test_matches_flood_fill_and_brute_force_nearest(seed, k, sigma, min_size):
    rng = np.random.default_rng(seed)
    labels = _random_labels(rng, (11, 9, 10), k, sigma)
    comp = _components_by_flood_fill(labels)
    sizes = np.bincount(comp.ravel())
    small = sizes[comp] < min_size
    assert small.any() and not small.all()  # the case is not trivial
    np.testing.assert_array_equal(small_component_mask(labels, min_size), small)

    out = remove_small_components(labels, min_size)
    assert out.dtype == labels.dtype
    np.testing.assert_array_equal(out[~small], labels[~small])
    keep = np.argwhere(~small)
    for v in np.argwhere(small):
        d2 = ((keep - v) ** 2).sum(1)
        nearest = labels[tuple(keep[d2 == d2.min()].T)]
        assert out[tuple(v)] in set(nearest.tolist()), tuple(v)


def test_islands_take_the_label_around_them_and_large_pieces_stay():
    labels = np.zeros((30, 30, 30), dtype=np.uint8)
    labels[5:25, 5:25, 5:25] = 1  # a cube of 8 000 voxels
    labels[14:16, 14:16, 14:16] = 2  # an 8-voxel island inside it
    labels[1, 1, 1] = 1  # a speck in the background
    # a diagonal chain of 12 voxels: 26-connected, one component of 12 voxels
    for i in range(12):
        labels[26 - i // 4, 2 + i, 27] = 3
    out = remove_small_components(labels, 10)
    assert out[14:16, 14:16, 14:16].tolist() == np.ones((2, 2, 2)).tolist()
    assert out[1, 1, 1] == 0
    assert (out == 3).sum() == 12  # the chain is kept: its voxels touch at edges and corners
    assert (out == 1).sum() == 8000 and (out == 0).sum() == 30**3 - 8000 - 12
    # above the chain's size it goes; a label made only of small pieces disappears
    out = remove_small_components(labels, 13)
    assert not (out == 3).any() and not (out == 2).any()
    assert labels[1, 1, 1] == 1  # the input is not modified


def test_no_op_cases_and_bad_sizes():
    rng = np.random.default_rng(3)
    labels = _random_labels(rng, (8, 8, 8), 3, 0.8)
    for size in (0, 1):
        np.testing.assert_array_equal(remove_small_components(labels, size), labels)
    # every piece small: nothing to take a label from, unchanged
    checker = (np.indices((6, 6, 6)).sum(0) % 2).astype(np.int64)  # 26-connected: 2 pieces
    with pytest.warns(UserWarning, match=r"--min-size 1000000: .* \(the largest has 108 voxels\)"):
        np.testing.assert_array_equal(remove_small_components(checker, 10**6), checker)
    one = np.full((4, 4, 4), 7)
    with pytest.warns(UserWarning, match="the largest has 64 voxels"):
        np.testing.assert_array_equal(remove_small_components(one, 1000), one)
    for bad in (-1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="min_size"):
            small_component_mask(labels, bad)


def test_cluster_min_size_option(tmp_path, capsys, monkeypatch):
    """--min-size removes specks from the written labels, is part of the outputs' identity
    (a run with another size redoes them) and is absent from the record when off."""
    data = tmp_path / "data"
    code, _, err = run(
        ["--quiet", "synth", data, "--n", "2", "--size", "24", "--seed", "4"], capsys
    )
    assert code == 0, err
    base = [
        "--quiet",
        "cluster",
        data / "images",
        "--features",
        "intensity",
        "--k",
        "2",
        "--k",
        "4",
    ]
    raw = ["--smooth", "0", "--snap", "0", "--mrf", "0", "--nest", "0", "--json"]

    def cluster(out, *extra):
        code, stdout, err = run([*base, "-o", tmp_path / out, *raw, *extra], capsys)
        assert code == 0, err
        return json.loads(stdout)

    cluster("off")
    first = cluster("on", "--min-size", "20")
    assert first["done"] == 2
    for case in ("case_000", "case_001"):
        for k in (2, 4):
            plain = io.read_volume(tmp_path / "off" / f"{case}_k{k}.nii.gz").data
            cleaned = io.read_volume(tmp_path / "on" / f"{case}_k{k}.nii.gz").data
            np.testing.assert_array_equal(cleaned, remove_small_components(plain, 20))
            assert not small_component_mask(cleaned, 20).any()
        assert (
            json.loads((tmp_path / "on" / f"{case}.centroids.json").read_text())["header"][
                "min_size"
            ]
            == 20
        )
        assert (
            "min_size"
            not in json.loads((tmp_path / "off" / f"{case}.centroids.json").read_text())["header"]
        )
    # with intensity k-means on noisy volumes there are specks to remove
    plain4 = io.read_volume(tmp_path / "off" / "case_000_k4.nii.gz").data
    assert small_component_mask(plain4, 20).any()
    assert cluster("on", "--min-size", "20")["skipped"] == 2
    assert cluster("on", "--min-size", "5")["done"] == 2
    plan = cluster("on", "--min-size", "20", "--dry-run")
    assert plan["config"]["min_size"] == 20
    # the dry run counts the step's time (volumes not yet done); the machine's speed,
    # measured again by each run, is fixed (another process may halve it between them)
    monkeypatch.setattr(batch, "measure_flop_rate", lambda *a, **k: batch.REFERENCE_RATE)
    with_step = cluster("new", "--min-size", "20", "--dry-run")["volumes"]
    without = cluster("new", "--dry-run")["volumes"]
    assert all(a["seconds"] > b["seconds"] for a, b in zip(with_step, without, strict=True))
    code, _, err = run([*base, "-o", tmp_path / "bad", "--min-size", "-1"], capsys)
    assert code == 2 and "--min-size" in err
    # a size no component reaches changes nothing, and says so per volume and k
    code, _, err = run([*base, "-o", tmp_path / "huge", *raw, "--min-size", "1000000"], capsys)
    assert code == 0, err
    for case in ("case_000", "case_001"):
        for k in (2, 4):
            assert f"{case}.nii.gz: k={k}: --min-size 1000000: every connected component" in err
            np.testing.assert_array_equal(
                io.read_volume(tmp_path / "huge" / f"{case}_k{k}.nii.gz").data,
                io.read_volume(tmp_path / "off" / f"{case}_k{k}.nii.gz").data,
            )


def _pocket_case():
    """A pocket of the mask whose nearest kept voxels lie across a one-voxel wall.

    Slice layout (z = 0 only), x to the right, rows down; ``#`` outside the mask:
    rows 0-4 have ``###`` at x 0-2 and a wall at x 4; the pocket is x 3, rows 0-3
    (label 2, 4 voxels); below it a corridor of label 0 opens into the bottom
    rows; label 1 fills x >= 5. The pocket's top voxels are 2 from label 1
    across the wall and 3-4 from the corridor.
    """
    labels = np.zeros((1, 12, 9), dtype=np.uint8)
    labels[..., 5:] = 1
    labels[0, 0:4, 3] = 2
    outside = np.zeros(labels.shape, bool)
    outside[0, 0:5, 0:3] = True
    outside[0, 0:5, 4] = True
    return labels, outside


def test_a_piece_cut_off_by_the_mask_takes_the_label_around_it_inside():
    labels, outside = _pocket_case()
    out = remove_small_components(labels, 5, outside)
    # the nearest kept voxel of the pocket's top is label 1 across the wall; taking it
    # would leave a 2-3 voxel piece of label 1 cut off from the rest: the corridor's
    # label grows in instead, and no piece under the size is left
    assert out[0, 0:4, 3].tolist() == [0, 0, 0, 0]
    assert not small_component_mask(out, 5, outside).any()
    np.testing.assert_array_equal(out[outside], labels[outside])
    assert labels[0, 0, 3] == 2  # the input is not modified
    # a piece of the mask with no component of the size keeps its labels
    alone = labels.copy()
    walled = outside.copy()
    walled[0, 5, 2:5] = True  # closes the pocket's bottom: pocket + x 3 rows 4 only
    walled[0, 4, 3] = False
    alone[0, 4, 3] = 2
    out = remove_small_components(alone, 6, walled)
    np.testing.assert_array_equal(out[0, 0:5, 3], alone[0, 0:5, 3])


@pytest.mark.parametrize("seed", range(12))
def test_no_piece_under_the_size_is_left_where_the_mask_allows(seed, monkeypatch):
    """Random labels and masks: every relabelled voxel ends in a component of the size or
    more, unless its piece of the mask has no kept voxel (then it keeps its label); kept
    and outside voxels never change; a tiny check chunk gives the same result."""
    rng = np.random.default_rng(100 + seed)
    k = int(rng.integers(2, 6))
    min_size = int(rng.integers(3, 30))
    labels = _random_labels(rng, (14, 13, 12), k, float(rng.uniform(0.5, 1.4)))
    outside = ndi.gaussian_filter(rng.normal(size=labels.shape), 1.2) > 0.1
    for mask in (None, outside):
        out = remove_small_components(labels, min_size, mask)
        inside = np.ones(labels.shape, bool) if mask is None else ~mask
        small = small_component_mask(labels, min_size, mask)
        np.testing.assert_array_equal(out[~small], labels[~small])
        pieces, n = ndi.label(inside, structure=np.ones((3, 3, 3)))
        has_kept = np.zeros(n + 1, bool)
        has_kept[pieces[inside & ~small]] = True
        has_kept[0] = False
        left = small_component_mask(out, min_size, mask)
        assert not (left & has_kept[pieces]).any()
        stranded = small & ~has_kept[pieces]
        np.testing.assert_array_equal(out[stranded], labels[stranded])
        monkeypatch.setattr(components, "_CHECK_CHUNK", 7)
        np.testing.assert_array_equal(remove_small_components(labels, min_size, mask), out)
        monkeypatch.undo()
