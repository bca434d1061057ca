"""embed / cluster / cache from the command line: outputs, geometry, caching, centroids."""

from __future__ import annotations

import json
import os
import struct
import zlib

import mrcfile
import nibabel as nib
import numpy as np
import pytest
from clitools import blob_and_two_specks, run, tiny_pipeline

from hypsegcli import embedding, io


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for a few steps on 3 synthetic volumes (NIfTI) plus an MRC copy."""
    return tiny_pipeline(tmp_path_factory.mktemp("pipeline"), steps=4, mrc=True)


def test_cluster_writes_labels_with_geometry_and_uses_cache(trained, tmp_path, capsys, monkeypatch):
    images = trained / "data" / "images"
    seg = tmp_path / "seg"
    argv = [
        "--quiet",
        "cluster",
        images,
        "-m",
        trained / "model.pt",
        "--k",
        "2",
        "--k",
        "4",
        "-o",
        seg,
        "--json",
        "--threads",
        "2",
    ]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["computed"] == 3
    for case in ("case_000", "case_001", "case_002"):
        for k in (2, 4):
            path = seg / f"{case}_k{k}.nii.gz"
            img = nib.load(str(path))
            src = nib.load(str(images / f"{case}.nii.gz"))
            np.testing.assert_allclose(img.affine, src.affine)
            labels = np.asarray(img.dataobj)
            assert img.get_data_dtype() == np.uint8 and labels.shape == src.shape
            assert set(np.unique(labels)) <= set(range(k))
    centroids = json.loads((seg / "centroids.json").read_text())
    assert centroids["format"] == "hypseg-centroids" and len(centroids["sets"]) == 6
    # the run manifest (hypseg-runs.jsonl) grows by one record per run
    first = {p.name: p.read_bytes() for p in seg.iterdir() if p.name != "hypseg-runs.jsonl"}

    # a second run (--overwrite: redo the clustering) performs no encoder work and gives the same files
    def boom(*args, **kwargs):
        raise AssertionError("encoder ran although the embeddings are cached")

    monkeypatch.setattr(embedding, "embed_volume", boom)
    code, out, err = run([*argv, "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads(out)["computed"] == 0
    assert {p.name: p.read_bytes() for p in seg.iterdir() if p.name != "hypseg-runs.jsonl"} == first

    # evaluate pairs <case>_k<K> with <case>_L<level> through dataset.json
    code, out, err = run(
        ["evaluate", seg, trained / "data" / "labels", "--json", "--no-hausdorff"], capsys
    )
    assert code == 0, err
    levels = {(c["k"], c["level"]) for c in json.loads(out)["cases"]}
    assert levels == {(2, 1), (4, 2)}


def test_embed_record_of_an_mrc_volume_keeps_its_header_fields(trained, tmp_path, capsys):
    path = trained / "mrc" / "images" / "case_000.mrc"
    with mrcfile.open(path) as mrc:
        voxel = [float(v) for v in mrc.voxel_size.tolist()]
    code, _, err = run(
        ["--quiet", "embed", path, "-m", trained / "model.pt", "-o", tmp_path, "--stride", "4"],
        capsys,
    )
    assert code == 0, err
    geo = json.loads((tmp_path / "case_000.json").read_text())["geometry"]
    assert geo["format"] == "mrc" and geo["unit"] == "Å" and geo["voxel_size"] == voxel
    assert geo["origin"] == [0.0, 0.0, 0.0] and geo["start"] == [0, 0, 0]
    assert geo["shape"] == list(np.load(tmp_path / "case_000.npy").shape[:3])


def test_cluster_mrc_keeps_voxel_size(trained, tmp_path, capsys):
    src = trained / "mrc" / "images" / "case_000.mrc"
    with mrcfile.open(str(src), mode="r+") as mrc:
        mrc.voxel_size = (4.2, 4.2, 4.2)
        mrc.header.origin.x = 12.5
    code, _, err = run(
        [
            "--quiet",
            "cluster",
            src,
            "-m",
            trained / "model.pt",
            "--k",
            "2",
            "-o",
            tmp_path,
            "--preview",
        ],
        capsys,
    )
    assert code == 0, err
    with mrcfile.open(str(tmp_path / "case_000_k2.mrc")) as mrc:
        assert tuple(float(v) for v in mrc.voxel_size.tolist()) == pytest.approx((4.2, 4.2, 4.2))
        assert float(mrc.header.origin.x) == 12.5
        assert mrc.data.shape == (20, 20, 20)
    png = (tmp_path / "case_000_k2.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", png[16:24])
    idat = png[png.index(b"IDAT") + 4 : png.index(b"IEND") - 8]
    assert len(zlib.decompress(idat)) == height * (1 + 3 * width)


def test_previews_of_a_volume_share_one_grey_level_computation(
    trained, tmp_path, capsys, monkeypatch
):
    """The whole-volume percentiles were computed again for every k (~2 s each for a
    512x512x300 tomogram); the pictures are the same as computed alone."""
    from hypsegcli import preview

    calls = []
    real = preview.window_levels
    monkeypatch.setattr(preview, "window_levels", lambda image: calls.append(1) or real(image))
    src = trained / "mrc" / "images" / "case_000.mrc"
    argv = ["--quiet", "cluster", src, "-m", trained / "model.pt", "--preview", "-o", tmp_path]
    code, _, err = run([*argv, "--k", "2", "--k", "3", "--k", "4"], capsys)
    assert code == 0, err
    assert len(calls) == 1
    image = io.read_volume(src)
    for k in (2, 3, 4):
        labels = io.read_volume(tmp_path / f"case_000_k{k}.mrc").data
        alone = tmp_path / f"alone_k{k}.png"
        preview.write_preview(alone, image.data, labels, image.geometry.spacing)
        assert (tmp_path / f"case_000_k{k}.png").read_bytes() == alone.read_bytes()


def test_pooled_centroids_and_reuse(trained, tmp_path, capsys):
    images = trained / "data" / "images"
    code, _, err = run(
        [
            "--quiet",
            "cluster",
            images,
            "-m",
            trained / "model.pt",
            "--k",
            "3",
            "-o",
            tmp_path / "a",
            "--fit-on",
            "pooled",
        ],
        capsys,
    )
    assert code == 0, err
    doc = json.loads((tmp_path / "a" / "centroids.json").read_text())
    assert [(s["case"], s["k"]) for s in doc["sets"]] == [(None, 3)]
    code, _, err = run(
        [
            "--quiet",
            "cluster",
            images / "case_001.nii.gz",
            "-m",
            trained / "model.pt",
            "--k",
            "3",
            "-o",
            tmp_path / "b",
            "--centroids",
            tmp_path / "a" / "centroids.json",
        ],
        capsys,
    )
    assert code == 0, err
    a = np.asarray(nib.load(str(tmp_path / "a" / "case_001_k3.nii.gz")).dataobj)
    b = np.asarray(nib.load(str(tmp_path / "b" / "case_001_k3.nii.gz")).dataobj)
    np.testing.assert_array_equal(a, b)
    code, _, err = run(
        [
            "cluster",
            images,
            "-m",
            trained / "model.pt",
            "--k",
            "5",
            "-o",
            tmp_path / "c",
            "--centroids",
            tmp_path / "a" / "centroids.json",
        ],
        capsys,
    )
    assert code == 2 and "no pooled centroids for k=5" in err
    # centroids of another model's embeddings (a model retrained under the same name), or
    # of another patch size, are refused; another stride is the same embedding
    from hypsegcli.modelfile import load_model_file, save_model_file

    document = load_model_file(trained / "model.pt")
    first = next(iter(document["state_dict"]))
    document["state_dict"][first] = document["state_dict"][first] + 0.01
    other = tmp_path / "retrained" / "model.pt"
    other.parent.mkdir()
    save_model_file(other, document)
    base = ["cluster", images / "case_001.nii.gz", "--k", "3", "-o", tmp_path / "d"]
    base += ["--centroids", tmp_path / "a" / "centroids.json"]
    code, out, err = run([*base, "-m", other], capsys)
    assert code == 2 and out == "" and not (tmp_path / "d" / "case_001_k3.nii.gz").exists()
    assert "centroids.json: centroids were fitted on the embeddings of another model" in err
    code, _, err = run([*base, "-m", trained / "model.pt", "--patch-size", "3"], capsys)
    assert code == 2 and "fitted on embeddings of --patch-size 5, this run uses 3" in err
    code, _, err = run([*base, "-m", trained / "model.pt", "--stride", "2"], capsys)
    assert code == 0, err
    code, _, err = run([*base, "-m", trained / "model.pt", "--fit-on", "pooled"], capsys)
    assert code == 2 and "cannot be combined with --fit-on pooled" in err


def test_intensity_baseline_needs_no_model(trained, tmp_path, capsys):
    code, _, err = run(
        [
            "--quiet",
            "cluster",
            trained / "data" / "images",
            "--features",
            "intensity",
            "--k",
            "2",
            "-o",
            tmp_path,
        ],
        capsys,
    )
    assert code == 0, err
    labels = io.read_volume(tmp_path / "case_000_k2.nii.gz").data
    assert set(np.unique(labels)) == {0, 1}
    code, _, err = run(["cluster", trained / "data" / "images", "--k", "2", "-o", tmp_path], capsys)
    assert code == 2 and "--model is required" in err


def test_embed_writes_arrays_and_cache_commands(trained, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.chdir(trained)  # (the volume and model named relative to it)
    code, out, err = run(
        [
            "--quiet",
            "embed",
            "data/images/case_000.nii.gz",
            "-m",
            "model.pt",
            "-o",
            tmp_path / "emb",
            "--cache-dir",
            cache,
            "--json",
            "--stride",
            "2",
        ],
        capsys,
    )
    assert code == 0, err
    arr = np.load(tmp_path / "emb" / "case_000.npy")
    assert arr.shape == (20, 20, 20, 2) and arr.dtype == np.float32
    assert (np.linalg.norm(arr, axis=-1) < 1).all()
    # beside it, the volume's geometry and the array's provenance (a .npy has no header)
    record = json.loads((tmp_path / "emb" / "case_000.json").read_text())
    src = nib.load(trained / "data" / "images" / "case_000.nii.gz")
    assert record["format"] == "hypseg-embedding" and record["shape"] == [20, 20, 20, 2]
    assert record["space"] == "poincare_ball" and record["curvature"] == 1.0
    assert record["stride"] == 2 and record["patch_size"] == 5
    assert record["model_sha256"] == io.file_sha256(trained / "model.pt")
    np.testing.assert_array_equal(record["geometry"]["affine"], src.affine)
    assert record["geometry"]["sform_code"] == int(src.header["sform_code"])
    assert record["geometry"]["unit"] == "mm"
    code, out, _ = run(["cache", "ls", "--cache-dir", cache, "--json"], capsys)
    assert code == 0 and len(json.loads(out)) == 1
    # named by absolute paths (QA: `cache ls` showed them as typed where the entry was
    # made, wrong from any other folder; the cache is shared by every working folder)
    (entry,) = json.loads(out)
    assert entry["meta"]["volume"] == str(trained / "data" / "images" / "case_000.nii.gz")
    assert entry["meta"]["model"] == str(trained / "model.pt")
    code, out, _ = run(["cache", "path", "--cache-dir", cache], capsys)
    assert code == 0 and out.strip().startswith(str(cache))
    code, _, _ = run(["--quiet", "cache", "clear", "--cache-dir", cache], capsys)
    assert code == 0
    code, out, _ = run(["cache", "ls", "--cache-dir", cache, "--json"], capsys)
    assert json.loads(out) == []


def test_bad_model_file_and_options(trained, tmp_path, capsys):
    (tmp_path / "fake.pt").write_bytes(b"nope")
    code, out, err = run(
        [
            "cluster",
            trained / "data" / "images",
            "-m",
            tmp_path / "fake.pt",
            "--k",
            "2",
            "-o",
            tmp_path,
        ],
        capsys,
    )
    assert code == 2 and "fake.pt: not a hypseg model file" in err and err.count("\n") == 1
    code, _, err = run(
        [
            "cluster",
            trained / "data" / "images",
            "-m",
            trained / "model.pt",
            "--k",
            "1",
            "-o",
            tmp_path,
        ],
        capsys,
    )
    assert code == 2 and "--k 1" in err


def test_smoke_pipeline_beats_random_labels_at_level_1(trained, tmp_path, capsys):
    """synth -> train -> cluster -> evaluate, tiny: a broken pipeline (axes, labels, pairing) scores like chance."""
    images, labels = trained / "data" / "images", trained / "data" / "labels"
    seg = tmp_path / "seg"
    code, _, err = run(
        ["--quiet", "cluster", images, "-m", trained / "model.pt", "--k", "2", "-o", seg], capsys
    )
    assert code == 0, err
    rng = np.random.default_rng(0)
    chance = tmp_path / "chance"
    chance.mkdir()
    for path in sorted(images.glob("*.nii.gz")):
        src = nib.load(str(path))
        noise = rng.integers(0, 2, src.shape).astype(np.uint8)
        nib.save(
            nib.Nifti1Image(noise, src.affine),
            str(chance / path.name.replace(".nii.gz", "_k2.nii.gz")),
        )
    scores = {}
    for name, folder in (("model", seg), ("chance", chance)):
        code, out, err = run(["evaluate", folder, labels, "--json", "--no-hausdorff"], capsys)
        assert code == 0, err
        (summary,) = json.loads(out)["summary"]
        assert summary["level"] == 1 and summary["n"] == 3
        scores[name] = summary["mean_dice"]
    assert scores["chance"] < 0.55
    assert scores["model"] > scores["chance"] + 0.2, scores


def test_kmeans_fits_are_cached_and_reused_only_when_they_apply(
    trained, tmp_path, capsys, monkeypatch
):
    """Clustering again with other spatial steps reuses each volume's cached k-means fit (same
    centroids as a fresh fit), except a fit nested by --nest in the smallest k's labels, which
    those steps shape; another seed, --n-init, --fit-samples or --select fits again."""
    from hypsegcli import batch, pipeline

    images = trained / "data" / "images"
    cache = tmp_path / "cache"
    fits: list[int] = []
    real_fit = pipeline._Clusterer.fit

    def counting_fit(self, features, k, rows=None):
        fits.append(k)
        return real_fit(self, features, k, rows)

    monkeypatch.setattr(pipeline._Clusterer, "fit", counting_fit)

    def cluster(out, *extra):
        code, stdout, err = run(
            [
                "--quiet",
                "cluster",
                images,
                "-m",
                trained / "model.pt",
                "--k",
                "2",
                "--k",
                "3",
                "-o",
                tmp_path / out,
                "--cache-dir",
                cache,
                "--json",
                *extra,
            ],
            capsys,
        )
        assert code == 0, err
        return json.loads(stdout)

    def centers(out):
        return {
            (s["case"], s["k"]): s["centers"]
            for s in json.loads((tmp_path / out / "centroids.json").read_text())["sets"]
        }

    def labels(out):
        return {p.name: p.read_bytes() for p in (tmp_path / out).glob("*_k*.nii.gz")}

    plan = cluster("plan", "--dry-run")
    assert [(v["cached_fits"], v["fits"]) for v in plan["volumes"]] == [([], [2, 3])] * 3
    cluster("a")
    assert sorted(fits) == [2, 2, 2, 3, 3, 3]
    # the plan sees the cached fits
    plan2 = cluster("plan", "--dry-run")
    assert [(v["cached_fits"], v["fits"]) for v in plan2["volumes"]] == [([2, 3], [])] * 3
    # another output folder, the same options: no fit, the same centroids and labels
    fits.clear()
    cluster("b")
    assert fits == []
    assert centers("b") == centers("a") and labels("b") == labels("a")
    # other spatial steps: the same k = 2 centroids; k = 3 is nested in k = 2's labels
    # (--nest, on by default), which the steps shape: fitted again
    cluster("c", "--smooth", "0", "--snap", "0", "--mrf", "0")
    assert sorted(fits) == [3, 3, 3]
    assert {key: c for key, c in centers("c").items() if key[1] == 2} == {
        key: c for key, c in centers("a").items() if key[1] == 2
    }
    assert {key: c for key, c in centers("c").items() if key[1] == 3} != {
        key: c for key, c in centers("a").items() if key[1] == 3
    }
    # without nesting k = 3 is a plain fit, which other spatial steps reuse
    fits.clear()
    cluster("c2", "--nest", "0")
    assert sorted(fits) == [3, 3, 3]
    fits.clear()
    cluster("c3", "--nest", "0", "--smooth", "0", "--snap", "0", "--mrf", "0")
    assert fits == [] and centers("c3") == centers("c2")
    # what the fit depends on: fitted again
    for option, value in (
        ("--seed", "1"),
        ("--n-init", "3"),
        ("--fit-samples", "5000"),
        ("--select", "inertia"),
    ):
        fits.clear()
        cluster(f"d{option}", option, value)
        assert sorted(fits) == [2, 2, 2, 3, 3, 3], option
    # cache ls names them; a corrupt cached fit is refitted, with the same result
    code, out, _ = run(["cache", "ls", "--cache-dir", cache, "--json"], capsys)
    kinds = [e["meta"].get("kind") for e in json.loads(out)]
    assert kinds.count("centroids") == 6 * 6 and kinds.count(None) == 3
    entry = next(e for e in json.loads(out) if e["meta"].get("kind") == "centroids")
    with open(entry["path"], "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\x00" * 8)
    fits.clear()
    cluster("e")
    assert len(fits) == 1 and centers("e") == centers("a")
    # pooled or given centroids: no volume is fitted on its own, in the plan either (and
    # given centroids cost only the assignment; a fixed matmul rate so that plans compare)
    monkeypatch.setattr(batch, "measure_flop_rate", lambda device: 1e11)
    cluster("pooled", "--fit-on", "pooled")
    fitted = cluster("plan", "--dry-run", "--overwrite", "--seed", "7")  # embeddings cached
    assert [v["fits"] for v in fitted["volumes"]] == [[2, 3]] * 3
    for extra in (("--fit-on", "pooled"), ("--centroids", tmp_path / "pooled" / "centroids.json")):
        plan = cluster("plan", "--dry-run", "--overwrite", *extra)
        assert [v["fits"] for v in plan["volumes"]] == [[]] * 3, extra
    assert plan["estimated_seconds"] < fitted["estimated_seconds"]


def test_select_silhouette_is_recorded_and_redoes_outputs_made_otherwise(trained, tmp_path, capsys):
    images = trained / "data" / "images"

    def cluster(*extra):
        argv = ["--quiet", "cluster", images, "-m", trained / "model.pt", "--k", "2"]
        code, out, err = run([*argv, "-o", tmp_path / "seg", "--json", *extra], capsys)
        assert code == 0, err
        return json.loads(out)

    def params():
        return json.loads((tmp_path / "seg" / "case_000.centroids.json").read_text())["params"]

    assert cluster("--select", "inertia", "--n-init", "2")["done"] == 3
    assert "select" not in params()  # inertia: records made before the option still match
    assert cluster("--select", "inertia", "--n-init", "2")["skipped"] == 3
    assert cluster("--n-init", "2")["done"] == 3  # the default is silhouette: redone
    assert params()["select"] == "silhouette"
    assert cluster("--select", "silhouette", "--n-init", "2")["skipped"] == 3
    code, _, err = run(
        ["cluster", images, "--k", "2", "-o", tmp_path / "x", "--select", "best"], capsys
    )
    assert code == 2 and "--select" in err


def test_euclidean_fit_keeps_the_restart_of_largest_silhouette(monkeypatch):
    """--select silhouette with Euclidean k-means (intensities, --metric euclidean): each
    restart is a k-means of its own, and the kept one has the largest silhouette."""
    from sklearn.metrics import silhouette_score

    from hypsegcli import kmeans, pipeline

    features = blob_and_two_specks()
    monkeypatch.setattr(kmeans, "_SILHOUETTE_SAMPLES", 10_000)  # every point: no subset drawn
    seen = {}
    real = pipeline._by_silhouette_line

    def spy(feats, fits, rng):
        seen["fits"], seen["kept"] = fits, real(feats, fits, rng)
        return seen["kept"]

    monkeypatch.setattr(pipeline, "_by_silhouette_line", spy)

    def fit(select):
        clusterer = pipeline._Clusterer(
            "line", curvature=1.0, n_init=8, fit_samples=10**6, seed=0, device="cpu", select=select
        )
        return clusterer.fit(features, 3)

    centers = fit("silhouette")
    scores = [silhouette_score(features, km.predict(features)) for km in seen["fits"]]
    kept = seen["fits"][int(np.argmax(scores))]
    assert seen["kept"] == int(np.argmax(scores))
    np.testing.assert_allclose(
        np.sort(centers, axis=0), np.sort(kept.cluster_centers_, axis=0), rtol=0, atol=0
    )
    least = min(seen["fits"], key=lambda km: km.inertia_)
    assert kept.inertia_ > least.inertia_  # here not the restart inertia would keep
    seen.clear()
    fit("inertia")
    assert seen == {}  # inertia: one KMeans with its own restarts, as before


def _ball_features(shape, seed=0):
    """Ball points (X, Y, Z, 2): two spread-out groups at radii ~0.6 and ~0.3, where Poincaré
    and Euclidean k-means disagree about both the centroids and the boundary."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    centre = np.where(np.arange(n)[:, None] < n // 2, [0.6, 0.0], [0.0, 0.3])
    pts = centre + rng.normal(0.0, 0.2, (n, 2))
    norms = np.linalg.norm(pts, axis=1, keepdims=True)
    pts = np.where(norms > 0.9, pts * 0.9 / norms, pts)  # inside the ball
    return pts.reshape(*shape, 2).astype(np.float32)


