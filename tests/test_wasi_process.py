"""args/environ, clocks, randomness, process calls, stdio, and EFAULT on every kind of bad pointer."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from wasi_harness import BACKENDS, MEMORY_SIZE, PREOPEN, RESULT, GuestHarness, closing

from wasi_host import FUNCTIONS, Errno, Guest, ProcExit, errno_for_exception
from wasi_host._abi import FDSTAT, Clockid, Filetype
from wasi_host.memfs import MemoryFilesystem
from wasi_host.streams import MemoryStream


@pytest.fixture
def harness() -> Iterator[GuestHarness]:
    with closing(GuestHarness(MemoryFilesystem().root(), stdin=b"typed input")) as guest:
        yield guest


def read_string_list(harness: GuestHarness, sizes: str, get: str) -> list[bytes]:
    assert harness.call(sizes, RESULT, RESULT + 4) == 0
    count, size = harness.u32(RESULT), harness.u32(RESULT + 4)
    pointers, buffer = harness.alloc(4 * count), harness.alloc(size)
    assert harness.call(get, pointers, buffer) == 0
    assert bytes(harness.memory[buffer + size - 1 : buffer + size]) == b"\0"
    items = []
    for index in range(count):
        start = harness.u32(pointers + 4 * index)
        end = bytes(harness.memory[start:]).index(b"\0")
        items.append(bytes(harness.memory[start : start + end]))
    return items


def test_args_and_environment(harness: GuestHarness) -> None:
    assert read_string_list(harness, "args_sizes_get", "args_get") == [b"prog", b"first arg"]
    assert read_string_list(harness, "environ_sizes_get", "environ_get") == [b"HOME=/sandbox", b"EMPTY="]


def test_guest_refuses_nul_in_arguments() -> None:
    with pytest.raises(ValueError, match="NUL"):
        Guest([b"a\0b"], [], [], MemoryStream(), MemoryStream(), MemoryStream())


@pytest.mark.parametrize("clock", [Clockid.REALTIME, Clockid.MONOTONIC, Clockid.PROCESS_CPUTIME_ID, Clockid.THREAD_CPUTIME_ID])
def test_clocks_advance(harness: GuestHarness, clock: int) -> None:
    assert harness.call("clock_res_get", clock, RESULT) == 0 and harness.u64(RESULT) > 0
    assert harness.call("clock_time_get", clock, 0, RESULT) == 0
    first = harness.u64(RESULT)
    sum(range(200_000))  # burn some CPU so the CPU-time clocks move too
    assert harness.call("clock_time_get", clock, 0, RESULT + 8) == 0
    assert harness.u64(RESULT + 8) > first


def test_unknown_clock_is_einval(harness: GuestHarness) -> None:
    assert harness.call("clock_time_get", 4, 0, RESULT) == Errno.INVAL
    assert harness.call("clock_res_get", 2**32 - 1, RESULT) == Errno.INVAL


def test_random_get_fills_the_buffer(harness: GuestHarness) -> None:
    buf = harness.alloc(64)
    assert harness.call("random_get", buf, 64) == 0
    assert bytes(harness.memory[buf : buf + 64]) != bytes(64)
    assert harness.call("random_get", MEMORY_SIZE - 8, 16) == Errno.FAULT


def test_proc_exit_records_the_code_on_the_guest(harness: GuestHarness) -> None:
    with pytest.raises(ProcExit) as raised:
        harness.call("proc_exit", 42)
    assert raised.value.code == 42 and harness.guest.exit_code == 42


def test_proc_raise_and_sched_yield(harness: GuestHarness) -> None:
    assert harness.call("proc_raise", 15) == Errno.NOTSUP  # as wasmtime
    assert harness.call("proc_raise", 31) == Errno.INVAL
    assert harness.call("sched_yield") == 0


def test_stdio(harness: GuestHarness) -> None:
    assert harness.write(1, b"out ", b"put") == 7
    assert harness.write(2, b"err") == 3
    assert bytes(harness.stdout.output) == b"out put" and bytes(harness.stderr.output) == b"err"
    assert harness.read(0, 5, 3) == b"typed in"
    assert harness.read(0, 100) == b"put"
    assert harness.read(0, 100) == b""
    array, count = harness.ciovecs(b"x")
    assert harness.call("fd_write", 0, array, count, RESULT) == Errno.BADF
    assert harness.call("fd_seek", 1, 0, 0, RESULT) == Errno.SPIPE
    assert harness.call("fd_tell", 0, RESULT) == Errno.SPIPE
    assert harness.call("fd_fdstat_get", 1, RESULT) == 0
    assert FDSTAT.unpack_from(harness.memory, RESULT)[0] == Filetype.UNKNOWN  # not a terminal
    assert harness.fstat(1).filetype == Filetype.UNKNOWN and harness.fstat(1).size == 0
    assert harness.call("fd_close", 1) == 0 and harness.stdout.closed
    assert harness.call("fd_write", 1, array, count, RESULT) == Errno.BADF


# --- bad pointers --------------------------------------------------------------------------------


def test_bad_iovec_pointers_are_efault(harness: GuestHarness) -> None:
    fd = harness.open("f", 1)
    assert harness.call("fd_write", fd, MEMORY_SIZE - 4, 1, RESULT) == Errno.FAULT  # array past the end
    assert harness.call("fd_write", fd, 2**32 - 4, 1, RESULT) == Errno.FAULT  # near 2**32
    array = harness.alloc(8)
    struct.pack_into("<II", harness.memory, array, MEMORY_SIZE - 2, 4)  # buffer crosses the end
    assert harness.call("fd_write", fd, array, 1, RESULT) == Errno.FAULT
    struct.pack_into("<II", harness.memory, array, 2**32 - 2, 4)  # ptr + len overflows 32 bits
    assert harness.call("fd_write", fd, array, 1, RESULT) == Errno.FAULT
    assert harness.call("fd_read", fd, array, 1, RESULT) == Errno.FAULT
    assert harness.call("fd_write", fd, array, 2**32 - 1, RESULT) == Errno.FAULT  # huge count
    good, count = harness.ciovecs(b"abc")
    assert harness.call("fd_write", fd, good, count, MEMORY_SIZE - 2) == Errno.FAULT  # result slot
    assert harness.call("fd_write", fd, good, count, 2**32 - 1) == Errno.FAULT
    assert harness.fstat(fd).size == 6  # both writes happened; only their results could not be stored


def test_bad_path_and_result_pointers_are_efault(harness: GuestHarness) -> None:
    assert harness.call("path_open", PREOPEN, 0, MEMORY_SIZE - 2, 4, 0, 0, 0, 0, RESULT) == Errno.FAULT
    assert harness.call("path_create_directory", PREOPEN, 2**32 - 1, 2) == Errno.FAULT
    assert harness.call("fd_fdstat_get", 1, MEMORY_SIZE - 8) == Errno.FAULT
    assert harness.call("fd_readdir", PREOPEN, MEMORY_SIZE - 8, 64, 0, RESULT) == Errno.FAULT
    assert harness.call("args_get", MEMORY_SIZE - 2, RESULT) == Errno.FAULT
    assert harness.call("poll_oneoff", 2**32 - 16, RESULT, 1, RESULT) == Errno.FAULT
    assert harness.call("clock_time_get", 0, 0, 2**32 - 4) == Errno.FAULT


def test_a_module_without_memory_gets_efault_for_pointers_only() -> None:
    guest = Guest([b"p"], [], [], MemoryStream(), MemoryStream(), MemoryStream())

    def call(name: str, *args: int) -> int | None:
        try:
            return FUNCTIONS[name].impl(guest, None, *args)
        except Exception as exc:
            return errno_for_exception(exc)

    assert call("args_sizes_get", 0, 4) == Errno.FAULT
    assert call("fd_write", 1, 0, 1, 0) == Errno.FAULT
    assert call("fd_close", 2) == 0
    assert call("sched_yield") == 0


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_random_arguments_never_raise_anything_but_an_errno(backend: str, tmp_path: Path) -> None:
    """Every function, fed random ints and random memory, returns an errno or ProcExit."""
    rng = random.Random(1234)
    edges = [0, 1, 3, 4, 8, 64, MEMORY_SIZE - 1, MEMORY_SIZE, 2**31, 2**32 - 1]
    rounds = 40 if backend == "memfs" else 8  # a fresh tree per round; memfs ones are cheap
    for round_number in range(rounds):
        clock = FakeClock()
        work = tmp_path / str(round_number)
        work.mkdir()
        with closing(GuestHarness(BACKENDS[backend](work))) as harness:
            harness.guest.clock = clock
            harness.guest.waiter = clock
            harness.memory[:] = rng.randbytes(MEMORY_SIZE)
            for name, function in sorted(FUNCTIONS.items()):
                for _ in range(5):
                    args = []
                    for param in function.params:
                        top = 2**64 - 1 if param == "i64" else 2**32 - 1
                        args.append(rng.choice([*edges, rng.randint(0, top), rng.randint(0, 16)]))
                    try:
                        result = function.impl(harness.guest, harness.memory, *args)
                    except ProcExit:
                        assert name == "proc_exit"
                        continue
                    except Exception as exc:
                        assert errno_for_exception(exc) is not None, (round_number, name, args, exc)
                        continue
                    assert 0 <= result <= Errno.NOTCAPABLE, (name, args)


class FakeClock:
    """A clock whose sleeps return at once by moving time forward (also used as the Waiter)."""

    def __init__(self) -> None:
        self.now = 1_000_000_000

    def realtime_ns(self) -> int:
        return self.now

    def monotonic_ns(self) -> int:
        return self.now

    def process_cputime_ns(self) -> int:
        return self.now

    def thread_cputime_ns(self) -> int:
        return self.now

    def sleep_until(self, monotonic_deadline_ns: int) -> None:
        self.now = max(self.now, monotonic_deadline_ns)

    def wait(self, interests: object, deadline_ns: int | None) -> None:
        self.now = max(self.now + 1, deadline_ns or 0)


def test_overlapping_iovecs_move_at_most_the_memory_size(harness: GuestHarness) -> None:
    fd = harness.open("f", 1)
    count = 1024  # IOV_MAX: more is EINVAL (test_wasi_review7.py)
    array = harness.alloc(8 * count)
    for index in range(count):  # every iovec covers the whole memory
        struct.pack_into("<II", harness.memory, array + 8 * index, 0, MEMORY_SIZE)
    assert harness.call("fd_write", fd, array, count, RESULT) == 0
    assert harness.u32(RESULT) == MEMORY_SIZE  # a short write, not a 256 MiB allocation
    assert harness.call("fd_pread", fd, array, count, 0, RESULT) == 0
    assert harness.u32(RESULT) == MEMORY_SIZE
