"""storage.luks2: format/open round trips, keyslot management, and the header as hostile input."""

from __future__ import annotations

import copy
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage._af import af_merge, af_split
from storage._luks2_header import BinaryHeader, _checksum, build_header_area, read_metadata
from storage.blockdev import FileBlockDevice, MemoryBlockDevice
from storage.errors import (
    CorruptHeader,
    KeyslotError,
    NotLuks,
    StorageError,
    UnsupportedFormat,
    WrongPassphrase,
)
from storage.luks2 import (
    KdfCost,
    LuksVolume,
    format_luks2,
    is_luks2,
    open_luks2,
    read_header_info,
)

FAST_ARGON2 = KdfCost(iterations=1, memory_kib=8 * 1024, parallel=1)
FAST_PBKDF2 = KdfCost(iterations=1000)
DEVICE_SIZE = (16 << 20) + (1 << 20)


def _formatted(pbkdf: str = "pbkdf2", passphrase: bytes = b"correct horse") -> tuple[
        MemoryBlockDevice, LuksVolume]:
    device = MemoryBlockDevice(DEVICE_SIZE)
    cost = FAST_PBKDF2 if pbkdf == "pbkdf2" else FAST_ARGON2
    volume = format_luks2(device, passphrase, pbkdf=pbkdf, cost=cost)  # type: ignore[arg-type]
    return device, volume


def _rewrite_metadata(device: MemoryBlockDevice, mutate: Callable[[dict[str, Any]], None]) -> None:
    """Change the JSON of both header copies and re-checksum them: what a hostile host can do."""
    state = read_metadata(device)
    raw = copy.deepcopy(state.raw)
    mutate(raw)
    for offset in (0, state.binary.hdr_size):
        header = BinaryHeader(hdr_size=state.binary.hdr_size, seqid=state.binary.seqid + 1,
                              raw_label=b"", checksum_alg="sha256", uuid=state.binary.uuid,
                              raw_subsystem=b"", hdr_offset=offset)
        device.write(offset, build_header_area(header, os.urandom(64), raw))


def test_af_split_and_merge_round_trip() -> None:
    key = os.urandom(64)
    material = af_split(key, 4000, "sha256")
    assert len(material) == 64 * 4000
    assert af_merge(material, 64, 4000, "sha256") == key
    damaged = bytearray(material)
    damaged[1234] ^= 1
    assert af_merge(bytes(damaged), 64, 4000, "sha256") != key  # any stripe matters


@pytest.mark.parametrize("pbkdf", ["argon2id", "pbkdf2"])
def test_format_then_open_recovers_the_volume_key(pbkdf: str) -> None:
    device, volume = _formatted(pbkdf)
    reopened = open_luks2(device, b"correct horse")
    assert reopened.volume_key == volume.volume_key
    assert reopened.opened_keyslot == 0
    assert reopened.uuid == volume.uuid
    assert (reopened.data_offset, reopened.sector_size) == (16 << 20, 4096)
    assert reopened.data_size == 1 << 20
    assert reopened.dump()["keyslots"][0]["kdf"]["type"] == pbkdf


def test_wrong_passphrase_is_refused_and_writes_nothing() -> None:
    device, _ = _formatted()
    before = device.snapshot()
    with pytest.raises(WrongPassphrase, match="wrong passphrase"):
        open_luks2(device, b"Correct horse")
    assert device.snapshot() == before


def test_open_with_the_volume_key_and_a_wrong_one() -> None:
    device, volume = _formatted()
    assert open_luks2(device, volume_key=volume.volume_key).uuid == volume.uuid
    with pytest.raises(WrongPassphrase):
        open_luks2(device, volume_key=os.urandom(64))


def test_data_written_through_the_cipher_reads_back() -> None:
    device, volume = _formatted()
    cipher = volume.cipher()
    plaintext = os.urandom(4096 * 2)
    device.write(volume.data_offset + 4096 * 3, cipher.encrypt_run(3, plaintext))
    again = open_luks2(device, b"correct horse").cipher()
    assert again.decrypt_run(3, device.read(volume.data_offset + 4096 * 3, 8192)) == plaintext
    assert device.read(volume.data_offset + 4096 * 3, 8192) != plaintext


