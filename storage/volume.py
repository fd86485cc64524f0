"""A whole volume: image -> LUKS2 -> XTS -> integrity (or none) -> filesystem, behind one object.

Theory of operation: `create_volume` formats a LUKS2 container (cryptsetup-compatible), lays the
integrity area (or the plain metadata sector) into its data segment and creates an empty
filesystem. `open_volume` takes the image lock (one process at a time: `VolumeInUse`), unlocks a
keyslot (`WrongPassphrase`, before anything is written), recovers the integrity layer (replaying
committed log records; `IntegrityError` if the image was tampered with, `RollbackError` if it is
older than a pinned generation) and mounts the filesystem (reaping orphans of a dead process).

The integrity mode is recognised from the decrypted first sector of the data segment: the plain
store's header magic there means ``integrity="none"``; anything else is read as Merkle
superblocks. Both are encrypted with the volume key, so the host cannot forge either.

Memory: with integrity on, the leaf hashes of the whole volume are held in RAM (32 bytes per
4 KiB sector, 0.8 % of the volume size: 8 MiB per GiB).
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any, Literal, Self

from storage.blockdev import BlockDevice, FileBlockDevice
from storage.errors import StorageError
from storage.fs import Filesystem
from storage.integrity import (
    SECTOR_SIZE,
    DataSegment,
    MerkleStore,
    PlainStore,
    VolumeState,
)
from storage.luks2 import DEFAULT_DATA_OFFSET, KdfCost, LuksVolume, format_luks2, open_luks2

Integrity = Literal["merkle", "none"]
_PLAIN_MAGIC = b"KSHIMPL1"
MIN_VOLUME_SIZE = DEFAULT_DATA_OFFSET + (4 << 20)


class Volume:
    """An open volume. Use as a context manager, or call `close()` (which commits)."""

    def __init__(self, device: BlockDevice, luks: LuksVolume, store: MerkleStore | PlainStore,
                 filesystem: Filesystem, integrity: Integrity, owns_device: bool,
                 cipher_engine: str = "unknown") -> None:
        self.device = device
        self.luks = luks
        self.store = store
        self.fs = filesystem
        self.integrity: Integrity = integrity
        self._owns_device = owns_device
        self._closed = False
        self.cipher_engine = cipher_engine

    @property
    def writable(self) -> bool:
        return self.store.writable

    def commit(self) -> VolumeState:
        """Make everything so far durable; returns the (uuid, generation, root MAC) to pin."""
        return self.fs.fsync()

    def state(self) -> VolumeState:
        """The last committed (uuid, generation, root MAC)."""
        return self.store.state()

    def info(self) -> dict[str, Any]:
        """LUKS, integrity and usage facts (no secrets)."""
        state = self.state()
        usage = self.fs.statfs()
        facts: dict[str, Any] = {
            "uuid": state.uuid,
            "integrity": self.integrity,
            "generation": state.generation,
            "root_mac": state.root_mac.hex(),
            "image_size": self.device.size,
            "data_offset": self.luks.data_offset,
            "data_size": self.luks.data_size,
            "sector_size": self.luks.sector_size,
            "keyslots": self.luks.keyslots,
            "cipher_engine": self.cipher_engine,
            "block_size": usage.block_size,
            "blocks": usage.blocks,
            "blocks_free": usage.blocks_free,
            "files": usage.files - usage.files_free,
            "filesystem_format": self.fs.format_version,
        }
        if isinstance(self.store, MerkleStore):
            layout = self.store.layout
            facts.update(integrity_format=self.store.integrity_format, log_sectors=layout.log_sectors,
                         leaf_page_sectors=layout.page_sectors, data_sectors=layout.data_sectors)
        return facts

    def fsck(self) -> list[str]:
        """Every check there is: each sector's hash against the tree, SQLite's integrity_check,
        and the filesystem invariants. Returns the problems (empty = clean)."""
        problems = [f"integrity: {p}" for p in self.store.check()]
        problems += [f"filesystem: {p}" for p in self.fs.check()]
        return problems

    def close(self) -> None:
        """Commit, checkpoint and release the lock. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.fs.close()
            self.store.close()
        finally:
            if self._owns_device:
                self.device.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Volume(uuid={self.luks.uuid!r}, integrity={self.integrity!r})"


