"""Tests for hypsegcli.embedding: the fast dense path against the per-patch reference."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from hypsegcli import embedding, geometry
from hypsegcli.config import ModelConfig
from hypsegcli.embedding import embed_reference, embed_volume, flops_per_voxel, padding_margin
from hypsegcli.errors import BadInputError
from hypsegcli.model import HypVAE
from hypsegcli.sampling import sample_patches

# Small models. m = 10 with four 3-kernels ends in S = 2 (like the default model);
# m = 10 with two ends in S = 6 (head kernel larger than the readout step);
# m = 6 and m = 8 with two end in S = 2 and 4.
DEEP10 = {"patch_size": 10, "channels": (4, 4, 8, 8), "kernels": (3, 3, 3, 3), "paddings": (0,) * 4}
SHALLOW10 = {"patch_size": 10, "channels": (4, 8), "kernels": (3, 3), "paddings": (0, 0)}
SIX = {"patch_size": 6, "channels": (4, 8), "kernels": (3, 3), "paddings": (0, 0)}
EIGHT = {"patch_size": 8, "channels": (4, 8), "kernels": (3, 3), "paddings": (0, 0)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is faster and immune to oversubscription when other
    jobs share the two cores (OpenMP barriers spin badly then)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(seed: int = 0, *, mu_gain: float = 10.0, **kw) -> HypVAE:
    """Random model; ``mu_gain`` scales the mean head so that μ spreads over the ball
    (default initialisation keeps ‖μ‖ ~ 0.05, where expmap0 is nearly the identity)."""
    cfg = ModelConfig(hidden=16, **kw)
    with torch.random.fork_rng():  # module initialisation draws from the global RNG
        torch.manual_seed(seed)
        model = HypVAE(cfg)
    with torch.no_grad():
        model.enc_mu.weight.mul_(mu_gain)
    return model


def _volume(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to max |b|."""
    return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------ fast == reference
CASES = [
    # (p, model, geometry, volume shape)
    (5, DEEP10, "hyperbolic", (9, 12, 11)),  # q = 2, S = 2 (the default layout)
    (5, SHALLOW10, "euclidean", (8, 7, 10)),  # q = 2, head kernel 6 > step 2
    (3, SIX, "hyperbolic", (10, 9, 8)),  # q = 2
    (4, EIGHT, "euclidean", (9, 12, 11)),  # even p, q = 2
    (4, EIGHT, "hyperbolic", (8, 8, 7)),  # even p, q = 2
    (3, SHALLOW10, "hyperbolic", (9, 8, 7)),  # q = 10/3: 3 phases, windows apart
    (5, SIX, "euclidean", (8, 9, 10)),  # q = 6/5: 5 phases
    (6, SHALLOW10, "hyperbolic", (8, 7, 9)),  # q = 5/3: 3 phases, windows overlap (dense)
    (2.5, DEEP10, "hyperbolic", (6, 7, 5)),  # q = 4, fractional p
    (10, SHALLOW10, "euclidean", (5, 6, 7)),  # q = 1
]


@pytest.mark.parametrize(("p", "arch", "geom", "shape"), CASES)
def test_fast_path_matches_reference(p, arch, geom, shape):
    model = _model(seed=int(p * 10) + len(shape), geometry=geom, **arch)
    vol = _volume(shape, seed=int(p * 7))
    ref = embed_reference(model, vol, patch_size=p, batch=500)
    fast = embed_volume(model, vol, patch_size=p)
    assert fast.shape == (*shape, 2) and fast.dtype == np.float32
    assert _rel_err(fast, ref) < 1e-4
    # per element too, with a floor of 1e-3 max|μ|
    floor = 1e-3 * np.abs(ref).max()
    assert (np.abs(fast - ref) / np.maximum(np.abs(ref), floor)).max() < 1e-3


