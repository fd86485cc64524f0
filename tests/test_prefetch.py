"""The read prefetch: a sequential reader's next run read, checked and decrypted on a thread.

After each sequential refill of the read-ahead, `MerkleStore` starts reading the following run
(`_AHEAD_SECTORS`) on its prefetch thread, so that checking and decrypting it overlaps the
reader's own work. These tests pin what must hold whatever the timing: the prefetch is used
(and only when it is the run asked for), a write to its sectors while it runs or after it
finished is never hidden, a changed sector inside it is still an integrity error for the read
that reaches it, flushed sectors are checked against their flush hashes, reads that straddle
the end of the read-ahead still take it, and closing waits for it.
"""

from __future__ import annotations

import os
import threading

import pytest
from test_integrity import Image

from storage.errors import IntegrityError
from storage.integrity import _AHEAD_SECTORS, SECTOR_SIZE, MerkleLayout, MerkleStore

RUN = _AHEAD_SECTORS
READ = 16  # sectors per read_into call: 64 KiB, as the seq workload reads
# A reader from sector 0: its first read is not yet sequential (read directly), its second
# refills the read-ahead with [READ, READ + RUN) and starts prefetching the run after that.
PREFETCH = READ + RUN


def filled(image: Image, runs: int = 4) -> tuple[MerkleStore, dict[int, bytes]]:
    """`runs` read-ahead runs of random committed contents, the store reopened writable."""
    store = image.format()
    contents = {sector: os.urandom(SECTOR_SIZE) for sector in range(runs * RUN)}
    for first in range(0, runs * RUN, RUN):
        store.write(first, b"".join(contents[s] for s in range(first, first + RUN)))
        store.commit()
    store.close()
    return image.open(writable=True), contents


