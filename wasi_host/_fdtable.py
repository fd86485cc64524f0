"""The fd table: guest fd numbers mapped to a tagged union of open things, with rights.

Each entry kind (file, directory, stdio stream, socket) is one class; accessors on the table
(`get_file`, `get_directory`, `get_seekable`, ...) return the right kind or raise the errno
wasmtime returns for the wrong one, and check rights in one place (:func:`require`) before any
backend is called.  A right that wasi-libc withholds because of the access mode gives the errno
the OS gives for an fd not opened for that access (EBADF for a write to a read-only fd); any
other missing right is ENOTCAPABLE.

Numbering follows wasmtime: a closed number is reused (highest first), otherwise one more than
the highest in use.
"""

from __future__ import annotations

import contextlib
from typing import TypeVar

from wasi_host._abi import MAX_FILE_OFFSET, Errno, Fdflags, Filetype, Rights
from wasi_host._backend import Buffer, Directory, File, Readiness, Socket, Stream
from wasi_host._errors import WasiError

# The rights wasi-libc withholds according to the access mode (O_RDONLY/O_WRONLY) of open():
# missing, they give the errno the host OS (and so wasmtime, which checks no rights) gives for an
# fd not opened for that access.  Any other missing right is ENOTCAPABLE.
_ACCESS_MODE_ERRNO = (
    (Rights.FD_READ, Errno.BADF),
    (Rights.FD_WRITE, Errno.BADF),
    (Rights.FD_FILESTAT_SET_SIZE, Errno.INVAL),
    (Rights.FD_ALLOCATE, Errno.NOTSUP),
)


class Entry:
    """Common state of every open fd: rights and fdflags."""

    __slots__ = ("fdflags", "filetype", "rights_base", "rights_inheriting")

    def __init__(self, rights_base: int, rights_inheriting: int, fdflags: int = 0) -> None:
        self.filetype = Filetype.UNKNOWN
        self.rights_base = rights_base
        self.rights_inheriting = rights_inheriting
        self.fdflags = fdflags

    def read(self, size: int) -> bytes:
        """fd_read: the next bytes (b"" at end), advancing the offset where there is one."""
        raise WasiError(Errno.BADF)

    def write(self, data: Buffer) -> int:
        """fd_write: write at the offset (or the end for APPEND) and advance."""
        raise WasiError(Errno.BADF)

    def check_pollable(self, write: bool) -> None:
        """EBADF unless poll_oneoff can wait on this fd for writing (``write``) or reading; only
        files, sockets and stdio streams in their own direction can be polled (wasmtime)."""
        raise WasiError(Errno.BADF)

    def readiness(self, write: bool) -> Readiness | None:
        """poll_oneoff readiness; only streams, sockets and files can be polled."""
        raise WasiError(Errno.BADF)

    def close(self) -> None:
        """Release the backend object."""


class OpenFile(Entry):
    """A regular file: the backend File plus the offset wasi_host owns."""

    __slots__ = ("file", "offset")

    def __init__(self, file: File, filetype: int, rights_base: int, rights_inheriting: int, fdflags: int) -> None:
        super().__init__(rights_base, rights_inheriting, fdflags)
        self.file = file
        self.offset = 0
        self.filetype = filetype

    def read(self, size: int) -> bytes:
        if self.offset + size > MAX_FILE_OFFSET:
            raise WasiError(Errno.INVAL)  # a transfer ending past off_t (Linux's rw_verify_area)
        data = self.file.pread(size, self.offset)
        self.offset += len(data)
        return data

    def write(self, data: Buffer) -> int:
        if self.fdflags & Fdflags.APPEND:  # at the end, wherever the offset is (wasmtime)
            end = self.file.size()
            written = self.file.pwrite(data, end)
            self.offset = end + written
            return written
        if self.offset + len(data) > MAX_FILE_OFFSET:
            raise WasiError(Errno.INVAL)  # a transfer ending past off_t (Linux's rw_verify_area)
        written = self.file.pwrite(data, self.offset)
        self.offset += written
        return written

    def check_pollable(self, write: bool) -> None:
        pass

    def readiness(self, write: bool) -> Readiness | None:
        if write:
            return Readiness(1)
        remaining = self.file.stat().size - self.offset
        return Readiness(1, hangup=remaining <= 0)

    def close(self) -> None:
        self.file.close()


class OpenDirectory(Entry):
    """A directory; ``preopen_name`` is set for the pre-opened ones (fd_prestat_*)."""

    __slots__ = ("directory", "preopen_name")

    def __init__(
        self, directory: Directory, rights_base: int, rights_inheriting: int, preopen_name: bytes | None = None
    ) -> None:
        super().__init__(rights_base, rights_inheriting)
        self.directory = directory
        self.preopen_name = preopen_name
        self.filetype = Filetype.DIRECTORY

    def close(self) -> None:
        self.directory.close()


class OpenStream(Entry):
    """stdin, stdout or stderr.

    A stream goes one way, fixed when it is installed: an output stream (stdout, stderr) is the
    one given FD_WRITE.  Polling it the other way is EBADF, as wasmtime: select() on stdout for
    reading could wait forever (a terminal), beyond the reach of --timeout.
    """

    __slots__ = ("output", "stream")

    def __init__(self, stream: Stream, rights_base: int) -> None:
        super().__init__(rights_base, rights_base)
        self.stream = stream
        self.output = bool(rights_base & Rights.FD_WRITE)
        self.filetype = Filetype.CHARACTER_DEVICE if stream.is_terminal() else Filetype.UNKNOWN

    def read(self, size: int) -> bytes:
        return self.stream.read(size)

    def write(self, data: Buffer) -> int:
        return self.stream.write(data)

    def check_pollable(self, write: bool) -> None:
        if write != self.output:
            raise WasiError(Errno.BADF)  # stdin cannot be written, stdout and stderr cannot be read

    def readiness(self, write: bool) -> Readiness | None:
        self.check_pollable(write)
        return self.stream.readiness(write)

    def close(self) -> None:
        self.stream.close()


