"""`keep volume umount` reports the outcome of the mount process's commit at unmount.

The mount process commits (and closes the image) after the kernel has unmounted. `umount` used
to wait only for the image's lock to be let go and then said "unmounted MNT", exit 0, also when
that final commit had failed and the last changes were lost: `keep volume umount MNT && ship
IMG` shipped an image without them. Each test mounts a real image in a real `keep` process
(fuse_harness.MountedVolume, always unmounted in teardown) and runs the real `keep volume umount`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuse_harness import (
    PASSPHRASE,
    MountedVolume,
    create_image,
    fuse_skip_reason,
    keep_volume,
)

from shim.fuse import report_address

pytestmark = [pytest.mark.fuse,
              pytest.mark.skipif(fuse_skip_reason() is not None, reason=str(fuse_skip_reason()))]

_WAIT = 60.0  # generous bound for a process to end under load (never asserted as a timing)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One empty volume, copied for each test (creating one per test costs more)."""
    return create_image(tmp_path_factory.mktemp("umount-status") / "base.img", "64M")


def _is_mounted(mountpoint: Path) -> bool:
    table = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="surrogateescape")
    return any(line.split()[4] == str(mountpoint) for line in table.splitlines())


def _umount(mountpoint: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "shim", "volume", "umount", str(mountpoint)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(process: subprocess.Popen[bytes]) -> tuple[int, str, str]:
    """Wait for `process` (killed if it has not ended within _WAIT): status, stdout, stderr."""
    try:
        out, err = process.communicate(timeout=_WAIT)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"keep volume umount did not end: {err.decode()}") from None
    return process.returncode, out.decode(), err.decode()


