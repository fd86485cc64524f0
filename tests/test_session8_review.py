"""Review of session 8's changes (net, sockets, fuse, run, signals): defects the change brought in
or left behind, each test failing on the code before its fix."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fuse_harness import (
    MOUNT_TIMEOUT,
    PASSPHRASE,
    create_image,
    force_unmount,
    fuse_skip_reason,
)

KEEP = (sys.executable, "-m", "shim")


def _is_mounted(mountpoint: Path) -> bool:
    """From mountinfo, never through the (dead) mount point itself."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
        return any(line.split()[4] == str(mountpoint) for line in table)


@pytest.mark.fuse
@pytest.mark.skipif(fuse_skip_reason() is not None, reason=str(fuse_skip_reason()))
def test_umount_of_a_dead_mount_whose_image_moved_is_no_false_failure(tmp_path: Path) -> None:
    """A mount whose process was killed (SIGKILL, OOM) and whose image was then moved or
    deleted: `keep volume umount` clears it. Since 629faa4 it judged staleness by the image's
    lock and waited for the image after the unmount; an image it cannot open counted as 'still
    held', so it said 'unmounted MNT, but the keep process still holds IMG', exit 1, about a
    process that no longer exists (the old code saw ENOTCONN and cleared the mount, exit 0)."""
    image = create_image(tmp_path / "volume.img", "64M")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    process = subprocess.Popen([*KEEP, "volume", "mount", str(image), str(mountpoint),
                                "--passphrase-env", "KEEP_TEST_KEY"],
                               env={"KEEP_TEST_KEY": PASSPHRASE, "PATH": "/usr/bin:/bin"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not _is_mounted(mountpoint):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        shutil.move(image, tmp_path / "moved.img")
        umount = subprocess.run([*KEEP, "volume", "umount", str(mountpoint)], capture_output=True,
                                timeout=60, check=False)
        assert not _is_mounted(mountpoint)
        assert umount.returncode == 0, umount.stderr
        assert b"still holds" not in umount.stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if _is_mounted(mountpoint):
            force_unmount(mountpoint)
