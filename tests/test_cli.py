"""The command line, driven in-process and as a real subprocess."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from clitools import run

from hypsegcli import __version__, io, pipeline


def test_help_is_fast_and_does_not_import_torch():
    code = (
        "import sys, hypsegcli.cli as c\n"
        "try:\n    c.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch imported by --help'\n"
        "assert 'nibabel' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for name in ("synth", "train", "embed", "cluster", "evaluate"):
        assert name in result.stdout


def test_module_entry_point_and_version():
    result = subprocess.run(
        [sys.executable, "-m", "hypsegcli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert result.stdout.strip() == f"hypseg {__version__}"


def test_usage_errors_are_one_line_with_code_2(capsys, tmp_path):
    code, out, err = run(["synth", tmp_path, "--bogus"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("hypseg: error: ") and err.count("\n") == 1
    code, _, err = run(["synth", tmp_path, "--split", "a/b"], capsys)
    assert code == 2 and "--split 'a/b'" in err and err.count("\n") == 1
    # parts whose sum passes the float range (QA: "cannot convert float NaN", exit 1)
    code, _, err = run(["synth", tmp_path, "--split", "1e308/1e308/1"], capsys)
    assert code == 2 and "--split '1e308/1e308/1': expected" in err and err.count("\n") == 1
    assert pipeline.split_counts(5, (1e308, 1.0, 1.0)) == [5, 0, 0]  # n * part passes it
    assert pipeline.split_counts(120, (80.0, 20.0, 20.0)) == [80, 20, 20]
    # a negative seed is refused up front (numpy's generators fail on it mid-run, exit 1)
    for command in (["synth", tmp_path], ["train", tmp_path, "-o", tmp_path / "m.pt"]):
        code, _, err = run([*command, "--seed", "-1"], capsys)
        assert code == 2 and "--seed" in err and err.count("\n") == 1
    # torch seeds its generators with seed + 1 + 2 * rank: at most 64 bits
    code, _, err = run(["train", tmp_path, "-o", tmp_path / "m.pt", "--seed", str(2**64)], capsys)
    assert code == 2 and "--seed" in err and not (tmp_path / "m.pt").exists()
    code, _, err = run(["cluster", tmp_path, "--features", "intensity", "--seed", "-1"], capsys)
    assert code == 2 and "--seed" in err and err.count("\n") == 1
    # --debug adds the traceback and keeps the exit code (bad input 2, not Python's 1)
    model = tmp_path / "missing.pt"
    code, out, err = run(
        ["--debug", "cluster", tmp_path, "-m", model, "--k", "2", "-o", tmp_path / "s"], capsys
    )
    assert code == 2 and out == "" and "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("hypsegcli.errors.BadInputError: ")
    code, _, err = run(["cluster", tmp_path, "-m", model, "--k", "2", "-o", tmp_path / "s"], capsys)
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1


def test_debug_shows_an_unexpected_errors_traceback_with_code_1(capsys, tmp_path, monkeypatch):
    """An unexpected error (a bug): one line and exit 1; with --debug its traceback, still
    exit 1 (printed by hypseg, so the frames it held are freed before the interpreter ends)."""

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(pipeline, "synth", broken)
    code, out, err = run(["synth", tmp_path / "d"], capsys)
    assert (code, out) == (1, "")
    assert err == "hypseg: error: RuntimeError: boom (run with --debug for a traceback)\n"
    code, out, err = run(["--debug", "synth", tmp_path / "d"], capsys)
    assert (code, out) == (1, "") and err.startswith("Traceback")
    assert err.strip().splitlines()[-1] == "RuntimeError: boom"


def _write_truth(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.zeros((12, 10, 8), np.uint8)
    labels[2:8, 2:8, 2:6] = 1
    labels[4:10, 5:9, 3:7] = 2
    labels[rng.random(labels.shape) < 0.02] = 3
    aff = np.diag([2.0, 1.0, 1.0, 1.0])
    geometry = io.VolumeGeometry("nifti", labels.shape, (2.0, 1.0, 1.0), aff)
    io.write_labels(tmp_path / "truth.nii.gz", labels, geometry)
    return labels, geometry


def test_evaluate_identity_relabel_and_shift(capsys, tmp_path):
    labels, geometry = _write_truth(tmp_path)
    perm = np.array([2, 0, 3, 1], np.uint8)[labels]
    io.write_labels(tmp_path / "perm.nii.gz", perm, geometry)
    for pred in ("truth.nii.gz", "perm.nii.gz"):
        code, out, err = run(
            ["evaluate", tmp_path / pred, tmp_path / "truth.nii.gz", "--json"], capsys
        )
        assert code == 0, err
        report = json.loads(out)
        (case,) = report["cases"]
        assert case["mean_dice"] == pytest.approx(1.0)
        assert all(c["dice"] == pytest.approx(1.0) for c in case["classes"])
        assert all(c["hd95"] == pytest.approx(0.0) for c in case["classes"])
    # a one-voxel shift along the 2 mm axis: HD95 of the cube is 2 mm
    cube = np.zeros((12, 10, 8), np.uint8)
    cube[3:8, 3:8, 2:6] = 1
    io.write_labels(tmp_path / "cube.nii.gz", cube, geometry)
    io.write_labels(tmp_path / "shift.nii.gz", np.roll(cube, 1, axis=0), geometry)
    code, out, _ = run(
        ["evaluate", tmp_path / "shift.nii.gz", tmp_path / "cube.nii.gz", "--json"], capsys
    )
    assert code == 0
    (case,) = json.loads(out)["cases"]
    fg = next(c for c in case["classes"] if c["class_id"] == 1)
    assert fg["hd95"] == pytest.approx(2.0)
    assert case["unit"] == "mm"


def test_evaluate_warns_when_the_grids_differ(capsys, tmp_path):
    """Same shape, other affine (here flipped and moved): scored, with one warning naming both
    files; a difference well under half a voxel (float rounding) says nothing."""
    labels, geometry = _write_truth(tmp_path)
    img = nib.load(tmp_path / "truth.nii.gz")
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0]) @ img.affine
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), flipped), tmp_path / "other.nii.gz")
    nudged = img.affine.copy()
    nudged[:3, 3] += 1e-4
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), nudged), tmp_path / "near.nii.gz")
    code, out, err = run(
        ["evaluate", tmp_path / "other.nii.gz", tmp_path / "truth.nii.gz", "--json"], capsys
    )
    assert code == 0 and json.loads(out)["cases"][0]["mean_dice"] == pytest.approx(1.0)
    assert err.count("different grids") == 1
    assert "other.nii.gz" in err and "truth.nii.gz" in err
    code, out, err = run(
        ["evaluate", tmp_path / "near.nii.gz", tmp_path / "truth.nii.gz", "--json"], capsys
    )
    assert code == 0 and "different grids" not in err


def test_grid_offset_is_the_largest_voxel_displacement():
    a = io.VolumeGeometry.default((4, 5, 6), spacing=(1.0, 2.0, 3.0))
    moved = np.array(a.affine, float)
    moved[0, 3] += 0.25
    b = io.VolumeGeometry("nifti", a.shape, a.spacing, moved, None, ".nii.gz", "mm")
    assert pipeline.grid_offset(a, b) == pytest.approx(0.25)
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0]) @ np.array(a.affine, float)
    c = io.VolumeGeometry("nifti", a.shape, a.spacing, flipped, None, ".nii.gz", "mm")
    assert pipeline.grid_offset(a, c) == pytest.approx(2 * 3.0)  # voxel i = 3 at -3 vs +3


def test_evaluate_errors(capsys, tmp_path):
    labels, geometry = _write_truth(tmp_path)
    small = io.VolumeGeometry.default((4, 4, 4))
    io.write_labels(tmp_path / "small.nii.gz", np.zeros((4, 4, 4), np.uint8), small)
    code, out, err = run(["evaluate", tmp_path / "small.nii.gz", tmp_path / "truth.nii.gz"], capsys)
    assert code == 2 and out == ""
    assert "small.nii.gz" in err and "truth.nii.gz" in err and err.count("\n") == 1
    code, _, err = run(["evaluate", tmp_path / "nothing.nii.gz", tmp_path / "truth.nii.gz"], capsys)
    assert code == 2 and "nothing.nii.gz: no such file or folder" in err
    nib.save(
        nib.Nifti1Image(np.full((12, 10, 8), 0.5, np.float32), np.eye(4)),
        str(tmp_path / "float.nii.gz"),
    )
    code, _, err = run(["evaluate", tmp_path / "float.nii.gz", tmp_path / "truth.nii.gz"], capsys)
    assert code == 2 and "float.nii.gz: not a label volume" in err
    # uint64 labels beyond int64 are not "negative"
    big = np.zeros((12, 10, 8), np.uint64)
    big[0, 0, 0] = 2**63 + 5
    nib.save(nib.Nifti1Image(big, np.eye(4), dtype=np.uint64), str(tmp_path / "big.nii.gz"))
    code, _, err = run(["evaluate", tmp_path / "big.nii.gz", tmp_path / "truth.nii.gz"], capsys)
    assert code == 2 and "big.nii.gz: not a label volume (values beyond 2^63 - 1)" in err
    # a folder against itself pairs every file with itself (Dice 1 everywhere): a warning
    mix = tmp_path / "mix"
    mix.mkdir()
    io.write_labels(mix / "case_L1.nii.gz", labels, geometry)
    io.write_labels(mix / "case_k2.nii.gz", labels, geometry)
    code, out, err = run(["evaluate", mix, mix, "--level", "1"], capsys)
    assert code == 0 and "and 1 other file(s): scored against itself as its own" in err


def test_bad_volumes_give_one_line_code_2(capsys, tmp_path):
    nib.save(
        nib.Nifti1Image(np.zeros((5, 5), np.float32), np.eye(4)), str(tmp_path / "flat.nii.gz")
    )
    data = np.ones((6, 6, 6), np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    (tmp_path / "junk.nii.gz").write_bytes(b"junk")
    io.write_labels(
        tmp_path / "ok.nii.gz", np.zeros((6, 6, 6), np.uint8), io.VolumeGeometry.default((6, 6, 6))
    )
    for name, fragment in (
        ("flat.nii.gz", "2D data of shape (5, 5)"),
        ("nan.nii.gz", "NaN or infinite"),
        ("junk.nii.gz", "cannot read NIfTI"),
    ):
        code, out, err = run(["evaluate", tmp_path / name, tmp_path / "ok.nii.gz"], capsys)
        assert code == 2, (name, err)
        assert out == "" and err.count("\n") == 1
        assert name in err and fragment in err
        assert "Traceback" not in err


def test_synth_is_deterministic_and_evaluates(capsys, tmp_path):
    for out in ("a", "b"):
        code, _, err = run(
            ["--quiet", "synth", tmp_path / out, "--n", "4", "--seed", "1", "--size", "24"], capsys
        )
        assert code == 0, err

    def digest(root):
        return {
            p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    a, b = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert a == b
    assert (
        "images/case_000.nii.gz" in a and "labels/case_003_L3.nii.gz" in a and "dataset.json" in a
    )
    dataset = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert {c["level"] for c in dataset["classes"]} == {1, 2, 3}
    # ground truth against itself: every class Dice 1
    code, out, err = run(
        [
            "evaluate",
            tmp_path / "a" / "labels",
            tmp_path / "a" / "labels",
            "--json",
            "--no-hausdorff",
        ],
        capsys,
    )
    assert code == 0, err
    report = json.loads(out)
    assert len(report["cases"]) == 12
    assert all(c["dice"] == pytest.approx(1.0) for case in report["cases"] for c in case["classes"])
    # nesting: L3 inside L2 inside L1 via the parents in dataset.json
    parent = {(c["level"], c["id"]): c["parent"] for c in dataset["classes"]}
    for case in ("case_000", "case_001"):
        lv = {
            lvl: io.read_volume(tmp_path / "a" / "labels" / f"{case}_L{lvl}.nii.gz").data.astype(
                int
            )
            for lvl in (1, 2, 3)
        }
        for lvl in (2, 3):
            mapped = np.vectorize(lambda i, lvl=lvl: parent[(lvl, int(i))])(lv[lvl])
            np.testing.assert_array_equal(mapped, lv[lvl - 1])


def test_synth_split_and_k_pairing(capsys, tmp_path):
    code, out, err = run(
        [
            "--quiet",
            "synth",
            tmp_path / "d",
            "--n",
            "5",
            "--size",
            "20",
            "--split",
            "60/20/20",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["splits"] == {"train": 3, "val": 1, "test": 1}
    assert sorted(p.name for p in (tmp_path / "d" / "test" / "images").iterdir()) == [
        "case_004.nii.gz"
    ]
    # a prediction named as `hypseg cluster` names it pairs with the level of dataset.json with K classes
    truth = io.read_volume(tmp_path / "d" / "test" / "labels" / "case_004_L2.nii.gz")
    seg = tmp_path / "seg"
    io.write_labels(seg / "case_004_k4.nii.gz", truth.data.astype(int), truth.geometry)
    code, out, err = run(
        ["evaluate", seg, tmp_path / "d" / "test", "--json", "--csv", tmp_path / "s.csv"], capsys
    )
    assert code == 0, err
    (case,) = json.loads(out)["cases"]
    assert (case["case"], case["k"], case["level"]) == ("case_004", 4, 2)
    assert case["mean_dice"] == pytest.approx(1.0)
    rows = (tmp_path / "s.csv").read_text().splitlines()
    assert rows[0].startswith("case,pred,truth,k,level,class_id,class_name")
    assert len(rows) == 1 + 4


def test_synth_mrc_format(capsys, tmp_path):
    code, _, err = run(
        ["--quiet", "synth", tmp_path / "m", "--n", "1", "--size", "20", "--format", "mrc"], capsys
    )
    assert code == 0, err
    vol = io.read_volume(tmp_path / "m" / "images" / "case_000.mrc")
    assert vol.data.shape == (20, 20, 20) and vol.geometry.format == "mrc"


@pytest.mark.parametrize(
    "content",
    [
        '{"classes": [{"id": 0, "name": "bg"}, {"id": 1, "name": "liver"}]}',
        '{"classes": {"0": "bg", "1": "liver"}}',
        "[1, 2]",
        "{not json",
    ],
)
def test_evaluate_ignores_another_tools_dataset_json(capsys, tmp_path, content):
    """A dataset.json beside the truth that is not hypseg synth's is skipped with a warning
    naming it, and the files are paired by name (review: KeyError 'level', exit 1)."""
    (tmp_path / "labels").mkdir()
    (tmp_path / "pred").mkdir()
    labels, geometry = _write_truth(tmp_path / "labels")
    (tmp_path / "labels" / "truth.nii.gz").rename(tmp_path / "labels" / "c1.nii.gz")
    io.write_labels(tmp_path / "pred" / "c1.nii.gz", labels, geometry)
    (tmp_path / "dataset.json").write_text(content)
    for pred in (tmp_path / "pred", tmp_path / "pred" / "c1.nii.gz"):
        code, out, err = run(["evaluate", pred, tmp_path / "labels", "--json"], capsys)
        assert code == 0, err
        assert json.loads(out)["cases"][0]["mean_dice"] == pytest.approx(1.0)
        assert f"{tmp_path / 'dataset.json'}: not" in err


def test_empty_arguments_and_empty_split_parts(tmp_path, capsys, monkeypatch):
    """`hypseg synth "$OUT"` with OUT unset must not write into the working folder; a split
    part that gets no volume writes no folder; dataset.json keeps the generator's
    parameters."""
    monkeypatch.chdir(tmp_path)
    for argv, after in [
        (["synth", "", "--n", "1"], "synth"),
        (["cluster", "x", "--features", "intensity", "--k", "2", "-o", ""], "-o"),
        (["synth", "d", "--split", ""], "--split"),
    ]:
        code, out, err = run(argv, capsys)
        assert code == 2 and out == "" and err.count("\n") == 1
        assert f"an empty argument after '{after}' (an unset shell variable?)" in err
    assert list(tmp_path.iterdir()) == []
    code, out, err = run(["synth", "d", "--n", "2", "--size", "16", "--split", "1/0/1"], capsys)
    assert code == 0, err
    assert "val gets none of the 2 volume(s); no val folder is written" in err
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["test", "train"]
    meta = json.loads((tmp_path / "d" / "train" / "dataset.json").read_text())
    assert meta["generator"]["program"].startswith("hypseg ")
    assert meta["generator"]["noise_std"] > 0 and "psf_sigma_voxels" in meta["generator"]


def _two_cases_clustered(tmp_path, capsys):
    """``tmp_path/d``: two synthetic 16^3 cases; ``tmp_path/seg``: their plain k-means labels
    at k = 2 and 4 (intensity features, no spatial step). Returns (data, seg)."""
    data, seg = tmp_path / "d", tmp_path / "seg"
    assert run(["-q", "synth", data, "--n", "2", "--size", "16"], capsys)[0] == 0
    code, _, err = run(
        ["-q", "cluster", data / "images", "--features", "intensity", "--k", "2", "--k", "4"]
        + ["-o", seg, "--smooth", "0", "--snap", "0", "--mrf", "0", "--nest", "0"],
        capsys,
    )
    assert code == 0, err
    return data, seg


def test_evaluate_names_a_case_missing_at_one_k(tmp_path, capsys):
    data, seg = _two_cases_clustered(tmp_path, capsys)
    code, _, err = run(["evaluate", seg, data / "labels", "--no-hausdorff"], capsys)
    assert code == 0 and "no prediction at" not in err, err
    (seg / "case_001_k4.nii.gz").unlink()  # a lost output
    code, out, err = run(["evaluate", seg, data / "labels", "--no-hausdorff", "--json"], capsys)
    assert code == 0
    assert (
        "no prediction at k=4 for 1 case(s) scored at other k: case_001 (the k=4 scores are "
        "over the other 1 case(s))"
    ) in err
    assert len(json.loads(out)["cases"]) == 3


DAMAGES = {  # a case record edited by hand, in ways that made cluster or evaluate crash
    "k a list": lambda doc: doc["sets"][0].update(k=[2]),
    "k text": lambda doc: doc["sets"][0].update(k="2"),
    "bytes text": lambda doc: doc["sets"][1].update(bytes="big"),
    "fit a list": lambda doc: doc.update(fit=["volume"]),
    "sets of numbers": lambda doc: doc.update(sets=[1, 2]),
    "ragged centres": lambda doc: doc["sets"][0].update(centers=[[0.1], [0.1, 0.2]]),
    "source a list": lambda doc: doc.update(source=[1]),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_case_record_is_no_record(tmp_path, capsys, damage):
    """A per-case centroid record edited or damaged by hand: cluster redoes its case (and
    writes a sound record), the merged centroids.json and evaluate leave it out, each with a
    warning naming it, instead of failing (TypeError, exit 1)."""
    data, seg = _two_cases_clustered(tmp_path, capsys)
    record = seg / "case_000.centroids.json"
    doc = json.loads(record.read_text())
    DAMAGES[damage](doc)
    record.write_text(json.dumps(doc))
    code, _, err = run(["evaluate", seg, data / "labels", "--no-hausdorff"], capsys)
    assert code == 0, err
    assert f"warning: {record}: not a centroid record as cluster writes it" in err
    cluster = ["cluster", data / "images", "--features", "intensity", "-o", seg, "--smooth", "0"]
    cluster += ["--snap", "0", "--mrf", "0", "--nest", "0"]
    code, _, err = run([*cluster, "--k", "8"], capsys)  # the other case's record is merged
    assert code == 0, err
    merged = json.loads((seg / "centroids.json").read_text())
    assert {(s["case"], s["k"]) for s in merged["sets"]} >= {("case_001", 2), ("case_001", 8)}
    record.write_text(json.dumps(doc))
    code, _, err = run(
        ["-q", *cluster, "--k", "2", "--k", "4", "--skip-existing", "--json"], capsys
    )
    assert code == 0, err
    rows = {Path(r["volume"]).name: r["status"] for r in json.loads(_)["volumes"]}
    assert rows == {"case_000.nii.gz": "done", "case_001.nii.gz": "skipped"}
    assert {s["k"] for s in json.loads(record.read_text())["sets"]} == {2, 4}
    record.write_text(json.dumps(doc))  # case_001 alone, again: its record merged with it
    cluster[1] = data / "images" / "case_001.nii.gz"
    code, _, err = run([*cluster, "--k", "8"], capsys)
    assert code == 0, err
    assert (
        f"warning: {seg / 'centroids.json'}: left out 1 centroid record(s) that are not as "
        "cluster writes them (damaged, or edited?): case_000.centroids.json"
    ) in err


def test_evaluate_warns_about_predictions_left_by_another_run(tmp_path, capsys):
    data, seg = tmp_path / "d", tmp_path / "seg"
    assert run(["-q", "synth", data, "--n", "2", "--size", "16"], capsys)[0] == 0
    raw = ["--smooth", "0", "--snap", "0", "--mrf", "0", "--nest", "0"]
    base = ["-q", "cluster", data / "images", "--features", "intensity", "-o", seg]
    assert run([*base, "--k", "2", "--k", "4", *raw], capsys)[0] == 0
    assert run([*base, "--k", "8", *raw], capsys)[0] == 0  # same options: the record keeps 2, 4
    code, _, err = run(["evaluate", seg, data / "labels", "--no-hausdorff"], capsys)
    assert code == 0 and "warning" not in err, err
    # k = 8 again with another --smooth: the k = 2 and 4 files are left from the first run
    assert run([*base, "--k", "8", *raw[2:], "--smooth", "0.5"], capsys)[0] == 0
    code, _, err = run(["evaluate", seg, data / "labels", "--no-hausdorff"], capsys)
    assert code == 0
    assert (
        "4 prediction(s) not written by the cluster run recorded beside them in "
        "<case>.centroids.json (left by an earlier run with other options?), scored anyway: "
        "case_000_k2.nii.gz, case_000_k4.nii.gz, case_001_k2.nii.gz, case_001_k4.nii.gz"
    ) in err
    assert "cluster runs made differently" not in err
    # one case redone with yet other options: two ways in one folder
    one = data / "images" / "case_001.nii.gz"
    code, _, err = run(
        ["-q", "cluster", one, "--features", "intensity", "-o", seg, "--k", "2", "--k", "4"]
        + ["--k", "8", *raw[:6], "--nest", "2"],
        capsys,
    )
    assert code == 0, err
    code, _, err = run(["evaluate", seg, data / "labels", "--no-hausdorff"], capsys)
    assert code == 0
    assert "2 prediction(s) not written" in err and "case_000_k2.nii.gz, case_000_k4" in err
    assert (
        "the predictions come from 2 cluster runs made differently (nest, smooth differ "
        "between their records), scored together: case_000; case_001"
    ) in err
    # a file replaced by hand (another size than the record says) is not the run's either
    (seg / "case_001_k2.nii.gz").write_bytes((seg / "case_001_k4.nii.gz").read_bytes())
    code, _, err = run(["evaluate", seg, data / "labels", "--no-hausdorff"], capsys)
    assert "3 prediction(s) not written" in err and "case_001_k2.nii.gz" in err


def test_a_same_named_input_of_another_format_replaces_the_labels_it_recorded(tmp_path, capsys):
    """QA: a.nii then a.mrc clustered into one folder left a_k2.nii (its record replaced)
    beside a_k2.mrc, and evaluate refused the folder (one case name twice). The labels the
    replaced record lists are removed; a file of another size is left, with a warning."""
    import mrcfile

    data, seg = tmp_path / "d", tmp_path / "seg"
    assert run(["-q", "synth", data, "--n", "1", "--size", "16"], capsys)[0] == 0
    volume = io.read_volume(data / "images" / "case_000.nii.gz").data
    nifti, mrc = tmp_path / "a" / "x.nii.gz", tmp_path / "b" / "x.mrc"
    nifti.parent.mkdir()
    (tmp_path / "b").mkdir()
    nifti.write_bytes((data / "images" / "case_000.nii.gz").read_bytes())
    with mrcfile.new(str(mrc)) as handle:
        handle.set_data(np.ascontiguousarray(volume.T))
        handle.voxel_size = 1.0
    intensity = ["--features", "intensity", "-o", seg, "--k", "2", "--k", "3"]
    assert run(["-q", "cluster", nifti, *intensity], capsys)[0] == 0
    code, _, err = run(["cluster", mrc, "--features", "intensity", "-o", seg, "--k", "2"], capsys)
    assert code == 0, err
    removed = f"{seg / 'x_k2.nii.gz'}: removed, the labels of {nifti} that an earlier run wrote"
    assert removed in err and "x_k3.nii.gz" not in err, err
    assert sorted(p.name for p in seg.glob("x_k*")) == ["x_k2.mrc", "x_k3.nii.gz"]
    # back to the NIfTI, with a file of x_k2.mrc's name but not its size: left, and said
    (seg / "x_k2.mrc").write_bytes(b"not the labels")
    code, _, err = run(["cluster", nifti, "--features", "intensity", "-o", seg, "--k", "2"], capsys)
    assert code == 0, err
    assert f"{seg / 'x_k2.mrc'}: left as it is (not the size the earlier record gave)" in err
    assert (seg / "x_k2.mrc").read_bytes() == b"not the labels"


def test_bids_masks_and_ground_truth_pair_by_entities(tmp_path, capsys):
    """fMRIPrep-style names: sub-01_desc-preproc_T1w with sub-01_desc-brain_mask (cluster
    --mask) and sub-01_desc-aseg_dseg (evaluate), sidecars beside them without warnings."""
    rng = np.random.default_rng(0)
    anat, masks, truth = tmp_path / "anat", tmp_path / "masks", tmp_path / "truth"
    for folder in (anat, masks, truth):
        folder.mkdir()
    for sub in ("01", "02"):
        labels = np.zeros((16, 16, 16), np.uint8)
        labels[4:12, 4:12, 4:12] = 1
        image = labels * 1.0 + rng.normal(0, 0.1, labels.shape)
        affine = np.diag([1.0, 1.0, 1.0, 1.0])
        nib.save(
            nib.Nifti1Image(image.astype(np.float32), affine),
            anat / f"sub-{sub}_desc-preproc_T1w.nii.gz",
        )
        (anat / f"sub-{sub}_desc-preproc_T1w.json").write_text("{}")
        inside = np.zeros_like(labels)
        inside[1:15, 1:15, 1:15] = 1
        nib.save(nib.Nifti1Image(inside, affine), masks / f"sub-{sub}_desc-brain_mask.nii.gz")
        nib.save(nib.Nifti1Image(labels, affine), truth / f"sub-{sub}_desc-aseg_dseg.nii.gz")
    seg = tmp_path / "seg"
    code, _, err = run(
        ["cluster", anat, "--features", "intensity", "--k", "2", "--mask", masks, "-o", seg],
        capsys,
    )
    assert code == 0, err
    assert "that are not volumes" not in err, err  # the sidecars are part of their volumes
    out = io.read_volume(seg / "sub-01_desc-preproc_T1w_k2.nii.gz").data
    assert (out[0] == 0).all() and (out[1:15, 1:15, 1:15] > 0).all()
    code, out, err = run(["evaluate", seg, truth, "--no-hausdorff", "--json"], capsys)
    assert code == 0, err
    cases = json.loads(out)["cases"]
    assert [(c["case"], Path(c["truth"]).name) for c in cases] == [
        ("sub-01_desc-preproc_T1w", "sub-01_desc-aseg_dseg.nii.gz"),
        ("sub-02_desc-preproc_T1w", "sub-02_desc-aseg_dseg.nii.gz"),
    ]
    # the image itself beside its dseg is not taken as the ground truth
    for image in anat.glob("sub-01_*"):
        (truth / image.name).write_bytes(image.read_bytes())
    code, out, err = run(["evaluate", seg, truth, "--no-hausdorff", "--json"], capsys)
    assert Path(json.loads(out)["cases"][0]["truth"]).name == "sub-01_desc-aseg_dseg.nii.gz"
    # two dseg files of one subject: not guessed
    (truth / "sub-02_desc-aparcaseg_dseg.nii.gz").write_bytes(
        (truth / "sub-02_desc-aseg_dseg.nii.gz").read_bytes()
    )
    code, out, err = run(["evaluate", seg, truth, "--no-hausdorff", "--json"], capsys)
    assert [c["case"] for c in json.loads(out)["cases"]] == ["sub-01_desc-preproc_T1w"]
    assert (
        "1 prediction(s) not scored, several BIDS dseg files fit each: "
        "sub-02_desc-preproc_T1w_k2.nii.gz (sub-02_desc-aparcaseg_dseg.nii.gz, "
        "sub-02_desc-aseg_dseg.nii.gz)"
    ) in err
    # two masks of one input, neither desc-brain: an error naming both
    (masks / "sub-01_space-T1w_desc-brain_mask.nii.gz").write_bytes(b"")
    (masks / "sub-01_desc-head_mask.nii.gz").write_bytes(
        (masks / "sub-01_desc-brain_mask.nii.gz").read_bytes()
    )
    (masks / "sub-01_desc-brain_mask.nii.gz").rename(masks / "sub-01_desc-ribbon_mask.nii.gz")
    code, _, err = run(
        ["cluster", anat, "--features", "intensity", "--k", "2", "--mask", masks, "-o", seg],
        capsys,
    )
    assert code == 2
    assert "2 masks of sub-01_desc-preproc_T1w.nii.gz: sub-01_desc-head_mask.nii.gz, " in err


def test_evaluate_messages_name_what_is_missing(tmp_path, capsys):
    data, seg = _two_cases_clustered(tmp_path, capsys)
    # a ground-truth file missing: the prediction is there, its ground truth is not
    (data / "labels" / "case_001_L2.nii.gz").unlink()
    code, _, err = run(["evaluate", seg, data, "--no-hausdorff"], capsys)
    assert code == 0
    assert "no ground truth for 1 prediction(s): case_001_k4.nii.gz" in err
    assert "no prediction at" not in err, err
    # another tool's dataset.json: one warning, true to --level
    (data / "dataset.json").write_text('{"labels": {"background": 0}}')
    code, _, err = run(["evaluate", seg, data, "--level", "1", "--no-hausdorff"], capsys)
    assert code == 0
    assert err.count("not a dataset.json of hypseg synth") == 1, err
    assert "ignored, pairing by case name and --level 1" in err
    # a file that is no label volume beside a folder of predictions
    code, out, err = run(["evaluate", seg, data / "dataset.json"], capsys)
    assert code == 2 and out == ""
    assert err.strip().splitlines()[-1] == (
        f"hypseg: error: {data / 'dataset.json'}: not a label volume file (NIfTI or MRC: "
        ".nii.gz, .nii, .mrc, .map, .rec) or folder"
    )


def test_bids_fmriprep_tree_masks_and_dseg_recursive(tmp_path, capsys):
    """An fMRIPrep tree: each anat folder holds the image, its brain and ribbon masks and
    its dseg files; --recursive finds them, the image is not its own mask, desc-brain wins."""
    rng = np.random.default_rng(1)
    raw, prep = tmp_path / "raw", tmp_path / "derivatives" / "fmriprep"
    truth = np.zeros((16, 16, 16), np.uint8)
    truth[4:12, 4:12, 4:12] = 1
    brain = np.zeros_like(truth)
    brain[2:14, 2:14, 2:14] = 1
    for sub in ("01", "02"):
        anat = prep / f"sub-{sub}" / "anat"
        anat.mkdir(parents=True)
        image = (truth + rng.normal(0, 0.1, truth.shape)).astype(np.float32)
        for folder in (anat, raw / f"sub-{sub}" / "anat"):
            folder.mkdir(parents=True, exist_ok=True)
            nib.save(
                nib.Nifti1Image(image, np.eye(4)), folder / f"sub-{sub}_desc-preproc_T1w.nii.gz"
            )
        nib.save(nib.Nifti1Image(brain, np.eye(4)), anat / f"sub-{sub}_desc-brain_mask.nii.gz")
        nib.save(
            nib.Nifti1Image(np.ones_like(brain), np.eye(4)),
            anat / f"sub-{sub}_desc-ribbon_mask.nii.gz",
        )
        nib.save(nib.Nifti1Image(truth, np.eye(4)), anat / f"sub-{sub}_dseg.nii.gz")
    seg = tmp_path / "seg"
    base = ["cluster", "--features", "intensity", "--k", "2", "-o", seg]
    # the anat folder itself as mask folder: the image there is not taken as its own mask
    one = prep / "sub-01" / "anat"
    code, _, err = run([*base, raw / "sub-01" / "anat", "--mask", one], capsys)
    assert code == 0, err
    record = json.loads((seg / "sub-01_desc-preproc_T1w.centroids.json").read_text())
    assert record["source"]["mask"]["path"].endswith("sub-01_desc-brain_mask.nii.gz")
    # the whole tree
    code, _, err = run([*base, raw, "-r", "--mask", prep], capsys)
    assert code == 0, err
    out = io.read_volume(seg / "sub-02_desc-preproc_T1w_k2.nii.gz").data
    assert (out[brain == 0] == 0).all() and (out[brain == 1] > 0).all()
    code, out, err = run(["evaluate", seg, prep, "-r", "--no-hausdorff", "--json"], capsys)
    assert code == 0, err
    assert [Path(c["truth"]).name for c in json.loads(out)["cases"]] == [
        "sub-01_dseg.nii.gz",
        "sub-02_dseg.nii.gz",
    ]
    assert "warning" not in err, err  # the images and masks in the tree are no ground truth
    # a second prediction of sub-01 (the raw T1w) scored against the same dseg: named
    raw_k2 = seg / "sub-01_T1w_k2.nii.gz"
    raw_k2.write_bytes((seg / "sub-01_desc-preproc_T1w_k2.nii.gz").read_bytes())
    code, out, err = run(["evaluate", seg, prep, "-r", "--no-hausdorff"], capsys)
    assert (
        "1 ground-truth file(s) scored against several predictions at one k, counting that "
        "case more than once in the means: sub-01_dseg.nii.gz (sub-01_T1w_k2.nii.gz, "
        "sub-01_desc-preproc_T1w_k2.nii.gz)"
    ) in err


def test_a_mask_on_another_grid_is_named_once_per_input_with_a_pooled_fit(tmp_path, capsys):
    data = tmp_path / "d"
    assert run(["-q", "synth", data, "--n", "2", "--size", "16"], capsys)[0] == 0
    shifted = np.eye(4)
    shifted[:3, 3] = 5.0
    inside = np.ones((16, 16, 16), np.uint8)
    nib.save(nib.Nifti1Image(inside, shifted), tmp_path / "mask.nii.gz")
    code, _, err = run(
        ["cluster", data / "images", "--features", "intensity", "--k", "2", "--fit-on", "pooled"]
        + ["--mask", tmp_path / "mask.nii.gz", "-o", tmp_path / "seg"],
        capsys,
    )
    assert code == 0, err
    assert err.count("the mask is applied voxel by voxel") == 2, err  # once per input


def test_a_reader_of_stdout_that_leaves_stops_the_command_quietly(tmp_path, capsys, monkeypatch):
    """QA: `hypseg cache ls | head -1` said "hypseg: error: Broken pipe" and exited 1 (a
    `pipefail` script failed on it). It stops without a word, with SIGPIPE's status."""
    from hypsegcli import cli

    def gone(_payload):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "emit_json", gone)
    code, out, err = run(["cache", "ls", "--cache-dir", tmp_path, "--json"], capsys)
    assert (code, out, err) == (141, "", "")
    code, _, err = run(["--debug", "cache", "ls", "--cache-dir", tmp_path, "--json"], capsys)
    assert code != 141  # --debug: the traceback


