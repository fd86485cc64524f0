"""Filesystem._overwrite's cache of inode sizes and block maps (`_MapCache`).

Overwrites inside a file skip SQLite by remembering each file's mode, size and block map; any
change to the database must make it forget. These tests fill the cache with overwrites, then
change what it remembers through every kind of operation that could (truncate, unlink and a new
file that may reuse the inode number and the blocks, rename over, holes), and check that the
next overwrites land in the right file and blocks, after a reopen too.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from storage.blockdev import MemoryBlockDevice
from storage.fs import BLOCK_SIZE, ROOT_INODE, Filesystem
from storage.luks2 import KdfCost
from storage.volume import Volume, create_volume, open_volume

PASSPHRASE = b"cache"
COST = KdfCost(iterations=1000)


@pytest.fixture
def volume() -> Iterator[Volume]:
    device = MemoryBlockDevice(24 << 20)
    with create_volume(device, None, PASSPHRASE, pbkdf="pbkdf2", kdf_cost=COST) as opened:
        yield opened


def _file(fs: Filesystem, name: bytes, blocks: int) -> tuple[int, bytearray]:
    ino = fs.create(ROOT_INODE, name).ino
    data = bytearray(os.urandom(blocks * BLOCK_SIZE))
    fs.write(ino, 0, data)
    return ino, data


def _overwrite_some(fs: Filesystem, ino: int, model: bytearray) -> None:
    """Whole-block and unaligned overwrites inside the file (the cached path)."""
    for offset, length in ((0, BLOCK_SIZE), (3 * BLOCK_SIZE, BLOCK_SIZE), (5000, 300), (BLOCK_SIZE - 10, 20)):
        if offset + length <= len(model):
            piece = os.urandom(length)
            fs.write(ino, offset, piece)
            model[offset:offset + length] = piece


def test_truncate_then_overwrites_past_the_new_end_extend_the_file() -> None:
    device = MemoryBlockDevice(24 << 20)
    with create_volume(device, None, PASSPHRASE, pbkdf="pbkdf2", kdf_cost=COST) as created:
        ino, model = _file(created.fs, b"a", 8)
    with open_volume(device, PASSPHRASE) as reopened:  # the cache starts empty: full-size file
        fs = reopened.fs
        _overwrite_some(fs, ino, model)
        fs.setattr(ino, size=2 * BLOCK_SIZE)
        del model[2 * BLOCK_SIZE:]
        piece = os.urandom(BLOCK_SIZE)
        fs.write(ino, 4 * BLOCK_SIZE, piece)  # no longer inside the file: must extend, with a hole
        model.extend(bytes(2 * BLOCK_SIZE) + piece)
        assert fs.getattr(ino).size == len(model)
        assert fs.read(ino, 0, len(model)) == model


def test_a_new_file_reusing_inode_and_blocks_gets_its_own_map() -> None:
    device = MemoryBlockDevice(24 << 20)
    with create_volume(device, None, PASSPHRASE, pbkdf="pbkdf2", kdf_cost=COST) as created:
        ino, model = _file(created.fs, b"old", 6)
        other, other_model = _file(created.fs, b"other", 6)
    with open_volume(device, PASSPHRASE) as reopened:
        fs = reopened.fs
        _overwrite_some(fs, ino, model)
        _overwrite_some(fs, other, other_model)
        fs.unlink(ROOT_INODE, b"old")
        new, new_model = _file(fs, b"new", 3)  # may reuse the inode number and the freed blocks
        _overwrite_some(fs, new, new_model)
        _overwrite_some(fs, other, other_model)
        assert fs.getattr(new).size == len(new_model)
        assert fs.read(new, 0, len(new_model)) == new_model
        assert fs.read(other, 0, len(other_model)) == other_model


def test_rename_over_a_cached_file(volume: Volume) -> None:
    fs = volume.fs
    source, source_model = _file(fs, b"source", 4)
    target, target_model = _file(fs, b"target", 4)
    _overwrite_some(fs, target, target_model)
    fs.rename(ROOT_INODE, b"source", ROOT_INODE, b"target")
    landed = fs.lookup(ROOT_INODE, b"target").ino
    assert landed == source
    _overwrite_some(fs, landed, source_model)
    assert fs.read(landed, 0, len(source_model)) == source_model


def test_writes_into_holes_take_the_general_path(volume: Volume) -> None:
    fs = volume.fs
    ino = fs.create(ROOT_INODE, b"sparse").ino
    fs.setattr(ino, size=64 * BLOCK_SIZE)  # all holes
    free = fs.statfs().blocks_free
    model = bytearray(64 * BLOCK_SIZE)
    for index in (0, 7, 8, 63, 7):
        piece = os.urandom(BLOCK_SIZE)
        fs.write(ino, index * BLOCK_SIZE, piece)
        model[index * BLOCK_SIZE:(index + 1) * BLOCK_SIZE] = piece
    assert fs.read(ino, 0, len(model)) == model
    assert free - fs.statfs().blocks_free == 4  # blocks 0, 7, 8 and 63 were allocated, once each


def test_cached_overwrites_are_durable_across_a_reopen() -> None:
    device = MemoryBlockDevice(24 << 20)
    with create_volume(device, None, PASSPHRASE, pbkdf="pbkdf2", kdf_cost=COST) as opened:
        fs = opened.fs
        ino, model = _file(fs, b"f", 16)
        for _ in range(50):
            _overwrite_some(fs, ino, model)
            fs.fsync(ino)
        mtime = fs.getattr(ino).mtime_ns
    with open_volume(device, PASSPHRASE) as reopened:
        assert reopened.fs.read(ino, 0, len(model)) == model
        assert reopened.fs.getattr(ino).mtime_ns == mtime


def test_a_new_file_is_known_empty_so_its_first_write_looks_nothing_up_twice(volume: Volume) -> None:
    """`create` leaves the new (empty) file in the cache: its first write goes straight to the
    general path, whose own lookup is the only one; the bytes land and read back."""
    fs = volume.fs
    statements: list[str] = []
    ino = fs.create(ROOT_INODE, b"fresh").ino

    def trace(cursor: object, sql: str, bindings: object) -> bool:
        statements.append(" ".join(sql.split()))
        return True

    fs._db.exec_trace = trace
    data = os.urandom(BLOCK_SIZE + 100)
    fs.write(ino, 0, data)
    fs._db.exec_trace = None
    lookups = [sql for sql in statements if sql.startswith("SELECT") and "FROM inodes" in sql]
    assert len(lookups) == 1, statements
    assert fs.read(ino, 0, len(data)) == data
    assert fs.getattr(ino).size == len(data)


def _phys(fs: Filesystem, ino: int) -> list[int]:
    """The file's physical blocks in index order, from SQLite."""
    return [int(phys) for (phys,) in fs._db.cursor().execute(
        "SELECT phys FROM blocks WHERE key >> 32 = ? ORDER BY key", (ino,))]


