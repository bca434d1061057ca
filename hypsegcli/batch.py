"""Batch jobs: splitting the inputs into parts, collecting per-volume failures, run manifests.

Parts
-----
``embed``, ``cluster`` and ``evaluate`` can process a share of their inputs
(:func:`resolve_part`, :func:`select_part`). Part ids are 0-based. The inputs
(for ``evaluate``: the prediction/truth pairs) are sorted by path and dealt
round-robin: the ``i``-th of the sorted list goes to part ``i mod N``, so part
sizes differ by at most one and neighbouring (often similar-sized) files are
spread over the parts. Within a part the usual order is kept. Every task of an
array must be given the same inputs.

Without ``--num-parts``/``--part-id`` the Slurm job-array variables are read
when ``SLURM_ARRAY_TASK_ID`` is set: ``N = SLURM_ARRAY_TASK_COUNT`` and
``id = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP``
(MIN 0 and STEP 1 when unset), so ``--array=1-10`` and ``--array=0-9`` both
give parts 0..9.

Failures
--------
:class:`Failures` turns the exception of one volume into a record (file,
one-line message, exit code 2 for bad input or 1 for a runtime failure) and
logs it as one ``error:`` line; the batch goes on. The command's exit code is
2 when every failure was bad input, else 1 (:attr:`Failures.exit_code`).

Manifest
--------
:class:`RunRecorder` appends one JSON object per run, on one line, to
``<folder>/hypseg-runs.jsonl`` (:data:`MANIFEST_NAME`): versions, host,
device, seed, the full configuration, model and input hashes, per-volume stage
timings, the part, start/end time and exit status. The file is only ever
appended to: it is opened with ``O_APPEND`` and each record is written with a
single ``write`` call while holding an exclusive ``fcntl.lockf`` lock on it
(waited for at most :data:`LOCK_WAIT_S`; file systems without locks are
written to without one). Appends of concurrent array tasks therefore never
overwrite each other on a local disk or on file systems with working POSIX
locks (NFS with lockd/NFSv4, Lustre mounted with ``flock``, GPFS). A record
cut by a full disk is taken back (the file truncated to its size before the
write, under the lock); one that stays (no lock to be had, or the run killed
mid-write) leaves a line without its newline, which the next append ends
first, so that only that line is lost: readers (:func:`read_manifest`) skip a
line that is not valid JSON.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import platform
import random
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from . import __version__
from .errors import (
    BadInputError,
    HypsegError,
    Terminated,
    interrupt_status,
    is_out_of_memory,
    signals_held,
    termination_pending,
)
from .io import write_text_atomic

log = logging.getLogger(__name__)

T = TypeVar("T")

#: File name of the run manifest in an output folder (JSON lines, append-only).
MANIFEST_NAME = "hypseg-runs.jsonl"
#: ``format`` field of every manifest record.
MANIFEST_FORMAT = "hypseg-run/1"
#: Longest wait for the manifest lock before appending without it (seconds).
LOCK_WAIT_S = 10.0
#: Slurm variables copied into the manifest when set.
SLURM_VARIABLES = (
    "SLURM_JOB_ID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_MAX",
    "SLURM_ARRAY_TASK_STEP",
    "SLURM_JOB_NODELIST",
)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# ----------------------------------------------------------------------------- parts


@dataclass(frozen=True)
class Part:
    """Which share of the inputs a run processes: ``index`` (0-based) of ``count``."""

    index: int = 0
    count: int = 1
    #: where it came from: "options", "slurm" or None (the whole input)
    source: str | None = None
    #: how it was derived, for messages: e.g. "SLURM_ARRAY_TASK_ID=3, SLURM_ARRAY_TASK_MIN=1"
    detail: str = ""

    @property
    def split(self) -> bool:
        return self.count > 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "part_id": self.index,
            "num_parts": self.count,
            "source": self.source,
            "split": "round-robin over the sorted inputs" if self.split else None,
        }

    def describe(self) -> str:
        text = f"part {self.index} of {self.count} (0-based, round-robin over the sorted inputs)"
        return f"{text}, from {self.detail}" if self.detail else text


def _env_int(environ: Mapping[str, str], name: str) -> int:
    text = environ[name].strip()
    try:
        return int(text)
    except ValueError:
        raise BadInputError(
            f"{name}={text!r}: expected an integer (or pass --num-parts and --part-id)"
        ) from None


def resolve_part(
    num_parts: int | None,
    part_id: int | None,
    environ: Mapping[str, str] | None = None,
) -> Part:
    """The part to process, from ``--num-parts``/``--part-id`` or else the Slurm array variables.

    ``--num-parts 1`` alone means the whole input (and ignores Slurm); otherwise
    both options go together. Without them, ``SLURM_ARRAY_TASK_ID`` (when set)
    with ``SLURM_ARRAY_TASK_COUNT`` and, when set, ``SLURM_ARRAY_TASK_MIN`` and
    ``SLURM_ARRAY_TASK_STEP`` give a 0-based part id. Inconsistent values raise
    :class:`BadInputError`.
    """
    environ = os.environ if environ is None else environ
    if num_parts is not None or part_id is not None:
        if num_parts is None:
            raise BadInputError(f"--part-id {part_id}: needs --num-parts")
        if num_parts < 1:
            raise BadInputError(f"--num-parts {num_parts}: should be >= 1")
        if part_id is None:
            if num_parts == 1:
                return Part(0, 1, "options", "--num-parts 1")
            raise BadInputError(
                f"--num-parts {num_parts}: needs --part-id (0 to {num_parts - 1}; part ids are 0-based)"
            )
        if not 0 <= part_id < num_parts:
            raise BadInputError(
                f"--part-id {part_id}: should be between 0 and {num_parts - 1} for --num-parts {num_parts} (part ids are 0-based)"
            )
        return Part(part_id, num_parts, "options", f"--num-parts {num_parts} --part-id {part_id}")
    if not environ.get("SLURM_ARRAY_TASK_ID", "").strip():
        return Part()
    task = _env_int(environ, "SLURM_ARRAY_TASK_ID")
    if not environ.get("SLURM_ARRAY_TASK_COUNT", "").strip():
        raise BadInputError(
            "SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not: pass --num-parts and --part-id"
        )
    count = _env_int(environ, "SLURM_ARRAY_TASK_COUNT")
    low = _env_int(environ, "SLURM_ARRAY_TASK_MIN") if environ.get("SLURM_ARRAY_TASK_MIN") else 0
    step = _env_int(environ, "SLURM_ARRAY_TASK_STEP") if environ.get("SLURM_ARRAY_TASK_STEP") else 1
    detail = (
        f"SLURM_ARRAY_TASK_ID={task}, SLURM_ARRAY_TASK_MIN={low}, SLURM_ARRAY_TASK_COUNT={count}"
    )
    if step != 1:
        detail += f", SLURM_ARRAY_TASK_STEP={step}"
    if count < 1 or step < 1 or (task - low) % step or not 0 <= (task - low) // step < count:
        raise BadInputError(
            f"{detail}: not a task of an evenly spaced array (part ids 0..{max(count, 1) - 1} expected); "
            "pass --num-parts and --part-id"
        )
    if count == 1 and task != 0:
        log.warning(
            "%s: a Slurm array of one task processes every input; to redo one part of a "
            "larger array, pass --num-parts N --part-id I, where I is this task's id minus "
            "the first id of that array, divided by its step (e.g. %d for task %d of "
            "--array=1-N)",
            detail,
            task - 1,
            task,
        )
    return Part((task - low) // step, count, "slurm", detail)


def select_part(items: Sequence[T], part: Part, *, key: Callable[[T], str] = str) -> list[T]:
    """The items of ``part``: sorted by ``key``, dealt round-robin; returned in their given order."""
    if not part.split:
        return list(items)
    order = sorted(range(len(items)), key=lambda i: (key(items[i]), i))
    mine = set(order[part.index :: part.count])
    return [item for i, item in enumerate(items) if i in mine]


# ----------------------------------------------------------------------------- failures


@dataclass(frozen=True)
class Failure:
    item: str
    message: str
    exit_code: int

    def to_dict(self) -> dict[str, Any]:
        return {"volume": self.item, "error": self.message, "exit_code": self.exit_code}


def one_line(exc: BaseException, limit: int = 400) -> str:
    """A one-line description of ``exc`` (its message; the type too for unexpected errors),
    at most ``limit`` characters: a longer one keeps its start and its end (where the
    reason is, after a long path) around " ... "."""
    text = str(exc).strip()
    first = text.splitlines()[0].strip() if text else ""
    if not isinstance(exc, HypsegError) and is_out_of_memory(exc):
        # (a volume's; a smaller tile bounds the embedding's memory)
        first = f"out of memory ({first[:160] or type(exc).__name__}); try a smaller --tile"
        first += " or fewer --threads"
    elif not isinstance(exc, HypsegError):
        first = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    if len(first) <= limit:
        return first
    head = (limit - 5) // 3
    return first[:head] + " ... " + first[len(first) - (limit - 5 - head) :]


class Failures:
    """Per-item failures of a batch: recorded, logged as one line each, summarised at the end.

    With ``total == 1`` nothing is logged while running: the single failure
    becomes the command's final error line instead.
    """

    def __init__(self, total: int, *, what: str = "volume") -> None:
        self.total = total
        self.what = what
        self.items: list[Failure] = []

    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def record(self, item: str | os.PathLike[str], exc: BaseException) -> Failure:
        item = os.fspath(item)
        message = one_line(exc)
        if item not in message and Path(item).name not in message:
            message = f"{item}: {message}"
        code = exc.exit_code if isinstance(exc, HypsegError) else 1
        failure = Failure(item, message, code)
        self.items.append(failure)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s", "".join(traceback.format_exception(exc)).rstrip())
        if self.total > 1:
            log.error("%s", message)
        return failure

    @property
    def exit_code(self) -> int:
        """0 without failures, 2 when all were bad input, else 1."""
        if not self.items:
            return 0
        return 2 if all(f.exit_code == 2 for f in self.items) else 1

    def to_json(self) -> list[dict[str, Any]]:
        return [f.to_dict() for f in self.items]


def failure_summary(failures: Sequence[Mapping[str, Any]], total: int, what: str = "volume") -> str:
    """The final one-line error of a batch with failures (the failure itself when total is 1)."""
    if total <= 1 and len(failures) == 1:
        return str(failures[0]["error"])
    bad = sum(1 for f in failures if f.get("exit_code") == 2)
    kinds = []
    if bad:
        kinds.append(f"{bad} bad input")
    if len(failures) - bad:
        kinds.append(f"{len(failures) - bad} runtime")
    names = [Path(str(f["volume"])).name for f in failures]
    listed = ", ".join(names[:5]) + (f", ... ({len(names) - 5} more)" if len(names) > 5 else "")
    rest = "; the others were processed" if len(failures) < total else ""
    return f"{len(failures)} of {total} {what}(s) failed ({', '.join(kinds)}): {listed}{rest}"


def exit_code_of(failures: Sequence[Mapping[str, Any]]) -> int:
    if not failures:
        return 0
    return 2 if all(f.get("exit_code") == 2 for f in failures) else 1


# ----------------------------------------------------------------------------- manifest


def package_versions() -> dict[str, str | None]:
    """hypseg, torch and geoopt versions, read from the installed metadata (no import of torch)."""
    from importlib import metadata

    found: dict[str, str | None] = {"hypseg": __version__}
    for name in ("torch", "geoopt", "numpy"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            module = sys.modules.get(name)
            found[name] = getattr(module, "__version__", None) if module else None
    found["python"] = platform.python_version()
    return found


class Stopwatch:
    """Per-stage wall times of one volume: ``lap("embed")`` adds the time since the last lap."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, stage: str) -> float:
        now = time.perf_counter()
        spent = now - self.last
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + spent, 4)
        self.last = now
        return spent

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.start, 4)


