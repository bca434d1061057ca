"""Reading and writing 3D volumes (NIfTI and MRC), input discovery, atomic writes.

Axis convention (the whole tool): a volume is a numpy array indexed
``[x, y, z]``.

* NIfTI (``.nii``, ``.nii.gz``): the array as nibabel returns it, i.e. the voxel
  axes i, j, k of the file; the affine maps ``(i, j, k, 1)`` to scanner
  coordinates in mm.
* MRC (``.mrc``, ``.map``, ``.rec``): mrcfile returns ``(sections, rows,
  columns)``, normally ``(z, y, x)``; hypseg transposes it to ``(x, y, z)``
  (honouring the header's ``mapc/mapr/maps``), so that ``spacing`` is the voxel
  size along x, y, z in Å, as in the header.

Outputs are written in the format of their source with the source's geometry:
NIfTI copies the header as stored (affine, qform/sform and their codes, pixdim,
units); MRC keeps voxel size, origin, the start indices (reordered to x, y, z)
and the text labels. Every file is written to a
temporary name in the target folder and renamed into place, so an interrupted
run never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import glob
import hashlib
import io as _stdio
import json
import logging
import math
import os
import re
import secrets
import stat
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import BadInputError, HypsegError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
MRC_SUFFIXES = (".mrc", ".map", ".rec")
SUPPORTED_SUFFIXES = NIFTI_SUFFIXES + MRC_SUFFIXES
Format = Literal["nifti", "mrc"]


@dataclass(frozen=True, eq=False)
class VolumeGeometry:
    """Where a volume's voxels lie in space, enough to write outputs alike.

    ``spacing`` is the voxel size along the array axes (x, y, z) in ``unit``: for
    NIfTI the header's pixdim, or the affine's column lengths where they differ (an
    sform that scales otherwise) or pixdim is not a positive number; for MRC the voxel
    size. ``affine`` maps voxel indices ``(x, y, z, 1)`` to physical coordinates.
    ``header`` is the source's nibabel header (NIfTI) or a dict of MRC header fields.
    """

    format: Format
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: np.ndarray
    header: Any = None
    suffix: str = ".nii.gz"
    unit: str = "mm"
    #: NIfTI: pixdim[0:4] (qfac and the voxel size) as the file stores them, where nibabel
    #: fixed them on loading (a negative voxel size made positive, a qfac of 0 made 1),
    #: which ``header`` holds; outputs are written with the stored values. None: as loaded.
    stored_pixdim: tuple[float, ...] | None = None

    @classmethod
    def default(
        cls,
        shape: Sequence[int],
        *,
        format: Format = "nifti",
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
    ) -> VolumeGeometry:
        """A plain geometry (axis-aligned, origin 0) for generated volumes."""
        spacing = tuple(float(s) for s in spacing)
        affine = np.diag([*spacing, 1.0])
        if format == "nifti":
            return cls(
                "nifti", tuple(int(s) for s in shape), spacing, affine, None, ".nii.gz", "mm"
            )  # type: ignore[arg-type]
        header = {"voxel_size": spacing, "origin": (0.0, 0.0, 0.0), "start": (0, 0, 0)}
        return cls("mrc", tuple(int(s) for s in shape), spacing, affine, header, ".mrc", "Å")  # type: ignore[arg-type]


def _json_number(value: Any) -> float | None:
    """A float for JSON: None (null) for NaN and infinities, which JSON has no numbers for."""
    number = float(value)
    return number if math.isfinite(number) else None


def _matrix(matrix: Any, number: Callable[[Any], Any]) -> list[list[Any]]:
    return [[number(v) for v in row] for row in np.asarray(matrix, dtype=np.float64)]


def geometry_record(geometry: VolumeGeometry, *, json_safe: bool = True) -> dict[str, Any]:
    """``geometry`` as plain JSON values, for outputs that cannot carry a header (``.npy``).

    A NaN or infinite number of a broken header is written as null (QA: ``embed -o``'s
    record held a bare ``NaN``, which strict JSON readers refuse); ``json_safe=False``
    keeps them as floats (:func:`geometry_sha256`, whose digests stay as they were).

    Always ``format``, ``shape``, ``spacing``, ``unit`` and ``affine`` (voxel index
    ``[x, y, z, 1]`` to physical coordinates, 4x4); NIfTI adds the qform and sform
    with their codes, MRC its voxel size, origin and start indices as stored (and its cell
    angles and space group where they are not the plain 90 degrees and P1).
    """
    number = _json_number if json_safe else float
    record: dict[str, Any] = {
        "format": geometry.format,
        "shape": [int(s) for s in geometry.shape],
        "spacing": [number(s) for s in geometry.spacing],
        "unit": geometry.unit,
        "affine": _matrix(geometry.affine, number),
    }
    header = geometry.header
    if geometry.format == "nifti" and header is not None:
        for form in ("qform", "sform"):
            matrix, code = getattr(header, f"get_{form}")(coded=True)
            record[form] = None if matrix is None else _matrix(matrix, number)
            record[f"{form}_code"] = int(code)
    elif geometry.format == "mrc" and isinstance(header, dict):
        for key in ("voxel_size", "origin", "start", "cell_angles"):
            if key in header:
                record[key] = [number(v) if key != "start" else int(v) for v in header[key]]
        if "space_group" in header:
            record["space_group"] = int(header["space_group"])
    return record


@dataclass(frozen=True, eq=False)
class Volume:
    """A volume read from disk: float32 data ``[x, y, z]`` plus its geometry."""

    path: Path
    data: np.ndarray
    geometry: VolumeGeometry = field(repr=False)

    @property
    def name(self) -> str:
        return case_name(self.path)


# ----------------------------------------------------------------------------- names


def volume_suffix(path: str | os.PathLike[str]) -> str | None:
    """The supported suffix of ``path`` (``.nii.gz``, ``.mrc``...) or None."""
    lower = str(path).lower()
    for suffix in SUPPORTED_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    return None


def case_name(path: str | os.PathLike[str]) -> str:
    """The file name without its volume suffix: ``a/b/case_001.nii.gz`` -> ``case_001``."""
    name = Path(path).name
    suffix = volume_suffix(name)
    return name[: -len(suffix)] if suffix else name


_BIDS_ENTITY = re.compile(r"^[A-Za-z0-9]+-[A-Za-z0-9]+$")
_BIDS_SUFFIX = re.compile(r"^[A-Za-z0-9]+$")


@functools.lru_cache(maxsize=65536)  # (pairing asks again for every candidate file)
def bids_key(name: str) -> tuple[tuple[str, ...], str] | None:
    """The BIDS entities of a case name other than ``desc``, sorted, and its suffix:
    ``sub-01_ses-1_desc-preproc_T1w`` -> ``(("ses-1", "sub-01"), "T1w")``; None for a name
    that is not ``key-value_..._suffix``. Files of one subject, session, space... share the
    entities whatever they describe (a ``desc-brain_mask``, a ``desc-aseg_dseg``)."""
    parts = name.split("_")
    if len(parts) < 2 or not _BIDS_SUFFIX.match(parts[-1]):
        return None
    if not all(_BIDS_ENTITY.match(part) for part in parts[:-1]):
        return None
    entities = tuple(sorted(part for part in parts[:-1] if not part.startswith("desc-")))
    return (entities, parts[-1]) if entities else None


def bids_match(name: str, candidates: Iterable[Path], suffix: str) -> list[Path]:
    """The files among ``candidates`` with BIDS suffix ``suffix`` whose entities other than
    ``desc`` are those of case name ``name`` (see :func:`bids_key`); none if ``name`` is not
    a BIDS name."""
    key = bids_key(name)
    if key is None:
        return []
    found = []
    for path in candidates:
        other = bids_key(case_name(path))
        if other is not None and other == (key[0], suffix):
            found.append(path)
    return found


def _format_of(path: Path) -> Format:
    suffix = volume_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return "nifti"
    if suffix in MRC_SUFFIXES:
        return "mrc"
    raise BadInputError(
        f"{path}: unsupported file type; supported: {', '.join(SUPPORTED_SUFFIXES)}"
    )


# ----------------------------------------------------------------------------- discovery


@functools.lru_cache(maxsize=4096)
def _resolved_folder(folder: Path) -> Path:
    return folder.resolve()


def entry_path(path: str | os.PathLike[str]) -> Path:
    """The directory entry ``path`` names, as an absolute path with its folder resolved (the
    file itself is not followed: writing there replaces that entry, a link included)."""
    path = Path(os.path.abspath(path))  # absolute first: the cache must not keep a cwd
    return _resolved_folder(path.parent) / path.name


def _tree(root: Path) -> list[Path]:
    """Every entry below ``root``, following symlinked sub-folders (a data folder linked into
    a project, common on clusters; Python 3.11's ``glob("**")`` skips them), each real
    folder once (a link back up the tree is not followed again). Hidden sub-folders
    (``.git``, whose ``annex/objects`` a DataLad dataset's files link to, ``.datalad``)
    are not searched, as hidden files are skipped."""
    entries: list[Path] = []
    seen: set[str] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        entries.extend(Path(folder, name) for name in (*subfolders, *files))
    return entries


def _missing(path: Path, what: str) -> str:
    """The error line for a ``path`` that does not exist: a dangling link is named as one
    (a DataLad or git-annex file not fetched yet is a link to a missing object)."""
    if path.is_symlink():
        try:
            os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return f"{path}: a link that leads back to itself (a loop of links)"
        try:
            target = os.readlink(path)
        except OSError:  # pragma: no cover - removed meanwhile
            target = "?"
        return (
            f"{path}: a link to a missing file ({target}); an annexed file not fetched yet? "
            "(datalad get / git annex get)"
        )
    return f"{path}: {what}"


def collect_inputs(
    inputs: Iterable[str | os.PathLike[str]],
    *,
    recursive: bool = False,
    warn: Callable[[str], None] | None = None,
    can_recurse: bool = True,
) -> list[Path]:
    """Expand files, folders and glob patterns into a sorted list of volume files.

    A folder contributes its volumes in sorted order (``recursive`` descends
    into sub-folders); other files inside it are skipped with a warning. A file
    named explicitly must be a supported volume. Duplicates (the same file,
    however spelled) are dropped, the first occurrence kept. No volume at all is
    an error, which suggests ``--recursive`` where the command has it
    (``can_recurse``).
    """
    warn = warn or log.warning
    found: list[Path] = []
    for item in inputs:
        text = os.fspath(item)
        path = Path(text)
        if path.is_dir():
            volumes: set[Path] = set()  # (folder / case) of each volume, for its sidecar
            others = []
            for child in sorted(_tree(path) if recursive else path.iterdir()):
                if child.name.startswith(".") or child.is_dir():
                    continue
                if volume_suffix(child) and (child.is_file() or not child.exists()):
                    # (a dangling link, an annexed file not fetched yet, is listed: its
                    # reading fails, naming it)
                    found.append(child)
                    volumes.add(child.parent / case_name(child))
                elif volume_suffix(child):  # a pipe or socket: reading would wait forever
                    warn(f"{child}: skipped: not a file (a pipe, socket or device)")
                else:
                    others.append(child)
            # a volume's JSON sidecar (BIDS: sub-01_T1w.json beside sub-01_T1w.nii.gz) is
            # part of it, not a stray file
            skipped = [
                child.name
                for child in others
                if not (child.suffix == ".json" and child.with_suffix("") in volumes)
            ]
            if skipped:
                warn(
                    f"{path}: skipped {len(skipped)} file(s) that are not volumes ({', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''})"
                )
        elif path.is_file():
            _format_of(path)  # raises for unsupported types
            found.append(path)
        elif glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=recursive))
            # (a dangling link, an annexed file not fetched yet, is listed as a folder lists
            # it: its reading fails, naming it)
            volumes = [
                p
                for p in matches
                if (p.is_file() or (p.is_symlink() and not p.exists())) and volume_suffix(p)
            ]
            if not volumes:
                raise BadInputError(
                    f"{text}: pattern matches no volume ({', '.join(SUPPORTED_SUFFIXES)})"
                )
            found.extend(volumes)
        elif path.exists():
            raise BadInputError(f"{path}: not a file or folder (a pipe, socket or device)")
        else:
            raise BadInputError(_missing(path, "no such file or folder"))
    seen: set[Path] = set()
    unique = []
    for path in found:
        # the folder resolved, not the file: two names linked to one stored object (git-annex,
        # DataLad, DVC) are two cases
        real = entry_path(path)
        if real not in seen:
            seen.add(real)
            unique.append(path)
    if not unique:
        hint = (
            "" if recursive or not can_recurse else "; use --recursive to descend into sub-folders"
        )
        raise BadInputError(
            f"no volume found in {', '.join(os.fspath(i) for i in inputs) or 'the inputs'} "
            f"(looked for {', '.join(SUPPORTED_SUFFIXES)}{hint})"
        )
    return unique


def check_unique_cases(paths: Iterable[str | os.PathLike[str]], *, why: str) -> None:
    """Refuse two inputs with the same :func:`case_name` (their outputs would overwrite).

    ``why`` ends the message, e.g. "their outputs in OUT would overwrite each other".
    """
    seen: dict[str, Path] = {}
    for item in paths:
        path = Path(item)
        name = case_name(path)
        if name in seen and seen[name] != path:
            raise BadInputError(
                f"{seen[name]} and {path} have the same case name {name!r}: {why}; "
                "rename one of them or process them in separate runs"
            )
        seen.setdefault(name, path)


# ----------------------------------------------------------------------------- reading


def read_volume(
    path: str | os.PathLike[str],
    *,
    allow_nonfinite: bool = False,
    native: bool = False,
    quiet: bool = False,
) -> Volume:
    """Read a 3D volume as float32 ``[x, y, z]`` with its geometry.

    4D files whose 4th axis has length 1 are squeezed; true 4D and 2D data are
    refused, as are unreadable or truncated files and (unless
    ``allow_nonfinite``) NaN or infinite voxels. ``native``: keep the stored
    data type instead (NIfTI with scaling: nibabel's float64), so that label
    values of any size and non-integral values survive the reading exactly.
    What the header makes hypseg assume (a voxel size fixed, an axis map ignored...) is
    warned about once per file and run (:func:`_header_note`); ``quiet`` logs it at
    debug level only (``evaluate``'s predictions, whose headers are their sources').
    """
    path = Path(path)
    if not path.exists():
        raise BadInputError(_missing(path, "no such file"))
    fmt = _format_of(path)
    try:  # (nibabel says only "Could not read file" where it may not)
        with open(path, "rb"):
            pass
    except PermissionError as exc:
        raise BadInputError(f"{path}: cannot read ({exc.strerror})") from None
    except OSError:
        pass  # (a folder named .nii.gz and the like: the reader says what it is)
    reader = _read_nifti if fmt == "nifti" else _read_mrc
    data, geometry = reader(path, native=native, quiet=quiet)
    if not allow_nonfinite:
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise BadInputError(f"{path}: {bad} voxel(s) are NaN or infinite")
    return Volume(path, data, geometry)


def _check_3d(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Axes to keep: a 4th (and higher) axis of length 1 is dropped."""
    dims = list(shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) != 3 or min(dims) < 1:
        raise BadInputError(
            f"{path}: {len(dims)}D data of shape {tuple(shape)}; hypseg needs a 3D volume"
        )
    return tuple(dims)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(" ".join(record.getMessage().split()))


_NIBABEL_LOCK = threading.Lock()


#: (file, warning) pairs already said in this run (:func:`forget_header_notes` starts
#: one; see :func:`_header_note`)
_HEADER_NOTES: set[tuple[str, str]] = set()
_HEADER_NOTES_LOCK = threading.Lock()


def forget_header_notes() -> None:
    """Start a run: the header warnings said so far may be said again (a command run
    in-process after another, over a file since changed, warns as a new process would)."""
    with _HEADER_NOTES_LOCK:
        _HEADER_NOTES.clear()


def _header_note(quiet: bool, message: str, path: Path, *args: Any) -> None:
    """A warning about what ``path``'s header makes hypseg assume (``message % (path,
    *args)``), said once per file and run: ``evaluate`` reads a ground truth once per
    k, and a study's hundred scans at three k gave six hundred lines. Repeats, and all of
    them where ``quiet``, go to the debug log."""
    text = message % (path, *args)
    key = (os.fspath(path), text)
    with _HEADER_NOTES_LOCK:
        repeat = key in _HEADER_NOTES
        if not quiet:  # (a quiet reading has said nothing: the next one says it)
            _HEADER_NOTES.add(key)
    log.log(logging.DEBUG if quiet or repeat else logging.WARNING, "%s", text)


@contextlib.contextmanager
def _nibabel_reports(path: Path, quiet: bool = False) -> Iterator[None]:
    """Re-issue what nibabel logs while reading ``path`` (e.g. a fixed pixdim) as hypseg
    warnings naming the file, instead of nibabel's bare lines on stderr (one reader at a
    time, as nibabel's logger is shared)."""
    import nibabel.imageglobals  # noqa: F401  (its handler is added at import: not into ours)

    logger = logging.getLogger("nibabel.global")
    collect = _Collect()
    with _NIBABEL_LOCK:
        saved, propagate = logger.handlers[:], logger.propagate
        logger.handlers, logger.propagate = [collect], False
        try:
            yield
        finally:
            logger.handlers, logger.propagate = saved, propagate
    for message in dict.fromkeys(collect.messages):
        _header_note(quiet, "%s: %s", path, message)


def _unreadable_nifti(path: Path) -> str | None:
    """Why nibabel could not read ``path``, where the first bytes tell: the file is empty,
    a Git LFS pointer, gzip data not named .gz, or a cut copy: its first bytes
    (decompressed where they are gzip's) give ``sizeof_hdr`` 348 (NIfTI-1) or 540
    (NIfTI-2), in either byte order, and fewer bytes than that follow. None otherwise."""
    import zlib

    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return None
    if not head:
        return "empty file"
    if head.startswith(b"version https://git-lfs."):
        return "a Git LFS pointer, not the data (fetch it: git lfs pull)"
    if head[:2] == b"\x1f\x8b":
        if not path.name.lower().endswith(".gz"):
            return "gzip-compressed data in a file not named .gz (name it .nii.gz)"
        whole = len(head) < 1 << 16  # the whole file was read
        out, data, ended = b"", head, True
        try:  # what a cut stream yields, without an error for its missing end
            while data and len(out) < 540:  # member after member (cat a.gz b.gz)
                stream = zlib.decompressobj(16 + zlib.MAX_WBITS)
                out += stream.decompress(data, 540 - len(out))
                ended = stream.eof
                if not ended:
                    break
                data = stream.unused_data
        except zlib.error:
            return None
        if len(out) < 540 and not whole:  # the rest of the file is unread: no verdict
            return None
        if len(out) < 4:
            return None if ended else "truncated NIfTI (the gzip stream ends before the header)"
        head = out
    if len(head) < 4:
        return None
    sizes = {int.from_bytes(head[:4], order) for order in ("little", "big")}
    for size in (348, 540):
        if size in sizes and len(head) < size:
            return f"truncated NIfTI (the file ends inside its {size}-byte header)"
    return None


def load_nifti(path: str | os.PathLike[str]) -> Any:
    """``nibabel.load``, also for a suffix of mixed case (``a.Nii.gz``), whose file nibabel
    looks for under the lower-case name: read through a file holder of the name as it is
    (the header's size, 348 or 540 bytes, picks NIfTI-1 or -2)."""
    import nibabel as nib

    name = os.fspath(path)
    suffix = volume_suffix(name) or ""
    written = name[len(name) - len(suffix) :]
    if written in (suffix, suffix.upper()):
        return nib.load(name)
    holder = nib.FileHolder(filename=name)
    with holder.get_prepare_fileobj(mode="rb") as handle:
        raw = handle.read(4)
    size = int.from_bytes(raw, "little") if len(raw) == 4 else 0
    if size not in (348, 540):
        size = int.from_bytes(raw, "big")
    klass = nib.Nifti2Image if size == 540 else nib.Nifti1Image
    return klass.from_file_map({"header": holder, "image": holder})


def _read_nifti(
    path: Path, *, native: bool = False, quiet: bool = False
) -> tuple[np.ndarray, VolumeGeometry]:
    shape3: tuple[int, ...] = ()
    try:
        with _nibabel_reports(path, quiet):
            img = load_nifti(path)
            shape3 = _check_3d(path, img.shape)
            if np.dtype(img.get_data_dtype()).kind == "c" or (
                img.get_data_dtype().names is not None  # RGB and other compound types
            ):
                raise BadInputError(
                    f"{path}: {img.get_data_dtype()} data; hypseg needs real scalar voxels"
                )
            _check_nifti_size(path, img)
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # overflow in the cast: refuse
                data = np.asarray(img.dataobj, dtype=None if native else np.float32)
    except HypsegError:
        raise
    except MemoryError:
        what = (
            f"{'x'.join(map(str, shape3))} voxels ({_gigabytes(shape3, np.float32)} as float32)"
            if shape3
            else "the header"
        )
        raise HypsegError(f"{path}: out of memory reading {what}") from None
    except RuntimeWarning as exc:
        raise BadInputError(
            f"{path}: voxel values beyond the float32 range hypseg computes in "
            f"(about ±3.4e38) after the header's scaling ({short_message(exc)})"
        ) from None
    except Exception as exc:  # nibabel raises many types for bad files
        short = short_message(exc)
        if short.startswith("Expected ") and " bytes, got " in short:  # gzip ends early
            raise BadInputError(
                f"{path}: truncated NIfTI ({short.split(' from ')[0].lower()})"
            ) from None
        if isinstance(exc, EOFError):  # a gzip stream cut off (an interrupted copy)
            raise BadInputError(f"{path}: truncated NIfTI ({short})") from None
        why = _unreadable_nifti(path)
        if why is not None:
            raise BadInputError(f"{path}: {why}") from None
        raise BadInputError(f"{path}: cannot read NIfTI ({short})") from exc
    data = np.ascontiguousarray(data.reshape(shape3))
    affine = np.asarray(img.affine, dtype=np.float64)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    # the voxel sizes of the affine that places the voxels (the sform where its code is set)
    columns = np.linalg.norm(affine[:3, :3], axis=0) if np.isfinite(affine).all() else None
    usable = columns is not None and all(math.isfinite(c) and c > 0 for c in columns)
    if columns is None:
        _header_note(
            quiet,
            "%s: its affine (the sform or qform in use) has NaN or infinite entries: the voxels "
            "have no position, and distances use the voxel size (pixdim); the outputs keep "
            "the header as it is",
            path,
        )
    if not all(math.isfinite(z) and z > 0 for z in zooms):
        # a NaN, infinite or zero pixdim: the voxel size from the affine where it has one
        fixed = tuple(float(c) for c in columns) if usable else (1.0, 1.0, 1.0)  # type: ignore[union-attr]
        _header_note(
            quiet,
            "%s: voxel size (pixdim) %s is not a positive number; using %s (%s)",
            path,
            "x".join(f"{z:g}" for z in zooms),
            "x".join(f"{z:g}" for z in fixed),
            "the affine's" if usable else "1 per voxel",
        )
        zooms = fixed
    elif usable and not np.allclose(columns, zooms, rtol=1e-3, atol=0.0):  # type: ignore[arg-type]
        # an sform that scales otherwise than pixdim: distances (evaluate) follow the
        # affine, so the spacing does too
        _header_note(
            quiet,
            "%s: voxel size (pixdim) %s differs from the sform's %s; using the sform's, "
            "which places the voxels",
            path,
            "x".join(f"{z:g}" for z in zooms),
            "x".join(f"{c:.6g}" for c in columns),  # type: ignore[union-attr]
        )
        zooms = tuple(float(c) for c in columns)  # type: ignore[union-attr]
    unit = img.header.get_xyzt_units()[0] or "unknown"
    unit = {"mm": "mm", "micron": "µm", "meter": "m"}.get(unit, unit)
    geometry = VolumeGeometry(
        "nifti",
        shape3,  # type: ignore[arg-type]
        zooms,  # type: ignore[arg-type]
        affine,
        img.header.copy(),
        volume_suffix(path) or ".nii.gz",
        unit,
        _stored_pixdim(path, img.header),
    )
    return data, geometry


def _stored_pixdim(path: Path, header: Any) -> tuple[float, ...] | None:
    """pixdim[0:4] as ``path`` stores them where nibabel's checks changed them on loading
    (``header``: the loaded one), else None: copied as stored into the outputs, a source
    that readers built on nifti1_io (FSL, AFNI, ITK) read with a voxel size of 1 where it is
    not positive keeps meaning to them what its outputs mean."""
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(os.fspath(path)) as f:
            raw = type(header).from_fileobj(f, check=False)
    except Exception:  # noqa: BLE001 - read once already: nothing to restore
        return None
    stored = np.asarray(raw["pixdim"][:4], dtype=np.float64)
    loaded = np.asarray(header["pixdim"][:4], dtype=np.float64)
    if np.array_equal(stored, loaded, equal_nan=True):
        return None
    return tuple(float(v) for v in stored)


def _printable_label(raw: bytes) -> str:
    """An MRC text label as mrcfile will write it back: up to the first NUL, every byte that
    is not printable ASCII replaced by '?', trailing spaces dropped."""
    text = raw.split(b"\x00", 1)[0].decode("ascii", "replace")
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text).rstrip()


#: IMOD's stamp at byte 152 of an MRC header; bit 0 of the flags at byte 156 set means
#: signed bytes in mode 0, clear means unsigned (IMOD's own files before 4.2.23 and any
#: file it writes with unsigned bytes).
IMOD_STAMP = 1146047817


def _imod_unsigned_bytes(header: Any) -> bool:
    """Whether an MRC header is IMOD's and says its mode-0 bytes are unsigned."""
    stamp, flags = np.frombuffer(bytes(header.extra2)[40:48], dtype=header.nx.dtype)
    return int(stamp) == IMOD_STAMP and not int(flags) & 1


def _read_mrc(
    path: Path, *, native: bool = False, quiet: bool = False
) -> tuple[np.ndarray, VolumeGeometry]:
    import mrcfile

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with mrcfile.open(os.fspath(path), mode="r", permissive=True) as mrc:
                problems = "; ".join(
                    " ".join(str(w.message).split())  # one line
                    for w in caught
                    if not issubclass(w.category, DeprecationWarning)
                )
                if mrc.data is None:
                    raise BadInputError(f"{path}: cannot read MRC ({problems or 'no data'})")
                raw = np.asarray(mrc.data)
                header = mrc.header
                if int(header.mode) == 0 and _imod_unsigned_bytes(header):
                    raw = raw.view(np.uint8)  # (mrcfile reads mode 0 as int8 whatever IMOD says)
                axes = (int(header.mapc), int(header.mapr), int(header.maps))
                voxel = mrc.voxel_size
                spacing = (float(voxel.x), float(voxel.y), float(voxel.z))
                cell = (header.cella.x, header.cella.y, header.cella.z)
                sampling = (int(header.mx), int(header.my), int(header.mz))
                origin = (float(header.origin.x), float(header.origin.y), float(header.origin.z))
                angles = (
                    float(header.cellb.alpha),
                    float(header.cellb.beta),
                    float(header.cellb.gamma),
                )
                space_group = int(header.ispg)
                # column, row and section starts (mrcfile names them nx/ny/nzstart)
                file_start = (int(header.nxstart), int(header.nystart), int(header.nzstart))
                # in their places: an empty label between two others stays (trailing ones
                # are dropped)
                labels = tuple(
                    _printable_label(bytes(raw_label))
                    for raw_label in header.label[: max(0, min(int(header.nlabl), 10))]
                )
                while labels and not labels[-1]:
                    labels = labels[:-1]
                # the extended header (FEI, SerialEM, IMOD... metadata) and its type, copied
                # into the outputs as bytes
                extended = mrc.extended_header
                extended_bytes = extended.tobytes() if extended is not None else b""
                exttyp = bytes(header.exttyp)
                big_endian = header.mode.dtype.byteorder == ">" or (
                    header.mode.dtype.byteorder == "=" and sys.byteorder == "big"
                )
                expected = int(header.nx) * int(header.ny) * int(header.nz)
                if raw.size < expected:
                    raise BadInputError(f"{path}: truncated MRC ({raw.size} of {expected} voxels)")
    except BadInputError:
        raise
    except Exception as exc:
        raise BadInputError(f"{path}: cannot read MRC ({short_message(exc)})") from exc
    if problems and (raw.size == 0 or raw.ndim not in (3, 4)):
        # not an MRC file at all (a NIfTI or TIFF named .mrc): mrcfile's permissive reading
        # makes an empty or odd array of its bytes; say why instead of describing that
        raise BadInputError(f"{path}: cannot read MRC ({problems})")
    if raw.ndim == 4 and raw.shape[0] == 1:  # a volume stack (ispg 401) holding one volume
        raw = raw[0]
        if 401 <= space_group <= 630:  # (MRC2014: a volume stack of space group ispg - 400)
            space_group -= 400  # what it is now: one volume of that group
    if raw.ndim != 3:
        raise BadInputError(
            f"{path}: {raw.ndim}D data of shape {raw.shape}; hypseg needs a 3D volume"
        )
    if raw.dtype.kind == "c":
        raise BadInputError(f"{path}: {raw.dtype} data; hypseg needs real scalar voxels")
    if sorted(axes) != [1, 2, 3]:
        _header_note(
            quiet,
            "%s: MRC axis map (mapc, mapr, maps) %s is not an order of 1, 2, 3: read as "
            "1, 2, 3 (columns x, rows y, sections z)",
            path,
            ", ".join(map(str, axes)),
        )
        axes = (1, 2, 3)
    larger = [p for p in problems.split("; ") if "larger than expected" in p] if problems else []
    if larger:  # the header's dimensions may be wrong: the voxels past them are not read
        _header_note(
            quiet,
            "%s: %s: read as its header's %s voxels (check the header's dimensions)",
            path,
            larger[0],
            "x".join(str(n) for n in raw.shape[::-1]),
        )
    # the starts are per file axis (columns, rows, sections); x, y, z are axes mapc/mapr/maps
    start_xyz = [0, 0, 0]
    for file_axis, spatial in enumerate(axes):
        start_xyz[spatial - 1] = file_start[file_axis]
    start = tuple(start_xyz)
    # Array axes are (sections, rows, columns) = file axes (maps, mapr, mapc).
    array_axis_of = {axes[2]: 0, axes[1]: 1, axes[0]: 2}
    data = np.ascontiguousarray(
        np.transpose(raw, (array_axis_of[1], array_axis_of[2], array_axis_of[3])),
        dtype=None if native else np.float32,
    )
    if min(data.shape) < 1:
        raise BadInputError(f"{path}: empty MRC data of shape {raw.shape}")
    if not all(math.isfinite(s) for s in spacing):
        # mrcfile divides the cell by the sampling mx/my/mz: 0 there gives inf or nan
        _header_note(
            quiet,
            "%s: MRC voxel size %s is not finite (cell %s over sampling %s); treated as "
            "unknown (0 in the outputs, 1 for computing)",
            path,
            "x".join(f"{s:g}" for s in spacing),
            "x".join(f"{float(v):g}" for v in cell),
            "x".join(str(v) for v in sampling),
        )
        spacing = tuple(s if math.isfinite(s) else 0.0 for s in spacing)
    voxel_size = spacing  # as stored: 0 (unknown) stays 0 in the outputs
    # a crystallographic cell: kept on the outputs (absent from the record when plain, so
    # that records of orthogonal volumes stay as they were)
    crystal: dict[str, Any] = {}
    if any(a != 90.0 for a in angles) and any(a != 0.0 for a in angles):  # (0: never set)
        crystal["cell_angles"] = angles
        _header_note(
            quiet,
            "%s: MRC cell angles %s are not 90 degrees: hypseg treats the voxel grid as "
            "orthogonal (distances, previews); the outputs keep the angles",
            path,
            "/".join(f"{a:g}" for a in angles),
        )
    if 1 < space_group <= 230:
        crystal["space_group"] = space_group
    if extended_bytes and big_endian:
        # its records hold numbers in the source's byte order, and the outputs are written
        # little-endian: copied as bytes they would be misread
        _header_note(
            quiet,
            "%s: its MRC extended header (%s, %d bytes) is not copied into the outputs: the "
            "file is big-endian and the outputs are little-endian",
            path,
            exttyp.decode("ascii", "replace").strip("\x00 ") or "no type",
            len(extended_bytes),
        )
    elif extended_bytes:  # (absent when empty, so that plain volumes' records stay the same)
        crystal["extended_header"] = (exttyp, extended_bytes)
    known = [s > 0 for s in spacing]
    if any(known) and not all(known):
        # Å along some axes and voxels along others would mix in every distance
        _header_note(
            quiet,
            "%s: MRC voxel size %s is unknown (0) along some axes; distances are in voxels",
            path,
            "x".join(f"{s:g}" for s in spacing),
        )
    spacing = tuple(s if all(known) else 1.0 for s in spacing)
    affine = np.diag([*spacing, 1.0])
    # the origin is in Å: of no use to a grid in voxels (a size unknown on any axis)
    placed = origin if all(known) else (0.0, 0.0, 0.0)
    affine[:3, 3] = [o + st * s for o, st, s in zip(placed, start, spacing, strict=True)]
    geometry = VolumeGeometry(
        "mrc",
        tuple(int(s) for s in data.shape),  # type: ignore[arg-type]
        spacing,  # type: ignore[arg-type]
        affine,
        {"voxel_size": voxel_size, "origin": origin, "start": start, "labels": labels, **crystal},
        volume_suffix(path) or ".mrc",
        "Å" if all(known) else "voxel",  # a size unknown on any axis: distances in voxels
    )
    return data, geometry


def _gigabytes(shape: Sequence[int], dtype: Any) -> str:
    return f"{int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize / 1e9:.1f} GB"


#: deflate's largest compression ratio (a match of 258 bytes in at least 2 bits: 1032),
#: with a margin; gzip data of n bytes never holds more than GZIP_MAX_RATIO * n + 4096
GZIP_MAX_RATIO = 1040


def _check_nifti_size(path: Path, img: Any) -> None:
    """An uncompressed NIfTI shorter than its header's voxel data is truncated (checked
    before reading, so a header that claims terabytes is refused, not read). A compressed
    one's length is known only after decompressing, but gzip cannot hold more than
    :data:`GZIP_MAX_RATIO` times its size: a header that claims more is corrupt (or the
    file cut), and is refused as bad input rather than read into an out-of-memory error."""
    suffix = "".join(path.suffixes[-1:]).lower()
    offset = int(getattr(img.dataobj, "offset", 0))
    dtype = np.dtype(img.get_data_dtype())
    needed = offset + int(np.prod(img.shape, dtype=np.float64)) * dtype.itemsize
    have = path.stat().st_size
    voxels = f"the header's {'x'.join(map(str, img.shape))} {dtype} voxels need {needed} bytes"
    if suffix == ".nii" and have < needed:
        raise BadInputError(f"{path}: truncated NIfTI ({voxels}, the file has {have})")
    if suffix == ".gz" and needed > GZIP_MAX_RATIO * have + 4096:
        raise BadInputError(
            f"{path}: corrupt or truncated NIfTI ({voxels}, more than {have} bytes of gzip "
            f"data can hold)"
        )


def short_message(exc: BaseException | str, limit: int = 200) -> str:
    """A library's error message (an exception, or its text) in one line of at most about
    ``limit`` characters: its first line, cut after the last whole sentence that fits
    (else at a word, with "...")."""
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else type(exc).__name__
    if len(text) <= limit:
        return text
    end = text.rfind(". ", 0, limit)
    if end > 0:
        return text[: end + 1]
    return text[: text.rfind(" ", 0, limit) if " " in text[:limit] else limit] + " ..."


# ----------------------------------------------------------------------------- writing


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _probe_folder(folder: Path, what: str) -> None:
    """Create ``folder`` (and parents) if needed and check that files can be written in it."""
    if folder.exists() and not folder.is_dir():
        raise BadInputError(f"{folder}: exists and is not a folder ({what})")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        parent = next((p for p in folder.parents if p.exists() and not p.is_dir()), folder)
        raise BadInputError(f"{parent}: exists and is not a folder ({what})") from None
    except OSError as exc:
        raise BadInputError(f"{folder}: cannot create the folder ({short_message(exc)})") from None
    probe = folder / temporary_name("probe")
    try:
        probe.write_bytes(b"")
    except OSError as exc:
        raise BadInputError(f"{folder}: cannot write here ({short_message(exc)})") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def check_name_length(path: str | os.PathLike[str], why: str) -> None:
    """Before any work: the file name of ``path`` fits file systems' limit of
    :data:`_NAME_MAX` bytes (else the write fails, after the work). ``why`` says where the
    name comes from, for the message."""
    size = len(os.fsencode(Path(path).name))
    if size > _NAME_MAX:
        raise BadInputError(
            f"{path}: a file name of {size} bytes, more than file systems take ({_NAME_MAX}); {why}"
        )


def check_replaceable(path: str | os.PathLike[str], what: str | None = None) -> None:
    """BadInputError if ``path`` exists as something other than a file, or is a link to
    such a thing: a device (``--csv /dev/stdout``), a named pipe, a socket. Outputs are
    written to a temporary file and renamed into place, which would put a plain file where
    the device or the link was (QA: as root, ``/dev/stdout`` became a file). A link to a
    file, or a dangling one, is replaced by the new file, as git-annex and DataLad expect
    of an unlocked output; the file it pointed to is left as it was."""
    path = Path(path)
    try:
        info = os.stat(path)  # (follows links)
    except OSError:
        return  # absent, or a dangling link
    if stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode):
        return  # (a folder: the callers say what is wrong with it)
    kind = next(
        (
            name
            for test, name in (
                (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"),
                (stat.S_ISFIFO, "a named pipe"),
                (stat.S_ISSOCK, "a socket"),
            )
            if test(info.st_mode)
        ),
        "not a file",
    )
    if path.is_symlink():
        kind = f"a link to {os.path.realpath(path)}, {kind}"
    raise BadInputError(
        f"{path}: is {kind}; {what or 'hypseg'} writes a file (a temporary one, then "
        "renamed into place) and would replace it: give a file name (results reach "
        "stdout with --json)"
    )


def check_output_file(
    path: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]] = (), *, what: str
) -> None:
    """Before any work: ``path`` can be written as a file and is none of ``inputs``.

    ``what`` names the option in the messages (e.g. "train -o").
    """
    path = Path(path)
    check_name_length(path, f"give {what} a shorter name")
    if path.is_dir():
        raise BadInputError(f"{path}: is a folder, {what} needs a file name")
    check_replaceable(path, what)
    for item in inputs:
        if _same_file(path, Path(item)):
            raise BadInputError(f"{path}: is one of the inputs; {what} would overwrite it")
    _probe_folder(path.parent, what)


