"""``cluster --mask``: every step sees only the voxels inside, against references and the CLI."""

from __future__ import annotations

import itertools
import json
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from clitools import run
from scipy import ndimage as ndi

from hypsegcli import io, smoothing
from hypsegcli.components import remove_small_components, small_component_mask
from hypsegcli.config import SamplingConfig
from hypsegcli.edges import noise_std, refine_labels, snap_labels
from hypsegcli.errors import BadInputError
from hypsegcli.nesting import band_mask

OFFSETS = [o for o in itertools.product((-1, 0, 1), repeat=3) if o != (0, 0, 0)]


def _softmax(e):
    e = e - e.max(axis=0, keepdims=True)
    p = np.exp(e)
    return p / p.sum(axis=0, keepdims=True)


def _meanfield_loops(unary, beta, iters, keep):
    """Mean field voxel by voxel over explicit neighbours inside ``keep``, float64."""
    k, X, Y, Z = unary.shape
    q = _softmax(-unary) * keep
    for _ in range(iters):
        nb = np.zeros_like(q)
        for x, y, z in itertools.product(range(X), range(Y), range(Z)):
            for dx, dy, dz in OFFSETS:
                u, v, w = x + dx, y + dy, z + dz
                if 0 <= u < X and 0 <= v < Y and 0 <= w < Z and keep[u, v, w]:
                    nb[:, x, y, z] += q[:, u, v, w]
        q = _softmax(beta * nb - unary) * keep
    return q


def _blob_mask(shape, rng, fill=0.6):
    """A random smooth blob (bool) covering about ``fill`` of the volume."""
    field = ndi.gaussian_filter(rng.normal(size=shape), 2.0)
    return field > np.quantile(field, 1 - fill)


def _labels_and_image(rng, shape=(14, 12, 10), k=3):
    field = ndi.gaussian_filter(rng.normal(size=(k, *shape)), (0, 2, 2, 2))
    labels = field.argmax(0).astype(np.uint8)
    image = (labels * 1.0 + rng.normal(0, 0.3, shape)).astype(np.float32)
    return labels, image


def test_meanfield_with_a_mask_matches_voxel_loops():
    rng = np.random.default_rng(0)
    unary = rng.exponential(1.0, size=(3, 5, 4, 6))
    keep = rng.random((5, 4, 6)) < 0.7
    got = smoothing.meanfield(torch.from_numpy(unary), 0.8, 3, torch.from_numpy(keep)).numpy()
    np.testing.assert_allclose(got, _meanfield_loops(unary, 0.8, 3, keep), rtol=1e-12, atol=1e-14)


def _sq(rows, centers):
    return ((rows[:, None, :] - centers[None]) ** 2).sum(-1)


def test_smoothing_inside_a_mask_ignores_everything_outside():
    rng = np.random.default_rng(1)
    shape = (16, 9, 8)
    feats = rng.normal(size=(*shape, 2)).astype(np.float32)
    centers = rng.normal(size=(3, 2))
    inside = _blob_mask(shape, rng)
    got = smoothing.smooth_labels(feats, centers, _sq, beta=0.9, inside=inside)
    # features outside changed wildly: the same labels inside (no neighbour, no temperature)
    other = feats.copy()
    other[~inside] = rng.normal(0, 50, size=(int((~inside).sum()), 2))
    again = smoothing.smooth_labels(other, centers, _sq, beta=0.9, inside=inside)
    np.testing.assert_array_equal(got[inside], again[inside])
    # the temperature is the mean over the voxels inside
    d2 = _sq(feats.reshape(-1, 2).astype(np.float64), centers).min(1)
    temp = d2[inside.reshape(-1)].mean()
    ref = smoothing.smooth_labels(feats, centers, _sq, beta=0.9, temp=temp, inside=inside)
    np.testing.assert_array_equal(got, ref)
    # slabs with halos give the labels of one piece
    slabs = smoothing.smooth_labels(
        feats, centers, _sq, beta=0.9, inside=inside, slab_elements=3 * 9 * 8 * 2
    )
    np.testing.assert_array_equal(slabs, got)
    # a mask holding everything is no mask
    full = smoothing.smooth_labels(feats, centers, _sq, beta=0.9, inside=np.ones(shape, bool))
    np.testing.assert_array_equal(full, smoothing.smooth_labels(feats, centers, _sq, beta=0.9))


