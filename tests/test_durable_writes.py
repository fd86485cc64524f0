"""BlockDevice.write_durable / prepare_durable: the direct-write durability point of small commits.

The file device writes through a second, O_DIRECT descriptor when the range is aligned; these tests
check what callers rely on whatever path is taken: the bytes land where asked, buffered reads of
the same device see them at once (the log is read back buffered by recovery), earlier buffered
writes are not lost, and the fallbacks (unaligned ranges, a medium refusing direct I/O) behave
the same. Durability itself needs a power cut: tests/test_crash_power.py models that.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from storage.blockdev import FileBlockDevice, MemoryBlockDevice
from storage.errors import NoSpace

SIZE = 4 << 20


def _image(tmp_path: Path) -> Path:
    return tmp_path / "img"


def test_aligned_durable_writes_are_read_back_buffered_and_after_reopen(tmp_path: Path) -> None:
    path = _image(tmp_path)
    first, second = os.urandom(8192), os.urandom(4096)
    with FileBlockDevice(path, writable=True, create_size=SIZE) as device:
        device.write(1 << 20, b"\xaa" * 4096)  # buffered, cached by the kernel
        assert device.read(1 << 20, 4096) == b"\xaa" * 4096
        device.write_durable(1 << 20, first)  # direct, over the cached page
        assert device.read(1 << 20, 8192) == first  # no stale page-cache copy
        device.write_durable(1 << 20, bytearray(second))
        assert device.read(1 << 20, 8192) == second + first[4096:]
    with FileBlockDevice(path, writable=False) as device:
        assert device.read(1 << 20, 8192) == second + first[4096:]


def test_earlier_buffered_writes_survive_a_durable_write(tmp_path: Path) -> None:
    """A buffered write not yet synced, then a durable write elsewhere: both are in the image
    (write_durable then syncs the file, not just its own range)."""
    path = _image(tmp_path)
    earlier = os.urandom(4096 * 3)
    record = os.urandom(4096)
    with FileBlockDevice(path, writable=True, create_size=SIZE) as device:
        device.write(12288, earlier)
        device.write_durable(65536, memoryview(record))
    with FileBlockDevice(path, writable=False) as device:
        assert device.read(12288, len(earlier)) == earlier
        assert device.read(65536, 4096) == record


def test_a_durable_write_syncs_the_file_exactly_when_a_buffered_write_is_pending(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The page cache would serve the reads above even without any sync, so count them: after
    a buffered write, write_durable must fdatasync the file; right after a sync it needs no
    fdatasync when the direct path (RWF_DSYNC) took the write, and one when it could not."""
    real_fdatasync = os.fdatasync
    calls: list[int] = []

    def counting_fdatasync(fd: int) -> None:
        calls.append(fd)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", counting_fdatasync)
    with FileBlockDevice(_image(tmp_path), writable=True, create_size=SIZE) as device:
        device.prepare_durable(0, SIZE)
        device.sync()
        device.write(12288, os.urandom(4096))
        calls.clear()
        device.write_durable(65536, os.urandom(4096))
        assert len(calls) == 1  # the pending buffered write made durable too
        calls.clear()
        device.write_durable(69632, os.urandom(4096))
        direct = device._direct_fd is not None
        assert len(calls) == (0 if direct else 1)
        calls.clear()
        device.write_durable(73728, os.urandom(4096))
        assert len(calls) == (0 if direct else 1)  # nothing left pending by the write before


