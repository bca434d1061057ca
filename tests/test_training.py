"""Training loop: learning happens, checkpoints resume exactly, the CLI drives it."""

from __future__ import annotations

import csv
import json
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from clitools import TINY_TRAIN, run

from hypsegcli import io
from hypsegcli.config import ModelConfig, SamplingConfig, TrainConfig
from hypsegcli.errors import BadInputError
from hypsegcli.modelfile import build_model, load_model_file
from hypsegcli.training import TrainingVolume, TrainResult, companion_paths, train

TINY = ModelConfig(patch_size=6, channels=(4, 8), kernels=(3, 3), paddings=(0, 0), hidden=16)
SAMPLING = SamplingConfig(r_min=5, r_max=12, l_min=2, r_gap=2, child_max=6)


def _volumes(n=3, size=20, seed=0):
    rng = np.random.default_rng(seed)
    vols = []
    for i in range(n):
        x, y, z = np.meshgrid(*(np.arange(size),) * 3, indexing="ij")
        centre = rng.uniform(6, size - 6, 3)
        r = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
        data = (r < 5).astype(np.float32) + 0.1 * rng.standard_normal((size,) * 3).astype(
            np.float32
        )
        vols.append(TrainingVolume(f"v{i}", data, io.array_sha256(data)))
    return vols


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_training_learns_and_writes_files(tmp_path):
    torch.set_num_threads(2)
    out = tmp_path / "model.pt"
    result = train(
        _volumes(),
        out,
        model_config=TINY,
        sampling_config=SAMPLING,
        train_config=TrainConfig(steps=150, batch_size=16, lr=3e-3, checkpoint_every=50),
        device="cpu",
    )
    ckpt, hist = companion_paths(out)
    assert result.step == 150 and out.is_file() and ckpt.is_file() and hist.is_file()
    rows = _rows(hist)
    assert [int(r["step"]) for r in rows] == list(range(1, 151))
    total = np.array([float(r["total"]) for r in rows])
    triplet = np.array([float(r["triplet"]) for r in rows])
    assert total[-20:].mean() < total[:20].mean()
    assert triplet[-20:].mean() < triplet[:5].mean()
    doc = load_model_file(out)
    assert doc["kind"] == "model" and doc["step"] == 150
    assert doc["model_config"] == TINY.to_dict()
    assert [v["sha256"] for v in doc["training_volumes"]] == [v.sha256 for v in _volumes()]
    assert {"hypseg", "torch", "geoopt"} <= set(doc["versions"])
    assert "optimizer_state" not in doc
    model = build_model(doc)
    mu, _ = model.encode(torch.zeros(2, 1, 6, 6, 6))
    assert mu.shape == (2, 2)


def test_resume_continues_exactly(tmp_path):
    vols = _volumes()
    cfg = dict(batch_size=8, lr=3e-3, checkpoint_every=10, seed=3)
    straight = tmp_path / "a.pt"
    train(
        vols,
        straight,
        model_config=TINY,
        sampling_config=SAMPLING,
        train_config=TrainConfig(steps=30, **cfg),
        device="cpu",
    )
    resumed = tmp_path / "b.pt"

    class Stop(Exception):
        pass

    def interrupt(stage, done, total, **info):
        if done == 25:
            raise Stop

    with pytest.raises(Stop):
        train(
            vols,
            resumed,
            model_config=TINY,
            sampling_config=SAMPLING,
            train_config=TrainConfig(steps=30, **cfg),
            device="cpu",
            progress=interrupt,
        )
    ckpt, hist = companion_paths(resumed)
    assert load_model_file(ckpt)["step"] == 20  # lost at most checkpoint_every steps
    assert not resumed.exists()
    # a history written before the texture column existed still resumes: its rows say nan
    rows = _rows(hist)
    assert len(rows) == 20 and all(float(r["texture"]) == 0.0 for r in rows)  # term off
    with open(hist, "w", newline="") as fh:
        old = csv.DictWriter(fh, [k for k in rows[0] if k != "texture"], extrasaction="ignore")
        old.writeheader()
        old.writerows(rows)
    result = train(
        vols,
        resumed,
        model_config=TINY,
        sampling_config=SAMPLING,
        train_config=TrainConfig(steps=30, **cfg),
        device="cpu",
        resume=True,
    )
    assert result.step == 30
    a, b = load_model_file(straight)["state_dict"], load_model_file(resumed)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    rows = _rows(hist)
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    assert [r["texture"] for r in rows[:20]] == ["nan"] * 20
    assert all(float(r["texture"]) == 0.0 for r in rows[20:])


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(BadInputError, match="no checkpoint to resume from"):
        train(
            _volumes(1),
            tmp_path / "m.pt",
            model_config=TINY,
            sampling_config=SAMPLING,
            train_config=TrainConfig(steps=2),
            device="cpu",
            resume=True,
        )