def check_output_folder(
    folder: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]] = (),
    *,
    recursive: bool = False,
    what: str,
    create: bool = True,
) -> None:
    """Before any work: ``folder`` can hold outputs and is not where ``inputs`` are looked for.

    An input folder (or, with ``recursive``, a folder below one) as the output folder would
    mix volumes written with the inputs: a label volume can overwrite an input of the same
    name, and the next run would read the outputs as inputs (or, for ``embed -o``'s arrays
    and records, skip them with a warning every time). A glob pattern among ``inputs``
    searches the folder its fixed part names. ``create``: make the folder and check that it
    is writable with a probe file; off (dry runs, which write nothing), the folder, or the
    nearest existing folder above it, is checked writable by its permissions only.
    """
    folder = Path(folder)
    for item in inputs:
        given = Path(item)
        below = recursive
        if not given.is_dir() and not given.is_file() and glob.has_magic(os.fspath(item)):
            # (an existing file is itself, whatever its name holds: 'run[1]/a.nii', as
            # discovery reads it) a pattern searches the folder its fixed part names ('scans/*.nii.gz': scans),
            # and folders below it where a folder part is a pattern ('scans/*/*.nii.gz')
            parts = given.parts
            first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
            below = any(glob.has_magic(part) for part in parts[first:-1])
            given = Path(*parts[:first]) if first else Path(".")
        if not given.is_dir():
            continue
        if _same_file(folder, given) or (below and given.resolve() in folder.resolve().parents):
            raise BadInputError(
                f"{folder}: is also an input folder, so outputs would mix with the inputs "
                f"(and be read as inputs next time); choose another {what} folder"
            )
    if create:
        _probe_folder(folder, what)
    elif folder.exists() and not folder.is_dir():
        raise BadInputError(f"{folder}: exists and is not a folder ({what})")
    else:  # (a dry run creates nothing: the folder, or the nearest one to create it in)
        nearest = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if nearest is not None and nearest.is_dir() and not os.access(nearest, os.W_OK | os.X_OK):
            raise BadInputError(
                f"{folder}: cannot write here ({nearest} is read-only, or not writable by "
                "this user)"
            )


