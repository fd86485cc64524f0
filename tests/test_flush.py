"""Cache-pressure flushes: fresh sectors go home encrypted without a commit.

When too many dirty sectors pile up, `MerkleStore` writes the ones that were free in the last
commit home (no log record, no sync) and keeps only the hash of their ciphertext; the next
commit's record carries them. These tests pin the promises that must survive that shortcut:
reads before the commit return the data and catch tampering, a crash before the commit loses
only uncommitted data (the sectors read as zeros again), and the next commit, whichever path
it takes, makes them durable.
"""

from __future__ import annotations

import errno
import os
import random
import threading

import pytest
from test_integrity import SEGMENT_OFFSET, UUID, Image, read_all

from storage.blockdev import MemoryBlockDevice
from storage.errors import IntegrityError
from storage.integrity import SECTOR_SIZE, DataSegment, MerkleLayout, MerkleStore
from storage.xts import SectorCipher

PRESSURE = 48  # dirty sectors that trigger a flush (the real limit is 16 MiB: too big for tests)


def pressured(store: MerkleStore) -> MerkleStore:
    """The store with a small dirty-memory limit, so that a few hundred writes flush."""
    store._memory_limit = PRESSURE
    return store


def crashed_copy(image: Image) -> MerkleStore:
    """The image as a crash right now would leave it, opened read-only."""
    snapshot = image.device.snapshot()
    device = MemoryBlockDevice(len(snapshot), initial=snapshot)
    segment = DataSegment(device, SEGMENT_OFFSET, image.segment.sectors * SECTOR_SIZE, SectorCipher(image.key))
    return MerkleStore.open(segment, image.key, UUID, writable=False)


def assert_reopens_with(image: Image, store: MerkleStore, contents: dict[int, bytes]) -> None:
    """Close `store`; the image reopens with exactly `contents` and a clean fsck."""
    store.close()
    reopened = image.open()
    assert read_all(reopened, contents) == []
    assert reopened.check() == []


def write_fresh(store: MerkleStore, sectors: range, seed: int) -> dict[int, bytes]:
    rng = random.Random(seed)
    contents = {sector: rng.randbytes(SECTOR_SIZE) for sector in sectors}
    for sector, data in contents.items():
        store.write(sector, data)
    return contents


def test_flushed_sectors_read_back_and_commit_once() -> None:
    image = Image(8 << 20)
    store = pressured(image.format())
    generation = store.state().generation
    contents = write_fresh(store, range(10, 10 + 6 * PRESSURE), seed=1)
    assert len(store._flushed) == 6 * PRESSURE and not store._dirty  # all flushed: nothing dirty
    assert store.state().generation == generation  # a flush is not a commit
    assert read_all(store, contents) == []  # before the commit: from home, checked
    state = store.commit()
    assert state.generation == generation + 1
    assert not store._flushed
    assert read_all(store, contents) == []
    assert_reopens_with(image, store, contents)


def test_a_crash_before_the_commit_leaves_the_last_commit() -> None:
    image = Image(8 << 20)
    store = pressured(image.format())
    committed = write_fresh(store, range(0, 20), seed=2)
    state = store.commit()
    fresh = write_fresh(store, range(100, 400), seed=3)
    assert store._flushed
    crashed = crashed_copy(image)
    assert crashed.state() == state
    assert crashed.check() == []
    assert read_all(crashed, committed) == []
    for sector in list(store._flushed)[:20]:  # flushed but never committed: free again
        assert crashed.read(sector, 1) == bytes(SECTOR_SIZE)
    store.commit()
    after = crashed_copy(image)
    assert read_all(after, {**committed, **fresh}) == []


def test_a_changed_flushed_sector_is_an_integrity_error_before_and_after_the_commit() -> None:
    image = Image(8 << 20)
    store = pressured(image.format())
    contents = write_fresh(store, range(0, 200), seed=4)
    victim = min(store._flushed)
    data_start = MerkleLayout.for_sectors(image.segment.sectors).data_start
    where = image.sector_offset(data_start + victim) + 100
    original = image.device.read(where, 1)
    image.device.write(where, bytes([original[0] ^ 0x40]))
    with pytest.raises(IntegrityError):
        store.read(victim, 1)
    out = bytearray(8 * SECTOR_SIZE)
    with pytest.raises(IntegrityError):
        store.read_into(victim, out)
    image.device.write(where, original)
    assert read_all(store, contents) == []
    store.commit()
    image.device.write(where, bytes([original[0] ^ 0x40]))
    with pytest.raises(IntegrityError):
        store.read(victim, 1)
    image.device.write(where, original)
    store.close()


def test_flushed_sectors_written_again_keep_the_newest_contents() -> None:
    image = Image(8 << 20)
    store = pressured(image.format())
    contents = write_fresh(store, range(0, 200), seed=5)
    rewritten = sorted(store._flushed)[:30]
    for sector in rewritten:
        contents[sector] = os.urandom(SECTOR_SIZE)
        store.write(sector, contents[sector])
    assert read_all(store, contents) == []
    store.commit()
    assert_reopens_with(image, store, contents)


def test_sectors_flushed_twice_commit_their_last_contents() -> None:
    """A fresh sector flushed, written again and flushed again before any commit: the commit
    lists it once, with the hash of what the second flush wrote (the bulk runs the flushes
    keep hold it twice, so the commit must not take them as they are)."""
    image = Image(8 << 20)
    store = pressured(image.format())
    sectors = range(0, 2 * PRESSURE, 2)  # runs of one sector: each is in two flushes' runs
    contents = write_fresh(store, sectors, seed=11)
    first_flush = dict(store._flushed)
    contents.update(write_fresh(store, sectors, seed=12))
    assert store._flushed.keys() == first_flush.keys() and store._flushed != first_flush  # flushed again
    contents.update(write_fresh(store, range(1000, 1010), seed=13))
    assert read_all(store, contents) == []
    store.commit()
    assert not store._flushed and not store._flushed_runs
    assert_reopens_with(image, store, contents)


