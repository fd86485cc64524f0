"""fd_* and path_* behaviour, the same tests on the in-memory and the host-directory backends."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from wasi_harness import BACKENDS, PREOPEN, RESULT, GuestHarness, closing

from wasi_host import Errno, Filetype, Rights
from wasi_host._abi import FDSTAT, Fdflags, Fstflags, Oflags, Whence
from wasi_host.hostdir import HostDirectory

CREAT, DIRECTORY, EXCL, TRUNC = Oflags.CREAT, Oflags.DIRECTORY, Oflags.EXCL, Oflags.TRUNC


@pytest.fixture(params=sorted(BACKENDS))
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GuestHarness]:
    with closing(GuestHarness(BACKENDS[request.param](tmp_path))) as guest:
        yield guest


def make_file(h: GuestHarness, path: str, data: bytes = b"") -> None:
    fd = h.open(path, CREAT | TRUNC)
    if data:
        assert h.write(fd, data) == len(data)
    assert h.call("fd_close", fd) == 0


# --- files ---------------------------------------------------------------------------------------


def test_write_seek_read_tell_round_trip(harness: GuestHarness) -> None:
    fd = harness.open("f", CREAT)
    assert harness.write(fd, b"hello ", b"world") == 11
    assert harness.call("fd_tell", fd, RESULT) == 0 and harness.u64(RESULT) == 11
    assert harness.call("fd_seek", fd, 0, Whence.SET, RESULT) == 0
    assert harness.read(fd, 4, 100) == b"hello world"
    assert harness.read(fd, 10) == b""  # end of file
    assert harness.call("fd_seek", fd, (-5) & (2**64 - 1), Whence.END, RESULT) == 0
    assert harness.u64(RESULT) == 6
    assert harness.read(fd, 5) == b"world"
    assert harness.call("fd_seek", fd, (-1) & (2**64 - 1), Whence.SET, RESULT) == Errno.INVAL
    assert harness.call("fd_seek", fd, 0, 3, RESULT) == Errno.INVAL


def test_pread_and_pwrite_leave_the_offset_alone(harness: GuestHarness) -> None:
    fd = harness.open("f", CREAT)
    array, count = harness.ciovecs(b"abc", b"def")
    assert harness.call("fd_pwrite", fd, array, count, 10, RESULT) == 0 and harness.u32(RESULT) == 6
    assert harness.call("fd_tell", fd, RESULT) == 0 and harness.u64(RESULT) == 0
    iovs, buffers = harness.iovecs(4, 4)
    assert harness.call("fd_pread", fd, iovs, 2, 8, RESULT) == 0 and harness.u32(RESULT) == 8
    data = b"".join(bytes(harness.memory[ptr : ptr + size]) for ptr, size in buffers)
    assert data == b"\0\0abcdef"
    assert harness.call("fd_pread", 1, iovs, 2, 0, RESULT) == Errno.SPIPE


def test_append_writes_at_the_end_whatever_the_offset(harness: GuestHarness) -> None:
    make_file(harness, "log", b"first\n")
    fd = harness.open("log", fdflags=Fdflags.APPEND)
    assert harness.write(fd, b"second\n") == 7
    assert harness.call("fd_seek", fd, 0, Whence.SET, RESULT) == 0
    assert harness.write(fd, b"third\n") == 6
    assert harness.call("fd_seek", fd, 0, Whence.SET, RESULT) == 0
    assert harness.read(fd, 100) == b"first\nsecond\nthird\n"
    assert harness.call("fd_fdstat_get", fd, RESULT) == 0
    filetype, flags, base, _ = FDSTAT.unpack_from(harness.memory, RESULT)
    assert (filetype, flags) == (Filetype.REGULAR_FILE, Fdflags.APPEND)
    assert base & Rights.FD_WRITE
    # dropping APPEND: the next write goes to the offset again
    assert harness.call("fd_fdstat_set_flags", fd, 0) == 0
    assert harness.call("fd_seek", fd, 0, Whence.SET, RESULT) == 0
    harness.write(fd, b"FIRST")
    assert harness.call("fd_fdstat_set_flags", fd, Fdflags.SYNC) == Errno.INVAL
    assert harness.call("fd_fdstat_set_flags", PREOPEN, 0) == Errno.BADF


def test_sparse_growth_reads_zeros_and_reports_the_size(harness: GuestHarness) -> None:
    fd = harness.open("sparse", CREAT)
    assert harness.call("fd_filestat_set_size", fd, 3 << 30) == 0  # 3 GiB of hole
    assert harness.fstat(fd).size == 3 << 30
    array, count = harness.ciovecs(b"end")
    assert harness.call("fd_pwrite", fd, array, count, (3 << 30) + 5, RESULT) == 0
    assert harness.fstat(fd).size == (3 << 30) + 8
    iovs, [(ptr, _)] = harness.iovecs(16)
    assert harness.call("fd_pread", fd, iovs, 1, (3 << 30) - 8, RESULT) == 0
    assert bytes(harness.memory[ptr : ptr + harness.u32(RESULT)]) == b"\0" * 13 + b"end"
    assert harness.call("fd_filestat_set_size", fd, 4) == 0
    assert harness.fstat(fd).size == 4


def test_timestamps_set_by_fd_and_by_path(harness: GuestHarness) -> None:
    fd = harness.open("t", CREAT)
    assert harness.call("fd_filestat_set_times", fd, 1_000_000_123, 2_000_000_456, Fstflags.ATIM | Fstflags.MTIM) == 0
    status = harness.fstat(fd)
    assert (status.atime_ns, status.mtime_ns) == (1_000_000_123, 2_000_000_456)
    ptr, length = harness.put("t")
    assert harness.call("path_filestat_set_times", PREOPEN, 1, ptr, length, 0, 5_000_000_000, Fstflags.MTIM) == 0
    status = harness.stat("t")
    assert (status.atime_ns, status.mtime_ns) == (1_000_000_123, 5_000_000_000)
    assert harness.call("fd_filestat_set_times", fd, 0, 0, Fstflags.MTIM_NOW) == 0
    assert harness.fstat(fd).mtime_ns > 5_000_000_000
    both = Fstflags.ATIM | Fstflags.ATIM_NOW
    assert harness.call("fd_filestat_set_times", fd, 0, 0, both) == Errno.INVAL
    assert harness.call("fd_filestat_set_times", fd, 0, 0, 1 << 4) == Errno.INVAL


def test_setting_times_on_stdio_is_ebadf_not_enotcapable(harness: GuestHarness) -> None:
    """wasmtime checks the kind before the rights: stdio is not a file (EBADF), whatever its rights."""
    for fd in (0, 1, 2):
        assert harness.call("fd_filestat_set_times", fd, 0, 0, 0) == Errno.BADF
        assert harness.call("fd_filestat_set_times", fd, 0, 0, Fstflags.MTIM_NOW) == Errno.BADF


def test_host_times_before_1970_are_reported_as_zero(tmp_path: Path) -> None:
    """A negative host time does not fit the u64 timestamp: wasmtime reports 0, and so do we
    (it used to make every stat of the file fail with EFAULT)."""
    old = tmp_path / "old.txt"
    old.write_bytes(b"old\n")
    os.utime(old, ns=(-86_400 * 10**9, -86_400 * 10**9))  # 1969-12-31
    with closing(GuestHarness(HostDirectory.open(tmp_path))) as harness:
        status = harness.stat("old.txt")
        assert (status.atime_ns, status.mtime_ns, status.size) == (0, 0, 4)
        fd = harness.open("old.txt", rights=Rights.FD_READ | Rights.FD_FILESTAT_GET)
        assert (harness.fstat(fd).atime_ns, harness.fstat(fd).mtime_ns) == (0, 0)


def test_sync_advise_and_allocate(harness: GuestHarness) -> None:
    fd = harness.open("s", CREAT)
    assert harness.call("fd_sync", fd) == 0
    assert harness.call("fd_datasync", fd) == 0
    assert harness.call("fd_advise", fd, 0, 100, 2) == 0
    assert harness.call("fd_advise", fd, 0, 100, 6) == Errno.INVAL
    assert harness.call("fd_allocate", fd, 0, 100) == Errno.NOTSUP  # as wasmtime
    assert harness.call("fd_sync", PREOPEN) == Errno.BADF


def test_rights_can_only_be_dropped_and_are_enforced(harness: GuestHarness) -> None:
    fd = harness.open("r", CREAT)
    keep = Rights.FD_READ | Rights.FD_SEEK
    assert harness.call("fd_fdstat_set_rights", fd, keep, 0) == 0
    array, count = harness.ciovecs(b"x")
    assert harness.call("fd_write", fd, array, count, RESULT) == Errno.BADF
    assert harness.call("fd_filestat_get", fd, RESULT) == Errno.NOTCAPABLE
    assert harness.call("fd_fdstat_set_rights", fd, keep | Rights.FD_WRITE, 0) == Errno.NOTCAPABLE
    read_only = harness.open("r", rights=Rights.FD_READ)
    assert harness.call("fd_write", read_only, array, count, RESULT) == Errno.BADF
    assert harness.call("fd_seek", read_only, 0, Whence.SET, RESULT) == Errno.NOTCAPABLE


def test_opened_rights_are_limited_by_the_directory_inheriting_rights(harness: GuestHarness) -> None:
    assert harness.call("fd_fdstat_set_rights", PREOPEN, Rights.DIRECTORY_BASE, Rights.FD_READ | Rights.PATH_OPEN) == 0
    fd = harness.open("x", CREAT)
    assert harness.call("fd_fdstat_get", fd, RESULT) == 0
    _, _, base, inheriting = FDSTAT.unpack_from(harness.memory, RESULT)
    assert base == Rights.FD_READ and inheriting == Rights.FD_READ | Rights.PATH_OPEN


# --- path_open corners -----------------------------------------------------------------------------


def test_path_open_flags(harness: GuestHarness) -> None:
    make_file(harness, "f", b"data")
    assert harness.open_errno("f", CREAT | EXCL) == Errno.EXIST
    assert harness.open_errno("missing") == Errno.NOENT
    assert harness.open_errno("f", DIRECTORY) == Errno.NOTDIR
    assert harness.open_errno("d", DIRECTORY | CREAT) == Errno.INVAL
    fd = harness.open("f", TRUNC)
    assert harness.fstat(fd).size == 0
    assert harness.path_call("path_create_directory", "d") == 0
    assert harness.open_errno("d", rights=Rights.FD_WRITE) == Errno.ISDIR
    directory = harness.open("d", DIRECTORY, rights=Rights.DIRECTORY_BASE)
    assert harness.call("fd_fdstat_get", directory, RESULT) == 0
    assert FDSTAT.unpack_from(harness.memory, RESULT)[0] == Filetype.DIRECTORY
    nested = harness.open("inner", CREAT, at=directory)
    assert harness.write(nested, b"x") == 1
    assert harness.stat("d/inner").size == 1
    # path_* on a file fd
    assert harness.open_errno("x", at=fd) == Errno.NOTDIR
    assert harness.path_call("path_create_directory", "x", at=fd) == Errno.BADF
    assert harness.open_errno("x", at=99) == Errno.BADF
    assert harness.open_errno("x", 1 << 4) == Errno.INVAL


def test_creating_over_a_directory_or_through_a_trailing_slash_is_eisdir(harness: GuestHarness) -> None:
    """O_CREAT cannot open a directory, and a name ending in "/" cannot be created as a file:
    EISDIR in every case, as Linux and wasmtime (it used to open the directory, or give ENOTDIR
    or EEXIST)."""
    make_file(harness, "f", b"data")
    assert harness.path_call("path_create_directory", "d") == 0
    make_file(harness, "d/inner", b"inner")
    assert harness.symlink("f", "l") == 0
    assert harness.symlink("d", "ld") == 0
    assert harness.symlink("missing", "dl") == 0
    read_only = Rights.FD_READ | Rights.FD_READDIR
    for path in ("d", ".", "./", "d/.", "d/..", "d/", "ld/"):
        for dirflags in (0, 1):
            assert harness.open_errno(path, CREAT, rights=read_only, dirflags=dirflags) == Errno.ISDIR, path
    assert harness.open_errno("ld", CREAT, rights=read_only) == Errno.ISDIR  # followed
    for path in ("f/", "l/", "dl/", "d/inner/", "d/", "ld/", "missing/"):
        for oflags in (CREAT, CREAT | EXCL, CREAT | TRUNC):
            assert harness.open_errno(path, oflags) == Errno.ISDIR, (path, oflags)
    for path in ("d", ".", "./", "d/.", "d/..", "d/./"):
        assert harness.open_errno(path, CREAT | EXCL, rights=read_only) == Errno.EXIST, path
    for name in ("missing", "d/inner", "f"):  # nothing was created, nothing truncated
        ptr, length = harness.put(name)
        errno = harness.call("path_filestat_get", PREOPEN, 0, ptr, length, RESULT)
        assert errno == (Errno.NOENT if name == "missing" else Errno.SUCCESS), name
    assert harness.stat("f").size == 4


@pytest.mark.parametrize("flag", [Fdflags.DSYNC, Fdflags.RSYNC, Fdflags.SYNC])
def test_sync_fdflags_are_refused_as_wasmtime_does(harness: GuestHarness, flag: int) -> None:
    """The synchronized-I/O fdflags are not implemented: path_open refuses them (ENOTSUP, wasmtime)
    rather than report them in fdstat and not honour them; nothing is created, and
    fd_fdstat_set_flags refuses them too (EINVAL, wasmtime)."""
    make_file(harness, "f", b"data")
    assert harness.call("path_create_directory", PREOPEN, *harness.put("d")) == 0
    assert harness.open_errno("f", fdflags=flag) == Errno.NOTSUP
    assert harness.open_errno("f", fdflags=flag | Fdflags.APPEND) == Errno.NOTSUP
    assert harness.open_errno("d", DIRECTORY, fdflags=flag, rights=Rights.FD_READDIR) == Errno.NOTSUP
    assert harness.open_errno("new", CREAT, fdflags=flag) == Errno.NOTSUP
    assert harness.open_errno("missing", fdflags=flag) == Errno.NOTSUP  # before the lookup
    assert harness.open_errno("d", DIRECTORY | CREAT, fdflags=flag) == Errno.NOTSUP  # before EINVAL
    ptr, length = harness.put("new")
    assert harness.call("path_filestat_get", PREOPEN, 0, ptr, length, RESULT) == Errno.NOENT
    fd = harness.open("f")
    assert harness.call("fd_fdstat_set_flags", fd, flag) == Errno.INVAL
    assert harness.call("fd_fdstat_get", fd, RESULT) == 0
    assert FDSTAT.unpack_from(harness.memory, RESULT)[1] == 0


def test_escapes_and_odd_paths_give_wasmtimes_errno(harness: GuestHarness) -> None:
    assert harness.path_call("path_create_directory", "dir") == 0
    assert harness.path_call("path_create_directory", "dir/nested") == 0
    make_file(harness, "dir/nested/file")
    assert harness.open_errno("/dir/nested/file") == Errno.PERM
    assert harness.open_errno("dir/nested/../../../sandbox/dir/nested/file") == Errno.PERM
    assert harness.open_errno("..") == Errno.PERM
    fd = harness.open("dir/.//nested/../../dir/nested/../nested///./file")
    assert harness.call("fd_close", fd) == 0
    assert harness.open_errno("dir/nested/file\0") == Errno.INVAL
    assert harness.open_errno("dir/nested/file/") == Errno.NOTDIR
    assert harness.open_errno("dir/nested/file///") == Errno.NOTDIR
    assert harness.call("fd_close", harness.open("dir/nested/", rights=0)) == 0
    assert harness.call("fd_close", harness.open("dir/nested///", rights=0)) == 0
    assert harness.open_errno("") == Errno.NOENT
    assert harness.open_errno(b"bad-\xff-utf8") == Errno.ILSEQ
    assert harness.open_errno("dir/nested/file/more") == Errno.NOTDIR
    assert harness.open_errno("n" * 256, CREAT) == Errno.NAMETOOLONG
    # symlinks
    assert harness.symlink("/etc", "absolute") == Errno.PERM  # wasmtime refuses absolute targets
    assert harness.open_errno("absolute/passwd") == Errno.NOENT
    assert harness.symlink("../..", "up") == 0
    assert harness.open_errno("up/x") == Errno.PERM
    assert harness.symlink("loop2", "loop1") == 0
    assert harness.symlink("loop1", "loop2") == 0
    assert harness.open_errno("loop1") == Errno.LOOP
    assert harness.open_errno("loop1/x") == Errno.LOOP
    assert harness.symlink("dir/nested", "link") == 0
    assert harness.call("fd_close", harness.open("link/file")) == 0
    assert harness.open_errno("link", dirflags=0) == Errno.LOOP  # O_NOFOLLOW on the link itself
    assert harness.open_errno("link", DIRECTORY, dirflags=0, rights=0) == Errno.LOOP
    assert harness.open_errno("link/", dirflags=0, rights=0) == Errno.SUCCESS  # a trailing slash follows


def test_host_symlink_pointing_outside_cannot_be_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "abs")
    os.symlink("../outside", root / "rel")
    with closing(GuestHarness(HostDirectory.open(root))) as harness:
        assert harness.open_errno("abs/secret") == Errno.PERM
        assert harness.open_errno("rel/secret") == Errno.PERM
        assert harness.open_errno("rel/secret", dirflags=0) == Errno.PERM
        ptr, length = harness.put("rel/secret")
        assert harness.call("path_filestat_get", PREOPEN, 0, ptr, length, RESULT) == Errno.PERM


# --- directories, links, renames --------------------------------------------------------------------


def test_create_and_remove_directories(harness: GuestHarness) -> None:
    assert harness.path_call("path_create_directory", "a") == 0
    assert harness.path_call("path_create_directory", "a") == Errno.EXIST
    assert harness.path_call("path_create_directory", "a/b/") == 0
    assert harness.stat("a").filetype == Filetype.DIRECTORY
    assert harness.path_call("path_remove_directory", "a") == Errno.NOTEMPTY
    make_file(harness, "file")
    assert harness.path_call("path_remove_directory", "file") == Errno.NOTDIR
    assert harness.path_call("path_unlink_file", "a") == Errno.ISDIR
    assert harness.path_call("path_unlink_file", "file/") == Errno.NOTDIR
    assert harness.path_call("path_remove_directory", "a/b/") == Errno.INVAL  # as wasmtime (cap-std)
    assert harness.path_call("path_remove_directory", "a/b") == 0
    assert harness.path_call("path_remove_directory", "a") == 0
    assert harness.path_call("path_remove_directory", "a") == Errno.NOENT
    assert harness.path_call("path_remove_directory", ".") == Errno.INVAL


def test_a_trailing_slash_does_not_make_rename_or_mkdir_act_on_a_links_target(harness: GuestHarness) -> None:
    """rename and mkdir do not follow a final symlink, and "link/" does not change that: renaming
    "ld/" must not move the directory ld points to, "x" -> "lt/" must not replace lt's target, and
    mkdir("dl/") must not create dl's missing target (ENOTDIR, ENOTDIR, EEXIST as wasmtime)."""
    make_file(harness, "f", b"data")
    for name in ("d", "e", "t"):
        assert harness.path_call("path_create_directory", name) == 0
    make_file(harness, "d/inner", b"inner")
    for target, link in (("f", "l"), ("d", "ld"), ("missing", "dl"), ("t", "lt")):
        assert harness.symlink(target, link) == 0
    for old, new in (("ld/", "moved"), ("e", "lt/"), ("dl/", "x"), ("l/", "x"), ("f", "dl/"), ("f", "l/"),
                     ("f", "ld/"), ("e", "ld/"), ("ld/", "lt/")):
        assert harness.rename(old, new) == Errno.NOTDIR, (old, new)
    for path in ("ld/", "dl/", "l/", "f/"):
        assert harness.path_call("path_create_directory", path) == Errno.EXIST, path
    for path in ("d", "e", "t"):
        assert harness.stat(path, follow=False).filetype == Filetype.DIRECTORY
    for path in ("l", "ld", "dl", "lt"):
        assert harness.stat(path, follow=False).filetype == Filetype.SYMBOLIC_LINK
    assert harness.stat("d/inner").size == 5 and harness.stat("f").size == 4
    for path in ("moved", "x", "missing"):
        ptr, length = harness.put(path)
        assert harness.call("path_filestat_get", PREOPEN, 0, ptr, length, RESULT) == Errno.NOENT, path
    # a trailing slash on a real directory still renames and creates
    assert harness.rename("e/", "e2/") == 0
    assert harness.path_call("path_create_directory", "new/") == 0
    assert harness.stat("e2").filetype == harness.stat("new").filetype == Filetype.DIRECTORY


