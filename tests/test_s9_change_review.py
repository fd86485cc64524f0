"""Defects found reviewing session 9's change (format 3's st_blocks, umount's report, --timeout,
--trace decoding), each with the reproduction that confirmed it, on the real thing: a real
volume image, a real FUSE mount where the kernel's view matters."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from fuse_harness import PASSPHRASE, MountedVolume, create_image, fuse_skip_reason, keep_volume

from storage.errors import FilesystemError
from storage.fs import BLOCK_SIZE, ROOT_INODE
from storage.luks2 import KdfCost
from storage.volume import create_volume, open_volume

SECTORS_PER_BLOCK = BLOCK_SIZE // 512
MIB = 1 << 20


def _new(image: Path) -> bytes:
    """An empty volume; returns its key."""
    with create_volume(image, 24 << 20, b"review", pbkdf="pbkdf2", kdf_cost=KdfCost(iterations=1000)) as volume:
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
