"""The native step of MerkleStore's small commits (storage.integrity `_append_small_record`).

Why: a durable 4 KiB overwrite is one small commit, and in Python its cryptography (XTS and
SHA-256 of the data sector, a SHA-256 per tree level, two HMACs, XTS of the header) costs a
dozen calls through several layers each: about 100 us per commit in context against some 15 us
of actual work. `ks_small_commit` (storage/_native.c) runs the same steps in ONE ctypes call.

Division of labour: the integrity layer keeps the whole record format. It packs the header
(everything but the entries' digests, the root and the two MACs) into its log image at the
record's log position, copies the plaintext behind it and packs the state MAC's message
(everything but the metadata's hash and the root); this module owns the state message and the
MAC label, the addresses of those and of the log image, the HMAC-SHA256 context keyed with the
integrity key (native.HmacContext: keyed once, restarted per MAC) and the `SmallCommit`
structure that tells the C code where each result goes. The C code only calls OpenSSL (see the
C file's contract, checked here before every call). tests/test_small_commits.py compares whole
images after every commit against the general path and against the Python steps.
"""

from __future__ import annotations

import ctypes
import struct

from storage import native
from storage.xts import NativeEncryption

SECTOR_SIZE = 4096
HASH_SIZE = 32
MAX_SECTORS = native.SMALL_COMMIT_SECTORS


