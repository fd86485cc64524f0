"""The APSW VFS that puts one SQLite database and its WAL into fixed regions of a store.

Theory of operation: the filesystem's SQLite database ("db") and its write-ahead log ("db-wal")
are byte ranges of the protected sector array (`MerkleStore` / `PlainStore`): the WAL region is a
fixed fraction of the volume, then the database region (the filesystem keeps file data in the
rest). Their logical sizes travel in the
store's client metadata, so each integrity commit records them atomically with the data. Reads and
writes that do not cover whole sectors are read-modify-write on the store's caches; bytes past a
file's logical size read back as zeros. Contiguous writes (a transaction's WAL frames) are
buffered and reach the store as one write; any other file access and every store commit (through
a commit hook) flush the buffer first, so a commit still holds every write issued before it.

Durability is not SQLite's business here: the database runs with `synchronous=OFF`, and the
filesystem calls `store.commit()` when a caller asks for durability. This is safe because a store
commit is an atomic snapshot of every write issued so far, in order, i.e. exactly the state an
application crash would leave, which SQLite tolerates in any `synchronous` mode. An `xSync` (if a
caller turns synchronous back on) is one store commit.

The rollback journal ("db-journal") is only used while the database is created (before WAL mode
is on); it lives in memory. Temporary files live in memory too.

APSW registers a VFS process-wide by name, so each instance takes a unique name and unregisters
itself on close.
"""

from __future__ import annotations

import itertools
import os
import struct
import time
from typing import Any

import apsw

from storage.integrity import METADATA_LIMIT, SECTOR_SIZE, MerkleStore, PlainStore

_SIZES = struct.Struct("<4sQQ")
_SIZES_MAGIC = b"KSF1"
_INSTANCE_NUMBERS = itertools.count(1)
_BUFFER_LIMIT = 1 << 20  # bytes of contiguous SQLite writes held before they go to the store


class _UnsharedFile:
    """What every file of this VFS answers alike: one process owns the volume (the image lock,
    `locking_mode=EXCLUSIVE`), so SQLite's file locks are no-ops; no file controls; 4 KiB sectors."""

    def xLock(self, level: int) -> None:
        pass

    def xUnlock(self, level: int) -> None:
        pass

    def xCheckReservedLock(self) -> bool:
        return False

    def xFileControl(self, op: int, pointer: int) -> bool:
        return False

    def xSectorSize(self) -> int:
        return SECTOR_SIZE


