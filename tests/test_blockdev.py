"""storage.blockdev: bounds, sparse creation, durability calls and the image lock."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from storage.blockdev import BlockDevice, FileBlockDevice, MemoryBlockDevice
from storage.errors import NoSpace, ShortRead, VolumeInUse


def test_created_image_is_sparse_and_zero(tmp_path: Path) -> None:
    path = tmp_path / "img"
    with FileBlockDevice(path, writable=True, create_size=64 << 20) as device:
        assert device.size == 64 << 20
        assert device.read(5 << 20, 4096) == bytes(4096)
    assert os.stat(path).st_blocks * 512 < 1 << 20  # nothing allocated yet


def test_create_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "img"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        FileBlockDevice(path, writable=True, create_size=4096)
    assert path.read_bytes() == b"precious"


def test_write_read_round_trip_and_persistence(tmp_path: Path) -> None:
    path = tmp_path / "img"
    with FileBlockDevice(path, writable=True, create_size=1 << 20) as device:
        device.write(4096 * 3, b"x" * 4096)
        device.write(10, bytearray(b"hello"))
        device.sync()
    with FileBlockDevice(path, writable=False) as device:
        assert device.read(4096 * 3, 4096) == b"x" * 4096
        buffer = bytearray(5)
        device.readinto(10, buffer)
        assert buffer == b"hello"


@pytest.mark.parametrize("make", ["file", "memory"])
def test_out_of_range_access_is_an_error_not_zeros(tmp_path: Path, make: str) -> None:
    device: BlockDevice
    if make == "file":
        device = FileBlockDevice(tmp_path / "img", writable=True, create_size=8192)
    else:
        device = MemoryBlockDevice(8192)
    with pytest.raises(ShortRead) as short:
        device.read(8000, 400)
    assert short.value.errno == errno.EIO
    with pytest.raises(NoSpace) as full:
        device.write(8190, b"abc")
    assert full.value.errno == errno.ENOSPC
    with pytest.raises(ValueError):
        device.read(-1, 10)
    device.close()


def test_read_of_an_image_truncated_behind_our_back_is_short(tmp_path: Path) -> None:
    path = tmp_path / "img"
    with FileBlockDevice(path, writable=True, create_size=8192) as device:
        os.truncate(path, 4096)
        with pytest.raises(ShortRead):
            device.read(4096, 4096)


def test_read_only_device_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "img"
    FileBlockDevice(path, writable=True, create_size=4096).close()
    with FileBlockDevice(path, writable=False) as device, pytest.raises(OSError) as error:
        device.write(0, b"x")
    assert error.value.errno == errno.EROFS


def test_writer_lock_excludes_other_processes(tmp_path: Path) -> None:
    path = tmp_path / "img"
    holder = (
        "import sys, time\n"
        "from storage.blockdev import FileBlockDevice\n"
        f"device = FileBlockDevice({str(path)!r}, writable=True, create_size=4096)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    process = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline() == "locked\n"
        with pytest.raises(VolumeInUse, match="in use by another process"):
            FileBlockDevice(path, writable=True)
        with pytest.raises(VolumeInUse):
            FileBlockDevice(path, writable=False)
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(timeout=10)
    with FileBlockDevice(path, writable=True):  # released when the holder exits
        pass


def test_readers_share_but_exclude_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "img"
    FileBlockDevice(path, writable=True, create_size=4096).close()
    with (FileBlockDevice(path, writable=False), FileBlockDevice(path, writable=False),
          pytest.raises(VolumeInUse)):
        FileBlockDevice(path, writable=True)


def test_memory_device_snapshot_and_restore() -> None:
    device = MemoryBlockDevice(8192)
    device.write(0, b"old")
    saved = device.snapshot()
    device.write(0, b"new")
    device.sync()
    assert device.sync_count == 1
    device.restore(saved)
    assert device.read(0, 3) == b"old"
    assert isinstance(device, BlockDevice)


def _attach_loop_device(image: Path) -> str | None:
    """Attach `image` to a free loop device (root only); None when the system does not allow it."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        return None
    result = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True,
                            text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def test_a_block_device_path_works_like_an_image(tmp_path: Path) -> None:
    image = tmp_path / "backing.img"
    with open(image, "wb") as handle:
        handle.truncate(4 << 20)
    loop = _attach_loop_device(image)
    if loop is None:
        pytest.skip("needs root and loop devices (losetup) to get a real block device")
    try:
        with FileBlockDevice(loop, writable=True) as device:
            assert device.size == 4 << 20  # measured with lseek, as st_size is 0 for devices
            device.write(8192, b"through the block device")
            device.sync()
            with pytest.raises(VolumeInUse):
                FileBlockDevice(loop, writable=True)
    finally:
        subprocess.run(["losetup", "--detach", loop], check=True)
    with open(image, "rb") as handle:
        handle.seek(8192)
        assert handle.read(24) == b"through the block device"


@pytest.mark.parametrize("make", ["file", "memory"])
def test_scattered_writes_land_in_order_and_check_every_range_first(tmp_path: Path, make: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """write_scattered is `write` of each piece (a later piece at the same offset wins); one
    piece out of the device is NoSpace before anything is written; on a file the pieces count
    as buffered writes, so the next write_durable syncs them (fdatasync counted)."""
    size = 1 << 20
    device: FileBlockDevice | MemoryBlockDevice = (
        FileBlockDevice(tmp_path / "img", writable=True, create_size=size) if make == "file"
        else MemoryBlockDevice(size))
    with device:
        pieces = [(offset, os.urandom(4096)) for offset in (8192, 40960, 4096 * 100)]
        pieces.append((40960, os.urandom(100)))  # rewrites the start of the second piece
        device.write_scattered(pieces)
        assert device.read(8192, 4096) == pieces[0][1]
        assert device.read(40960, 4096) == pieces[3][1] + pieces[1][1][100:]
        assert device.read(4096 * 100, 4096) == pieces[2][1]
        with pytest.raises(NoSpace):
            device.write_scattered([(0, b"x" * 10), (size - 10, b"y" * 11)])
        assert device.read(0, 10) == bytes(10)  # the first piece was not written either
        if isinstance(device, FileBlockDevice):
            calls: list[int] = []
            real_fdatasync = os.fdatasync

            def counting_fdatasync(fd: int) -> None:
                calls.append(fd)
                real_fdatasync(fd)
            monkeypatch.setattr(os, "fdatasync", counting_fdatasync)
            device.sync()
            device.write_scattered([(0, os.urandom(4096))])
            calls.clear()
            device.write_durable(65536, os.urandom(4096))
            assert len(calls) == 1
