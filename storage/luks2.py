"""The LUKS2 container, compatible with cryptsetup: format, open, keyslots, dump.

Theory of operation. A random 512-bit volume key encrypts the data segment (aes-xts-plain64,
4096-byte sectors, tweak in 512-byte units). The key itself is stored only in keyslots: a KDF
(argon2id by default, or pbkdf2) turns a passphrase into a keyslot key, which XTS-encrypts (with
512-byte sectors, IV 0 at the start of the area) the volume key expanded by the anti-forensic
splitter. A pbkdf2 "digest" of the volume key tells a right key from a wrong one. The metadata
lives twice (two header copies with a seqid); every change bumps the seqid and rewrites both,
secondary first, each followed by a sync, so a crash leaves one valid copy (old or new).

Crash order for keyslot changes: new AF material is written (and synced) before the header that
points at it; a removed keyslot disappears from the header before its area is wiped.

On-disk details and their sources: research/storage-notes.md §1.2 and cryptsetup's
docs/LUKS2-format.txt. Header parsing and validation live in `_luks2_header`.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import os
import time
import uuid as uuid_module
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from storage._af import af_merge, af_split
from storage._luks2_header import (
    AF_STRIPES,
    MAX_ARGON2_MEMORY_KIB,
    MAX_ARGON2_TIME,
    MAX_KEYSLOTS,
    MAX_KEYSLOTS_SIZE,
    MAX_PBKDF2_ITERATIONS,
    MIN_ARGON2_MEMORY_KIB,
    SUPPORTED_ENCRYPTION,
    Argon2Params,
    BinaryHeader,
    HeaderState,
    Keyslot,
    Pbkdf2Params,
    build_header_area,
    encode_label,
    read_metadata,
    validate,
)
from storage.blockdev import BlockDevice
from storage.errors import CorruptHeader, KeyslotError, ShortRead, StorageError, WrongPassphrase
from storage.xts import SectorCipher

Pbkdf = Literal["argon2id", "pbkdf2"]

DEFAULT_HEADER_SIZE = 16384
DEFAULT_DATA_OFFSET = 16 << 20  # cryptsetup's default: 16 MiB of header and keyslots
DEFAULT_SECTOR_SIZE = 4096
VOLUME_KEY_SIZE = 64
DEFAULT_ITER_TIME_MS = 2000
# Default argon2id memory: 256 MiB, 4 lanes. cryptsetup's default (1 GiB) takes ~8 s with pyca's
# single-threaded argon2id, too slow to open for every `keep run` (research notes §1.3).
DEFAULT_ARGON2_MEMORY_KIB = 256 * 1024
DEFAULT_ARGON2_LANES = 4
MIN_ARGON2_TIME = 4  # as cryptsetup
MIN_PBKDF2_ITERATIONS = 1000  # as cryptsetup
DIGEST_ITER_TIME_MS = 125  # as cryptsetup (LUKS_MKD_ITERATIONS_MS)
KEYSLOT_AREA_ALIGNMENT = 4096

Progress = Callable[[str], None]


@dataclass(frozen=True)
class KdfCost:
    """Explicit keyslot KDF costs (skip benchmarking). For argon2id `iterations` is the time
    cost; `memory_kib` and `parallel` apply to argon2id only. Tests use small costs."""

    iterations: int
    memory_kib: int = DEFAULT_ARGON2_MEMORY_KIB
    parallel: int = DEFAULT_ARGON2_LANES


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _argon2id(passphrase: bytes, params: Argon2Params, length: int) -> bytes:
    try:
        return Argon2id(salt=params.salt, length=length, iterations=params.time,
                        lanes=params.lanes, memory_cost=params.memory_kib).derive(passphrase)
    except (ValueError, MemoryError) as error:
        raise CorruptHeader(f"argon2id parameters rejected: {error}") from None


def _derive(passphrase: bytes, kdf: Argon2Params | Pbkdf2Params, length: int) -> bytes:
    if isinstance(kdf, Argon2Params):
        return _argon2id(passphrase, kdf, length)
    return hashlib.pbkdf2_hmac(kdf.hash_name, passphrase, kdf.salt, kdf.iterations, length)


def benchmark_kdf(pbkdf: Pbkdf, iter_time_ms: int, *, memory_kib: int = DEFAULT_ARGON2_MEMORY_KIB,
                  parallel: int = DEFAULT_ARGON2_LANES) -> KdfCost:
    """Pick KDF costs so that one unlock takes about `iter_time_ms` here, as cryptsetup does
    (never below cryptsetup's minimums)."""
    if iter_time_ms <= 0:
        raise ValueError("iteration time must be positive")
    if pbkdf == "pbkdf2":
        trial = 100_000
        start = time.perf_counter()
        hashlib.pbkdf2_hmac("sha256", b"benchmark", b"\0" * 32, trial, 64)
        elapsed = max(time.perf_counter() - start, 1e-6)
        iterations = int(trial * iter_time_ms / 1000 / elapsed)
        return KdfCost(iterations=min(max(iterations, MIN_PBKDF2_ITERATIONS), MAX_PBKDF2_ITERATIONS))
    memory = min(max(memory_kib, MIN_ARGON2_MEMORY_KIB), MAX_ARGON2_MEMORY_KIB)
    start = time.perf_counter()
    _argon2id(b"benchmark", Argon2Params("argon2id", 1, memory, parallel, b"\0" * 32), 64)
    per_pass = max(time.perf_counter() - start, 1e-6)
    target = iter_time_ms / 1000
    if per_pass * MIN_ARGON2_TIME > target and memory > 32 * 1024:
        # too slow even at the minimum time cost: shrink memory, as cryptsetup does
        memory = max(32 * 1024, int(memory * target / (per_pass * MIN_ARGON2_TIME)))
        return KdfCost(iterations=MIN_ARGON2_TIME, memory_kib=memory, parallel=parallel)
    passes = int(target / per_pass)
    return KdfCost(iterations=min(max(passes, MIN_ARGON2_TIME), MAX_ARGON2_TIME),
                   memory_kib=memory, parallel=parallel)


def _digest_iterations(fast: bool) -> int:
    if fast:
        return MIN_PBKDF2_ITERATIONS
    trial = 20_000
    start = time.perf_counter()
    hashlib.pbkdf2_hmac("sha256", b"benchmark", b"\0" * 32, trial, 32)
    elapsed = max(time.perf_counter() - start, 1e-6)
    return max(MIN_PBKDF2_ITERATIONS, int(trial * DIGEST_ITER_TIME_MS / 1000 / elapsed))


def _area_size(key_size: int) -> int:
    material = key_size * AF_STRIPES
    return -(-material // KEYSLOT_AREA_ALIGNMENT) * KEYSLOT_AREA_ALIGNMENT


def _kdf_json(pbkdf: Pbkdf, cost: KdfCost) -> dict[str, Any]:
    salt = _b64(os.urandom(32))
    if pbkdf == "pbkdf2":
        if not MIN_PBKDF2_ITERATIONS <= cost.iterations <= MAX_PBKDF2_ITERATIONS:
            raise ValueError(f"pbkdf2 iterations must be in [{MIN_PBKDF2_ITERATIONS}, "
                             f"{MAX_PBKDF2_ITERATIONS}]")
        return {"type": "pbkdf2", "hash": "sha256", "iterations": cost.iterations, "salt": salt}
    if not 1 <= cost.iterations <= MAX_ARGON2_TIME:
        raise ValueError(f"argon2id time cost must be in [1, {MAX_ARGON2_TIME}]")
    if not MIN_ARGON2_MEMORY_KIB <= cost.memory_kib <= MAX_ARGON2_MEMORY_KIB:
        raise ValueError(f"argon2id memory must be in [{MIN_ARGON2_MEMORY_KIB}, "
                         f"{MAX_ARGON2_MEMORY_KIB}] KiB")
    return {"type": "argon2id", "time": cost.iterations, "memory": cost.memory_kib,
            "cpus": cost.parallel, "salt": salt}


class LuksVolume:
    """An unlocked LUKS2 container on a block device (the device stays the caller's to close).

    `volume_key` is the segment key; it is never included in repr or dumps.
    """

    def __init__(self, device: BlockDevice, state: HeaderState, volume_key: bytes,
                 opened_keyslot: int | None) -> None:
        self._device = device
        self._state = state
        self._volume_key = volume_key
        self.opened_keyslot = opened_keyslot

    # -- the data segment ----------------------------------------------------------------------

    @property
    def device(self) -> BlockDevice:
        return self._device

    @property
    def volume_key(self) -> bytes:
        return self._volume_key

    @property
    def uuid(self) -> str:
        return self._state.binary.uuid

    @property
    def label(self) -> str:
        """The label as text (UTF-8; bytes that are not UTF-8 show as U+FFFD)."""
        return self._state.binary.label

    @property
    def subsystem(self) -> str:
        """The subsystem label (`cryptsetup --subsystem`), as text like `label`."""
        return self._state.binary.subsystem

    @property
    def sector_size(self) -> int:
        return self._state.metadata.segment.sector_size

    @property
    def data_offset(self) -> int:
        """Byte offset of the data segment on the device."""
        return self._state.metadata.segment.offset

    @property
    def data_size(self) -> int:
        """Size in bytes of the data segment (a whole number of sectors)."""
        segment = self._state.metadata.segment
        if segment.size is not None:
            return segment.size
        available = self._device.size - segment.offset
        return available - available % segment.sector_size

    def cipher(self, *, engine: Literal["auto", "pyca", "libcrypto"] = "auto") -> SectorCipher:
        """The sector cipher of the data segment: sector k (0-based, relative to
        `data_offset`) uses tweak k * sector_size/512 + iv_tweak."""
        segment = self._state.metadata.segment
        return SectorCipher(self._volume_key, segment.sector_size, segment.iv_tweak, engine=engine)

    # -- keyslots ------------------------------------------------------------------------------

    @property
    def keyslots(self) -> list[int]:
        return sorted(self._state.metadata.keyslots)

    def add_keyslot(self, passphrase: bytes, *, pbkdf: Pbkdf = "argon2id",
                    iter_time_ms: int = DEFAULT_ITER_TIME_MS, cost: KdfCost | None = None,
                    keyslot: int | None = None) -> int:
        """Add a keyslot that opens this volume with `passphrase`; returns its number."""
        self._require_writable()
        metadata = self._state.metadata
        if keyslot is None:
            free = [n for n in range(MAX_KEYSLOTS) if n not in metadata.keyslots]
            if not free:
                raise KeyslotError("all 32 keyslots are in use")
            keyslot = free[0]
        elif keyslot in metadata.keyslots or not 0 <= keyslot < MAX_KEYSLOTS:
            raise KeyslotError(f"keyslot {keyslot} is not free")
        area_size = _area_size(VOLUME_KEY_SIZE)
        offset = self._free_area(area_size)
        cost = cost or benchmark_kdf(pbkdf, iter_time_ms)
        raw = copy.deepcopy(self._state.raw)
        slot_json: dict[str, Any] = {
            "type": "luks2", "key_size": len(self._volume_key),
            "af": {"type": "luks1", "stripes": AF_STRIPES, "hash": "sha256"},
            "area": {"type": "raw", "offset": str(offset), "size": str(area_size),
                     "encryption": SUPPORTED_ENCRYPTION, "key_size": VOLUME_KEY_SIZE},
            "kdf": _kdf_json(pbkdf, cost),
        }
        raw["keyslots"][str(keyslot)] = slot_json
        for digest in raw["digests"].values():
            digest["keyslots"] = sorted({*digest["keyslots"], str(keyslot)}, key=int)
        parsed = validate(raw, self._state.binary.hdr_size, self._device.size).keyslots[keyslot]
        _write_keyslot_material(self._device, parsed, passphrase, self._volume_key)
        self._device.sync()
        self._commit(raw)
        return keyslot

    def remove_keyslot(self, keyslot: int) -> None:
        """Remove a keyslot and wipe its area. Refuses to remove the last one."""
        self._require_writable()
        slots = self._state.metadata.keyslots
        if keyslot not in slots:
            raise KeyslotError(f"keyslot {keyslot} is not in use")
        if len(slots) == 1:
            raise KeyslotError("refusing to remove the last keyslot (the volume would be lost)")
        area = slots[keyslot]
        raw = copy.deepcopy(self._state.raw)
        del raw["keyslots"][str(keyslot)]
        for digest in raw["digests"].values():
            digest["keyslots"] = [n for n in digest["keyslots"] if n != str(keyslot)]
        for token in raw["tokens"].values():  # e.g. systemd-cryptenroll's, as cryptsetup does
            if isinstance(token, dict) and isinstance(token.get("keyslots"), list):
                token["keyslots"] = [n for n in token["keyslots"] if n != str(keyslot)]
        self._commit(raw)
        self._device.write(area.area_offset, os.urandom(area.area_size))
        self._device.sync()
        if self.opened_keyslot == keyslot:
            self.opened_keyslot = None

    def change_passphrase(self, keyslot: int, new_passphrase: bytes, *, pbkdf: Pbkdf = "argon2id",
                          iter_time_ms: int = DEFAULT_ITER_TIME_MS,
                          cost: KdfCost | None = None) -> int:
        """Replace `keyslot` by a new one for `new_passphrase` (added first, so a crash leaves
        at least one working slot); returns the new slot's number."""
        if keyslot not in self._state.metadata.keyslots:
            raise KeyslotError(f"keyslot {keyslot} is not in use")
        new_slot = self.add_keyslot(new_passphrase, pbkdf=pbkdf, iter_time_ms=iter_time_ms,
                                    cost=cost)
        self.remove_keyslot(keyslot)
        self.opened_keyslot = new_slot
        return new_slot

    def find_keyslot(self, passphrase: bytes, *, excluding: int | None = None) -> int:
        """The keyslot `passphrase` opens (for remove-key/passwd), other than `excluding`;
        `WrongPassphrase` if none."""
        slot, _ = _unlock(self._device, self._state, passphrase, excluding=excluding)
        return slot

    # -- information ---------------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        """What `keep volume info` shows (like `cryptsetup luksDump`, never the key)."""
        metadata = self._state.metadata
        slots = {}
        for number, slot in sorted(metadata.keyslots.items()):
            kdf: dict[str, Any]
            if isinstance(slot.kdf, Argon2Params):
                kdf = {"type": slot.kdf.variant, "time": slot.kdf.time,
                       "memory_kib": slot.kdf.memory_kib, "cpus": slot.kdf.lanes}
            else:
                kdf = {"type": "pbkdf2", "hash": slot.kdf.hash_name,
                       "iterations": slot.kdf.iterations}
            slots[number] = {"kdf": kdf, "area_offset": slot.area_offset,
                             "area_size": slot.area_size, "key_size": slot.key_size}
        return {
            "version": 2, "uuid": self.uuid, "label": self.label, "subsystem": self.subsystem,
            "header_size": self._state.binary.hdr_size, "seqid": self._state.binary.seqid,
            "cipher": SUPPORTED_ENCRYPTION, "key_bits": len(self._volume_key) * 8,
            "sector_size": self.sector_size, "data_offset": self.data_offset,
            "data_size": self.data_size, "keyslots": slots,
            "tokens": len(self._state.raw.get("tokens", {})),
        }

    def __repr__(self) -> str:
        return f"LuksVolume(uuid={self.uuid!r}, data_size={self.data_size})"

    # -- internals -----------------------------------------------------------------------------

    def _require_writable(self) -> None:
        if not self._device.writable:
            raise StorageError("the volume is open read-only")

    def _free_area(self, size: int) -> int:
        metadata = self._state.metadata
        start = 2 * self._state.binary.hdr_size
        end = start + metadata.keyslots_size
        used = sorted((slot.area_offset, slot.area_offset + slot.area_size)
                      for slot in metadata.keyslots.values())
        candidate = start
        for used_start, used_end in used:
            if candidate + size <= used_start:
                break
            candidate = max(candidate, -(-used_end // KEYSLOT_AREA_ALIGNMENT) * KEYSLOT_AREA_ALIGNMENT)
        if candidate + size > end:
            raise KeyslotError("no room left in the keyslots area")
        return candidate

    def _commit(self, raw: dict[str, Any]) -> None:
        # seqid is a u64 the host may have set to its maximum: it wraps to 0 as cryptsetup's
        # increment does (both copies are rewritten with it)
        self._state = _write_headers(self._device, self._state.binary, raw,
                                     seqid=(self._state.binary.seqid + 1) % (1 << 64))


def _write_headers(device: BlockDevice, binary: BinaryHeader, raw: dict[str, Any], *,
                   seqid: int) -> HeaderState:
    """Write both header copies with `seqid` (secondary first, each synced)."""
    metadata = validate(raw, binary.hdr_size, device.size)
    for offset in (binary.hdr_size, 0):
        header = replace(binary, seqid=seqid, checksum_alg="sha256", hdr_offset=offset)
        device.write(offset, build_header_area(header, os.urandom(64), raw))
        device.sync()
    final = replace(binary, seqid=seqid, checksum_alg="sha256", hdr_offset=0)
    return HeaderState(binary=final, raw=raw, metadata=metadata, both_copies_valid=True)


def _area_cipher(slot: Keyslot, area_key: bytes) -> SectorCipher:
    try:
        return SectorCipher(area_key, sector_size=512)
    except ValueError as error:  # e.g. a derived key with identical halves (never in practice)
        raise CorruptHeader(f"keyslot {slot.number}: unusable area key: {error}") from None


def _write_keyslot_material(device: BlockDevice, slot: Keyslot, passphrase: bytes,
                            volume_key: bytes) -> None:
    area_key = _derive(passphrase, slot.kdf, slot.area_key_size)
    material = af_split(volume_key, slot.stripes, slot.af_hash)
    device.write(slot.area_offset, _area_cipher(slot, area_key).encrypt_run(0, material))


def _digest_matches(state: HeaderState, candidate: bytes) -> bool:
    digest = state.metadata.digest
    computed = hashlib.pbkdf2_hmac(digest.hash_name, candidate, digest.salt, digest.iterations,
                                   len(digest.value))
    return hmac.compare_digest(computed, digest.value)


def _open_keyslot(device: BlockDevice, state: HeaderState, slot: Keyslot,
                  passphrase: bytes) -> bytes | None:
    """The volume key if `passphrase` opens `slot`, else None."""
    area_key = _derive(passphrase, slot.kdf, slot.area_key_size)
    material_size = slot.key_size * slot.stripes
    try:
        encrypted = device.read(slot.area_offset, material_size)
    except ShortRead:
        raise CorruptHeader(f"keyslot {slot.number} area lies past the end of the image") from None
    material = _area_cipher(slot, area_key).decrypt_run(0, encrypted)
    candidate = af_merge(material, slot.key_size, slot.stripes, slot.af_hash)
    return candidate if _digest_matches(state, candidate) else None


def _unlock(device: BlockDevice, state: HeaderState, passphrase: bytes,
            keyslot: int | None = None, *, excluding: int | None = None) -> tuple[int, bytes]:
    metadata = state.metadata
    candidates = [slot for slot in metadata.keyslots.values()
                  if slot.number in metadata.digest.keyslots and slot.number != excluding
                  and (keyslot is None or slot.number == keyslot)]
    if keyslot is not None and not candidates:
        raise KeyslotError(f"keyslot {keyslot} is not in use")
    # cryptsetup order: priority 2 (prefer) first, then 1; 0 (ignore) only when named
    candidates.sort(key=lambda slot: (-slot.priority, slot.number))
    for slot in candidates:
        if slot.priority == 0 and keyslot is None:
            continue
        volume_key = _open_keyslot(device, state, slot, passphrase)
        if volume_key is not None:
            return slot.number, volume_key
    raise WrongPassphrase("wrong passphrase")


def open_luks2(device: BlockDevice, passphrase: bytes | None = None, *,
               volume_key: bytes | None = None, keyslot: int | None = None) -> LuksVolume:
    """Unlock a LUKS2 container with a passphrase (or key-file contents), or directly with its
    volume key. Raises NotLuks, CorruptHeader, UnsupportedFormat or WrongPassphrase."""
    state = read_metadata(device)
    if volume_key is not None:
        if not _digest_matches(state, volume_key):
            raise WrongPassphrase("wrong volume key")
        return LuksVolume(device, state, volume_key, None)
    if passphrase is None:
        raise ValueError("open_luks2 needs a passphrase or a volume key")
    opened, key = _unlock(device, state, passphrase, keyslot)
    return LuksVolume(device, state, key, opened)


def is_luks2(device: BlockDevice) -> bool:
    """True if the device carries a valid LUKS2 header (like `cryptsetup isLuks`)."""
    try:
        read_metadata(device)
    except StorageError:
        return False
    return True


def read_header_info(device: BlockDevice) -> dict[str, Any]:
    """Header facts that need no key (uuid, keyslots, segment), for `info` before unlocking."""
    state = read_metadata(device)
    metadata = state.metadata
    return {"uuid": state.binary.uuid, "label": state.binary.label,
            "subsystem": state.binary.subsystem, "seqid": state.binary.seqid,
            "keyslots": sorted(metadata.keyslots), "data_offset": metadata.segment.offset,
            "sector_size": metadata.segment.sector_size}


def _wipe_keyslots_area(device: BlockDevice, start: int, end: int) -> None:
    """Zero what an earlier LUKS header left in the keyslots area (old keyslots could unlock the
    old volume key), as cryptsetup luksFormat does; chunks already zero (a fresh sparse image)
    are not written, so they stay unallocated on the host."""
    chunk = 1 << 20
    zeros = bytes(chunk)
    for offset in range(start, end, chunk):
        length = min(chunk, end - offset)
        if device.read(offset, length) != zeros[:length]:
            device.write(offset, zeros[:length])


def format_luks2(device: BlockDevice, passphrase: bytes, *, pbkdf: Pbkdf = "argon2id",
                 iter_time_ms: int = DEFAULT_ITER_TIME_MS, cost: KdfCost | None = None,
                 data_offset: int = DEFAULT_DATA_OFFSET, sector_size: int = DEFAULT_SECTOR_SIZE,
                 label: str = "", volume_key: bytes | None = None,
                 uuid: str | None = None) -> LuksVolume:
    """Write a new LUKS2 header with one keyslot (slot 0) for `passphrase`.

    KDF costs come from a benchmark against `iter_time_ms` unless `cost` is given (tests pass
    small costs). The data area is not wiped: unwritten sectors stay sparse zeros on the host.
    """
    if not device.writable:
        raise StorageError("cannot format a read-only device")
    if sector_size not in (512, 1024, 2048, 4096):
        raise ValueError("sector size must be 512, 1024, 2048 or 4096")
    if data_offset % 4096 or data_offset < 2 * DEFAULT_HEADER_SIZE + _area_size(VOLUME_KEY_SIZE):
        raise ValueError(f"data offset {data_offset} is too small or not 4096-aligned")
    if device.size < data_offset + sector_size:
        raise StorageError(f"the image ({device.size} bytes) is too small for a LUKS2 volume "
                           f"(header and keyslots take {data_offset} bytes)")
    raw_label = encode_label(label)  # ValueError unless it fits: at most 47 bytes of UTF-8
    volume_key = volume_key if volume_key is not None else os.urandom(VOLUME_KEY_SIZE)
    if len(volume_key) != VOLUME_KEY_SIZE or volume_key[:32] == volume_key[32:]:
        raise ValueError("the volume key must be 64 bytes with distinct halves")
    digest_salt = os.urandom(32)
    digest_iterations = _digest_iterations(fast=cost is not None)
    digest_value = hashlib.pbkdf2_hmac("sha256", volume_key, digest_salt, digest_iterations, 32)
    raw: dict[str, Any] = {
        "keyslots": {},
        "tokens": {},
        "segments": {"0": {"type": "crypt", "offset": str(data_offset), "size": "dynamic",
                           "iv_tweak": "0", "encryption": SUPPORTED_ENCRYPTION,
                           "sector_size": sector_size}},
        "digests": {"0": {"type": "pbkdf2", "keyslots": [], "segments": ["0"], "hash": "sha256",
                          "iterations": digest_iterations, "salt": _b64(digest_salt),
                          "digest": _b64(digest_value)}},
        "config": {"json_size": str(DEFAULT_HEADER_SIZE - 4096),
                   # at most cryptsetup's limit: a bigger data offset leaves a gap, as cryptsetup does
                   "keyslots_size": str(min(data_offset - 2 * DEFAULT_HEADER_SIZE, MAX_KEYSLOTS_SIZE))},
    }
    binary = BinaryHeader(hdr_size=DEFAULT_HEADER_SIZE, seqid=0, raw_label=raw_label,
                          checksum_alg="sha256", uuid=uuid or str(uuid_module.uuid4()),
                          raw_subsystem=b"", hdr_offset=0)
    # An empty-keyslot header first, so add_keyslot can reuse the one keyslot code path. Wipe
    # any old header pair (e.g. re-formatting) by writing ours over it.
    _wipe_keyslots_area(device, 2 * DEFAULT_HEADER_SIZE, data_offset)  # the gap too, if any
    state = _write_headers(device, binary, raw, seqid=1)
    volume = LuksVolume(device, state, volume_key, None)
    volume.opened_keyslot = volume.add_keyslot(passphrase, pbkdf=pbkdf, iter_time_ms=iter_time_ms,
                                               cost=cost, keyslot=0)
    return volume