def test_filestat_follows_symlinks_only_when_asked(harness: GuestHarness) -> None:
    make_file(harness, "target", b"12345")
    assert harness.symlink("target", "link") == 0
    assert harness.stat("link").filetype == Filetype.REGULAR_FILE
    assert harness.stat("link").size == 5
    assert harness.stat("link", follow=False).filetype == Filetype.SYMBOLIC_LINK
    assert harness.symlink("target", "link") == Errno.EXIST
    buf = harness.alloc(64)
    assert harness.path_call("path_readlink", "link", buf, 64, RESULT) == 0
    assert bytes(harness.memory[buf : buf + harness.u32(RESULT)]) == b"target"
    assert harness.path_call("path_readlink", "link", buf, 3, RESULT) == 0 and harness.u32(RESULT) == 3
    assert harness.path_call("path_readlink", "target", buf, 64, RESULT) == Errno.INVAL
    assert harness.symlink("dangling-target", "dangling") == 0
    assert harness.stat("dangling", follow=False).filetype == Filetype.SYMBOLIC_LINK
    ptr, length = harness.put("dangling")
    assert harness.call("path_filestat_get", PREOPEN, 1, ptr, length, RESULT) == Errno.NOENT


def test_hard_links_share_the_inode(harness: GuestHarness) -> None:
    make_file(harness, "one", b"shared")
    old_ptr, old_len = harness.put("one")
    new_ptr, new_len = harness.put("two")
    assert harness.call("path_link", PREOPEN, 0, old_ptr, old_len, PREOPEN, new_ptr, new_len) == 0
    assert harness.stat("one").nlink == 2
    assert harness.stat("two").ino == harness.stat("one").ino
    assert harness.call("path_link", PREOPEN, 0, old_ptr, old_len, PREOPEN, new_ptr, new_len) == Errno.EXIST
    assert harness.path_call("path_create_directory", "d") == 0
    dir_ptr, dir_len = harness.put("d")
    assert harness.call("path_link", PREOPEN, 0, dir_ptr, dir_len, PREOPEN, new_ptr, new_len) == Errno.PERM
    assert harness.path_call("path_unlink_file", "one") == 0
    assert harness.stat("two").nlink == 1


