"""poll_oneoff (clocks, fd readiness, timeouts through the Waiter) and the sock_* calls over
real sockets on loopback."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from wasi_harness import PREOPEN, RESULT, GuestHarness, closing

from wasi_host import Errno, Guest
from wasi_host._abi import EVENT, EVENT_FD_READWRITE_HANGUP, Clockid, Eventtype, Fdflags
from wasi_host.memfs import MemoryFilesystem
from wasi_host.streams import MemoryStream, OsSocket, OsStream

SOCKET_FD = 4  # after stdio and the pre-opened directory


def subscriptions(harness: GuestHarness, *subs: tuple[int, int, bytes]) -> int:
    """Lay out (userdata, tag, payload) subscriptions; returns the array pointer."""
    array = harness.alloc(48 * len(subs))
    harness.memory[array : array + 48 * len(subs)] = bytes(48 * len(subs))
    for index, (userdata, tag, payload) in enumerate(subs):
        struct.pack_into("<QB", harness.memory, array + 48 * index, userdata, tag)
        harness.memory[array + 48 * index + 16 : array + 48 * index + 16 + len(payload)] = payload
    return array


def clock(clock_id: int, timeout_ns: int, absolute: bool = False) -> bytes:
    return struct.pack("<I4xQQH", clock_id, timeout_ns, 0, int(absolute))


def fd_payload(fd: int) -> bytes:
    return struct.pack("<I", fd)


def poll(harness: GuestHarness, *subs: tuple[int, int, bytes]) -> list[tuple[int, int, int, int, int]]:
    array = subscriptions(harness, *subs)
    events = harness.alloc(32 * len(subs))
    errno = harness.call("poll_oneoff", array, events, len(subs), RESULT)
    assert errno == 0, Errno(errno)
    return [EVENT.unpack_from(harness.memory, events + 32 * index) for index in range(harness.u32(RESULT))]


@pytest.fixture
def harness() -> Iterator[GuestHarness]:
    with closing(GuestHarness(MemoryFilesystem().root(), stdin=b"ready")) as guest:
        yield guest


def test_relative_clock_timeout_returns_after_the_timeout(harness: GuestHarness) -> None:
    start = time.monotonic()
    events = poll(harness, (7, Eventtype.CLOCK, clock(Clockid.MONOTONIC, 50_000_000)))
    assert time.monotonic() - start >= 0.05
    assert events == [(7, 0, Eventtype.CLOCK, 0, 0)]


def test_absolute_clocks_in_the_past_fire_at_once(harness: GuestHarness) -> None:
    events = poll(
        harness,
        (1, Eventtype.CLOCK, clock(Clockid.MONOTONIC, 0, absolute=True)),
        (2, Eventtype.CLOCK, clock(Clockid.REALTIME, 1, absolute=True)),
        (3, Eventtype.CLOCK, clock(Clockid.REALTIME, 10**18)),  # far future: not reported
    )
    assert [event[0] for event in events] == [1, 2]


def test_ready_fds_are_reported_without_waiting_for_the_clock(harness: GuestHarness) -> None:
    fd = harness.open("file", 1)
    start = time.monotonic()
    events = poll(
        harness,
        (1, Eventtype.FD_READ, fd_payload(0)),
        (2, Eventtype.FD_WRITE, fd_payload(1)),
        (3, Eventtype.FD_READ, fd_payload(fd)),
        (4, Eventtype.CLOCK, clock(Clockid.MONOTONIC, 10_000_000_000)),
    )
    assert time.monotonic() - start < 5
    assert [(userdata, tag) for userdata, _, tag, _, _ in events] == [
        (1, Eventtype.FD_READ), (2, Eventtype.FD_WRITE), (3, Eventtype.FD_READ),
    ]
    assert events[0][3] == len(b"ready")
    assert events[2][4] == EVENT_FD_READWRITE_HANGUP  # an empty file is at its end


def test_poll_errors(harness: GuestHarness) -> None:
    events = harness.alloc(64)
    assert harness.call("poll_oneoff", subscriptions(harness, (1, 0, b"")), events, 0, RESULT) == Errno.INVAL
    bad_fd = subscriptions(harness, (1, Eventtype.FD_READ, fd_payload(99)))
    assert harness.call("poll_oneoff", bad_fd, events, 1, RESULT) == Errno.BADF
    for tag in (Eventtype.FD_READ, Eventtype.FD_WRITE):  # not pollable: the kind is checked first
        directory = subscriptions(harness, (1, tag, fd_payload(PREOPEN)))
        assert harness.call("poll_oneoff", directory, events, 1, RESULT) == Errno.BADF
    cpu_clock = subscriptions(harness, (1, Eventtype.CLOCK, clock(Clockid.PROCESS_CPUTIME_ID, 1)))
    assert harness.call("poll_oneoff", cpu_clock, events, 1, RESULT) == Errno.INVAL
    bad_tag = subscriptions(harness, (1, 3, b""))
    assert harness.call("poll_oneoff", bad_tag, events, 1, RESULT) == Errno.INVAL


def test_polling_stdio_in_the_wrong_direction_is_ebadf(harness: GuestHarness) -> None:
    """stdin can only be read and stdout/stderr only written: waiting for the other direction is
    EBADF at once, as wasmtime, instead of a wait that select() may never end (FD_READ on a
    terminal stdout blocked even --timeout)."""
    events = harness.alloc(64)
    for fd, tag in ((0, Eventtype.FD_WRITE), (1, Eventtype.FD_READ), (2, Eventtype.FD_READ)):
        wrong = subscriptions(harness, (1, Eventtype.CLOCK, clock(Clockid.MONOTONIC, 0)), (2, tag, fd_payload(fd)))
        assert harness.call("poll_oneoff", wrong, events, 2, RESULT) == Errno.BADF, (fd, tag)
    right = [(fd, (1, Eventtype.FD_READ if fd == 0 else Eventtype.FD_WRITE, fd_payload(fd))) for fd in (0, 1, 2)]
    assert [event[2] for event in poll(harness, *(sub for _, sub in right))] == [
        Eventtype.FD_READ, Eventtype.FD_WRITE, Eventtype.FD_WRITE]


@pytest.fixture
def tcp_guest() -> Iterator[tuple[GuestHarness, tuple[str, int]]]:
    listener = socket.create_server(("127.0.0.1", 0))
    address = listener.getsockname()
    with closing(GuestHarness(MemoryFilesystem().root(), sockets=(OsSocket(listener),))) as guest:
        yield guest, address


def test_accept_recv_send_shutdown_over_loopback(tcp_guest: tuple[GuestHarness, tuple[str, int]]) -> None:
    harness, address = tcp_guest
    assert harness.call("fd_prestat_get", SOCKET_FD, RESULT) == Errno.BADF  # pre-opens end before sockets
    with socket.create_connection(address) as client:
        assert harness.call("sock_accept", SOCKET_FD, 0, RESULT) == 0
        connection = harness.u32(RESULT)
        assert connection == SOCKET_FD + 1
        client.sendall(b"hello world")
        iovs, [(ptr, _)] = harness.iovecs(5)
        size_ptr, flags_ptr = RESULT, RESULT + 8
        assert harness.call("sock_recv", connection, iovs, 1, 1, size_ptr, flags_ptr) == 0  # PEEK
        assert bytes(harness.memory[ptr : ptr + 5]) == b"hello" and harness.u32(flags_ptr) == 0
        iovs, [(ptr, _)] = harness.iovecs(11)
        assert harness.call("sock_recv", connection, iovs, 1, 2, size_ptr, flags_ptr) == 0  # WAITALL
        assert harness.u32(size_ptr) == 11 and bytes(harness.memory[ptr : ptr + 11]) == b"hello world"
        array, count = harness.ciovecs(b"pong")
        assert harness.call("sock_send", connection, array, count, 0, RESULT) == 0 and harness.u32(RESULT) == 4
        assert client.recv(4) == b"pong"
        assert harness.call("sock_shutdown", connection, 2) == 0
        assert client.recv(10) == b""  # the guest shut down its sending side
        assert harness.call("sock_shutdown", connection, 0) == Errno.INVAL
        assert harness.call("sock_shutdown", 1, 2) == Errno.NOTSOCK
        assert harness.call("sock_recv", 99, iovs, 1, 0, size_ptr, flags_ptr) == Errno.BADF


def test_nonblocking_accept_and_recv_say_again(tcp_guest: tuple[GuestHarness, tuple[str, int]]) -> None:
    harness, address = tcp_guest
    assert harness.call("fd_fdstat_set_flags", SOCKET_FD, Fdflags.NONBLOCK) == 0
    assert harness.call("sock_accept", SOCKET_FD, 0, RESULT) == Errno.AGAIN
    with socket.create_connection(address):
        deadline = time.monotonic() + 5
        while (errno := harness.call("sock_accept", SOCKET_FD, Fdflags.NONBLOCK, RESULT)) == Errno.AGAIN:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert errno == 0
        connection = harness.u32(RESULT)
        iovs, _ = harness.iovecs(8)
        assert harness.call("sock_recv", connection, iovs, 1, 0, RESULT, RESULT + 8) == Errno.AGAIN


def test_poll_wakes_when_a_socket_becomes_readable(tcp_guest: tuple[GuestHarness, tuple[str, int]]) -> None:
    harness, address = tcp_guest
    with socket.create_connection(address) as client:
        assert harness.call("sock_accept", SOCKET_FD, 0, RESULT) == 0
        connection = harness.u32(RESULT)
        timer = threading.Timer(0.05, client.sendall, args=(b"late",))
        timer.start()
        try:
            events = poll(
                harness,
                (1, Eventtype.FD_READ, fd_payload(connection)),
                (2, Eventtype.CLOCK, clock(Clockid.MONOTONIC, 20_000_000_000)),
            )
        finally:
            timer.join()
        assert [event[0] for event in events] == [1]
        # nothing more to read: a short timeout fires instead
        assert harness.read(connection, 10) == b"late"
        events = poll(
            harness,
            (1, Eventtype.FD_READ, fd_payload(connection)),
            (2, Eventtype.CLOCK, clock(Clockid.MONOTONIC, 30_000_000)),
        )
        assert [event[0] for event in events] == [2]


def test_poll_on_a_pipe_stdin_waits_in_select_until_data_arrives() -> None:
    read_end, write_end = os.pipe()
    stdin = OsStream(read_end, owned=True)
    guest = Guest([b"p"], [], [], stdin, MemoryStream(), MemoryStream())
    with closing(GuestHarness.around(guest)) as harness:
        timer = threading.Timer(0.05, os.write, args=(write_end, b"piped"))
        timer.start()
        try:
            start = time.monotonic()
            events = poll(harness, (9, Eventtype.FD_READ, fd_payload(0)))
        finally:
            timer.join()
            os.close(write_end)
        assert time.monotonic() - start >= 0.04
        assert [event[0] for event in events] == [9]
        assert harness.read(0, 10) == b"piped"


def test_a_timeout_of_2_to_the_64_ns_does_not_break_the_waiter() -> None:
    read_end, write_end = os.pipe()
    guest = Guest([b"p"], [], [], OsStream(read_end, owned=True), MemoryStream(), MemoryStream())
    with closing(GuestHarness.around(guest)) as harness:
        timer = threading.Timer(0.05, os.write, args=(write_end, b"x"))
        timer.start()
        try:
            events = poll(
                harness,
                (1, Eventtype.FD_READ, fd_payload(0)),
                (2, Eventtype.CLOCK, clock(Clockid.MONOTONIC, 2**64 - 1)),
            )
        finally:
            timer.join()
            os.close(write_end)
        assert [event[0] for event in events] == [1]
