"""One Python function per wasi_snapshot_preview1 name, and the table the binding installs.

Theory of operation.  Each function is called as ``impl(guest, memory, *args)`` with the core
wasm arguments as unsigned ints and returns the errno (0 on success); results go through the
out-pointers the ABI passes.  The order inside a function is always: validate enum and flag
arguments (EINVAL, as wiggle does before wasmtime's code runs), look the fd up with its rights
(``FdTable`` accessors), read guest strings and buffers (EFAULT/EILSEQ), call the backend, store
results.  Failures are raised as ``WasiError`` or propagate as ``OSError`` from a backend; the
binding turns both into the errno with ``errno_for_exception``.  Where the spec leaves the errno
open, wasmtime's choice is followed (cited inline).

The hot paths (fd_write, fd_read) avoid helper layers: one dict lookup, one struct unpack, one
backend call, one struct pack.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from wasi_host._abi import (
    ADVICE_MAX,
    DIRENT,
    EVENT,
    EVENT_FD_READWRITE_HANGUP,
    FDSTAT,
    FILESTAT,
    LOOKUP_SYMLINK_FOLLOW,
    MAX_FILE_OFFSET,
    PREOPENTYPE_DIR,
    PRESTAT,
    RIFLAGS_RECV_PEEK,
    RIFLAGS_RECV_WAITALL,
    SIGNAL_MAX,
    SUBSCRIPTION_CLOCK,
    SUBSCRIPTION_CLOCK_ABSTIME,
    SUBSCRIPTION_FD,
    SUBSCRIPTION_HEAD,
    SUBSCRIPTION_SIZE,
    U16,
    U32,
    U32_PAIR,
    U64,
    Clockid,
    Errno,
    Eventtype,
    Fdflags,
    Filetype,
    Fstflags,
    Oflags,
    Rights,
    Whence,
)
from wasi_host._backend import FileStat, Now, Pollable, TimeUpdate
from wasi_host._errors import ProcExit, WasiError
from wasi_host._fdtable import Entry, OpenDirectory, OpenFile, OpenSocket, OpenStream, require
from wasi_host._guest import Guest
from wasi_host._memory import (
    Memory,
    fault,
    gather,
    iovecs,
    read_path,
    scatter,
    store,
    store_u32,
    transfer_limit,
    view,
    write_bytes,
)
from wasi_host._paths import resolve

ValueType = Literal["i32", "i64"]

_MAX_OFFSET = MAX_FILE_OFFSET  # off_t: larger file offsets and sizes are EINVAL
# The most subscriptions one poll_oneoff takes: what wasmtime's resource table holds (it ends the
# guest beyond that). Each costs a few Python objects here, so without a bound a guest naming
# its memory as subscriptions (4 M in 192 MiB) kept one uninterruptible call busy for 11 s with
# 1 GB of host memory.
_MAX_SUBSCRIPTIONS = 1_000_000
_FD_WRITE = Rights.FD_WRITE
_SYNC_FDFLAGS = Fdflags.DSYNC | Fdflags.RSYNC | Fdflags.SYNC  # refused: not implemented
_BADF = int(Errno.BADF)
_CIOVEC = U32_PAIR
_U32 = U32


@dataclass(frozen=True)
class HostFunction:
    """One preview1 import: its core wasm signature and the Python implementation."""

    name: str
    params: tuple[ValueType, ...]
    results: tuple[Literal["i32"], ...]
    impl: Callable[..., int]


def _invalid_unless(condition: bool) -> None:
    if not condition:
        raise WasiError(Errno.INVAL)


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _store_filestat(memory: Memory, ptr: int, status: FileStat) -> None:
    """Store a filestat; a time before 1970 (negative on the host) is 0, as wasmtime reports it
    (the u64 timestamp cannot hold it)."""
    store(
        FILESTAT, memory, ptr, status.dev, status.ino, status.filetype, status.nlink, status.size,
        max(status.atime_ns, 0), max(status.mtime_ns, 0), max(status.ctime_ns, 0),
    )


def _time_updates(atim: int, mtim: int, fst_flags: int) -> tuple[TimeUpdate, TimeUpdate]:
    """Decode fstflags; setting a time both to a value and to now is EINVAL (wasmtime)."""
    _invalid_unless(fst_flags <= Fstflags.ALL)

    def one(value: int, set_flag: int, now_flag: int) -> TimeUpdate:
        if fst_flags & set_flag and fst_flags & now_flag:
            raise WasiError(Errno.INVAL)
        if fst_flags & set_flag:
            return value
        if fst_flags & now_flag:
            return Now.NOW
        return None

    return one(atim, Fstflags.ATIM, Fstflags.ATIM_NOW), one(mtim, Fstflags.MTIM, Fstflags.MTIM_NOW)


# --- args, environment, clocks, randomness, process ------------------------------------------


def _write_string_list(memory: Memory, items: tuple[bytes, ...], pointers: int, buffer: int) -> int:
    offset = buffer
    for index, item in enumerate(items):
        store_u32(memory, pointers + 4 * index, offset)
        write_bytes(memory, offset, item + b"\0")
        offset += len(item) + 1
    return 0


def _store_sizes(memory: Memory, items: tuple[bytes, ...], count_ptr: int, size_ptr: int) -> int:
    store_u32(memory, count_ptr, len(items))
    store_u32(memory, size_ptr, sum(len(item) + 1 for item in items))
    return 0


def args_get(guest: Guest, memory: Memory, argv: int, argv_buf: int) -> int:
    return _write_string_list(memory, guest.args, argv, argv_buf)


def args_sizes_get(guest: Guest, memory: Memory, count_ptr: int, size_ptr: int) -> int:
    return _store_sizes(memory, guest.args, count_ptr, size_ptr)


def environ_get(guest: Guest, memory: Memory, environ: int, environ_buf: int) -> int:
    return _write_string_list(memory, guest.env, environ, environ_buf)


def environ_sizes_get(guest: Guest, memory: Memory, count_ptr: int, size_ptr: int) -> int:
    return _store_sizes(memory, guest.env, count_ptr, size_ptr)


def _read_clock(guest: Guest, clock_id: int) -> int:
    clock = guest.clock
    if clock_id == Clockid.REALTIME:
        return clock.realtime_ns()
    if clock_id == Clockid.MONOTONIC:
        return clock.monotonic_ns()
    if clock_id == Clockid.PROCESS_CPUTIME_ID:
        return clock.process_cputime_ns()
    if clock_id == Clockid.THREAD_CPUTIME_ID:
        return clock.thread_cputime_ns()
    raise WasiError(Errno.INVAL)


def clock_res_get(guest: Guest, memory: Memory, clock_id: int, result_ptr: int) -> int:
    _invalid_unless(clock_id <= Clockid.THREAD_CPUTIME_ID)
    store(U64, memory, result_ptr, 1)
    return 0


def clock_time_get(guest: Guest, memory: Memory, clock_id: int, precision: int, result_ptr: int) -> int:
    store(U64, memory, result_ptr, _read_clock(guest, clock_id))
    return 0


def random_get(guest: Guest, memory: Memory, buf: int, buf_len: int) -> int:
    target = view(memory, buf, buf_len)
    target[:] = guest.random(buf_len)
    return 0


def proc_exit(guest: Guest, memory: Memory, code: int) -> int:
    guest.exit_code = code
    raise ProcExit(code)


def proc_raise(guest: Guest, memory: Memory, signal: int) -> int:
    _invalid_unless(signal <= SIGNAL_MAX)
    return Errno.NOTSUP  # wasmtime: signals are not supported


def sched_yield(guest: Guest, memory: Memory) -> int:
    os.sched_yield()
    return 0


# --- fd_* ---------------------------------------------------------------------------------------


def fd_advise(guest: Guest, memory: Memory, fd: int, offset: int, length: int, advice: int) -> int:
    _invalid_unless(advice <= ADVICE_MAX)
    guest.fds.get_file(fd, Rights.FD_ADVISE)
    _invalid_unless(length <= _MAX_OFFSET)  # a negative off_t length, as Linux's fadvise (wasmtime)
    return 0  # advisory only


def fd_allocate(guest: Guest, memory: Memory, fd: int, offset: int, length: int) -> int:
    guest.fds.get_file(fd, Rights.FD_ALLOCATE)
    return Errno.NOTSUP  # wasmtime: posix_fallocate is not supported


def fd_close(guest: Guest, memory: Memory, fd: int) -> int:
    guest.fds.close(fd)
    return 0


def fd_datasync(guest: Guest, memory: Memory, fd: int) -> int:
    entry = guest.fds.get_file(fd)
    # fdatasync is a subset of fsync: wasi-libc withholds FD_DATASYNC from read-only fds but
    # grants FD_SYNC, and the OS (so wasmtime) lets them fdatasync.
    require(entry, Rights.FD_DATASYNC if entry.rights_base & Rights.FD_DATASYNC else Rights.FD_SYNC)
    entry.file.datasync()
    return 0


def fd_sync(guest: Guest, memory: Memory, fd: int) -> int:
    guest.fds.get_file(fd, Rights.FD_SYNC).file.sync()
    return 0


def fd_fdstat_get(guest: Guest, memory: Memory, fd: int, result_ptr: int) -> int:
    entry = guest.fds.get(fd)
    store(FDSTAT, memory, result_ptr, entry.filetype, entry.fdflags, entry.rights_base, entry.rights_inheriting)
    return 0


def fd_fdstat_set_flags(guest: Guest, memory: Memory, fd: int, flags: int) -> int:
    _invalid_unless(flags <= Fdflags.ALL)
    entry = guest.fds.get(fd)
    if not isinstance(entry, OpenFile | OpenSocket):
        raise WasiError(Errno.BADF)  # wasmtime: only files carry changeable flags
    require(entry, Rights.FD_FDSTAT_SET_FLAGS)
    _invalid_unless(not flags & _SYNC_FDFLAGS)  # wasmtime: only APPEND and NONBLOCK change
    entry.fdflags = flags
    return 0


def fd_fdstat_set_rights(guest: Guest, memory: Memory, fd: int, base: int, inheriting: int) -> int:
    _invalid_unless(base <= Rights.ALL and inheriting <= Rights.ALL)
    entry = guest.fds.get(fd)
    if base & ~entry.rights_base or inheriting & ~entry.rights_inheriting:
        raise WasiError(Errno.NOTCAPABLE)  # rights can only be dropped
    entry.rights_base = base
    entry.rights_inheriting = inheriting
    return 0


def _stat_entry(entry: Entry) -> FileStat:
    if isinstance(entry, OpenFile):
        return entry.file.stat()
    if isinstance(entry, OpenDirectory):
        return entry.directory.stat()
    return FileStat(0, 0, entry.filetype, 0, 0, 0, 0, 0)  # stdio and sockets, as wasmtime


def fd_filestat_get(guest: Guest, memory: Memory, fd: int, result_ptr: int) -> int:
    _store_filestat(memory, result_ptr, _stat_entry(guest.fds.get(fd, Rights.FD_FILESTAT_GET)))
    return 0


def fd_filestat_set_size(guest: Guest, memory: Memory, fd: int, size: int) -> int:
    entry = guest.fds.get_file(fd, Rights.FD_FILESTAT_SET_SIZE)
    _invalid_unless(size <= _MAX_OFFSET)
    entry.file.set_size(size)
    return 0


def fd_filestat_set_times(guest: Guest, memory: Memory, fd: int, atim: int, mtim: int, fst_flags: int) -> int:
    atime, mtime = _time_updates(atim, mtim, fst_flags)
    entry = guest.fds.get(fd)
    if not isinstance(entry, OpenFile | OpenDirectory):
        raise WasiError(Errno.BADF)  # stdio and sockets: the kind is checked first (wasmtime)
    require(entry, Rights.FD_FILESTAT_SET_TIMES)
    if isinstance(entry, OpenFile):
        entry.file.set_times(atime, mtime)
    else:
        entry.directory.set_times(atime, mtime)
    return 0


def fd_read(guest: Guest, memory: Memory, fd: int, iovs: int, iovs_len: int, result_ptr: int) -> int:
    entry = guest.fds.get(fd, Rights.FD_READ)
    buffers = iovecs(memory, iovs, iovs_len)
    total = min(sum(map(len, buffers)), transfer_limit(memory))
    count = scatter(buffers, entry.read(total)) if total else 0
    store_u32(memory, result_ptr, count)
    return 0


def fd_pread(guest: Guest, memory: Memory, fd: int, iovs: int, iovs_len: int, offset: int, result_ptr: int) -> int:
    entry = guest.fds.get_seekable(fd, Rights.FD_READ | Rights.FD_SEEK)
    buffers = iovecs(memory, iovs, iovs_len)
    total = min(sum(map(len, buffers)), transfer_limit(memory))
    _invalid_unless(offset + total <= _MAX_OFFSET)  # a transfer ending past off_t, as Linux
    count = scatter(buffers, entry.file.pread(total, offset)) if total else 0
    store_u32(memory, result_ptr, count)
    return 0


def fd_write(guest: Guest, memory: Memory, fd: int, iovs: int, iovs_len: int, result_ptr: int) -> int:
    entry = guest.fds.entries.get(fd)
    if entry is None or not entry.rights_base & _FD_WRITE:
        raise WasiError(_BADF)
    if iovs_len == 1:  # the common case, inlined: one ciovec, written without a copy
        try:
            buf, buf_len = _CIOVEC.unpack_from(memory, iovs)  # type: ignore[arg-type]
        except (struct.error, TypeError):
            raise fault() from None
        end = buf + buf_len
        if end > len(memory):  # type: ignore[arg-type]
            raise fault()
        count = entry.write(memory[buf:end])  # type: ignore[index]
    else:
        count = entry.write(gather(memory, iovs, iovs_len))
    try:
        _U32.pack_into(memory, result_ptr, count)  # type: ignore[arg-type]
    except (struct.error, TypeError):
        raise fault() from None
    return 0


def fd_pwrite(guest: Guest, memory: Memory, fd: int, iovs: int, iovs_len: int, offset: int, result_ptr: int) -> int:
    entry = guest.fds.get_seekable(fd, Rights.FD_WRITE | Rights.FD_SEEK)
    data = gather(memory, iovs, iovs_len)
    _invalid_unless(offset <= _MAX_OFFSET)
    if entry.fdflags & Fdflags.APPEND:
        offset = entry.file.size()  # Linux pwrite ignores the offset under O_APPEND (wasmtime too)
    else:
        _invalid_unless(offset + len(data) <= _MAX_OFFSET)  # a transfer ending past off_t, as Linux
    store_u32(memory, result_ptr, entry.file.pwrite(data, offset))
    return 0


def fd_prestat_get(guest: Guest, memory: Memory, fd: int, result_ptr: int) -> int:
    entry = guest.fds.get(fd)
    if not isinstance(entry, OpenDirectory) or entry.preopen_name is None:
        raise WasiError(Errno.BADF)
    store(PRESTAT, memory, result_ptr, PREOPENTYPE_DIR, len(entry.preopen_name))
    return 0


def fd_prestat_dir_name(guest: Guest, memory: Memory, fd: int, path: int, path_len: int) -> int:
    entry = guest.fds.get(fd)
    if not isinstance(entry, OpenDirectory) or entry.preopen_name is None:
        raise WasiError(Errno.NOTDIR)  # wasmtime's (legacy) choice
    if len(entry.preopen_name) > path_len:
        raise WasiError(Errno.NAMETOOLONG)
    write_bytes(memory, path, entry.preopen_name)
    return 0


def _dirents(entry: OpenDirectory, cookie: int) -> Iterator[tuple[int, int, int, bytes]]:
    """(d_next, d_ino, d_type, name) from wasi ``cookie``: ``.`` is 0, ``..`` is 1, then the
    backend's entries with their cookies shifted by 2."""
    if cookie < 2:
        ino = entry.directory.stat().ino
        if cookie == 0:
            yield 1, ino, Filetype.DIRECTORY, b"."
        yield 2, ino, Filetype.DIRECTORY, b".."  # wasmtime reports the directory's own inode
    for item in entry.directory.readdir(max(cookie, 2) - 2):
        yield item.next_cookie + 2, item.ino, item.filetype, item.name.encode("utf-8", "surrogateescape")


