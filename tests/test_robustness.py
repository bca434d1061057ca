"""Bad or careless command lines: inputs are never overwritten, bad outputs and foreign files are
refused before any work with one line and exit code 2, library warnings come out as one line."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import mrcfile
import nibabel as nib
import numpy as np
import pytest
import torch
from clitools import TINY_TRAIN, run, tiny_pipeline

from hypsegcli import cli, config, io, pipeline
from hypsegcli.errors import BadInputError, HypsegError
from hypsegcli.training import companion_paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("robust"), steps=2)


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def _one_error(code, out, err, *needles):
    lines = [line for line in err.splitlines() if line.startswith("hypseg: error:")]
    assert code == 2 and out == "" and len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_outputs_never_overwrite_inputs(trained, tmp_path, capsys):
    images = trained / "data" / "images"
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "x.nii.gz").write_bytes((images / "case_000.nii.gz").read_bytes())
    (scans / "x_k2.nii.gz").write_bytes((images / "case_001.nii.gz").read_bytes())
    before = {p.name: _md5(p) for p in scans.iterdir()}
    intensity = ["--features", "intensity", "--k", "2"]
    # the input folder as the output folder
    code, out, err = run(["cluster", scans, *intensity, "-o", scans], capsys)
    _one_error(code, out, err, "is also an input folder")
    # ... also below an input folder searched with --recursive
    code, out, err = run(["cluster", tmp_path, "-r", *intensity, "-o", scans / "seg"], capsys)
    _one_error(code, out, err, "is also an input folder")
    # a quoted pattern searches its folder (and, with a pattern for a folder, those below)
    code, out, err = run(["cluster", str(scans / "x*.nii.gz"), *intensity, "-o", scans], capsys)
    _one_error(code, out, err, f"{scans}: is also an input folder")
    code, out, err = run(
        ["cluster", str(tmp_path / "*" / "x.nii.gz"), *intensity, "-o", scans / "seg"], capsys
    )
    _one_error(code, out, err, "is also an input folder")
    # embed -o: its arrays and records would sit among the inputs
    model = trained / "model.pt"
    code, out, err = run(["embed", scans, "-m", model, "-o", scans], capsys)
    _one_error(code, out, err, "is also an input folder")
    code, out, err = run(["embed", tmp_path, "-r", "-m", model, "-o", scans / "emb"], capsys)
    _one_error(code, out, err, "is also an input folder")
    # inputs named one by one: x's labels would replace the input x_k2.nii.gz
    files = [scans / "x.nii.gz", scans / "x_k2.nii.gz"]
    code, out, err = run(["cluster", *files, *intensity, "-o", scans], capsys)
    _one_error(code, out, err, "x_k2.nii.gz: is one of the inputs")
    # train -o onto its own input, evaluate --csv onto a prediction it reads
    code, out, err = run(
        ["train", scans / "x.nii.gz", "-o", scans / "x.nii.gz", "--steps", "1", *TINY_TRAIN],
        capsys,
    )
    _one_error(code, out, err, "x.nii.gz: is one of the inputs; train -o would overwrite it")
    labels = trained / "data" / "labels"
    truth_md5 = _md5(labels / "case_000_L1.nii.gz")
    code, out, err = run(
        ["evaluate", labels / "case_000_L1.nii.gz", labels / "case_000_L1.nii.gz"]
        + ["--csv", labels / "case_000_L1.nii.gz"],
        capsys,
    )
    _one_error(code, out, err, "is one of the inputs; evaluate --csv would overwrite it")
    assert {p.name: _md5(p) for p in scans.iterdir()} == before
    assert _md5(labels / "case_000_L1.nii.gz") == truth_md5


def test_unusable_output_paths_are_refused_before_any_work(trained, tmp_path, capsys):
    images = trained / "data" / "images"
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    train = ["train", images, "--steps", "50", *TINY_TRAIN]
    code, out, err = run([*train, "-o", tmp_path], capsys)
    _one_error(code, out, err, "is a folder, train -o needs a file name")
    code, out, err = run([*train, "-o", afile / "m.pt"], capsys)
    _one_error(code, out, err, "afile: exists and is not a folder (train -o)")
    assert not list(tmp_path.glob("*.ckpt.pt"))  # refused before training, not after
    cluster = ["cluster", images, "--features", "intensity", "--k", "2"]
    code, out, err = run([*cluster, "-o", afile], capsys)
    _one_error(code, out, err, "afile: exists and is not a folder (cluster -o)")
    code, out, err = run(["embed", images, "-m", trained / "model.pt", "-o", afile], capsys)
    _one_error(code, out, err, "afile: exists and is not a folder (embed -o)")
    labels = trained / "data" / "labels"
    code, out, err = run(["evaluate", labels, labels, "--csv", tmp_path], capsys)
    _one_error(code, out, err, "is a folder, evaluate --csv needs a file name")
    assert afile.read_text() == "not a folder"
    # a name ending in / (or . or ..) names a folder, also one that does not exist yet: Path
    # would drop the / and write a file of that name
    new = tmp_path / "new"
    for name in (f"{new}/", f"{new}/.", ".."):
        code, out, err = run([*train, "-o", name], capsys)
        _one_error(code, out, err, f"'--output' / '-o': {name!r} names a folder")
        code, out, err = run(["evaluate", labels, labels, "--csv", name], capsys)
        _one_error(code, out, err, f"'--csv': {name!r} names a folder; a file name is needed")
    assert not new.exists()


def test_files_that_are_not_models_are_refused_in_one_line(trained, tmp_path, capsys):
    (tmp_path / "notes.pt").write_text("hello\n")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # pickled code, not our format
    torch.save({"a": 1}, tmp_path / "dict.pt")
    images = trained / "data" / "images"
    cases = {
        "notes.pt": "(not a PyTorch file)",
        "module.pt": "(it holds Python objects, not only tensors and plain data)",
        "dict.pt": "not a hypseg model file",
    }
    for name, needle in cases.items():
        code, out, err = run(
            ["cluster", images, "-m", tmp_path / name, "--k", "2", "-o", tmp_path / "seg"], capsys
        )
        line = _one_error(code, out, err, f"{name}: not a hypseg model file", needle)
        assert "\x1b[" not in line
    for other in (images / "case_000.nii.gz", trained / "model.history.csv"):
        code, out, err = run(
            ["cluster", images, "-m", other, "--k", "2", "-o", tmp_path / "seg"], capsys
        )
        _one_error(code, out, err, f"{other.name}: not a hypseg model file (not a PyTorch file)")
    # weights of another shape than the configuration's: torch's first line said nothing,
    # the mismatch is named now (review)
    doc = torch.load(trained / "model.pt", weights_only=True)
    doc["model_config"] = dict(doc["model_config"], latent_dim=3)
    torch.save(doc, tmp_path / "wrong.pt")
    code, out, err = run(
        ["cluster", images, "-m", tmp_path / "wrong.pt", "--k", "2", "-o", tmp_path / "seg"],
        capsys,
    )
    _one_error(code, out, err, "wrong.pt: model weights do not match its configuration")
    assert "size mismatch for" in err and "torch.Size([3, 300, 1, 1, 1])" in err
    # a foreign file where --resume expects the checkpoint
    (tmp_path / "m.ckpt.pt").write_text("hello\n")
    code, out, err = run(
        ["train", images, "-o", tmp_path / "m.pt", "--resume", "--steps", "2", *TINY_TRAIN],
        capsys,
    )
    _one_error(code, out, err, "m.ckpt.pt: not a hypseg model file")


def test_bare_command_prints_help_without_an_empty_error(capsys):
    code, out, err = run([], capsys)
    assert code == 2 and "Usage" in out and "error" not in err


@pytest.mark.parametrize(
    "option",
    [["--beta", "nan"], ["--lr", "inf"], ["--margin", "-1"], ["--curvature", "inf"]],
)
def test_non_finite_or_negative_training_options_are_refused(trained, tmp_path, option, capsys):
    code, out, err = run(
        ["train", trained / "data" / "images", "-o", tmp_path / "m.pt", "--steps", "2"]
        + [*TINY_TRAIN, *option],
        capsys,
    )
    _one_error(code, out, err, option[0].lstrip("-"))
    assert not (tmp_path / "m.pt").exists()


def test_config_checks_directly():
    for bad in ({"beta": float("nan")}, {"margin": -0.1}, {"texture_weight": float("inf")}):
        with pytest.raises(BadInputError):
            config.ModelConfig(**bad)
    with pytest.raises(BadInputError):
        config.TrainConfig(steps=1, lr=float("inf"))
    with pytest.raises(BadInputError):
        config.SamplingConfig(r_max=float("inf"))


def test_synth_split_must_be_finite_and_folders_must_not_hold_other_cases(tmp_path, capsys):
    code, out, err = run(["synth", tmp_path / "s", "--n", "2", "--split", "nan/1/1"], capsys)
    _one_error(code, out, err, "--split 'nan/1/1'")
    argv = ["--quiet", "synth", tmp_path / "d", "--size", "16", "--seed", "1"]
    assert run([*argv, "--n", "3"], capsys)[0] == 0
    first = _md5(tmp_path / "d" / "images" / "case_000.nii.gz")
    assert run([*argv, "--n", "3"], capsys)[0] == 0  # the same command again: same files
    assert _md5(tmp_path / "d" / "images" / "case_000.nii.gz") == first
    code, out, err = run([*argv, "--n", "1"], capsys)  # case_001, case_002 would be stale
    _one_error(code, out, err, "holds 8 volume(s) this run would not write")
    code, out, err = run([*argv, "--n", "3", "--split", "2/1"], capsys)
    _one_error(code, out, err, "images/case_000.nii.gz")
    assert json.loads((tmp_path / "d" / "dataset.json").read_text())["cases"] == [
        "case_000",
        "case_001",
        "case_002",
    ]


def test_evaluate_names_unscored_truth_and_searches_sub_folders_with_recursive(
    trained, tmp_path, capsys
):
    labels = trained / "data" / "labels"
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "case_000_k2.nii.gz").write_bytes((labels / "case_000_L1.nii.gz").read_bytes())
    code, out, err = run(["evaluate", pred, labels, "--json"], capsys)
    assert code == 0, err
    assert "no prediction for 2 ground-truth case(s): case_001, case_002 (not scored)" in err
    assert len(json.loads(out)["cases"]) == 1
    nested = tmp_path / "nested" / "sub"
    nested.mkdir(parents=True)
    (nested / "case_000_k2.nii.gz").write_bytes((labels / "case_000_L1.nii.gz").read_bytes())
    code, out, err = run(["evaluate", tmp_path / "nested", labels], capsys)
    line = _one_error(code, out, err, "no volume found")
    assert "use --recursive to descend into sub-folders" in line  # which evaluate has now
    code, out, err = run(["evaluate", tmp_path / "nested", labels, "-r", "--json"], capsys)
    assert code == 0 and len(json.loads(out)["cases"]) == 1, err


def test_the_same_file_spelled_twice_is_one_input(trained, tmp_path, capsys):
    images = trained / "data" / "images"
    twice = [images / "case_000.nii.gz", images / ".." / "images" / "case_000.nii.gz"]
    code, out, err = run(
        ["--quiet", "cluster", *twice, "--features", "intensity", "--k", "2"]
        + ["-o", tmp_path, "--json"],
        capsys,
    )
    assert code == 0 and json.loads(out)["done"] == 1, err


def test_complex_voxels_are_refused(tmp_path, capsys):
    data = (np.random.default_rng(0).random((8, 8, 8)) + 1j).astype(np.complex64)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "c.nii.gz")
    with mrcfile.new(tmp_path / "c.mrc") as mrc:
        mrc.set_data(data)
    for name in ("c.nii.gz", "c.mrc"):
        code, out, err = run(
            ["cluster", tmp_path / name, "--features", "intensity", "--k", "2"]
            + ["-o", tmp_path / "seg"],
            capsys,
        )
        _one_error(code, out, err, f"{name}: complex64 data; hypseg needs real scalar voxels")
        assert "ComplexWarning" not in err


def test_library_messages_come_out_as_one_warning_line(tmp_path, capsys):
    img = nib.Nifti1Image(np.random.default_rng(0).random((12, 12, 12)).astype(np.float32), None)
    img.header["pixdim"][1:4] = [0.0, 1.0, -2.0]  # nibabel repairs this on reading, and says so
    nib.save(img, tmp_path / "pix.nii.gz")
    mask = (np.random.default_rng(1).random((12, 12, 12)) > 0.5).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "mask.nii.gz")
    code, _, err = run(
        ["cluster", tmp_path / "pix.nii.gz", "--features", "intensity", "--k", "2"]
        + ["-o", tmp_path / "a"],
        capsys,
    )
    assert code == 0, err
    lines = [line for line in err.splitlines() if "pixdim" in line]
    assert lines and all(line.startswith("warning: ") and "pix.nii.gz" in line for line in lines)
    # two intensities, three clusters: scikit-learn's ConvergenceWarning, on one line
    code, _, err = run(
        ["cluster", tmp_path / "mask.nii.gz", "--features", "intensity", "--k", "3"]
        + ["--smooth", "0", "--snap", "0", "--mrf", "0", "-o", tmp_path / "b"],
        capsys,
    )
    assert code == 0, err
    (line,) = [line for line in err.splitlines() if "Number of distinct clusters" in line]
    assert (
        line.startswith("warning: ") and "mask.nii.gz: k=3: Number of distinct clusters (2)" in line
    )
    assert "sklearn" not in err and "return fit_method" not in err


def test_runtime_messages_are_one_line():
    oom = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: "
        "can't allocate memory: you tried to allocate 26974617600 bytes."
    )
    message = cli.runtime_message(oom)
    assert message.startswith("out of memory (") and "--batch-size" in message
    assert cli.runtime_message(PermissionError(13, "Permission denied", "ro/m.pt")) == (
        "ro/m.pt: Permission denied"
    )
    text = cli.runtime_message(ValueError("first line\nsecond line"))
    assert text == "ValueError: first line (run with --debug for a traceback)"


def test_mrc_labels_with_control_bytes_are_written_back_printable(tmp_path):

    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    with mrcfile.new(tmp_path / "odd.mrc") as mrc:
        mrc.set_data(np.ascontiguousarray(data.T))
        mrc.header.label[0] = b"tab\there"
        mrc.header.label[1] = b"abc\x00garbage"
        mrc.header.nlabl = 2
    vol = io.read_volume(tmp_path / "odd.mrc")
    io.write_labels(tmp_path / "lab.mrc", (data > 50).astype(np.int64), vol.geometry)
    with mrcfile.open(tmp_path / "lab.mrc") as mrc:
        labels = [bytes(x).decode().strip() for x in mrc.header.label[: int(mrc.header.nlabl)]]
    assert labels == ["tab?here", "abc", "hypseg labels"]


def test_links_to_one_stored_object_are_two_cases(tmp_path):
    """git-annex / DataLad / DVC store identical files once and link to them: two cases."""

    store = tmp_path / "store"
    store.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), store / "obj.nii.gz")
    folder = tmp_path / "labels"
    folder.mkdir()
    for name in ("case_000_L1.nii.gz", "case_001_L1.nii.gz"):
        (folder / name).symlink_to(store / "obj.nii.gz")
    assert [p.name for p in io.collect_inputs([folder])] == [
        "case_000_L1.nii.gz",
        "case_001_L1.nii.gz",
    ]


def test_resubmission_skips_copied_inputs_and_pooled_fits_stay_one_fit(trained, tmp_path, capsys):
    images = trained / "data" / "images"
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(3):
        (inp / f"c{i}.nii.gz").write_bytes((images / f"case_00{i}.nii.gz").read_bytes())
    seg = tmp_path / "seg"
    argv = ["--quiet", "cluster", inp, "--features", "intensity", "--k", "2", "-o", seg, "--json"]
    assert json.loads(run(argv, capsys)[1])["done"] == 3
    # the same bytes again (a copy to node-local scratch, synth run again): still complete
    for i in range(3):
        (inp / f"c{i}.nii.gz").write_bytes((images / f"case_00{i}.nii.gz").read_bytes())
    assert json.loads(run(argv, capsys)[1])["skipped"] == 3
    # pooled: one changed input refits the centroids, so every volume is labelled again
    pooled = [*argv[:-2], tmp_path / "pooled", "--fit-on", "pooled", "--json"]
    assert json.loads(run(pooled, capsys)[1])["done"] == 3
    (inp / "c1.nii.gz").write_bytes((images / "case_000.nii.gz").read_bytes())
    summary = json.loads(run(pooled, capsys)[1])
    assert [v["status"] for v in summary["volumes"]] == ["done", "done", "done"]
    merged = json.loads((tmp_path / "pooled" / "centroids.json").read_text())
    assert [s["k"] for s in merged["sets"] if s["case"] is None] == [2]


def test_centroids_file_with_two_pooled_fits_for_one_k_is_refused(tmp_path):
    doc = {
        "format": "hypseg-centroids",
        "features": "intensity",
        "sets": [
            {"case": None, "k": 2, "centers": [[0.1], [0.9]]},
            {"case": None, "k": 2, "centers": [[0.2], [0.8]]},
        ],
    }
    (tmp_path / "c.json").write_text(json.dumps(doc))
    with pytest.raises(BadInputError, match="different pooled centroids for k=2"):
        pipeline.load_centroids(tmp_path / "c.json", [2], "intensity")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"case": None, "k": 2, "centers": [[0.0, 0.1], [0.2, 0.3], [0.1, 0.1]]}, "shape"),
        ({"case": None, "k": 2, "centers": [[0.0, 0.1]]}, "shape"),
        (
            {"case": None, "k": 2, "centers": [[0.0, 0.1, 0.2], [0.2, 0.3, 0.0]]},
            r"expected \(2, 2\)",
        ),
        ({"case": None, "k": 2, "centers": [[float("nan"), 0.1], [0.2, 0.3]]}, "NaN"),
        ({"case": None, "k": 2, "centers": "abc"}, "not a table of numbers"),
        ({"case": None, "centers": [[0.0, 0.1], [0.2, 0.3]]}, "k=None"),
        ({"case": None, "k": True, "centers": [[0.0, 0.1]]}, "k=True"),
        ({"case": None, "k": 2, "centers": [[0.0, 0.1], [0.2, 0.99]]}, "outside the ball"),
        ("not a set", "set 0 is not an object"),
    ],
)
def test_centroids_file_sets_are_checked(tmp_path, entry, message):
    """Each pooled set must be k finite points of the model's dimension inside its ball:
    extra rows gave labels beyond k, NaN rows labels equal to k, others a traceback."""
    doc = {"format": "hypseg-centroids", "features": "model", "geometry": "poincare"}
    doc |= {"curvature": 1.0, "sets": [entry]}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    with pytest.raises(BadInputError, match=rf"c\.json: .*{message}"):
        pipeline.load_centroids(tmp_path / "c.json", [2], "model", "poincare", dim=2, curvature=1.0)


def test_centroids_file_of_another_curvature_is_refused(tmp_path):
    doc = {"format": "hypseg-centroids", "features": "model", "geometry": "poincare"}
    doc |= {"curvature": 1.0, "sets": [{"case": None, "k": 2, "centers": [[0, 0.1], [0.2, 0]]}]}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    got = pipeline.load_centroids(tmp_path / "c.json", [2], "model", "poincare", dim=2, curvature=1)
    np.testing.assert_array_equal(got[2], [[0, 0.1], [0.2, 0]])
    with pytest.raises(BadInputError, match=r"c\.json: .*curvature -1.0, this model's is -2"):
        pipeline.load_centroids(tmp_path / "c.json", [2], "model", "poincare", dim=2, curvature=2)


def test_embed_skips_only_complete_pairs_of_array_and_record(trained, tmp_path, capsys):
    argv = ["--quiet", "embed", trained / "data" / "images" / "case_000.nii.gz"]
    argv += ["-m", trained / "model.pt", "-o", tmp_path, "--stride", "4", "--json"]
    assert run(argv, capsys)[0] == 0
    (tmp_path / "case_000.json").unlink()  # an array from before the records, or a killed run
    code, out, err = run([*argv, "--skip-existing"], capsys)
    assert code == 0 and json.loads(out)["volumes"][0]["status"] != "skipped", err
    assert (tmp_path / "case_000.json").is_file()
    code, out, _ = run([*argv, "--skip-existing"], capsys)
    assert json.loads(out)["volumes"][0]["status"] == "skipped"


def test_embed_skips_only_arrays_made_by_this_model_options_and_input(trained, tmp_path, capsys):
    """`embed -o --skip-existing` checks the record: another --patch-size, --stride or model,
    or another volume under the same name, is embedded again; a touched copy is not."""
    src = tmp_path / "in" / "vol.nii.gz"
    src.parent.mkdir()
    images = trained / "data" / "images"
    src.write_bytes((images / "case_000.nii.gz").read_bytes())
    out = tmp_path / "emb"
    argv = ["--quiet", "embed", src, "-m", trained / "model.pt", "-o", out, "--json"]
    argv += ["--stride", "4", "--skip-existing"]

    def status(extra=()):
        code, stdout, err = run([*argv, *extra], capsys)
        assert code == 0, err
        return json.loads(stdout)["volumes"][0]["status"]

    assert status() != "skipped"
    assert status() == "skipped"
    assert status(["--patch-size", "7"]) != "skipped"  # the record now says 7
    assert status(["--patch-size", "7"]) == "skipped"
    assert status(["--patch-size", "7", "--stride", "3"]) != "skipped"
    record = json.loads((out / "vol.json").read_text())
    assert record["patch_size"] == 7 and record["stride"] == 3
    assert np.load(out / "vol.npy").shape[:3] == tuple(record["shape"][:3])
    src.write_bytes(src.read_bytes())  # touched: same voxels and header
    assert status(["--patch-size", "7", "--stride", "3"]) == "skipped"
    src.write_bytes((images / "case_001.nii.gz").read_bytes())  # another volume, same name
    assert status(["--patch-size", "7", "--stride", "3"]) != "skipped"
    assert json.loads((out / "vol.json").read_text())["volume_sha256"] == io.array_sha256(
        io.read_volume(src).data
    )


def test_an_interrupted_embed_rewrite_is_redone(trained, tmp_path, capsys, monkeypatch):
    """The record is removed before the array is replaced and written after it, so a run
    stopped in between leaves no record describing another array, and a rerun redoes it."""
    src = trained / "data" / "images" / "case_000.nii.gz"
    out = tmp_path / "emb"
    argv = ["--quiet", "embed", src, "-m", trained / "model.pt", "-o", out, "--json"]
    argv += ["--stride", "4", "--skip-existing"]
    assert run(argv, capsys)[0] == 0

    def failing(path, array):
        raise OSError("16000 requested and 3040 written")

    monkeypatch.setattr(pipeline, "_save_npy", failing)
    code, stdout, err = run([*argv, "--patch-size", "7"], capsys)
    assert code == 1
    assert not (out / "case_000.json").exists()  # the old record is gone with the rewrite
    monkeypatch.undo()
    code, stdout, err = run([*argv, "--patch-size", "7"], capsys)
    assert code == 0 and json.loads(stdout)["volumes"][0]["status"] != "skipped", err
    assert json.loads((out / "case_000.json").read_text())["patch_size"] == 7


@pytest.mark.parametrize("broken", [b"", b"PK\x03\x04" + bytes(40), b"\x93NUMPY junk"])
def test_a_broken_array_beside_its_record_is_embedded_again(trained, tmp_path, capsys, broken):
    """An empty, zip or junk <case>.npy beside a valid record is not done: the dry run plans
    it and the run computes it again (an empty file had failed both with EOFError)."""
    src = trained / "data" / "images" / "case_000.nii.gz"
    out = tmp_path / "emb"
    argv = ["--quiet", "embed", src, "-m", trained / "model.pt", "-o", out, "--json"]
    argv += ["--stride", "4", "--skip-existing"]
    assert run(argv, capsys)[0] == 0
    (out / "case_000.npy").write_bytes(broken)
    code, stdout, err = run([*argv, "--dry-run"], capsys)
    assert code == 0 and json.loads(stdout)["volumes"][0]["state"] != "done", err
    code, stdout, err = run(argv, capsys)
    assert code == 0 and json.loads(stdout)["volumes"][0]["status"] != "skipped", err
    assert np.load(out / "case_000.npy").ndim == 4


def test_a_record_that_cannot_be_written_is_named(trained, tmp_path, capsys, monkeypatch):
    real = pipeline.write_text_atomic

    def no_space(path, text):  # the record's own write fails, as on a full disk
        def fail(self, data):
            raise OSError(28, "No space left on device", str(self))

        with monkeypatch.context() as m:
            m.setattr(Path, "write_bytes", fail)
            real(path, text)

    monkeypatch.setattr(pipeline, "write_text_atomic", no_space)
    src = trained / "data" / "images" / "case_000.nii.gz"
    argv = ["embed", src, "-m", trained / "model.pt", "-o", tmp_path / "emb", "--stride", "4"]
    code, _, err = run(argv, capsys)
    assert code == 1 and "case_000.json: cannot write (No space left on device)" in err


def test_a_full_disk_names_the_array_and_says_so(trained, tmp_path, capsys, monkeypatch):
    """numpy's short write (no errno) on a full disk is reported for the output file."""
    real_save = np.save

    def short(handle, array, *args, **kwargs):
        raise OSError("16000 requested and 3040 written")

    src = trained / "data" / "images" / "case_000.nii.gz"
    out = tmp_path / "emb"
    argv = ["embed", src, "-m", trained / "model.pt", "-o", out, "--stride", "4"]
    assert run(["--quiet", *argv], capsys)[0] == 0  # cache filled: np.save is the array's
    monkeypatch.setattr(np, "save", short)
    code, _, err = run([*argv, "--overwrite", "--cache-dir", tmp_path / "c2"], capsys)
    monkeypatch.setattr(np, "save", real_save)
    line = [x for x in err.splitlines() if "error" in x][-1]
    assert code == 1 and "is the disk full?" in line
    assert "cannot write cache entry" in line or "case_000.npy: cannot write" in line


