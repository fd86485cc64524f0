"""A host-directory backend (``--dir HOST::GUEST``): per-name operations on directory fds.

Every operation is ``*at`` relative to an open directory fd with no-follow semantics
(``O_NOFOLLOW``, ``follow_symlinks=False``), and wasi_host's resolver walks paths one component
at a time, so a symlink the host swaps in between two calls can make an operation fail but can
never make it reach outside the pre-opened tree.

Readdir lists the directory in the host's own order (getdents order, as wasmtime's built-in WASI
reports it) into a snapshot taken when reading starts at cookie 0 (or first resumes from another
cookie); cookie ``n`` resumes after the n-th entry of that snapshot, so cookies are stable while
the handle is open.
"""

from __future__ import annotations

import errno
import os
import stat as stat_module
import time
from collections.abc import Iterator

from wasi_host._abi import Filetype
from wasi_host._backend import Buffer, DirEntry, FileStat, Now, TimeUpdate

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _filetype(mode: int) -> int:
    if stat_module.S_ISREG(mode):
        return Filetype.REGULAR_FILE
    if stat_module.S_ISDIR(mode):
        return Filetype.DIRECTORY
    if stat_module.S_ISLNK(mode):
        return Filetype.SYMBOLIC_LINK
    if stat_module.S_ISCHR(mode):
        return Filetype.CHARACTER_DEVICE
    if stat_module.S_ISBLK(mode):
        return Filetype.BLOCK_DEVICE
    if stat_module.S_ISSOCK(mode):
        return Filetype.SOCKET_STREAM
    return Filetype.UNKNOWN  # FIFOs have no preview1 type


def _file_stat(result: os.stat_result) -> FileStat:
    return FileStat(
        result.st_dev, result.st_ino, _filetype(result.st_mode), result.st_nlink, result.st_size,
        result.st_atime_ns, result.st_mtime_ns, result.st_ctime_ns,
    )


def _times(current: os.stat_result, atime: TimeUpdate, mtime: TimeUpdate) -> tuple[int, int]:
    """Both timestamps for os.utime (which cannot leave one unchanged)."""
    now = time.time_ns()
    new_atime = current.st_atime_ns if atime is None else now if atime is Now.NOW else atime
    new_mtime = current.st_mtime_ns if mtime is None else now if mtime is Now.NOW else mtime
    return new_atime, new_mtime


class HostFile:
    """An open host file (an fd)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def stat(self) -> FileStat:
        return _file_stat(os.fstat(self._fd))

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self._fd, size, offset)

    def pwrite(self, data: Buffer, offset: int) -> int:
        return os.pwrite(self._fd, data, offset)

    def set_size(self, size: int) -> None:
        os.ftruncate(self._fd, size)

    def set_times(self, atime: TimeUpdate, mtime: TimeUpdate) -> None:
        os.utime(self._fd, ns=_times(os.fstat(self._fd), atime, mtime))

    def sync(self) -> None:
        os.fsync(self._fd)

    def datasync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class HostDirectory:
    """An open host directory (an ``O_DIRECTORY`` fd)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._snapshot: list[tuple[str, int, int]] | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> HostDirectory:
        """Open the host directory ``path`` (chosen by the operator, so it may be a symlink)."""
        return cls(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))

    def stat(self) -> FileStat:
        return _file_stat(os.fstat(self._fd))

    def stat_at(self, name: str) -> FileStat:
        return _file_stat(os.stat(name, dir_fd=self._fd, follow_symlinks=False))

    def open_directory(self, name: str) -> HostDirectory:
        return HostDirectory(os.open(name, _DIRECTORY_FLAGS, dir_fd=self._fd))

    def open_file(self, name: str, *, create: bool, exclusive: bool, truncate: bool, read: bool, write: bool) -> HostFile:
        # O_NONBLOCK: opening a FIFO waits for a partner, in a host call that neither --timeout
        # nor a stop signal can interrupt; non-blocking, it opens at once (or ENXIO for writing
        # with no reader) and blocking mode is back for the file's reads and writes.
        flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        flags |= os.O_RDWR if read and write else os.O_WRONLY if write else os.O_RDONLY
        if create:
            flags |= os.O_CREAT
        if exclusive:
            flags |= os.O_EXCL
        if truncate:
            flags |= os.O_TRUNC
        fd = os.open(name, flags, 0o666, dir_fd=self._fd)
        try:
            if stat_module.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return HostFile(fd)

    def mkdir(self, name: str) -> None:
        os.mkdir(name, 0o777, dir_fd=self._fd)

    def rmdir(self, name: str) -> None:
        os.rmdir(name, dir_fd=self._fd)

    def unlink(self, name: str) -> None:
        os.unlink(name, dir_fd=self._fd)

    def symlink(self, target: str, name: str) -> None:
        os.symlink(target, name, dir_fd=self._fd)

    def readlink(self, name: str) -> str:
        return os.readlink(name, dir_fd=self._fd)

    def _other(self, other: object) -> HostDirectory:
        if not isinstance(other, HostDirectory):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return other

    def link(self, name: str, target_dir: object, target_name: str) -> None:
        os.link(name, target_name, src_dir_fd=self._fd, dst_dir_fd=self._other(target_dir)._fd, follow_symlinks=False)

    def rename(self, name: str, target_dir: object, target_name: str) -> None:
        os.rename(name, target_name, src_dir_fd=self._fd, dst_dir_fd=self._other(target_dir)._fd)

    def set_times(self, atime: TimeUpdate, mtime: TimeUpdate) -> None:
        os.utime(self._fd, ns=_times(os.fstat(self._fd), atime, mtime))

    def set_times_at(self, name: str, atime: TimeUpdate, mtime: TimeUpdate) -> None:
        current = os.stat(name, dir_fd=self._fd, follow_symlinks=False)
        os.utime(name, ns=_times(current, atime, mtime), dir_fd=self._fd, follow_symlinks=False)

    def _take_snapshot(self) -> list[tuple[str, int, int]]:
        fd = os.open(".", _DIRECTORY_FLAGS, dir_fd=self._fd)  # a fresh fd: its own read position
        try:
            entries = []
            with os.scandir(fd) as listing:
                for item in listing:
                    if item.is_symlink():
                        filetype = Filetype.SYMBOLIC_LINK
                    elif item.is_dir(follow_symlinks=False):
                        filetype = Filetype.DIRECTORY
                    elif item.is_file(follow_symlinks=False):
                        filetype = Filetype.REGULAR_FILE
                    else:
                        try:
                            filetype = _filetype(item.stat(follow_symlinks=False).st_mode)
                        except FileNotFoundError:
                            continue  # removed while listing
                    entries.append((item.name, filetype, item.inode()))
            return entries
        finally:
            os.close(fd)

    def readdir(self, cookie: int) -> Iterator[DirEntry]:
        if cookie == 0 or self._snapshot is None:
            self._snapshot = self._take_snapshot()
        snapshot = self._snapshot
        for index in range(cookie, len(snapshot)):
            name, filetype, ino = snapshot[index]
            yield DirEntry(index + 1, name, filetype, ino)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