@contextlib.contextmanager
def _small_host_filesystem(directory: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on `directory` for the block: a host disk that can fill up."""
    directory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


@contextlib.contextmanager
def _listen_in(mount: MountedVolume) -> Iterator[list[bytes]]:
    """Connect to the mount process's report socket as `umount` does and, when the block ends,
    put into the list everything the process sent on it (what any local process can hear)."""
    overheard: list[bytes] = []
    source = "keep:" + os.path.abspath(mount.image)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.connect(report_address(str(mount.mountpoint), source))
        yield overheard
        listener.settimeout(_WAIT)
        received = b""
        while chunk := listener.recv(65536):
            received += chunk
        overheard.append(received)


@pytest.mark.skipif(os.getuid() != 0, reason="mounting a tmpfs needs root")
def test_umount_reports_a_commit_at_unmount_that_failed(pristine: Path, tmp_path: Path) -> None:
    """The (sparse) image lives on a host filesystem that fills up: the commit at unmount fails
    with ENOSPC. The mount process said so; `keep volume umount` said 'unmounted MNT', exit 0.
    It now repeats the mount process's line and exits 1, as the mount process does."""
    with _small_host_filesystem(tmp_path / "host", "12m") as host:
        image = host / "v.img"
        subprocess.run(["cp", "--sparse=always", str(pristine), str(image)], check=True)
        with MountedVolume(image, tmp_path / "mnt", "--commit-interval", "0") as mount:
            # the host may fill up during the write already: nothing is committed either way
            with contextlib.suppress(OSError), open(mount.mountpoint / "big", "wb") as sink:
                sink.write(os.urandom(24 << 20))
            with _listen_in(mount) as overheard:
                status, out, err = _finish(_umount(mount.mountpoint))
                assert mount.wait() == 1
        expected = (f"unmounted {mount.mountpoint}, but the commit at unmount failed: {image}: "
                    "no space left on device (the image holds generation 2; later changes are lost)")
        assert (status, out, err) == (1, "", f"keep: {expected}\n")
        assert not _is_mounted(mount.mountpoint)
        assert mount.errors.strip().splitlines()[-1] == f"keep: {expected}"  # as the mount said
        # all that crossed between the two processes: the outcome, nothing of the key
        assert overheard == [f"failed {expected}\n".encode()]


def test_a_successful_umount_says_unmounted_and_exits_0(pristine: Path, tmp_path: Path) -> None:
    """The commit at unmount succeeded: 'unmounted MNT', exit 0, and the change is in the image
    (umount returned after the mount process had committed and let go of it)."""
    image = Path(shutil.copyfile(pristine, tmp_path / "v.img"))
    with MountedVolume(image, tmp_path / "mnt", "--commit-interval", "0") as mount:
        (mount.mountpoint / "kept").write_text("kept")
        with _listen_in(mount) as overheard:
            status, out, err = _finish(_umount(mount.mountpoint))
        assert (status, out, err) == (0, f"unmounted {mount.mountpoint}\n", "")
        assert overheard == [b"ok\n"] and PASSPHRASE.encode() not in b"".join(overheard)
        assert keep_volume("cat", image, "/kept").stdout == b"kept"
        assert mount.wait() == 0
    assert "committed" in mount.output


def test_umount_of_a_read_only_mount_says_unmounted(pristine: Path, tmp_path: Path) -> None:
    """A read-only mount has nothing to commit: its close is the outcome, reported as success."""
    image = Path(shutil.copyfile(pristine, tmp_path / "v.img"))
    with MountedVolume(image, tmp_path / "mnt", "--read-only") as mount:
        status, out, err = _finish(_umount(mount.mountpoint))
        assert (status, out, err) == (0, f"unmounted {mount.mountpoint}\n", "")
        assert mount.wait() == 0


@contextlib.contextmanager
def _stopped_mount(pristine: Path, tmp_path: Path, name: str) -> Iterator[
        tuple[MountedVolume, subprocess.Popen[bytes]]]:
    """A mount (no timed commits) with file `name` not yet committed, whose process is then
    stopped (SIGSTOP, as Ctrl-Z): the mount and its process, unmounted after the block."""
    image = Path(shutil.copyfile(pristine, tmp_path / "v.img"))
    with MountedVolume(image, tmp_path / "mnt", "--commit-interval", "0") as mount:
        assert mount.process is not None
        (mount.mountpoint / name).write_text(name)
        time.sleep(1.2)  # past the kernel's cached attributes of the mount point (ATTR_TIMEOUT)
        mount.process.send_signal(signal.SIGSTOP)
        yield mount, mount.process


def test_umount_reports_a_mount_process_killed_before_its_commit(pristine: Path, tmp_path: Path) -> None:
    """The mount process is stopped while `umount` waits for its commit, then SIGKILLed (the
    OOM killer, an operator's kill -9): its changes since the last commit are gone. `umount`
    waited for the image's lock, which the death let go, and said 'unmounted', exit 0. It now
    sees the process's end at once and says that it ended without reporting, exit 1."""
    with _stopped_mount(pristine, tmp_path, "lost") as (mount, process):
        umount = _umount(mount.mountpoint)
        try:
            deadline = time.monotonic() + _WAIT
            while _is_mounted(mount.mountpoint) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _is_mounted(mount.mountpoint), "keep volume umount did not unmount"
            assert umount.poll() is None  # it waits for the stopped process's report
        finally:
            process.kill()
        status, out, err = _finish(umount)
        assert mount.wait() == -signal.SIGKILL
    assert (status, out) == (1, "")
    assert err == (f"keep: unmounted {mount.mountpoint}, but the keep process serving it ended without "
                   "reporting its commit at unmount (was it killed?): the changes since its last "
                   "commit may be lost\n")
    assert keep_volume("cat", mount.image, "/lost").returncode == 1  # indeed lost


@pytest.mark.slow  # waits out umount's 30 s bound
def test_umount_of_a_mount_process_that_stays_stopped_ends_with_a_clear_error(
        pristine: Path, tmp_path: Path) -> None:
    """The mount process stays stopped (Ctrl-Z in its terminal): `umount` unmounts, waits a
    bounded time for the commit at unmount and then says so, exit 1, instead of hanging or
    claiming success; the process, resumed, still commits."""
    with _stopped_mount(pristine, tmp_path, "kept") as (mount, process):
        try:
            status, out, err = _finish(_umount(mount.mountpoint))
        finally:
            process.send_signal(signal.SIGCONT)
        assert mount.wait() == 0
    assert (status, out) == (1, "")
    assert err == (f"keep: unmounted {mount.mountpoint}, but the keep process serving it has not "
                   f"finished its commit at unmount after 30 s: is it stopped or hung? (it still "
                   f"holds {mount.image})\n")
    assert keep_volume("cat", mount.image, "/kept").stdout == b"kept"


_SQUATTER = """
import os, socket, sys
os.setgid(65534); os.setuid(65534)
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(bytes.fromhex(sys.argv[1]))
listener.listen(8)
print("ready", flush=True)
while True:
    connection, _ = listener.accept()
    connection.sendall(b"ok\\n")
    connection.close()
"""


@pytest.mark.skipif(os.getuid() != 0, reason="taking another uid needs root")
def test_umount_does_not_believe_another_user_squatting_the_report_socket(
        pristine: Path, tmp_path: Path) -> None:
    """Another local user binds the report socket's name before the mount and answers "ok" to
    everyone. The mount goes on and warns; `umount` checks who listens (SO_PEERCRED against
    the mount's user_id), does not believe the squatter and says it got no report, exit 1."""
    image = Path(shutil.copyfile(pristine, tmp_path / "v.img"))
    mountpoint = tmp_path / "mnt"
    address = report_address(str(mountpoint), "keep:" + str(image))
    squatter = subprocess.Popen([sys.executable, "-c", _SQUATTER, address.hex()], stdout=subprocess.PIPE)
    try:
        assert squatter.stdout is not None and squatter.stdout.readline() == b"ready\n"
        with MountedVolume(image, mountpoint, "--commit-interval", "0") as mount:
            status, out, err = _finish(_umount(mount.mountpoint))
            assert mount.wait() == 0
    finally:
        squatter.kill()
        squatter.wait()
    assert "warning: `keep volume umount` cannot learn how this mount's final commit ends" in mount.errors
    assert (status, out) == (1, "")
    assert err == (f"keep: unmounted {mountpoint}, but no report of its commit at unmount came from the "
                   "keep process serving it (an older keep? another network namespace? its report "
                   f"socket taken?): check that process's output before trusting {image}\n")