def test_evaluate_two_runs_against_each_other_warns_of_nothing(trained, tmp_path, capsys):
    labels = trained / "data" / "labels"
    for run_name in ("a", "b"):
        (tmp_path / run_name).mkdir()
        for i in range(3):
            src = labels / f"case_00{i}_L1.nii.gz"
            (tmp_path / run_name / f"case_00{i}_k2.nii.gz").write_bytes(src.read_bytes())
    code, _, err = run(["evaluate", tmp_path / "a", tmp_path / "b"], capsys)
    assert code == 0 and "no prediction" not in err, err
    one = tmp_path / "a" / "case_000_k2.nii.gz"
    code, _, err = run(["evaluate", one, labels, "--level", "1"], capsys)
    assert code == 0 and "no prediction" not in err, err


def test_synth_ignores_temporary_files_of_a_killed_run(tmp_path, capsys):
    argv = ["--quiet", "synth", tmp_path / "d", "--n", "2", "--size", "16"]
    assert run(argv, capsys)[0] == 0
    (tmp_path / "d" / "images" / ".tmp-123-abcd-case_001.nii.gz").write_bytes(b"partial")
    code, _, err = run(argv, capsys)
    assert code == 0, err


def _blob(path, shape=(16, 16, 16), seed=0):
    rng = np.random.default_rng(seed)
    x = np.indices(shape).astype(np.float32)
    ball = ((x - np.array(shape, np.float32)[:, None, None, None] / 2) ** 2).sum(0) < 30
    nib.save(
        nib.Nifti1Image(ball * 2.0 + rng.normal(0, 0.3, shape).astype(np.float32), np.eye(4)), path
    )


