"""Quick-look PNGs of a segmentation: the middle slice of each axis with the labels overlaid.

Written with the standard library only (zlib + a minimal PNG encoder), so a
user on a headless cluster node can check a result without a viewer and
without a plotting library.
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np

from .io import write_bytes_atomic

#: Largest stretch of an in-plane axis for anisotropic spacing (a thick-slice MRI is ~10).
MAX_STRETCH = 16.0

# A qualitative palette (RGB) for the first 16 clusters (label 0 is drawn too); more
# clusters get colours of their own from :func:`colours`.
PALETTE = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
        [0, 128, 128],
        [220, 190, 255],
        [170, 110, 40],
        [255, 250, 200],
        [128, 0, 0],
        [170, 255, 195],
    ],
    dtype=np.float32,
)


def colours(n: int) -> np.ndarray:
    """(n, 3) RGB colours, one per cluster: :data:`PALETTE`, then hues spread by the golden
    angle at two saturations and three values, so that no two of the first 16 + 96 repeat."""
    if n <= len(PALETTE):
        return PALETTE[:n]
    i = np.arange(n - len(PALETTE), dtype=np.float64)
    hue = (i * 0.6180339887498949) % 1.0
    sat = np.where((i // 3) % 2 == 0, 0.85, 0.5)
    val = np.array([0.95, 0.7, 0.5])[(i % 3).astype(int)]
    h6 = hue * 6.0
    sector = np.floor(h6).astype(int) % 6
    f = h6 - np.floor(h6)
    p, q, t = val * (1 - sat), val * (1 - sat * f), val * (1 - sat * (1 - f))
    rgb = np.select(
        [sector[:, None] == s for s in range(6)],
        [
            np.stack(c, axis=1)
            for c in ((val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q))
        ],
    )
    return np.concatenate([PALETTE, (rgb * 255.0).astype(np.float32)])


def encode_png(rgb: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 image as PNG bytes."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + tag
            + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def window_levels(image: np.ndarray) -> tuple[float, float]:
    """Grey levels ``(lo, scale)`` of a volume's previews: its 1st and 99th percentiles
    (float32 values), as ``lo`` and ``hi - lo``. The same for every preview of a volume:
    compute them once and pass them as ``levels`` (a whole-volume percentile is the
    slowest part of a preview: ~1 s for 78.6 M voxels)."""
    source = image if image.dtype == np.float32 else image.astype(np.float32)
    lo, hi = np.percentile(source, [1.0, 99.0])
    return float(lo), float(hi - lo if hi > lo else 1.0)


def _window(image: np.ndarray, lo: float, scale: float) -> np.ndarray:
    return np.clip((image - lo) / scale, 0.0, 1.0)


def overlay_montage(
    image: np.ndarray,
    labels: np.ndarray,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    *,
    alpha: float = 0.45,
    min_side: int = 192,
    outside: bool = False,
    levels: tuple[float, float] | None = None,
) -> np.ndarray:
    """The three middle slices (x, y, z) side by side, grey image with coloured labels.

    Each slice is drawn with its first in-plane array axis across and the second down
    (the z panel: x across, y down, as Fiji and napari show it; 3dmod draws y up);
    anisotropic spacing is honoured by nearest-neighbour scaling (an axis is
    stretched at most :data:`MAX_STRETCH` times). Cluster c gets
    ``colours(...)[c]``; with ``outside`` (``cluster --mask``), label 0 is the
    outside of the mask, left grey, and cluster c = label - 1 keeps its colour.
    ``levels``: :func:`window_levels` of ``image``, computed here when not given.
    """
    # levels from the whole volume, windowing only the three slices (bounded memory)
    lo, scale = window_levels(image) if levels is None else levels
    first = 1 if outside else 0
    palette = colours(max(int(labels.max(initial=0)) + 1 - first, 1))
    panels = []
    for axis in range(3):
        index = image.shape[axis] // 2
        # the first in-plane axis across, the second down, as viewers draw an image (Fiji,
        # napari: the z panel with x across and y down; 3dmod draws y up)
        g = _window(np.take(image, index, axis=axis).astype(np.float32), lo, scale).T
        lab = np.take(labels, index, axis=axis).astype(np.int64).T
        sp = [s for i, s in enumerate(spacing) if i != axis][::-1]
        tint = palette[np.clip(lab - first, 0, len(palette) - 1)]
        rgb = (1.0 - alpha) * g[..., None] * 255.0 + alpha * tint
        rgb = np.where(lab[..., None] >= first, rgb, g[..., None] * 255.0)
        # scale to physical aspect and a readable size (nearest neighbour)
        unit = min(sp)
        stretch = [min(s / unit, MAX_STRETCH) for s in sp]  # a pixdim of 1e-30 stays drawable
        rows = max(1, int(round(rgb.shape[0] * stretch[0])))
        cols = max(1, int(round(rgb.shape[1] * stretch[1])))
        factor = max(1, int(np.ceil(min_side / max(rows, cols))))
        rows, cols = rows * factor, cols * factor
        ri = np.minimum((np.arange(rows) * rgb.shape[0]) // rows, rgb.shape[0] - 1)
        ci = np.minimum((np.arange(cols) * rgb.shape[1]) // cols, rgb.shape[1] - 1)
        panels.append(rgb[ri][:, ci])
    height = max(p.shape[0] for p in panels)
    gap = np.full((height, 4, 3), 255.0)
    padded = [
        np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)), constant_values=255.0) for p in panels
    ]
    row = [padded[0]]
    for p in padded[1:]:
        row += [gap, p]
    return np.clip(np.concatenate(row, axis=1), 0, 255).astype(np.uint8)


def write_preview(
    path: str | os.PathLike[str],
    image: np.ndarray,
    labels: np.ndarray,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    *,
    outside: bool = False,
    levels: tuple[float, float] | None = None,
) -> None:
    """Write the overlay montage of ``image`` and ``labels`` as a PNG (atomically);
    ``outside``: label 0 is the outside of a mask, left grey; ``levels``: see
    :func:`overlay_montage`."""
    montage = overlay_montage(image, labels, spacing, outside=outside, levels=levels)
    write_bytes_atomic(path, encode_png(montage))