def _device_for(target: str | os.PathLike[str] | BlockDevice, *, writable: bool,
                create_size: int | None = None) -> tuple[BlockDevice, bool]:
    if isinstance(target, (str, os.PathLike)):
        return FileBlockDevice(target, writable=writable, create_size=create_size), True
    return target, False


def create_volume(target: str | os.PathLike[str] | BlockDevice, size: int | None,
                  passphrase: bytes, *, pbkdf: Literal["argon2id", "pbkdf2"] = "argon2id",
                  iter_time_ms: int | None = None, kdf_cost: KdfCost | None = None,
                  integrity: Integrity = "merkle", label: str = "") -> Volume:
    """Create a new volume and return it open (writable).

    `target` is a path (a new sparse image of `size` bytes; an existing file is refused) or a
    `BlockDevice` (then `size` must be None or its size). `kdf_cost` skips the KDF benchmark
    (tests use tiny costs); otherwise the keyslot costs about `iter_time_ms` (default 2 s).
    """
    if integrity not in ("merkle", "none"):
        raise ValueError(f"integrity must be 'merkle' or 'none', not {integrity!r}")
    if isinstance(target, (str, os.PathLike)):
        if size is None:
            raise ValueError("a new image needs a size")
        if size < MIN_VOLUME_SIZE:
            raise StorageError(f"a volume needs at least {MIN_VOLUME_SIZE} bytes "
                               f"({DEFAULT_DATA_OFFSET} for the LUKS2 header and keyslots)")
        size -= size % SECTOR_SIZE
    elif size is not None and size != target.size:
        raise ValueError("size must be None (or the device's size) for an existing device")
    device, owns = _device_for(target, writable=True, create_size=size)
    try:
        options: dict[str, Any] = {"pbkdf": pbkdf, "cost": kdf_cost, "label": label}
        if iter_time_ms is not None:
            options["iter_time_ms"] = iter_time_ms
        luks = format_luks2(device, passphrase, **options)
        cipher = luks.cipher()
        segment = DataSegment(device, luks.data_offset, luks.data_size, cipher)
        store: MerkleStore | PlainStore
        if integrity == "merkle":
            store = MerkleStore.format(segment, luks.volume_key, luks.uuid)
        else:
            store = PlainStore.format(segment, luks.uuid)
        filesystem = Filesystem(store, create=True)
        store.commit()
        return Volume(device, luks, store, filesystem, integrity, owns, cipher.engine)
    except BaseException:
        if owns:
            device.close()
            if isinstance(target, (str, os.PathLike)):
                os.unlink(target)
        raise


def open_volume(target: str | os.PathLike[str] | BlockDevice, passphrase: bytes | None = None, *,
                volume_key: bytes | None = None, writable: bool = True,
                expected_generation: int | None = None, keyslot: int | None = None) -> Volume:
    """Open (and recover) a volume with a passphrase / key-file contents or the volume key.

    Raises NotLuks, CorruptHeader, WrongPassphrase (nothing written), VolumeInUse,
    IntegrityError (tampered image), RollbackError (older than `expected_generation`).
    """
    device, owns = _device_for(target, writable=writable)
    try:
        luks = open_luks2(device, passphrase, volume_key=volume_key, keyslot=keyslot)
        cipher = luks.cipher()
        segment = DataSegment(device, luks.data_offset, luks.data_size, cipher)
        store: MerkleStore | PlainStore
        integrity: Integrity
        if segment.read_plain(0, 1).startswith(_PLAIN_MAGIC):
            integrity = "none"
            store = PlainStore.open(segment, luks.uuid, writable=writable,
                                    expected_generation=expected_generation)
        else:
            integrity = "merkle"
            store = MerkleStore.open(segment, luks.volume_key, luks.uuid, writable=writable,
                                     expected_generation=expected_generation)
        filesystem = Filesystem(store)
        return Volume(device, luks, store, filesystem, integrity, owns, cipher.engine)
    except BaseException:
        if owns:
            device.close()
        raise
