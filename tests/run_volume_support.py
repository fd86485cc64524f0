"""Helpers for the `keep run --volume` tests: cheap volumes, and finding a file's data sectors.

`data_sectors(image, passphrase, before, name)` answers "which sectors of the image hold the
ciphertext of this file's data": the sectors that changed between the snapshot `before` (taken
before the file's data was written) and now are candidates; each is flipped alone in a copy of the
image, which is then opened and the file looked up and read with the storage library. A sector
whose damage still lets the volume open and the file be found, but makes reading it fail, is a
data sector (the others hold metadata: SQLite pages, Merkle leaves, superblocks, the log).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from storage.errors import StorageError
from storage.luks2 import KdfCost
from storage.volume import create_volume, open_volume

SECTOR = 4096
PASSPHRASE = b"correct horse battery staple"
CHEAP_KDF = KdfCost(iterations=1000)


def make_volume(image: Path, size: int = 32 << 20, passphrase: bytes = PASSPHRASE) -> None:
    """A new, empty, closed volume image (pbkdf2 with a tiny cost: tests only)."""
    create_volume(image, size, passphrase, pbkdf="pbkdf2", kdf_cost=CHEAP_KDF).close()


def changed_sectors(before: bytes, after: bytes) -> list[int]:
    """Offsets of the 4 KiB sectors that differ (an image that grew counts its new sectors)."""
    return [start for start in range(0, len(after), SECTOR)
            if after[start:start + SECTOR] != before[start:start + SECTOR]]


def _reads_ok(image: Path, passphrase: bytes, path: list[bytes]) -> str:
    """'open' / 'lookup' / 'read' (where it failed) or 'ok'."""
    try:
        volume = open_volume(image, passphrase, writable=False)
    except (StorageError, OSError):
        return "open"
    with volume:
        try:
            ino = 1
            for name in path:
                ino = volume.fs.lookup(ino, name).ino
            size = volume.fs.getattr(ino).size
        except OSError:
            return "lookup"
        try:
            volume.fs.read(ino, 0, size)
        except OSError:
            return "read"
    return "ok"


def data_sectors(image: Path, passphrase: bytes, before: bytes, path: str) -> list[int]:
    """The offsets of the sectors holding the data of the file at `path` (see the module)."""
    after = image.read_bytes()
    names = [part.encode() for part in path.strip("/").split("/")]
    trial = image.with_name(image.name + ".trial")
    found = []
    for offset in changed_sectors(before, after):
        shutil.copyfile(image, trial)
        with open(trial, "r+b") as handle:
            handle.seek(offset + 17)
            handle.write(bytes([after[offset + 17] ^ 0x5A]))
        if _reads_ok(trial, passphrase, names) == "read":
            found.append(offset)
    trial.unlink()
    return found


def flip(image: Path, offsets: list[int]) -> None:
    """Change one byte in each sector at `offsets` (what a hostile host does)."""
    with open(image, "r+b") as handle:
        for offset in offsets:
            handle.seek(offset + 17)
            byte = handle.read(1)
            handle.seek(offset + 17)
            handle.write(bytes([byte[0] ^ 0x5A]))
