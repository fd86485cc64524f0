"""`keep volume mount` / `umount`: an encrypted volume as a FUSE filesystem, for operators.

Theory of operation
-------------------
`FuseOperations` is a `pyfuse3.Operations` subclass over the inode-level `storage.fs.Filesystem`
(whose API was shaped after pyfuse3's, so most handlers are one call). It runs on trio through
`pyfuse3.main()`. Storage errors are `OSError`s carrying an errno; `_storage_errors` is the one
place that turns them into `FUSEError(errno)` (an `IntegrityError` is EIO and logged, as is a
failure of the host under the image; any other exception is a bug: logged with its traceback
and answered with EIO, so the mount stays up).

Storage is synchronous and is called inline, on the trio thread, without a worker thread.
Why: the volume is one non-thread-safe instance, so FUSE requests could only ever run one at a
time anyway. Inline calls cost nothing extra, whereas a `trio.to_thread.run_sync` hop costs tens
to hundreds of microseconds per request (measured on this machine under load: 340 us per hop,
more than a whole lookup in storage at about 160 us) plus a lock. Because no handler awaits while
it uses the storage, every request is atomic with respect to the others and to the commit timer,
with no lock. The price: the loop does not read the next request while one runs, which changes
nothing when requests are serialised anyway, and a signal is handled when the current request
ends. A caller that shares the volume with another thread (a guest) passes `lock`, held around
every storage call.

Large requests: libfuse 3 offers the kernel 1 MiB writes (max_write, with max_pages), so `dd
bs=1M` arrives as 1 MiB writes; reads are raised from 128 KiB to 1 MiB through the mount's
read-ahead setting (`_raise_read_ahead`).

Durability: the volume is committed (one integrity commit, the group commit of `fs.fsync`) on
fsync/fsyncdir, every `commit_interval` seconds when something changed, and at unmount, where the
final (uuid, generation, root MAC) is printed. A SIGKILLed mount loses at most the changes since
the last commit and leaves a consistent volume (the storage commit protocol is crash-safe); the
kernel keeps a dead mount point ("Transport endpoint is not connected") that `fusermount3 -u`
clears, and `mount` names that command when it meets one. SIGINT, SIGTERM and SIGHUP unmount
and commit from the moment the kernel has mounted; repeating one does not interrupt that commit
(`serve`, `_StopSignals`).

`umount` finds the mount in mountinfo only, never through the mount point (a stopped or hung
mount process would hang it there), and learns how the unmount ended from the mount process
itself: before mounting, the process listens on an abstract unix socket named after its mount
point and image (`report_address`: no file on the host, gone with the process); `umount`
connects before it unmounts (the kernel queues the connection even while the process is
stopped), and after the final commit and close the process sends each waiting `umount` one line,
"ok" or "failed MESSAGE" (its own error line: paths, errno, generation; nothing secret). Before
this, `umount` only waited for the image's lock and said "unmounted" also when that commit had
failed and the last changes were lost. A process killed before it reports closes the socket,
which `umount` sees at once; one stopped or hung is waited for `_UMOUNT_WAIT` seconds.

File handles are their own ids (`FileHandle`), distinct from inode numbers, for files and
directories alike: each open handle counts on the inode (`fs.open`/`fs.release`), so a file
unlinked (or a directory removed) while open keeps its inode until its last handle goes.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any, NewType, Self

import pyfuse3
import trio
from pyfuse3 import EntryAttributes, FileInfo, FUSEError, RequestContext, SetattrFields, StatvfsData

from shim.errors import KeepError, point_at_devnull, say
from shim.keys import KeySource, read_key
from shim.signals import STOP_SIGNALS, receive_stop_signals, stop_signals
from storage.errors import FilesystemError, IntegrityError, NoSpace
from storage.fs import Attr, Filesystem
from storage.integrity import VolumeState
from storage.volume import Volume, open_volume

FileHandle = NewType("FileHandle", int)
Inode = NewType("Inode", int)

DEFAULT_COMMIT_INTERVAL = 5.0
# The kernel caches attributes and names this long. Only this process changes the volume (the
# image lock), and every change goes through the kernel, which updates its cache itself.
ATTR_TIMEOUT = 1.0
_BLOCK_SIZE = 4096
READ_AHEAD_KIB = 1024  # the largest FUSE request (libfuse 3 max_write / kernel max_pages: 1 MiB)
_UMOUNT_WAIT = 30.0  # seconds `umount` waits for the mount process to commit and let go
_REPORT_CONNECT_WAIT = 5.0  # seconds `umount` waits to be queued on the mount process's socket
_REPORT_LIMIT = 64 << 10  # the longest report `umount` reads (one line)

log = logging.getLogger("keepshim.fuse")

# what Linux's xattr code lets a local filesystem store (system.* is its own: ACLs)
_XATTR_NAMESPACES = frozenset({b"user.", b"trusted.", b"security."})


@contextlib.contextmanager
def _storage_errors(operation: str) -> Iterator[None]:
    """The one translation of storage failures to FUSE replies."""
    try:
        yield
    except FUSEError:
        raise
    except IntegrityError as error:
        log.error("integrity failure during %s: %s (answered EIO)", operation, error)
        raise FUSEError(errno.EIO) from None
    except (FilesystemError, NoSpace) as error:  # the filesystem's answers: ENOENT, ENOSPC...
        raise FUSEError(error.errno or errno.EIO) from None
    except OSError as error:  # the host's (its disk failed, the image was cut short...)
        code = error.errno or errno.EIO
        log.error("host failure during %s: %s (answered %s)", operation, error,
                  errno.errorcode.get(code, code))
        raise FUSEError(code) from None
    except Exception:
        log.exception("internal error during %s (answered EIO)", operation)
        raise FUSEError(errno.EIO) from None


def _entry(attr: Attr) -> EntryAttributes:
    entry = EntryAttributes()
    entry.st_ino = attr.ino
    entry.generation = 0  # inode numbers are never reused (AUTOINCREMENT)
    entry.entry_timeout = ATTR_TIMEOUT
    entry.attr_timeout = ATTR_TIMEOUT
    entry.st_mode = attr.mode
    entry.st_nlink = attr.nlink
    entry.st_uid = attr.uid
    entry.st_gid = attr.gid
    entry.st_rdev = 0
    entry.st_size = attr.size
    entry.st_blksize = _BLOCK_SIZE
    entry.st_blocks = attr.blocks
    entry.st_atime_ns = attr.atime_ns
    entry.st_mtime_ns = attr.mtime_ns
    entry.st_ctime_ns = attr.ctime_ns
    return entry


def _killed_privileges(attr: Attr, ctx: RequestContext) -> int | None:
    """The mode a regular file keeps when a caller without CAP_FSETID (FUSE tells us the uid
    only: any but root) truncates it, or None if it is unchanged: Linux's
    setattr_should_drop_suidgid drops S_ISUID always, and S_ISGID if group execute is set or
    the caller is not in the file's group (of which we know the primary group only)."""
    mode = attr.mode
    if ctx.uid == 0 or not stat.S_ISREG(mode):
        return None
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or ctx.gid != attr.gid):
        mode &= ~stat.S_ISGID
    mode &= ~stat.S_ISUID
    return mode if mode != attr.mode else None


