"""The encrypted volume as a wasi_host backend (shim.volume_backend), in process, without wasm.

The behaviour tests of tests/test_wasi_files.py run on it too (it is listed in
wasi_harness.BACKENDS); here: random operation sequences against the host kernel, the write-back
buffer's coherence, commits on fd_sync / fd_datasync, integrity failures reported, and the
session's close.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from run_volume_support import data_sectors, flip, make_volume
from test_wasi_backends_agree import operation, tree
from wasi_harness import RESULT, GuestHarness, closing, volume_root

from shim.volume_backend import WRITE_BUFFER_BYTES, VolumeDirectory, VolumeSession, directory_over
from storage.errors import IntegrityError
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
