"""Review of integrity format 2 (0ec64d1): regression tests.

A commit that carries metadata alone (no sector written) is a record of no entries.
"""

from __future__ import annotations

import os

import pytest

from storage.blockdev import MemoryBlockDevice
from storage.integrity import SECTOR_SIZE, DataSegment, MerkleStore
from storage.xts import SectorCipher

UUID = "7d3e1a52-0c4b-4e8f-9a21-3b5c6d7e8f90"


@pytest.mark.parametrize("tree_version", [2, 1])
@pytest.mark.parametrize("native_step", [True, False])
def test_a_commit_of_metadata_alone_is_a_record(tree_version: int, native_step: bool) -> None:
    """`store.metadata = ...; store.commit()` with no sector written: the native small step
    (which takes 1..4 sectors) raised ValueError("small commit outside the bound tree ...");
    the commit is a record of no entries, replayed at open."""
    key = os.urandom(64)
    size = 1 << 20
    device = MemoryBlockDevice(size)
    store = MerkleStore.format(DataSegment(device, 0, size, SectorCipher(key)), key, UUID, tree_version=tree_version)
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
