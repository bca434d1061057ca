r"""Dense per-voxel embeddings: the encoder's posterior mean for every voxel.

Definition
----------
The embedding of voxel ``v`` at patch size ``p`` is the encoder mean
:math:`\mu` of the patch of side ``p`` centred on ``v``, resampled to the
model's input side ``m = model.cfg.patch_size`` by the patch definition
(design.md; :func:`hypsegcli.sampling.sample_patches`): per axis the volume is
trilinearly interpolated at the cell-centred points

.. math::
    v - p/2 + (j + \tfrac12)\,h, \qquad j = 0..m-1, \qquad h = p/m .

Borders: the volume is padded with numpy ``'reflect'`` padding of
:func:`padding_margin` voxels per side (every sample point plus its right
interpolation neighbour falls inside), so every voxel has a full patch. The
result does not depend on the margin beyond that minimum (reflection is a fixed
function of the position).

Two implementations
-------------------
:func:`embed_reference` builds one patch per voxel with
:func:`~hypsegcli.sampling.sample_patches` and runs :meth:`HypVAE.encode` on
batches of them (the authors' inference, METHOD.md). It is the reference of
the tests.

:func:`embed_volume` is the fast path. Write ``m/p = a/b`` in lowest terms
(``a = m/g``, ``b = p/g``, ``g = gcd(m, p)``; for integer ``q = m/p``, ``b = 1``
and ``a = q``). A voxel ``v = b t + r`` (phase ``r = v mod b``) has its samples at

.. math::
    r - p/2 + (k + \tfrac12)\,h, \qquad k = a t + j, \quad j = 0..m-1,

so all voxels of one phase read consecutive windows, starting every ``a``
points, of ONE grid of spacing ``h`` (the *phase grid*; per axis, ``b`` of them,
``b^3`` in 3D; for integer ``q`` just one). The padded volume is resampled once
per phase grid (separable linear interpolation = trilinear), the encoder trunk
(``model.encoder``, VALID convolutions, hence translation equivariant) runs
densely over it, and the head is evaluated only at the window starts:
``enc_fc`` (kernel ``S``) as a convolution with stride ``a`` — exactly
"evaluate at every a-th start" with the same weights — then ReLU and the 1x1
``enc_mu``; the mean is ``proj(expmap0(raw))`` (hyperbolic) or ``raw``
(Euclidean), as in :meth:`HypVAE.encode_dense`. The scale head is not needed
and not run.

A trunk layer whose output windows (side ``n_l = m - Σ (k_i - 1)``) no longer
overlap (``n_l < a``, e.g. non-integer ``q`` with ``gcd(m, p) = 1``, or the
deeper layers at ``stride > 1``) would cost more densely than per window; from
that layer on the windows are cut out of the previous (dense) activation and
run as a batch, as per-patch inference does. So the fast path never needs more
FLOPs per voxel than the reference (tile overlap aside), and far fewer when
windows overlap (integer ``q``: 5.3 instead of 17.6 MFLOP for the default
model at ``p = 5``); :func:`flops_per_voxel` counts them.

Tiles
-----
The output is computed in tiles of at most ``tile`` voxels per side (per phase
and per axis, the voxels of one phase whose span is ``<= tile``); each tile
resamples and runs its own overlapping piece of the grid, so memory is bounded
(below 0.1 GB of activations for the default model at ``tile=24``) and the
result does not depend on the tiling beyond float summation order.

Stride
------
``stride = s > 1`` embeds only a coarse lattice — voxels ``0, s, 2s, ...`` along
each axis plus the last voxel — and fills the voxels in between by trilinear
interpolation along each axis between the neighbouring lattice voxels. For a
hyperbolic model the interpolation is done in the tangent space at the origin
(``expmap0(Σ w_i logmap0(μ_i))``, curvature ``model.cfg.curvature``), for a
Euclidean one on ``μ`` directly. The lattice voxels keep their computed values
exactly. Stride ``s`` skips the head for the other voxels and, since their
windows overlap less, the deeper trunk layers are windowed: with the default
model at ``p = 5`` stride 2 needs about 3x fewer FLOPs per voxel.

Models whose encoder pads every patch (``model.dense_exact`` False, the
authors' layout) cannot be run densely; :func:`embed_volume` then logs a
warning and uses :func:`embed_reference` (on the lattice when ``stride > 1``).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import geometry
from .checks import is_whole
from .errors import BadInputError
from .sampling import sample_patches

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_TILE",
    "embed_reference",
    "embed_volume",
    "flops_per_voxel",
    "padding_margin",
]

log = logging.getLogger(__name__)

#: Output voxels per side of one tile of :func:`embed_volume`. With the default
#: model and p = 5 (q = 2) a tile reads a 56^3 grid (activations < 0.1 GB);
#: 20-28 measured fastest (larger tiles fall out of the caches, smaller ones
#: repeat more of the overlap).
DEFAULT_TILE = 24

#: Patches per encoder call in :func:`embed_reference`.
DEFAULT_BATCH = 4096

#: Output voxels per slab of the stride interpolation (float64 intermediates of
#: ~16 bytes per voxel and coordinate each, so a few tens of MB at a time).
UPSAMPLE_BLOCK = 1 << 20

#: Largest phase count b = p / gcd(m, p) per axis the fast path handles; beyond
#: it (a patch side that is no simple fraction of m) the reference path is used.
MAX_PHASES = 16

ProgressFn = Callable[[str, int, int], None]


# --------------------------------------------------------------------------
# Validation and shared helpers
# --------------------------------------------------------------------------


def padding_margin(patch_size: float) -> int:
    """Reflect-padding margin (voxels per side): ``ceil(p/2) + 1``.

    The samples of voxel ``v`` lie within ``v ± (p/2 - h/2)``; their interpolation
    neighbours within ``v ± ceil(p/2)``; the extra voxel keeps a right neighbour
    for a sample that falls exactly on the last padded voxel.
    """
    return int(math.ceil(float(patch_size) / 2.0)) + 1


def _check_volume(volume: np.ndarray) -> np.ndarray:
    if not isinstance(volume, np.ndarray):
        raise BadInputError(f"volume should be a numpy array, got {type(volume).__name__}")
    if volume.ndim != 3:
        raise BadInputError(f"volume should have 3 dimensions (x, y, z), got shape {volume.shape}")
    if volume.size == 0:
        raise BadInputError(f"volume is empty (shape {volume.shape})")
    if not (np.issubdtype(volume.dtype, np.number) or volume.dtype == np.bool_) or np.iscomplexobj(
        volume
    ):
        raise BadInputError(f"volume has dtype {volume.dtype}, expected real numbers")
    vol = np.ascontiguousarray(volume, dtype=np.float32)
    n_bad = vol.size - int(np.count_nonzero(np.isfinite(vol)))
    if n_bad:
        raise BadInputError(
            f"volume has {n_bad} non-finite voxel(s) out of {vol.size}; expected finite values"
        )
    return vol


def _check_patch_size(patch_size: float) -> float:
    try:
        p = float(patch_size)
    except (TypeError, ValueError):
        raise BadInputError(f"patch_size={patch_size!r} should be a positive number") from None
    if not (math.isfinite(p) and p > 0):
        raise BadInputError(f"patch_size={patch_size!r} should be a positive number")
    return p


def _check_positive_int(name: str, value: int) -> int:
    if not is_whole(value, 1):
        raise BadInputError(f"{name}={value!r} should be an integer >= 1")
    return int(value)


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one: ``cuda`` (the current device) is ``cuda:0`` there."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" else 0
        return (current if a.index is None else a.index) == (
            current if b.index is None else b.index
        )
    return a.index == b.index


def _resolve_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is None:
        return _model_device_dtype(model)[0]
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise BadInputError(f"device={device!r} is not a torch device") from None


def _mu_from_raw(model: nn.Module, raw: Tensor) -> Tensor:
    """Mean from the raw ``enc_mu`` output (..., d), exactly as :meth:`HypVAE.encode_dense`."""
    if model.cfg.hyperbolic:
        c = model.cfg.curvature
        return geometry.project(geometry.expmap0(raw, c=c), c=c)
    return raw


def _lattice(n: int, stride: int) -> np.ndarray:
    """Voxel indices ``0, s, 2s, ...`` of an axis of ``n`` voxels, plus ``n - 1``."""
    idx = np.arange(0, n, stride, dtype=np.int64)
    if idx[-1] != n - 1:
        idx = np.append(idx, n - 1)
    return idx


class _Eval:
    """Context: ``model.eval()`` and inference mode, restoring the training flag."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.training = self.model.training
        self.model.eval()
        self.inference = torch.inference_mode()
        self.inference.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.inference.__exit__(*exc)
        self.model.train(self.training)


