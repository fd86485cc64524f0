"""In-place overwrites keep mtime/ctime in memory until fsync (no SQLite transaction per write).

The times must still follow POSIX for the writing process (getattr sees them at once), survive
fsync + close + reopen, survive a SIGKILL right after the fsync (they travel in the integrity
commit's metadata then), and reach SQLite at the next changing operation.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from storage.errors import FilesystemError
from storage.fs import ROOT_INODE
from storage.luks2 import KdfCost
from storage.volume import create_volume, open_volume

OLD_NS = 1_000_000_000  # 1970: far older than any write's timestamp


def _make(image: Path, files: int) -> bytes:
    """A volume with `files` files of 8 KiB whose times are set to OLD_NS; returns the key."""
    with create_volume(image, 24 << 20, b"times", pbkdf="pbkdf2", kdf_cost=KdfCost(iterations=1000)) as volume:
        fs = volume.fs
        for index in range(files):
            ino = fs.create(ROOT_INODE, b"f%03d" % index).ino
            fs.write(ino, 0, bytes([index % 256]) * 8192)
            fs.setattr(ino, mtime_ns=OLD_NS)
        fs.fsync()
        return volume.luks.volume_key


def test_overwrite_times_visible_at_once_and_persisted_after_fsync(tmp_path: Path) -> None:
    image = tmp_path / "t.img"
    key = _make(image, 1)
    with open_volume(image, volume_key=key) as volume:
        fs = volume.fs
        ino = fs.lookup(ROOT_INODE, b"f000").ino
        before = fs.getattr(ino)
        assert before.mtime_ns == OLD_NS
        fs.write(ino, 100, b"x" * 4096)  # unaligned, inside the size: the in-memory path
        after = fs.getattr(ino)
        assert after.mtime_ns > OLD_NS and after.ctime_ns >= after.mtime_ns
        assert after.size == 8192
        listed = {name: attr for name, attr, _ in fs.readdir(ROOT_INODE)}
        assert listed[b"f000"].mtime_ns == after.mtime_ns
        assert fs.read(ino, 0, 8192) == b"\0" * 100 + b"x" * 4096 + b"\0" * 3996
        fs.fsync(ino)
    with open_volume(image, volume_key=key) as volume:
        attr = volume.fs.getattr(ino)
        assert (attr.mtime_ns, attr.ctime_ns) == (after.mtime_ns, after.ctime_ns)
        assert volume.fs.read(ino, 0, 8192) == b"\0" * 100 + b"x" * 4096 + b"\0" * 3996
        assert volume.fsck() == []


def test_explicit_mtime_after_overwrite_wins(tmp_path: Path) -> None:
    image = tmp_path / "t.img"
    key = _make(image, 1)
    with open_volume(image, volume_key=key) as volume:
        fs = volume.fs
        ino = fs.lookup(ROOT_INODE, b"f000").ino
        fs.write(ino, 0, b"y" * 4096)
        fs.setattr(ino, mtime_ns=OLD_NS + 5)
        assert fs.getattr(ino).mtime_ns == OLD_NS + 5
        fs.fsync()
    with open_volume(image, volume_key=key) as volume:
        assert volume.fs.getattr(ino).mtime_ns == OLD_NS + 5


def test_changes_after_an_overwrite_return_their_own_times(tmp_path: Path) -> None:
    """setattr and link return the attributes as they now are: an earlier in-place write's
    pending times are written out first, and must not be laid over the change's own (the FUSE
    mount replies with these, and the kernel caches the reply)."""
    image = tmp_path / "t.img"
    key = _make(image, 1)
    with open_volume(image, volume_key=key) as volume:
        fs = volume.fs
        ino = fs.lookup(ROOT_INODE, b"f000").ino
        fs.write(ino, 0, b"y" * 4096)  # times pending in memory
        returned = fs.setattr(ino, mtime_ns=OLD_NS + 7)
        assert returned.mtime_ns == OLD_NS + 7
        assert returned == fs.getattr(ino)
        fs.write(ino, 0, b"w" * 4096)
        written = fs.getattr(ino)
        linked = fs.link(ino, ROOT_INODE, b"again")
        assert linked.nlink == 2 and linked.ctime_ns >= written.ctime_ns
        assert linked == fs.getattr(ino)
        fs.write(ino, 0, b"v" * 4096)
        chmodded = fs.setattr(ino, mode=0o600)
        assert chmodded == fs.getattr(ino) and chmodded.mode & 0o777 == 0o600
        fs.write(ino, 0, b"u" * 4096)
        pending = fs.getattr(ino)
        with pytest.raises(FilesystemError) as failed:  # a change that fails: rolled back ...
            fs.link(ino, ROOT_INODE, b"again")
        assert failed.value.errno == errno.EEXIST
        assert fs.getattr(ino) == pending  # ... and the write's times are still pending
        fs.fsync()
    with open_volume(image, volume_key=key) as volume:
        assert volume.fs.getattr(ino) == pending


_CRASHER = textwrap.dedent("""
    import os, signal, sys
    from storage.fs import ROOT_INODE
    from storage.volume import open_volume
    image, key, files = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3])
    volume = open_volume(image, volume_key=key)
    fs = volume.fs
    for index in range(files):
        ino = fs.lookup(ROOT_INODE, b"f%03d" % index).ino
        fs.write(ino, 4096, b"z" * 4096)
    fs.fsync()
    for index in range(files):
        attr = fs.getattr(fs.lookup(ROOT_INODE, b"f%03d" % index).ino)
        print(attr.ino, attr.mtime_ns, attr.ctime_ns, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def _crash_after_fsync(image: Path, key: bytes, files: int) -> dict[int, tuple[int, int]]:
    result = subprocess.run([sys.executable, "-c", _CRASHER, str(image), key.hex(), str(files)],
                            capture_output=True, check=False, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    times = {}
    for line in result.stdout.decode().splitlines():
        ino, mtime, ctime = (int(field) for field in line.split())
        times[ino] = (mtime, ctime)
    assert len(times) == files
    return times


def _assert_times(image: Path, key: bytes, times: dict[int, tuple[int, int]]) -> None:
    with open_volume(image, volume_key=key) as volume:
        assert volume.fsck() == []
        for ino, (mtime, ctime) in times.items():
            attr = volume.fs.getattr(ino)
            assert (attr.mtime_ns, attr.ctime_ns) == (mtime, ctime)
            assert mtime > OLD_NS
            assert volume.fs.read(ino, 4096, 4096) == b"z" * 4096


def test_sigkill_after_fsync_keeps_times(tmp_path: Path) -> None:
    image = tmp_path / "t.img"
    key = _make(image, 2)
    times = _crash_after_fsync(image, key, 2)
    _assert_times(image, key, times)
    # a changing operation moves the times into SQLite; they stay after another reopen
    with open_volume(image, volume_key=key) as volume:
        volume.fs.mkdir(ROOT_INODE, b"d")
    _assert_times(image, key, times)


def test_sigkill_after_fsync_keeps_times_of_many_files(tmp_path: Path) -> None:
    """More pending times than the commit metadata holds: the fsync writes them to SQLite."""
    image = tmp_path / "t.img"
    key = _make(image, 60)
    times = _crash_after_fsync(image, key, 60)
    _assert_times(image, key, times)


def test_read_only_open_shows_pending_times(tmp_path: Path) -> None:
    image = tmp_path / "t.img"
    key = _make(image, 1)
    times = _crash_after_fsync(image, key, 1)
    with open_volume(image, volume_key=key, writable=False) as volume:
        ino, (mtime, _) = next(iter(times.items()))
        assert volume.fs.getattr(ino).mtime_ns == mtime
    assert os.path.getsize(image) > 0