def fd_readdir(guest: Guest, memory: Memory, fd: int, buf: int, buf_len: int, cookie: int, result_ptr: int) -> int:
    entry = guest.fds.get_directory(fd, Rights.FD_READDIR)
    target = view(memory, buf, buf_len)
    out = bytearray()
    for d_next, ino, filetype, name in _dirents(entry, cookie):
        if len(out) >= buf_len:
            break
        out += DIRENT.pack(d_next, ino, len(name), filetype)
        out += name
    # The last entry may be cut short: the spec's signal that the buffer was too small.
    del out[buf_len:]
    target[: len(out)] = out
    store_u32(memory, result_ptr, len(out))
    return 0


def fd_renumber(guest: Guest, memory: Memory, fd: int, to: int) -> int:
    guest.fds.renumber(fd, to)
    return 0


def fd_seek(guest: Guest, memory: Memory, fd: int, offset: int, whence: int, result_ptr: int) -> int:
    _invalid_unless(whence <= Whence.END)
    delta = _signed64(offset)
    rights = Rights.FD_TELL if whence == Whence.CUR and delta == 0 else Rights.FD_SEEK
    entry = guest.fds.get_seekable(fd, rights)
    if whence == Whence.SET:
        position = delta
    elif whence == Whence.CUR:
        position = entry.offset + delta
    else:
        position = entry.file.size() + delta  # size(): a volume's buffered bytes stay buffered
    _invalid_unless(0 <= position <= _MAX_OFFSET)
    entry.offset = position
    store(U64, memory, result_ptr, position)
    return 0


