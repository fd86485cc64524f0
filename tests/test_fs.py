"""Filesystem semantics one behaviour at a time, on an in-memory volume (real LUKS2, XTS,
integrity and SQLite underneath)."""

from __future__ import annotations

import errno
import os
import random
import time
from collections.abc import Iterator

import pytest

from storage.blockdev import MemoryBlockDevice
from storage.errors import FilesystemError, IntegrityError, NoSpace
from storage.fs import RENAME_EXCHANGE, RENAME_NOREPLACE, ROOT_INODE, XATTR_CREATE, XATTR_REPLACE
from storage.luks2 import KdfCost
from storage.volume import Volume, create_volume, open_volume

PASSPHRASE = b"fs tests"
COST = KdfCost(iterations=1000)


def make_volume(size: int = 24 << 20, integrity: str = "merkle") -> tuple[MemoryBlockDevice, Volume]:
    device = MemoryBlockDevice(size)
    volume = create_volume(device, None, PASSPHRASE, pbkdf="pbkdf2", kdf_cost=COST,
                           integrity=integrity)  # type: ignore[arg-type]
    return device, volume


@pytest.fixture
def volume() -> Iterator[Volume]:
    _, opened = make_volume()
    yield opened
    opened.close()


def errno_of(call: object, *args: object, **kwargs: object) -> int | None:
    assert callable(call)
    try:
        call(*args, **kwargs)
    except OSError as error:
        return error.errno
    return None


def test_sparse_files_read_zeros_in_holes_and_after_extension(volume: Volume) -> None:
    fs = volume.fs
    ino = fs.create(ROOT_INODE, b"sparse").ino
    fs.write(ino, 100_000, b"end")
    assert fs.read(ino, 0, 10) == bytes(10)
    assert fs.read(ino, 99_998, 10) == b"\0\0end"
    fs.setattr(ino, size=50)
    fs.setattr(ino, size=200_000)
    assert fs.read(ino, 0, 200_000) == bytes(200_000)
    assert fs.getattr(ino).size == 200_000


def test_truncate_then_extend_never_shows_old_bytes(volume: Volume) -> None:
    fs = volume.fs
    ino = fs.create(ROOT_INODE, b"f").ino
    fs.write(ino, 0, b"x" * 10_000)
    fs.setattr(ino, size=5)
    fs.write(ino, 9_000, b"y")
    data = fs.read(ino, 0, 9_001)
    assert data == b"x" * 5 + bytes(8_995) + b"y"


def test_unlinked_open_file_lives_until_release(volume: Volume) -> None:
    fs = volume.fs
    ino = fs.create(ROOT_INODE, b"tmp").ino
    fs.write(ino, 0, b"still here")
    fs.open(ino)
    fs.unlink(ROOT_INODE, b"tmp")
    assert fs.getattr(ino).nlink == 0
    assert fs.read(ino, 0, 100) == b"still here"
    assert volume.fsck() == []
    fs.release(ino)
    assert errno_of(fs.getattr, ino) == errno.ENOENT
    assert volume.fsck() == []


def test_orphans_of_a_dead_process_are_reaped_at_mount() -> None:
    device, volume = make_volume()
    ino = volume.fs.create(ROOT_INODE, b"tmp").ino
    volume.fs.write(ino, 0, os.urandom(50_000))
    volume.fs.open(ino)
    volume.fs.unlink(ROOT_INODE, b"tmp")
    volume.commit()
    crashed = device.snapshot()  # the process dies with the file still open
    volume.close()
    device.restore(crashed)
    with open_volume(device, PASSPHRASE) as reopened:
        assert errno_of(reopened.fs.getattr, ino) == errno.ENOENT
        assert reopened.fsck() == []


def test_readdir_cookies_stay_valid_across_inserts_and_deletes(volume: Volume) -> None:
    fs = volume.fs
    for index in range(20):
        fs.create(ROOT_INODE, b"f%02d" % index)
    listing = list(fs.readdir(ROOT_INODE))
    names = [name for name, _, _ in listing]
    assert names[:2] == [b".", b".."] and names[2:] == [b"f%02d" % i for i in range(20)]
    cookie_after_f09 = next(c for name, _, c in listing if name == b"f09")
    fs.unlink(ROOT_INODE, b"f05")
    fs.unlink(ROOT_INODE, b"f10")
    fs.create(ROOT_INODE, b"new")
    rest = [name for name, _, _ in fs.readdir(ROOT_INODE, cookie_after_f09)]
    assert rest == [b"f%02d" % i for i in range(11, 20)] + [b"new"]
    assert list(fs.readdir(ROOT_INODE, listing[-1][2]))[-1][0] == b"new"