@pytest.mark.parametrize("step", ["snap", "mrf"])
def test_snap_and_mrf_inside_a_mask_ignore_everything_outside(step):
    rng = np.random.default_rng(2)
    labels, image = _labels_and_image(rng)
    inside = _blob_mask(labels.shape, rng)

    def apply(lab, img, outside):
        if step == "snap":
            return snap_labels(lab, img, sigma=1.0, outside=outside)
        return refine_labels(lab, img, beta=0.8, outside=outside)

    shifted = labels.copy()  # boundaries a voxel off, so that there is something to settle
    shifted[1:] = labels[:-1]
    got = apply(shifted, image, ~inside)
    assert not np.array_equal(got[inside], shifted[inside])  # it did move voxels inside
    np.testing.assert_array_equal(got[~inside], shifted[~inside])  # and none outside
    assert set(np.unique(got[inside])) <= set(np.unique(shifted[inside]))
    # other labels and intensities outside: the same result inside
    lab2, img2 = shifted.copy(), image.copy()
    lab2[~inside] = rng.integers(0, 3, int((~inside).sum()))
    img2[~inside] = rng.normal(40, 10, int((~inside).sum()))
    np.testing.assert_array_equal(apply(lab2, img2, ~inside)[inside], got[inside])
    # an empty outside is no mask
    none = np.zeros(labels.shape, bool)
    np.testing.assert_array_equal(apply(shifted, image, none), apply(shifted, image, None))


def test_mrf_variance_floor_ignores_a_wide_outside():
    """The MRF's variance floor was 1e-4 of the whole image's variance: a wide intensity
    range outside the mask inflated the low-contrast labels inside until they no longer
    separated, and the MRF left them as they were (review case: 200 voxels moved, 0)."""
    rng = np.random.default_rng(0)
    shape = (20, 20, 20)
    truth = np.zeros(shape, np.uint8)
    truth[:, :, 10:] = 1
    image = (truth * 0.04 + rng.normal(0, 0.005, shape)).astype(np.float32)
    labels = truth.copy()
    labels[:, :, 10] = 0  # the boundary a voxel off
    inside = np.zeros(shape, bool)
    inside[:, 5:15, 3:17] = True
    got = refine_labels(labels, image, beta=0.5, outside=~inside)
    assert np.count_nonzero(got[inside] != labels[inside]) > 100
    wide = image.copy()
    wide[~inside] = np.where(rng.random(int((~inside).sum())) < 0.5, -4.0, 5.0)
    np.testing.assert_array_equal(refine_labels(labels, wide, beta=0.5, outside=~inside), got)


def test_noise_estimate_inside_a_mask_ignores_a_flat_background():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1.0, (24, 24, 24)).astype(np.float32)
    inside = np.zeros(x.shape, bool)
    inside[6:18, 6:18, 6:18] = True
    x[~inside] = 0.0  # a zero background, three quarters of the volume
    assert noise_std(x) < 0.2  # the background's zero residuals take the median
    assert 0.85 < noise_std(x, inside) < 1.1  # the box mean of N(0, 1) noise: ~0.96
    assert noise_std(x, np.zeros(x.shape, bool)) == 0.0


def _band_reference(coarse, width, inside):
    """Brute force: voxels inside within ``width`` of an inside voxel of another label."""
    pts = np.argwhere(inside)
    vals = coarse[inside]
    band = np.zeros(coarse.shape, bool)
    for p, v in zip(pts, vals, strict=True):
        others = pts[vals != v]
        if len(others) and np.sqrt(((others - p) ** 2).sum(1)).min() <= width:
            band[tuple(p)] = True
    return band


@pytest.mark.parametrize("width", [1.0, 2.5])
def test_band_inside_a_mask_matches_brute_force(width):
    rng = np.random.default_rng(4)
    coarse = ndi.gaussian_filter(rng.normal(size=(2, 10, 9, 8)), (0, 1.5, 1.5, 1.5)).argmax(0)
    inside = _blob_mask(coarse.shape, rng)
    got = band_mask(coarse, width, inside)
    np.testing.assert_array_equal(got, _band_reference(coarse, width, inside))
    np.testing.assert_array_equal(
        band_mask(coarse, width, np.ones(coarse.shape, bool)), band_mask(coarse, width)
    )


def _components_reference(labels, min_size, inside):
    """Flood fill over inside voxels (26-connected), then the nearest inside source voxel."""
    small = np.zeros(labels.shape, bool)
    seen = np.zeros(labels.shape, bool)
    for start in map(tuple, np.argwhere(inside)):
        if seen[start]:
            continue
        comp, stack = [start], [start]
        seen[start] = True
        while stack:
            p = stack.pop()
            for o in OFFSETS:
                q = tuple(np.add(p, o))
                if all(0 <= q[i] < labels.shape[i] for i in range(3)):
                    if inside[q] and not seen[q] and labels[q] == labels[start]:
                        seen[q] = True
                        comp.append(q)
                        stack.append(q)
        if len(comp) < min_size:
            for p in comp:
                small[p] = True
    out = labels.copy()
    sources = np.argwhere(inside & ~small)
    for p in np.argwhere(small):
        d = ((sources - p) ** 2).sum(1)
        nearest = sources[d == d.min()]
        values = {labels[tuple(s)] for s in nearest}
        assert len(values) >= 1
        out[tuple(p)] = labels[tuple(nearest[0])] if len(values) == 1 else out[tuple(p)]
    return small, out, sources


