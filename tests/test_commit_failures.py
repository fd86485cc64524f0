"""A commit that fails leaves the store as it was after the last commit that succeeded.

The host's disk can refuse a write (ENOSPC under a sparse image, EIO) in the middle of a
commit. The commit then raises, and the in-memory tree must still be the last commit's: a
retry once the disk works again commits everything (the dirty sectors are all still there),
a checkpoint never writes hashes of the commit that failed, and the image always reopens at
its last commit. A failed fdatasync is different: the kernel may have dropped pages it reports
lost only once, so every later commit is refused ("reopen it") and reopening recovers the last
commit.
"""

from __future__ import annotations

import errno
import os
import random

import pytest
from test_integrity import SEGMENT_OFFSET, UUID, Image, read_all

from storage.blockdev import MemoryBlockDevice
from storage.integrity import SECTOR_SIZE, DataSegment, MerkleStore
from storage.xts import SectorCipher


class FailingWrites:
    """Makes the image's device refuse writes (and, with `sync`, fdatasyncs) while armed."""

    def __init__(self, image: Image, monkeypatch: pytest.MonkeyPatch, *, error: int = errno.ENOSPC) -> None:
        self.armed = False
        self.refused = 0
        device = image.device
        real_write, real_durable, real_sync = device.write, device.write_durable, device.sync
        self.sync_armed = False

        def refuse() -> None:
            self.refused += 1
            raise OSError(error, os.strerror(error))

        def write(offset: int, data: bytes | bytearray | memoryview) -> None:
            if self.armed:
                refuse()
            real_write(offset, data)

        def write_durable(offset: int, data: bytes | bytearray | memoryview) -> None:
            if self.armed:
                refuse()
            real_durable(offset, data)

        def sync() -> None:
            if self.sync_armed:
                refuse()
            real_sync()
        monkeypatch.setattr(device, "write", write)
        monkeypatch.setattr(device, "write_durable", write_durable)
        monkeypatch.setattr(device, "sync", sync)


def crashed_copy(image: Image) -> MerkleStore:
    """The image as a crash right now would leave it, opened read-only."""
    snapshot = image.device.snapshot()
    device = MemoryBlockDevice(len(snapshot), initial=snapshot)
    segment = DataSegment(device, SEGMENT_OFFSET, image.segment.sectors * SECTOR_SIZE, SectorCipher(image.key))
    return MerkleStore.open(segment, image.key, UUID, writable=False)


def write(store: MerkleStore, sectors: range | list[int], seed: int) -> dict[int, bytes]:
    rng = random.Random(seed)
    contents = {sector: rng.randbytes(SECTOR_SIZE) for sector in sectors}
    for sector, data in contents.items():
        store.write(sector, data)
    return contents


def test_a_commit_refused_by_the_disk_can_be_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """The general path: fresh sectors (written home) and overwrites (logged) in one commit
    whose writes fail; the retry commits them all, and the image reopens with them."""
    image = Image()
    store = image.format()
    contents = write(store, range(0, 40), seed=1)
    committed = store.commit()
    failing = FailingWrites(image, monkeypatch)
    contents.update(write(store, range(20, 60), seed=2))  # 20 overwrites, 20 fresh sectors
    failing.armed = True
    with pytest.raises(OSError) as refused:
        store.commit()
    assert refused.value.errno == errno.ENOSPC and failing.refused
    assert store.state() == committed
    assert crashed_copy(image).state() == committed
    assert read_all(store, contents) == []  # nothing lost in memory either
    failing.armed = False
    retried = store.commit()
    assert retried.generation == committed.generation + 1
    assert store.check() == []
    store.close()
    reopened = image.open()
    assert reopened.state() == retried and reopened.check() == []
    assert read_all(reopened, contents) == []