def test_metric_switches_kmeans_distance_for_ball_embeddings(
    trained, tmp_path, capsys, monkeypatch
):
    """--metric euclidean: Euclidean means and nearest-centroid labels of the ball coordinates;
    --metric auto: Fréchet means and Poincaré-nearest labels (references computed here)."""
    from hypsegcli import pipeline
    from hypsegcli.kmeans import frechet_mean, poincare_pdist2

    image = trained / "data" / "images" / "case_000.nii.gz"
    feats = _ball_features(io.read_volume(image).data.shape)
    monkeypatch.setattr(pipeline, "embed_one", lambda *a, **k: (feats, True))
    flat = feats.reshape(-1, 2).astype(np.float64)
    raw = ["--smooth", "0", "--snap", "0", "--mrf", "0", "--nest", "0"]
    base = ["--quiet", "cluster", image, "-m", trained / "model.pt", "--k", "2", *raw]
    centers, assigned = {}, {}
    for metric in ("euclidean", "auto"):
        out = tmp_path / metric
        code, _, err = run([*base, "-o", out, "--metric", metric], capsys)
        assert code == 0, err
        doc = json.loads((out / "case_000.centroids.json").read_text())
        assert doc["header"]["geometry"] == ("euclidean" if metric == "euclidean" else "poincare")
        record = json.loads((out / "hypseg-runs.jsonl").read_text().splitlines()[-1])
        assert record["config"]["metric"] == metric
        c = np.asarray(doc["sets"][0]["centers"], dtype=np.float64)
        labels = io.read_volume(out / "case_000_k2.nii.gz").data.reshape(-1)
        if metric == "euclidean":
            d2 = ((flat[:, None] - c[None]) ** 2).sum(-1)
            means = [flat[labels == j].mean(0) for j in range(2)]
        else:
            d2 = poincare_pdist2(flat, c)
            means = [frechet_mean(flat[labels == j]) for j in range(2)]
        np.testing.assert_array_equal(labels, d2.argmin(1))
        np.testing.assert_allclose(np.asarray(means), c, atol=1e-3)  # k-means tol
        centers[metric], assigned[metric] = c, labels
    # the two geometries give different centroids and boundaries here (not a no-op switch)
    assert np.abs(centers["euclidean"] - centers["auto"]).max() > 0.005
    assert (assigned["euclidean"] != assigned["auto"]).sum() > 20
    # centroids fitted with one metric are refused by a run with the other
    code, _, err = run(
        [*base, "-o", tmp_path / "p", "--fit-on", "pooled", "--metric", "euclidean"], capsys
    )
    assert code == 0, err
    code, _, err = run(
        [*base, "-o", tmp_path / "q", "--centroids", tmp_path / "p" / "centroids.json"], capsys
    )
    assert code == 2 and "euclidean distances, this run uses poincare" in err
    assert err.count("\n") == 1


