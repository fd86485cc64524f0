"""`keep volume mount`: the encrypted volume through the kernel, with POSIX calls and real tools.

Every test mounts a real image in a real `keep` process (fuse_harness.MountedVolume), which is
always unmounted in teardown; the whole module is skipped with the reason where FUSE is missing.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from core_dumps import core_dumps_allowed
from fuse_harness import (
    MountedVolume,
    create_image,
    force_unmount,
    fuse_skip_reason,
    keep_ok,
    keep_volume,
)

pytestmark = [pytest.mark.fuse,
              pytest.mark.skipif(fuse_skip_reason() is not None, reason=str(fuse_skip_reason()))]

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100


@pytest.fixture(scope="module")
def pristine_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_image(tmp_path_factory.mktemp("fuse") / "base.img", "96M")


@pytest.fixture
def image(pristine_image: Path, tmp_path: Path) -> Path:
    """A fresh copy of one empty volume per test (creating one per test costs more)."""
    return Path(shutil.copyfile(pristine_image, tmp_path / "volume.img"))


@pytest.fixture
def mounted(image: Path, tmp_path: Path) -> Iterator[MountedVolume]:
    with MountedVolume(image, tmp_path / "mnt", "--commit-interval", "0.5") as mount:
        yield mount


def renameat2(old: Path, new: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(old))


def errno_of(call: object, *args: object) -> int:
    try:
        call(*args)  # type: ignore[operator]
    except OSError as error:
        assert error.errno is not None
        return error.errno
    raise AssertionError(f"{call} succeeded")


def fsck_clean(image: Path) -> None:
    assert keep_ok("fsck", image).strip().endswith("clean")


# -- POSIX calls through the kernel -------------------------------------------------------------


def test_files_read_write_at_offsets_truncate_and_sparse(mounted: MountedVolume) -> None:
    path = mounted.mountpoint / "data.bin"
    payload = os.urandom(300_000)
    path.write_bytes(payload)
    assert path.read_bytes() == payload
    with open(path, "r+b") as handle:
        handle.seek(4093)
        handle.write(b"XYZW")
        handle.seek(1_000_000)
        handle.write(b"tail")
    expected = bytearray(payload)
    expected[4093:4097] = b"XYZW"
    expected.extend(bytes(1_000_000 - len(expected)))
    expected.extend(b"tail")
    assert path.read_bytes() == bytes(expected)
    os.truncate(path, 5000)
    assert path.read_bytes() == bytes(expected[:5000])
    os.truncate(path, 9000)
    assert path.read_bytes() == bytes(expected[:5000]) + bytes(4000)
    assert os.stat(path).st_size == 9000


def test_namespace_operations_and_their_errno(mounted: MountedVolume) -> None:
    root = mounted.mountpoint
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "file").write_text("one")
    assert os.stat(root / "dir").st_nlink == 3
    assert errno_of(os.mkdir, root / "dir") == errno.EEXIST
    assert errno_of(os.rmdir, root / "dir") == errno.ENOTEMPTY
    assert errno_of(os.unlink, root / "dir") == errno.EISDIR
    assert errno_of(os.rmdir, root / "dir" / "file") == errno.ENOTDIR
    assert errno_of(os.stat, root / "missing") == errno.ENOENT
    assert errno_of(os.open, root / "dir" / "file" / "x", os.O_RDONLY) == errno.ENOTDIR
    assert errno_of(os.mkdir, root / ("n" * 256)) == errno.ENAMETOOLONG
    assert errno_of(os.rename, root / "dir", root / "dir" / "sub" / "inside") == errno.EINVAL
    os.link(root / "dir" / "file", root / "hard")
    assert os.stat(root / "hard").st_nlink == 2
    assert os.stat(root / "hard").st_ino == os.stat(root / "dir" / "file").st_ino
    assert errno_of(os.link, root / "dir", root / "dirlink") == errno.EPERM
    os.symlink("dir/file", root / "link")
    assert os.readlink(root / "link") == "dir/file"
    assert (root / "link").read_text() == "one"
    assert stat.S_ISLNK(os.lstat(root / "link").st_mode)
    os.rename(root / "hard", root / "renamed")
    (root / "other").write_text("two")
    os.rename(root / "other", root / "renamed")  # atomically replaces
    assert (root / "renamed").read_text() == "two"
    assert os.stat(root / "dir" / "file").st_nlink == 1
    os.rmdir(root / "dir" / "sub")
    assert os.stat(root / "dir").st_nlink == 2
    assert sorted(os.listdir(root)) == ["dir", "link", "renamed"]


def test_rename_noreplace_and_exchange(mounted: MountedVolume) -> None:
    root = mounted.mountpoint
    (root / "a").write_text("A")
    (root / "b").mkdir()
    (root / "b" / "inner").write_text("B")
    with pytest.raises(OSError) as refused:
        renameat2(root / "a", root / "b", RENAME_NOREPLACE)
    assert refused.value.errno == errno.EEXIST
    renameat2(root / "a", root / "b", RENAME_EXCHANGE)
    assert (root / "b").read_text() == "A"
    assert (root / "a" / "inner").read_text() == "B"
    with pytest.raises(OSError) as missing:
        renameat2(root / "a", root / "nothing", RENAME_EXCHANGE)
    assert missing.value.errno == errno.ENOENT
    renameat2(root / "b", root / "c", RENAME_NOREPLACE)
    assert (root / "c").read_text() == "A" and not (root / "b").exists()


def test_chmod_utimens_statfs_and_ls_la(mounted: MountedVolume) -> None:
    root = mounted.mountpoint
    path = root / "file.txt"
    path.write_bytes(b"x" * 12345)
    os.chmod(path, 0o640)
    os.utime(path, ns=(1_500_000_000_123_456_789, 1_600_000_000_987_654_321))
    info = os.stat(path)
    assert stat.S_IMODE(info.st_mode) == 0o640
    assert info.st_mtime_ns == 1_600_000_000_987_654_321
    assert info.st_atime_ns == 1_500_000_000_123_456_789
    (root / "sub").mkdir()
    os.link(path, root / "sub" / "second")
    listing = subprocess.run(["ls", "-la", "--time-style=+%Y-%m-%d", str(root)], capture_output=True,
                             text=True, check=True).stdout
    fields = next(row for row in listing.splitlines() if row.endswith(" file.txt")).split()
    assert (fields[0], fields[1], fields[4], fields[5]) == ("-rw-r-----", "2", "12345", "2020-09-13")
    sub_line = next(row for row in listing.splitlines() if row.endswith(" sub"))
    assert sub_line.startswith("drwx") and sub_line.split()[1] == "2"
    usage = os.statvfs(root)
    assert usage.f_bsize == 4096 and 0 < usage.f_bfree < usage.f_blocks
    assert usage.f_namemax == 255
    before = usage.f_bfree
    (root / "big").write_bytes(os.urandom(2 << 20))
    assert os.statvfs(root).f_bfree < before


def test_a_setgid_directory_passes_its_group_and_the_bit_on(mounted: MountedVolume) -> None:
    """As on a local filesystem: what is created in a set-group-ID directory gets the
    directory's group (not the creator's), and a new subdirectory inherits the bit, so a
    shared project directory stays shared. Without it the same directory is ordinary."""
    shared = mounted.mountpoint / "shared"
    shared.mkdir()
    os.chown(shared, 0, 4242)
    os.chmod(shared, 0o2775)
    (shared / "file").write_text("f")
    (shared / "sub").mkdir(mode=0o755)
    os.symlink("file", shared / "link")
    os.mknod(shared / "node", 0o644 | stat.S_IFREG)
    for name in ("file", "sub", "link", "node"):
        assert os.lstat(shared / name).st_gid == 4242, name
    assert os.stat(shared / "sub").st_mode & stat.S_ISGID
    assert not os.stat(shared / "file").st_mode & stat.S_ISGID
    (shared / "sub" / "deeper").mkdir()
    assert os.stat(shared / "sub" / "deeper").st_gid == 4242
    plain = mounted.mountpoint / "plain"
    plain.mkdir()
    os.chown(plain, 0, 4242)
    (plain / "file").write_text("f")
    (plain / "sub").mkdir()
    assert os.stat(plain / "file").st_gid == os.getgid()
    assert not os.stat(plain / "sub").st_mode & stat.S_ISGID


def test_the_mount_says_noatime_as_reads_leave_atime_alone(mounted: MountedVolume) -> None:
    """Reads do not update atime (each would be a write to the volume); the mount must say so
    (noatime, which tools like mutt and tmpreaper check) instead of the kernel's default
    relatime, under which the first read after a write updates atime. utimensat still sets it."""
    path = mounted.mountpoint / "read-me"
    path.write_text("r")
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))  # atime older than mtime
    assert path.read_text() == "r"
    assert os.stat(path).st_atime_ns == 1_000_000_000
    line = next(row for row in Path("/proc/self/mountinfo").read_text().splitlines()
                if row.split()[4] == str(mounted.mountpoint))
    assert "noatime" in line.split()[5].split(","), line
    assert os.statvfs(mounted.mountpoint).f_flag & os.ST_NOATIME


def test_xattrs(mounted: MountedVolume) -> None:
    path = mounted.mountpoint / "tagged"
    path.write_text("t")
    os.setxattr(path, "user.colour", b"blue")
    os.setxattr(path, "user.empty", b"")
    assert os.getxattr(path, "user.colour") == b"blue"
    assert sorted(os.listxattr(path)) == ["user.colour", "user.empty"]
    os.removexattr(path, "user.colour")
    assert os.listxattr(path) == ["user.empty"]
    assert errno_of(os.getxattr, path, "user.colour") == errno.ENODATA
    acl = b"\x02\x00\x00\x00\x01\x00\x06\x00\xff\xff\xff\xff\x04\x00\x04\x00\xff\xff\xff\xff" \
        b"\x20\x00\x04\x00\xff\xff\xff\xff"
    assert errno_of(os.setxattr, path, "system.posix_acl_access", acl) == errno.EOPNOTSUPP
    if shutil.which("getfattr"):
        shown = subprocess.run(["getfattr", "-d", str(path)], capture_output=True, text=True).stdout
        assert "user.empty" in shown


def test_open_unlinked_file_keeps_its_data_until_closed(mounted: MountedVolume) -> None:
    path = mounted.mountpoint / "ghost"
    with open(path, "w+b") as handle:
        handle.write(b"still here" * 1000)
        handle.flush()
        os.unlink(path)
        assert not path.exists()
        handle.seek(0)
        assert handle.read() == b"still here" * 1000
        handle.write(b"!")
        os.fsync(handle.fileno())
    assert os.listdir(mounted.mountpoint) == []
    assert mounted.stop() == 0
    fsck_clean(mounted.image)


def test_rewriting_a_file_with_o_trunc_drops_the_old_contents(mounted: MountedVolume) -> None:
    """open(O_TRUNC) reaches the filesystem only as a flag of open (libfuse 3's atomic O_TRUNC):
    a shorter rewrite must not keep the old tail, through the mount or in the volume."""
    root = mounted.mountpoint
    (root / "w").write_bytes(b"abcdef" * 3000)  # more than one block
    (root / "w").write_bytes(b"1")  # open("wb"): O_WRONLY | O_CREAT | O_TRUNC
    assert (root / "w").read_bytes() == b"1" and os.stat(root / "w").st_size == 1
    (root / "o").write_bytes(b"abcdef")
    fd = os.open(root / "o", os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.write(fd, b"xy")
    finally:
        os.close(fd)
    assert (root / "o").read_bytes() == b"xy" and os.stat(root / "o").st_size == 2
    assert mounted.stop() == 0
    assert keep_ok("cat", mounted.image, "/w") == "1"
    assert keep_ok("cat", mounted.image, "/o") == "xy"
    fsck_clean(mounted.image)


def test_a_directory_removed_while_open_answers_like_a_local_one(mounted: MountedVolume) -> None:
    """fstat of an open directory that was removed: nlink 0 (not ENOENT); listing it: empty;
    the inode is freed when the last descriptor closes."""
    directory = mounted.mountpoint / "d"
    directory.mkdir()
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(directory)
        info = os.fstat(fd)
        assert info.st_nlink == 0 and stat.S_ISDIR(info.st_mode)
        assert os.listdir(fd) == []
        assert errno_of(lambda: os.open("new", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)) == errno.ENOENT
    finally:
        os.close(fd)
    assert os.listdir(mounted.mountpoint) == []
    assert mounted.stop() == 0
    fsck_clean(mounted.image)


def test_unmount_commits_and_prints_the_final_state(mounted: MountedVolume) -> None:
    (mounted.mountpoint / "kept").write_text("kept")
    assert mounted.stop() == 0
    assert "committed: uuid " in mounted.output and "generation " in mounted.output
    assert "root MAC " in mounted.output
    generation = int(mounted.output.rsplit("generation ", 1)[1].split(",")[0])
    assert keep_ok("cat", mounted.image, "/kept") == "kept"
    info = keep_ok("info", mounted.image, "--json")
    assert f'"generation": {generation}' in info
    fsck_clean(mounted.image)


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_ctrl_c_unmount_cleanly(mounted: MountedVolume, number: int) -> None:
    (mounted.mountpoint / "f").write_text("written before the signal")
    assert mounted.signal(number) == 0
    assert not os.path.ismount(mounted.mountpoint)
    assert "unmounted" in mounted.output
    assert keep_ok("cat", mounted.image, "/f") == "written before the signal"


def _core_limits(pid: int) -> list[str]:
    """The soft and hard RLIMIT_CORE of process `pid`, as /proc shows them."""
    line = next(row for row in Path(f"/proc/{pid}/limits").read_text().splitlines()
                if row.startswith("Max core file size"))
    return line.split()[4:6]


def test_a_crashing_mount_leaves_no_core_dump_with_keys_or_plaintext(
        image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mount process holds the volume key and plaintext: even where the operator allows
    core dumps, a crash (here SIGQUIT) must not write them to the host's disk."""
    monkeypatch.chdir(tmp_path)  # a core file named by a plain core_pattern lands here
    with core_dumps_allowed():
        mount = MountedVolume(image, tmp_path / "mnt").start()
    try:
        (mount.mountpoint / "secret.txt").write_text("TOP SECRET PLAINTEXT")
        assert mount.process is not None
        assert _core_limits(mount.process.pid)[0] == "0"  # soft limit; not dumpable either
        assert mount.signal(signal.SIGQUIT) == -signal.SIGQUIT
    finally:
        mount.stop()
    assert not [path for path in tmp_path.rglob("core*") if path.is_file()]


def test_timer_commits_without_fsync_and_sigkill_leaves_a_consistent_volume(
        mounted: MountedVolume) -> None:
    root = mounted.mountpoint
    (root / "durable").write_bytes(b"d" * 10000)
    time.sleep(2.0)  # the 0.5 s commit timer has run
    mounted.kill()
    assert errno_of(os.stat, root) == errno.ENOTCONN
    again = keep_volume("mount", mounted.image, root)
    assert again.returncode == 1
    assert f"fusermount3 -u {root}" in again.stderr.decode()
    assert "stale" in again.stderr.decode()
    cleared = keep_volume("umount", root, passphrase=None)
    assert cleared.returncode == 0, cleared.stderr.decode()
    assert os.path.isdir(root) and not os.path.ismount(root)
    fsck_clean(mounted.image)
    assert keep_ok("cat", mounted.image, "/durable") == "d" * 10000


def test_fsync_commits_before_sigkill(image: Path, tmp_path: Path) -> None:
    with MountedVolume(image, tmp_path / "mnt", "--commit-interval", "0") as mount:
        with open(mount.mountpoint / "synced", "wb") as handle:
            handle.write(b"s" * 50000)
            os.fsync(handle.fileno())
        (mount.mountpoint / "unsynced").write_bytes(b"u")
        mount.kill()
    fsck_clean(image)
    assert keep_ok("cat", image, "/synced") == "s" * 50000


def test_volume_open_elsewhere_cannot_be_mounted(mounted: MountedVolume, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    refused = keep_volume("mount", mounted.image, other)
    assert refused.returncode == 1
    assert b"in use by another process" in refused.stderr
    assert not os.path.ismount(other)
    taken = keep_volume("mount", mounted.image, mounted.mountpoint)  # checked before the image
    assert taken.returncode == 1 and b"is already a mount point" in taken.stderr


def test_mount_errors_are_clear(image: Path, tmp_path: Path) -> None:
    missing = keep_volume("mount", image, tmp_path / "nowhere")
    assert missing.returncode == 1 and b"no such directory" in missing.stderr
    # --help promises "an empty directory": files there would be hidden under the mount
    # (the pin makes a regression fail at once instead of mounting in the foreground)
    not_empty = keep_volume("mount", image, tmp_path, "--volume-generation", "1000000")
    assert not_empty.returncode == 1
    assert not_empty.stderr == (f"keep: {tmp_path} is not empty (its files would be hidden "
                                "under the mount)\n").encode()
    empty = tmp_path / "empty"
    empty.mkdir()
    wrong = keep_volume("mount", image, empty, passphrase="wrong")
    assert wrong.returncode == 2 and b"wrong passphrase" in wrong.stderr
    rolled_back = keep_volume("mount", image, empty, "--volume-generation", "1000000")
    assert rolled_back.returncode == 1 and b"pinned generation 1000000" in rolled_back.stderr
    not_mounted = keep_volume("umount", tmp_path, passphrase=None)
    assert not_mounted.returncode == 1 and b"is not mounted" in not_mounted.stderr
    for interval in ("-1", "nan"):  # NaN compared false with 0 and silently meant "never"
        bad = keep_volume("mount", image, empty, "--commit-interval", interval)
        assert bad.returncode == 2, interval
        assert bad.stderr == b"keep: --commit-interval must be a number of seconds, 0 or more\n"


def test_read_only_mount_reads_and_refuses_writes(image: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "hello.txt").write_text("hello")
    keep_ok("import", image, source)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    with MountedVolume(image, tmp_path / "mnt", "--read-only") as mount:
        assert (mount.mountpoint / "hello.txt").read_text() == "hello"
        assert errno_of((mount.mountpoint / "new").write_text, "x") == errno.EROFS
        assert errno_of(os.unlink, mount.mountpoint / "hello.txt") == errno.EROFS
        assert errno_of(os.open, mount.mountpoint / "hello.txt", os.O_WRONLY | os.O_TRUNC) == errno.EROFS
        assert (mount.mountpoint / "hello.txt").read_text() == "hello"
        assert mount.stop() == 0
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest
    # nothing was committed, and the last line does not claim it was
    last = mount.output.strip().splitlines()[-1]
    assert last.startswith(f"unmounted {mount.mountpoint}; ") and "committed" not in last
    assert "unchanged (read-only)" in last and "generation " in last


@pytest.mark.slow
def test_a_tampered_sector_reads_as_eio_and_is_logged(image: Path, tmp_path: Path) -> None:
    """The host changes 16 bytes of ciphertext in the middle of a 40 MiB file's blocks."""
    payload = random.Random(3).randbytes(40 << 20)
    (tmp_path / "big").write_bytes(payload)
    keep_ok("put", image, tmp_path / "big", "/big")
    with open(image, "r+b") as raw:
        raw.seek(56 << 20)  # inside the data region, which the file fills from its start
        raw.write(b"\xff" * 16)
    with MountedVolume(image, tmp_path / "mnt") as mount:
        path = mount.mountpoint / "big"
        assert errno_of(path.read_bytes) == errno.EIO
        with open(path, "rb") as handle:
            assert handle.read(4096) == payload[:4096]  # the untouched sectors still read
        assert mount.stop() == 0
    assert "integrity failure during read" in mount.errors
    assert "was changed, moved or replayed (answered EIO)" in mount.errors


def test_allow_other_reaches_the_kernel(image: Path, tmp_path: Path) -> None:
    with MountedVolume(image, tmp_path / "mnt", "--allow-other") as mount:
        line = next(row for row in Path("/proc/self/mountinfo").read_text().splitlines()
                    if row.split()[4] == str(mount.mountpoint))
        assert "allow_other" in line.split(" - ", 1)[1] and "fuse.keep" in line


def _listxattr_as(uid: int, fd: int) -> list[str]:
    """flistxattr(fd) from a child process running as `uid` (the fd is inherited, so the
    mount point need not be reachable for that user)."""
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child reports through the pipe)
        status = 1
        try:
            os.setgid(uid)
            os.setuid(uid)
            os.write(writer, "\0".join(os.listxattr(fd)).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        names = pipe.read().decode()
    assert os.waitpid(child, 0)[1] == 0
    return sorted(names.split("\0")) if names else []


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to set trusted.* and to switch users")
def test_trusted_xattr_names_are_listed_to_privileged_callers_only(image: Path, tmp_path: Path) -> None:
    """As ext4 and tmpfs do: trusted.* is for privileged processes; others may not read its
    values (the kernel refuses) and do not see its names either (only we can filter those)."""
    with MountedVolume(image, tmp_path / "mnt", "--allow-other") as mount:
        path = mount.mountpoint / "tagged"
        path.write_text("t")
        os.setxattr(path, "trusted.overlay.origin", b"secret")
        os.setxattr(path, "user.visible", b"v")
        fd = os.open(path, os.O_RDONLY)
        try:
            assert sorted(os.listxattr(fd)) == ["trusted.overlay.origin", "user.visible"]
            assert _listxattr_as(65534, fd) == ["user.visible"]
        finally:
            os.close(fd)


def test_umount_command_waits_for_the_commit(mounted: MountedVolume) -> None:
    (mounted.mountpoint / "x").write_text("x")
    result = keep_volume("umount", mounted.mountpoint, passphrase=None)
    assert result.returncode == 0, result.stderr.decode()
    # the image lock is free at once: the mount process committed and let go
    assert keep_ok("cat", mounted.image, "/x") == "x"
    assert mounted.stop() == 0


@pytest.mark.skipif(os.getuid() != 0, reason="mounting a tmpfs needs root")
def test_umount_command_leaves_other_filesystems_alone(tmp_path: Path) -> None:
    """`keep volume umount` on a mount that is not a keep volume (a typo, a tmpfs, another
    FUSE filesystem) refuses with a clear error instead of unmounting it."""
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(other)], check=True)
    try:
        (other / "data").write_text("still here")
        result = keep_volume("umount", other, passphrase=None)
        assert result.returncode == 1
        assert result.stderr.decode() == f"keep: {other} is not a keep volume mount (it is tmpfs)\n"
        assert os.path.ismount(other) and (other / "data").read_text() == "still here"
    finally:
        subprocess.run(["umount", str(other)], check=False)


