"""The encrypted volume as a wasi_host backend (shim.volume_backend), in process, without wasm.

The behaviour tests of tests/test_wasi_files.py run on it too (it is listed in
wasi_harness.BACKENDS); here: random operation sequences against the host kernel, the write-back
buffer's coherence, commits on fd_sync / fd_datasync, integrity failures reported, and the
session's close.
"""

from __future__ import annotations

import errno
import random
from pathlib import Path

import pytest
from run_volume_support import data_sectors, flip, make_volume
from test_wasi_backends_agree import operation, tree
from wasi_harness import RESULT, GuestHarness, closing, volume_root

from shim.volume_backend import WRITE_BUFFER_BYTES, VolumeDirectory, VolumeFile, VolumeSession, directory_over
from storage.errors import FilesystemError, IntegrityError
from storage.luks2 import KdfCost
from storage.volume import open_volume
from wasi_host import Errno, Rights
from wasi_host._abi import Oflags
from wasi_host.hostdir import HostDirectory

PASSPHRASE = b"test"
COST = KdfCost(iterations=1000)


def _volume_directory(tmp_path: Path) -> VolumeDirectory:
    root = volume_root(tmp_path)
    assert isinstance(root, VolumeDirectory)
    return root


@pytest.mark.parametrize("seed", range(6))
def test_volume_and_hostdir_agree_on_random_operations(seed: int, tmp_path: Path) -> None:
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    rng_volume, rng_host = random.Random(seed), random.Random(seed)
    root = _volume_directory(tmp_path)
    with closing(GuestHarness(root)) as volume, closing(GuestHarness(HostDirectory.open(host_dir))) as host:
        for step in range(150):
            expected = operation(host, rng_host)
            got = operation(volume, rng_volume)
            assert got == expected, f"step {step}: volume {got} vs host {expected}"
        assert tree(volume) == tree(host)
    assert root.session.close().generation > 0
    assert root.session.volume.fs is not None


def test_small_writes_are_buffered_and_seen_by_every_handle(tmp_path: Path) -> None:
    root = _volume_directory(tmp_path)
    writer = root.open_file("f", create=True, exclusive=False, truncate=False, read=False, write=True)
    reader = root.open_file("f", create=False, exclusive=False, truncate=False, read=True, write=False)
    for index in range(1000):
        assert writer.pwrite(b"%015d\n" % index, index * 16) == 16
    expected = b"".join(b"%015d\n" % index for index in range(1000))
    assert reader.pread(1 << 20, 0) == expected  # another handle sees the buffered bytes
    assert root.stat_at("f").size == len(expected)
    writer.pwrite(b"X", 5)  # not contiguous with the buffer: written out first, then this
    assert reader.pread(8, 0) == b"00000X00"
    writer.close()
    reader.close()
    root.session.close()
    with open_volume(tmp_path / "volume.img", PASSPHRASE) as reopened:
        ino = reopened.fs.lookup(1, b"f").ino
        assert reopened.fs.read(ino, 0, 8) == b"00000X00"
        assert reopened.fs.getattr(ino).size == len(expected)


def test_a_buffer_never_grows_past_its_limit(tmp_path: Path) -> None:
    root = _volume_directory(tmp_path)
    handle = root.open_file("f", create=True, exclusive=False, truncate=False, read=True, write=True)
    piece = b"y" * 4000
    written = 0
    while written < 3 * WRITE_BUFFER_BYTES:
        written += handle.pwrite(piece, written)
        assert len(root.session._buffer) <= WRITE_BUFFER_BYTES
    assert handle.stat().size == written
    handle.close()
    root.session.close()


@pytest.mark.parametrize("call", ["fd_sync", "fd_datasync"])
def test_sync_commits_the_volume(call: str, tmp_path: Path) -> None:
    """fd_sync / fd_datasync advance the generation, and what was written is in that commit
    (the image reopened without closing the session shows it)."""
    root = _volume_directory(tmp_path)
    session = root.session
    before = session.volume.state().generation
    with closing(GuestHarness(root)) as harness:
        fd = harness.open("kept", Oflags.CREAT, rights=Rights.ALL)
        assert harness.write(fd, b"durable\n") == 8
        assert harness.call(call, fd) == 0
        after = session.volume.state().generation
        assert after > before
        # What a crash right now would leave: open a copy of the image as it is on disk.
        copy = tmp_path / "copy.img"
        copy.write_bytes((tmp_path / "volume.img").read_bytes())
        with open_volume(copy, PASSPHRASE) as crashed:
            assert crashed.state().generation == after
            kept = crashed.fs.lookup(1, b"kept")
            assert crashed.fs.read(kept.ino, 0, 100) == b"durable\n"
            assert crashed.fsck() == []
        assert harness.call("fd_close", fd) == 0