@dataclass
class RunRecorder:
    """Builds one manifest record and appends it to ``folder/hypseg-runs.jsonl`` when closed.

    Use as a context manager: on an exception the record is written with the
    exception's exit code (``HypsegError.exit_code``, 130 for an interrupt,
    else 1) and re-raised; otherwise with :attr:`exit_status` (set it from
    :attr:`Failures.exit_code`). ``failures``: the run's :class:`Failures`, listed as
    they are when the record is written. ``folder=None`` records nothing.
    """

    folder: Path | None
    command: str
    config: dict[str, Any]
    part: Part = field(default_factory=Part)
    argv: Sequence[str] | None = None
    environ: Mapping[str, str] | None = None
    started: str = field(default_factory=now_iso)
    exit_status: int = 0
    fields: dict[str, Any] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    #: the run's per-volume failures, recorded as they are when the record is written (an
    #: interrupted run's too: those before the signal)
    failures: Failures = field(default_factory=lambda: Failures(0))
    _t0: float = field(default_factory=time.perf_counter)

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else Path(self.folder) / MANIFEST_NAME

    def set(self, **fields: Any) -> None:
        self.fields.update(fields)

    def add(
        self,
        volume: str | os.PathLike[str],
        *,
        status: str,
        sha256: str | None = None,
        seconds: Mapping[str, float] | None = None,
        **extra: Any,
    ) -> None:
        row: dict[str, Any] = {"volume": os.fspath(volume), "status": status, "sha256": sha256}
        row.update(extra)
        row["seconds"] = dict(seconds or {})
        self.inputs.append(row)

    def record(self, *, error: str | None = None) -> dict[str, Any]:
        environ = os.environ if self.environ is None else self.environ
        return {
            "format": MANIFEST_FORMAT,
            "command": self.command,
            "argv": list(self.argv) if self.argv is not None else None,
            "versions": package_versions(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self.started,
            "finished": now_iso(),
            "seconds": round(time.perf_counter() - self._t0, 3),
            "exit_status": self.exit_status,
            "error": error,
            "part": self.part.to_dict(),
            "slurm": {k: environ[k] for k in SLURM_VARIABLES if environ.get(k)} or None,
            **self.fields,
            "config": self.config,
            "inputs": self.inputs,
            "failures": self.failures.to_json(),
        }

    def close(self, *, error: str | None = None) -> Path | None:
        if self.folder is None:
            return None
        return append_manifest(self.folder, self.record(error=error))

    def __enter__(self) -> RunRecorder:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        # a signal while the record is written (SIGTERM sent again, Ctrl-C pressed twice)
        # waits for it and is dropped: the run has ended, as the record says
        with signals_held() as caught:
            self._close_on_exit(exc)
            caught.clear()

    def _close_on_exit(self, exc: BaseException | None) -> None:
        if exc is None:
            if termination_pending():  # a SIGTERM that could not stop the run: main exits 143
                self.exit_status = Terminated.exit_code
                self.close(error="terminated")
            else:
                self.close()
            return
        error = None
        if isinstance(exc, KeyboardInterrupt):
            self.exit_status, error = interrupt_status(exc)
        elif isinstance(exc, HypsegError):
            self.exit_status = exc.exit_code
        else:
            self.exit_status = 1
        try:
            self.close(error=error or one_line(exc))
        except Exception as inner:  # noqa: BLE001 - never hide the original error
            log.warning("could not append to the run manifest: %s", one_line(inner))


def _lock(fd: int) -> bool:
    """Exclusive POSIX lock on ``fd``, waited for up to LOCK_WAIT_S; False where locks do not work."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return False
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                return False  # ENOLCK, EOPNOTSUPP, ENOSYS...: no locking here
            if time.monotonic() > deadline:
                log.warning("manifest still locked after %.0f s; appending anyway", LOCK_WAIT_S)
                return False
            time.sleep(0.01 + 0.04 * random.random())


def append_manifest(folder: str | os.PathLike[str], record: Mapping[str, Any]) -> Path:
    """Append ``record`` as one JSON line to ``folder/hypseg-runs.jsonl`` (one write, O_APPEND, locked)."""
    path = Path(folder) / MANIFEST_NAME
    data = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise HypsegError(f"{path}: cannot open the run manifest ({exc.strerror or exc})") from None
    try:
        locked = _lock(fd)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a record cut earlier: ended
                data = b"\n" + data  # (so that only that line is lost, not this one too)
            view = memoryview(data)
            try:
                while view:  # one write in practice; a short write continues where it stopped
                    written = os.write(fd, view)
                    view = view[written:]
            except OSError:
                if locked:  # a cut record taken back (no other writer appended meanwhile)
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, size)
                raise
        finally:
            if locked:
                import fcntl

                with contextlib.suppress(OSError):
                    fcntl.lockf(fd, fcntl.LOCK_UN)
    except OSError as exc:
        raise HypsegError(
            f"{path}: cannot append to the run manifest ({exc.strerror or exc})"
        ) from None
    finally:
        os.close(fd)
    return path


def read_manifest(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a manifest file, oldest first; lines that are not JSON objects are skipped."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict):
                    records.append(doc)
    return records


# ----------------------------------------------------------------------------- merged views


def _snapshot(paths: Iterable[Path]) -> list[tuple[str, int, int, int]]:
    found = []
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            st = path.stat()
            found.append((path.name, st.st_ino, st.st_mtime_ns, st.st_size))
    return sorted(found)


def rebuild_merged(
    target: Path,
    list_parts: Callable[[], list[Path]],
    build: Callable[[list[Path]], str],
    *,
    attempts: int = 50,
) -> None:
    """Write ``target`` = ``build(part files)`` atomically, again until the part files stopped changing.

    Lock-free and safe for concurrent writers that each (1) write their own
    part files atomically, then (2) call this: a writer re-lists the part files
    after renaming ``target`` into place and rebuilds if any appeared, changed
    or vanished meanwhile. So the last rename is done by a writer that saw
    every part file written before it, whatever the interleaving, on any file
    system with atomic rename.
    """
    for attempt in range(attempts):
        before = _snapshot(list_parts())
        text = build(sorted(list_parts()))
        write_text_atomic(target, text)
        if _snapshot(list_parts()) == before:
            return
        time.sleep(0.005 * (attempt + 1) * random.random())
    log.warning("%s: part files kept changing; it will be completed by the last writer", target)


# ----------------------------------------------------------------------------- plans (--dry-run)

#: The dense encoder reaches about this fraction of the 512^2 float32 matmul rate that
#: :func:`measure_flop_rate` measures (benchmarks/dryrun_accuracy.py, the default model on
#: 32^3-128^3 volumes on 2 CPU cores: estimated / actual embedding time 0.98-1.07 with
#: this and TILE_OVERHEAD_S; thin layers do worse). Used for time estimates. On a GPU the fraction has not been measured
#: against this rate; GPU_ENCODER_EFFICIENCY keeps the earlier, cautious guess.
ENCODER_EFFICIENCY = 1.0
GPU_ENCODER_EFFICIENCY = 0.5
#: Fixed cost per tile (resampling, small ops, thread hand-off), measured ~9 ms on the
#: project's 2-core machine; it dominates for tiny volumes and for patch sides with many
#: phases (e.g. m = 9, p = 5).
TILE_OVERHEAD_S = 0.009
#: Hyperbolic k-means (:class:`hypsegcli.kmeans.PoincareKMeans`), seconds at a matmul rate
#: of REFERENCE_RATE: per cluster and point of each pass of a fit (``n_init`` restarts on
#: at most ``_RESTART_SAMPLES`` points, then one refinement on the fit sample; their
#: Lloyd iterations folded in), and per cluster and voxel assigned. From
#: benchmarks/dryrun_accuracy.py (embeddings of a trained and of an untrained default
#: model, 32^3-128^3, k = 2, 4, 8): the fits took 0.8-1.6x what this gave, as their
#: iterations vary with the data (10-139 per fit seen); with 8 restarts that stop once
#: settled (``_RESTART_SETTLED``) a trained model's fits implied 5.0e-7 - 6.2e-7 (the
#: silhouette taken out).
KMEANS_FIT_S = 5.3e-7
KMEANS_ASSIGN_S = 6.0e-9
#: The restart kept by its silhouette (``cluster --select silhouette``): seconds per pair
#: of points of its subset (at most ``_SILHOUETTE_SAMPLES``) at REFERENCE_RATE, for the
#: subset's distance matrix (once per fit: Poincaré, or scipy's Euclidean ``cdist``) and
#: for each restart's labels and silhouette on it. Measured on 2 000 points of trained
#: embeddings (2 cores, 286 GFLOP/s): 0.156 s, 0.009 s and 3.2 ms per restart; the
#: Poincaré matrix has since been halved (each pair once, mirrored: 105 -> 53 ms in one
#: run of benchmarks/pdist_speed.py), and its constant with it.
SILHOUETTE_DIST_S = 1.7e-8
SILHOUETTE_DIST_LINE_S = 2.0e-9
SILHOUETTE_S = 7.0e-10
#: Euclidean k-means (scikit-learn's ``KMeans``: ``--metric euclidean``, intensity
#: features), seconds per (restart x fitted point x cluster) at REFERENCE_RATE
#: (benchmarks/dryrun_accuracy.py: 0.4e-7 - 1.8e-7 on 64^3-128^3), and the import of
#: scikit-learn (once per process, 0.6-0.8 s measured after torch and scipy; time and
#: resident memory).
SKLEARN_FIT_S = 6.0e-8
SKLEARN_IMPORT_S = 0.7
SKLEARN_IMPORT_BYTES = 116e6
REFERENCE_RATE = 330e9
#: Potts smoothing (``cluster --smooth``): seconds per (voxel x cluster) at REFERENCE_RATE
#: of each slab, halos included (benchmarks/dryrun_accuracy.py: 3.7e-8 - 1.05e-7 for k =
#: 2, 4, 8 on 32^3-128^3 volumes), and bytes per (voxel x cluster) of a slab at its peak,
#: the slab's float64 distances included (21 measured for k = 8 in the slabs of a
#: 512x512x300 volume; 30-36 where one slab holds a 96^3 or 128^3 volume). Since its
#: updates stopped allocating (2026-12-07) the constant is the earlier 5.5e-8 scaled by
#: what benchmarks/dryrun_accuracy.py implied at 128^3 after and before on the same day
#: (4.2e-8 / 9.5e-8; at 64^3, where no array reached the size that page-faults, 4.6e-8 /
#: 5.3e-8).
SMOOTH_S = 2.4e-8
SMOOTH_BYTES = 32.0
#: Edge snapping (``cluster --snap``, scipy on the CPU whatever the device): seconds per voxel,
#: plus per voxel and label; peak bytes likewise. Measured at sigma 2 on a 256^3 field of k
#: bands (43 / 78 / 92 % of the voxels near a boundary at k = 2 / 4 / 8: 294 / 450 / 631 ns
#: per voxel) and, for memory, a 128^3 one (31 / 53 bytes per voxel at k = 2 / 8), on this
#: project's 2-core machine; times scaled by 0.65 to what benchmarks/dryrun_accuracy.py
#: measured on synthetic volumes (0.66-0.90 us per voxel for k = 2, 4 and 8 together); both
#: scaled by 0.70 when its box maxima became shifted slices (same-day runs of that script
#: at 128^3: 1.24e-6 / 1.78e-6 s per voxel for k = 2, 4 and 8 together after / before).
SNAP_S = 8.4e-8
SNAP_S_PER_LABEL = 2.5e-8
SNAP_BYTES = 25.0
SNAP_BYTES_PER_LABEL = 3.5
#: Intensity MRF (``cluster --mrf``): its masks, filters and label statistics (scipy, CPU)
#: cost MRF_S per voxel and MRF_BYTES plus MRF_BYTES_PER_LABEL per voxel (whole-volume masks);
#: its mean-field updates are counted as the Potts prior's (SMOOTH_S, SMOOTH_BYTES per slab).
#: Measured at beta 0.5 after the snap on the 256^3 field of benchmarks/smooth_speed.py, on
#: this project's 2-core machine: 0.89 / 1.61 us per voxel at k = 4 / 8 in all (the part
#: before the mean-field updates 0.4-0.5 us at 128^3), peak 60 / 62 bytes per voxel.
#: MRF_S from benchmarks/dryrun_accuracy.py (1.5-2.2 us per voxel for k = 2, 4 and 8
#: together, mean-field updates included), scaled by 0.32 when the box maxima became
#: shifted slices and the updates stopped allocating (same-day runs at 128^3: 1.49e-6 /
#: 4.71e-6 s per voxel for k = 2, 4 and 8 together after / before).
MRF_S = 4.8e-8
MRF_BYTES = 14.0
MRF_BYTES_PER_LABEL = 2.0

#: ``cluster --nest``: seconds per voxel for the band and for the fill's sources (each once
#: per volume: :func:`hypsegcli.nesting.band_sources` serves every larger k); peak bytes per
#: voxel (the sources' Euclidean feature transform; the band by shifts takes 3). Measured at
#: width 4 on 128^3 and 256^3 coarse maps of 2 / 4 labels: the band 0.018-0.028 us per
#: voxel (by distance transforms, before: 0.68-1.34 us the same day, 0.56 / 0.75 on a
#: faster one), the sources 0.60-1.11 us and 32-35 bytes per voxel that day (0.35 / 0.17
#: us for a fill on the faster one), on this project's 2-core machine.
NEST_S = 2.5e-8
NEST_FILL_S = 3.5e-7
NEST_BYTES = 35.0
#: ``cluster --min-size``: seconds per voxel and k (a component labelling per label and one
#: distance transform; 0.23-0.29 µs on a 128^3 field at k = 2-8 on 2 cores, 0.15-0.23 µs
#: on benchmarks/dryrun_accuracy.py's volumes) and peak bytes per voxel (the output copy,
#: the component ids, the masks and the transform's indices).
MIN_SIZE_S = 2.0e-7
MIN_SIZE_BYTES = 24.0


def measure_flop_rate(
    device: Any = "cpu", n: int = 512, repeat: int = 30, warmup: int = 3
) -> float:
    """Best float32 FLOP/s of an n x n matmul on ``device`` (about 50 ms on 2 CPU cores).

    ``warmup`` untimed products first: in a fresh process the first measurement
    (thread pool start-up) read 0.8-0.9 of the later ones. A core taken by another
    process still halves the rate on a 2-core machine.
    """
    import torch

    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elif device.type == "mps":  # pragma: no cover - Apple only
            torch.mps.synchronize()

    for _ in range(max(warmup, 1)):
        torch.matmul(a, b)
    sync()
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / max(best, 1e-9)


def peek_shape(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """The ``(x, y, z)`` shape of a volume from its header only (data not read)."""
    from .io import MRC_SUFFIXES, _missing, _unreadable_nifti, short_message, volume_suffix

    path = Path(path)
    if not path.exists():  # (a dangling link named as one, as the reading names it)
        raise BadInputError(_missing(path, "no such file"))
    mrc_file = volume_suffix(path) in MRC_SUFFIXES
    try:
        if mrc_file:
            import mrcfile

            with mrcfile.open(os.fspath(path), mode="r", permissive=True, header_only=True) as mrc:
                h = mrc.header
                dims = {int(h.mapc): int(h.nx), int(h.mapr): int(h.ny), int(h.maps): int(h.nz)}
                if sorted(dims) != [1, 2, 3]:
                    return (int(h.nx), int(h.ny), int(h.nz))
                return (dims[1], dims[2], dims[3])
        from .io import load_nifti

        shape = tuple(int(s) for s in load_nifti(path).shape)
    except Exception as exc:  # noqa: BLE001 - reported in the plan
        # the reading's words: its specific reason where the first bytes tell one
        why = None if mrc_file else _unreadable_nifti(path)
        what = "MRC" if mrc_file else "NIfTI"
        raise BadInputError(
            f"{path}: {why or f'cannot read {what} ({short_message(exc)})'}"
        ) from None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise BadInputError(
            f"{path}: {len(shape)}D data of shape {shape}; hypseg needs a 3D volume"
        )
    return shape  # type: ignore[return-value]


def _tile_activation_bytes(
    model: Any, patch_size: float, stride: int, tile: int, shape: Sequence[int] | None = None
) -> float:
    """Bytes of float32 activations alive while one tile (or batch of patches) runs; with
    ``shape``, the largest tile of that volume (a tile is clipped to the volume: a thin
    tomogram's tiles are thin)."""
    from fractions import Fraction

    from .embedding import _lattice

    cfg = model.cfg
    m = int(cfg.patch_size)
    channels = [1, *cfg.channels]
    kernels = list(cfg.kernels)
    if not model.dense_exact:  # per-patch path: batches of 4096 patches
        sides = [m]
        for k, p in zip(kernels, cfg.paddings, strict=True):
            sides.append(sides[-1] + 2 * p - k + 1)
        per_patch = max(
            channels[i] * sides[i] ** 3 + channels[i + 1] * sides[i + 1] ** 3
            for i in range(len(kernels))
        )
        return 4.0 * 4096 * (per_patch + cfg.hidden)
    ratio = Fraction(m) / Fraction(patch_size).limit_denominator(1000)
    a, b = ratio.numerator, ratio.denominator
    per = max(1, tile // (b * stride))  # voxels per tile side and phase
    pers = (
        [per] * 3
        if shape is None
        else [max(1, min(per, -(-len(_lattice(int(n), stride)) // b))) for n in shape]
    )
    step = a * stride
    grids = [step * (n - 1) + m if step <= m else n * m for n in pers]
    sides = [grids]
    for k in kernels:
        sides.append([max(side - k + 1, 1) for side in sides[-1]])
    layers = max(
        channels[i] * math.prod(sides[i]) + channels[i + 1] * math.prod(sides[i + 1])
        for i in range(len(kernels))
    )
    # + the resampled grid (3 separable passes) + the head's hidden units per output voxel
    return 4.0 * (layers + 3 * math.prod(grids) + cfg.hidden * math.prod(pers))


def _tile_count(model: Any, shape: Sequence[int], patch_size: float, stride: int, tile: int) -> int:
    """Tiles (or batches of patches) :func:`~hypsegcli.embedding.embed_volume` will run."""
    import numpy as np

    from . import embedding

    lattice = [np.asarray(embedding._lattice(int(n), stride), dtype=np.int64) for n in shape]
    phases = embedding._phases(float(patch_size), int(model.cfg.patch_size))
    if not model.dense_exact or phases is None:
        return -(-math.prod(len(ax) for ax in lattice) // embedding.DEFAULT_BATCH)
    a, b = phases
    return math.prod(len(embedding._axis_chunks(ax, a, b, tile)) for ax in lattice)


def estimate_embedding(
    model: Any,
    shape: Sequence[int],
    *,
    patch_size: float,
    stride: int,
    tile: int,
    workers: int,
    flop_rate: float,
    efficiency: float = ENCODER_EFFICIENCY,
) -> dict[str, float]:
    """Estimated seconds and bytes of embedding one volume (see :func:`estimate_peak_bytes`).

    ``efficiency``: the fraction of ``flop_rate`` the encoder reaches
    (ENCODER_EFFICIENCY on a CPU, GPU_ENCODER_EFFICIENCY on a GPU).
    """
    from .embedding import UPSAMPLE_BLOCK, _lattice, flops_per_voxel, padding_margin

    voxels = math.prod(shape)
    flops = flops_per_voxel(model, patch_size, stride=stride) * voxels
    tiles = _tile_count(model, shape, patch_size, stride, tile)
    d = int(model.cfg.latent_dim)
    margin = padding_margin(patch_size)
    padded = math.prod(s + 2 * margin for s in shape)
    arrays = 4.0 * voxels * 2 + 4.0 * padded + 4.0 * voxels * d
    if stride > 1:
        # the lattice's embeddings, and the tangent-space interpolation's float64
        # intermediates (a few copies) of one slab of x-planes (embedding._upsample)
        lattice = math.prod(len(_lattice(int(n), stride)) for n in shape)
        plane = math.prod(int(n) for n in shape[1:])
        slab = min(voxels, max(1, UPSAMPLE_BLOCK // plane) * plane)
        arrays += 4.0 * lattice * d + 4 * 8.0 * slab * d
    # one tile per worker thread, of the volume's largest tile (no more threads than tiles)
    activations = min(workers, tiles) * _tile_activation_bytes(
        model, patch_size, stride, tile, shape
    )
    return {
        "flops": flops,
        "tiles": tiles,
        "seconds": flops / (flop_rate * efficiency) + tiles * TILE_OVERHEAD_S / max(workers, 1),
        "array_bytes": arrays,
        "activation_bytes": activations,
    }


def estimate_smooth(
    shape: Sequence[int], ks: Sequence[int], *, flop_rate: float
) -> tuple[float, float]:
    """Seconds and peak bytes of ``cluster --smooth`` for a volume of ``shape`` at every k.

    Time: SMOOTH_S per voxel and cluster of every slab, the halos its slabs
    repeat included. Memory: the largest slab (:mod:`hypsegcli.smoothing`),
    about SMOOTH_BYTES per voxel and cluster in it.
    """
    from .smoothing import SMOOTH_ITERS, slab_planes, slabs

    planes = int(shape[0])
    plane = math.prod(int(n) for n in shape[1:])
    seconds = 0.0
    for k in ks:
        core = slab_planes(plane, k, SMOOTH_ITERS)
        # the planes of every slab with its halos, as smoothing.smooth_labels runs them
        worked = sum(hi - lo for _, _, lo, hi in slabs(planes, core, SMOOTH_ITERS))
        seconds += SMOOTH_S * worked * plane * k
    seconds *= REFERENCE_RATE / flop_rate
    k = max(ks)
    slab = min(planes, slab_planes(plane, k, SMOOTH_ITERS) + 2 * SMOOTH_ITERS) * plane
    return seconds, float(SMOOTH_BYTES * slab * k)


def estimate_snap(shape: Sequence[int], ks: Sequence[int]) -> tuple[float, float]:
    """Seconds (all k) and peak bytes (the largest k) of ``cluster --snap`` for a volume of ``shape``."""
    voxels = math.prod(int(n) for n in shape)
    seconds = sum((SNAP_S + SNAP_S_PER_LABEL * k) * voxels for k in ks)
    return seconds, float((SNAP_BYTES + SNAP_BYTES_PER_LABEL * max(ks)) * voxels)


def estimate_mrf(
    shape: Sequence[int], ks: Sequence[int], *, flop_rate: float
) -> tuple[float, float]:
    """Seconds (all k) and peak bytes (the largest k) of ``cluster --mrf`` for a volume of ``shape``.

    The masks and filters (MRF_S; MRF_BYTES, MRF_BYTES_PER_LABEL) plus the
    mean-field updates, which cost what :func:`estimate_smooth` counts.
    """
    voxels = math.prod(int(n) for n in shape)
    seconds, slab_bytes = estimate_smooth(shape, ks, flop_rate=flop_rate)
    seconds += MRF_S * voxels * len(ks)
    return seconds, float((MRF_BYTES + MRF_BYTES_PER_LABEL * max(ks)) * voxels + slab_bytes)


def estimate_nest(shape: Sequence[int], ks: Sequence[int]) -> tuple[float, float]:
    """Seconds and peak bytes of ``cluster --nest`` for a volume of ``shape`` (nothing with one k)."""
    voxels = math.prod(int(n) for n in shape)
    if len(ks) < 2:
        return 0.0, 0.0
    return (NEST_S + NEST_FILL_S) * voxels, NEST_BYTES * voxels


def estimate_min_size(shape: Sequence[int], ks: Sequence[int]) -> tuple[float, float]:
    """Seconds and peak bytes of ``cluster --min-size`` for a volume of ``shape``."""
    voxels = math.prod(int(n) for n in shape)
    return MIN_SIZE_S * len(ks) * voxels, MIN_SIZE_BYTES * voxels


def estimate_kmeans_seconds(
    voxels: int,
    ks: Sequence[int],
    *,
    n_init: int,
    fit_samples: int,
    flop_rate: float,
    euclidean: bool = False,
    fit_points: int | None = None,
    select: str = "inertia",
) -> float:
    """Seconds of fitting k-means (``n_init`` > 0; none with 0) and assigning ``voxels``, every k.

    Hyperbolic: KMEANS_FIT_S per cluster and point of each pass (``n_init``
    restarts on the restart sample, one refinement on the fit sample).
    ``euclidean`` (scikit-learn): SKLEARN_FIT_S per restart, fitted point and
    cluster; its import is not included. The fit sample is drawn from
    ``fit_points`` voxels (default ``voxels``; ``cluster --mask``: those
    inside). With ``select="silhouette"`` and more than one restart, per fit
    SILHOUETTE_DIST_S (``euclidean``: SILHOUETTE_DIST_LINE_S) + ``n_init``
    SILHOUETTE_S per pair of points of the silhouette's subset. The
    assignment: KMEANS_ASSIGN_S per voxel and cluster.
    """
    from .kmeans import _RESTART_SAMPLES, _SILHOUETTE_SAMPLES

    fitted = min(voxels if fit_points is None else fit_points, fit_samples)
    restarted = fitted if euclidean else min(fitted, _RESTART_SAMPLES)
    if n_init <= 0:
        fit = 0.0
    elif euclidean:
        fit = SKLEARN_FIT_S * n_init * fitted
    else:
        fit = KMEANS_FIT_S * (n_init * restarted + fitted)
    sil = 0.0
    if select == "silhouette" and n_init > 1:
        dist = SILHOUETTE_DIST_LINE_S if euclidean else SILHOUETTE_DIST_S
        sil = (dist + n_init * SILHOUETTE_S) * min(restarted, _SILHOUETTE_SAMPLES) ** 2
    per_k = fit + KMEANS_ASSIGN_S * voxels
    return sum(per_k * k + sil for k in ks) * REFERENCE_RATE / flop_rate


def current_rss_bytes() -> float:
    """This process's resident memory now (Linux), else its peak so far."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return float(pages * os.sysconf("SC_PAGE_SIZE"))
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return float(peak if sys.platform == "darwin" else peak * 1024)
    except Exception:  # noqa: BLE001 - best effort
        return 0.0


_EMBED_NOTES = (
    "Estimates, not measurements. Time: FLOPs per voxel (embedding.flops_per_voxel) x voxels / "
    f"({ENCODER_EFFICIENCY:g} x a float32 matmul rate measured just now on the CPU, "
    f"{GPU_ENCODER_EFFICIENCY:g} x on a GPU) + "
    f"{TILE_OVERHEAD_S * 1000:g} ms per tile and worker thread"
)
_CLUSTER_NOTES = (
    ", plus k-means per point and cluster of each pass of a fit and of the assignment "
    "(iterations depend on the data), plus with --select silhouette the distances between "
    "the silhouette's points and each restart's silhouette, plus scikit-learn's import where "
    "its k-means is used"
)
_MEMORY_NOTES = (
    "; reading and writing files is not counted. Peak memory: this process now (libraries "
    "and model) + the volume, its normalised and padded copies and its embeddings (+ float64 "
    "copies with --stride > 1{clustering}) + one tile's float32 activations per worker "
    "thread; allocator overheads are not counted"
)
_STEP_NOTES = (
    "; with --smooth, the Potts prior's time per voxel and "
    "cluster and its largest slab; with --snap, the edge snap's time and memory per voxel and "
    "label; with --mrf, the intensity MRF's (masks per voxel and label plus a Potts prior's "
    "slab); with --nest, the band and the fill's feature transform; with --min-size, the "
    "component labelling and its distance transform"
)
_END_NOTES = (
    "; constants measured on a 2-core CPU (benchmarks/dryrun_accuracy.py). Expect the truth "
    "within a factor of about 2."
)
#: What a dry run's estimates of ``cluster`` (and, ``EMBED_PLAN_NOTES``, ``embed``) count.
PLAN_NOTES = (
    _EMBED_NOTES
    + _CLUSTER_NOTES
    + _MEMORY_NOTES.format(clustering=" and for clustering")
    + _STEP_NOTES
    + _END_NOTES
)
EMBED_PLAN_NOTES = _EMBED_NOTES + _MEMORY_NOTES.format(clustering="") + _END_NOTES