def test_a_small_commit_refused_by_the_disk_can_be_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """The small-record path (one overwrite, one direct write) fails at its durability point:
    the tree the native step had already updated is put back."""
    image = Image()
    store = image.format()
    contents = write(store, range(0, 8), seed=3)
    committed = store.commit()
    failing = FailingWrites(image, monkeypatch, error=errno.EIO)
    contents.update(write(store, [5], seed=4))
    failing.armed = True
    with pytest.raises(OSError):
        store.commit()
    assert failing.refused == 1 and store.state() == committed
    assert store.check() == []  # the in-memory tree matches the image's committed sectors again
    failing.armed = False
    retried = store.commit()
    assert retried.generation == committed.generation + 1
    store.close()
    reopened = image.open()
    assert reopened.state() == retried and read_all(reopened, contents) == []


def test_a_failed_commit_never_reaches_a_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry of a failed commit that first needs a checkpoint (log nearly full) writes the
    last commit's tree home, not the failed one's: the image reopens (before the fix it no
    longer did: the checkpointed leaves did not match the superblock's root MAC)."""
    image = Image()
    store = image.format()
    contents = write(store, [*range(60), 130], seed=5)
    store.commit()
    for round_ in range(40):  # logged overwrites fill the log close to its checkpoint mark
        contents.update(write(store, range(round_ % 7 * 5, round_ % 7 * 5 + 10), seed=100 + round_))
        store.commit()
        if store._log_position + 12 > store._checkpoint_position:
            break
    committed = store.state()
    failing = FailingWrites(image, monkeypatch)
    contents.update(write(store, [200], seed=6))  # a fresh sector
    failing.armed = True
    with pytest.raises(OSError):
        store.commit()
    failing.armed = False
    with store.hold():
        contents.update(write(store, range(60), seed=7))  # enough logged sectors to need a checkpoint
    state = store.commit()
    assert state.generation == committed.generation + 1
    assert crashed_copy(image).check() == []
    store.close()
    reopened = image.open()
    assert reopened.state() == state and reopened.check() == []
    assert read_all(reopened, contents) == []


def test_a_failed_checkpoint_keeps_the_old_superblock_in_charge(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint's superblock write fails: nothing in memory moved (the log still starts
    where the old superblock says), so the next commit appends after the records it covers and
    the image reopens with everything."""
    image = Image()
    store = image.format()
    contents = write(store, range(0, 30), seed=8)
    store.commit()
    contents.update(write(store, range(0, 10), seed=12))  # logged: the checkpoint copies them home
    store.commit()
    real_superblock = store._write_superblock
    calls = []

    def failing_superblock(slot: int, log_position: int) -> None:
        calls.append(slot)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        real_superblock(slot, log_position)
    monkeypatch.setattr(store, "_write_superblock", failing_superblock)
    position, slot = store._log_position, store._superblock_slot
    with pytest.raises(OSError):
        store._checkpoint()
    assert (store._log_position, store._superblock_slot) == (position, slot) and store._pending
    contents.update(write(store, range(10, 20), seed=9))
    state = store.commit()
    store.close()
    reopened = image.open()
    assert reopened.state() == state and reopened.check() == []
    assert read_all(reopened, contents) == []


def test_a_failed_commit_fdatasync_refuses_every_later_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit's own fdatasync fails: that commit raises, every later one raises EIO
    ("reopen it"), and the image reopens at the last commit with its data."""
    image = Image()
    store = image.format()
    contents = write(store, range(0, 20), seed=10)
    committed = store.commit()
    failing = FailingWrites(image, monkeypatch, error=errno.EIO)
    write(store, range(100, 140), seed=11)
    failing.sync_armed = True
    with pytest.raises(OSError):
        store.commit()
    failing.sync_armed = False
    for _ in range(2):
        with pytest.raises(OSError) as later:
            store.commit()
        assert later.value.errno == errno.EIO and "reopen it" in str(later.value)
    crashed = crashed_copy(image)  # the failed commit's record may or may not have reached the disk
    assert crashed.state().generation in (committed.generation, committed.generation + 1)
    assert crashed.check() == [] and read_all(crashed, contents) == []
    with pytest.raises(OSError):
        store.close()  # its final commit is refused too; the store is closed all the same
    with pytest.raises(ValueError):
        store.commit()
    reopened = image.open()
    assert reopened.state() == crashed.state() and reopened.check() == []
