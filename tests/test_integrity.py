"""The integrity layer catches every change the host can make to the data segment.

Everything runs on a MemoryBlockDevice with the real XTS cipher: the host's powers are modelled as
byte flips, sector swaps, old copies of a sector and old copies of the whole image.
"""

from __future__ import annotations

import mmap
import os
import random

import pytest

from storage import integrity as integrity_module
from storage.blockdev import MemoryBlockDevice
from storage.errors import IntegrityError, NoSpace, RollbackError
from storage.integrity import SECTOR_SIZE, DataSegment, MerkleLayout, MerkleStore
from storage.xts import SectorCipher

UUID = "3f0c5a52-2b57-4c8e-9d35-6a1f8e1b7c10"
SEGMENT_OFFSET = 64 * 1024


class Image:
    """A device holding one data segment, plus the key, so a test can reopen it at will."""

    def __init__(self, segment_bytes: int = 2 << 20) -> None:
        self.key = os.urandom(64)
        self.device = MemoryBlockDevice(SEGMENT_OFFSET + segment_bytes)
        self.segment = DataSegment(self.device, SEGMENT_OFFSET, segment_bytes, SectorCipher(self.key))

    def format(self) -> MerkleStore:
        return MerkleStore.format(self.segment, self.key, UUID)

    def open(self, *, writable: bool = False, expected_generation: int | None = None) -> MerkleStore:
        return MerkleStore.open(self.segment, self.key, UUID, writable=writable,
                                expected_generation=expected_generation)

    def sector_offset(self, segment_sector: int) -> int:
        return SEGMENT_OFFSET + segment_sector * SECTOR_SIZE


def populate(image: Image, seed: int = 1) -> dict[int, bytes]:
    """Fill every data sector with distinct random contents over several commits."""
    rng = random.Random(seed)
    store = image.format()
    contents: dict[int, bytes] = {}
    for sector in range(store.sector_count):
        contents[sector] = rng.randbytes(SECTOR_SIZE)
        store.write(sector, contents[sector])
        if sector % 50 == 49:
            store.commit()
    store.close()
    return contents


def read_all(store: MerkleStore, contents: dict[int, bytes]) -> list[int]:
    """Read every sector of `contents` (in runs of 32, then one by one inside a run that
    fails); assert no wrong data is ever returned; return the sectors that raised."""
    failed = []
    sectors = sorted(contents)
    runs: list[list[int]] = []
    for sector in sectors:
        if runs and runs[-1][-1] == sector - 1 and len(runs[-1]) < 32:
            runs[-1].append(sector)
        else:
            runs.append([sector])
    for run in runs:
        try:
            data = store.read(run[0], len(run))
        except IntegrityError:
            pass
        else:
            assert data == b"".join(contents[s] for s in run), f"wrong data in sectors {run}"
            continue
        for sector in run:
            try:
                data = store.read(sector, 1)
            except IntegrityError:
                failed.append(sector)
                continue
            assert data == contents[sector], f"sector {sector} returned wrong data"
    return failed


def test_roundtrip_across_reopen() -> None:
    image = Image()
    contents = populate(image)
    store = image.open()
    assert read_all(store, contents) == []
    assert store.read(3, 4) == b"".join(contents[s] for s in range(3, 7))
    assert store.check() == []


@pytest.mark.slow
def test_a_thousand_random_byte_flips_are_all_caught() -> None:
    image = Image(1 << 20)  # 188 data sectors over two leaf pages, so the tree has two levels
    contents = populate(image)
    layout = MerkleLayout.for_sectors(image.segment.sectors)
    rng = random.Random(7)
    caught_at_open = caught_on_read = harmless = 0
    for _ in range(1000):
        segment_sector = rng.randrange(layout.total)
        offset = image.sector_offset(segment_sector) + rng.randrange(SECTOR_SIZE)
        original = image.device.read(offset, 1)
        image.device.write(offset, bytes([original[0] ^ rng.randrange(1, 256)]))
        try:
            try:
                store = image.open()
            except IntegrityError:
                # only metadata (superblocks, leaf pages) can make the open fail
                assert segment_sector < layout.data_start
                caught_at_open += 1
                continue
            failed = read_all(store, contents)
            if segment_sector >= layout.data_start:
                assert failed == [segment_sector - layout.data_start]
                caught_on_read += 1
            else:
                assert failed == []  # an unused log sector or the older superblock
                harmless += 1
        finally:
            image.device.write(offset, original)
    assert caught_on_read > 600 and caught_at_open > 0 and harmless > 0


