"""The errors the CLI turns into one line on stderr and an exit status (no traceback)."""

import contextlib
import os
import sys


class KeepError(Exception):
    """A user-facing failure: the message is printed as `keep: MESSAGE`, the process exits with
    `exit_status`. Raise it (or a subclass) for bad input, bad config, wrong keys and the like."""

    exit_status: int = 1

    def __init__(self, message: str, *, exit_status: int | None = None) -> None:
        super().__init__(message)
        if exit_status is not None:
            self.exit_status = exit_status


class StdoutClosed(KeepError):
    """Stdout's reader went away (EPIPE: `keep volume ls IMG | head`), or the reader of a pipe
    `keep volume get` writes into (/dev/stdout, a FIFO). Nothing is said and the exit status is
    141 (128 + SIGPIPE), as for a tool the signal ended."""

    exit_status = 141


class UsageError(KeepError):
    """Bad command-line usage (exit status 2, as argparse uses)."""

    exit_status = 2


CLOSED_AT_START: set[int] = set()
"""The standard fds (0, 1, 2) that were closed when keep started (shim.cli put /dev/null on
them, so that no file keep opens takes their number)."""


def say(message: str) -> None:
    """Print `keep: MESSAGE` on stderr, as well as it can be: a stderr that cannot be written (a
    full disk, a closed pipe) loses the line but must not replace the exit status the line was
    reporting (a trap's 134 became 1)."""
    stream = sys.stderr
    if stream is None:
        return
    with contextlib.suppress(OSError, ValueError):
        stream.write(f"keep: {message}\n")
        stream.flush()


def point_at_devnull(fd: int) -> None:
    """Make `fd` refer to /dev/null (read and write): for a standard fd that is closed or whose
    reader went away, so that later writes and the interpreter's last flush go nowhere instead
    of failing again."""
    null = os.open(os.devnull, os.O_RDWR)
    if null != fd:
        os.dup2(null, fd)
        os.close(null)