def os_error_text(exc: OSError) -> str:
    """A one-line reason for an OSError: its strerror, or for numpy's short writes (no
    errno: "N requested and M written", which a full disk gives) that the disk may be full."""
    if exc.strerror:
        return exc.strerror
    text = " ".join(str(exc).split())
    if "requested and" in text and "written" in text:
        return f"short write, {text}: is the disk full?"
    return text or type(exc).__name__


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); rename it into place on success.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / temporary_name(path.name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


#: Longest file name (bytes) of the usual file systems (ext4, XFS, Btrfs, APFS, NTFS).
_NAME_MAX = 255


def temporary_name(name: str) -> str:
    """``.tmp-PID-HEX-<name>``, with the middle of ``name`` cut where the whole would pass
    :data:`_NAME_MAX` bytes (its end, with the suffix the writers go by, is kept), so that
    an output whose own name fits can always be written."""
    prefix = f".tmp-{os.getpid()}-{secrets.token_hex(4)}-"
    room = _NAME_MAX - len(os.fsencode(prefix))
    if len(os.fsencode(name)) <= room:
        return prefix + name
    tail = name[-32:]
    head = name[: -len(tail)]
    while head and len(os.fsencode(head + "~" + tail)) > room:
        head = head[:-1]
    return prefix + head + "~" + tail


#: A temporary of :func:`atomic_path` untouched for this long is a dead writer's: every
#: writer fills its temporary at once and renames it (seconds), so only a process killed
#: (SIGKILL, the OOM killer, a node lost) or suspended meanwhile leaves one this old.
STALE_TEMPORARY_S = 3600.0
_TEMPORARY_RE = re.compile(r"\.tmp-\d+-[0-9a-f]{8}-.")


def remove_stale_temporaries(
    folder: str | os.PathLike[str], *, recursive: bool = False
) -> tuple[int, int]:
    """Remove the temporaries (``.tmp-PID-HEX-<name>``) that killed runs left in ``folder``
    (and, with ``recursive``, the folders below it but hidden ones), once
    :data:`STALE_TEMPORARY_S` old; a fresh one may be a concurrent run's write. Returns
    (files removed, their bytes); files that vanish or cannot be removed are passed over."""
    import time

    cutoff = time.time() - STALE_TEMPORARY_S
    removed = size = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if recursive and not d.startswith("."))
        for name in files:
            if not _TEMPORARY_RE.match(name):
                continue
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode) or st.st_mtime > cutoff:
                    continue
                os.unlink(path)
            except OSError:
                continue
            removed, size = removed + 1, size + st.st_size
    if removed:
        log.info(
            "%s: removed %d temporary file(s) (%.1f MiB) left by runs stopped over an hour ago",
            folder,
            removed,
            size / 2**20,
        )
    return removed, size


