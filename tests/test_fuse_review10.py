"""Session-10 review of `keep volume mount`: what programs see through a real FUSE mount,
compared with what Linux's own filesystems (tmpfs, ext4) do.

Each test mounts a real image in a real `keep` process (fuse_harness.MountedVolume, always
unmounted in teardown) and checks with POSIX calls, from root and from another user.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
import trio
import trio.testing
from fuse_harness import MountedVolume, create_image, force_unmount, fuse_skip_reason, keep_volume

pyfuse3 = pytest.importorskip("pyfuse3", reason="pyfuse3 is not installed (pip install keepshim[fuse])")
from pyfuse3 import RequestContext  # noqa: E402

from shim.fuse import FuseOperations, _commit_periodically  # noqa: E402
from storage.fs import ROOT_INODE  # noqa: E402
from storage.luks2 import KdfCost  # noqa: E402
from storage.volume import create_volume  # noqa: E402

pytestmark = [pytest.mark.fuse,
              pytest.mark.skipif(fuse_skip_reason() is not None, reason=str(fuse_skip_reason()))]

NOBODY = 65534


@dataclass(frozen=True)
class _Context:
    """Stands in for pyfuse3.RequestContext (only uid and gid are read)."""

    uid: int = 0
    gid: int = 0


_ROOT = cast(RequestContext, _Context())


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One empty volume, copied for each test (creating one per test costs more)."""
    return create_image(tmp_path_factory.mktemp("fuse10") / "base.img", "32M")


@pytest.fixture
def shared_mount(pristine: Path, tmp_path: Path) -> Iterator[MountedVolume]:
    """A mount other users may use (--allow-other), as a shared directory would be."""
    image = Path(shutil.copyfile(pristine, tmp_path / "volume.img"))
    with MountedVolume(image, tmp_path / "mnt", "--allow-other") as mount:
        yield mount


def _as_user(uid: int, directory: Path, action: Callable[[int], None]) -> int:
    """Run `action(dirfd)` in a child process as `uid` (and gid `uid`), with `directory`
    opened before the switch (the test's tmp dirs are not reachable by other users); the
    errno it failed with, or 0."""
    dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    child = os.fork()
    if child == 0:  # pragma: no cover (the child reports through its exit status)
        status = 255
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            action(dirfd)
            status = 0
        except OSError as error:
            status = error.errno or 254
        finally:
            os._exit(status)
    os.close(dirfd)
    return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])


def _truncate_by_open(dirfd: int) -> None:
    os.close(os.open("shared", os.O_WRONLY | os.O_TRUNC, dir_fd=dirfd))


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to switch users")
def test_o_trunc_by_another_user_clears_set_user_and_group_id(shared_mount: MountedVolume) -> None:
    """`: > file` (open with O_TRUNC) by a user other than root empties a set-user-ID file
    writable by all: Linux filesystems then drop S_ISUID (and S_ISGID with group execute), as
    a write does, so nobody plants a setuid program. libfuse's atomic O_TRUNC leaves that to
    us (the kernel sends no setattr), and the bits stayed: 6777 after the truncation."""
    path = shared_mount.mountpoint / "shared"
    path.write_bytes(b"#!/bin/sh\n")
    os.chmod(path, 0o6777)
    assert _as_user(NOBODY, shared_mount.mountpoint, _truncate_by_open) == 0
    after = os.stat(path)
    assert after.st_size == 0
    assert stat.S_IMODE(after.st_mode) == 0o777

    # without group execute, S_ISGID goes only if the caller is not in the file's group
    path.write_bytes(b"x")
    os.chmod(path, 0o6766)
    assert _as_user(NOBODY, shared_mount.mountpoint, _truncate_by_open) == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o766
    path.write_bytes(b"x")
    os.chown(path, 0, NOBODY)
    os.chmod(path, 0o2766)
    assert _as_user(NOBODY, shared_mount.mountpoint, _truncate_by_open) == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o2766

    # root (CAP_FSETID) keeps them, as on a local filesystem
    os.chmod(path, 0o6777)
    os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o6777