def test_add_change_and_remove_keyslots() -> None:
    device, volume = _formatted()
    second = volume.add_keyslot(b"second", pbkdf="argon2id", cost=FAST_ARGON2)
    assert second == 1 and volume.keyslots == [0, 1]
    assert open_luks2(device, b"second").opened_keyslot == 1
    replaced = volume.change_passphrase(0, b"renamed", pbkdf="pbkdf2", cost=FAST_PBKDF2)
    assert replaced not in (0, 1)
    with pytest.raises(WrongPassphrase):
        open_luks2(device, b"correct horse")
    assert open_luks2(device, b"renamed").volume_key == volume.volume_key
    volume.remove_keyslot(1)
    with pytest.raises(WrongPassphrase):
        open_luks2(device, b"second")
    with pytest.raises(KeyslotError, match="last keyslot"):
        volume.remove_keyslot(replaced)
    with pytest.raises(KeyslotError):
        volume.remove_keyslot(7)


def test_tokens_survive_rewrites_and_lose_removed_keyslots() -> None:
    device, volume = _formatted()
    slot = volume.add_keyslot(b"token slot", pbkdf="pbkdf2", cost=FAST_PBKDF2)
    token = {"type": "systemd-tpm2", "keyslots": ["0", str(slot)], "tpm2-blob": "AAAA"}
    _rewrite_metadata(device, lambda raw: raw["tokens"].update({"0": token}))
    reopened = open_luks2(device, b"token slot")
    reopened.remove_keyslot(slot)
    tokens = read_metadata(device).raw["tokens"]
    assert tokens["0"]["keyslots"] == ["0"] and tokens["0"]["tpm2-blob"] == "AAAA"


def test_removed_keyslot_area_is_wiped() -> None:
    device, volume = _formatted()
    slot = volume.add_keyslot(b"temporary", pbkdf="pbkdf2", cost=FAST_PBKDF2)
    area = volume.dump()["keyslots"][slot]
    material = device.read(area["area_offset"], area["area_size"])
    volume.remove_keyslot(slot)
    assert device.read(area["area_offset"], area["area_size"]) != material


def test_reformatting_wipes_old_keyslots_and_keeps_new_images_sparse(tmp_path: Path) -> None:
    device, _ = _formatted()
    old_material = device.read(32768, 258048)
    format_luks2(device, b"fresh", pbkdf="pbkdf2", cost=FAST_PBKDF2)
    assert old_material not in device.snapshot()
    with pytest.raises(WrongPassphrase):
        open_luks2(device, b"correct horse")
    image = tmp_path / "sparse.img"
    with FileBlockDevice(image, writable=True, create_size=DEVICE_SIZE) as file_device:
        format_luks2(file_device, b"x", pbkdf="pbkdf2", cost=FAST_PBKDF2)
    assert os.stat(image).st_blocks * 512 < 1 << 20  # headers and one keyslot only


def test_keyslots_fill_up_cleanly() -> None:
    device = MemoryBlockDevice((1 << 20) + 4096)
    volume = format_luks2(device, b"a", pbkdf="pbkdf2", cost=FAST_PBKDF2, data_offset=1 << 20)
    with pytest.raises(KeyslotError):
        for index in range(40):
            volume.add_keyslot(b"k%d" % index, pbkdf="pbkdf2", cost=FAST_PBKDF2)
    assert open_luks2(device, b"a").volume_key == volume.volume_key


def test_secrets_never_appear_in_repr_or_dump() -> None:
    _, volume = _formatted()
    text = repr(volume) + json.dumps(volume.dump()) + repr(volume.cipher())
    assert volume.volume_key.hex() not in text and "volume_key" not in text


def test_a_damaged_primary_header_falls_back_to_the_secondary() -> None:
    device, volume = _formatted()
    device.write(5000, b"garbage")  # inside the primary's JSON area
    assert open_luks2(device, b"correct horse").volume_key == volume.volume_key
    device.write(0, b"\0" * 6)  # primary magic gone as well
    assert is_luks2(device)


