"""Interoperability with the real cryptsetup (Debian cryptsetup-bin; no device-mapper needed).

Both directions: cryptsetup accepts the images storage.luks2 formats and sees the same volume
key; storage.luks2 opens images cryptsetup formatted (argon2id and pbkdf2 keyslots) and keyslots
cryptsetup added to ours. KDF costs are kept tiny for speed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from xts_reference import xts_decrypt_with_openssl

from storage.blockdev import FileBlockDevice
from storage.errors import WrongPassphrase
from storage.luks2 import KdfCost, format_luks2, open_luks2, read_header_info

pytestmark = pytest.mark.skipif(shutil.which("cryptsetup") is None,
                                reason="cryptsetup is not installed (Debian package cryptsetup-bin)")

IMAGE_SIZE = 20 << 20
PASSPHRASE = b"interop passphrase"
FAST_ARGON2 = KdfCost(iterations=1, memory_kib=32 * 1024, parallel=4)
CRYPTSETUP_FAST = {
    "argon2id": ["--pbkdf", "argon2id", "--pbkdf-memory", "32768", "--pbkdf-force-iterations", "4",
                 "--pbkdf-parallel", "1"],
    "pbkdf2": ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--hash", "sha256"],
}


def cryptsetup(*args: str | os.PathLike[str], key: bytes | None = None,
               check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run cryptsetup in batch mode; `key` goes to --key-file - on stdin."""
    command = ["cryptsetup", "-q", *map(str, args)]
    if key is not None:
        command += ["--key-file", "-"]
    result = subprocess.run(command, input=(key or b"").decode(), capture_output=True, text=True,
                            timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}): {result.stderr}")
    return result


def dumped_volume_key(image: Path, key: bytes) -> bytes:
    output = cryptsetup("luksDump", "--dump-volume-key", image, key=key).stdout
    block = output.split("MK dump:", 1)[1]
    hex_digits = re.findall(r"\b[0-9a-f]{2}\b", block.split("\n\n", 1)[0])
    return bytes.fromhex("".join(hex_digits))


def our_image(tmp_path: Path, pbkdf: str = "argon2id", label: str = "") -> tuple[Path, bytes]:
    image = tmp_path / "ours.img"
    with FileBlockDevice(image, writable=True, create_size=IMAGE_SIZE) as device:
        cost = FAST_ARGON2 if pbkdf == "argon2id" else KdfCost(iterations=1000)
        volume = format_luks2(device, PASSPHRASE, pbkdf=pbkdf, cost=cost,  # type: ignore[arg-type]
                              label=label)
        return image, volume.volume_key


def their_image(tmp_path: Path, pbkdf: str, *options: str) -> Path:
    image = tmp_path / f"theirs-{pbkdf}.img"
    with open(image, "wb") as handle:
        handle.truncate(IMAGE_SIZE)
    cryptsetup("luksFormat", "--type", "luks2", "--sector-size", "4096",
               *CRYPTSETUP_FAST[pbkdf], *options, image, key=PASSPHRASE)
    return image


def dumped_field(dump: str, name: str) -> str:
    """A `Name:<spaces><tab>value` line of luksDump's header section."""
    match = re.search(rf"^{name}:\s*\t(.*)$", dump, re.MULTILINE)
    assert match is not None, dump
    return match.group(1)


@pytest.mark.parametrize("pbkdf", ["argon2id", "pbkdf2"])
def test_cryptsetup_accepts_our_image_and_sees_our_key(tmp_path: Path, pbkdf: str) -> None:
    image, volume_key = our_image(tmp_path, pbkdf)
    cryptsetup("isLuks", image)
    dump = cryptsetup("luksDump", image).stdout
    assert "cipher: aes-xts-plain64" in dump and "sector: 4096 [bytes]" in dump
    assert f"PBKDF:      {pbkdf}" in dump
    cryptsetup("open", "--test-passphrase", image, key=PASSPHRASE)
    wrong = cryptsetup("open", "--test-passphrase", image, key=b"wrong", check=False)
    assert wrong.returncode != 0
    assert dumped_volume_key(image, PASSPHRASE) == volume_key


def test_we_open_a_keyslot_cryptsetup_added_to_our_image(tmp_path: Path) -> None:
    image, volume_key = our_image(tmp_path)
    new_key_file = tmp_path / "new.key"
    new_key_file.write_bytes(b"added by cryptsetup")
    cryptsetup("luksAddKey", *CRYPTSETUP_FAST["argon2id"], image, new_key_file, key=PASSPHRASE)
    assert "  1: luks2" in cryptsetup("luksDump", image).stdout
    with FileBlockDevice(image, writable=False) as device:
        opened = open_luks2(device, b"added by cryptsetup")
        assert opened.opened_keyslot == 1 and opened.volume_key == volume_key


@pytest.mark.parametrize("pbkdf", ["argon2id", "pbkdf2"])
def test_we_open_images_cryptsetup_formatted(tmp_path: Path, pbkdf: str) -> None:
    image = their_image(tmp_path, pbkdf)
    expected = dumped_volume_key(image, PASSPHRASE)
    with FileBlockDevice(image, writable=False) as device:
        volume = open_luks2(device, PASSPHRASE)
        assert volume.volume_key == expected
        assert volume.sector_size == 4096 and volume.data_offset == 16 << 20
        with pytest.raises(WrongPassphrase):
            open_luks2(device, b"not it")


