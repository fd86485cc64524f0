"""An in-memory filesystem backend: the reference implementation of the Directory/File protocols.

Inodes carry a number, a link count, nanosecond timestamps and either sparse file data (64 KiB
chunks; holes read as zeros), directory entries or a symlink target.  An unlinked file stays
readable and writable through the handles that still hold it.  Readdir cookies are per-entry
sequence numbers assigned when a name is linked into a directory, so they stay valid while other
entries come and go.  Used by tests, and as the model the encrypted volume is compared against.
"""

from __future__ import annotations

import errno
import itertools
import os
import time
from collections.abc import Callable, Iterator

from wasi_host._abi import Filetype
from wasi_host._backend import Buffer, DirEntry, FileStat, Now, TimeUpdate

CHUNK = 1 << 16
_DEVICE = 0x6D656D  # "mem"


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class _Inode:
    __slots__ = ("atime", "chunks", "ctime", "entries", "filetype", "ino", "mtime", "nlink", "parent", "size", "target")

    def __init__(self, ino: int, filetype: int, now: int) -> None:
        self.ino = ino
        self.filetype = filetype
        self.nlink = 0
        self.atime = self.mtime = self.ctime = now
        self.size = 0
        self.chunks: dict[int, bytearray] = {}
        self.entries: dict[str, tuple[int, _Inode]] = {}  # name -> (cookie, inode), in cookie order
        self.parent: _Inode | None = None
        self.target = ""

    def stat(self) -> FileStat:
        nlink = self.nlink
        if self.filetype == Filetype.DIRECTORY and nlink:
            nlink = 2 + sum(1 for _, child in self.entries.values() if child.filetype == Filetype.DIRECTORY)
        size = len(self.target.encode("utf-8", "surrogateescape")) if self.filetype == Filetype.SYMBOLIC_LINK else self.size
        return FileStat(_DEVICE, self.ino, self.filetype, nlink, size, self.atime, self.mtime, self.ctime)


class MemoryFilesystem:
    """One in-memory tree; :meth:`root` opens its root directory."""

    def __init__(self, clock: Callable[[], int] = time.time_ns) -> None:
        self.now = clock
        self._inodes = itertools.count(1)
        self._cookies = itertools.count(1)
        self._root = self.new_inode(Filetype.DIRECTORY)
        self._root.nlink = 1

    def new_inode(self, filetype: int) -> _Inode:
        return _Inode(next(self._inodes), filetype, self.now())

    def next_cookie(self) -> int:
        return next(self._cookies)

    def root(self) -> MemoryDirectory:
        """A new handle on the root directory."""
        return MemoryDirectory(self, self._root)


def _apply_times(inode: _Inode, atime: TimeUpdate, mtime: TimeUpdate, now: int) -> None:
    if atime is not None:
        inode.atime = now if atime is Now.NOW else atime
    if mtime is not None:
        inode.mtime = now if mtime is Now.NOW else mtime
    inode.ctime = now