def test_small_components_inside_a_mask_match_flood_fill():
    rng = np.random.default_rng(5)
    labels = (rng.random((9, 8, 7)) < 0.35).astype(np.uint8) + (rng.random((9, 8, 7)) < 0.2)
    inside = _blob_mask(labels.shape, rng, fill=0.7)
    small_ref, out_ref, _ = _components_reference(labels, 4, inside)
    np.testing.assert_array_equal(small_component_mask(labels, 4, ~inside), small_ref)
    got = remove_small_components(labels, 4, ~inside)
    np.testing.assert_array_equal(got[~inside], labels[~inside])  # outside untouched
    # every small voxel took the label of one of its nearest inside sources
    sources = np.argwhere(inside & ~small_ref)
    for p in np.argwhere(small_ref):
        d = ((sources - p) ** 2).sum(1)
        assert got[tuple(p)] in {labels[tuple(s)] for s in sources[d == d.min()]}
    untied = out_ref != labels
    np.testing.assert_array_equal(got[untied], out_ref[untied])
    # labels outside the mask give nothing and take nothing
    other = labels.copy()
    other[~inside] = 7
    np.testing.assert_array_equal(remove_small_components(other, 4, ~inside)[inside], got[inside])
    # nothing inside to take a label from: unchanged, with a warning
    tiny = np.zeros(labels.shape, bool)
    tiny[0, 0, :2] = True
    pair = labels.copy()
    pair[0, 0, :2] = 1
    with pytest.warns(UserWarning, match="the largest has 2 voxels"):
        np.testing.assert_array_equal(remove_small_components(pair, 3, ~tiny), pair)


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def masked(tiny_trained, tmp_path_factory):
    """tiny_trained's data with per-case masks (the cell of level 1) in their own folder."""
    root = tmp_path_factory.mktemp("mask")
    masks = root / "masks"
    masks.mkdir()
    for truth in sorted((tiny_trained / "data" / "labels").glob("*_L1.nii.gz")):
        img = nib.load(truth)
        cell = (np.asarray(img.dataobj) > 0).astype(np.uint8)
        name = truth.name.replace("_L1.nii.gz", "_mask.nii.gz")
        nib.save(nib.Nifti1Image(cell, img.affine), masks / name)
    return root


def _cluster(trained, out, *extra, capsys, code=0):
    got, stdout, err = run(
        [
            "cluster",
            trained / "data" / "images",
            "-m",
            trained / "model.pt",
            "--k",
            "2",
            "--k",
            "3",
            "-o",
            out,
            "--json",
            "--threads",
            "2",
            *extra,
        ],
        capsys,
    )
    assert got == code, err
    return (json.loads(stdout) if stdout.strip() else None), err


def test_cluster_mask_labels_inside_only_and_resubmission(tiny_trained, masked, capsys):
    masks = masked / "masks"
    out = masked / "seg"
    summary, _ = _cluster(tiny_trained, out, "--mask", masks, "--min-size", "3", capsys=capsys)
    assert summary["done"] == 3
    for row in summary["volumes"]:
        case = io.case_name(row["volume"])
        inside = io.read_volume(masks / f"{case}_mask.nii.gz").data > 0
        for k in (2, 3):
            labels = io.read_volume(out / f"{case}_k{k}.nii.gz").data
            assert (labels[~inside] == 0).all()
            assert set(np.unique(labels[inside])) <= set(range(1, k + 1))
            assert row["labels_found"][str(k)] == len(np.unique(labels[inside]))
        record = json.loads((out / f"{case}.centroids.json").read_text())
        assert record["header"]["mask"] == "0 outside, clusters 1..k inside"
        assert record["source"]["mask"]["inside"] == int(inside.sum())
    # the same command again: nothing to do; a run without the mask redoes everything
    again, _ = _cluster(tiny_trained, out, "--mask", masks, "--min-size", "3", capsys=capsys)
    assert again["skipped"] == 3
    # a changed mask redoes its case only
    first = masks / "case_000_mask.nii.gz"
    img = nib.load(first)
    data = np.asarray(img.dataobj).copy()
    data[:5] = 0
    nib.save(nib.Nifti1Image(data, img.affine), first)
    changed, _ = _cluster(tiny_trained, out, "--mask", masks, "--min-size", "3", capsys=capsys)
    assert changed["done"] == 1 and changed["skipped"] == 2
    assert (io.read_volume(out / "case_000_k2.nii.gz").data[:5] == 0).all()
    plain, _ = _cluster(tiny_trained, out, "--min-size", "3", capsys=capsys)
    assert plain["done"] == 3
    # a dry run with the mask plans the three again, their fits cached from the first run
    plan, _ = _cluster(
        tiny_trained, out, "--mask", masks, "--min-size", "3", "--dry-run", capsys=capsys
    )
    assert [v["state"] for v in plan["volumes"]] == ["cached"] * 3
    assert [v["cached_fits"] for v in plan["volumes"]] == [[2, 3]] * 3


