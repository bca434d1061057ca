"""Preview PNGs: grey levels from the whole volume, labels overlaid, valid PNG bytes."""

from __future__ import annotations

import struct
import zlib

import numpy as np

from hypsegcli import preview


def test_montage_windows_slices_by_whole_volume_percentiles():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(9, 10, 11)).astype(np.float32)
    labels = rng.integers(0, 3, image.shape)
    montage = preview.overlay_montage(image, labels, alpha=0.0, min_side=1)
    lo, hi = np.percentile(image.astype(np.float64), [1.0, 99.0])
    # the x panel, first: y across, z down
    expected = np.clip((image[4].T - lo) / (hi - lo), 0.0, 1.0) * 255.0
    np.testing.assert_allclose(montage[: image.shape[2], : image.shape[1], 0], expected, atol=1.0)
    # the same picture whatever the input's float type
    again = preview.overlay_montage(image.astype(np.float64), labels, alpha=0.0, min_side=1)
    np.testing.assert_array_equal(montage, again)


def test_png_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.normal(size=(6, 7, 8)).astype(np.float32)
    labels = rng.integers(0, 4, image.shape)
    path = tmp_path / "p.png"
    preview.write_preview(path, image, labels, spacing=(1.0, 2.0, 1.0))
    png = path.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", png[16:24])
    rows = zlib.decompress(png[png.index(b"IDAT") + 4 : png.index(b"IEND") - 8])
    pixels = np.frombuffer(rows, np.uint8).reshape(height, 1 + 3 * width)[:, 1:]
    expected = preview.overlay_montage(image, labels, (1.0, 2.0, 1.0))
    np.testing.assert_array_equal(pixels.reshape(expected.shape), expected)


def test_more_than_16_clusters_keep_distinct_colours_and_a_masks_outside_stays_grey():
    """Labels 0 and 16 had the same colour (16 colours, modulo); with --mask, label 0 (the
    outside) was tinted as cluster 0 and every cluster's colour shifted by one."""
    image = np.zeros((3, 40, 4), np.float32)
    labels = np.broadcast_to((np.arange(40) % 20)[None, :, None], image.shape).copy()
    montage = preview.overlay_montage(image, labels, alpha=1.0, min_side=1)
    x_panel = montage[: image.shape[2], : image.shape[1]]  # the x panel: y across, z down
    row = x_panel[0, :20].astype(int)
    assert len({tuple(c) for c in row}) == 20
    np.testing.assert_array_equal(row[:16], preview.PALETTE.astype(int))
    # the outside of a mask: grey (black image, so 0), and cluster 1 keeps cluster 0's colour
    masked = preview.overlay_montage(image, labels, alpha=1.0, min_side=1, outside=True)
    row = masked[0, :3].astype(int)
    np.testing.assert_array_equal(row[0], [0, 0, 0])
    np.testing.assert_array_equal(row[1], preview.PALETTE[0].astype(int))
    np.testing.assert_array_equal(row[2], preview.PALETTE[1].astype(int))


def test_panels_are_drawn_as_viewers_draw_them():
    """The z panel shows x across and y down (Fiji, napari, 3dmod), the y panel x across
    and z down, the x panel y across and z down; anisotropic spacing stretches the axis it
    belongs to."""
    image = np.zeros((24, 16, 8), np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[:, :2, :] = 1  # a bar along x at y = 0, 1
    montage = preview.overlay_montage(image, labels, alpha=1.0, min_side=1)
    x_panel = montage[:8, :16]  # (z down, y across)
    y_panel = montage[:8, 16 + 4 : 16 + 4 + 24]  # (z down, x across)
    z_panel = montage[:16, 16 + 4 + 24 + 4 :]  # (y down, x across)
    colour = preview.PALETTE[1].astype(int)
    assert (z_panel[:2].astype(int) == colour).all() and not (z_panel[2:] == colour).all(-1).any()
    assert (x_panel[:, :2].astype(int) == colour).all()
    assert y_panel.shape == (8, 24, 3)  # the middle y slice (8) misses the bar: label 0
    assert (y_panel.astype(int) == preview.PALETTE[0].astype(int)).all()
    wide = preview.overlay_montage(image, labels, (2.0, 1.0, 1.0), alpha=1.0, min_side=1)
    assert wide.shape[1] == 16 + 4 + 48 + 4 + 48  # x (across) twice as long


def test_extreme_anisotropy_is_drawn_at_a_bounded_size():
    """A voxel size of 1e-30 along one axis (a broken header) asked for a panel 1e30 times
    wider (review: "Maximum allowed size exceeded"); each axis stretches at most 16 times."""
    image = np.random.default_rng(0).random((8, 9, 10)).astype(np.float32)
    labels = (image > 0.5).astype(np.uint8)
    plain = preview.overlay_montage(image, labels, (1.0, 1.0, 1.0))
    huge = preview.overlay_montage(image, labels, (1.0, 1.0, 1e-30))
    assert huge.shape[0] <= 16 * plain.shape[0] and huge.shape[1] <= 16 * plain.shape[1]
    capped = preview.overlay_montage(image, labels, (1.0, 1.0, 1.0 / 16))
    assert huge.shape == capped.shape != plain.shape