def test_errno_helper_reports_failures(shared_mount: MountedVolume) -> None:
    """The child helper itself: a refused open comes back as its errno (so a 0 above means
    the call succeeded, not that the child could not report)."""
    if os.getuid() != 0:
        pytest.skip("needs root to switch users")
    path = shared_mount.mountpoint / "shared"
    path.write_bytes(b"x")
    os.chmod(path, 0o644)
    assert _as_user(NOBODY, shared_mount.mountpoint, _truncate_by_open) == errno.EACCES


def test_xattr_names_outside_linux_namespaces_are_refused(shared_mount: MountedVolume) -> None:
    """tmpfs and ext4 refuse an xattr name outside user., trusted., security. (and system.)
    with EOPNOTSUPP, and a namespace with nothing after it with EINVAL; the kernel leaves that
    check to FUSE filesystems, and the mount stored 'foo.x', 'x' and 'user.', which no other
    filesystem takes (`cp -a` / `rsync -X` out of the mount then failed on them)."""
    path = shared_mount.mountpoint / "tagged"
    path.write_bytes(b"x")
    for name in ("foo.x", "x", "User.x", "userx", "system.foo"):
        with pytest.raises(OSError) as refused:
            os.setxattr(path, name, b"1")
        assert refused.value.errno == errno.EOPNOTSUPP, name
    for name in ("user.", "trusted.", "security."):
        with pytest.raises(OSError) as refused:
            os.setxattr(path, name, b"1")
        assert refused.value.errno == errno.EINVAL, name
    for name in ("user.a", "trusted.b", "security.c"):
        os.setxattr(path, name, b"v")
    assert sorted(os.listxattr(path)) == ["security.c", "trusted.b", "user.a"]


def test_a_dead_read_only_mount_beside_a_live_one_is_stale(pristine: Path, tmp_path: Path) -> None:
    """Two read-only mounts of one image share its lock; the second's process is SIGKILLed.
    Its mount point is stale, but the image's lock (still held, shared, by the first) made it
    look live: `mount` on it said 'already a mount point' instead of naming fusermount3, and
    `umount` waited 30 s for the image to be let go and failed saying the keep process still
    held it. A live mount listens on its report socket; a dead one does not."""
    image = Path(shutil.copyfile(pristine, tmp_path / "volume.img"))
    with MountedVolume(image, tmp_path / "first", "--read-only") as first:
        second = MountedVolume(image, tmp_path / "second", "--read-only").start()
        try:
            second.kill()
            again = keep_volume("mount", image, second.mountpoint, "--read-only")
            assert again.returncode == 1
            assert b"stale FUSE mount" in again.stderr and b"fusermount3 -u" in again.stderr
            cleared = keep_volume("umount", second.mountpoint, passphrase=None)
            assert cleared.returncode == 0, cleared.stderr.decode()
            assert cleared.stdout.decode().startswith("cleared the stale mount on")
        finally:
            force_unmount(second.mountpoint)
        # the live one is not taken for dead: it is still a mount point, and unmounts as one
        assert os.listdir(first.mountpoint) == []
        live = keep_volume("mount", image, first.mountpoint, "--read-only")
        assert live.returncode == 1 and b"already a mount point" in live.stderr
        done = keep_volume("umount", first.mountpoint, passphrase=None)
        assert done.returncode == 0, done.stderr.decode()
        assert done.stdout.decode() == f"unmounted {first.mountpoint}\n"


class _CountingOperations(FuseOperations):
    """Counts how often the commit timer looks at `dirty` (once per wake-up)."""

    looks = 0

    @property
    def dirty(self) -> bool:
        self.looks += 1
        return super().dirty