def test_lookup_dot_and_dotdot(volume: Volume) -> None:
    fs = volume.fs
    sub = fs.mkdir(ROOT_INODE, b"sub").ino
    assert fs.lookup(sub, b".").ino == sub
    assert fs.lookup(sub, b"..").ino == ROOT_INODE
    assert fs.lookup(ROOT_INODE, b"..").ino == ROOT_INODE


@pytest.mark.parametrize(("name", "code"), [
    (b"x" * 256, errno.ENAMETOOLONG), (b"a/b", errno.EINVAL), (b"a\0b", errno.EINVAL), (b"", errno.EINVAL)])
def test_bad_names_are_refused(volume: Volume, name: bytes, code: int) -> None:
    assert errno_of(volume.fs.create, ROOT_INODE, name) == code


def test_any_byte_but_slash_and_nul_is_a_valid_name(volume: Volume) -> None:
    name = bytes(b for b in range(1, 256) if b != ord("/"))
    assert len(name) == 254
    ino = volume.fs.create(ROOT_INODE, name).ino
    assert volume.fs.lookup(ROOT_INODE, name).ino == ino


def test_directory_errors(volume: Volume) -> None:
    fs = volume.fs
    sub = fs.mkdir(ROOT_INODE, b"d").ino
    fs.create(sub, b"f")
    assert errno_of(fs.rmdir, ROOT_INODE, b"d") == errno.ENOTEMPTY
    assert errno_of(fs.unlink, ROOT_INODE, b"d") == errno.EISDIR
    assert errno_of(fs.rmdir, sub, b"f") == errno.ENOTDIR
    assert errno_of(fs.link, sub, ROOT_INODE, b"d2") == errno.EPERM
    assert errno_of(fs.lookup, fs.lookup(sub, b"f").ino, b"x") == errno.ENOTDIR
    assert errno_of(fs.rename, ROOT_INODE, b"d", sub, b"inside") == errno.EINVAL
    assert errno_of(fs.read, sub, 0, 1) == errno.EISDIR
    assert errno_of(fs.create, 999, b"x") == errno.ENOENT


def test_rename_replaces_atomically_and_honours_flags(volume: Volume) -> None:
    fs = volume.fs
    a = fs.create(ROOT_INODE, b"a").ino
    b = fs.create(ROOT_INODE, b"b").ino
    fs.write(a, 0, b"A")
    fs.write(b, 0, b"B")
    assert errno_of(fs.rename, ROOT_INODE, b"a", ROOT_INODE, b"b", RENAME_NOREPLACE) == errno.EEXIST
    fs.rename(ROOT_INODE, b"a", ROOT_INODE, b"b", RENAME_EXCHANGE)
    assert fs.read(fs.lookup(ROOT_INODE, b"a").ino, 0, 1) == b"B"
    fs.rename(ROOT_INODE, b"a", ROOT_INODE, b"b")
    assert fs.lookup(ROOT_INODE, b"b").ino == b
    assert errno_of(fs.getattr, a) == errno.ENOENT  # replaced and not open: freed
    assert errno_of(fs.rename, ROOT_INODE, b"a", ROOT_INODE, b"c", RENAME_EXCHANGE) == errno.ENOENT
    d1, d2 = fs.mkdir(ROOT_INODE, b"d1").ino, fs.mkdir(ROOT_INODE, b"d2").ino
    fs.rename(ROOT_INODE, b"d1", ROOT_INODE, b"d2")  # a directory over an empty directory
    assert fs.lookup(ROOT_INODE, b"d2").ino == d1 and errno_of(fs.getattr, d2) == errno.ENOENT
    assert errno_of(fs.rename, ROOT_INODE, b"b", ROOT_INODE, b"d2") == errno.EISDIR
    assert errno_of(fs.rename, ROOT_INODE, b"d2", ROOT_INODE, b"b") == errno.ENOTDIR
    assert volume.fsck() == []