def test_fewer_labels_than_k_are_named_in_a_warning(tmp_path, capsys):
    # two intensities, three clusters: k-means cannot find three
    mask = (np.random.default_rng(1).random((12, 12, 12)) > 0.5).astype(np.float32)
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "x.nii.gz")
    code, out, err = run(
        ["cluster", tmp_path / "x.nii.gz", "--features", "intensity", "--k", "2", "--k", "3"]
        + ["-o", tmp_path / "seg", "--json"],
        capsys,
    )
    assert code == 0, err
    found = json.loads(out)["volumes"][0]["labels_found"]
    for k in ("2", "3"):
        lab = np.asarray(nib.load(tmp_path / "seg" / f"x_k{k}.nii.gz").dataobj)
        assert found[k] == len(np.unique(lab))
    assert found == {"2": 2, "3": 2}
    assert "x.nii.gz: k=3: the output has 2 distinct label(s), not 3" in err
    assert "k=2:" not in err
    # the advice names the steps that ran, --min-size among them (it named the four spatial
    # steps, given already, and not --min-size, which had absorbed the label)
    _blob(tmp_path / "b.nii.gz", shape=(12, 12, 12))
    plain = ["--smooth", "0", "--snap", "0", "--mrf", "0", "--nest", "0"]
    code, _, err = run(
        ["cluster", tmp_path / "b.nii.gz", "--features", "intensity", "--k", "8", *plain]
        + ["--min-size", "200", "-o", tmp_path / "ms"],
        capsys,
    )
    assert code == 0 and "distinct label(s), not 8" in err, err
    assert "absorbed small ones; --min-size 0 shows the plain k-means labels" in err
    code, _, err = run(
        ["cluster", tmp_path / "x.nii.gz", "--features", "intensity", "--k", "3", *plain]
        + ["-o", tmp_path / "plain"],
        capsys,
    )
    assert code == 0
    assert "not 3 (the fit found fewer distinct clusters)" in err and "shows the plain" not in err