class NativeSmallCommit:
    """Buffers and addresses for `ks_small_commit` with one key, one tree and one log.

    The record being assembled (a header sector, then up to MAX_SECTORS sectors) is the slice
    of `log` (the store's memory image of its redo log, sector for sector, see MerkleStore) at
    the record's log position: `run` names that position. `state` is the state MAC's message,
    whose last 32 bytes (the tree root) the C code fills in.
    """

    def __init__(self, encryption: NativeEncryption, key: bytes, mac_label: bytes, state_length: int,
                 metadata_digest_at: int, header: struct.Struct, root_at: int, root_mac_at: int,
                 entry_size: int, data_start: int, log: memoryview, node_size: int,
                 mac_body_only: bool) -> None:
        """`header` is the record header's fixed part (the client metadata, then the entries,
        follow it), with the root and the root MAC at `root_at` and `root_mac_at`; entries are
        `entry_size` bytes, ending with their digest; data sector (leaf) i goes home to segment
        sector `data_start` + i; the metadata's SHA-256 goes to `metadata_digest_at` in the
        state message; `log` is writable, whole sectors, and kept (its address is used by every
        `run`); a tree node holds the hashes of `node_size` / 32 nodes of the level below; the
        header MAC covers the header up to its last entry when `mac_body_only`, else up to the
        MAC (integrity format 1). Raises SelfTestFailed when libcrypto's HMAC context disagrees with hmac."""
        if header.size + HASH_SIZE > SECTOR_SIZE or not 0 <= root_at <= header.size - HASH_SIZE \
                or not 0 <= root_mac_at <= header.size - HASH_SIZE or state_length < 2 * HASH_SIZE \
                or not 0 <= metadata_digest_at <= state_length - 2 * HASH_SIZE \
                or entry_size < HASH_SIZE or data_start < 0 or log.readonly or log.nbytes % SECTOR_SIZE \
                or not 2 * HASH_SIZE <= node_size <= SECTOR_SIZE or node_size % HASH_SIZE:
            raise ValueError("the small-commit record layout does not fit a sector")
        self._encryption = encryption
        self._lock = encryption.lock
        self._data_start = data_start
        # the most `entries_at` may be, by entry count: the last digest must end before the MAC
        self._entries_limits = [0] + [SECTOR_SIZE - 2 * HASH_SIZE - (count - 1) * entry_size
                                      for count in range(1, MAX_SECTORS + 1)]
        self._leaves = 0  # leaves of the bound tree
        self._node_size = node_size
        self._mac_body_only = mac_body_only
        self._entry_size = entry_size
        self._mac = encryption.loops.hmac_context(key)
        self._label = bytearray(mac_label)
        self.state = bytearray(state_length)
        self.root_mac = bytearray(HASH_SIZE)  # the state MAC of the last `run` (the header's is encrypted)
        self._anchors: list[object] = []  # exports of every buffer whose address is in `commit`
        # the bound tree (its levels kept alive by _anchors): a caller that holds this very list
        # may skip `bind`
        self.bound_levels: list[bytearray] | None = None
        self._entries_at = header.size + entry_size - HASH_SIZE  # entry 0's digest, without metadata
        self._tweak_step = encryption.units_per_sector
        self._tweak_offset = encryption.iv_offset
        commit = self._commit = native.SmallCommit()
        self._call = encryption.loops.small_commit_call(commit)
        commit.context = encryption.context
        commit.mac_context = self._mac.address
        commit.metadata_at = header.size
        commit.metadata_digest_at = metadata_digest_at
        self._log = self._address(log)
        self._log_sectors = log.nbytes // SECTOR_SIZE
        commit.root_at = root_at
        commit.root_mac_at = root_mac_at
        commit.root_mac = self._address(self.root_mac)
        commit.entry_size = entry_size
        commit.state = self._address(self.state)
        commit.state_length = state_length
        commit.mac_label = self._address(self._label)
        commit.mac_label_length = len(mac_label)
        commit.sector_size = SECTOR_SIZE
        commit.node_size = node_size
        commit.data_tweak = encryption.tweak(data_start)
        commit.tweak_step = encryption.units_per_sector
        self._fixed = len(self._anchors)

    def close(self) -> None:
        """Free the HMAC context (OpenSSL cleanses the key in it) and let go of the buffers;
        `run` is refused after. Idempotent."""
        self._mac.close()
        del self._anchors[self._fixed:]
        self.bound_levels = None

    def _address(self, buffer: bytearray | memoryview) -> int:
        """`buffer`'s address, kept valid: the export held in `_anchors` also stops any resize."""
        anchor = ctypes.c_char.from_buffer(buffer)
        self._anchors.append(anchor)
        return ctypes.addressof(anchor)

    def bind(self, levels: list[bytearray]) -> bool:
        """Point the C code at the tree `levels` (leaves first, root hash last) unless it is the
        list bound already (MerkleStore replaces the whole list when it rebuilds the tree; its
        levels cannot be resized while bound: the exports in `_anchors` forbid it); False
        (nothing bound) for a tree it cannot handle."""
        if levels is self.bound_levels:
            return True
        del self._anchors[self._fixed:]
        self.bound_levels = None
        if not 2 <= len(levels) <= native.SMALL_COMMIT_LEVELS or len(levels[-1]) != HASH_SIZE:
            return False
        commit = self._commit
        for depth, level in enumerate(levels):
            below = len(levels[depth - 1]) if depth else 0
            if len(level) % HASH_SIZE or (depth and len(level) != -(-below // self._node_size) * HASH_SIZE):
                return False
            commit.levels[depth] = self._address(level)
            commit.level_lengths[depth] = len(level)
        leaves = len(levels[0]) // HASH_SIZE
        if self._encryption.tweak(self._data_start + leaves) >= 1 << 64:
            return False
        commit.depth = len(levels)
        self.bound_levels = levels
        self._leaves = leaves
        return True

    def run(self, sectors: list[int], slot: int, header_sector: int, metadata_length: int) -> None:
        """On the record at sector `slot` of the log buffer (header, then the `sectors`' plaintext
        in this order, as the caller put them): encrypt and hash the `sectors` (distinct leaf
        indices) in place, hash the metadata (`metadata_length` bytes after the
        header's fixed part) into the state message, update the bound tree up to the root, fill
        in the entries' digests, the root and root MAC, MAC the header and encrypt it for
        segment sector `header_sector`."""
        count = len(sectors)
        entries_at = self._entries_at + metadata_length  # entry 0's digest
        header_tweak = header_sector * self._tweak_step + self._tweak_offset
        if count == 1:  # the common case (a 4 KiB overwrite and fsync)
            low = high = sectors[0]
        else:
            low, high = (min(sectors), max(sectors)) if sectors else (-1, -1)
        if (self.bound_levels is None or self._mac.address is None or count > MAX_SECTORS
                or low < 0 or high >= self._leaves or header_sector < 0
                or not 0 <= slot <= self._log_sectors - 1 - count
                or header_tweak >= 1 << 64 or metadata_length < 0 or entries_at > self._entries_limits[count]):
            raise ValueError("small commit outside the bound tree, the plain64 range or the header")
        commit = self._commit
        commit.count = count
        commit.record = self._log + slot * SECTOR_SIZE
        if count == 1:
            commit.sectors[0] = low
        else:
            commit.sectors[:count] = sectors
        commit.header_tweak = header_tweak
        commit.entries_at = entries_at
        # the header's bytes up to the last entry's digest: what format 2's header MAC covers
        commit.mac_length = entries_at + (count - 1) * self._entry_size + HASH_SIZE \
            if self._mac_body_only else SECTOR_SIZE - HASH_SIZE
        commit.metadata_length = metadata_length
        with self._lock:
            self._call()
