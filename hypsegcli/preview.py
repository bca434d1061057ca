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

# A qualitative palette (RGB), label i gets PALETTE[i % len]; label 0 is drawn too.
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


def _window_levels(image: np.ndarray) -> tuple[float, float]:
    """Grey levels: the 1st and 99th percentiles of the whole volume."""
    lo, hi = np.percentile(image, [1.0, 99.0])
    return lo, (hi - lo if hi > lo else 1.0)


def _window(image: np.ndarray, lo: float, scale: float) -> np.ndarray:
    return np.clip((image - lo) / scale, 0.0, 1.0)


def overlay_montage(
    image: np.ndarray,
    labels: np.ndarray,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    *,
    alpha: float = 0.45,
    min_side: int = 192,
) -> np.ndarray:
    """The three middle slices (x, y, z) side by side, grey image with coloured labels.

    Slices are shown with the first in-plane array axis running downwards;
    anisotropic spacing is honoured by nearest-neighbour scaling.
    """
    # levels from the whole volume, windowing only the three slices (bounded memory)
    source = image if image.dtype == np.float32 else image.astype(np.float32)
    lo, scale = _window_levels(source)
    panels = []
    for axis in range(3):
        index = image.shape[axis] // 2
        g = _window(np.take(source, index, axis=axis), lo, scale)
        lab = np.take(labels, index, axis=axis).astype(np.int64)
        sp = [s for i, s in enumerate(spacing) if i != axis]
        rgb = (1.0 - alpha) * g[..., None] * 255.0 + alpha * PALETTE[lab % len(PALETTE)]
        rgb = np.where(lab[..., None] >= 0, rgb, g[..., None] * 255.0)
        # scale to physical aspect and a readable size (nearest neighbour)
        unit = min(sp)
        rows = max(1, int(round(rgb.shape[0] * sp[0] / unit)))
        cols = max(1, int(round(rgb.shape[1] * sp[1] / unit)))
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
) -> None:
    """Write the overlay montage of ``image`` and ``labels`` as a PNG (atomically)."""
    write_bytes_atomic(path, encode_png(overlay_montage(image, labels, spacing)))
