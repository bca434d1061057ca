"""On-disk cache of per-voxel embedding arrays, keyed by everything that produced them.

Location (:func:`resolve_cache_dir`): ``--cache-dir`` wins, then the
environment variable ``HYPSEG_CACHE_DIR``, then
``platformdirs.user_cache_dir("hypseg")``. Entries live in a versioned
sub-folder, ``<root>/embeddings-v1/``, so a future layout never misreads an
old one; each entry is two files::

    <key>.npy    the array, a plain NumPy .npy file
    <key>.json   its sidecar: shape, dtype, .npy file size, SHA-256 of the .npy
                 file, creation time and free-form metadata (volume, model...)

Key (:func:`embedding_key`)::

    key = SHA-256( JSON({"volume_sha256", "model_sha256", "params", "version"},
                        sort_keys, compact separators, ASCII, no NaN) )

where ``model_sha256`` is what :func:`hypsegcli.modelfile.model_content_sha256`
gives (configuration, normalisation and weights; not the model file's bytes), so
changing the volume, the model, any embedding parameter or the version gives
another key, and the order of a dict's items does not matter. Values are
compared as JSON: a tuple equals a list, ``1`` differs from ``1.0`` and from
``True``.

Writing (:meth:`EmbeddingCache.put`): the .npy file is written to a private
temporary file in the same folder (``.tmp-<pid>-<random>-<name>``, see
:func:`hypsegcli.io.atomic_path`), hashed and renamed into place with
``os.replace``; then the sidecar likewise. Renames within a folder are atomic,
so readers never see a partial file and concurrent processes writing the same
entry each write their own temporary files; the last rename wins.

Reading (:meth:`EmbeddingCache.get`) trusts nothing: a data file without a
valid sidecar, a sidecar without a data file, a truncated file, a bad .npy
header, a shape/dtype/size that disagrees with the sidecar or (with
``verify="full"``, the default) a SHA-256 that disagrees is logged as a warning
naming the entry, removed, and reported as a miss, so the caller recomputes.
Hashing costs about 0.1-0.3 s per 100 MB; ``verify="size"`` skips it for huge
arrays and checks only the sizes and the header, which catches truncation but
not bytes altered in place. Files replaced by a concurrent writer while being
checked are re-read (never removed); after a few such collisions ``get``
reports a miss.

Arrays of at least ``mmap_threshold`` bytes (default 1 MiB) come back memory
mapped read-only (an ``np.memmap``, as ``np.load(mmap_mode="r")`` gives);
smaller ones are read into memory, also read-only. Callers that need to write
make a copy (``np.array(arr)``). A mapped entry stays valid after it is
replaced or removed (POSIX keeps the old file alive while it is mapped).

Only an unusable cache folder (a file where the folder should be, no write
permission, a failed write) raises :class:`~hypsegcli.errors.HypsegError`,
with a one-line message naming the path; an ``optional`` cache (``cluster``'s)
raises only for a file in the way, and otherwise warns once and stores nothing
more, its entries still read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import platformdirs

from .checks import is_whole
from .errors import BadInputError, HypsegError
from .io import (
    atomic_path,
    file_sha256,
    os_error_text,
    remove_stale_temporaries,
    temporary_name,
)

log = logging.getLogger(__name__)

ENV_VAR = "HYPSEG_CACHE_DIR"
#: Versioned sub-folder of the cache root holding the embeddings.
LAYOUT = "embeddings-v1"
#: ``format`` field of every sidecar.
SIDECAR_FORMAT = "hypseg-embedding/1"
Verify = Literal["full", "size"]
VERIFY_MODES: tuple[str, ...] = ("full", "size")
#: Arrays of at least this many bytes are returned memory mapped.
DEFAULT_MMAP_THRESHOLD = 1 << 20
#: A data file without a sidecar younger than this may be a write in progress
#: (the sidecar is renamed in just after the data); it is a miss but kept.
ORPHAN_GRACE_S = 60.0

_TMP_PREFIX = ".tmp-"
_KEY_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z_-]{0,127}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_MAX_SIDECAR_BYTES = 1 << 20
_SETTLE_S = 0.02  # pause before judging a mismatch: a put's two renames are ~1 ms apart
_ATTEMPTS = 3  # reads retried when a concurrent writer replaced the files meanwhile


# ----------------------------------------------------------------------------- location and key


def resolve_cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``override`` (``--cache-dir``), else ``$HYPSEG_CACHE_DIR``, else the user cache dir.

    Empty values count as unset; ``~`` is expanded, and a relative path is made absolute
    (``cache path`` printed "rel" for ``HYPSEG_CACHE_DIR=rel``, which means another folder
    to a script that changes folder). Nothing is created here.
    """
    if override is not None and os.fspath(override):
        return Path(override).expanduser().absolute()
    env = os.environ.get(ENV_VAR, "")
    if env:
        return Path(env).expanduser().absolute()
    return Path(platformdirs.user_cache_dir("hypseg")).absolute()