def test_names_that_are_not_utf8_round_trip(tmp_path: Path) -> None:
    root = _volume_directory(tmp_path)
    name = b"caf\xe9".decode("utf-8", "surrogateescape")
    root.mkdir(name)
    assert [entry.name for entry in root.readdir(0)] == [name]
    root.session.close()
    with open_volume(tmp_path / "volume.img", PASSPHRASE) as reopened:
        assert [entry[0] for entry in reopened.fs.readdir(1)][2:] == [b"caf\xe9"]


def test_two_volumes_are_separate_filesystems(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = _volume_directory(tmp_path / "a"), _volume_directory(tmp_path / "b")
    first.open_file("f", create=True, exclusive=False, truncate=False, read=True, write=True).close()
    with pytest.raises(OSError) as raised:
        first.link("f", second, "g")
    assert raised.value.errno == 18  # EXDEV
    with pytest.raises(OSError) as raised:
        first.rename("f", second, "g")
    assert raised.value.errno == 18
    assert first.stat().dev != second.stat().dev


def test_an_integrity_failure_is_eio_and_reported(tmp_path: Path) -> None:
    """A sector changed under a file: the guest's read is EIO (never garbage) and the reporter
    hears of it; the session's final commit still closes the volume."""
    image = tmp_path / "v.img"
    make_volume(image, passphrase=PASSPHRASE)
    with open_volume(image, PASSPHRASE) as volume:
        ino = volume.fs.create(1, b"victim").ino
    before = image.read_bytes()
    with open_volume(image, PASSPHRASE) as volume:
        volume.fs.write(ino, 0, bytes(range(256)) * 64)
    sectors = data_sectors(image, PASSPHRASE, before, "victim")
    assert sectors, "no sector holds the file's data?"
    flip(image, sectors)
    reports: list[IntegrityError] = []
    root = directory_over(open_volume(image, PASSPHRASE), on_integrity_error=reports.append)
    with closing(GuestHarness(root)) as harness:
        fd = harness.open("victim", rights=Rights.ALL)
        array, _ = harness.iovecs(16)
        assert harness.call("fd_read", fd, array, 1, RESULT) == Errno.IO
        assert harness.call("fd_close", fd) == 0
    assert len(reports) == 1 and isinstance(reports[0], IntegrityError)
    assert root.session.integrity_failures == 1
    root.session.close()


def test_session_close_commits_once_and_is_idempotent(tmp_path: Path) -> None:
    root = _volume_directory(tmp_path)
    session: VolumeSession = root.session
    first = session.close()
    assert session.close() == first


def _open_new(root: VolumeDirectory, name: str, *, exclusive: bool = True) -> VolumeFile:
    return root.open_file(name, create=True, exclusive=exclusive, truncate=False, read=True, write=True)


def _transactions(root: VolumeDirectory) -> list[str]:
    """Records the BEGINs the filesystem runs from now on."""
    begun: list[str] = []

    def trace(cursor: object, sql: str, bindings: object) -> bool:
        if sql.startswith("BEGIN"):
            begun.append(sql)
        return True

    root.session.fs._db.exec_trace = trace
    return begun


@pytest.mark.parametrize("exclusive", [True, False])
def test_a_new_file_written_and_closed_is_one_transaction(exclusive: bool, tmp_path: Path) -> None:
    """The create waits for the file's first bytes (path resolution's directory closes do not
    flush), so storage creates the file with them: one transaction, not two."""
    root = _volume_directory(tmp_path)
    root.mkdir("d")
    begun = _transactions(root)
    with closing(GuestHarness(root)) as harness:
        fd = harness.open("d/new", Oflags.CREAT | (Oflags.EXCL if exclusive else 0), rights=Rights.ALL)
        assert harness.write(fd, b"first bytes") == 11
        assert harness.call("fd_close", fd) == 0
    assert len(begun) == 1
    fs = root.session.fs
    fs._db.exec_trace = None
    new = fs.lookup(fs.lookup(1, b"d").ino, b"new")
    assert new.size == 11 and fs.read(new.ino, 0, 100) == b"first bytes"
    root.session.close()


def test_a_file_not_created_yet_is_seen_by_every_other_call(tmp_path: Path) -> None:
    """Any other call on the session creates the pending file first: stat, readdir, a second
    open, a rename, unlink, rmdir of its directory all see it."""
    root = _volume_directory(tmp_path)
    root.mkdir("d")
    directory = root.open_directory("d")
    handle = _open_new(directory, "f")
    handle.pwrite(b"abc", 0)
    assert directory.stat_at("f").size == 3
    assert [entry.name for entry in directory.readdir(0)] == ["f"]
    with pytest.raises(OSError) as failure:
        root.rmdir("d")
    assert failure.value.errno == errno.ENOTEMPTY
    second = _open_new(directory, "g")
    directory.rename("g", directory, "h")  # a pending file renamed: created first
    assert directory.stat_at("h").size == 0
    second.pwrite(b"xyz", 0)
    assert directory.stat_at("h").size == 3
    third = _open_new(directory, "gone")
    directory.unlink("gone")  # created, then unlinked while open: still writable
    third.pwrite(b"still", 0)
    assert third.stat().size == 5 and third.stat().nlink == 0
    for opened in (handle, second, third):
        opened.close()
    directory.close()
    root.session.close()


def test_open_refuses_at_once_what_the_create_would_refuse(tmp_path: Path) -> None:
    root = _volume_directory(tmp_path)
    _open_new(root, "taken").close()
    root.mkdir("d")
    gone = root.open_directory("d")
    root.rmdir("d")
    for directory, name, code in [(root, "taken", errno.EEXIST), (root, "x" * 256, errno.ENAMETOOLONG),
                                  (gone, "f", errno.ENOENT)]:
        with pytest.raises(OSError) as failure:
            _open_new(directory, name)
        assert failure.value.errno == code, name
    assert root.session._pending_create is None
    gone.close()
    root.session.close()


def test_first_bytes_past_the_start_or_too_many_for_one_create_still_land(tmp_path: Path) -> None:
    root = _volume_directory(tmp_path)
    seeked = _open_new(root, "seeked")
    seeked.pwrite(b"tail", 10_000)  # a hole first: created empty, then written
    big = _open_new(root, "big")  # created before a write that goes to storage directly
    payload = random.Random(3).randbytes(3 * WRITE_BUFFER_BYTES)
    assert big.pwrite(payload, 0) == len(payload)
    assert seeked.pread(20_000, 0) == bytes(10_000) + b"tail"
    assert big.pread(len(payload), 0) == payload
    seeked.close()
    big.close()
    root.session.close()
    with open_volume(tmp_path / "volume.img", PASSPHRASE) as reopened:
        assert reopened.fs.getattr(reopened.fs.lookup(1, b"seeked").ino).size == 10_004
        assert reopened.fsck() == []


@pytest.mark.parametrize("offset", [0, 100], ids=["first-bytes", "after-a-hole"])
def test_a_create_that_fails_when_flushed_reports_it_and_leaves_nothing(
        offset: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Running out of room shows only when storage creates the file: the flushing call (here
    the close) gets ENOSPC, the bytes are dropped with the file that never existed, and the
    session goes on."""
    root = _volume_directory(tmp_path)
    handle = _open_new(root, "nospace")
    handle.pwrite(b"lost", offset)
    fs = root.session.fs

    def full(*args: object, **kwargs: object) -> None:
        raise FilesystemError(errno.ENOSPC, "no room")

    monkeypatch.setattr(fs, "create", full)
    with pytest.raises(OSError) as failure:
        handle.close()
    assert failure.value.errno == errno.ENOSPC
    monkeypatch.undo()
    handle.close()  # closed already: nothing counted on an inode
    with pytest.raises(OSError) as missing:
        root.stat_at("nospace")
    assert missing.value.errno == errno.ENOENT
    assert root.session._buffer == b"" and root.session._pending_create is None
    _open_new(root, "after").close()
    root.session.close()
    with open_volume(tmp_path / "volume.img", PASSPHRASE) as reopened:
        assert reopened.fsck() == []


def test_guest_values_past_64_signed_bits_are_not_internal_errors(tmp_path: Path) -> None:
    """WASI timestamps and readdir cookies are u64; SQLite integers are signed 64-bit. A time
    past 2262 is clamped to the last one storable (as Linux clamps times to a filesystem's
    range), and a cookie past every entry lists nothing; neither stops the run."""
    root = _volume_directory(tmp_path)
    handle = _open_new(root, "f")
    handle.close()
    far = (1 << 64) - 1
    root.set_times_at("f", far, 1 << 63)
    file = root.open_file("f", create=False, exclusive=False, truncate=False, read=True, write=False)
    file.set_times(far, far)
    stat = file.stat()
    assert stat.atime_ns == stat.mtime_ns == (1 << 63) - 1
    file.close()
    assert list(root.readdir(far)) == [] and list(root.readdir(1 << 63)) == []
    assert [entry.name for entry in root.readdir(0)] == ["f"]
    root.session.close()


def test_a_buffered_write_that_storage_takes_only_in_part_is_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest was told a buffered write went in: if storage takes only part of it when the
    buffer is written out (the volume filled up in the middle), the flushing call fails with
    ENOSPC instead of losing the rest silently."""
    root = _volume_directory(tmp_path)
    _open_new(root, "f").close()  # created: the buffer goes through fs.write, not the create
    handle = root.open_file("f", create=False, exclusive=False, truncate=False, read=True, write=True)
    assert handle.pwrite(b"x" * 5000, 0) == 5000
    fs = root.session.fs
    monkeypatch.setattr(fs, "write", lambda ino, offset, data: len(data) - 1000)
    with pytest.raises(OSError) as failure:
        handle.stat()
    assert failure.value.errno == errno.ENOSPC
    monkeypatch.undo()
    handle.close()
    root.session.close()
