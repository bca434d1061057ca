"""evaluate on real-world headers: sheared and sform-only affines, label precision, ties,
grids, levels (each case reproduced an audit finding on the code before the fix)."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from clitools import run
from scipy import ndimage
from scipy.spatial.distance import cdist

from hypsegcli import metrics


def _surface_world(mask, linear):
    s = mask & ~ndimage.binary_erosion(
        mask, ndimage.generate_binary_structure(3, 1), border_value=0
    )
    return np.argwhere(s) @ np.asarray(linear, float).T


def _reference(pred, gt, linear):
    """HD and HD95 by all pairwise distances between the surfaces' world coordinates."""
    d = cdist(_surface_world(pred, linear), _surface_world(gt, linear))
    ab, ba = d.min(1), d.min(0)
    return max(ab.max(), ba.max()), np.percentile(np.r_[ab, ba], 95)


def _boxes():
    g = np.zeros((20, 20, 20), np.uint8)
    g[4:10, 4:10, 3:8] = 1
    p = np.zeros_like(g)
    p[6:12, 5:11, 4:9] = 1
    return p, g


def _evaluate(capsys, *args):
    code, out, err = run(["-q", "evaluate", *map(str, args), "--json"], capsys)
    assert code == 0, err
    return json.loads(out), err


def test_sheared_affine_distances_match_brute_force(tmp_path, capsys):
    p, g = _boxes()
    affine = np.array([[0.5, 0, 0, 0], [0, 1.0, 0, 0], [0, 2.0, 3.0, 0], [0, 0, 0, 1]])
    for name, data in (("p", p), ("g", g)):
        nib.save(nib.Nifti1Image(data, affine), tmp_path / f"{name}.nii.gz")
    report, _ = _evaluate(capsys, tmp_path / "p.nii.gz", tmp_path / "g.nii.gz")
    cls = report["cases"][0]["classes"][1]
    hd, hd95 = _reference(p.astype(bool), g.astype(bool), affine[:3, :3])
    assert cls["hd"] == pytest.approx(hd, rel=1e-9)  # was 3.8730 (spacing only), truth 5.1962
    assert cls["hd95"] == pytest.approx(hd95, rel=1e-9)
    # random masks, a sheared and rotated grid, against the library function directly
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    linear = q @ np.array([[0.7, 0.3, 0.0], [0.0, 1.2, 0.4], [0.0, 0.0, 2.5]])
    for _ in range(5):
        a = ndimage.gaussian_filter(rng.normal(size=(12, 11, 10)), 1.5) > 0.1
        b = ndimage.gaussian_filter(rng.normal(size=(12, 11, 10)), 1.5) > 0.1
        got = metrics.surface_distances(a, b, linear=linear)
        np.testing.assert_allclose(got, _reference(a, b, linear), rtol=1e-9)
    # one mask empty: the longest body diagonal of the sheared grid
    empty = np.zeros((12, 11, 10), bool)
    corners = np.array([[12, s1 * 11, s2 * 10] for s1 in (1, -1) for s2 in (1, -1)], float)
    worst = np.linalg.norm(corners @ linear.T, axis=1).max()
    assert metrics.surface_distances(a, empty, linear=linear) == pytest.approx((worst, worst))


def test_sform_only_files_measure_with_their_sform_not_a_stale_pixdim(tmp_path, capsys):
    p, g = _boxes()
    affine = np.diag([0.5, 1.0, 3.0, 1.0])
    for name, data in (("p", p), ("g", g)):
        img = nib.Nifti1Image(data, None)
        img.set_sform(affine, code=2)
        img.set_qform(None, code=0)
        assert img.header.get_zooms() == (1.0, 1.0, 1.0)  # pixdim left as it was
        nib.save(img, tmp_path / f"{name}.nii.gz")
    report, _ = _evaluate(capsys, tmp_path / "p.nii.gz", tmp_path / "g.nii.gz")
    cls = report["cases"][0]["classes"][1]
    hd, hd95 = _reference(p.astype(bool), g.astype(bool), affine[:3, :3])
    assert (cls["hd"], cls["hd95"]) == pytest.approx((hd, hd95), rel=1e-9)