def test_metric_bad_values(trained, tmp_path, capsys):
    images = trained / "data" / "images"
    intensity = ["cluster", images, "--features", "intensity", "--k", "2", "-o", tmp_path]
    code, _, err = run([*intensity, "--metric", "poincare"], capsys)
    assert code == 2 and "--metric poincare needs a hyperbolic model" in err
    assert err.count("\n") == 1
    model = ["cluster", images, "-m", trained / "model.pt", "--k", "2", "-o", tmp_path]
    code, _, err = run([*model, "--metric", "cosine"], capsys)
    assert code == 2 and "--metric 'cosine'" in err and err.count("\n") == 1


def test_inputs_with_the_same_case_name_are_refused(trained, tmp_path, capsys):
    """Two inputs named ``case`` in different folders (or with different suffixes) would write the
    same output files: refused before anything is written, naming both files."""
    images = trained / "data" / "images"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / "case.nii.gz", tmp_path / "b" / "case.nii.gz"
    first.write_bytes((images / "case_000.nii.gz").read_bytes())
    second.write_bytes((images / "case_001.nii.gz").read_bytes())
    seg = tmp_path / "seg"
    code, out, err = run(
        ["cluster", tmp_path / "a", tmp_path / "b", "--features", "intensity", "--k", "2"]
        + ["-o", seg],
        capsys,
    )
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert f"{first} and {second} have the same case name 'case'" in err
    assert not seg.exists() or not any(seg.iterdir())
    emb = tmp_path / "emb"
    code, _, err = run(
        ["embed", tmp_path / "a", tmp_path / "b", "-m", trained / "model.pt", "-o", emb], capsys
    )
    assert code == 2 and "same case name 'case'" in err and not emb.exists()
    # the same name with another suffix in one folder: the label and .npy names collide too
    img = nib.load(images / "case_000.nii.gz")
    nib.save(img, tmp_path / "a" / "case.nii")
    code, _, err = run(
        ["cluster", tmp_path / "a", "--features", "intensity", "--k", "2", "-o", seg], capsys
    )
    assert code == 2 and "same case name 'case'" in err
    # evaluate: two ground truths for one case are ambiguous
    truth = tmp_path / "truth"
    truth.mkdir()
    lab = nib.load(trained / "data" / "labels" / "case_000_L1.nii.gz")
    nib.save(lab, truth / "case_000_L1.nii.gz")
    nib.save(lab, truth / "case_000_L1.nii")
    pred = tmp_path / "pred"
    pred.mkdir()
    nib.save(lab, pred / "case_000_k2.nii.gz")
    code, _, err = run(["evaluate", pred, truth], capsys)
    assert code == 2 and "same case name 'case_000_L1'" in err and "ambiguous" in err