@pytest.mark.parametrize("features", ["embedding", "intensity"])
def test_dry_run_estimates_a_masked_fit_on_the_inside(
    tiny_trained, masked, capsys, monkeypatch, features
):
    from hypsegcli import batch

    drawn = []
    real = batch.estimate_kmeans_seconds

    def recording(voxels, ks, **kw):
        if kw["n_init"] > 0 and ks:
            drawn.append((voxels, kw.get("fit_points")))
        return real(voxels, ks, **kw)

    monkeypatch.setattr(batch, "estimate_kmeans_seconds", recording)
    extra = ["--features", "intensity"] if features == "intensity" else []
    out = masked / f"plan-{features}"
    plan, _ = _cluster(
        tiny_trained, out, "--mask", masked / "masks", "--dry-run", *extra, capsys=capsys
    )
    inside = []
    for row in plan["volumes"]:
        case = io.case_name(row["volume"])
        inside.append(
            int((io.read_volume(masked / "masks" / f"{case}_mask.nii.gz").data > 0).sum())
        )
    assert drawn == [(row["voxels"], n) for row, n in zip(plan["volumes"], inside, strict=True)]
    assert all(n < row["voxels"] for row, n in zip(plan["volumes"], inside, strict=True))


def test_cluster_mask_file_pooled_fit_and_intensity(tiny_trained, masked, capsys):
    shape = io.read_volume(tiny_trained / "data" / "images" / "case_000.nii.gz").data.shape
    box = np.zeros(shape, np.uint8)
    box[4:16, 4:16, 4:16] = 1
    one = masked / "box.nii.gz"
    nib.save(nib.Nifti1Image(box, np.eye(4)), one)
    for extra in (["--fit-on", "pooled"], ["--features", "intensity"]):
        out = masked / f"one_{extra[-1]}"
        summary, _ = _cluster(tiny_trained, out, "--mask", one, *extra, capsys=capsys)
        assert summary["done"] == 3
        for k in (2, 3):
            labels = io.read_volume(out / f"case_001_k{k}.nii.gz").data
            assert (labels[box == 0] == 0).all() and (labels[box == 1] > 0).all()


def test_nesting_inside_a_mask_with_256_coarse_labels(tmp_path, capsys):
    """--mask with --nest whose smallest k is 256: the outside became region 255 + 1, which
    wrapped to 0 in the coarse labels' uint8, so band voxels of region 0 took the outside's
    fine label (a fine label spanning two coarse regions). Review's volume: 256 intensity
    blocks, a one-voxel tongue of background running to the mask's border."""
    rng = np.random.default_rng(0)
    vol = np.zeros((36, 28, 28), np.float32)
    slot = 0
    for bx in range(12, 36, 3):
        for by in range(0, 28, 4):
            for bz in range(0, 28, 4):
                slot += bx < 33
                vol[bx : bx + 3, by : by + 4, bz : bz + 4] = min(slot, 255) if bx < 33 else 128
    vol[12:32, 12, 12] = 0
    vol += rng.normal(size=vol.shape).astype(np.float32) * 1e-3
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    mask = np.ones(vol.shape, np.uint8)
    mask[32:] = 0
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "m.nii.gz")
    code, _, err = run(
        ["-q", "cluster", tmp_path / "v.nii.gz", "--features", "intensity", "--k", "256"]
        + ["--k", "300", "--mask", tmp_path / "m.nii.gz", "--smooth", "0", "--snap", "0"]
        + ["--mrf", "0", "--nest", "1.5", "--n-init", "1", "-o", tmp_path / "s"],
        capsys,
    )
    assert code == 0, err
    coarse = io.read_volume(tmp_path / "s" / "v_k256.nii.gz").data.astype(int)
    fine = io.read_volume(tmp_path / "s" / "v_k300.nii.gz").data.astype(int)
    assert (fine[mask == 0] == 0).all() and (fine[mask == 1] > 0).all()
    spanning = [f for f in np.unique(fine[fine > 0]) if np.unique(coarse[fine == f]).size > 1]
    assert spanning == []


