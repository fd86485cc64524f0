"""Session-8 review of `keep volume mount`: what the kernel is told through a real FUSE mount.

Each test mounts a real image in a real `keep` process (fuse_harness.MountedVolume, always
unmounted in teardown) and checks with POSIX calls what an operator's tools would see.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuse_harness import MountedVolume, create_image, fuse_skip_reason

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