def test_timestamps_are_nanoseconds_and_settable(volume: Volume) -> None:
    fs = volume.fs
    before = time.time_ns()
    attr = fs.create(ROOT_INODE, b"t")
    assert before <= attr.mtime_ns <= time.time_ns()
    changed = fs.setattr(attr.ino, atime_ns=123_456_789_123, mtime_ns=987_654_321_987)
    assert (changed.atime_ns, changed.mtime_ns) == (123_456_789_123, 987_654_321_987)
    assert changed.ctime_ns >= attr.ctime_ns
    root_before = fs.getattr(ROOT_INODE).mtime_ns
    fs.create(ROOT_INODE, b"t2")
    assert fs.getattr(ROOT_INODE).mtime_ns >= root_before


def test_hard_links_share_data_and_count(volume: Volume) -> None:
    fs = volume.fs
    ino = fs.create(ROOT_INODE, b"one").ino
    sub = fs.mkdir(ROOT_INODE, b"sub").ino
    assert fs.link(ino, sub, b"two").nlink == 2
    fs.write(fs.lookup(sub, b"two").ino, 0, b"shared")
    fs.unlink(ROOT_INODE, b"one")
    assert fs.read(ino, 0, 10) == b"shared" and fs.getattr(ino).nlink == 1


def test_symlinks(volume: Volume) -> None:
    fs = volume.fs
    attr = fs.symlink(ROOT_INODE, b"ln", b"../some/where")
    assert attr.is_symlink and attr.size == len(b"../some/where")
    assert fs.readlink(attr.ino) == b"../some/where"
    assert errno_of(fs.readlink, ROOT_INODE) == errno.EINVAL


def test_xattrs(volume: Volume) -> None:
    fs = volume.fs
    ino = fs.create(ROOT_INODE, b"x").ino
    assert errno_of(fs.getxattr, ino, b"user.k") == errno.ENODATA
    assert errno_of(fs.setxattr, ino, b"user.k", b"v", XATTR_REPLACE) == errno.ENODATA
    fs.setxattr(ino, b"user.k", b"v1")
    assert errno_of(fs.setxattr, ino, b"user.k", b"v2", XATTR_CREATE) == errno.EEXIST
    fs.setxattr(ino, b"user.k", b"v2", XATTR_REPLACE)
    assert fs.getxattr(ino, b"user.k") == b"v2" and fs.listxattr(ino) == [b"user.k"]
    fs.removexattr(ino, b"user.k")
    assert fs.listxattr(ino) == []


def test_errors_are_oserrors_with_errno(volume: Volume) -> None:
    with pytest.raises(FilesystemError) as caught:
        volume.fs.lookup(ROOT_INODE, b"missing")
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.ENOENT


