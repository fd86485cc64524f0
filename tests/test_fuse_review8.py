"""Session-8 review of `keep volume mount`: what the kernel is told through a real FUSE mount.

Each test mounts a real image in a real `keep` process (fuse_harness.MountedVolume, always
unmounted in teardown) and checks with POSIX calls what an operator's tools would see.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import pty
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fuse_harness import (
    MOUNT_TIMEOUT,
    PASSPHRASE,
    UNMOUNT_TIMEOUT,
    MountedVolume,
    create_image,
    force_unmount,
    fuse_skip_reason,
    keep_volume,
    mount_source,
)

pytestmark = [pytest.mark.fuse,
              pytest.mark.skipif(fuse_skip_reason() is not None, reason=str(fuse_skip_reason()))]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One empty volume, copied for each test (creating one per test costs more)."""
    return create_image(tmp_path_factory.mktemp("fuse8") / "base.img", "64M")


def fresh_image(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copyfile(pristine, tmp_path / "volume.img"))


@pytest.fixture
def quiet_mount(pristine: Path, tmp_path: Path) -> Iterator[MountedVolume]:
    """No timed commits: what is pending in memory stays pending while the test looks."""
    with MountedVolume(fresh_image(pristine, tmp_path), tmp_path / "mnt", "--commit-interval", "0") as mount:
        yield mount