def test_an_input_replaced_under_the_same_name_is_clustered_again(trained, tmp_path, capsys):
    """Skipping complete outputs also checks that the input is the one they were made from
    (size and modification time), so replacing a file does not leave stale labels behind."""
    images = trained / "data" / "images"
    src = tmp_path / "in" / "case.nii.gz"
    src.parent.mkdir()
    src.write_bytes((images / "case_000.nii.gz").read_bytes())
    seg = tmp_path / "seg"
    argv = ["--quiet", "cluster", src.parent, "--features", "intensity", "--k", "2", "-o", seg]
    code, out, err = run([*argv, "--json"], capsys)
    assert code == 0 and json.loads(out)["done"] == 1, err
    code, out, err = run([*argv, "--json"], capsys)
    assert json.loads(out)["skipped"] == 1
    # another volume under the same name, with another affine
    img = nib.load(images / "case_001.nii.gz")
    moved = img.affine.copy()
    moved[:3, 3] += 10.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), moved, img.header), src)
    code, out, err = run([*argv, "--json"], capsys)
    assert code == 0 and json.loads(out)["done"] == 1, err
    fresh = tmp_path / "fresh"
    code, _, err = run([*argv[:-1], fresh], capsys)
    assert code == 0, err
    again, ref = nib.load(seg / "case_k2.nii.gz"), nib.load(fresh / "case_k2.nii.gz")
    np.testing.assert_array_equal(np.asarray(again.dataobj), np.asarray(ref.dataobj))
    np.testing.assert_array_equal(again.affine, moved)
    record = json.loads((seg / "case.centroids.json").read_text())
    assert record["source"]["size"] == src.stat().st_size