def fd_tell(guest: Guest, memory: Memory, fd: int, result_ptr: int) -> int:
    store(U64, memory, result_ptr, guest.fds.get_seekable(fd, Rights.FD_TELL).offset)
    return 0


# --- path_* -------------------------------------------------------------------------------------


def path_create_directory(guest: Guest, memory: Memory, fd: int, path: int, path_len: int) -> int:
    directory = guest.fds.get_directory(fd, Rights.PATH_CREATE_DIRECTORY).directory
    # "link/" names the link (EEXIST), never its target: mkdir("dl/") must not create dl's target
    with resolve(directory, read_path(memory, path, path_len), follow=False, slash_follows=False) as resolved:
        if resolved.name == ".":
            raise WasiError(Errno.EXIST)
        resolved.directory.mkdir(resolved.name)
    return 0


def path_filestat_get(guest: Guest, memory: Memory, fd: int, flags: int, path: int, path_len: int, result_ptr: int) -> int:
    _invalid_unless(flags <= LOOKUP_SYMLINK_FOLLOW)
    directory = guest.fds.get_directory(fd, Rights.PATH_FILESTAT_GET).directory
    with resolve(directory, read_path(memory, path, path_len), follow=bool(flags)) as resolved:
        status = resolved.stat()
    _store_filestat(memory, result_ptr, status)
    return 0