def lock_path(path: str | os.PathLike[str]) -> Path:
    """The hidden lock file of :func:`exclusive_writer` for ``path``."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def exclusive_writer(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Hold an exclusive lock on writing ``path`` (and its companions) for one process: a
    second process asking for it meanwhile (the same job submitted twice) is refused at
    once instead of silently replacing the first one's files. The lock is ``flock`` on the
    hidden file :func:`lock_path` (released by the system when the process dies, so one
    left by a killed run locks nothing; removed at the end). Where the filesystem has no
    locks, or the system no ``flock``, the run goes on unlocked."""
    fd = _lock(Path(path), what)
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(lock_path(path))
            os.close(fd)


def _lock(path: Path, what: str) -> int | None:
    """:func:`exclusive_writer`'s lock taken: its file descriptor, or None where locks are
    not to be had."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    target = lock_path(path)
    while True:
        try:
            fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None  # (a folder that takes no lock file: checked writable before)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 200).decode("ascii", "replace").strip()
            finally:
                os.close(fd)
            raise BadInputError(
                f"{path}: another {what} is writing it now"
                + (f" ({holder})" if holder else "")
                + "; wait for it to end, or write to another file"
            ) from None
        except OSError:  # a filesystem without locks
            os.close(fd)
            return None
        try:  # the file locked is still the one named (not removed by a run just ending)
            same = os.path.samestat(os.fstat(fd), os.stat(target))
        except OSError:
            same = False
        if same:
            break
        os.close(fd)
    import socket

    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}".encode())
    return fd


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """:func:`atomic_path` for an output: an OSError (a full disk, a read-only folder)
    becomes a one-line :class:`HypsegError` naming ``path``."""
    try:
        with atomic_path(path) as tmp:
            yield tmp
    except OSError as exc:
        raise HypsegError(f"{path}: cannot write ({os_error_text(exc)})") from None


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def label_dtype(labels: np.ndarray, fmt: Format) -> np.dtype:
    """The smallest integer type for a label volume: uint8 (NIfTI) / int8 (MRC mode 0) when it fits."""
    top = int(labels.max(initial=0))
    low = int(labels.min(initial=0))
    if low < 0:
        raise BadInputError(f"labels must be >= 0, got {low}")
    if fmt == "mrc":
        return (
            np.dtype(np.int8)
            if top <= 127
            else np.dtype(np.int16)
            if top <= 32767
            else np.dtype(np.float32)
        )
    return (
        np.dtype(np.uint8)
        if top <= 255
        else np.dtype(np.uint16)
        if top <= 65535
        else np.dtype(np.int32)
    )


def write_labels(
    path: str | os.PathLike[str], labels: np.ndarray, geometry: VolumeGeometry
) -> Path:
    """Write an integer label volume ``[x, y, z]`` with ``geometry`` (atomically)."""
    labels = np.asarray(labels)
    dtype = label_dtype(labels, geometry.format)
    return write_volume(path, labels.astype(dtype, copy=False), geometry, intent="labels")


def write_volume(
    path: str | os.PathLike[str],
    data: np.ndarray,
    geometry: VolumeGeometry,
    *,
    intent: Literal["labels", "image"] = "image",
) -> Path:
    """Write ``data`` (``[x, y, z]``, its own dtype) in ``geometry``'s format (atomically)."""
    path = Path(path)
    data = np.asarray(data)
    if data.shape != tuple(geometry.shape):
        raise BadInputError(
            f"{path}: data shape {data.shape} differs from geometry shape {geometry.shape}"
        )
    with atomic_output(path) as tmp:
        if geometry.format == "nifti":
            _write_nifti(tmp, data, geometry, intent)
        else:
            _write_mrc(tmp, data, geometry, intent)
    return path


