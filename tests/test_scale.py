"""Bounded-memory paths for big volumes: chunked results equal the unchunked ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hypsegcli import embedding, kmeans, pipeline
from hypsegcli.config import ModelConfig
from hypsegcli.errors import BadInputError
from hypsegcli.kmeans import PoincareKMeans, assign_chunk_rows
from hypsegcli.model import HypVAE


def ball_points(n: int, d: int = 2, seed: int = 0, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    x *= (rng.uniform(0.0, 0.95, n) / np.linalg.norm(x, axis=1))[:, None]
    return x.astype(dtype)


@pytest.fixture
def small_chunks(monkeypatch):
    """Assignment chunks of a few rows, so small inputs span many chunks."""
    monkeypatch.setattr(kmeans, "_ASSIGN_BLOCK", 64)
    monkeypatch.setattr(kmeans, "_MIN_ASSIGN_ROWS", 4)
    monkeypatch.setattr(kmeans, "_CHECK_BLOCK", 6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_predict_in_small_chunks_equals_one_chunk(dtype, monkeypatch):
    x = ball_points(3001, seed=1, dtype=dtype)
    km = PoincareKMeans(5, n_init=1, random_state=0, fit_samples=500).fit(x)
    whole = km.predict(x)
    np.testing.assert_array_equal(whole, km.labels_)
    monkeypatch.setattr(kmeans, "_ASSIGN_BLOCK", 64)
    monkeypatch.setattr(kmeans, "_MIN_ASSIGN_ROWS", 4)
    monkeypatch.setattr(kmeans, "_CHECK_BLOCK", 6)
    assert assign_chunk_rows(5) == 12
    np.testing.assert_array_equal(km.predict(x), whole)


def test_input_check_in_chunks_counts_all_bad_points(small_chunks):
    x = ball_points(50, seed=2, dtype=np.float64)
    x[[3, 17, 40]] = [[0.9, 0.9], [1.5, 0.0], [0.0, -2.0]]
    with pytest.raises(
        BadInputError, match=r"has 3 of 50 points outside .* max c\*\|\|x\|\|\^2 = 4\b"
    ):
        PoincareKMeans(2).fit(x)
    x[[5, 44]] = np.nan
    with pytest.raises(BadInputError, match="contains 4 non-finite values"):
        PoincareKMeans(2).fit(x)


def test_clusterer_predict_chunked_equals_unchunked():
    x = ball_points(5000, seed=3)
    for kind in ("ball", "line"):
        clus = pipeline._Clusterer(
            kind, curvature=1.0, n_init=1, fit_samples=2000, seed=0, device="cpu"
        )
        for k in (2, 3, 8):
            centers = clus.fit(x, k)
            if kind == "ball":
                km = PoincareKMeans(k)
                km.cluster_centers_ = centers
                ref = km.predict(x)
            else:
                ref = ((x[:, None, :].astype(np.float64) - centers[None]) ** 2).sum(-1).argmin(1)
            for block in (None, 1, 777, 1 << 30):
                got = clus.predict(x, centers, block=block)
                assert got.dtype == np.uint8
                np.testing.assert_array_equal(got, ref)


def test_clusterer_predict_reads_a_memmap(tmp_path):
    x = ball_points(5000, seed=4)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    clus = pipeline._Clusterer(
        "ball", curvature=1.0, n_init=1, fit_samples=1000, seed=0, device=None
    )
    centers = clus.fit(mm, 4)
    np.testing.assert_array_equal(clus.predict(mm, centers, block=100), clus.predict(x, centers))


@pytest.mark.parametrize("geometry", ["hyperbolic", "euclidean"])
def test_upsample_in_slabs_equals_all_at_once(geometry):
    torch.manual_seed(0)
    model = HypVAE(ModelConfig(geometry=geometry))
    shape = (13, 9, 7)
    axes = [embedding._lattice(n, 3) for n in shape]
    coarse = ball_points(int(np.prod([len(a) for a in axes])), seed=5)
    coarse = coarse.reshape(*(len(a) for a in axes), 2)
    whole = embedding._upsample(model, coarse, axes, shape, block=10**9)
    for block in (1, 9 * 7 * 2, 100):
        np.testing.assert_array_equal(
            embedding._upsample(model, coarse, axes, shape, block=block), whole
        )
    np.testing.assert_array_equal(whole[np.ix_(*axes)], coarse)


def test_embed_volume_at_stride_does_not_depend_on_the_slab_size(monkeypatch):
    torch.manual_seed(1)
    model = HypVAE(ModelConfig())
    vol = np.random.default_rng(6).random((11, 10, 9), dtype=np.float32)
    whole = embedding.embed_volume(model, vol, stride=2)
    monkeypatch.setattr(embedding, "UPSAMPLE_BLOCK", 90)
    # the default argument is bound at definition: pass the small block explicitly
    real = embedding._upsample
    monkeypatch.setattr(
        embedding, "_upsample", lambda *a, **k: real(*a, **{**k, "block": embedding.UPSAMPLE_BLOCK})
    )
    np.testing.assert_array_equal(embedding.embed_volume(model, vol, stride=2), whole)


def test_cluster_outputs_do_not_depend_on_the_predict_block(tmp_path, monkeypatch):
    from hypsegcli import io

    rng = np.random.default_rng(7)
    vol = rng.random((12, 11, 10), dtype=np.float32)
    src = tmp_path / "v.nii.gz"
    io.write_volume(src, vol, io.VolumeGeometry.default(vol.shape))
    outs = {}
    for name, block in (("whole", 1 << 22), ("chunked", 5)):
        monkeypatch.setattr(pipeline, "PREDICT_BLOCK", block)
        pipeline.cluster([src], tmp_path / name, ks=[2, 4], features="intensity", seed=0)
        outs[name] = [
            np.asarray(io.read_volume(tmp_path / name / f"v_k{k}.nii.gz").data) for k in (2, 4)
        ]
    for a, b in zip(outs["whole"], outs["chunked"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_embedding_cluster_outputs_do_not_depend_on_chunks(tmp_path, monkeypatch):
    """Hyperbolic k-means on cached (memory-mapped) embeddings: same labels in tiny chunks."""
    from hypsegcli import io
    from hypsegcli.cli import main

    with pytest.raises(SystemExit):
        main(
            ["--quiet", "synth", str(tmp_path / "data"), "--n", "1", "--size", "18", "--seed", "3"]
        )
    with pytest.raises(SystemExit) as info:
        main(
            ["--quiet", "train", str(tmp_path / "data" / "images"), "-o", str(tmp_path / "m.pt")]
            + ["--steps", "1", "--patch-size", "9", "--r-min", "6", "--r-max", "10"]
            + ["--batch-size", "2", "--threads", "2"]
        )
    assert info.value.code == 0
    src = tmp_path / "data" / "images" / "case_000.nii.gz"
    cache = tmp_path / "cache"
    outs = {}
    for name, block in (("whole", 1 << 22), ("chunked", 100)):
        monkeypatch.setattr(pipeline, "PREDICT_BLOCK", block)
        if name == "chunked":
            monkeypatch.setattr(kmeans, "_ASSIGN_BLOCK", 64)
            monkeypatch.setattr(kmeans, "_MIN_ASSIGN_ROWS", 4)
            monkeypatch.setattr(kmeans, "_CHECK_BLOCK", 6)
        summary = pipeline.cluster(
            [src],
            tmp_path / name,
            ks=[2, 4],
            model_path=tmp_path / "m.pt",
            cache_dir=cache,
            patch_size=9,  # = the model's m: one phase grid, fast
            n_init=1,
            device="cpu",
        )
        assert summary["computed"] == (1 if name == "whole" else 0)  # 2nd run: memmapped cache
        outs[name] = [
            np.asarray(io.read_volume(tmp_path / name / f"case_000_k{k}.nii.gz").data)
            for k in (2, 4)
        ]
    for a, b in zip(outs["whole"], outs["chunked"], strict=True):
        np.testing.assert_array_equal(a, b)