def test_full_volume_gives_enospc_and_stays_usable() -> None:
    device, volume = make_volume(20 << 20)  # 4 MiB of data area after the 16 MiB LUKS2 header
    fs = volume.fs
    blob = os.urandom(64 * 1024)
    written = 0
    with pytest.raises(NoSpace) as caught:
        for index in range(1000):
            ino = fs.create(ROOT_INODE, b"fill%d" % index).ino
            for _ in range(4):
                fs.write(ino, fs.getattr(ino).size, blob)
                written += len(blob)
    assert caught.value.errno == errno.ENOSPC and written > 1 << 20
    assert volume.fsck() == []
    survivors = [name for name, _, _ in fs.readdir(ROOT_INODE)][2:]
    for name in survivors[: len(survivors) // 2]:
        fs.unlink(ROOT_INODE, name)
    again = fs.create(ROOT_INODE, b"after").ino
    fs.write(again, 0, blob)
    volume.close()
    with open_volume(device, PASSPHRASE) as reopened:
        assert reopened.fs.read(reopened.fs.lookup(ROOT_INODE, b"after").ino, 0, len(blob)) == blob
        assert reopened.fsck() == []


def test_tampered_file_data_reads_as_eio_never_garbage() -> None:
    device, volume = make_volume()
    ino = volume.fs.create(ROOT_INODE, b"secret").ino
    payload = os.urandom(400_000)
    volume.fs.write(ino, 0, payload)
    key = volume.luks.volume_key
    data_offset = volume.luks.data_offset
    volume.close()
    clean = device.snapshot()
    rng = random.Random(11)
    outcomes = {"open": 0, "eio": 0, "intact": 0}
    for _ in range(40):
        image = bytearray(clean)
        image[rng.randrange(data_offset, len(image))] ^= 1 << rng.randrange(8)
        device.restore(bytes(image))
        try:
            reopened = open_volume(device, volume_key=key, writable=False)
        except IntegrityError:
            outcomes["open"] += 1
            continue
        with reopened:
            try:
                data = reopened.fs.read(ino, 0, len(payload))
            except OSError as error:
                assert error.errno == errno.EIO
                outcomes["eio"] += 1
            else:
                assert data == payload
                outcomes["intact"] += 1
    assert outcomes["eio"] > 0, outcomes


def test_statfs_counts_space(volume: Volume) -> None:
    before = volume.fs.statfs()
    ino = volume.fs.create(ROOT_INODE, b"big").ino
    volume.fs.write(ino, 0, os.urandom(1 << 20))
    after = volume.fs.statfs()
    assert before.block_size == 4096 and after.blocks == before.blocks
    assert after.blocks_free < before.blocks_free - 200
    assert after.name_max == 255


def test_create_with_data_holds_it_and_reads_back_after_reopen() -> None:
    """`create(data=)`: the new file holds its first bytes (sizes around block edges, up to one
    write's worth), with the attributes it returned; more than that is refused; a taken name
    leaves nothing behind."""
    device, volume = make_volume()
    fs = volume.fs
    rng = random.Random(7)
    sizes = [0, 1, 4095, 4096, 4097, 3 * 4096 + 17, fs.max_create_data]
    contents = {f"f{size}".encode(): rng.randbytes(size) for size in sizes}
    created = {name: fs.create(ROOT_INODE, name, 0o600, data=data) for name, data in contents.items()}
    for name, data in contents.items():
        attr = fs.lookup(ROOT_INODE, name)
        assert attr == created[name] and attr.size == len(data) and attr.mode & 0o777 == 0o600
        assert fs.read(attr.ino, 0, len(data) + 10) == data
    blocks_before = fs.statfs().blocks_free
    assert errno_of(fs.create, ROOT_INODE, b"f1", data=b"again") == errno.EEXIST
    assert fs.statfs().blocks_free == blocks_before
    with pytest.raises(ValueError):
        fs.create(ROOT_INODE, b"too-big", data=bytes(fs.max_create_data + 1))
    volume.close()
    reopened = open_volume(device, PASSPHRASE)
    for name, data in contents.items():
        assert reopened.fs.read(reopened.fs.lookup(ROOT_INODE, name).ino, 0, len(data) + 10) == data
    assert reopened.fsck() == []
    reopened.close()


def test_fsck_of_a_volume_with_pending_orphans_and_trims_is_clean() -> None:
    """What the next writable mount finishes is not damage: an unlinked file still open when
    the process stopped (listed in orphans) and a shrink whose blocks past the end were not
    freed yet (listed in trims). A read-only fsck reports them clean; a writable mount then
    frees them."""
    device, volume = make_volume()
    fs = volume.fs
    orphan = fs.create(ROOT_INODE, b"orphan", open=True).ino
    fs.write(orphan, 0, os.urandom(20_000))
    fs.unlink(ROOT_INODE, b"orphan")  # still open: listed in orphans
    shrunk = fs.create(ROOT_INODE, b"shrunk").ino
    fs.write(shrunk, 0, os.urandom(40_000))
    free_before = fs.statfs().blocks_free
    fs._trim_blocks = lambda ino, size: None  # type: ignore[method-assign]  # stops as a crash would
    fs.setattr(shrunk, size=5000)
    volume.commit()
    crashed = device.snapshot()
    volume.close()
    device.restore(crashed)
    with open_volume(device, PASSPHRASE, writable=False) as read_only:
        assert read_only.fsck() == []
    with open_volume(device, PASSPHRASE) as reopened:
        assert reopened.fsck() == []
        assert errno_of(reopened.fs.getattr, orphan) == errno.ENOENT
        assert reopened.fs.getattr(shrunk).size == 5000
        assert reopened.fs.statfs().blocks_free > free_before  # both sets of blocks freed


def test_a_write_that_fills_the_volume_returns_a_short_count() -> None:
    """A write split into several bounded operations that runs out of room after the first
    returns how many bytes went in (POSIX write); running out in the first raises ENOSPC.
    Either way the volume stays consistent."""
    _, volume = make_volume(20 << 20)
    fs = volume.fs
    ino = fs.create(ROOT_INODE, b"big").ino
    room = fs.statfs().blocks_free * 4096
    data = os.urandom(room + 40_960)
    written = fs.write(ino, 0, data)
    assert 0 < written < len(data)
    assert fs.getattr(ino).size == written
    assert fs.read(ino, 0, written) == data[:written]
    with pytest.raises(NoSpace):
        fs.write(ino, written, data[written:])
    assert volume.fsck() == []
    volume.close()