def _write_nifti(path: Path, data: np.ndarray, geometry: VolumeGeometry, intent: str) -> None:
    import nibabel as nib

    src = geometry.header
    if src is None:
        img = nib.Nifti1Image(data, geometry.affine)
        img.header.set_xyzt_units("mm")
        img.set_qform(geometry.affine, code=1)
        img.set_sform(geometry.affine, code=1)
    else:
        header = src.copy()
        header.set_data_dtype(data.dtype)
        image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        # No affine: nibabel then leaves the header's qform and sform fields (and their
        # codes, pixdim, quaternion) exactly as the source has them, inactive ones included.
        img = image_class(data, None, header)
    hdr = img.header
    if src is not None:
        # a 4D source holding one volume keeps its pixdim[4:] (TR, ...) as stored: nibabel
        # resets the spacings past the data's dimensions to 1
        hdr["pixdim"][4:] = src["pixdim"][4:]
        if geometry.stored_pixdim is not None:
            hdr["pixdim"][:4] = geometry.stored_pixdim  # as the source stores them
    hdr["scl_slope"] = np.nan
    hdr["scl_inter"] = np.nan
    if intent == "labels":
        hdr["cal_min"] = 0
        hdr["cal_max"] = float(data.max(initial=0))
        hdr.set_intent("label")  # NIFTI_INTENT_LABEL (1002), no parameters, no name
        hdr["descrip"] = b"hypseg labels"
    else:
        hdr["cal_min"] = 0
        hdr["cal_max"] = 0
    nib.save(img, os.fspath(path))