def test_the_copy_with_the_higher_seqid_wins() -> None:
    device, volume = _formatted()
    old_primary = device.read(0, 16384)
    volume.add_keyslot(b"newer", pbkdf="pbkdf2", cost=FAST_PBKDF2)
    device.write(0, old_primary)  # the primary is a valid but older copy now
    assert open_luks2(device, b"newer").opened_keyslot == 1


def test_not_luks_and_empty_devices() -> None:
    with pytest.raises(NotLuks):
        open_luks2(MemoryBlockDevice(DEVICE_SIZE), b"x")
    noise = MemoryBlockDevice(DEVICE_SIZE, initial=random.Random(1).randbytes(DEVICE_SIZE))
    with pytest.raises(NotLuks):
        open_luks2(noise, b"x")
    assert not is_luks2(noise)
    with pytest.raises(NotLuks):  # shorter than a binary header: still "not LUKS", not "corrupt"
        open_luks2(MemoryBlockDevice(5, initial=b"hello"), b"x")
    with pytest.raises(CorruptHeader, match="truncated"):
        open_luks2(MemoryBlockDevice(7, initial=b"LUKS\xba\xbe\x00"), b"x")


def test_luks1_is_reported_as_unsupported() -> None:
    device = MemoryBlockDevice(1 << 20)
    device.write(0, b"LUKS\xba\xbe\x00\x01")
    with pytest.raises(UnsupportedFormat, match="LUKS version 1"):
        open_luks2(device, b"x")


# Where the binary header keeps its text fields (cryptsetup lib/luks2/luks2.h, struct
# luks2_hdr_disk): label[48] at 24, checksum_alg[32] at 72, uuid[40] at 168, subsystem[48] at 208.
LABEL_AT, CHECKSUM_ALG_AT, UUID_AT, SUBSYSTEM_AT = 24, 72, 168, 208


def _patch_binary(device: MemoryBlockDevice, position: int, value: bytes,
                  copies: tuple[int, ...] = (0, 16384)) -> None:
    """Overwrite bytes of binary header copies and fix their checksums: what a hostile host, or
    another LUKS2 writer, can put there."""
    for offset in copies:
        area = bytearray(device.read(offset, 16384))
        area[position:position + len(value)] = value
        area[448:512] = bytes(64)
        area[448:512] = _checksum(bytes(area), "sha256").ljust(64, b"\0")
        device.write(offset, bytes(area))


@pytest.mark.parametrize("label", ["café", "ラベル ☕", "é" * 23 + "a", ""])
def test_a_unicode_label_round_trips_through_format_open_and_rewrites(label: str) -> None:
    device = MemoryBlockDevice(DEVICE_SIZE)
    format_luks2(device, b"pw", pbkdf="pbkdf2", cost=FAST_PBKDF2, label=label)
    volume = open_luks2(device, b"pw")
    assert volume.label == label and volume.dump()["label"] == label
    assert read_header_info(device)["label"] == label
    assert volume.subsystem == "" and read_header_info(device)["subsystem"] == ""
    volume.add_keyslot(b"second", pbkdf="pbkdf2", cost=FAST_PBKDF2)  # rewrites both copies
    assert open_luks2(device, b"second").label == label
    for offset in (0, 16384):  # stored as cryptsetup stores it: UTF-8, NUL-padded to 48 bytes
        assert device.read(offset + LABEL_AT, 48) == label.encode().ljust(48, b"\0")


@pytest.mark.parametrize(("label", "message"), [
    ("é" * 24, "48 bytes as UTF-8; a LUKS2 label holds at most 47"),
    ("x" * 60, "60 bytes as UTF-8; a LUKS2 label holds at most 47"),
    ("a\0b", "label must not contain NUL"),
    ("caf\udce9", "not valid UTF-8"),  # what Python makes of a non-UTF-8 byte in argv
])
def test_a_label_that_cannot_be_stored_is_refused_before_anything_is_written(
        label: str, message: str) -> None:
    device = MemoryBlockDevice(DEVICE_SIZE)
    with pytest.raises(ValueError, match=message):
        format_luks2(device, b"pw", pbkdf="pbkdf2", cost=FAST_PBKDF2, label=label)
    assert device.snapshot() == bytes(DEVICE_SIZE)