def read_sequentially(store: MerkleStore, contents: dict[int, bytes], first: int, last: int,
                      size: int = READ) -> None:
    out = bytearray(size * SECTOR_SIZE)
    for start in range(first, last, size):
        view = memoryview(out)[:min(size, last - start) * SECTOR_SIZE]
        store.read_into(start, view)
        expected = b"".join(contents[s] for s in range(start, start + len(view) // SECTOR_SIZE))
        assert view == expected, f"sectors from {start}"


class CountingReads:
    """Notes the data sectors where the prefetch thread's device reads start; can hold them
    until released."""

    def __init__(self, image: Image, monkeypatch: pytest.MonkeyPatch, *, hold: bool = False) -> None:
        self.starts: list[int] = []
        data_start = image.sector_offset(MerkleLayout.for_sectors(image.segment.sectors).data_start)
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        real = image.device.readinto

        def readinto(offset: int, buffer: bytearray | memoryview) -> None:
            if threading.current_thread().name.startswith("keepshim-read"):
                self.starts.append((offset - data_start) // SECTOR_SIZE)
                self.started.set()
                assert self.release.wait(10)
            real(offset, buffer)

        monkeypatch.setattr(image.device, "readinto", readinto)


def test_a_sequential_reader_gets_each_next_run_from_the_prefetch(monkeypatch: pytest.MonkeyPatch) -> None:
    image = Image(8 << 20)
    store, contents = filled(image)
    prefetched = CountingReads(image, monkeypatch)
    read_sequentially(store, contents, 0, 4 * RUN)
    store.close()
    # every run after the first refill came from the prefetch (and one more was started)
    assert prefetched.starts[:3] == [PREFETCH, PREFETCH + RUN, PREFETCH + 2 * RUN]


def test_reads_straddling_the_read_ahead_still_take_the_prefetch(monkeypatch: pytest.MonkeyPatch) -> None:
    image = Image(8 << 20)
    store, contents = filled(image)
    prefetched = CountingReads(image, monkeypatch)
    read_sequentially(store, contents, 0, 4 * RUN, size=24)  # 256 is not a multiple of 24
    store.close()
    assert prefetched.starts[:3] == [24 + RUN, 24 + 2 * RUN, 24 + 3 * RUN]


def test_a_random_read_starts_no_prefetch(monkeypatch: pytest.MonkeyPatch) -> None:
    image = Image(8 << 20)
    store, contents = filled(image)
    prefetched = CountingReads(image, monkeypatch)
    for first in (700, 100, 900, 300):
        read_sequentially(store, contents, first, first + 4)
    store.close()
    assert prefetched.starts == []


def test_a_write_while_the_prefetch_runs_is_read_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefetch has read the old contents of a sector the reader then writes: the read
    that reaches it returns the new contents (the prefetch is stale and dropped)."""
    image = Image(8 << 20)
    store, contents = filled(image)
    prefetched = CountingReads(image, monkeypatch, hold=True)
    read_sequentially(store, contents, 0, 2 * READ)  # the prefetch is reading its run
    assert prefetched.started.wait(10)
    contents[PREFETCH + 5] = os.urandom(SECTOR_SIZE)
    store.write(PREFETCH + 5, contents[PREFETCH + 5])
    store.commit()
    store._checkpoint()  # home: no cache holds it any more, only the disk
    prefetched.release.set()
    read_sequentially(store, contents, 2 * READ, 3 * RUN)
    store.close()


def test_a_write_after_the_prefetch_finished_is_read_back(monkeypatch: pytest.MonkeyPatch) -> None:
    image = Image(8 << 20)
    store, contents = filled(image)
    CountingReads(image, monkeypatch)
    read_sequentially(store, contents, 0, PREFETCH - READ)
    assert store._prefetch is not None and store._prefetch.first == PREFETCH
    store._prefetch.wait()  # finished, holding the old contents
    for sector in (PREFETCH, PREFETCH + 100, PREFETCH + RUN - 1):
        contents[sector] = os.urandom(SECTOR_SIZE)
        store.write(sector, contents[sector])
    store.commit()
    store._checkpoint()  # home: no cache holds them any more, only the disk
    read_sequentially(store, contents, PREFETCH - READ, 3 * RUN)
    store.close()


def test_a_changed_sector_inside_the_prefetch_fails_only_its_own_read(monkeypatch: pytest.MonkeyPatch) -> None:
    image = Image(8 << 20)
    store, contents = filled(image)
    data_start = MerkleLayout.for_sectors(image.segment.sectors).data_start
    bad = PREFETCH + 40
    flipped = image.sector_offset(data_start + bad)
    original = image.device.read(flipped, 1)
    image.device.write(flipped, bytes([original[0] ^ 1]))
    read_sequentially(store, contents, 0, bad - bad % READ)  # through the prefetch, up to it
    out = bytearray(READ * SECTOR_SIZE)
    with pytest.raises(IntegrityError):
        store.read_into(bad - bad % READ, out)
    with pytest.raises(IntegrityError):  # again: never garbage
        store.read_into(bad, out[:SECTOR_SIZE])
    image.device.write(flipped, original)
    read_sequentially(store, contents, bad, 3 * RUN)
    store.close()


def test_flushed_sectors_are_prefetched_against_their_flush_hashes() -> None:
    image = Image(8 << 20)
    store = image.format()
    store._memory_limit = 3 * RUN // 2  # two flushes while writing 4 runs
    contents = {sector: os.urandom(SECTOR_SIZE) for sector in range(4 * RUN)}
    for first in range(0, 4 * RUN, READ):
        store.write(first, b"".join(contents[s] for s in range(first, first + READ)))
    assert store._flushed
    read_sequentially(store, contents, 0, 4 * RUN)
    store.commit()
    read_sequentially(store, contents, 0, 4 * RUN)
    store.close()


def test_closing_waits_for_the_prefetch_and_stops_its_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    image = Image(8 << 20)
    store, contents = filled(image)
    prefetched = CountingReads(image, monkeypatch, hold=True)
    read_sequentially(store, contents, 0, 2 * READ)
    assert prefetched.started.wait(10)
    closing = threading.Thread(target=store.close)
    closing.start()
    closing.join(0.2)
    assert closing.is_alive()  # waiting for the prefetch's device read
    prefetched.release.set()
    closing.join(10)
    assert not closing.is_alive()
    assert not any(thread.name.startswith("keepshim-read") and thread.is_alive()
                   for thread in threading.enumerate())
