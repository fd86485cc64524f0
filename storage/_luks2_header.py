"""LUKS2 on-disk metadata: the binary header pair and the JSON area, parsed as hostile input.

Theory of operation (cryptsetup docs/LUKS2-format.txt): the device starts with two copies of a
header area of `hdr_size` bytes (16 KiB by default), at offset 0 and at offset `hdr_size`. Each
area is a 4096-byte big-endian binary header followed by a NUL-terminated JSON document. The
binary header's checksum (sha256 over the whole area with the csum field zeroed) is the only
protection: there is no MAC, so everything here is validated as if an attacker wrote it. Of the
copies whose checksums verify, the one with the higher `seqid` wins.

`read_metadata` returns the winning copy's raw JSON (kept, so unknown-but-harmless fields such as
tokens survive a rewrite) and a validated model. Every bound is checked before it is used: sizes,
offsets, stripes, KDF costs, JSON size and nesting. Any violation is `CorruptHeader`, a header that
is valid but not handled here is `UnsupportedFormat`, and no LUKS magic at all is `NotLuks`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import struct
from dataclasses import dataclass
from typing import Any

from storage.blockdev import BlockDevice
from storage.errors import CorruptHeader, NotLuks, ShortRead, UnsupportedFormat

MAGIC_PRIMARY = b"LUKS\xba\xbe"
MAGIC_SECONDARY = b"SKUL\xba\xbe"
BINARY_HEADER_SIZE = 4096
# hdr_size values cryptsetup accepts (binary header + JSON area), and where it probes for the
# secondary copy when the primary is unreadable.
VALID_HEADER_SIZES = tuple(16384 << shift for shift in range(9))  # 16 KiB .. 4 MiB
MAX_KEYSLOTS = 32
# cryptsetup's LUKS2_MAX_KEYSLOTS_SIZE: a larger keyslots area is refused (it also bounds what a
# keyslot area, read at unlock and wiped at removal, may span)
MAX_KEYSLOTS_SIZE = 128 << 20
AF_STRIPES = 4000
# Bounds on attacker-chosen KDF costs: beyond these an open would exhaust memory or take hours.
MAX_ARGON2_MEMORY_KIB = 4 * 1024 * 1024
MIN_ARGON2_MEMORY_KIB = 8
MAX_ARGON2_TIME = 64
MAX_ARGON2_LANES = 64
MAX_PBKDF2_ITERATIONS = 50_000_000
MAX_SALT_BYTES = 256
SUPPORTED_HASHES = {"sha1": 20, "sha256": 32, "sha512": 64}
SUPPORTED_KEY_SIZES = (32, 64)
SUPPORTED_ENCRYPTION = "aes-xts-plain64"

# magic[6] version u16 hdr_size u64 seqid u64 label[48] checksum_alg[32] salt[64] uuid[40]
# subsystem[48] hdr_offset u64 _padding[184] csum[64]  (big-endian; then zero padding to 4096)
_BINARY = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")
_CSUM_OFFSET = 448
_CSUM_SIZE = 64
LABEL_FIELD_SIZE = 48  # label and subsystem: up to 47 bytes of text and a terminating NUL


@dataclass(frozen=True)
class BinaryHeader:
    """The fields of one binary header copy that matter after validation.

    Label and subsystem are kept as the stored bytes (at most 47, no NUL), which need not be
    UTF-8: cryptsetup stores whatever bytes it is given and even cuts an over-long label inside
    a character. A rewrite stores them unchanged, as cryptsetup does; `label` and `subsystem`
    are the text to show.
    """

    hdr_size: int
    seqid: int
    raw_label: bytes
    checksum_alg: str
    uuid: str
    raw_subsystem: bytes
    hdr_offset: int

    @property
    def label(self) -> str:
        return header_text(self.raw_label)

    @property
    def subsystem(self) -> str:
        return header_text(self.raw_subsystem)


@dataclass(frozen=True)
class Argon2Params:
    """An argon2i/argon2id keyslot KDF (memory in KiB, as LUKS2 stores it)."""

    variant: str
    time: int
    memory_kib: int
    lanes: int
    salt: bytes


@dataclass(frozen=True)
class Pbkdf2Params:
    """A pbkdf2 keyslot KDF."""

    hash_name: str
    iterations: int
    salt: bytes


@dataclass(frozen=True)
class Keyslot:
    """A validated `luks2` keyslot: where its AF material lives and how to derive its key."""

    number: int
    key_size: int
    kdf: Argon2Params | Pbkdf2Params
    af_hash: str
    stripes: int
    area_offset: int
    area_size: int
    area_key_size: int
    priority: int


@dataclass(frozen=True)
class Digest:
    """The pbkdf2 digest that recognises the right volume key."""

    hash_name: str
    iterations: int
    salt: bytes
    value: bytes
    keyslots: frozenset[int]


@dataclass(frozen=True)
class Segment:
    """The single crypt segment: where the encrypted data lives."""

    offset: int
    size: int | None  # None: "dynamic" (to the end of the device)
    iv_tweak: int
    sector_size: int


@dataclass(frozen=True)
class Metadata:
    """The validated model of one header copy's JSON area."""

    json_size: int
    keyslots_size: int
    keyslots: dict[int, Keyslot]
    digest: Digest
    segment: Segment


