"""Defects found reviewing session 9's change (format 3's st_blocks, umount's report, --timeout,
--trace decoding), each with the reproduction that confirmed it, on the real thing: a real
volume image, a real FUSE mount where the kernel's view matters."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import resource
import socket
from pathlib import Path

import pytest
import trio
from fuse_harness import PASSPHRASE, MountedVolume, create_image, fuse_skip_reason, keep_volume

from net.errors import ConnectFailed
from net.streams import ReadinessBoard, open_connection
from net.tls import ServerVerification
from storage.errors import FilesystemError, NoSpace
from storage.fs import BLOCK_SIZE, ROOT_INODE
from storage.luks2 import KdfCost
from storage.volume import create_volume, open_volume

SECTORS_PER_BLOCK = BLOCK_SIZE // 512
MIB = 1 << 20


def _new(image: Path, size: int = 24 << 20) -> bytes:
    """An empty volume; returns its key."""
    with create_volume(image, size, b"review", pbkdf="pbkdf2", kdf_cost=KdfCost(iterations=1000)) as volume:
        return volume.luks.volume_key


def test_setattr_that_shrinks_past_a_hole_returns_the_count_after_the_trim(tmp_path: Path) -> None:
    """A sparse file whose one block lies far past the new size: the shrink frees it. setattr
    re-read the count only when the old count exceeded the blocks the new size can hold, so
    here (2 blocks mapped, room for 2) it returned the count before the trim: 8 sectors for a
    file that holds none, which FUSE hands the kernel as the file's attributes."""
    image = tmp_path / "v.img"
    key = _new(image)
    with open_volume(image, volume_key=key) as volume:
        fs = volume.fs
        ino = fs.create(ROOT_INODE, b"sparse").ino
        fs.write(ino, MIB, b"x" * BLOCK_SIZE)
        fs.write(ino, 0, b"head")  # and one block that stays
        assert fs.getattr(ino).blocks == 2 * SECTORS_PER_BLOCK
        shrunk = fs.setattr(ino, size=2 * BLOCK_SIZE)
        assert shrunk.blocks == fs.getattr(ino).blocks == SECTORS_PER_BLOCK
        assert fs.setattr(ino, size=BLOCK_SIZE // 2).blocks == SECTORS_PER_BLOCK  # nothing to free
        assert volume.fsck() == []


@pytest.mark.fuse
@pytest.mark.skipif(fuse_skip_reason() is not None, reason=str(fuse_skip_reason()))
def test_stat_right_after_a_truncate_through_the_mount_sees_the_freed_blocks(tmp_path: Path) -> None:
    """The kernel keeps what setattr returned for ATTR_TIMEOUT: `truncate` then `stat` (or `du`)
    at once showed the block the truncate had just freed."""
    image = create_image(tmp_path / "v.img", "64M")
    with MountedVolume(image, tmp_path / "mnt", "--commit-interval", "0") as mount:
        path = mount.mountpoint / "sparse"
        with open(path, "wb") as handle:
            handle.seek(MIB)
            handle.write(b"x" * BLOCK_SIZE)
        assert os.stat(path).st_blocks == SECTORS_PER_BLOCK
        os.truncate(path, 2 * BLOCK_SIZE)
        assert os.stat(path).st_blocks == 0


def test_a_format_3_volume_without_the_blocks_column_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    """An image whose meta table says format 3 but whose inodes have no blocks column (crafted,
    or damaged: nothing keepshim writes): every statement that builds attributes fails. The
    open succeeded and the first getattr raised apsw's SQLError: `keep volume ls` said 'keep:
    internal error: SQLError: no such column: blocks'. The open now refuses it, errno EIO."""
    image = create_image(tmp_path / "v.img", "32M")
    with open_volume(image, PASSPHRASE.encode()) as volume:
        fs = volume.fs
        fs._run(lambda: fs._cursor.execute("ALTER TABLE inodes DROP COLUMN blocks"))
        fs.fsync()
    for writable in (True, False):
        with pytest.raises(FilesystemError, match="no such column: blocks") as refused:
            open_volume(image, PASSPHRASE.encode(), writable=writable)
        assert refused.value.errno == errno.EIO
    listing = keep_volume("ls", image)
    assert listing.returncode == 1
    assert listing.stderr.decode().startswith("keep: ") and "internal error" not in listing.stderr.decode()


def test_a_large_file_unlinked_keeps_an_exact_count_between_its_batches(tmp_path: Path) -> None:
    """Unlinking a file of more than one batch of blocks frees the first batch with the name and
    leaves an orphan whose count must match its map (as after a crash between batches); a small
    file goes at once. fsck compares the counts with the map at each stage."""
    image = tmp_path / "v.img"
    key = _new(image, 64 << 20)
    with open_volume(image, volume_key=key) as volume:
        fs = volume.fs
        big = fs.create(ROOT_INODE, b"big").ino
        for offset in range(0, 1500 * BLOCK_SIZE, 16 * BLOCK_SIZE):  # 1500 blocks: more than one batch (1024)
            assert fs.write(big, offset, b"b" * min(16 * BLOCK_SIZE, 1500 * BLOCK_SIZE - offset)) > 0
        small = fs.create(ROOT_INODE, b"small", data=b"s" * 3 * BLOCK_SIZE).ino
        assert fs.getattr(big).blocks == 1500 * SECTORS_PER_BLOCK
        fs._release_if_unused = lambda ino: None  # type: ignore[method-assign]  # stops as a crash would
        fs.unlink(ROOT_INODE, b"big")
        fs.unlink(ROOT_INODE, b"small")
        fs.fsync()
        assert fs._all("SELECT ino, blocks FROM inodes WHERE ino IN (?, ?)", (big, small)) == [
            (big, 1500 - 1024)]
        assert volume.fsck() == []
    with open_volume(image, volume_key=key) as volume:  # the next writable open reaps the orphan
        assert volume.fs._all("SELECT count(*) FROM inodes WHERE ino = ?", (big,)) == [(0,)]
        assert volume.fsck() == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_a_socket_that_cannot_be_created_is_a_connect_failure(host: str) -> None:
    """The raced connect (20a33aa) created each attempt's socket outside its error handling: when
    socket(2) itself failed (EMFILE here, the process's descriptors all taken; EAFNOSUPPORT for
    ::1 on a kernel without IPv6) the OSError left the attempts' nursery as an ExceptionGroup,
    which no caller catches, instead of ConnectFailed ('cannot connect to HOST:PORT: Too many open
    files', as trio.open_tcp_stream made of it before)."""
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        board = ReadinessBoard(trio.lowlevel.current_trio_token())
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        taken: list[int] = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))
        try:
            with contextlib.suppress(OSError):
                while True:
                    taken.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            async with trio.open_nursery() as nursery:
                with trio.fail_after(30), pytest.raises(ConnectFailed) as refused:
                    await open_connection(host, port, None, ServerVerification(), board, nursery)
        finally:
            for descriptor in taken:
                os.close(descriptor)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert str(refused.value) == f"cannot connect to {host}:{port}: Too many open files"


