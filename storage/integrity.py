"""The integrity layer: a Merkle tree over the sectors' ciphertext, with crash-safe commits.

Theory of operation
-------------------
The layer sits on the LUKS2 data segment (a run of 4 KiB sectors encrypted with aes-xts-plain64)
and offers its clients (the filesystem) a smaller array of *data sectors* with three promises:

* a read returns exactly what was last written and committed (or written since), or raises
  `IntegrityError` (EIO): a changed, moved or replayed sector is never returned as data;
* `commit()` is atomic and durable: after a crash the volume comes back exactly as it was at
  some `commit()` (the last one that returned, or a later one whose record reached the disk);
* each commit has a generation number and a root MAC; opening with a pinned
  `expected_generation` refuses an older image (`RollbackError`).

Layout of the data segment (sector numbers relative to the segment start, all XTS-encrypted):

    0, 1                superblocks A and B (the newer valid one wins)
    2 .. 2+L            redo log (L sectors)
    2+L .. 2+L+P        leaf pages: the SHA-256 of every data sector's ciphertext, 128 per page
    2+L+P .. end        data sectors (D of them; P = ceil(D / 128))

Tree: level 0 is the array of leaf hashes, stored in the leaf pages; each higher level is the
SHA-256 of each node of the level below, up to a single root hash; a node is 512 bytes (16
hashes; a level's last node, when short, is hashed zero-padded to 512 bytes). Only level 0 is
stored: the whole tree is rebuilt in memory at open (34 bytes of RAM per 4 KiB of volume, 0.8 %:
a documented limit) and checked against the MAC'd root. The root MAC is
``HMAC-SHA256(K, "keepshim/state/v2" | uuid | generation | layout | SHA-256(client metadata) | root)``
with ``K = HKDF-SHA256(volume key, salt=uuid, info="keepshim/integrity/v1")``.

Why 512-byte nodes: a small commit rehashes one node per level, and without SHA extensions
SHA-256 runs at about 380 MB/s here, so each 4 KiB node cost 11 us; with 16-ary nodes a
path costs about a fifth of the 128-ary one for the same volume (5 levels of 512 bytes
against 3 of 4 KiB). Integrity format 1 (volumes made before: 4 KiB nodes, 128-ary, superblock
magic KSHIMSB1, "keepshim/state/v1") is still opened, read and written as it is; the
superblock's magic says which format a volume has, for its whole life. Format 1's record
header MAC ("keepshim/log/v1") also covered the header's zero padding, up to the MAC: 4 KiB to
hash for a small commit's few hundred bytes of header, another 10 us per commit. Format 2
instead requires the padding to read as zeros: a change to it turns its 16-byte XTS block into
noise, so the record is still refused as torn (with odds of 2^-128 against).

Free sectors: a leaf of 32 zero bytes (no SHA-256 output, in practice) marks a data sector with
no committed content; it reads as zeros, whatever its ciphertext. A fresh volume is all free.

Commit protocol (one durable write per commit): dirty sectors live in memory until a commit
encrypts them for their home sector, hashes the ciphertext, updates the tree, and appends ONE log
record (header with the generation, the previous root MAC, the (sector, leaf hash) list and a MAC
over all of that, ``HMAC-SHA256(K, "keepshim/log/v2" | header up to its last entry)``; then the sectors' ciphertext verbatim) with a single write and fdatasync,
or, for a commit of a few logged sectors, one direct write (`BlockDevice.write_durable`): that
is the durability point. A sector that is free in the last commit has nothing to protect, so its
ciphertext goes straight home instead of into the log (half the bytes written for new data): its
entry is flagged "home" and carries only the hash. Until the record is valid the leaf still says
free, so a torn commit leaves garbage only where nothing was; the last record's home sectors must
match their hashes or the record counts as torn (earlier records were synced before the next
one was written, so their home sectors are durable; a later checkpoint may have overwritten
them with newer logged contents, which is why only the last record's are checked). Leaf pages are not logged: they change on disk only at checkpoints, so
the pages as of the superblock (or newer, or torn by an interrupted checkpoint: XTS keeps each
16-byte block independent, so a torn page mixes old and new hashes only where entries changed
them) plus every logged entry since give the exact leaves. A checkpoint (log 3/4 full, many
sectors pending, close) copies the logged sectors and leaf pages home, syncs, writes the alternate superblock (generation,
root MAC, log start) and syncs. Recovery: the newest valid superblock, then every valid record
after its log start in order (MAC, generation and previous-MAC chain checked; stop at the first
invalid one, which is a torn, never-acknowledged write), then the rebuilt tree must match the
last root MAC. A full recovery is therefore never worse than "the last acknowledged commit".

Cache pressure does not commit when it need not: once 16 MiB of dirty sectors pile up, the ones
free in the last commit are encrypted and written home (no record, no sync) and only the hash
of their ciphertext is kept (`_flushed`, checked by every read of them); the next commit's record
lists them as home entries, and its sync makes them durable with it. A crash before that commit
finds their leaves still free: garbage where nothing was, as after a torn commit. A long
sequential write then costs one durability point, at the client's fsync, not one per 16 MiB.

`PlainStore` implements the same interface with no integrity (``integrity="none"``): the data
segment holds one metadata sector and then the data sectors; commits are not atomic.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import hmac
import mmap
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from storage._small_commit import NativeSmallCommit
from storage.blockdev import BlockDevice
from storage.errors import (
    IntegrityError,
    NoSpace,
    RollbackError,
    SelfTestFailed,
    StorageError,
    UnsupportedFormat,
)
from storage.xts import NativeEncryption

SECTOR_SIZE = 4096
HASH_SIZE = 32
HASHES_PER_PAGE = SECTOR_SIZE // HASH_SIZE  # 128 leaves per stored leaf page
METADATA_LIMIT = 1024  # bytes of client metadata carried by every commit


@dataclass(frozen=True)
class _IntegrityFormat:
    """An integrity format (see the module docstring): tree node size and MAC rules; the
    superblock's magic says which a volume has."""

    version: int
    magic: bytes
    node_size: int
    state_label: bytes
    log_label: bytes  # a record header's MAC: this label, then ...
    mac_body_only: bool  # ... the header up to its last entry (else up to the MAC: padding too)


_INTEGRITY_FORMATS = {
    1: _IntegrityFormat(1, b"KSHIMSB1", 4096, b"keepshim/state/v1", b"keepshim/log/v1", False),
    2: _IntegrityFormat(2, b"KSHIMSB2", 512, b"keepshim/state/v2", b"keepshim/log/v2", True)}
_FORMAT_BY_MAGIC = {format_.magic: format_ for format_ in _INTEGRITY_FORMATS.values()}
_SUPERBLOCK_FAMILY = b"KSHIMSB"
INTEGRITY_FORMAT = 2  # what new volumes get
_RECORD_MAGIC = b"KSHIMLR1"
_PLAIN_MAGIC = b"KSHIMPL1"
_UUID_FIELD = 40
# superblock: magic, uuid, generation, sectors, log, pages, data, log_start, metadata length,
# tree root, root MAC; then the metadata; then the superblock MAC over all of that.
_SUPERBLOCK = struct.Struct(f"<8s{_UUID_FIELD}sQQQQQQH32s32s")
# record header: magic, uuid, generation, previous root MAC, entry count, home entry count, header
# sectors, metadata length, tree root, root MAC; then metadata, entries, padding, header MAC.
# An entry's sector number has _HOME_FLAG set when its ciphertext went home, not into the log.
_RECORD = struct.Struct(f"<8s{_UUID_FIELD}sQ32sIIIH32s32s")
_ENTRY = struct.Struct("<Q32s")
_SECTOR_NUMBER = struct.Struct("<Q")  # an entry's first field (small commits pack the digests natively)
_RECORD_ROOT_AT = struct.calcsize(f"<8s{_UUID_FIELD}sQ32sIIIH")  # then the root MAC, right after it
_PLAIN = struct.Struct(f"<8s{_UUID_FIELD}sQH")
_HOME_FLAG = 1 << 63
_ZERO_SECTOR = bytes(SECTOR_SIZE)
_ZEROS = memoryview(_ZERO_SECTOR)  # read-only: slices of it copy nothing
_FREE_LEAF = bytes(HASH_SIZE)  # the leaf of a sector without committed content
_CHUNK_SECTORS = 256  # a commit encrypts, hashes and writes home 1 MiB at a time
_AHEAD_SECTORS = 256  # a sequential `read_into` reads, verifies and decrypts 1 MiB ahead at once
_SMALL_RECORD_SECTORS = 4  # commits of at most this many logged sectors take `_append_small_record`
_GENERATION = struct.Struct("<Q")

INTEGRITY_MODES = ("merkle", "none")


class SectorCipherLike(Protocol):
    """What this layer needs from storage.xts.SectorCipher (sector numbers are relative to the
    data segment start)."""

    def encrypt_run(self, first_sector: int, data: bytes) -> bytes: ...

    def decrypt_run(self, first_sector: int, data: bytes | memoryview) -> bytes: ...

    def encrypt_into(self, first_sector: int, data: bytes | bytearray | memoryview,
                     out: bytearray | memoryview) -> None: ...

    def decrypt_into(self, first_sector: int, data: bytes | bytearray | memoryview,
                     out: bytearray | memoryview) -> None: ...

    def encrypt_hash_into(self, first_sector: int, data: bytes | bytearray | memoryview,
                          out: bytearray | memoryview, digests: bytearray | memoryview) -> None: ...

    def verify_decrypt_into(self, first_sector: int, data: bytearray | memoryview,
                            expected: bytes | bytearray | memoryview) -> list[int]: ...

    def native_encryption(self) -> NativeEncryption | None: ...


@dataclass(frozen=True)
class VolumeState:
    """What a commit returns and what an owner pins: a volume newer than `generation` with this
    `uuid` is accepted, an older one refused. `root_mac` is empty without integrity."""

    uuid: str
    generation: int
    root_mac: bytes


