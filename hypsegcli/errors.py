"""One small exception family for problems a user can act on.

The command line catches :class:`HypsegError` once, prints its message on one
line to stderr and exits with :attr:`HypsegError.exit_code`: 2 for bad input or
usage (:class:`BadInputError`), 1 for a runtime failure (everything else).
"""

from __future__ import annotations


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


def interrupt_status(exc: BaseException) -> tuple[int, str]:
    """Exit code and one-word message of an interrupt (Ctrl-C: 130, SIGTERM: 143)."""
    if isinstance(exc, Terminated):
        return Terminated.exit_code, "terminated"
    return 130, "interrupted"
