"""cluster --nest: the band around the coarse labels' boundaries and its fill, against brute force."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
from clitools import run

from hypsegcli.nesting import band_mask, band_sources, bare_labels, fill_band


def _random_regions(rng, shape, n_labels):
    """A few smooth-ish regions: labels of the nearest of a few random seeds (Voronoi cells)."""
    seeds = rng.uniform(0, 1, (n_labels * 2, 3)) * np.array(shape)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    nearest = ((grid[..., None, :] - seeds) ** 2).sum(-1).argmin(-1)
    return (nearest % n_labels).astype(np.int16)


def _brute_distance_to_other(coarse):
    """Distance of every voxel to the nearest voxel centre of another label (float64, loops)."""
    pts = np.argwhere(np.ones(coarse.shape, bool)).astype(np.float64)
    flat = coarse.reshape(-1)
    out = np.full(len(flat), np.inf)
    for i, p in enumerate(pts):
        other = flat != flat[i]
        if other.any():
            out[i] = np.sqrt(((pts[other] - p) ** 2).sum(1)).min()
    return out.reshape(coarse.shape)


@pytest.mark.parametrize("n_labels", [2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_band_and_fill_match_brute_force(n_labels, seed):
    rng = np.random.default_rng(seed)
    shape = (9, 8, 7)
    coarse = _random_regions(rng, shape, n_labels)
    dist = _brute_distance_to_other(coarse)
    labels = rng.integers(0, 5, shape).astype(np.uint8)
    pts = np.argwhere(np.ones(shape, bool)).astype(np.float64)
    for width in (0.5, 1.0, 1.5, 2.3, 4.0):
        band = band_mask(coarse, width)
        np.testing.assert_array_equal(band, dist <= width, err_msg=f"width {width}")
        out = fill_band(labels, coarse, band)
        assert out.dtype == labels.dtype
        np.testing.assert_array_equal(out[~band], labels[~band])
        for v in np.argwhere(band):
            region = (coarse == coarse[tuple(v)]).reshape(-1)
            source = region & ~band.reshape(-1)
            if not source.any():  # no voxel to take a label from: kept
                assert out[tuple(v)] == labels[tuple(v)]
                continue
            d = np.sqrt(((pts[source] - v) ** 2).sum(1))
            # the label of one of the nearest source voxels of the same region (ties allowed)
            nearest = labels.reshape(-1)[source][np.isclose(d, d.min())]
            assert out[tuple(v)] in nearest, (width, v)
        # the sources, computed once and reused for other labels (as cluster does for every
        # nested k): each band voxel of a region with voxels off the band has one, off the
        # band in its own region, at the least distance
        targets, sources = band_sources(coarse, band)
        flat, off = coarse.reshape(-1), ~band.reshape(-1)
        has_source = [off[flat == flat[i]].any() for i in np.flatnonzero(band)]
        assert sorted(targets.tolist()) == np.flatnonzero(band)[has_source].tolist()
        for t, s in zip(targets, sources, strict=True):
            assert off[s] and flat[s] == flat[t]
            d = np.sqrt(((pts[off & (flat == flat[t])] - pts[t]) ** 2).sum(1))
            assert np.isclose(np.sqrt(((pts[s] - pts[t]) ** 2).sum()), d.min())
        other = rng.integers(0, 5, shape).astype(np.int64)
        np.testing.assert_array_equal(
            fill_band(other, coarse, band, (targets, sources)), fill_band(other, coarse, band)
        )


def test_band_by_shifts_is_the_band_by_distance_transforms():
    """cluster's band (the largest and least label within the width, by shifted runs) is the
    one of a Euclidean distance transform per label, on random regions of 2 to 5 labels
    with and without a mask, sides down to 1, widths up to the shifts' limit and beyond."""
    from hypsegcli.nesting import BALL_MAX_WIDTH, _band_mask_edt

    rng = np.random.default_rng(7)
    widths = (1.0, math.sqrt(2), 1.5, math.sqrt(3), 2.0, 3.7, 4.0, 6.0, BALL_MAX_WIDTH, 17.5)
    for shape in [(1, 9, 9), (2, 3, 11), (10, 12, 9), (16, 5, 14)]:
        for n_labels in (2, 3, 5):
            coarse = _random_regions(rng, shape, n_labels).astype(rng.choice([np.uint8, np.int16]))
            for inside in (None, rng.random(shape) > 0.3):
                values = np.unique(coarse if inside is None else coarse[inside])
                if len(values) < 2:
                    continue
                for width in widths:
                    np.testing.assert_array_equal(
                        band_mask(coarse, width, inside),
                        _band_mask_edt(coarse, width, values, inside),
                        err_msg=f"{shape} {n_labels} labels, width {width}",
                    )