@pytest.mark.parametrize(("stored", "shown"), [
    (b"caf\xc3\xa9", "café"),
    (b"\xff\xfeab", "\ufffd\ufffdab"),  # not UTF-8: cryptsetup accepts it, so do we
    ("é".encode() * 24, "é" * 23 + "\ufffd"),  # no NUL: only 47 bytes count, a character is cut
    (b"x" * 48, "x" * 47),
    (b"ab\0cd", "ab"),
])
def test_label_and_subsystem_bytes_read_as_cryptsetup_reads_them(stored: bytes, shown: str) -> None:
    """cryptsetup keeps the first 47 bytes of each 48-byte field up to a NUL, whatever they are
    (luks2_disk_metadata.c hdr_from_disk); we show them as UTF-8 (undecodable bytes as U+FFFD)
    and write the stored bytes back unchanged when the header is rewritten, as cryptsetup does."""
    device, _ = _formatted()
    _patch_binary(device, LABEL_AT, stored.ljust(48, b"\0"))
    _patch_binary(device, SUBSYSTEM_AT, stored.ljust(48, b"\0"))
    volume = open_luks2(device, b"correct horse")
    assert (volume.label, volume.subsystem) == (shown, shown)
    info = read_header_info(device)
    assert (info["label"], info["subsystem"]) == (shown, shown)
    json.dumps(volume.dump(), ensure_ascii=False).encode()  # printable: no lone surrogates
    volume.add_keyslot(b"second", pbkdf="pbkdf2", cost=FAST_PBKDF2)
    kept = stored[:47].split(b"\0", 1)[0].ljust(48, b"\0")
    for offset in (0, 16384):
        assert device.read(offset + LABEL_AT, 48) == kept
        assert device.read(offset + SUBSYSTEM_AT, 48) == kept
    assert open_luks2(device, b"second").label == shown


@pytest.mark.parametrize(("position", "value", "name"), [
    (UUID_AT, "é".encode() * 18, "uuid"),
    (CHECKSUM_ALG_AT, b"sh\xc3\xa9256\0", "checksum_alg"),
])
def test_fields_that_must_be_ascii_stay_strict(position: int, value: bytes, name: str) -> None:
    device, _ = _formatted()
    _patch_binary(device, position, value)
    with pytest.raises(CorruptHeader, match=f"{name} is not ASCII"):
        open_luks2(device, b"correct horse")


def test_header_copies_of_different_volumes_are_refused() -> None:
    device, _ = _formatted()
    _patch_binary(device, UUID_AT, b"00000000-0000-4000-8000-000000000000\0", copies=(16384,))
    with pytest.raises(CorruptHeader, match="different volumes"):
        open_luks2(device, b"correct horse")