def test_rename_over_an_existing_file_and_directory(harness: GuestHarness) -> None:
    make_file(harness, "new", b"new contents")
    make_file(harness, "old", b"old")
    assert harness.rename("new", "old") == 0
    assert harness.stat("old").size == len(b"new contents")
    assert harness.open_errno("new") == Errno.NOENT
    assert harness.path_call("path_create_directory", "src") == 0
    make_file(harness, "src/inside", b"x")
    assert harness.path_call("path_create_directory", "empty") == 0
    assert harness.rename("src", "empty") == 0
    assert harness.stat("empty/inside").size == 1
    assert harness.path_call("path_create_directory", "full") == 0
    make_file(harness, "full/f")
    assert harness.rename("empty", "full") == Errno.NOTEMPTY
    assert harness.rename("old", "full") == Errno.ISDIR
    assert harness.rename("full", "old") == Errno.NOTDIR
    assert harness.rename("full", "full/sub") == Errno.INVAL
    assert harness.rename("missing", "x") == Errno.NOENT


def test_unlinked_open_file_stays_usable(harness: GuestHarness) -> None:
    make_file(harness, "doomed", b"still here")
    fd = harness.open("doomed")
    assert harness.path_call("path_unlink_file", "doomed") == 0
    assert harness.open_errno("doomed") == Errno.NOENT
    assert harness.read(fd, 100) == b"still here"
    assert harness.write(fd, b"!") == 1
    assert harness.fstat(fd).size == 11
    assert harness.fstat(fd).nlink == 0