def path_filestat_set_times(
    guest: Guest, memory: Memory, fd: int, flags: int, path: int, path_len: int, atim: int, mtim: int, fst_flags: int
) -> int:
    _invalid_unless(flags <= LOOKUP_SYMLINK_FOLLOW)
    atime, mtime = _time_updates(atim, mtim, fst_flags)
    directory = guest.fds.get_directory(fd, Rights.PATH_FILESTAT_SET_TIMES).directory
    with resolve(directory, read_path(memory, path, path_len), follow=bool(flags)) as resolved:
        if resolved.trailing_slash:
            resolved.stat()
        resolved.directory.set_times_at(resolved.name, atime, mtime)
    return 0


def path_link(
    guest: Guest, memory: Memory, old_fd: int, old_flags: int, old_path: int, old_path_len: int,
    new_fd: int, new_path: int, new_path_len: int,
) -> int:
    _invalid_unless(old_flags <= LOOKUP_SYMLINK_FOLLOW)
    source = guest.fds.get_directory(old_fd, Rights.PATH_LINK_SOURCE).directory
    target = guest.fds.get_directory(new_fd, Rights.PATH_LINK_TARGET).directory
    source_path = read_path(memory, old_path, old_path_len)
    target_path = read_path(memory, new_path, new_path_len)
    # wasmtime refuses SYMLINK_FOLLOW (linkat's AT_SYMLINK_FOLLOW) once the fds and paths are
    # read: a program tested there never links a link's target, so it must not here either
    _invalid_unless(not old_flags & LOOKUP_SYMLINK_FOLLOW)
    with resolve(source, source_path, follow=False) as src, resolve(target, target_path, follow=False) as dst:
        status = src.stat()
        if status.filetype == Filetype.DIRECTORY:
            raise WasiError(Errno.PERM)  # hard links to directories: EPERM, as Linux
        if dst.trailing_slash or dst.name == ".":
            raise WasiError(Errno.NOENT if dst.stat_or_none() is None else Errno.EXIST)
        src.directory.link(src.name, dst.directory, dst.name)
    return 0