HOSTILE_MUTATIONS: dict[str, tuple[Callable[[dict[str, Any]], None], type[StorageError]]] = {
    "huge argon2 memory": (lambda raw: raw["keyslots"]["0"]["kdf"].update(
        type="argon2id", time=4, cpus=4, memory=64 * 1024 * 1024), CorruptHeader),
    "huge pbkdf2 iterations": (lambda raw: raw["keyslots"]["0"]["kdf"].update(
        iterations=4_000_000_000), CorruptHeader),
    "huge stripes": (lambda raw: raw["keyslots"]["0"]["af"].update(stripes=10**9), CorruptHeader),
    "area past keyslots": (lambda raw: raw["keyslots"]["0"]["area"].update(
        offset=str(1 << 40)), CorruptHeader),
    "area overlaps headers": (lambda raw: raw["keyslots"]["0"]["area"].update(offset="0"),
                              CorruptHeader),
    "segment past the image": (lambda raw: raw["segments"]["0"].update(offset=str(1 << 50)),
                               CorruptHeader),
    "requirements": (lambda raw: raw["config"].update(
        requirements={"mandatory": ["online-reencrypt-v2"]}), UnsupportedFormat),
    "unknown segment type": (lambda raw: raw["segments"]["0"].update(type="linear"),
                             UnsupportedFormat),
    "integrity segment": (lambda raw: raw["segments"]["0"].update(
        integrity={"type": "hmac(sha256)"}), UnsupportedFormat),
    "other cipher": (lambda raw: raw["segments"]["0"].update(encryption="serpent-cbc-essiv"),
                     UnsupportedFormat),
    "bad sector size": (lambda raw: raw["segments"]["0"].update(sector_size=3000), CorruptHeader),
    "string for integer": (lambda raw: raw["keyslots"]["0"].update(key_size="sixty-four"),
                           CorruptHeader),
    "bad base64 salt": (lambda raw: raw["digests"]["0"].update(salt="!!!"), CorruptHeader),
    "digest of a ghost keyslot": (lambda raw: raw["digests"]["0"].update(keyslots=["0", "9"]),
                                  CorruptHeader),
    "missing section": (lambda raw: raw.pop("segments"), CorruptHeader),
    "keyslot id out of range": (lambda raw: raw["keyslots"].update(
        {"99": raw["keyslots"]["0"]}), CorruptHeader),
    "json_size lie": (lambda raw: raw["config"].update(json_size="999999"), CorruptHeader),
    "unicode digits": (lambda raw: raw["segments"]["0"].update(offset="\u00b2\u00b3"),
                       CorruptHeader),
    "unicode keyslot id": (lambda raw: raw["keyslots"].update({"\u0661": raw["keyslots"]["0"]}),
                           CorruptHeader),
    "boolean integer": (lambda raw: raw["keyslots"]["0"]["kdf"].update(iterations=True),
                        CorruptHeader),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_MUTATIONS))
def test_hostile_metadata_is_a_clean_error(name: str) -> None:
    mutate, expected = HOSTILE_MUTATIONS[name]
    device, _ = _formatted()
    _rewrite_metadata(device, mutate)
    with pytest.raises(expected):
        open_luks2(device, b"correct horse")


def _write_json_text(device: MemoryBlockDevice, text: bytes) -> None:
    """Put arbitrary JSON bytes into both header copies with valid checksums."""
    state = read_metadata(device)
    for offset in (0, 16384):
        header = BinaryHeader(hdr_size=16384, seqid=state.binary.seqid + 1, raw_label=b"",
                              checksum_alg="sha256", uuid=state.binary.uuid, raw_subsystem=b"",
                              hdr_offset=offset)
        area = bytearray(build_header_area(header, os.urandom(64), {}))
        area[4096:] = text.ljust(16384 - 4096, b"\0")
        area[448:512] = bytes(64)
        area[448:512] = _checksum(bytes(area), "sha256").ljust(64, b"\0")
        device.write(offset, bytes(area))


@pytest.mark.parametrize("text", [b"[" * 6000 + b"]" * 6000, b"{" * 5000, b"\xff\xfe",
                                  b'{"config": 1e999999}', b"7" * 5000, b"x" * 12288])
def test_malformed_json_is_a_clean_error(text: bytes) -> None:
    device, _ = _formatted()
    _write_json_text(device, text)
    with pytest.raises(CorruptHeader):
        open_luks2(device, b"correct horse")


