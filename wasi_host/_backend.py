"""The interfaces backends implement: directories, files, stdio streams, sockets, waiting.

Theory of operation.  wasi_host owns everything the preview1 ABI adds on top of a filesystem:
rights, file offsets, APPEND, path resolution (component by component, symlinks expanded here,
never by a backend), ``.``/``..`` in readdir, errno choices.  A backend therefore only answers
questions about *one name in one directory* and never sees a path with a slash in it.  Names are
``str`` (host names that are not UTF-8 travel as surrogate escapes).  A backend reports failure by
raising ``OSError(errno.X, ...)``; wasi_host translates it once (``_errors``).

Every operation on a name is "no follow": ``stat_at`` is lstat, ``open_*`` refuse a symlink with
ELOOP, ``set_times_at`` changes the link itself.  The name ``"."`` means the directory itself;
``".."`` is never passed (the resolver handles it without asking the backend).

Readdir cookies: ``readdir(cookie)`` yields the entries after ``cookie`` (0 = from the start),
each carrying the cookie that resumes after it.  Cookies must stay valid while the directory
handle is open; ``readdir(0)`` may take a fresh snapshot.  wasi_host adds ``.`` and ``..`` in
front itself.

Data passed to ``pwrite``/``send``/``write`` is a view of guest memory that is only valid during
the call: copy it if you keep it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

Buffer = bytes | bytearray | memoryview


class Now(enum.Enum):
    """Set a timestamp to the current real time (``fstflags::atim_now``/``mtim_now``)."""

    NOW = "now"


#: A timestamp change: nanoseconds since the epoch, ``Now.NOW``, or None (leave unchanged).
TimeUpdate = int | Now | None


@dataclass(frozen=True, slots=True)
class FileStat:
    """What ``filestat`` reports (filetype is a ``_abi.Filetype`` value; times in ns)."""

    dev: int
    ino: int
    filetype: int
    nlink: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One readdir entry: its name, type, inode and the cookie that resumes after it."""

    next_cookie: int
    name: str
    filetype: int
    ino: int


class File(Protocol):
    """An open regular file (or another non-directory the backend can read and write)."""

    def stat(self) -> FileStat: ...
    def size(self) -> int:
        """The file's size now (where an APPEND write goes): ``stat().size``, but a backend that
        buffers writes can answer without writing its buffer out first."""
        ...
    def pread(self, size: int, offset: int) -> bytes: ...
    def pwrite(self, data: Buffer, offset: int) -> int: ...
    def set_size(self, size: int) -> None: ...
    def set_times(self, atime: TimeUpdate, mtime: TimeUpdate) -> None: ...
    def sync(self) -> None: ...
    def datasync(self) -> None: ...
    def close(self) -> None: ...


class Directory(Protocol):
    """An open directory: per-name operations, no paths."""

    def stat(self) -> FileStat: ...
    def stat_at(self, name: str) -> FileStat: ...
    def open_directory(self, name: str) -> Directory: ...
    def open_file(
        self, name: str, *, create: bool, exclusive: bool, truncate: bool, read: bool, write: bool
    ) -> File: ...
    def mkdir(self, name: str) -> None: ...
    def rmdir(self, name: str) -> None: ...
    def unlink(self, name: str) -> None: ...
    def symlink(self, target: str, name: str) -> None: ...
    def readlink(self, name: str) -> str: ...
    def link(self, name: str, target_dir: Directory, target_name: str) -> None: ...
    def rename(self, name: str, target_dir: Directory, target_name: str) -> None: ...
    def set_times(self, atime: TimeUpdate, mtime: TimeUpdate) -> None: ...
    def set_times_at(self, name: str, atime: TimeUpdate, mtime: TimeUpdate) -> None: ...
    def readdir(self, cookie: int) -> Iterator[DirEntry]: ...
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Readiness:
    """An fd is ready: how many bytes can be read or written (a hint), and whether it hung up."""

    nbytes: int
    hangup: bool = False


@runtime_checkable
class Pollable(Protocol):
    """Something poll_oneoff can wait on."""

    def readiness(self, write: bool) -> Readiness | None:
        """Ready now for reading (``write=False``) or writing? None when it would block."""
        ...

    def fileno(self) -> int | None:
        """An OS fd the default waiter can select() on, or None."""
        ...


class Stream(Pollable, Protocol):
    """A stdio stream.  ``read`` blocks until data or EOF (b"")."""

    def read(self, size: int) -> bytes: ...
    def write(self, data: Buffer) -> int: ...
    def is_terminal(self) -> bool: ...
    def close(self) -> None: ...


class Socket(Pollable, Protocol):
    """A pre-opened stream socket (a listener or a connection); may block unless nonblocking.

    ``recv`` returns b"" at end of stream; ``nonblocking`` calls raise OSError(EAGAIN) instead
    of blocking.
    """

    def accept(self, nonblocking: bool) -> Socket: ...
    def recv(self, size: int, *, peek: bool, waitall: bool, nonblocking: bool) -> bytes: ...
    def send(self, data: Buffer, *, nonblocking: bool) -> int: ...
    def shutdown(self, read: bool, write: bool) -> None: ...
    def close(self) -> None: ...


class Waiter(Protocol):
    """Blocks poll_oneoff until one of ``pollables`` is ready or the deadline passes.

    ``interests`` pairs each pollable with the direction (True = write) of interest;
    ``deadline_ns`` is on the monotonic clock the Guest uses (None = no deadline).  Returns
    when something may be ready or the deadline passed; wasi_host re-checks readiness itself.
    """

    def wait(self, interests: Sequence[tuple[Pollable, bool]], deadline_ns: int | None) -> None: ...


class Clock(Protocol):
    """The clocks a guest can read (injectable so tests control time)."""

    def realtime_ns(self) -> int: ...
    def monotonic_ns(self) -> int: ...
    def process_cputime_ns(self) -> int: ...
    def thread_cputime_ns(self) -> int: ...
    def sleep_until(self, monotonic_deadline_ns: int) -> None: ...
