"""Review of integrity format 2 (0ec64d1): both tree formats under power cuts, tampering with
general records whose header spans several sectors, superblocks of the other format, and a
commit that carries metadata alone.

Power cuts: the device keeps the writes since the last sync apart and loses, keeps or tears
them at a cut (each 4 KiB piece kept or not). A random workload (small commits of 1..4
overwrites, runs of fresh and committed sectors, scattered batches whose records have
multi-sector headers, metadata up to the limit, cache-pressure flushes with a lowered memory
limit) runs until the cut; the image must reopen at an acknowledged generation (or the one in
flight) with exactly its contents, the root the plain computation for the format's node size,
and check() clean, before and after the checkpoint of a writable open.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import struct

import pytest
from power_cut import CutDevice, PowerCut

from storage.blockdev import MemoryBlockDevice
from storage.errors import IntegrityError, RollbackError
from storage.integrity import SECTOR_SIZE, DataSegment, MerkleStore, integrity_key
from storage.xts import SectorCipher

UUID = "7d3e1a52-0c4b-4e8f-9a21-3b5c6d7e8f90"


def reference_root(leaves: bytes | bytearray, node_size: int) -> bytes:
    level = bytes(leaves)
    while True:
        nodes = [level[at:at + node_size].ljust(node_size, b"\0") for at in range(0, len(level), node_size)]
        level = b"".join(hashlib.sha256(node).digest() for node in nodes)
        if len(nodes) == 1:
            return level


Acked = dict[int, dict[int, bytes]]


def workload_until_cut(key: bytes, integrity_format: int, size: int, fail_at: int, seed: int, *,
                       python_step: bool, flushes: bool) -> tuple[CutDevice, Acked, int, dict[int, bytes]]:
    """Returns the device at the cut, the contents of every generation seen, the last
    acknowledged generation and every write issued (the in-flight commit's contents)."""
    device = CutDevice(size)
    store = MerkleStore.format(DataSegment(device, 0, size, SectorCipher(key)), key, UUID, integrity_format=integrity_format)
    if python_step:
        store._small = None
    if flushes:  # cache-pressure flushes after 48 dirty sectors instead of 16 MiB
        store._memory_limit = 48
        store._flushed_limit = (store.layout.log_sectors // 4) * (SECTOR_SIZE // 40) - 48
    device.sync()
    device.fail_at = device.calls + fail_at
    rng = random.Random(seed)
    model: dict[int, bytes] = {}
    acked: Acked = {store.state().generation: {}}
    last = store.state().generation
    sectors = store.sector_count

    def seen() -> None:  # a pressure commit inside a write holds every write so far
        acked.setdefault(store.state().generation, dict(model))

    def put(sector: int, data: bytes) -> None:
        for index in range(len(data) // SECTOR_SIZE):
            model[sector + index] = data[index * SECTOR_SIZE:(index + 1) * SECTOR_SIZE]
        store.write(sector, data)
        seen()

    try:
        for _ in range(400):
            choice = rng.random()
            if choice < 0.35:
                for _ in range(rng.randrange(1, 5)):
                    sector = rng.choice(list(model)) if model and rng.random() < 0.8 else rng.randrange(sectors)
                    put(sector, rng.randbytes(SECTOR_SIZE))
            elif choice < 0.55:
                count = rng.randrange(1, min(sectors - 1, 400))
                first = rng.randrange(sectors - count)
                for at in range(0, count, 8):
                    put(first + at, rng.randbytes(min(8, count - at) * SECTOR_SIZE))
            elif choice < 0.7:
                with store.hold():
                    for _ in range(rng.randrange(1, max(2, min(store.batch_limit, 160)))):
                        sector = rng.randrange(sectors)
                        model[sector] = rng.randbytes(SECTOR_SIZE)
                        store.write(sector, model[sector])
                seen()
            elif choice < 0.78:
                store.metadata = rng.randbytes(rng.choice([0, 5, 100, 1024, rng.randrange(1025)]))
                if rng.random() < 0.5:
                    put(rng.randrange(sectors), rng.randbytes(SECTOR_SIZE))
            if rng.random() < 0.5:
                store.commit()
                seen()
                last = store.state().generation
                assert store._tree_root() == reference_root(store._leaves, store._node_size)
    except (PowerCut, OSError) as error:
        if not isinstance(error, PowerCut) and not isinstance(error.__cause__, PowerCut):
            raise  # an OSError only as the flush's background sync reports the cut
    return device, acked, last, model


@pytest.mark.parametrize("integrity_format", [2, 1])
@pytest.mark.parametrize(("size", "python_step", "flushes"),
                         [(1 << 20, False, False), (1 << 20, True, True), (8 << 20, False, True), (8 << 20, True, False)])
def test_power_cuts_recover_an_acknowledged_state_in_both_formats(integrity_format: int, size: int, python_step: bool,
                                                                 flushes: bool) -> None:
    key = os.urandom(64)
    rng = random.Random(integrity_format * 100 + size + python_step * 7 + flushes * 13)
    for trial in range(6):
        fail_at = rng.randrange(1, 1500)
        device, acked, last, model = workload_until_cut(key, integrity_format, size, fail_at, rng.randrange(1 << 30),
                                                        python_step=python_step, flushes=flushes)
        survivor = device.after_cut(rng, rng.choice([0.0, 0.5, 1.0]))
        store = MerkleStore.open(DataSegment(survivor, 0, size, SectorCipher(key)), key, UUID, writable=True)
        label = f"trial {trial}, cut at call {fail_at}"
        assert store.integrity_format == integrity_format
        generation = store.state().generation
        assert generation >= last, label
        expected = acked.get(generation, model if generation == max(acked) + 1 else None)
        assert expected is not None, f"{label}: generation {generation} was never committed"
        for sector in set(model) | set(expected):
            assert store.read(sector, 1) == expected.get(sector, bytes(SECTOR_SIZE)), f"{label}: sector {sector}"
        assert store.check() == [], label
        assert store._tree_root() == reference_root(store._leaves, store._node_size)
        store.close()  # checkpointed: the leaf pages on disk must be the tree's
        reopened = MerkleStore.open(DataSegment(survivor, 0, size, SectorCipher(key)), key, UUID, writable=False)
        assert reopened.state().generation == generation and reopened.check() == [], label


@pytest.mark.parametrize("integrity_format", [2, 1])
def test_a_flip_anywhere_in_a_live_record_with_a_two_sector_header_is_caught(integrity_format: int) -> None:
    """The general path's record: 700 bytes of metadata and 158 entries (8 logged, 150 home)
    make a header of two sectors, the second mostly padding in format 2."""
    key = os.urandom(64)
    size = 4 << 20
    device = MemoryBlockDevice(size)
    store = MerkleStore.format(DataSegment(device, 0, size, SectorCipher(key)), key, UUID, integrity_format=integrity_format)
    rng = random.Random(3)
    store.write(0, rng.randbytes(200 * SECTOR_SIZE))
    store.commit()
    store.metadata = b"m" * 700
    with store.hold():
        for sector in range(8):
            store.write(sector * 3, rng.randbytes(SECTOR_SIZE))
        store.write(300, rng.randbytes(150 * SECTOR_SIZE))
    start = store.layout.log_start + store._log_position
    generation = store.commit().generation
    end = store.layout.log_start + store._log_position
    assert end - start == 10  # two header sectors, eight logged
    crashed = device.snapshot()
    assert MerkleStore.open(DataSegment(device, 0, size, SectorCipher(key)), key, UUID, writable=False,
                            expected_generation=generation).check() == []
    for sector in range(start, end):
        for _ in range(6):
            device.restore(crashed)
            offset = sector * SECTOR_SIZE + rng.randrange(SECTOR_SIZE)
            device.write(offset, bytes([device.read(offset, 1)[0] ^ (1 << rng.randrange(8))]))
            with pytest.raises((IntegrityError, RollbackError)):
                MerkleStore.open(DataSegment(device, 0, size, SectorCipher(key)), key, UUID, writable=False,
                                 expected_generation=generation)


@pytest.mark.parametrize("integrity_format", [2, 1])
def test_a_superblock_of_the_other_format_never_opens_the_volume_with_its_rules(integrity_format: int) -> None:
    """Only the key makes a superblock; still: the other format's magic on a copy of the
    volume's own superblock (newer generation, other slot) makes the open fail, never
    recover with the other format's tree; an older one is ignored."""
    key = os.urandom(64)
    size = 1 << 20
    device = MemoryBlockDevice(size)
    segment = DataSegment(device, 0, size, SectorCipher(key))
    store = MerkleStore.format(segment, key, UUID, integrity_format=integrity_format)
    store.write(0, b"a" * SECTOR_SIZE)
    store.commit()
    store.close()  # checkpoint into slot 1
    other = {1: b"KSHIMSB2", 2: b"KSHIMSB1"}[integrity_format]
    subkey = integrity_key(key, UUID)
    good = device.snapshot()
    for generation_delta, opens in ((1, False), (-1, True)):
        device.restore(good)
        sector = bytearray(segment.read_plain(1, 1))
        sector[:8] = other
        struct.pack_into("<Q", sector, 48, struct.unpack_from("<Q", sector, 48)[0] + generation_delta)
        sector[-32:] = hmac.digest(subkey, b"keepshim/superblock/v1" + bytes(sector[:-32]), "sha256")
        segment.write_plain(0, bytes(sector))  # into the other slot
        if opens:
            reopened = MerkleStore.open(segment, key, UUID, writable=False)
            assert reopened.integrity_format == integrity_format and reopened.read(0, 1) == b"a" * SECTOR_SIZE
        else:
            with pytest.raises(IntegrityError):
                MerkleStore.open(segment, key, UUID, writable=False)


@pytest.mark.parametrize("integrity_format", [2, 1])
@pytest.mark.parametrize("native_step", [True, False])
def test_a_commit_of_metadata_alone_is_a_record(integrity_format: int, native_step: bool) -> None:
    """`store.metadata = ...; store.commit()` with no sector written: the native small step
    (which takes 1..4 sectors) raised ValueError("small commit outside the bound tree ...");
    the commit is a record of no entries, replayed at open."""
    key = os.urandom(64)
    size = 1 << 20
    device = MemoryBlockDevice(size)
    store = MerkleStore.format(DataSegment(device, 0, size, SectorCipher(key)), key, UUID, integrity_format=integrity_format)
    if not native_step:
        store._small = None
    store.write(3, b"d" * SECTOR_SIZE)
    store.commit()
    for round_number in range(3):
        store.metadata = b"sizes %d" % round_number
        generation = store.commit().generation
        assert generation == 3 + round_number
        crashed = MemoryBlockDevice(size, initial=device.snapshot())  # the record not checkpointed
        reopened = MerkleStore.open(DataSegment(crashed, 0, size, SectorCipher(key)), key, UUID, writable=False,
                                    expected_generation=generation)
        assert reopened.metadata == b"sizes %d" % round_number
        assert reopened.read(3, 1) == b"d" * SECTOR_SIZE and reopened.check() == []


class RefusingDevice(MemoryBlockDevice):
    """Refuses every write while `refusing` (a full or failing host disk)."""

    refusing = False

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.refusing:
            raise OSError(28, "No space left on device")
        super().write(offset, data)


@pytest.mark.parametrize("integrity_format", [2, 1])
@pytest.mark.parametrize("kind", ["small-native", "small-python", "general"])
def test_a_commit_the_disk_refuses_leaves_every_tree_level_as_the_last_commit_made_it(integrity_format: int,
                                                                                      kind: str) -> None:
    """`_undo_leaves` puts the leaves back and rehashes the nodes above them (of the format's
    node size): every level is then the plain computation over the old leaves, the root the
    last commit's, whichever sectors (and so nodes) the failed commit touched; a retry on the
    sound disk commits, and the image reopens with it."""
    key = os.urandom(64)
    size = 4 << 20
    device = RefusingDevice(size)
    store = MerkleStore.format(DataSegment(device, 0, size, SectorCipher(key)), key, UUID, integrity_format=integrity_format)
    if kind == "small-python":
        store._small = None
    rng = random.Random(integrity_format)
    store.write(0, rng.randbytes(600 * SECTOR_SIZE))
    store.commit()
    for sectors in ([5], [17, 300, 301, 590], [130, 131], [*range(100, 110), 400, 580]):
        if kind != "general" and len(sectors) > 4:
            continue
        root = store._tree_root()
        contents = {sector: rng.randbytes(SECTOR_SIZE) for sector in sectors}
        if kind == "general":
            contents[620 + len(sectors)] = rng.randbytes(SECTOR_SIZE)  # a fresh sector: the general path
        for sector, data in contents.items():
            store.write(sector, data)
        device.refusing = True
        with pytest.raises(OSError):
            store.commit()
        device.refusing = False
        assert store._tree_root() == root
        level = bytes(store._leaves)
        for depth, expected in enumerate(store._levels[1:], 1):  # each level from the one below
            node = store._node_size
            level = b"".join(hashlib.sha256(level[at:at + node].ljust(node, b"\0")).digest()
                             for at in range(0, len(level), node))
            assert bytes(expected) == level, f"level {depth} after the refused commit of {sectors}"
        generation = store.commit().generation
        reopened = MerkleStore.open(DataSegment(MemoryBlockDevice(size, initial=device.snapshot()), 0, size,
                                                SectorCipher(key)), key, UUID, writable=False,
                                    expected_generation=generation)
        assert {sector: reopened.read(sector, 1) for sector in contents} == contents