def _fill_as_format_2(image: Path, key: bytes, small_files: int = 0) -> int:
    """Turn a fresh volume into a format-2 one (no blocks column) whose metadata region is full,
    as an older keepshim left it after creating empty files until ENOSPC (those rows are what
    format 2's create wrote), after `small_files` files of one block each ("small-N"); returns
    how many empty files it holds."""
    with open_volume(image, volume_key=key) as volume:
        fs = volume.fs

        def downgrade() -> None:
            fs._cursor.execute("ALTER TABLE inodes DROP COLUMN blocks")
            fs._cursor.execute("UPDATE meta SET value = 2 WHERE key = 'format'")
        fs._run(downgrade)

        def create_format_2(name: bytes, data: bytes) -> None:
            """As format 2's create: the inode row without a count, then its blocks."""
            fs._cursor.execute("INSERT INTO inodes(mode, nlink, size, uid, gid, atime, mtime, ctime)"
                               " VALUES (33188, 1, ?, 0, 0, 0, 0, 0)", (len(data),))
            ino = fs._db.last_insert_rowid()
            fs._cursor.execute("INSERT INTO dirents(parent, name, ino) VALUES (1, ?, ?)", (name, ino))
            if data:
                fs._write_mapped(ino, {}, 0, memoryview(data))

        def create_small_files() -> None:
            for index in range(small_files):
                create_format_2(b"small-%d" % index, b"%d" % index)
        fs._run(create_small_files)
        count = 0

        def create_empty_files(batch: int) -> None:
            nonlocal count
            for _ in range(batch):
                create_format_2(b"an-empty-file-named-at-some-length-%08d" % count, b"")
                count += 1
        for batch in (200, 1):  # to the last page: a failed batch gives back what it took
            with contextlib.suppress(NoSpace):  # the region is full
                while True:
                    fs._run(functools.partial(create_empty_files, batch))
        fs.fsync()
    return count