@dataclass(frozen=True)
class HeaderState:
    """What `read_metadata` found: the winning binary header, its raw JSON and the model."""

    binary: BinaryHeader
    raw: dict[str, Any]
    metadata: Metadata
    both_copies_valid: bool


# ---------------------------------------------------------------------------------------------
# Binary header


def _stored(field: bytes) -> bytes:
    """The content of a fixed-size text field as cryptsetup reads it (hdr_from_disk): the last
    byte is forced to NUL, so at most size - 1 bytes, up to the first NUL."""
    return field[:-1].split(b"\0", 1)[0]


def _ascii(field: bytes, name: str) -> str:
    """A field that names something (checksum algorithm, uuid): only ASCII is meaningful."""
    try:
        return _stored(field).decode("ascii")
    except UnicodeDecodeError:
        raise CorruptHeader(f"LUKS2 header field {name} is not ASCII") from None


def header_text(stored: bytes) -> str:
    """Label or subsystem bytes as text: UTF-8, with any undecodable byte shown as U+FFFD.

    Not refused: cryptsetup accepts and shows any bytes here, so refusing would lock us out of
    images it opens; the replacement keeps the text printable (no lone surrogates)."""
    return stored.decode("utf-8", errors="replace")


def encode_label(text: str, name: str = "label") -> bytes:
    """`text` as a label or subsystem field stores it: UTF-8, at most 47 bytes, no NUL.

    ValueError (a clear one-line message) for text that cannot be stored so that it reads back
    the same: cryptsetup 2.6 silently cuts a longer label, even inside a character."""
    if "\0" in text:
        raise ValueError(f"{name} must not contain NUL characters")
    try:
        stored = text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not valid UTF-8 text") from None
    if len(stored) >= LABEL_FIELD_SIZE:
        raise ValueError(f"{name} is {len(stored)} bytes as UTF-8; a LUKS2 {name} holds at most "
                         f"{LABEL_FIELD_SIZE - 1}")
    return stored


def _field(value: bytes, size: int, name: str) -> bytes:
    """A text field for writing; refuses what `_stored` would not read back unchanged."""
    if len(value) >= size or b"\0" in value:
        raise ValueError(f"LUKS2 header field {name} must be under {size} bytes without NUL")
    return value


def _checksum(area: bytes, algorithm: str) -> bytes:
    zeroed = area[:_CSUM_OFFSET] + bytes(_CSUM_SIZE) + area[_CSUM_OFFSET + _CSUM_SIZE:]
    return hashlib.new(algorithm, zeroed).digest()


def _parse_binary(block: bytes, expected_offset: int) -> BinaryHeader:
    """Parse one binary header (first 4096 bytes of a header area); checksum not yet checked."""
    (magic, version, hdr_size, seqid, label, checksum_alg, _salt, uuid, subsystem, hdr_offset,
     _padding, _csum) = _BINARY.unpack_from(block)
    expected_magic = MAGIC_PRIMARY if expected_offset == 0 else MAGIC_SECONDARY
    if magic != expected_magic:
        raise NotLuks("no LUKS header magic")
    if version != 2:
        raise UnsupportedFormat(f"LUKS version {version} is not supported (only LUKS2)")
    if hdr_size not in VALID_HEADER_SIZES:
        raise CorruptHeader(f"invalid LUKS2 header size {hdr_size}")
    if hdr_offset != expected_offset:
        raise CorruptHeader(f"LUKS2 header copy claims offset {hdr_offset}, found at {expected_offset}")
    algorithm = _ascii(checksum_alg, "checksum_alg")
    if algorithm not in SUPPORTED_HASHES:
        raise CorruptHeader(f"unsupported LUKS2 header checksum algorithm {algorithm!r}")
    return BinaryHeader(hdr_size=hdr_size, seqid=seqid, raw_label=_stored(label),
                        checksum_alg=algorithm, uuid=_ascii(uuid, "uuid"),
                        raw_subsystem=_stored(subsystem), hdr_offset=hdr_offset)