def test_a_model_file_with_the_same_weights_keeps_the_outputs(trained, tmp_path, capsys):
    """Outputs are reused for a model file whose bytes differ (another recorded wall time)
    but whose weights, configuration and normalisation are the same; other weights redo them,
    and a record of an earlier version (no content hash) still needs the same file."""
    import torch

    images = trained / "data" / "images" / "case_000.nii.gz"
    seg = tmp_path / "seg"
    doc = torch.load(trained / "model.pt", weights_only=True)

    def cluster(model):
        argv = ["--quiet", "cluster", images, "-m", model, "--k", "2", "-o", seg, "--json"]
        code, out, err = run([*argv, "--patch-size", "9", "--threads", "2"], capsys)
        assert code == 0, err
        return json.loads(out)

    assert cluster(trained / "model.pt")["done"] == 1
    resaved = tmp_path / "resaved.pt"
    torch.save({**doc, "elapsed_seconds": doc["elapsed_seconds"] + 1.0}, resaved)
    assert resaved.read_bytes() != (trained / "model.pt").read_bytes()
    assert cluster(resaved)["skipped"] == 1
    record = seg / "case_000.centroids.json"
    old = json.loads(record.read_text())
    old["header"].pop("model_content_sha256")  # as an earlier version wrote it
    record.write_text(json.dumps(old))
    assert cluster(resaved)["done"] == 1  # another file, no content hash to compare
    assert cluster(resaved)["skipped"] == 1
    other = tmp_path / "other.pt"
    weights = {k: v + 0.01 if v.is_floating_point() else v for k, v in doc["state_dict"].items()}
    torch.save({**doc, "state_dict": weights}, other)
    assert cluster(other)["done"] == 1


def test_an_input_whose_header_changed_is_clustered_again(tmp_path, capsys):
    """The same voxels under a corrected header (NIfTI affine, MRC voxel size) are not the
    input the outputs were made from: they copy the header, so the case is redone. A copy
    with the same voxels and header (another modification time) is still skipped."""
    data = np.random.default_rng(0).normal(size=(12, 13, 14)).astype(np.float32)
    inp = tmp_path / "in"
    inp.mkdir()
    with mrcfile.new(str(inp / "a.mrc")) as mrc:
        mrc.set_data(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
        mrc.voxel_size = (1.5, 2.0, 3.0)
    nib.save(nib.Nifti1Image(data, np.eye(4)), inp / "b.nii.gz")
    seg = tmp_path / "seg"
    argv = ["--quiet", "cluster", inp, "--features", "intensity", "--k", "2", "-o", seg, "--json"]
    code, out, err = run(argv, capsys)
    assert code == 0 and json.loads(out)["done"] == 2, err
    # the same bytes written again (new modification time): skipped after reading
    for name in ("a.mrc", "b.nii.gz"):
        path = inp / name
        blob = path.read_bytes()
        path.unlink()
        path.write_bytes(blob)
    code, out, err = run(argv, capsys)
    assert code == 0 and json.loads(out)["skipped"] == 2, err
    with mrcfile.open(str(inp / "a.mrc"), mode="r+") as mrc:
        mrc.voxel_size = (7.0, 7.0, 7.0)
    nib.save(nib.Nifti1Image(data, np.diag([3.0, 3.0, 3.0, 1.0])), inp / "b.nii.gz")
    code, out, err = run(argv, capsys)
    assert code == 0 and json.loads(out)["done"] == 2, err
    with mrcfile.open(str(seg / "a_k2.mrc")) as mrc:
        assert tuple(float(v) for v in mrc.voxel_size.tolist()) == (7.0, 7.0, 7.0)
    np.testing.assert_array_equal(
        nib.load(seg / "b_k2.nii.gz").affine, np.diag([3.0, 3.0, 3.0, 1.0])
    )
    # a header change that leaves the geometry alone (descrip) is copied too
    img = nib.load(inp / "b.nii.gz")
    img.header["descrip"] = b"re-exported"
    nib.save(nib.Nifti1Image(data, img.affine, img.header), inp / "b.nii.gz")
    code, out, err = run(argv, capsys)
    assert code == 0 and json.loads(out)["done"] == 1, err
    # a record of an older version (no geometry hash) is redone when the file's stamp moved
    record_path = seg / "a.centroids.json"
    record = json.loads(record_path.read_text())
    del record["source"]["geometry_sha256"]
    record["source"]["mtime_ns"] -= 1
    record_path.write_text(json.dumps(record))
    code, out, err = run(argv, capsys)
    assert code == 0 and json.loads(out)["done"] == 1, err


def _one_noise_volume(tmp_path, seed):
    """``in/b.nii.gz`` of noise, and the argv that clusters it by intensity into ``seg``."""
    data = np.random.default_rng(seed).normal(size=(12, 13, 14)).astype(np.float32)
    inp = tmp_path / "in"
    inp.mkdir()
    nib.save(nib.Nifti1Image(data, np.eye(4)), inp / "b.nii.gz")
    seg = tmp_path / "seg"
    return (
        data,
        inp,
        seg,
        ["--quiet", "cluster", inp, "--features", "intensity", "-o", seg, "--json"],
    )


def test_sets_of_a_record_from_before_the_header_hash_are_kept_for_an_untouched_input(
    tmp_path, capsys
):
    """A record of an older version has no geometry hash: with the file's size and
    modification time unchanged its sets of other k are still kept."""
    _, _, seg, base = _one_noise_volume(tmp_path, 2)
    assert run([*base, "--k", "2"], capsys)[0] == 0
    path = seg / "b.centroids.json"
    record = json.loads(path.read_text())
    del record["source"]["geometry_sha256"]
    path.write_text(json.dumps(record))
    assert run([*base, "--k", "3"], capsys)[0] == 0
    assert [s["k"] for s in json.loads(path.read_text())["sets"]] == [2, 3]


def test_a_kept_set_of_another_k_is_dropped_when_the_header_changed(tmp_path, capsys):
    """Sets of other k kept in the case record must have been made under the same header."""
    data, inp, seg, base = _one_noise_volume(tmp_path, 1)
    code, out, err = run([*base, "--k", "2"], capsys)
    assert code == 0, err
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), inp / "b.nii.gz")
    code, out, err = run([*base, "--k", "3"], capsys)
    assert code == 0, err
    record = json.loads((seg / "b.centroids.json").read_text())
    assert [s["k"] for s in record["sets"]] == [3]


