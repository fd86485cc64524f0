"""A guest without wasm: calls wasi_host's FUNCTIONS directly on a bytearray-backed memory.

Used by tests/test_wasi_*.py to exercise every preview1 function on every backend.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType

from wasi_host import FUNCTIONS, Directory, Errno, Guest, ProcExit, Rights, errno_for_exception
from wasi_host._abi import FILESTAT, LOOKUP_SYMLINK_FOLLOW
from wasi_host._backend import FileStat, Socket
from wasi_host.hostdir import HostDirectory
from wasi_host.memfs import MemoryFilesystem
from wasi_host.streams import MemoryStream


def volume_root(tmp_path: Path) -> Directory:
    """The root of a fresh encrypted volume image in `tmp_path` (cheap KDF), through the keep's
    adapter (shim.volume_backend); the image lock goes with the volume object."""
    from shim.volume_backend import directory_over
    from storage.luks2 import KdfCost
    from storage.volume import create_volume

    return directory_over(create_volume(tmp_path / "volume.img", 32 << 20, b"test", pbkdf="pbkdf2",
                                        kdf_cost=KdfCost(iterations=1000)))


#: Every filesystem backend the behaviour tests run on: name -> (empty tmp dir -> root Directory).
#: A new backend (the encrypted volume) joins every test in test_wasi_files.py by adding itself.
BACKENDS: Mapping[str, Callable[[Path], Directory]] = MappingProxyType({
    "memfs": lambda tmp_path: MemoryFilesystem().root(),
    "hostdir": HostDirectory.open,
    "volume": volume_root,
})

MEMORY_SIZE = 1 << 16
SCRATCH_START = 4096
RESULT = 64  # a few out-pointer slots live at 64..127
PREOPEN = 3


class GuestHarness:
    """One Guest with a pre-opened directory at fd 3, a 64 KiB memory and call helpers."""

    def __init__(self, root: Directory, *, stdin: bytes = b"", sockets: tuple[Socket, ...] = ()) -> None:
        self.stdin = MemoryStream(stdin)
        self.stdout = MemoryStream()
        self.stderr = MemoryStream()
        self.guest = Guest(
            [b"prog", b"first arg"], [(b"HOME", b"/sandbox"), (b"EMPTY", b"")],
            [("/sandbox", root)], self.stdin, self.stdout, self.stderr, sockets,
        )
        self.memory = memoryview(bytearray(MEMORY_SIZE))
        self._next = SCRATCH_START

    @classmethod
    def around(cls, guest: Guest) -> GuestHarness:
        """A harness for a Guest built by the test itself (its own stdio streams)."""
        harness = cls.__new__(cls)
        harness.guest = guest
        harness.memory = memoryview(bytearray(MEMORY_SIZE))
        harness._next = SCRATCH_START
        return harness

    def call(self, name: str, *args: int) -> int:
        """Call one host function like the binding does; a host bug fails the test."""
        try:
            return FUNCTIONS[name].impl(self.guest, self.memory, *args)
        except ProcExit:
            raise
        except Exception as exc:
            errno = errno_for_exception(exc)
            if errno is None:
                raise
            return errno

    def alloc(self, size: int) -> int:
        """Scratch guest memory (a bump allocator that wraps around)."""
        if self._next + size > MEMORY_SIZE:
            self._next = SCRATCH_START
        ptr = self._next
        self._next += (size + 7) & ~7
        return ptr

    def put(self, data: bytes | str) -> tuple[int, int]:
        """Copy ``data`` into guest memory; returns (ptr, len)."""
        raw = data.encode() if isinstance(data, str) else data
        ptr = self.alloc(len(raw))
        self.memory[ptr : ptr + len(raw)] = raw
        return ptr, len(raw)

    def u32(self, ptr: int) -> int:
        return int(struct.unpack_from("<I", self.memory, ptr)[0])

    def u64(self, ptr: int) -> int:
        return int(struct.unpack_from("<Q", self.memory, ptr)[0])

    def ciovecs(self, *chunks: bytes) -> tuple[int, int]:
        """A ciovec array over copies of ``chunks``."""
        array = self.alloc(8 * len(chunks))
        for index, chunk in enumerate(chunks):
            ptr, length = self.put(chunk)
            struct.pack_into("<II", self.memory, array + 8 * index, ptr, length)
        return array, len(chunks)

    def iovecs(self, *sizes: int) -> tuple[int, list[tuple[int, int]]]:
        array = self.alloc(8 * len(sizes))
        buffers = []
        for index, size in enumerate(sizes):
            ptr = self.alloc(size)
            struct.pack_into("<II", self.memory, array + 8 * index, ptr, size)
            buffers.append((ptr, size))
        return array, buffers

    # convenience wrappers that assert success

    def open(
        self, path: str, oflags: int = 0, *, rights: int = Rights.ALL, fdflags: int = 0,
        dirflags: int = LOOKUP_SYMLINK_FOLLOW, at: int = PREOPEN,
    ) -> int:
        errno = self.open_errno(path, oflags, rights=rights, fdflags=fdflags, dirflags=dirflags, at=at)
        assert errno == Errno.SUCCESS, Errno(errno)
        return self.u32(RESULT)

    def open_errno(
        self, path: str | bytes, oflags: int = 0, *, rights: int = Rights.ALL, fdflags: int = 0,
        dirflags: int = LOOKUP_SYMLINK_FOLLOW, at: int = PREOPEN,
    ) -> int:
        ptr, length = self.put(path)
        return self.call("path_open", at, dirflags, ptr, length, oflags, rights, Rights.ALL, fdflags, RESULT)

    def write(self, fd: int, *chunks: bytes) -> int:
        array, count = self.ciovecs(*chunks)
        errno = self.call("fd_write", fd, array, count, RESULT)
        assert errno == Errno.SUCCESS, Errno(errno)
        return self.u32(RESULT)

    def read(self, fd: int, *sizes: int) -> bytes:
        array, buffers = self.iovecs(*sizes)
        errno = self.call("fd_read", fd, array, len(sizes), RESULT)
        assert errno == Errno.SUCCESS, Errno(errno)
        remaining = self.u32(RESULT)
        out = b""
        for ptr, size in buffers:
            take = min(size, remaining)
            out += bytes(self.memory[ptr : ptr + take])
            remaining -= take
        return out

    def path_call(self, name: str, path: str | bytes, *rest: int, at: int = PREOPEN) -> int:
        """Call a ``path_*`` function of shape (fd, path, path_len, *rest)."""
        ptr, length = self.put(path)
        return self.call(name, at, ptr, length, *rest)

    def stat(self, path: str, *, follow: bool = True) -> FileStat:
        ptr, length = self.put(path)
        errno = self.call("path_filestat_get", PREOPEN, int(follow), ptr, length, RESULT)
        assert errno == Errno.SUCCESS, Errno(errno)
        return FileStat(*FILESTAT.unpack_from(self.memory, RESULT))

    def fstat(self, fd: int) -> FileStat:
        errno = self.call("fd_filestat_get", fd, RESULT)
        assert errno == Errno.SUCCESS, Errno(errno)
        return FileStat(*FILESTAT.unpack_from(self.memory, RESULT))

    def symlink(self, target: str, path: str) -> int:
        target_ptr, target_len = self.put(target)
        path_ptr, path_len = self.put(path)
        return self.call("path_symlink", target_ptr, target_len, PREOPEN, path_ptr, path_len)

    def rename(self, old: str, new: str) -> int:
        old_ptr, old_len = self.put(old)
        new_ptr, new_len = self.put(new)
        return self.call("path_rename", PREOPEN, old_ptr, old_len, PREOPEN, new_ptr, new_len)

    def readdir_names(self, fd: int, buffer_size: int = 128) -> list[str]:
        """Every name, reading with a small buffer and resuming from the last whole entry."""
        names: list[str] = []
        cookie = 0
        buf = self.alloc(buffer_size)
        while True:
            errno = self.call("fd_readdir", fd, buf, buffer_size, cookie, RESULT)
            assert errno == Errno.SUCCESS, Errno(errno)
            used = self.u32(RESULT)
            offset = 0
            progressed = False
            while offset + 24 <= used:
                d_next, _ino, namlen, _type = struct.unpack_from("<QQIB", self.memory, buf + offset)
                if offset + 24 + namlen > used:
                    break  # truncated: resume from here with the last complete cookie
                names.append(bytes(self.memory[buf + offset + 24 : buf + offset + 24 + namlen]).decode())
                cookie = d_next
                offset += 24 + namlen
                progressed = True
            if used < buffer_size:
                return names
            assert progressed, "buffer too small for one entry"


@contextmanager
def closing(harness: GuestHarness) -> Iterator[GuestHarness]:
    try:
        yield harness
    finally:
        harness.guest.close()
