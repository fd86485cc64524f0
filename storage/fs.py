"""The in-keep filesystem: an inode-level API over SQLite, stored through the region VFS.

Theory of operation
-------------------
Metadata (inodes, directory entries, symlink targets, xattrs, the block map and the free-space
extents) is rows of one SQLite database that lives on the protected store (see `storage._vfs`).
File data lives outside SQLite, in 4 KiB blocks of a data region of the same store, found through
the block map: a 1 MiB write is one store write plus a few map rows instead of hundreds of SQLite
page writes, each written twice (WAL, then database); measured 6-10 MiB/s with data as SQLite rows.

Each operation is one SQLite transaction whose data-block writes happen inside it, and the whole
operation runs under `store.hold()`, so no integrity commit can capture half of it: a crash shows
every operation entirely or not at all. Durability comes from `fsync()`, one integrity commit of
every operation so far (all files: a group commit). Reusing a freed block at once is safe for the
same reason: integrity commits are snapshots of a prefix of all writes, in order. SQLite therefore
needs no crash journal of its own: its rollback journal lives in memory (`journal_mode=MEMORY`)
and only serves the ROLLBACK of an operation that failed; pages are written once, in place.

Store regions: [0, W) the SQLite WAL (used by volumes written before the journal moved to memory:
such a WAL is merged into the database when the volume is next opened writable), [W, W + D) the
SQLite database, the rest data blocks (W = 1/16 of the volume, 384 KiB to 64 MiB; D = 1/10 of it,
at least 1 MiB).

The API follows FUSE (pyfuse3) with plain ints, so that the WASI host adapter and a FUSE mount can
share it: inode numbers are stable (`INTEGER PRIMARY KEY AUTOINCREMENT`, never reused), the root
is inode 1, names are `bytes` (1..255 bytes, anything but ``/`` and NUL), timestamps are
nanoseconds, and every refusal is a `FilesystemError` carrying the POSIX errno.

Schema:
    inodes(ino, mode, nlink, size, uid, gid, atime, mtime, ctime, blocks)  mode = st_mode with
                                          type bits; blocks = how many of its blocks are mapped
    dirents(cookie, parent, name, ino)   cookie: AUTOINCREMENT, so readdir positions stay stable
    blocks(key = ino << 32 | index, phys)  block map; an unmapped block reads as zeros (sparse)
    free_extents(start, length)           free data blocks, merged on free, first fit on allocate
    symlinks(ino, target), xattrs(ino, name, value), orphans(ino), trims(ino)
    meta(key, value)                       format version, block size, data blocks

Unlinked-but-open files: `open()`/`release()` keep in-memory open counts; an inode whose last
name goes away while it is open is listed in `orphans` and freed at its last `release()`, or at
the next mount if the process died. Large deletions run in bounded transactions (so each fits a
store commit, and the in-memory journal stays small); a crash between them leaves at most an orphan that the next
mount reaps, or a shrunk file listed in `trims` whose blocks past the end the next mount frees
(a size increase also unmaps them first, so they are never seen). Bytes past the end of a file
inside its last block are always zero (shrinking zeroes them), so growing a file shows zeros.
A write that fails with ENOSPC while SQLite commits may leave new bytes inside the old size.

Directory nlink is 2 + the number of subdirectories (the root's ".." is itself).

Path resolution (wasi_host) opens every intermediate directory of every path, one name at a
time, through `open_directory`, which remembers (parent, name) -> directory inode: read outside
any transaction (so only committed state is remembered), and forgotten by `_forget_name` before
every statement that removes or re-points an entry (unlink, rmdir, rename, exchange). Inode
types never change and committed inode numbers are never reused, so the inodes known to be
directories need no invalidation: a missing name in one of them is ENOENT after one statement.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import stat
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

import apsw

from storage._vfs import RegionVfs
from storage.errors import FilesystemError, IntegrityError, NoSpace
from storage.integrity import SECTOR_SIZE, MerkleStore, PlainStore, VolumeState

ROOT_INODE = 1
NAME_MAX = 255
BLOCK_SIZE = SECTOR_SIZE
FORMAT_VERSION = 3  # 3: inodes.blocks (2, without it, is upgraded when opened writable)
RENAME_NOREPLACE = 1  # as Linux renameat2
RENAME_EXCHANGE = 2
XATTR_CREATE = 1  # as Linux setxattr
XATTR_REPLACE = 2
_KEY_BITS = 32
_MAX_INDEX = (1 << _KEY_BITS) - 1
_DELETE_BATCH = 1024  # blocks freed per transaction when deleting or truncating
_TIMES_MAGIC = b"KST1"
_TIME_ENTRY = struct.Struct("<QQQ")  # ino, mtime, ctime: times not yet written to SQLite
_MAP_WINDOW = 512  # block-map entries `_overwrite` loads at once (2 MiB of a file)
_MAP_CACHE_LIMIT = 1 << 16  # block-map entries it keeps at most
_NAME_CACHE_LIMIT = 1 << 12  # directory names `open_directory` remembers at most

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE inodes(ino INTEGER PRIMARY KEY AUTOINCREMENT, mode INTEGER NOT NULL,
    nlink INTEGER NOT NULL, size INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL,
    atime INTEGER NOT NULL, mtime INTEGER NOT NULL, ctime INTEGER NOT NULL, blocks INTEGER NOT NULL DEFAULT 0);
CREATE TABLE dirents(cookie INTEGER PRIMARY KEY AUTOINCREMENT, parent INTEGER NOT NULL,
    name BLOB NOT NULL, ino INTEGER NOT NULL, UNIQUE(parent, name));
CREATE INDEX dirents_by_ino ON dirents(ino);
CREATE TABLE blocks(key INTEGER PRIMARY KEY, phys INTEGER NOT NULL);
CREATE TABLE free_extents(start INTEGER PRIMARY KEY, length INTEGER NOT NULL);
CREATE TABLE symlinks(ino INTEGER PRIMARY KEY, target BLOB NOT NULL);
CREATE TABLE xattrs(ino INTEGER NOT NULL, name BLOB NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY(ino, name)) WITHOUT ROWID;
CREATE TABLE orphans(ino INTEGER PRIMARY KEY);
CREATE TABLE trims(ino INTEGER PRIMARY KEY);
CREATE TABLE meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
"""

# the count of an inode's mapped blocks from the block map (its keys are ino << 32 | index)
_COUNT_MAPPED = "(SELECT count(*) FROM blocks WHERE key BETWEEN {0}ino << 32 AND ({0}ino << 32) + 4294967295)"


def _inode_columns(alias: str, exact: bool) -> str:
    """The columns of an `Attr`, in its order, for inodes named `alias` in a query ("" or
    "i."). Without `exact` (a format-2 volume opened read-only: no blocks column, and no way to
    add one) the mapped blocks are estimated from the size, an upper bound, as format 2 did."""
    names = ", ".join(alias + name for name in ("ino", "mode", "nlink", "size", "uid", "gid", "atime", "mtime", "ctime"))
    mapped = f"{alias}blocks" if exact else f"({alias}size + {BLOCK_SIZE - 1}) / {BLOCK_SIZE}"
    return f"{names}, {mapped}"


class Attr(NamedTuple):
    """An inode's attributes, FUSE style: `mode` is st_mode including the file-type bits.
    Immutable; a named tuple rather than a frozen dataclass because one is built per lookup
    (measured 0.5 us against 5 us)."""

    ino: int
    mode: int
    nlink: int
    size: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    mapped: int  # data blocks (BLOCK_SIZE) mapped: what the file really occupies (holes are not)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def blocks(self) -> int:
        """512-byte blocks, as st_blocks: the mapped data blocks (holes of a sparse file take
        none; directories and symlinks, whose contents live in SQLite, none either)."""
        return self.mapped * (BLOCK_SIZE // 512)


@dataclass(frozen=True)
class StatFs:
    """Filesystem usage, as statvfs: sizes in `block_size` units."""

    block_size: int
    blocks: int
    blocks_free: int
    files: int
    files_free: int
    name_max: int


def _error(code: int, message: str | None = None) -> FilesystemError:
    return FilesystemError(code, message)


def check_name(name: bytes) -> None:
    """Names are 1..255 bytes of anything but '/' and NUL (EINVAL / ENAMETOOLONG otherwise)."""
    if not isinstance(name, bytes):
        raise TypeError("names are bytes")
    if len(name) > NAME_MAX:
        raise _error(errno.ENAMETOOLONG)
    if not name or b"/" in name or b"\0" in name:
        raise _error(errno.EINVAL, f"invalid name {name!r}")


def _now() -> int:
    return time.time_ns()


def _translation(exc: apsw.Error) -> BaseException | None:
    """The errno-carrying error for an SQLite or store failure (None: not one of those)."""
    if isinstance(exc, apsw.FullError):
        return NoSpace()
    if isinstance(exc, apsw.ReadOnlyError):
        return _error(errno.EROFS)
    if isinstance(exc, (apsw.IOError, apsw.CorruptError)):
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, OSError):
            return cause
        return IntegrityError(f"filesystem I/O error: {exc}")
    return None


_MAX_SQL_INTEGER = (1 << 63) - 1


def _stored_time(ns: int) -> int:
    """A timestamp as SQLite can hold it (64-bit signed nanoseconds, years 1677 to 2262): one
    past that range is clamped to its edge, as Linux clamps times to a filesystem's range."""
    return max(-_MAX_SQL_INTEGER - 1, min(ns, _MAX_SQL_INTEGER))