def test_flips_in_live_log_records_are_caught_when_the_generation_is_pinned() -> None:
    image = Image()
    store = image.format()
    rng = random.Random(3)
    contents = {}
    for sector in range(0, 6):  # first written while free: they go home, then a checkpoint
        store.write(sector, rng.randbytes(SECTOR_SIZE))
    store.close()
    store = image.open(writable=True)
    for sector in range(0, 6):  # below the cache limit: one record of 1 + 6 sectors
        contents[sector] = rng.randbytes(SECTOR_SIZE)
        store.write(sector, contents[sector])
    latest = store.commit()  # logged, not checkpointed: the crash image has a live record
    assert latest.generation == 3
    crashed = image.device.snapshot()
    layout = store.layout
    record_sectors = range(layout.log_start, layout.log_start + 1 + 6)
    for segment_sector in record_sectors:
        image.device.restore(crashed)
        offset = image.sector_offset(segment_sector) + rng.randrange(SECTOR_SIZE)
        image.device.write(offset, bytes([image.device.read(offset, 1)[0] ^ 0x40]))
        with pytest.raises((IntegrityError, RollbackError)):
            image.open(expected_generation=latest.generation)
    image.device.restore(crashed)
    reopened = image.open(expected_generation=latest.generation)
    assert read_all(reopened, contents) == []


def test_flips_in_the_home_sectors_of_a_live_record_are_caught_when_pinned() -> None:
    """Sectors free before a commit go straight home; the live record's header holds only their
    hashes. A change to the header or to any of those home sectors makes the record torn, so
    the volume reopens one generation back: refused when the newest generation is pinned."""
    image = Image()
    store = image.format()
    rng = random.Random(4)
    contents = {sector: rng.randbytes(SECTOR_SIZE) for sector in range(10, 16)}
    for sector, data in contents.items():
        store.write(sector, data)
    latest = store.commit()
    assert latest.generation == 2
    crashed = image.device.snapshot()
    layout = store.layout
    targets = [layout.log_start] + [layout.data_start + sector for sector in contents]
    for segment_sector in targets:
        image.device.restore(crashed)
        offset = image.sector_offset(segment_sector) + rng.randrange(SECTOR_SIZE)
        image.device.write(offset, bytes([image.device.read(offset, 1)[0] ^ 0x40]))
        with pytest.raises(RollbackError):
            image.open(expected_generation=latest.generation)
        unpinned = image.open()  # the torn record is dropped: those sectors are free again
        assert unpinned.state().generation == 1
        assert unpinned.read(10, 6) == bytes(6 * SECTOR_SIZE)
        assert unpinned.check() == []
    image.device.restore(crashed)
    reopened = image.open(expected_generation=latest.generation)
    assert read_all(reopened, contents) == []
    assert reopened.check() == []


def test_swapped_sectors_are_caught() -> None:
    image = Image()
    contents = populate(image)
    data_start = MerkleLayout.for_sectors(image.segment.sectors).data_start
    first, second = image.sector_offset(data_start + 10), image.sector_offset(data_start + 11)
    a, b = image.device.read(first, SECTOR_SIZE), image.device.read(second, SECTOR_SIZE)
    image.device.write(first, b)
    image.device.write(second, a)
    store = image.open()
    assert read_all(store, contents) == [10, 11]


def test_an_old_copy_of_a_sector_is_caught() -> None:
    image = Image()
    contents = populate(image)
    data_start = MerkleLayout.for_sectors(image.segment.sectors).data_start
    offset = image.sector_offset(data_start + 5)
    old = image.device.read(offset, SECTOR_SIZE)
    store = image.open(writable=True)
    contents[5] = os.urandom(SECTOR_SIZE)
    store.write(5, contents[5])
    store.close()
    image.device.write(offset, old)
    assert read_all(image.open(), contents) == [5]


def test_an_older_image_is_refused_when_the_generation_is_pinned() -> None:
    image = Image()
    populate(image)
    old_image = image.device.snapshot()
    store = image.open(writable=True)
    store.write(0, os.urandom(SECTOR_SIZE))
    pinned = store.commit()
    store.close()
    image.device.restore(old_image)
    with pytest.raises(RollbackError):
        image.open(expected_generation=pinned.generation)
    # without a pin the old image is self-consistent: that is what the pin is for
    assert image.open().state().generation < pinned.generation


def test_commit_returns_a_new_generation_and_mac_only_when_something_changed() -> None:
    image = Image()
    store = image.format()
    first = store.commit()
    store.write(1, bytes(SECTOR_SIZE))
    second = store.commit()
    assert second.generation == first.generation + 1 and second.root_mac != first.root_mac
    assert store.commit() == second
    store.close()
    assert image.open().state() == second


def test_metadata_travels_with_commits() -> None:
    image = Image()
    store = image.format()
    store.metadata = b"sizes v1"
    store.write(0, bytes(SECTOR_SIZE))
    store.commit()
    crashed = image.device.snapshot()  # record logged but not checkpointed
    image.device.restore(crashed)
    assert image.open().metadata == b"sizes v1"


def test_writes_past_the_end_are_no_space_and_reads_past_it_fail() -> None:
    image = Image()
    store = image.format()
    with pytest.raises(NoSpace):
        store.write(store.sector_count, bytes(SECTOR_SIZE))
    with pytest.raises(IntegrityError):
        store.read(store.sector_count - 1, 2)