class FuseOperations(pyfuse3.Operations):
    """FUSE requests over one open volume (see the module notes for threading)."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, volume: Volume, *, lock: contextlib.AbstractContextManager[object] | None = None) -> None:
        super().__init__()
        self._volume = volume
        self._fs: Filesystem = volume.fs
        self._lock: contextlib.AbstractContextManager[object] = lock or contextlib.nullcontext()
        self._handles: dict[FileHandle, Inode] = {}
        self._next_handle = 1
        self._dirty = False
        self._changed = trio.Event()  # set by the first change after a commit

    # -- plumbing --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _call(self, operation: str, *, changes: bool = False) -> Iterator[Filesystem]:
        with _storage_errors(operation), self._lock:
            if changes:
                self._dirty = True
                self._changed.set()
            yield self._fs

    def _inode(self, handle: FileHandle) -> Inode:
        try:
            return self._handles[handle]
        except KeyError:
            raise FUSEError(errno.EBADF) from None

    def _own(self, attr: Attr, ctx: RequestContext, fs: Filesystem, parent: int) -> Attr:
        """New inodes belong to the caller (storage creates them owned by 0:0), with the
        parent's group instead when the parent is set-group-ID, where a new directory also
        inherits the bit (as Linux filesystems do: FUSE leaves both to us; the kernel has
        already stripped S_ISGID from a file's mode where the caller may not keep it)."""
        gid = ctx.gid
        mode = attr.mode
        directory = fs.getattr(parent)
        if directory.mode & stat.S_ISGID:
            gid = directory.gid
            if attr.is_dir:
                mode |= stat.S_ISGID
        if (ctx.uid, gid, mode) != (attr.uid, attr.gid, attr.mode):
            return fs.setattr(attr.ino, uid=ctx.uid, gid=gid,
                              mode=mode if mode != attr.mode else None)
        return attr

    def _open_handle(self, ino: int, fs: Filesystem) -> FileHandle:
        fs.open(ino)
        handle = FileHandle(self._next_handle)
        self._next_handle += 1
        self._handles[handle] = Inode(ino)
        return handle

    @property
    def dirty(self) -> bool:
        return self._dirty

    @property
    def generation(self) -> int:
        """The generation of the last commit (the timer's, an fsync's, ...)."""
        with self._lock:
            return self._volume.state().generation

    async def wait_for_change(self) -> None:
        """Return once something changed since the last commit (at once if it has)."""
        await self._changed.wait()

    def commit(self) -> VolumeState:
        """Make everything so far durable; the (uuid, generation, root MAC) to pin."""
        with self._lock:
            state = self._volume.commit() if self._volume.writable else self._volume.state()
            self._dirty = False
            if self._changed.is_set():
                self._changed = trio.Event()
            return state

    # -- attributes and names --------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: RequestContext) -> EntryAttributes:
        with self._call("lookup") as fs:
            try:
                return _entry(fs.lookup(parent_inode, name))
            except OSError as error:
                if error.errno != errno.ENOENT:
                    raise
                # A negative entry the kernel may cache (a create through it replaces it):
                # tools probe many names that do not exist, each one a request otherwise.
                missing = EntryAttributes()
                missing.st_ino = 0
                missing.entry_timeout = ATTR_TIMEOUT
                return missing

    async def getattr(self, inode: int, ctx: RequestContext) -> EntryAttributes:
        with self._call("getattr") as fs:
            return _entry(fs.getattr(inode))

    async def setattr(self, inode: int, attr: EntryAttributes, fields: SetattrFields,
                      fh: int | None, ctx: RequestContext) -> EntryAttributes:
        with self._call("setattr", changes=True) as fs:
            result = fs.setattr(
                inode,
                mode=attr.st_mode if fields.update_mode else None,
                size=attr.st_size if fields.update_size else None,
                uid=attr.st_uid if fields.update_uid else None,
                gid=attr.st_gid if fields.update_gid else None,
                atime_ns=attr.st_atime_ns if fields.update_atime else None,
                mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            )
            return _entry(result)

    async def readlink(self, inode: int, ctx: RequestContext) -> bytes:
        with self._call("readlink") as fs:
            return fs.readlink(inode)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: RequestContext) -> EntryAttributes:
        if not stat.S_ISREG(mode):
            raise FUSEError(errno.EPERM)  # no device nodes, FIFOs or sockets on the volume
        with self._call("mknod", changes=True) as fs:
            return _entry(self._own(fs.create(parent_inode, name, mode), ctx, fs, parent_inode))

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: RequestContext) -> EntryAttributes:
        with self._call("mkdir", changes=True) as fs:
            return _entry(self._own(fs.mkdir(parent_inode, name, mode), ctx, fs, parent_inode))

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: RequestContext) -> EntryAttributes:
        with self._call("symlink", changes=True) as fs:
            return _entry(self._own(fs.symlink(parent_inode, name, target), ctx, fs, parent_inode))

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: RequestContext) -> EntryAttributes:
        with self._call("link", changes=True) as fs:
            return _entry(fs.link(inode, new_parent_inode, new_name))

    async def unlink(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        with self._call("unlink", changes=True) as fs:
            fs.unlink(parent_inode, name)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        with self._call("rmdir", changes=True) as fs:
            fs.rmdir(parent_inode, name)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: RequestContext) -> None:
        with self._call("rename", changes=True) as fs:
            fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    # -- files -----------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: RequestContext) -> FileInfo:
        """A handle on `inode`; with O_TRUNC, the file is emptied first. libfuse 3 negotiates
        atomic O_TRUNC, so the kernel sends no setattr(size=0) of its own: it has checked
        write permission and the read-only mount and leaves the truncation to us (as Linux,
        also for O_RDONLY | O_TRUNC); a read-only volume still refuses it in storage (EROFS).
        Truncating marks mtime too, as POSIX asks, and drops set-user-ID and set-group-ID as
        the kernel would have (`_killed_privileges`): its setattr is skipped with atomic O_TRUNC."""
        truncate = bool(flags & os.O_TRUNC)
        with self._call("open", changes=truncate) as fs:
            if truncate:
                killed = None if ctx.uid == 0 else _killed_privileges(fs.getattr(inode), ctx)
                fs.setattr(inode, size=0, mtime_ns=time.time_ns(), mode=killed)
            return FileInfo(fh=self._open_handle(inode, fs))

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: RequestContext) -> tuple[FileInfo, EntryAttributes]:
        with self._call("create", changes=True) as fs:
            attr = self._own(fs.create(parent_inode, name, mode), ctx, fs, parent_inode)
            return FileInfo(fh=self._open_handle(attr.ino, fs)), _entry(attr)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        with self._call("read") as fs:
            return fs.read(self._inode(FileHandle(fh)), off, size)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        with self._call("write", changes=True) as fs:
            return fs.write(self._inode(FileHandle(fh)), off, buf)

    async def flush(self, fh: int) -> None:
        self._inode(FileHandle(fh))  # data is in the filesystem already; fsync makes it durable

    async def release(self, fh: int) -> None:
        with self._call("release") as fs:
            ino = self._handles.pop(FileHandle(fh), None)
            if ino is not None:
                fs.release(ino)

    async def fsync(self, fh: int, datasync: bool) -> None:
        self._inode(FileHandle(fh))
        with _storage_errors("fsync"):
            self.commit()

    # -- directories -----------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: RequestContext) -> int:
        """A handle counted on the directory, as for files: removed while open, it keeps
        answering getattr (nlink 0) until its last releasedir, as on a local filesystem."""
        with self._call("opendir") as fs:
            if not fs.getattr(inode).is_dir:
                raise FUSEError(errno.ENOTDIR)
            return self._open_handle(inode, fs)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        with self._call("readdir") as fs:
            for name, attr, cookie in fs.readdir(self._inode(FileHandle(fh)), start_id):
                if not pyfuse3.readdir_reply(token, name, _entry(attr), cookie):
                    break

    async def releasedir(self, fh: int) -> None:
        await self.release(fh)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        with _storage_errors("fsyncdir"):
            self.commit()

    async def statfs(self, ctx: RequestContext) -> StatvfsData:
        with self._call("statfs") as fs:
            usage = fs.statfs()
        data = StatvfsData()
        data.f_bsize = usage.block_size
        data.f_frsize = usage.block_size
        data.f_blocks = usage.blocks
        data.f_bfree = usage.blocks_free
        data.f_bavail = usage.blocks_free
        data.f_files = usage.files
        data.f_ffree = usage.files_free
        data.f_favail = usage.files_free
        data.f_namemax = usage.name_max
        return data

    # -- extended attributes ---------------------------------------------------------------

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: RequestContext) -> None:
        """Names in the namespaces Linux filesystems keep (`_XATTR_NAMESPACES`); system.* is
        refused: POSIX ACLs and other kernel-interpreted names, stored as plain bytes, would
        claim an ACL that nothing enforces (and `cp -a` would then skip its chmod). For FUSE
        the kernel passes any name on, so, as its own xattr code does for other filesystems,
        another prefix is EOPNOTSUPP and a namespace with nothing after it EINVAL: stored,
        'foo.x' or 'user.' could not be copied to any other filesystem."""
        namespace, dot, rest = name.partition(b".")
        if not dot or namespace + dot not in _XATTR_NAMESPACES:
            raise FUSEError(errno.EOPNOTSUPP)
        if not rest:
            raise FUSEError(errno.EINVAL)
        with self._call("setxattr", changes=True) as fs:
            fs.setxattr(inode, name, value)

    async def getxattr(self, inode: int, name: bytes, ctx: RequestContext) -> bytes:
        with self._call("getxattr") as fs:
            return fs.getxattr(inode, name)

    async def listxattr(self, inode: int, ctx: RequestContext) -> Sequence[bytes]:
        """All names, but trusted.* only for root: the kernel refuses those values to
        unprivileged callers but passes listxattr on unfiltered, and local filesystems hide
        the names too (FUSE tells us the caller's uid, not its capabilities)."""
        with self._call("listxattr") as fs:
            names = fs.listxattr(inode)
        if ctx.uid == 0:
            return names
        return [name for name in names if not name.startswith(b"trusted.")]

    async def removexattr(self, inode: int, name: bytes, ctx: RequestContext) -> None:
        with self._call("removexattr", changes=True) as fs:
            fs.removexattr(inode, name)

    def release_all(self) -> None:
        """At unmount: the kernel may not have sent every release; drop the open counts."""
        with _storage_errors("unmount"), self._lock:
            for ino in self._handles.values():
                with contextlib.suppress(OSError):
                    self._fs.release(ino)
            self._handles.clear()