def _encode_times(times: dict[int, tuple[int, int]]) -> bytes:
    if len(times) == 1:  # the common fsync after writes to one file
        (ino, (mtime, ctime)), = times.items()
        return _TIMES_MAGIC + _TIME_ENTRY.pack(ino, mtime, ctime)
    return _TIMES_MAGIC + b"".join(_TIME_ENTRY.pack(ino, mtime, ctime)
                                   for ino, (mtime, ctime) in sorted(times.items()))


def _decode_times(extra: bytes) -> dict[int, tuple[int, int]]:
    """The inode times an fsync left in the store's metadata (MAC'd with each commit)."""
    if not extra:
        return {}
    body = extra[len(_TIMES_MAGIC):]
    if not extra.startswith(_TIMES_MAGIC) or len(body) % _TIME_ENTRY.size:
        raise FilesystemError(errno.EIO, "unknown filesystem metadata")
    return {ino: (mtime, ctime) for ino, mtime, ctime in _TIME_ENTRY.iter_unpack(body)}


def _runs(numbers: list[int]) -> list[tuple[int, int]]:
    """Sorted numbers as (first, count) runs of consecutive values."""
    runs: list[tuple[int, int]] = []
    for number in numbers:
        if runs and runs[-1][0] + runs[-1][1] == number:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((number, 1))
    return runs


def _mapped_runs(lookup: Callable[[int], int | None], first: int, last: int) -> list[tuple[int, int, int]]:
    """(index, phys, count) runs of blocks [first, last] where both block indices and physical
    blocks are consecutive; `lookup(index)` is a block's physical block, None for a hole."""
    runs: list[tuple[int, int, int]] = []
    run_index = run_phys = count = 0
    for index in range(first, last + 1):
        phys = lookup(index)
        if phys is None:
            continue
        if count and run_index + count == index and run_phys + count == phys:
            count += 1
            continue
        if count:
            runs.append((run_index, run_phys, count))
        run_index, run_phys, count = index, phys, 1
    if count:
        runs.append((run_index, run_phys, count))
    return runs


class _MapCache:
    """What `Filesystem._overwrite` and `Filesystem.read` need from SQLite, remembered between
    calls: inode -> (mode, size), block key -> physical block, and which `_MAP_WINDOW`-aligned
    windows of block keys are loaded completely (a key missing there is a hole). Every INSERT, UPDATE or DELETE
    on the connection, committed or rolled back, advances apsw's `total_changes()`; the cache
    is emptied whenever that count differs from the one it was filled under, so it never
    answers from state that has changed since."""

    def __init__(self) -> None:
        self.inodes: dict[int, tuple[int, int]] = {}
        self.blocks: dict[int, int] = {}
        self.windows: set[int] = set()
        self.changes = -1

    def validate(self, changes: int) -> None:
        """Forget everything unless the connection's change count is still `self.changes`."""
        if changes != self.changes:
            self.inodes.clear()
            self.blocks.clear()
            self.windows.clear()
            self.changes = changes

    def add_window(self, window: int, rows: list[Any]) -> None:
        """The (key, phys) rows of the window of block keys starting at `window`."""
        if len(self.blocks) + len(rows) > _MAP_CACHE_LIMIT:
            self.blocks.clear()
            self.windows.clear()
        self.blocks.update(rows)  # (key, phys) rows: apsw gives INTEGER columns as int
        self.windows.add(window)