def test_an_option_of_hypseg_itself_after_the_command_is_pointed_before_it(capsys):
    """QA: `hypseg cluster ... --quiet` was told "No such option: --quiet (Possible options:
    --nest)"; --quiet, -q, --debug and --version go before the command."""
    for argv, name, command in (
        (["cluster", "x", "--quiet"], "--quiet", "cluster"),
        (["cluster", "-q", "x"], "-q", "cluster"),
        (["cache", "ls", "--debug"], "--debug", "cache ls"),
        (["evaluate", "--version"], "--version", "evaluate"),
    ):
        code, out, err = run(argv, capsys)
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert err == (
            f"hypseg: error: No such option: {name}: it is an option of hypseg itself and goes "
            f"before the command: hypseg {name} {command} ...\n"
        )
    code, _, err = run(["cluster", "x", "--nope"], capsys)
    assert code == 2 and "No such option: --nope" in err and "(see 'hypseg cluster --help')" in err


def test_evaluate_table_folds_long_names_instead_of_cutting_them(tmp_path, capsys):
    """QA: in a batch log (stderr not a terminal: 80 columns) the table cut a BIDS name to
    "sub-0123456789_ses…"; names fold onto more lines, whole."""
    name = "sub-0123456789_ses-baseline_acq-mprage_run-01_T1w"
    seg, truth = tmp_path / "seg", tmp_path / "gt"
    seg.mkdir()
    truth.mkdir()
    labels = np.zeros((8, 8, 8), np.uint8)
    labels[2:6, 2:6, 2:6] = 1
    nib.save(nib.Nifti1Image(labels, np.eye(4)), truth / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(labels, np.eye(4)), seg / f"{name}_k2.nii.gz")
    code, _, err = run(["evaluate", seg, truth, "--no-hausdorff"], capsys)
    assert code == 0 and "…" not in err, err
    rows = [line.split("│") for line in err.splitlines() if line.startswith("│")]
    assert "".join(row[1].strip() for row in rows) == name  # the case column, line by line
    assert "".join(row[2].strip() for row in rows) == f"{name}_k2.nii.gz"