def test_float64_model():
    """A float64 model runs in float64 (public conv ops); agreement to ~1e-12."""
    model = _model(seed=7, **DEEP10).double()
    vol = _volume((7, 8, 6), seed=8)
    ref = embed_reference(model, vol, patch_size=5)
    fast = embed_volume(model, vol, patch_size=5)
    assert fast.dtype == np.float32  # returned as float32 all the same
    assert _rel_err(fast, ref) < 1e-6


def test_reference_is_sample_patches_plus_encode():
    """The reference at one voxel, rebuilt by hand: reflect padding, patch, encode."""
    p, model = 5, _model(seed=3, **SIX)
    vol = _volume((7, 8, 9), seed=4)
    ref = embed_reference(model, vol, patch_size=p)
    pad = padding_margin(p)
    padded = torch.from_numpy(np.pad(vol, pad, mode="reflect"))
    for v in [(0, 0, 0), (6, 7, 8), (3, 0, 5)]:
        centre = torch.tensor([v], dtype=torch.float64) + pad
        patch = sample_patches(padded, centre, torch.tensor([float(p)]), 6)
        with torch.no_grad():
            mu, _ = model.encode(patch)
        np.testing.assert_allclose(ref[v], mu[0].numpy(), rtol=1e-6, atol=1e-7)


def test_margin_does_not_matter():
    """Reflection is a fixed function of the position: a wider pad gives the same patches."""
    p = 5
    vol = torch.from_numpy(_volume((6, 7, 8), seed=5))
    centres = torch.tensor([[0.0, 0.0, 0.0], [5.0, 6.0, 7.0], [2.0, 3.0, 0.0]], dtype=torch.float64)
    sides = torch.full((3,), float(p))
    out = []
    for pad in (padding_margin(p), padding_margin(p) + 3):
        padded = torch.from_numpy(np.pad(vol.numpy(), pad, mode="reflect"))
        out.append(sample_patches(padded, centres + pad, sides, 10))
    torch.testing.assert_close(out[0], out[1])


# -------------------------------------------------------------------- tiling
@pytest.mark.parametrize(("p", "arch"), [(5, DEEP10), (3, SHALLOW10), (6, SHALLOW10)])
def test_tiling_invariance(p, arch):
    # float64: tiles of different sizes may use different convolution algorithms
    # (seen on a 16-core machine), whose float32 sums differ by more than 1e-6.
    model = _model(seed=11, **arch).double()
    vol = _volume((9, 8, 7), seed=12)
    small = embed_volume(model, vol, patch_size=p, tile=4)
    whole = embed_volume(model, vol, patch_size=p, tile=1000)
    assert np.abs(small - whole).max() <= 1e-6 * np.abs(whole).max()


def test_progress_reports_every_tile():
    model = _model(seed=13, **SIX)
    calls = []
    embed_volume(
        model,
        _volume((7, 6, 5), seed=14),
        patch_size=3,
        tile=3,
        progress=lambda *a: calls.append(a),
    )
    total = calls[-1][2]
    assert total == 3 * 2 * 2
    assert calls == [("embed", i, total) for i in range(1, total + 1)]


# -------------------------------------------------------------------- stride
def test_stride_keeps_lattice_values_and_covers_the_last_voxel():
    model = _model(seed=21, **DEEP10)
    vol = _volume((9, 12, 8), seed=22)
    full = embed_volume(model, vol, patch_size=5)
    coarse = embed_volume(model, vol, patch_size=5, stride=2)
    assert coarse.shape == full.shape and coarse.dtype == np.float32
    lattice = [np.r_[0:9:2], np.r_[0:12:2, 11], np.r_[0:8:2, 7]]  # last voxel included
    sub = np.ix_(*lattice)
    # same voxels computed by a differently windowed network: float rounding only
    assert np.abs(coarse[sub] - full[sub]).max() <= 1e-6 * np.abs(full).max()