class OpenSocket(Entry):
    """A pre-opened socket, or one returned by sock_accept."""

    __slots__ = ("socket",)

    def __init__(self, socket: Socket, rights_base: int = Rights.SOCKET_BASE, fdflags: int = 0) -> None:
        super().__init__(rights_base, rights_base, fdflags)
        self.socket = socket
        self.filetype = Filetype.SOCKET_STREAM

    def read(self, size: int) -> bytes:
        return self.socket.recv(size, peek=False, waitall=False, nonblocking=bool(self.fdflags & Fdflags.NONBLOCK))

    def write(self, data: Buffer) -> int:
        return self.socket.send(data, nonblocking=bool(self.fdflags & Fdflags.NONBLOCK))

    def check_pollable(self, write: bool) -> None:
        pass

    def readiness(self, write: bool) -> Readiness | None:
        return self.socket.readiness(write)

    def close(self) -> None:
        self.socket.close()


E = TypeVar("E", bound=Entry)


def require(entry: Entry, rights: int) -> None:
    """Raise unless ``entry`` holds every right in ``rights`` (the one rights check)."""
    missing = rights & ~entry.rights_base
    if missing:
        for right, errno in _ACCESS_MODE_ERRNO:
            if missing & right:
                raise WasiError(errno)
        raise WasiError(Errno.NOTCAPABLE)


class FdTable:
    """fd number -> Entry."""

    __slots__ = ("entries", "free")

    def __init__(self) -> None:
        self.entries: dict[int, Entry] = {}
        self.free: set[int] = set()

    def add(self, entry: Entry) -> int:
        """Install ``entry`` under a fresh number (a freed one, highest first, as wasmtime)."""
        if self.free:
            fd = max(self.free)
            self.free.discard(fd)
        else:
            fd = max(self.entries, default=-1) + 1
            if fd >= 1 << 31:
                raise WasiError(Errno.MFILE)
        self.entries[fd] = entry
        return fd

    def get(self, fd: int, rights: int = 0) -> Entry:
        """The entry for ``fd`` holding ``rights``; EBADF when not open."""
        entry = self.entries.get(fd)
        if entry is None:
            raise WasiError(Errno.BADF)
        if rights & ~entry.rights_base:
            require(entry, rights)
        return entry

    def _get_kind(self, fd: int, kind: type[E], rights: int, wrong_kind: int) -> E:
        entry = self.get(fd)
        if not isinstance(entry, kind):
            raise WasiError(wrong_kind)
        require(entry, rights)
        return entry

    def get_file(self, fd: int, rights: int = 0) -> OpenFile:
        """A regular-file entry; EBADF for anything else (as wasmtime's get_file)."""
        return self._get_kind(fd, OpenFile, rights, Errno.BADF)

    def get_seekable(self, fd: int, rights: int = 0) -> OpenFile:
        """A file that has an offset; ESPIPE for stdio and sockets, EBADF otherwise."""
        entry = self.get(fd)
        if isinstance(entry, OpenFile):
            require(entry, rights)
            return entry
        if isinstance(entry, OpenStream | OpenSocket):
            raise WasiError(Errno.SPIPE)
        raise WasiError(Errno.BADF)

    def get_directory(self, fd: int, rights: int = 0, wrong_kind: int = Errno.BADF) -> OpenDirectory:
        """A directory entry; ``wrong_kind`` (EBADF, or ENOTDIR for path_open) otherwise."""
        return self._get_kind(fd, OpenDirectory, rights, wrong_kind)

    def get_socket(self, fd: int, rights: int = 0) -> OpenSocket:
        """A socket entry; ENOTSOCK for any other open fd."""
        return self._get_kind(fd, OpenSocket, rights, Errno.NOTSOCK)

    def close(self, fd: int) -> None:
        """fd_close: remove and release; EBADF when not open."""
        entry = self.entries.pop(fd, None)
        if entry is None:
            raise WasiError(Errno.BADF)
        self.free.add(fd)
        entry.close()

    def renumber(self, source: int, target: int) -> None:
        """fd_renumber: move ``source`` onto ``target``, closing whatever ``target`` held."""
        entry = self.get(source)
        self.get(target)  # wasmtime: the target must be open too (EBADF)
        if source == target:
            return
        del self.entries[source]
        self.free.add(source)
        self.free.discard(target)
        previous = self.entries.get(target)
        self.entries[target] = entry
        if previous is not None:
            # The move is done: an error closing what `target` held (a volume file's lost
            # write-back) is dropped, as dup2(2) drops it, rather than make the guest think the
            # renumber failed. Any other fd of that file still has its fsync report it.
            with contextlib.suppress(OSError):
                previous.close()

    def close_all(self) -> None:
        """Close every fd (the guest is finished); the first failure is re-raised at the end."""
        entries = list(self.entries.values())
        self.entries.clear()
        self.free.clear()
        error: BaseException | None = None
        for entry in entries:
            try:
                entry.close()
            except Exception as exc:  # keep closing the others
                error = error or exc
        if error is not None:
            raise error
