"""The per-guest context: arguments, environment, fd table, clocks, randomness, exit status.

One Guest per running instance; every host function receives it first.  The exit code of
``proc_exit`` and any host error are recorded here (never in a global: wasmtime-py's exception
slot is process-wide and races between guest threads).

fd layout: 0, 1, 2 are stdio, then the pre-opened directories, then the pre-opened sockets
(wasi-libc stops scanning for pre-opens at the first fd that is not a directory).

Stopping a guest that waits: the runner stops wasm code by bumping the engine's epoch, which a
guest asleep in poll_oneoff or blocked reading stdin never meets. A Guest built with a
`StopSignal` therefore also waits for that signal wherever it can block for long: the default
waiter's sleeps and select() calls (another waiter is checked before and after each wait), and
reads of a stdin and writes to a stdout or stderr that have an OS fd (a pipe nobody reads). When
the signal is set, the wait raises `GuestStopped`, which the binding turns into a trap (the
runner reports it as the interrupt it is). Without a signal nothing changes, so an unstoppable
run pays nothing.
"""

from __future__ import annotations

import os
import select
import stat
import threading
import time
from collections.abc import Callable, Sequence

from wasi_host._abi import Rights
from wasi_host._backend import Buffer, Clock, Directory, Pollable, Readiness, Socket, Stream, Waiter
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


class GuestStopped(Exception):
    """Raised inside a host call that was waiting when the guest's StopSignal was set.

    Not an errno: the binding records it as the host error and traps the guest, so the guest
    never runs on after it (returning ECANCELED instead would let a guest that ignores the error
    and returns from `_start` end with exit status 0)."""

    def __init__(self) -> None:
        super().__init__("the run stopped the guest while it was waiting")


class StopSignal:
    """Set once, from any thread, to end every wait of one guest's host calls.

    Sleeps wait on a threading.Event; select() calls also watch the read end of a pipe that
    `set()` writes a byte to. The pipe is made on the first `fileno()`, so a guest that never
    waits on an fd opens none. `set()` may be called again (the runner keeps ticking) and after
    `close()`."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._pipe: tuple[int, int] | None = None

    def set(self) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            if self._pipe is not None:
                os.write(self._pipe[1], b"\0")

    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise GuestStopped if the signal is set."""
        if self._event.is_set():
            raise GuestStopped

    def sleep(self, seconds: float) -> None:
        """Sleep `seconds`, or raise GuestStopped as soon as the signal is set."""
        if self._event.wait(seconds):
            raise GuestStopped

    def fileno(self) -> int:
        """An fd that select() sees readable once the signal is set."""
        with self._lock:
            if self._pipe is None:
                self._pipe = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
                if self._event.is_set():
                    os.write(self._pipe[1], b"\0")
            return self._pipe[0]

    def close(self) -> None:
        """Close the pipe (the signal itself keeps working for sleeps and `is_set`)."""
        with self._lock:
            if self._pipe is not None:
                for fd in self._pipe:
                    os.close(fd)
                self._pipe = None


class ThreadWaiter:
    """The default Waiter: blocks the calling thread in select() on OS fds, or sleeps.

    Pollables without an OS fd are re-checked every 10 ms.  With a StopSignal, select() watches
    its fd too and sleeps wait on it, so setting it ends any wait with GuestStopped (the clock's
    `sleep_until` is used only without one: a stoppable sleep needs the real clock).  The shim
    replaces this with a trio-aware waiter for sockets.
    """

    def __init__(self, clock: Clock, stop: StopSignal | None = None) -> None:
        self._clock = clock
        self._stop = stop

    def _sleep_until(self, deadline_ns: int) -> None:
        stop = self._stop
        if stop is None:
            self._clock.sleep_until(deadline_ns)
            return
        remaining = deadline_ns - self._clock.monotonic_ns()
        while remaining > 0:
            stop.sleep(min(remaining / 1e9, _LONGEST_SLEEP_S))
            remaining = deadline_ns - self._clock.monotonic_ns()

    def wait(self, interests: Sequence[tuple[Pollable, bool]], deadline_ns: int | None) -> None:
        stop = self._stop
        if stop is not None:
            stop.check()
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
                self._sleep_until(deadline_ns)
            return
        timeout: float | None = None
        if deadline_ns is not None:
            timeout = min(max(0, deadline_ns - self._clock.monotonic_ns()) / 1e9, _LONGEST_SLEEP_S)
        if unselectable:
            timeout = _POLL_SLICE_S if timeout is None else min(timeout, _POLL_SLICE_S)
        if readers or writers:
            if stop is None:
                select.select(readers, writers, [], timeout)
                return
            select.select([*readers, stop.fileno()], writers, [], timeout)
            stop.check()
        elif timeout:
            if stop is None:
                time.sleep(timeout)
            else:
                stop.sleep(timeout)


