"""Volume I/O: real files written to tmp_path and read back, field by field."""

from __future__ import annotations

import gzip
import io as io_module
import re
from pathlib import Path

import mrcfile
import nibabel as nib
import numpy as np
import pytest

from hypsegcli import io
from hypsegcli.errors import BadInputError, HypsegError

AFFINE = np.array(
    [[0.0, -2.0, 0.0, 10.0], [1.5, 0.0, 0.1, -3.0], [0.0, 0.0, 0.75, 5.0], [0.0, 0.0, 0.0, 1.0]]
)


def _nifti(path, data, *, qcode=1, scode=2, cls=nib.Nifti1Image):
    img = cls(data, AFFINE)
    img.set_qform(AFFINE, code=qcode)
    img.set_sform(AFFINE, code=scode)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    return img


def _mrc(path, data_xyz, voxel=(1.5, 2.5, 3.5), origin=(7.0, -2.0, 4.0), start=(3, 0, -1)):
    with mrcfile.new(str(path), overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(np.transpose(data_xyz, (2, 1, 0))))
        mrc.voxel_size = voxel
        mrc.header.origin.x, mrc.header.origin.y, mrc.header.origin.z = origin
        mrc.header.nxstart, mrc.header.nystart, mrc.header.nzstart = start


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("cls", [nib.Nifti1Image, nib.Nifti2Image])
def test_nifti_round_trip_keeps_geometry(tmp_path, suffix, cls):
    rng = np.random.default_rng(0)
    data = rng.random((5, 6, 7)).astype(np.float32)
    src = tmp_path / f"img{suffix}"
    src_img = _nifti(src, data, cls=cls)
    src_qform = nib.load(str(src)).header.get_qform()
    vol = io.read_volume(src)
    assert vol.data.dtype == np.float32 and vol.data.shape == (5, 6, 7)
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.geometry.spacing, src_img.header.get_zooms()[:3], rtol=1e-6)
    assert vol.geometry.unit == "mm"
    labels = (data * 3).astype(np.int64)
    out = tmp_path / f"labels{suffix}"
    io.write_labels(out, labels, vol.geometry)
    img = nib.load(str(out))
    assert isinstance(img, cls)
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), labels)
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-6)
    qform, qcode = img.header.get_qform(coded=True)
    sform, scode = img.header.get_sform(coded=True)
    assert (int(qcode), int(scode)) == (1, 2)
    np.testing.assert_allclose(
        qform, src_qform, atol=1e-6
    )  # qform cannot hold shear: the source's own
    np.testing.assert_allclose(sform, AFFINE, atol=1e-6)
    assert img.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(img.header.get_zooms(), vol.geometry.spacing, rtol=1e-6)


@pytest.mark.parametrize("qcode, scode", [(0, 1), (4, 0), (0, 0), (2, 4)])
def test_nifti_labels_keep_every_geometry_field_verbatim(tmp_path, qcode, scode):
    """Inactive forms (code 0) and pixdim are copied as stored, not re-derived from the active
    affine; only the data type, the intent and the descriptive fields change."""
    data = np.random.default_rng(3).random((5, 6, 7)).astype(np.float32)
    img = nib.Nifti1Image(data, AFFINE)
    img.set_qform(np.diag([0.9, -0.8, 1.1, 1.0]), code=qcode)
    img.set_sform(AFFINE, code=scode)
    img.header["pixdim"][1:4] = [0.7, 1.3, 2.1]  # need not match either form
    img.header["intent_name"] = b"myintent"
    img.header.set_xyzt_units("micron", "sec")
    nib.save(img, str(tmp_path / "src.nii.gz"))
    vol = io.read_volume(tmp_path / "src.nii.gz")
    io.write_labels(tmp_path / "lab.nii.gz", (data > 0.5).astype(np.int64), vol.geometry)
    src, out = nib.load(str(tmp_path / "src.nii.gz")), nib.load(str(tmp_path / "lab.nii.gz"))
    changed = {"datatype", "bitpix", "intent_code", "intent_name", "cal_max", "descrip"}
    for key in src.header.keys():
        if key not in changed:
            a, b = np.asarray(src.header[key]), np.asarray(out.header[key])
            assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), key
    assert int(out.header["intent_code"]) == 1002 and out.header["intent_name"].item() == b""
    np.testing.assert_array_equal(out.affine, src.affine)


def test_nifti_scaling_applied_and_squeezed_4d(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4, 1)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(0.5, 10.0)
    nib.save(img, str(tmp_path / "s.nii.gz"))
    vol = io.read_volume(tmp_path / "s.nii.gz")
    assert vol.data.shape == (2, 3, 4)
    np.testing.assert_allclose(vol.data, data[..., 0] * 0.5 + 10.0)


def test_a_4d_nifti_of_one_volume_keeps_its_pixdim_past_the_third(tmp_path):
    """Review: a 4D file of one volume with TR 2 s (pixdim[4]) was written back with
    pixdim[4] 1, as nibabel resets the spacings past the data's dimensions."""
    img = nib.Nifti1Image(np.zeros((4, 5, 6, 1), np.float32), np.diag([0.8, 0.8, 3, 1]))
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4:] = [2.0, 0.5, 0.25, 0.125]
    nib.save(img, str(tmp_path / "fmri.nii.gz"))
    vol = io.read_volume(tmp_path / "fmri.nii.gz")
    io.write_labels(tmp_path / "l.nii.gz", np.ones((4, 5, 6), np.int64), vol.geometry)
    out = nib.load(tmp_path / "l.nii.gz").header
    assert out["dim"][0] == 3 and out.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_array_equal(out["pixdim"][1:], np.float32([0.8, 0.8, 3, 2, 0.5, 0.25, 0.125]))


def test_mrc_axis_convention_and_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.random((4, 5, 6)).astype(np.float32)  # [x, y, z]
    src = tmp_path / "tomo.mrc"
    _mrc(src, data)
    with mrcfile.open(str(src)) as mrc:
        assert mrc.data.shape == (6, 5, 4)  # mrcfile: (z, y, x)
    vol = io.read_volume(src)
    np.testing.assert_array_equal(vol.data, data)
    assert vol.geometry.spacing == (1.5, 2.5, 3.5)
    assert vol.geometry.unit == "Å"
    np.testing.assert_allclose(vol.geometry.affine[:3, 3], [7.0 + 3 * 1.5, -2.0, 4.0 - 3.5])
    labels = rng.integers(0, 8, size=data.shape)
    for suffix in (".mrc", ".map", ".rec"):
        out = tmp_path / f"labels{suffix}"
        io.write_labels(out, labels, vol.geometry)
        with mrcfile.open(str(out)) as mrc:
            assert mrc.data.dtype == np.int8
            np.testing.assert_array_equal(np.transpose(mrc.data, (2, 1, 0)), labels)
            assert tuple(float(v) for v in mrc.voxel_size.tolist()) == (1.5, 2.5, 3.5)
            assert (
                float(mrc.header.origin.x),
                float(mrc.header.origin.y),
                float(mrc.header.origin.z),
            ) == (7.0, -2.0, 4.0)
            assert (int(mrc.header.nxstart), int(mrc.header.nystart), int(mrc.header.nzstart)) == (
                3,
                0,
                -1,
            )
        back = io.read_volume(out)
        np.testing.assert_array_equal(back.data, labels)
        np.testing.assert_allclose(back.geometry.affine, vol.geometry.affine)


