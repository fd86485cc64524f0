"""Run `keep volume mount` as a real process for the FUSE tests, and always take it down again.

`MountedVolume` starts the mount, waits until the kernel shows the mount point, and on `stop()`
(or leaving the `with` block, even on a test failure) unmounts with `fusermount3 -u` (lazily with
`-z` if busy), waits for the process to commit and exit, and kills it after a timeout, so that no
test leaves a stale mount behind. Where mounting is not permitted the test is skipped with the
reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

PASSPHRASE = "fuse test passphrase"
FAST_KDF = ["--pbkdf-memory", "8192", "--pbkdf-force-iterations", "1", "--pbkdf-parallel", "1"]
MOUNT_TIMEOUT = 30.0
UNMOUNT_TIMEOUT = 60.0
_NOT_PERMITTED = ("permission denied", "operation not permitted", "fuse device not found",
                  "no fuse permission")


def fuse_skip_reason() -> str | None:
    """Why FUSE tests cannot run here, or None."""
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return "pyfuse3 is not installed (pip install keepshim[fuse])"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine (FUSE kernel module missing or not passed through)"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian package fuse3)"
    return None


def keep_volume(*args: str | os.PathLike[str], passphrase: str | None = PASSPHRASE,
                timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    """Run `keep volume ARGS` (key from $KEEP_TEST_KEY unless passphrase is None)."""
    environment = dict(os.environ)
    command = [sys.executable, "-m", "shim", "volume", *map(str, args)]
    if passphrase is not None:
        environment["KEEP_TEST_KEY"] = passphrase
        command += ["--passphrase-env", "KEEP_TEST_KEY"]
    return subprocess.run(command, env=environment, capture_output=True, timeout=timeout)


def keep_ok(*args: str | os.PathLike[str], **options: object) -> str:
    result = keep_volume(*args, **options)  # type: ignore[arg-type]
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def create_image(path: Path, size: str) -> Path:
    """A new empty volume image at `path` (tiny KDF costs: tests only)."""
    keep_ok("create", path, "--size", size, *FAST_KDF)
    return path


def force_unmount(mountpoint: Path) -> None:
    """Best effort: detach whatever is mounted on `mountpoint` (used in teardown only)."""
    for flags in (["-u"], ["-u", "-z"]):
        if not _is_mount(mountpoint):
            return
        subprocess.run(["fusermount3", *flags, os.path.realpath(mountpoint)], capture_output=True,
                       timeout=30)


def _is_mount(mountpoint: Path) -> bool:
    # surrogateescape: another mount's path may not be UTF-8
    text = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="surrogateescape")
    real = os.path.realpath(mountpoint)  # the kernel mounts on a symlink's target
    escaped = real.replace("\\", "\\134").replace(" ", "\\040")  # as mountinfo writes it
    return any(line.split()[4] == escaped for line in text.splitlines())


def mount_source(mountpoint: Path) -> str:
    """The source of what is mounted on `mountpoint`, as mountinfo writes it (octal escapes)."""
    text = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="surrogateescape")
    line = next(row for row in text.splitlines() if row.split()[4] == str(mountpoint))
    return line.split(" - ", 1)[1].split()[1]


class MountedVolume:
    """`keep volume mount IMAGE MOUNTPOINT [options]` running in the background."""

    def __init__(self, image: Path, mountpoint: Path, *options: str) -> None:
        self.image = image
        self.mountpoint = mountpoint
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None
        self.output = ""
        self.errors = ""

    def start(self) -> Self:
        self.mountpoint.mkdir(exist_ok=True)
        environment = {**os.environ, "KEEP_TEST_KEY": PASSPHRASE}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "shim", "volume", "mount", str(self.image), str(self.mountpoint),
             "--passphrase-env", "KEEP_TEST_KEY", *self.options],
            env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not _is_mount(self.mountpoint):
            if self.process.poll() is not None:
                self._collect()
                if any(text in self.errors.lower() for text in _NOT_PERMITTED):
                    pytest.skip(f"mounting with FUSE is not permitted here: {self.errors.strip()}")
                raise AssertionError(f"mount exited with {self.process.returncode}: {self.errors}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"mount did not appear within {MOUNT_TIMEOUT} s")
            time.sleep(0.02)
        return self

    def _collect(self) -> None:
        assert self.process is not None
        out, err = self.process.communicate(timeout=UNMOUNT_TIMEOUT)
        self.output += out.decode()
        self.errors += err.decode()

    def kill(self) -> None:
        """SIGKILL the mount process (the kernel keeps a dead mount point)."""
        assert self.process is not None
        self.process.kill()
        self._collect()

    def signal(self, number: int = signal.SIGTERM) -> int:
        """Send a signal and wait for the process to unmount and exit; its exit status."""
        assert self.process is not None
        self.process.send_signal(number)
        self._collect()
        return self.process.returncode

    def wait(self) -> int:
        """Wait for the process to end by itself (after signals sent to it); its exit status."""
        assert self.process is not None
        self._collect()
        return self.process.returncode

    def stop(self) -> int | None:
        """Unmount and wait for the process to commit and exit (kill it after a timeout)."""
        process = self.process
        if process is None:
            return None
        try:
            if process.poll() is None:
                subprocess.run(["fusermount3", "-u", os.path.realpath(self.mountpoint)],
                               capture_output=True, timeout=30)
                try:
                    self._collect()
                except subprocess.TimeoutExpired:
                    process.kill()
                    self._collect()
            elif process.stdout is not None and not process.stdout.closed:
                self._collect()  # it ended by itself (`keep volume umount`): keep what it said
        finally:
            force_unmount(self.mountpoint)
        return process.returncode

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