def _key_json_default(obj: Any) -> Any:
    """JSON for the NumPy values that embedding parameters commonly hold; nothing else."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.dtype):
        return str(obj)
    raise TypeError(
        f"embedding parameter of type {type(obj).__name__} is not a plain JSON value: {obj!r}"
    )


def embedding_key(
    volume_sha256: str, model_sha256: str, params: dict[str, Any], version: str
) -> str:
    """Hex SHA-256 of the canonical JSON of the volume hash, model hash, parameters and version.

    ``params`` holds the embedding parameters (patch size, stride,
    normalisation, dtype...) as plain JSON values (NumPy scalars, arrays and
    dtypes are converted); anything else raises TypeError, so that an object's
    ``repr`` can never leak into a key.
    """
    for name, value in (
        ("volume_sha256", volume_sha256),
        ("model_sha256", model_sha256),
        ("version", version),
    ):
        if not isinstance(value, str):
            raise TypeError(f"{name} should be a str, got {type(value).__name__}")
    if not isinstance(params, dict):
        raise TypeError(f"params should be a dict, got {type(params).__name__}")
    payload = {
        "volume_sha256": volume_sha256,
        "model_sha256": model_sha256,
        "params": params,
        "version": version,
    }
    text = json.dumps(
        payload,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
        default=_key_json_default,
    )
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError(
            f"cache key should be 1-128 letters, digits, '-' or '_' (as from embedding_key), got {key!r}"
        )
    return key


def _check_verify(verify: str) -> str:
    if verify not in VERIFY_MODES:
        raise BadInputError(
            f"verify={verify!r} should be one of {', '.join(map(repr, VERIFY_MODES))}"
        )
    return verify


# ----------------------------------------------------------------------------- sidecar


@dataclass(frozen=True)
class CacheEntry:
    """One cached array as listed by :meth:`EmbeddingCache.entries`.

    ``size`` is the .npy file's size in bytes, ``sidecar_size`` its sidecar's;
    ``created`` the POSIX time of the put; ``meta`` the metadata given to ``put``
    plus ``created`` (ISO 8601).
    """

    key: str
    path: Path
    size: int
    shape: tuple[int, ...]
    dtype: np.dtype
    created: float
    meta: dict[str, Any] = field(default_factory=dict)
    sidecar_size: int = 0


class _Corrupt(Exception):
    """Why an entry cannot be used (becomes a warning and a miss)."""


@dataclass(frozen=True)
class _Record:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    file_size: int
    sha256: str
    created: float
    meta: dict[str, Any]


def _parse_sidecar(raw: bytes, key: str) -> _Record:
    """Validate a sidecar's JSON (raises :class:`_Corrupt` with the reason)."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Corrupt(f"sidecar is not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != SIDECAR_FORMAT:
        raise _Corrupt(f"sidecar is not a {SIDECAR_FORMAT} record")
    if doc.get("key") != key:
        raise _Corrupt(f"sidecar is for key {doc.get('key')!r}")
    shape = doc.get("shape")
    if not isinstance(shape, list) or not all(is_whole(s, 0) for s in shape):
        raise _Corrupt(f"sidecar shape {shape!r} is not a list of sizes")
    try:
        if not isinstance(doc.get("dtype"), str):
            raise TypeError
        dtype = np.dtype(doc["dtype"])
    except Exception:  # np.dtype raises several types for junk
        raise _Corrupt(f"sidecar dtype {doc.get('dtype')!r} is not a dtype") from None
    if dtype.hasobject:
        raise _Corrupt(f"sidecar dtype {dtype} is not numeric")
    file_size, sha, created = doc.get("file_size"), doc.get("sha256"), doc.get("created")
    if not is_whole(file_size, 0):
        raise _Corrupt(f"sidecar file_size {file_size!r} is not a size")
    if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
        raise _Corrupt(f"sidecar sha256 {sha!r} is not a SHA-256")
    if not isinstance(doc.get("fortran_order"), bool):
        raise _Corrupt("sidecar fortran_order is not a bool")
    if not isinstance(created, (int, float)) or isinstance(created, bool):
        raise _Corrupt(f"sidecar created {created!r} is not a time")
    meta = doc.get("meta", {})
    if not isinstance(meta, dict):
        raise _Corrupt("sidecar meta is not an object")
    return _Record(tuple(shape), dtype, doc["fortran_order"], file_size, sha, float(created), meta)