def test_umount_command_finds_a_mount_point_with_a_space(image: Path, tmp_path: Path) -> None:
    """/proc/self/mountinfo escapes a space as \\040: the keep mount is still recognised."""
    with MountedVolume(image, tmp_path / "my volume") as mount:
        (mount.mountpoint / "x").write_text("x")
        result = keep_volume("umount", mount.mountpoint, passphrase=None)
        assert result.returncode == 0, result.stderr.decode()
        assert not os.path.ismount(mount.mountpoint)
        # umount waited for the mount process to commit and let go of the image
        assert keep_ok("cat", image, "/x") == "x"
        assert mount.stop() == 0


def test_a_mount_point_given_through_a_symlink_is_unmounted_through_it(image: Path, tmp_path: Path) -> None:
    """The kernel mounts on the symlink's target; `keep volume umount` with the same path the
    operator gave `mount` finds that mount (and waits for its commit)."""
    (tmp_path / "real").mkdir()
    link = tmp_path / "link"
    link.symlink_to("real")
    with MountedVolume(image, link) as mount:
        (link / "x").write_text("x")
        result = keep_volume("umount", link, passphrase=None)
        assert result.returncode == 0, result.stderr.decode()
        assert not os.path.ismount(tmp_path / "real")
        assert keep_ok("cat", image, "/x") == "x"
        assert mount.stop() == 0
    assert mount.output.startswith(f"mounting {image} on {tmp_path / 'real'} (read-write; ")


