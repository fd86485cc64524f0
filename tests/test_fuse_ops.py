"""FuseOperations in process, without a kernel mount: the one errno translation, EIO for integrity
failures (logged), EIO for bugs (logged with a traceback), handles distinct from inodes, open's
O_TRUNC (the kernel leaves it to us), and directory handles counted like file handles."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

pyfuse3 = pytest.importorskip("pyfuse3", reason="pyfuse3 is not installed (pip install keepshim[fuse])")

from pyfuse3 import RequestContext  # noqa: E402

from shim.fuse import FuseOperations  # noqa: E402
from storage.errors import IntegrityError  # noqa: E402
from storage.fs import ROOT_INODE  # noqa: E402
from storage.luks2 import KdfCost  # noqa: E402
from storage.volume import Volume, create_volume, open_volume  # noqa: E402


@dataclass(frozen=True)
class _Context:
    """Stands in for pyfuse3.RequestContext (only uid and gid are read)."""

    uid: int = 0
    gid: int = 0
    pid: int = 0
    umask: int = 0o022


def Context(uid: int = 0, gid: int = 0) -> RequestContext:
    return cast(RequestContext, _Context(uid, gid))


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Volume]:
    with create_volume(tmp_path / "v.img", 24 << 20, b"pw", kdf_cost=KdfCost(1, 8192, 1)) as opened:
        yield opened


async def write_file(operations: FuseOperations, name: bytes, data: bytes) -> int:
    """A new file `name` in the root holding `data`, closed again; its inode."""
    info, entry = await operations.create(ROOT_INODE, name, 0o100644, os.O_WRONLY, Context())
    await operations.write(info.fh, 0, data)
    await operations.release(info.fh)
    return int(entry.st_ino)


async def fuse_errno(call: object, *args: object) -> int:
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await call(*args)  # type: ignore[operator]
    return int(raised.value.errno)


async def test_storage_errors_become_the_same_errno(volume: Volume) -> None:
    operations = FuseOperations(volume)
    context = Context()
    assert await fuse_errno(operations.getattr, 99999, context) == errno.ENOENT
    missing = await operations.lookup(ROOT_INODE, b"missing", context)
    assert missing.st_ino == 0 and missing.entry_timeout > 0  # a negative entry the kernel caches
    await operations.mkdir(ROOT_INODE, b"d", 0o755, context)
    assert await fuse_errno(operations.mkdir, ROOT_INODE, b"d", 0o755, context) == errno.EEXIST
    assert await fuse_errno(operations.unlink, ROOT_INODE, b"d", context) == errno.EISDIR
    assert await fuse_errno(operations.read, 12345, 0, 10) == errno.EBADF
    assert await fuse_errno(operations.mknod, ROOT_INODE, b"fifo", 0o010644, 0, context) == errno.EPERM


async def test_new_inodes_belong_to_the_caller_and_handles_are_not_inodes(volume: Volume) -> None:
    operations = FuseOperations(volume)
    info, entry = await operations.create(ROOT_INODE, b"f", 0o100600, 0, Context(uid=1000, gid=100))
    assert (entry.st_uid, entry.st_gid) == (1000, 100)
    assert info.fh != entry.st_ino
    assert await operations.write(info.fh, 10, b"data") == 4
    assert await operations.read(info.fh, 0, 100) == bytes(10) + b"data"
    assert operations.dirty
    operations.commit()
    assert not operations.dirty
    await operations.release(info.fh)
    assert await fuse_errno(operations.read, info.fh, 0, 1) == errno.EBADF


async def test_integrity_failure_is_eio_and_logged(volume: Volume, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    operations = FuseOperations(volume)
    info, _ = await operations.create(ROOT_INODE, b"f", 0o100644, 0, Context())

    def tampered(*_: object) -> bytes:
        raise IntegrityError("sector 42 does not match its hash")

    monkeypatch.setattr(volume.fs, "read", tampered)
    with caplog.at_level(logging.ERROR, logger="keepshim.fuse"):
        assert await fuse_errno(operations.read, info.fh, 0, 10) == errno.EIO
    assert "integrity failure during read: sector 42" in caplog.text


async def test_a_bug_is_eio_and_logged_with_its_traceback(volume: Volume, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    operations = FuseOperations(volume)

    def broken(*_: object) -> object:
        raise ValueError("a bug")

    monkeypatch.setattr(volume.fs, "getattr", broken)
    with caplog.at_level(logging.ERROR, logger="keepshim.fuse"):
        assert await fuse_errno(operations.getattr, ROOT_INODE, Context()) == errno.EIO
    assert "internal error during getattr" in caplog.text and "ValueError: a bug" in caplog.text


async def test_open_with_o_trunc_empties_the_file(volume: Volume) -> None:
    """libfuse 3 negotiates atomic O_TRUNC: the kernel sends no setattr(size=0) for
    open(O_TRUNC), so open itself must truncate (else a shorter rewrite keeps the old tail)."""
    operations = FuseOperations(volume)
    ino = await write_file(operations, b"f", b"abcdef" * 2000)  # more than one block
    operations.commit()
    kept = await operations.open(ino, os.O_RDWR, Context())
    assert not operations.dirty
    assert await operations.read(kept.fh, 0, 3) == b"abc"
    before = (await operations.getattr(ino, Context())).st_mtime_ns
    info = await operations.open(ino, os.O_WRONLY | os.O_TRUNC, Context())
    assert operations.dirty
    after = await operations.getattr(ino, Context())
    assert after.st_size == 0 and after.st_mtime_ns >= before
    assert await operations.write(info.fh, 0, b"1") == 1
    assert await operations.read(kept.fh, 0, 100) == b"1"
    # O_RDONLY | O_TRUNC truncates too on Linux (the kernel has checked write permission)
    await operations.write(info.fh, 0, b"123")
    await operations.open(ino, os.O_RDONLY | os.O_TRUNC, Context())
    assert (await operations.getattr(ino, Context())).st_size == 0
    assert volume.fsck() == []


async def test_o_trunc_on_a_read_only_volume_is_erofs_and_keeps_the_contents(tmp_path: Path) -> None:
    with create_volume(tmp_path / "v.img", 24 << 20, b"pw", kdf_cost=KdfCost(1, 8192, 1)) as volume:
        ino = await write_file(FuseOperations(volume), b"f", b"abcdef")
    with open_volume(tmp_path / "v.img", b"pw", writable=False) as volume:
        operations = FuseOperations(volume)
        assert await fuse_errno(operations.open, ino, os.O_WRONLY | os.O_TRUNC, Context()) == errno.EROFS
        info = await operations.open(ino, os.O_RDONLY, Context())
        assert await operations.read(info.fh, 0, 100) == b"abcdef"
        await operations.release(info.fh)


async def test_a_directory_removed_while_open_lives_until_releasedir(volume: Volume) -> None:
    """As on a local filesystem: fstat of an open directory that was removed answers nlink 0
    (not ENOENT), and the inode goes at the last releasedir."""
    operations = FuseOperations(volume)
    context = Context()
    entry = await operations.mkdir(ROOT_INODE, b"d", 0o755, context)
    ino = entry.st_ino
    first = await operations.opendir(ino, context)
    second = await operations.opendir(ino, context)
    assert first != second
    await operations.rmdir(ROOT_INODE, b"d", context)
    removed = await operations.getattr(ino, context)
    assert removed.st_nlink == 0 and removed.st_mode == entry.st_mode
    assert volume.fsck() == []
    await operations.releasedir(first)
    assert (await operations.getattr(ino, context)).st_nlink == 0
    await operations.releasedir(second)
    assert await fuse_errno(operations.getattr, ino, context) == errno.ENOENT
    assert await fuse_errno(operations.readdir, second, 0, None) == errno.EBADF
    file_ino = await write_file(operations, b"f", b"x")
    assert await fuse_errno(operations.opendir, file_ino, context) == errno.ENOTDIR
    await operations.unlink(ROOT_INODE, b"f", context)
    assert await fuse_errno(operations.getattr, file_ino, context) == errno.ENOENT  # no count left
    assert volume.fsck() == []


async def test_release_all_frees_removed_open_directories(volume: Volume) -> None:
    operations = FuseOperations(volume)
    ino = (await operations.mkdir(ROOT_INODE, b"d", 0o755, Context())).st_ino
    await operations.opendir(ino, Context())
    await operations.rmdir(ROOT_INODE, b"d", Context())
    assert (await operations.getattr(ino, Context())).st_nlink == 0
    operations.release_all()  # unmount without the kernel's releasedir
    assert await fuse_errno(operations.getattr, ino, Context()) == errno.ENOENT
    assert volume.fsck() == []


async def test_a_removed_open_directory_of_a_dead_mount_is_reaped_at_the_next_open(tmp_path: Path) -> None:
    image = tmp_path / "v.img"
    with create_volume(image, 24 << 20, b"pw", kdf_cost=KdfCost(1, 8192, 1)) as volume:
        operations = FuseOperations(volume)
        ino = (await operations.mkdir(ROOT_INODE, b"d", 0o755, Context())).st_ino
        await operations.opendir(ino, Context())
        await operations.rmdir(ROOT_INODE, b"d", Context())
        assert (await operations.getattr(ino, Context())).st_nlink == 0
        operations.commit()  # durable with the directory still open; then the mount "dies"
    with open_volume(image, b"pw") as reopened:
        assert volume.fs is not reopened.fs
        with pytest.raises(OSError) as raised:
            reopened.fs.getattr(ino)
        assert raised.value.errno == errno.ENOENT
        assert reopened.fsck() == []