class MemoryFile:
    """An open file of a MemoryFilesystem."""

    def __init__(self, fs: MemoryFilesystem, inode: _Inode) -> None:
        self._fs = fs
        self._inode = inode

    def stat(self) -> FileStat:
        return self._inode.stat()

    def size(self) -> int:
        return self._inode.size

    def pread(self, size: int, offset: int) -> bytes:
        inode = self._inode
        end = min(offset + size, inode.size)
        if end <= offset:
            return b""
        out = bytearray(end - offset)
        position = offset
        while position < end:
            index, within = divmod(position, CHUNK)
            take = min(CHUNK - within, end - position)
            chunk = inode.chunks.get(index)
            if chunk is not None:
                out[position - offset : position - offset + take] = chunk[within : within + take]
            position += take
        return bytes(out)

    def pwrite(self, data: Buffer, offset: int) -> int:
        inode = self._inode
        length = len(data)
        index, within = divmod(offset, CHUNK)
        if within + length <= CHUNK:  # fast path: inside one chunk
            chunk = inode.chunks.get(index)
            if chunk is None:
                chunk = inode.chunks[index] = bytearray(CHUNK)
            chunk[within : within + length] = data
            position = length
        else:
            position = 0
        while position < length:
            index, within = divmod(offset + position, CHUNK)
            take = min(CHUNK - within, length - position)
            chunk = inode.chunks.get(index)
            if chunk is None:
                chunk = inode.chunks[index] = bytearray(CHUNK)
            chunk[within : within + take] = data[position : position + take]
            position += take
        if offset + length > inode.size:
            inode.size = offset + length
        inode.mtime = inode.ctime = self._fs.now()
        return length

    def set_size(self, size: int) -> None:
        inode = self._inode
        if size < inode.size:
            last = size // CHUNK
            for index in [index for index in inode.chunks if index > last]:
                del inode.chunks[index]
            chunk = inode.chunks.get(last)
            if chunk is not None:
                chunk[size % CHUNK :] = bytes(CHUNK - size % CHUNK)
        inode.size = size
        inode.mtime = inode.ctime = self._fs.now()

    def set_times(self, atime: TimeUpdate, mtime: TimeUpdate) -> None:
        _apply_times(self._inode, atime, mtime, self._fs.now())

    def sync(self) -> None:
        """Nothing to flush: memory is the storage."""

    def datasync(self) -> None:
        """Nothing to flush: memory is the storage."""

    def close(self) -> None:
        """Dropping the reference is enough (an unlinked inode then goes away)."""


