"""The per-guest context: arguments, environment, fd table, clocks, randomness, exit status.

One Guest per running instance; every host function receives it first.  The exit code of
``proc_exit`` and any host error are recorded here (never in a global: wasmtime-py's exception
slot is process-wide and races between guest threads).

fd layout: 0, 1, 2 are stdio, then the pre-opened directories, then the pre-opened sockets
(wasi-libc stops scanning for pre-opens at the first fd that is not a directory).
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable, Sequence

from wasi_host._abi import Rights
from wasi_host._backend import Clock, Directory, Pollable, Socket, Stream, Waiter
from wasi_host._fdtable import FdTable, OpenDirectory, OpenSocket, OpenStream

_STDIN_RIGHTS = Rights.FD_READ | Rights.FD_FILESTAT_GET | Rights.POLL_FD_READWRITE
_STDOUT_RIGHTS = Rights.FD_WRITE | Rights.FD_FILESTAT_GET | Rights.POLL_FD_READWRITE
_POLL_SLICE_S = 0.01  # how often the default waiter re-checks pollables it cannot select() on
# The longest single sleep or select(): a guest may ask for 2**64-1 ns, which time.sleep and
# select() refuse (OverflowError); waking once a day and sleeping again changes nothing else.
_LONGEST_SLEEP_S = 86_400.0


class SystemClock:
    """The host's clocks."""

    def realtime_ns(self) -> int:
        return time.time_ns()

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()

    def process_cputime_ns(self) -> int:
        return time.process_time_ns()

    def thread_cputime_ns(self) -> int:
        return time.thread_time_ns()

    def sleep_until(self, monotonic_deadline_ns: int) -> None:
        remaining = monotonic_deadline_ns - time.monotonic_ns()
        while remaining > 0:
            time.sleep(min(remaining / 1e9, _LONGEST_SLEEP_S))
            remaining = monotonic_deadline_ns - time.monotonic_ns()


class ThreadWaiter:
    """The default Waiter: blocks the calling thread in select() on OS fds, or sleeps.

    Pollables without an OS fd are re-checked every 10 ms.  The shim replaces this with a
    trio-aware waiter for sockets.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def wait(self, interests: Sequence[tuple[Pollable, bool]], deadline_ns: int | None) -> None:
        readers: list[int] = []
        writers: list[int] = []
        unselectable = False
        for pollable, write in interests:
            fileno = pollable.fileno()
            if fileno is None:
                unselectable = True
            else:
                (writers if write else readers).append(fileno)
        if not readers and not writers and not unselectable:
            if deadline_ns is not None:
                self._clock.sleep_until(deadline_ns)
            return
        timeout: float | None = None
        if deadline_ns is not None:
            timeout = min(max(0, deadline_ns - self._clock.monotonic_ns()) / 1e9, _LONGEST_SLEEP_S)
        if unselectable:
            timeout = _POLL_SLICE_S if timeout is None else min(timeout, _POLL_SLICE_S)
        if readers or writers:
            select.select(readers, writers, [], timeout)
        elif timeout:
            time.sleep(timeout)


class Guest:
    """Everything one guest instance's host calls share."""

    def __init__(
        self,
        args: Sequence[bytes],
        env: Sequence[tuple[bytes, bytes]],
        preopens: Sequence[tuple[str, Directory]],
        stdin: Stream,
        stdout: Stream,
        stderr: Stream,
        sockets: Sequence[Socket] = (),
        waiter: Waiter | None = None,
        *,
        clock: Clock | None = None,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        for value in [*args, *(name for name, _ in env), *(value for _, value in env)]:
            if b"\0" in value:
                raise ValueError("arguments and environment must not contain NUL bytes")
        for name, _ in env:
            if b"=" in name or not name:
                raise ValueError(f"bad environment variable name {name!r}")
        self.args: tuple[bytes, ...] = tuple(bytes(arg) for arg in args)
        self.env: tuple[bytes, ...] = tuple(bytes(name) + b"=" + bytes(value) for name, value in env)
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.waiter: Waiter = waiter if waiter is not None else ThreadWaiter(self.clock)
        self.random = random
        self.exit_code: int | None = None
        self.host_error: BaseException | None = None
        self.fds = FdTable()
        self.fds.add(OpenStream(stdin, _STDIN_RIGHTS))
        self.fds.add(OpenStream(stdout, _STDOUT_RIGHTS))
        self.fds.add(OpenStream(stderr, _STDOUT_RIGHTS))
        for guest_path, directory in preopens:
            encoded = guest_path.encode("utf-8", "surrogateescape")
            self.fds.add(OpenDirectory(directory, Rights.DIRECTORY_BASE, Rights.DIRECTORY_INHERITING, encoded))
        for socket in sockets:
            self.fds.add(OpenSocket(socket))

    def close(self) -> None:
        """Close every fd still open (stdio streams, directories, files, sockets)."""
        self.fds.close_all()