def test_snap_and_mrf_work_on_a_mostly_empty_volume_a_zscore_model_embeds(
    trained, tmp_path, capsys
):
    """--snap and --mrf scale intensities between percentiles 1 and 99 whatever the model's
    normalisation; where those are equal (a cube in a volume of 99.6% zeros) they fall back
    to min-max, where they had failed the volume with advice about train --norm-range."""
    from clitools import TINY_TRAIN

    model = tmp_path / "z.pt"
    train = ["--quiet", "train", trained / "data" / "images", "-o", model, "--steps", "2"]
    code, _, err = run([*train, *TINY_TRAIN, "--norm", "zscore"], capsys)
    assert code == 0, err
    data = np.zeros((20, 20, 20), np.float32)
    data[8:11, 8:11, 8:11] = 5.0
    src = tmp_path / "sparse.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), src)
    argv = ["--quiet", "cluster", src, "-m", model, "--k", "2", "-o", tmp_path / "seg"]
    code, _, err = run([*argv, "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 0, err
    assert (tmp_path / "seg" / "sparse_k2.nii.gz").is_file()


def test_a_pooled_sample_smaller_than_k_blames_fit_samples(trained, tmp_path, capsys):
    """--fit-samples 4 over 3 volumes samples 1 voxel from each: the message says so
    (it had said the volumes held 3 voxels in all)."""
    argv = ["cluster", trained / "data" / "images", "--features", "intensity", "--k", "4"]
    argv += ["-o", tmp_path / "seg", "--fit-on", "pooled", "--fit-samples", "4"]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert "3 voxels sampled from 3 volume(s) (1 per volume, --fit-samples 4 over 3" in err


def test_a_pooled_fit_on_other_inputs_redoes_every_volume(trained, tmp_path, capsys):
    """The pooled centroids depend on which volumes they were drawn from: a rerun of the
    same output folder on fewer inputs redoes them (review: it skipped all three and kept
    labels made with the four-volume fit)."""
    images = trained / "data" / "images"
    cases = sorted(images.glob("case_*.nii.gz"))
    assert len(cases) >= 3
    base = ["--quiet", "cluster", "--features", "intensity", "--k", "3", "--fit-on", "pooled"]
    code, out, err = run([*base, *cases, "-o", tmp_path / "po", "--json"], capsys)
    assert code == 0 and json.loads(out)["done"] == len(cases), err
    code, out, err = run([*base, *cases[:-1], "-o", tmp_path / "po", "--json"], capsys)
    assert code == 0 and json.loads(out)["done"] == len(cases) - 1, err
    code, out, err = run([*base, *cases[:-1], "-o", tmp_path / "fresh"], capsys)
    assert code == 0, err
    for path in cases[:-1]:
        name = path.name.replace(".nii.gz", "_k3.nii.gz")
        np.testing.assert_array_equal(
            np.asarray(nib.load(tmp_path / "po" / name).dataobj),
            np.asarray(nib.load(tmp_path / "fresh" / name).dataobj),
        )
    code, out, err = run([*base, *cases[:-1], "-o", tmp_path / "po", "--json"], capsys)
    assert json.loads(out)["skipped"] == len(cases) - 1


def test_another_file_with_the_same_size_and_time_is_read_before_skipping(tmp_path, capsys):
    """Archives keep sizes and modification times: another file with both equal to the
    recorded input's is compared by its voxels (review: it was skipped, stale labels kept)."""
    rng = np.random.default_rng(3)
    raw, alt = tmp_path / "raw", tmp_path / "alt"
    raw.mkdir()
    alt.mkdir()
    for folder in (raw, alt):
        data = rng.normal(size=(12, 11, 10)).astype(np.float32)
        nib.save(nib.Nifti1Image(data, np.eye(4)), folder / "b.nii")  # uncompressed: equal sizes
    st = (raw / "b.nii").stat()
    os.utime(alt / "b.nii", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (alt / "b.nii").stat().st_size == st.st_size
    seg = tmp_path / "seg"
    base = ["--quiet", "cluster", "--features", "intensity", "--k", "2", "-o", seg, "--json"]
    code, out, err = run([*base, raw], capsys)
    assert code == 0 and json.loads(out)["done"] == 1, err
    code, out, err = run([*base, alt], capsys)
    assert code == 0 and json.loads(out)["done"] == 1, err
    record = json.loads((seg / "b.centroids.json").read_text())
    assert record["volume"] == str(alt / "b.nii")
    # the same file again, untouched: skipped without reading it; a copy with equal voxels
    # and header: read, and skipped
    code, out, err = run([*base, alt], capsys)
    assert json.loads(out)["skipped"] == 1
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "b.nii").write_bytes((alt / "b.nii").read_bytes())
    code, out, err = run([*base, copy], capsys)
    assert json.loads(out)["skipped"] == 1


def test_a_cut_or_changed_output_file_is_written_again(tmp_path, capsys):
    """The case record keeps the size of every file written: a label volume or preview cut
    short (a full disk, a copy interrupted) is found and the case done again (review: it was
    skipped forever, and evaluate then failed on it)."""
    _, _, seg, base = _one_noise_volume(tmp_path, 2)
    argv = [*base, "--k", "2", "--k", "3", "--preview"]
    code, out, err = run(argv, capsys)
    assert code == 0 and json.loads(out)["done"] == 1, err
    record = json.loads((seg / "b.centroids.json").read_text())
    for s in record["sets"]:
        assert s["bytes"] == (seg / f"b_k{s['k']}.nii.gz").stat().st_size
        assert s["preview_bytes"] == (seg / f"b_k{s['k']}.png").stat().st_size
    whole = (seg / "b_k3.nii.gz").read_bytes()
    for name in ("b_k3.nii.gz", "b_k2.png"):
        target = seg / name
        good = target.read_bytes()
        target.write_bytes(good[:100])
        code, out, err = run(argv, capsys)
        assert code == 0 and json.loads(out)["done"] == 1, err
        assert target.read_bytes() == good
    assert (seg / "b_k3.nii.gz").read_bytes() == whole
    code, out, err = run(argv, capsys)
    assert json.loads(out)["skipped"] == 1


def test_embed_does_not_overwrite_a_json_it_did_not_write(trained, tmp_path, capsys):
    """embed -o into a BIDS folder: <case>.json is the input's sidecar; the volume fails
    with a message naming it and the sidecar is kept (review: it was replaced)."""
    bids = tmp_path / "anat"
    bids.mkdir()
    src = trained / "data" / "images" / "case_000.nii.gz"
    (bids / "sub-01_T1w.nii.gz").write_bytes(src.read_bytes())
    sidecar = bids / "sub-01_T1w.json"
    sidecar.write_text('{"RepetitionTime": 2.3}')
    base = ["--quiet", "embed", bids, "-m", trained / "model.pt", "--cache-dir", tmp_path / "c"]
    code, _, err = run([*base, "-o", bids], capsys)  # the input folder: refused up front
    assert code == 2 and "is also an input folder" in err
    # the volume named as a file: its folder is no input folder, the sidecar still counts
    code, _, err = run([*base[:2], bids / "sub-01_T1w.nii.gz", *base[3:], "-o", bids], capsys)
    assert code == 2
    assert f"{sidecar}: exists and is not a hypseg record" in err
    assert sidecar.read_text() == '{"RepetitionTime": 2.3}'
    assert not (bids / "sub-01_T1w.npy").exists()
    # our own record, even damaged beside its array, is replaced as before
    out = tmp_path / "emb"
    assert run([*base, "-o", out], capsys)[0] == 0
    (out / "sub-01_T1w.json").write_text("{cut")
    code, _, err = run([*base, "-o", out], capsys)
    assert code == 0, err
    assert json.loads((out / "sub-01_T1w.json").read_text())["format"] == "hypseg-embedding"


def test_a_preview_of_replaced_labels_is_not_taken_as_current(trained, tmp_path, capsys):
    """--preview with --smooth 0, then the defaults without --preview (k = 2 replaced),
    then the defaults with --preview: the last run took the --smooth 0 picture as
    complete (review)."""
    images, model = trained / "data" / "images" / "case_000.nii.gz", trained / "model.pt"
    seg = tmp_path / "seg"
    base = ["-q", "cluster", images, "-m", model, "--k", "2", "-o", seg, "--json"]
    assert run([*base, "--preview", "--smooth", "0"], capsys)[0] == 0
    png = seg / "case_000_k2.png"
    first = png.read_bytes()
    code, out, err = run(base, capsys)
    assert code == 0 and json.loads(out)["done"] == 1, err
    assert not png.exists()  # it showed the labels just replaced
    code, out, err = run([*base, "--preview"], capsys)
    assert code == 0 and json.loads(out)["done"] == 1, err
    fresh = tmp_path / "fresh"
    assert run([*base[:-2], str(fresh), "--json", "--preview"], capsys)[0] == 0
    assert png.read_bytes() == (fresh / "case_000_k2.png").read_bytes() != first


def _train_on_voxel_sizes(tmp_path, capsys, training, tomo_voxel):
    """Train a tiny model on 20^3 NIfTI volumes of voxel size 1x1xz in ``unit`` (one per
    ``(z, unit)`` of ``training``) and write a 20^3 MRC tomogram of voxel size
    ``tomo_voxel`` Å; returns (training folder, tomogram folder, model, train's stderr)."""
    import mrcfile
    from clitools import TINY_TRAIN

    rng = np.random.default_rng(0)
    train_dir, tomo = tmp_path / "train", tmp_path / "tomo"
    train_dir.mkdir()
    tomo.mkdir()
    for i, (z, unit) in enumerate(training):
        image = nib.Nifti1Image(rng.random((20, 20, 20)).astype(np.float32), np.diag([1, 1, z, 1]))
        image.header.set_xyzt_units(unit)
        nib.save(image, train_dir / f"s{i}.nii.gz")
    with mrcfile.new(str(tomo / "t.mrc")) as mrc:
        mrc.set_data(rng.random((20, 20, 20)).astype(np.float32))
        mrc.voxel_size = tomo_voxel
    model = tmp_path / "m.pt"
    code, _, err = run(["-q", "train", train_dir, "-o", model, "--steps", "1", *TINY_TRAIN], capsys)
    assert code == 0, err
    return train_dir, tomo, model, err


def test_voxel_sizes_far_from_the_training_ones_are_warned_about(tmp_path, capsys):
    """Patches are in voxels: training on mixed voxel sizes, or segmenting a 13.7 Å tomogram
    with a model of 1 mm MRI, learns or applies another physical scale (review)."""
    import torch

    train_dir, tomo, model, err = _train_on_voxel_sizes(
        tmp_path, capsys, [(1.0, "mm"), (1.0, "mm"), (3.0, "mm")], 13.7
    )
    assert "voxel sizes range over 1x1x1 to 1x1x3 mm: patches are in voxels" in err
    volumes = torch.load(model, weights_only=False)["training_volumes"]
    assert [v["spacing"] for v in volumes] == [[1.0, 1.0, 1.0]] * 2 + [[1.0, 1.0, 3.0]]
    assert {v["unit"] for v in volumes} == {"mm"}
    base = ["-q", "cluster", "-m", model, "--k", "2", "--features", "embedding"]
    code, _, err = run([*base, tomo, "-o", tmp_path / "seg"], capsys)
    assert code == 0, err
    assert (
        f"t.mrc: voxel size 13.7x13.7x13.7 Å, but {model} was trained on 1x1x1 to 1x1x3 mm" in err
    )
    code, _, err = run([*base, train_dir, "-o", tmp_path / "seg2"], capsys)
    assert code == 0 and "voxel size" not in err, err


def test_a_unit_less_training_volume_does_not_hide_another_unit(tmp_path, capsys):
    """Review: one training NIfTI without units made every unit pass (a 1 Å tomogram with a
    model of 1 mm MRI, no warning), and train's range called unit-less sizes mm."""
    train_dir, tomo, model, err = _train_on_voxel_sizes(
        tmp_path, capsys, [(1.0, "mm"), (3.0, "unknown")], 1.0
    )
    assert "voxel sizes range over 1x1x1 to 1x1x3 mm/unknown: patches" in err
    base = ["-q", "cluster", "-m", model, "--k", "2", "--features", "embedding"]
    code, _, err = run([*base, tomo, "-o", tmp_path / "seg"], capsys)
    assert code == 0, err
    assert f"t.mrc: voxel size 1x1x1 Å, but {model} was trained on 1x1x1 to 1x1x3 mm/unknown" in err
    code, _, err = run([*base, train_dir, "-o", tmp_path / "seg2"], capsys)
    assert code == 0 and "voxel size" not in err, err
    # review: an MRC of unknown voxel size (0) was said to be 1x1x1 "voxel", far from mm
    import mrcfile

    with mrcfile.open(str(tomo / "t.mrc"), "r+") as mrc:
        mrc.voxel_size = 0
    code, _, err = run([*base, tomo, "-o", tmp_path / "seg3"], capsys)
    assert code == 0 and "trained on" not in err, err


def test_embed_dry_run_notes_describe_embedding_only(trained, tmp_path, capsys):
    from hypsegcli.batch import EMBED_PLAN_NOTES, PLAN_NOTES

    images, model = trained / "data" / "images", trained / "model.pt"
    code, out, err = run(["embed", images, "-m", model, "--dry-run", "--json"], capsys)
    assert code == 0, err
    notes = json.loads(out)["notes"]
    assert notes == EMBED_PLAN_NOTES and "k-means" not in notes and "--smooth" not in notes
    code, out, err = run(
        ["cluster", images, "-m", model, "--k", "2", "-o", tmp_path / "s", "--dry-run", "--json"],
        capsys,
    )
    assert code == 0 and json.loads(out)["notes"] == PLAN_NOTES, err


def test_a_case_stopped_while_rewritten_keeps_its_sets_for_other_k(tmp_path, capsys):
    """`--k 3 --k 6` stopped (or failed) in a case after an earlier `--k 2 --k 4` run: the
    case's k = 2 and 4 sets were lost from its record (their files still there), so a
    later `--k 2 --k 4` redid it and the records differed from an uninterrupted run's."""
    import json

    from clitools import run

    data = tmp_path / "d"
    assert run(["-q", "synth", data, "--n", "2", "--size", "16"], capsys)[0] == 0
    base = ["-q", "cluster", data / "images", "--features", "intensity"]
    for out in ("a", "b"):
        assert run([*base, "--k", "2", "--k", "4", "-o", tmp_path / out], capsys)[0] == 0
    assert run([*base, "--k", "3", "--k", "6", "-o", tmp_path / "a"], capsys)[0] == 0
    blocker = tmp_path / "b" / "case_001_k6.nii.gz"
    blocker.mkdir()  # case_001 fails at its k = 6 output, after k = 3 is written
    code, _, err = run([*base, "--k", "3", "--k", "6", "-o", tmp_path / "b"], capsys)
    assert code == 1, err
    record = json.loads((tmp_path / "b" / "case_001.centroids.json").read_text())
    assert [s["k"] for s in record["sets"]] == [2, 4]
    blocker.rmdir()
    assert run([*base, "--k", "3", "--k", "6", "-o", tmp_path / "b"], capsys)[0] == 0
    for name in ("case_000.centroids.json", "case_001.centroids.json"):
        a = json.loads((tmp_path / "a" / name).read_text())
        b = json.loads((tmp_path / "b" / name).read_text())
        assert [s["k"] for s in b["sets"]] == [2, 3, 4, 6]
        assert a["sets"] == b["sets"], name
    code, out, _ = run([*base, "--k", "2", "--k", "4", "-o", tmp_path / "b", "--json"], capsys)
    assert code == 0 and json.loads(out)["skipped"] == 2  # nothing redone


def test_a_folder_named_like_a_final_output_is_refused_before_any_work(tmp_path, capsys):
    from clitools import run

    data = tmp_path / "d"
    assert run(["-q", "synth", data, "--n", "2", "--size", "16"], capsys)[0] == 0
    for name in ("centroids.json", "hypseg-runs.jsonl"):
        out = tmp_path / f"o_{name}"
        (out / name).mkdir(parents=True)
        code, _, err = run(
            ["cluster", data / "images", "--features", "intensity", "--k", "2", "-o", out], capsys
        )
        assert code == 2, err
        assert f"{out / name}: is a folder, where cluster -o writes a file of that name" in err
        assert sorted(p.name for p in out.iterdir()) == [name]  # nothing done
    (tmp_path / "ev" / "hypseg-runs.jsonl").mkdir(parents=True)
    code, _, err = run(
        ["evaluate", data / "labels", data / "labels", "--no-hausdorff", "--csv"]
        + [tmp_path / "ev" / "s.csv"],
        capsys,
    )
    assert code == 2 and "is a folder, where evaluate --csv writes" in err, err
    assert not (tmp_path / "ev" / "s.csv").exists()


def test_a_case_redone_after_a_header_change_warns_once(tmp_path, capsys):
    """Review: the check of whether a case is done read the changed input once, the work
    read it again, and every reading warning came twice."""
    import mrcfile

    data = np.random.default_rng(0).normal(size=(9, 8, 10)).astype(np.float32)
    with mrcfile.new(str(tmp_path / "v.mrc")) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = (2.0, 0.0, 4.5)
    argv = ["cluster", tmp_path / "v.mrc", "--features", "intensity", "--k", "2"]
    argv += ["-o", tmp_path / "seg"]
    code, _, err = run(argv, capsys)
    assert code == 0 and err.count("is unknown (0) along some axes") == 1, err
    with mrcfile.open(str(tmp_path / "v.mrc"), "r+") as mrc:
        mrc.header.origin.x = 5.0
    code, _, err = run(argv, capsys)
    assert code == 0 and "1 volume(s) done" in err, err
    assert err.count("is unknown (0) along some axes") == 1, err


def test_a_second_pooled_fit_into_one_folder_is_named(tmp_path, capsys):
    """Review: a pooled fit of some volumes into a folder holding an earlier pooled fit's
    labels of others left two sets per k in centroids.json, silently."""
    (tmp_path / "in").mkdir()
    for i in range(3):
        data = np.random.default_rng(i).normal(size=(10, 9, 8)).astype(np.float32)
        data[:5] += 3.0
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "in" / f"v{i}.nii.gz")
    base = ["cluster", "--features", "intensity", "--k", "2", "--k", "3", "--fit-on", "pooled"]
    base += ["-o", tmp_path / "seg"]
    code, _, err = run([*base, tmp_path / "in"], capsys)
    assert code == 0 and "different pooled" not in err, err
    code, _, err = run([*base, tmp_path / "in"], capsys)  # all skipped: one set still
    assert code == 0 and "different pooled" not in err, err
    code, _, err = run([*base, tmp_path / "in" / "v0.nii.gz", "--seed", "5"], capsys)
    assert code == 0, err
    assert (
        "centroids.json: the cases here were labelled by different pooled (or applied) "
        "centroid sets for k=2, 3 (v0 | v1, v2)" in err
    )
    sets = json.loads((tmp_path / "seg" / "centroids.json").read_text())["sets"]
    assert sorted(s["k"] for s in sets) == [2, 2, 3, 3]