def test_reads_of_interleaved_files_and_holes_with_the_map_cached(volume: Volume) -> None:
    """`read`'s one-run path takes only blocks that are cached AND physically consecutive:
    files written in turns (blocks not consecutive on the volume), holes and mixed ranges
    read right, from a cold cache and a warm one."""
    fs = volume.fs
    a = fs.create(ROOT_INODE, b"a").ino
    b = fs.create(ROOT_INODE, b"b").ino
    models = {a: bytearray(), b: bytearray()}
    for _ in range(6):  # one block each in turn: a's blocks alternate with b's on the volume
        for ino in (a, b):
            piece = os.urandom(BLOCK_SIZE)
            fs.write(ino, len(models[ino]), piece)
            models[ino] += piece
    sequential = fs.create(ROOT_INODE, b"seq").ino
    models[sequential] = bytearray(os.urandom(20 * BLOCK_SIZE))
    fs.write(sequential, 0, models[sequential])
    fs.write(sequential, 30 * BLOCK_SIZE, b"tail")  # a hole of blocks 20..29
    models[sequential] += bytes(10 * BLOCK_SIZE) + b"tail"
    phys_a = _phys(fs, a)
    assert any(later != earlier + 1 for earlier, later in itertools.pairwise(phys_a))  # really interleaved
    phys_seq = _phys(fs, sequential)
    assert phys_seq[:20] == list(range(phys_seq[0], phys_seq[0] + 20))  # really consecutive
    ranges = [(0, 6 * BLOCK_SIZE), (100, 3 * BLOCK_SIZE), (BLOCK_SIZE, BLOCK_SIZE), (5 * BLOCK_SIZE - 1, 2),
              (0, 20 * BLOCK_SIZE), (18 * BLOCK_SIZE + 7, 4 * BLOCK_SIZE), (25 * BLOCK_SIZE, 6 * BLOCK_SIZE)]
    for _ in range(2):  # cold, then warm
        for ino, model in models.items():
            for offset, length in ranges:
                assert fs.read(ino, offset, length) == bytes(model[offset:offset + length]), (ino, offset, length)


def test_a_file_written_in_order_is_mapped_block_for_block() -> None:
    """A write of many new blocks on consecutive free blocks maps them with one generated
    INSERT; the map is exactly one row per block, fsck agrees, and it survives a reopen."""
    device = MemoryBlockDevice(24 << 20)
    data = os.urandom(300 * BLOCK_SIZE + 123)
    with create_volume(device, None, PASSPHRASE, pbkdf="pbkdf2", kdf_cost=COST) as created:
        fs = created.fs
        ino = fs.create(ROOT_INODE, b"f").ino
        statements: list[str] = []

        def trace(cursor: object, sql: str, bindings: object) -> bool:
            statements.append(" ".join(sql.split()))
            return True

        fs._db.exec_trace = trace
        assert fs.write(ino, 0, data) == len(data)
        fs._db.exec_trace = None
        inserts = [sql for sql in statements if "INTO blocks" in sql]
        pieces = -(-len(data) // fs._transaction_bytes)  # each a transaction of its own
        assert 1 <= len(inserts) <= pieces and all(sql.startswith("WITH RECURSIVE") for sql in inserts), inserts
        phys = _phys(fs, ino)
        assert len(phys) == 301 and phys == list(range(phys[0], phys[0] + 301))
        assert fs.read(ino, 0, len(data)) == data
        assert created.fsck() == []
    with open_volume(device, PASSPHRASE) as reopened:
        assert _phys(reopened.fs, ino) == phys
        assert reopened.fs.read(ino, 0, len(data)) == data