def test_outliers_are_clipped_and_take_no_cluster(tmp_path, capsys):
    """A hot voxel of 1e30 and a cold one of -1e30: the scaling clips them NORM_CLIP ranges
    beyond [0, 1], so k = 2 and 3 still split the volume's own intensities."""
    from hypsegcli.sampling import NORM_CLIP, normalize_volume

    _blob(tmp_path / "v.nii.gz")
    data = np.asarray(nib.load(tmp_path / "v.nii.gz").dataobj).copy()
    clean = normalize_volume(data)
    data[3, 3, 3], data[5, 5, 5] = 1e30, -1e30
    scaled = normalize_volume(data)
    assert scaled[3, 3, 3] == 1 + NORM_CLIP and scaled[5, 5, 5] == -NORM_CLIP
    others = np.ones(scaled.shape, bool)
    others[3, 3, 3] = others[5, 5, 5] = False
    # the other voxels keep their scale (the 1st / 99th percentiles hardly move)
    np.testing.assert_allclose(scaled[others], clean[others], atol=0.01)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "x.nii.gz")
    code, out, err = run(
        ["cluster", tmp_path / "x.nii.gz", "--features", "intensity", "--k", "2", "--k", "3"]
        + ["-o", tmp_path / "seg", "--json"],
        capsys,
    )
    assert code == 0, err
    assert json.loads(out)["volumes"][0]["labels_found"] == {"2": 2, "3": 3}
    lab = np.asarray(nib.load(tmp_path / "seg" / "x_k2.nii.gz").dataobj)
    assert min(np.bincount(lab.ravel())) > 100  # the ball against the rest, not 1 voxel


@pytest.mark.parametrize(
    "option, needle",
    [
        (["--smooth", "1e38"], "--smooth 1e+38: should be a number from 0 to 1e+06"),
        (["--mrf", "nan"], "--mrf"),
        (["--snap", "1e300"], "--snap 1e+300: should be a number from 0 to 1000 voxels"),
        (["--fit-samples", "2", "--k", "3"], "--fit-samples 2: should be at least the largest"),
        (["--device", "cuda:3"], "--device cuda:3"),
        (["--device", "gpu"], "--device 'gpu'"),
    ],
)
def test_cluster_options_out_of_range_are_refused_up_front(tmp_path, option, needle, capsys):
    _blob(tmp_path / "v.nii.gz")
    if option[:2] == ["--device", "cuda:3"] and torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    code, out, err = run(
        ["cluster", tmp_path / "v.nii.gz", "--features", "intensity", "--k", "2", *option]
        + ["-o", tmp_path / "seg"],
        capsys,
    )
    _one_error(code, out, err, needle)
    assert not list((tmp_path / "seg").glob("*.nii.gz")) if (tmp_path / "seg").exists() else True


def test_values_beyond_float32_are_named_as_such(tmp_path, capsys):
    data = np.exp(np.linspace(0, 100, 8**3)).reshape(8, 8, 8)  # float64 up to 2.7e43
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "huge.nii.gz")
    code, out, err = run(
        ["cluster", tmp_path / "huge.nii.gz", "--features", "intensity", "--k", "2"]
        + ["-o", tmp_path / "seg"],
        capsys,
    )
    _one_error(code, out, err, "huge.nii.gz: voxel values beyond the float32 range")
    assert "NaN" not in err and "RuntimeWarning" not in err


def test_resume_names_the_settings_it_keeps(trained, tmp_path, capsys):
    images = trained / "data" / "images"
    model = tmp_path / "m.pt"
    assert (
        run(["--quiet", "train", images, "-o", model, "--steps", "2", *TINY_TRAIN], capsys)[0] == 0
    )
    code, _, err = run(
        ["--quiet", "train", images, "-o", model, "--resume", "--steps", "3", *TINY_TRAIN]
        + ["--latent-dim", "3", "--geometry", "euclidean"],
        capsys,
    )
    assert code == 0, err
    assert "--resume keeps the checkpoint's settings: " in err
    assert "latent_dim 2 (not 3)" in err and "geometry 'hyperbolic' (not 'euclidean')" in err
    code, _, err = run(
        ["--quiet", "train", images, "-o", model, "--resume", "--steps", "3", *TINY_TRAIN], capsys
    )
    assert code == 0 and "at step 3 already, --steps 3: nothing to train" in err
    assert "keeps the checkpoint's settings" not in err
    # review: options left at their defaults are not named, as if asked otherwise
    other = tmp_path / "o.pt"
    argv = ["--quiet", "train", images, "-o", other, *TINY_TRAIN]
    code, _, err = run(
        [*argv, "--steps", "1", "--seed", "3", "--beta", "8", "--norm", "zscore"], capsys
    )
    assert code == 0, err
    code, _, err = run([*argv, "--steps", "2", "--resume"], capsys)
    assert code == 0 and "keeps the checkpoint's" not in err and "random streams" not in err, err
    code, _, err = run([*argv, "--steps", "3", "--resume", "--seed", "0", "--beta", "8"], capsys)
    assert code == 0 and "keeps the checkpoint's" not in err
    assert "--resume continues the checkpoint's random streams (seed 3, not 0)" in err
    code, _, err = run([*argv, "--steps", "4", "--resume", "--norm-range", "1", "99"], capsys)
    assert "keeps the checkpoint's settings: norm_low" not in err  # the same values
    code, _, err = run([*argv, "--steps", "5", "--resume", "--norm", "percentile"], capsys)
    assert "keeps the checkpoint's settings: norm 'zscore' (not 'percentile')" in err
    # a resume that trains nothing keeps the checkpoint's batch size and rate on record
    code, _, err = run(
        ["train", images, "-o", model, "--resume", "--steps", "3", *TINY_TRAIN]
        + ["--batch-size", "5", "--lr", "0.5"],
        capsys,
    )
    assert code == 0 and "resuming with" not in err, err
    ckpt = torch.load(model.with_suffix(".ckpt.pt"), weights_only=False)
    assert (ckpt["train_config"]["batch_size"], ckpt["train_config"]["lr"]) == (4, 1e-3)
    assert {g["lr"] for g in ckpt["optimizer_state"]["param_groups"]} == {1e-3}


def test_embedding_options_with_intensity_features_are_named_as_ignored(tmp_path, capsys):
    _blob(tmp_path / "v.nii.gz")
    base = ["cluster", tmp_path / "v.nii.gz", "--features", "intensity", "--k", "2"]
    code, _, err = run([*base, "--stride", "2", "-o", tmp_path / "a"], capsys)
    assert code == 0, err
    assert "--stride 2 applies to embeddings only and is ignored" in err
    code, _, err = run([*base, "-o", tmp_path / "b"], capsys)
    assert code == 0 and "ignored" not in err