def build_header_area(header: BinaryHeader, salt: bytes, raw: dict[str, Any]) -> bytes:
    """Serialise one header copy (binary header + JSON area) with a fresh checksum."""
    text = json.dumps(raw, separators=(",", ":"), sort_keys=False).encode()
    json_size = header.hdr_size - BINARY_HEADER_SIZE
    if len(text) >= json_size:
        raise CorruptHeader(f"LUKS2 metadata ({len(text)} bytes) does not fit the JSON area")
    magic = MAGIC_PRIMARY if header.hdr_offset == 0 else MAGIC_SECONDARY
    binary = _BINARY.pack(magic, 2, header.hdr_size, header.seqid,
                          _field(header.raw_label, LABEL_FIELD_SIZE, "label"),
                          _field(header.checksum_alg.encode("ascii"), 32, "checksum_alg"), salt,
                          _field(header.uuid.encode("ascii"), 40, "uuid"),
                          _field(header.raw_subsystem, LABEL_FIELD_SIZE, "subsystem"),
                          header.hdr_offset, bytes(184), bytes(64))
    area = binary.ljust(BINARY_HEADER_SIZE, b"\0") + text.ljust(json_size, b"\0")
    checksum = _checksum(area, header.checksum_alg)
    return area[:_CSUM_OFFSET] + checksum.ljust(_CSUM_SIZE, b"\0") + area[_CSUM_OFFSET + _CSUM_SIZE:]


def _read(device: BlockDevice, offset: int, length: int, what: str) -> bytes:
    try:
        return device.read(offset, length)
    except ShortRead:
        raise CorruptHeader(f"image is truncated: {what} at {offset} is past its end") from None


def _read_copy(device: BlockDevice, offset: int) -> tuple[BinaryHeader, dict[str, Any], Metadata]:
    """Read, checksum and validate the header copy at `offset`."""
    expected_magic = MAGIC_PRIMARY if offset == 0 else MAGIC_SECONDARY
    if offset + len(expected_magic) > device.size:
        raise NotLuks("no LUKS header magic (the image is too short)")
    if device.read(offset, len(expected_magic)) != expected_magic:
        raise NotLuks("no LUKS header magic")
    block = _read(device, offset, BINARY_HEADER_SIZE, "LUKS2 binary header")
    header = _parse_binary(block, offset)
    area = _read(device, offset, header.hdr_size, "LUKS2 JSON area")
    stored = area[_CSUM_OFFSET:_CSUM_OFFSET + _CSUM_SIZE]
    computed = _checksum(area, header.checksum_alg)
    if stored != computed.ljust(_CSUM_SIZE, b"\0"):
        raise CorruptHeader(f"LUKS2 header checksum mismatch (copy at offset {offset})")
    raw = _parse_json(area[BINARY_HEADER_SIZE:])
    metadata = validate(raw, header.hdr_size, device.size)
    return header, raw, metadata


