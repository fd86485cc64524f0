"""An open encrypted volume as a wasi_host filesystem backend (`keep run --volume IMG::/data`).

Theory of operation
-------------------
`VolumeSession` owns one open `storage.volume.Volume` for the length of a run (the image lock is
held by this process the whole time) and hands out `VolumeDirectory` / `VolumeFile` objects that
implement the same `wasi_host` Directory / File protocols as `wasi_host.hostdir`: one name in one
directory per call, no paths, no-follow, failures as `OSError(errno)`. wasi_host therefore knows
nothing of volumes; path resolution, rights and `.`/`..` stay there.

Names cross the boundary as `str` with surrogate escapes (wasi_host's convention) and reach
storage.fs as bytes. Directory and file handles are inode numbers; an open file counts on its
inode (`fs.open` / `fs.release`), so a file unlinked while open keeps its data until its last
handle closes, as on a host filesystem.

Durability: `fd_sync` and `fd_datasync` (File.sync / File.datasync) are one volume commit
(`fs.fsync`: a group commit of everything so far, every file), and `VolumeSession.close` commits
once more when the guest has ended, however it ended. The commit returns the (uuid, generation,
root MAC) the owner pins.

Small writes are buffered inside the keep (the design's advantage over a FUSE mount: DESIGN.md,
"The peer to beat"): one write-back buffer per session holds a contiguous run of bytes of one
inode, up to `WRITE_BUFFER_BYTES`. Any other call on the session first writes the buffer out
(`flush`), so every handle, and every other operation, sees the bytes at once; only a pwrite
that extends the buffered run skips the storage call. The price, as with a kernel page cache: a
failure while writing the buffer out (ENOSPC, EIO) cannot be reported by the write that filled
it. As a kernel reports a write-back error to the file's own descriptor, the error is kept on
the file handle whose bytes were lost and reported, once, by that handle's next call (a write,
fstat, fsync or close); a call on another handle or a directory that happened to flush goes on
(a stat of another file does not fail with ENOSPC, and the lost file's close does not return 0).

New files are created with their first bytes: `open_file` checks the name (every error a create
could give but running out of room) and hands back a handle, and the next flush creates the
file, in one storage transaction with the buffered bytes when they are its first ones (a file
written and closed: one transaction instead of two; the files workload 0.82 -> 0.66 s). Every
call on the session but a directory handle's close flushes first (path resolution closes the
directories it walked), so no call can see the file missing; a create that fails then (ENOSPC)
is kept on that file's handle, like a buffered write's.

Integrity failures (a sector changed by the host) reach the guest as EIO through the normal
errno table, and `on_integrity_error` (the CLI prints one line on stderr) is told, so that the
operator learns why the program failed.

Thread safety: storage is not thread-safe; a session lock is held around every storage call, so
a FUSE mount or a second guest in the same process may share one session.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, TypeVar

from storage.errors import FilesystemError, IntegrityError, NoSpace
from storage.fs import BLOCK_SIZE, ROOT_INODE, Attr, Filesystem
from storage.integrity import VolumeState
from storage.volume import Volume
from wasi_host import DirEntry, FileStat, Now, TimeUpdate
from wasi_host._backend import Buffer
from wasi_host.hostdir import _filetype  # st_mode -> preview1 filetype, as for host files

#: Bytes of one inode's contiguous small writes held in memory before they go to storage.
WRITE_BUFFER_BYTES = 1 << 20
#: storage.fs's block map indexes 2^32 blocks per file (as ext4: 16 TiB with 4 KiB blocks).
MAX_FILE_END = BLOCK_SIZE << 32
#: Writes bigger than this go to storage directly (after the buffer), without a copy; smaller
#: ones start a buffer, so that sequential 64 KiB writes reach storage as 1 MiB transactions.
DIRECT_WRITE_BYTES = WRITE_BUFFER_BYTES // 2

P = ParamSpec("P")
T = TypeVar("T")
H = TypeVar("H", bound="_Handle")
IntegrityReporter = Callable[[IntegrityError], None]


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _name(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _times(atime: TimeUpdate, mtime: TimeUpdate) -> tuple[int | None, int | None]:
    now = time.time_ns()
    return (now if atime is Now.NOW else atime), (now if mtime is Now.NOW else mtime)


class _LostWrite(Exception):
    """Writing out `handle`'s buffered bytes or creating its file failed with `error` (never an
    IntegrityError): the flush keeps the error on the handle and goes on."""

    def __init__(self, handle: VolumeFile, error: OSError) -> None:
        super().__init__(handle, error)
        self.handle = handle
        self.error = error


@dataclass(slots=True)
class _Loss:
    """Bytes of an inode lost by a flush: the session's count of losses then, the error, and
    whether an fsync has reported it yet (until then a new handle reports it too, as the
    kernel's errseq_sample gives a new open an error nobody has seen)."""

    number: int
    error: OSError
    seen: bool = False


def _kept(error: OSError) -> OSError:
    """`error` as kept on a handle for its later calls: an IntegrityError becomes a plain EIO,
    since it is told to the operator (`VolumeSession.integrity_failed`) where it happened, and
    every later call raising it again must not count and tell it again (one sector changed by
    the host would be 'N integrity failures')."""
    if isinstance(error, IntegrityError):
        return OSError(errno.EIO, error.strerror or str(error))
    return error


class VolumeSession:
    """One open volume shared by the handles of a run: lock, write-back buffer, commits."""

    def __init__(self, volume: Volume, *, on_integrity_error: IntegrityReporter | None = None,
                 lock: threading.RLock | None = None) -> None:
        self.volume = volume
        self.fs: Filesystem = volume.fs
        self.lock = lock if lock is not None else threading.RLock()
        self._on_integrity_error = on_integrity_error
        self.integrity_failures = 0
        state = volume.state()
        # st_dev: stable for the volume, distinct from host devices' small numbers
        self.device = int.from_bytes(hashlib.sha256(state.uuid.encode()).digest()[:4], "big") | 1 << 32
        # the write-back buffer: the file handle, file offset of its first byte, the bytes
        self._buffer_handle: VolumeFile | None = None
        self._buffer_offset = 0
        self._buffer = bytearray()
        # a file `open_file` checked but has not created yet: (handle, directory, name); the
        # next flush creates it, in one transaction with its first bytes when the buffer holds
        # them (a new file written and closed: one transaction instead of two)
        self._pending_create: tuple[VolumeFile, int, bytes] | None = None
        # the last loss of written bytes of each inode, which the fsync of every handle of that
        # inode open before it (or opened before any fsync reported it) reports once
        self.losses: dict[int, _Loss] = {}
        self._loss_count = 0
        self._closed = False

    # -- plumbing --------------------------------------------------------------------------

    def integrity_failed(self, error: IntegrityError) -> None:
        """Count a failure and tell the reporter (it must not raise)."""
        self.integrity_failures += 1
        if self._on_integrity_error is not None:
            self._on_integrity_error(error)

    def flush(self) -> None:
        """Create the pending file, then write the buffered bytes to storage (the lock is held
        by the caller). A failure that loses a handle's bytes or new file is kept on that
        handle (`VolumeFile.lost`, reported by its next call) and the flush goes on, so that
        nothing stays pending; an IntegrityError is kept on the handle too, and raised."""
        self._writing_out(self._flush_steps)

    def _flush_steps(self) -> None:
        if self._pending_create is not None:
            self._create_pending()
        self._write_buffer()

    def _writing_out(self, step: Callable[[], None]) -> None:
        """Run `step` until it completes; each _LostWrite it raises has already dropped what
        failed (so the next try gets further) and is kept on its handle and its inode."""
        while True:
            try:
                step()
                return
            except _LostWrite as failure:
                self._lose(failure.handle, failure.error)

    def _lose(self, handle: VolumeFile, error: OSError) -> None:
        """Keep `error` on `handle`, whose buffered bytes or new file a flush lost, and on its
        inode: its next call and the next fsync of each handle of the file report it."""
        error = _kept(error)
        handle.lost = handle.lost_since_sync = error
        if handle.ino:
            self._loss_count += 1
            self.losses[handle.ino] = _Loss(self._loss_count, error)

    def _write_buffer(self) -> None:
        if not self._buffer:
            return
        handle = self._buffer_handle
        assert handle is not None
        if self._pending_create is not None and self._pending_create[0] is handle:
            self._create_pending()  # with these bytes, or before them
            if not self._buffer:
                return
        offset, data = self._buffer_offset, self._buffer
        self._buffer = bytearray()
        self._buffer_handle = None
        try:
            if self.fs.write(handle.ino, offset, data) < len(data):
                raise NoSpace()  # the guest was told all of it went in: a short write is an error
        except IntegrityError as error:
            self._lose(handle, error)  # the caller's call fails with it, and the writer learns too
            raise
        except OSError as error:
            raise _LostWrite(handle, error) from None

    def _create_pending(self) -> None:
        """Create the file `open_file` deferred, holding the buffered bytes if they are its
        first ones. If that fails (no room left), the error is kept on the handle (_LostWrite),
        which stays without an inode (its calls fail) and its buffered bytes are dropped: the
        file never existed."""
        pending = self._pending_create
        assert pending is not None
        self._pending_create = None
        handle, parent, name = pending
        data: bytes | bytearray = b""
        if (self._buffer_handle is handle and self._buffer_offset == 0
                and len(self._buffer) <= self.fs.max_create_data):
            data, self._buffer, self._buffer_handle = self._buffer, bytearray(), None
        try:
            handle.ino = self.fs.create(parent, name, 0o644, open=True, data=data).ino
        except BaseException as error:
            if self._buffer_handle is handle:
                self._buffer, self._buffer_handle = bytearray(), None
            if isinstance(error, OSError):
                handle.failed = _kept(error)  # every later call of the handle fails with it too
            if isinstance(error, IntegrityError):
                self._lose(handle, error)  # raised to the caller; the new file's handle learns too
            elif isinstance(error, OSError):
                raise _LostWrite(handle, error) from None
            raise

    def pending_file(self, handle: VolumeFile) -> bool:
        """Whether `handle`'s new file is yet to be created (at the next flush)."""
        return self._pending_create is not None and self._pending_create[0] is handle

    def buffered_end(self, ino: int) -> int:
        """Where the buffered bytes of inode `ino` end (0 when none are buffered)."""
        handle = self._buffer_handle
        if not self._buffer or handle is None or handle.ino != ino:
            return 0
        return self._buffer_offset + len(self._buffer)

    def create_later(self, handle: VolumeFile, parent: int, name: bytes) -> None:
        """Create `name` in `parent` for `handle` at the next flush (the caller checked the
        name and flushed: nothing else is pending)."""
        assert self._pending_create is None
        self._pending_create = (handle, parent, name)

    def buffered_write(self, handle: VolumeFile, offset: int, data: Buffer) -> int:
        """A pwrite through the write-back buffer (the lock is held by the caller)."""
        length = len(data)
        if not length:
            return 0  # at any offset: the kernel checks the file size only for bytes it moves
        if offset + length >= MAX_FILE_END:
            raise _error(errno.EFBIG)  # what storage.fs would say, said before buffering
        buffer = self._buffer
        if buffer and self._buffer_handle is handle and self._buffer_offset + len(buffer) == offset \
                and len(buffer) + length <= WRITE_BUFFER_BYTES:
            buffer += data
            return length
        if length > DIRECT_WRITE_BYTES:
            self.flush()
            handle.report_lost()  # its own earlier bytes, just now
            return self.fs.write(handle.ino, offset, data)
        self._writing_out(self._write_buffer)  # not `flush`: a pending create may take these bytes
        handle.report_lost()
        self._buffer_handle = handle
        self._buffer_offset = offset
        self._buffer = bytearray(data)  # a copy: `data` is a view of guest memory
        return length

    def attr_stat(self, attr: Attr) -> FileStat:
        return FileStat(self.device, attr.ino, _filetype(attr.mode), attr.nlink, attr.size,
                        attr.atime_ns, attr.mtime_ns, attr.ctime_ns)

    def root(self) -> VolumeDirectory:
        """A handle on the volume's root directory (what the guest's pre-open is)."""
        with self.lock:
            self.fs.open(ROOT_INODE)
        return VolumeDirectory(self, ROOT_INODE)

    def commit(self) -> VolumeState:
        """Buffered bytes to storage, then one integrity commit; the state to pin. Bytes that
        cannot be written out stay the loss of their own handle: the commit goes on."""
        with self.lock:
            try:
                self.flush()
                return self.volume.commit()
            except IntegrityError as error:
                self.integrity_failed(error)
                raise

    def close(self) -> VolumeState:
        """Commit and close the volume; returns the final state, the one to pin (closing
        checkpoints SQLite, one more commit). Idempotent. The volume is closed even when the
        commit fails (the failure is raised)."""
        with self.lock:
            if not self._closed:
                self._closed = True
                try:
                    self.commit()
                finally:
                    self.volume.close()
            return self.volume.state()


def _storage_call(method: Callable[Concatenate[H, P], T]) -> Callable[Concatenate[H, P], T]:
    """Run a backend method under the session lock, after `VolumeSession.flush` (the pending
    create and the write-back buffer) and after reporting what the handle lost in a flush,
    reporting integrity failures (which then reach the guest as EIO)."""
    @functools.wraps(method)
    def wrapper(self: H, /, *args: P.args, **kwargs: P.kwargs) -> T:
        session = self.session
        with session.lock:
            try:
                session.flush()
                self.report_lost()
                return method(self, *args, **kwargs)
            except IntegrityError as error:
                session.integrity_failed(error)
                raise
            except FilesystemError as error:  # as the OS's own subclass (FileNotFoundError, ...)
                raise OSError(error.errno, error.strerror) from None
    return wrapper


class _Handle:
    """What file and directory handles share: the session and the inode."""

    __slots__ = ("ino", "session")

    def __init__(self, session: VolumeSession, ino: int) -> None:
        self.session = session
        self.ino = ino

    def report_lost(self) -> None:
        """Raise what a flush lost of this handle's writes (files only; once)."""

    @_storage_call
    def stat(self) -> FileStat:
        return self.session.attr_stat(self.session.fs.getattr(self.ino))

    @_storage_call
    def set_times(self, atime: TimeUpdate, mtime: TimeUpdate) -> None:
        new_atime, new_mtime = _times(atime, mtime)
        self.session.fs.setattr(self.ino, atime_ns=new_atime, mtime_ns=new_mtime)


class VolumeFile(_Handle):
    """An open regular file of the volume (counted on its inode until `close`).

    `lost` is the error of a flush that lost this handle's buffered bytes or its new file while
    another handle's call (or a commit) was writing them out; this handle's next call reports it.
    `lost_since_sync` keeps that error until this handle's next fsync reports it too: whichever
    call learnt it first (a write, an fstat), the bytes the guest was told went in are gone, and
    a program that handled that call's ENOSPC (made room, retried) must not be told by its fsync
    that everything is stored. Likewise the fsync of any other handle of the file open at the
    time reports it once (`VolumeSession.losses`, `_loss_seen`): a kernel's errseq reports a
    write-back error to the next fsync of every open file description of the file.
    `failed` is the error that kept the handle's new file from being created: there is no file,
    so every later call but close fails with it (a write must not be told its bytes went in)."""

    __slots__ = ("_closed", "_loss_seen", "_read", "_write", "failed", "lost", "lost_since_sync")

    def __init__(self, session: VolumeSession, ino: int, *, read: bool, write: bool) -> None:
        super().__init__(session, ino)
        self._read = read
        self._write = write
        self._closed = False
        self.lost: OSError | None = None
        self.lost_since_sync: OSError | None = None
        self.failed: OSError | None = None
        loss = session.losses.get(ino)
        self._loss_seen = 0 if loss is None else loss.number if loss.seen else loss.number - 1

    def report_lost(self) -> None:
        lost, self.lost = self.lost, None
        lost = lost or self.failed
        if lost is not None:
            raise lost

    def report_lost_since_sync(self) -> None:
        """Raise what a flush lost of this handle's writes, or of the file's through any handle,
        since this handle's last fsync, even if another call reported it already (fsync only;
        once per handle)."""
        self.lost = None
        lost, self.lost_since_sync = self.lost_since_sync, None
        loss = self.session.losses.get(self.ino)
        if loss is not None and loss.number > self._loss_seen:
            self._loss_seen = loss.number
            loss.seen = True
            lost = lost or loss.error
        lost = lost or self.failed
        if lost is not None:
            raise lost

    def size(self) -> int:
        """The size with this file's buffered bytes, without writing them out: an APPEND write
        asks before every write, and a flush each time made buffering useless for appends (20000
        appends of 100 bytes: 2.5 s against 0.17 s without O_APPEND)."""
        session = self.session
        with session.lock:
            if session.pending_file(self):
                size = 0  # created at the next flush: only the buffered bytes below
            else:
                try:
                    self.report_lost()  # the creation failed: no inode to ask
                    size = session.fs.getattr(self.ino).size
                except IntegrityError as error:
                    session.integrity_failed(error)
                    raise
                except FilesystemError as error:
                    raise OSError(error.errno, error.strerror) from None
            return max(size, session.buffered_end(self.ino))

    @_storage_call
    def pread(self, size: int, offset: int) -> bytes:
        if not self._read:
            raise _error(errno.EBADF)
        return self.session.fs.read(self.ino, offset, size)

    def pwrite(self, data: Buffer, offset: int) -> int:
        if not self._write:
            raise _error(errno.EBADF)
        if offset < 0:
            raise _error(errno.EINVAL)
        session = self.session
        with session.lock:
            try:
                if self.lost is not None or self.failed is not None:  # (only when there is one)
                    self.report_lost()
                return session.buffered_write(self, offset, data)
            except IntegrityError as error:
                session.integrity_failed(error)
                raise
            except FilesystemError as error:
                raise OSError(error.errno, error.strerror) from None

    @_storage_call
    def set_size(self, size: int) -> None:
        if not self._write:
            raise _error(errno.EINVAL)  # as ftruncate on a read-only fd
        # the kernel's do_truncate sets mtime even when the size stays (storage only when it moves)
        self.session.fs.setattr(self.ino, size=size, mtime_ns=time.time_ns())

    def sync(self) -> None:
        with self.session.lock:
            self.session.commit()
            self.report_lost_since_sync()  # committed what could be; this file's loss is its fsync's error

    def datasync(self) -> None:
        self.sync()

    def close(self) -> None:
        """Release the inode, then report what a flush lost of this handle's writes (close is
        the last chance to tell the guest, as a kernel's close reports a write-back error)."""
        session = self.session
        with session.lock:
            try:
                session.flush()
                if not self._closed:
                    self._closed = True
                    if self.ino:  # else its creation failed: no inode, nothing counted
                        session.fs.release(self.ino)
                self.failed = None  # said by earlier calls; unless `lost` still holds it unsaid
                self.report_lost()
            except IntegrityError as error:
                session.integrity_failed(error)
                raise
            except FilesystemError as error:
                raise OSError(error.errno, error.strerror) from None


class VolumeDirectory(_Handle):
    """An open directory of the volume: per-name operations, as wasi_host's Directory."""

    __slots__ = ()

    def _lookup(self, name: str, *, open: bool = False) -> Attr:
        """The attributes of `name` here; with `open`, also counted as an open handle (the
        caller releases it if it refuses the inode)."""
        fs = self.session.fs
        if name == ".":
            return fs.open(self.ino) if open else fs.getattr(self.ino)
        return fs.lookup(self.ino, _name(name), open=open)

    def _same_volume(self, other: object) -> VolumeDirectory:
        if not isinstance(other, VolumeDirectory) or other.session is not self.session:
            raise _error(errno.EXDEV)
        return other

    @_storage_call
    def stat_at(self, name: str) -> FileStat:
        if name == ".":
            return self.session.attr_stat(self.session.fs.getattr(self.ino))
        # `find`: a missing name (path resolution asks before every create) raises once, here
        attr = self.session.fs.find(self.ino, _name(name))
        if attr is None:
            raise _error(errno.ENOENT)
        return self.session.attr_stat(attr)

    @_storage_call
    def open_directory(self, name: str) -> VolumeDirectory:
        # counted, as a file: a removed directory stays stat-able; storage remembers directory
        # names, so the intermediate directories of a path cost no SQL once seen
        try:
            ino = self.session.fs.open_directory(self.ino, _name(name))
        except FilesystemError as error:
            if error.errno == errno.ENOTDIR and self._lookup(name).is_symlink:
                raise _error(errno.ELOOP) from None
            raise
        return VolumeDirectory(self.session, ino)

    @_storage_call
    def open_file(self, name: str, *, create: bool, exclusive: bool, truncate: bool, read: bool,
                  write: bool) -> VolumeFile:
        fs = self.session.fs
        if create and exclusive and name not in (".", ".."):
            return self._create(name, read=read, write=write)  # EEXIST if anything has the name
        try:
            attr = self._lookup(name, open=True)
        except FilesystemError as error:
            if error.errno != errno.ENOENT or not create:
                raise
            return self._create(name, read=read, write=write)
        try:
            if create and exclusive:
                raise _error(errno.EEXIST)
            if attr.is_symlink:
                raise _error(errno.ELOOP)
            if attr.is_dir:
                raise _error(errno.EISDIR)
            if truncate:  # mtime moves even for an empty file, as the kernel's do_truncate
                fs.setattr(attr.ino, size=0, mtime_ns=time.time_ns())
        except BaseException:
            fs.release(attr.ino)
            raise
        return VolumeFile(self.session, attr.ino, read=read, write=write)

    def _create(self, name: str, *, read: bool, write: bool) -> VolumeFile:
        """A handle on a new file, which storage creates at the session's next flush (every
        other call on the session flushes first, so nothing can see it missing): checked now
        (every error but running out of room), created then with its first bytes."""
        raw = _name(name)
        self.session.fs.check_create(self.ino, raw)
        handle = VolumeFile(self.session, 0, read=read, write=write)
        self.session.create_later(handle, self.ino, raw)
        return handle

    @_storage_call
    def mkdir(self, name: str) -> None:
        self.session.fs.mkdir(self.ino, _name(name))

    @_storage_call
    def rmdir(self, name: str) -> None:
        self.session.fs.rmdir(self.ino, _name(name))

    @_storage_call
    def unlink(self, name: str) -> None:
        self.session.fs.unlink(self.ino, _name(name))

    @_storage_call
    def symlink(self, target: str, name: str) -> None:
        if not target:
            raise _error(errno.ENOENT)  # as symlink(2) with an empty target
        self.session.fs.symlink(self.ino, _name(name), _name(target))

    @_storage_call
    def readlink(self, name: str) -> str:
        attr = self._lookup(name)
        return self.session.fs.readlink(attr.ino).decode("utf-8", "surrogateescape")

    @_storage_call
    def link(self, name: str, target_dir: object, target_name: str) -> None:
        target = self._same_volume(target_dir)
        attr = self._lookup(name)
        self.session.fs.link(attr.ino, target.ino, _name(target_name))

    @_storage_call
    def rename(self, name: str, target_dir: object, target_name: str) -> None:
        target = self._same_volume(target_dir)
        if name == "." or target_name == ".":
            raise _error(errno.EBUSY)
        self.session.fs.rename(self.ino, _name(name), target.ino, _name(target_name))

    @_storage_call
    def set_times_at(self, name: str, atime: TimeUpdate, mtime: TimeUpdate) -> None:
        attr = self._lookup(name)
        new_atime, new_mtime = _times(atime, mtime)
        self.session.fs.setattr(attr.ino, atime_ns=new_atime, mtime_ns=new_mtime)

    def readdir(self, cookie: int) -> Iterator[DirEntry]:
        """Entries in creation order; a cookie is the storage's dirent cookie (stable across
        inserts and deletes of other entries). storage.fs counts its own "." and ".." as
        positions 1 and 2 (its positions are dirent cookies + 2); wasi_host adds those two
        itself, so they are skipped here."""
        session = self.session
        with session.lock:
            try:
                session.flush()
            except IntegrityError as error:  # the operator learns of it, as from any other call
                session.integrity_failed(error)
                raise
        entries = session.fs.readdir(self.ino, cookie + 2)
        while True:
            with session.lock:
                try:
                    item = next(entries, None)
                except IntegrityError as error:
                    session.integrity_failed(error)
                    raise
                except FilesystemError as error:
                    raise OSError(error.errno, error.strerror) from None
            if item is None:
                return
            name, attr, next_cookie = item
            yield DirEntry(next_cookie - 2, name.decode("utf-8", "surrogateescape"), _filetype(attr.mode), attr.ino)

    def close(self) -> None:
        """Release the inode (a directory removed while open goes away with its last handle).
        The one call that does not flush the session first: path resolution closes every
        directory it walked, and a new file's bytes are to be written with its creation (a
        file's own close flushes, so a guest's fds all closed still means every byte it wrote
        is in storage)."""
        session = self.session
        with session.lock:
            if self.ino:
                ino, self.ino = self.ino, 0
                try:
                    session.fs.release(ino)
                except IntegrityError as error:
                    session.integrity_failed(error)
                    raise
                except FilesystemError as error:
                    raise OSError(error.errno, error.strerror) from None


def directory_over(volume: Volume, *, on_integrity_error: IntegrityReporter | None = None) -> VolumeDirectory:
    """The root directory of an open volume as a wasi_host Directory, in a new session.
    Commit through `handle.session.commit()`; `handle.session.close()` commits and closes."""
    return VolumeSession(volume, on_integrity_error=on_integrity_error).root()