def test_mrc_nonstandard_axis_order(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # [x, y, z]
    path = tmp_path / "swapped.mrc"
    with mrcfile.new(str(path)) as mrc:
        # columns = y, rows = x, sections = z: stored array (z, x, y)
        mrc.set_data(np.ascontiguousarray(np.transpose(data, (2, 0, 1))))
        mrc.header.mapc, mrc.header.mapr, mrc.header.maps = 2, 1, 3
    np.testing.assert_array_equal(io.read_volume(path).data, data)


def test_mrc_starts_follow_the_axis_order(tmp_path):
    """NC/NR/NSSTART (mrcfile's nx/ny/nzstart) are the column, row and section starts: with
    columns = z and sections = x the x start is the section start. Outputs are written in the
    standard order, so their starts must be permuted too (same affine on reading back)."""
    data = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # [x, y, z]
    path = tmp_path / "zyx.mrc"
    with mrcfile.new(str(path)) as mrc:
        # columns = z, rows = y, sections = x: the stored array is (x, y, z)
        mrc.set_data(np.ascontiguousarray(data))
        mrc.header.mapc, mrc.header.mapr, mrc.header.maps = 3, 2, 1
        mrc.header.mx, mrc.header.my, mrc.header.mz = 2, 3, 4  # cell sampling along x, y, z
        mrc.header.cella.x, mrc.header.cella.y, mrc.header.cella.z = 3.0, 7.5, 14.0
        mrc.header.nxstart, mrc.header.nystart, mrc.header.nzstart = 3, -4, 5  # z, y, x starts
    vol = io.read_volume(path)
    np.testing.assert_array_equal(vol.data, data)
    assert vol.geometry.spacing == (1.5, 2.5, 3.5)
    np.testing.assert_allclose(vol.geometry.affine[:3, 3], [5 * 1.5, -4 * 2.5, 3 * 3.5])
    out = tmp_path / "labels.mrc"
    io.write_labels(out, (data > 10).astype(np.int64), vol.geometry)
    with mrcfile.open(str(out)) as mrc:
        assert (int(mrc.header.mapc), int(mrc.header.mapr), int(mrc.header.maps)) == (1, 2, 3)
        assert (int(mrc.header.nxstart), int(mrc.header.nystart), int(mrc.header.nzstart)) == (
            5,
            -4,
            3,
        )
    back = io.read_volume(out)
    np.testing.assert_array_equal(back.data, data > 10)
    np.testing.assert_allclose(back.geometry.affine, vol.geometry.affine)


def test_mrc_outputs_keep_labels_and_unknown_voxel_size_and_are_reproducible(tmp_path):
    """The source's text labels are kept (mrcfile's timestamped "Created by" label is not
    added, so the same data give the same bytes), and a voxel size of 0 (unknown) stays 0 in
    the outputs while reading uses 1 for the spacing."""
    data = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    src = tmp_path / "novox.mrc"
    with mrcfile.new(str(src)) as mrc:
        mrc.set_data(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
        mrc.voxel_size = 0.0
        mrc.header.label[:] = b""
        mrc.header.nlabl = 0
        mrc.add_label("tilt series 7, aligned")
        mrc.add_label("binned 4x")
    vol = io.read_volume(src)
    assert vol.geometry.spacing == (1.0, 1.0, 1.0)
    assert vol.geometry.unit == "voxel"  # distances are in voxels, not Å
    outs = []
    for name in ("a.mrc", "b.mrc"):
        io.write_labels(tmp_path / name, (data > 30).astype(np.int64), vol.geometry)
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1]
    with mrcfile.open(str(tmp_path / "a.mrc")) as mrc:
        assert tuple(float(v) for v in mrc.voxel_size.tolist()) == (0.0, 0.0, 0.0)
        labels = [bytes(x).decode().strip() for x in mrc.header.label[: int(mrc.header.nlabl)]]
    assert labels == ["tilt series 7, aligned", "binned 4x", "hypseg labels"]
    # a source with all 10 labels keeps them all (hypseg's own dropped the source's last)
    full = tmp_path / "full.mrc"
    with mrcfile.new(str(full)) as mrc:
        mrc.set_data(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
        mrc.header.label[:] = b""
        mrc.header.nlabl = 0
        for i in range(10):
            mrc.add_label(f"label {i}")
    io.write_labels(tmp_path / "f.mrc", (data > 30).astype(np.int64), io.read_volume(full).geometry)
    with mrcfile.open(str(tmp_path / "f.mrc")) as mrc:
        labels = [bytes(x).decode().strip() for x in mrc.header.label[: int(mrc.header.nlabl)]]
    assert labels == [f"label {i}" for i in range(10)]
    # a generated volume (no source header) gets only hypseg's label
    plain = io.VolumeGeometry.default((3, 4, 5), format="mrc")
    io.write_volume(tmp_path / "c.mrc", data, plain)
    with mrcfile.open(str(tmp_path / "c.mrc")) as mrc:
        assert int(mrc.header.nlabl) == 1 and bytes(mrc.header.label[0]).strip() == b"hypseg"


def test_label_dtype_widens():
    assert io.label_dtype(np.array([0, 255]), "nifti") == np.uint8
    assert io.label_dtype(np.array([0, 256]), "nifti") == np.uint16
    assert io.label_dtype(np.array([0, 127]), "mrc") == np.int8
    assert io.label_dtype(np.array([0, 300]), "mrc") == np.int16


def test_refuses_2d_and_true_4d(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 5), np.float32), np.eye(4)), str(tmp_path / "flat.nii"))
    nib.save(
        nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.float32), np.eye(4)), str(tmp_path / "four.nii")
    )
    with pytest.raises(BadInputError, match=r"flat\.nii: 2D data of shape \(4, 5\)"):
        io.read_volume(tmp_path / "flat.nii")
    with pytest.raises(BadInputError, match=r"four\.nii: 4D data of shape \(4, 5, 6, 2\)"):
        io.read_volume(tmp_path / "four.nii")
    # a vector field (5th axis of 3 after a singleton time axis) is 5D, not "4D"
    nib.save(
        nib.Nifti1Image(np.zeros((4, 5, 6, 1, 3), np.float32), np.eye(4)),
        str(tmp_path / "field.nii"),
    )
    with pytest.raises(BadInputError, match=r"field\.nii: 5D data of shape \(4, 5, 6, 1, 3\)"):
        io.read_volume(tmp_path / "field.nii")