def test_an_image_path_with_a_space_is_named_in_mountinfo(pristine_image: Path, tmp_path: Path) -> None:
    """The mount's source names the image (mountinfo escapes the space as \\040), so that
    `keep volume umount` knows which image to wait for."""
    (tmp_path / "my images").mkdir()
    image = Path(shutil.copyfile(pristine_image, tmp_path / "my images" / "v 1.img"))
    with MountedVolume(image, tmp_path / "mnt") as mount:
        line = next(row for row in Path("/proc/self/mountinfo").read_text().splitlines()
                    if row.split()[4] == str(mount.mountpoint))
        assert line.split(" - ", 1)[1].split()[1] == "keep:" + str(image).replace(" ", "\\040")
        (mount.mountpoint / "x").write_text("x")
        result = keep_volume("umount", mount.mountpoint, passphrase=None)
        assert result.returncode == 0, result.stderr.decode()
        assert keep_ok("cat", image, "/x") == "x"
        assert mount.stop() == 0


# -- real tools ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of /usr/include/linux plus a symlink, a hard link, an empty directory and odd modes."""
    root = tmp_path_factory.mktemp("source") / "tree"
    include = Path("/usr/include/linux")
    if include.is_dir():
        shutil.copytree(include, root / "linux", symlinks=True)
    else:
        (root / "linux").mkdir(parents=True)
        for index in range(300):
            (root / "linux" / f"h{index}.h").write_bytes(os.urandom(index * 37))
    (root / "empty").mkdir()
    (root / "tool.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "tool.sh", 0o751)
    os.symlink("linux", root / "link-to-linux")
    os.link(root / "tool.sh", root / "tool-hardlink.sh")
    (root / "big.bin").write_bytes(random.Random(7).randbytes(3 << 20))
    os.utime(root / "big.bin", ns=(1_234_567_890_000_000_000, 1_234_567_890_123_456_789))
    return root


@pytest.fixture(scope="module")
def tools_mount(pristine_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountedVolume]:
    """One mount shared by the real-tool tests (each works in its own directory)."""
    work = tmp_path_factory.mktemp("tools")
    image = create_image(work / "tools.img", "160M")
    mount = MountedVolume(image, work / "mnt").start()
    try:
        yield mount
    finally:
        mount.stop()
        force_unmount(mount.mountpoint)


def diff_trees(left: Path, right: Path) -> None:
    result = subprocess.run(["diff", "-r", "--no-dereference", str(left), str(right)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.mark.slow
def test_cp_a_and_diff_r(tools_mount: MountedVolume, source_tree: Path) -> None:
    target = tools_mount.mountpoint / "cp"
    subprocess.run(["cp", "-a", str(source_tree), str(target)], check=True, timeout=300)
    diff_trees(source_tree, target)
    copied = os.stat(target / "big.bin")
    assert copied.st_mtime_ns == 1_234_567_890_123_456_789
    assert stat.S_IMODE(os.stat(target / "tool.sh").st_mode) == 0o751
    assert os.stat(target / "tool.sh").st_ino == os.stat(target / "tool-hardlink.sh").st_ino
    assert os.readlink(target / "link-to-linux") == "linux"


@pytest.mark.slow
def test_tar_round_trip(tools_mount: MountedVolume, source_tree: Path, tmp_path: Path) -> None:
    archive = tmp_path / "tree.tar"
    subprocess.run(["tar", "-cf", str(archive), "-C", str(source_tree.parent), source_tree.name],
                   check=True, timeout=120)
    target = tools_mount.mountpoint / "tar"
    target.mkdir()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(target)], check=True, timeout=300)
    diff_trees(source_tree, target / source_tree.name)
    again = tmp_path / "again.tar"
    subprocess.run(["tar", "-cf", str(again), "-C", str(target), source_tree.name], check=True,
                   timeout=300)
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["tar", "-xf", str(again), "-C", str(unpacked)], check=True, timeout=120)
    diff_trees(source_tree, unpacked / source_tree.name)