def test_stride_interpolates_in_the_tangent_space():
    c = 0.5
    model = _model(seed=23, mu_gain=30.0, curvature=c, **SIX)
    vol = _volume((7, 6, 5), seed=24)
    out = embed_volume(model, vol, patch_size=3, stride=2)
    t = torch.from_numpy(out).double()
    log = geometry.logmap0(t, c=c)
    # midpoint of an edge: voxel 1 between lattice voxels 0 and 2 along x
    mid = geometry.expmap0((log[0, 2, 4] + log[2, 2, 4]) / 2, c=c)
    np.testing.assert_allclose(out[1, 2, 4], mid.numpy(), rtol=1e-5, atol=1e-6)
    # centre of a cube: the mean of its 8 corners' logmap0
    corners = log[0:3:2, 2:5:2, 0:3:2].reshape(-1, 2).mean(0)
    np.testing.assert_allclose(
        out[1, 3, 1], geometry.expmap0(corners, c=c).numpy(), rtol=1e-5, atol=1e-6
    )
    # the last interval along y is 4..5 (5 = last voxel): nothing in between;
    # along z the lattice is 0, 2, 4: voxel 3 is halfway
    mid_z = geometry.expmap0((log[2, 2, 2] + log[2, 2, 4]) / 2, c=c)
    np.testing.assert_allclose(out[2, 2, 3], mid_z.numpy(), rtol=1e-5, atol=1e-6)
    # and not the straight average of the two points (the test would be void)
    straight = (t[0, 2, 4] + t[2, 2, 4]) / 2
    assert (straight - mid).abs().max() > 1e-3