def test_divergence_on_unscaled_intensities_points_at_the_scaling(tmp_path, capsys):
    _blob(tmp_path / "v.nii.gz", shape=(20, 20, 20))
    data = np.asarray(nib.load(tmp_path / "v.nii.gz").dataobj) * 1e20
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), tmp_path / "big.nii.gz")
    code, _, err = run(
        ["train", tmp_path / "big.nii.gz", "-o", tmp_path / "m.pt", "--steps", "3"]
        + [*TINY_TRAIN, "--norm", "none"],
        capsys,
    )
    assert code == 1 and "training diverged" in err, err
    assert "or scaled intensities (--norm percentile or zscore)" in err


def test_cache_housekeeping_creates_nothing_and_a_file_in_the_way_is_bad_input(tmp_path, capsys):
    missing = tmp_path / "nothing" / "here"
    for argv in (["cache", "ls"], ["cache", "clear"], ["cache", "path"]):
        code, _, err = run([*argv, "--cache-dir", missing], capsys)
        assert code == 0, err
    code, out, _ = run(["cache", "ls", "--cache-dir", missing, "--json"], capsys)
    assert code == 0 and json.loads(out) == []
    assert not (tmp_path / "nothing").exists()
    blocker = tmp_path / "cachefile"
    blocker.write_text("x")
    for argv in (["cache", "ls"], ["cache", "clear"]):
        code, _, err = run([*argv, "--cache-dir", blocker], capsys)
        assert code == 2 and f"{blocker}: unusable cache folder (a file is in the way" in err
        assert err.count("\n") == 1
    assert blocker.read_text() == "x"


def test_resume_without_a_checkpoint_fails_before_reading_any_volume(tmp_path, capsys):
    """--resume checks its checkpoint first: a missing one is named, not a bad volume."""
    (tmp_path / "broken.nii.gz").write_bytes(b"not a volume")
    code, out, err = run(
        ["train", tmp_path / "broken.nii.gz", "-o", tmp_path / "m.pt", "--resume", *TINY_TRAIN],
        capsys,
    )
    _one_error(code, out, err, "no checkpoint to resume from")
    assert "broken" not in err
    (tmp_path / "m.ckpt.pt").write_bytes((tmp_path / "broken.nii.gz").read_bytes())
    code, out, err = run(
        ["train", tmp_path / "broken.nii.gz", "-o", tmp_path / "m.pt", "--resume", *TINY_TRAIN],
        capsys,
    )
    _one_error(code, out, err, "m.ckpt.pt: not a hypseg model file")


def test_cache_is_keyed_by_the_model_not_by_the_bytes_of_its_file(trained, tmp_path, capsys):
    """A model file with other metadata (wall time) but the same weights reuses the cached
    embeddings; another curvature or one changed weight does not."""
    from hypsegcli.modelfile import load_model_file, model_content_sha256, save_model_file

    doc = load_model_file(trained / "model.pt")
    payload = {k: v for k, v in doc.items() if k not in ("format", "format_version", "versions")}
    same = save_model_file(tmp_path / "same.pt", {**payload, "elapsed_seconds": 12345.0})
    assert _md5(same) != _md5(trained / "model.pt")
    base = model_content_sha256(doc)
    assert model_content_sha256(load_model_file(same)) == base
    bent = {**doc, "model_config": {**doc["model_config"], "curvature": 2.0}}
    assert model_content_sha256(bent) != base
    nudged = {**doc, "state_dict": dict(doc["state_dict"])}
    name = next(iter(nudged["state_dict"]))
    nudged["state_dict"][name] = nudged["state_dict"][name].clone()
    nudged["state_dict"][name].view(-1)[0] += 1e-6
    assert model_content_sha256(nudged) != base
    image = trained / "data" / "images" / "case_000.nii.gz"
    cache = tmp_path / "cache"
    for model, cached in ((trained / "model.pt", 0), (same, 1)):
        code, out, err = run(
            ["embed", image, "-m", model, "--cache-dir", cache, "--json", "--threads", "2"], capsys
        )
        assert code == 0, err
        assert json.loads(out)["cached"] == cached


def _kill_on_second_label_file(monkeypatch, how):
    """Make cluster's second label file end the run as ``how`` would (after writing it)."""

    real, calls = pipeline.write_labels, []

    def write_then_stop(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(args[0])
        if len(calls) == 2:
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_labels", write_then_stop)
    return calls


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_interrupted_rewrite_is_redone_and_recorded(trained, tmp_path, capsys, monkeypatch, how):
    """A run stopped between a case's label files (SIGTERM at a Slurm time limit, Ctrl-C)
    leaves no record saying the case is complete, writes its manifest record and rebuilds
    centroids.json; the resubmitted command redoes the case and matches a fresh run."""
    image = trained / "data" / "images" / "case_000.nii.gz"
    base = ["cluster", image, "-m", trained / "model.pt", "--k", "2", "--k", "3", *TINY_TRAIN[-2:]]
    out = tmp_path / "seg"
    assert run(["-q", *base, "-o", out, "--smooth", "0"], capsys)[0] == 0
    with monkeypatch.context() as patch:
        calls = _kill_on_second_label_file(patch, how)
        code, _, err = run(["-q", *base, "-o", out], capsys)  # other options: a rewrite
    assert len(calls) == 2
    expected = (143, "terminated") if how == "sigterm" else (130, "interrupted")
    assert code == expected[0] and f"hypseg: error: {expected[1]}" in err
    assert not (out / "case_000.centroids.json").exists()  # the old record went first
    record = [json.loads(line) for line in (out / "hypseg-runs.jsonl").read_text().splitlines()]
    assert record[-1]["exit_status"] == expected[0] and record[-1]["error"] == expected[1]
    assert json.loads((out / "centroids.json").read_text())["sets"] == []
    code, out_json, err = run([*base, "-o", out, "--json"], capsys)
    assert code == 0 and json.loads(out_json)["done"] == 1, err
    assert run(["-q", *base, "-o", tmp_path / "fresh"], capsys)[0] == 0
    for k in (2, 3):
        assert _md5(out / f"case_000_k{k}.nii.gz") == _md5(
            tmp_path / "fresh" / f"case_000_k{k}.nii.gz"
        )
    # a skipped volume's manifest entry still names its content
    code, out_json, _ = run([*base, "-o", out, "--json"], capsys)
    assert json.loads(out_json)["skipped"] == 1
    last = json.loads((out / "hypseg-runs.jsonl").read_text().splitlines()[-1])
    assert last["inputs"][0]["status"] == "skipped" and len(last["inputs"][0]["sha256"]) == 64


def _sigterm_first(real):
    """``real``, called after this process is sent SIGTERM (delivered before its work)."""

    def call(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    return call


def test_signals_during_the_cleanup_of_a_stopped_run_lose_no_record(
    trained, tmp_path, capsys, monkeypatch
):
    """A second and a third SIGTERM (a scheduler's repeated signals, Ctrl-C pressed again)
    while a stopped cluster run rebuilds centroids.json and appends its manifest record:
    both are written all the same, and the run ends as the first signal said."""
    from hypsegcli import batch

    images = trained / "data" / "images"
    out = tmp_path / "seg"
    with monkeypatch.context() as patch:
        calls = _kill_on_second_label_file(patch, "sigterm")
        patch.setattr(batch, "rebuild_merged", _sigterm_first(batch.rebuild_merged))
        patch.setattr(batch, "append_manifest", _sigterm_first(batch.append_manifest))
        code, _, err = run(
            ["-q", "cluster", images, "-m", trained / "model.pt", "--k", "2", "-o", out]
            + ["--threads", "2"],
            capsys,
        )
    assert len(calls) == 2 and code == 143 and err.strip() == "hypseg: error: terminated", err
    merged = json.loads((out / "centroids.json").read_text())
    assert [s["case"] for s in merged["sets"]] == ["case_000"]  # the case finished
    record = [json.loads(line) for line in (out / "hypseg-runs.jsonl").read_text().splitlines()]
    assert len(record) == 1 and record[0]["exit_status"] == 143
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_a_signal_while_a_finished_run_is_recorded_changes_nothing(
    trained, tmp_path, capsys, monkeypatch
):
    """SIGTERM while a finished run writes centroids.json: the file is written, the run
    recorded and ended as terminated (143); one while the record is appended: the run has
    ended, its record says 0 and so does the exit status."""
    from hypsegcli import batch

    image = trained / "data" / "images" / "case_000.nii.gz"
    base = ["-q", "cluster", image, "-m", trained / "model.pt", "--k", "2", "--threads", "2"]
    for target, expected in (("rebuild_merged", 143), ("append_manifest", 0)):
        out = tmp_path / target
        with monkeypatch.context() as patch:
            patch.setattr(batch, target, _sigterm_first(getattr(batch, target)))
            code, _, err = run([*base, "-o", out], capsys)
        assert code == expected, (target, err)
        assert [s["case"] for s in json.loads((out / "centroids.json").read_text())["sets"]] == [
            "case_000"
        ]
        (record,) = [json.loads(x) for x in (out / "hypseg-runs.jsonl").read_text().splitlines()]
        assert record["exit_status"] == expected, target


def test_a_stopped_runs_record_lists_the_failures_before_the_signal(
    trained, tmp_path, capsys, monkeypatch
):
    """A volume that failed, then SIGTERM: the record said 143 with "failures": [] (the
    list was filled only at a normal end), although its inputs showed the failed one."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "a_bad.nii.gz").write_bytes(b"not a volume")
    for name in ("case_000", "case_001"):
        src = trained / "data" / "images" / f"{name}.nii.gz"
        (images / src.name).write_bytes(src.read_bytes())
    real = pipeline.read_volume

    def read(path, *args, **kwargs):
        if Path(path).name == "case_001.nii.gz":
            os.kill(os.getpid(), signal.SIGTERM)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pipeline, "read_volume", read)
    out = tmp_path / "seg"
    code, _, err = run(
        ["-q", "cluster", images, "--features", "intensity", "--k", "2", "-o", out], capsys
    )
    assert code == 143, err
    (record,) = [json.loads(x) for x in (out / "hypseg-runs.jsonl").read_text().splitlines()]
    assert record["exit_status"] == 143
    assert [Path(f["volume"]).name for f in record["failures"]] == ["a_bad.nii.gz"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_sigterm_outside_a_commands_body_still_ends_it_with_143(
    trained, tmp_path, capsys, monkeypatch
):
    """SIGTERM while typer parsed the command line became its KeyboardInterrupt: exit 130
    (or a traceback); one whose exception was raised in a finaliser was dropped by Python
    ("Exception ignored") and the run ended 0. Both end 143 with one line now, and the
    second's record says so."""
    real_install = cli._on_sigterm_raise

    def install_then_signal():
        restore = real_install()
        os.kill(os.getpid(), signal.SIGTERM)  # lands before typer has parsed anything
        return restore

    image = trained / "data" / "images" / "case_000.nii.gz"
    argv = ["-q", "cluster", image, "--features", "intensity", "--k", "2"]
    with monkeypatch.context() as patch:
        patch.setattr(cli, "_on_sigterm_raise", install_then_signal)
        code, out, err = run([*argv, "-o", tmp_path / "early"], capsys)
    assert (code, out, err) == (143, "", "hypseg: error: terminated\n")
    assert not (tmp_path / "early").exists()

    class SignalsWhenFreed:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))  # (bytecode, where Python runs the handler, inside __del__)

    real = pipeline.read_volume

    def read(path, *args, **kwargs):
        SignalsWhenFreed()  # freed at once: its handler's exception is dropped
        return real(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "read_volume", read)
        code, out, err = run([*argv, "-o", tmp_path / "late"], capsys)
    assert code == 143 and err.strip().splitlines()[-1] == "hypseg: error: terminated", err
    assert (tmp_path / "late" / "case_000_k2.nii.gz").exists()  # (the run went on)
    (record,) = [
        json.loads(x) for x in (tmp_path / "late" / "hypseg-runs.jsonl").read_text().splitlines()
    ]
    assert record["exit_status"] == 143 and record["error"] == "terminated"


