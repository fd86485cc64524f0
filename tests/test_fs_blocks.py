"""st_blocks counts the blocks a file really occupies (filesystem format 3).

Format 2 could only estimate st_blocks from the size, so `du` overstated a sparse file and
`cp --sparse=auto` out of a FUSE mount wrote its holes as zeros. Format 3 keeps each inode's
count of mapped blocks in `inodes.blocks`, changed in the same transaction as the block map;
`fsck` compares the two. A format-2 volume opened writable is upgraded in one commit; opened
read-only it keeps the estimate.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from fuse_harness import MountedVolume, create_image, fuse_skip_reason
from power_cut import CutDevice, PowerCut

from storage.errors import FilesystemError
from storage.fs import BLOCK_SIZE, FORMAT_VERSION, ROOT_INODE
from storage.luks2 import KdfCost
from storage.volume import create_volume, open_volume

SECTORS_PER_BLOCK = BLOCK_SIZE // 512
MIB = 1 << 20


def _new(image: Path) -> bytes:
    """An empty volume; returns its key."""
    with create_volume(image, 24 << 20, b"blocks", pbkdf="pbkdf2", kdf_cost=KdfCost(iterations=1000)) as volume:
        return volume.luks.volume_key


def test_blocks_follow_the_mapped_blocks_through_every_change(tmp_path: Path) -> None:
    image = tmp_path / "b.img"
    key = _new(image)
    with open_volume(image, volume_key=key) as volume:
        fs = volume.fs
        created = fs.create(ROOT_INODE, b"small", data=b"x" * 5000)  # two blocks, from create itself
        assert created.blocks == 2 * SECTORS_PER_BLOCK
        assert fs.getattr(created.ino).blocks == 2 * SECTORS_PER_BLOCK
        sparse = fs.create(ROOT_INODE, b"sparse").ino
        assert fs.getattr(sparse).blocks == 0
        fs.write(sparse, MIB, b"y" * BLOCK_SIZE)  # one block past a 1 MiB hole
        attr = fs.getattr(sparse)
        assert attr.size == MIB + BLOCK_SIZE and attr.blocks == SECTORS_PER_BLOCK
        fs.write(sparse, MIB, b"z" * BLOCK_SIZE)  # an overwrite maps nothing new
        fs.write(sparse, 10, b"head")  # the first block, inside the hole
        assert fs.getattr(sparse).blocks == 2 * SECTORS_PER_BLOCK
        listed = {name: attr for name, attr, _ in fs.readdir(ROOT_INODE)}
        assert listed[b"sparse"].blocks == 2 * SECTORS_PER_BLOCK
        assert fs.lookup(ROOT_INODE, b"sparse").blocks == 2 * SECTORS_PER_BLOCK
        grown = fs.setattr(sparse, size=8 * MIB)  # growing adds a hole, no block
        assert grown.blocks == 2 * SECTORS_PER_BLOCK
        shrunk = fs.setattr(sparse, size=100)  # the block at 1 MiB is freed, the first one stays
        assert shrunk.blocks == SECTORS_PER_BLOCK
        assert fs.getattr(sparse).blocks == SECTORS_PER_BLOCK
        assert fs.setattr(sparse, size=0).blocks == 0
        directory = fs.mkdir(ROOT_INODE, b"d")
        link = fs.symlink(ROOT_INODE, b"l", b"small")
        assert fs.getattr(directory.ino).blocks == 0 and fs.getattr(link.ino).blocks == 0
        fs.write(sparse, 3 * BLOCK_SIZE, b"w" * (3 * BLOCK_SIZE))
        fs.fsync()
        assert volume.fsck() == []
    with open_volume(image, volume_key=key) as volume:  # the counts are stored, not recomputed
        assert volume.fs.getattr(sparse).blocks == 3 * SECTORS_PER_BLOCK
        assert volume.fs.getattr(created.ino).blocks == 2 * SECTORS_PER_BLOCK
        volume.fs.unlink(ROOT_INODE, b"sparse")
        assert volume.fsck() == []


def test_fsck_reports_a_count_that_disagrees_with_the_block_map(tmp_path: Path) -> None:
    image = tmp_path / "b.img"
    key = _new(image)
    with open_volume(image, volume_key=key) as volume:
        fs = volume.fs
        ino = fs.create(ROOT_INODE, b"f", data=b"a" * 10000).ino
        fs._run(lambda: fs._cursor.execute("UPDATE inodes SET blocks = 7 WHERE ino = ?", (ino,)))
        fs.fsync()
        assert volume.fsck() == [f"filesystem: inode {ino}: 7 blocks recorded, 3 mapped"]


def _downgrade_to_format_2(image: Path, key: bytes) -> tuple[int, int]:
    """Turn a fresh format-3 volume into what format 2 wrote (no blocks column, format 2):
    returns the inodes of a sparse file (one block at 1 MiB) and of a 3-block file."""
    with open_volume(image, volume_key=key) as volume:
        fs = volume.fs
        sparse = fs.create(ROOT_INODE, b"sparse").ino
        fs.write(sparse, MIB, b"s" * BLOCK_SIZE)
        full = fs.create(ROOT_INODE, b"full", data=b"f" * (3 * BLOCK_SIZE)).ino

        def downgrade() -> None:
            fs._cursor.execute("ALTER TABLE inodes DROP COLUMN blocks")
            fs._cursor.execute("UPDATE meta SET value = 2 WHERE key = 'format'")
        fs._run(downgrade)
        fs.fsync()
    return sparse, full


def test_a_format_2_volume_is_upgraded_when_opened_writable(tmp_path: Path) -> None:
    image = tmp_path / "b.img"
    key = _new(image)
    sparse, full = _downgrade_to_format_2(image, key)
    with open_volume(image, volume_key=key, writable=False) as volume:  # read-only: the old estimate
        assert volume.fs.getattr(sparse).blocks == (MIB // BLOCK_SIZE + 1) * SECTORS_PER_BLOCK
        assert volume.fs.getattr(full).blocks == 3 * SECTORS_PER_BLOCK
        assert volume.fs._all("SELECT value FROM meta WHERE key = 'format'") == [(2,)]
        assert volume.info()["filesystem_format"] == 2
        assert volume.fsck() == []
    with open_volume(image, volume_key=key) as volume:  # writable: upgraded, exact
        assert volume.fs.getattr(sparse).blocks == SECTORS_PER_BLOCK
        assert volume.fs.getattr(full).blocks == 3 * SECTORS_PER_BLOCK
        assert volume.fsck() == []
    with open_volume(image, volume_key=key, writable=False) as volume:  # and it stayed upgraded
        assert volume.fs._all("SELECT value FROM meta WHERE key = 'format'") == [(FORMAT_VERSION,)]
        assert volume.info()["filesystem_format"] == FORMAT_VERSION
        assert volume.fs.getattr(sparse).blocks == SECTORS_PER_BLOCK
        assert volume.fs.read(sparse, MIB, BLOCK_SIZE) == b"s" * BLOCK_SIZE


@pytest.mark.skipif(fuse_skip_reason() is not None, reason=str(fuse_skip_reason()))
def test_du_and_cp_through_the_mount_see_the_holes(tmp_path: Path) -> None:
    image = create_image(tmp_path / "v.img", "64M")
    with MountedVolume(image, tmp_path / "mnt", "--commit-interval", "0") as mount:
        path = mount.mountpoint / "sparse"
        with open(path, "wb") as handle:
            handle.seek(16 * MIB)
            handle.write(b"end" * 1000)
        status = os.stat(path)
        assert status.st_size == 16 * MIB + 3000
        assert status.st_blocks == SECTORS_PER_BLOCK  # 3000 bytes: one block
        du = subprocess.run(["du", "--block-size=1", str(path)], capture_output=True, text=True, check=True)
        assert int(du.stdout.split()[0]) == BLOCK_SIZE
        if shutil.which("cp") is not None:
            copy = tmp_path / "copy"
            subprocess.run(["cp", "--sparse=auto", str(path), str(copy)], check=True)
            assert copy.read_bytes()[-3000:] == b"end" * 1000
            assert os.stat(copy).st_blocks * 512 < MIB  # the hole stayed a hole on the host


def test_a_newer_format_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    image = tmp_path / "b.img"
    key = _new(image)
    with open_volume(image, volume_key=key) as volume:
        fs = volume.fs
        fs._run(lambda: fs._cursor.execute("UPDATE meta SET value = ? WHERE key = 'format'", (FORMAT_VERSION + 1,)))
        fs.fsync()
    with pytest.raises(FilesystemError, match=f"filesystem format {FORMAT_VERSION + 1} is newer than this"):
        open_volume(image, volume_key=key)
    with pytest.raises(FilesystemError, match="is newer than this"):
        open_volume(image, volume_key=key, writable=False)


def test_a_power_cut_anywhere_in_the_upgrade_leaves_format_2_or_format_3(tmp_path: Path) -> None:
    """The upgrade is one SQLite transaction in one store commit: cut the power at every device
    write or sync of a writable open that upgrades (unsynced writes kept or lost in any
    pattern), and the volume reopens as it was (format 2, upgraded at that open) or upgraded
    (format 3, exact counts), with every file intact and fsck clean."""
    image = tmp_path / "b.img"
    key = _new(image)
    sparse, full = _downgrade_to_format_2(image, key)
    contents = image.read_bytes()
    rng = random.Random(3)
    formats: dict[int, int] = {}
    for fail_at in range(1, 1000):
        device = CutDevice(len(contents), fail_at=fail_at)
        device.restore(contents)
        try:
            open_volume(device, volume_key=key).close()
        except PowerCut:
            pass
        except Exception as error:  # a cut surfaced through another layer's error
            assert isinstance(error.__context__, PowerCut) or "PowerCut" in repr(error), repr(error)
        else:
            assert device.calls < fail_at  # opened and closed without reaching the cut: all cuts seen
            break
        for _ in range(4):  # unsynced writes kept or lost in several patterns
            survivor = device.after_cut(rng)
            with open_volume(survivor, volume_key=key, writable=False) as volume:  # as the cut left it
                version = volume.fs._all("SELECT value FROM meta WHERE key = 'format'")[0][0]
                formats[version] = formats.get(version, 0) + 1
                assert volume.fs.read(sparse, MIB, BLOCK_SIZE) == b"s" * BLOCK_SIZE
                assert volume.fsck() == []
            with open_volume(survivor, volume_key=key) as volume:
                fs = volume.fs
                assert fs.getattr(sparse).blocks == SECTORS_PER_BLOCK  # upgraded now if it had not been
                assert fs.getattr(full).blocks == 3 * SECTORS_PER_BLOCK
                assert fs.read(sparse, MIB, BLOCK_SIZE) == b"s" * BLOCK_SIZE
                assert fs.read(full, 0, 3 * BLOCK_SIZE) == b"f" * (3 * BLOCK_SIZE)
                assert volume.fsck() == []
    else:
        raise AssertionError("the open never finished")
    assert formats.get(2) and formats.get(FORMAT_VERSION), formats  # cuts before and after the commit