@pytest.mark.slow
def test_truncation_and_random_byte_flips_always_give_a_clean_error() -> None:
    """Fuzz-ish: truncate at many offsets and flip random header/keyslot bytes; every outcome is
    either the right key or a StorageError subclass, never another exception or wrong key."""
    device, volume = _formatted()
    pristine = device.snapshot()
    generator = random.Random(20261127)
    area_end = 32768 + 258048
    truncations = sorted({0, 1, 4095, 4096, 16383, 16384, 20000, 32767, 32768, 100000,
                          area_end - 1, area_end, (16 << 20), *[generator.randrange(len(pristine))
                                                                for _ in range(25)]})
    for length in truncations:
        truncated = MemoryBlockDevice(max(length, 1), initial=pristine[:length] or b"\0")
        try:
            opened = open_luks2(truncated, b"correct horse")
        except StorageError:
            continue
        assert opened.volume_key == volume.volume_key
    for _ in range(200):
        damaged = bytearray(pristine)
        for _ in range(generator.choice((1, 1, 2, 8))):
            position = generator.choice((generator.randrange(0, 32768),
                                         generator.randrange(32768, area_end)))
            damaged[position] ^= 1 << generator.randrange(8)
        device.restore(bytes(damaged))
        try:
            opened = open_luks2(device, b"correct horse")
        except StorageError:
            continue
        assert opened.volume_key == volume.volume_key


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 5000) | st.sampled_from([2**70, 1 << 63])
    | st.floats(allow_nan=False) | st.text(max_size=12)
    | st.sampled_from(["0", "4096", "dynamic", "argon2id", "pbkdf2", "luks2", "crypt", "raw",
                       "sha256", "aes-xts-plain64", "AAAA", "18446744073709551616"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                      children, max_size=3),
    max_leaves=6)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_structured_metadata_mutations_never_crash(data: st.DataObject) -> None:
    """Replace or delete any JSON node (checksums fixed up, as a hostile host can): opening
    either works with the right key or raises a StorageError subclass, nothing else."""
    device, volume = _formatted()
    raw = read_metadata(device).raw
    path = data.draw(st.sampled_from(_paths(raw)[1:]))
    delete = data.draw(st.booleans())
    replacement = None if delete else data.draw(_JSON_VALUES)

    def mutate(document: dict[str, Any]) -> None:
        parent: Any = document
        for step in path[:-1]:
            parent = parent[step]
        if delete:
            del parent[path[-1]]
        else:
            parent[path[-1]] = replacement

    try:
        _rewrite_metadata(device, mutate)
    except (StorageError, TypeError, ValueError):
        return  # our own serialiser refused to write it (e.g. it does not fit): nothing to test
    try:
        opened = open_luks2(device, b"correct horse")
    except StorageError:
        return
    assert opened.volume_key == volume.volume_key


class _PowerCut(Exception):
    """The simulated crash."""


class _CrashingDevice(MemoryBlockDevice):
    """A memory device that loses power at its `writes_left`-th write, which is torn: only
    its first half reaches the medium."""

    writes_left = 1 << 30

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.writes_left == 0:
            super().write(offset, bytes(data)[:len(data) // 2])
            raise _PowerCut()
        self.writes_left -= 1
        super().write(offset, data)


def _opens(device: MemoryBlockDevice, passphrase: bytes) -> bool:
    try:
        open_luks2(device, passphrase)
    except WrongPassphrase:
        return False
    return True


@pytest.mark.parametrize("operation", ["add", "remove", "change"])
def test_a_crash_at_any_write_leaves_a_usable_header(operation: str) -> None:
    """Cut the power during each write of a keyslot change in turn (a torn write): the volume
    always opens, with the old passphrase or (once the change is committed) the new one."""
    device = _CrashingDevice(DEVICE_SIZE)
    volume = format_luks2(device, b"old", pbkdf="pbkdf2", cost=FAST_PBKDF2)
    if operation == "remove":
        volume.add_keyslot(b"doomed", pbkdf="pbkdf2", cost=FAST_PBKDF2)
    pristine = device.snapshot()
    for crash_at in range(10):
        device.restore(pristine)
        device.writes_left = crash_at
        current = open_luks2(device, b"old")
        try:
            if operation == "add":
                current.add_keyslot(b"new", pbkdf="pbkdf2", cost=FAST_PBKDF2)
            elif operation == "remove":
                current.remove_keyslot(1)
            else:
                current.change_passphrase(0, b"new", pbkdf="pbkdf2", cost=FAST_PBKDF2)
            finished = True
        except _PowerCut:
            finished = False
        device.writes_left = 1 << 30
        state = read_metadata(device)  # a valid header copy always remains
        assert state.metadata.keyslots
        if operation == "add":
            assert _opens(device, b"old")
            assert _opens(device, b"new") or not finished
        elif operation == "remove":
            assert _opens(device, b"old")
            assert not _opens(device, b"doomed") or not finished
        else:
            assert _opens(device, b"old") or _opens(device, b"new")
            assert (_opens(device, b"new") and not _opens(device, b"old")) or not finished
        if finished:
            break
    else:
        raise AssertionError("the operation never finished within the crash points tried")
