"""Embedding cache: real files in tmp_path, broken on purpose, and hammered by several processes."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import platformdirs
import pytest

from hypsegcli import cache as cache_mod
from hypsegcli.cache import LAYOUT, EmbeddingCache, embedding_key, resolve_cache_dir
from hypsegcli.errors import BadInputError, HypsegError

VOL = "a" * 64
MODEL = "b" * 64
PARAMS = {"patch_size": 5, "stride": 1, "normalize": [1.0, 99.0], "dtype": "float32"}


def _array(shape, dtype, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.fixture
def cache(tmp_path):
    return EmbeddingCache(tmp_path / "root")


@pytest.fixture
def key():
    return embedding_key(VOL, MODEL, PARAMS, "0.1.0")


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", [(7, 6, 5, 2), (3, 4, 5, 16), (1, 1, 1, 2), (11,), (0, 3), ()])
@pytest.mark.parametrize("mmap_threshold", [0, 1 << 30])
def test_round_trip(tmp_path, dtype, shape, mmap_threshold):
    cache = EmbeddingCache(tmp_path, mmap_threshold=mmap_threshold)
    data = _array(shape, dtype)
    path = cache.put("k1", data)
    assert path == tmp_path / LAYOUT / "k1.npy" and path.is_file()
    for verify in ("full", "size"):
        got = cache.get("k1", verify=verify)
        assert got is not None and got.dtype == dtype and got.shape == shape
        np.testing.assert_array_equal(got, data)
        assert not got.flags.writeable
    assert np.load(path).dtype == dtype  # a plain .npy file


def test_large_arrays_are_memory_mapped_small_ones_in_memory(cache):
    big, small = _array((64, 64, 40, 2), np.float32), _array((4, 4, 4, 2), np.float16)
    cache.put("big", big)
    cache.put("small", small)
    got_big, got_small = cache.get("big"), cache.get("small")
    assert big.nbytes >= cache.mmap_threshold and isinstance(got_big, np.memmap)
    assert not isinstance(got_small, np.memmap)
    np.testing.assert_array_equal(got_big, big)
    np.testing.assert_array_equal(got_small, small)
    with pytest.raises(ValueError):
        got_big[0, 0, 0, 0] = 1.0  # read-only: callers copy to write
    copy = np.array(got_big)
    copy[0, 0, 0, 0] = 1.0


def test_fortran_order_and_other_dtypes_round_trip(cache):
    f = np.asfortranarray(_array((5, 6, 7), np.float32))
    cache.put("f", f)
    np.testing.assert_array_equal(cache.get("f"), f)
    ints = np.arange(24, dtype=np.int16).reshape(2, 3, 4)[:, ::2]  # non-contiguous view
    cache.put("i", ints)
    np.testing.assert_array_equal(cache.get("i"), ints)


def test_put_replaces_and_rejects_object_arrays(cache):
    cache.put("k", np.zeros(3, np.float32))
    cache.put("k", np.ones(4, np.float32))
    np.testing.assert_array_equal(cache.get("k"), np.ones(4, np.float32))
    with pytest.raises(TypeError, match="numeric"):
        cache.put("k", np.array([object()]))


def test_miss_and_contains(cache, key):
    assert cache.get(key) is None
    assert key not in cache and 3 not in cache and "../x" not in cache
    cache.put(key, np.zeros((2, 2), np.float32))
    assert key in cache


def test_bad_key_and_verify_values(cache):
    for bad in ("", "../etc", ".tmp-x", "a/b", "x" * 129, 7):
        with pytest.raises(ValueError, match="cache key"):
            cache.get(bad)
    with pytest.raises(BadInputError, match="verify='fast'"):
        cache.get("k", verify="fast")
    with pytest.raises(BadInputError, match="verify"):
        EmbeddingCache(cache.root, verify="none")


# ----------------------------------------------------------------------------- key


def test_key_is_stable_and_ignores_dict_order():
    k = embedding_key(VOL, MODEL, PARAMS, "0.1.0")
    assert len(k) == 64 and int(k, 16) >= 0
    reordered = dict(reversed(list(PARAMS.items())))
    assert embedding_key(VOL, MODEL, reordered, "0.1.0") == k
    assert (
        embedding_key(VOL, MODEL, {**PARAMS, "normalize": (1.0, 99.0)}, "0.1.0") == k
    )  # tuple == list
    assert embedding_key(VOL, MODEL, {**PARAMS, "patch_size": np.int64(5)}, "0.1.0") == k
    assert embedding_key(VOL, MODEL, {**PARAMS, "dtype": np.dtype("float32")}, "0.1.0") == k
    nested = {"a": {"x": 1, "y": 2}, "b": 3}
    assert embedding_key(VOL, MODEL, nested, "1") == embedding_key(
        VOL, MODEL, {"b": 3, "a": {"y": 2, "x": 1}}, "1"
    )


def test_key_changes_when_any_part_changes():
    base = embedding_key(VOL, MODEL, PARAMS, "0.1.0")
    variants = [
        embedding_key("c" * 64, MODEL, PARAMS, "0.1.0"),
        embedding_key(VOL, "c" * 64, PARAMS, "0.1.0"),
        embedding_key(VOL, MODEL, PARAMS, "0.1.1"),
        embedding_key(MODEL, VOL, PARAMS, "0.1.0"),  # swapped hashes
        embedding_key(VOL, MODEL, {**PARAMS, "patch_size": 7}, "0.1.0"),
        embedding_key(VOL, MODEL, {**PARAMS, "stride": 2}, "0.1.0"),
        embedding_key(VOL, MODEL, {**PARAMS, "normalize": [1.0, 99.5]}, "0.1.0"),
        embedding_key(VOL, MODEL, {**PARAMS, "dtype": "float16"}, "0.1.0"),
        embedding_key(VOL, MODEL, {**PARAMS, "tile": None}, "0.1.0"),
        embedding_key(VOL, MODEL, {k: v for k, v in PARAMS.items() if k != "stride"}, "0.1.0"),
        embedding_key(VOL, MODEL, {**PARAMS, "stride": True}, "0.1.0"),  # True is not 1
        embedding_key(VOL, MODEL, {**PARAMS, "stride": 1.0}, "0.1.0"),  # JSON 1.0 is not 1
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_key_refuses_values_that_are_not_plain_json():
    with pytest.raises(TypeError, match="not a plain JSON value"):
        embedding_key(VOL, MODEL, {"model": object()}, "1")
    with pytest.raises(ValueError):
        embedding_key(VOL, MODEL, {"x": float("nan")}, "1")
    with pytest.raises(TypeError, match="volume_sha256"):
        embedding_key(b"x", MODEL, {}, "1")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- location


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPSEG_CACHE_DIR", str(tmp_path / "env"))
    assert resolve_cache_dir(tmp_path / "cli") == tmp_path / "cli"
    assert resolve_cache_dir(str(tmp_path / "cli")) == tmp_path / "cli"
    assert resolve_cache_dir() == tmp_path / "env"
    assert resolve_cache_dir("") == tmp_path / "env"
    monkeypatch.setenv("HYPSEG_CACHE_DIR", "")
    assert resolve_cache_dir() == Path(platformdirs.user_cache_dir("hypseg"))
    monkeypatch.delenv("HYPSEG_CACHE_DIR")
    monkeypatch.setattr(
        cache_mod.platformdirs, "user_cache_dir", lambda app: str(tmp_path / "user" / app)
    )
    assert resolve_cache_dir() == tmp_path / "user" / "hypseg"
    assert resolve_cache_dir(tmp_path / "cli") == tmp_path / "cli"


def test_cache_dir_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_cache_dir("~/c") == tmp_path / "c"
    monkeypatch.setenv("HYPSEG_CACHE_DIR", "~/envc")
    assert resolve_cache_dir() == tmp_path / "envc"


def test_a_relative_cache_dir_is_made_absolute(tmp_path, monkeypatch, capsys):
    """QA: `cache path` printed "rel" for HYPSEG_CACHE_DIR=rel, another folder to a
    script that changes folder."""
    from clitools import run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HYPSEG_CACHE_DIR", "rel")
    assert resolve_cache_dir() == tmp_path / "rel"
    assert resolve_cache_dir("sub/c") == tmp_path / "sub" / "c"
    code, out, _ = run(["cache", "path"], capsys)
    assert code == 0 and out == f"{tmp_path / 'rel'}\n"


def test_default_cache_lives_under_the_env_dir_in_a_versioned_folder():
    cache = EmbeddingCache(resolve_cache_dir())
    assert cache.root == Path(os.environ["HYPSEG_CACHE_DIR"])
    assert cache.directory == cache.root / LAYOUT and cache.directory.is_dir()


# ----------------------------------------------------------------------------- unusable folder


def test_file_in_place_of_the_root_is_an_error(tmp_path):
    blocker = tmp_path / "cachefile"
    blocker.write_text("not a folder")
    with pytest.raises(HypsegError, match="unusable cache folder") as info:
        EmbeddingCache(blocker)
    message = str(info.value)
    assert str(blocker) in message and "\n" not in message
    with pytest.raises(HypsegError, match=str(blocker)):
        EmbeddingCache(blocker / "below")


def test_file_in_place_of_the_versioned_folder_is_an_error(tmp_path):
    (tmp_path / LAYOUT).write_text("x")
    with pytest.raises(HypsegError, match=str(tmp_path / LAYOUT)):
        EmbeddingCache(tmp_path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_folder_is_an_error(tmp_path):
    (tmp_path / LAYOUT).mkdir()
    os.chmod(tmp_path / LAYOUT, 0o500)
    try:
        with pytest.raises(HypsegError, match="cannot write"):
            EmbeddingCache(tmp_path)
    finally:
        os.chmod(tmp_path / LAYOUT, 0o700)


def test_unwritable_folder_is_an_error_even_as_root(tmp_path, monkeypatch):
    def denied(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cache_mod.os, "open", denied)
    with pytest.raises(
        HypsegError,
        match=f"{tmp_path / LAYOUT}: unusable cache folder .cannot write: Permission denied",
    ):
        EmbeddingCache(tmp_path)


def test_a_killed_puts_temporary_is_removed_once_stale(tmp_path):
    """A put killed mid-write leaves its array as a hidden temporary in the cache folder;
    opening the cache for writing removes it once an hour old (a fresh one may be another
    process's put in progress), as cluster and embed do in their output folders."""
    from hypsegcli.io import STALE_TEMPORARY_S

    EmbeddingCache(tmp_path)
    folder = tmp_path / LAYOUT
    stale, fresh = folder / ".tmp-77-0123abcd-k1.npy", folder / ".tmp-78-0123abcd-k2.npy"
    for path in (stale, fresh):
        path.write_bytes(b"x" * 3000)
    hour_ago = time.time() - STALE_TEMPORARY_S - 60
    os.utime(stale, (hour_ago, hour_ago))
    EmbeddingCache(tmp_path, create=False)  # listing, clearing: nothing removed
    assert stale.exists()
    EmbeddingCache(tmp_path)
    assert not stale.exists() and fresh.exists()


def test_failed_write_is_an_error_naming_the_file(cache, monkeypatch):
    def no_space(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_mod.np, "save", no_space)
    with pytest.raises(HypsegError, match="k.npy: cannot write cache entry .No space left"):
        cache.put("k", np.zeros(3, np.float32))
    assert list(cache.directory.iterdir()) == []  # no temporary file left behind


def test_an_optional_cache_that_fills_up_or_is_read_only_stores_nothing_more(
    tmp_path, monkeypatch, caplog
):
    """Review: `cluster` failed every volume on a full cache disk (for a 2x2 centroid array it
    could not store, the embeddings in memory), and refused a read-only cache that held
    every entry it needed. An optional cache (cluster's) warns once and goes on."""
    full = EmbeddingCache(tmp_path, optional=True)
    full.put("old", np.arange(3.0))
    real_save = cache_mod.np.save

    def no_space(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_mod.np, "save", no_space)
    with caplog.at_level("WARNING", logger="hypsegcli"):
        assert full.put("k", np.zeros(3)) is None and full.put("j", np.ones(3)) is None
    assert caplog.text.count("cannot write cache entry (No space left on device)") == 1
    assert "its entries are read, new ones are not stored this run" in caplog.text
    assert not full.writable and full.get("k") is None
    np.testing.assert_array_equal(full.get("old"), np.arange(3.0))
    monkeypatch.setattr(cache_mod.np, "save", real_save)
    assert full.put("k", np.zeros(3)) is None  # (for the rest of the run)
    # a folder that cannot be written: read, not written, and no error
    real_open = cache_mod.os.open

    def read_only(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            raise OSError(30, "Read-only file system")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(cache_mod.os, "open", read_only)
    caplog.clear()
    with caplog.at_level("WARNING", logger="hypsegcli"):
        shared = EmbeddingCache(tmp_path, optional=True)
    assert "cannot write in the cache folder (Read-only file system)" in caplog.text
    np.testing.assert_array_equal(shared.get("old"), np.arange(3.0))
    assert shared.put("new", np.zeros(2)) is None
    with pytest.raises(HypsegError, match="unusable cache folder .cannot write: Read-only"):
        EmbeddingCache(tmp_path)  # (embed's, which the cache is the output of)
    # a file in the way is a mistake to name, optional or not
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(BadInputError, match="a file is in the way"):
        EmbeddingCache(tmp_path / "blocker", optional=True)


@pytest.mark.parametrize(
    "exc", [OSError(28, "No space left on device"), KeyboardInterrupt(), FileNotFoundError()]
)
def test_a_failed_sidecar_write_leaves_no_data_file(cache, monkeypatch, exc):
    """The data file is renamed into place first: when its sidecar then cannot be written
    (full disk, Ctrl-C, a concurrent clear), the data file goes too, and an error names the
    sidecar."""

    def failing(*_args, **_kwargs):
        raise exc

    monkeypatch.setattr(cache_mod, "_write_sidecar_file", failing)
    if isinstance(exc, FileNotFoundError):
        cache.put("k", np.zeros(3, np.float32))  # a warning: the entry is not stored
    elif isinstance(exc, OSError):
        with pytest.raises(HypsegError, match=r"k\.json: cannot write cache entry .No space"):
            cache.put("k", np.zeros(3, np.float32))
    else:
        with pytest.raises(KeyboardInterrupt):
            cache.put("k", np.zeros(3, np.float32))
    assert list(cache.directory.iterdir()) == []


def test_a_replaced_entry_whose_sidecar_fails_leaves_nothing(cache, monkeypatch, caplog):
    """Replacing an entry (--overwrite): the old sidecar goes before the new data takes its
    place, so a failed sidecar write leaves neither file, and no corrupt entry to warn of."""
    cache.put("k", np.zeros(3, np.float32))

    def no_space(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_mod, "_write_sidecar_file", no_space)
    with pytest.raises(HypsegError, match=r"k\.json: cannot write cache entry"):
        cache.put("k", np.ones(3, np.float32))
    assert list(cache.directory.iterdir()) == []
    with caplog.at_level(logging.WARNING):
        assert cache.get("k") is None
    assert "corrupt" not in caplog.text


def test_a_failed_rename_names_the_data_file(cache, monkeypatch):
    cache.put("k", np.zeros(3, np.float32))
    real_replace = os.replace

    def denied(src, dst):
        if str(dst).endswith(".npy"):
            raise PermissionError(13, "Permission denied")
        return real_replace(src, dst)

    monkeypatch.setattr(cache_mod.os, "replace", denied)
    with pytest.raises(HypsegError, match=r"k\.npy: cannot write cache entry .Permission denied"):
        cache.put("k", np.ones(3, np.float32))
    assert list(cache.directory.iterdir()) == []  # the old entry, half replaced, is gone whole


def test_a_short_write_says_the_disk_may_be_full(cache, monkeypatch):
    def short(*_args, **_kwargs):
        raise OSError("16000 requested and 3040 written")  # numpy's, without errno

    monkeypatch.setattr(cache_mod.np, "save", short)
    with pytest.raises(HypsegError, match=r"k\.npy: cannot write cache entry .short write.*full"):
        cache.put("k", np.zeros(3, np.float32))


def test_a_probe_removed_by_a_concurrent_clear_is_no_error(tmp_path, monkeypatch):
    real_unlink = os.unlink

    def cleared(path, *args, **kwargs):
        if str(path).endswith("-probe"):
            real_unlink(path)  # `cache clear` got there first
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(cache_mod.os, "unlink", cleared)
    EmbeddingCache(tmp_path)


# ----------------------------------------------------------------------------- corruption


def _truncate_half(data, side):
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def _truncate_to_header(data, side):
    data.write_bytes(data.read_bytes()[:10])


def _garbage_same_size(data, side):
    data.write_bytes(np.random.default_rng(1).bytes(data.stat().st_size))


def _flip_a_data_byte(data, side):
    raw = bytearray(data.read_bytes())
    raw[-3] ^= 0xFF
    data.write_bytes(bytes(raw))


def _empty_data(data, side):
    data.write_bytes(b"")


def _drop_data(data, side):
    data.unlink()


def _garbage_sidecar(data, side):
    side.write_bytes(b"\x00\xffnot json{")


def _empty_sidecar(data, side):
    side.write_text("")


def _edit_sidecar(**changes):
    def edit(data, side):
        doc = json.loads(side.read_text())
        for name, value in changes.items():
            if value is None:
                doc.pop(name)
            else:
                doc[name] = value
        side.write_text(json.dumps(doc))

    edit.__name__ = "sidecar_" + "_".join(changes)
    return edit


def _header_says_other_shape(data, side):
    raw = data.read_bytes()
    data.write_bytes(raw.replace(b"(6, 5, 4, 3)", b"(5, 6, 4, 3)"))


CORRUPTIONS = [
    _truncate_half,
    _truncate_to_header,
    _garbage_same_size,
    _flip_a_data_byte,
    _empty_data,
    _drop_data,
    _garbage_sidecar,
    _empty_sidecar,
    _header_says_other_shape,
    _edit_sidecar(shape=[6, 5, 4, 4]),
    _edit_sidecar(dtype="<f2"),
    _edit_sidecar(dtype="no such dtype"),
    _edit_sidecar(file_size=12),
    _edit_sidecar(sha256="0" * 64),
    _edit_sidecar(key="other"),
    _edit_sidecar(format="something else"),
    _edit_sidecar(fortran_order=True),
    _edit_sidecar(sha256=None),
]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("mmap_threshold", [0, 1 << 30])
def test_corrupt_entry_is_removed_and_a_miss(tmp_path, key, corrupt, mmap_threshold, caplog):
    cache = EmbeddingCache(tmp_path, mmap_threshold=mmap_threshold)
    data = _array((6, 5, 4, 3), np.float32)
    data_path = cache.put(key, data)
    side_path = data_path.with_suffix(".json")
    corrupt(data_path, side_path)
    with caplog.at_level(logging.WARNING, logger="hypsegcli.cache"):
        assert cache.get(key) is None
    assert any(
        str(data_path) in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records
    )
    assert not data_path.exists() and not side_path.exists()
    assert key not in cache and cache.entries() == []
    caplog.clear()
    assert cache.get(key) is None and not caplog.records  # now a plain miss
    cache.put(key, data)
    np.testing.assert_array_equal(cache.get(key), data)


def test_size_verification_skips_the_hash_but_checks_sizes(cache, key):
    data = _array((6, 5, 4, 3), np.float32)
    data_path = cache.put(key, data)
    _flip_a_data_byte(data_path, None)
    altered = cache.get(key, verify="size")  # documented trade-off: bytes altered in place pass
    assert altered is not None and altered.shape == data.shape
    _truncate_half(data_path, None)
    assert cache.get(key, verify="size") is None and not data_path.exists()
    size_only = EmbeddingCache(cache.root, verify="size")
    size_only.put(key, data)
    _flip_a_data_byte(data_path, None)
    assert size_only.get(key) is not None
    assert size_only.get(key, verify="full") is None


def test_data_file_without_sidecar(cache, key, caplog):
    data_path = cache.put(key, np.zeros(5, np.float32))
    side_path = data_path.with_suffix(".json")
    side_path.unlink()
    assert cache.get(key) is None and data_path.exists()  # fresh: maybe a put between its renames
    old = time.time() - 2 * cache_mod.ORPHAN_GRACE_S
    os.utime(data_path, (old, old))
    with caplog.at_level(logging.WARNING, logger="hypsegcli.cache"):
        assert cache.get(key) is None
    assert (
        not data_path.exists()
        and "without sidecar" in caplog.text
        and str(data_path) in caplog.text
    )
    cache.put(key, np.ones(5, np.float32))
    np.testing.assert_array_equal(cache.get(key), np.ones(5, np.float32))


# ----------------------------------------------------------------------------- listing and clearing


def test_entries_list_what_was_put(cache):
    a, b = _array((4, 4, 4, 2), np.float32), _array((3, 3, 3, 8), np.float16)
    cache.put("second", b, {"volume": "case_b", "model": Path("/m/model.pt")})
    cache.put("first", a, {"volume": "case_a"})
    entries = cache.entries()
    assert [e.key for e in entries] == ["second", "first"]  # by creation time
    for entry, arr in zip(entries, (b, a), strict=True):
        assert entry.path == cache.data_path(entry.key)
        assert entry.size == entry.path.stat().st_size > arr.nbytes
        assert entry.shape == arr.shape and entry.dtype == arr.dtype
        assert entry.created <= time.time() and "created" in entry.meta
    assert entries[0].meta["volume"] == "case_b" and entries[0].meta["model"] == "/m/model.pt"
    sidecars = sum(e.path.with_suffix(".json").stat().st_size for e in entries)
    assert cache.total_bytes() == sum(e.size for e in entries) + sidecars


def test_clear_removes_everything_including_stray_temp_files(cache):
    for i in range(3):
        cache.put(f"k{i}", np.full(10, i, np.float32))
    stray = cache.directory / ".tmp-99999-deadbeef-k0.npy"
    stray.write_bytes(b"half written")
    sha = "0123456789abcdef" * 4  # hypseg's keys are SHA-256 digests
    (cache.directory / f"{sha}.npy").write_bytes(b"x")  # an interrupted put's data file
    (cache.directory / f"{'f' * 64}.json").write_text("{corrupt")
    assert cache.total_bytes() > 0
    # foreign files with key-like names are no entries and stay (as cache ls counts them)
    (cache.directory / "README.json").write_text("{}")
    (cache.directory / "data.npy").write_bytes(b"x")
    assert cache.clear() == 3  # the orphan and the corrupt sidecar go too, but were no entries
    assert sorted(p.name for p in cache.directory.iterdir()) == ["README.json", "data.npy"]
    for name in ("README.json", "data.npy"):
        (cache.directory / name).unlink()
    assert cache.entries() == [] and cache.total_bytes() == 0 and cache.get("k0") is None
    assert cache.clear() == 0
    cache.put("k0", np.zeros(2, np.float32))
    assert [e.key for e in cache.entries()] == ["k0"]


def test_cache_ls_counts_entries_apart_from_other_files(tmp_path, capsys):
    from clitools import run

    cache = EmbeddingCache(tmp_path)
    for i in range(2):
        cache.put(f"k{i}", np.zeros(100, np.float32))
    (cache.directory / "README.txt").write_bytes(b"x" * 3000)
    code, out, err = run(["cache", "ls", "--cache-dir", tmp_path], capsys)
    assert code == 0 and out.count("528 B") == 2  # 400 bytes of data + the .npy header
    side = sum(p.stat().st_size for p in cache.directory.glob("*.json"))
    from hypsegcli.cli import _size_text

    assert f"2 entries, {_size_text(1056 + side)} (and" in err
    assert "(and 3 kB in other files)" in err
    # review: --quiet hid every informational line but this summary
    code, out2, err = run(["-q", "cache", "ls", "--cache-dir", tmp_path], capsys)
    assert code == 0 and out2 == out and err == ""


# ----------------------------------------------------------------------------- concurrency

SHAPE = (24, 24, 16, 4)  # 147 kB of float32


def _writer(root, key, value, rounds, same):
    cache = EmbeddingCache(root, mmap_threshold=1 << 16)
    data = _array(SHAPE, np.float32, seed=7) if same else np.full(SHAPE, value, np.float32)
    for _ in range(rounds):
        cache.put(key, data, {"writer": value})


def _reader(root, key, stop, same, queue):
    try:
        cache = EmbeddingCache(root, mmap_threshold=1 << 16)
        expected = _array(SHAPE, np.float32, seed=7)
        hits = reads = 0
        while not stop.is_set() or reads < 20:
            got = cache.get(key, verify="full" if reads % 2 else "size")
            reads += 1
            if got is None:
                continue
            hits += 1
            if same:
                if not np.array_equal(got, expected):
                    raise AssertionError("read an array that differs from the one written")
            elif (
                got.shape != SHAPE
                or got.min() != got.max()
                or float(got.flat[0]) not in (1.0, 2.0, 3.0)
            ):
                raise AssertionError("read a torn or foreign array")
        queue.put(("ok", hits, reads))
    except BaseException as exc:  # report anything to the parent
        queue.put(("error", repr(exc), 0))


@pytest.mark.parametrize("same", [True, False], ids=["same-content", "different-content"])
def test_concurrent_writers_and_reader(tmp_path, same):
    # fork starts in milliseconds where it exists; spawn (~0.6 s a process) elsewhere
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    root = tmp_path / "shared"
    key = embedding_key(VOL, MODEL, PARAMS, "concurrency")
    seed_cache = EmbeddingCache(root, mmap_threshold=1 << 16)
    seed_cache.put(
        key, _array(SHAPE, np.float32, seed=7) if same else np.full(SHAPE, 1.0, np.float32)
    )
    stop, queue = ctx.Event(), ctx.Queue()
    reader = ctx.Process(target=_reader, args=(root, key, stop, same, queue))
    writers = [ctx.Process(target=_writer, args=(root, key, float(v), 80, same)) for v in (1, 2, 3)]
    reader.start()
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    stop.set()
    status, hits, reads = queue.get(timeout=60)
    reader.join(60)
    assert [w.exitcode for w in writers] == [0, 0, 0]
    assert status == "ok", hits
    assert reader.exitcode == 0 and reads >= 20
    if same:
        assert hits > 0
    final = seed_cache.get(key)
    if final is not None:  # different contents may end as a detected mismatch (a miss)
        assert final.shape == SHAPE
    assert not [p for p in root.joinpath(LAYOUT).iterdir() if p.name.startswith(".tmp-")]
    seed_cache.put(key, np.zeros(SHAPE, np.float32))
    np.testing.assert_array_equal(seed_cache.get(key), np.zeros(SHAPE, np.float32))