def _overwrite_in_place(path: Path) -> None:
    """A write inside the file over blocks it already has (storage's fast path, whose new
    mtime/ctime wait in memory until the next change or commit)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"H", 0) == 1
    finally:
        os.close(fd)


def test_times_set_right_after_an_in_place_write_are_what_stat_shows(quiet_mount: MountedVolume) -> None:
    """utimensat, chmod and link right after an overwrite: the kernel caches the attributes the
    reply carries, so a reply holding the overwrite's pending times instead of the new ones made
    `touch -d`, then `stat`, show the old mtime (and chmod or ln the old ctime) for a second."""
    path = quiet_mount.mountpoint / "f"
    path.write_bytes(b"x" * 10000)
    _overwrite_in_place(path)
    os.utime(path, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    assert os.stat(path).st_mtime_ns == 1_000_000_000_000_000_000

    _overwrite_in_place(path)
    written = os.stat(path).st_ctime_ns
    time.sleep(0.01)  # a clock tick between the write's ctime and the chmod's
    os.chmod(path, 0o600)
    changed = os.stat(path)
    assert changed.st_mode & 0o777 == 0o600
    assert changed.st_ctime_ns > written

    _overwrite_in_place(path)
    written = os.stat(path).st_ctime_ns
    time.sleep(0.01)
    os.link(path, quiet_mount.mountpoint / "second")
    linked = os.stat(path)
    assert linked.st_nlink == 2 and linked.st_ctime_ns > written


def _is_mounted(mountpoint: Path) -> bool:
    table = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="surrogateescape")
    return any(line.split()[4] == str(mountpoint) for line in table.splitlines())


def _mount_process(image: Path, mountpoint: Path, **options: Any) -> subprocess.Popen[bytes]:
    """`keep volume mount IMAGE MOUNTPOINT` in the foreground, keyed through the environment;
    `options` go to Popen (its stdout, stderr, preexec_fn)."""
    return subprocess.Popen(
        [sys.executable, "-m", "shim", "volume", "mount", str(image), str(mountpoint),
         "--passphrase-env", "KEEP_TEST_KEY"],
        env={**os.environ, "KEEP_TEST_KEY": PASSPHRASE}, **options)


def _wait_until_mounted(process: subprocess.Popen[bytes], mountpoint: Path) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not _is_mounted(mountpoint):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.slow  # ten mounts: about 17 s on this machine under load
def test_a_signal_as_soon_as_the_mount_appears_still_unmounts(pristine: Path, tmp_path: Path) -> None:
    """SIGTERM or SIGHUP sent the moment the mount point appears (a script's `until mountpoint
    -q; ...; kill`, a service stopped right after it started): the kernel mounted before the
    signal handlers were installed, so the default action killed the process and left a dead
    mount ("Transport endpoint is not connected"). Now the handlers come first. Repeated:
    the window is a few milliseconds wide (6 stale mounts in 10 tries on the old code)."""
    image = fresh_image(pristine, tmp_path)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    environment = {**os.environ, "KEEP_TEST_KEY": PASSPHRASE}
    command = [sys.executable, "-m", "shim", "volume", "mount", str(image), str(mountpoint),
               "--passphrase-env", "KEEP_TEST_KEY"]
    try:
        for attempt in range(10):
            process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE)
            try:
                deadline = time.monotonic() + MOUNT_TIMEOUT
                while not _is_mounted(mountpoint):  # no sleep: the signal must come at once
                    assert process.poll() is None, process.communicate()[1].decode()
                    assert time.monotonic() < deadline, "the mount did not appear"
                process.send_signal(signal.SIGTERM if attempt % 2 else signal.SIGHUP)
                out, err = process.communicate(timeout=UNMOUNT_TIMEOUT)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.communicate()
            assert not _is_mounted(mountpoint), f"attempt {attempt}: a dead mount was left"
            assert process.returncode == 0, err.decode()
            assert b"unmounted" in out
    finally:
        force_unmount(mountpoint)


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "SIGTERM"])
def test_a_second_signal_during_the_final_commit_does_not_lose_the_data(
        pristine: Path, tmp_path: Path, number: int) -> None:
    """Ctrl-C pressed twice (or SIGTERM sent twice): the second one arrived while the mount
    was unmounting or making its final commit, and interrupted that commit (KeyboardInterrupt)
    or killed the process (SIGTERM's default action, which trio redelivers on leaving its
    handler): exit 130 without a word, and every change since the last commit lost (here,
    with --commit-interval 0, the whole 30 MiB file). The final commit now runs with the
    signals held; a repeated one is dropped."""
    image = fresh_image(pristine, tmp_path)
    mount = MountedVolume(image, tmp_path / "mnt", "--commit-interval", "0").start()
    try:
        payload = os.urandom(30 << 20)
        (mount.mountpoint / "data").write_bytes(payload)
        assert mount.process is not None
        mount.process.send_signal(number)
        time.sleep(0.05)
        mount.process.send_signal(number)
        assert mount.wait() == 0, mount.errors
    finally:
        mount.stop()
    assert "committed" in mount.output
    assert keep_volume("cat", image, "/data").stdout == payload


@pytest.mark.skipif(os.getuid() != 0, reason="mounting a tmpfs needs root")
def test_a_failed_commit_at_unmount_says_the_changes_are_lost(pristine: Path, tmp_path: Path) -> None:
    """The image (sparse) lives on a host filesystem that fills up: the commit at unmount fails.
    It said only 'keep: IMG: no space left on device', which reads as if the unmount had
    failed or the image were damaged; now it says the mount is gone, the commit failed and
    which committed generation the image still holds."""
    host = tmp_path / "host"
    host.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(host)], check=True)
    try:
        image = host / "v.img"
        subprocess.run(["cp", "--sparse=always", str(pristine), str(image)], check=True)
        with MountedVolume(image, tmp_path / "mnt", "--commit-interval", "0") as mount:
            # the host may fill up during the write already: nothing is committed either way
            with contextlib.suppress(OSError), open(mount.mountpoint / "big", "wb") as sink:
                sink.write(os.urandom(24 << 20))
            status = mount.stop()
        assert status == 1
        assert mount.errors.strip().splitlines()[-1] == (
            f"keep: unmounted {mount.mountpoint}, but the commit at unmount failed: {image}: no "
            "space left on device (the image holds generation 2; later changes are lost)")
        assert "committed" not in mount.output
    finally:
        subprocess.run(["umount", "-l", str(host)], check=False)


@contextlib.contextmanager
def _fuse_connections() -> Iterator[Path]:
    """/sys/fs/fuse/connections (fusectl), mounted for the block if it is not already."""
    connections = Path("/sys/fs/fuse/connections")
    mounted_here = False
    if not os.path.ismount(connections):
        result = subprocess.run(["mount", "-t", "fusectl", "none", str(connections)],
                                capture_output=True, check=False)
        if result.returncode != 0:
            pytest.skip(f"cannot mount fusectl: {result.stderr.decode().strip()}")
        mounted_here = True
    try:
        yield connections
    finally:
        if mounted_here:
            subprocess.run(["umount", str(connections)], check=False)


@pytest.mark.skipif(os.getuid() != 0, reason="aborting a FUSE connection needs root")
def test_an_aborted_connection_leaves_no_dead_mount_behind(quiet_mount: MountedVolume) -> None:
    """The operator aborts a (hung) mount through fusectl: the process ended, printed
    'unmounted MNT; ... committed', and left a dead mount point ('Transport endpoint is not
    connected'), as pyfuse3 does not unmount an aborted connection. The process clears it."""
    (quiet_mount.mountpoint / "kept").write_text("kept")
    device = os.stat(quiet_mount.mountpoint).st_dev
    with _fuse_connections() as connections:
        (connections / str(device) / "abort").write_text("1")
        assert quiet_mount.wait() == 0, quiet_mount.errors
    assert not _is_mounted(quiet_mount.mountpoint)
    assert os.listdir(quiet_mount.mountpoint) == []  # the empty directory again
    assert keep_volume("cat", quiet_mount.image, "/kept").stdout == b"kept"


def test_a_mount_whose_stdout_reader_went_away_still_ends_cleanly(pristine: Path, tmp_path: Path) -> None:
    """`keep volume mount IMG MNT | head -1`: the reader of stdout is gone by the unmount. The
    final line failed with EPIPE after the commit, reported as 'keep: IMG: broken pipe' (the
    image sounded damaged) with exit status 1. The line is dropped; the exit status is 0."""
    image = fresh_image(pristine, tmp_path)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    process = _mount_process(image, mountpoint, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None and process.stderr is not None
        assert process.stdout.readline().startswith(b"mounting ")  # as `head -1` reads it
        process.stdout.close()
        _wait_until_mounted(process, mountpoint)
        (mountpoint / "kept").write_text("kept")
        assert keep_volume("umount", mountpoint, passphrase=None).returncode == 0
        assert process.wait(timeout=UNMOUNT_TIMEOUT) == 0, process.stderr.read().decode()
        assert process.stderr.read() == b""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        force_unmount(mountpoint)
    assert keep_volume("cat", image, "/kept").stdout == b"kept"


@pytest.mark.parametrize("name", ["données.img", "a,b.img", "back\\slash.img"],
                         ids=["non-ascii", "comma", "backslash"])
def test_an_image_path_of_any_characters_mounts_and_umount_waits_for_it(
        pristine: Path, tmp_path: Path, name: str) -> None:
    """The image's path goes into the mount's fsname option, which pyfuse3 encodes as ASCII and
    libfuse splits at commas: an image path with 'é' could not be mounted at all ('keep:
    internal error: UnicodeEncodeError', exit 70), and one with a comma or a backslash got no
    name in mountinfo, so `keep volume umount` returned before the commit at unmount and the
    image was still locked. Now every byte outside printable ASCII, the comma and the backslash
    travel as libfuse's octal escapes."""
    image = Path(shutil.copyfile(pristine, tmp_path / name))
    with MountedVolume(image, tmp_path / "mnt") as mount:
        assert mount_source(mount.mountpoint) == "keep:" + str(image).replace("\\", "\\134")
        (mount.mountpoint / "x").write_text("x")
        umounted = keep_volume("umount", mount.mountpoint, passphrase=None)
        # it waited for the mount process to commit and let go of the image
        assert umounted.returncode == 0 and keep_volume("cat", image, "/x").stdout == b"x", umounted
        assert mount.stop() == 0


_ODD_MOUNT_SCRIPT = """
import os, subprocess, sys, time
odd, image, mountpoint = map(os.fsencode, sys.argv[1:4])
subprocess.run([b"mount", b"-t", b"tmpfs", b"-o", b"size=1m", b"tmpfs", odd], check=True)
keep = [sys.executable, "-m", "shim", "volume"]
mount = subprocess.Popen([*keep, "mount", image, mountpoint, "--passphrase-env", "KEEP_TEST_KEY"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
while b" " + mountpoint + b" " not in open("/proc/self/mountinfo", "rb").read():
    if mount.poll() is not None:
        sys.exit("the mount ended at once: " + mount.stderr.read().decode())
    time.sleep(0.02)
time.sleep(1.0)  # the mount's read-ahead task has read mountinfo (it starts at 0.1 s)
try:
    with open(mountpoint + b"/x", "w") as sink:
        sink.write("x")
except OSError as error:
    mount.wait(timeout=60)
    sys.exit(f"write: {error}; the mount said: {mount.stderr.read().decode()}")
umount = subprocess.run([*keep, "umount", mountpoint], capture_output=True)
print(umount.returncode, umount.stderr.decode().strip(), mount.wait(timeout=60))
"""


@pytest.mark.skipif(os.getuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare (a tmpfs in a private mount namespace)")
def test_a_mount_point_elsewhere_that_is_not_utf8_breaks_neither_mount_nor_umount(
        pristine: Path, tmp_path: Path) -> None:
    """Any mount on the machine whose path is not UTF-8 (here a tmpfs on '\\xff') made reading
    /proc/self/mountinfo raise UnicodeDecodeError: the mount process's read-ahead task died
    with it, which took the new mount down at once (the write met ENOTCONN), and `keep volume
    umount` was an internal error. mountinfo is now read with surrogateescape, as os.fsdecode
    reads paths. (In a private mount namespace: other tests' mountinfo stays as it was.)"""
    image = fresh_image(pristine, tmp_path)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    odd = os.fsdecode(os.fsencode(tmp_path) + b"/\xff")
    os.mkdir(odd)
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", _ODD_MOUNT_SCRIPT,
         odd, str(image), str(mountpoint)],
        env={**os.environ, "KEEP_TEST_KEY": PASSPHRASE}, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().split() == ["0", "0"]
    assert keep_volume("cat", image, "/x").stdout == b"x"


def test_a_host_failure_is_eio_and_logged(pristine: Path, tmp_path: Path) -> None:
    """The host truncates the image under the mount: reads of the lost sectors are EIO, as for
    a tampered sector, but only an integrity failure was logged; a short read of the image (or
    any error of the host's disk) reached the application as a bare EIO and the operator had
    no word of why. It is logged as a host failure, with storage's message."""
    image = fresh_image(pristine, tmp_path)
    with MountedVolume(image, tmp_path / "mnt", "--commit-interval", "0") as mount:
        path = mount.mountpoint / "big"
        with open(path, "w+b") as handle:
            handle.write(os.urandom(20 << 20))
            os.fsync(handle.fileno())
            os.truncate(image, 10 << 20)
            # the kernel's cached pages of the file go, so the read reaches the mount
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            with pytest.raises(OSError) as failed:
                os.pread(handle.fileno(), 20 << 20, 0)
        assert failed.value.errno == errno.EIO
        mount.stop()
    assert "keep: host failure during read: " in mount.errors and "(answered EIO)" in mount.errors


def test_a_mount_whose_terminal_hung_up_still_ends_cleanly(pristine: Path, tmp_path: Path) -> None:
    """The terminal window of a foreground mount is closed: SIGHUP unmounts and commits, and
    then the final line met EIO on the hung-up terminal, reported as 'keep: IMG: input/output
    error' with exit status 1, as if the image had failed. The line is dropped; exit 0."""
    image = fresh_image(pristine, tmp_path)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    master, slave = pty.openpty()
    process = _mount_process(image, mountpoint, stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    try:
        _wait_until_mounted(process, mountpoint)
        assert os.read(master, 4096).startswith(b"mounting ")
        os.close(master)  # the terminal hangs up: writes to it now fail with EIO
        master = -1
        (mountpoint / "kept").write_text("kept")
        process.send_signal(signal.SIGHUP)
        _, errors = process.communicate(timeout=UNMOUNT_TIMEOUT)
        assert (process.returncode, errors) == (0, b"")
    finally:
        if master >= 0:
            os.close(master)
        if process.poll() is None:
            process.kill()
            process.communicate()
        force_unmount(mountpoint)
    assert keep_volume("cat", image, "/kept").stdout == b"kept"


def test_umount_of_a_mount_whose_process_is_stopped_does_not_hang(quiet_mount: MountedVolume) -> None:
    """The mount process is stopped (Ctrl-Z in its terminal) or hung: `keep volume umount`
    hung too, unkillable by Ctrl-C, in its stat of the mount point (realpath's lstat,
    os.path.ismount: each a FUSE request nobody answers), where fusermount3 -u alone works. It
    now finds the mount in mountinfo only; it unmounts at once and then waits for the commit,
    which comes when the process runs again."""
    process = quiet_mount.process
    assert process is not None
    (quiet_mount.mountpoint / "kept").write_text("kept")
    time.sleep(1.2)  # past the kernel's cached attributes of the mount point (ATTR_TIMEOUT)
    process.send_signal(signal.SIGSTOP)
    umount = subprocess.Popen([sys.executable, "-m", "shim", "volume", "umount",
                               str(quiet_mount.mountpoint)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while _is_mounted(quiet_mount.mountpoint) and time.monotonic() < deadline:
            time.sleep(0.05)
        unmounted = not _is_mounted(quiet_mount.mountpoint)
    finally:
        process.send_signal(signal.SIGCONT)
    try:
        out, err = umount.communicate(timeout=60)
    finally:
        if umount.poll() is None:
            umount.kill()
            umount.communicate()
    assert unmounted, "keep volume umount hung on the stopped mount"
    assert (umount.returncode, out) == (0, f"unmounted {quiet_mount.mountpoint}\n".encode()), err
    assert quiet_mount.wait() == 0
    assert keep_volume("cat", quiet_mount.image, "/kept").stdout == b"kept"


def _churn(root: str, seed: int) -> None:
    """One of several processes changing one shared directory at once (run in a child)."""
    rng = random.Random(seed)
    shared = os.path.join(root, "shared")
    for _ in range(300):
        name = os.path.join(shared, f"f{rng.randrange(20)}")
        other = os.path.join(shared, f"f{rng.randrange(20)}")
        with contextlib.suppress(FileNotFoundError, FileExistsError):
            match rng.randrange(7):
                case 0:
                    Path(name).write_bytes(rng.randbytes(rng.randrange(1, 20000)))
                case 1:
                    os.rename(name, other)
                case 2:
                    os.unlink(name)
                case 3:
                    Path(name).read_bytes()
                case 4:
                    os.listdir(shared)
                case 5:
                    os.link(name, other)
                case _:
                    with open(name, "r+b") as handle:
                        handle.seek(rng.randrange(10000))
                        handle.write(b"z" * rng.randrange(1, 9000))
                        os.fsync(handle.fileno())
    with open(os.path.join(root, "log"), "a") as log:  # O_APPEND from every process
        for line in range(200):
            log.write(f"{seed} {line}\n")
            log.flush()


def test_several_processes_changing_one_directory_leave_a_consistent_volume(
        pristine: Path, tmp_path: Path) -> None:
    """Six processes create, rename, link, unlink, rewrite, fsync and list names in one
    directory at once, and append to one log: every append lands whole, the volume checks
    clean after the unmount, and what it holds is what the mount showed."""
    image = fresh_image(pristine, tmp_path)
    snapshot = tmp_path / "snapshot"
    with MountedVolume(image, tmp_path / "mnt", "--commit-interval", "0.2") as mount:
        (mount.mountpoint / "shared").mkdir()
        context = multiprocessing.get_context("fork")
        workers = [context.Process(target=_churn, args=(str(mount.mountpoint), seed)) for seed in range(6)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
        assert [worker.exitcode for worker in workers] == [0] * 6
        lines = (mount.mountpoint / "log").read_text().splitlines()
        assert sorted(lines) == sorted(f"{seed} {line}" for seed in range(6) for line in range(200))
        shutil.copytree(mount.mountpoint, snapshot)
        assert mount.stop() == 0
    assert keep_volume("fsck", image).stdout.decode().strip().endswith("clean")
    exported = tmp_path / "exported"
    assert keep_volume("export", image, exported).returncode == 0
    for path in snapshot.rglob("*"):
        if path.is_file():
            assert (exported / path.relative_to(snapshot)).read_bytes() == path.read_bytes(), path
    assert sorted(p.relative_to(exported) for p in exported.rglob("*")) == \
        sorted(p.relative_to(snapshot) for p in snapshot.rglob("*"))


def test_mounting_over_a_stopped_mount_is_refused_at_once(quiet_mount: MountedVolume, pristine: Path,
                                                         tmp_path: Path) -> None:
    """A second `keep volume mount` onto a mount point whose mount process is stopped (Ctrl-Z)
    hung in its stat of the mount point, a request nobody answered; it is refused at once from
    mountinfo. (A dead one still gets the stale-mount message, test_fuse.)"""
    process = quiet_mount.process
    assert process is not None
    time.sleep(1.2)  # past the kernel's cached attributes of the mount point (ATTR_TIMEOUT)
    process.send_signal(signal.SIGSTOP)
    try:
        other = Path(shutil.copyfile(pristine, tmp_path / "other.img"))
        refused = keep_volume("mount", other, quiet_mount.mountpoint, timeout=20)
    except subprocess.TimeoutExpired:
        refused = None
    finally:
        process.send_signal(signal.SIGCONT)
    assert refused is not None, "keep volume mount hung on the stopped mount"
    assert refused.returncode == 1
    assert refused.stderr == f"keep: {quiet_mount.mountpoint} is already a mount point\n".encode()


def _ignore_hangups() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup does: inherited through exec


def test_a_mount_started_under_nohup_outlives_a_hangup(pristine: Path, tmp_path: Path) -> None:
    """`nohup keep volume mount ...` ignores SIGHUP so that the mount outlives its terminal;
    keep's own handler for it (which unmounts) replaced that, so logging out unmounted the
    volume anyway. A signal keep was started with ignored stays ignored (shim.signals)."""
    image = fresh_image(pristine, tmp_path)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    process = _mount_process(image, mountpoint, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, preexec_fn=_ignore_hangups)
    try:
        _wait_until_mounted(process, mountpoint)
        process.send_signal(signal.SIGHUP)
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=1.0)
        assert _is_mounted(mountpoint)
        (mountpoint / "kept").write_text("kept")
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=UNMOUNT_TIMEOUT)
        assert (process.returncode, errors) == (0, b"")
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        force_unmount(mountpoint)
    assert keep_volume("cat", image, "/kept").stdout == b"kept"
