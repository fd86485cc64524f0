"""Python cost of one fd_write host function, without wasm: wasi_host's share of a host call.

Calls ``FUNCTIONS["fd_write"].impl`` directly with a bytearray-backed memoryview, one 16-byte
ciovec, on three files: a backend that discards the data (only wasi_host's own work remains), the
in-memory backend, and a host file (one pwrite syscall each). Prints the best of several runs in
µs per call next to an empty Python call with the same arguments (the floor), and asserts nothing.
The design budget: well under 2 µs of Python per call (the binding adds ~6 µs of ctypes).

usage: python bench/bench_wasi_impl.py [CALLS]
"""

from __future__ import annotations

import struct
import sys
import tempfile
import timeit
from collections.abc import Callable

from wasi_host import FUNCTIONS, Directory, Guest, Rights
from wasi_host._backend import Buffer
from wasi_host._fdtable import OpenFile
from wasi_host.hostdir import HostDirectory
from wasi_host.memfs import MemoryFilesystem
from wasi_host.streams import MemoryStream

PATH, IOVEC, DATA, RESULT, OUT_FD = 1000, 100, 3000, 200, 2000


class DiscardingFile:
    """A File whose pwrite does nothing: what remains is wasi_host's own cost."""

    def pwrite(self, data: Buffer, offset: int) -> int:
        return len(data)

    def close(self) -> None:
        """Nothing to release."""


def open_file(root: Directory, memory: memoryview) -> tuple[Guest, int]:
    guest = Guest([b"bench"], [], [("/", root)], MemoryStream(), MemoryStream(), MemoryStream())
    errno = FUNCTIONS["path_open"].impl(guest, memory, 3, 0, PATH, 9, 1, Rights.ALL, Rights.ALL, 0, OUT_FD)
    assert errno == 0
    return guest, struct.unpack_from("<I", memory, OUT_FD)[0]


def best_microseconds(call: Callable[[], object], calls: int) -> float:
    return min(timeit.repeat(call, number=calls, repeat=7)) / calls * 1e6


def main(calls: int) -> None:
    memory = memoryview(bytearray(1 << 16))
    memory[PATH : PATH + 9] = b"bench.out"
    memory[DATA : DATA + 16] = b"0123456789abcdef"
    struct.pack_into("<II", memory, IOVEC, DATA, 16)
    fd_write = FUNCTIONS["fd_write"].impl

    def empty(guest: Guest, memory: memoryview, fd: int, iovs: int, count: int, result: int) -> int:
        return 0

    with tempfile.TemporaryDirectory() as host_directory:
        backends: list[tuple[str, Directory]] = [
            ("discarding backend", MemoryFilesystem().root()),
            ("memfs", MemoryFilesystem().root()),
            ("hostdir (1 pwrite syscall)", HostDirectory.open(host_directory)),
        ]
        guest, fd = open_file(backends[0][1], memory)
        floor = best_microseconds(lambda: empty(guest, memory, fd, IOVEC, 1, RESULT), calls)
        print(f"fd_write impl, 16-byte ciovec, best of 7 x {calls:,} calls")
        print(f"{'empty Python call (floor)':30} {floor:6.2f} µs")
        for label, root in backends:
            guest, fd = open_file(root, memory)
            entry = guest.fds.entries[fd]
            if label.startswith("discarding"):
                assert isinstance(entry, OpenFile)
                entry.file = DiscardingFile()  # type: ignore[assignment]
            cost = best_microseconds(lambda: fd_write(guest, memory, fd, IOVEC, 1, RESULT), calls)  # noqa: B023
            print(f"{label:30} {cost:6.2f} µs   ({cost - floor:5.2f} µs above the floor)")
            guest.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