# --------------------------------------------------------------------------
# Reference: one patch per voxel
# --------------------------------------------------------------------------


def _reference_points(
    model: nn.Module,
    vol: np.ndarray,
    p: float,
    axes: Sequence[np.ndarray],
    *,
    batch: int,
    device: torch.device,
    progress: ProgressFn | None,
) -> np.ndarray:
    """μ at the voxels ``axes[0] x axes[1] x axes[2]`` (outer product), one patch each."""
    m = model.cfg.patch_size
    margin = padding_margin(p)
    model_device, dtype = _model_device_dtype(model)
    if not _same_device(model_device, device):  # (a copy: the caller's model stays put)
        model = copy.deepcopy(model).to(device)
    padded = torch.from_numpy(np.pad(vol, margin, mode="reflect")).to(device=device, dtype=dtype)
    shape = tuple(len(a) for a in axes)
    n = int(np.prod(shape))
    out = np.empty((n, model.cfg.latent_dim), dtype=np.float32)
    coord = torch.float32 if device.type == "mps" else torch.float64  # (MPS has no float64)
    ax = [torch.from_numpy(a + margin).to(coord).to(device) for a in axes]
    total = (n + batch - 1) // batch
    with _Eval(model):
        for done, start in enumerate(range(0, n, batch), 1):
            flat = torch.arange(start, min(start + batch, n), device=device)
            i, rest = flat // (shape[1] * shape[2]), flat % (shape[1] * shape[2])
            j, k = rest // shape[2], rest % shape[2]
            centers = torch.stack((ax[0][i], ax[1][j], ax[2][k]), dim=-1)
            sides = torch.full((len(flat),), p, dtype=coord, device=device)
            patches = sample_patches(padded, centers, sides, m)
            mu, _ = model.encode(patches)
            out[start : start + len(flat)] = mu.float().cpu().numpy()
            if progress is not None:
                progress("embed", done, total)
    return out.reshape(*shape, -1)