def test_wrong_key_finds_no_superblock() -> None:
    image = Image()
    populate(image)
    other = DataSegment(image.device, SEGMENT_OFFSET, image.segment.sectors * SECTOR_SIZE,
                        SectorCipher(os.urandom(64)))
    with pytest.raises(IntegrityError):
        MerkleStore.open(other, image.key, UUID, writable=False)


def test_many_commits_wrap_the_log_and_survive_reopen() -> None:
    image = Image()
    store = image.format()
    rng = random.Random(5)
    contents: dict[int, bytes] = {}
    for step in range(600):
        sector = rng.randrange(store.sector_count)
        contents[sector] = rng.randbytes(SECTOR_SIZE)
        store.write(sector, contents[sector])
        store.commit()
        if step % 97 == 0:
            snapshot = image.device.snapshot()
            reopened_device = MemoryBlockDevice(len(snapshot), initial=snapshot)
            segment = DataSegment(reopened_device, SEGMENT_OFFSET, image.segment.sectors * SECTOR_SIZE,
                                  SectorCipher(image.key))
            crashed = MerkleStore.open(segment, image.key, UUID, writable=False)
            assert read_all(crashed, contents) == []
    store.close()
    assert read_all(image.open(), contents) == []


def test_sequential_read_into_reads_ahead_but_never_hides_a_change() -> None:
    """Sequential `read_into` calls read, check and decrypt ahead of the caller. A changed sector
    past the ones asked for fails only its own read; a sector written (and later committed and
    checkpointed home) after or before the read-ahead reads back as written."""
    image = Image()
    contents = populate(image)
    data_start = MerkleLayout.for_sectors(image.segment.sectors).data_start
    store = image.open(writable=True)
    out = bytearray(8 * SECTOR_SIZE)

    def expect(first: int) -> None:
        store.read_into(first, out)
        assert out == b"".join(contents[s] for s in range(first, first + 8)), f"sectors from {first}"

    flipped = image.sector_offset(data_start + 44)
    original = image.device.read(flipped, 1)
    image.device.write(flipped, bytes([original[0] ^ 1]))
    for first in range(0, 40, 8):  # from the second call on, the reads run ahead over sector 44
        expect(first)
    with pytest.raises(IntegrityError):
        store.read_into(40, out)
    image.device.write(flipped, original)
    expect(40)
    expect(48)  # the read-ahead now covers the sectors after 48
    contents[60] = os.urandom(SECTOR_SIZE)
    store.write(60, contents[60])  # inside the read-ahead
    expect(56)
    contents[90] = os.urandom(SECTOR_SIZE)
    store.write(90, contents[90])  # dirty before the next read-ahead reaches it
    expect(64)
    expect(72)
    # enough logged sectors (outside the read-ahead) for commits to checkpoint sector 90 home
    for sector in [*range(40), *range(330, store.sector_count)]:
        contents[sector] = os.urandom(SECTOR_SIZE)
        store.write(sector, contents[sector])
    store.commit()
    for first in range(80, 120, 8):
        expect(first)
    store.close()
    assert read_all(image.open(), contents) == []


@pytest.mark.parametrize("refuse", ["nothing", "madvise", "mmap"])
def test_prefaulted_memory_is_zeroed_and_writable_whatever_the_kernel_refuses(
        refuse: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The staging arena's allocator (`_anonymous_memory(populate=True)`): huge pages populated
    in one call, else MAP_POPULATE, else plain memory; every way gives `size` zero bytes that
    take writes. Without `populate` (the log image), one mapping and never MAP_POPULATE."""
    real_mmap = mmap.mmap
    calls: list[int] = []

    class Refusing(real_mmap):  # type: ignore[misc, valid-type]
        def madvise(self, *args: int) -> None:
            raise OSError(22, "Invalid argument")

    def fake_mmap(fileno: int, length: int, flags: int = 0) -> mmap.mmap:
        calls.append(flags)
        if refuse == "mmap":
            raise OSError(12, "Cannot allocate memory")
        return (Refusing if refuse == "madvise" else real_mmap)(fileno, length, flags=flags)

    monkeypatch.setattr(mmap, "mmap", fake_mmap)
    size = 3 * SECTOR_SIZE + 100
    area = integrity_module._anonymous_memory(size, populate=True)
    assert len(area) == size and not area.readonly and area.tobytes() == bytes(size)
    area[size - 5:] = b"hello"
    assert area[size - 5:].tobytes() == b"hello"
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if refuse == "madvise":  # the huge-page attempt, then MAP_POPULATE
        assert len(calls) == 2 and not calls[0] & populate and calls[1] & populate
    elif refuse == "nothing" and hasattr(mmap, "MADV_HUGEPAGE"):
        assert len(calls) == 1 and not calls[0] & populate  # populated by madvise
    calls.clear()
    lazy = integrity_module._anonymous_memory(size, populate=False)
    assert len(lazy) == size and not lazy.readonly and lazy.tobytes() == bytes(size)
    assert len(calls) == 1 and not calls[0] & populate