@dataclass(frozen=True)
class MerkleLayout:
    """Where each region of the data segment starts and how long it is, in sectors."""

    total: int
    log_sectors: int
    page_sectors: int
    data_sectors: int

    @property
    def log_start(self) -> int:
        return 2

    @property
    def page_start(self) -> int:
        return 2 + self.log_sectors

    @property
    def data_start(self) -> int:
        return 2 + self.log_sectors + self.page_sectors

    def packed(self) -> bytes:
        return struct.pack("<QQQQ", self.total, self.log_sectors, self.page_sectors, self.data_sectors)

    @classmethod
    def for_sectors(cls, total: int) -> MerkleLayout:
        """The layout for a data segment of `total` sectors: a log of 1/16 of the volume (between
        1 MiB and 32 MiB, at most a quarter of a tiny segment), then as many data sectors as the
        leaf pages can cover."""
        log = min(max(total // 16, 256), 8192, max(total // 4, 16))
        rest = total - 2 - log
        if rest < 4:
            raise StorageError(f"a {total * SECTOR_SIZE}-byte data segment is too small for integrity")
        data = rest * HASHES_PER_PAGE // (HASHES_PER_PAGE + 1)
        pages = -(-data // HASHES_PER_PAGE)
        while pages + data > rest:
            data -= 1
            pages = -(-data // HASHES_PER_PAGE)
        return cls(total, log, pages, data)


def integrity_key(volume_key: bytes, uuid: str) -> bytes:
    """The integrity subkey: HKDF-SHA256 of the volume key, salted with the LUKS uuid."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=uuid.encode(),
                info=b"keepshim/integrity/v1").derive(volume_key)


class DataSegment:
    """The LUKS2 data segment as an array of encrypted sectors: raw ciphertext I/O plus the
    cipher, with sector numbers relative to the segment start."""

    def __init__(self, device: BlockDevice, offset: int, size: int, cipher: SectorCipherLike) -> None:
        if offset % SECTOR_SIZE or size % SECTOR_SIZE or size <= 0:
            raise StorageError(f"data segment [{offset}, +{size}) is not made of 4 KiB sectors")
        if offset + size > device.size:
            raise StorageError("data segment runs past the end of the device")
        self.device = device
        self.offset = offset
        self.sectors = size // SECTOR_SIZE
        self.cipher = cipher

    def read_raw(self, first: int, count: int) -> bytes:
        return self.device.read(self.offset + first * SECTOR_SIZE, count * SECTOR_SIZE)

    def write_raw(self, first: int, data: bytes | bytearray | memoryview) -> None:
        self.device.write(self.offset + first * SECTOR_SIZE, data)

    def write_raw_scattered(self, pieces: list[tuple[int, bytes | memoryview]]) -> None:
        """`write_raw` of each (first sector, data) piece, as one `BlockDevice.write_scattered`."""
        self.device.write_scattered([(self.offset + first * SECTOR_SIZE, data) for first, data in pieces])

    def readinto_raw(self, first: int, buffer: bytearray | memoryview) -> None:
        self.device.readinto(self.offset + first * SECTOR_SIZE, buffer)

    def read_plain(self, first: int, count: int) -> bytes:
        return self.cipher.decrypt_run(first, self.read_raw(first, count))

    def write_plain(self, first: int, data: bytes) -> None:
        self.write_raw(first, self.cipher.encrypt_run(first, data))

    def sync(self) -> None:
        self.device.sync()

    def write_durable(self, first: int, data: bytes | bytearray | memoryview) -> None:
        """Write raw sectors and make them (and every earlier write) durable in one step."""
        self.device.write_durable(self.offset + first * SECTOR_SIZE, data)

    def prepare_durable(self, first: int, count: int) -> None:
        """Sectors that `write_durable` will rewrite often (the redo log): see BlockDevice."""
        self.device.prepare_durable(self.offset + first * SECTOR_SIZE, count * SECTOR_SIZE)


def _runs(sectors: Iterable[int]) -> list[tuple[int, int]]:
    """Group sorted sector numbers into (first, count) runs of consecutive sectors."""
    runs: list[tuple[int, int]] = []
    start = end = -1
    for sector in sectors:
        if sector != end:
            if end > start:
                runs.append((start, end - start))
            start = sector
        end = sector + 1
    if end > start:
        runs.append((start, end - start))
    return runs


def _chunks(runs: list[tuple[int, int]], limit: int) -> Iterator[tuple[int, int]]:
    """The runs cut into pieces of at most `limit` sectors."""
    for first, count in runs:
        for start in range(first, first + count, limit):
            yield start, min(limit, first + count - start)


def _groups(runs: Iterable[tuple[int, int]], size: int) -> set[int]:
    """The indices of the `size`-sector groups (sector // size) that the (first, count) runs
    of sectors touch."""
    groups: set[int] = set()
    for first, count in runs:
        groups.update(range(first // size, (first + count - 1) // size + 1))
    return groups


@functools.cache
def _digests_struct(count: int) -> struct.Struct:
    """`count` concatenated 32-byte hashes (cached: an immutable parser per run length)."""
    return struct.Struct("<" + f"{HASH_SIZE}s" * count)


def _split_digests(digests: bytes, count: int) -> tuple[bytes, ...]:
    """The `count` 32-byte hashes of `digests`, split in one C call."""
    return _digests_struct(count).unpack(digests)


_MADV_POPULATE_WRITE = 23  # <linux/mman.h>, Linux 5.14; the mmap module has no name for it


def _anonymous_memory(size: int, *, populate: bool) -> memoryview:
    """`size` zero bytes of writable, page-aligned memory, transparent huge pages where the
    kernel offers them (MADV_HUGEPAGE). With `populate`, every page is mapped at once: the
    staging arena and the commit scratch buffer are tens of MiB, and touching fresh pages one
    fault at a time costs about 2-3 ms per MiB on these VMs (MADV_POPULATE_WRITE maps the whole
    area in one call: 16 MiB in 3.3 ms against 11 ms for MAP_POPULATE's 4 KiB pages, measured;
    MAP_POPULATE where the kernel lacks it, before Linux 5.14). Without, pages are mapped as
    they are first touched (MerkleStore's log image: never more than the log is used)."""
    anonymous = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20)
    try:
        area = mmap.mmap(-1, size, flags=anonymous)
        huge = getattr(mmap, "MADV_HUGEPAGE", None)
        if huge is not None:
            with contextlib.suppress(OSError):  # else 4 KiB pages
                area.madvise(huge)
        if populate:
            try:
                area.madvise(_MADV_POPULATE_WRITE)
            except OSError:
                area.close()
                area = mmap.mmap(-1, size, flags=anonymous | getattr(mmap, "MAP_POPULATE", 0))
        return memoryview(area)
    except OSError:  # no anonymous mapping here: ordinary memory
        return memoryview(bytearray(size))


def _uuid_field(uuid: str) -> bytes:
    raw = uuid.encode()
    if len(raw) > _UUID_FIELD:
        raise StorageError("uuid too long")
    return raw.ljust(_UUID_FIELD, b"\0")


class _Prefetch:
    """A read-ahead being filled on the prefetch thread (`_CachedStore._start_prefetch`)."""

    __slots__ = ("buffer", "count", "first", "future", "stale")

    def __init__(self, first: int, count: int, buffer: memoryview, future: Future[int]) -> None:
        self.first = first
        self.count = count
        self.buffer = buffer
        self.future = future
        self.stale = False  # a write to its sectors since it started: its contents may be old

    def wait(self) -> int:
        """The number of good sectors once it has finished; 0 if it failed in any way (a
        synchronous read then says how)."""
        try:
            return self.future.result()
        except Exception:  # reported by the synchronous read that follows
            return 0


class _Hold:
    """`_CachedStore.hold()`: a class, not a generator context manager (a few microseconds
    less per filesystem transaction, three per file created and deleted)."""

    __slots__ = ("_store",)

    def __init__(self, store: _CachedStore) -> None:
        self._store = store

    def __enter__(self) -> None:
        self._store._holds += 1

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._store._release_hold()


class _CachedStore:
    """Dirty/clean sector caches shared by both store kinds; subclasses say how sectors reach
    the disk and how they are checked on the way back."""

    def __init__(self, uuid: str, sector_count: int, writable: bool, cache_limit: int) -> None:
        self.uuid = uuid
        self.sector_count = sector_count
        self.writable = writable
        # dirty sectors: slices of the warm staging arena (or bytes once it is full)
        self._dirty: dict[int, bytes | memoryview] = {}
        self._arena: memoryview | None = None
        self._arena_sectors = cache_limit
        self._arena_used = 0
        self._clean: OrderedDict[int, bytes] = OrderedDict()  # FIFO: popitem(last=False) is O(1)
        self._clean_limit = 2048
        self._dirty_limit = cache_limit
        self._metadata = b""
        self._committed_metadata = b""
        self._closed = False
        self._holds = 0
        # read-ahead (`_stream_into`): plaintext of sectors [first, first + count), checked
        # and current: emptied by any write to them; `_ahead_next` is the sector after the
        # last streaming read (a read starting there is sequential)
        self._ahead: memoryview | None = None
        self._ahead_first = 0
        self._ahead_count = 0
        self._ahead_next = -1
        # the next read-ahead, being read, checked and decrypted on the prefetch thread into
        # the spare buffer while the reader goes on (`_start_prefetch`); the spare buffer is
        # None while a prefetch owns it
        self._prefetch: _Prefetch | None = None
        self._spare: memoryview | None = None
        self._prefetcher: ThreadPoolExecutor | None = None
        self._commit_hooks: list[Callable[[], None]] = []

    # -- client API ------------------------------------------------------------------------

    @property
    def metadata(self) -> bytes:
        """Small client metadata (the filesystem's file sizes) carried by the next commit."""
        return self._metadata

    @metadata.setter
    def metadata(self, value: bytes) -> None:
        if len(value) > METADATA_LIMIT:
            raise ValueError(f"metadata is limited to {METADATA_LIMIT} bytes")
        self._metadata = bytes(value)

    def read(self, first: int, count: int) -> bytes:
        """`count` data sectors from `first`, checked; raises IntegrityError on any mismatch."""
        self._check_range(first, count)
        parts: list[bytes | memoryview] = []
        missing: list[int] = []
        found: dict[int, bytes | memoryview] = {}
        for sector in range(first, first + count):
            cached = self._lookup(sector)
            if cached is None:
                missing.append(sector)
            else:
                found[sector] = cached
        remember = count <= 16  # large (streaming) reads would only flush the cache
        for run_first, run_count in _runs(missing):
            plain = self._read_home(run_first, run_count)
            if run_count == count:
                return plain
            for index in range(run_count):
                piece = plain[index * SECTOR_SIZE:(index + 1) * SECTOR_SIZE]
                found[run_first + index] = piece
                if remember:
                    self._remember_clean(run_first + index, piece)
        if count == 1:
            return bytes(found[first])
        for sector in range(first, first + count):
            parts.append(found[sector])
        return b"".join(parts)

    def read_into(self, first: int, out: bytearray | memoryview) -> None:
        """`read` into a caller-owned buffer of whole sectors (no intermediate copies; what
        comes from the disk is read, verified and decrypted in place, and not cached)."""
        view = memoryview(out).cast("B")
        if len(view) % SECTOR_SIZE:
            raise ValueError("reads cover whole sectors")
        count = len(view) // SECTOR_SIZE
        self._check_range(first, count)
        start = first - self._ahead_first
        if self._ahead is not None and 0 <= start < self._ahead_count:
            # inside the read-ahead: no cache holds newer contents (see `_stream_into`)
            inside = min(count, self._ahead_count - start)
            view[:inside * SECTOR_SIZE] = self._ahead[start * SECTOR_SIZE:(start + inside) * SECTOR_SIZE]
            self._ahead_next = first + inside
            if inside == count:
                return
            # the rest lies past it: a sequential read of its own (which the prefetch may hold)
            first, view, count = first + inside, view[inside * SECTOR_SIZE:], count - inside
        sectors = range(first, first + count)
        if not any(cache.keys() & sectors for cache in self._caches()):  # O(count), in C
            self._stream_into(first, view, count)  # the streaming case: nothing cached, one run
            return
        lookup = self._lookup
        missing: list[int] = []
        for index in range(count):
            cached = lookup(first + index)
            if cached is None:
                missing.append(first + index)
            else:
                view[index * SECTOR_SIZE:(index + 1) * SECTOR_SIZE] = cached
        for run_first, run_count in _runs(missing):
            start = (run_first - first) * SECTOR_SIZE
            self._read_home_into(run_first, view[start:start + run_count * SECTOR_SIZE])

    def write(self, first: int, data: bytes | bytearray | memoryview) -> None:
        """Replace whole data sectors from `first`; durable at the next commit."""
        if not self.writable:
            raise OSError(30, "volume is open read-only")  # EROFS
        view = memoryview(data).cast("B")
        if len(view) % SECTOR_SIZE:
            raise ValueError("writes cover whole sectors")
        count = len(view) // SECTOR_SIZE
        self._check_range(first, count, writing=True)
        if first < self._ahead_first + self._ahead_count and first + count > self._ahead_first:
            self._ahead_count = 0  # the read-ahead holds old contents of these sectors
        prefetch = self._prefetch
        if prefetch is not None and first < prefetch.first + prefetch.count and first + count > prefetch.first:
            prefetch.stale = True  # so will the prefetch
        self._stage(first, view, count)
        if not self._holds and self._over_limit():
            self._pressure_commit()

    def add_commit_hook(self, hook: Callable[[], None]) -> None:
        """Call `hook` at the start of every commit (a client's write buffer flushes there, so
        that a commit still holds every write issued before it)."""
        self._commit_hooks.append(hook)

    def remove_commit_hook(self, hook: Callable[[], None]) -> None:
        """Stop calling `hook` (no error if it was not registered)."""
        if hook in self._commit_hooks:
            self._commit_hooks.remove(hook)

    def _run_commit_hooks(self) -> None:
        if self.writable:
            for hook in list(self._commit_hooks):
                hook()

    @property
    def batch_limit(self) -> int:
        """The most sectors one `hold()` block may write (so a commit always fits the log)."""
        return self._dirty_limit

    def hold(self) -> _Hold:
        """`with store.hold():` defers cache-pressure commits to the end of the block, so that
        no commit can capture half of a client operation (the client keeps each block under
        `batch_limit` sectors)."""
        return _Hold(self)

    def _release_hold(self) -> None:
        self._holds -= 1
        if not self._holds and not self._closed and self._over_limit():
            self._pressure_commit()

    # -- helpers ---------------------------------------------------------------------------

    def _check_range(self, first: int, count: int, *, writing: bool = False) -> None:
        if self._closed:
            raise ValueError("store is closed")
        if first < 0 or count < 0 or first + count > self.sector_count:
            if writing:
                raise NoSpace(f"sectors [{first}, +{count}) are past the end of the volume")
            raise IntegrityError(f"read of sectors [{first}, +{count}) past the end of the volume")

    def _copy_in(self, view: memoryview, count: int) -> memoryview:
        """`count` sectors of `view` copied once: into the staging arena while it has room (its
        memory is reused from commit to commit: fresh allocations cost a page fault per 4 KiB
        on these VMs, measured 10 us per sector), else into new bytes."""
        if self._arena_used + count > self._arena_sectors:
            return memoryview(bytes(view))
        if self._arena is None:
            self._arena = _anonymous_memory(self._arena_sectors * SECTOR_SIZE, populate=True)
        start = self._arena_used * SECTOR_SIZE
        staged = self._arena[start:start + count * SECTOR_SIZE]
        staged[:] = view
        self._arena_used += count
        return staged

    def _clear_dirty(self) -> None:
        """Forget the dirty sectors (after they reached the disk or the log) and reuse the arena."""
        self._dirty.clear()
        self._arena_used = 0

    def _stage(self, first: int, view: memoryview, count: int) -> None:
        """Copy `count` sectors of `view` into the dirty cache."""
        clean_pop = self._clean.pop
        dirty = self._dirty
        staged = self._copy_in(view, count)
        for index in range(count):
            sector = first + index
            clean_pop(sector, None)
            dirty[sector] = staged[index * SECTOR_SIZE:(index + 1) * SECTOR_SIZE]

    def _over_limit(self) -> bool:
        """Whether the dirty sectors call for a commit (PlainStore: a flush)."""
        return len(self._dirty) >= self._dirty_limit

    def _stream_into(self, first: int, view: memoryview, count: int) -> None:
        """`read_into` of sectors no cache holds and the read-ahead does not cover: a
        sequential read (starting where the last one ended; `read_into` serves the part of a
        read that lies inside the read-ahead) refills the read-ahead with `_AHEAD_SECTORS`
        from `first` in one read, check and decryption (fewer, longer native runs, which xts
        may split over two CPUs), then starts the prefetch of the run after it; any other read
        goes straight to the disk. A refill takes the prefetch when it is the run asked for
        and nothing wrote to it since it started. The read-ahead and the prefetch stop before
        the first sector whose home is not current (dirty or logged: `_unwritten`), and a write
        to a sector in them empties the one and marks the other stale, so neither ever holds a
        sector some cache holds newer contents of. A sector past the ones asked for that fails
        its check ends the refill there instead of failing this read (its own read will find
        it)."""
        if count < _AHEAD_SECTORS and first == self._ahead_next:
            if not self._take_prefetch(first, count):
                total = self._current_run(first, count)
                if self._ahead is None:
                    self._ahead = _anonymous_memory(_AHEAD_SECTORS * SECTOR_SIZE, populate=True)
                self._ahead_count = 0  # until the refill has succeeded
                self._ahead_count = self._read_home_into(first, self._ahead[:total * SECTOR_SIZE], needed=count)
                self._ahead_first = first
            assert self._ahead is not None
            view[:] = self._ahead[:count * SECTOR_SIZE]
            self._start_prefetch(self._ahead_first + self._ahead_count)
        else:
            self._read_home_into(first, view)
        self._ahead_next = first + count

    def _current_run(self, first: int, needed: int) -> int:
        """How many sectors from `first` (at most `_AHEAD_SECTORS`) a read-ahead may hold: up
        to the first one past the `needed` whose home is not current."""
        total = min(_AHEAD_SECTORS, self.sector_count - first)
        later = range(first + needed, first + total)
        for cache in self._unwritten():
            overlap = cache.keys() & later
            if overlap:
                total = min(total, min(overlap) - first)
        return total

    def _start_prefetch(self, first: int) -> None:
        """Read, check and decrypt the run from `first` into the spare buffer on the prefetch
        thread (overlapping the reader's own work: seq workload, read phase 0.14 -> 0.075 s).
        Everything the check needs is taken now, on this thread (`_background_read`)."""
        total = self._current_run(first, 0)  # 0 at the end of the volume
        if total <= 0:
            return
        buffer = self._spare if self._spare is not None else _anonymous_memory(_AHEAD_SECTORS * SECTOR_SIZE, populate=True)
        self._spare = None
        job = self._background_read(first, buffer[:total * SECTOR_SIZE])
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keepshim-read")
        self._prefetch = _Prefetch(first, total, buffer, self._prefetcher.submit(job))

    def _take_prefetch(self, first: int, needed: int) -> bool:
        """Make the prefetch the read-ahead if it starts at `first`, is not stale and checked
        at least the `needed` sectors; else drop it (after it has finished with its buffer)
        and return False: the caller reads synchronously, which reports any error itself."""
        prefetch = self._prefetch
        if prefetch is None:
            return False
        self._prefetch = None
        good = prefetch.wait()
        if prefetch.stale or prefetch.first != first or good < needed:
            self._spare = prefetch.buffer
            return False
        self._spare, self._ahead = self._ahead, prefetch.buffer
        self._ahead_first, self._ahead_count = first, good
        return True

    def _stop_prefetch(self) -> None:
        """Wait for the prefetch (it reads the device) and stop its thread: before closing."""
        if self._prefetch is not None:
            self._prefetch.wait()
            self._prefetch = None
        if self._prefetcher is not None:
            self._prefetcher.shutdown()
            self._prefetcher = None

    def _background_read(self, first: int, view: memoryview) -> Callable[[], int]:
        """A job for the prefetch thread that fills `view` with the checked plaintext of the
        sectors from `first` and returns how many are good (stopping at the first that is
        not). It may use only what cannot change under it: what it is given, the device and
        the cipher (which locks itself)."""
        raise NotImplementedError

    def _lookup(self, sector: int) -> bytes | memoryview | None:
        found = self._dirty.get(sector)
        if found is None:
            found = self._clean.get(sector)
        return found

    def _caches(self) -> tuple[Mapping[int, object], ...]:
        """Every in-memory cache `_lookup` consults (a read touching none goes to the disk)."""
        return self._dirty, self._clean

    def _unwritten(self) -> tuple[Mapping[int, object], ...]:
        """The caches of sectors whose home does not hold their contents yet."""
        return (self._dirty,)

    def _remember_clean(self, sector: int, plain: bytes) -> None:
        if len(self._clean) >= self._clean_limit:
            self._clean.popitem(last=False)
        self._clean[sector] = plain

    def _read_home(self, first: int, count: int) -> bytes:
        buffer = bytearray(count * SECTOR_SIZE)
        self._read_home_into(first, memoryview(buffer))
        return bytes(buffer)

    def _read_home_into(self, first: int, view: memoryview, needed: int | None = None) -> int:
        """Read, check and decrypt sectors from their home into `view`; returns how many
        leading sectors are good: all, or (when `needed` is given) at least `needed`, a bad
        sector past those ending the good part instead of raising IntegrityError."""
        raise NotImplementedError

    def _pressure_commit(self) -> None:
        raise NotImplementedError


class MerkleStore(_CachedStore):
    """Data sectors protected by the Merkle tree, with a redo log for atomic commits.

    Open one with `MerkleStore.open(...)` or create one with `MerkleStore.format(...)`.
    """

    def __init__(self, segment: DataSegment, key: bytes, uuid: str, layout: MerkleLayout,
                 writable: bool, integrity_format: int = INTEGRITY_FORMAT) -> None:
        super().__init__(uuid, layout.data_sectors, writable,
                         cache_limit=max(8, layout.log_sectors // 6))
        self._format = _INTEGRITY_FORMATS[integrity_format]
        self._node_size = self._format.node_size
        self._fanout = self._node_size // HASH_SIZE  # level-0 hashes under one level-1 node
        self._segment = segment
        self._key = key
        self._layout = layout
        self._uuid_field = _uuid_field(uuid)
        page_bytes = layout.page_sectors * SECTOR_SIZE
        self._leaves = bytearray(page_bytes)
        self._levels: list[bytearray] = []
        self._generation = 0
        self._root_mac = b""
        self._superblock_slot = 0
        self._superblock_generation = 0
        self._log_position = 0  # sectors into the log where the next record goes
        # committed (logged) but not yet home: sector -> its ciphertext (reads decrypt it)
        self._pending: dict[int, bytes | memoryview] = {}
        self._pages_since_checkpoint: set[int] = set()
        # Dirty sectors that will need log space (not free in the last commit): the log-bound
        # commit trigger. Free ones go home directly, so only memory bounds them; the limit keeps
        # a commit's header (40 bytes per entry) well inside the log.
        self._dirty_logged = 0
        self._memory_limit = max(self._dirty_limit, min(4096, layout.log_sectors * 20))
        self._arena_sectors = self._memory_limit + self._dirty_limit  # room for a held batch
        self._scratch = memoryview(bytearray(0))  # warm buffer for a commit's ciphertext
        self._writer: ThreadPoolExecutor | None = None  # home writes of big commits
        # the fdatasync a flush leaves running on the writer thread (`_flush_fresh`)
        self._early_sync: Future[None] | None = None
        # set when a sync failed (`_fail`): every later commit and flush is refused
        self._failure: tuple[str, BaseException] | None = None
        # Flushed sectors (`_flush_fresh`): free in the last commit, their ciphertext already
        # written home (not yet synced) by a cache-pressure flush: sector -> SHA-256 of that
        # ciphertext. Their leaves still say free until the next commit's record carries them as
        # home entries; the limit keeps that record's header within a quarter of the log.
        self._flushed: dict[int, bytes] = {}
        # the same hashes as flushed, one (first sector, concatenated hashes) per run in the
        # order of the flushes: the next commit takes its home entries from these in bulk
        # while no sector was flushed twice or written again since (`_flushed_entries`)
        self._flushed_runs: list[tuple[int, bytes]] = []
        self._flushed_limit = (layout.log_sectors // 4) * (SECTOR_SIZE // _ENTRY.size) - self._memory_limit
        # `_append_small_record` assembles its record in `_log_image`, the memory image of the
        # redo log (sector for sector; only small records are put there), at the record's own
        # log position, so that its logged sectors stay there as their `_pending` ciphertext
        # until the checkpoint: no copy and no allocation per commit (two 4 KiB copies into
        # fresh memory cost 5-15 us of a durable 4 KiB overwrite's ~300 here), and the record
        # goes to the disk from page-aligned memory. Virtual memory, mapped as it is used, never
        # more than the log (at most 32 MiB), and only for a writable store.
        self._log_image = _anonymous_memory(layout.log_sectors * SECTOR_SIZE, populate=False) if writable else memoryview(bytearray(0))
        # the state MAC's message with the native step in `_small.state`, constant parts packed
        # once here; constant parts of the state MAC
        self._state_prefix = self._format.state_label + self._uuid_field
        self._generation_at = len(self._state_prefix)  # the generation's place in the state message
        self._log_start = layout.log_start
        self._layout_packed = layout.packed()
        self._small = self._native_small_commit(segment.cipher) if writable else None
        self._record_digest = memoryview(bytearray(HASH_SIZE))
        # `commit` checkpoints past this log position or with this many logged sectors pending
        self._checkpoint_position = layout.log_sectors * 3 // 4
        self._checkpoint_pending = layout.log_sectors // 2

    def _stage(self, first: int, view: memoryview, count: int) -> None:
        clean_pop = self._clean.pop
        dirty = self._dirty
        leaves = self._leaves
        staged = self._copy_in(view, count)
        if count == 1:  # the common small write, without the set arithmetic below
            if first not in dirty and leaves[first * HASH_SIZE:(first + 1) * HASH_SIZE] != _FREE_LEAF:
                self._dirty_logged += 1  # committed content: it will be logged
            clean_pop(first, None)
            dirty[first] = staged
            return
        sectors = range(first, first + count)
        old = leaves[first * HASH_SIZE:(first + count) * HASH_SIZE]
        if old == _FREE_LEAF * count:
            logged = 0  # all free: they will go home
        elif _FREE_LEAF not in old:
            logged = count - len(dirty.keys() & set(sectors))
        else:
            logged = sum(1 for sector in sectors if sector not in dirty
                         and leaves[sector * HASH_SIZE:(sector + 1) * HASH_SIZE] != _FREE_LEAF)
        if self._clean:
            for sector in self._clean.keys() & set(sectors):
                clean_pop(sector)
        dirty.update(zip(sectors, [staged[offset:offset + SECTOR_SIZE]
                                   for offset in range(0, count * SECTOR_SIZE, SECTOR_SIZE)], strict=True))
        self._dirty_logged += logged

    def _over_limit(self) -> bool:
        return self._dirty_logged >= self._dirty_limit or len(self._dirty) >= self._memory_limit

    # -- creation and opening -----------------------------------------------------------

    @classmethod
    def format(cls, segment: DataSegment, volume_key: bytes, uuid: str, *,
               integrity_format: int = INTEGRITY_FORMAT) -> MerkleStore:
        """Lay out a fresh integrity area on `segment` and write generation 1: every data sector
        free (zero leaves; the hashes past the last data sector stay zero bytes forever). Only
        the leaf pages and one superblock are written. `integrity_format` 1 (the old 4 KiB nodes)
        is for tests of volumes made before integrity format 2."""
        layout = MerkleLayout.for_sectors(segment.sectors)
        store = cls(segment, integrity_key(volume_key, uuid), uuid, layout, writable=True,
                    integrity_format=integrity_format)
        store._rebuild_levels()
        store._generation = 1
        store._root_mac = store._state_mac(1, store._tree_root(), b"")
        batch = 256
        for first in range(0, layout.page_sectors, batch):
            count = min(batch, layout.page_sectors - first)
            segment.write_plain(layout.page_start + first,
                                bytes(store._leaves[first * SECTOR_SIZE:(first + count) * SECTOR_SIZE]))
        segment.prepare_durable(layout.log_start, layout.log_sectors)
        segment.sync()
        store._write_superblock(0, 0)
        return store

    @classmethod
    def open(cls, segment: DataSegment, volume_key: bytes, uuid: str, *, writable: bool,
             expected_generation: int | None = None) -> MerkleStore:
        """Open and recover: newest valid superblock, replay of the valid log records, tree
        rebuilt and checked against the MAC'd root; refuses a generation older than pinned."""
        key = integrity_key(volume_key, uuid)
        newest = _newest_superblock(segment, key, _uuid_field(uuid))
        if newest is not None and newest[0] not in _FORMAT_BY_MAGIC:
            found = newest[0][len(_SUPERBLOCK_FAMILY):].decode("ascii", "replace")
            raise UnsupportedFormat(
                f"the volume's integrity format ({found}) is newer than this keepshim's "
                f"({', '.join(map(str, _INTEGRITY_FORMATS))}): open it with a newer keepshim")
        layout = _recorded_layout(segment, newest) or MerkleLayout.for_sectors(segment.sectors)
        # no authentic superblock: `_recover` says so, whatever the format
        integrity_format = _FORMAT_BY_MAGIC[newest[0]].version if newest is not None else INTEGRITY_FORMAT
        store = cls(segment, key, uuid, layout, writable, integrity_format)
        store._recover()
        if expected_generation is not None and store._generation < expected_generation:
            raise RollbackError(
                f"volume is at generation {store._generation}, older than the pinned "
                f"generation {expected_generation}: refusing a rolled-back image")
        if writable:
            segment.prepare_durable(layout.log_start, layout.log_sectors)
        if writable and store._generation != store._superblock_generation:
            store._checkpoint()
        return store

    # -- public state ------------------------------------------------------------------------

    @property
    def layout(self) -> MerkleLayout:
        return self._layout

    @property
    def integrity_format(self) -> int:
        """The volume's integrity format: 2 (512-byte tree nodes), or 1 for volumes made before it."""
        return self._format.version

    def state(self) -> VolumeState:
        """The last committed (uuid, generation, root MAC)."""
        return VolumeState(self.uuid, self._generation, self._root_mac)

    def commit(self) -> VolumeState:
        """Make every write so far durable and atomic, as one new generation (one fdatasync).
        Without changes since the last commit, nothing is written."""
        if self._closed:
            raise ValueError("store is closed")
        self._run_commit_hooks()
        self._settle_early_sync()
        if not self.writable or (not self._dirty and not self._flushed
                                 and self._metadata == self._committed_metadata):
            return self.state()
        if not self._append_small_record():
            self._append_record()
        if self._log_position > self._checkpoint_position or len(self._pending) >= self._checkpoint_pending:
            self._checkpoint()  # (a bigger record that does not fit checkpoints first, in _append_record)
        return self.state()

    def close(self) -> None:
        """Commit, checkpoint (so the next open replays nothing) and stop. Idempotent; does not
        close the device, which belongs to the caller."""
        if self._closed:
            return
        self._stop_prefetch()
        try:
            if self.writable:
                self.commit()
                if self._generation != self._superblock_generation:
                    self._checkpoint()
        finally:  # closed even when that commit fails (which is raised): the image keeps its last one
            self._closed = True
            if self._small is not None:
                self._small.close()  # the HMAC context holding the integrity key
                self._small = None
            if self._writer is not None:
                self._writer.shutdown()
                self._writer = None
            self._clear_dirty()
            self._dirty_logged = 0
            self._clean.clear()
            self._pending.clear()

    def check(self) -> list[str]:
        """fsck: re-read every data sector and leaf page from the disk and compare with the
        tree. Returns problems found (empty when clean); logged sectors are checked in memory."""
        problems: list[str] = []
        layout = self._layout
        batch = 256
        for first in range(0, layout.data_sectors, batch):
            count = min(batch, layout.data_sectors - first)
            raw = self._segment.read_raw(layout.data_start + first, count)
            for index in range(count):
                sector = first + index
                if sector in self._pending:
                    continue
                leaf = self._leaves[sector * HASH_SIZE:(sector + 1) * HASH_SIZE]
                if leaf == _FREE_LEAF:
                    continue  # no committed content: any ciphertext reads as zeros
                digest = hashlib.sha256(raw[index * SECTOR_SIZE:(index + 1) * SECTOR_SIZE]).digest()
                if digest != leaf:
                    problems.append(f"data sector {sector}: ciphertext does not match the tree")
        for first in range(0, layout.page_sectors, batch):
            count = min(batch, layout.page_sectors - first)
            plain = self._segment.read_plain(layout.page_start + first, count)
            for index in range(count):
                page = first + index
                if page in self._pages_since_checkpoint:
                    continue
                if plain[index * SECTOR_SIZE:(index + 1) * SECTOR_SIZE] != \
                        self._leaves[page * SECTOR_SIZE:(page + 1) * SECTOR_SIZE]:
                    problems.append(f"leaf page {page}: does not match the tree")
        return problems

    # -- tree ------------------------------------------------------------------------------

    def _rebuild_levels(self) -> None:
        self._levels = [self._leaves]
        level = self._leaves
        size = self._node_size
        sha256 = hashlib.sha256
        native = self._segment.cipher.native_encryption()
        # a level in one native call: a 16 GiB volume's 262,144 level-1 nodes took 0.4 s of
        # Python loop at open, as much as their hashing
        hash_nodes = native.loops.hash_nodes if native is not None else None
        while True:  # one hash per node of the level below, until a single root hash
            nodes = -(-len(level) // size)
            if hash_nodes is not None:
                upper = hash_nodes(level, size)
            else:
                upper = bytearray(nodes * HASH_SIZE)
                with memoryview(level) as view:
                    for node in range(nodes):
                        chunk = view[node * size:(node + 1) * size]
                        upper[node * HASH_SIZE:(node + 1) * HASH_SIZE] = sha256(chunk).digest() \
                            if len(chunk) == size else sha256(bytes(chunk).ljust(size, b"\0")).digest()
            self._levels.append(upper)
            if nodes == 1:
                break
            level = upper

    def _tree_root(self) -> bytes:
        return bytes(self._levels[-1][:HASH_SIZE])

    def _update_levels(self, nodes: set[int]) -> None:
        """Recompute the hashes above the changed level-0 nodes (leaf // fan-out), up to the
        root."""
        dirty = nodes
        size = self._node_size
        fanout = self._fanout
        sha256 = hashlib.sha256
        for depth in range(1, len(self._levels)):
            below = self._levels[depth - 1]
            level = self._levels[depth]
            with memoryview(below) as view:  # whole nodes hashed in place, without a copy
                for node in dirty:
                    chunk = view[node * size:(node + 1) * size]
                    digest = sha256(chunk).digest() if len(chunk) == size \
                        else sha256(bytes(chunk).ljust(size, b"\0")).digest()
                    level[node * HASH_SIZE:(node + 1) * HASH_SIZE] = digest
            dirty = {node // fanout for node in dirty}

    def _state_mac(self, generation: int, root: bytes, metadata: bytes) -> bytes:
        message = (self._state_prefix + _GENERATION.pack(generation) + self._layout_packed
                   + hashlib.sha256(metadata).digest() + root)
        return hmac.digest(self._key, message, "sha256")  # one-shot: no HMAC object

    def _mac(self, label: bytes, body: bytes | memoryview) -> bytes:
        return hmac.digest(self._key, label + body, "sha256")

    # -- reads -----------------------------------------------------------------------------

    def _lookup(self, sector: int) -> bytes | memoryview | None:
        found = self._dirty.get(sector)
        if found is not None:
            return found
        logged = self._pending.get(sector)
        if logged is not None:
            return self._segment.cipher.decrypt_run(self._layout.data_start + sector, logged)
        return self._clean.get(sector)

    def _caches(self) -> tuple[Mapping[int, object], ...]:
        return self._dirty, self._pending, self._clean

    def _unwritten(self) -> tuple[Mapping[int, object], ...]:
        return self._dirty, self._pending

    def _read_home_into(self, first: int, view: memoryview, needed: int | None = None) -> int:
        """Read, then verify and decrypt in place: the cipher checks each sector's ciphertext
        against its leaf and decrypts the matching ones (one native call for the whole run when
        the native loops are built). A mismatch is an error (or, past `needed`, the end of the
        good part) unless the leaf says free: such a sector reads as zeros."""
        return self._check_home_into(first, view, self._expected(first, len(view) // SECTOR_SIZE), needed)

    def _background_read(self, first: int, view: memoryview) -> Callable[[], int]:
        expected = self._expected(first, len(view) // SECTOR_SIZE)  # the tree as of now, copied
        return functools.partial(self._check_home_into, first, view, expected, 0)

    def _expected(self, first: int, count: int) -> bytearray:
        """The hashes the sectors' ciphertext must have: their leaves (a copy), except that
        flushed sectors are checked against the hash of what the flush wrote home."""
        expected = self._leaves[first * HASH_SIZE:(first + count) * HASH_SIZE]
        flushed = self._flushed
        if flushed:
            for sector in flushed.keys() & range(first, first + count):
                expected[(sector - first) * HASH_SIZE:(sector - first + 1) * HASH_SIZE] = flushed[sector]
        return expected

    def _check_home_into(self, first: int, view: memoryview, expected: bytearray, needed: int | None) -> int:
        """`_read_home_into` against given hashes; uses nothing else of the store's state
        but the device and the cipher (so the prefetch thread may run it)."""
        count = len(view) // SECTOR_SIZE
        home = self._layout.data_start + first
        self._segment.readinto_raw(home, view)
        for index in self._segment.cipher.verify_decrypt_into(home, view, expected):
            sector = first + index
            if expected[index * HASH_SIZE:(index + 1) * HASH_SIZE] != _FREE_LEAF:
                if needed is not None and index >= needed:
                    return index
                raise IntegrityError(
                    f"integrity error: data sector {sector} was changed, moved or replayed")
            view[index * SECTOR_SIZE:(index + 1) * SECTOR_SIZE] = _ZERO_SECTOR
        return count

    # -- commit ----------------------------------------------------------------------------

    def _pressure_commit(self) -> None:
        """Too many dirty sectors: flush the fresh ones home when that is enough (no record, no
        sync: the guest's next fsync pays for one durability point, not one per 16 MiB), else
        commit."""
        if (self._dirty_logged < self._dirty_limit
                and len(self._flushed) + len(self._dirty) <= self._flushed_limit):
            self._flush_fresh()
        else:
            self.commit()

    def _home_writer(self) -> ThreadPoolExecutor:
        """The worker thread that writes big commits' and flushes' sectors home."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keepshim-home")
        return self._writer

    def _scratch_for(self, sectors: int) -> memoryview:
        """The warm ciphertext buffer, grown to hold at least `sectors`."""
        if self._scratch.nbytes < sectors * SECTOR_SIZE:
            self._scratch.release()
            self._scratch = _anonymous_memory(max(sectors, self._arena_sectors) * SECTOR_SIZE, populate=True)
        return self._scratch

    def _encrypt_dirty_run(self, first: int, view: memoryview, digests: memoryview) -> None:
        """Copy the dirty sectors from `first` (as many as `view` holds) into `view` and
        encrypt them there for their home, their ciphertext's SHA-256 into `digests` (one native
        call per run): the step every commit and flush takes for each run of sectors."""
        dirty = self._dirty
        for index in range(len(view) // SECTOR_SIZE):
            view[index * SECTOR_SIZE:(index + 1) * SECTOR_SIZE] = dirty[first + index]
        self._segment.cipher.encrypt_hash_into(self._layout.data_start + first, view, view, digests)

    def _flush_fresh(self) -> None:
        """Write the dirty sectors that are free in the last commit home, encrypted, and forget
        their plaintext, keeping only the hash of their ciphertext (`_flushed`). Nothing is
        committed: their leaves still say free, so a crash before the next commit leaves
        garbage only where nothing was (it reads as zeros), exactly as a torn commit does. The
        next commit's record lists them as home entries and its sync makes them durable
        first; until then reads check them against the flushed hash. The dirty sectors that
        need the log stay dirty (copied out of the arena, which is reused).

        The flush ends by starting an fdatasync on the writer thread, not waited for: the disk
        writes the 16 MiB back while the guest goes on (the next commit's sync then has little
        left; seq workload: its fdatasync 0.10 -> 0.03 s). Durable early or not, flushed
        sectors stay free in the committed tree until that commit; `_settle_early_sync` waits
        for it before the next flush and before every commit."""
        self._settle_early_sync()
        dirty = self._dirty
        leaves = self._leaves
        fresh = sorted(dirty) if not self._dirty_logged else sorted(
            sector for sector in dirty if leaves[sector * HASH_SIZE:(sector + 1) * HASH_SIZE] == _FREE_LEAF)
        runs = _runs(fresh)  # written in chunks below, then kept with their hashes for the commit
        data_start = self._layout.data_start
        scratch = self._scratch_for(len(fresh))
        digests = memoryview(bytearray(len(fresh) * HASH_SIZE))
        writer = self._home_writer()
        writes: list[Future[None]] = []
        used = 0
        try:
            for first, count in _chunks(runs, _CHUNK_SECTORS):
                view = scratch[used * SECTOR_SIZE:(used + count) * SECTOR_SIZE]
                self._encrypt_dirty_run(first, view, digests[used * HASH_SIZE:(used + count) * HASH_SIZE])
                used += count
                writes.append(writer.submit(self._segment.write_raw, data_start + first, view))
        finally:
            if writes:
                wait(writes)  # the scratch buffer must outlive every write
        for future in writes:
            future.result()  # the first failed home write, if any (the sectors stay dirty)
        self._early_sync = writer.submit(self._segment.sync)
        flushed = self._flushed
        hashes = digests.tobytes()
        flushed.update(zip(fresh, _split_digests(hashes, len(fresh)), strict=True))
        at = 0
        for first, count in runs:
            self._flushed_runs.append((first, hashes[at:at + count * HASH_SIZE]))
            at += count * HASH_SIZE
        logged = {sector: bytes(data) for sector, data in dirty.items() if sector not in flushed}
        self._clear_dirty()
        dirty.update(logged)

    def _settle_early_sync(self) -> None:
        """Wait for the last flush's background fdatasync. If it failed, raise EIO, now and at
        every later call: the kernel may have dropped the pages it could not write (and reports
        that only once), so no later commit may claim the flushed sectors durable. Reopening
        the volume recovers its last commit."""
        future = self._early_sync
        if future is not None:
            error = future.exception()
            self._early_sync = None
            if error is not None:
                self._fail(f"writing flushed sectors back failed ({error})", error)
        if self._failure is not None:
            what, cause = self._failure
            raise OSError(errno.EIO, f"{what}; the volume keeps its last commit: reopen it") from cause

    def _fail(self, what: str, error: BaseException) -> None:
        """Refuse every later commit and flush (`_settle_early_sync` raises EIO): a failed
        fdatasync may have cost written pages that the kernel reports lost only once, so no
        later sync can vouch for them."""
        if self._failure is None:
            self._failure = (what, error)

    def _undo_leaves(self, undo: Sequence[tuple[int, bytes | bytearray]]) -> None:
        """Put back the leaf hashes a commit that failed before its durability point had
        changed ((offset in the leaves, former bytes), in the order changed), and the tree
        above them: the in-memory tree is the last commit's again, so a later commit starts
        from it (and a checkpoint never writes hashes of a commit that did not happen)."""
        leaves = self._leaves
        nodes: set[int] = set()
        size = self._node_size
        for start, old in reversed(undo):
            leaves[start:start + len(old)] = old
            nodes.update(range(start // size, (start + len(old) - 1) // size + 1))
        self._update_levels(nodes)

    def _native_small_commit(self, cipher: SectorCipherLike) -> NativeSmallCommit | None:
        """The native step of `_append_small_record` for this key (None without the native
        loops), with the constant parts of the state MAC's message packed in."""
        encryption = cipher.native_encryption()
        if encryption is None:
            return None
        prefix = self._state_prefix
        metadata_digest_at = len(prefix) + _GENERATION.size + len(self._layout_packed)
        try:
            small = NativeSmallCommit(encryption, self._key, self._format.log_label, metadata_digest_at + 2 * HASH_SIZE,
                                      metadata_digest_at, _RECORD, _RECORD_ROOT_AT, _RECORD_ROOT_AT + HASH_SIZE,
                                      _ENTRY.size, self._layout.data_start, self._log_image, self._node_size,
                                      self._format.mac_body_only)
        except SelfTestFailed:
            return None  # this libcrypto's HMAC context is unusable: the Python steps
        small.state[:len(prefix)] = prefix
        at = len(prefix) + _GENERATION.size
        small.state[at:at + len(self._layout_packed)] = self._layout_packed
        return small

    def _append_small_record(self) -> bool:
        """`_append_record` for the common durable small write (a 4 KiB overwrite and fsync):
        at most _SMALL_RECORD_SECTORS dirty sectors, all logged (none free), header in one
        sector. Same record, same durability point, with none of the general path's
        machinery: each sector is encrypted straight into the record buffer behind the header,
        only the tree pages on the sectors' paths are rehashed, and the record goes to the disk
        with one `write_durable` (a direct write where the device allows it). With the native
        loops, the cryptography (XTS and leaf hashes, tree, both MACs, header XTS) is one call
        into `ks_small_commit` (storage._small_commit); `_small_record_in_python` does the
        same steps otherwise. Returns False, having changed nothing, when the general path
        must run."""
        dirty = self._dirty
        count = len(dirty)
        metadata = self._metadata
        entries_at = _RECORD.size + len(metadata)
        mac_at = SECTOR_SIZE - HASH_SIZE
        if (count > _SMALL_RECORD_SECTORS or self._dirty_logged != count or self._flushed
                or entries_at + count * _ENTRY.size > mac_at
                or self._log_position + 1 + count > self._layout.log_sectors):
            return False
        slot = self._log_position
        record = self._log_image[slot * SECTOR_SIZE:(slot + 1 + count) * SECTOR_SIZE]
        generation = self._generation + 1
        position = self._log_start + slot
        small = self._small
        leaves = self._leaves
        if count == 1:  # the durable 4 KiB overwrite: the same steps without the loops
            (sector, data), = dirty.items()
            sectors = [sector]
            at = sector * HASH_SIZE
            # the leaves before this commit: put back (with the tree above) if it fails before
            # its durability point, so that the tree stays the last commit's
            undo = [(at, leaves[at:at + HASH_SIZE])]
        else:
            sectors = sorted(dirty)
            undo = [(sector * HASH_SIZE, leaves[sector * HASH_SIZE:(sector + 1) * HASH_SIZE]) for sector in sectors]
        try:
            # the native step takes 1..4 sectors: a commit of metadata alone takes the Python steps
            if small is not None and count and (small.bound_levels is self._levels or small.bind(self._levels)):
                # the header without its digests, root and MACs; the plaintext behind it
                _RECORD.pack_into(record, 0, _RECORD_MAGIC, self._uuid_field, generation, self._root_mac.ljust(32, b"\0"),
                                  count, 0, 1, len(metadata), _FREE_LEAF, _FREE_LEAF)
                record[_RECORD.size:entries_at] = metadata
                if count == 1:
                    _SECTOR_NUMBER.pack_into(record, entries_at, sector)
                    entry = entries_at + _ENTRY.size
                    record[SECTOR_SIZE:2 * SECTOR_SIZE] = data
                else:
                    entry = entries_at
                    for index, sector in enumerate(sectors, 1):
                        _SECTOR_NUMBER.pack_into(record, entry, sector)
                        entry += _ENTRY.size
                        record[index * SECTOR_SIZE:(index + 1) * SECTOR_SIZE] = dirty[sector]
                record[entry:mac_at] = _ZEROS[entry:mac_at]
                # prefix and layout packed once; the metadata's hash and the root come from the C code
                _GENERATION.pack_into(small.state, self._generation_at, generation)
                small.run(sectors, slot, position, len(metadata))
                root_mac = bytes(small.root_mac)
            else:
                root_mac = self._small_record_in_python(record, sectors, generation, position, entries_at)
            self._segment.write_durable(position, record)  # the durability point
        except BaseException:
            self._undo_leaves(undo)
            raise
        self._log_position += 1 + count
        pending = self._pending
        if count == 1:
            pending[sector] = record[SECTOR_SIZE:]  # the ciphertext stays in the log image
            pages: tuple[int, ...] = (sector // HASHES_PER_PAGE,)
        else:
            for index, sector in enumerate(sectors, 1):
                pending[sector] = record[index * SECTOR_SIZE:(index + 1) * SECTOR_SIZE]
            pages = tuple({sector // HASHES_PER_PAGE for sector in sectors})
        self._committed(generation, root_mac, metadata, pages)
        return True

    def _small_record_in_python(self, record: memoryview, sectors: list[int], generation: int, position: int,
                                entries_at: int) -> bytes:
        """`_append_small_record`'s record without the native step: the same bytes, assembled
        in `record`, with the tree updated. Returns the new root MAC."""
        dirty = self._dirty
        metadata = self._metadata
        mac_at = SECTOR_SIZE - HASH_SIZE
        data_start = self._layout.data_start
        cipher = self._segment.cipher
        encrypt_hash_into = cipher.encrypt_hash_into
        pack_entry = _ENTRY.pack_into
        leaves = self._leaves
        digest_view = self._record_digest
        entry = entries_at
        for index, sector in enumerate(sectors, 1):
            piece = record[index * SECTOR_SIZE:(index + 1) * SECTOR_SIZE]
            encrypt_hash_into(data_start + sector, dirty[sector], piece, digest_view)  # one native call
            digest = digest_view.tobytes()
            leaves[sector * HASH_SIZE:(sector + 1) * HASH_SIZE] = digest
            pack_entry(record, entry, sector, digest)
            entry += _ENTRY.size
        self._update_levels({sector // self._fanout for sector in sectors})
        root = self._tree_root()
        root_mac = self._state_mac(generation, root, metadata)
        _RECORD.pack_into(record, 0, _RECORD_MAGIC, self._uuid_field, generation,
                          self._root_mac.ljust(32, b"\0"), len(sectors), 0, 1, len(metadata), root, root_mac)
        record[_RECORD.size:entries_at] = metadata
        record[entry:mac_at] = _ZERO_SECTOR[entry:mac_at]
        format_ = self._format
        record[mac_at:SECTOR_SIZE] = self._mac(format_.log_label, record[:entry if format_.mac_body_only else mac_at])
        header = record[:SECTOR_SIZE]
        cipher.encrypt_into(position, header, header)
        return root_mac

    def _append_record(self) -> None:
        """Encrypt and hash the dirty sectors, update the tree, write the sectors that were free
        straight home, and append one log record (header with the (sector, leaf hash) entries,
        then the other sectors' ciphertext), all made durable by one sync."""
        layout = self._layout
        data_start = layout.data_start
        dirty = self._dirty
        leaves = self._leaves
        pack = _ENTRY.pack
        entries: list[bytes] = []
        touched: list[tuple[int, int]] = []  # (first, count) runs of sectors whose leaves change
        logged_parts: list[memoryview] = []  # ciphertext that goes into the log, in entry order
        logged: list[tuple[int, memoryview]] = []
        home_sectors: list[int] = []
        metadata = self._metadata
        flushed = self._flushed_entries()
        flushed_count = sum(len(hashes) for _, hashes in flushed) // HASH_SIZE
        body_length = _RECORD.size + len(metadata) + (len(dirty) + flushed_count) * _ENTRY.size + HASH_SIZE
        header_sectors = -(-body_length // SECTOR_SIZE)
        record_sectors = header_sectors + self._dirty_logged
        if self._log_position + record_sectors > layout.log_sectors:
            self._checkpoint()  # before the leaves change: a checkpoint writes committed state only
        if record_sectors > layout.log_sectors:
            raise StorageError("commit larger than the redo log")  # prevented by the cache limits
        scratch = self._scratch_for(len(dirty))
        used = 0
        writes: list[Future[None]] = []
        writer = self._home_writer() if len(dirty) > _CHUNK_SECTORS else None

        tails: list[int] = []  # the last sector of each home run: kept in the clean cache

        def write_home(sector: int, part: memoryview) -> None:
            """Home writes go to the worker thread (pwrite releases the GIL), overlapping the
            encryption and hashing of the next chunk; small commits write inline."""
            tails.append(sector + len(part) // SECTOR_SIZE - 1)
            if writer is None:
                self._segment.write_raw(data_start + sector, part)
            else:
                writes.append(writer.submit(self._segment.write_raw, data_start + sector, part))
        digest_buffer = memoryview(bytearray(_CHUNK_SECTORS * HASH_SIZE))
        # the leaves as they were, put back (with the tree above) if the commit fails before its
        # durability point: the in-memory tree must stay the last commit's
        undo: list[tuple[int, bytes | bytearray]] = []
        try:
            try:
                for first, count in _chunks(_runs(sorted(dirty)), _CHUNK_SECTORS):
                    view = scratch[used:used + count * SECTOR_SIZE]
                    used += count * SECTOR_SIZE
                    self._encrypt_dirty_run(first, view, digest_buffer[:count * HASH_SIZE])
                    digests = digest_buffer[:count * HASH_SIZE].tobytes()
                    old_leaves = leaves[first * HASH_SIZE:(first + count) * HASH_SIZE]
                    uniform = old_leaves == _FREE_LEAF * count or _FREE_LEAF not in old_leaves
                    if uniform:  # the whole run goes home, or all of it into the log: no per-sector tests
                        home = old_leaves[:HASH_SIZE] == _FREE_LEAF
                        undo.append((first * HASH_SIZE, old_leaves))
                        leaves[first * HASH_SIZE:(first + count) * HASH_SIZE] = digests
                        flag = _HOME_FLAG if home else 0
                        entries.extend(map(pack, range(first | flag, (first + count) | flag),
                                           _split_digests(digests, count)))
                        if home:
                            home_sectors.extend(range(first, first + count))
                            write_home(first, view)
                        else:
                            logged.extend([(first + index, view[index * SECTOR_SIZE:(index + 1) * SECTOR_SIZE])
                                           for index in range(count)])
                            logged_parts.append(view)
                        touched.append((first, count))
                        continue
                    run_start = 0
                    run_home = False
                    for index, digest in enumerate(_split_digests(digests, count)):
                        sector = first + index
                        piece = view[index * SECTOR_SIZE:(index + 1) * SECTOR_SIZE]
                        leaf = slice(sector * HASH_SIZE, (sector + 1) * HASH_SIZE)
                        old = leaves[leaf]
                        home = old == _FREE_LEAF
                        undo.append((leaf.start, old))
                        leaves[leaf] = digest
                        if home:
                            entries.append(pack(sector | _HOME_FLAG, digest))
                            home_sectors.append(sector)
                        else:
                            entries.append(pack(sector, digest))
                            logged.append((sector, piece))
                        if index and home != run_home:
                            part = view[run_start * SECTOR_SIZE:index * SECTOR_SIZE]
                            if run_home:
                                write_home(first + run_start, part)
                            else:
                                logged_parts.append(part)
                            run_start = index
                        run_home = home
                    part = view[run_start * SECTOR_SIZE:count * SECTOR_SIZE]
                    if run_home:
                        write_home(first + run_start, part)
                    else:
                        logged_parts.append(part)
                    touched.append((first, count))
                for first, digests in flushed:  # already home (synced below with the record)
                    count = len(digests) // HASH_SIZE
                    undo.append((first * HASH_SIZE, leaves[first * HASH_SIZE:(first + count) * HASH_SIZE]))
                    leaves[first * HASH_SIZE:(first + count) * HASH_SIZE] = digests
                    entries.extend(map(pack, range(first | _HOME_FLAG, (first + count) | _HOME_FLAG),
                                       _split_digests(digests, count)))
                    home_sectors.extend(range(first, first + count))
                    touched.append((first, count))
                self._update_levels(_groups(touched, self._fanout))
                if len(logged) != self._dirty_logged:
                    raise AssertionError("dirty sector accounting is off")  # _stage counts them
                generation = self._generation + 1
                root = self._tree_root()
                root_mac = self._state_mac(generation, root, metadata)
                head = _RECORD.pack(_RECORD_MAGIC, self._uuid_field, generation, self._root_mac.ljust(32, b"\0"),
                                    len(entries), len(home_sectors), header_sectors, len(metadata), root, root_mac)
                body = head + metadata + b"".join(entries)
                padded = body.ljust(header_sectors * SECTOR_SIZE - HASH_SIZE, b"\0")
                # every header byte the parser reads is authenticated (format 1: the padding too)
                header = padded + self._mac(self._format.log_label, body if self._format.mac_body_only else padded)
                position = layout.log_start + self._log_position
                record = b"".join([self._segment.cipher.encrypt_run(position, header), *logged_parts])
                self._segment.write_raw(position, record)
            finally:
                if writes:
                    wait(writes)  # the scratch buffer must outlive every write
            for future in writes:
                future.result()  # the first failed home write, if any
            try:
                self._segment.sync()  # the durability point
            except OSError as error:
                self._fail(f"a commit's fdatasync failed ({error})", error)
                raise
        except BaseException:
            self._undo_leaves(undo)
            raise
        self._log_position += record_sectors
        pending = self._pending
        for sector, piece in logged:
            pending[sector] = bytes(piece)
        if pending:
            for sector in home_sectors:
                pending.pop(sector, None)
        for sector in tails:  # appends (the SQLite WAL) read-modify-write a run's last sector next
            self._remember_clean(sector, bytes(dirty[sector]))
        self._flushed.clear()
        self._flushed_runs.clear()
        self._committed(generation, root_mac, metadata, _groups(touched, HASHES_PER_PAGE))

    def _flushed_entries(self) -> list[tuple[int, bytes]]:
        """The flushed sectors a commit lists as home entries, as (first sector, their
        hashes) runs in ascending order: all of them but those written again since (dirty:
        their new contents go home instead). The runs the flushes kept serve as they are
        unless a sector was flushed twice or is dirty (then they are rebuilt from `_flushed`,
        which holds each sector's last hash)."""
        flushed = self._flushed
        runs = self._flushed_runs
        dirty = self._dirty
        if sum(len(hashes) for _, hashes in runs) == len(flushed) * HASH_SIZE \
                and not any(sector in flushed for sector in dirty):
            return sorted(runs)
        return [(first, b"".join([flushed[sector] for sector in range(first, first + count)]))
                for first, count in _runs(sorted(flushed.keys() - dirty.keys()))]

    def _committed(self, generation: int, root_mac: bytes, metadata: bytes, pages: Iterable[int]) -> None:
        """The in-memory side of a commit whose record is durable: the dirty sectors are gone
        (logged or home), the leaf pages they changed await the next checkpoint, and the new
        generation is the current state."""
        self._clear_dirty()
        self._dirty_logged = 0
        self._pages_since_checkpoint.update(pages)
        self._generation = generation
        self._root_mac = root_mac
        self._committed_metadata = metadata

    def _checkpoint(self) -> None:
        """Copy logged sectors and changed leaf pages home, then the alternate superblock.
        The logged sectors go out as one scattered write (a run of consecutive sectors as one
        piece): after random overwrites, about a thousand single sectors."""
        layout = self._layout
        pending = self._pending
        self._segment.write_raw_scattered([
            (layout.data_start + first, pending[first] if count == 1
             else b"".join([pending[sector] for sector in range(first, first + count)]))
            for first, count in _runs(sorted(pending))])
        for first, count in _runs(sorted(self._pages_since_checkpoint)):
            self._segment.write_plain(layout.page_start + first,
                                      bytes(self._leaves[first * SECTOR_SIZE:(first + count) * SECTOR_SIZE]))
        self._segment.sync()
        # nothing in memory changes before the new superblock is durable: if writing it fails,
        # the old one still holds (its log start and the records after it are untouched)
        slot = self._superblock_slot ^ 1
        self._write_superblock(slot, 0)
        self._superblock_slot = slot
        self._pending.clear()
        self._pages_since_checkpoint.clear()
        self._log_position = 0

    def _write_superblock(self, slot: int, log_position: int) -> None:
        """Write the superblock for the last commit into `slot`, with the log starting at
        `log_position`, durably."""
        layout = self._layout
        metadata = self._committed_metadata
        body = _SUPERBLOCK.pack(self._format.magic, self._uuid_field, self._generation, layout.total,
                                layout.log_sectors, layout.page_sectors, layout.data_sectors,
                                log_position, len(metadata), self._tree_root(),
                                self._root_mac) + metadata
        body = body.ljust(SECTOR_SIZE - HASH_SIZE, b"\0")
        sector = body + self._mac(b"keepshim/superblock/v1", body)  # the whole sector is authenticated
        self._segment.write_durable(slot, self._segment.cipher.encrypt_run(slot, sector))
        self._superblock_generation = self._generation

    # -- recovery --------------------------------------------------------------------------

    def _parse_superblock(self, slot: int) -> tuple[int, int, bytes, bytes, bytes] | None:
        """(generation, log start, tree root, root MAC, metadata) of a valid superblock."""
        sector = self._segment.read_plain(slot, 1)
        fields = _authentic_superblock(sector, self._key, self._uuid_field)
        if fields is None:
            return None
        (magic, _, generation, total, log, pages, data, log_start, meta_length, root, root_mac) = fields
        end = _SUPERBLOCK.size + meta_length
        layout = self._layout
        if magic != self._format.magic:
            return None  # a volume's integrity format never changes
        if (total, log, pages, data) != (
                layout.total, layout.log_sectors, layout.page_sectors, layout.data_sectors):
            return None
        if log_start > layout.log_sectors:
            return None
        return generation, log_start, root, root_mac, sector[_SUPERBLOCK.size:end]

    def _recover(self) -> None:
        layout = self._layout
        candidates = [(slot, self._parse_superblock(slot)) for slot in (0, 1)]
        valid = [(parsed[0], slot, parsed) for slot, parsed in candidates if parsed is not None]
        if not valid:
            raise IntegrityError("integrity error: no valid superblock (wrong key or damaged image)")
        generation, slot, (_, log_start, root, root_mac, metadata) = max(valid)
        self._superblock_slot = slot
        self._superblock_generation = generation
        batch = 256
        for first in range(0, layout.page_sectors, batch):
            count = min(batch, layout.page_sectors - first)
            self._leaves[first * SECTOR_SIZE:(first + count) * SECTOR_SIZE] = \
                self._segment.read_plain(layout.page_start + first, count)
        position, previous_mac = log_start, root_mac
        records: list[_Record] = []
        while True:
            record = self._parse_record(position, generation + 1, previous_mac)
            if record is None:
                break
            records.append(record)
            position, previous_mac, generation = record.end, record.root_mac, generation + 1
        # Only the last record can be torn at home: each earlier one was synced before the next
        # was written (and its home sectors may since hold newer, checkpointed contents).
        if records and not self._home_sectors_match(records[-1]):
            records.pop()
        generation = self._superblock_generation + len(records)
        position = records[-1].end if records else log_start
        if records:
            root, root_mac, metadata = records[-1].root, records[-1].root_mac, records[-1].metadata
        for record in records:
            self._apply_record(record)
        self._rebuild_levels()
        if self._tree_root() != root or not hmac.compare_digest(
                self._state_mac(generation, root, metadata), root_mac):
            raise IntegrityError(
                f"integrity error: the Merkle tree does not match the root MAC of generation {generation}")
        self._generation = generation
        self._root_mac = root_mac
        self._metadata = self._committed_metadata = metadata
        self._log_position = position

    def _parse_record(self, position: int, generation: int, previous_mac: bytes) -> _Record | None:
        """The record at `position` if it is valid (MAC, generation and previous-MAC chain, its
        logged ciphertext matching its hashes), or None at the end of the log."""
        layout = self._layout
        if position >= layout.log_sectors:
            return None
        start = layout.log_start + position
        first = self._segment.read_plain(start, 1)
        try:
            fields = _RECORD.unpack_from(first)
        except struct.error:
            return None
        (magic, uuid, record_generation, previous, data_count, home_count, header_sectors,
         meta_length, root, root_mac) = fields
        if (magic != _RECORD_MAGIC or uuid != self._uuid_field or record_generation != generation
                or previous != previous_mac.ljust(32, b"\0") or meta_length > METADATA_LIMIT
                or home_count > data_count):
            return None
        logged_count = data_count - home_count
        total = header_sectors + logged_count
        body_length = _RECORD.size + meta_length + data_count * _ENTRY.size
        if header_sectors != -(-(body_length + HASH_SIZE) // SECTOR_SIZE) or position + total > layout.log_sectors:
            return None
        header = first if header_sectors == 1 else self._segment.read_plain(start, header_sectors)
        if self._format.mac_body_only:  # the MAC covers the body; the padding must be zeros
            authenticated = header[:body_length]
            padding = len(header) - HASH_SIZE - body_length
            if header.count(0, body_length, body_length + padding) != padding:
                return None  # changed: XTS turned the changed 16-byte block into noise
        else:
            authenticated = header[:-HASH_SIZE]
        if not hmac.compare_digest(header[-HASH_SIZE:], self._mac(self._format.log_label, authenticated)):
            return None
        body = header[:body_length]
        metadata = body[_RECORD.size:_RECORD.size + meta_length]
        entries = [_ENTRY.unpack_from(body, _RECORD.size + meta_length + i * _ENTRY.size)
                   for i in range(data_count)]
        home = [(sector & ~_HOME_FLAG, digest) for sector, digest in entries if sector & _HOME_FLAG]
        logged = [(sector, digest) for sector, digest in entries if not sector & _HOME_FLAG]
        if len(home) != home_count or any(sector >= layout.data_sectors for sector, _ in home + logged):
            return None
        raw = self._segment.read_raw(start + header_sectors, logged_count)
        view = memoryview(raw)
        ciphertexts: dict[int, bytes] = {}
        for index, (sector, digest) in enumerate(logged):
            cipher = view[index * SECTOR_SIZE:(index + 1) * SECTOR_SIZE]
            if hashlib.sha256(cipher).digest() != digest:
                return None  # torn record: never acknowledged
            ciphertexts[sector] = bytes(cipher)
        return _Record(position + total, root, root_mac, bytes(metadata), ciphertexts, dict(home))

    def _home_sectors_match(self, record: _Record) -> bool:
        """Whether every sector the record wrote home holds the ciphertext it logged the hash of."""
        data_start = self._layout.data_start
        for first, count in _runs(sorted(record.home)):
            raw = memoryview(self._segment.read_raw(data_start + first, count))
            for index in range(count):
                if hashlib.sha256(raw[index * SECTOR_SIZE:(index + 1) * SECTOR_SIZE]).digest() \
                        != record.home[first + index]:
                    return False
        return True

    def _apply_record(self, record: _Record) -> None:
        """Re-apply a valid record's entries to the leaves (and its logged sectors to pending).

        The leaf pages on disk are as of the superblock, or newer (a checkpoint that did not
        finish), possibly torn; either way re-applying every entry since the superblock gives
        the exact leaves, because pages only change at checkpoints and each change is logged."""
        leaves = self._leaves
        for sector, digest in record.home.items():
            leaves[sector * HASH_SIZE:(sector + 1) * HASH_SIZE] = digest
            self._pages_since_checkpoint.add(sector // HASHES_PER_PAGE)
            self._pending.pop(sector, None)
            self._clean.pop(sector, None)
        for sector, cipher in record.logged.items():
            leaves[sector * HASH_SIZE:(sector + 1) * HASH_SIZE] = hashlib.sha256(cipher).digest()
            self._pages_since_checkpoint.add(sector // HASHES_PER_PAGE)
            self._pending[sector] = cipher
            self._clean.pop(sector, None)


def _authentic_superblock(sector: bytes, key: bytes, uuid_field: bytes) -> tuple[Any, ...] | None:
    """The fields of a superblock sector (plaintext) whose MAC verifies under `key` and which
    belongs to this volume, else None. Nothing in it is used before the MAC is checked."""
    try:
        fields = _SUPERBLOCK.unpack_from(sector)
    except struct.error:
        return None
    magic, uuid, meta_length = fields[0], fields[1], fields[8]
    # any format's superblock (KSHIMSB1, 2, ... later ones too, for a clear "newer format")
    if not magic.startswith(_SUPERBLOCK_FAMILY) or uuid != uuid_field or meta_length > METADATA_LIMIT:
        return None
    mac = hmac.digest(key, b"keepshim/superblock/v1" + sector[:-HASH_SIZE], "sha256")
    if not hmac.compare_digest(sector[-HASH_SIZE:], mac):
        return None
    return fields


def _newest_superblock(segment: DataSegment, key: bytes, uuid_field: bytes) -> tuple[Any, ...] | None:
    """The fields of the authentic superblock with the highest generation, or None."""
    if segment.sectors < 2:  # too small for any layout: `for_sectors` says so, not a short read
        return None
    found = [fields for fields in (_authentic_superblock(segment.read_plain(slot, 1), key, uuid_field)
                                   for slot in (0, 1)) if fields is not None]
    return max(found, key=lambda fields: fields[2]) if found else None


def _recorded_layout(segment: DataSegment, newest: tuple[Any, ...] | None) -> MerkleLayout | None:
    """The layout the newest authentic superblock records, when the segment has grown past it
    (the data segment is "dynamic": an image copied onto a bigger device, or extended, has a
    longer one) and it is the layout `MerkleLayout.for_sectors` gives its size; else None, and
    the segment's own size decides. The layout is MAC'd (superblock and root MAC), so the host
    cannot choose it; the sectors past it are never touched."""
    if newest is None:
        return None
    total, log, pages, data = newest[3:7]
    if not 0 < total < segment.sectors:
        return None
    try:
        layout = MerkleLayout.for_sectors(total)
    except StorageError:
        return None
    if (layout.log_sectors, layout.page_sectors, layout.data_sectors) != (log, pages, data):
        return None
    return layout


@dataclass(frozen=True)
class _Record:
    """A valid log record, parsed: where the next one starts, the state it commits, the logged
    sectors' ciphertext and the hashes of the sectors it wrote home."""

    end: int
    root: bytes
    root_mac: bytes
    metadata: bytes
    logged: dict[int, bytes]
    home: dict[int, bytes]


class PlainStore(_CachedStore):
    """`integrity="none"`: the plain LUKS2 data area. Sector 0 of the segment holds the client
    metadata and a generation counter; data sectors follow. Nothing is authenticated and a crash
    between writes can leave a mix of old and new sectors (as with dm-crypt alone)."""

    def __init__(self, segment: DataSegment, uuid: str, writable: bool) -> None:
        super().__init__(uuid, segment.sectors - 1, writable, cache_limit=4096)
        self._segment = segment
        self._uuid_field = _uuid_field(uuid)
        self._generation = 0

    @classmethod
    def format(cls, segment: DataSegment, uuid: str) -> PlainStore:
        store = cls(segment, uuid, writable=True)
        store._generation = 1
        store._write_header()
        segment.sync()
        return store

    @classmethod
    def open(cls, segment: DataSegment, uuid: str, *, writable: bool,
             expected_generation: int | None = None) -> PlainStore:
        store = cls(segment, uuid, writable)
        header = segment.read_plain(0, 1)
        magic, uuid_field, generation, meta_length = _PLAIN.unpack_from(header)
        if magic != _PLAIN_MAGIC or uuid_field != store._uuid_field or meta_length > METADATA_LIMIT:
            raise StorageError("the data area holds no keepshim filesystem (or the key is wrong)")
        store._generation = generation
        store._metadata = store._committed_metadata = header[_PLAIN.size:_PLAIN.size + meta_length]
        if expected_generation is not None and generation < expected_generation:
            raise RollbackError(f"volume is at generation {generation}, older than the pinned "
                                f"generation {expected_generation}")
        return store

    def state(self) -> VolumeState:
        return VolumeState(self.uuid, self._generation, b"")

    def _write_header(self) -> None:
        header = _PLAIN.pack(_PLAIN_MAGIC, self._uuid_field, self._generation, len(self._metadata))
        self._segment.write_plain(0, (header + self._metadata).ljust(SECTOR_SIZE, b"\0"))

    def _flush(self) -> None:
        for first, count in _runs(sorted(self._dirty)):
            plain = b"".join(self._dirty[s] for s in range(first, first + count))
            self._segment.write_plain(1 + first, plain)
            for index in range(count):
                self._remember_clean(first + index, plain[index * SECTOR_SIZE:(index + 1) * SECTOR_SIZE])
        self._clear_dirty()

    def _pressure_commit(self) -> None:
        self._flush()

    def commit(self) -> VolumeState:
        if self._closed:
            raise ValueError("store is closed")
        self._run_commit_hooks()
        if not self.writable or (not self._dirty and self._metadata == self._committed_metadata):
            return self.state()
        self._flush()
        self._generation += 1
        self._committed_metadata = self._metadata
        self._write_header()
        self._segment.sync()
        return self.state()

    def close(self) -> None:
        if self._closed:
            return
        self._stop_prefetch()
        if self.writable:
            self.commit()
        self._closed = True

    def check(self) -> list[str]:
        return []

    def _read_home_into(self, first: int, view: memoryview, needed: int | None = None) -> int:
        self._segment.readinto_raw(1 + first, view)
        self._segment.cipher.decrypt_into(1 + first, view, view)
        return len(view) // SECTOR_SIZE

    def _background_read(self, first: int, view: memoryview) -> Callable[[], int]:
        return functools.partial(self._read_home_into, first, view)


ProtectedStore = MerkleStore | PlainStore