class _Translated:
    """A context manager: SQLite and store failures as errno, around `Filesystem._run` and
    every read, overwrite and lookup outside it. A class rather than a generator: 0.3 us a use
    instead of 2 us (measured)."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if isinstance(exc, apsw.Error):
            translated = _translation(exc)
            if translated is not None:
                raise translated from None


_TRANSLATED = _Translated()  # stateless


class Filesystem:
    """The inode-level filesystem on a protected store. Not thread-safe: callers serialise."""

    def __init__(self, store: MerkleStore | PlainStore, *, create: bool = False) -> None:
        self._store = store
        total = store.sector_count
        self._wal_sectors = min(max(total // 16, 96), 16384)
        self._db_sectors = max(total // 10, 256)
        self._data_first = self._wal_sectors + self._db_sectors
        self._data_blocks = total - self._data_first
        if self._data_blocks < 64:
            raise FilesystemError(errno.ENOSPC, "volume too small for a filesystem")
        self._vfs = RegionVfs(store, self._wal_sectors, self._db_sectors)
        self._open_counts: dict[int, int] = {}
        # inodes this session listed in `orphans` (a superset: a transaction may have rolled
        # back), so that closing a handle needs no statement unless its inode is one of them
        self._orphan_candidates: set[int] = set()
        # mtime/ctime of in-place overwrites, not yet in SQLite (see `_overwrite`); an fsync
        # stores them in the store's commit metadata, the next changing transaction in SQLite
        self._times: dict[int, tuple[int, int]] = {}
        # `_overwrite`'s and `read`'s copy of SQLite state, valid while total_changes() is unchanged
        self._map_cache = _MapCache()
        # (parent, name) -> inode of a directory, for `open_directory` (path resolution opens
        # every intermediate directory of every path); filled from committed state only, and
        # every statement that removes or re-points an entry forgets that entry first
        self._directory_names: dict[tuple[int, bytes], int] = {}
        # inodes known to be directories, from committed state: a type never changes and a
        # committed inode number is never reused (AUTOINCREMENT), so this needs no invalidation
        self._directory_inodes: set[int] = {ROOT_INODE}
        # inodes that may have a `trims` row (a superset: the table's rows at mount, every
        # inode `_resize` listed since, until `_trim_blocks` has deleted its row)
        self._trim_candidates: set[int] = set()
        # whether any inode may have xattrs (so deleting an inode can skip their table)
        self._any_xattrs = True
        self._closed = False
        flags = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE if store.writable \
            else apsw.SQLITE_OPEN_READONLY
        try:
            self._db = apsw.Connection("db", flags=flags, vfs=self._vfs.name)
            # one cursor for every statement but the consistency check's loops: a new cursor per
            # statement (Connection.execute) costs about 1 us of the 2-3 a statement takes here
            self._cursor = self._db.cursor()
            self._configure(create)
            if create:
                self._format()
            self._check_format()
            self._times = _decode_times(self._vfs.extra)
            self._trim_candidates = {int(ino) for (ino,) in self._all("SELECT ino FROM trims")}
            self._any_xattrs = bool(self._all("SELECT 1 FROM xattrs LIMIT 1"))
            if store.writable:
                self._reap_orphans()
        except apsw.Error as exc:
            # a database SQLite cannot read (without integrity, a damaged or moved region reads
            # back as garbage rather than EIO): an errno, not an SQLite exception, for callers
            self._shutdown()
            translated = _translation(exc)
            if translated is not None:
                raise translated from None
            raise FilesystemError(errno.EIO, f"no keepshim filesystem on this volume ({exc})") from None
        except BaseException:
            self._shutdown()
            raise
        # one operation's data must fit a store commit, with room for its SQLite pages; whole
        # blocks, so that the pieces of a large aligned write need no read-modify-write
        self._transaction_bytes = max(1, min(1 << 20, store.batch_limit * BLOCK_SIZE // 2) // BLOCK_SIZE) * BLOCK_SIZE

    # -- set-up ----------------------------------------------------------------------------

    def _configure(self, create: bool) -> None:
        db = self._db
        if not self._store.writable:
            # SQLite checkpoints the WAL when the last connection closes, even a read-only one
            # (our VFS cannot report the files read-only): after a crash that would write (EROFS).
            db.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        if create:
            db.execute(f"PRAGMA page_size={SECTOR_SIZE}")
        if self._store.writable:
            # The rollback journal in memory: it only serves ROLLBACK of a failed operation.
            # Crash atomicity comes from the store (see the module docstring), so SQLite's own
            # crash journal is redundant; a WAL wrote every page twice (log, then checkpoint),
            # measured 1.4x the CPU of this on a create/unlink workload. A volume written in
            # WAL mode by an older version is checkpointed and converted here.
            mode = db.execute("PRAGMA journal_mode=MEMORY").fetchone()
            if mode is None or str(mode[0]).lower() != "memory":
                raise FilesystemError(errno.EIO, f"cannot move the SQLite journal to memory ({mode})")
        else:
            # refused before any I/O (EROFS), not half-done: SQLite believes our files writable,
            # and would write a rollback journal and pages, then retry at close
            db.execute("PRAGMA query_only=1")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA cache_size=-16384")
        db.execute("PRAGMA temp_store=MEMORY")
        db.execute(f"PRAGMA max_page_count={self._db_sectors}")

    def _format(self) -> None:
        now = _now()
        with self._db:
            self._db.execute(_SCHEMA)
            self._db.execute(
                "INSERT INTO inodes(ino, mode, nlink, size, uid, gid, atime, mtime, ctime)"
                " VALUES (?, ?, 2, 0, 0, 0, ?, ?, ?)", (ROOT_INODE, stat.S_IFDIR | 0o755, now, now, now))
            self._db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)",
                                 [("format", FORMAT_VERSION), ("block_size", BLOCK_SIZE),
                                  ("data_blocks", self._data_blocks)])
            self._db.execute("INSERT INTO free_extents(start, length) VALUES (0, ?)", (self._data_blocks,))
        self._store.commit()

    def _check_format(self) -> None:
        """Refuse what is not our filesystem; upgrade format 2 (opened writable) to 3; prepare
        the statements that read inodes, for the format found."""
        try:
            rows: dict[str, Any] = dict(self._all("SELECT key, value FROM meta"))
        except apsw.SQLError as exc:
            raise FilesystemError(errno.EIO, f"no keepshim filesystem on this volume ({exc})") from None
        version = rows.get("format")
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise FilesystemError(errno.EIO, f"filesystem format {version} is newer than this keepshim's "
                                  f"({FORMAT_VERSION}): open it with the keepshim that wrote it, or a newer one")
        if (version not in (2, FORMAT_VERSION) or rows.get("block_size") != BLOCK_SIZE
                or rows.get("data_blocks") != self._data_blocks):
            raise FilesystemError(errno.EIO, f"unsupported filesystem format {rows}")
        if version == 2 and self._store.writable and self._upgrade_from_2():
            version = FORMAT_VERSION
        self.format_version: int = version  # as the volume holds it now (`keep volume info`)
        exact = version == FORMAT_VERSION
        # whether inodes.blocks is kept (the statements that map or unmap blocks): not on a
        # format-2 volume, which has no such column (read-only, or too full to upgrade)
        self._counts_blocks = exact
        columns = _inode_columns("", exact)
        self._select_attr = f"SELECT {columns} FROM inodes WHERE ino = ?"
        self._select_entry = (f"SELECT {columns}, (SELECT ino FROM dirents WHERE parent = ?1 AND name = ?2)"
                              " FROM inodes WHERE ino = ?1")
        self._select_child = (f"SELECT {columns} FROM inodes"
                              " WHERE ino = (SELECT ino FROM dirents WHERE parent = ? AND name = ?)")
        self._select_piece = f"SELECT {columns}, (SELECT phys FROM blocks WHERE key = ?) FROM inodes WHERE ino = ?"
        self._select_entries = (f"SELECT d.cookie, d.name, {_inode_columns('i.', exact)} FROM dirents d"
                                " JOIN inodes i ON i.ino = d.ino WHERE d.parent = ? AND d.cookie > ?"
                                " ORDER BY d.cookie LIMIT 256")
        # the columns are those the format promises (a crafted or damaged table fails here, EIO,
        # not at every later getattr as an SQLite error reaching the user)
        self._one(self._select_attr, (ROOT_INODE,))

    def _upgrade_from_2(self) -> bool:
        """Format 2 -> 3: each inode's count of mapped blocks (st_blocks; format 2 could only
        estimate it from the size) becomes a column, filled from the block map, in one
        transaction made durable at once (one pass over the map: a crash before the commit
        leaves format 2, upgraded again next time). Only inodes with mapped blocks are written:
        the others read the column's default without their rows growing.

        False, with nothing changed, when the metadata region has no room for the counts (an
        older keepshim filled it): the volume is then used as format 2 (estimates, no counts
        kept) and upgraded by a writable open after room was made. Refusing it instead left no
        writable open at all, not even one to remove files (ENOSPC)."""
        try:
            with self._db:
                self._db.execute("ALTER TABLE inodes ADD COLUMN blocks INTEGER NOT NULL DEFAULT 0")
                self._db.execute("UPDATE inodes SET blocks = mapped.n FROM (SELECT key >> 32 AS ino,"
                                 " count(*) AS n FROM blocks GROUP BY key >> 32) AS mapped"
                                 " WHERE inodes.ino = mapped.ino")
                self._db.execute("UPDATE meta SET value = ? WHERE key = 'format'", (FORMAT_VERSION,))
        except apsw.FullError:  # rolled back: format 2 as it was
            return False
        self._store.commit()
        return True

    def _reap_orphans(self) -> None:
        """Free inodes left unlinked-but-open by a process that died, and finish truncations
        it had started."""
        for (ino,) in self._all("SELECT ino FROM orphans"):
            self._free_inode(ino)
        for (ino,) in self._all("SELECT ino FROM trims"):
            row = self._all("SELECT size FROM inodes WHERE ino = ?", (ino,))
            self._trim_blocks(ino, int(row[0][0]) if row else 0)

    # -- plumbing --------------------------------------------------------------------------

    def _run(self, work: Callable[[], T], *, changes: bool = True) -> T:
        """Run `work` as one transaction, translating SQLite failures to errno. A transaction
        that `changes` anything first writes the pending inode times (so its own updates win).
        Read-only work runs its statements without BEGIN/COMMIT or a store hold: the database has
        this one connection, whose statements all see the same state whether or not they share
        a transaction (a lookup then costs two statements instead of four)."""
        if self._closed:
            raise _error(errno.EBADF, "filesystem is closed")
        with _TRANSLATED:
            if not changes:
                return work()
            with self._store.hold():
                if self._times and self._store.writable:
                    times = self._times

                    def flushed() -> T:
                        self._cursor.executemany("UPDATE inodes SET mtime = ?, ctime = ? WHERE ino = ?",
                                                 [(mtime, ctime, ino) for ino, (mtime, ctime) in times.items()])
                        # in SQLite now: the attributes `work` reads (and returns) must not have
                        # them laid over its own changes once more
                        self._times = {}
                        return work()
                    try:
                        result = self._transaction(flushed)
                    except BaseException:
                        self._times = times  # rolled back: still pending
                        raise
                    if self._vfs.extra:
                        self._vfs.set_extra(b"")  # same hold: no commit sees SQLite and these apart
                    return result
                return self._transaction(work)

    def _transaction(self, work: Callable[[], T]) -> T:
        cursor = self._cursor
        cursor.execute("BEGIN")
        try:
            result = work()
            cursor.execute("COMMIT")
        except BaseException:
            if not self._db.get_autocommit():  # SQLite may already have rolled back (SQLITE_FULL)
                cursor.execute("ROLLBACK")
            raise
        return result

    def _one(self, sql: str, args: tuple[Any, ...]) -> Any:
        """The first row of a query, or None (rows are typed loosely: SQLite is dynamic)."""
        return self._cursor.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        return list(self._cursor.execute(sql, args).fetchall())

    def _attr(self, ino: int) -> Attr:
        row = self._one(self._select_attr, (ino,))
        if row is None:
            raise _error(errno.ENOENT, f"no inode {ino}")
        return self._with_times(Attr._make(row))

    def _with_times(self, attr: Attr) -> Attr:
        """`attr` with the pending in-memory times of its inode, if any."""
        times = self._times.get(attr.ino)
        if times is None:
            return attr
        return attr._replace(mtime_ns=times[0], ctime_ns=times[1])

    def _dir(self, ino: int) -> Attr:
        attr = self._attr(ino)
        if not attr.is_dir:
            raise _error(errno.ENOTDIR)
        return attr

    def _entry(self, parent: int, name: bytes) -> tuple[Attr, int | None]:
        """Directory `parent` (ENOENT, ENOTDIR) and the inode its entry `name` names (None if
        there is none), in one statement (a scalar subquery: measured 3 us; the same as a
        LEFT JOIN, 30-50 us)."""
        row = self._one(self._select_entry, (parent, name))
        if row is None:
            raise _error(errno.ENOENT, f"no inode {parent}")
        directory = self._with_times(Attr(*row[:10]))
        if not directory.is_dir:
            raise _error(errno.ENOTDIR)
        return directory, None if row[10] is None else int(row[10])

    def _child_attr(self, parent: int, name: bytes) -> Attr | None:
        """The attributes of entry `name` of `parent` in one statement, None when there is no
        such entry (or its inode is missing): callers then run the full checks for the error.
        A found entry implies `parent` is a directory (an invariant `check` verifies)."""
        row = self._one(self._select_child, (parent, name))
        return None if row is None else self._with_times(Attr._make(row))

    def _child(self, parent: int, name: bytes) -> int | None:
        row = self._one("SELECT ino FROM dirents WHERE parent = ? AND name = ?", (parent, name))
        return None if row is None else int(row[0])

    def _forget_name(self, parent: int, name: bytes) -> None:
        """Entry `name` of `parent` is about to be removed or re-pointed: `open_directory` must
        not answer from it any more (called before every such statement, whatever the type)."""
        self._directory_names.pop((parent, name), None)

    def _parent_of(self, directory: int) -> int:
        if directory == ROOT_INODE:
            return ROOT_INODE
        row = self._one("SELECT parent FROM dirents WHERE ino = ?", (directory,))
        return ROOT_INODE if row is None else int(row[0])

    def _touch(self, ino: int, *, mtime: bool = True) -> None:
        now = _now()
        if mtime:
            self._cursor.execute("UPDATE inodes SET mtime = ?, ctime = ? WHERE ino = ?", (now, now, ino))
        else:
            self._cursor.execute("UPDATE inodes SET ctime = ? WHERE ino = ?", (now, ino))

    def _touch_dir(self, ino: int, links: int) -> None:
        """A directory's entries changed: mtime and ctime become now, nlink changes by `links`."""
        now = _now()
        self._cursor.execute("UPDATE inodes SET mtime = ?, ctime = ?, nlink = nlink + ? WHERE ino = ?",
                             (now, now, links, ino))

    def _add_nlink(self, ino: int, delta: int) -> None:
        self._cursor.execute("UPDATE inodes SET nlink = nlink + ? WHERE ino = ?", (delta, ino))

    def _live_dir(self, parent: int) -> Attr:
        attr = self._dir(parent)
        if attr.nlink == 0:
            raise _error(errno.ENOENT, "directory was removed")
        return attr

    def _new_inode(self, parent: int, name: bytes, mode: int, nlink: int, size: int = 0, blocks: int = 0) -> Attr:
        """Within a transaction: a new inode named `name` in the live directory `parent`
        (EEXIST if the name is taken); a directory (`nlink` 2) adds a link to its parent.
        `blocks`: how many blocks the caller maps for it in this transaction."""
        check_name(name)
        cursor = self._cursor
        now = _now()
        # the parent's times and link count first, only if it is a live directory: no SELECT
        # for the checks unless they fail (a taken name fails the INSERT, rolling all back)
        cursor.execute("UPDATE inodes SET mtime = ?1, ctime = ?1, nlink = nlink + ?2"
                       " WHERE ino = ?3 AND nlink > 0 AND (mode & 61440) = 16384",
                       (now, 1 if stat.S_ISDIR(mode) else 0, parent))
        if not self._db.changes():
            self._entry(parent, name)  # ENOENT, ENOTDIR
            raise _error(errno.ENOENT, "directory was removed")
        if name in (b".", b".."):
            raise _error(errno.EEXIST)
        if self._counts_blocks:
            cursor.execute("INSERT INTO inodes(mode, nlink, size, uid, gid, atime, mtime, ctime, blocks)"
                           " VALUES (?, ?, ?, 0, 0, ?, ?, ?, ?)", (mode, nlink, size, now, now, now, blocks))
        else:  # format 2 (its estimate from the size is `blocks` too: new blocks fill the file)
            cursor.execute("INSERT INTO inodes(mode, nlink, size, uid, gid, atime, mtime, ctime)"
                           " VALUES (?, ?, ?, 0, 0, ?, ?, ?)", (mode, nlink, size, now, now, now))
        ino = int(self._db.last_insert_rowid())
        try:
            cursor.execute("INSERT INTO dirents(parent, name, ino) VALUES (?, ?, ?)", (parent, name, ino))
        except apsw.ConstraintError:
            raise _error(errno.EEXIST) from None
        return Attr(ino, mode, nlink, size, 0, 0, now, now, now, blocks)

    def _drop_link(self, attr: Attr) -> None:
        """One name of `attr.ino` went away: free it when nothing refers to it any more, at
        once (in this transaction) when it is not open and small enough, else as an orphan."""
        ino = attr.ino
        remaining = 0 if attr.is_dir else attr.nlink - 1
        unmapped = 0
        if remaining == 0 and not self._open_counts.get(ino):
            unmapped = self._unmap_file(attr)
            if unmapped < _DELETE_BATCH:
                # it had a name until now, so it is no orphan
                self._delete_inode(ino, symlink=attr.is_symlink, orphan=False)
                return
        if self._counts_blocks:
            self._cursor.execute("UPDATE inodes SET nlink = ?, ctime = ?, blocks = blocks - ? WHERE ino = ?",
                                 (remaining, _now(), unmapped, ino))
        else:
            self._cursor.execute("UPDATE inodes SET nlink = ?, ctime = ? WHERE ino = ?", (remaining, _now(), ino))
        if remaining == 0:
            self._cursor.execute("INSERT OR IGNORE INTO orphans(ino) VALUES (?)", (ino,))
            self._orphan_candidates.add(ino)

    def _delete_inode(self, ino: int, *, symlink: bool = True, orphan: bool = True) -> None:
        """Within a transaction: the rows of an inode whose blocks are all unmapped (`symlink`,
        `orphan`: whether it may have rows in those tables; `trims` and `xattrs` rows are
        looked for only when `_trim_candidates` / `_any_xattrs` say there may be some)."""
        execute = self._db.execute
        execute("DELETE FROM inodes WHERE ino = ?", (ino,))
        if ino in self._trim_candidates:
            execute("DELETE FROM trims WHERE ino = ?", (ino,))
        if symlink:
            execute("DELETE FROM symlinks WHERE ino = ?", (ino,))
        if orphan:
            execute("DELETE FROM orphans WHERE ino = ?", (ino,))
        if self._any_xattrs:
            execute("DELETE FROM xattrs WHERE ino = ?", (ino,))

    def _free_inode(self, ino: int) -> None:
        """Free an orphan's blocks in bounded transactions, then the inode itself."""
        while self._run(lambda: self._unmap(ino, 0, _MAX_INDEX)) >= _DELETE_BATCH:
            pass
        self._run(lambda: self._delete_inode(ino))
        self._orphan_candidates.discard(ino)

    # -- data blocks: map, allocation, I/O -----------------------------------------------------

    def _map(self, ino: int, first: int, last: int) -> dict[int, int]:
        """Block index -> physical block, for the mapped blocks of [first, last]."""
        base = ino << _KEY_BITS
        return {key - base: phys for key, phys in
                self._all("SELECT key, phys FROM blocks WHERE key BETWEEN ? AND ?", (base + first, base + last))}

    def _cached_inode(self, ino: int) -> tuple[int, int] | None:
        """(mode, size) of an inode from `_map_cache`, None if there is no such inode (the
        caller validated the cache)."""
        cache = self._map_cache
        inode = cache.inodes.get(ino)
        if inode is None:
            row = self._one("SELECT mode, size FROM inodes WHERE ino = ?", (ino,))
            if row is None:
                return None
            inode = cache.inodes[ino] = (int(row[0]), int(row[1]))
        return inode

    def _cached_map(self, ino: int, first: int, last: int) -> dict[int, int]:
        """`_map` from `_map_cache`, loading whole `_MAP_WINDOW`s of it as needed (the caller
        validated the cache)."""
        lookup = self._cached_lookup(ino)
        mapping: dict[int, int] = {}
        for index in range(first, last + 1):
            phys = lookup(index)
            if phys is not None:
                mapping[index] = phys
        return mapping

    def _cached_lookup(self, ino: int) -> Callable[[int], int | None]:
        """Block index -> physical block (None for a hole) of `ino` from `_map_cache`, loading
        the block's whole `_MAP_WINDOW` on a miss (the caller validated the cache)."""
        cache = self._map_cache
        base = ino << _KEY_BITS
        get = cache.blocks.get

        def lookup(index: int) -> int | None:
            phys = get(base + index)
            if phys is None:
                window = base + (index // _MAP_WINDOW) * _MAP_WINDOW
                if window in cache.windows:
                    return None  # a hole
                cache.add_window(window, self._all("SELECT key, phys FROM blocks WHERE key BETWEEN ? AND ?",
                                                   (window, window + _MAP_WINDOW - 1)))
                phys = get(base + index)
            return phys
        return lookup

    def _unmap(self, ino: int, first: int, last: int, *, counted: bool = True) -> int:
        """Unmap and free up to _DELETE_BATCH blocks of [first, last] (the last ones first);
        returns how many. The inode's `blocks` goes down by as many unless not `counted` (the
        caller deletes the inode, or counts them in a statement it runs anyway)."""
        base = ino << _KEY_BITS
        # the limit is literal: bound as a parameter, it made this statement 4x slower (measured)
        rows = self._all(f"SELECT key, phys FROM blocks WHERE key BETWEEN ? AND ? ORDER BY key DESC LIMIT {_DELETE_BATCH}",
                         (base + first, base + last))
        if rows:
            self._cursor.execute("DELETE FROM blocks WHERE key BETWEEN ? AND ?", (rows[-1][0], rows[0][0]))
            if counted and self._counts_blocks:
                self._cursor.execute("UPDATE inodes SET blocks = blocks - ? WHERE ino = ?", (len(rows), ino))
            self._free_blocks([int(phys) for _, phys in rows])
        return len(rows)

    def _unmap_file(self, attr: Attr) -> int:
        """`_unmap` of a whole file, skipped for an empty one: no block lies past a file's size
        unless a truncation of it is still pending (`_trim_candidates`). Not `counted`: the
        caller (`_drop_link`) deletes the inode or counts them in its own update."""
        if not attr.size and attr.ino not in self._trim_candidates:
            return 0
        return self._unmap(attr.ino, 0, _MAX_INDEX, counted=False)

    def _allocate(self, count: int) -> list[int]:
        """`count` free physical blocks, lowest first (sequential writes stay contiguous). A
        SELECT then an UPDATE: one UPDATE ... RETURNING took 8.5-9 us, these two 5.9 us
        together (RETURNING builds a temporary table; measured)."""
        found: list[int] = []
        while len(found) < count:
            row = self._one("SELECT start, length FROM free_extents ORDER BY start LIMIT 1", ())
            if row is None:
                raise NoSpace()
            start, length = int(row[0]), int(row[1])
            take = min(length, count - len(found))
            found.extend(range(start, start + take))
            if take == length:
                self._cursor.execute("DELETE FROM free_extents WHERE start = ?", (start,))
            else:
                self._cursor.execute("UPDATE free_extents SET start = ?, length = ? WHERE start = ?",
                                     (start + take, length - take, start))
        return found

    def _free_blocks(self, physical: list[int]) -> None:
        """Return blocks to the free extents, merging with their neighbours."""
        cursor = self._cursor
        for start, count in _runs(sorted(physical)):
            # the usual case, in one statement: the run extends the extent that ends where it
            # starts, and no extent starts where it ends (files deleted in the order written)
            cursor.execute("UPDATE free_extents SET length = length + ?2"
                           " WHERE start = (SELECT max(start) FROM free_extents WHERE start < ?1)"
                           " AND start + length = ?1 AND NOT EXISTS (SELECT 1 FROM free_extents WHERE start = ?1 + ?2)",
                           (start, count))
            if self._db.changes():
                continue
            # both neighbours in one statement: the extent before the run, the one right after it
            before: tuple[int, int] | None = None
            after = 0
            for found, length in self._all(
                    "SELECT * FROM (SELECT start, length FROM free_extents WHERE start < ?1 ORDER BY start DESC"
                    " LIMIT 1) UNION ALL SELECT start, length FROM free_extents WHERE start = ?2",
                    (start, start + count)):
                if int(found) == start + count:
                    after = int(length)
                else:
                    before = (int(found), int(length))
            if after:
                cursor.execute("DELETE FROM free_extents WHERE start = ?", (start + count,))
                count += after
            if before is not None and before[0] + before[1] == start:
                cursor.execute("UPDATE free_extents SET length = ? WHERE start = ?", (before[1] + count, before[0]))
            else:
                cursor.execute("INSERT INTO free_extents(start, length) VALUES (?, ?)", (start, count))

    def _read_blocks(self, mapping: dict[int, int], first: int, last: int) -> bytearray:
        """Blocks [first, last] of a file (unmapped ones as zeros), reading physically
        contiguous runs in one store call each."""
        return self._read_runs(_mapped_runs(mapping.get, first, last), first, last)

    def _read_runs(self, runs: list[tuple[int, int, int]], first: int, last: int) -> bytearray:
        """Blocks [first, last] of a file given as `_mapped_runs` (the rest reads as zeros)."""
        buffer = bytearray((last - first + 1) * BLOCK_SIZE)
        with memoryview(buffer) as view:
            for index, phys, count in runs:
                start = (index - first) * BLOCK_SIZE
                self._store.read_into(self._data_first + phys, view[start:start + count * BLOCK_SIZE])
        return buffer

    def _zero_tail(self, ino: int, size: int) -> None:
        """Zero the bytes past `size` in the block holding the end of the file."""
        index, offset = divmod(size, BLOCK_SIZE)
        if not offset:
            return
        phys = self._map(ino, index, index).get(index)
        if phys is not None:
            block = bytearray(self._store.read(self._data_first + phys, 1))
            block[offset:] = bytes(BLOCK_SIZE - offset)
            self._store.write(self._data_first + phys, block)

    def _release_if_unused(self, ino: int) -> None:
        if self._open_counts.get(ino, 0) == 0 and ino in self._orphan_candidates:
            if self._run(lambda: self._one("SELECT 1 FROM orphans WHERE ino = ?", (ino,)), changes=False) is None:
                self._orphan_candidates.discard(ino)  # its transaction rolled back
            else:
                self._free_inode(ino)

    # -- lookups and attributes ------------------------------------------------------------

    def lookup(self, parent: int, name: bytes, *, open: bool = False) -> Attr:
        """The attributes of `name` in directory `parent` (ENOENT, ENOTDIR); with `open`, also
        count an open handle on it (as `open`)."""
        attr = self.find(parent, name)
        if attr is None:
            raise _error(errno.ENOENT)
        if open:
            self._open_counts[attr.ino] = self._open_counts.get(attr.ino, 0) + 1
        return attr

    def find(self, parent: int, name: bytes) -> Attr | None:
        """`lookup`, with None where it raises ENOENT: path resolution looks up every name it
        is about to create, and raising costs more than the statement. One statement, read
        without a transaction (see `_run`), unless the name is missing from a directory not
        known to be one (`_directory_inodes`): then the full checks pick the errno."""
        if self._closed:
            raise _error(errno.EBADF, "filesystem is closed")
        with _TRANSLATED:
            if name != b"." and name != b"..":
                found = self._child_attr(parent, name)
                if found is not None or (parent in self._directory_inodes and 0 < len(name) <= NAME_MAX
                                         and b"/" not in name and b"\0" not in name):
                    return found  # a miss there is ENOENT whether or not `parent` still exists
            try:
                return self._find_checked(parent, name)
            except FilesystemError as error:
                if error.errno == errno.ENOENT:
                    return None
                raise

    def _find_checked(self, parent: int, name: bytes) -> Attr:
        """`find` with every check, in `lookup`'s errno order: the directory (ENOENT, ENOTDIR),
        then the name (EINVAL, ENAMETOOLONG), then the entry (ENOENT)."""
        if name in (b".", b".."):
            directory = self._dir(parent)
            return directory if name == b"." else self._attr(self._parent_of(parent))
        _, child = self._entry(parent, name)
        check_name(name)
        if child is None:
            raise _error(errno.ENOENT)
        return self._attr(child)

    def open_directory(self, parent: int, name: bytes) -> int:
        """The inode of directory `name` in `parent`, counted as an open handle (as `open`);
        ENOENT, or ENOTDIR when `name` is something else. Path resolution opens every
        intermediate directory of every path, so the answer is remembered in
        `_directory_names` (bounded): filled outside any transaction (committed state only),
        and `_forget_name` drops an entry before any statement removes or re-points it."""
        if self._closed:
            raise _error(errno.EBADF, "filesystem is closed")
        key = (parent, name)
        ino = self._directory_names.get(key)
        if ino is None:
            attr = self.lookup(parent, name)
            if not attr.is_dir:
                raise _error(errno.ENOTDIR)
            ino = attr.ino
            if name != b"." and name != b".." and self._db.get_autocommit():
                if len(self._directory_names) >= _NAME_CACHE_LIMIT:
                    self._directory_names.clear()
                if len(self._directory_inodes) >= _NAME_CACHE_LIMIT:
                    self._directory_inodes = {ROOT_INODE}
                self._directory_names[key] = ino
                self._directory_inodes.add(ino)
        self._open_counts[ino] = self._open_counts.get(ino, 0) + 1
        return ino

    def getattr(self, ino: int) -> Attr:
        return self._run(lambda: self._attr(ino), changes=False)

    def setattr(self, ino: int, *, mode: int | None = None, size: int | None = None,
                atime_ns: int | None = None, mtime_ns: int | None = None,
                uid: int | None = None, gid: int | None = None) -> Attr:
        """Change permission bits, size (truncate or sparse extension), times or owner. ctime
        always becomes now; a size change also sets mtime unless `mtime_ns` is given."""
        if size is not None and size < 0:
            raise _error(errno.EINVAL)
        if size is not None and size >= BLOCK_SIZE << _KEY_BITS:
            raise _error(errno.EFBIG)

        def work() -> Attr:
            attr = self._attr(ino)
            now = _now()
            updates: dict[str, int] = {"ctime": now}
            if mode is not None:
                updates["mode"] = stat.S_IFMT(attr.mode) | stat.S_IMODE(mode)
            if uid is not None:
                updates["uid"] = uid
            if gid is not None:
                updates["gid"] = gid
            if atime_ns is not None:
                updates["atime"] = _stored_time(atime_ns)
            if mtime_ns is not None:
                updates["mtime"] = _stored_time(mtime_ns)
            if size is not None:
                if attr.is_dir:
                    raise _error(errno.EISDIR)
                if not attr.is_file:
                    raise _error(errno.EINVAL)
                if size != attr.size:
                    updates["size"] = size
                    updates.setdefault("mtime", now)
            assignments = ", ".join(f"{column} = ?" for column in updates)
            self._cursor.execute(f"UPDATE inodes SET {assignments} WHERE ino = ?", (*updates.values(), ino))
            if size is not None and size != attr.size:
                self._resize(ino, attr.size, size)
            return self._attr(ino)
        result = self._run(work)
        if size is not None and self._trim_blocks(ino, size):  # `result` counted them still
            result = self._run(lambda: self._attr(ino), changes=False)
        return result

    def _resize(self, ino: int, old: int, new: int) -> None:
        """Within a transaction: shrinking zeroes the rest of the new last block now (whole
        blocks past it are freed in bounded batches by `_trim_blocks`, noted in `trims`);
        growing unmaps any stale block in the new range so that it reads as zeros."""
        if new < old:
            self._trim_candidates.add(ino)
            self._cursor.execute("INSERT OR IGNORE INTO trims(ino) VALUES (?)", (ino,))
            self._zero_tail(ino, new)
        else:
            self._clear_range(ino, old, new)

    def _clear_range(self, ino: int, old: int, new: int) -> None:
        """Growing from `old` to `new`: blocks there (left by an interrupted truncate) go."""
        first_whole = -(-old // BLOCK_SIZE)
        last = (new - 1) // BLOCK_SIZE
        if first_whole <= last:
            while self._unmap(ino, first_whole, last) >= _DELETE_BATCH:
                pass

    def _trim_blocks(self, ino: int, size: int) -> int:
        """Free the whole blocks past `size`, in bounded transactions; returns how many."""
        first = -(-size // BLOCK_SIZE)
        freed = 0
        while (batch := self._run(lambda: self._unmap(ino, first, _MAX_INDEX))) >= _DELETE_BATCH:
            freed += batch
        self._run(lambda: self._cursor.execute("DELETE FROM trims WHERE ino = ?", (ino,)))
        self._trim_candidates.discard(ino)
        return freed + batch

    # -- namespace operations --------------------------------------------------------------

    def create(self, parent: int, name: bytes, mode: int = 0o644, *, open: bool = False,
               data: bytes | bytearray | memoryview = b"") -> Attr:
        """A new regular file (EEXIST if the name exists), empty or holding `data` (at most
        one write's worth, `max_create_data`), in one transaction; with `open`, also count an
        open handle on it (as `open`)."""
        view = memoryview(data).cast("B")
        if len(view) > self._transaction_bytes:
            raise ValueError("more data than one transaction takes: create, then write")

        def work() -> Attr:
            blocks = -(-len(view) // BLOCK_SIZE)  # all of them new: the row counts them at once
            attr = self._new_inode(parent, name, stat.S_IFREG | stat.S_IMODE(mode), 1, len(view), blocks)
            if len(view):  # new and empty: no lookup, and the inode already has its size
                self._write_mapped(attr.ino, {}, 0, view)
            return attr
        attr = self._run(work)
        if open:
            self._open_counts[attr.ino] = 1  # a new inode: no handle yet
        if not len(view):  # its first write (usually next) needs no lookup to see it empty
            cache = self._map_cache
            cache.validate(self._db.total_changes())
            cache.inodes[attr.ino] = (attr.mode, attr.size)
        return attr

    @property
    def max_create_data(self) -> int:
        """The most bytes `create` takes as a new file's contents."""
        return self._transaction_bytes

    def check_create(self, parent: int, name: bytes) -> None:
        """Raise what `create(parent, name)` would raise for the directory and the name (all
        but running out of room), creating nothing: one statement, no transaction. For a
        client that creates a file later, with its first bytes (shim.volume_backend)."""
        check_name(name)
        directory, existing = self._run(lambda: self._entry(parent, name), changes=False)
        if directory.nlink == 0:
            raise _error(errno.ENOENT, "directory was removed")
        if name in (b".", b"..") or existing is not None:
            raise _error(errno.EEXIST)

    def mkdir(self, parent: int, name: bytes, mode: int = 0o755) -> Attr:
        return self._run(lambda: self._new_inode(parent, name, stat.S_IFDIR | stat.S_IMODE(mode), 2))

    def symlink(self, parent: int, name: bytes, target: bytes) -> Attr:
        if not target or b"\0" in target or len(target) > 4095:
            raise _error(errno.EINVAL if len(target) <= 4095 else errno.ENAMETOOLONG)

        def work() -> Attr:
            attr = self._new_inode(parent, name, stat.S_IFLNK | 0o777, 1, len(target))
            self._cursor.execute("INSERT INTO symlinks(ino, target) VALUES (?, ?)", (attr.ino, target))
            return attr
        return self._run(work)

    def readlink(self, ino: int) -> bytes:
        def work() -> bytes:
            row = self._one("SELECT target FROM symlinks WHERE ino = ?", (ino,))
            if row is None:
                self._attr(ino)
                raise _error(errno.EINVAL, "not a symbolic link")
            return bytes(row[0])
        return self._run(work, changes=False)

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        """A new name for an existing non-directory (EPERM for directories)."""
        def work() -> Attr:
            check_name(new_name)
            attr = self._attr(ino)
            if attr.is_dir:
                raise _error(errno.EPERM)
            if attr.nlink == 0:
                raise _error(errno.ENOENT)
            self._live_dir(new_parent)
            if new_name in (b".", b"..") or self._child(new_parent, new_name) is not None:
                raise _error(errno.EEXIST)
            self._cursor.execute("INSERT INTO dirents(parent, name, ino) VALUES (?, ?, ?)", (new_parent, new_name, ino))
            self._add_nlink(ino, 1)
            self._touch(ino, mtime=False)
            self._touch(new_parent)
            return self._attr(ino)
        return self._run(work)

    def unlink(self, parent: int, name: bytes) -> None:
        """Remove a non-directory name (EISDIR for directories)."""
        def work() -> int:
            if name in (b".", b".."):
                self._dir(parent)
                raise _error(errno.EISDIR)
            attr = self._child_attr(parent, name)
            if attr is None:
                _, ino = self._entry(parent, name)
                check_name(name)
                if ino is None:
                    raise _error(errno.ENOENT)
                attr = self._attr(ino)
            if attr.is_dir:
                raise _error(errno.EISDIR)
            self._forget_name(parent, name)
            self._cursor.execute("DELETE FROM dirents WHERE parent = ? AND name = ?", (parent, name))
            self._drop_link(attr)
            self._touch(parent)
            return attr.ino
        self._release_if_unused(self._run(work))

    def rmdir(self, parent: int, name: bytes) -> None:
        """Remove an empty directory (ENOTDIR, ENOTEMPTY; EINVAL for "." , ENOTEMPTY for "..")."""
        def work() -> int:
            if name in (b".", b".."):
                self._dir(parent)
                raise _error(errno.EINVAL if name == b"." else errno.ENOTEMPTY)
            _, ino = self._entry(parent, name)
            check_name(name)
            if ino is None:
                raise _error(errno.ENOENT)
            self._remove_directory_entry(parent, name, self._attr(ino))
            return ino
        self._release_if_unused(self._run(work))

    def _remove_directory_entry(self, parent: int, name: bytes, attr: Attr) -> None:
        if not attr.is_dir:
            raise _error(errno.ENOTDIR)
        if self._one("SELECT 1 FROM dirents WHERE parent = ? LIMIT 1", (attr.ino,)) is not None:
            raise _error(errno.ENOTEMPTY)
        self._forget_name(parent, name)
        self._cursor.execute("DELETE FROM dirents WHERE parent = ? AND name = ?", (parent, name))
        self._drop_link(attr)
        self._touch_dir(parent, -1)

    def _is_ancestor(self, ancestor: int, ino: int) -> bool:
        """Whether `ancestor` is `ino` or one of its ancestors."""
        current = ino
        seen = 0
        while True:
            if current == ancestor:
                return True
            if current == ROOT_INODE or seen > 1 << 20:
                return False
            current = self._parent_of(current)
            seen += 1

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               flags: int = 0) -> None:
        """Atomic rename, as Linux renameat2: replaces an existing target (a directory only by
        an empty directory), or with RENAME_NOREPLACE refuses it (EEXIST), or with
        RENAME_EXCHANGE swaps the two names."""
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise _error(errno.EINVAL)
        replaced: list[int] = []

        def work() -> None:
            self._dir(old_parent)
            self._live_dir(new_parent)
            for name in (old_name, new_name):
                if name in (b".", b".."):
                    raise _error(errno.EBUSY if name == b"." else errno.EINVAL)
                check_name(name)
            source = self._child(old_parent, old_name)
            if source is None:
                raise _error(errno.ENOENT)
            target = self._child(new_parent, new_name)
            source_attr = self._attr(source)
            if flags & RENAME_EXCHANGE:
                if target is None:
                    raise _error(errno.ENOENT)
                self._exchange(old_parent, old_name, source, new_parent, new_name, target)
                return
            if target is not None and flags & RENAME_NOREPLACE:
                raise _error(errno.EEXIST)
            if source_attr.is_dir and new_parent != old_parent and self._is_ancestor(source, new_parent):
                raise _error(errno.EINVAL)
            if target == source:
                return  # two names of one inode (or the same name): nothing to do
            if target is not None:
                target_attr = self._attr(target)
                if source_attr.is_dir and not target_attr.is_dir:
                    raise _error(errno.ENOTDIR)
                if not source_attr.is_dir and target_attr.is_dir:
                    raise _error(errno.EISDIR)
                if target_attr.is_dir:
                    self._remove_directory_entry(new_parent, new_name, target_attr)
                else:
                    self._forget_name(new_parent, new_name)
                    self._cursor.execute("DELETE FROM dirents WHERE parent = ? AND name = ?", (new_parent, new_name))
                    self._drop_link(target_attr)
                replaced.append(target)
            self._forget_name(old_parent, old_name)
            self._forget_name(new_parent, new_name)
            self._cursor.execute("UPDATE dirents SET parent = ?, name = ? WHERE parent = ? AND name = ?",
                                 (new_parent, new_name, old_parent, old_name))
            if source_attr.is_dir and new_parent != old_parent:
                self._add_nlink(old_parent, -1)
                self._add_nlink(new_parent, 1)
            self._touch(source, mtime=False)
            self._touch(old_parent)
            if new_parent != old_parent:
                self._touch(new_parent)
        self._run(work)
        for ino in replaced:
            self._release_if_unused(ino)

    def _exchange(self, old_parent: int, old_name: bytes, source: int,
                  new_parent: int, new_name: bytes, target: int) -> None:
        if source == target:
            return
        source_dir = self._attr(source).is_dir
        target_dir = self._attr(target).is_dir
        if old_parent != new_parent:
            if source_dir and self._is_ancestor(source, new_parent):
                raise _error(errno.EINVAL)
            if target_dir and self._is_ancestor(target, old_parent):
                raise _error(errno.EINVAL)
        self._forget_name(old_parent, old_name)
        self._forget_name(new_parent, new_name)
        self._cursor.execute("UPDATE dirents SET ino = ? WHERE parent = ? AND name = ?", (target, old_parent, old_name))
        self._cursor.execute("UPDATE dirents SET ino = ? WHERE parent = ? AND name = ?", (source, new_parent, new_name))
        if old_parent != new_parent and source_dir != target_dir:
            moved_to_new = 1 if source_dir else -1
            self._add_nlink(new_parent, moved_to_new)
            self._add_nlink(old_parent, -moved_to_new)
        for ino in {source, target, old_parent, new_parent}:
            self._touch(ino, mtime=ino in (old_parent, new_parent))

    # -- directories -----------------------------------------------------------------------

    def readdir(self, ino: int, cookie: int = 0) -> Iterator[tuple[bytes, Attr, int]]:
        """Entries after position `cookie` (0 = start) as (name, attributes, next cookie):
        ".", "..", then the names in creation order. Cookies stay valid across inserts and
        deletes of other entries."""
        def first() -> tuple[Attr, Attr]:
            attr = self._dir(ino)
            return attr, self._attr(self._parent_of(ino))
        attr, parent = self._run(first, changes=False)
        if cookie < 1:
            yield b".", attr, 1
        if cookie < 2:
            yield b"..", parent, 2
        position = max(cookie - 2, 0)
        if position > _MAX_SQL_INTEGER:
            return  # past every cookie (a guest may pass any 64-bit value)
        while True:
            def batch(after: int = position) -> list[tuple[bytes, Attr, int]]:
                rows = self._all(self._select_entries, (ino, after))
                return [(bytes(row[1]), self._with_times(Attr(*row[2:])), int(row[0]) + 2) for row in rows]
            entries = self._run(batch, changes=False)
            if not entries:
                return
            yield from entries
            position = entries[-1][2] - 2

    def statfs(self) -> StatFs:
        """Usage in data blocks; `files_free` is bounded by the metadata region."""
        def work() -> StatFs:
            free = int(self._one("SELECT coalesce(sum(length), 0) FROM free_extents", ())[0])
            files = int(self._one("SELECT count(*) FROM inodes", ())[0])
            page_count = int(self._one("PRAGMA page_count", ())[0])
            free_pages = int(self._one("PRAGMA freelist_count", ())[0])
            inode_room = max(self._db_sectors - page_count + free_pages, 0) * 16
            return StatFs(BLOCK_SIZE, self._data_blocks, free, files + inode_room, inode_room, NAME_MAX)
        return self._run(work, changes=False)

    # -- open files and data ---------------------------------------------------------------

    def open(self, ino: int) -> Attr:
        """Count an open handle: the inode outlives its last name until `release`."""
        attr = self.getattr(ino)
        self._open_counts[ino] = self._open_counts.get(ino, 0) + 1
        return attr

    def release(self, ino: int) -> None:
        count = self._open_counts.get(ino, 0)
        if count <= 0:
            raise _error(errno.EBADF, f"inode {ino} is not open")
        if count == 1:
            del self._open_counts[ino]
            self._release_if_unused(ino)
        else:
            self._open_counts[ino] = count - 1

    def read(self, ino: int, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset` (short at end of file; holes read as zeros). The
        file's mode, size and block map come from `_map_cache` (a sequential read of a file
        that is not changing runs no SQL but one window load per 2 MiB)."""
        if offset < 0 or size < 0:
            raise _error(errno.EINVAL)

        if self._closed:
            raise _error(errno.EBADF, "filesystem is closed")
        with _TRANSLATED:  # read-only: no transaction (see `_run`)
            self._map_cache.validate(self._db.total_changes())
            inode = self._cached_inode(ino)
            if inode is None:
                raise _error(errno.ENOENT, f"no inode {ino}")
            mode, file_size = inode
            if stat.S_ISDIR(mode):
                raise _error(errno.EISDIR)
            if not stat.S_ISREG(mode):
                raise _error(errno.EINVAL)
            end = min(offset + size, file_size)
            if end <= offset:
                return b""
            first = offset // BLOCK_SIZE
            last = (end - 1) // BLOCK_SIZE
            # runs straight from the cache, no per-block dict: a file written in order is one
            # store read (the seq workload's 1,024 reads of 64 KiB: 82 -> 55 ms in fs.read)
            buffer = self._read_runs(_mapped_runs(self._cached_lookup(ino), first, last), first, last)
        skip = offset - first * BLOCK_SIZE
        with memoryview(buffer) as view:
            return bytes(view[skip:skip + end - offset])  # one copy

    def write(self, ino: int, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write `data` at `offset` (extending the file, with a hole if past the end); returns
        the number of bytes written: all of them, or (as POSIX write) fewer when the volume
        filled up after some were written. Large writes are split into bounded operations (each
        atomic on its own); running out of room in the first one raises NoSpace."""
        view = memoryview(data).cast("B")
        if offset < 0:
            raise _error(errno.EINVAL)
        if offset + len(view) >= BLOCK_SIZE << _KEY_BITS:
            raise _error(errno.EFBIG)
        step = self._transaction_bytes
        if 0 < len(view) <= step and self._overwrite(ino, offset, view):
            return len(view)
        for start in range(0, max(len(view), 1), step):
            piece = view[start:start + step]
            try:
                self._run(functools.partial(self._write_piece, ino, offset + start, piece))
            except NoSpace:
                if start:
                    return start  # the pieces before it are written: a short write
                raise
        return len(view)

    def _overwrite(self, ino: int, offset: int, data: memoryview) -> bool:
        """The fast path of `write`: inside the file's size and over mapped blocks only, so
        the block map and size stay as they are and no SQLite transaction is needed. The data
        blocks go to the store under one hold (atomic like any operation); mtime/ctime wait in
        memory (`_times`, seen by getattr at once) for the next fsync or changing transaction.
        The file's mode, size and block map come from `_map_cache` (no SQL while nothing
        changed; a single block whose inode and mapping are both cached is looked up there
        directly: the durable 4 KiB overwrite). Returns False, having changed nothing, when the
        general path must run."""
        if self._closed or not self._store.writable:
            return False
        end = offset + len(data)
        first = offset // BLOCK_SIZE
        last = (end - 1) // BLOCK_SIZE
        cache = self._map_cache
        cache.validate(self._db.total_changes())
        inode = cache.inodes.get(ino)
        phys = cache.blocks.get((ino << _KEY_BITS) + first) if inode is not None and first == last else None
        if phys is not None and inode is not None:
            if not stat.S_ISREG(inode[0]) or end > inode[1]:
                return False
            mapping = {first: phys}
        else:
            with _TRANSLATED:
                inode = self._cached_inode(ino)
                if inode is None or not stat.S_ISREG(inode[0]) or end > inode[1]:
                    return False
                mapping = self._cached_map(ino, first, last)
        if len(mapping) != last - first + 1:
            return False  # a hole: allocation needs the general path
        if first == last and len(data) == BLOCK_SIZE:  # one whole block: one store write, atomic
            self._store.write(self._data_first + mapping[first], data)
        else:
            with _TRANSLATED, self._store.hold():
                self._put_blocks(mapping, mapping, first, last, offset, data)
        now = _now()
        self._times[ino] = (now, now)
        return True

    def _put_blocks(self, mapping: dict[int, int], old: dict[int, int], first: int, last: int,
                    offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write `data` at byte `offset` into blocks [first, last], all mapped in `mapping`;
        partial blocks at either end are merged with their contents under `old` (the mapping
        before any fresh allocation: fresh blocks read as zeros)."""
        head = offset - first * BLOCK_SIZE
        end = offset + len(data)
        if head == 0 and end % BLOCK_SIZE == 0:
            contents: bytes | bytearray | memoryview = data  # whole blocks: no read needed
        else:
            edges = self._read_blocks({index: phys for index, phys in old.items() if index in (first, last)},
                                      first, last)
            buffer = bytearray((last - first + 1) * BLOCK_SIZE)
            buffer[:BLOCK_SIZE] = edges[:BLOCK_SIZE]
            buffer[-BLOCK_SIZE:] = edges[-BLOCK_SIZE:]
            buffer[head:head + len(data)] = data
            contents = buffer
        view = memoryview(contents)
        for index, phys, count in _mapped_runs(mapping.get, first, last):
            start = (index - first) * BLOCK_SIZE
            self._store.write(self._data_first + phys, view[start:start + count * BLOCK_SIZE])

    def _write_mapped(self, ino: int, mapping: dict[int, int], offset: int, data: memoryview) -> int:
        """Within a transaction: write `data` (not empty) at `offset` of `ino`, whose blocks in
        that range are in `mapping` when they exist; the others are allocated, written and
        mapped here. Returns how many blocks it mapped: the caller adds them to the inode's
        `blocks` (in the statement that updates its size anyway)."""
        first = offset // BLOCK_SIZE
        last = (offset + len(data) - 1) // BLOCK_SIZE
        missing = [index for index in range(first, last + 1) if index not in mapping]
        fresh = self._allocate(len(missing))
        old = {index: phys for index, phys in mapping.items() if index in (first, last)}
        mapping.update(zip(missing, fresh, strict=True))
        self._put_blocks(mapping, old, first, last, offset, data)
        if not missing:
            return 0
        base = ino << _KEY_BITS
        count = len(missing)
        if count > 1 and missing[-1] - missing[0] == count - 1 and fresh[-1] - fresh[0] == count - 1:
            # one run of consecutive blocks on consecutive physical blocks (a file written in
            # order): one statement generates the rows inside SQLite (16,384 rows of the seq
            # workload: 13-23 -> 7-12 ms against executemany, measured)
            self._cursor.execute("WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?3)"
                                 " INSERT INTO blocks(key, phys) SELECT ?1 + i, ?2 + i FROM n",
                                 (base + missing[0], fresh[0], count))
        else:
            self._cursor.executemany("INSERT INTO blocks(key, phys) VALUES (?, ?)",
                                     [(base + index, phys) for index, phys in zip(missing, fresh, strict=True)])
        return count

    def _write_piece(self, ino: int, offset: int, data: memoryview) -> None:
        """One bounded write, inside a transaction: allocate, write the blocks, then the map
        and the inode (a failure before COMMIT leaves the committed state unchanged)."""
        end = offset + len(data)
        first = offset // BLOCK_SIZE
        last = max(end - 1, offset) // BLOCK_SIZE
        base = ino << _KEY_BITS
        # the inode and its first block's mapping in one statement
        row = self._one(self._select_piece, (base + first, ino))
        if row is None:
            raise _error(errno.ENOENT, f"no inode {ino}")
        attr = Attr._make(row[:10])
        if attr.is_dir:
            raise _error(errno.EISDIR)
        if not attr.is_file:
            raise _error(errno.EINVAL)
        if not len(data):
            return
        now = _now()
        if offset > attr.size:
            self._clear_range(ino, attr.size, offset)
            mapping = self._map(ino, first, last)
        elif first == last:
            mapping = {} if row[10] is None else {first: int(row[10])}
        else:
            mapping = self._map(ino, first, last)
        mapped = self._write_mapped(ino, mapping, offset, data)
        if self._counts_blocks:
            self._cursor.execute("UPDATE inodes SET size = max(size, ?), mtime = ?, ctime = ?, blocks = blocks + ?"
                                 " WHERE ino = ?", (end, now, now, mapped, ino))
        else:
            self._cursor.execute("UPDATE inodes SET size = max(size, ?), mtime = ?, ctime = ? WHERE ino = ?",
                                 (end, now, now, ino))

    def fsync(self, ino: int | None = None) -> VolumeState:
        """Make every operation so far durable (one integrity commit for all files). Pending
        inode times ride in the commit's metadata when they fit (no SQLite transaction; the next
        open reads them back), else they are written to SQLite first."""
        if self._closed:
            raise _error(errno.EBADF, "filesystem is closed")
        if self._times and self._store.writable:
            encoded = _encode_times(self._times)
            if len(encoded) <= self._vfs.extra_limit:
                self._vfs.set_extra(encoded)
            else:
                self._run(lambda: None)
        return self._store.commit()

    # -- extended attributes ---------------------------------------------------------------

    def getxattr(self, ino: int, name: bytes) -> bytes:
        def work() -> bytes:
            self._attr(ino)
            row = self._one("SELECT value FROM xattrs WHERE ino = ? AND name = ?", (ino, name))
            if row is None:
                raise _error(errno.ENODATA)
            return bytes(row[0])
        return self._run(work, changes=False)

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        if not name or len(name) > 255 or b"\0" in name:
            raise _error(errno.ERANGE if len(name) > 255 else errno.EINVAL)
        if len(value) > 65536:
            raise _error(errno.E2BIG)

        def work() -> None:
            self._attr(ino)
            exists = self._one("SELECT 1 FROM xattrs WHERE ino = ? AND name = ?", (ino, name)) is not None
            if flags & XATTR_CREATE and exists:
                raise _error(errno.EEXIST)
            if flags & XATTR_REPLACE and not exists:
                raise _error(errno.ENODATA)
            self._any_xattrs = True
            self._cursor.execute("INSERT OR REPLACE INTO xattrs(ino, name, value) VALUES (?, ?, ?)", (ino, name, value))
            self._touch(ino, mtime=False)
        self._run(work)

    def listxattr(self, ino: int) -> list[bytes]:
        def work() -> list[bytes]:
            self._attr(ino)
            return [bytes(row[0]) for row in
                    self._cursor.execute("SELECT name FROM xattrs WHERE ino = ? ORDER BY name", (ino,))]
        return self._run(work, changes=False)

    def removexattr(self, ino: int, name: bytes) -> None:
        def work() -> None:
            self._attr(ino)
            if self._one("SELECT 1 FROM xattrs WHERE ino = ? AND name = ?", (ino, name)) is None:
                raise _error(errno.ENODATA)
            self._cursor.execute("DELETE FROM xattrs WHERE ino = ? AND name = ?", (ino, name))
            self._touch(ino, mtime=False)
        self._run(work)

    # -- consistency -----------------------------------------------------------------------

    def check(self) -> list[str]:
        """Filesystem invariants: SQLite's integrity_check, link counts, dangling entries,
        orphans, stray or doubly used blocks, free-space accounting. Returns problems (empty
        when clean)."""
        problems: list[str] = []

        def work() -> None:
            db = self._db
            for (line,) in db.execute("PRAGMA integrity_check"):
                if line != "ok":
                    problems.append(f"sqlite: {line}")
            for cookie, ino in db.execute(
                    "SELECT cookie, ino FROM dirents WHERE ino NOT IN (SELECT ino FROM inodes)"):
                problems.append(f"dirent {cookie} points to missing inode {ino}")
            for cookie, parent in db.execute(
                    "SELECT d.cookie, d.parent FROM dirents d LEFT JOIN inodes i ON i.ino = d.parent"
                    " WHERE i.ino IS NULL OR (i.mode & 61440) != 16384"):
                problems.append(f"dirent {cookie} has parent {parent}, which is not a directory")
            for table in ("xattrs", "trims"):
                for (ino,) in db.execute(f"SELECT DISTINCT ino FROM {table} WHERE ino NOT IN (SELECT ino FROM inodes)"):
                    problems.append(f"{table} of missing inode {ino}")
            rows = self._all(
                "SELECT i.ino, i.mode, i.nlink,"
                " (SELECT count(*) FROM dirents d WHERE d.ino = i.ino),"
                " (SELECT count(*) FROM dirents d JOIN inodes c ON c.ino = d.ino"
                "   WHERE d.parent = i.ino AND (c.mode & 61440) = 16384),"
                " EXISTS(SELECT 1 FROM orphans o WHERE o.ino = i.ino) FROM inodes i")
            for ino, mode, nlink, names, subdirs, orphan in rows:
                if ino == ROOT_INODE:
                    expected = 2 + subdirs
                elif stat.S_ISDIR(mode):
                    expected = 2 + subdirs if names else 0
                    if names > 1:
                        problems.append(f"directory {ino} has {names} names")
                else:
                    expected = names
                if nlink != expected:
                    problems.append(f"inode {ino}: nlink {nlink}, expected {expected}")
                if names == 0 and ino != ROOT_INODE and not orphan:
                    # an orphan is open, or left by a process that died: the next writable mount reaps it
                    problems.append(f"inode {ino} has no name and is not an orphan (leaked)")
                if stat.S_ISLNK(mode) and db.execute("SELECT 1 FROM symlinks WHERE ino = ?", (ino,)).fetchone() is None:
                    problems.append(f"symlink {ino} has no target")
            for (key,) in db.execute(
                    "SELECT b.key FROM blocks b LEFT JOIN inodes i ON i.ino = (b.key >> 32)"
                    " WHERE i.ino IS NULL OR (i.mode & 61440) != 32768"
                    " OR ((b.key & 4294967295) * ? >= i.size AND i.ino NOT IN (SELECT ino FROM trims))",
                    (BLOCK_SIZE,)):  # a file listed in trims was shrunk: the next writable mount frees those
                problems.append(f"block {key >> 32}:{key & 0xFFFFFFFF} has no file or lies past its end")
            if self._counts_blocks:  # (format 2: no count to check)
                for ino, recorded, mapped_here in db.execute(
                        f"SELECT ino, blocks, {_COUNT_MAPPED.format('inodes.')} AS n FROM inodes WHERE blocks != n"):
                    problems.append(f"inode {ino}: {recorded} blocks recorded, {mapped_here} mapped")
            for phys, count in db.execute("SELECT phys, count(*) FROM blocks GROUP BY phys HAVING count(*) > 1"):
                problems.append(f"physical block {phys} is mapped {count} times")
            mapped, lowest, highest = self._all("SELECT count(*), min(phys), max(phys) FROM blocks")[0]
            if mapped and (int(lowest) < 0 or int(highest) >= self._data_blocks):
                problems.append("a mapped block lies outside the data region")
            end = 0
            free = 0
            for start, length in db.execute("SELECT start, length FROM free_extents ORDER BY start"):
                if start < end or length <= 0 or start + length > self._data_blocks:
                    problems.append(f"free extent {start}+{length} overlaps or is out of range")
                end = start + length
                free += length
            if free + int(mapped) != self._data_blocks:
                problems.append(f"space accounting: {mapped} mapped + {free} free != {self._data_blocks} blocks")
        self._run(work)
        return problems

    # -- closing ---------------------------------------------------------------------------

    def _shutdown(self) -> None:
        db = getattr(self, "_db", None)
        if db is not None:
            try:
                db.close()
            finally:
                self._vfs.unregister()
        else:
            self._vfs.unregister()

    def close(self) -> None:
        """Write pending inode times to SQLite, then stop. Open handles are forgotten (their
        orphans are reaped at the next mount). Does not close the store."""
        if self._closed:
            return
        if self._times and self._store.writable:
            # on failure the times stay in the store's metadata, read back at the next open
            with contextlib.suppress(FilesystemError, OSError):
                self._run(lambda: None)  # the times into SQLite, the store metadata cleared
        self._closed = True
        self._shutdown()