def test_readdir_over_1000_entries_resumes_from_cookies(harness: GuestHarness) -> None:
    assert harness.path_call("path_create_directory", "many") == 0
    expected = {f"entry-{index:04d}" for index in range(1000)}
    for name in expected:
        make_file(harness, f"many/{name}")
    fd = harness.open("many", DIRECTORY, rights=Rights.DIRECTORY_BASE)
    names = harness.readdir_names(fd, buffer_size=200)
    assert names[:2] == [".", ".."]
    assert len(names) == 1002 and set(names[2:]) == expected
    # resuming from any cookie gives the rest, and a fresh read gives the same order
    assert harness.readdir_names(fd, buffer_size=4096) == names


def test_readdir_truncates_the_last_entry_to_fill_the_buffer(harness: GuestHarness) -> None:
    make_file(harness, "a-long-file-name")
    buf = harness.alloc(64)
    assert harness.call("fd_readdir", PREOPEN, buf, 60, 0, RESULT) == 0
    assert harness.u32(RESULT) == 60  # "." (25) + ".." (26) + 9 bytes of the next header
    d_next, _, namlen, d_type = struct.unpack_from("<QQIB", harness.memory, buf)
    assert (d_next, namlen, d_type) == (1, 1, Filetype.DIRECTORY)
    assert harness.call("fd_readdir", PREOPEN, buf, 64, 2, RESULT) == 0  # after ".."
    assert harness.u32(RESULT) == 24 + len("a-long-file-name")  # less than the buffer: the end
    assert harness.call("fd_readdir", PREOPEN, buf, 64, 1000, RESULT) == 0 and harness.u32(RESULT) == 0
    fd = harness.open("a-long-file-name")
    assert harness.call("fd_readdir", fd, buf, 64, 0, RESULT) == Errno.BADF


