"""Stdio streams (over an OS fd, or in memory for tests) and a Socket over an OS socket."""

from __future__ import annotations

import os
import select
import socket
import threading

from wasi_host._backend import Buffer, Readiness


class OsStream:
    """A stdio stream over an OS fd (the shim's own 0, 1, 2 by default; not closed unless owned)."""

    def __init__(self, fd: int, *, owned: bool = False) -> None:
        self._fd = fd
        self._owned = owned

    def read(self, size: int) -> bytes:
        return os.read(self._fd, size)

    def write(self, data: Buffer) -> int:
        view = memoryview(data)
        total = len(view)
        while view:
            view = view[os.write(self._fd, view) :]
        return total

    def readiness(self, write: bool) -> Readiness | None:
        readable, writable, _ = select.select([] if write else [self._fd], [self._fd] if write else [], [], 0)
        return Readiness(1) if readable or writable else None

    def fileno(self) -> int | None:
        return self._fd

    def is_terminal(self) -> bool:
        return os.isatty(self._fd)

    def close(self) -> None:
        if self._owned and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1


class MemoryStream:
    """An in-memory stream: reads consume ``input`` (then EOF), writes append to ``output``."""

    def __init__(self, data: bytes = b"") -> None:
        self._input = bytearray(data)
        self.output = bytearray()
        self._lock = threading.Lock()
        self.closed = False

    def read(self, size: int) -> bytes:
        with self._lock:
            chunk = bytes(self._input[:size])
            del self._input[:size]
            return chunk

    def write(self, data: Buffer) -> int:
        with self._lock:
            self.output += data
            return len(data)

    def readiness(self, write: bool) -> Readiness | None:
        return Readiness(1 if write else len(self._input), hangup=not write and not self._input)

    def fileno(self) -> int | None:
        return None

    def is_terminal(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


class OsSocket:
    """A Socket over a connected or listening OS socket (plain TCP or a Unix socket pair)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def accept(self, nonblocking: bool) -> OsSocket:
        self._sock.settimeout(0 if nonblocking else None)
        connection, _ = self._sock.accept()
        connection.settimeout(None)
        return OsSocket(connection)

    def recv(self, size: int, *, peek: bool, waitall: bool, nonblocking: bool) -> bytes:
        flags = (socket.MSG_PEEK if peek else 0) | (socket.MSG_WAITALL if waitall else 0)
        return self._sock.recv(size, flags | (socket.MSG_DONTWAIT if nonblocking else 0))

    def send(self, data: Buffer, *, nonblocking: bool) -> int:
        return self._sock.send(data, socket.MSG_DONTWAIT if nonblocking else 0)

    def shutdown(self, read: bool, write: bool) -> None:
        self._sock.shutdown(socket.SHUT_RDWR if read and write else socket.SHUT_RD if read else socket.SHUT_WR)

    def readiness(self, write: bool) -> Readiness | None:
        fd = self._sock.fileno()
        readable, writable, _ = select.select([] if write else [fd], [fd] if write else [], [], 0)
        return Readiness(1) if readable or writable else None

    def fileno(self) -> int | None:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()