def test_band_edge_cases():
    one = np.zeros((4, 4, 4), np.uint8)
    assert not band_mask(one, 3.0).any()
    two = one.copy()
    two[2:] = 1
    assert not band_mask(two, 0.0).any() and not band_mask(two, 0.9).any()
    np.testing.assert_array_equal(band_mask(two, 1.0)[:, 0, 0], [False, True, True, False])
    # a region wholly inside the band keeps its own labels
    labels = np.arange(64, dtype=np.int32).reshape(4, 4, 4)
    band = band_mask(two, 5.0)
    assert band.all()
    np.testing.assert_array_equal(fill_band(labels, two, band), labels)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            band_mask(two, bad)
    with pytest.raises(ValueError):
        fill_band(labels, two[:3], band[:3])


def _cell_with_shell(path):
    """Background 0, a ball ('cell', 10) with a 2-voxel outer shell of mixed value 5 and a small
    ball ('organelle', 7) inside; the shell outnumbers the organelle about 6 to 1."""
    n = 40
    g = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).astype(float)
    r = np.sqrt(((g - 19.5) ** 2).sum(-1))
    r_org = np.sqrt(((g - np.array([19.5, 19.5, 24.0])) ** 2).sum(-1))
    img = np.zeros((n, n, n), np.float32)
    img[r < 14] = 5.0
    img[r < 12] = 10.0
    img[r_org < 4] = 7.0
    truth = np.zeros(img.shape, np.uint8)
    truth[r < 14] = 1
    truth[r_org < 4] = 2
    nib.save(nib.Nifti1Image(img, np.diag([1.5, 1.5, 2.0, 1.0])), path)
    return truth


def test_nesting_gives_the_small_structure_its_own_cluster(tmp_path, capsys):
    """Intensity k-means at k = 3 spends a cluster on the shell around the ball (merging the
    organelle with it or with the cell) unless k = 3 is nested in k = 2's labels."""
    images = tmp_path / "images"
    images.mkdir()
    truth = _cell_with_shell(images / "cell.nii.gz")
    organelle = truth == 2

    def cluster(out, ks, *extra):
        """Intensity k-means of the volume at ``ks`` into ``out``, no Potts prior, snap or MRF."""
        ks_args = [arg for k in ks for arg in ("--k", str(k))]
        return run(
            ["cluster", images, "--features", "intensity", *ks_args, "-o", tmp_path / out]
            + ["--smooth", "0", "--snap", "0", "--mrf", "0", *extra],
            capsys,
        )

    def organelle_labels(out, *extra):
        code, _, err = cluster(out, (2, 3), *extra)
        assert code == 0, err
        labels = np.asarray(nib.load(tmp_path / out / "cell_k3.nii.gz").dataobj)
        own = np.unique(labels[organelle])
        return labels, own

    labels, own = organelle_labels("nested", "--nest", "4")
    assert len(own) == 1
    # the organelle's label is its own: no other voxel carries it
    np.testing.assert_array_equal(labels == own[0], organelle)
    record = json.loads((tmp_path / "nested" / "cell.centroids.json").read_text())
    assert record["header"]["nest"] == 4.0
    assert [(s["k"], s["nested_in"]) for s in record["sets"]] == [(2, None), (3, 2)]
    labels, own = organelle_labels("plain", "--nest", "0")
    assert len(own) == 1 and (labels == own[0]).sum() > 2 * organelle.sum()
    record = json.loads((tmp_path / "plain" / "cell.centroids.json").read_text())
    assert record["header"]["nest"] == 0.0
    assert [(s["k"], s["nested_in"]) for s in record["sets"]] == [(2, None), (3, None)]
    # k = 3 alone into the nested folder: not nested, so redone (the k = 2 set is kept)
    code, out, err = cluster("nested", (3,), "--nest", "4", "--json")
    assert code == 0, err
    assert [v["status"] for v in json.loads(out)["volumes"]] == ["done"]
    record = json.loads((tmp_path / "nested" / "cell.centroids.json").read_text())
    assert [(s["k"], s["nested_in"]) for s in record["sets"]] == [(2, None), (3, None)]
    # a bad width is a usage error
    code, _, err = cluster("x", (2,), "--nest", "-1")
    assert code == 2 and "--nest" in err