def read_metadata(device: BlockDevice) -> HeaderState:
    """Find the valid header copy with the highest seqid, or explain why there is none."""
    errors: list[Exception] = []
    copies: list[tuple[BinaryHeader, dict[str, Any], Metadata]] = []
    try:
        copies.append(_read_copy(device, 0))
    except (NotLuks, CorruptHeader, UnsupportedFormat) as error:
        errors.append(error)
    secondary_offsets = [copies[0][0].hdr_size] if copies else list(VALID_HEADER_SIZES)
    for offset in secondary_offsets:
        if offset + BINARY_HEADER_SIZE > device.size:
            break
        try:
            copies.append(_read_copy(device, offset))
            break
        except NotLuks as error:
            if copies:  # the primary told us where the secondary must be
                errors.append(error)
        except (CorruptHeader, UnsupportedFormat) as error:
            errors.append(error)
            break
    if not copies:
        for found in errors:
            if isinstance(found, UnsupportedFormat):
                raise found
        for found in errors:
            if isinstance(found, CorruptHeader):
                raise CorruptHeader(f"no valid LUKS2 header: {found}") from None
        raise NotLuks("not a LUKS2 volume (no LUKS header found)")
    if len(copies) == 2 and copies[0][0].uuid != copies[1][0].uuid:
        raise CorruptHeader("the two LUKS2 header copies belong to different volumes")
    best = max(copies, key=lambda copy: copy[0].seqid)  # max keeps the primary on a tie
    return HeaderState(binary=best[0], raw=best[1], metadata=best[2],
                       both_copies_valid=len(copies) == 2 and copies[0][0].seqid == copies[1][0].seqid)


# ---------------------------------------------------------------------------------------------
# JSON area


def _parse_json(area: bytes) -> dict[str, Any]:
    end = area.find(b"\0")
    text = area if end < 0 else area[:end]
    if end < 0:
        raise CorruptHeader("LUKS2 JSON area is not NUL-terminated")
    try:
        document = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise CorruptHeader(f"LUKS2 JSON area is malformed: {type(error).__name__}") from None
    if not isinstance(document, dict):
        raise CorruptHeader("LUKS2 JSON area is not an object")
    return document


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CorruptHeader(f"LUKS2 metadata: {where} must be an object")
    return value


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise CorruptHeader(f"LUKS2 metadata: {where} must be a string")
    return value


def _integer(value: object, where: str, low: int, high: int) -> int:
    """An integer that LUKS2 may store as a JSON number or (for u64) a decimal string."""
    if isinstance(value, bool):
        raise CorruptHeader(f"LUKS2 metadata: {where} must be an integer")
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit()) or len(value) > 20:
            raise CorruptHeader(f"LUKS2 metadata: {where} is not a decimal integer")
        value = int(value)
    if not isinstance(value, int):
        raise CorruptHeader(f"LUKS2 metadata: {where} must be an integer")
    if not low <= value <= high:
        raise CorruptHeader(f"LUKS2 metadata: {where} = {value} is outside [{low}, {high}]")
    return value


def _base64(value: object, where: str, max_size: int = MAX_SALT_BYTES) -> bytes:
    text = _string(value, where)
    if len(text) > 4 * max_size:
        raise CorruptHeader(f"LUKS2 metadata: {where} is too long")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CorruptHeader(f"LUKS2 metadata: {where} is not base64") from None


def _hash_name(value: object, where: str) -> str:
    name = _string(value, where)
    if name not in SUPPORTED_HASHES:
        raise UnsupportedFormat(f"LUKS2 {where} {name!r} is not supported")
    return name


def _number_key(key: str, where: str, limit: int) -> int:
    if not (key.isascii() and key.isdigit()) or len(key) > 3 or int(key) >= limit:
        raise CorruptHeader(f"LUKS2 metadata: {where} id {key!r} is invalid")
    return int(key)


