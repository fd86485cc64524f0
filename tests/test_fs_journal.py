"""SQLite's journal inside the filesystem: the rollback journal lives in memory (crash atomicity
comes from the store's commits), and volumes an older version wrote in WAL mode still open."""

from __future__ import annotations

from storage.blockdev import MemoryBlockDevice
from storage.fs import ROOT_INODE
from storage.luks2 import KdfCost
from storage.volume import create_volume, open_volume

PASSPHRASE = b"journal tests"
COST = KdfCost(iterations=1000)


def test_a_volume_left_in_wal_mode_with_unmerged_frames_opens_and_converts() -> None:
    device = MemoryBlockDevice(24 << 20)
    volume = create_volume(device, None, PASSPHRASE, pbkdf="pbkdf2", kdf_cost=COST)
    fs = volume.fs
    fs._db.execute("PRAGMA journal_mode=WAL")  # as every volume was before the memory journal
    ino = fs.create(ROOT_INODE, b"old").ino
    fs.write(ino, 0, b"written in WAL mode")
    fs.mkdir(ROOT_INODE, b"dir")
    assert fs._vfs.wal.size > 0  # the frames are not yet merged into the database
    volume.commit()
    crashed = device.snapshot()  # the process dies: no checkpoint at close
    volume.close()
    read_only = MemoryBlockDevice(device.size, initial=crashed, writable=False)
    with open_volume(read_only, PASSPHRASE, writable=False) as reopened:
        assert reopened.fs.read(ino, 0, 100) == b"written in WAL mode"
        assert reopened.fsck() == []
    device.restore(crashed)
    with open_volume(device, PASSPHRASE) as reopened:
        assert reopened.fs._vfs.wal.size == 0  # merged, and the journal is in memory from now on
        assert reopened.fs.read(ino, 0, 100) == b"written in WAL mode"
        assert reopened.fs.lookup(ROOT_INODE, b"dir").is_dir
        reopened.fs.write(reopened.fs.create(ROOT_INODE, b"new").ino, 0, b"after")
        assert reopened.fsck() == []
    with open_volume(device, PASSPHRASE) as again:
        assert again.fs.read(again.fs.lookup(ROOT_INODE, b"new").ino, 0, 10) == b"after"
        assert again.fs.read(ino, 0, 100) == b"written in WAL mode"
        assert again.fsck() == []