def test_temporaries_of_killed_runs_are_removed_once_stale(trained, tmp_path, capsys):
    """A SIGKILLed write leaves its hidden temporary (a label volume, an embedding array:
    up to gigabytes) in the output folder: cluster, embed and train (the model's folder)
    remove those untouched for an hour, and nothing else (a fresh one may be a concurrent
    part's write)."""
    import time

    hour_ago = time.time() - io.STALE_TEMPORARY_S - 60
    image = trained / "data" / "images" / "case_000.nii.gz"
    for command in ("cluster", "embed"):
        out = tmp_path / command
        (out / "sub").mkdir(parents=True)
        (out / ".hidden").mkdir()
        names = {
            "stale": ".tmp-4242-0123abcd-case_000_k2.nii.gz",
            "fresh": ".tmp-4243-89abcdef-case_000_k2.nii.gz",
            "other": ".tmp-notes.txt",  # not hypseg's
            "sub": "sub/.tmp-4244-00ff00ff-case_001.npy",
            "hidden": ".hidden/.tmp-4245-00ff00ff-case_001.npy",
        }
        for key, name in names.items():
            (out / name).write_bytes(b"x" * 1000)
            if key != "fresh":
                os.utime(out / name, (hour_ago, hour_ago))
        (out / ".tmp-4246-0123abcd-folder").mkdir()  # not a file
        os.utime(out / ".tmp-4246-0123abcd-folder", (hour_ago, hour_ago))
        argv = [command, image, "-m", trained / "model.pt", "-o", out, "--threads", "2"]
        argv += ["--k", "2"] if command == "cluster" else []
        code, _, err = run([*argv, "--dry-run"], capsys)
        assert code == 0 and (out / names["stale"]).exists(), err  # a dry run writes nothing
        code, _, err = run(argv, capsys)
        assert code == 0, err
        assert f"{out}: removed 1 temporary file(s) (0.0 MiB) left by runs stopped" in err
        assert not (out / names["stale"]).exists()
        assert all((out / names[k]).exists() for k in ("fresh", "other", "sub", "hidden"))
        assert (out / ".tmp-4246-0123abcd-folder").is_dir()
    # train: a checkpoint save killed beside the model
    models = tmp_path / "models"
    models.mkdir()
    stale = models / ".tmp-4247-0123abcd-m.ckpt.pt"
    stale.write_bytes(b"x" * 1000)
    os.utime(stale, (hour_ago, hour_ago))
    images = trained / "data" / "images"
    code, _, err = run(
        ["train", images, "-o", models / "m.pt", "--steps", "1", *TINY_TRAIN], capsys
    )
    assert code == 0 and not stale.exists(), err
    assert io.remove_stale_temporaries(tmp_path / "cluster", recursive=True) == (1, 1000)
    assert not (tmp_path / "cluster" / names["sub"]).exists()
    assert (tmp_path / "cluster" / names["hidden"]).exists()  # hidden folders are not searched
    # synth: a volume's write killed in images/ (QA: left there for good)
    stale = tmp_path / "synth" / "images" / ".tmp-4248-0123abcd-case_000.nii.gz"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x" * 1000)
    os.utime(stale, (hour_ago, hour_ago))
    code, _, err = run(["synth", tmp_path / "synth", "--n", "1", "--size", "16"], capsys)
    assert code == 0 and not stale.exists(), err


def test_refused_runs_leave_no_output_folder(trained, tmp_path, capsys):
    """Options refused once the model is read (or the device resolved) create no -o folder."""
    images = trained / "data" / "images"
    euclid = tmp_path / "euclid.pt"
    code, _, err = run(
        ["--quiet", "train", images, "-o", euclid, "--steps", "1", "--geometry", "euclidean"]
        + TINY_TRAIN,
        capsys,
    )
    assert code == 0, err
    for argv, message in [
        (["cluster", images, "-m", euclid, "--metric", "poincare", "--k", "2"], "poincare"),
        (["cluster", images, "-m", tmp_path / "none.pt", "--k", "2"], "no such model file"),
        (["cluster", images, "--features", "intensity", "--device", "foo", "--k", "2"], "foo"),
        (["embed", images, "-m", tmp_path / "none.pt"], "no such model file"),
    ]:
        code, out, err = run([*argv, "-o", tmp_path / "out"], capsys)
        _one_error(code, out, err, message)
        assert not (tmp_path / "out").exists(), argv
    code, out, err = run(
        ["train", images, "-o", tmp_path / "out" / "m.pt", "--device", "cuda:7", *TINY_TRAIN],
        capsys,
    )
    assert code == 2 and not (tmp_path / "out").exists(), err


def test_synth_into_an_unwritable_folder_is_bad_input(tmp_path, capsys, monkeypatch):
    """A folder it cannot write (as a non-root user in a read-only place) is named before
    any volume is made, exit 2 like every other output folder."""
    import pathlib

    real = pathlib.Path.write_bytes

    def refuse_probe(self, data):
        if self.name.startswith(".tmp-") and self.name.endswith("-probe"):
            raise PermissionError(13, "Permission denied")
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", refuse_probe)
    code, out, err = run(["synth", tmp_path / "d", "--n", "2", "--size", "20"], capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"hypseg: error: {tmp_path / 'd'}: cannot write here (")
    assert "Permission denied" in err and err.count("\n") == 1
    assert not list((tmp_path / "d").iterdir())


def test_api_refuses_fractional_patch_sizes_the_cache_key_would_round(tmp_path):
    """The cache key and records hold whole voxels: a patch size of 5.5 (Python API) took
    the cached 5-voxel embeddings."""
    from hypsegcli import pipeline
    from hypsegcli.errors import BadInputError

    _blob(tmp_path / "v.nii.gz")
    for patch_size, stride in ((5.5, 1), (5, 1.5)):
        with pytest.raises(BadInputError, match="should be a whole number of voxels"):
            pipeline.embed(
                [tmp_path / "v.nii.gz"], tmp_path / "m.pt", patch_size=patch_size, stride=stride
            )
    pipeline._check_embedding_options(5.0, 2)  # whole numbers as floats are fine