def test_a_write_made_while_a_sync_runs_is_still_pending_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sync may run on another thread (integrity flushes start one and go on): a buffered
    write that lands while its fdatasync is under way is not covered by it, so the next
    durable write must still fdatasync the file."""
    real_fdatasync = os.fdatasync
    calls: list[int] = []
    with FileBlockDevice(_image(tmp_path), writable=True, create_size=SIZE) as device:
        device.prepare_durable(0, SIZE)
        device.write(12288, os.urandom(4096))

        def racing_fdatasync(fd: int) -> None:
            calls.append(fd)
            real_fdatasync(fd)
            if len(calls) == 1:
                device.write(16384, os.urandom(4096))  # the other thread, mid-sync

        monkeypatch.setattr(os, "fdatasync", racing_fdatasync)
        device.sync()
        device.write_durable(65536, os.urandom(4096))
        assert len(calls) == 2  # the write made during the first sync was synced by this one
        device.write_durable(69632, os.urandom(4096))
        assert len(calls) == (2 if device._direct_fd is not None else 3)


@pytest.mark.parametrize(("offset", "length"), [(100, 4096), (4096, 1000), (0, 256 * 1024)],
                         ids=["unaligned-offset", "unaligned-length", "longer-than-the-bounce-buffer"])
def test_ranges_the_direct_path_cannot_take_are_written_the_buffered_way(
        tmp_path: Path, offset: int, length: int) -> None:
    path = _image(tmp_path)
    data = os.urandom(length)
    with FileBlockDevice(path, writable=True, create_size=SIZE) as device:
        device.write_durable(offset, data)
        assert device.read(offset, length) == data
    with FileBlockDevice(path, writable=False) as device:
        assert device.read(offset, length) == data


def test_a_medium_refusing_direct_io_falls_back_to_pwrite_and_fdatasync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a filesystem without O_DIRECT: opening the direct descriptor fails with EINVAL."""
    real_open = os.open

    def refusing_open(path: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "direct I/O not supported")
        return real_open(path, flags, *args)

    path = _image(tmp_path)
    data = os.urandom(8192)
    with FileBlockDevice(path, writable=True, create_size=SIZE) as device:
        monkeypatch.setattr(os, "open", refusing_open)
        device.write_durable(8192, data)
        device.write_durable(0, data)
        monkeypatch.undo()
        assert device.read(0, 16384) == data + data
    with FileBlockDevice(path, writable=False) as device:
        assert device.read(0, 16384) == data + data


def test_durable_writes_check_range_and_mode(tmp_path: Path) -> None:
    path = _image(tmp_path)
    with FileBlockDevice(path, writable=True, create_size=SIZE) as device:
        with pytest.raises(NoSpace):
            device.write_durable(SIZE - 4096, bytes(8192))
        with pytest.raises(ValueError):
            device.write_durable(-4096, bytes(4096))
    with FileBlockDevice(path, writable=False) as device:
        with pytest.raises(OSError) as refused:
            device.write_durable(0, bytes(4096))
        assert refused.value.errno == errno.EROFS


def test_prepare_durable_allocates_holes_and_keeps_contents(tmp_path: Path) -> None:
    """The holes of the range become allocated zeros; written data there is left alone."""
    path = _image(tmp_path)
    kept = os.urandom(4096)
    with FileBlockDevice(path, writable=True, create_size=SIZE) as device:
        device.write(1 << 20, kept)
        device.sync()
        before = os.stat(path).st_blocks * 512
        device.prepare_durable(0, 2 << 20)
        device.sync()
        allocated = os.stat(path).st_blocks * 512 - before
        assert allocated >= (2 << 20) - 4096 - 65536  # every hole of the range (the fs may round)
        assert os.stat(path).st_blocks * 512 < 3 << 20  # and not the rest of the image
        assert device.read(1 << 20, 4096) == kept
        assert device.read(0, 1 << 20) == bytes(1 << 20)
        again = os.stat(path).st_blocks
        device.prepare_durable(0, 2 << 20)  # nothing left to fill
        assert os.stat(path).st_blocks == again


def test_memory_device_durable_write_is_a_write_and_a_sync() -> None:
    device = MemoryBlockDevice(SIZE)
    device.write_durable(4096, b"x" * 4096)
    assert device.sync_count == 1
    assert device.read(4096, 4096) == b"x" * 4096
    device.prepare_durable(0, SIZE)  # nothing to do in memory, but the range is checked
    with pytest.raises(NoSpace):
        device.prepare_durable(0, SIZE + 1)
