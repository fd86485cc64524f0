"""storage.native: the C sector loops are built by the install, self-tested, and give exactly
the results of the Python loops (libcrypto per sector, and pyca + hashlib), up to whole volumes.

The native path is what SectorCipher uses by default once scripts/install.sh has built the
library; `native=False` gives the Python loops in the same process, so every comparison here
runs both on the same key and data.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import native
from storage.blockdev import MemoryBlockDevice
from storage.errors import IntegrityError, SelfTestFailed
from storage.integrity import SECTOR_SIZE, DataSegment, MerkleLayout, MerkleStore
from storage.xts import SectorCipher

UUID = "8d1c1e0e-4b7e-4a0a-9a55-0c3f6f3e2b11"


def leaf_hashes(ciphertext: bytes, sector_size: int = SECTOR_SIZE) -> bytes:
    return b"".join(hashlib.sha256(ciphertext[offset:offset + sector_size]).digest()
                    for offset in range(0, len(ciphertext), sector_size))


def test_the_install_built_the_library_and_it_is_in_use() -> None:
    """Fails when scripts/install.sh stops building the library (CI runs the install first),
    or when the build no longer loads or passes its self-test."""
    path = native.library_path()
    assert path.is_file(), f"{path} is missing: run scripts/install.sh (or python -m storage.native build)"
    cipher = SectorCipher(os.urandom(64))
    assert cipher.engine == "libcrypto" and cipher.native
    assert not SectorCipher(os.urandom(64), native=False).native


def test_the_environment_variable_keeps_the_python_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.DISABLE_ENVIRONMENT_VARIABLE, "off")
    cipher = SectorCipher(os.urandom(64))
    assert cipher.engine == "libcrypto" and not cipher.native


def test_a_fresh_build_is_freestanding_and_exports_the_abi(tmp_path: Path) -> None:
    """The build works from the source in the package (zig, no libc, `-z defs`), names the
    library after the source and flags, and removes the libraries of older sources."""
    directory = tmp_path
    stale = directory / "_native-0000000000000000.so"
    stale.write_bytes(b"old")
    built = native.build(directory)
    assert built == native.library_path(directory) and built.is_file() and not stale.exists()
    library = ctypes.CDLL(str(built))
    assert library.ks_abi_version() == native.ABI_VERSION


@settings(max_examples=40, deadline=None)
@given(key=st.binary(min_size=64, max_size=64).filter(lambda k: k[:32] != k[32:]),
       first=st.integers(min_value=0, max_value=(1 << 61) - 300),
       sectors=st.integers(min_value=1, max_value=200),
       sector_size=st.sampled_from([512, 4096]),
       seed=st.integers(min_value=0, max_value=1 << 32))
def test_native_and_python_loops_agree(key: bytes, first: int, sectors: int, sector_size: int,
                                       seed: int) -> None:
    rng = random.Random(seed)
    plaintext = rng.randbytes(sectors * sector_size)
    fast = SectorCipher(key, sector_size, engine="libcrypto")
    loops = SectorCipher(key, sector_size, engine="libcrypto", native=False)
    reference = SectorCipher(key, sector_size, engine="pyca")
    assert fast.native and not loops.native
    ciphertext = reference.encrypt_run(first, plaintext)
    hashes = leaf_hashes(ciphertext, sector_size)
    for cipher in (fast, loops, reference):
        assert cipher.encrypt_run(first, plaintext) == ciphertext
        last = (sectors - 1) * sector_size  # the single-sector path, on the run's last sector
        assert cipher.encrypt(first + sectors - 1, plaintext[last:]) == ciphertext[last:]
        assert cipher.decrypt(first + sectors - 1, ciphertext[last:]) == plaintext[last:]
        assert cipher.decrypt_run(first, bytearray(ciphertext)) == plaintext
        buffer, digests = bytearray(plaintext), bytearray(len(hashes))
        cipher.encrypt_hash_into(first, buffer, buffer, digests)  # in place
        assert buffer == ciphertext and digests == hashes
        out = bytearray(len(plaintext))
        cipher.encrypt_hash_into(first, plaintext, out, memoryview(digests))
        assert out == ciphertext and digests == hashes
        assert cipher.verify_decrypt_into(first, buffer, hashes) == [] and buffer == plaintext
        # sectors with a wrong hash are reported and stay ciphertext; all others are decrypted
        wrong = sorted(rng.sample(range(sectors), rng.randint(1, min(3, sectors))))
        broken = bytearray(hashes)
        expected = bytearray(plaintext)
        for index in wrong:
            broken[index * 32 + rng.randrange(32)] ^= 1 << rng.randrange(8)
            expected[index * sector_size:(index + 1) * sector_size] = \
                ciphertext[index * sector_size:(index + 1) * sector_size]
        buffer[:] = ciphertext
        assert cipher.verify_decrypt_into(first, memoryview(buffer), bytes(broken)) == wrong
        assert buffer == expected


@pytest.mark.parametrize("use_native", [True, False])
def test_bad_buffers_are_refused_before_any_work(use_native: bool) -> None:
    cipher = SectorCipher(os.urandom(64), native=use_native)
    data = bytearray(2 * SECTOR_SIZE)
    with pytest.raises(ValueError, match="digests"):
        cipher.encrypt_hash_into(0, data, data, bytearray(63))
    with pytest.raises(ValueError, match="digests"):
        cipher.encrypt_hash_into(0, data, data, bytes(64))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="output"):
        cipher.encrypt_hash_into(0, data, bytearray(SECTOR_SIZE), bytearray(64))
    with pytest.raises(ValueError, match="whole number"):
        cipher.encrypt_hash_into(0, data[:100], bytearray(100), bytearray(32))
    with pytest.raises(ValueError, match="expected"):
        cipher.verify_decrypt_into(0, data, bytes(32))
    with pytest.raises(ValueError, match="writable"):
        cipher.verify_decrypt_into(0, memoryview(bytes(data)), bytes(64))
    with pytest.raises(ValueError, match="plain64"):
        cipher.verify_decrypt_into(1 << 62, data, bytes(64))
    assert data == bytes(2 * SECTOR_SIZE)


def build_volume(use_native: bool, key: bytes, seed: int) -> tuple[MemoryBlockDevice, dict[int, bytes]]:
    """The same writes and commits (fresh sectors that go home, overwrites that are logged,
    runs mixing both, a checkpoint at close) through one kind of loop."""
    rng = random.Random(seed)
    segment_bytes = 4 << 20
    device = MemoryBlockDevice(segment_bytes)
    segment = DataSegment(device, 0, segment_bytes, SectorCipher(key, native=use_native))
    store = MerkleStore.format(segment, key, UUID)
    contents: dict[int, bytes] = {}
    # fresh runs of 300 (home writes, chunked, on the writer thread), then overwrites of up to
    # one batch that straddle written and free sectors (logged and home in one run)
    plan = [(0, 300), (400, 300)] + [(rng.randrange(store.sector_count - 40),
                                      rng.choice([1, 3, 40])) for _ in range(12)]
    for first, count in plan:
        data = rng.randbytes(count * SECTOR_SIZE)
        store.write(first, data)
        for index in range(count):
            contents[first + index] = data[index * SECTOR_SIZE:(index + 1) * SECTOR_SIZE]
        store.commit()
    store.close()
    return device, contents


def test_whole_volumes_are_identical_through_both_loops() -> None:
    key = os.urandom(64)
    with_native, contents = build_volume(True, key, seed=3)
    without, _ = build_volume(False, key, seed=3)
    assert with_native.read(0, with_native.size) == without.read(0, without.size)
    for use_native in (True, False):  # and each reads the other's image
        other = without if use_native else with_native
        segment = DataSegment(other, 0, other.size, SectorCipher(key, native=use_native))
        store = MerkleStore.open(segment, key, UUID, writable=False)
        first = min(contents)
        span = max(contents) + 1 - first
        expected = b"".join(contents.get(sector, bytes(SECTOR_SIZE)) for sector in range(first, first + span))
        out = bytearray(span * SECTOR_SIZE)
        store.read_into(first, out)  # one run mixing written and free (zero) sectors
        assert out == expected
        assert store.read(first, span) == expected
        assert store.check() == []


@pytest.mark.parametrize("use_native", [True, False])
def test_a_changed_sector_inside_a_long_run_is_an_error_in_both_loops(use_native: bool) -> None:
    """A read covering it raises, whatever surrounds it; the sectors before it still read."""
    key = os.urandom(64)
    device, contents = build_volume(True, key, seed=5)
    layout = MerkleLayout.for_sectors(device.size // SECTOR_SIZE)
    victim = sorted(contents)[len(contents) // 2]
    offset = (layout.data_start + victim) * SECTOR_SIZE + 100
    device.write(offset, bytes([device.read(offset, 1)[0] ^ 0x40]))
    store = MerkleStore.open(DataSegment(device, 0, device.size, SectorCipher(key, native=use_native)),
                             key, UUID, writable=False)
    first = max(0, min(victim - 50, store.sector_count - 100))
    with pytest.raises(IntegrityError, match=f"data sector {victim} "):
        store.read_into(first, bytearray(100 * SECTOR_SIZE))
    with pytest.raises(IntegrityError):
        store.read(victim, 1)
    before = b"".join(contents.get(sector, bytes(SECTOR_SIZE)) for sector in range(first, victim))
    if before:
        assert store.read(first, victim - first) == before


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the split needs a second CPU")
def test_long_runs_are_split_over_the_helper_thread_with_the_same_results(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """128 sectors: each half on its own thread and contexts; mismatches in both halves are
    found and only they stay ciphertext. (The split happens while a CPU looks free: the load
    average is pinned low here.)"""
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    key = os.urandom(64)
    fast, reference = SectorCipher(key), SectorCipher(key, engine="pyca")
    plaintext = os.urandom(128 * SECTOR_SIZE)
    ciphertext = reference.encrypt_run(5, plaintext)
    buffer, digests = bytearray(plaintext), bytearray(128 * 32)
    fast.encrypt_hash_into(5, buffer, buffer, digests)
    assert fast._fast is not None and fast._fast._helper is not None  # the split really ran
    assert buffer == ciphertext and digests == leaf_hashes(ciphertext)
    broken = bytearray(digests)
    for index in (3, 64, 127):
        broken[index * 32] ^= 1
    assert fast.verify_decrypt_into(5, buffer, broken) == [3, 64, 127]
    expected = bytearray(plaintext)
    for index in (3, 64, 127):
        expected[index * SECTOR_SIZE:(index + 1) * SECTOR_SIZE] = ciphertext[index * SECTOR_SIZE:(index + 1) * SECTOR_SIZE]
    assert buffer == expected


def test_the_keyed_hmac_context_restarts_with_its_key() -> None:
    """The small commit's HMAC-SHA256 context (EVP_MAC, keyed once, restarted without a key
    before each MAC) gives Python's hmac over and over, at the lengths the commit uses."""
    encryption = SectorCipher(os.urandom(64)).native_encryption()
    assert encryption is not None
    key = os.urandom(32)
    context = encryption.loops.hmac_context(key)
    for length in (0, 161, 4079, 4096, 100000, 161):
        data = os.urandom(length)
        assert context.digest(data) == hmac.digest(key, data, "sha256")
    context.close()
    context.close()  # idempotent
    with pytest.raises(SelfTestFailed):
        context.digest(b"closed")


def test_a_tree_level_hashed_natively_is_the_python_one() -> None:
    """`hash_nodes` (MerkleStore._rebuild_levels at open): every node's SHA-256, the short last
    node zero-padded, for levels that end on a node boundary and ones that do not; an empty
    level or a node size out of range is refused; the level is not held after the call."""
    encryption = SectorCipher(os.urandom(64)).native_encryption()
    if encryption is None:
        pytest.skip("the native loops are not built")
    rng = random.Random(8)
    for length in (1, 31, 32, 512, 513, 4096, 5000, 3 * 4096 + 7):
        level = bytearray(rng.randbytes(length))
        for node_size in (32, 512, 4096):
            expected = b"".join(hashlib.sha256(bytes(level[start:start + node_size]).ljust(node_size, b"\0")).digest()
                                for start in range(0, length, node_size))
            assert encryption.loops.hash_nodes(level, node_size) == expected
        level.extend(b"x")  # no export left behind: the level can be resized
    for level, node_size in ((bytearray(), 512), (bytearray(64), 0), (bytearray(64), 8192)):
        with pytest.raises(ValueError):
            encryption.loops.hash_nodes(level, node_size)