# -- mounting ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MountOptions:
    """How to mount: `commit_interval` seconds between timed commits (0: only fsync/unmount)."""

    mountpoint: str
    read_only: bool = False
    allow_other: bool = False
    commit_interval: float = DEFAULT_COMMIT_INTERVAL
    fsname: str = "keep"

    def fuse_options(self) -> set[str]:
        """pyfuse3's defaults, our names, and noatime: reads never update atime (each would
        be a write to the volume), which the mount then says instead of relatime."""
        options = set(pyfuse3.default_options) | {f"fsname={self.fsname}", "subtype=keep", "noatime"}
        if self.read_only:
            options.add("ro")
        if self.allow_other:
            options.add("allow_other")
        return options


def check_mountpoint(mountpoint: str) -> None:
    """A clear KeepError unless `mountpoint` is an empty directory that nothing is mounted on.
    What is mounted there is read from mountinfo first: a stat of a FUSE mount point is a
    request to its process, which hung if that was stopped or hung (a dead keep mount is one
    whose image no process holds, and gets the stale-mount message)."""
    entry = _mount_entry(mountpoint)
    if entry is not None:
        if _is_stale(mountpoint, entry):
            raise KeepError(stale_mount_message(mountpoint))
        raise KeepError(f"{mountpoint} is already a mount point")
    try:
        info = os.stat(mountpoint)
    except OSError as error:
        if error.errno == errno.ENOTCONN:
            raise KeepError(stale_mount_message(mountpoint)) from None
        if error.errno == errno.ENOENT:
            raise KeepError(f"{mountpoint}: no such directory") from None
        raise KeepError(f"{mountpoint}: {error.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise KeepError(f"{mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise KeepError(f"{mountpoint} is already a mount point")
    try:
        with os.scandir(mountpoint) as entries:
            occupied = any(True for _ in entries)
    except OSError as error:
        raise KeepError(f"{mountpoint}: {error.strerror}") from None
    if occupied:  # as --help promises: an empty directory
        raise KeepError(f"{mountpoint} is not empty (its files would be hidden under the mount)")


def stale_mount_message(mountpoint: str) -> str:
    return (f"{mountpoint} is a stale FUSE mount (Transport endpoint is not connected: the "
            f"process that served it died); clear it with `fusermount3 -u {mountpoint}`")


def fuse_unavailable_reason() -> str | None:
    """Why FUSE mounts cannot work here (None if they may)."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse (load the fuse module or run the container with --device /dev/fuse)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK) and shutil.which("fusermount3") is None:
        return "/dev/fuse is not accessible and fusermount3 is not installed (Debian: fuse3)"
    return None


async def serve(operations: FuseOperations, options: MountOptions,
                ready: threading.Event | None = None, stopped: Sequence[int] = (),
                signals: Sequence[int] = STOP_SIGNALS) -> None:
    """Mount, serve requests until unmounted (or one of `signals`: SIGINT/SIGTERM/SIGHUP less
    those keep was started with ignored), then unmount.

    The signal handlers are installed before the kernel mounts and stay until it has unmounted:
    installed later (by a task that starts after the mount), a SIGTERM sent as soon as the
    mount point appeared met the default action, which killed the process and left a dead
    mount. A signal that arrives before `pyfuse3.main` runs still ends it (`terminate` marks
    the session as exited, which the loop checks first); one that came before serving began
    (recorded in `stopped`, see `_StopSignals`) means no mount at all. The caller owns the
    volume: it commits and closes it after this returns."""
    with receive_stop_signals(signals) as received:
        if stopped:
            return
        try:
            pyfuse3.init(operations, options.mountpoint, options.fuse_options())
        except RuntimeError as error:
            raise KeepError(f"cannot mount on {options.mountpoint}: {error} "
                            "(no FUSE permission? see the message above)") from None
        ours = _mount_entry(options.mountpoint)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_signals, received)
                nursery.start_soon(_raise_read_ahead, options.mountpoint)
                if options.commit_interval > 0 and not options.read_only:
                    nursery.start_soon(_commit_periodically, operations, options.commit_interval)
                if ready is not None:
                    ready.set()
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)
            _clear_aborted_mount(options.mountpoint, ours)
            operations.release_all()


def _clear_aborted_mount(mountpoint: str, ours: MountEntry | None) -> None:
    """After `pyfuse3.close`: if our mount is still there, its connection was aborted (through
    /sys/fs/fuse/connections, which pyfuse3 then does not unmount): detach the dead mount
    point, which otherwise stayed ("Transport endpoint is not connected") while the process
    said it had unmounted. Only the same device (FUSE devices are unique while mounted)."""
    if ours is None or _mount_entry(mountpoint) != ours:
        return
    result = subprocess.run(_unmount_command(mountpoint, lazy=True), capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        log.error("cannot clear the aborted mount on %s: %s", mountpoint,
                  result.stderr.strip() or f"exit status {result.returncode}")


def _unmount_command(mountpoint: str, *, lazy: bool = False) -> list[str]:
    """fusermount3 -u (as any user may), else umount; `lazy` detaches a busy or dead one."""
    tool = shutil.which("fusermount3")
    if tool:
        return [tool, "-u", *(["-z"] if lazy else []), mountpoint]
    return ["umount", *(["-l"] if lazy else []), mountpoint]


async def _raise_read_ahead(mountpoint: str) -> None:
    """Let sequential reads reach us as 1 MiB requests instead of the kernel's 128 KiB default
    (each request costs a transaction; measured 48 -> 62 MB/s). Needs root; skipped otherwise.

    The kernel sets the read-ahead from our reply to FUSE's INIT request, which `pyfuse3.main`
    answers after this task starts, so the knob is set a little later (and checked again). The
    device comes from mountinfo: a stat of the mount point would ask this very process."""
    entry = _mount_entry(mountpoint)
    if entry is None:
        return
    knob = f"/sys/class/bdi/{entry.device}/read_ahead_kb"
    for delay in (0.1, 0.5, 2.0):
        await trio.sleep(delay)
        with contextlib.suppress(OSError), open(knob, "r+", encoding="ascii") as setting:
            if setting.read().strip() != str(READ_AHEAD_KIB):
                setting.seek(0)
                setting.write(str(READ_AHEAD_KIB))


async def _stop_on_signals(signals: AsyncIterator[int]) -> None:
    async for _ in signals:
        pyfuse3.terminate()
        return


_REPEAT_REPORT_SECONDS = 60.0


async def _commit_periodically(operations: FuseOperations, interval: float) -> None:
    """Commit `interval` seconds after the first change since the last commit. The timer
    sleeps until something changes: it ticked every `interval` also when idle, so a mount
    given a tiny interval (--commit-interval 0.000001) took a whole CPU doing nothing.

    A failing commit (the host's disk under a sparse image is full) is reported when it first
    fails, when its reason changes, and then once a minute with the count: it was one line per
    interval for as long as the disk stayed full. The first success after failures says so; a
    commit made meanwhile by other means (an fsync) ends the run of failures too."""
    failures = 0
    reported: tuple[str, float] | None = None  # the last reason reported, and when
    failed_at = 0  # the generation when the last timed commit failed
    while True:
        await operations.wait_for_change()
        await trio.sleep(interval)
        if operations.dirty:
            try:
                operations.commit()
            except OSError as error:  # reported; the next fsync or unmount tries again
                generation = operations.generation
                if failures and generation != failed_at:  # an fsync's commit went through since
                    failures, reported = 0, None
                failed_at = generation
                failures += 1
                now = trio.current_time()
                if reported is None or reported[0] != str(error) or now - reported[1] >= _REPEAT_REPORT_SECONDS:
                    again = f" ({failures} timed commits failed in a row)" if failures > 1 else ""
                    log.error("timed commit failed: %s%s", error, again)
                    reported = (str(error), now)
            else:
                if failures:
                    log.warning("timed commit succeeded after %d failed", failures)
                failures, reported = 0, None


def _describe(state: VolumeState) -> str:
    mac = state.root_mac.hex() if state.root_mac else "none (no integrity)"
    return f"uuid {state.uuid}, generation {state.generation}, root MAC {mac}"


def _mount_source(image: str) -> str:
    """The image as mountinfo names it, decoded: "keep:" and its absolute path."""
    return "keep:" + os.path.abspath(image)


def _fsname(image: str) -> str:
    """`_mount_source` as a mount option (so `umount` finds the image in /proc/mounts). Mount
    options are ASCII (pyfuse3 encodes them so: an 'é' raised UnicodeEncodeError) and libfuse
    splits them at commas, so every byte outside printable ASCII, the comma and the backslash
    travel as libfuse's octal escapes (\\ooo), which it decodes; mountinfo shows the path again
    (with whitespace and backslashes as octal escapes, which `_mount_entry` decodes)."""
    return "".join(chr(byte) if 0x20 < byte < 0x7F and byte not in b",\\" else f"\\{byte:03o}"
                   for byte in os.fsencode(_mount_source(image)))


def report_address(mountpoint: str, source: str) -> bytes:
    """The abstract unix socket on which the process serving `source` (a mount's source in
    mountinfo, "keep:IMAGE") on `mountpoint` reports how its unmount ended (module notes).
    A digest of both: unique while mounted (one process holds the image), within the 107
    bytes of a socket name whatever the paths."""
    digest = hashlib.sha256(os.fsencode(mountpoint) + b"\0" + os.fsencode(source)).hexdigest()
    return b"\0keepshim-unmount-" + digest[:40].encode("ascii")


class _UnmountReport:
    """The mount process's side of telling `keep volume umount` how the unmount ended.

    Listens on `report_address` from before the mount until `tell`, without ever accepting
    while it serves: a `umount` connecting waits in the kernel's queue (so a stopped process
    costs nothing and needs no task), and `tell` accepts everyone queued then and sends them
    the one line. Closing without `tell` (or the process dying) resets the queued connections,
    which `umount` reports as no report. The line carries only the outcome and the process's
    own error message: no key, no data. If the name is taken (another process squats it), the
    mount goes on and says that `umount` will not learn the outcome."""

    def __init__(self, mountpoint: str, source: str) -> None:
        self._address = report_address(mountpoint, source)
        self._listener: socket.socket | None = None

    def __enter__(self) -> Self:
        listener = None
        try:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(self._address)
            listener.listen(socket.SOMAXCONN)
            listener.setblocking(False)
        except OSError as error:
            if listener is not None:
                listener.close()
            say(f"warning: `keep volume umount` cannot learn how this mount's final commit ends "
                f"(its report socket: {error.strerror or error})")
            return self
        self._listener = listener
        return self

    def tell(self, outcome: str) -> None:
        """Send `outcome` ("ok" or "failed MESSAGE", one line) to every `umount` waiting, and
        stop listening. A `umount` that went away meanwhile is skipped."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        line = (" ".join(outcome.splitlines()) + "\n").encode("utf-8", "backslashreplace")
        waiting = []
        with listener:  # closed before anyone hears: a remount at once finds the name free
            while True:
                try:
                    waiting.append(listener.accept()[0])
                except OSError:  # BlockingIOError: nobody else is waiting
                    break
        for connection in waiting:
            with connection, contextlib.suppress(OSError):
                connection.setblocking(False)
                connection.send(line, socket.MSG_NOSIGNAL)

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._listener is not None:  # no outcome to tell: the waiting `umount`s are reset
            self._listener.close()
            self._listener = None


class _StopSignals:
    """From just before serving until the process exits (after a failure: until after the final
    commit), SIGINT, SIGTERM and SIGHUP are recorded in `received` instead of acted on (`serve`
    listens for them itself while it serves, through trio, which then restores these handlers
    and redelivers to them what it did not consume).

    Ctrl-C pressed twice, or SIGTERM sent twice, used to interrupt the final commit (a
    KeyboardInterrupt, or SIGTERM's default action, met also in a storage worker thread):
    exit 130 or death without a word, and every change since the last commit lost. The
    unmount was asked for once; repeating the request must not undo it. A commit that hangs
    (a stuck host disk) still yields to SIGKILL, which leaves the volume consistent."""

    def __init__(self) -> None:
        # what keep was started with ignored (nohup's SIGHUP) stays ignored: see shim.signals
        self.signals = stop_signals()
        self.received: list[int] = []
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def _record(self, number: int, frame: FrameType | None) -> None:
        self.received.append(number)

    def __enter__(self) -> Self:
        for number in self.signals:
            self._previous[number] = signal.signal(number, self._record)
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is None:
            # The final commit is done and the process only reports and exits: a signal
            # repeated now is ignored too. Restored (and Python's finalisation resets its own
            # handlers to the default, though not SIG_IGN), a second SIGTERM sent 50 ms after
            # the first killed the process once a fast final commit had finished: exit -15,
            # the data committed.
            for number in self._previous:
                signal.signal(number, signal.SIG_IGN)
            return
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def _report(line: str) -> None:
    """A status line on stdout (mount's and umount's). If stdout cannot take it (its reader has
    gone: `keep volume mount ... | head -1`; its terminal hung up, whose SIGHUP unmounted; it
    was closed: `keep volume umount MNT >&-`), the line is dropped: the EPIPE, EIO or EBADF
    came after the final commit or the unmount and was reported as 'IMG: broken pipe' or
    'stdout: bad file descriptor' with exit status 1, as if the unmount had failed."""
    try:
        print(line, flush=True)
    except OSError:
        point_at_devnull(sys.stdout.fileno())  # the interpreter's last flush goes nowhere too


def _close_after_unmount(volume: Volume, image: str, unmounted: str | None) -> None:
    """Close the volume (its final commit). When that commit fails after a mount (the host's
    disk under a sparse image filled up), say so: the storage error alone ('IMG: no space left
    on device') read as if the unmount had failed or the image were damaged, and not that the
    changes since the last commit are gone with this process."""
    try:
        volume.close()
    except OSError as error:
        if unmounted is None:
            raise
        reason = str(error.strerror or error)
        reason = reason[:1].lower() + reason[1:] if not reason[1:2].isupper() else reason
        raise KeepError(f"unmounted {unmounted}, but the commit at unmount failed: {image}: "
                        f"{reason} (the image holds generation {volume.state().generation}; "
                        "later changes are lost)") from None


def mount_command(args: argparse.Namespace) -> int:
    """`keep volume mount IMG MOUNTPOINT`: serve in the foreground until unmounted or signalled.
    Storage errors (wrong key, in use, rollback, ...) are translated by the caller."""
    if not args.commit_interval >= 0:  # also NaN
        raise KeepError("--commit-interval must be a number of seconds, 0 or more", exit_status=2)
    reason = fuse_unavailable_reason()
    if reason is not None:
        raise KeepError(f"cannot mount: {reason}")
    mountpoint = _mount_path(args.mountpoint)  # where the kernel mounts (for `umount`)
    check_mountpoint(mountpoint)
    key = read_key(KeySource.from_arguments(args))
    volume = open_volume(args.image, key, writable=not args.read_only,
                         expected_generation=args.volume_generation)
    del key
    options = MountOptions(mountpoint, read_only=args.read_only, allow_other=args.allow_other,
                           commit_interval=args.commit_interval, fsname=_fsname(args.image))
    operations = FuseOperations(volume)
    mounted = threading.Event()
    with _StopSignals() as stops, _UnmountReport(mountpoint, _mount_source(args.image)) as report:
        try:
            try:
                state = volume.state()
                mode = "read-only" if args.read_only else "read-write"
                _report(f"mounting {args.image} on {mountpoint} ({mode}; {_describe(state)})")
                trio.run(serve, operations, options, mounted, stops.received, stops.signals)
            finally:
                _close_after_unmount(volume, args.image, mountpoint if mounted.is_set() else None)
        except KeepError as error:
            report.tell(f"failed {error}")
            raise
        except BaseException:  # a bug (the caller says which): `umount` must not say "unmounted"
            report.tell(f"failed the keep process serving {mountpoint} failed at unmount "
                        "(see its own output)")
            raise
        report.tell("ok")
    state = volume.state()
    if mounted.is_set():
        outcome = "unchanged (read-only)" if args.read_only else "committed"
        _report(f"unmounted {mountpoint}; {args.image} {outcome}: {_describe(state)}")
    return 0


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo: the device (major:minor), type and source, and for a
    FUSE mount the uid of the user who mounted it (its `user_id=` option), else None."""

    device: str
    fstype: str
    source: str
    owner: int | None = None


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda escape: chr(int(escape.group(1), 8)), field)


def _mount_entry(mountpoint: str) -> MountEntry | None:
    """What is mounted on `mountpoint` (the last, topmost mount there), or None; read from
    /proc/self/mountinfo, as a stat of a FUSE mount point would ask its (maybe dead) server."""
    found = None
    # surrogateescape: any path's bytes (another mount's may not be UTF-8), as os.fsdecode
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8",
                                            errors="surrogateescape") as table:
        for line in table:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == mountpoint and " - " in line:
                after = line.split(" - ", 1)[1].split()
                if len(after) >= 2:
                    owners = re.findall(r"(?:^|,)user_id=(\d+)(?:,|$)", after[2] if len(after) > 2 else "")
                    found = MountEntry(fields[2], after[0], _unescape(after[1]),
                                       int(owners[0]) if owners else None)
    return found


def _wait_for_release(image: str, timeout: float) -> bool | None:
    """Wait until no process holds the image's lock (the mount process committed and exited);
    False if one still does after `timeout`, None if the image cannot be opened (moved, deleted
    since the mount, unreadable): there is no lock to judge by."""
    deadline = time.monotonic() + timeout
    try:
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
    finally:
        os.close(fd)


def _mount_path(path: str) -> str:
    """`path` with its symlinks resolved as os.path.realpath resolves them (physically: a ".."
    after a symlink is the target's parent), but without a stat of the last component, which
    for a mount point is a request to its mount process: it hangs if that process is stopped
    (Ctrl-Z) or hung, and fails if it died. The parent is resolved by realpath; the last
    component only by readlink, which answers EINVAL for a directory without asking the
    filesystem mounted on it."""
    path = os.path.join(os.getcwd(), path)  # absolute, not yet normalised
    for _ in range(40):  # as the kernel's limit of nested symlinks
        parent, name = os.path.split(path.rstrip("/") or "/")
        if name in ("", ".", ".."):
            return os.path.realpath(path)
        path = os.path.join(os.path.realpath(parent), name)
        try:
            target = os.readlink(path)
        except OSError:  # not a symlink (or missing): the mount point as given
            return path
        path = os.path.join(os.path.dirname(path), target)  # relative to the link's directory
    return path


def _lock_is_free(image: str) -> bool:
    """Whether no process holds the image's lock now (False also if it cannot be opened)."""
    return _wait_for_release(image, 0.0) is True


def _held_by_readers_only(image: str) -> bool:
    """Whether the image's lock is shared (read-only mounts and readers hold it), not
    exclusive; False also if the image cannot be opened."""
    try:
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # also lets go of the shared lock just taken
    return True


def _nobody_listens(address: bytes) -> bool:
    """Whether no process listens on the abstract unix socket `address` (a connection that
    succeeds is closed at once: a mount process skips it when it reports)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(_REPORT_CONNECT_WAIT)
        try:
            probe.connect(address)
        except (ConnectionRefusedError, FileNotFoundError):
            return True
        except OSError:
            return False
    return False


def _is_stale(mountpoint: str, entry: MountEntry) -> bool:
    """Whether `entry` on `mountpoint` is a keep mount whose process died: no process holds
    its image; or only readers do (the image is mounted read-only elsewhere too: its lock is
    shared) and nothing listens on this mount's report socket, where its live process would
    (`_UnmountReport`). The image's lock alone took a dead read-only mount beside a live one
    for a live mount: `mount` said 'already a mount point' instead of naming the cure, and
    `umount` waited 30 s for that live other mount to let go and failed."""
    if entry.fstype != "fuse.keep" or not entry.source.startswith("keep:"):
        return False
    image = entry.source.removeprefix("keep:")
    if _lock_is_free(image):
        return True
    return _held_by_readers_only(image) and _nobody_listens(report_address(mountpoint, entry.source))


def _connect_report(mountpoint: str, entry: MountEntry) -> socket.socket | None:
    """A connection on which the process serving `entry` on `mountpoint` will tell how its
    unmount ended (`_UnmountReport`), or None: nobody listens (the process died, is an older
    keep, or runs in another network namespace) or the listener is not the mount's owner (a
    squatter on the name: what it would say is not believed)."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.settimeout(_REPORT_CONNECT_WAIT)
        connection.connect(report_address(mountpoint, entry.source))
        credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        connection.close()
        return None
    _, uid, _ = struct.unpack("3i", credentials)
    if uid != entry.owner and not (entry.owner is None and uid in (0, os.getuid())):
        connection.close()
        return None
    return connection


def _await_report(connection: socket.socket, timeout: float) -> str | None:
    """The mount process's report line; None if it ended without one (killed, or it closed
    without telling); TimeoutError if none came within `timeout` seconds (stopped, hung)."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data and len(data) < _REPORT_LIMIT:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        connection.settimeout(remaining)
        try:
            chunk = connection.recv(_REPORT_LIMIT)
        except TimeoutError:
            raise
        except OSError:  # ECONNRESET: the listener closed while we were still queued
            return None
        if not chunk:
            return None
        data += chunk
    return data.split(b"\n", 1)[0].decode("utf-8", "backslashreplace")


def _printable(text: str) -> str:
    """`text` as one printable line (control characters and stray surrogates escaped): what
    another process sent must not write to the operator's terminal unfiltered."""
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
                   for char in text)


def _unmount_outcome(connection: socket.socket, mountpoint: str, image: str | None) -> None:
    """After the kernel unmounted: wait for the mount process's report and say it ("unmounted
    MOUNTPOINT" on stdout), or raise its failure, or the lack of a report, as a KeepError."""
    try:
        line = _await_report(connection, _UMOUNT_WAIT)
    except TimeoutError:
        held = f" (it still holds {image})" if image is not None else ""
        raise KeepError(f"unmounted {mountpoint}, but the keep process serving it has not finished "
                        f"its commit at unmount after {_UMOUNT_WAIT:g} s: is it stopped or hung?{held}") from None
    if line == "ok":
        _report(f"unmounted {mountpoint}")
        return
    if line is not None and line.startswith("failed "):
        raise KeepError(_printable(line.removeprefix("failed ")))
    raise KeepError(f"unmounted {mountpoint}, but the keep process serving it ended without "
                    "reporting its commit at unmount (was it killed?): the changes since its last "
                    "commit may be lost")


def umount_command(args: argparse.Namespace) -> int:
    """`keep volume umount MOUNTPOINT`: fusermount3 -u, then the outcome of the commit at
    unmount as the mount process reports it (module notes): "unmounted MOUNTPOINT" and 0 only
    if that commit and the close succeeded; otherwise a KeepError (exit status 1, as the mount
    process's own): its error line, or that it ended without a report (killed), or that it
    has not reported within `_UMOUNT_WAIT` seconds (stopped, hung). The mount is found in
    mountinfo only, never through the mount point (see `_mount_path`), so a stopped, hung or
    dead mount process cannot make this hang; a mount whose image no process holds is a stale
    one (its process died), cleared with exit status 0 as before."""
    mountpoint = _mount_path(args.mountpoint)
    entry = _mount_entry(mountpoint)
    if entry is None:
        raise KeepError(f"{args.mountpoint} is not mounted")
    if entry.fstype != "fuse.keep":  # never unmount what is not ours (a typo, a data disk)
        raise KeepError(f"{args.mountpoint} is not a keep volume mount (it is {entry.fstype})")
    image = entry.source.removeprefix("keep:") if entry.source.startswith("keep:") else None
    stale = _is_stale(mountpoint, entry)
    report = None if stale else _connect_report(mountpoint, entry)  # before the unmount ends it
    with contextlib.ExitStack() as cleanup:
        if report is not None:
            cleanup.callback(report.close)
        result = subprocess.run(_unmount_command(mountpoint), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
            raise KeepError(f"cannot unmount {args.mountpoint}: {message}")
        if report is not None:
            _unmount_outcome(report, args.mountpoint, image)
            return 0
    # Nobody reported: a dead process's stale mount, or a live one that cannot tell us.
    held = None if stale or image is None else _wait_for_release(image, _UMOUNT_WAIT)
    if held is False:
        raise KeepError(f"unmounted {args.mountpoint}, but the keep process still holds {image}")
    if held is True:  # it was alive (the lock was held) and ended without a word for us
        raise KeepError(f"unmounted {args.mountpoint}, but no report of its commit at unmount came "
                        "from the keep process serving it (an older keep? another network namespace? "
                        f"its report socket taken?): check that process's output before trusting {image}")
    _report(f"cleared the stale mount on {args.mountpoint}")
    return 0