def path_open(
    guest: Guest, memory: Memory, fd: int, dirflags: int, path: int, path_len: int, oflags: int,
    rights_base: int, rights_inheriting: int, fdflags: int, result_ptr: int,
) -> int:
    _invalid_unless(
        dirflags <= LOOKUP_SYMLINK_FOLLOW and oflags <= Oflags.ALL and fdflags <= Fdflags.ALL
        and rights_base <= Rights.ALL and rights_inheriting <= Rights.ALL
    )
    parent = guest.fds.get_directory(fd, wrong_kind=Errno.NOTDIR)
    needed = Rights.PATH_OPEN
    if oflags & Oflags.CREAT:
        needed |= Rights.PATH_CREATE_FILE
    if oflags & Oflags.TRUNC:
        needed |= Rights.PATH_FILESTAT_SET_SIZE
    require(parent, needed)
    if fdflags & _SYNC_FDFLAGS:
        # Synchronized I/O is not implemented: refuse it before the lookup, as wasmtime does,
        # rather than report a flag that is not honoured.
        raise WasiError(Errno.NOTSUP)
    if oflags & Oflags.DIRECTORY and oflags & (Oflags.CREAT | Oflags.EXCL | Oflags.TRUNC):
        raise WasiError(Errno.INVAL)  # wasmtime refuses these combinations
    # Rights beyond the directory's inheriting set, or that do not apply to the type opened,
    # are dropped silently (wasmtime checks none; wasi-libc asks for everything it may need).
    base = rights_base & parent.rights_inheriting
    inheriting = rights_inheriting & parent.rights_inheriting
    readable = bool(base & (Rights.FD_READ | Rights.FD_READDIR))
    writable = bool(base & Rights.FD_WRITE)
    entry: Entry
    # O_CREAT|O_EXCL never follows a symlink in the last place (open(2), wasmtime): the link
    # itself exists, EEXIST, and nothing is created where a dangling link points
    exclusive_create = oflags & (Oflags.CREAT | Oflags.EXCL) == Oflags.CREAT | Oflags.EXCL
    follow = bool(dirflags) and not exclusive_create
    with resolve(parent.directory, read_path(memory, path, path_len), follow=follow) as resolved:
        if oflags & Oflags.CREAT and resolved.trailing_slash and resolved.name != ".":
            # "name/" can only name a directory, which O_CREAT cannot open: EISDIR whatever the
            # name is (file, link, missing) and with or without O_EXCL, as wasmtime ("./" goes
            # on as "." does: EEXIST with O_EXCL)
            raise WasiError(Errno.ISDIR)
        status = resolved.stat_or_none()
        want_directory = bool(oflags & Oflags.DIRECTORY) or resolved.trailing_slash
        if status is None:
            if not oflags & Oflags.CREAT:
                raise WasiError(Errno.NOENT)
        elif oflags & Oflags.CREAT and oflags & Oflags.EXCL:
            raise WasiError(Errno.EXIST)
        elif status.filetype == Filetype.SYMBOLIC_LINK:
            raise WasiError(Errno.LOOP)  # O_NOFOLLOW on a link, with or without O_DIRECTORY (wasmtime)
        elif status.filetype == Filetype.DIRECTORY:
            if writable or oflags & (Oflags.TRUNC | Oflags.CREAT):
                raise WasiError(Errno.ISDIR)  # O_CREAT never opens a directory (Linux, wasmtime)
            child = resolved.directory.open_directory(resolved.name)
            entry = OpenDirectory(child, base & Rights.DIRECTORY_BASE, inheriting)
            store_u32(memory, result_ptr, guest.fds.add(entry))
            return 0
        elif want_directory:
            raise WasiError(Errno.NOTDIR)
        file = resolved.directory.open_file(
            resolved.name, create=bool(oflags & Oflags.CREAT), exclusive=bool(oflags & Oflags.EXCL),
            truncate=bool(oflags & Oflags.TRUNC), read=readable, write=writable,
        )
    filetype = status.filetype if status is not None else Filetype.REGULAR_FILE
    entry = OpenFile(file, filetype, base & Rights.FILE_BASE, inheriting, fdflags)
    store_u32(memory, result_ptr, guest.fds.add(entry))
    return 0