def embed_reference(
    model: nn.Module,
    volume: np.ndarray,
    *,
    patch_size: float = 5,
    batch: int = DEFAULT_BATCH,
    device: torch.device | str | None = None,
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """Per-voxel embeddings the straightforward way: one resampled patch per voxel.

    ``volume`` (X, Y, Z), already normalised, is reflect-padded by
    :func:`padding_margin`; the patch of every voxel ``v`` (centre ``v``, side
    ``patch_size``) is resampled to ``m^3`` by
    :func:`~hypsegcli.sampling.sample_patches`, ``batch`` patches at a time, and
    encoded by :meth:`HypVAE.encode`. Returns μ as (X, Y, Z, d) float32 on the CPU.
    ``progress(stage, done, total)`` is called after every batch.
    """
    vol = _check_volume(volume)
    p = _check_patch_size(patch_size)
    batch = _check_positive_int("batch", batch)
    dev = _resolve_device(model, device)
    axes = [np.arange(n, dtype=np.int64) for n in vol.shape]
    return _reference_points(model, vol, p, axes, batch=batch, device=dev, progress=progress)


# --------------------------------------------------------------------------
# Fast path: phase grids, dense trunk, strided head
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Trunk:
    """The encoder trunk as (weight, bias) per convolution, kernel sides and window sides."""

    weights: tuple[Tensor, ...]
    biases: tuple[Tensor | None, ...]
    kernels: tuple[int, ...]
    #: n[l] = side of one patch's activation after l convolutions (n[0] = m, n[-1] = S).
    sides: tuple[int, ...]


def _trunk_of(model: nn.Module) -> _Trunk | None:
    """Read the trunk ``Conv3d, ReLU, ...`` (VALID, stride 1, cubic kernels); None if it is not that."""
    mods = list(model.encoder)
    if len(mods) % 2:
        return None
    weights, biases, kernels = [], [], []
    sides = [int(model.cfg.patch_size)]
    for conv, act in zip(mods[0::2], mods[1::2], strict=True):
        if not (isinstance(conv, nn.Conv3d) and isinstance(act, nn.ReLU)):
            return None
        k = conv.kernel_size
        if (
            len(set(k)) != 1
            or conv.stride != (1, 1, 1)
            or conv.dilation != (1, 1, 1)
            or conv.groups != 1
            or any(conv.padding if not isinstance(conv.padding, str) else [1])
        ):
            return None
        weights.append(conv.weight)
        biases.append(conv.bias)
        kernels.append(k[0])
        sides.append(sides[-1] - k[0] + 1)
    head = model.enc_fc
    if head.kernel_size != (sides[-1],) * 3 or head.stride != (1, 1, 1) or any(head.padding):
        return None
    return _Trunk(tuple(weights), tuple(biases), tuple(kernels), tuple(sides))


def _phases(p: float, m: int) -> tuple[int, int] | None:
    """``(a, b)`` with ``m/p = a/b`` in lowest terms, or None if ``b > MAX_PHASES``."""
    frac = Fraction(p).limit_denominator(1000)
    if abs(float(frac) - p) > 1e-9 * p:
        return None
    ratio = Fraction(m) / frac
    if ratio.denominator > MAX_PHASES:
        return None
    return ratio.numerator, ratio.denominator


@dataclass(frozen=True)
class _AxisChunk:
    """Voxels of one phase along one axis computed in one tile."""

    phase: int  # r = v mod b
    t: np.ndarray  # v = b t + r, an arithmetic progression
    out: np.ndarray  # positions of these voxels in the output axis
    step: int  # window step on the phase grid (a * dt); 0 if a single voxel


def _axis_chunks(idx: np.ndarray, a: int, b: int, tile: int) -> list[_AxisChunk]:
    """Split the (sorted) voxel indices of one axis into per-phase progressions, then tiles."""
    chunks: list[_AxisChunk] = []
    pos = np.arange(len(idx))
    for r in range(b):
        sel = idx % b == r
        t_all, o_all = (idx[sel] - r) // b, pos[sel]
        start = 0
        while start < len(t_all):  # greedy maximal arithmetic progressions
            stop = start + 1
            if stop < len(t_all):
                dt = t_all[stop] - t_all[start]
                while stop < len(t_all) and t_all[stop] - t_all[stop - 1] == dt:
                    stop += 1
            else:
                dt = 1
            n = stop - start
            per = max(1, tile // int(b * dt))  # span of a tile <= tile voxels
            n_chunks = -(-n // per)
            for piece in np.array_split(np.arange(start, stop), n_chunks):
                step = int(a * dt) if len(piece) > 1 else 0
                chunks.append(_AxisChunk(r, t_all[piece], o_all[piece], step))
            start = stop
    return chunks


def _switch_layer(sides: Sequence[int], step: int) -> int:
    """Number of trunk layers to run densely before windowing (``len(sides) - 1``: all).

    Layer ``l`` (1-based) runs densely while its windows overlap or touch
    (``sides[l] >= step``): dense it costs ``step^3`` outputs per voxel, windowed
    ``sides[l]^3``.
    """
    for layer in range(1, len(sides)):
        if sides[layer] < step:
            return layer - 1
    return len(sides) - 1


def _grid_axis(chunk: _AxisChunk, a: int, m: int, p: float, margin: int) -> tuple[np.ndarray, int]:
    """Sample positions (padded voxel coordinates) of one tile's grid along one axis.

    Windows start at ``k = a t``. When windows overlap or touch the grid is the
    contiguous run of ``k``; when there are gaps (step > m) only the windows are
    kept, back to back. Returns the positions and the window step on that grid.
    """
    k0 = a * chunk.t
    if chunk.step > m:
        k = (k0[:, None] + np.arange(m)).ravel()
        step = m
    else:
        k = np.arange(k0[0], k0[-1] + m)
        step = chunk.step
    h = p / m
    return margin + chunk.phase - p / 2.0 + (k + 0.5) * h, step


def _lerp_axis(x: Tensor, axis: int, pos: np.ndarray) -> Tensor:
    """Linear interpolation of ``x`` along ``axis`` at (in-range) positions ``pos``."""
    i0 = np.clip(np.floor(pos).astype(np.int64), 0, max(x.shape[axis] - 2, 0))
    w = pos - i0
    i1 = np.minimum(i0 + 1, x.shape[axis] - 1)
    lo, hi = int(i0.min()), int(i1.max())
    x = x.narrow(axis, lo, hi - lo + 1)
    shape = [1] * x.dim()
    shape[axis] = len(pos)
    wt = torch.from_numpy(w).to(x.dtype).to(x.device).view(shape)  # (MPS has no float64)
    idx0 = torch.as_tensor(i0 - lo, device=x.device)
    idx1 = torch.as_tensor(i1 - lo, device=x.device)
    return torch.lerp(x.index_select(axis, idx0), x.index_select(axis, idx1), wt)


def _fused_conv_relu(device: torch.device, dtype: torch.dtype) -> Callable[..., Tensor] | None:
    """oneDNN's VALID conv3d with the ReLU fused, if usable here (CPU, float32, oneDNN on)."""
    if device.type != "cpu" or dtype != torch.float32:
        return None
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return None
    return _fused_cpu_op()


@functools.cache
def _fused_cpu_op() -> Callable[..., Tensor] | None:
    """``torch.ops.mkldnn._convolution_pointwise`` with ``"relu"``, checked once.

    It is what torch.compile's CPU backend calls; it saves one pass over every
    activation (~4% of the fast path, measured). Being a private op, it is
    compared with ``relu(conv3d)`` on a small input first and not used if it is
    missing, has another signature or disagrees.
    """
    try:
        op = torch.ops.mkldnn._convolution_pointwise

        def fused(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
            return op(x, w, b, [0, 0, 0], [1, 1, 1], [1, 1, 1], 1, "relu", [], "")

        gen = torch.Generator().manual_seed(0)
        cl = torch.channels_last_3d
        x = torch.randn(2, 3, 5, 6, 4, generator=gen).contiguous(memory_format=cl)
        w = torch.randn(4, 3, 3, 3, 3, generator=gen).contiguous(memory_format=cl)
        b = torch.randn(4, generator=gen)
        with torch.inference_mode():
            ok = torch.allclose(fused(x, w, b), F.relu(F.conv3d(x, w, b)), rtol=1e-4, atol=1e-5)
    except Exception:  # noqa: BLE001 - any failure means: use the public ops
        return None
    return fused if ok else None


class _Engine:
    """Runs one tile: resample, dense trunk (then windows), strided head, mean."""

    def __init__(self, model: nn.Module, trunk: _Trunk, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.trunk = trunk
        # Channels-last 3D is mkldnn's fast layout for conv3d on the CPU (measured
        # ~1.5x over contiguous NCDHW with torch 2.13).
        self.fmt = torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format
        cast = dict(device=device, dtype=dtype)
        self.weights = [
            w.detach().to(**cast).contiguous(memory_format=self.fmt) for w in trunk.weights
        ]
        self.biases = [None if b is None else b.detach().to(**cast) for b in trunk.biases]
        fc, mu = model.enc_fc, model.enc_mu
        self.fc_w = fc.weight.detach().to(**cast).contiguous(memory_format=self.fmt)
        self.fc_b = None if fc.bias is None else fc.bias.detach().to(**cast)
        d, hidden = mu.weight.shape[:2]
        self.mu_w = mu.weight.detach().to(**cast).reshape(d, hidden)
        self.mu_b = None if mu.bias is None else mu.bias.detach().to(**cast)
        self.fused = _fused_conv_relu(device, dtype)

    def _layers(self, x: Tensor, first: int, last: int) -> Tensor:
        for i in range(first, last):
            if self.fused is not None:
                x = self.fused(x, self.weights[i], self.biases[i])
            else:
                x = F.conv3d(x, self.weights[i], self.biases[i])
                x = F.relu_(x)
        return x

    def run(
        self, grid: Tensor, steps: tuple[int, int, int], counts: tuple[int, int, int]
    ) -> Tensor:
        """``grid`` (Gx, Gy, Gz) resampled tile -> μ (Tx, Ty, Tz, d)."""
        sides = self.trunk.sides
        n_layers = len(sides) - 1
        switch = _switch_layer(sides, max(steps))
        x = grid[None, None].contiguous(memory_format=self.fmt)
        x = self._layers(x, 0, switch)
        if switch < n_layers:
            # Windows no longer overlap: cut them out and finish per window.
            n = sides[switch]
            for dim, step in zip((2, 3, 4), steps, strict=True):
                x = x.unfold(dim, n, max(step, 1))
            c = x.shape[1]
            x = x[0].permute(1, 2, 3, 0, 4, 5, 6).reshape(-1, c, n, n, n)
            x = self._layers(x.contiguous(memory_format=self.fmt), switch, n_layers)
            h = F.conv3d(x, self.fc_w, self.fc_b)  # (B, hidden, 1, 1, 1)
            h = h.reshape(*counts, -1)
        else:
            # enc_fc with stride = window step: evaluated at the window starts only.
            h = F.conv3d(x, self.fc_w, self.fc_b, stride=tuple(max(s, 1) for s in steps))
            h = h[0].permute(1, 2, 3, 0)  # (Tx, Ty, Tz, hidden)
        h = F.relu(h)
        raw = h @ self.mu_w.T
        if self.mu_b is not None:
            raw = raw + self.mu_b
        return _mu_from_raw(self.model, raw)


def _resample(padded: Tensor, px: np.ndarray, py: np.ndarray, pz: np.ndarray) -> Tensor:
    """Trilinear interpolation of ``padded`` on the product grid ``px x py x pz``.

    Separable: linear along x, then y, then z, each on the crop it needs.
    """
    box = []
    for n, pos in zip(padded.shape, (px, py, pz), strict=True):
        lo = max(int(np.floor(pos.min())) - 1, 0)
        hi = min(int(np.floor(pos.max())) + 2, n - 1)
        box.append((lo, hi))
    x = padded[box[0][0] : box[0][1] + 1, box[1][0] : box[1][1] + 1, box[2][0] : box[2][1] + 1]
    for axis, pos in enumerate((px, py, pz)):
        x = _lerp_axis(x, axis, pos - box[axis][0])
    return x


class _IntraOpThreads:
    """Context: torch's intra-op thread count set to ``n``, restored afterwards."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)


def _fast_points(
    model: nn.Module,
    vol: np.ndarray,
    p: float,
    axes: Sequence[np.ndarray],
    trunk: _Trunk,
    phases: tuple[int, int],
    *,
    tile: int,
    device: torch.device,
    progress: ProgressFn | None,
) -> np.ndarray:
    """μ at the voxels ``axes[0] x axes[1] x axes[2]`` via phase grids and the dense trunk.

    On the CPU with ``torch.get_num_threads() = n > 1``, tiles run ``n`` at a time
    in worker threads with one intra-op thread each (torch's count is set to 1
    meanwhile and restored): no OpenMP barriers inside a convolution, which
    measured ~20% faster than n-thread convolutions when other jobs share the
    cores. ``progress`` is called from the calling thread.
    """
    a, b = phases
    m = int(model.cfg.patch_size)
    margin = padding_margin(p)
    _, dtype = _model_device_dtype(model)
    padded = torch.from_numpy(np.pad(vol, margin, mode="reflect")).to(device=device, dtype=dtype)
    chunks = [_axis_chunks(np.asarray(ax, dtype=np.int64), a, b, tile) for ax in axes]
    grids = [[_grid_axis(c, a, m, p, margin) for c in cs] for cs in chunks]
    tiles = [
        (cx, cy, cz, gx, gy, gz)
        for cx, gx in zip(chunks[0], grids[0], strict=True)
        for cy, gy in zip(chunks[1], grids[1], strict=True)
        for cz, gz in zip(chunks[2], grids[2], strict=True)
    ]
    out = np.empty((*(len(ax) for ax in axes), model.cfg.latent_dim), dtype=np.float32)
    engine = _Engine(model, trunk, device, dtype)

    def run_tile(tile_: tuple) -> None:
        cx, cy, cz, (px, sx), (py, sy), (pz, sz) = tile_
        with torch.inference_mode():  # thread-local: set it in the worker
            grid = _resample(padded, px, py, pz)
            mu = engine.run(grid, (sx, sy, sz), (len(cx.t), len(cy.t), len(cz.t)))
            out[np.ix_(cx.out, cy.out, cz.out)] = mu.float().cpu().numpy()

    workers = min(torch.get_num_threads(), len(tiles)) if device.type == "cpu" else 1
    with _Eval(model):
        if workers <= 1:
            for done, tile_ in enumerate(tiles, 1):
                run_tile(tile_)
                if progress is not None:
                    progress("embed", done, len(tiles))
        else:
            with _IntraOpThreads(1), ThreadPoolExecutor(workers) as pool:
                futures = [pool.submit(run_tile, t) for t in tiles]
                try:
                    for done, fut in enumerate(as_completed(futures), 1):
                        fut.result()
                        if progress is not None:
                            progress("embed", done, len(tiles))
                except BaseException:  # a failed tile or an interrupt: drop the queued ones
                    for fut in futures:
                        fut.cancel()
                    raise
    return out


# --------------------------------------------------------------------------
# Stride: tangent-space trilinear interpolation
# --------------------------------------------------------------------------


def _interp_weights(idx: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """For every voxel 0..n-1: the lattice interval (left index into ``idx``) and weight."""
    if len(idx) == 1:
        return np.zeros(n, dtype=np.int64), np.zeros(n)
    i = np.arange(n)
    left = np.clip(np.searchsorted(idx, i, side="right") - 1, 0, len(idx) - 2)
    w = (i - idx[left]) / (idx[left + 1] - idx[left])
    return left, w


def _upsample(
    model: nn.Module,
    coarse: np.ndarray,
    axes: Sequence[np.ndarray],
    shape: Sequence[int],
    *,
    block: int = UPSAMPLE_BLOCK,
) -> np.ndarray:
    """Trilinear interpolation of lattice embeddings to every voxel (tangent space at 0 on the ball).

    Computed in slabs of output x-planes (about ``block`` voxels each) from the
    lattice planes each slab needs, in float64, written into the float32
    result: every voxel's value is the same per-voxel formula as for the whole
    volume at once, but the float64 intermediates stay at slab size (at once
    they would take 5 GB for a 512x512x300 volume).
    """
    hyperbolic = model.cfg.hyperbolic
    c = model.cfg.curvature
    interp = []
    for idx, n in zip(axes, shape, strict=True):
        left, w = _interp_weights(idx, n)
        interp.append((left, np.minimum(left + 1, len(idx) - 1), w))
    out = np.empty((*shape, coarse.shape[-1]), dtype=np.float32)
    rows = max(1, int(block) // max(1, int(shape[1]) * int(shape[2])))
    for x0 in range(0, int(shape[0]), rows):
        x1 = min(x0 + rows, int(shape[0]))
        left0, right0, w0 = (a[x0:x1] for a in interp[0])
        lo = int(left0.min())
        hi = int(right0.max()) + 1
        t = torch.from_numpy(np.ascontiguousarray(coarse[lo:hi])).double()
        if hyperbolic:
            t = geometry.logmap0(t, c=c)
        for axis, (i0, i1, w) in enumerate(((left0 - lo, right0 - lo, w0), *interp[1:])):
            view = [1] * 4
            view[axis] = len(w)
            wt = torch.from_numpy(w).view(view)
            t = torch.lerp(
                t.index_select(axis, torch.from_numpy(i0)),
                t.index_select(axis, torch.from_numpy(i1)),
                wt,
            )
        if hyperbolic:
            t = geometry.project(geometry.expmap0(t, c=c), c=c)
        out[x0:x1] = t.float().numpy()
    out[np.ix_(*axes)] = coarse  # lattice voxels keep their computed values exactly
    return out


# --------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------


def embed_volume(
    model: nn.Module,
    volume: np.ndarray,
    *,
    patch_size: float = 5,
    stride: int = 1,
    tile: int = DEFAULT_TILE,
    device: torch.device | str | None = None,
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """Per-voxel embeddings μ (X, Y, Z, d) float32 of a normalised volume (X, Y, Z).

    Equal (to float rounding) to :func:`embed_reference`, computed fully
    convolutionally on resampled phase grids (module docstring). ``stride``
    ``s > 1`` embeds the lattice ``0, s, 2s, ..., last`` per axis and interpolates
    in between (tangent space at the origin for hyperbolic models). ``tile``
    bounds the voxels per side computed at once (memory). ``device``: where the
    encoder runs (default the model's); the result is a CPU numpy array.
    ``progress(stage, done, total)`` is called after every tile, from the
    calling thread.

    Threads: on the CPU with ``n = torch.get_num_threads() > 1`` the tiles run in
    ``n`` worker threads with one intra-op thread each; torch's thread count is
    1 during the call and restored afterwards (do not run other torch work in
    parallel threads meanwhile). Measured ~20% faster than ``n``-thread
    convolutions when other jobs share the cores, and as fast otherwise.

    A model with padded encoder convolutions (``model.dense_exact`` False) or a
    patch side that is no simple fraction of ``m`` falls back to
    :func:`embed_reference` (a warning is logged for the former).
    """
    vol = _check_volume(volume)
    p = _check_patch_size(patch_size)
    stride = _check_positive_int("stride", stride)
    tile = _check_positive_int("tile", tile)
    dev = _resolve_device(model, device)
    m = int(model.cfg.patch_size)
    axes = [_lattice(n, stride) for n in vol.shape]

    trunk = _trunk_of(model) if model.dense_exact else None
    phases = _phases(p, m)
    if trunk is None or phases is None:
        if not model.dense_exact:
            log.warning(
                "model encoder pads its convolutions (paddings=%s): dense inference would differ, "
                "embedding one patch per voxel instead (slow)",
                tuple(model.cfg.paddings),
            )
        elif trunk is None:
            log.warning(
                "model encoder is not a plain Conv3d/ReLU stack: embedding one patch per voxel (slow)"
            )
        else:
            log.debug(
                "patch_size=%g is no simple fraction of m=%d: embedding one patch per voxel", p, m
            )
        coarse = _reference_points(
            model, vol, p, axes, batch=DEFAULT_BATCH, device=dev, progress=progress
        )
    else:
        coarse = _fast_points(
            model, vol, p, axes, trunk, phases, tile=tile, device=dev, progress=progress
        )
    if stride == 1:
        return coarse
    return _upsample(model, coarse, axes, vol.shape)


def flops_per_voxel(model: nn.Module, patch_size: float = 5, *, stride: int = 1) -> float:
    """Multiply-add FLOPs (2 per MAC) of :func:`embed_volume`'s network per output voxel.

    Ignores tile overlap, resampling and the activation (cheap). With ``m/p =
    a/b`` and window step ``Δ = a·lcm(s, b)/b`` on a phase grid, every computed
    voxel owns ``Δ^3`` grid points per dense layer and ``n_l^3`` per windowed
    layer (window side ``n_l``); the head costs ``2·C·hidden·S^3 + 2·hidden·d``.
    The total is divided by ``s^3`` (only the lattice is computed; the
    interpolation is not counted). E.g. the default model at ``p = 5`` (q = 2):
    8 grid points per voxel, 4.65 MFLOP trunk + 0.61 MFLOP head.

    Falls back to the per-patch count (``Σ n_l^3`` per layer) when
    :func:`embed_volume` would use the reference path.
    """
    p = _check_patch_size(patch_size)
    stride = _check_positive_int("stride", stride)
    m = int(model.cfg.patch_size)
    trunk = _trunk_of(model) if model.dense_exact else None
    phases = _phases(p, m)
    convs = [mod for mod in model.encoder if isinstance(mod, nn.Conv3d)]
    per_point = [2.0 * c.in_channels * c.out_channels * math.prod(c.kernel_size) for c in convs]
    fc, mu = model.enc_fc, model.enc_mu
    head = (
        2.0 * fc.in_channels * fc.out_channels * math.prod(fc.kernel_size)
        + 2.0 * mu.in_channels * mu.out_channels
    )
    if trunk is None or phases is None:
        sizes = [m]
        for c in convs:
            sizes.append(sizes[-1] + 2 * c.padding[0] - c.kernel_size[0] + 1)
        return sum(f * s**3 for f, s in zip(per_point, sizes[1:], strict=True)) + head
    a, b = phases
    step = a * (stride * b // math.gcd(stride, b)) // b
    switch = _switch_layer(trunk.sides, step)
    total = 0.0
    for layer, f in enumerate(per_point, 1):
        total += f * (step**3 if layer <= switch else trunk.sides[layer] ** 3)
    return (total + head) / stride**3