def test_a_format_2_volume_with_full_metadata_still_opens_writable(tmp_path: Path) -> None:
    """A format-2 volume whose metadata region an older keepshim had filled (many empty files)
    could no longer be opened writable at all: the upgrade's UPDATE rewrote every regular file's
    row with the new column, which needs pages the region no longer has, so every writable open
    ('keep volume rm', to make room) failed with 'no space left on the volume' while the older
    keepshim still removed files (reproduced with c1925db filling a 24 MiB volume with 6656
    empty files). The upgrade writes only the counts that are not 0."""
    image = tmp_path / "v.img"
    key = _new(image)
    files = _fill_as_format_2(image, key)
    assert files > 1000
    with open_volume(image, volume_key=key) as volume:  # upgraded, and room can be made
        fs = volume.fs
        assert volume.info()["filesystem_format"] == 3
        fs.unlink(ROOT_INODE, b"an-empty-file-named-at-some-length-%08d" % 0)
        assert fs.getattr(fs.lookup(ROOT_INODE, b"an-empty-file-named-at-some-length-%08d" % 1).ino).blocks == 0
        assert volume.fsck() == []


def test_a_format_2_volume_too_full_to_upgrade_is_used_as_format_2(tmp_path: Path) -> None:
    """Metadata full and files with blocks (their rows must grow to hold a count): no room for
    the upgrade at all. Every writable open failed with 'no space left on the volume' (reproduced
    with c1925db: 17074 files of 10 bytes with 249-byte names fill a 128 MiB volume's metadata;
    'keep volume rm' then exit 1). The volume now stays format 2 until room is made: opened
    writable without counts (st_blocks estimated from the size, as format 2 did), files can be
    removed and written; a later writable open with room upgrades it, exact and fsck clean."""
    image = tmp_path / "v.img"
    key = _new(image)
    _fill_as_format_2(image, key, small_files=1000)
    with open_volume(image, volume_key=key) as volume:  # no room: stays format 2, but writable
        fs = volume.fs
        assert volume.info()["filesystem_format"] == 2
        for index in range(1500):
            fs.unlink(ROOT_INODE, b"an-empty-file-named-at-some-length-%08d" % index)
        fs.unlink(ROOT_INODE, b"small-0")
        ino = fs.create(ROOT_INODE, b"new", data=b"n" * 5000).ino
        fs.write(ino, 3 * MIB, b"w")
        assert fs.getattr(ino).blocks == (3 * MIB // BLOCK_SIZE + 1) * SECTORS_PER_BLOCK  # the estimate
        assert fs.read(fs.lookup(ROOT_INODE, b"small-7").ino, 0, 10) == b"7"
        assert volume.fsck() == []
    with open_volume(image, volume_key=key) as volume:  # room now: upgraded, exact
        fs = volume.fs
        assert volume.info()["filesystem_format"] == 3
        assert fs.getattr(ino).blocks == 3 * SECTORS_PER_BLOCK
        assert fs.getattr(fs.lookup(ROOT_INODE, b"small-7").ino).blocks == SECTORS_PER_BLOCK
        assert volume.fsck() == []