class RegionFile(_UnsharedFile):
    """One SQLite file mapped onto sectors [first, first + capacity/4096) of the store."""

    def __init__(self, vfs: RegionVfs, first_sector: int, capacity: int, size: int) -> None:
        self._vfs = vfs
        self._store = vfs.store
        self._first = first_sector
        self.capacity = capacity
        self.size = size

    # SQLite VFS methods ------------------------------------------------------------------

    def xRead(self, amount: int, offset: int) -> bytes:
        self._vfs.flush()
        end = min(offset + amount, self.size)
        if end <= offset:
            return b""
        first = offset // SECTOR_SIZE
        last = (end - 1) // SECTOR_SIZE
        data = self._store.read(self._first + first, last - first + 1)
        start = offset - first * SECTOR_SIZE
        return data[start:start + end - offset]

    def xWrite(self, data: bytes, offset: int) -> None:
        end = offset + len(data)
        if end > self.capacity:
            raise apsw.FullError("region full")
        if self._store.writable:
            self._vfs.buffer_write(self, data, offset)
        else:
            self.write_now(data, offset)  # refused at once (EROFS), as the store refuses it
        if end > self.size:
            self.size = end
            self._vfs.sizes_changed()

    def write_now(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Write through to the store (whole sectors; partial ones read-modify-write)."""
        length = len(data)
        end = offset + length
        first = offset // SECTOR_SIZE
        last = (end - 1) // SECTOR_SIZE
        head = offset - first * SECTOR_SIZE
        if head == 0 and length % SECTOR_SIZE == 0:
            self._store.write(self._first + first, data)
        else:
            buffer = bytearray((last - first + 1) * SECTOR_SIZE)
            if head:
                buffer[:SECTOR_SIZE] = self._existing_sector(first)
            if end % SECTOR_SIZE and (last != first or not head) and end < self.size:
                buffer[-SECTOR_SIZE:] = self._existing_sector(last)  # else: past the end, zeros
            buffer[head:head + length] = data
            self._store.write(self._first + first, buffer)

    def _existing_sector(self, sector: int) -> bytes:
        """The current sector, with the bytes past the logical size zeroed (never stale)."""
        base = sector * SECTOR_SIZE
        if base >= self.size:
            return bytes(SECTOR_SIZE)
        current = self._store.read(self._first + sector, 1)
        valid = self.size - base
        if valid < SECTOR_SIZE:
            return current[:valid] + bytes(SECTOR_SIZE - valid)
        return current

    def xTruncate(self, newsize: int) -> None:
        if newsize > self.capacity:
            raise apsw.FullError("region full")
        self._vfs.flush()
        self.size = newsize
        self._vfs.sizes_changed()

    def xFileSize(self) -> int:
        return self.size

    def xSync(self, flags: int) -> None:
        self._store.commit()  # the commit hook flushes the write buffer first

    def xClose(self) -> None:
        self._vfs.flush()

    def xDeviceCharacteristics(self) -> int:
        return int(apsw.SQLITE_IOCAP_SAFE_APPEND | apsw.SQLITE_IOCAP_SEQUENTIAL
                   | apsw.SQLITE_IOCAP_POWERSAFE_OVERWRITE)


class MemoryFile(_UnsharedFile):
    """A file that lives only in memory (the creation-time journal, temporary files)."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def xRead(self, amount: int, offset: int) -> bytes:
        return bytes(self.buffer[offset:offset + amount])

    def xWrite(self, data: bytes, offset: int) -> None:
        if offset > len(self.buffer):
            self.buffer.extend(bytes(offset - len(self.buffer)))
        self.buffer[offset:offset + len(data)] = data

    def xTruncate(self, newsize: int) -> None:
        del self.buffer[newsize:]

    def xFileSize(self) -> int:
        return len(self.buffer)

    def xSync(self, flags: int) -> None:
        pass

    def xClose(self) -> None:
        pass

    def xDeviceCharacteristics(self) -> int:
        return 0


class RegionVfs(apsw.VFS):
    """A VFS with exactly two persistent files, "db" and "db-wal", in fixed store regions."""

    def __init__(self, store: MerkleStore | PlainStore, wal_sectors: int, db_sectors: int) -> None:
        self.name = f"keepshim-region-{os.getpid()}-{next(_INSTANCE_NUMBERS)}"
        super().__init__(self.name, base="")
        self.store = store
        total = store.sector_count
        db_size, wal_size = 0, 0
        metadata = store.metadata
        # after the sizes, the filesystem's own bytes (see `set_extra`)
        self.extra = metadata[_SIZES.size:]
        if metadata:
            if len(metadata) < _SIZES.size:
                raise apsw.CorruptError("unknown filesystem metadata")
            magic, db_size, wal_size = _SIZES.unpack_from(metadata)
            if magic != _SIZES_MAGIC:
                raise apsw.CorruptError("unknown filesystem metadata")
        if wal_sectors + db_sectors > total:
            raise apsw.CantOpenError("regions larger than the store")
        self.db = RegionFile(self, wal_sectors, db_sectors * SECTOR_SIZE, db_size)
        self.wal = RegionFile(self, 0, wal_sectors * SECTOR_SIZE, wal_size)
        self._journal = MemoryFile()
        # One run of contiguous writes to one file, not yet in the store: SQLite writes a WAL
        # frame as a 24-byte header and a 4096-byte page, so each would be a read-modify-write of
        # two sectors; buffered, a transaction's frames reach the store as one aligned write.
        # Any other access to the files, and every store commit (a hook), flushes it first.
        self._buffer_file: RegionFile | None = None
        self._buffer_offset = 0
        self._buffer = bytearray()
        store.add_commit_hook(self.flush)

    def buffer_write(self, file: RegionFile, data: bytes, offset: int) -> None:
        """Append to the write buffer, or flush it and start a new one."""
        if file is not self._buffer_file or offset != self._buffer_offset + len(self._buffer):
            self.flush()
            self._buffer_file = file
            self._buffer_offset = offset
        self._buffer += data
        if len(self._buffer) >= _BUFFER_LIMIT:
            self.flush()

    def flush(self) -> None:
        """Write the buffered run through to the store (detached first: the store write may
        commit under cache pressure, which calls this hook again)."""
        file = self._buffer_file
        if file is None:
            return
        data, offset = self._buffer, self._buffer_offset
        self._buffer_file = None
        self._buffer = bytearray()
        if data:
            file.write_now(data, offset)

    def unregister(self) -> None:
        self.flush()
        self.store.remove_commit_hook(self.flush)
        super().unregister()

    def sizes_changed(self) -> None:
        self.store.metadata = _SIZES.pack(_SIZES_MAGIC, self.db.size, self.wal.size) + self.extra

    @property
    def extra_limit(self) -> int:
        """The most bytes `set_extra` accepts (the store's metadata limit less the sizes)."""
        return METADATA_LIMIT - _SIZES.size

    def set_extra(self, extra: bytes) -> None:
        """Client bytes carried by every store commit from now on, after the region sizes, and
        returned as `extra` at the next open: the filesystem keeps inode times there that it has
        not yet written to SQLite, so an fsync needs no SQLite transaction."""
        if len(extra) > self.extra_limit:
            raise ValueError("extra metadata too large")
        self.extra = bytes(extra)
        self.sizes_changed()

    def xOpen(self, name: Any, flags: list[int]) -> Any:  # APSW accepts any object with the VFSFile methods
        filename = name.filename() if isinstance(name, apsw.URIFilename) else name
        if filename == "db":
            return self.db
        if filename == "db-wal":
            return self.wal
        if filename == "db-journal":
            return self._journal
        return MemoryFile()

    def xAccess(self, pathname: str, flags: int) -> bool:
        if pathname == "db":
            return True
        if pathname == "db-wal":
            return self.wal.size > 0
        if pathname == "db-journal":
            return len(self._journal.buffer) > 0
        return False

    def xDelete(self, filename: str, syncdir: bool) -> None:
        if filename == "db-wal":
            self.wal.xTruncate(0)
        elif filename == "db-journal":
            self._journal.xTruncate(0)

    def xFullPathname(self, name: str) -> str:
        return name

    def xRandomness(self, numbytes: int) -> bytes:
        return os.urandom(numbytes)

    def xCurrentTime(self) -> float:
        return time.time() / 86400.0 + 2440587.5

    def xCurrentTimeInt64(self) -> int:
        return int(time.time() * 1000) + 210866760000000

    def xSleep(self, microseconds: int) -> int:
        time.sleep(microseconds / 1e6)
        return microseconds

    def xGetLastError(self) -> tuple[int, str]:
        return 0, ""