class _StoppableWaiter:
    """Another Waiter (the shim's socket waiter) with the StopSignal checked around each wait:
    such a waiter wakes when its own machinery is stopped, after which the guest must not go on
    waiting (or spin in poll_oneoff until its own deadline)."""

    def __init__(self, waiter: Waiter, stop: StopSignal) -> None:
        self._waiter = waiter
        self._stop = stop

    def wait(self, interests: Sequence[tuple[Pollable, bool]], deadline_ns: int | None) -> None:
        self._stop.check()
        self._waiter.wait(interests, deadline_ns)
        self._stop.check()


class _StoppableStream:
    """A Stream whose reads first wait until its fd is readable or the StopSignal is set
    (then GuestStopped): os.read on a silent pipe or terminal would block past any stop.
    Writes to an fd that can block (not a regular file) likewise wait until it is writable, and
    move at most PIPE_BUF bytes at a time, which a pipe that select() calls writable takes
    without blocking: `keep run --timeout 2 app | reader-that-stopped` otherwise never ended.
    A stream without an OS fd never blocks and is used directly."""

    def __init__(self, stream: Stream, stop: StopSignal) -> None:
        self._stream = stream
        self._stop = stop
        fileno = stream.fileno()
        self._blocking_writes = fileno is not None and _may_block(fileno)

    def read(self, size: int) -> bytes:
        fileno = self._stream.fileno()
        if fileno is not None:
            select.select([fileno, self._stop.fileno()], [], [])
            self._stop.check()
        return self._stream.read(size)

    def write(self, data: Buffer) -> int:
        fileno = self._stream.fileno()
        if fileno is None or not self._blocking_writes:
            return self._stream.write(data)
        view = memoryview(data)
        total = len(view)
        while view:
            select.select([self._stop.fileno()], [fileno], [])
            self._stop.check()
            view = view[self._stream.write(view[:select.PIPE_BUF]):]
        return total

    def readiness(self, write: bool) -> Readiness | None:
        return self._stream.readiness(write)

    def fileno(self) -> int | None:
        return self._stream.fileno()

    def is_terminal(self) -> bool:
        return self._stream.is_terminal()

    def close(self) -> None:
        self._stream.close()


def _may_block(fileno: int) -> bool:
    """Whether writing to `fileno` can wait for someone else (a pipe, socket or terminal; not
    a regular file, a block device or /dev/null, nor an fd that cannot be examined)."""
    try:
        status = os.fstat(fileno)
        if stat.S_ISCHR(status.st_mode) and os.path.samestat(status, os.stat(os.devnull)):
            return False
    except OSError:
        return False
    return not (stat.S_ISREG(status.st_mode) or stat.S_ISBLK(status.st_mode))


class Guest:
    """Everything one guest instance's host calls share.

    `stop`, when given, is the signal the runner sets to stop this guest: the default waiter
    and reads of stdin then wait for it too (see the module docstring). The Guest does not own
    it (the runner closes it)."""

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
        stop: StopSignal | None = None,
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
        self.waiter: Waiter = (ThreadWaiter(self.clock, stop) if waiter is None
                               else waiter if stop is None else _StoppableWaiter(waiter, stop))
        self.stop_signal = stop
        if stop is not None:
            stdin, stdout, stderr = (_StoppableStream(stream, stop)
                                     for stream in (stdin, stdout, stderr))
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