def test_distances_do_not_depend_on_which_disjoint_label_a_class_is_matched_to():
    gt = np.zeros((16, 16, 16), np.int64)
    gt[2:8, 2:8, 2:8] = 1
    gt[10:14, 10:14, 10:14] = 2
    pred = np.zeros_like(gt)
    pred[2:8, 2:8, 2:8] = 1  # class 1 found; class 2 missed by two labels far apart
    pred[0:2, 14:16, 0:2] = 2
    pred[14:16, 0:2, 14:16] = 3
    swapped = pred.copy()
    swapped[pred == 2], swapped[pred == 3] = 3, 2
    a, b = metrics.score_case(pred, gt), metrics.score_case(swapped, gt)
    assert a.mean_dice == b.mean_dice
    for x, y in zip(a.classes, b.classes, strict=True):
        assert (x.label, x.dice, x.hd, x.hd95) == (y.label, y.dice, y.hd, y.hd95)
    missed = a.classes[2]
    assert missed.label is None and missed.dice == 0.0 and missed.pred_voxels == 0
    diagonal = np.sqrt(3 * 16.0**2)
    assert missed.hd == pytest.approx(diagonal) and missed.hd95 == pytest.approx(diagonal)
    assert set(a.unmatched_labels) == {2, 3}


def test_labels_are_read_exactly(tmp_path, capsys):
    gt = np.zeros((8, 8, 8), np.int32)
    gt[:3] = 16777216
    gt[5:] = 16777217  # the same number in float32
    nib.save(nib.Nifti1Image(gt, np.eye(4)), tmp_path / "big.nii.gz")
    report, _ = _evaluate(capsys, tmp_path / "big.nii.gz", tmp_path / "big.nii.gz")
    assert [c["class_id"] for c in report["cases"][0]["classes"]] == [0, 16777216, 16777217]
    assert report["cases"][0]["mean_dice"] == 1.0
    frac = np.zeros((8, 8, 8), np.float64)
    frac[:3] = 3.0000001  # integral in float32
    nib.save(nib.Nifti1Image(frac, np.eye(4)), tmp_path / "frac.nii.gz")
    code, _, err = run(["evaluate", tmp_path / "frac.nii.gz", tmp_path / "big.nii.gz"], capsys)
    assert code == 2 and "not a label volume (non-integer values)" in err


def test_no_hausdorff_needs_no_spacing_and_level_zero_is_written(tmp_path, capsys):
    lab = np.zeros((6, 6, 6), np.uint8)
    lab[:3] = 1
    img = nib.Nifti1Image(lab, np.eye(4))
    img.header["pixdim"][1] = np.nan
    nib.save(img, tmp_path / "c_L0.nii")
    report, _ = _evaluate(
        capsys,
        tmp_path / "c_L0.nii",
        tmp_path / "c_L0.nii",
        "--no-hausdorff",
        "--csv",
        tmp_path / "s.csv",
    )
    assert report["cases"][0]["mean_dice"] == 1.0 and report["cases"][0]["level"] == 0
    with open(tmp_path / "s.csv") as fh:
        assert {row["level"] for row in csv.DictReader(fh)} == {"0"}


def test_other_grid_warning_is_in_voxels_of_each_axis(tmp_path, capsys):
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[3:7] = 1
    base = np.diag([0.5, 1.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(lab, base), tmp_path / "g.nii.gz")
    for name, shift, warned in (("z13", (0, 0, 1.0), False), ("x06", (0.3, 0, 0), True)):
        moved = base.copy()
        moved[:3, 3] = shift  # 1 mm along z is a third of a voxel; 0.3 mm along x is 0.6
        nib.save(nib.Nifti1Image(lab, moved), tmp_path / f"{name}.nii.gz")
        _, err = run(["evaluate", tmp_path / f"{name}.nii.gz", tmp_path / "g.nii.gz"], capsys)[1:]
        assert ("different grids" in err) == warned, (name, err)


def test_parts_need_one_csv_each(tmp_path, capsys):
    lab = np.zeros((6, 6, 6), np.uint8)
    lab[:3] = 1
    for case in ("a", "b"):
        nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / f"{case}.nii.gz")
    args = ["-q", "evaluate", tmp_path / "a.nii.gz", tmp_path / "a.nii.gz", "--num-parts", "2"]
    code, _, err = run([*args, "--part-id", "0", "--csv", tmp_path / "s.csv"], capsys)
    assert code == 2 and "put {part} in the name (e.g. --csv" in err and "s_{part}.csv" in err
    for part in ("0", "1"):
        code, _, err = run([*args, "--part-id", part, "--csv", tmp_path / "s_{part}.csv"], capsys)
        assert code == 0, err
    assert (tmp_path / "s_0.csv").is_file() and (tmp_path / "s_1.csv").is_file()