def test_cluster_mask_problems_are_named_before_any_work(tiny_trained, masked, capsys):
    def refused(mask, needle, out="bad"):
        _, err = _cluster(tiny_trained, masked / out, "--mask", mask, capsys=capsys, code=2)
        lines = [line for line in err.splitlines() if line.startswith("hypseg: error:")]
        assert len(lines) == 1 and needle in lines[0], err
        assert not (masked / out).exists()

    refused(masked / "nowhere", "--mask")
    lonely = masked / "lonely"
    lonely.mkdir()
    nib.save(nib.Nifti1Image(np.ones((20, 20, 20), np.uint8), np.eye(4)), lonely / "case_000.nii")
    refused(lonely, "no mask for 2 input(s): case_001, case_002")
    refused(tiny_trained / "data" / "images" / "case_002.nii.gz", "is both an input and a mask")
    # two files that could be one input's mask: named, not one of them taken silently
    both = masked / "both"
    both.mkdir()
    for name in ("case_000.nii", "case_001.nii", "case_002.nii", "case_002_mask.nii.gz"):
        nib.save(nib.Nifti1Image(np.ones((20, 20, 20), np.uint8), np.eye(4)), both / name)
    refused(
        both,
        "--mask " + str(both) + ": 2 masks of case_002.nii.gz: case_002.nii, "
        "case_002_mask.nii.gz (keep one <case> or <case>_mask per input",
    )
    (both / "case_002.nii").unlink()
    (both / "sub").mkdir()
    (both / "case_001.nii").rename(both / "sub" / "case_001.nii.gz")
    (both / "case_001.nii").write_bytes((both / "sub" / "case_001.nii.gz").read_bytes())
    summary, _ = _cluster(tiny_trained, masked / "both_flat", "--mask", both, capsys=capsys)
    assert summary["done"] == 3  # (sub-folders are not searched without --recursive)
    _, err = _cluster(
        tiny_trained, masked / "both_rec", "--mask", both, "--recursive", capsys=capsys, code=2
    )
    assert "2 masks of case_001.nii.gz: case_001.nii, sub/case_001.nii.gz" in err
    # a folder holding an input and its mask: the input is not its own mask
    mixed = masked / "mixed"
    mixed.mkdir()
    image = mixed / "case_000.nii.gz"
    image.write_bytes((tiny_trained / "data" / "images" / "case_000.nii.gz").read_bytes())
    box = np.zeros((20, 20, 20), np.uint8)
    box[4:12, 4:12, 4:12] = 1
    nib.save(nib.Nifti1Image(box, np.eye(4)), mixed / "case_000_mask.nii.gz")
    command = ["-q", "cluster", image, "--features", "intensity", "--k", "2", "--mask", mixed]
    code, _, err = run([*command, "-o", masked / "mixed_out"], capsys)
    assert code == 0, err
    labels = io.read_volume(masked / "mixed_out" / "case_000_k2.nii.gz").data
    assert (labels[box == 0] == 0).all() and (labels[box == 1] > 0).all()
    (masked / "notes.txt").write_text("x")
    refused(masked / "notes.txt", "not a volume file")
    # per volume (after the others are done): a mask of another shape, an empty mask
    odd = masked / "odd"
    odd.mkdir()
    for case, data in (
        ("case_000", np.ones((20, 20, 19), np.uint8)),
        ("case_001", np.zeros((20, 20, 20), np.uint8)),
        ("case_002", np.ones((20, 20, 20), np.uint8)),
    ):
        nib.save(nib.Nifti1Image(data, np.eye(4)), odd / f"{case}_mask.nii.gz")
    summary, err = _cluster(tiny_trained, masked / "odd_out", "--mask", odd, capsys=capsys, code=2)
    assert summary["done"] == 1 and summary["failed"] == 2
    assert "mask of shape (20, 20, 19), but" in err and "is empty (no non-zero voxel)" in err


def test_a_failed_case_keeps_its_record_and_a_shifted_mask_is_named(tiny_trained, masked, capsys):
    image = tiny_trained / "data" / "images" / "case_000.nii.gz"
    eight = np.zeros((20, 20, 20), np.uint8)
    eight[8:10, 8:10, 8:10] = 1
    nib.save(nib.Nifti1Image(eight, np.eye(4)), masked / "eight.nii.gz")
    base = ["-q", "cluster", image, "--features", "intensity", "--mask", masked / "eight.nii.gz"]
    out = masked / "eight_out"
    assert run([*base, "--k", "2", "-o", out], capsys)[0] == 0
    # k = 9 cannot be fitted on 8 voxels: the case fails before any output is replaced
    code, _, err = run([*base, "--k", "2", "--k", "9", "-o", out], capsys)
    assert code == 2 and "8 voxel(s) inside the mask, fewer than --k 9" in err
    # an empty mask folder: the error says it is the mask's
    (masked / "no_masks").mkdir(exist_ok=True)
    code, _, err = run(
        ["cluster", image, "--features", "intensity", "--k", "2"]
        + ["-o", masked / "seg_x", "--mask", masked / "no_masks"],
        capsys,
    )
    assert code == 2 and f"--mask {masked / 'no_masks'}: no volume found" in err
    assert (out / "case_000.centroids.json").is_file()
    code, stdout, _ = run([*base, "--k", "2", "-o", out, "--json"], capsys)
    assert code == 0 and json.loads(stdout)["skipped"] == 1
    # a mask on another grid (half a voxel and more away) is named in a warning
    shifted = np.eye(4)
    shifted[0, 3] = 0.7
    nib.save(nib.Nifti1Image(eight, shifted), masked / "moved.nii.gz")
    code, _, err = run(
        [
            "cluster",
            image,
            "--features",
            "intensity",
            "--mask",
            masked / "moved.nii.gz",
            "--k",
            "2",
            "-o",
            masked / "moved_out",
        ],
        capsys,
    )
    assert code == 0 and "the mask is applied voxel by voxel" in err