@pytest.mark.slow
def test_rsync_a(tools_mount: MountedVolume, source_tree: Path) -> None:
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed")
    target = tools_mount.mountpoint / "rsync"
    subprocess.run(["rsync", "-aH", f"{source_tree}/", f"{target}/"], check=True, timeout=300)
    diff_trees(source_tree, target)
    assert os.stat(target / "big.bin").st_mtime == os.stat(source_tree / "big.bin").st_mtime
    # a second run finds nothing to do
    again = subprocess.run(["rsync", "-aHi", f"{source_tree}/", f"{target}/"], check=True,
                           capture_output=True, text=True, timeout=300)
    assert again.stdout.strip() == ""


@pytest.mark.slow
def test_sqlite3_transactions_and_integrity_check(tools_mount: MountedVolume) -> None:
    if shutil.which("sqlite3") is None:
        pytest.skip("sqlite3 is not installed (Debian package sqlite3)")
    directory = tools_mount.mountpoint / "sqlite"
    directory.mkdir()
    database = directory / "test.db"
    statements = ["PRAGMA journal_mode=WAL;", "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);"]
    statements += [f"INSERT INTO t(v) VALUES ('row {index} {'x' * (index % 50)}');"
                   for index in range(3000)]
    statements += ["BEGIN; UPDATE t SET v = v || '!' WHERE id % 7 = 0; DELETE FROM t WHERE id % 11 = 0;"
                   " COMMIT;", "VACUUM;"]
    subprocess.run(["sqlite3", str(database)], input="\n".join(statements), text=True, check=True,
                   timeout=600)
    query = "PRAGMA integrity_check; SELECT count(*), sum(length(v)) FROM t;"
    result = subprocess.run(["sqlite3", str(database), query], capture_output=True, text=True,
                            check=True, timeout=120).stdout.split()
    expected_rows = 3000 - 3000 // 11
    assert result[0] == "ok"
    assert result[1].split("|")[0] == str(expected_rows)


