"""Block devices: the bottom layer, where bytes meet the (untrusted) host.

Theory of operation: a `BlockDevice` is a fixed-size array of bytes with positional reads and
writes and a durability barrier (`sync`). Nothing above this layer knows whether the bytes live in
an image file, a real block device or memory. Every access is bounds-checked: a read past the end
raises `ShortRead` (EIO) rather than returning zeros, because silently padded data would look
like valid (if garbled) ciphertext to the layers above.

One process opens a volume at a time: opening an image writable takes an exclusive, non-blocking
`flock`; read-only opens take a shared one. `flock` locks belong to the open file description, so
two opens within one process also exclude each other; a process that wants to share a device
shares the object instead.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import mmap
import os
import stat
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

from storage.errors import NoSpace, ShortRead, VolumeInUse

# Direct writes need their offset, length and memory aligned to the logical block size (512 or
# 4096 bytes): 4096 covers both. Longer durable writes take the buffered path (pwrite, fdatasync).
_DIRECT_ALIGNMENT = 4096
_DIRECT_LIMIT = 64 * 1024
_ZERO_FILL = 1 << 20  # bytes of zeros per write when `prepare_durable` fills holes
_WRITEBACK_BYTES = 256 * 1024  # a buffered write this long starts its own writeback (`write`)
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of the dirty pages, do not wait


@runtime_checkable
class BlockDevice(Protocol):
    """A fixed-size byte array on some medium, with positional I/O and a durability barrier."""

    @property
    def size(self) -> int:
        """Total size in bytes (fixed for the device's lifetime)."""
        ...

    @property
    def writable(self) -> bool:
        """False when opened read-only: `write` then raises EROFS."""
        ...

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset`; `ShortRead` if the range passes the end."""
        ...

    def readinto(self, offset: int, buffer: bytearray | memoryview) -> None:
        """Fill `buffer` completely from `offset` (no intermediate copy)."""
        ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of `data` at `offset`; `NoSpace` if the range passes the end."""
        ...

    def write_scattered(self, pieces: list[tuple[int, bytes | memoryview]]) -> None:
        """`write` of each (offset, data) piece, in order: for many small pieces at scattered
        offsets (a checkpoint's home sectors) without the per-call overhead of `write`."""
        ...

    def sync(self) -> None:
        """Make every completed write durable (fdatasync for files)."""
        ...

    def write_durable(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """`write` then `sync` in one step: when it returns, `data` and every earlier write are
        durable. Files do it with one direct write when they can (see FileBlockDevice)."""
        ...

    def prepare_durable(self, offset: int, length: int) -> None:
        """A hint that `write_durable` will often rewrite [offset, offset + length): an image
        file fills the holes there with zeros (contents unchanged: holes read as zeros), so that
        later direct writes land on allocated, written blocks. No-op elsewhere."""
        ...

    def close(self) -> None:
        """Release the medium and its lock. Idempotent."""
        ...


@functools.cache
def _sync_file_range() -> Callable[..., Any] | None:
    """libc's sync_file_range (Linux; the os module has no binding), or None without it."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _check_range(offset: int, length: int, size: int, *, writing: bool) -> None:
    """Reject negative or out-of-device ranges before touching the medium."""
    if offset < 0 or length < 0:
        raise ValueError(f"negative offset or length ({offset}, {length})")
    if offset + length > size:
        where = f"[{offset}, {offset + length}) is past the end of the {size}-byte device"
        if writing:
            raise NoSpace(f"write {where}")
        raise ShortRead(f"read {where}")


class _ClosesOnExit:
    """`with device:` closes the device on the way out."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


class FileBlockDevice(_ClosesOnExit):
    """An image file (created sparse on request) or a block-device path, with an image lock.

    `FileBlockDevice(path, writable=True, create_size=N)` creates a new sparse image of N bytes
    and refuses to overwrite an existing file. Without `create_size` the file must exist; its
    size is the file's size (or the block device's size).
    """

    def __init__(self, path: str | os.PathLike[str], *, writable: bool,
                 create_size: int | None = None) -> None:
        self._path = os.fspath(path)
        self._writable = writable
        self._lock = threading.Lock()
        flags = os.O_RDWR if writable else os.O_RDONLY
        # O_NONBLOCK only for the open: a FIFO (or a tty) at the path would block it for ever,
        # before `_measure_size` could refuse it; cleared once the file is known to be an image
        flags |= os.O_CLOEXEC | os.O_NONBLOCK
        if create_size is not None:
            if not writable:
                raise ValueError("create_size needs writable=True")
            if create_size <= 0:
                raise ValueError(f"image size must be positive, not {create_size}")
            flags |= os.O_CREAT | os.O_EXCL
        self._fd: int | None = os.open(self._path, flags, 0o600)
        # `write_durable`: a second, O_DIRECT descriptor of the same open file, opened on first
        # use (unless refused here), and its aligned bounce buffer
        self._direct_fd: int | None = None
        self._direct_refused = False
        self._bounce: memoryview | None = None  # a view of `_bounce_map`, kept (one per write cost 1 us)
        self._bounce_map: mmap.mmap | None = None
        # buffered writes issued, and how many of them the last finished fdatasync covers:
        # different while one is not durable yet. Counts, not a flag, because a sync may run on
        # another thread (storage.integrity's flushes start one): a write issued while it runs
        # must stay unsynced when it returns.
        self._written = 0
        self._synced = 0
        try:
            self._take_lock()
            if create_size is not None:
                os.ftruncate(self._fd, create_size)  # sparse: no data blocks allocated
                os.fsync(self._fd)
                _fsync_parent_directory(self._path)
            self._size = self._measure_size()
            os.set_blocking(self._fd, True)
        except BaseException:
            os.close(self._fd)
            self._fd = None
            if create_size is not None:
                os.unlink(self._path)
            raise

    def _take_lock(self) -> None:
        assert self._fd is not None
        operation = (fcntl.LOCK_EX if self._writable else fcntl.LOCK_SH) | fcntl.LOCK_NB
        try:
            fcntl.flock(self._fd, operation)
        except BlockingIOError:
            raise VolumeInUse(f"{self._path} is in use by another process") from None

    def _measure_size(self) -> int:
        assert self._fd is not None
        info = os.fstat(self._fd)
        if stat.S_ISREG(info.st_mode):
            return info.st_size
        if stat.S_ISBLK(info.st_mode):
            return os.lseek(self._fd, 0, os.SEEK_END)
        # the path as the error's filename, so a caller can name it (the CLI's one-line error)
        raise OSError(errno.EINVAL, "is neither a regular file nor a block device", self._path)

    @property
    def path(self) -> str:
        return self._path

    @property
    def identity(self) -> tuple[int, int]:
        """(st_dev, st_ino) of the open image: a caller about to replace or read a host file
        compares it, so that it never unlinks or copies the very image it has open."""
        info = os.fstat(self._open_fd())
        return info.st_dev, info.st_ino

    @property
    def size(self) -> int:
        return self._size

    @property
    def writable(self) -> bool:
        return self._writable

    def _open_fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self._path}: device is closed")
        return self._fd

    def read(self, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.readinto(offset, buffer)
        return bytes(buffer)

    def readinto(self, offset: int, buffer: bytearray | memoryview) -> None:
        view = memoryview(buffer).cast("B")
        _check_range(offset, len(view), self._size, writing=False)
        fd = self._open_fd()
        done = 0
        while done < len(view):
            count = os.preadv(fd, [view[done:]], offset + done)
            if count == 0:  # the file shrank under us: never pad with zeros
                raise ShortRead(f"{self._path}: unexpected end of image at {offset + done}")
            done += count

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if not self._writable:
            raise OSError(errno.EROFS, f"{self._path} is open read-only")
        view = memoryview(data).cast("B")
        _check_range(offset, len(view), self._size, writing=True)
        fd = self._open_fd()
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
        finally:
            self._written += 1  # counted once in the page cache (see `sync`), even if cut short
        if done >= _WRITEBACK_BYTES:
            # Long writes (a commit's home sectors, 1 MiB each, and its log record) are synced
            # soon: starting their writeback now lets the disk work while the next chunk is
            # encrypted, and leaves less for the durability point's fdatasync (seq workload:
            # fdatasync 0.14 -> 0.10 s). Only a hint: durability still comes from `sync`.
            start_writeback = _sync_file_range()
            if start_writeback is not None:
                start_writeback(fd, offset, done, _SYNC_FILE_RANGE_WRITE)

    def write_scattered(self, pieces: list[tuple[int, bytes | memoryview]]) -> None:
        """One pwrite per piece in a tight loop, after checking every range (nothing is
        written if one is out of the device). A checkpoint writes about a thousand scattered
        4 KiB sectors: through `write` each cost 10 us, about half of it Python."""
        if not self._writable:
            raise OSError(errno.EROFS, f"{self._path} is open read-only")
        size = self._size
        for offset, data in pieces:
            _check_range(offset, len(data), size, writing=True)
        fd = self._open_fd()
        pwrite = os.pwrite
        try:
            for offset, data in pieces:
                done = pwrite(fd, data, offset)
                if done < len(data):  # short (rare): the rest through the general loop
                    self.write(offset + done, memoryview(data)[done:])
        finally:
            self._written += 1

    def sync(self) -> None:
        # every write counted before the fdatasync starts had reached the page cache
        covered = self._written
        os.fdatasync(self._open_fd())
        self._synced = covered

    def write_durable(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """`write` + `sync` as one direct write when possible: O_DIRECT from an aligned buffer
        with RWF_DSYNC (the page cache is bypassed, so the durability point costs one system
        call and no writeback; measured 200-270 us against 230-450 us for pwrite + fdatasync
        of 4 KiB on ext4 over virtio). After a buffered write not yet synced, the direct write
        is followed by fdatasync instead, so that every earlier write is durable too. Where
        direct I/O is refused (tmpfs, some filesystems) or the range is unaligned or long, it is
        the buffered write and fdatasync. Linux keeps buffered reads of the same file coherent
        (a direct write writes back and drops the cached pages it covers)."""
        if not self._writable:
            raise OSError(errno.EROFS, f"{self._path} is open read-only")
        view = memoryview(data).cast("B")
        length = len(view)
        _check_range(offset, length, self._size, writing=True)
        direct = self._direct_descriptor() if (
            not offset % _DIRECT_ALIGNMENT and not length % _DIRECT_ALIGNMENT
            and 0 < length <= _DIRECT_LIMIT) else None
        if direct is None:
            self.write(offset, view)
            self.sync()
            return
        bounce = self._bounce
        assert bounce is not None
        bounce[:length] = view
        flags = 0 if self._written != self._synced else os.RWF_DSYNC
        try:
            done = os.pwritev(direct, [bounce[:length]], offset, flags)
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            self._close_direct(refused=True)  # this medium wants another alignment: buffered
            done = 0
        if done < length:  # refused or short: the rest the ordinary way
            self.write(offset + done, view[done:])
        if self._written != self._synced:  # a buffered write before (flags 0) or the buffered rest just now
            self.sync()

    def _direct_descriptor(self) -> int | None:
        """The O_DIRECT descriptor, opened on first use through /proc/self/fd (the very file
        this device has open and locked, not whatever the path names now); None if refused."""
        if self._direct_fd is not None or self._direct_refused:
            return self._direct_fd
        fd = self._open_fd()
        mode = os.fstat(fd).st_mode
        direct_flag = getattr(os, "O_DIRECT", 0)
        if not direct_flag or not hasattr(os, "RWF_DSYNC") or not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            self._direct_refused = True
            return None
        try:
            direct = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | direct_flag | os.O_CLOEXEC)
        except OSError:  # no /proc, or a filesystem without direct I/O (EINVAL)
            self._direct_refused = True
            return None
        self._bounce_map = mmap.mmap(-1, _DIRECT_LIMIT)  # page-aligned
        self._bounce = memoryview(self._bounce_map)
        self._direct_fd = direct
        return direct

    def _close_direct(self, *, refused: bool) -> None:
        self._direct_refused = self._direct_refused or refused
        if self._direct_fd is not None:
            direct, self._direct_fd = self._direct_fd, None
            os.close(direct)
        if self._bounce is not None:
            self._bounce.release()  # the map cannot close while a view of it exists
            self._bounce = None
        if self._bounce_map is not None:
            self._bounce_map.close()
            self._bounce_map = None

    def prepare_durable(self, offset: int, length: int) -> None:
        """Fill the holes of [offset, offset + length) with zeros, found with SEEK_HOLE /
        SEEK_DATA (allocated ranges are left alone, so this is cheap once done). A sparse image
        otherwise makes the first direct write of each block allocate it, a journal commit
        each. Made durable by the next `sync` or `write_durable`."""
        _check_range(offset, length, self._size, writing=True)
        fd = self._open_fd()
        if not self._writable or not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        end = offset + length
        position = offset
        zeros = bytes(min(_ZERO_FILL, length))
        while position < end:
            try:
                hole = os.lseek(fd, position, os.SEEK_HOLE)
            except OSError:
                return  # no hole information here: leave the range as it is
            if hole >= end:
                return
            try:
                stop = min(os.lseek(fd, hole, os.SEEK_DATA), end)
            except OSError as error:
                if error.errno != errno.ENXIO:  # ENXIO: no data past `hole`
                    return
                stop = end
            for start in range(hole, stop, len(zeros)):
                self.write(start, zeros[:min(len(zeros), stop - start)])
            position = stop

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                self._close_direct(refused=False)
                fd, self._fd = self._fd, None
                os.close(fd)  # closing the last descriptor releases the flock

    def __repr__(self) -> str:
        mode = "rw" if self._writable else "ro"
        return f"FileBlockDevice({self._path!r}, {mode}, size={self._size})"


class MemoryBlockDevice(_ClosesOnExit):
    """A device in RAM, for tests and benchmarks. `snapshot()` / `restore()` let tests model a
    crash (sync points) or a host that replays old contents."""

    def __init__(self, size: int, *, initial: bytes | None = None, writable: bool = True) -> None:
        if size <= 0:
            raise ValueError(f"device size must be positive, not {size}")
        if initial is not None and len(initial) != size:
            raise ValueError("initial contents must be exactly `size` bytes")
        self._data = bytearray(initial) if initial is not None else bytearray(size)
        self._writable = writable
        self._closed = False
        self.sync_count = 0

    @property
    def size(self) -> int:
        return len(self._data)

    @property
    def writable(self) -> bool:
        return self._writable

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("device is closed")

    def read(self, offset: int, length: int) -> bytes:
        self._check_open()
        _check_range(offset, length, len(self._data), writing=False)
        return bytes(self._data[offset:offset + length])

    def readinto(self, offset: int, buffer: bytearray | memoryview) -> None:
        self._check_open()
        view = memoryview(buffer).cast("B")
        _check_range(offset, len(view), len(self._data), writing=False)
        view[:] = self._data[offset:offset + len(view)]

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_open()
        if not self._writable:
            raise OSError(errno.EROFS, "device is read-only")
        view = memoryview(data).cast("B")
        _check_range(offset, len(view), len(self._data), writing=True)
        self._data[offset:offset + len(view)] = view

    def write_scattered(self, pieces: list[tuple[int, bytes | memoryview]]) -> None:
        """`write` of each piece (through the method, so subclasses that model crashes see each),
        after checking every range (nothing is written if one is out of the device)."""
        for offset, data in pieces:
            _check_range(offset, len(data), len(self._data), writing=True)
        for offset, data in pieces:
            self.write(offset, data)

    def sync(self) -> None:
        self._check_open()
        self.sync_count += 1

    def write_durable(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """`write` then `sync` (through the methods, so subclasses that model crashes see both)."""
        self.write(offset, data)
        self.sync()

    def prepare_durable(self, offset: int, length: int) -> None:
        """Nothing to prepare in memory."""
        self._check_open()
        _check_range(offset, length, len(self._data), writing=True)

    def close(self) -> None:
        self._closed = True

    def snapshot(self) -> bytes:
        """A copy of the whole device (what the host could save and replay later)."""
        return bytes(self._data)

    def restore(self, contents: bytes) -> None:
        """Replace the whole device contents (the host replaying a snapshot)."""
        if len(contents) != len(self._data):
            raise ValueError("snapshot size differs from the device size")
        self._data[:] = contents

    def __repr__(self) -> str:
        return f"MemoryBlockDevice(size={len(self._data)})"


def _fsync_parent_directory(path: str) -> None:
    """Make a newly created file's directory entry durable."""
    directory = os.path.dirname(os.path.abspath(path))
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