def test_stride_euclidean_is_plain_trilinear():
    model = _model(seed=25, geometry="euclidean", **SIX)
    vol = _volume((7, 7, 7), seed=26)
    out = embed_volume(model, vol, patch_size=3, stride=3)  # lattice 0, 3, 6
    w = 1 / 3
    expected = (1 - w) * out[0, 3, 6] + w * out[3, 3, 6]
    np.testing.assert_allclose(out[1, 3, 6], expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ output and ball
@pytest.mark.parametrize("c", [1.0, 4.0])
def test_points_strictly_inside_the_ball(c):
    model = _model(seed=31, mu_gain=100.0, curvature=c, **SIX)  # push μ to the edge
    out = embed_volume(model, _volume((6, 7, 8), seed=32), patch_size=3)
    assert out.shape == (6, 7, 8, 2) and out.dtype == np.float32
    norms = np.linalg.norm(out.astype(np.float64), axis=-1)
    assert np.isfinite(out).all()
    assert norms.max() < 1 / math.sqrt(c)
    assert norms.max() > 0.5 / math.sqrt(c)  # the gain did reach the outer ball


def test_model_state_and_device_argument():
    model = _model(seed=33, **SIX)
    model.train()
    out = embed_volume(model, _volume((5, 5, 5), seed=34), patch_size=3, device="cpu")
    assert model.training  # restored
    assert isinstance(out, np.ndarray) and out.shape == (5, 5, 5, 2)


def test_single_voxel_axes():
    model = _model(seed=35, **SIX)
    vol = _volume((1, 4, 1), seed=36)
    ref = embed_reference(model, vol, patch_size=3)
    assert _rel_err(embed_volume(model, vol, patch_size=3), ref) < 1e-4
    strided = embed_volume(model, vol, patch_size=3, stride=2)  # lattice 0, 2, 3 along y
    assert _rel_err(strided[:, [0, 2, 3]], ref[:, [0, 2, 3]]) < 1e-4


# ---------------------------------------------------------- padded-layout model
def test_padded_model_falls_back_to_reference(caplog):
    model = _model(seed=41, patch_size=6, channels=(4, 8), kernels=(3, 3), paddings=(1, 0))
    assert not model.dense_exact
    vol = _volume((6, 5, 7), seed=42)
    with caplog.at_level(logging.WARNING, logger="hypsegcli.embedding"):
        out = embed_volume(model, vol, patch_size=3)
    assert any("pads" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(out, embed_reference(model, vol, patch_size=3))


# ------------------------------------------------------------------- FLOPs
def test_flops_per_voxel_default_model():
    model = HypVAE(ModelConfig())
    trunk = sum(2 * ci * co * 27 for ci, co in [(1, 16), (16, 32), (32, 64), (64, 128)])
    head = 2 * 128 * 300 * 2**3 + 2 * 300 * 2
    assert flops_per_voxel(model, 5) == 2**3 * trunk + head  # q = 2: 8 grid points per voxel
    # stride 2: step 4 > n_4 = 2, so the last layer runs per window (2^3 outputs)
    last = 2 * 64 * 128 * 27
    expected = (4**3 * (trunk - last) + 2**3 * last + head) / 8
    assert flops_per_voxel(model, 5, stride=2) == pytest.approx(expected)
    # q = 10/3: windows never overlap, the count is the per-patch one
    per_layer = [2 * ci * co * 27 for ci, co in [(1, 16), (16, 32), (32, 64), (64, 128)]]
    per_patch = sum(f * n**3 for f, n in zip(per_layer, [8, 6, 4, 2], strict=True))
    assert flops_per_voxel(model, 3) == per_patch + head


# ----------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patch_size": 0}, "patch_size"),
        ({"stride": 0}, "stride"),
        ({"tile": 0}, "tile"),
        ({"device": "nowhere"}, "device"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = _model(seed=51, **SIX)
    with pytest.raises(BadInputError, match=match):
        embed_volume(model, _volume((4, 4, 4), seed=52), **kwargs)


def test_bad_volumes():
    model = _model(seed=53, **SIX)
    with pytest.raises(BadInputError, match="3 dimensions"):
        embed_volume(model, np.zeros((4, 4), np.float32))
    bad = _volume((4, 4, 4), seed=54)
    bad[1, 2, 3] = np.nan
    with pytest.raises(BadInputError, match="non-finite"):
        embed_volume(model, bad)


def test_phases():
    assert embedding._phases(5, 10) == (2, 1)
    assert embedding._phases(3, 10) == (10, 3)
    assert embedding._phases(6, 10) == (5, 3)
    assert embedding._phases(2.5, 10) == (4, 1)
    assert embedding._phases(5.3, 10) is None  # 53 phases: reference path


def test_worker_threads_match_sequential_and_restore_thread_count():
    """With n > 1 torch threads, tiles run in n worker threads of one intra-op thread each."""
    model = _model(seed=61, **DEEP10)
    vol = _volume((9, 8, 10), seed=62)
    sequential = embed_volume(model, vol, patch_size=5, tile=4)  # 1 thread (module fixture)
    calls = []
    torch.set_num_threads(2)
    try:
        pooled = embed_volume(model, vol, patch_size=5, tile=4, progress=lambda *a: calls.append(a))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    np.testing.assert_array_equal(pooled, sequential)
    assert [c[1] for c in calls] == list(range(1, 3 * 2 * 3 + 1)) and calls[-1][2] == 18


def test_failing_progress_stops_the_run():
    model = _model(seed=63, **SIX)

    def boom(stage, done, total):
        raise KeyboardInterrupt

    torch.set_num_threads(2)
    try:
        with pytest.raises(KeyboardInterrupt):
            embed_volume(model, _volume((8, 8, 8), seed=64), patch_size=3, tile=2, progress=boom)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_public_conv_ops_path(monkeypatch):
    """Without oneDNN's fused conv+ReLU the fast path uses conv3d + relu_: same result."""
    monkeypatch.setattr(embedding, "_fused_conv_relu", lambda device, dtype: None)
    model = _model(seed=65, **DEEP10)
    vol = _volume((7, 9, 8), seed=66)
    assert (
        _rel_err(embed_volume(model, vol, patch_size=5), embed_reference(model, vol, patch_size=5))
        < 1e-4
    )


def test_fused_op_is_found_on_cpu():
    """This torch build has it (if a future one does not, the path above is taken)."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN")
    assert embedding._fused_conv_relu(torch.device("cpu"), torch.float32) is not None
    assert embedding._fused_conv_relu(torch.device("cpu"), torch.float64) is None