def test_overwrite_removes_the_earlier_run_before_training(tmp_path, capsys):
    """A run with --overwrite that fails (or is stopped) must not leave the earlier run's
    model beside its own checkpoint, nor the earlier checkpoint to --resume by mistake."""
    tiny_pipeline(tmp_path, steps=2)
    model = tmp_path / "model.pt"
    ckpt, history = companion_paths(model)
    assert model.exists() and ckpt.exists() and history.exists()
    images = tmp_path / "data" / "images"
    code, _, err = run(
        ["train", images, "-o", model, "--overwrite", "--lr", "1e12", "--steps", "5", *TINY_TRAIN],
        capsys,
    )
    assert code == 1 and "diverged" in err, err
    assert not model.exists() and not ckpt.exists(), "the replaced run's files are gone"
    # refused before reading the inputs: nothing removed
    assert run(["train", images, "-o", model, "--steps", "2", *TINY_TRAIN], capsys)[0] == 0
    code, _, err = run(
        ["train", tmp_path / "nowhere", "-o", model, "--overwrite", "--steps", "2", *TINY_TRAIN],
        capsys,
    )
    assert code == 2 and model.exists() and ckpt.exists()
    # refused once read, by the sampler (a volume too small for triplets): nothing removed
    small = tmp_path / "small"
    small.mkdir()
    _blob(small / "s.nii.gz", shape=(8, 8, 8))
    before = {p: p.read_bytes() for p in (model, ckpt, history)}
    code, _, err = run(
        ["train", small, "-o", model, "--overwrite", "--steps", "2", *TINY_TRAIN], capsys
    )
    assert code == 2 and "too small" in err, err
    assert {p: p.read_bytes() for p in before} == before
    # a model without its checkpoint: --resume says how to start over
    ckpt.unlink()
    code, _, err = run(["train", images, "-o", model, "--resume", *TINY_TRAIN], capsys)
    assert code == 2
    assert f"{model} is there without it: start over, replacing it, with --overwrite" in err


def test_malformed_fields_of_a_model_file_or_checkpoint_are_named(tmp_path, capsys):
    import torch

    tiny_pipeline(tmp_path, steps=2)
    model = tmp_path / "model.pt"
    ckpt = companion_paths(model)[0]
    image = tmp_path / "data" / "images" / "case_000.nii.gz"
    good = torch.load(model, weights_only=True)
    for change, needle in (
        ({"state_dict": "x"}, "'state_dict' is not a mapping of weights"),
        ({"state_dict": {**good["state_dict"], "extra": 3}}, "'state_dict' entry 'extra' is not"),
        ({"normalization": {"method": "percentile"}}, "lacks numbers 'low' and 'high'"),
        ({"normalization": "percentile"}, "'normalization' is not a mapping with a method"),
        ({"format_version": 2, "versions": "9.0"}, "model file format 2 (written by hypseg ?)"),
    ):
        torch.save({**good, **change}, tmp_path / "bad.pt")
        code, _, err = run(
            ["embed", image, "-m", tmp_path / "bad.pt", "-o", tmp_path / "e"], capsys
        )
        lines = err.strip().splitlines()
        assert code == 2 and lines[-1].startswith(f"hypseg: error: {tmp_path / 'bad.pt'}: "), err
        assert needle in lines[-1] and "Traceback" not in err
    state = torch.load(ckpt, weights_only=False)
    images = tmp_path / "data" / "images"
    for change, needle in (
        ({"step": "2"}, "'step' '2' is not a step count"),
        ({"rng_state": None}, "'rng_state' is missing or not a mapping"),
        ({"training_volumes": [{"name": "x"}]}, "'training_volumes' entries lack their sha256"),
        (
            {"optimizer_state": {"state": {}, "param_groups": []}},
            "its weights or optimizer state do not fit its model",
        ),
        (
            {"rng_state": {"sample": "x", "noise": "y"}},
            "malformed training checkpoint ('rng_state'",
        ),
        # fields edited by hand that failed with exit 1 (ValueError, TypeError, RuntimeError)
        ({"train_config": {**state["train_config"], "seed": "abc"}}, "'train_config' seed"),
        ({"elapsed_seconds": "x"}, "'elapsed_seconds' 'x' is not a duration"),
        (
            {
                "optimizer_state": {
                    **state["optimizer_state"],
                    "param_groups": [
                        {**g, "lr": "abc"} for g in state["optimizer_state"]["param_groups"]
                    ],
                }
            },
            "'optimizer_state' has a parameter group without a learning rate",
        ),
        (
            {"model_config": {**state["model_config"], "hidden": "x"}},
            "malformed training checkpoint (its model settings",
        ),
        (  # moment estimates of another model's shapes (torch does not compare them)
            {
                "optimizer_state": {
                    **state["optimizer_state"],
                    "state": {
                        i: {
                            k: v[..., :1] if torch.is_tensor(v) and v.dim() > 0 else v
                            for k, v in entry.items()
                        }
                        for i, entry in state["optimizer_state"]["state"].items()
                    },
                }
            },
            "its weights or optimizer state do not fit its model (its exp_avg of shape",
        ),
    ):
        torch.save({**state, **change}, ckpt)
        code, _, err = run(
            ["train", images, "-o", model, "--resume", "--steps", "4", *TINY_TRAIN], capsys
        )
        assert code == 2 and f"hypseg: error: {ckpt}: " in err and needle in err, err
        assert "Traceback" not in err


def test_train_errors_name_options_not_fields(tmp_path, capsys):
    _blob(tmp_path / "v.nii.gz")
    code, _, err = run(
        ["train", tmp_path / "v.nii.gz", "-o", tmp_path / "m.pt", "--r-min", "10", "--r-max", "5"],
        capsys,
    )
    assert code == 2 and "--r-min 10.0 should be > 0 and <= --r-max 5.0" in err, err
    _blob(tmp_path / "flat.nii.gz", shape=(24, 24, 3))
    code, _, err = run(["train", tmp_path / "flat.nii.gz", "-o", tmp_path / "m.pt"], capsys)
    assert code == 2
    assert "every side should be >= 5 (the smallest anchor, --r-min) and the longest >= 8" in err
    assert "l_min" not in err


def test_synth_refuses_a_folder_of_another_seed_size_or_variant(tmp_path, capsys):
    """Review: a second synth with another --seed into the same folder silently replaced
    the dataset (the stale-case check compared names only)."""
    argv = ["--quiet", "synth", tmp_path / "d", "--size", "16", "--n", "2"]
    assert run([*argv, "--seed", "1"], capsys)[0] == 0
    first = _md5(tmp_path / "d" / "images" / "case_000.nii.gz")
    for other in (["--seed", "2"], ["--seed", "1", "--irregular"]):
        code, out, err = run([*argv, *other], capsys)
        line = _one_error(code, out, err, str(tmp_path / "d" / "dataset.json"))
        assert "records another dataset" in line
    code, out, err = run([*argv, "--seed", "1", "--size", "18"], capsys)
    _one_error(code, out, err, "size [16, 16, 16] (this run: [18, 18, 18])")
    assert _md5(tmp_path / "d" / "images" / "case_000.nii.gz") == first
    assert run([*argv, "--seed", "1"], capsys)[0] == 0  # the same command again is fine
    (tmp_path / "d" / "dataset.json").write_text("{}")
    code, out, err = run([*argv, "--seed", "1"], capsys)
    _one_error(code, out, err, "not a dataset.json of hypseg synth")
    # another tool's dataset.json above the split folders is not synth's to judge (nnU-Net)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "dataset.json").write_text('{"name": "Task01"}')
    split = ["--quiet", "synth", tmp_path / "e", "--size", "16", "--n", "2", "--split", "1/1"]
    assert run(split, capsys)[0] == 0
    code, out, err = run([*split, "--seed", "3"], capsys)
    _one_error(code, out, err, str(tmp_path / "e" / "train" / "dataset.json"))


def test_a_second_train_on_the_same_output_is_refused_while_the_first_runs(
    trained, tmp_path, capsys
):
    """Review: two `train -o m.pt` started at once (a job submitted twice) both passed the
    start-up checks and the last to end replaced the other's files silently."""
    from hypsegcli.io import exclusive_writer, lock_path

    images = trained / "data" / "images"
    model = tmp_path / "m.pt"
    argv = ["train", images, "-o", model, "--steps", "1", *TINY_TRAIN]
    with exclusive_writer(model, "hypseg train"):  # the first run, still going
        assert lock_path(model).exists()
        code, out, err = run(argv, capsys)
        _one_error(code, out, err, "m.pt: another hypseg train is writing it now (process ")
        assert not model.exists()
    assert not lock_path(model).exists()
    # a lock file a killed run left behind locks nothing
    lock_path(model).write_text("process 1 on elsewhere")
    code, _, err = run(argv, capsys)
    assert code == 0 and model.exists() and not lock_path(model).exists(), err