def test_cryptsetup_opens_keyslots_we_add_and_change(tmp_path: Path) -> None:
    image = their_image(tmp_path, "pbkdf2")
    with FileBlockDevice(image, writable=True) as device:
        volume = open_luks2(device, PASSPHRASE)
        slot = volume.add_keyslot(b"ours too", pbkdf="argon2id", cost=FAST_ARGON2)
        volume.change_passphrase(0, b"changed by us", pbkdf="pbkdf2", cost=KdfCost(1000))
    cryptsetup("open", "--test-passphrase", "--key-slot", str(slot), image, key=b"ours too")
    cryptsetup("open", "--test-passphrase", image, key=b"changed by us")
    assert cryptsetup("open", "--test-passphrase", image, key=PASSPHRASE, check=False).returncode
    cryptsetup("luksKillSlot", image, str(slot), key=b"changed by us")
    with FileBlockDevice(image, writable=False) as device, pytest.raises(WrongPassphrase):
        open_luks2(device, b"ours too")


def test_data_we_encrypt_decrypts_with_the_key_cryptsetup_dumps(tmp_path: Path) -> None:
    """Independent check of the data-segment tweak: the key cryptsetup prints, plus openssl's
    AES-256-ECB building XTS by hand (tests/xts_reference.py), decrypts a sector we wrote."""
    image, _ = our_image(tmp_path)
    plaintext = os.urandom(4096)
    sector = 5
    with FileBlockDevice(image, writable=True) as device:
        volume = open_luks2(device, PASSPHRASE)
        device.write(volume.data_offset + sector * 4096, volume.cipher().encrypt(sector, plaintext))
        device.sync()
        data_offset = volume.data_offset
    key = dumped_volume_key(image, PASSPHRASE)
    ciphertext = image.read_bytes()[data_offset + sector * 4096:data_offset + (sector + 1) * 4096]

    assert xts_decrypt_with_openssl(key, sector * 8, ciphertext) == plaintext


def test_a_token_cryptsetup_imported_survives_our_keyslot_changes(tmp_path: Path) -> None:
    image, _ = our_image(tmp_path, "pbkdf2")
    token_file = tmp_path / "token.json"
    token_file.write_text('{"type":"keepshim-test","keyslots":["0"],"note":"kept"}')
    cryptsetup("token", "import", "--json-file", token_file, image)
    with FileBlockDevice(image, writable=True) as device:
        open_luks2(device, PASSPHRASE).add_keyslot(b"another", pbkdf="pbkdf2", cost=KdfCost(1000))
    exported = cryptsetup("token", "export", "--token-id", "0", image).stdout
    assert '"note":"kept"' in exported.replace(" ", "")
    cryptsetup("open", "--test-passphrase", image, key=b"another")


def test_cryptsetup_shows_the_unicode_label_we_write(tmp_path: Path) -> None:
    image, _ = our_image(tmp_path, "pbkdf2", label="café ☕")
    dump = cryptsetup("luksDump", image).stdout
    assert dumped_field(dump, "Label") == "café ☕"
    assert dumped_field(dump, "Subsystem") == "(no subsystem)"
    cryptsetup("open", "--test-passphrase", image, key=PASSPHRASE)


def test_we_open_images_cryptsetup_labelled_in_unicode_and_keep_the_label(tmp_path: Path) -> None:
    image = their_image(tmp_path, "pbkdf2", "--label", "café", "--subsystem", "système ☕")
    dump = cryptsetup("luksDump", image).stdout
    assert (dumped_field(dump, "Label"), dumped_field(dump, "Subsystem")) == ("café", "système ☕")
    with FileBlockDevice(image, writable=True) as device:
        info = read_header_info(device)
        assert (info["label"], info["subsystem"]) == ("café", "système ☕")
        volume = open_luks2(device, PASSPHRASE)
        assert (volume.label, volume.subsystem) == ("café", "système ☕")
        volume.add_keyslot(b"ours too", pbkdf="pbkdf2", cost=KdfCost(1000))  # rewrites the header
    dump = cryptsetup("luksDump", image).stdout
    assert (dumped_field(dump, "Label"), dumped_field(dump, "Subsystem")) == ("café", "système ☕")
    cryptsetup("open", "--test-passphrase", image, key=b"ours too")


def test_a_label_cryptsetup_cut_inside_a_character_still_opens(tmp_path: Path) -> None:
    """cryptsetup 2.6 silently keeps the first 47 bytes of a longer --label, even in the middle
    of a UTF-8 sequence; such an image opens here, the cut character shown as U+FFFD."""
    image = their_image(tmp_path, "pbkdf2", "--label", "é" * 24)
    with open(image, "rb") as handle:
        assert handle.read(72)[24:] == "é".encode() * 23 + b"\xc3\0"  # the label field
    with FileBlockDevice(image, writable=False) as device:
        assert open_luks2(device, PASSPHRASE).label == "é" * 23 + "\ufffd"