class MemoryDirectory:
    """An open directory of a MemoryFilesystem."""

    def __init__(self, fs: MemoryFilesystem, inode: _Inode) -> None:
        self._fs = fs
        self._inode = inode

    # lookups

    def _lookup(self, name: str) -> _Inode:
        if name == ".":
            return self._inode
        found = self._inode.entries.get(name)
        if found is None:
            raise _error(errno.ENOENT)
        return found[1]

    def _check_new(self, name: str) -> None:
        if name == "." or name in self._inode.entries:
            raise _error(errno.EEXIST)
        if self._inode.nlink == 0:
            raise _error(errno.ENOENT)  # creating inside a removed directory
        if len(name.encode("utf-8", "surrogateescape")) > 255:
            raise _error(errno.ENAMETOOLONG)

    def _link(self, name: str, inode: _Inode) -> None:
        self._inode.entries[name] = (self._fs.next_cookie(), inode)
        inode.nlink += 1
        if inode.filetype == Filetype.DIRECTORY:
            inode.parent = self._inode
        self._touch()

    def _unlink(self, name: str) -> _Inode:
        _, inode = self._inode.entries.pop(name)
        inode.nlink -= 1
        inode.ctime = self._fs.now()
        self._touch()
        return inode

    def _touch(self) -> None:
        self._inode.mtime = self._inode.ctime = self._fs.now()

    # the Directory protocol

    def stat(self) -> FileStat:
        return self._inode.stat()

    def stat_at(self, name: str) -> FileStat:
        return self._lookup(name).stat()

    def open_directory(self, name: str) -> MemoryDirectory:
        inode = self._lookup(name)
        if inode.filetype == Filetype.SYMBOLIC_LINK:
            raise _error(errno.ELOOP)
        if inode.filetype != Filetype.DIRECTORY:
            raise _error(errno.ENOTDIR)
        return MemoryDirectory(self._fs, inode)

    def open_file(self, name: str, *, create: bool, exclusive: bool, truncate: bool, read: bool, write: bool) -> MemoryFile:
        found = self._inode.entries.get(name) if name != "." else (0, self._inode)
        if found is None:
            if not create:
                raise _error(errno.ENOENT)
            self._check_new(name)
            inode = self._fs.new_inode(Filetype.REGULAR_FILE)
            self._link(name, inode)
            return MemoryFile(self._fs, inode)
        inode = found[1]
        if create and exclusive:
            raise _error(errno.EEXIST)
        if inode.filetype == Filetype.SYMBOLIC_LINK:
            raise _error(errno.ELOOP)
        if inode.filetype == Filetype.DIRECTORY:
            raise _error(errno.EISDIR)
        file = MemoryFile(self._fs, inode)
        if truncate:
            file.set_size(0)
        return file

    def mkdir(self, name: str) -> None:
        self._check_new(name)
        inode = self._fs.new_inode(Filetype.DIRECTORY)
        self._link(name, inode)

    def rmdir(self, name: str) -> None:
        if name == ".":
            raise _error(errno.EINVAL)
        inode = self._lookup(name)
        if inode.filetype != Filetype.DIRECTORY:
            raise _error(errno.ENOTDIR)
        if inode.entries:
            raise _error(errno.ENOTEMPTY)
        self._unlink(name)

    def unlink(self, name: str) -> None:
        inode = self._lookup(name)
        if inode.filetype == Filetype.DIRECTORY:
            raise _error(errno.EISDIR)
        self._unlink(name)

    def symlink(self, target: str, name: str) -> None:
        self._check_new(name)
        inode = self._fs.new_inode(Filetype.SYMBOLIC_LINK)
        inode.target = target
        self._link(name, inode)

    def readlink(self, name: str) -> str:
        inode = self._lookup(name)
        if inode.filetype != Filetype.SYMBOLIC_LINK:
            raise _error(errno.EINVAL)
        inode.atime = self._fs.now()
        return inode.target

    def _same_filesystem(self, other: object) -> MemoryDirectory:
        if not isinstance(other, MemoryDirectory) or other._fs is not self._fs:
            raise _error(errno.EXDEV)
        return other

    def link(self, name: str, target_dir: object, target_name: str) -> None:
        target = self._same_filesystem(target_dir)
        inode = self._lookup(name)
        if inode.filetype == Filetype.DIRECTORY:
            raise _error(errno.EPERM)
        target._check_new(target_name)
        target._link(target_name, inode)
        inode.ctime = self._fs.now()

    def rename(self, name: str, target_dir: object, target_name: str) -> None:
        target = self._same_filesystem(target_dir)
        if name == "." or target_name == ".":
            raise _error(errno.EBUSY)
        inode = self._lookup(name)
        existing = target._inode.entries.get(target_name)
        if existing is not None:
            victim = existing[1]
            if victim is inode:
                return
            if inode.filetype == Filetype.DIRECTORY and victim.filetype != Filetype.DIRECTORY:
                raise _error(errno.ENOTDIR)
            if inode.filetype != Filetype.DIRECTORY and victim.filetype == Filetype.DIRECTORY:
                raise _error(errno.EISDIR)
            if victim.entries:
                raise _error(errno.ENOTEMPTY)
        if inode.filetype == Filetype.DIRECTORY:
            ancestor: _Inode | None = target._inode
            while ancestor is not None:
                if ancestor is inode:
                    raise _error(errno.EINVAL)  # moving a directory into itself
                ancestor = ancestor.parent
        if existing is None:
            target._check_new(target_name)
        else:
            target._unlink(target_name)
        self._unlink(name)
        target._link(target_name, inode)

    def set_times(self, atime: TimeUpdate, mtime: TimeUpdate) -> None:
        _apply_times(self._inode, atime, mtime, self._fs.now())

    def set_times_at(self, name: str, atime: TimeUpdate, mtime: TimeUpdate) -> None:
        _apply_times(self._lookup(name), atime, mtime, self._fs.now())

    def readdir(self, cookie: int) -> Iterator[DirEntry]:
        for name, (entry_cookie, inode) in list(self._inode.entries.items()):
            if entry_cookie > cookie:
                yield DirEntry(entry_cookie, name, inode.filetype, inode.ino)

    def close(self) -> None:
        """Dropping the reference is enough."""