def validate(raw: dict[str, Any], hdr_size: int, device_size: int) -> Metadata:
    """Check every field the implementation relies on; return the typed model."""
    u64 = (1 << 64) - 1
    for section in ("config", "keyslots", "digests", "segments", "tokens"):
        _object(raw.get(section), section)
    config = raw["config"]
    json_size = _integer(config.get("json_size"), "config.json_size", 0, u64)
    if json_size != hdr_size - BINARY_HEADER_SIZE:
        raise CorruptHeader(f"LUKS2 config.json_size {json_size} disagrees with header size {hdr_size}")
    keyslots_size = _integer(config.get("keyslots_size"), "config.keyslots_size", 0, MAX_KEYSLOTS_SIZE)
    if keyslots_size % 4096:
        raise CorruptHeader("LUKS2 config.keyslots_size is not 4096-aligned")
    requirements = config.get("requirements")
    if requirements is not None:
        mandatory = _object(requirements, "config.requirements").get("mandatory", [])
        if mandatory:
            raise UnsupportedFormat(f"LUKS2 volume has requirements {mandatory!r} (e.g. an "
                                    "unfinished reencryption); finish them with cryptsetup first")
    keyslots_start = 2 * hdr_size
    keyslots_end = keyslots_start + keyslots_size

    segments = raw["segments"]
    if len(segments) != 1 or "0" not in segments:
        raise UnsupportedFormat("only LUKS2 volumes with exactly one segment are supported")
    segment = _validate_segment(_object(segments["0"], "segments.0"), keyslots_end, device_size)

    keyslots: dict[int, Keyslot] = {}
    for key, value in raw["keyslots"].items():
        number = _number_key(key, "keyslot", MAX_KEYSLOTS)
        keyslots[number] = _validate_keyslot(number, _object(value, f"keyslots.{key}"),
                                             keyslots_start, keyslots_end)
    areas = sorted((slot.area_offset, slot.area_offset + slot.area_size) for slot in keyslots.values())
    for (_, end), (start, _) in itertools.pairwise(areas):
        if start < end:
            raise CorruptHeader("LUKS2 keyslot areas overlap")

    digests = raw["digests"]
    if len(digests) != 1:
        raise UnsupportedFormat("only LUKS2 volumes with exactly one digest are supported")
    ((digest_key, digest_value),) = digests.items()
    _number_key(digest_key, "digest", MAX_KEYSLOTS)
    digest = _validate_digest(_object(digest_value, f"digests.{digest_key}"), set(keyslots))
    return Metadata(json_size=json_size, keyslots_size=keyslots_size, keyslots=keyslots,
                    digest=digest, segment=segment)


def _validate_segment(segment: dict[str, Any], keyslots_end: int, device_size: int) -> Segment:
    if segment.get("type") != "crypt":
        raise UnsupportedFormat(f"LUKS2 segment type {segment.get('type')!r} is not supported")
    if "integrity" in segment:
        raise UnsupportedFormat("LUKS2 segments with dm-integrity are not supported")
    if segment.get("flags"):
        raise UnsupportedFormat(f"LUKS2 segment flags {segment.get('flags')!r} are not supported")
    if segment.get("encryption") != SUPPORTED_ENCRYPTION:
        raise UnsupportedFormat(f"LUKS2 segment encryption {segment.get('encryption')!r} is not "
                                f"supported (only {SUPPORTED_ENCRYPTION})")
    sector_size = _integer(segment.get("sector_size"), "segments.0.sector_size", 512, 4096)
    if sector_size & (sector_size - 1):
        raise CorruptHeader("LUKS2 segment sector_size is not a power of two")
    offset = _integer(segment.get("offset"), "segments.0.offset", keyslots_end, (1 << 63) - 1)
    if offset % 512:
        raise CorruptHeader("LUKS2 segment offset is not sector-aligned")
    size_field = segment.get("size")
    size: int | None = None
    if size_field != "dynamic":
        size = _integer(size_field, "segments.0.size", sector_size, (1 << 63) - 1)
        if size % sector_size:
            raise CorruptHeader("LUKS2 segment size is not a multiple of its sector size")
    iv_tweak = _integer(segment.get("iv_tweak", "0"), "segments.0.iv_tweak", 0, (1 << 63) - 1)
    end = offset + (size if size is not None else sector_size)
    if end > device_size:
        raise CorruptHeader(f"LUKS2 data segment ends at {end}, past the {device_size}-byte image")
    return Segment(offset=offset, size=size, iv_tweak=iv_tweak, sector_size=sector_size)


