"""One small exception family for problems a user can act on.

The command line catches :class:`HypsegError` once, prints its message on one
line to stderr and exits with :attr:`HypsegError.exit_code`: 2 for bad input or
usage (:class:`BadInputError`), 1 for a runtime failure (everything else).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class HypsegError(Exception):
    """A runtime failure the user should hear about in one line (exit code 1)."""

    exit_code = 1


class BadInputError(HypsegError):
    """Bad input data, files or option values (exit code 2)."""

    exit_code = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch system's time limit, ``scancel``, ``kill``): stops a run the way
    Ctrl-C does, so that it leaves a run record and no half-written file (exit code 143)."""

    exit_code = 143


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the process ran out of memory (a MemoryError, or torch's
    allocator errors on the CPU or a GPU), which a smaller tile or batch can avoid."""
    if isinstance(exc, MemoryError):
        return True
    text = " ".join(str(exc).split()).lower()
    return "out of memory" in text or "can't allocate memory" in text


#: SIGTERMs received during this command (see :func:`note_termination`)
_terminations: list[int] = []


def note_termination() -> None:
    """Remember that SIGTERM came (hypseg's handler calls this before it raises
    :class:`Terminated`): where that exception cannot stop the run (raised while the
    command line is parsed, or inside a finaliser, where Python prints "Exception ignored"
    and drops it), the run still ends with 143 (:func:`termination_pending`)."""
    _terminations.append(1)


def termination_pending() -> bool:
    """SIGTERM came during this command (whether or not its exception stopped it)."""
    return bool(_terminations)


def reset_terminations() -> None:
    """Start a command with no SIGTERM noted (main() runs one command per process, or per
    call in tests)."""
    _terminations.clear()


def interrupt_status(exc: BaseException) -> tuple[int, str]:
    """Exit code and one-word message of an interrupt (Ctrl-C: 130, SIGTERM: 143)."""
    if isinstance(exc, Terminated):
        return Terminated.exit_code, "terminated"
    return 130, "interrupted"


@contextlib.contextmanager
def signals_held() -> Iterator[list[int]]:
    """Hold SIGINT and SIGTERM while the block runs and deliver them after it (only in the
    main thread, where Python runs signal handlers; elsewhere the block runs as it is).
    Yields the list of the signals held so far; the block may empty it to drop them. The
    first is delivered (its handler raises KeyboardInterrupt or :class:`Terminated`) once
    the block has ended, unless the block raised: its error is the one that counts."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    caught: list[int] = []
    kinds = [s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None)) if s is not None]
    previous = {}
    try:
        for kind in kinds:
            previous[kind] = signal.signal(kind, lambda signum, frame: caught.append(signum))
    except (ValueError, OSError):  # pragma: no cover - embedded interpreters
        for kind, handler in previous.items():
            signal.signal(kind, handler)
        yield []
        return
    try:
        yield caught
    finally:
        for kind, handler in previous.items():
            signal.signal(kind, handler if handler is not None else signal.SIG_DFL)
    for signum in caught[:1]:
        handler = previous.get(signum)
        if callable(handler):
            handler(signum, None)  # Python's KeyboardInterrupt, or hypseg's Terminated
        elif handler == signal.SIG_DFL:  # pragma: no cover - no Python handler installed
            signal.raise_signal(signum)
