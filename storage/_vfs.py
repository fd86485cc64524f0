"""The APSW VFS that puts one SQLite database and its WAL into fixed regions of a store.

Theory of operation: the filesystem's SQLite database ("db") and its write-ahead log ("db-wal")
are byte ranges of the protected sector array (`MerkleStore` / `PlainStore`): the WAL region is a
fixed fraction of the volume, then the database region (the filesystem keeps file data in the
rest). Their logical sizes travel in the store's client metadata, so each integrity commit records
them atomically with the data; bytes past a file's logical size read back as zeros.

Writes are cached here, per sector, before they reach the store: SQLite rewrites the same few
pages (the header's change counter, the last leaf of each table) in every transaction, and a store
write costs more than the change itself, so each sector reaches the store once per flush. Reads
see the cache; writes that do not cover whole sectors are read-modify-write through it. Every
store commit flushes the cache first (a commit hook), under one store hold, so a commit holds
every write issued before it, and so does the flush at `pending_limit` sectors.

Durability and crash atomicity are not SQLite's business here: the database runs with
`synchronous=OFF` (SQLite never asks for a commit; an `xSync`, if a caller turned it back on,
would be one store commit), and the filesystem runs each transaction under `store.hold()`, so
every store commit is a snapshot between transactions. The filesystem keeps SQLite's rollback
journal in memory (`journal_mode=MEMORY`, for ROLLBACK only), so "db-journal" is not opened;
should it be, it lives in memory, as temporary files do. The WAL region only holds the log of
volumes written by older versions (SQLite merges it at the next writable open).

APSW registers a VFS process-wide by name, so each instance takes a unique name and unregisters
itself on close.
"""

from __future__ import annotations

import errno
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
_PENDING_LIMIT = 256  # sectors of SQLite writes held before they go to the store (1 MiB)


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
        end = min(offset + amount, self.size)
        if end <= offset:
            return b""
        first = offset // SECTOR_SIZE
        last = (end - 1) // SECTOR_SIZE
        pending = self._vfs.pending
        base = self._first
        if pending and any(sector in pending for sector in range(base + first, base + last + 1)):
            data = b"".join(self._sector(sector) for sector in range(first, last + 1))
        else:
            data = self._store.read(base + first, last - first + 1)
        start = offset - first * SECTOR_SIZE
        return data[start:start + end - offset]

    def xWrite(self, data: bytes, offset: int) -> None:
        end = offset + len(data)
        if end > self.capacity:
            raise apsw.FullError("region full")
        if not self._store.writable:
            raise OSError(errno.EROFS, "volume is open read-only")  # as the store says it
        vfs = self._vfs
        pending = vfs.pending
        first = offset // SECTOR_SIZE
        if len(data) == SECTOR_SIZE and offset == first * SECTOR_SIZE:
            pending[self._first + first] = data  # a page: SQLite's usual write
        else:
            last = (end - 1) // SECTOR_SIZE
            buffer = bytearray(b"".join(self._sector(sector) for sector in range(first, last + 1)))
            head = offset - first * SECTOR_SIZE
            buffer[head:head + len(data)] = data
            for index in range(last - first + 1):
                pending[self._first + first + index] = bytes(buffer[index * SECTOR_SIZE:(index + 1) * SECTOR_SIZE])
        if end > self.size:
            self.size = end
            vfs.sizes_dirty = True
        if len(pending) >= vfs.pending_limit:
            vfs.flush()

    def _sector(self, sector: int) -> bytes:
        """Sector `sector` of this file as SQLite last wrote it; bytes past the logical size
        read as zeros (never stale contents of the region)."""
        found = self._vfs.pending.get(self._first + sector)
        if found is not None:
            return found
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
        vfs = self._vfs
        keep = self._first + -(-newsize // SECTOR_SIZE)
        for sector in [sector for sector in vfs.pending
                       if keep <= sector < self._first + self.capacity // SECTOR_SIZE]:
            del vfs.pending[sector]  # wholly past the new end: never read, never needed
        boundary = vfs.pending.get(keep - 1) if newsize % SECTOR_SIZE else None
        if boundary is not None:  # its bytes past the new end read as zeros from now on
            valid = newsize % SECTOR_SIZE
            vfs.pending[keep - 1] = boundary[:valid] + bytes(SECTOR_SIZE - valid)
        self.size = newsize
        vfs.sizes_dirty = True

    def xFileSize(self) -> int:
        return self.size

    def xSync(self, flags: int) -> None:
        self._store.commit()  # the commit hook flushes the pending sectors first

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
        # Write-back cache of the two files' sectors (store sector -> contents) not yet in the
        # store: SQLite rewrites the same few pages (the header's change counter, the tables'
        # last leaves) in every transaction, and one store write costs more than the page's
        # own change; here each sector reaches the store once per flush. A flush happens at
        # every store commit (a hook, so a commit holds every write issued before it) and
        # when the cache reaches `pending_limit` sectors, a fraction of what one store batch
        # may hold, so that a commit still fits the store's log.
        self.pending: dict[int, bytes] = {}
        self.pending_limit = max(1, min(_PENDING_LIMIT, store.batch_limit // 4))
        self.sizes_dirty = False
        store.add_commit_hook(self.flush)

    def flush(self) -> None:
        """Write the pending sectors and the files' sizes to the store, under one hold, so
        that no cache-pressure commit can capture some of them without the others (the
        cache is detached first: that commit calls this hook again)."""
        if self.sizes_dirty:
            self.sizes_changed()
        pending = self.pending
        if not pending:
            return
        self.pending = {}
        store = self.store
        with store.hold():
            run: list[bytes] = []
            run_first = 0
            for sector in sorted(pending):
                if run and sector != run_first + len(run):
                    store.write(run_first, b"".join(run))
                    run = []
                if not run:
                    run_first = sector
                run.append(pending[sector])
            store.write(run_first, b"".join(run))

    def unregister(self) -> None:
        self.flush()
        self.store.remove_commit_hook(self.flush)
        super().unregister()

    def sizes_changed(self) -> None:
        """The files' sizes into the store's metadata (carried by its next commit)."""
        self.sizes_dirty = False
        self.store.metadata = _SIZES.pack(_SIZES_MAGIC, self.db.size, self.wal.size) + self.extra

    extra_limit = METADATA_LIMIT - _SIZES.size
    """The most bytes `set_extra` accepts (the store's metadata limit less the sizes)."""

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