@pytest.mark.slow
def test_git_init_and_commit(tools_mount: MountedVolume, source_tree: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repository = tools_mount.mountpoint / "git"
    (repository / "src").mkdir(parents=True)
    for header in sorted((source_tree / "linux").glob("*.h"))[:150]:
        shutil.copy2(header, repository / "src" / header.name)
    environment = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
                   "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org",
                   "HOME": str(repository)}

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repository), *args], env=environment, check=True,
                              capture_output=True, text=True, timeout=300).stdout

    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    (repository / "src" / "new.txt").write_text("new\n")
    git("add", ".")
    git("commit", "-q", "-m", "second")
    assert git("rev-list", "--count", "HEAD").strip() == "2"
    git("fsck", "--strict")
    assert git("status", "--porcelain").strip() == ""


@pytest.mark.slow
def test_fsx_random_operations_match_a_shadow_file(tools_mount: MountedVolume, tmp_path: Path) -> None:
    """fsx-style: seeded random writes, reads, truncates on the mount and on a host shadow file."""
    rng = random.Random(20261127)
    target = tools_mount.mountpoint / "fsx.bin"
    shadow = tmp_path / "shadow.bin"
    limit = 1 << 20
    with open(target, "w+b", buffering=0) as ours, open(shadow, "w+b", buffering=0) as theirs:
        for step in range(3000):
            choice = rng.random()
            size = os.fstat(theirs.fileno()).st_size
            if choice < 0.45:
                offset = rng.randrange(0, limit)
                data = rng.randbytes(rng.choice([1, 7, 512, 4096, 5000, 70000]))
                assert os.pwrite(ours.fileno(), data, offset) == len(data)
                os.pwrite(theirs.fileno(), data, offset)
            elif choice < 0.85:
                offset = rng.randrange(0, max(size, 1) + 8192)
                length = rng.choice([1, 100, 4096, 9000, 65536])
                assert os.pread(ours.fileno(), length, offset) == os.pread(theirs.fileno(), length, offset), step
            elif choice < 0.97:
                length = rng.randrange(0, limit)
                os.ftruncate(ours.fileno(), length)
                os.ftruncate(theirs.fileno(), length)
            else:
                os.fsync(ours.fileno())
            assert os.fstat(ours.fileno()).st_size == os.fstat(theirs.fileno()).st_size, step
    assert target.read_bytes() == shadow.read_bytes()