def test_truncated_and_garbage_files(tmp_path):
    _nifti(tmp_path / "ok.nii", np.ones((8, 8, 8), np.float32))
    raw = (tmp_path / "ok.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[: len(raw) - 500])
    with gzip.open(tmp_path / "cut.nii.gz", "wb") as fh:
        fh.write(raw[: len(raw) - 500])
    (tmp_path / "junk.nii.gz").write_bytes(b"not a volume at all")
    _mrc(tmp_path / "ok.mrc", np.ones((8, 8, 8), np.float32))
    raw = (tmp_path / "ok.mrc").read_bytes()
    (tmp_path / "cut.mrc").write_bytes(raw[: len(raw) - 700])
    for name in ("cut.nii", "cut.nii.gz", "junk.nii.gz", "cut.mrc"):
        with pytest.raises(BadInputError, match=name.replace(".", r"\.")) as info:
            io.read_volume(tmp_path / name)
        assert "\n" not in str(info.value)
        if name.startswith("cut"):
            assert "truncated" in str(info.value)
    with pytest.raises(BadInputError, match=r"need 2400 bytes, the file has 1900"):
        io.read_volume(tmp_path / "cut.nii")
    # an interrupted copy: the gzip stream itself stops short
    _nifti(tmp_path / "noise.nii.gz", np.random.default_rng(0).random((16, 16, 16), np.float32))
    (tmp_path / "copy.nii.gz").write_bytes((tmp_path / "noise.nii.gz").read_bytes()[:3000])
    with pytest.raises(BadInputError, match=r"copy\.nii\.gz: truncated NIfTI \(Compressed file"):
        io.read_volume(tmp_path / "copy.nii.gz")
    # where nibabel "cannot work out file type", the first bytes say why
    ok = (tmp_path / "ok.nii").read_bytes()
    two = tmp_path / "two.nii"
    nib.save(nib.Nifti2Image(np.ones((4, 4, 4), np.float32), np.eye(4)), two)
    files = {
        "gz60.nii.gz": (
            (tmp_path / "noise.nii.gz").read_bytes()[:60],
            "truncated NIfTI \\(the gzip stream ends before the header\\)",
        ),
        "gzhead.nii.gz": (
            gzip.compress(ok[:300]),
            "truncated NIfTI \\(the file ends inside its 348-byte header\\)",
        ),
        "head.nii": (ok[:200], "truncated NIfTI \\(the file ends inside its 348-byte header\\)"),
        "head2.nii": (
            two.read_bytes()[:400],
            "truncated NIfTI \\(the file ends inside its 540-byte header\\)",
        ),
        "empty.nii.gz": (b"", "empty file"),
        "renamed.nii": (
            (tmp_path / "noise.nii.gz").read_bytes(),
            "gzip-compressed data in a file not named \\.gz",
        ),
        "lfs.nii.gz": (
            b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n",
            "a Git LFS pointer",
        ),
        "html.nii.gz": (gzip.compress(b"<html>404 not found</html>"), "cannot read NIfTI"),
    }
    for name, (blob, why) in files.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(BadInputError, match=rf"^\S*{re.escape(name)}: {why}"):
            io.read_volume(tmp_path / name)
    assert io.read_volume(two).data.shape == (4, 4, 4)  # a whole NIfTI-2 reads
    # gzip members one after another (cat a.gz b.gz) are one stream: a first member
    # shorter than the header is no cut
    bad = bytearray(ok)
    bad[70:72] = (4096).to_bytes(2, "little")  # an unknown datatype code
    (tmp_path / "members.nii.gz").write_bytes(gzip.compress(bad[:100]) + gzip.compress(bad[100:]))
    with pytest.raises(BadInputError, match=r"members\.nii\.gz: cannot read NIfTI \(data code"):
        io.read_volume(tmp_path / "members.nii.gz")
    # a file that is not gzip at all, though named so, stays "cannot read"
    with pytest.raises(BadInputError, match=r"junk\.nii\.gz: cannot read NIfTI"):
        io.read_volume(tmp_path / "junk.nii.gz")


def test_nifti_header_claiming_more_than_the_file_or_memory(tmp_path, monkeypatch):
    """A header whose shape needs terabytes is refused from the file size (uncompressed),
    and where it must be read, running out of memory says what was being read."""
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    header = img.header.copy()
    header.set_data_shape((10000, 10000, 10000))
    blob = header.binaryblock + b"\0" * 4 + np.ones(64, np.float32).tobytes()
    (tmp_path / "huge.nii").write_bytes(blob)
    with pytest.raises(BadInputError, match=r"huge\.nii: truncated NIfTI .*10000x10000x10000"):
        io.read_volume(tmp_path / "huge.nii")
    with gzip.open(tmp_path / "huge.nii.gz", "wb") as fh:
        fh.write(blob)
    # compressed, a header that claims more than gzip data of the file's size can hold
    # (QA: "out of memory", exit 1, for a 3 kB file) is corrupt: bad input
    with pytest.raises(BadInputError, match=r"huge\.nii\.gz: corrupt or truncated NIfTI .*10000x"):
        io.read_volume(tmp_path / "huge.nii.gz")

    def no_memory(*_args, **_kwargs):
        raise MemoryError

    monkeypatch.setattr(io, "GZIP_MAX_RATIO", 10**12)  # as if it could: then it is read
    monkeypatch.setattr(io.np, "asarray", no_memory)
    with pytest.raises(HypsegError) as info:
        io.read_volume(tmp_path / "huge.nii.gz")
    assert info.value.exit_code == 1
    assert str(info.value) == (
        f"{tmp_path / 'huge.nii.gz'}: out of memory reading 10000x10000x10000 voxels "
        "(4000.0 GB as float32)"
    )


def test_gzip_bound_admits_the_most_compressible_volumes(tmp_path):
    """The bound of the header check above: zeros, the most compressible data, at gzip's
    strongest level (about 1028 to 1) are read; a header asking one voxel more per 1040
    bytes than that file holds is refused."""
    header = nib.Nifti1Image(np.zeros((128, 128, 64), np.float32), np.eye(4)).header.copy()
    header.set_data_offset(352)
    raw = header.binaryblock + b"\0" * 4 + np.zeros(128 * 128 * 64, np.float32).tobytes()
    path = tmp_path / "zeros.nii.gz"
    path.write_bytes(gzip.compress(raw, compresslevel=9))
    assert len(raw) > 1000 * path.stat().st_size  # as compressible as gzip makes anything
    assert io.read_volume(path).data.shape == (128, 128, 64)
    side = int((io.GZIP_MAX_RATIO * path.stat().st_size + 4096) // (128 * 128 * 4)) + 1
    header.set_data_shape((128, 128, side))
    path.write_bytes(gzip.compress(header.binaryblock + raw[352:], compresslevel=9))
    with pytest.raises(BadInputError, match=r"corrupt or truncated NIfTI"):
        io.read_volume(path)


def test_non_finite_refused(tmp_path):
    data = np.ones((4, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    _nifti(tmp_path / "nan.nii.gz", data)
    with pytest.raises(BadInputError, match=r"nan\.nii\.gz: 2 voxel\(s\) are NaN or infinite"):
        io.read_volume(tmp_path / "nan.nii.gz")
    assert np.isnan(io.read_volume(tmp_path / "nan.nii.gz", allow_nonfinite=True).data[1, 2, 3])


def test_collect_inputs_files_folders_globs(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.nii.gz", "a.mrc", "sub/c.nii"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("hi")
    warnings = []
    found = io.collect_inputs([tmp_path], warn=warnings.append)
    assert [p.name for p in found] == ["a.mrc", "b.nii.gz"]
    assert len(warnings) == 1 and "notes.txt" in warnings[0]
    found = io.collect_inputs([tmp_path], recursive=True, warn=warnings.append)
    assert [p.name for p in found] == ["a.mrc", "b.nii.gz", "c.nii"]
    found = io.collect_inputs([str(tmp_path / "*.nii.gz"), tmp_path / "a.mrc", tmp_path / "a.mrc"])
    assert [p.name for p in found] == ["b.nii.gz", "a.mrc"]
    with pytest.raises(BadInputError, match="no such file or folder"):
        io.collect_inputs([tmp_path / "missing.nii"])
    with pytest.raises(BadInputError, match="unsupported file type"):
        io.collect_inputs([tmp_path / "notes.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="no volume found"):
        io.collect_inputs([tmp_path / "empty"])
    with pytest.raises(BadInputError, match="pattern matches no volume"):
        io.collect_inputs([str(tmp_path / "*.mrcx")])


def test_collect_inputs_recursive_follows_linked_folders_once(tmp_path):
    """A data folder linked into the project (as on clusters) is searched; a link back up
    the tree is not followed round and round."""
    data = tmp_path / "store" / "scans"
    (data / "deep").mkdir(parents=True)
    (data / "deep" / "d.nii.gz").write_bytes(b"x")
    project = tmp_path / "project"
    (project / "own").mkdir(parents=True)
    (project / "own" / "e.mrc").write_bytes(b"x")
    (project / "linked").symlink_to(data, target_is_directory=True)
    (data / "deep" / "up").symlink_to(tmp_path, target_is_directory=True)  # a loop
    found = io.collect_inputs([project], recursive=True)
    assert [p.relative_to(project).as_posix() for p in found] == [
        "linked/deep/d.nii.gz",
        "own/e.mrc",
    ]
    with pytest.raises(BadInputError, match="no volume found"):
        io.collect_inputs([project])  # not recursive: sub-folders are not searched


def test_case_name():
    assert io.case_name("a/b/case_001.nii.gz") == "case_001"
    assert io.case_name("x.MRC") == "x"
    assert io.case_name("t.rec") == "t"


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.nii.gz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


def test_write_shape_mismatch_is_an_error(tmp_path):
    geometry = io.VolumeGeometry.default((4, 4, 4))
    with pytest.raises(BadInputError, match="differs from geometry shape"):
        io.write_labels(tmp_path / "x.nii.gz", np.zeros((4, 4, 5), int), geometry)


def test_default_geometry_both_formats(tmp_path):
    data = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    for fmt, suffix in (("nifti", ".nii.gz"), ("mrc", ".mrc")):
        geometry = io.VolumeGeometry.default(data.shape, format=fmt, spacing=(2.0, 2.0, 2.0))
        assert geometry.suffix == suffix
        io.write_volume(tmp_path / f"v{suffix}", data, geometry)
        back = io.read_volume(tmp_path / f"v{suffix}")
        np.testing.assert_array_equal(back.data, data)
        assert back.geometry.spacing == (2.0, 2.0, 2.0)


def test_hashes_are_content_based(tmp_path):
    a = np.arange(10, dtype=np.float32)
    assert io.array_sha256(a) == io.array_sha256(a.copy())
    assert io.array_sha256(a) != io.array_sha256(a.reshape(2, 5))
    (tmp_path / "f").write_bytes(b"abc")
    assert (
        io.file_sha256(tmp_path / "f")
        == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


@pytest.mark.parametrize("cell", [36.0, 0.0])
def test_mrc_with_zero_sampling_has_an_unknown_voxel_size(tmp_path, caplog, cell):
    """mx = my = mz = 0 makes mrcfile's voxel size cell / 0 = inf (or nan for a zero cell):
    it is read as unknown (spacing 1) with a warning, and written back as 0, not inf or nan."""
    data = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    src = tmp_path / "nosampling.mrc"
    with mrcfile.new(str(src)) as mrc:
        mrc.set_data(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
        mrc.header.mx = mrc.header.my = mrc.header.mz = 0
        mrc.header.cella.x = mrc.header.cella.y = mrc.header.cella.z = cell
    with caplog.at_level("WARNING"):
        vol = io.read_volume(src)
    assert "nosampling.mrc: MRC voxel size" in caplog.text and "not finite" in caplog.text
    assert vol.geometry.spacing == (1.0, 1.0, 1.0)
    assert np.isfinite(vol.geometry.affine).all()
    record = io.geometry_record(vol.geometry)
    assert record["voxel_size"] == [0.0, 0.0, 0.0]
    io.write_labels(tmp_path / "out.mrc", (data > 30).astype(np.int64), vol.geometry)
    with mrcfile.open(str(tmp_path / "out.mrc")) as mrc:
        assert tuple(float(v) for v in mrc.voxel_size.tolist()) == (0.0, 0.0, 0.0)
        assert np.isfinite([mrc.header.cella.x, mrc.header.cella.y, mrc.header.cella.z]).all()


def test_a_failed_write_names_the_output_and_leaves_nothing(tmp_path, monkeypatch):
    """A full disk (an OSError without a file name) while writing a volume, a model file or
    a text file: one HypsegError naming the output, no temporary file left (review: "No
    space left on device" alone, or the input's name)."""
    import errno

    from hypsegcli.modelfile import save_model_file

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    geometry = io.VolumeGeometry("nifti", (4, 4, 4), (1.0, 1.0, 1.0), np.eye(4))
    monkeypatch.setattr(io, "_write_nifti", full)
    with pytest.raises(HypsegError, match=r"out_k2\.nii\.gz: cannot write \(No space left"):
        io.write_labels(tmp_path / "out_k2.nii.gz", np.zeros((4, 4, 4), np.uint8), geometry)
    monkeypatch.setattr("pathlib.Path.write_bytes", full)
    with pytest.raises(HypsegError, match=r"model\.pt: cannot write \(No space left"):
        save_model_file(tmp_path / "model.pt", {"x": 1})
    with pytest.raises(HypsegError, match=r"rec\.json: cannot write \(No space left"):
        io.write_text_atomic(tmp_path / "rec.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_an_output_name_that_fits_is_written_whatever_the_temporary_prefix(tmp_path):
    """The temporary name adds ~22 characters: an output of 243 (or 255) bytes failed
    with "File name too long" after all the work (review)."""
    geometry = io.VolumeGeometry("nifti", (4, 4, 4), (1.0, 1.0, 1.0), np.eye(4))
    labels = np.arange(64, dtype=np.uint8).reshape(4, 4, 4) % 3
    for name in ("a" * 236 + "_k2.nii", "b" * 248 + ".nii.gz", "é" * 120 + "_k4.nii.gz"):
        io.write_labels(tmp_path / name, labels, geometry)
        np.testing.assert_array_equal(io.read_volume(tmp_path / name, native=True).data, labels)
    io.write_text_atomic(tmp_path / ("c" * 255), "x")
    assert sorted(p.name[:1] for p in tmp_path.iterdir()) == ["a", "b", "c", "é"]


def test_a_mrc_voxel_size_known_on_some_axes_only_gives_distances_in_voxels(tmp_path, caplog):
    """Voxel size (3, 0, 3): Å along x and z, voxels along y would mix in every distance
    (review: evaluate reported 2 voxels as "2 Å"); all axes count in voxels, with a
    warning, and the stored sizes are written back as they were."""
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    src = tmp_path / "partial.mrc"
    with mrcfile.new(str(src)) as mrc:
        mrc.set_data(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
        mrc.voxel_size = (3.0, 0.0, 3.0)
    with caplog.at_level("WARNING"):
        vol = io.read_volume(src)
    assert "partial.mrc: MRC voxel size 3x0x3 is unknown (0) along some axes" in caplog.text
    assert vol.geometry.spacing == (1.0, 1.0, 1.0) and vol.geometry.unit == "voxel"
    np.testing.assert_array_equal(np.diag(vol.geometry.affine)[:3], [1.0, 1.0, 1.0])
    io.write_labels(tmp_path / "out.mrc", (data > 30).astype(np.int64), vol.geometry)
    with mrcfile.open(str(tmp_path / "out.mrc")) as mrc:
        assert tuple(float(v) for v in mrc.voxel_size.tolist()) == (3.0, 0.0, 3.0)


@pytest.mark.parametrize("pixdim", [np.nan, np.inf])  # (nibabel itself fixes 0 and < 0)
def test_a_nifti_pixdim_that_is_not_a_positive_number_is_replaced(tmp_path, caplog, pixdim):
    """pixdim NaN (review: cluster --preview failed with "cannot convert float NaN to
    integer", embed wrote NaN into its JSON): the voxel size comes from the affine, with a
    warning; the header is written back as stored."""
    data = np.random.default_rng(0).normal(size=(6, 5, 4)).astype(np.float32)
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    img = nib.Nifti1Image(data, affine)
    img.header["pixdim"][1] = pixdim
    src = tmp_path / "p.nii"
    nib.save(img, src)
    with caplog.at_level("WARNING"):
        vol = io.read_volume(src)
    assert "p.nii: voxel size (pixdim)" in caplog.text and "is not a positive number" in caplog.text
    assert vol.geometry.spacing == (2.0, 3.0, 4.0)
    np.testing.assert_array_equal(vol.geometry.affine, affine)
    io.write_labels(tmp_path / "o.nii", (data > 0).astype(np.uint8), vol.geometry)
    assert nib.load(tmp_path / "o.nii").header["pixdim"][1] == pytest.approx(pixdim, nan_ok=True)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_nifti_pixdim_nibabel_fixes_on_loading_is_written_as_stored(tmp_path, suffix):
    """nibabel makes a negative pixdim positive and a qfac (pixdim[0]) of 0 one when it
    loads a header; the outputs copied that fixed header (review: pixdim (0, -2, 1.5, 3)
    became (1, 2, 1.5, 3), so that readers built on nifti1_io, which take a step that is not
    positive as 1, put the output's voxels elsewhere than the source's). The stored values
    are written back; reading uses nibabel's (with its warning), and the geometry hash sees
    the difference."""
    data = np.random.default_rng(0).normal(size=(6, 5, 4)).astype(np.float32)
    img = nib.Nifti1Image(data, None)
    img.set_qform(np.diag([2.0, 1.5, 3.0, 1.0]), code=1)
    img.set_sform(None, code=0)
    nib.save(img, tmp_path / "plain.nii")
    plain = (tmp_path / "plain.nii").read_bytes()
    stored = np.array([0.0, -2.0, 1.5, 3.0], "<f4")
    patched = plain[:76] + stored.tobytes() + plain[92:]  # pixdim[0:4], as edited by hand
    hashes = {}
    for name, raw, expected in (
        ("stored", patched, stored),
        ("plain", plain, np.array([1.0, 2.0, 1.5, 3.0], "<f4")),
    ):
        src = tmp_path / f"{name}{suffix}"
        src.write_bytes(gzip.compress(raw, mtime=0) if suffix == ".nii.gz" else raw)
        vol = io.read_volume(src)
        hashes[name] = io.geometry_sha256(vol.geometry)
        assert vol.geometry.spacing == (2.0, 1.5, 3.0)
        out = tmp_path / f"o_{name}{suffix}"
        io.write_labels(out, (data > 0).astype(np.uint8), vol.geometry)
        with nib.openers.ImageOpener(str(out)) as f:
            written = nib.Nifti1Header.from_fileobj(f, check=False)["pixdim"][:4]
        np.testing.assert_array_equal(written, expected)
        np.testing.assert_array_equal(nib.load(out).affine, nib.load(src).affine)
    assert hashes["stored"] != hashes["plain"]


@pytest.mark.parametrize("flags, unsigned", [(0, True), (1, False), (None, False)])
def test_imod_unsigned_byte_mrc(tmp_path, flags, unsigned):
    """Mode 0 is signed in MRC2014, but IMOD stamps files whose bytes are unsigned (flags
    bit 0 clear): 200 must read as 200 there, not -56."""
    import mrcfile

    values = np.arange(0, 256, dtype=np.int64).reshape(4, 8, 8)  # (z, y, x) as stored
    path = tmp_path / "imod.mrc"
    with mrcfile.new(str(path)) as mrc:
        mrc.set_data(values.astype(np.uint8).view(np.int8))
        if flags is not None:
            extra = bytearray(bytes(mrc.header.extra2))
            extra[40:48] = np.array([io.IMOD_STAMP, flags], dtype="<i4").tobytes()
            mrc.header.extra2 = bytes(extra)
    data = io.read_volume(path).data  # (x, y, z)
    want = values if unsigned else values.astype(np.uint8).view(np.int8).astype(np.int64)
    np.testing.assert_array_equal(data, np.transpose(want, (2, 1, 0)).astype(np.float32))
    assert io.read_volume(path, native=True).data.dtype == (np.uint8 if unsigned else np.int8)


def test_mrc_cell_angles_and_space_group_are_kept(tmp_path, caplog):
    import mrcfile

    path = tmp_path / "crystal.map"
    with mrcfile.new(str(path)) as mrc:
        mrc.set_data(np.arange(336, dtype=np.float32).reshape(6, 7, 8))
        mrc.voxel_size = (1.2, 1.2, 1.5)
        mrc.header.cellb.beta = 105.0
        mrc.header.ispg = 4
    volume = io.read_volume(path)
    assert "cell angles 90/105/90 are not 90 degrees" in caplog.text
    record = io.geometry_record(volume.geometry)
    assert record["cell_angles"] == [90.0, 105.0, 90.0] and record["space_group"] == 4
    out = tmp_path / "labels.map"
    io.write_labels(out, np.zeros(volume.data.shape, np.uint8), volume.geometry)
    with mrcfile.open(str(out)) as mrc:
        cellb = mrc.header.cellb
        assert (float(cellb.alpha), float(cellb.beta), float(cellb.gamma)) == (90.0, 105.0, 90.0)
        assert int(mrc.header.ispg) == 4
    assert mrcfile.validate(str(out), print_file=io_module.StringIO())
    # a plain volume's record is as before (no new keys: its outputs' records still match)
    plain = tmp_path / "plain.mrc"
    with mrcfile.new(str(plain)) as mrc:
        mrc.set_data(np.zeros((3, 4, 5), np.float32))
    record = io.geometry_record(io.read_volume(plain).geometry)
    assert "cell_angles" not in record and "space_group" not in record


def test_bids_key_and_match():
    assert io.bids_key("sub-01_ses-1_desc-preproc_T1w") == (("ses-1", "sub-01"), "T1w")
    assert io.bids_key("sub-01_desc-brain_mask") == (("sub-01",), "mask")
    for name in ("case_000", "case_000_mask", "sub-01", "desc-brain_mask", "sub-01_T1w_k4", "a-b_"):
        assert io.bids_key(name) is None, name
    files = [
        Path(n)
        for n in (
            "sub-01_desc-brain_mask.nii.gz",
            "sub-01_space-MNI_desc-brain_mask.nii.gz",
            "sub-02_desc-brain_mask.nii.gz",
            "sub-01_dseg.nii.gz",
            "sub-01_desc-brain_T1w.nii.gz",
        )
    ]
    assert io.bids_match("sub-01_desc-preproc_T1w", files, "mask") == [files[0]]
    assert io.bids_match("sub-01_space-MNI_T1w", files, "mask") == [files[1]]
    assert io.bids_match("sub-01_ses-1_T1w", files, "mask") == []  # another session's entities
    assert io.bids_match("sub-01_T1w", files, "dseg") == [files[3]]
    assert io.bids_match("case_000", files, "mask") == []


def test_collect_inputs_keeps_quiet_about_sidecars(tmp_path):
    (tmp_path / "sub-01_T1w.nii.gz").write_bytes(b"x")
    (tmp_path / "sub-01_T1w.json").write_text("{}")  # BIDS sidecar: part of the volume
    (tmp_path / "sub-02_T1w.json").write_text("{}")  # no volume: a stray file
    warnings = []
    found = io.collect_inputs([tmp_path], warn=warnings.append)
    assert [p.name for p in found] == ["sub-01_T1w.nii.gz"]
    assert len(warnings) == 1 and "skipped 1 file(s)" in warnings[0], warnings
    assert "sub-02_T1w.json" in warnings[0]


def test_mrc_volume_stack_of_one_volume_is_read_and_other_files_named(tmp_path):
    """A volume stack (ispg 401) holding one volume is that volume, as a 4D NIfTI of one is;
    a file that is no MRC at all says so rather than "empty MRC data"."""
    xyz = np.random.default_rng(0).random((12, 10, 8)).astype(np.float32)
    with mrcfile.new(str(tmp_path / "stack.mrc")) as mrc:
        mrc.set_data(np.transpose(xyz, (2, 1, 0))[None].copy())
        mrc.voxel_size = 2.0
    with mrcfile.open(str(tmp_path / "stack.mrc")) as mrc:
        assert int(mrc.header.ispg) == 401 and mrc.data.ndim == 4
    vol = io.read_volume(tmp_path / "stack.mrc")
    np.testing.assert_array_equal(vol.data, xyz)
    assert vol.geometry.spacing == (2.0, 2.0, 2.0)
    io.write_labels(tmp_path / "out.mrc", (xyz > 0.5).astype(np.uint8), vol.geometry)
    assert mrcfile.validate(str(tmp_path / "out.mrc"), print_file=io_module.StringIO())
    with mrcfile.open(str(tmp_path / "out.mrc")) as mrc:
        assert int(mrc.header.ispg) == 1 and mrc.data.shape == (8, 10, 12)
    # a volume stack of space group 19 (ispg 419) holding one volume: a volume of group 19
    with mrcfile.open(str(tmp_path / "stack.mrc"), "r+") as mrc:
        mrc.header.ispg = 419
    io.write_labels(
        tmp_path / "p.mrc",
        (xyz > 0.5).astype(np.uint8),
        io.read_volume(tmp_path / "stack.mrc").geometry,
    )
    with mrcfile.open(str(tmp_path / "p.mrc")) as mrc:
        assert int(mrc.header.ispg) == 19 and mrc.data.shape == (8, 10, 12)
    with mrcfile.new(str(tmp_path / "two.mrc")) as mrc:
        mrc.set_data(np.zeros((2, 8, 10, 12), np.float32))
    with pytest.raises(BadInputError, match=r"two\.mrc: 4D data of shape \(2, 8, 10, 12\)"):
        io.read_volume(tmp_path / "two.mrc")
    _nifti(tmp_path / "a.nii", xyz)
    (tmp_path / "wrong.mrc").write_bytes((tmp_path / "a.nii").read_bytes())
    (tmp_path / "tiff.mrc").write_bytes(b"II*\x00\x08\x00\x00\x00" + bytes(4000))
    for name in ("wrong.mrc", "tiff.mrc"):
        with pytest.raises(
            BadInputError, match=rf"{name}: cannot read MRC \(Map ID string not found"
        ):
            io.read_volume(tmp_path / name)


def test_collect_inputs_recursive_skips_hidden_folders(tmp_path):
    """A DataLad dataset: its names link into .git/annex/objects, which would be a second
    copy of every volume."""
    store = tmp_path / "ds" / ".git" / "annex" / "objects" / "Xx" / "SHA256E-s1--aa.nii.gz"
    store.mkdir(parents=True)
    (store / "SHA256E-s1--aa.nii.gz").write_bytes(b"x")
    (tmp_path / "ds" / ".datalad").mkdir()
    (tmp_path / "ds" / ".datalad" / "config").write_text("x")
    anat = tmp_path / "ds" / "sub-01" / "anat"
    anat.mkdir(parents=True)
    (anat / "sub-01_T1w.nii.gz").symlink_to(store / "SHA256E-s1--aa.nii.gz")
    warnings = []
    found = io.collect_inputs([tmp_path / "ds"], recursive=True, warn=warnings.append)
    assert [p.name for p in found] == ["sub-01_T1w.nii.gz"] and warnings == []


def test_a_nifti_whose_sform_disagrees_with_pixdim_takes_the_sforms_voxel_size(tmp_path, caplog):
    """Review: an sform-only file whose pixdim is (1, 1, 1) but whose sform scales by
    (1.1, 0.9, 1.3) was read with spacing (1, 1, 1) (scale warnings, previews, embed's JSON)
    while evaluate measured with the sform. The sform places the voxels: its column norms
    are the spacing, with a warning; the header is written back as stored."""
    data = np.random.default_rng(0).normal(size=(6, 5, 4)).astype(np.float32)
    angle = 0.3
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0, 0, 1]]
    )
    sform = np.eye(4)
    sform[:3, :3] = rotation @ np.diag([1.1, 0.9, 1.3])
    img = nib.Nifti1Image(data, None)
    img.set_sform(sform, code=2)
    img.set_qform(None, code=0)
    img.header["pixdim"][1:4] = [1.0, 1.0, 1.0]
    src = tmp_path / "s.nii.gz"
    nib.save(img, src)
    with caplog.at_level("WARNING"):
        vol = io.read_volume(src)
    assert "s.nii.gz: voxel size (pixdim) 1x1x1 differs from the sform's" in caplog.text
    np.testing.assert_allclose(vol.geometry.spacing, [1.1, 0.9, 1.3], rtol=1e-6)
    io.write_labels(tmp_path / "o.nii.gz", (data > 0).astype(np.uint8), vol.geometry)
    out = nib.load(tmp_path / "o.nii.gz")
    np.testing.assert_array_equal(out.header["pixdim"], nib.load(src).header["pixdim"])
    np.testing.assert_array_equal(out.affine, nib.load(src).affine)
    nib.save(nib.Nifti1Image(data, np.diag([1.1, 0.9, 1.3, 1.0])), tmp_path / "c.nii.gz")
    caplog.clear()
    with caplog.at_level("WARNING"):  # a consistent file: no warning
        spacing = io.read_volume(tmp_path / "c.nii.gz").geometry.spacing
    assert spacing == pytest.approx((1.1, 0.9, 1.3)) and "differs" not in caplog.text


def test_a_dangling_link_is_named_as_one(tmp_path):
    """A DataLad/git-annex file not fetched yet is a link to a missing object: 'no such
    file' on a name the user can see in `ls` was puzzling (review)."""
    link = tmp_path / "sub-01_T1w.nii.gz"
    link.symlink_to(".git/annex/objects/XX/yy/MD5E-s1--0.nii.gz")
    for call in (lambda: io.collect_inputs([link]), lambda: io.read_volume(link)):
        with pytest.raises(BadInputError, match="a link to a missing file") as info:
            call()
        assert str(link) in str(info.value) and "datalad get" in str(info.value)
    assert io.collect_inputs([tmp_path]) == [link]  # listed: its read fails, naming it
    assert io.collect_inputs([str(tmp_path / "*.nii.gz")]) == [link]  # (a glob dropped it)
    loop = tmp_path / "loop.nii.gz"
    loop.symlink_to(loop.name)
    with pytest.raises(BadInputError, match="loop.nii.gz: a link that leads back to itself"):
        io.read_volume(loop)


def test_an_mrc_extended_header_is_copied_into_the_outputs(tmp_path):
    """Review: the extended header (FEI, SerialEM, IMOD metadata) and its type were dropped
    from the outputs (1 024 bytes -> 0). A volume without one hashes as before."""
    src = tmp_path / "t.mrc"
    data = np.random.default_rng(1).random((6, 5, 4)).astype(np.float32)
    with mrcfile.new(str(src)) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = 2.0
    plain = io.geometry_sha256(io.read_volume(src).geometry)
    extended = bytes(range(256)) * 4
    with mrcfile.open(str(src), mode="r+") as mrc:
        mrc.set_extended_header(np.frombuffer(extended, dtype="V1"))
        mrc.header.exttyp = b"SERI"
    vol = io.read_volume(src)
    assert io.geometry_sha256(vol.geometry) != plain
    io.write_labels(tmp_path / "o.mrc", (vol.data > 0.5).astype(np.int64), vol.geometry)
    with mrcfile.open(str(tmp_path / "o.mrc")) as out:
        assert bytes(out.header.exttyp) == b"SERI" and int(out.header.nsymbt) == 1024
        assert out.extended_header.tobytes() == extended
    assert mrcfile.validate(str(tmp_path / "o.mrc"), print_file=io_module.StringIO())
    with mrcfile.open(str(src), mode="r+") as mrc:  # removed again: the old digest
        mrc.set_extended_header(np.zeros(0, dtype="V1"))
    assert io.geometry_sha256(io.read_volume(src).geometry) == plain


def test_a_big_endian_mrc_extended_header_is_not_copied_byte_for_byte(tmp_path, caplog):
    """Review: the records of a big-endian file's extended header were copied as bytes into
    little-endian outputs, where they are misread; they are left out, with a warning."""
    src = tmp_path / "b.mrc"
    with mrcfile.new(str(src)) as mrc:
        mrc.set_data(np.random.default_rng(1).random((6, 5, 4)).astype(">f4"))
        mrc.set_extended_header(np.frombuffer(bytes(range(256)), dtype="V1"))
        mrc.header.exttyp = b"SERI"
    with caplog.at_level("WARNING"):
        vol = io.read_volume(src)
    assert "b.mrc: its MRC extended header (SERI, 256 bytes) is not copied" in caplog.text
    io.write_labels(tmp_path / "o.mrc", (vol.data > 0.5).astype(np.int64), vol.geometry)
    with mrcfile.open(str(tmp_path / "o.mrc")) as out:
        assert int(out.header.nsymbt) == 0


def test_mrc_header_problems_are_named(tmp_path, caplog):
    """Review: a header whose nz (17 -> 10) leaves voxels unread, and an axis map that is
    not an order of 1, 2, 3, were read without a word (mrcfile's warning was dropped)."""
    data = np.random.default_rng(0).random((8, 6, 5)).astype(np.float32)
    _mrc(tmp_path / "a.mrc", data)
    raw = bytearray((tmp_path / "a.mrc").read_bytes())
    raw[8:12] = np.int32(3).tobytes()  # nz 5 -> 3: 8 x 6 x 2 float32 voxels unread
    (tmp_path / "short.mrc").write_bytes(bytes(raw))
    with caplog.at_level("WARNING", logger="hypsegcli"):
        vol = io.read_volume(tmp_path / "short.mrc")
    assert vol.data.shape == (8, 6, 3)
    assert "short.mrc: MRC file is 384 bytes larger than expected: read as its header's 8x6x3" in (
        caplog.text
    )
    caplog.clear()
    with mrcfile.open(str(tmp_path / "a.mrc"), "r+") as mrc:
        mrc.header.mapc, mrc.header.mapr, mrc.header.maps = 2, 2, 3
    with caplog.at_level("WARNING", logger="hypsegcli"):
        vol = io.read_volume(tmp_path / "a.mrc")
    np.testing.assert_array_equal(vol.data, data)
    assert "a.mrc: MRC axis map (mapc, mapr, maps) 2, 2, 3 is not an order of 1, 2, 3" in (
        caplog.text
    )
    assert "larger than expected" not in caplog.text


def test_mrc_of_unknown_voxel_size_is_placed_by_its_starts_only(tmp_path):
    """Review: with voxel size 0 (distances in voxels) the origin, in Å, was added to the
    voxel grid as if in voxels; it is kept on the outputs but places nothing."""
    data = np.zeros((4, 5, 6), np.float32)
    _mrc(tmp_path / "u.mrc", data, voxel=(0.0, 0.0, 0.0), origin=(30.0, 0.0, 0.0), start=(3, 0, 1))
    vol = io.read_volume(tmp_path / "u.mrc")
    assert vol.geometry.unit == "voxel"
    np.testing.assert_array_equal(
        vol.geometry.affine,
        np.array([[1, 0, 0, 3], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]], float),
    )
    io.write_labels(tmp_path / "l.mrc", np.zeros((4, 5, 6), np.int64), vol.geometry)
    with mrcfile.open(str(tmp_path / "l.mrc")) as mrc:
        assert float(mrc.header.origin.x) == 30.0 and float(mrc.voxel_size.x) == 0.0


def test_mrc_empty_label_between_others_keeps_its_place(tmp_path):
    data = np.zeros((4, 5, 6), np.float32)
    _mrc(tmp_path / "t.mrc", data)
    with mrcfile.open(str(tmp_path / "t.mrc"), "r+") as mrc:
        mrc.header.label[:3] = [b"first", b"", b"third"]
        mrc.header.nlabl = 4  # a trailing empty label is dropped
    vol = io.read_volume(tmp_path / "t.mrc")
    io.write_labels(tmp_path / "l.mrc", np.zeros((4, 5, 6), np.int64), vol.geometry)
    with mrcfile.open(str(tmp_path / "l.mrc")) as mrc:
        labels = [bytes(t).rstrip(b"\x00 ").decode() for t in mrc.header.label[: mrc.header.nlabl]]
    assert labels == ["first", "", "third", "hypseg labels"]


def test_a_pipe_named_like_a_volume_is_not_read(tmp_path, caplog):
    """Review: a FIFO named b.mrc in an input folder blocked the run forever, and named
    directly was "no such file or folder"."""
    import os

    _mrc(tmp_path / "a.mrc", np.zeros((4, 5, 6), np.float32))
    os.mkfifo(tmp_path / "b.mrc")
    with caplog.at_level("WARNING", logger="hypsegcli"):
        assert io.collect_inputs([tmp_path]) == [tmp_path / "a.mrc"]
    assert "b.mrc: skipped: not a file (a pipe, socket or device)" in caplog.text
    with pytest.raises(BadInputError, match=r"b\.mrc: not a file or folder \(a pipe"):
        io.collect_inputs([tmp_path / "b.mrc"])


def test_long_library_errors_are_cut_at_a_sentence():
    """Review: torch's message for a truncated model file was cut mid-sentence at 200
    characters ("... there is a high)")."""
    text = (
        "PytorchStreamReader failed reading zip archive: failed finding central directory. "
        "This is an internal miniz error. If you are seeing this error, there is a high "
        "likelihood that your checkpoint file is corrupted. This can happen if ..."
    )
    assert io.short_message(RuntimeError(text)) == text[: text.index("error.") + 6]
    assert io.short_message(RuntimeError("word " * 60)) == ("word " * 40)[:199] + " ..."
    assert io.short_message(RuntimeError("x" * 300)) == "x" * 200 + " ..."
    assert io.short_message(RuntimeError("short\nsecond line")) == "short"


@pytest.mark.parametrize("cls", [nib.Nifti1Image, nib.Nifti2Image])
@pytest.mark.parametrize("suffix", [".Nii.gz", ".nii.Gz", ".Nii"])
def test_a_nifti_suffix_of_mixed_case_is_read(tmp_path, cls, suffix):
    """Review: listed as volumes (suffixes match in any case), `a.Nii.gz` then failed with
    "No such file ... a.nii.gz": nibabel looked for the lower-case name."""
    data = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    plain = tmp_path / f"a{suffix.lower()}"
    nib.save(cls(data, np.diag([2.0, 3.0, 4.0, 1.0])), plain)
    mixed = tmp_path / f"b{suffix}"
    plain.rename(mixed)
    vol = io.read_volume(mixed)
    np.testing.assert_array_equal(vol.data, data)
    assert vol.geometry.spacing == (2.0, 3.0, 4.0)
    assert io.collect_inputs([tmp_path]) == [mixed]


def test_a_file_without_read_permission_is_named_as_such(tmp_path, monkeypatch):
    """Review: a file of mode 000 (for a user bound by it) was reported as nibabel's
    "Could not read file", which hides the reason."""
    import builtins

    nib.save(nib.Nifti1Image(np.zeros((3, 4, 5), np.float32), np.eye(4)), tmp_path / "p.nii")
    real_open = builtins.open

    def denied(file, *args, **kwargs):
        if Path(file) == tmp_path / "p.nii":
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
    with pytest.raises(BadInputError, match=r"p\.nii: cannot read \(Permission denied\)$"):
        io.read_volume(tmp_path / "p.nii")


def test_an_input_file_whose_name_looks_like_a_pattern_is_a_file(tmp_path):
    """QA: 'run[1]/s[2].nii', an existing file, was taken for a glob pattern by the output
    check: its folder part made every folder below the working one an "input folder"."""
    scans = tmp_path / "run[1]"
    scans.mkdir()
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), scans / "s[2].nii")
    io.check_output_folder(tmp_path / "seg", [scans / "s[2].nii"], what="output")
    assert (tmp_path / "seg").is_dir()
    # a pattern stays a pattern, brackets and all
    with pytest.raises(BadInputError, match="is also an input folder"):
        io.check_output_folder(tmp_path / "seg", [tmp_path / "*" / "s*.nii"], what="output")


def test_the_first_nifti_read_of_a_process_prints_no_bare_nibabel_line(tmp_path):
    """QA: nibabel, first imported while its logger's handlers were swapped, added its own
    handler to the swapped list: a bare "pixdim[1,2,3] should be positive" line was printed
    before hypseg's warning naming the file."""
    import subprocess
    import sys

    path = tmp_path / "negative.nii"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), path)
    raw = bytearray(path.read_bytes())
    raw[84:88] = np.float32(-1.0).tobytes()  # pixdim[2] < 0, which nibabel would not store
    path.write_bytes(bytes(raw))
    code = f"from hypsegcli import io; io.read_volume({str(path)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert f"{path}: pixdim[1,2,3] should be positive; setting to abs of pixdim values" in lines
    assert not [line for line in lines if line.startswith("pixdim")], lines


def test_a_nifti_affine_with_nan_is_warned_about_and_recorded_as_json_null(tmp_path, caplog):
    """QA: an sform holding NaN was read without a word, and embed -o's record of its
    geometry held a bare NaN, which strict JSON readers refuse."""
    import json

    path = tmp_path / "nan_sform.nii"
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header.set_sform(np.diag([2.0, 2.0, 2.0, 1.0]), code=2)
    nib.save(img, path)
    raw = bytearray(path.read_bytes())
    raw[280:284] = np.float32(np.nan).tobytes()  # srow_x[0]
    path.write_bytes(bytes(raw))
    with caplog.at_level("WARNING", logger="hypsegcli.io"):
        volume = io.read_volume(path)
        io.read_volume(path)  # said once per file and run
    notes = [r.getMessage() for r in caplog.records if "NaN or infinite entries" in r.getMessage()]
    assert notes == [
        f"{path}: its affine (the sform or qform in use) has NaN or infinite entries: the voxels "
        "have no position, and distances use the voxel size (pixdim); the outputs keep the "
        "header as it is"
    ]
    assert volume.geometry.spacing == (2.0, 2.0, 2.0)
    record = io.geometry_record(volume.geometry)
    text = json.dumps(record, allow_nan=False)  # raises on a NaN
    assert json.loads(text)["affine"][0][0] is None and record["sform"][0][0] is None
    assert record["affine"][1][1] == 2.0 and record["sform_code"] == 2
    raw_record = io.geometry_record(volume.geometry, json_safe=False)
    assert np.isnan(raw_record["affine"][0][0])  # what the geometry digest hashes, as before