# ----------------------------------------------------------------------------- train --mask


def _sampler(masks=None, seed=0, shapes=((30, 28, 26), (26, 30, 28)), cfg=None):
    from hypsegcli.sampling import TripletSampler

    rng = np.random.default_rng(7)
    vols = [rng.random(shape, np.float32) for shape in shapes]
    cfg = cfg or SamplingConfig(r_min=5, r_max=14)
    kwargs = {} if masks is None else {"masks": masks}
    return TripletSampler(vols, cfg, 6, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_sampler_masks_centre_every_anchor_inside_and_keep_volumes_equal():
    shapes = ((30, 28, 26), (26, 30, 28))
    small = np.zeros(shapes[0], bool)
    small[12:15, 10:13, 11:14] = True  # 27 voxels
    big = np.zeros(shapes[1], bool)
    big[5:20, 5:25, 5:22] = True
    sampler = _sampler([small, big])
    boxes = sampler.sample_boxes(4000)
    vidx = boxes["volume_index"].numpy()
    voxel = np.rint(boxes["anchor_center"].numpy()).astype(int)
    for v, mask in enumerate((small, big)):
        rows = voxel[vidx == v]
        assert mask[rows[:, 0], rows[:, 1], rows[:, 2]].all()
    # the volume is drawn first and kept through the redraws: each counts equally
    assert abs((vidx == 0).mean() - 0.5) < 0.03
    # positives still inside their anchors, negatives still disjoint from them
    half_a = boxes["anchor_side"].numpy()[:, None] / 2
    half_c = boxes["pos_side"].numpy()[:, None] / 2
    a, p, n = (boxes[k].numpy() for k in ("anchor_center", "pos_center", "neg_center"))
    assert (np.abs(p - a) <= half_a - half_c + 1e-9).all()
    assert (np.abs(n - a) >= half_a + half_c - 1e-9).any(axis=1).all()
    # patches come out as before
    assert _sampler([small, big]).sample(8).anchor.shape == (8, 1, 6, 6, 6)


def test_sampler_without_masks_draws_exactly_as_before():
    plain = _sampler().sample_boxes(64)
    # recorded with the sampler of 0abfe18, before train --mask existed
    before = {
        "anchor_center": (
            [18.14563023245199, 14.663981756680426, 10.432481162602823],
            2544.7172863272644,
        ),
        "anchor_side": (6.117344828627118, 542.7010698128369),
        "pos_center": (
            [19.58379434532392, 15.918224575583842, 10.125654141256542],
            2548.0482380085705,
        ),
        "pos_side": (3.1994316243529117, 307.74296563458336),
        "neg_center": (
            [25.16958742320559, 23.63241203943168, 7.009649472124256],
            2552.589093856187,
        ),
        "neg_side": (3.1994316243529117, 307.74296563458336),
    }
    for key, (first, total) in before.items():
        np.testing.assert_allclose(plain[key][0].numpy(), first, rtol=1e-12)
        assert plain[key].sum().item() == pytest.approx(total, rel=1e-12)
    assert plain["volume_index"][:2].tolist() == [0, 1]
    assert plain["volume_index"].sum().item() == 38
    for masks in ([None, None], None):
        again = _sampler(masks).sample_boxes(64)
        for key in plain:
            torch.testing.assert_close(plain[key], again[key], rtol=0, atol=0)
    # a mask holding the whole volume draws the same triplets too (nothing is redrawn)
    full = [np.ones((30, 28, 26), bool), None]
    again = _sampler(full).sample_boxes(64)
    for key in plain:
        torch.testing.assert_close(plain[key], again[key], rtol=0, atol=0)


def test_sampler_mask_problems():
    rim = np.zeros((30, 28, 26), bool)
    rim[:2] = True  # no anchor of side >= 5 is centred on the first two planes
    rim[:, :, -2:] = True  # nor on the last two
    with pytest.raises(BadInputError, match=r"the mask of volume 0: all its voxels lie within 2 "):
        _sampler([rim, None])
    rim[2, 12:16, 10:14] = True  # but on the third: voxels anchors can centre on
    boxes = _sampler([rim, None]).sample_boxes(8)
    voxel = torch.round(boxes["anchor_center"][boxes["volume_index"] == 0]).long()
    assert (voxel[:, 0] == 2).all() and rim[voxel[:, 0], voxel[:, 1], voxel[:, 2]].all()
    rim[2, 12:16, 10:14] = False
    rim[2, 2, 2] = True  # one voxel in a corner: anchors seldom centre there
    with pytest.raises(BadInputError, match=r"about 1 in [0-9,]+ centre inside it, too few"):
        _sampler([rim, None])
    # an even r-min puts the outermost centres on half voxels, which round to even: with
    # r = 6 on 7 x 9 x 9, centres on axis 1 round to 2 .. 6 (voxel 2 once refused)
    r6 = SamplingConfig(r_min=6, r_max=6, l_min=3, r_gap=2)
    edge = np.zeros((7, 9, 9), bool)
    edge[3, 2, 4] = True
    boxes = _sampler([edge], cfg=r6, shapes=((7, 9, 9),)).sample_boxes(8)
    assert (torch.round(boxes["anchor_center"]) == torch.tensor([3.0, 2.0, 4.0])).all()
    # an axis exactly r-min long: every centre rounds to one voxel (once: an empty
    # region, no refusal, then 2^20 draws per triplet)
    off = np.zeros((6, 6, 20), bool)
    off[3, 3, 10] = True
    with pytest.raises(BadInputError, match=r"all its voxels lie within 2 voxels of the border"):
        _sampler([off], cfg=r6, shapes=((6, 6, 20),))
    # the middle of 9^3: no anchor leaves room for a negative there, rare or not at all
    middle = np.zeros((9, 9, 9), bool)
    middle[4, 4, 4] = True
    with pytest.raises(BadInputError, match=r"of the anchors drawn, none centre inside it"):
        _sampler([middle], shapes=((9, 9, 9),))
    with pytest.raises(BadInputError, match="volume 1: mask of shape"):
        _sampler([None, np.ones((3, 3, 3), bool)])
    with pytest.raises(BadInputError, match="volume 0: the mask is empty"):
        _sampler([np.zeros((30, 28, 26), bool), None])


def test_train_mask_is_recorded_and_a_changed_mask_is_named_on_resume(
    tiny_trained, masked, tmp_path, capsys
):
    from clitools import TINY_TRAIN

    from hypsegcli.modelfile import load_model_file

    images = tiny_trained / "data" / "images"
    argv = ["train", images, "-o", tmp_path / "m.pt", "--mask", masked / "masks", *TINY_TRAIN]
    code, _, err = run([*argv, "--steps", "3"], capsys)
    assert code == 0 and "(anchors inside their masks)" in err, err
    meta = load_model_file(tmp_path / "m.pt")["training_volumes"]
    assert all(len(v["mask_sha256"]) == 64 for v in meta)
    # review: a resubmitted command line without --mask said only that "volumes (or
    # masks)" differ; it names the masks left out now, and other masks as such
    other = tmp_path / "other"
    other.mkdir()
    for mask in (masked / "masks").iterdir():
        img = nib.load(mask)
        flipped = np.asarray(img.dataobj)[::-1].copy()
        nib.save(nib.Nifti1Image(flipped, img.affine), other / mask.name)
    resume = [*TINY_TRAIN, "--resume"]
    code, _, err = run([*argv[:4], "--mask", other, *resume, "--steps", "4"], capsys)
    assert code == 0 and "resuming with --mask masks that differ from the checkpoint's" in err
    assert "training volumes that differ" not in err
    code, _, err = run([*argv[:4], *resume, "--steps", "5"], capsys)
    assert code == 0 and "the checkpoint was trained with --mask masks and this run has none" in err
    code, _, err = run([*argv[:4], "--mask", other, *resume, "--steps", "6"], capsys)
    assert code == 0 and "the checkpoint was trained without --mask" in err


def test_train_mask_no_anchor_fits_names_the_file(tiny_trained, tmp_path, capsys):
    from clitools import TINY_TRAIN

    images = tiny_trained / "data" / "images"
    first = sorted(images.glob("*.nii.gz"))[0]
    img = nib.load(first)
    corner = np.zeros(img.shape, np.uint8)
    corner[0, 0, 0] = 1  # no anchor of side >= r-min is centred on a corner voxel
    nib.save(nib.Nifti1Image(corner, img.affine), tmp_path / "corner.nii.gz")
    argv = ["train", images, "-o", tmp_path / "m.pt", "--mask", tmp_path / "corner.nii.gz"]
    code, _, err = run([*argv, *TINY_TRAIN, "--steps", "2"], capsys)
    assert code == 2 and "corner.nii.gz (the mask of " in err and "lie within 2 " in err, (
        err
    )  # r-min 6
    assert str(images) in err and not re.search(r"volume \d+", err)  # the files, not an index
    assert not (tmp_path / "m.pt").exists()


def test_sampler_mask_of_one_voxel_in_thousands_fills_every_batch():
    # one interior voxel of 30 x 28 x 26: about 1 in 6 700 anchor centres fall on it, so
    # most triplets need thousands of redraws (6 400 were once the most, and failed)
    one = np.zeros((30, 28, 26), bool)
    one[15, 13, 12] = True
    sampler = _sampler([one, None])
    assert 1 / 8000 < sampler.mask_acceptance[0] < 1 / 5500 and sampler.mask_acceptance[1] is None
    for _ in range(3):
        boxes = sampler.sample_boxes(16)
        centre = boxes["anchor_center"][boxes["volume_index"] == 0]
        assert len(centre) > 0
        assert (torch.round(centre) == torch.tensor([15.0, 13.0, 12.0], dtype=centre.dtype)).all()


def test_sampler_mask_budget_ends_in_a_clear_error_or_a_full_batch(monkeypatch):
    from hypsegcli import sampling

    half = np.zeros((30, 28, 26), bool)
    half[:15] = True
    monkeypatch.setattr(sampling, "MASK_DRAWS", sampling.MASK_CANDIDATES)  # one round only
    monkeypatch.setattr(sampling, "MASK_REFUSE", 0.0)  # no refusal up front
    # the one round fills every row: the batch comes back (the loop once fell through to
    # its error here)
    boxes = _sampler([half, None]).sample_boxes(32)
    voxel = torch.round(boxes["anchor_center"][boxes["volume_index"] == 0]).long()
    assert len(voxel) > 8 and half[voxel[:, 0], voxel[:, 1], voxel[:, 2]].all()
    one = np.zeros((30, 28, 26), bool)
    one[15, 13, 12] = True
    with pytest.raises(BadInputError, match=r"the mask of volume 0: after 32 draws .* too small"):
        _sampler([one, None]).sample_boxes(16)


@pytest.mark.parametrize(
    ("shape", "cfg", "region"),
    [
        ((30, 28, 26), {}, (15, 13, 12)),  # one interior voxel
        ((30, 28, 26), {}, (2, slice(None), slice(None))),  # the outermost plane reached
        ((9, 9, 9), {}, (slice(0, 4), slice(None), 4)),  # room for the negative matters
        ((12, 12, 30), {"scale_sampling": "uniform"}, (slice(3, 9), 3, slice(None))),
        ((7, 9, 9), {"r_min": 6, "r_max": 6, "l_min": 3, "r_gap": 2}, (3, slice(None), 4)),
        ((140, 20, 20), {}, (slice(60, 75), slice(5, 9), slice(None))),
        ((200, 8, 8), {}, (slice(None), 3, 3)),  # elongated (once blocks of the long side)
        ((100, 100, 100), {"r_max": 90, "scale_sampling": "uniform"}, (2,)),  # once 0
        (
            (6, 12, 12),
            {"r_min": 6, "l_min": 4, "r_gap": 2},
            (slice(None), slice(0, 4), slice(0, 4)),
        ),
    ],
)
def test_mask_acceptance_matches_the_sampler(shape, cfg, region):
    """The computed share of anchors centred inside a mask against the sampler's own
    draws (binomial error bars), masks where the border, the negative's room, an even
    r-min, a wide range of r and an axis exactly r-min long (one position) all count."""
    from hypsegcli.sampling import mask_acceptance

    config = SamplingConfig(**{"r_min": 5, "r_max": 14, **cfg})
    mask = np.zeros(shape, bool)
    mask[region] = True
    sampler = _sampler(None, shapes=(shape,), cfg=config)
    n = 300_000
    boxes = sampler.sample_boxes(n)
    voxel = torch.round(boxes["anchor_center"]).long()
    seen = float(mask[voxel[:, 0], voxel[:, 1], voxel[:, 2]].mean())
    share = mask_acceptance(mask, config, float(sampler._r_hi[0]))
    error = np.sqrt(max(share, 1 / n) * (1 - share) / n)
    assert abs(share - seen) < 4 * error + 0.03 * share, (share, seen)
    assert share > 0 or seen == 0  # never 0 where the sampler hits


def test_a_mask_folder_that_is_an_input_folder_names_its_stray_files_once(tmp_path, capsys):
    """Review: listed once for the inputs and once for the masks, its stray files were
    named twice."""
    for name in ("v.nii.gz", "v_mask.nii.gz"):
        nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), tmp_path / name)
    (tmp_path / "notes.txt").write_text("x")
    code, _, err = run(
        ["cluster", tmp_path, "--features", "intensity", "--k", "2", "--mask", tmp_path]
        + ["-o", tmp_path.parent / f"{tmp_path.name}_seg"],
        capsys,
    )
    assert code == 2 and "is both an input and a mask" in err, err
    assert err.count("skipped 1 file(s) that are not volumes (notes.txt)") == 1, err