def test_bare_labels_are_those_with_no_voxel_off_the_band():
    coarse = np.zeros((12, 12, 12), dtype=np.uint8)
    coarse[:, :, 5:8] = 1  # a sheet 3 voxels thick: wholly within 2 voxels of label 0
    coarse[:1, :1, :1] = 2
    band = band_mask(coarse, 2.0)
    assert bare_labels(coarse, band) == [1, 2]
    assert bare_labels(coarse, band_mask(coarse, 1.0)) == [2]  # the sheet's middle is off
    inside = coarse != 2
    assert bare_labels(coarse, band_mask(coarse, 1.0, inside), inside) == []


def test_a_coarse_label_wholly_in_the_band_leaves_the_volume_unnested(tmp_path, capsys):
    """A thin bright sheet is k = 2's label 1, all of it within --nest 4 of the background: a
    fit of k = 4 without the band would have none of its voxels (which would then take
    labels made for the background), so the volume is clustered as with --nest 0."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(3)
    img = rng.normal(0.0, 0.08, (24, 24, 24)).astype(np.float32)
    img[:, :, 10:14] += 1.0
    img[:, :, 11:13] += 0.5  # two levels inside the sheet, for the finer k
    img[:12, :, :10] += 0.3  # and two in the background
    nib.save(nib.Nifti1Image(img, np.eye(4)), images / "sheet.nii.gz")

    def cluster(out, *extra):
        code, _, err = run(
            ["cluster", images, "--features", "intensity", "--k", "2", "--k", "4"]
            + ["-o", tmp_path / out, "--smooth", "0", "--snap", "0", "--mrf", "0", *extra],
            capsys,
        )
        assert code == 0, err
        record = json.loads((tmp_path / out / "sheet.centroids.json").read_text())
        labels = np.asarray(nib.load(tmp_path / out / "sheet_k4.nii.gz").dataobj)
        return labels, record, err

    nested, record, err = cluster("nested", "--nest", "4")
    plain, _, _ = cluster("plain", "--nest", "0")
    np.testing.assert_array_equal(nested, plain)
    sheet = np.zeros(img.shape, dtype=bool)
    sheet[:, :, 10:14] = True
    assert len(np.unique(nested[sheet])) == 2  # the sheet keeps labels of its own
    assert not np.isin(np.unique(nested[sheet]), np.unique(nested[~sheet])).any()
    sets = {s["k"]: s for s in record["sets"]}
    assert sets[4]["nested_in"] == 2 and "not_nested" not in sets[2]
    assert (
        sets[4]["not_nested"] == "label(s) 1 of k=2 lie wholly within 4 voxel(s) of another label"
    )
    # narrower, the band leaves the sheet's middle: nested as usual
    _, record, _ = cluster("narrow", "--nest", "1")
    assert all("not_nested" not in s for s in record["sets"])
    assert "the larger k are not nested (--nest): label(s) 1 of k=2" in err


def test_a_band_leaving_fewer_voxels_than_k_is_logged(tmp_path, capsys):
    """The other reason a larger k is not nested (fewer than k voxels off the band) was in
    the record only; the README says the log names it too, as it names the first."""
    rng = np.random.default_rng(0)
    img = np.zeros((7, 3, 3), np.float32)
    img[4:] = 10.0
    img += rng.normal(0, 0.1, img.shape).astype(np.float32)
    nib.save(nib.Nifti1Image(img, np.eye(4)), tmp_path / "small.nii.gz")
    code, _, err = run(
        ["cluster", tmp_path / "small.nii.gz", "--features", "intensity", "--k", "2"]
        + ["--k", "30", "--nest", "2", "--smooth", "0", "--snap", "0", "--mrf", "0"]
        + ["-o", tmp_path / "s"],
        capsys,
    )
    assert code == 0, err
    record = json.loads((tmp_path / "s" / "small.centroids.json").read_text())
    reason = {s["k"]: s for s in record["sets"]}[30]["not_nested"]
    assert reason == "fewer than 30 voxels lie off the band"
    assert f"small.nii.gz: k=30 is not nested (--nest): {reason}" in err