#: Text labels an MRC header holds.
MRC_MAX_LABELS = 10


def _write_mrc(path: Path, data: np.ndarray, geometry: VolumeGeometry, intent: str) -> None:
    import mrcfile

    header = geometry.header or {}
    spacing = header.get("voxel_size", geometry.spacing)
    origin = header.get("origin", (0.0, 0.0, 0.0))
    start = header.get("start", (0, 0, 0))
    if data.dtype == np.float64:
        data = data.astype(np.float32)
    # the source's text labels, then ours where there is room (the source's all stay); no
    # "Created by mrcfile.py <time>" label, so that the same inputs give the same bytes
    labels = [str(text) for text in header.get("labels", ())][:MRC_MAX_LABELS]
    if len(labels) < MRC_MAX_LABELS:
        labels.append("hypseg labels" if intent == "labels" else "hypseg")
    with mrcfile.new(os.fspath(path), overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
        mrc.voxel_size = tuple(float(s) for s in spacing)
        mrc.header.origin.x, mrc.header.origin.y, mrc.header.origin.z = (float(o) for o in origin)
        mrc.header.nxstart, mrc.header.nystart, mrc.header.nzstart = (int(s) for s in start)
        if "cell_angles" in header:
            cellb = mrc.header.cellb
            cellb.alpha, cellb.beta, cellb.gamma = (float(a) for a in header["cell_angles"])
        if "space_group" in header:
            mrc.header.ispg = int(header["space_group"])
        if "extended_header" in header:
            exttyp, extended_bytes = header["extended_header"]
            mrc.set_extended_header(np.frombuffer(extended_bytes, dtype="V1"))
            mrc.header.exttyp = exttyp
        mrc.header.label[:] = b""
        mrc.header.nlabl = 0
        for text in labels:
            mrc.add_label(_printable_label(text.encode("ascii", "replace"))[:80])


# ----------------------------------------------------------------------------- hashing


def file_sha256(path: str | os.PathLike[str], *, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def geometry_sha256(geometry: VolumeGeometry) -> str:
    """Hex SHA-256 of what a volume's outputs copy from it besides the voxels: the
    :func:`geometry_record` and, for NIfTI, the whole header as stored (descrip, units,
    intent...) with its extensions, for MRC its text labels."""
    digest = hashlib.sha256()
    digest.update(json.dumps(geometry_record(geometry, json_safe=False), sort_keys=True).encode())
    header = geometry.header
    if geometry.format == "nifti" and header is not None:
        digest.update(bytes(header.binaryblock))
        if geometry.stored_pixdim is not None:
            digest.update(json.dumps(geometry.stored_pixdim).encode())
        for extension in getattr(header, "extensions", ()):  # copied into the outputs too
            raw = _stdio.BytesIO()
            extension.write_to(raw, byteswap=False)
            digest.update(raw.getvalue())
    elif isinstance(header, dict):
        digest.update(json.dumps([str(t) for t in header.get("labels", ())]).encode())
        if "extended_header" in header:  # (none: the digest of earlier versions)
            exttyp, extended_bytes = header["extended_header"]
            digest.update(b"extended header" + bytes(exttyp) + bytes(extended_bytes))
    return digest.hexdigest()


def array_sha256(data: np.ndarray) -> str:
    """Hex SHA-256 of an array's content (dtype, shape and bytes)."""
    data = np.ascontiguousarray(data)
    digest = hashlib.sha256()
    digest.update(f"{data.dtype.str}{data.shape}".encode())
    digest.update(memoryview(data).cast("B"))
    return digest.hexdigest()