def test_prestat_and_renumber(harness: GuestHarness) -> None:
    assert harness.call("fd_prestat_get", PREOPEN, RESULT) == 0
    assert struct.unpack_from("<B3xI", harness.memory, RESULT) == (0, len("/sandbox"))
    buf = harness.alloc(16)
    assert harness.call("fd_prestat_dir_name", PREOPEN, buf, 16) == 0
    assert bytes(harness.memory[buf : buf + 8]) == b"/sandbox"
    assert harness.call("fd_prestat_dir_name", PREOPEN, buf, 4) == Errno.NAMETOOLONG
    assert harness.call("fd_prestat_get", 4, RESULT) == Errno.BADF
    assert harness.call("fd_prestat_get", 1, RESULT) == Errno.BADF
    assert harness.call("fd_prestat_dir_name", 1, buf, 16) == Errno.NOTDIR
    first = harness.open("a", CREAT)
    second = harness.open("b", CREAT)
    harness.write(first, b"from a")
    assert harness.call("fd_renumber", first, second) == 0
    assert harness.call("fd_tell", second, RESULT) == 0 and harness.u64(RESULT) == 6
    assert harness.call("fd_close", first) == Errno.BADF
    assert harness.call("fd_renumber", 77, second) == Errno.BADF
    assert harness.call("fd_close", second) == 0
    assert harness.call("fd_close", second) == Errno.BADF


def test_readdir_can_resume_from_a_cookie_on_a_fresh_handle(harness: GuestHarness) -> None:
    for name in ("one", "two", "three"):
        make_file(harness, name)
    first = harness.open(".", DIRECTORY, rights=Rights.DIRECTORY_BASE)
    names = harness.readdir_names(first)
    buf = harness.alloc(256)
    second = harness.open(".", DIRECTORY, rights=Rights.DIRECTORY_BASE)
    assert harness.call("fd_readdir", second, buf, 256, 3, RESULT) == 0  # after the first entry
    used = harness.u32(RESULT)
    rest = []
    offset = 0
    while offset < used:
        _, _, namlen, _ = struct.unpack_from("<QQIB", harness.memory, buf + offset)
        rest.append(bytes(harness.memory[buf + offset + 24 : buf + offset + 24 + namlen]).decode())
        offset += 24 + namlen
    assert rest == names[3:]