def test_a_singular_affine_falls_back_to_the_spacing(tmp_path, capsys):
    """Two voxel axes mapped onto one line would put distinct voxels at one point."""
    affine = np.eye(4)
    affine[0, 1], affine[1, 1] = 1.0, 0.0
    gt = np.zeros((10, 10, 10), np.uint8)
    pred = np.zeros_like(gt)
    gt[5, 5, 5] = gt[6, 4, 5] = 1
    pred[5, 5, 5] = pred[7, 3, 5] = 1
    for name, data in (("p", pred), ("g", gt)):
        nib.save(nib.Nifti1Image(data, affine), tmp_path / f"{name}.nii.gz")
    report, err = _evaluate(capsys, tmp_path / "p.nii.gz", tmp_path / "g.nii.gz")
    assert "g.nii.gz: its affine is singular or not finite; distances use the voxel sizes" in err
    cls = report["cases"][0]["classes"][1]
    hd, hd95 = _reference(pred.astype(bool), gt.astype(bool), np.eye(3))
    assert (cls["hd"], cls["hd95"]) == pytest.approx((hd, hd95)) and hd > 1.4


def test_a_singular_affine_is_named_once_per_truth_file(tmp_path, capsys):
    affine = np.eye(4)
    affine[0, 1], affine[1, 1] = 1.0, 0.0
    gt = np.zeros((10, 10, 10), np.uint8)
    gt[5, 5, 5] = gt[6, 4, 5] = 1
    (tmp_path / "pred").mkdir()
    (tmp_path / "truth").mkdir()
    nib.save(nib.Nifti1Image(gt, affine), tmp_path / "truth" / "case.nii.gz")
    for k in (2, 4, 8):
        nib.save(nib.Nifti1Image(gt, affine), tmp_path / "pred" / f"case_k{k}.nii.gz")
    report, err = _evaluate(capsys, tmp_path / "pred", tmp_path / "truth")
    assert len(report["cases"]) == 3
    assert err.count("its affine is singular or not finite") == 1, err


def test_an_mrc_of_unknown_voxel_size_is_not_compared_with_a_grid_in_angstrom(tmp_path, capsys):
    """Masks and labels written with a bare mrcfile.new have voxel size 0 (unknown): their
    affine is in voxels, and "a voxel up to 1.17e+03 Å apart" from the tomogram was noise."""
    import mrcfile

    labels = np.zeros((8, 10, 12), np.int8)
    labels[2:6, 3:7, 4:9] = 1
    with mrcfile.new(str(tmp_path / "t_k2.mrc")) as mrc:
        mrc.set_data(labels)
        mrc.voxel_size = 13.7
    with mrcfile.new(str(tmp_path / "t.mrc")) as mrc:
        mrc.set_data(labels)  # voxel size 0
    code, out, err = run(
        ["evaluate", tmp_path / "t_k2.mrc", tmp_path / "t.mrc", "--no-hausdorff", "--json"], capsys
    )
    assert code == 0 and "different grids" not in err, err
    assert json.loads(out)["cases"][0]["mean_dice"] == 1.0
    with mrcfile.new(str(tmp_path / "t.mrc"), overwrite=True) as mrc:  # known, and shifted
        mrc.set_data(labels)
        mrc.voxel_size = 13.7
        mrc.header.origin.x = 137.0
    code, _, err = run(
        ["evaluate", tmp_path / "t_k2.mrc", tmp_path / "t.mrc", "--no-hausdorff"], capsys
    )
    assert code == 0 and "different grids (a voxel up to 137 Å apart)" in err, err


def test_a_run_scoring_no_pair_keeps_an_earlier_csv(tmp_path, capsys):
    """Review: `evaluate --csv` where every pair failed replaced an earlier good table with
    its header line."""
    p, g = _boxes()
    nib.save(nib.Nifti1Image(p, np.eye(4)), tmp_path / "c_k2.nii.gz")
    nib.save(nib.Nifti1Image(g, np.eye(4)), tmp_path / "c_L1.nii.gz")
    table = tmp_path / "scores.csv"
    code, _, err = run(
        ["-q", "evaluate", tmp_path / "c_k2.nii.gz", tmp_path / "c_L1.nii.gz"] + ["--csv", table],
        capsys,
    )
    assert code == 0, err
    before = table.read_bytes()
    assert len(before.splitlines()) == 3  # header, background, class 1
    nib.save(nib.Nifti1Image(g[:, :, :-1], np.eye(4)), tmp_path / "bad_L1.nii.gz")
    code, _, err = run(
        ["-q", "evaluate", tmp_path / "c_k2.nii.gz", tmp_path / "bad_L1.nii.gz"] + ["--csv", table],
        capsys,
    )
    assert code == 2 and "scores.csv: not written: no pair was scored" in err, err
    assert table.read_bytes() == before


