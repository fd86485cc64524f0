"""Power cuts at the device level: unsynced writes are lost, kept or torn in any combination.

A process kill (tests/test_crash.py) keeps every completed write; a power cut does not. Here a
device keeps what was written since the last sync apart, and a cut at the N-th device call keeps a
random subset of those writes' 4 KiB pieces. Whatever survives, the integrity store must reopen
at the last acknowledged commit or at the one in flight, with every sector readable and right.
"""

from __future__ import annotations

import os
import random

import pytest
from power_cut import CutDevice, PowerCut

from storage.blockdev import MemoryBlockDevice
from storage.integrity import SECTOR_SIZE, DataSegment, MerkleStore
from storage.xts import SectorCipher

UUID = "5e1c2f10-9a7b-4c3d-8e2f-112233445566"
SEGMENT_BYTES = 1 << 20


def run_until_cut(key: bytes, fail_at: int, seed: int, *, fresh_runs: bool = False
                  ) -> tuple[CutDevice, list[dict[int, bytes]], dict[int, bytes]]:
    """Random writes and commits until the device fails; returns the device, the states of
    every acknowledged commit (index = commits acknowledged) and the writes in flight. With
    `fresh_runs`, most writes are runs of never-written sectors (written home, not logged)."""
    device = CutDevice(SEGMENT_BYTES, fail_at=10**9)
    segment = DataSegment(device, 0, SEGMENT_BYTES, SectorCipher(key))
    store = MerkleStore.format(segment, key, UUID)
    device.sync()
    device.fail_at = device.calls + fail_at
    rng = random.Random(seed)
    state: dict[int, bytes] = {}
    acknowledged = [dict(state)]
    staged: dict[int, bytes] = {}
    next_fresh = 0
    try:
        while True:
            with store.hold():
                for _ in range(rng.randrange(1, 6)):
                    if fresh_runs and next_fresh + 8 <= store.sector_count and rng.random() < 0.7:
                        run = rng.randrange(1, 9)
                        data = rng.randbytes(run * SECTOR_SIZE)
                        store.write(next_fresh, data)
                        for index in range(run):
                            staged[next_fresh + index] = data[index * SECTOR_SIZE:(index + 1) * SECTOR_SIZE]
                        next_fresh += run
                        continue
                    sector = rng.randrange(store.sector_count)
                    staged[sector] = rng.randbytes(SECTOR_SIZE)
                    store.write(sector, staged[sector])
            store.commit()
            state.update(staged)
            staged = {}
            acknowledged.append(dict(state))
    except PowerCut:
        return device, acknowledged, staged


@pytest.mark.parametrize("fresh_runs", [False, True], ids=["scattered", "fresh-runs"])
@pytest.mark.parametrize("seed", range(6))
def test_power_cut_anywhere_recovers_an_acknowledged_or_in_flight_state(seed: int, fresh_runs: bool) -> None:
    """Scattered writes are mostly logged; fresh runs go home before the record (the in-flight
    record's home sectors can be torn in any pattern and must make it count as not written)."""
    key = os.urandom(64)
    rng = random.Random(seed)
    outcomes = {"last": 0, "in_flight": 0}
    for fail_at in range(1, 400, 7):
        device, acknowledged, in_flight = run_until_cut(key, fail_at + seed, seed * 1000 + fail_at,
                                                        fresh_runs=fresh_runs)
        survivor = device.after_cut(rng)
        segment = DataSegment(survivor, 0, SEGMENT_BYTES, SectorCipher(key))
        store = MerkleStore.open(segment, key, UUID, writable=True)
        last = acknowledged[-1]
        with_in_flight = {**last, **in_flight}
        recovered = {sector: store.read(sector, 1) for sector in with_in_flight}
        if recovered == {sector: with_in_flight[sector] for sector in recovered}:
            outcomes["in_flight"] += 1
        else:
            # the in-flight commit did not make it: exactly the last acknowledged state
            assert all(recovered[s] == last[s] for s in last), f"cut at call {fail_at}: acknowledged data lost"
            assert all(recovered[s] != in_flight[s] for s in in_flight if s not in last)
            outcomes["last"] += 1
        assert store.check() == []
    assert outcomes["last"] > 0 and outcomes["in_flight"] > 0


@pytest.mark.parametrize("fail_at", range(1, 9))
def test_power_cut_in_a_big_commit_written_home_from_the_worker_thread(fail_at: int) -> None:
    """A commit of more than one chunk writes its home sectors from a worker thread; a cut at
    any device call of it (a home write, the record, the sync) and any surviving subset of the
    unsynced pieces leaves either the whole commit or none of it."""
    key = os.urandom(64)
    size = 4 << 20
    device = CutDevice(size, fail_at=10**9)
    store = MerkleStore.format(DataSegment(device, 0, size, SectorCipher(key)), key, UUID)
    device.sync()
    rng = random.Random(fail_at)
    count = 600  # three chunks of fresh sectors
    data = rng.randbytes(count * SECTOR_SIZE)
    device.fail_at = device.calls + fail_at
    try:
        store.write(5, data)
        store.commit()
        acknowledged = True
    except PowerCut:
        acknowledged = False
    home_start = store.layout.data_start * SECTOR_SIZE
    for attempt in range(4):
        if attempt < 2:
            survivor = device.after_cut(random.Random(attempt))
        else:  # the record (log) survives whole, the home sectors only in part
            survivor = MemoryBlockDevice(size, initial=device.snapshot())
            for offset, written in device.unsynced:
                for piece in range(0, len(written), SECTOR_SIZE):
                    if offset < home_start or rng.random() < (0.5 if attempt == 2 else 0.98):
                        survivor.write(offset + piece, written[piece:piece + SECTOR_SIZE])
        reopened = MerkleStore.open(DataSegment(survivor, 0, size, SectorCipher(key)), key, UUID, writable=True)
        recovered = reopened.read(5, count)
        assert recovered in (data, bytes(count * SECTOR_SIZE)), "half a commit is visible"
        if acknowledged:
            assert recovered == data
        assert reopened.check() == []
