"""The volume as a whole: create/open, passphrases, the lock, integrity modes, pinning."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from storage.blockdev import MemoryBlockDevice
from storage.errors import NotLuks, RollbackError, VolumeInUse, WrongPassphrase
from storage.fs import ROOT_INODE
from storage.luks2 import KdfCost
from storage.volume import create_volume, open_volume

PASSPHRASE = b"correct horse"
COST = KdfCost(iterations=1000)


def make(path: Path, integrity: str = "merkle") -> None:
    with create_volume(path, 24 << 20, PASSPHRASE, pbkdf="pbkdf2", kdf_cost=COST,
                       integrity=integrity) as volume:  # type: ignore[arg-type]
        ino = volume.fs.create(ROOT_INODE, b"hello").ino
        volume.fs.write(ino, 0, b"world")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("integrity", ["merkle", "none"])
def test_created_volume_reopens_with_its_contents(tmp_path: Path, integrity: str) -> None:
    image = tmp_path / "v.img"
    make(image, integrity)
    with open_volume(image, PASSPHRASE) as volume:
        assert volume.integrity == integrity
        assert volume.fs.read(volume.fs.lookup(ROOT_INODE, b"hello").ino, 0, 10) == b"world"
        assert volume.fsck() == []
        info = volume.info()
        assert info["integrity"] == integrity and info["sector_size"] == 4096
        assert info["generation"] == volume.state().generation


def test_wrong_passphrase_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    image = tmp_path / "v.img"
    make(image)
    before = digest(image)
    with pytest.raises(WrongPassphrase):
        open_volume(image, b"wrong")
    assert digest(image) == before
    with open_volume(image, PASSPHRASE):  # and the lock was released
        pass


def test_a_second_process_gets_volume_in_use(tmp_path: Path) -> None:
    image = tmp_path / "v.img"
    make(image)
    probe = ("import sys\nfrom storage.errors import VolumeInUse\nfrom storage.volume import open_volume\n"
             "try:\n    open_volume(sys.argv[1], b'x')\nexcept VolumeInUse as e:\n    print('in use:', e)\n")
    with open_volume(image, PASSPHRASE):
        result = subprocess.run([sys.executable, "-c", probe, str(image)], capture_output=True,
                                text=True, timeout=60, check=True)
        assert result.stdout.startswith("in use:")
        with pytest.raises(VolumeInUse):
            open_volume(image, PASSPHRASE)  # a second open in the same process too
    result = subprocess.run([sys.executable, "-c", probe, str(image)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert "in use" not in result.stdout  # released at close (the probe then fails on the passphrase)


def test_a_non_luks_file_is_a_clear_error(tmp_path: Path) -> None:
    image = tmp_path / "plain.bin"
    image.write_bytes(b"not a volume" * 100_000)
    with pytest.raises(NotLuks):
        open_volume(image, PASSPHRASE)


def test_create_refuses_an_existing_file(tmp_path: Path) -> None:
    image = tmp_path / "v.img"
    image.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        create_volume(image, 24 << 20, PASSPHRASE, pbkdf="pbkdf2", kdf_cost=COST)
    assert image.read_bytes() == b"precious"


def test_pinned_generation_refuses_a_rolled_back_image(tmp_path: Path) -> None:
    image = tmp_path / "v.img"
    make(image)
    old = image.read_bytes()
    with open_volume(image, PASSPHRASE) as volume:
        volume.fs.create(ROOT_INODE, b"newer")
        pinned = volume.commit()
    assert pinned.generation > 0 and len(pinned.root_mac) == 32
    image.write_bytes(old)
    with pytest.raises(RollbackError):
        open_volume(image, PASSPHRASE, expected_generation=pinned.generation)


def test_open_by_volume_key_and_read_only(tmp_path: Path) -> None:
    image = tmp_path / "v.img"
    make(image)
    with open_volume(image, PASSPHRASE) as volume:
        key = volume.luks.volume_key
        generation = volume.state().generation
    with open_volume(image, volume_key=key, writable=False) as volume:
        assert not volume.writable
        assert volume.state().generation == generation
        with pytest.raises(OSError):
            volume.fs.create(ROOT_INODE, b"nope")


def test_memory_volume_for_tests() -> None:
    device = MemoryBlockDevice(24 << 20)
    with create_volume(device, None, PASSPHRASE, pbkdf="pbkdf2", kdf_cost=COST) as volume:
        volume.fs.mkdir(ROOT_INODE, b"d")
    with open_volume(device, PASSPHRASE) as volume:
        assert volume.fs.lookup(ROOT_INODE, b"d").is_dir


def test_read_only_open_of_a_crashed_image_replays_in_memory_and_writes_nothing() -> None:
    device = MemoryBlockDevice(24 << 20)
    volume = create_volume(device, None, PASSPHRASE, pbkdf="pbkdf2", kdf_cost=COST)
    ino = volume.fs.create(ROOT_INODE, b"late").ino
    volume.fs.write(ino, 0, b"fsync'd but never checkpointed")
    pinned = volume.commit()
    crashed = MemoryBlockDevice(device.size, initial=device.snapshot(), writable=False)
    volume.close()
    with open_volume(crashed, PASSPHRASE, writable=False, expected_generation=pinned.generation) as reopened:
        assert reopened.fs.read(ino, 0, 100) == b"fsync'd but never checkpointed"
        assert reopened.fsck() == []
