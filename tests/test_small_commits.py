"""MerkleStore's small-commit path (`_append_small_record`): a commit of a few logged sectors.

It must be an optimisation only: the same log records, byte for byte, as the general
`_append_record`, recovered by the same code. The first test runs one workload twice on memory
devices, with and without the small path, and compares the whole image after every commit (the
small path both with its native step, `ks_small_commit`, and with its Python one); the second
writes through an image file (where the record goes out as a direct write) and recovers a copy
of the image taken between commits, as a crash would leave it. Then: a flipped byte anywhere in
a live small record is caught, and a crash right after the durable write keeps the commit.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from storage.blockdev import FileBlockDevice, MemoryBlockDevice
from storage.errors import IntegrityError, RollbackError
from storage.integrity import SECTOR_SIZE, DataSegment, MerkleStore
from storage.xts import SectorCipher

UUID = "0b7a9d52-51c6-4b2e-9a61-5d0c4e8f7a13"
SEGMENT_BYTES = 1 << 20  # a 64-sector log: checkpoints and full-log fallbacks come often


def _workload(store: MerkleStore, rng: random.Random, after_commit: Callable[[], None]) -> dict[int, bytes]:
    """Mostly commits of 1-4 overwritten sectors, some with fresh (never written) sectors or
    new client metadata; returns the expected contents."""
    model: dict[int, bytes] = {}
    written = list(range(48))
    data = rng.randbytes(48 * SECTOR_SIZE)
    store.write(0, data)
    for sector in written:
        model[sector] = data[sector * SECTOR_SIZE:(sector + 1) * SECTOR_SIZE]
    store.commit()
    after_commit()
    fresh = 48
    for _ in range(300):
        for sector in rng.sample(written, rng.randrange(1, 5)):
            model[sector] = rng.randbytes(SECTOR_SIZE)
            store.write(sector, model[sector])
        if rng.random() < 0.1 and fresh < store.sector_count:
            model[fresh] = rng.randbytes(SECTOR_SIZE)
            store.write(fresh, model[fresh])
            written.append(fresh)
            fresh += 1
        if rng.random() < 0.2:
            store.metadata = rng.randbytes(rng.randrange(0, 1025))
        store.commit()
        after_commit()
    return model


@pytest.mark.parametrize("integrity_format", [2, 1])
@pytest.mark.parametrize("native_step", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_small_commits_write_the_same_bytes_as_the_general_path(seed: int, native_step: bool, integrity_format: int,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    key = random.Random(seed).randbytes(64)
    small_path = MerkleStore._append_small_record
    taken = 0

    def counting(store: MerkleStore) -> bool:
        nonlocal taken
        done = small_path(store)
        taken += done
        return done

    def run(small: bool) -> tuple[list[bytes], MemoryBlockDevice]:
        device = MemoryBlockDevice(SEGMENT_BYTES)
        store = MerkleStore.format(DataSegment(device, 0, SEGMENT_BYTES, SectorCipher(key)), key, UUID,
                                   integrity_format=integrity_format)
        assert (store._small is not None) == SectorCipher(key).native  # the native step is there when built
        if not native_step:
            store._small = None  # `_small_record_in_python`
        images: list[bytes] = []
        with monkeypatch.context() as patch:
            patch.setattr(MerkleStore, "_append_small_record", counting if small else lambda store: False)
            _workload(store, random.Random(seed),
                      lambda: images.append(hashlib.sha256(device.snapshot()).digest()))
        return images, device

    general, _ = run(small=False)
    assert taken == 0
    small, device = run(small=True)
    assert taken > 200  # the path under test did run
    assert small == general
    # and the image left by small commits recovers (the log replayed at open)
    store = MerkleStore.open(DataSegment(device, 0, SEGMENT_BYTES, SectorCipher(key)), key, UUID, writable=False)
    assert store.integrity_format == integrity_format  # as the superblock says
    model = _workload(MerkleStore.format(DataSegment(MemoryBlockDevice(SEGMENT_BYTES), 0, SEGMENT_BYTES,
                                                     SectorCipher(key)), key, UUID, integrity_format=integrity_format),
                      random.Random(seed), lambda: None)
    assert {sector: store.read(sector, 1) for sector in model} == model
    assert store.check() == []


def test_an_image_file_copied_between_small_commits_recovers_them(tmp_path: Path) -> None:
    """The records reach the image through the direct-write path; a copy of the image (read
    through the page cache, as recovery reads) taken at random moments between commits opens
    at exactly the last commit before it."""
    key = os.urandom(64)
    image = tmp_path / "image"
    rng = random.Random(7)
    copies: list[tuple[Path, int]] = []
    with FileBlockDevice(image, writable=True, create_size=SEGMENT_BYTES) as device:
        store = MerkleStore.format(DataSegment(device, 0, SEGMENT_BYTES, SectorCipher(key)), key, UUID)
        states: list[dict[int, bytes]] = []
        model: dict[int, bytes] = {}

        def snapshot() -> None:
            states.append(dict(model))
            if rng.random() < 0.05:
                copy = tmp_path / f"copy{len(copies)}"
                shutil.copyfile(image, copy)
                copies.append((copy, len(states) - 1))

        for sector in range(32):
            model[sector] = rng.randbytes(SECTOR_SIZE)
            store.write(sector, model[sector])
        store.commit()
        snapshot()
        for _ in range(200):
            for sector in rng.sample(range(32), rng.randrange(1, 3)):
                model[sector] = rng.randbytes(SECTOR_SIZE)
                store.write(sector, model[sector])
            store.commit()
            snapshot()
    assert copies
    for copy, index in copies:
        with FileBlockDevice(copy, writable=False) as reader:
            recovered = MerkleStore.open(DataSegment(reader, 0, SEGMENT_BYTES, SectorCipher(key)), key, UUID,
                                         writable=False)
            assert recovered.state().generation == index + 2  # format is generation 1
            assert {sector: recovered.read(sector, 1) for sector in states[index]} == states[index]


def _live_small_record(device: MemoryBlockDevice, key: bytes,
                       integrity_format: int = 2) -> tuple[MerkleStore, dict[int, bytes], int]:
    """A volume whose last commit is a small record of two overwritten sectors, not yet
    checkpointed; returns the store, the expected contents and the generation to pin."""
    store = MerkleStore.format(DataSegment(device, 0, SEGMENT_BYTES, SectorCipher(key)), key, UUID,
                               integrity_format=integrity_format)
    rng = random.Random(11)
    contents = {sector: rng.randbytes(SECTOR_SIZE) for sector in range(8)}
    store.write(0, b"".join(contents.values()))
    store.close()  # checkpointed: the sectors have committed content, so overwrites are logged
    store = MerkleStore.open(DataSegment(device, 0, SEGMENT_BYTES, SectorCipher(key)), key, UUID, writable=True)
    for sector in (3, 5):
        contents[sector] = rng.randbytes(SECTOR_SIZE)
        store.write(sector, contents[sector])
    small_path = store._log_position
    latest = store.commit()
    assert store._log_position == small_path + 3  # one small record: header and two sectors
    return store, contents, latest.generation


@pytest.mark.parametrize("integrity_format", [2, 1])
def test_a_flip_anywhere_in_a_live_small_record_is_caught(integrity_format: int) -> None:
    """Header (entries, root, both MACs, and the zero padding: MAC'd in format 1, required to
    be zeros in format 2) and logged ciphertext of a small record are all checked: any flipped
    byte makes the record invalid, so a pinned open refuses the image; the untouched image
    opens at the pinned generation with the new contents."""
    key = os.urandom(64)
    device = MemoryBlockDevice(SEGMENT_BYTES)
    store, contents, generation = _live_small_record(device, key, integrity_format)
    record_start = store.layout.log_start + store._log_position - 3
    crashed = device.snapshot()
    rng = random.Random(5)
    header_bytes = 1024  # the header's fields, metadata and entries lie in its first KiB
    for segment_sector in range(record_start, record_start + 3):
        for flip in range(6):
            device.restore(crashed)
            # in the header: twice in its body, twice in its padding, twice anywhere
            low, high = ((0, header_bytes) if flip < 2 else (header_bytes, SECTOR_SIZE - 32) if flip < 4
                         else (0, SECTOR_SIZE)) if segment_sector == record_start else (0, SECTOR_SIZE)
            offset = segment_sector * SECTOR_SIZE + rng.randrange(low, high)
            device.write(offset, bytes([device.read(offset, 1)[0] ^ (1 << rng.randrange(8))]))
            with pytest.raises((IntegrityError, RollbackError)):
                MerkleStore.open(DataSegment(device, 0, SEGMENT_BYTES, SectorCipher(key)), key, UUID,
                                 writable=False, expected_generation=generation)
    device.restore(crashed)
    reopened = MerkleStore.open(DataSegment(device, 0, SEGMENT_BYTES, SectorCipher(key)), key, UUID,
                                writable=False, expected_generation=generation)
    assert {sector: reopened.read(sector, 1) for sector in contents} == contents
    assert reopened.check() == []


def test_a_crash_right_after_the_durable_write_keeps_the_small_commit() -> None:
    """The image as it is the moment `write_durable` returns (nothing written after it, the
    in-memory bookkeeping never done) recovers the acknowledged commit."""
    key = os.urandom(64)
    images: list[bytes] = []

    class CrashAfterDurableWrite(MemoryBlockDevice):
        def write_durable(self, offset: int, data: bytes | bytearray | memoryview) -> None:
            super().write_durable(offset, data)
            images.append(self.snapshot())

    device = CrashAfterDurableWrite(SEGMENT_BYTES)
    _, contents, generation = _live_small_record(device, key)
    device.restore(images[-1])
    recovered = MerkleStore.open(DataSegment(device, 0, SEGMENT_BYTES, SectorCipher(key)), key, UUID,
                                 writable=False, expected_generation=generation)
    assert recovered.state().generation == generation
    assert {sector: recovered.read(sector, 1) for sector in contents} == contents


def test_the_native_step_refuses_what_its_c_contract_forbids() -> None:
    """`NativeSmallCommit.run` hands raw addresses and offsets to C: a sector outside the
    bound tree, too many or no sectors, a negative or out-of-range header sector, metadata that
    pushes the entries into the MAC, a record that does not fit the log image where it would be,
    or no bound tree at all, is a ValueError before any native work (the log image and the tree
    are left as they were)."""
    key = os.urandom(64)
    store = MerkleStore.format(DataSegment(MemoryBlockDevice(SEGMENT_BYTES), 0, SEGMENT_BYTES, SectorCipher(key)),
                               key, UUID)
    small = store._small
    if small is None:
        pytest.skip("the native loops are not built")
    leaves = len(store._levels[0]) // 32
    before = (bytes(store._log_image), [bytes(level) for level in store._levels])
    with pytest.raises(ValueError):
        small.run([0], 0, 2, 0)  # nothing bound yet
    assert small.bind(store._levels)
    last = len(store._log_image) // SECTOR_SIZE - 1  # the log image's last sector
    for sectors, slot, header, metadata in [
            ([leaves], 0, 2, 0), ([-1], 0, 2, 0), ([], 0, 2, 0), ([0, 1, 2, 3, 4], 0, 2, 0), ([0], 0, -1, 0),
            ([0], 0, 1 << 61, 0), ([0], 0, 2, -1), ([0, 1, 2, 3], 0, 2, 3900),
            ([0], -1, 2, 0), ([0], last, 2, 0), ([0, 1], last - 1, 2, 0), ([0], 1 << 62, 2, 0)]:
        with pytest.raises(ValueError):
            small.run(sectors, slot, header, metadata)
    assert (bytes(store._log_image), [bytes(level) for level in store._levels]) == before
    small.run([0], last - 1, 2, 0)  # the last place a one-sector record fits: accepted
    assert bytes(store._log_image[(last - 1) * SECTOR_SIZE:]) != bytes(2 * SECTOR_SIZE)
    assert not small.bind([bytearray(SECTOR_SIZE)])  # one level: not a tree it handles
    assert small.bind(store._levels)
    store.close()  # frees the native step's HMAC context: no more runs
    assert store._small is None
    with pytest.raises(ValueError):
        small.run([0], 0, 2, 0)


@pytest.mark.parametrize("native_step", [True, False])
def test_logged_sectors_read_back_from_the_log_image_until_the_checkpoint(native_step: bool) -> None:
    """A small commit leaves its logged sectors' ciphertext where it assembled the record (the
    store's log image) and reads decrypt it from there: every overwritten sector reads back as
    last written after each commit, with later records never clobbering earlier ones' sectors,
    through the checkpoint that empties the log and after recovery (which logs ciphertext read
    from the disk instead)."""
    key = os.urandom(64)
    device = MemoryBlockDevice(SEGMENT_BYTES)
    store = MerkleStore.format(DataSegment(device, 0, SEGMENT_BYTES, SectorCipher(key)), key, UUID)
    if not native_step:
        store._small = None  # `_small_record_in_python`
    rng = random.Random(5)
    model = {sector: rng.randbytes(SECTOR_SIZE) for sector in range(16)}
    store.write(0, b"".join(model.values()))
    store.commit()
    checkpoints = 0
    for _ in range(60):
        for sector in rng.sample(range(16), rng.randrange(1, 4)):
            model[sector] = rng.randbytes(SECTOR_SIZE)
            store.write(sector, model[sector])
        before = store._log_position
        store.commit()
        checkpoints += store._log_position < before
        logged = [sector for sector, cipher in store._pending.items() if isinstance(cipher, memoryview)]
        assert logged or not store._pending  # small records' sectors stay in the log image
        assert all(store.read(sector, 1) == model[sector] for sector in range(16))
        assert store.read(0, 16) == b"".join(model.values())
    assert checkpoints >= 2  # the 64-sector log filled up several times
    copy = MemoryBlockDevice(SEGMENT_BYTES)
    copy._data[:] = device._data  # the image as a crash would leave it: the log not yet checkpointed
    recovered = MerkleStore.open(DataSegment(copy, 0, SEGMENT_BYTES, SectorCipher(key)), key, UUID, writable=False)
    assert recovered._pending  # replayed records: their sectors are read from the log's ciphertext
    assert recovered.read(0, 16) == b"".join(model.values())
    store.close()