def path_readlink(
    guest: Guest, memory: Memory, fd: int, path: int, path_len: int, buf: int, buf_len: int, result_ptr: int
) -> int:
    directory = guest.fds.get_directory(fd, Rights.PATH_READLINK).directory
    with resolve(directory, read_path(memory, path, path_len), follow=False) as resolved:
        if resolved.trailing_slash:
            resolved.stat()
            raise WasiError(Errno.INVAL)  # a directory is not a symlink
        contents = resolved.directory.readlink(resolved.name).encode("utf-8", "surrogateescape")
    if contents.startswith(b"/"):
        raise WasiError(Errno.PERM)  # wasmtime (cap-std) refuses to reveal absolute link targets
    contents = contents[:buf_len]  # silently truncated, as readlink(2) and wasmtime
    write_bytes(memory, buf, contents)
    store_u32(memory, result_ptr, len(contents))
    return 0


def path_remove_directory(guest: Guest, memory: Memory, fd: int, path: int, path_len: int) -> int:
    directory = guest.fds.get_directory(fd, Rights.PATH_REMOVE_DIRECTORY).directory
    with resolve(directory, read_path(memory, path, path_len), follow=False) as resolved:
        if resolved.name == ".":
            raise WasiError(Errno.INVAL)  # rmdir(".") as Linux
        if resolved.trailing_slash:
            resolved.stat()  # ENOENT, ENOTDIR first
            raise WasiError(Errno.INVAL)  # wasmtime (cap-std) refuses rmdir("dir/")
        resolved.directory.rmdir(resolved.name)
    return 0


def path_rename(
    guest: Guest, memory: Memory, fd: int, old_path: int, old_path_len: int, new_fd: int, new_path: int, new_path_len: int
) -> int:
    source = guest.fds.get_directory(fd, Rights.PATH_RENAME_SOURCE).directory
    target = guest.fds.get_directory(new_fd, Rights.PATH_RENAME_TARGET).directory
    source_path = read_path(memory, old_path, old_path_len)
    target_path = read_path(memory, new_path, new_path_len)
    # "link/" names the link itself on either side, so rename never moves or replaces a link's
    # target; the link is not a directory, so "link/" is ENOTDIR (wasmtime)
    with (resolve(source, source_path, follow=False, slash_follows=False) as src,
          resolve(target, target_path, follow=False, slash_follows=False) as dst):
        if src.name == "." or dst.name == ".":
            raise WasiError(Errno.BUSY)  # renaming a directory reached as "." or ".."
        status = src.stat()  # ENOTDIR for "name/" naming anything but a directory
        if dst.trailing_slash:
            if status.filetype != Filetype.DIRECTORY:
                raise WasiError(Errno.NOTDIR)
            dst.stat_or_none()  # ENOTDIR for "name/" naming an existing non-directory
        src.directory.rename(src.name, dst.directory, dst.name)
    return 0


def path_symlink(
    guest: Guest, memory: Memory, old_path: int, old_path_len: int, fd: int, new_path: int, new_path_len: int
) -> int:
    directory = guest.fds.get_directory(fd, Rights.PATH_SYMLINK).directory
    target = read_path(memory, old_path, old_path_len)
    if "\0" in target:
        raise WasiError(Errno.INVAL)
    if target.startswith("/"):
        raise WasiError(Errno.PERM)  # wasmtime (cap-std): an absolute link would lead outside
    with resolve(directory, read_path(memory, new_path, new_path_len), follow=False) as resolved:
        if resolved.name == "." or resolved.trailing_slash:
            raise WasiError(Errno.NOENT if resolved.stat_or_none() is None else Errno.EXIST)
        resolved.directory.symlink(target, resolved.name)
    return 0


def path_unlink_file(guest: Guest, memory: Memory, fd: int, path: int, path_len: int) -> int:
    directory = guest.fds.get_directory(fd, Rights.PATH_UNLINK_FILE).directory
    with resolve(directory, read_path(memory, path, path_len), follow=False) as resolved:
        if resolved.name == ".":
            raise WasiError(Errno.ISDIR)
        if resolved.trailing_slash:
            status = resolved.directory.stat_at(resolved.name)
            raise WasiError(Errno.ISDIR if status.filetype == Filetype.DIRECTORY else Errno.NOTDIR)
        resolved.directory.unlink(resolved.name)
    return 0