def _meta_json_default(obj: Any) -> Any:
    """Metadata is informational: paths, NumPy values and the rest become plain values or strings."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(map(str, obj))
    return str(obj)


def _read_npy_header(fh: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of an open .npy file."""
    fmt = np.lib.format
    version = fmt.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(fh)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    if dtype.hasobject:
        raise ValueError(f"object dtype {dtype}")
    return tuple(int(s) for s in shape), bool(fortran), dtype, fh.tell()


_RACE = object()  # a concurrent writer replaced the files under us: read again


# ----------------------------------------------------------------------------- the cache


def _write_sidecar_file(path: Path, text: str) -> None:
    """Write a sidecar atomically, its OSErrors as they are (``put`` tells a cache cleared
    meanwhile, a FileNotFoundError, from a full disk)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


class EmbeddingCache:
    """Embedding arrays under ``root/embeddings-v1/``, keyed by :func:`embedding_key`.

    ``root`` is the cache root (see :func:`resolve_cache_dir`); the folder is
    created if needed and must be writable, else :class:`HypsegError`
    (:class:`BadInputError` where a file is in the way). With ``create=False``
    (listing, clearing) a missing folder is left missing and reads as empty.
    ``verify`` is the default check of :meth:`get` (``"full"``: sizes, header
    and SHA-256; ``"size"``: sizes and header only). Arrays of at least
    ``mmap_threshold`` bytes are returned memory mapped.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        verify: Verify = "full",
        mmap_threshold: int = DEFAULT_MMAP_THRESHOLD,
        create: bool = True,
        optional: bool = False,
    ) -> None:
        self.root = Path(root).expanduser()
        self.directory = self.root / LAYOUT
        self.verify: str = _check_verify(verify)
        self.mmap_threshold = int(mmap_threshold)
        #: ``optional``: a cache the work can do without (``cluster``'s: the arrays it
        #: stores are in memory anyway): a folder that cannot be written, or a write that
        #: fails (a full disk), is warned about once, and the entries there are still
        #: read but no new one is stored. Otherwise (``embed``, whose output it is) such a
        #: folder or write raises.
        self.optional = bool(optional)
        self.writable = True
        if create:
            self._ensure_usable()
        else:
            self._check_not_blocked()

    def _stop_storing(self, why: str) -> None:
        """An optional cache that cannot store entries: said once; it is read from still."""
        if self.writable:
            log.warning(
                "%s: its entries are read, new ones are not stored this run (another cache: "
                "--cache-dir or %s)",
                why,
                ENV_VAR,
            )
        self.writable = False

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.root)!r})"

    # -- folder

    def _unusable(
        self, path: Path, why: str, error: type[HypsegError] = HypsegError
    ) -> HypsegError:
        return error(
            f"{path}: unusable cache folder ({why}); choose another with --cache-dir or {ENV_VAR}"
        )

    def _check_not_blocked(self) -> None:
        """BadInputError if a file stands where the folder or one of its parents should be."""
        blocker = next(
            (p for p in (self.directory, *self.directory.parents) if p.exists() and not p.is_dir()),
            None,
        )
        if blocker is not None:
            raise self._unusable(blocker, "a file is in the way, not a folder", BadInputError)

    def _ensure_usable(self) -> None:
        """Create the folder and prove it writable with a probe file."""
        folder = self.directory
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            self._check_not_blocked()
            raise self._unusable(
                folder, "a file is in the way, not a folder", BadInputError
            ) from None
        except OSError as exc:
            if self.optional:
                self._stop_storing(f"{folder}: cannot create the cache folder ({exc.strerror})")
                return
            raise self._unusable(folder, exc.strerror or str(exc)) from None
        probe = folder / temporary_name("probe")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):  # a concurrent `cache clear` took it
                os.unlink(probe)
        except OSError as exc:
            if self.optional:
                self._stop_storing(f"{folder}: cannot write in the cache folder ({exc.strerror})")
                return
            raise self._unusable(folder, f"cannot write: {exc.strerror or exc}") from None
        remove_stale_temporaries(folder)  # a killed put's array (see io.STALE_TEMPORARY_S)

    def data_path(self, key: str) -> Path:
        """Where the entry's .npy file lives (whether or not it exists)."""
        return self.directory / f"{_check_key(key)}.npy"

    def _sidecar_path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    # -- writing

    def put(self, key: str, array: np.ndarray, meta: dict[str, Any] | None = None) -> Path | None:
        """Store ``array`` under ``key`` (replacing any entry) and return the .npy path
        (None where an optional cache stores nothing, see ``optional``).

        ``meta`` is free-form, JSON-able information shown by ``hypseg cache ls``
        (e.g. ``volume`` name, ``model`` path); ``created`` is added. Numeric
        arrays of any shape (float32 and float16 embeddings, also ints, bools)
        are accepted, C or Fortran order. The data file is renamed into place
        before the sidecar; both atomically, and if the sidecar cannot be written
        the data file is removed again. An OSError while writing raises
        HypsegError naming the file; if a concurrent :meth:`clear` removed the
        temporary file, the entry is simply not stored (a warning).
        """
        data_path = self.data_path(key)
        side_path = self._sidecar_path(key)
        if not self.writable:
            return None
        array = np.asarray(array)
        if array.dtype.kind not in "biufc" or array.dtype.fields is not None:
            raise TypeError(f"cache entries hold numeric arrays, got dtype {array.dtype}")
        created = time.time()
        meta_doc = dict(meta or {})
        meta_doc.setdefault(
            "created", datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="seconds")
        )
        meta_doc = json.loads(json.dumps(meta_doc, default=_meta_json_default, allow_nan=True))
        fortran = bool(array.flags.f_contiguous and not array.flags.c_contiguous)
        failing, sidecar_gone = data_path, False
        try:
            with atomic_path(data_path) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, array, allow_pickle=False)
                file_size = tmp.stat().st_size
                digest = file_sha256(tmp)
                # an entry replaced: its old sidecar goes before the new data takes its place,
                # so a failure below leaves no sidecar describing other data
                with contextlib.suppress(FileNotFoundError):
                    side_path.unlink()
                sidecar_gone = True
            failing = side_path
            record = {
                "format": SIDECAR_FORMAT,
                "key": key,
                "shape": list(array.shape),
                "dtype": array.dtype.str,
                "fortran_order": fortran,
                "file_size": file_size,
                "sha256": digest,
                "created": created,
                "meta": meta_doc,
            }
            _write_sidecar_file(side_path, json.dumps(record, indent=1, sort_keys=True) + "\n")
        except BaseException as exc:
            if sidecar_gone:  # a data file (new, or the old one) without its sidecar: remove it
                with contextlib.suppress(OSError):
                    data_path.unlink()
            if isinstance(exc, FileNotFoundError):
                log.warning(
                    "cache entry %s not stored: %s vanished (cache cleared meanwhile?)",
                    data_path,
                    exc.filename,
                )
            elif isinstance(exc, OSError):
                message = f"{failing}: cannot write cache entry ({os_error_text(exc)})"
                if not self.optional:
                    raise HypsegError(message) from None
                self._stop_storing(message)
                return None
            else:
                raise
        return data_path

    # -- reading

    def get(self, key: str, *, verify: Verify | None = None) -> np.ndarray | None:
        """The array stored under ``key`` (read-only), or None on a miss.

        Arrays of at least ``mmap_threshold`` bytes are an ``np.memmap`` opened
        read-only; copy (``np.array(arr)``) before writing. A broken entry is
        logged, removed and reported as a miss; ``verify`` (default: the
        cache's) chooses ``"full"`` (SHA-256 checked) or ``"size"`` (sizes and
        header only, for huge arrays). Never raises for a bad entry.
        """
        mode = self.verify if verify is None else _check_verify(verify)
        _check_key(key)
        for _ in range(_ATTEMPTS):
            result = self._read(key, mode)
            if result is not _RACE:
                return result  # type: ignore[return-value]
        log.debug("cache entry %s kept changing while read; treated as a miss", self.data_path(key))
        return None

    def _read(self, key: str, mode: str) -> Any:
        data_path, side_path = self.data_path(key), self._sidecar_path(key)
        try:
            with open(side_path, "rb") as fh:
                side_ino = os.fstat(fh.fileno()).st_ino
                raw = fh.read(_MAX_SIDECAR_BYTES + 1)
        except FileNotFoundError:
            return self._orphan(data_path, side_path)
        except OSError as exc:
            return self._discard(
                data_path, side_path, f"unreadable sidecar ({exc.strerror or exc})", []
            )
        try:
            if len(raw) > _MAX_SIDECAR_BYTES:
                raise _Corrupt(f"sidecar larger than {_MAX_SIDECAR_BYTES} bytes")
            record = _parse_sidecar(raw, key)
        except _Corrupt as exc:
            return self._discard(data_path, side_path, str(exc), [(side_path, side_ino)])
        try:
            fh = open(data_path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return self._discard(
                data_path,
                side_path,
                "sidecar without data file",
                [(side_path, side_ino), (data_path, None)],
            )
        except OSError as exc:
            return self._discard(
                data_path,
                side_path,
                f"unreadable data ({exc.strerror or exc})",
                [(side_path, side_ino)],
            )
        with fh:
            size = os.fstat(fh.fileno()).st_size
            same = [(side_path, side_ino), (data_path, os.fstat(fh.fileno()).st_ino)]
            try:
                self._check(fh, size, record)
                if mode == "full":
                    digest = file_sha256(data_path)
                    if os.stat(data_path).st_ino != same[1][1]:
                        return _RACE  # hashed another file than the one open
                    if digest != record.sha256:
                        raise _Corrupt("SHA-256 of the data differs from the sidecar's")
                return self._load(fh, record)
            except FileNotFoundError:
                return _RACE
            except _Corrupt as exc:
                return self._discard(data_path, side_path, str(exc), same)
            except OSError as exc:
                return self._discard(
                    data_path, side_path, f"unreadable data ({exc.strerror or exc})", same
                )

    @staticmethod
    def _check(fh: BinaryIO, size: int, record: _Record) -> None:
        """Cheap checks: file size, .npy header, agreement with the sidecar."""
        if size != record.file_size:
            raise _Corrupt(
                f"data file has {size} bytes, sidecar says {record.file_size} (truncated?)"
            )
        try:
            shape, fortran, dtype, offset = _read_npy_header(fh)
        except Exception as exc:  # numpy raises ValueError mostly, but never trust junk
            raise _Corrupt(
                f"bad .npy header ({str(exc).splitlines()[0] if str(exc) else 'unreadable'})"
            ) from None
        if (shape, dtype, fortran) != (record.shape, record.dtype, record.fortran_order):
            raise _Corrupt(
                f".npy header says shape {shape} dtype {dtype.str} fortran={fortran}, sidecar says "
                f"shape {record.shape} dtype {record.dtype.str} fortran={record.fortran_order}"
            )
        expected = offset + math.prod(shape) * dtype.itemsize
        if expected != size:
            raise _Corrupt(f"data file has {size} bytes, its header needs {expected}")

    def _load(self, fh: BinaryIO, record: _Record) -> np.ndarray:
        """The array from the open, checked file (positioned just after the header)."""
        offset = fh.tell()
        count = math.prod(record.shape)
        nbytes = count * record.dtype.itemsize
        order = "F" if record.fortran_order else "C"
        if record.shape and nbytes > 0 and nbytes >= self.mmap_threshold:
            return np.memmap(
                fh, dtype=record.dtype, mode="r", offset=offset, shape=record.shape, order=order
            )
        buf = fh.read(nbytes)
        if len(buf) != nbytes:
            raise _Corrupt(f"short read: {len(buf)} of {nbytes} data bytes")
        return np.frombuffer(buf, dtype=record.dtype, count=count).reshape(
            record.shape, order=order
        )

    def _orphan(self, data_path: Path, side_path: Path) -> Any:
        """No sidecar: a miss; a data file alone is removed once older than the grace period."""
        try:
            st = os.stat(data_path)
        except FileNotFoundError:
            return None
        if time.time() - st.st_mtime < ORPHAN_GRACE_S:
            return None  # maybe a put between its two renames
        return self._discard(
            data_path,
            side_path,
            "data file without sidecar",
            [(data_path, st.st_ino), (side_path, None)],
        )

    def _discard(
        self, data_path: Path, side_path: Path, reason: str, same: list[tuple[Path, int | None]]
    ) -> Any:
        """Remove a broken entry unless a concurrent writer replaced its files meanwhile (then read again).

        A mismatch may be a put caught between its two renames (its data with
        the previous sidecar), so the files are looked at again after a short
        pause (``_SETTLE_S``) and removed only if they are still the same
        (``same`` lists each path with its inode number, None for "absent").
        """
        if same:
            time.sleep(_SETTLE_S)
        for path, ino in same:
            try:
                now: int | None = os.stat(path).st_ino
            except FileNotFoundError:
                now = None
            if now != ino:
                return _RACE
        log.warning(
            "cache entry %s is corrupt (%s); removed it, it will be recomputed", data_path, reason
        )
        for path in (side_path, data_path):
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("cannot remove %s (%s)", path, exc.strerror or exc)
        return None

    def __contains__(self, key: object) -> bool:
        """Cheap presence test (sidecar valid, data file of the right size); ``get`` may still miss."""
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            return False
        try:
            record = _parse_sidecar(self._sidecar_path(key).read_bytes(), key)
            return os.stat(self.data_path(key)).st_size == record.file_size
        except (OSError, _Corrupt):
            return False

    # -- listing and housekeeping

    def _files(self) -> list[Path]:
        try:
            return sorted(self.directory.iterdir())
        except FileNotFoundError:
            return []

    def entries(self) -> list[CacheEntry]:
        """Entries with a valid sidecar and a data file of the right size, oldest first (no hashing)."""
        found = []
        for side_path in self._files():
            key = side_path.stem
            if side_path.suffix != ".json" or not _KEY_RE.fullmatch(key):
                continue
            try:
                side_bytes = side_path.read_bytes()
                record = _parse_sidecar(side_bytes, key)
                data_path = self.data_path(key)
                if os.stat(data_path).st_size != record.file_size:
                    continue
            except (OSError, _Corrupt):
                continue
            found.append(
                CacheEntry(
                    key,
                    data_path,
                    record.file_size,
                    record.shape,
                    record.dtype,
                    record.created,
                    record.meta,
                    len(side_bytes),
                )
            )
        return sorted(found, key=lambda e: (e.created, e.key))

    def total_bytes(self) -> int:
        """Bytes used by the cache folder: data, sidecars and any stray temporary files."""
        total = 0
        for path in self._files():
            with contextlib.suppress(OSError):
                if path.is_file():
                    total += path.stat().st_size
        return total

    def clear(self) -> int:
        """Remove every entry (sidecars first) and stray temporary files; return the number of entries removed.

        A put running concurrently in another process loses its entry (it
        warns). Entries are the files of a valid sidecar (the count), and any
        ``<sha>.json`` / ``<sha>.npy`` with a SHA-256 name (hypseg's keys: the debris of
        a corrupt or interrupted entry); other files in the folder are left alone, as
        :meth:`entries` leaves them out.
        """
        files = self._files()
        valid: set[str] = set()
        for path in files:
            if path.suffix == ".json" and _KEY_RE.fullmatch(path.stem):
                with contextlib.suppress(OSError, _Corrupt):
                    _parse_sidecar(path.read_bytes(), path.stem)
                    valid.add(path.stem)
        entry_files = [
            p
            for suffix in (".json", ".npy")
            for p in files
            if p.suffix == suffix and (p.stem in valid or _SHA_RE.fullmatch(p.stem))
        ]
        strays = [p for p in files if p.name.startswith(_TMP_PREFIX) and p.is_file()]
        removed: set[str] = set()
        for path in entry_files + strays:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise HypsegError(
                    f"{path}: cannot remove from the cache ({exc.strerror or exc})"
                ) from None
            if path.suffix == ".json" and path.stem in valid:
                removed.add(path.stem)
        return len(removed)
