"""The filesystem's remembered directory names (`Filesystem.open_directory`) and the statements
an unlink skips (trims, xattrs): every namespace change must be seen at once, and nothing a
skipped statement would have deleted may stay behind. Each test first makes the filesystem
remember the names it then changes, so a missing invalidation answers from stale state."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from storage.blockdev import MemoryBlockDevice
from storage.errors import FilesystemError
from storage.fs import RENAME_EXCHANGE, RENAME_NOREPLACE, ROOT_INODE, Filesystem
from storage.luks2 import KdfCost
from storage.volume import Volume, create_volume, open_volume

PASSPHRASE = b"names"


@pytest.fixture
def device() -> MemoryBlockDevice:
    return MemoryBlockDevice(24 << 20)


@pytest.fixture
def volume(device: MemoryBlockDevice) -> Iterator[Volume]:
    opened = create_volume(device, None, PASSPHRASE, pbkdf="pbkdf2", kdf_cost=KdfCost(iterations=1000))
    yield opened
    opened.close()


def resolve(fs: Filesystem, parent: int, name: bytes) -> int | str:
    """What `open_directory` answers (the inode, or the errno's name), its open count released."""
    try:
        ino = fs.open_directory(parent, name)
    except FilesystemError as error:
        return errno.errorcode.get(error.errno or 0, repr(error.errno))
    fs.release(ino)
    return ino


def test_renamed_directory_resolves_under_its_new_name_only(volume: Volume) -> None:
    fs = volume.fs
    moved = fs.mkdir(ROOT_INODE, b"old").ino
    sub = fs.mkdir(ROOT_INODE, b"sub").ino
    assert resolve(fs, ROOT_INODE, b"old") == moved
    fs.rename(ROOT_INODE, b"old", ROOT_INODE, b"new")
    assert resolve(fs, ROOT_INODE, b"old") == "ENOENT"
    assert resolve(fs, ROOT_INODE, b"new") == moved
    fs.rename(ROOT_INODE, b"new", sub, b"deeper")
    assert resolve(fs, ROOT_INODE, b"new") == "ENOENT"
    assert resolve(fs, sub, b"deeper") == moved
    assert fs.lookup(moved, b"..").ino == sub


def test_rmdir_then_mkdir_of_the_same_name_resolves_to_the_new_inode(volume: Volume) -> None:
    fs = volume.fs
    first = fs.mkdir(ROOT_INODE, b"d").ino
    assert resolve(fs, ROOT_INODE, b"d") == first
    fs.rmdir(ROOT_INODE, b"d")
    assert resolve(fs, ROOT_INODE, b"d") == "ENOENT"
    second = fs.mkdir(ROOT_INODE, b"d").ino
    assert second != first
    assert resolve(fs, ROOT_INODE, b"d") == second
    fs.rmdir(ROOT_INODE, b"d")
    fs.create(ROOT_INODE, b"d")
    assert resolve(fs, ROOT_INODE, b"d") == "ENOTDIR"


def test_rename_over_an_existing_directory_resolves_to_the_moved_one(volume: Volume) -> None:
    fs = volume.fs
    source = fs.mkdir(ROOT_INODE, b"source").ino
    target = fs.mkdir(ROOT_INODE, b"target").ino
    assert resolve(fs, ROOT_INODE, b"source") == source
    assert resolve(fs, ROOT_INODE, b"target") == target
    with pytest.raises(FilesystemError) as refused:
        fs.rename(ROOT_INODE, b"source", ROOT_INODE, b"target", RENAME_NOREPLACE)
    assert refused.value.errno == errno.EEXIST
    assert resolve(fs, ROOT_INODE, b"target") == target  # a refused rename changes nothing
    fs.rename(ROOT_INODE, b"source", ROOT_INODE, b"target")
    assert resolve(fs, ROOT_INODE, b"target") == source
    assert resolve(fs, ROOT_INODE, b"source") == "ENOENT"


def test_exchange_swaps_what_both_names_resolve_to(volume: Volume) -> None:
    fs = volume.fs
    left = fs.mkdir(ROOT_INODE, b"left").ino
    right = fs.mkdir(ROOT_INODE, b"right").ino
    assert (resolve(fs, ROOT_INODE, b"left"), resolve(fs, ROOT_INODE, b"right")) == (left, right)
    fs.rename(ROOT_INODE, b"left", ROOT_INODE, b"right", RENAME_EXCHANGE)
    assert (resolve(fs, ROOT_INODE, b"left"), resolve(fs, ROOT_INODE, b"right")) == (right, left)
    fs.create(ROOT_INODE, b"file")
    fs.rename(ROOT_INODE, b"left", ROOT_INODE, b"file", RENAME_EXCHANGE)
    assert resolve(fs, ROOT_INODE, b"left") == "ENOTDIR"
    assert resolve(fs, ROOT_INODE, b"file") == right


def test_a_name_a_failed_rename_would_have_moved_still_resolves(volume: Volume) -> None:
    fs = volume.fs
    outer = fs.mkdir(ROOT_INODE, b"outer").ino
    inner = fs.mkdir(outer, b"inner").ino
    assert resolve(fs, ROOT_INODE, b"outer") == outer
    with pytest.raises(FilesystemError) as refused:
        fs.rename(ROOT_INODE, b"outer", inner, b"loop")  # into itself: EINVAL
    assert refused.value.errno == errno.EINVAL
    assert resolve(fs, ROOT_INODE, b"outer") == outer
    assert resolve(fs, outer, b"inner") == inner


def test_open_directory_counts_a_handle_that_keeps_a_removed_directory(volume: Volume) -> None:
    fs = volume.fs
    ino = fs.mkdir(ROOT_INODE, b"gone").ino
    assert fs.open_directory(ROOT_INODE, b"gone") == ino
    fs.rmdir(ROOT_INODE, b"gone")
    assert fs.getattr(ino).nlink == 0  # still there while open
    assert resolve(fs, ROOT_INODE, b"gone") == "ENOENT"
    fs.release(ino)
    with pytest.raises(FilesystemError) as freed:
        fs.getattr(ino)
    assert freed.value.errno == errno.ENOENT
    assert fs.check() == []


def test_lookups_in_a_known_directory_keep_their_errno(volume: Volume) -> None:
    fs = volume.fs
    ino = fs.mkdir(ROOT_INODE, b"d").ino
    assert resolve(fs, ROOT_INODE, b"d") == ino
    for name, code in [(b"missing", errno.ENOENT), (b"a/b", errno.EINVAL), (b"x" * 256, errno.ENAMETOOLONG)]:
        with pytest.raises(FilesystemError) as failed:
            fs.lookup(ino, name)
        assert failed.value.errno == code
    fs.rmdir(ROOT_INODE, b"d")  # a missing directory: ENOENT for any name, as before it was known
    for name in (b"missing", b"a/b"):
        with pytest.raises(FilesystemError) as failed:
            fs.lookup(ino, name)
        assert failed.value.errno == errno.ENOENT


def test_unlinking_a_file_with_xattrs_deletes_them_in_every_session(device: MemoryBlockDevice, volume: Volume) -> None:
    fs = volume.fs
    for name in (b"a", b"b"):
        fs.create(ROOT_INODE, name)
    fs.setxattr(fs.lookup(ROOT_INODE, b"a").ino, b"user.k", b"v")  # no xattrs at mount, one now
    fs.unlink(ROOT_INODE, b"a")
    assert fs.check() == []
    fs.setxattr(fs.lookup(ROOT_INODE, b"b").ino, b"user.k", b"v")
    pinned = volume.commit()
    volume.close()
    reopened = open_volume(device, PASSPHRASE, expected_generation=pinned.generation)
    try:
        reopened.fs.unlink(ROOT_INODE, b"b")  # xattrs at mount
        assert reopened.fs.check() == []
    finally:
        reopened.close()


def test_unlinking_a_file_whose_truncation_was_interrupted_frees_everything(
        volume: Volume, monkeypatch: pytest.MonkeyPatch) -> None:
    fs = volume.fs
    free = fs.statfs().blocks_free
    ino = fs.create(ROOT_INODE, b"f").ino
    fs.write(ino, 0, b"x" * 40000)  # 10 blocks
    with monkeypatch.context() as patched:
        patched.setattr(fs, "_trim_blocks", lambda ino, size: None)  # as if it failed at once
        fs.setattr(ino, size=100)
    assert fs.statfs().blocks_free == free - 10  # the blocks past the end wait to be trimmed
    assert fs.check() == []  # listed in trims: the next writable mount would free them
    fs.unlink(ROOT_INODE, b"f")
    assert fs.statfs().blocks_free == free
    assert fs.check() == []


def test_refused_creates_leave_the_parent_as_it_was(volume: Volume) -> None:
    fs = volume.fs
    parent = fs.mkdir(ROOT_INODE, b"p").ino
    fs.create(parent, b"taken")
    file = fs.lookup(parent, b"taken").ino
    before = fs.getattr(parent)
    for call, name, code in [(fs.create, b"taken", errno.EEXIST), (fs.mkdir, b"taken", errno.EEXIST),
                             (fs.mkdir, b".", errno.EEXIST), (fs.create, b"..", errno.EEXIST),
                             (fs.create, b"a/b", errno.EINVAL)]:
        with pytest.raises(FilesystemError) as refused:
            call(parent, name)
        assert refused.value.errno == code
    assert fs.getattr(parent) == before  # times and link count: the transaction rolled back
    with pytest.raises(FilesystemError) as not_a_directory:
        fs.mkdir(file, b"x")
    assert not_a_directory.value.errno == errno.ENOTDIR
    fs.unlink(parent, b"taken")
    fs.rmdir(ROOT_INODE, b"p")
    for ino in (parent, 12345):
        with pytest.raises(FilesystemError) as gone:
            fs.create(ino, b"x")
        assert gone.value.errno == errno.ENOENT
    assert fs.check() == []