async def test_the_commit_timer_sleeps_while_nothing_changes(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """An idle mount's timer woke every --commit-interval seconds to find nothing to commit:
    with --commit-interval 0.000001 the idle mount process used a whole CPU (201 clock ticks
    in 2 s, measured). It now waits for a change, then commits `interval` later. Virtual time
    (trio's autojump clock): 10 s idle at a 1 ms interval must not wake it."""
    with create_volume(tmp_path / "v.img", 24 << 20, b"pw", kdf_cost=KdfCost(1, 8192, 1)) as volume:
        operations = _CountingOperations(volume)
        generation = volume.state().generation
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_commit_periodically, operations, 0.001)
            await trio.sleep(10)
            assert operations.looks == 0
            await operations.mkdir(ROOT_INODE, b"d", 0o755, _ROOT)
            await trio.sleep(0.01)
            assert not operations.dirty  # committed by the timer
            assert volume.state().generation > generation
            looks = operations.looks
            await trio.sleep(10)
            assert operations.looks == looks  # idle again after that commit
            nursery.cancel_scope.cancel()


class _FailingCommits:
    """Stands in for FuseOperations in the commit timer: always dirty, a change every wait, and
    commits that fail with `errors` in turn (None: success)."""

    def __init__(self, errors: list[OSError | None]) -> None:
        self.errors = errors
        self.commits = 0
        self.dirty = True
        self.generation = 1

    async def wait_for_change(self) -> None:
        await trio.sleep(0)

    def commit(self) -> None:
        error = self.errors[min(self.commits, len(self.errors) - 1)]
        self.commits += 1
        if error is not None:
            raise error
        self.generation += 1


async def test_a_failing_timed_commit_is_reported_once_a_minute_not_every_interval(
        autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    """A host disk that stays full made the timer log 'timed commit failed' every interval (5 s:
    720 lines an hour). Now: the first failure, a changed reason, then one line a minute with
    the count; the first success after failures says so. Virtual time: 10 minutes at 5 s."""
    full = OSError(errno.ENOSPC, "No space left on device")
    broken = OSError(errno.EIO, "Input/output error")
    operations = _FailingCommits([full] * 100 + [broken] * 10 + [None])
    with caplog.at_level("WARNING", logger="keep.fuse"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_commit_periodically, operations, 5.0)
            await trio.sleep(5 * 112 + 2.5)
            nursery.cancel_scope.cancel()
    assert operations.commits == 112
    lines = [record.getMessage() for record in caplog.records]
    # ENOSPC at 5 s, then at 65, 125, ... 485 s (9 lines for 100 failures over 500 s)
    assert lines[0] == "timed commit failed: [Errno 28] No space left on device"
    assert lines[1] == "timed commit failed: [Errno 28] No space left on device (13 timed commits failed in a row)"
    assert len([line for line in lines if "Errno 28" in line]) == 9
    assert lines[9] == "timed commit failed: [Errno 5] Input/output error (101 timed commits failed in a row)"
    assert lines[10:] == ["timed commit succeeded after 110 failed"]


async def test_a_commit_by_other_means_ends_the_run_of_timed_commit_failures(
        autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    """Timed commits fail, an fsync's commit goes through (the generation moves on), then the
    timed ones fail again: the new failure is reported at once and counted from one, not as
    'N failed in a row' nor held back until the minute is up."""
    full = OSError(errno.ENOSPC, "No space left on device")
    operations = _FailingCommits([full] * 10)
    with caplog.at_level("WARNING", logger="keep.fuse"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_commit_periodically, operations, 5.0)
            await trio.sleep(5 * 3 + 2.5)  # three failures: one line
            operations.generation += 1  # an fsync committed meanwhile
            await trio.sleep(5 * 2)  # two more failures
            nursery.cancel_scope.cancel()
    lines = [record.getMessage() for record in caplog.records]
    assert lines == ["timed commit failed: [Errno 28] No space left on device"] * 2