def test_float16_mrc_labels_are_read_without_overflow_warnings(tmp_path, capsys):
    """Review: mode-12 labels were checked against 2^53 in float16, which overflowed and
    printed a RuntimeWarning (the scores were right)."""
    import mrcfile

    p, g = _boxes()
    for name, data in (("c_k2", p), ("c_L1", g)):
        with mrcfile.new(str(tmp_path / f"{name}.mrc")) as mrc:
            mrc.set_data(data.astype(np.float16))
    report, err = _evaluate(capsys, tmp_path / "c_k2.mrc", tmp_path / "c_L1.mrc")
    assert "overflow" not in err and "Warning" not in err, err
    assert report["cases"][0]["classes"][1]["dice"] == pytest.approx(
        2 * (p & g).sum() / (p.sum() + g.sum())
    )


def _label_file(path, value=1):
    data = np.zeros((6, 6, 6), np.uint8)
    data[:3] = value
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)


def test_pairing_by_k_names_its_guesses(tmp_path, caplog):
    """Review: with two dataset.json levels of 2 classes a _k2 prediction took whichever
    level was listed last, and a _k2 prediction whose <case>_L1 was missing took <case>
    as level 1, both silently."""
    from hypsegcli import pipeline

    pred, truth = tmp_path / "pred", tmp_path / "truth"
    pred.mkdir()
    truth.mkdir()
    for name in ("case_k2", "case_k4"):
        _label_file(pred / f"{name}.nii.gz")
    for name in ("case", "case_L1", "case_L2"):
        _label_file(truth / f"{name}.nii.gz")
    classes = [{"level": lvl, "id": i, "name": f"c{lvl}{i}"} for lvl in (1, 2) for i in (0, 1)]
    with caplog.at_level("WARNING", logger="hypsegcli"):
        pairs = pipeline.pair_files(pred, truth, dataset={"classes": classes})
    assert "levels 1, 2 all have 2 classes, so a _k2 prediction names no level" in caplog.text
    assert [(p["pred"].name, p["truth"].name, p["level"]) for p in pairs] == [
        ("case_k2.nii.gz", "case.nii.gz", None),
        ("case_k4.nii.gz", "case.nii.gz", None),  # (no level has 4 classes)
    ]
    caplog.clear()
    (truth / "case_L1.nii.gz").unlink()
    classes = [{"level": 1, "id": i, "name": f"a{i}"} for i in (0, 1)] + [
        {"level": 2, "id": i, "name": f"b{i}"} for i in range(4)
    ]
    with caplog.at_level("WARNING", logger="hypsegcli"):
        pairs = pipeline.pair_files(pred, truth, dataset={"classes": classes})
    assert [(p["pred"].name, p["truth"].name, p["level"]) for p in pairs] == [
        ("case_k2.nii.gz", "case.nii.gz", 1),
        ("case_k4.nii.gz", "case_L2.nii.gz", 2),
    ]
    assert (
        "paired with a truth named <case>, having no <case>_L<level>: case_k2.nii.gz "
        "with case.nii.gz as level 1" in caplog.text
    )


def test_level_0_is_a_level_in_the_summary_line(tmp_path, capsys):
    _label_file(tmp_path / "c_k2.nii.gz")
    _label_file(tmp_path / "c_L0.nii.gz")
    code, _, err = run(["evaluate", tmp_path / "c_k2.nii.gz", tmp_path / "c_L0.nii.gz"], capsys)
    assert code == 0 and "level 0 (k=2): mean Dice 1.0000" in err, err


def test_a_header_warning_is_said_once_for_the_truth_and_not_for_predictions(tmp_path, capsys):
    """QA: a ground truth whose sform scales otherwise than its pixdim was warned about
    once per k it was read for, and each prediction (its header copied from the source)
    once more: 4 lines for one case at 2 k, 600 for a study of 100 scans at 3 k."""
    p, g = _boxes()
    seg, truth = tmp_path / "seg", tmp_path / "gt"
    seg.mkdir()
    truth.mkdir()

    def save(data, path):
        img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
        img.header["pixdim"][1:4] = 1.0  # the sform says 2 mm
        nib.save(img, path)

    save(g, truth / "a.nii.gz")
    for k in (2, 3):
        save(p, seg / f"a_k{k}.nii.gz")
    code, _, err = run(["evaluate", seg, truth], capsys)
    assert code == 0, err
    # (QA: "0.00 unknown" in the table of distances: no unit word where there is none)
    assert " unknown" not in err and "max HD95" in err, err
    lines = [line for line in err.splitlines() if "differs from the sform" in line]
    assert lines == [
        f"warning: {truth / 'a.nii.gz'}: voxel size (pixdim) 1x1x1 differs from the sform's "
        "2x2x2; using the sform's, which places the voxels"
    ], err