@pytest.mark.slow
def test_after_unmount_fsck_is_clean_and_export_gives_the_same_tree(
        tools_mount: MountedVolume, tmp_path: Path) -> None:
    """Runs last in this module: snapshot the mount with cp -a, unmount, fsck, export, compare."""
    snapshot = tmp_path / "snapshot"
    subprocess.run(["cp", "-a", str(tools_mount.mountpoint), str(snapshot)], check=True, timeout=600)
    assert tools_mount.stop() == 0
    fsck_clean(tools_mount.image)
    exported = tmp_path / "exported"
    keep_ok("export", tools_mount.image, exported)
    diff_trees(snapshot, exported)


def test_umount_with_stdout_closed_unmounts_and_says_so_by_its_status(mounted: MountedVolume) -> None:
    """`keep volume umount MNT >&-`: the unmount and its commit happen, and the status is 0; only
    the 'unmounted' line is lost (9fd0a5d made a closed stdout a write error for volume output,
    and the line's EBADF made a done unmount exit 1)."""
    (mounted.mountpoint / "y").write_text("y")
    result = subprocess.run(["bash", "-c", '"$@" >&-', "_", sys.executable, "-m", "shim", "volume", "umount",
                             str(mounted.mountpoint)], capture_output=True, timeout=300)
    assert (result.returncode, result.stderr) == (0, b"")
    assert keep_ok("cat", mounted.image, "/y") == "y"
    assert mounted.stop() == 0