def test_a_dry_run_names_an_output_folder_it_could_not_write(tmp_path, capsys, monkeypatch):
    """Review: `cluster --dry-run -o` on a read-only filesystem passed (exit 0), and the run
    it vouched for was then refused."""
    from hypsegcli import io as io_module

    _blob(tmp_path / "v.nii.gz")
    real_access = os.access
    locked = tmp_path / "ro"
    locked.mkdir()
    monkeypatch.setattr(  # (os itself: a read-only folder as root, who may write anywhere)
        io_module.os,
        "access",
        lambda p, mode: real_access(p, mode) and not (mode & os.W_OK and Path(p) == locked),
    )
    for target in (locked, locked / "new" / "seg"):
        code, out, err = run(
            ["cluster", tmp_path / "v.nii.gz", "--features", "intensity", "--k", "2"]
            + ["-o", target, "--dry-run"],
            capsys,
        )
        _one_error(code, out, err, f"{target}: cannot write here ({locked} is read-only")
    assert list(locked.iterdir()) == []


def test_output_names_beyond_the_file_name_limit_are_refused_before_any_work(tmp_path, capsys):
    """Review: a legal 252-byte input name gave a 260-byte `<case>.centroids.json`: the
    run embedded and fitted, then failed with "OSError: File name too long", exit 1, and
    the dry run had passed."""
    long = "a" * 245
    (tmp_path / "in").mkdir()
    _blob(tmp_path / "in" / f"{long}.nii.gz")
    _blob(tmp_path / "in" / "short.nii.gz")
    base = ["cluster", tmp_path / "in", "--features", "intensity", "--k", "2"]
    for extra in (["--dry-run"], []):
        code, out, err = run([*base, "-o", tmp_path / "seg", *extra], capsys)
        _one_error(code, out, err, f"{long}.centroids.json: a file name of 260 bytes, more than")
        assert "(rename it shorter)" in err
    assert not (tmp_path / "seg").exists()
    code, out, err = run(
        ["train", tmp_path / "in" / "short.nii.gz", "-o", tmp_path / f"{'m' * 248}.pt"]
        + ["--steps", "1"],
        capsys,
    )
    _one_error(code, out, err, "a file name of 256 bytes", "give train -o a shorter name")


def test_a_run_failing_at_its_end_still_prints_its_json_summary(tmp_path, capsys, monkeypatch):
    """Review: when the merged centroids.json could not be written (a full disk), `--json`
    printed nothing, though the volumes' results and failures were known."""
    from hypsegcli import pipeline
    from hypsegcli.batch import read_manifest

    _blob(tmp_path / "v.nii.gz")

    def full(out, header):
        raise HypsegError(f"{out / 'centroids.json'}: cannot write (No space left on device)")

    monkeypatch.setattr(pipeline, "_merge_centroids", full)
    code, out, err = run(
        ["cluster", tmp_path / "v.nii.gz", "--features", "intensity", "--k", "2", "--json"]
        + ["-o", tmp_path / "seg"],
        capsys,
    )
    errors = [line for line in err.splitlines() if line.startswith("hypseg: error:")]
    assert len(errors) == 1 and errors[0].endswith(
        "centroids.json: cannot write (No space left on device)"
    )
    summary = json.loads(out)
    assert code == 1 and summary["error"].endswith("(No space left on device)")
    assert summary["centroids"] is None and summary["done"] == 1 and summary["failures"] == []
    record = read_manifest(tmp_path / "seg" / "hypseg-runs.jsonl")[-1]
    assert record["exit_status"] == 1 and "No space left" in record["error"]


def test_a_dry_run_warns_of_more_memory_than_the_machine_has(tmp_path, capsys, monkeypatch):
    """Review: an absurd --tile was estimated at 7 GB for a 96^3 volume without a word."""
    from hypsegcli import pipeline

    _blob(tmp_path / "v.nii.gz")
    argv = ["cluster", tmp_path / "v.nii.gz", "--features", "intensity", "--k", "2"]
    argv += ["-o", tmp_path / "seg", "--dry-run"]
    code, _, err = run(argv, capsys)
    assert code == 0 and "more than this machine has" not in err, err
    monkeypatch.setattr(pipeline, "_physical_memory", lambda: 1000)
    code, _, err = run(argv, capsys)
    assert code == 0 and "is more than this machine has (0.0 GB)" in err, err
    assert "try a smaller --tile or fewer --threads" in err


def test_outputs_never_replace_devices_pipes_or_what_links_point_to(tmp_path, capsys):
    """QA: outputs are renamed into place, so `evaluate --csv /dev/stdout` (as root) put a
    file where the /dev/stdout link was, and a named pipe or `train -o` onto a device became
    a file. Such paths are refused before any work; a link to a file is replaced by the
    output, the file it pointed to left alone (as git-annex / DataLad expect)."""
    box = np.zeros((8, 8, 8), np.uint8)
    box[2:6, 2:6, 2:6] = 1
    for name in ("p", "g"):
        nib.save(nib.Nifti1Image(box, np.eye(4)), tmp_path / f"{name}.nii.gz")
    pair = [tmp_path / "p.nii.gz", tmp_path / "g.nii.gz"]
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    to_device = tmp_path / "null.csv"
    to_device.symlink_to(os.devnull)
    for target, kind in (
        (fifo, "a named pipe"),
        (to_device, f"a link to {os.devnull}, a character device"),
        (Path(os.devnull), "a character device"),
    ):
        code, out, err = run(["evaluate", *pair, "--csv", target], capsys)
        line = _one_error(code, out, err, f"{target}: is {kind}; evaluate --csv writes a file")
        assert "--json" in line
    assert (tmp_path / "fifo.csv").is_fifo() and to_device.is_symlink()
    assert not (tmp_path / pipeline.MANIFEST_NAME).exists()
    code, out, err = run(["evaluate", *pair, "--csv", "-"], capsys)
    _one_error(code, out, err, "--csv -: evaluate writes its table to a file")
    code, out, err = run(
        ["train", tmp_path / "g.nii.gz", "-o", fifo, "--steps", "1", "--overwrite", *TINY_TRAIN],
        capsys,
    )
    _one_error(code, out, err, f"{fifo}: is a named pipe; train -o writes a file")
    # the last line of defence, for every output
    with pytest.raises(BadInputError, match="is a named pipe; hypseg writes a file"):
        with io.atomic_path(fifo) as tmp:
            tmp.write_text("x")
    assert fifo.is_fifo() and not list(tmp_path.glob(".tmp-*"))
    # a link to a file: replaced by the table, the file it points to as it was
    (tmp_path / "old.csv").write_text("kept\n")
    (tmp_path / "link.csv").symlink_to(tmp_path / "old.csv")
    code, _, err = run(["-q", "evaluate", *pair, "--csv", tmp_path / "link.csv"], capsys)
    assert code == 0, err
    assert not (tmp_path / "link.csv").is_symlink()
    assert (tmp_path / "link.csv").read_text().startswith("case,pred,truth")
    assert (tmp_path / "old.csv").read_text() == "kept\n"


def test_a_dry_run_names_unreadable_volumes_as_the_run_does(trained, tmp_path, capsys):
    """QA: the dry run said "cannot read the header (FileNotFoundError: ...)" for a link to
    a missing file, where the run names it as one (an annexed file not fetched yet?), and
    worded a broken file otherwise than the run; with a model it planned a constant volume,
    which the run refuses. The plans now carry the run's words."""
    data, scans = tmp_path / "d", tmp_path / "scans"
    assert run(["-q", "synth", data, "--n", "1", "--size", "16"], capsys)[0] == 0
    scans.mkdir()
    (scans / "a.nii.gz").write_bytes((data / "images" / "case_000.nii.gz").read_bytes())
    (scans / "gone.nii.gz").symlink_to(tmp_path / "annex" / "object")
    (scans / "junk.nii.gz").write_bytes(bytes(range(256)) * 8)
    (scans / "bad.mrc").write_bytes(b"not an MRC file")
    argv = ["-q", "cluster", scans, "--features", "intensity", "--k", "2", "--json"]
    code, out, _ = run([*argv, "-o", tmp_path / "plan", "--dry-run"], capsys)
    planned = {Path(v["volume"]).name: v.get("error") for v in json.loads(out)["volumes"]}
    code, out, _ = run([*argv, "-o", tmp_path / "seg"], capsys)
    failed = {Path(f["volume"]).name: f["error"] for f in json.loads(out)["failures"]}
    assert code == 2 and sorted(failed) == ["bad.mrc", "gone.nii.gz", "junk.nii.gz"]
    assert {name: planned[name] for name in failed} == failed
    assert "a link to a missing file" in failed["gone.nii.gz"] and planned["a.nii.gz"] is None
    # with a model, whose dry run reads the volumes: a constant one
    flat = tmp_path / "flat" / "c.nii"
    flat.parent.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4)), flat)
    argv = ["-q", "cluster", flat, "-m", trained / "model.pt", "--k", "2", "--json"]
    code, out, _ = run([*argv, "-o", tmp_path / "plan2", "--dry-run"], capsys)
    (volume,) = json.loads(out)["volumes"]
    code, out, _ = run([*argv, "-o", tmp_path / "seg2", "--threads", "2"], capsys)
    (failure,) = json.loads(out)["failures"]
    assert failure["error"] == f"{flat}: constant (every voxel = 0); nothing to segment"
    assert volume["state"] == "error" and volume["error"] == failure["error"]