# --- poll_oneoff ---------------------------------------------------------------------------------


def poll_oneoff(guest: Guest, memory: Memory, in_ptr: int, out_ptr: int, nsubscriptions: int, result_ptr: int) -> int:
    if nsubscriptions == 0:
        raise WasiError(Errno.INVAL)  # the spec: waiting for nothing would block forever
    _invalid_unless(nsubscriptions <= _MAX_SUBSCRIPTIONS)  # as poll(2) for more fds than allowed
    subscriptions = view(memory, in_ptr, SUBSCRIPTION_SIZE * nsubscriptions)
    events = view(memory, out_ptr, EVENT.size * nsubscriptions)
    clock = guest.clock
    now = clock.monotonic_ns()
    timers: list[tuple[int, int]] = []  # (userdata, monotonic deadline)
    watches: list[tuple[int, int, Entry, bool]] = []  # (userdata, eventtype, entry, write)
    for index in range(nsubscriptions):
        base = index * SUBSCRIPTION_SIZE
        userdata, tag = SUBSCRIPTION_HEAD.unpack_from(subscriptions, base)
        if tag == Eventtype.CLOCK:
            clock_id, timeout, _precision, flags = SUBSCRIPTION_CLOCK.unpack_from(subscriptions, base + 16)
            _invalid_unless(flags <= SUBSCRIPTION_CLOCK_ABSTIME)
            absolute = bool(flags & SUBSCRIPTION_CLOCK_ABSTIME)
            if clock_id == Clockid.MONOTONIC:
                deadline = timeout if absolute else now + timeout
            elif clock_id == Clockid.REALTIME:
                deadline = now + (max(0, timeout - clock.realtime_ns()) if absolute else timeout)
            else:
                raise WasiError(Errno.INVAL)  # wasmtime: CPU-time clocks cannot be waited on
            timers.append((userdata, deadline))
        elif tag in (Eventtype.FD_READ, Eventtype.FD_WRITE):
            (fd,) = SUBSCRIPTION_FD.unpack_from(subscriptions, base + 16)
            entry = guest.fds.get(fd)
            write = tag == Eventtype.FD_WRITE
            entry.check_pollable(write)  # the kind (and a stream's direction) first: EBADF, as wasmtime
            require(entry, Rights.POLL_FD_READWRITE)
            watches.append((userdata, tag, entry, write))
        else:
            raise WasiError(Errno.INVAL)
    earliest = min((deadline for _, deadline in timers), default=None)
    interests: list[tuple[Pollable, bool]] = []
    for _, _, entry, write in watches:
        if isinstance(entry, OpenStream):
            interests.append((entry.stream, write))
        elif isinstance(entry, OpenSocket):
            interests.append((entry.socket, write))
    while True:
        count = 0
        for userdata, tag, entry, write in watches:
            readiness = entry.readiness(write)
            if readiness is not None:
                flags = EVENT_FD_READWRITE_HANGUP if readiness.hangup else 0
                EVENT.pack_into(events, count * EVENT.size, userdata, 0, tag, readiness.nbytes, flags)
                count += 1
        now = clock.monotonic_ns()
        for userdata, deadline in timers:
            if deadline <= now:
                EVENT.pack_into(events, count * EVENT.size, userdata, 0, Eventtype.CLOCK, 0, 0)
                count += 1
        if count:
            store_u32(memory, result_ptr, count)
            return 0
        guest.waiter.wait(interests, earliest)


# --- sockets --------------------------------------------------------------------------------------


def sock_accept(guest: Guest, memory: Memory, fd: int, flags: int, result_ptr: int) -> int:
    _invalid_unless(not flags & ~Fdflags.NONBLOCK)
    listener = guest.fds.get_socket(fd, Rights.SOCK_ACCEPT)
    connection = listener.socket.accept(nonblocking=bool(listener.fdflags & Fdflags.NONBLOCK))
    entry = OpenSocket(connection, Rights.SOCKET_BASE & ~Rights.SOCK_ACCEPT, flags)
    try:
        store_u32(memory, result_ptr, guest.fds.add(entry))
    except WasiError:
        entry.close()
        raise
    return 0


def sock_recv(
    guest: Guest, memory: Memory, fd: int, ri_data: int, ri_data_len: int, ri_flags: int, size_ptr: int, roflags_ptr: int
) -> int:
    _invalid_unless(ri_flags <= RIFLAGS_RECV_PEEK | RIFLAGS_RECV_WAITALL)
    entry = guest.fds.get_socket(fd, Rights.FD_READ)
    buffers = iovecs(memory, ri_data, ri_data_len)
    total = min(sum(map(len, buffers)), transfer_limit(memory))
    data = entry.socket.recv(
        total, peek=bool(ri_flags & RIFLAGS_RECV_PEEK), waitall=bool(ri_flags & RIFLAGS_RECV_WAITALL),
        nonblocking=bool(entry.fdflags & Fdflags.NONBLOCK),
    ) if total else b""
    store_u32(memory, size_ptr, scatter(buffers, data))
    store(U16, memory, roflags_ptr, 0)  # stream sockets never truncate
    return 0


