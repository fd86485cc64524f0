"""Reading the small files an owner names: keep.toml's TLS certificate, key and CA files
(net.tls) and a volume's key or passphrase file (shim.keys).

Theory of operation
-------------------
The path is the owner's, but what lies at it is whatever the host holds there at that moment, and
a plain open(2) and read(2) trust it twice:

- open(2) of a FIFO waits for a writer, for ever. With a signal handler installed (trio's, the
  keep's stop signals) even SIGTERM only interrupts it for Python to retry it (PEP 475): a keep
  given `key = "some.fifo"` could be ended by SIGKILL alone;
- a device such as /dev/zero never ends, and a sparse file can claim terabytes.

So a path is opened O_NONBLOCK (open never waits), its kind is read from the open descriptor
(fstat: what is read is what was checked, whatever is renamed meanwhile) and at most `limit`
bytes are read:

- a regular file is always accepted (one of more than `limit` bytes is refused unread);
- a pipe or FIFO only where the caller says so (`pipes=True`: a volume key may come from a
  process substitution, `/dev/stdin` on a pipe or a FIFO a program feeds, as cryptsetup's
  --key-file does). It is read until every writer has closed it. A FIFO that no program has
  opened for writing is waited for FIFO_WRITER_WAIT seconds (`mkfifo f; keep ... --key-file f &
  producer > f` opens it from both ends in either order), then refused instead of waited for;
- anything else (a directory, a device, a socket) is refused, naming what it is.

Errors: OSError from open(2) as usual (the callers word "cannot read X: No such file..."), and
InputFileError for a file of the wrong kind or size. One implementation for both packages: net
must not import shim, and shim imports net already.
"""

from __future__ import annotations

import contextlib
import os
import select
import stat
from collections.abc import Iterator

FIFO_WRITER_WAIT = 5.0
"""Seconds a FIFO that no program has opened for writing is waited for before it is refused."""
_CHUNK = 64 * 1024

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


class InputFileError(Exception):
    """A named file is of a kind that is not read (a FIFO where a regular file is needed, a
    device, a directory) or holds more bytes than allowed. `str()` is `PATH: why`, for the caller
    to prefix with what the file was for ("tls key PATH: is a FIFO, not a regular file")."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


@contextlib.contextmanager
def _open_checked(path: str | os.PathLike[str], limit: int, *, pipes: bool) -> Iterator[tuple[int, bool]]:
    """The open descriptor of `path` and whether it is a pipe, once it is known to be a regular
    file of at most `limit` bytes (or, with `pipes`, a pipe or FIFO); closed on leaving."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        status = os.fstat(descriptor)
        if stat.S_ISREG(status.st_mode):
            if status.st_size > limit:
                raise InputFileError(path, f"larger than {limit} bytes")
            yield descriptor, False
        elif pipes and stat.S_ISFIFO(status.st_mode):
            yield descriptor, True
        else:
            wanted = "a regular file or a pipe" if pipes else "a regular file"
            raise InputFileError(path, f"is {_kind(status.st_mode)}, not {wanted}")
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def open_regular_file(path: str | os.PathLike[str], limit: int) -> Iterator[int]:
    """An open descriptor of `path`, a regular file of at most `limit` bytes, for a reader that
    takes a path (OpenSSL's CA loading: give it `/proc/self/fd/N`, the file that was checked)."""
    with _open_checked(path, limit, pipes=False) as (descriptor, _):
        yield descriptor


def read_input_file(path: str | os.PathLike[str], limit: int, *, pipes: bool = False) -> bytes:
    """The bytes of `path`, a regular file (or, with `pipes`, a pipe or FIFO) of at most `limit`
    bytes, without ever blocking on what the host put at the path (see the module's text)."""
    with _open_checked(path, limit, pipes=pipes) as (descriptor, is_pipe):
        data = _read_pipe(descriptor, path, limit) if is_pipe else _read_all(descriptor, limit)
    if len(data) > limit:  # a regular file that grew after fstat, or a pipe
        raise InputFileError(path, f"larger than {limit} bytes")
    return data


def _read_all(descriptor: int, limit: int) -> bytes:
    """At most `limit` + 1 bytes of a regular file (O_NONBLOCK means nothing to one)."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = os.read(descriptor, min(_CHUNK, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _read_pipe(descriptor: int, path: str | os.PathLike[str], limit: int) -> bytes:
    """A pipe's bytes until its writers have all closed it (at most `limit` + 1 of them).

    Opened O_NONBLOCK, a read says which case holds: EAGAIN, a writer has it open and has not
    written yet (wait for it, as for stdin: the writer decides); EOF before anything came, no
    writer has opened it yet (Linux's poll waits for the first writer: FIFO_WRITER_WAIT)."""
    poller = select.poll()
    poller.register(descriptor, select.POLLIN)
    chunks: list[bytes] = []
    size = 0
    writer_seen = False
    while size <= limit:
        try:
            chunk = os.read(descriptor, _CHUNK)
        except BlockingIOError:
            writer_seen = True
            poller.poll()
            continue
        if chunk:
            writer_seen = True
            chunks.append(chunk)
            size += len(chunk)
        elif writer_seen:
            break
        elif poller.poll(FIFO_WRITER_WAIT * 1000):
            writer_seen = True  # it came (and may have gone again: then EOF, and done)
        else:
            raise InputFileError(path, "is a FIFO that no program opened for writing within "
                                       f"{FIFO_WRITER_WAIT:g} s")
    return b"".join(chunks)