def _validate_keyslot(number: int, slot: dict[str, Any], area_start: int, area_end: int) -> Keyslot:
    if slot.get("type") != "luks2":
        raise UnsupportedFormat(f"LUKS2 keyslot {number} type {slot.get('type')!r} is not supported")
    key_size = _integer(slot.get("key_size"), f"keyslots.{number}.key_size", 1, 512)
    if key_size not in SUPPORTED_KEY_SIZES:
        raise UnsupportedFormat(f"LUKS2 keyslot {number}: key size {key_size} is not supported")
    af = _object(slot.get("af"), f"keyslots.{number}.af")
    if af.get("type") != "luks1":
        raise UnsupportedFormat(f"LUKS2 keyslot {number}: AF type {af.get('type')!r} is not supported")
    stripes = _integer(af.get("stripes"), f"keyslots.{number}.af.stripes", AF_STRIPES, AF_STRIPES)
    af_hash = _hash_name(af.get("hash"), f"keyslot {number} AF hash")
    area = _object(slot.get("area"), f"keyslots.{number}.area")
    if area.get("type") != "raw" or area.get("encryption") != SUPPORTED_ENCRYPTION:
        raise UnsupportedFormat(f"LUKS2 keyslot {number}: area {area.get('type')!r} / "
                                f"{area.get('encryption')!r} is not supported")
    area_key_size = _integer(area.get("key_size"), f"keyslots.{number}.area.key_size", 1, 512)
    if area_key_size not in SUPPORTED_KEY_SIZES:
        raise UnsupportedFormat(f"LUKS2 keyslot {number}: area key size {area_key_size} unsupported")
    offset = _integer(area.get("offset"), f"keyslots.{number}.area.offset", area_start, area_end)
    size = _integer(area.get("size"), f"keyslots.{number}.area.size", 0, area_end - offset)
    if offset % 512 or size < key_size * stripes:
        raise CorruptHeader(f"LUKS2 keyslot {number}: area offset/size are inconsistent")
    priority = _integer(slot.get("priority", 1), f"keyslots.{number}.priority", 0, 2)
    return Keyslot(number=number, key_size=key_size, kdf=_validate_kdf(number, slot.get("kdf")),
                   af_hash=af_hash, stripes=stripes, area_offset=offset, area_size=size,
                   area_key_size=area_key_size, priority=priority)


def _validate_kdf(number: int, value: object) -> Argon2Params | Pbkdf2Params:
    kdf = _object(value, f"keyslots.{number}.kdf")
    kind = kdf.get("type")
    where = f"keyslots.{number}.kdf"
    salt = _base64(kdf.get("salt"), f"{where}.salt")
    if not salt:
        raise CorruptHeader(f"LUKS2 {where}.salt is empty")
    if kind in ("argon2i", "argon2id"):
        if kind == "argon2i":
            raise UnsupportedFormat(f"LUKS2 keyslot {number}: argon2i is not supported (argon2id is)")
        return Argon2Params(
            variant=kind,
            time=_integer(kdf.get("time"), f"{where}.time", 1, MAX_ARGON2_TIME),
            memory_kib=_integer(kdf.get("memory"), f"{where}.memory", MIN_ARGON2_MEMORY_KIB,
                                MAX_ARGON2_MEMORY_KIB),
            lanes=_integer(kdf.get("cpus"), f"{where}.cpus", 1, MAX_ARGON2_LANES),
            salt=salt)
    if kind == "pbkdf2":
        return Pbkdf2Params(
            hash_name=_hash_name(kdf.get("hash"), f"keyslot {number} pbkdf2 hash"),
            iterations=_integer(kdf.get("iterations"), f"{where}.iterations", 1, MAX_PBKDF2_ITERATIONS),
            salt=salt)
    raise UnsupportedFormat(f"LUKS2 keyslot {number}: KDF {kind!r} is not supported")


def _validate_digest(digest: dict[str, Any], keyslot_numbers: set[int]) -> Digest:
    if digest.get("type") != "pbkdf2":
        raise UnsupportedFormat(f"LUKS2 digest type {digest.get('type')!r} is not supported")
    hash_name = _hash_name(digest.get("hash"), "digest hash")
    iterations = _integer(digest.get("iterations"), "digest.iterations", 1, MAX_PBKDF2_ITERATIONS)
    salt = _base64(digest.get("salt"), "digest.salt")
    value = _base64(digest.get("digest"), "digest.digest")
    if not salt or len(value) != SUPPORTED_HASHES[hash_name]:
        raise CorruptHeader("LUKS2 digest salt or value has the wrong size")
    slots = digest.get("keyslots")
    segments = digest.get("segments")
    if not isinstance(slots, list) or not isinstance(segments, list) or segments != ["0"]:
        raise CorruptHeader("LUKS2 digest must list its keyslots and segment 0")
    linked = frozenset(_number_key(_string(slot, "digest keyslot"), "keyslot", MAX_KEYSLOTS)
                       for slot in slots)
    if not linked <= keyslot_numbers:
        raise CorruptHeader("LUKS2 digest refers to a keyslot that does not exist")
    return Digest(hash_name=hash_name, iterations=iterations, salt=salt, value=value,
                  keyslots=linked)