def test_flushes_of_separate_runs_commit_in_one_record() -> None:
    """Several flushes of runs that do not overlap (the streaming case: the commit takes the
    flushes' runs in bulk), out of order and with a gap, all reach the committed tree."""
    image = Image(8 << 20)
    store = pressured(image.format())
    contents = write_fresh(store, range(600, 600 + PRESSURE), seed=14)
    contents.update(write_fresh(store, range(100, 100 + PRESSURE), seed=15))
    contents.update(write_fresh(store, range(100 + PRESSURE + 7, 100 + 2 * PRESSURE + 7), seed=16))
    assert len(store._flushed) == 3 * PRESSURE and not store._dirty
    store.commit()
    assert crashed_copy(image).check() == []
    assert read_all(crashed_copy(image), contents) == []
    assert_reopens_with(image, store, contents)


def test_logged_sectors_stay_dirty_through_a_flush() -> None:
    """Overwrites of committed sectors need the log: a flush leaves them dirty (their plaintext
    copied out of the reused staging arena) and the commit logs them."""
    image = Image(8 << 20)
    store = pressured(image.format())
    contents = write_fresh(store, range(0, 20), seed=6)
    store.commit()
    for sector in range(0, 20):
        contents[sector] = os.urandom(SECTOR_SIZE)
        store.write(sector, contents[sector])
    contents.update(write_fresh(store, range(500, 700), seed=7))
    assert store._flushed
    assert set(range(20)) <= store._dirty.keys()
    assert read_all(store, contents) == []
    store.commit()
    assert_reopens_with(image, store, contents)


def test_a_commit_with_nothing_dirty_still_commits_the_flushed_sectors() -> None:
    image = Image(8 << 20)
    store = pressured(image.format())
    contents = write_fresh(store, range(0, 4 * PRESSURE), seed=10)
    assert store._flushed and not store._dirty
    store.commit()
    assert read_all(crashed_copy(image), contents) == []


def test_small_commits_after_a_flush_still_carry_the_flushed_sectors() -> None:
    """A one-sector overwrite would normally take the small-record path, which lists only its
    own sectors; with flushed sectors pending, the commit must carry them too."""
    image = Image(8 << 20)
    store = pressured(image.format())
    contents = write_fresh(store, range(0, 4), seed=8)
    store.commit()
    contents.update(write_fresh(store, range(300, 300 + 4 * PRESSURE), seed=9))
    assert store._flushed and not store._dirty
    contents[2] = os.urandom(SECTOR_SIZE)
    store.write(2, contents[2])
    store.commit()
    assert not store._flushed
    assert read_all(crashed_copy(image), contents) == []


def test_a_flush_syncs_in_the_background_and_the_next_commit_waits_for_that_sync(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The flush starts an fdatasync on the writer thread and returns before it ends; the next
    commit does not write its record before that sync has finished."""
    image = Image(8 << 20)
    store = pressured(image.format())
    generation = store.state().generation
    events: list[tuple[str, str]] = []
    real_sync, real_write = image.device.sync, image.device.write
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def slow_sync() -> None:  # a slow disk, until the test releases it
        thread = threading.current_thread().name
        events.append(("sync start", thread))
        if thread != "MainThread":
            started.set()
            release.wait(10)
            finished.set()
        real_sync()
        events.append(("sync end", thread))

    def logged_write(offset: int, data: bytes | bytearray | memoryview) -> None:
        events.append(("write", threading.current_thread().name))
        real_write(offset, data)

    monkeypatch.setattr(image.device, "sync", slow_sync)
    contents = write_fresh(store, range(10, 10 + PRESSURE), seed=11)  # exactly one flush
    assert started.wait(10) and not finished.is_set()  # returned with the sync running ...
    assert events == [("sync start", events[0][1])] and events[0][1].startswith("keepshim-home")
    assert store.state().generation == generation  # ... and nothing was committed
    monkeypatch.setattr(image.device, "write", logged_write)
    release.set()
    store.commit()
    background_end = events.index(("sync end", events[0][1]))
    first_commit_write = next(index for index, event in enumerate(events) if event[0] == "write")
    assert background_end < first_commit_write  # the commit waited for the background sync
    monkeypatch.undo()
    assert read_all(crashed_copy(image), contents) == []


def test_a_failed_background_sync_fails_every_later_commit_and_loses_nothing_committed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After a background fdatasync failed, the kernel may have dropped the flushed pages, so
    no later commit may claim them durable: every commit (and flush) raises EIO, and the image
    keeps its last commit."""
    image = Image(8 << 20)
    store = pressured(image.format())
    committed = write_fresh(store, range(0, 20), seed=12)
    state = store.commit()
    real_sync = image.device.sync

    def failing_in_the_background() -> None:
        if threading.current_thread().name != "MainThread":
            raise OSError(errno.EIO, "Input/output error")
        real_sync()

    monkeypatch.setattr(image.device, "sync", failing_in_the_background)
    write_fresh(store, range(100, 100 + PRESSURE), seed=13)  # one flush, its sync fails
    for _ in range(2):
        with pytest.raises(OSError) as failure:
            store.commit()
        assert failure.value.errno == errno.EIO and "reopen" in str(failure.value)
    with pytest.raises(OSError):  # the next flush too
        write_fresh(store, range(300, 300 + PRESSURE), seed=14)
    crashed = crashed_copy(image)
    assert crashed.state() == state and crashed.check() == []
    assert read_all(crashed, committed) == []