def sock_send(guest: Guest, memory: Memory, fd: int, si_data: int, si_data_len: int, si_flags: int, result_ptr: int) -> int:
    entry = guest.fds.get_socket(fd, Rights.FD_WRITE)
    data = gather(memory, si_data, si_data_len)
    sent = entry.socket.send(data, nonblocking=bool(entry.fdflags & Fdflags.NONBLOCK)) if len(data) else 0
    store_u32(memory, result_ptr, sent)
    return 0


def sock_shutdown(guest: Guest, memory: Memory, fd: int, how: int) -> int:
    _invalid_unless(0 < how <= 3)
    entry = guest.fds.get_socket(fd, Rights.SOCK_SHUTDOWN)
    entry.socket.shutdown(read=bool(how & 1), write=bool(how & 2))
    return 0


# --- the table ------------------------------------------------------------------------------------

_I: Literal["i32"] = "i32"
_L: Literal["i64"] = "i64"
_SIGNATURES: dict[str, tuple[tuple[ValueType, ...], Callable[..., int]]] = {
    "args_get": ((_I, _I), args_get),
    "args_sizes_get": ((_I, _I), args_sizes_get),
    "environ_get": ((_I, _I), environ_get),
    "environ_sizes_get": ((_I, _I), environ_sizes_get),
    "clock_res_get": ((_I, _I), clock_res_get),
    "clock_time_get": ((_I, _L, _I), clock_time_get),
    "fd_advise": ((_I, _L, _L, _I), fd_advise),
    "fd_allocate": ((_I, _L, _L), fd_allocate),
    "fd_close": ((_I,), fd_close),
    "fd_datasync": ((_I,), fd_datasync),
    "fd_fdstat_get": ((_I, _I), fd_fdstat_get),
    "fd_fdstat_set_flags": ((_I, _I), fd_fdstat_set_flags),
    "fd_fdstat_set_rights": ((_I, _L, _L), fd_fdstat_set_rights),
    "fd_filestat_get": ((_I, _I), fd_filestat_get),
    "fd_filestat_set_size": ((_I, _L), fd_filestat_set_size),
    "fd_filestat_set_times": ((_I, _L, _L, _I), fd_filestat_set_times),
    "fd_pread": ((_I, _I, _I, _L, _I), fd_pread),
    "fd_prestat_get": ((_I, _I), fd_prestat_get),
    "fd_prestat_dir_name": ((_I, _I, _I), fd_prestat_dir_name),
    "fd_pwrite": ((_I, _I, _I, _L, _I), fd_pwrite),
    "fd_read": ((_I, _I, _I, _I), fd_read),
    "fd_readdir": ((_I, _I, _I, _L, _I), fd_readdir),
    "fd_renumber": ((_I, _I), fd_renumber),
    "fd_seek": ((_I, _L, _I, _I), fd_seek),
    "fd_sync": ((_I,), fd_sync),
    "fd_tell": ((_I, _I), fd_tell),
    "fd_write": ((_I, _I, _I, _I), fd_write),
    "path_create_directory": ((_I, _I, _I), path_create_directory),
    "path_filestat_get": ((_I, _I, _I, _I, _I), path_filestat_get),
    "path_filestat_set_times": ((_I, _I, _I, _I, _L, _L, _I), path_filestat_set_times),
    "path_link": ((_I, _I, _I, _I, _I, _I, _I), path_link),
    "path_open": ((_I, _I, _I, _I, _I, _L, _L, _I, _I), path_open),
    "path_readlink": ((_I, _I, _I, _I, _I, _I), path_readlink),
    "path_remove_directory": ((_I, _I, _I), path_remove_directory),
    "path_rename": ((_I, _I, _I, _I, _I, _I), path_rename),
    "path_symlink": ((_I, _I, _I, _I, _I), path_symlink),
    "path_unlink_file": ((_I, _I, _I), path_unlink_file),
    "poll_oneoff": ((_I, _I, _I, _I), poll_oneoff),
    "proc_exit": ((_I,), proc_exit),
    "proc_raise": ((_I,), proc_raise),
    "sched_yield": ((), sched_yield),
    "random_get": ((_I, _I), random_get),
    "sock_accept": ((_I, _I, _I), sock_accept),
    "sock_recv": ((_I, _I, _I, _I, _I, _I), sock_recv),
    "sock_send": ((_I, _I, _I, _I, _I), sock_send),
    "sock_shutdown": ((_I, _I), sock_shutdown),
}

#: Every wasi_snapshot_preview1 import, by name.  proc_exit has no result (it raises ProcExit).
FUNCTIONS: Mapping[str, HostFunction] = MappingProxyType(
    {
        name: HostFunction(name, params, () if name == "proc_exit" else ("i32",), impl)
        for name, (params, impl) in _SIGNATURES.items()
    }
)
del _SIGNATURES