def test_loading_foreign_files_is_a_clear_error(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"garbage")
    with pytest.raises(BadInputError, match="x.pt: not a hypseg model file"):
        load_model_file(tmp_path / "x.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(BadInputError, match="other.pt: not a hypseg model file"):
        load_model_file(tmp_path / "other.pt")
    torch.save(
        {"format": "hypseg-model", "format_version": 99, "versions": {"hypseg": "9.0"}},
        tmp_path / "new.pt",
    )
    with pytest.raises(BadInputError, match="format 99 .* not supported"):
        load_model_file(tmp_path / "new.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_loading_never_executes_code(tmp_path, capsys):
    torch.save({"format": "hypseg-model", "payload": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(BadInputError, match="not a hypseg model file"):
        load_model_file(tmp_path / "evil.pt")
    assert "code ran" not in capsys.readouterr().out


def test_cli_train_all_table2_rows(tmp_path, capsys):
    data = tmp_path / "data"
    code, _, err = run(["--quiet", "synth", data, "--n", "2", "--size", "20"], capsys)
    assert code == 0, err
    rows = [
        ["--geometry", "euclidean", "--no-triplet"],
        ["--geometry", "euclidean"],
        ["--no-gyroconv", "--no-triplet"],
        ["--no-triplet", "--gyroplane-init", "0.5"],
        ["--no-gyroconv"],
        [],
    ]
    for i, extra in enumerate(rows):
        out = tmp_path / f"m{i}.pt"
        code, stdout, err = run(
            [
                "--quiet",
                "train",
                data / "images",
                "-o",
                out,
                "--steps",
                "3",
                "--json",
                "--arch",
                "valid",
                *TINY_TRAIN,
                *extra,
            ],
            capsys,
        )
        assert code == 0, err
        summary = json.loads(stdout)
        assert summary["step"] == 3 and out.is_file()
        cfg = load_model_file(out)["model_config"]
        assert cfg["geometry"] == ("euclidean" if "euclidean" in extra else "hyperbolic")
        assert cfg["triplet"] == ("--no-triplet" not in extra)
        assert cfg["gyroconv"] == ("--no-gyroconv" not in extra and "euclidean" not in extra)
        assert cfg["gyroplane_init"] == (0.5 if "--gyroplane-init" in extra else 0.05)


def test_cli_train_bad_inputs(tmp_path, capsys):
    nib.save(
        nib.Nifti1Image(np.ones((20, 20, 20), np.float32), np.eye(4)),
        str(tmp_path / "const.nii.gz"),
    )
    code, out, err = run(
        ["train", tmp_path / "const.nii.gz", "-o", tmp_path / "m.pt", "--steps", "1"], capsys
    )
    assert (
        code == 2
        and out == ""
        and "const.nii.gz" in err
        and "constant" in err
        and err.count("\n") == 1
    )
    rng = np.random.default_rng(0)
    nib.save(
        nib.Nifti1Image(rng.random((6, 6, 6)).astype(np.float32), np.eye(4)),
        str(tmp_path / "tiny.nii.gz"),
    )
    code, out, err = run(
        ["train", tmp_path / "tiny.nii.gz", "-o", tmp_path / "m.pt", "--steps", "1"], capsys
    )
    errors = [line for line in err.splitlines() if line.startswith("hypseg: error:")]
    assert code == 2 and len(errors) == 1 and "tiny.nii.gz" in errors[0] and "Traceback" not in err
    code, out, err = run(
        ["train", tmp_path / "tiny.nii.gz", "-o", tmp_path / "m.pt", "--lr", "-1"], capsys
    )
    assert code == 2 and "--lr -1.0 should be a finite number > 0" in err
    # the configs' errors name the command line's options, not the Python fields
    for args, message in [
        (["--r-min", "1"], "--r-min 1.0 should be >= 5: an anchor must hold a positive child"),
        (["--r-min", "9", "--r-max", "8"], "--r-min 9.0 should be > 0 and <= --r-max 8.0"),
        (
            ["--patch-size", "8", "--arch", "paper"],
            "--patch-size 8 is too small for --arch paper (the smallest is 9)",
        ),
        (["--norm-range", "50", "50"], "--norm-range 50 50: should satisfy 0 <= LOW < HIGH"),
        (["--checkpoint-every", "0"], "--checkpoint-every"),
    ]:
        code, out, err = run(
            ["train", tmp_path / "tiny.nii.gz", "-o", tmp_path / "m.pt", *args], capsys
        )
        assert code == 2 and out == "" and message in err and not re.search(r"\w=", err), err
    code, out, err = run(
        ["train", tmp_path / "tiny.nii.gz", "-o", tmp_path / "m.pt", "--gyroplane-init", "-1"],
        capsys,
    )
    assert code == 2 and "--gyroplane-init" in err and "Traceback" not in err


def test_gyroconv_is_a_hyperbolic_option(tmp_path, capsys):
    """--gyroconv with --geometry euclidean is refused; a Euclidean model records it off."""
    data = tmp_path / "data"
    assert run(["--quiet", "synth", data, "--n", "1", "--size", "20"], capsys)[0] == 0
    out = tmp_path / "m.pt"
    code, stdout, err = run(
        ["train", data / "images", "-o", out, "--steps", "1", "--geometry", "euclidean"]
        + ["--gyroconv", *TINY_TRAIN],
        capsys,
    )
    assert code == 2 and stdout == "" and not out.exists()
    assert err.strip().endswith(
        "--gyroconv needs --geometry hyperbolic (the gyroplane layer "
        "works on the Poincaré ball); drop it or add --no-gyroconv"
    )
    for geometry, recorded in [("euclidean", False), ("hyperbolic", True)]:
        code, _, err = run(
            ["--quiet", "train", data / "images", "-o", out, "--steps", "1", "--overwrite"]
            + ["--geometry", geometry, *TINY_TRAIN],
            capsys,
        )
        assert code == 0, err
        config = torch.load(out, weights_only=False)["model_config"]
        assert config["geometry"] == geometry and config["gyroconv"] is recorded


def test_an_earlier_run_is_neither_replaced_nor_continued_unasked(tmp_path, capsys):
    """A run interrupted at step 22 of 300 and run again without --resume started over and
    replaced its checkpoint (review); a finished model was replaced as silently."""
    data = tmp_path / "data"
    assert run(["--quiet", "synth", data, "--n", "1", "--size", "20"], capsys)[0] == 0
    out = tmp_path / "m.pt"
    base = ["--quiet", "train", data / "images", "-o", out, *TINY_TRAIN]
    assert run([*base, "--steps", "2"], capsys)[0] == 0
    ckpt = tmp_path / "m.ckpt.pt"
    before = {p.name: p.read_bytes() for p in (out, ckpt)}
    code, stdout, err = run([*base, "--steps", "3"], capsys)
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert f"{out}: exists (an earlier run's model, or another file); continue that run " in err
    out.unlink()  # as if the run had been stopped before writing its model
    code, _, err = run([*base, "--steps", "3"], capsys)
    assert code == 2 and f"{ckpt}: exists (an earlier run's checkpoint)" in err
    assert ckpt.read_bytes() == before["m.ckpt.pt"]
    code, _, err = run([*base, "--steps", "3", "--resume", "--overwrite"], capsys)
    assert code == 2 and "give one" in err
    assert run([*base, "--steps", "3", "--resume"], capsys)[0] == 0
    assert torch.load(ckpt, weights_only=False)["step"] == 3
    assert run([*base, "--steps", "1", "--overwrite"], capsys)[0] == 0
    assert torch.load(ckpt, weights_only=False)["step"] == 1
    # -o onto another run's loss history is refused too
    code, _, err = run([*base[:4], tmp_path / "m.history.csv", *TINY_TRAIN, "--steps", "1"], capsys)
    assert code == 2 and "m.history.csv: exists" in err


def test_the_last_step_is_saved_once_and_the_budget_is_finite(tmp_path, capsys, monkeypatch):
    """--steps 4 --checkpoint-every 2 wrote the step-4 checkpoint twice (a loss evaluation
    and, under torchrun, a gather each time); --max-minutes inf trained without end."""
    from hypsegcli import training

    data = tmp_path / "data"
    assert run(["--quiet", "synth", data, "--n", "1", "--size", "20"], capsys)[0] == 0
    saves = []
    real = training.save_model_file
    monkeypatch.setattr(
        training,
        "save_model_file",
        lambda path, doc: saves.append((doc["kind"], doc["step"])) or real(path, doc),
    )
    out = tmp_path / "m.pt"
    base = ["--quiet", "train", data / "images", "-o", out, *TINY_TRAIN]
    assert run([*base, "--steps", "4", "--checkpoint-every", "2"], capsys)[0] == 0
    assert saves == [("checkpoint", 2), ("checkpoint", 4), ("model", 4)]
    saves.clear()
    assert run([*base, "--steps", "5", "--checkpoint-every", "2", "--resume"], capsys)[0] == 0
    assert saves == [("checkpoint", 5), ("model", 5)]
    code, _, err = run([*base, "--max-minutes", "inf", "--overwrite"], capsys)
    assert code == 2 and "--max-minutes inf should be a finite number > 0" in err


def test_cli_progress_without_terminal_is_plain_lines(tmp_path, capsys):
    data = tmp_path / "data"
    code, _, err = run(["--quiet", "synth", data, "--n", "1", "--size", "20"], capsys)
    assert code == 0, err
    out = tmp_path / "m.pt"
    code, stdout, err = run(
        ["train", data / "images", "-o", out, "--steps", "3", *TINY_TRAIN], capsys
    )
    assert code == 0 and stdout == "", err
    lines = err.splitlines()
    assert lines[1].startswith("train: 1/3 (33%), 0:00 elapsed  loss=")
    assert lines[2].startswith("train: 3/3 (100%), ")  # the end, nothing in between
    assert lines[-1].startswith("wrote ") and len(lines) == 4
    assert "━" not in err and "\x1b" not in err
    code, _, err = run(
        ["train", data / "images", "-o", out, "--max-minutes", "0.01", "--overwrite", *TINY_TRAIN],
        capsys,
    )
    assert code == 0, err
    assert [line.split(",")[0] for line in err.splitlines() if line.startswith("train:")] == [
        "train: 1"
    ]
    # a budget shorter than one step still trains one (the model is never left untrained)
    code, stdout, err = run(
        ["train", data / "images", "-o", out, "--max-minutes", "1e-9", "--json", "--overwrite"]
        + TINY_TRAIN,
        capsys,
    )
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["step"] == 1 and summary["stopped_by"] == "max-minutes"


def test_resume_in_a_new_process_continues_exactly(tmp_path, capsys):
    """TorchScript (geoopt) rounds a process's first step differently; resume must not."""
    import subprocess
    import sys

    data = tmp_path / "data"
    code, _, err = run(["--quiet", "synth", data, "--n", "2", "--size", "20"], capsys)
    assert code == 0, err

    def train_cli(out, steps, *extra):
        cmd = [sys.executable, "-m", "hypsegcli", "--quiet", "train", str(data / "images")]
        cmd += [
            "-o",
            str(out),
            "--steps",
            str(steps),
            "--checkpoint-every",
            "3",
            *TINY_TRAIN,
            *extra,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr

    train_cli(tmp_path / "straight.pt", 9)
    train_cli(tmp_path / "resumed.pt", 6)
    train_cli(tmp_path / "resumed.pt", 9, "--resume")
    a = load_model_file(tmp_path / "straight.pt")["state_dict"]
    b = load_model_file(tmp_path / "resumed.pt")["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_generators_from_another_device_kind_are_reseeded(caplog):
    """A CUDA generator's state (16 bytes) cannot seed a CPU generator, nor the reverse:
    resuming a checkpoint on the other kind of device re-seeds, deterministically."""
    from hypsegcli import distributed
    from hypsegcli.training import _restore_generators

    cuda_like = torch.zeros(16, dtype=torch.uint8)
    state = {"rng_state": {"sample": cuda_like, "noise": cuda_like}}
    draws = []
    for _ in range(2):
        gens = {"sample": torch.Generator(), "noise": torch.Generator()}
        with caplog.at_level("WARNING", logger="hypsegcli.training"):
            _restore_generators(state, distributed.Distributed(), 3, 40, **gens)
        draws.append([torch.rand(4, generator=g) for g in gens.values()])
    assert "another kind of device" in caplog.text
    torch.testing.assert_close(draws[0], draws[1])
    assert not torch.equal(draws[0][0], draws[0][1])  # the two streams differ
    # a state of the right kind is restored exactly
    g = torch.Generator().manual_seed(5)
    saved = {"sample": g.get_state(), "noise": g.get_state()}
    gens = {"sample": torch.Generator(), "noise": torch.Generator()}
    _restore_generators({"rng_state": saved}, distributed.Distributed(), 3, 40, **gens)
    torch.testing.assert_close(torch.rand(3, generator=gens["sample"]), torch.rand(3, generator=g))


def test_cli_texture_weight_is_stored_and_trained(tmp_path, capsys):
    data = tmp_path / "data"
    code, _, err = run(["--quiet", "synth", data, "--n", "1", "--size", "20"], capsys)
    assert code == 0, err
    out = tmp_path / "m.pt"
    args = ["train", data / "images", "-o", out, "--steps", "3", *TINY_TRAIN]
    code, _, err = run([*args, "--texture-weight", "20"], capsys)
    assert code == 0 and "  texture=" in err, err
    rows = _rows(companion_paths(out)[1])  # the term is a column of the history
    texture = [float(r["texture"]) for r in rows]
    assert len(texture) == 3 and all(t > 0 for t in texture), texture
    model = build_model(load_model_file(out))
    assert model.cfg.texture_weight == 20.0
    assert hasattr(model, "dec_texture")
    code, _, err = run([*args, "--texture-weight", "-1"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err


def test_json_summary_has_no_nan(tmp_path):
    """A loss an older history did not record (nan) is null in train --json, which stays strict JSON."""
    import json

    losses = {"total": 1.5, "recon": 1.0, "kl": 0.25, "triplet": 0.25, "texture": float("nan")}
    result = TrainResult(
        tmp_path / "m.pt", tmp_path / "c.pt", tmp_path / "h.csv", 3, 1.0, losses, losses, "steps"
    )
    doc = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert doc["last_losses"] == {**losses, "texture": None} == doc["first_losses"]


def test_cli_norm_is_stored_applied_at_inference_and_kept_on_resume(tmp_path, capsys, monkeypatch):
    from hypsegcli import sampling
    from hypsegcli.pipeline import LoadedModel

    data = tmp_path / "data"
    code, _, err = run(["--quiet", "synth", data, "--n", "1", "--size", "20"], capsys)
    assert code == 0, err
    image = next((data / "images").iterdir())
    raw = io.read_volume(image).data.astype(np.float64)
    out = tmp_path / "m.pt"
    args = ["--quiet", "train", data / "images", "-o", out, *TINY_TRAIN]
    seen = []  # the method every training volume was normalised with
    real = sampling.normalize
    monkeypatch.setattr(
        sampling, "normalize", lambda a, m, *r, **k: seen.append(m) or real(a, m, *r, **k)
    )
    code, _, err = run(
        [*args, "--steps", "2", "--checkpoint-every", "1", "--norm", "zscore"], capsys
    )
    assert code == 0, err
    doc = load_model_file(out)
    assert doc["normalization"]["method"] == "zscore" and doc["sampling_config"]["norm"] == "zscore"
    x = LoadedModel(out, device="cpu").normalize(raw, name=str(image))
    np.testing.assert_allclose(x, (raw - raw.mean()) / raw.std(), rtol=1e-5, atol=1e-5)
    assert seen == ["zscore", "zscore"]  # the training volume, then the volume above
    # resuming without --norm keeps the checkpoint's normalisation for the volumes and the file
    seen.clear()
    code, _, err = run([*args, "--steps", "3", "--resume"], capsys)
    assert code == 0, err
    assert seen == ["zscore"]
    assert load_model_file(out)["normalization"]["method"] == "zscore"
    # percentile levels are stored and used; 'none' keeps the stored values
    code, _, err = run([*args, "--steps", "1", "--norm-range", "0", "100", "--overwrite"], capsys)
    assert code == 0, err
    lo, hi = raw.min(), raw.max()
    x = LoadedModel(out, device="cpu").normalize(raw, name=str(image))
    np.testing.assert_allclose(x, (raw - lo) / (hi - lo), rtol=1e-5, atol=1e-5)
    code, _, err = run([*args, "--steps", "1", "--norm", "none", "--overwrite"], capsys)
    assert code == 0, err
    x = LoadedModel(out, device="cpu").normalize(raw, name=str(image))
    np.testing.assert_array_equal(x, raw.astype(np.float32))
    # bad levels: one line, exit 2
    code, stdout, err = run([*args, "--steps", "1", "--norm-range", "60", "20"], capsys)
    assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1
    assert "--norm-range 60 20: should satisfy 0 <= LOW < HIGH <= 100" in err, err


def test_a_mask_failing_mid_run_keeps_the_state_and_names_the_mask_file(tmp_path, monkeypatch):
    from hypsegcli.sampling import TripletSampler

    real, calls = TripletSampler.sample, []

    def sample(self, batch_size):
        calls.append(batch_size)
        if len(calls) == 3:  # as a mask anchors hardly ever centre in would, by bad luck
            raise BadInputError("the mask of volume 1: after 1048576 draws ... too small")
        return real(self, batch_size)

    monkeypatch.setattr(TripletSampler, "sample", sample)
    volumes = _volumes()
    volumes[1].mask = np.ones(volumes[1].data.shape, bool)
    volumes[1].mask_name = "masks/v1_mask.nii.gz"
    out = tmp_path / "model.pt"
    with pytest.raises(BadInputError) as info:
        train(
            volumes,
            out,
            model_config=TINY,
            sampling_config=SAMPLING,
            train_config=TrainConfig(steps=5, batch_size=4, checkpoint_every=100),
            device="cpu",
        )
    ckpt, _ = companion_paths(out)
    message = str(info.value)
    assert message.startswith("masks/v1_mask.nii.gz (the mask of v1): after 1048576 draws")
    assert message.endswith(f"; the state after step 2 is in {ckpt}")
    assert load_model_file(ckpt)["step"] == 2 and not out.exists()


def test_a_mask_anchors_seldom_centre_in_is_warned_about(tmp_path, caplog):
    volumes = _volumes()
    volumes[1].mask = np.zeros(volumes[1].data.shape, bool)
    volumes[1].mask[10, 10, 10] = True  # about 1 in 1 600 anchors centre on it
    volumes[1].mask_name = "one_voxel.nii.gz"
    volumes[2].mask = np.ones(volumes[2].data.shape, bool)
    volumes[2].mask_name = "all.nii.gz"
    with caplog.at_level("WARNING"):
        train(
            volumes,
            tmp_path / "model.pt",
            model_config=TINY,
            sampling_config=SAMPLING,
            train_config=TrainConfig(steps=1, batch_size=4),
            device="cpu",
        )
    slow = [r.getMessage() for r in caplog.records if "training will be slow" in r.getMessage()]
    assert len(slow) == 1, slow
    assert re.fullmatch(
        r"one_voxel\.nii\.gz \(the mask of v1\): about 1 in 1[5-6]\d\d anchors drawn centre "
        r"inside it, so each triplet is drawn about that often: training will be slow \(a "
        r"larger mask is faster\)",
        slow[0],
    )


def _train_tiny(path, steps, **kwargs):
    cfg = dict(batch_size=8, lr=3e-3, checkpoint_every=10, seed=3)
    cfg.update(kwargs.pop("cfg", {}))
    return train(
        _volumes(),
        path,
        model_config=TINY,
        sampling_config=SAMPLING,
        train_config=TrainConfig(steps=steps, **cfg),
        device="cpu",
        **kwargs,
    )


def _same_weights(a, b):
    a, b = load_model_file(a)["state_dict"], load_model_file(b)["state_dict"]
    return all(torch.equal(a[key], b[key]) for key in a)


def test_an_interrupt_saves_the_state_and_resume_continues_exactly(tmp_path):
    """Ctrl-C (and SIGTERM, which hypseg turns into the same exception) between periodic
    checkpoints saves the state reached, so a resubmitted job loses nothing."""
    _train_tiny(tmp_path / "a.pt", 30)

    def interrupt(stage, done, total, **info):
        if done == 25:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train_tiny(tmp_path / "b.pt", 30, progress=interrupt)
    ckpt, hist = companion_paths(tmp_path / "b.pt")
    assert load_model_file(ckpt)["step"] == 25
    assert [int(r["step"]) for r in _rows(hist)] == list(range(1, 26))
    _train_tiny(tmp_path / "b.pt", 30, resume=True)
    assert _same_weights(tmp_path / "a.pt", tmp_path / "b.pt")
    assert [int(r["step"]) for r in _rows(hist)] == list(range(1, 31))


def test_an_interrupt_while_checkpointing_leaves_no_gap_in_the_history(tmp_path, monkeypatch):
    """The history is written before the checkpoint: an interrupt between the two used to
    leave the checkpoint ahead of the history, and a resume then had a gap in it."""
    from hypsegcli import training

    real_save = training.save_model_file
    calls = []

    def save(path, payload):
        calls.append(payload["step"])
        if payload["kind"] == "checkpoint" and payload["step"] == 20 and calls.count(20) == 1:
            real_save(path, payload)
            raise KeyboardInterrupt  # the checkpoint is in place; nothing after it ran
        return real_save(path, payload)

    monkeypatch.setattr(training, "save_model_file", save)
    with pytest.raises(KeyboardInterrupt):
        _train_tiny(tmp_path / "m.pt", 30)
    monkeypatch.undo()
    _train_tiny(tmp_path / "m.pt", 30, resume=True)
    _, hist = companion_paths(tmp_path / "m.pt")
    assert [int(r["step"]) for r in _rows(hist)] == list(range(1, 31))


def test_divergence_keeps_the_last_checkpoint_and_nan_weights_are_refused(tmp_path, capsys, caplog):
    """A learning rate of 1000 blows the weights up at the first update: the run stops at the
    next step without overwriting the checkpoint (which held NaN weights before, so that no
    --resume could recover), and a model file with NaN weights is refused where it is
    loaded, naming the weight (embed had written NaN embeddings with exit code 0)."""
    from hypsegcli.errors import HypsegError

    path = tmp_path / "m.pt"
    with pytest.raises(HypsegError, match=r"diverged at step 2 .*no checkpoint was written"):
        _train_tiny(path, 20, cfg={"lr": 1e3})
    ckpt, _ = companion_paths(path)
    assert not ckpt.exists()
    _train_tiny(path, 3, cfg={"lr": 1e-3, "checkpoint_every": 1})
    with pytest.raises(HypsegError, match=r"the last checkpoint \(step 3\) is kept in"):
        _train_tiny(path, 20, resume=True, cfg={"lr": 1e6, "checkpoint_every": 100})
    doc = load_model_file(ckpt)
    assert doc["step"] == 3
    assert all(torch.isfinite(t).all() for t in doc["state_dict"].values() if t.is_floating_point())
    # resuming with a smaller --lr works from there
    assert _train_tiny(path, 5, resume=True, cfg={"lr": 1e-3}).step == 5
    # the last update blows the weights up: its result is checked before the model file and
    # the checkpoint are written (review: --steps 1 --lr 1e10 saved a model whose
    # embeddings were all NaN, with exit code 0)
    fresh = tmp_path / "last.pt"
    with pytest.raises(
        HypsegError, match=r"diverged at step 1 \((with the weights after it|the up)"
    ):
        _train_tiny(fresh, 1, cfg={"lr": 1e10})
    assert not fresh.exists() and not companion_paths(fresh)[0].exists()
    # a model file holding NaN weights
    from hypsegcli.modelfile import save_model_file

    doc = load_model_file(path)
    name = next(k for k, t in doc["state_dict"].items() if t.is_floating_point())
    doc["state_dict"][name] = torch.full_like(doc["state_dict"][name], float("nan"))
    save_model_file(tmp_path / "nan.pt", doc)
    with pytest.raises(BadInputError, match=rf"nan\.pt: weight {re.escape(name)} holds NaN"):
        load_model_file(tmp_path / "nan.pt")


def test_resume_applies_a_new_lr_and_keeps_the_checkpoints_seed(tmp_path, caplog):
    _train_tiny(tmp_path / "a.pt", 6, cfg={"checkpoint_every": 3})
    _train_tiny(tmp_path / "b.pt", 3, cfg={"checkpoint_every": 3})
    with caplog.at_level("INFO", logger="hypsegcli"):
        _train_tiny(tmp_path / "b.pt", 6, resume=True, cfg={"lr": 0.5, "seed": 9})
    assert "continues the checkpoint's random streams (seed 3, not 9)" in caplog.text
    assert "resuming with --lr 0.5 (the checkpoint trained with 0.003)" in caplog.text
    ckpt, _ = companion_paths(tmp_path / "b.pt")
    doc = load_model_file(ckpt)
    assert doc["train_config"]["seed"] == 3 and doc["train_config"]["lr"] == 0.5
    assert {g["lr"] for g in doc["optimizer_state"]["param_groups"]} == {0.5}
    assert not _same_weights(tmp_path / "a.pt", tmp_path / "b.pt")
    # the same --lr resumes exactly
    _train_tiny(tmp_path / "c.pt", 3, cfg={"checkpoint_every": 3})
    _train_tiny(tmp_path / "c.pt", 6, resume=True, cfg={"seed": 9})
    assert _same_weights(tmp_path / "a.pt", tmp_path / "c.pt")


def test_sigterm_mid_step_saves_a_state_that_resumes_bit_for_bit(tmp_path, capsys):
    """A Slurm time limit (SIGTERM) before the first periodic checkpoint used to lose every
    step. Sent while a step draws its triplets and runs (the generators have drawn for the
    next step), the saved state still resumes into the very weights of an uninterrupted run."""
    import signal
    import subprocess
    import sys

    from hypsegcli.distributed import state_sha256

    data = tmp_path / "data"
    code, _, err = run(["--quiet", "synth", data, "--n", "2", "--size", "20"], capsys)
    assert code == 0, err

    def cmd(out, *extra, quiet=True):
        argv = [sys.executable, "-m", "hypsegcli", *(["--quiet"] if quiet else []), "train"]
        argv += [str(data / "images"), "-o", str(out), "--steps", "60"]
        return [*argv, "--checkpoint-every", "50", *TINY_TRAIN, *extra]

    done = subprocess.run(cmd(tmp_path / "a.pt"), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "b.pt"
    proc = subprocess.Popen(cmd(out, quiet=False), stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # plain progress lines without a terminal, after an update
            if line.startswith("train:"):
                break
        proc.send_signal(signal.SIGTERM)  # most likely while a step draws and runs
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == 143, rest
    finally:
        proc.kill()
    ckpt, _ = companion_paths(out)
    step = load_model_file(ckpt)["step"]
    assert 1 <= step < 50 and f"the state after step {step} is in" in rest
    done = subprocess.run(cmd(out, "--resume"), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    a, b = load_model_file(tmp_path / "a.pt"), load_model_file(out)
    assert state_sha256(a["state_dict"]) == state_sha256(b["state_dict"])


def test_a_second_interrupt_waits_for_the_save(tmp_path, monkeypatch):
    """Ctrl-C twice: the second arrives while the first one's checkpoint is written; it is
    held until the checkpoint is in place, then stops the run."""
    import os
    import signal

    from hypsegcli import training

    real_history = training._write_history

    def history_then_ctrl_c(path, rows):
        real_history(path, rows)
        if rows and rows[-1]["step"] == 5:
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, amid the save

    def interrupt(stage, done, total, **info):
        if done == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "_write_history", history_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        _train_tiny(tmp_path / "m.pt", 30, progress=interrupt)
    ckpt, _ = companion_paths(tmp_path / "m.pt")
    assert load_model_file(ckpt)["step"] == 5


def test_cli_resume_without_lr_keeps_the_checkpoints(tmp_path, capsys):
    data = tmp_path / "data"
    assert run(["--quiet", "synth", data, "--n", "2", "--size", "20"], capsys)[0] == 0
    out = tmp_path / "m.pt"
    argv = ["--quiet", "train", data / "images", "-o", out, *TINY_TRAIN]
    assert run([*argv, "--steps", "2", "--lr", "3e-4"], capsys)[0] == 0
    assert run([*argv, "--steps", "3", "--resume"], capsys)[0] == 0
    ckpt, _ = companion_paths(out)
    doc = load_model_file(ckpt)
    assert doc["train_config"]["lr"] == 3e-4
    assert {g["lr"] for g in doc["optimizer_state"]["param_groups"]} == {3e-4}
    assert run([*argv, "--steps", "4", "--resume", "--lr", "1e-4"], capsys)[0] == 0
    assert {g["lr"] for g in load_model_file(ckpt)["optimizer_state"]["param_groups"]} == {1e-4}


def test_cli_grad_clip_is_applied_recorded_and_kept_on_resume(tmp_path, capsys):
    """Review: the gradients were clipped to a total norm of 10 at every step (norms of
    hundreds to thousands on the default loss), with no option and no word in the docs."""
    data = tmp_path / "data"
    assert run(["--quiet", "synth", data, "--n", "2", "--size", "20"], capsys)[0] == 0
    argv = ["--quiet", "train", data / "images", *TINY_TRAIN, "--steps", "2"]
    for name, clip in (
        ("ten", ["--grad-clip", "10"]),
        ("off", []),
        ("tiny", ["--grad-clip", "1e-6"]),
    ):
        assert run([*argv, "-o", tmp_path / f"{name}.pt", *clip], capsys)[0] == 0
    configs = {n: load_model_file(tmp_path / f"{n}.pt")["train_config"] for n in ("ten", "off")}
    # off by default (validation, 3 seeds: +0.07 matched Dice at level 2 over a clip of 10)
    assert configs["ten"]["grad_clip"] == 10.0 and configs["off"]["grad_clip"] == 0.0
    # the clip is in force: the same seed and steps, other weights; an update clipped to a
    # norm of 1e-6 still moves Adam's weights by about lr (Adam divides the scale out) but
    # not as the unclipped one does
    assert not _same_weights(tmp_path / "ten.pt", tmp_path / "off.pt")
    assert not _same_weights(tmp_path / "tiny.pt", tmp_path / "off.pt")
    # --resume keeps the checkpoint's unless --grad-clip is given, and says so then
    out = tmp_path / "off.pt"
    resume = ["train", data / "images", "-o", out, *TINY_TRAIN, "--resume"]
    code, _, err = run([*resume, "--steps", "3"], capsys)
    assert code == 0 and "--grad-clip" not in err, err
    assert load_model_file(companion_paths(out)[0])["train_config"]["grad_clip"] == 0.0
    code, _, err = run([*resume, "--steps", "4", "--grad-clip", "5"], capsys)
    assert code == 0 and "resuming with --grad-clip 5 (the checkpoint trained with 0)" in err
    assert load_model_file(out)["train_config"]["grad_clip"] == 5.0
    code, _, err = run([*argv, "-o", tmp_path / "bad.pt", "--grad-clip", "inf"], capsys)
    assert code == 2 and "--grad-clip inf should be a finite number >= 0" in err, err


def test_cli_resume_of_a_checkpoint_from_before_grad_clip_keeps_its_clip_of_10(tmp_path, capsys):
    """Checkpoints written before --grad-clip existed have no such key and were trained
    with a clip of 10; when the default became 0, resuming one must not switch it off
    silently."""
    data = tmp_path / "data"
    assert run(["--quiet", "synth", data, "--n", "2", "--size", "20"], capsys)[0] == 0
    out = tmp_path / "old.pt"
    argv = ["train", data / "images", "-o", out, *TINY_TRAIN]
    assert run(["--quiet", *argv, "--steps", "2"], capsys)[0] == 0
    ckpt = companion_paths(out)[0]
    state = load_model_file(ckpt)
    assert state["train_config"].pop("grad_clip") == 0.0  # the new default
    assert TrainConfig.from_dict(state["train_config"]).grad_clip == 10.0
    torch.save(state, ckpt)
    code, _, err = run([*argv, "--steps", "3", "--resume"], capsys)
    assert code == 0 and "--grad-clip" not in err, err
    assert load_model_file(ckpt)["train_config"]["grad_clip"] == 10.0
    assert load_model_file(out)["train_config"]["grad_clip"] == 10.0


def test_cli_resume_without_batch_size_keeps_the_checkpoints(tmp_path, capsys):
    """As --lr: a resumed run without --batch-size trained on at 64 triplets a step, the
    default, where the checkpoint had 3 (only an info line said so, hidden by -q)."""
    data = tmp_path / "data"
    assert run(["--quiet", "synth", data, "--n", "2", "--size", "20"], capsys)[0] == 0
    out = tmp_path / "m.pt"
    small = ["--patch-size", "9", "--r-min", "6", "--r-max", "10", "--threads", "2"]
    argv = ["--quiet", "train", data / "images", "-o", out, *small]
    assert run([*argv, "--steps", "2", "--batch-size", "3"], capsys)[0] == 0
    assert run([*argv, "--steps", "3", "--resume"], capsys)[0] == 0
    ckpt, history = companion_paths(out)
    assert load_model_file(ckpt)["train_config"]["batch_size"] == 3
    assert load_model_file(out)["train_config"]["batch_size"] == 3
    assert run([*argv, "--steps", "4", "--resume", "--batch-size", "5"], capsys)[0] == 0
    assert load_model_file(ckpt)["train_config"]["batch_size"] == 5
    # a damaged history (bytes that are not UTF-8, a step that is not a number) loses its
    # bad rows, not the run (UnicodeDecodeError, ValueError: exit 1)
    rows = history.read_bytes().splitlines(keepends=True)
    assert len(rows) == 5  # the header and steps 1-4
    nan_row = rows[4].replace(b"4,", b"nan,", 1)
    history.write_bytes(b"".join([*rows[:3], b"\xff\xfe\x00garbage\n", nan_row]))
    code, _, err = run([*argv, "--steps", "5", "--resume"], capsys)
    assert code == 0, err
    steps = [line.split(",")[0] for line in history.read_text().splitlines()[1:]]
    assert steps == ["1", "2", "5"]


def test_an_r_max_no_volume_allows_is_warned_about(tmp_path, capsys):
    """QA: `train --r-max 100` on 24^3 volumes trained without a word, its anchors drawn up
    to each volume's limit. Given on the command line, it is warned about; the default is
    not (it is larger than 16^3 volumes allow, and nobody asked for it)."""
    data = tmp_path / "data"
    assert run(["-q", "synth", data, "--n", "2", "--size", "16"], capsys)[0] == 0
    argv = ["-q", "train", data / "images", "-o", tmp_path / "m.pt", "--steps", "1"]
    tiny = list(TINY_TRAIN)
    tiny[tiny.index("--r-max") + 1] = "100"
    code, _, err = run([*argv, *tiny], capsys)
    assert code == 0, err
    assert err == (
        "warning: --r-max 100: no volume allows anchors beyond 13 voxels (an anchor fits a "
        "volume's shortest side, with room for a negative beside it along its longest); "
        "anchors are drawn up to each volume's own limit\n"
    )
    del tiny[tiny.index("--r-max") : tiny.index("--r-max") + 2]
    code, _, err = run([*argv, "--overwrite", *tiny], capsys)
    assert code == 0 and err == "", err
