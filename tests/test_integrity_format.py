"""The integrity area's two formats: 2 (512-byte tree nodes, record MACs over the header's
body with zero padding required), what new volumes get, and 1 (4 KiB nodes, MACs over the
whole header), which volumes made before keep for life.

tests/data/volume-format1.img.gz was made by keepshim at commit 4df2147 (format 1 only), with
passphrase "format1":

    keep volume create v1.img --size 20M --pbkdf pbkdf2 --pbkdf-force-iterations 1000 ...
    keep volume mkdir v1.img /docs
    keep volume put v1.img hello.txt /docs/hello.txt      # "hello from format 1\\n"
    keep volume put v1.img blob.bin /blob.bin             # 20,000 random bytes

and then, in Python at that commit, left as a crash leaves it (six live log records, small and
general, that the open must replay with format 1's record MAC):

    v = open_volume("v1.img", b"format1"); fs = v.fs; rng = random.Random(42)
    ino = fs.lookup(ROOT_INODE, b"blob.bin").ino
    for _ in range(5): fs.write(ino, rng.randrange(19000), b"P" * 100); fs.fsync(ino)
    new = fs.create(ROOT_INODE, b"late.bin").ino; fs.write(new, 0, bytes(range(256)) * 400); fs.fsync()
    os._exit(0)    # generation 11; /blob.bin's SHA-256 below
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import random
import shutil
import struct
from pathlib import Path

import pytest

from storage.blockdev import MemoryBlockDevice
from storage.errors import IntegrityError, UnsupportedFormat
from storage.fs import ROOT_INODE
from storage.integrity import INTEGRITY_FORMAT, SECTOR_SIZE, DataSegment, MerkleStore, integrity_key
from storage.luks2 import KdfCost
from storage.volume import Volume, create_volume, open_volume
from storage.xts import SectorCipher

FORMAT1_IMAGE = Path(__file__).parent / "data" / "volume-format1.img.gz"
FORMAT1_PASSPHRASE = b"format1"
BLOB_SHA256 = "5d2529b525094a5d3a0c1dd0c28ba4481c7c7b98b6706758e4799a1d217a7e72"
LATE = bytes(range(256)) * 400
UUID = "0b7a9d52-51c6-4b2e-9a61-5d0c4e8f7a13"


def _read_path(volume: Volume, path: bytes) -> bytes:
    ino = ROOT_INODE
    for name in path.strip(b"/").split(b"/"):
        ino = volume.fs.lookup(ino, name).ino
    size = volume.fs.getattr(ino).size
    return volume.fs.read(ino, 0, size)


@pytest.fixture
def format1_image(tmp_path: Path) -> Path:
    image = tmp_path / "v1.img"
    with gzip.open(FORMAT1_IMAGE) as packed, image.open("wb") as out:
        shutil.copyfileobj(packed, out)
    return image


def test_a_volume_made_before_format_2_opens_reads_writes_and_stays_format_1(format1_image: Path) -> None:
    with open_volume(format1_image, FORMAT1_PASSPHRASE, writable=False) as volume:
        assert volume.info()["integrity_format"] == 1
        assert volume.store._node_size == 4096
        assert _read_path(volume, b"/docs/hello.txt") == b"hello from format 1\n"
        assert hashlib.sha256(_read_path(volume, b"/blob.bin")).hexdigest() == BLOB_SHA256
        assert _read_path(volume, b"/late.bin") == LATE
        generation = volume.state().generation
        assert generation == 11  # every live record replayed
        assert volume.store._log_position > 0
        assert volume.fsck() == []
    rng = random.Random(1)
    blob = bytearray(_read_path_once(format1_image, b"/blob.bin"))
    with open_volume(format1_image, FORMAT1_PASSPHRASE) as volume:
        blob_ino = volume.fs.lookup(ROOT_INODE, b"blob.bin").ino
        for _ in range(20):  # durable 4 KiB overwrites: small commits in format 1
            offset = rng.randrange(len(blob) - 100)
            patch = rng.randbytes(100)
            blob[offset:offset + 100] = patch
            volume.fs.write(blob_ino, offset, patch)
            volume.fs.fsync(blob_ino)
        new = volume.fs.create(ROOT_INODE, b"new.bin").ino
        volume.fs.write(new, 0, b"x" * 300_000)  # a bigger commit: the general path
        volume.commit()
        assert volume.state().generation > generation
    with open_volume(format1_image, FORMAT1_PASSPHRASE, writable=False) as volume:
        assert volume.info()["integrity_format"] == 1  # a volume's format never changes
        assert _read_path(volume, b"/blob.bin") == bytes(blob)
        assert _read_path(volume, b"/new.bin") == b"x" * 300_000
        assert _read_path(volume, b"/docs/hello.txt") == b"hello from format 1\n"
        assert _read_path(volume, b"/late.bin") == LATE
        assert volume.fsck() == []


def _read_path_once(image: Path, path: bytes) -> bytes:
    with open_volume(image, FORMAT1_PASSPHRASE, writable=False) as volume:
        return _read_path(volume, path)


def test_new_volumes_get_format_2(tmp_path: Path) -> None:
    assert INTEGRITY_FORMAT == 2
    with create_volume(tmp_path / "v2.img", 24 << 20, b"pw", pbkdf="pbkdf2",
                       kdf_cost=KdfCost(iterations=1000)) as volume:
        assert volume.info()["integrity_format"] == 2
        ino = volume.fs.create(ROOT_INODE, b"f").ino
        volume.fs.write(ino, 0, b"format 2")
        volume.commit()
    with open_volume(tmp_path / "v2.img", b"pw", writable=False) as volume:
        assert volume.info()["integrity_format"] == 2
        assert volume.store._node_size == 512
        assert _read_path(volume, b"/f") == b"format 2"
        assert volume.fsck() == []


def _reference_root(leaves: bytes, node_size: int) -> bytes:
    """The tree root as the module docstring defines it, computed plainly: SHA-256 of each
    node (`node_size` bytes of the level below, the last one zero-padded), up to one hash."""
    level = leaves
    while True:
        nodes = [level[start:start + node_size].ljust(node_size, b"\0") for start in range(0, len(level), node_size)]
        level = b"".join(hashlib.sha256(node).digest() for node in nodes)
        if len(nodes) == 1:
            return level


@pytest.mark.parametrize(("integrity_format", "node_size"), [(2, 512), (1, 4096)])
def test_the_tree_root_is_the_one_each_format_defines(integrity_format: int, node_size: int) -> None:
    """After commits on both paths (small and general), and after reopening, the root is the
    plain computation over the leaves with that format's node size; the volume's levels are
    several deep (a short last node at every level above the leaves)."""
    size = 16 << 20
    key = random.Random(integrity_format).randbytes(64)
    device = MemoryBlockDevice(size)
    store = MerkleStore.format(DataSegment(device, 0, size, SectorCipher(key)), key, UUID, integrity_format=integrity_format)
    assert store.integrity_format == integrity_format
    rng = random.Random(2)
    store.write(0, rng.randbytes(300 * SECTOR_SIZE))
    store.write(store.sector_count - 1, rng.randbytes(SECTOR_SIZE))
    store.commit()
    for _ in range(30):
        store.write(rng.randrange(300), rng.randbytes(SECTOR_SIZE))
        store.commit()
    assert len(store._levels) >= 3
    assert store._tree_root() == _reference_root(bytes(store._leaves), node_size)
    store.close()
    reopened = MerkleStore.open(DataSegment(device, 0, size, SectorCipher(key)), key, UUID, writable=False)
    assert reopened.integrity_format == integrity_format
    assert reopened._tree_root() == _reference_root(bytes(reopened._leaves), node_size)
    assert reopened.check() == []


def test_a_volume_of_a_newer_integrity_format_is_refused_by_name() -> None:
    """A volume whose newest superblock (authentic: made with the key) has a format this
    keepshim does not know, as a later keepshim would write, is refused as such: not 'no
    valid superblock (wrong key or damaged image)', which sent the user to the passphrase."""
    key = random.Random(5).randbytes(64)
    size = 1 << 20
    device = MemoryBlockDevice(size)
    segment = DataSegment(device, 0, size, SectorCipher(key))
    MerkleStore.format(segment, key, UUID).close()
    sector = bytearray(segment.read_plain(0, 1))
    sector[:8] = b"KSHIMSB3"
    struct.pack_into("<Q", sector, 48, struct.unpack_from("<Q", sector, 48)[0] + 1)  # the newer one
    sector[-32:] = hmac.digest(integrity_key(key, UUID), b"keepshim/superblock/v1" + bytes(sector[:-32]), "sha256")
    segment.write_plain(1, bytes(sector))
    with pytest.raises(UnsupportedFormat, match=r"integrity format \(3\) is newer than this keepshim's \(1, 2\)"):
        MerkleStore.open(segment, key, UUID, writable=True)
    with pytest.raises(IntegrityError, match="no valid superblock"):  # the wrong key still says so
        MerkleStore.open(DataSegment(device, 0, size, SectorCipher(key[::-1])), key[::-1], UUID, writable=False)
