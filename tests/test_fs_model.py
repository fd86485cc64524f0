"""A hypothesis state machine drives the filesystem and a tiny in-memory model side by side.

Thousands of random operations (create, write at random offsets, truncate, mkdir, rename over
existing names and with the no-replace / exchange flags, link, unlink, rmdir, symlink, chmod),
with close-and-reopen of the whole volume in between: the tree, every file's bytes, link counts
and every errno must match the model.
"""

from __future__ import annotations

import errno
import stat
from dataclasses import dataclass, field

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from storage.blockdev import MemoryBlockDevice
from storage.fs import BLOCK_SIZE, RENAME_EXCHANGE, RENAME_NOREPLACE, ROOT_INODE
from storage.luks2 import KdfCost
from storage.volume import Volume, create_volume, open_volume

NAMES = st.sampled_from([b"a", b"b", b"c", b"d\xff", b"e e"])
PASSPHRASE = b"model"


@dataclass(eq=False)
class MFile:
    ino: int
    data: bytearray = field(default_factory=bytearray)
    nlink: int = 1
    mode: int = 0o644
    mapped: set[int] = field(default_factory=set)  # block indices written (holes are not)


@dataclass(eq=False)
class MLink:
    ino: int
    target: bytes


@dataclass(eq=False)
class MDir:
    ino: int
    entries: dict[bytes, MFile | MLink | MDir] = field(default_factory=dict)
    parent: MDir | None = None


Node = MFile | MLink | MDir


class FilesystemModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.device = MemoryBlockDevice(24 << 20)
        self.volume: Volume = create_volume(self.device, None, PASSPHRASE, pbkdf="pbkdf2",
                                            kdf_cost=KdfCost(iterations=1000))
        self.root = MDir(ROOT_INODE)
        self.root.parent = self.root

    def teardown(self) -> None:
        self.volume.close()

    # -- helpers -------------------------------------------------------------------------

    def dirs(self) -> list[MDir]:
        found: list[MDir] = []
        stack = [self.root]
        while stack:
            directory = stack.pop()
            found.append(directory)
            stack.extend(n for n in directory.entries.values() if isinstance(n, MDir))
        return found

    def files(self) -> list[MFile]:
        seen: dict[int, MFile] = {}
        for directory in self.dirs():
            for node in directory.entries.values():
                if isinstance(node, MFile):
                    seen[node.ino] = node
        return sorted(seen.values(), key=lambda f: f.ino)

    def expect(self, code: int | None, call: object, *args: object, **kwargs: object) -> object:
        """Run `call`; it must fail with errno `code`, or succeed when `code` is None."""
        assert callable(call)
        try:
            result = call(*args, **kwargs)
        except OSError as error:
            assert error.errno == code, f"{call.__name__}{args}: errno {error.errno}, model {code}"
            return None
        assert code is None, f"{call.__name__}{args} succeeded, model says errno {code}"
        return result

    @staticmethod
    def contains(ancestor: MDir, node: MDir) -> bool:
        current = node
        while True:
            if current is ancestor:
                return True
            if current.parent is current or current.parent is None:
                return False
            current = current.parent

    # -- rules ---------------------------------------------------------------------------

    @rule(data=st.data(), name=NAMES)
    def create(self, data: st.DataObject, name: bytes) -> None:
        parent = data.draw(st.sampled_from(self.dirs()))
        code = errno.EEXIST if name in parent.entries else None
        attr = self.expect(code, self.volume.fs.create, parent.ino, name, 0o640)
        if code is None:
            parent.entries[name] = MFile(attr.ino, mode=0o640)  # type: ignore[attr-defined]

    @rule(data=st.data(), name=NAMES)
    def mkdir(self, data: st.DataObject, name: bytes) -> None:
        parent = data.draw(st.sampled_from(self.dirs()))
        code = errno.EEXIST if name in parent.entries else None
        attr = self.expect(code, self.volume.fs.mkdir, parent.ino, name)
        if code is None:
            parent.entries[name] = MDir(attr.ino, parent=parent)  # type: ignore[attr-defined]

    @rule(data=st.data(), name=NAMES, link_target=st.binary(min_size=1, max_size=20).filter(lambda t: b"\0" not in t))
    def symlink(self, data: st.DataObject, name: bytes, link_target: bytes) -> None:
        parent = data.draw(st.sampled_from(self.dirs()))
        code = errno.EEXIST if name in parent.entries else None
        attr = self.expect(code, self.volume.fs.symlink, parent.ino, name, link_target)
        if code is None:
            parent.entries[name] = MLink(attr.ino, link_target)  # type: ignore[attr-defined]

    @rule(data=st.data(), offset=st.integers(0, 20000), payload=st.binary(min_size=0, max_size=9000))
    def write(self, data: st.DataObject, offset: int, payload: bytes) -> None:
        files = self.files()
        if not files:
            return
        node = data.draw(st.sampled_from(files))
        self.volume.fs.write(node.ino, offset, payload)
        if payload:
            if len(node.data) < offset:
                node.data.extend(bytes(offset - len(node.data)))
            node.data[offset:offset + len(payload)] = payload
            node.mapped.update(range(offset // BLOCK_SIZE, (offset + len(payload) - 1) // BLOCK_SIZE + 1))

    @rule(data=st.data(), size=st.integers(0, 30000))
    def truncate(self, data: st.DataObject, size: int) -> None:
        files = self.files()
        if not files:
            return
        node = data.draw(st.sampled_from(files))
        attr = self.volume.fs.setattr(node.ino, size=size)
        if size < len(node.data):
            del node.data[size:]
            node.mapped = {index for index in node.mapped if index * BLOCK_SIZE < size}
        else:
            node.data.extend(bytes(size - len(node.data)))
        # what it returns (FUSE hands it to the kernel as the file's attributes) is after the trim
        assert (attr.size, attr.blocks) == (size, len(node.mapped) * (BLOCK_SIZE // 512))

    @rule(data=st.data(), mode=st.integers(0, 0o7777))
    def chmod(self, data: st.DataObject, mode: int) -> None:
        files = self.files()
        if not files:
            return
        node = data.draw(st.sampled_from(files))
        attr = self.volume.fs.setattr(node.ino, mode=mode)
        node.mode = mode
        assert attr.mode == stat.S_IFREG | mode

    @rule(data=st.data(), name=NAMES)
    def link(self, data: st.DataObject, name: bytes) -> None:
        files = self.files()
        if not files:
            return
        node = data.draw(st.sampled_from(files))
        parent = data.draw(st.sampled_from(self.dirs()))
        code = errno.EEXIST if name in parent.entries else None
        self.expect(code, self.volume.fs.link, node.ino, parent.ino, name)
        if code is None:
            parent.entries[name] = node
            node.nlink += 1

    @rule(data=st.data(), name=NAMES)
    def unlink(self, data: st.DataObject, name: bytes) -> None:
        parent = data.draw(st.sampled_from(self.dirs()))
        node = parent.entries.get(name)
        code = errno.ENOENT if node is None else errno.EISDIR if isinstance(node, MDir) else None
        self.expect(code, self.volume.fs.unlink, parent.ino, name)
        if code is None:
            del parent.entries[name]
            if isinstance(node, MFile):
                node.nlink -= 1

    @rule(data=st.data(), name=NAMES)
    def rmdir(self, data: st.DataObject, name: bytes) -> None:
        parent = data.draw(st.sampled_from(self.dirs()))
        node = parent.entries.get(name)
        if node is None:
            code: int | None = errno.ENOENT
        elif not isinstance(node, MDir):
            code = errno.ENOTDIR
        elif node.entries:
            code = errno.ENOTEMPTY
        else:
            code = None
        self.expect(code, self.volume.fs.rmdir, parent.ino, name)
        if code is None:
            del parent.entries[name]

    @rule(data=st.data(), old_name=NAMES, new_name=NAMES,
          flags=st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename(self, data: st.DataObject, old_name: bytes, new_name: bytes, flags: int) -> None:
        old_parent = data.draw(st.sampled_from(self.dirs()))
        new_parent = data.draw(st.sampled_from(self.dirs()))
        source = old_parent.entries.get(old_name)
        target = new_parent.entries.get(new_name)
        code = self.rename_errno(old_parent, source, new_parent, target, flags)
        self.expect(code, self.volume.fs.rename, old_parent.ino, old_name, new_parent.ino, new_name, flags)
        if code is not None or source is target:
            return
        assert source is not None
        if flags == RENAME_EXCHANGE:
            assert target is not None
            old_parent.entries[old_name], new_parent.entries[new_name] = target, source
            if isinstance(target, MDir):
                target.parent = old_parent
        else:
            del old_parent.entries[old_name]
            if isinstance(target, MFile):
                target.nlink -= 1
            new_parent.entries[new_name] = source
        if isinstance(source, MDir):
            source.parent = new_parent

    def rename_errno(self, old_parent: MDir, source: Node | None, new_parent: MDir,
                     target: Node | None, flags: int) -> int | None:
        if source is None:
            return errno.ENOENT
        if flags == RENAME_EXCHANGE:
            if target is None:
                return errno.ENOENT
            if source is target:
                return None
            if old_parent is not new_parent and (
                    (isinstance(source, MDir) and self.contains(source, new_parent))
                    or (isinstance(target, MDir) and self.contains(target, old_parent))):
                return errno.EINVAL
            return None
        if target is not None and flags == RENAME_NOREPLACE:
            return errno.EEXIST
        if isinstance(source, MDir) and old_parent is not new_parent and self.contains(source, new_parent):
            return errno.EINVAL
        if target is source or target is None:
            return None
        if isinstance(source, MDir) and not isinstance(target, MDir):
            return errno.ENOTDIR
        if not isinstance(source, MDir) and isinstance(target, MDir):
            return errno.EISDIR
        if isinstance(target, MDir) and target.entries:
            return errno.ENOTEMPTY
        return None

    @rule()
    def fsync(self) -> None:
        self.volume.fs.fsync()

    @rule()
    def reopen(self) -> None:
        pinned = self.volume.commit()
        self.volume.close()
        self.volume = open_volume(self.device, PASSPHRASE, expected_generation=pinned.generation)
        assert self.volume.fsck() == []

    # -- the comparison ------------------------------------------------------------------

    @invariant()
    def matches_the_model(self) -> None:
        fs = self.volume.fs
        for directory in self.dirs():
            listing = {name: attr for name, attr, _ in fs.readdir(directory.ino)}
            assert listing.pop(b".").ino == directory.ino
            assert listing.pop(b"..").ino == (directory.parent or directory).ino
            assert set(listing) == set(directory.entries)
            subdirs = sum(isinstance(n, MDir) for n in directory.entries.values())
            assert fs.getattr(directory.ino).nlink == 2 + subdirs
            for name, node in directory.entries.items():
                attr = listing[name]
                assert attr.ino == node.ino
                if isinstance(node, MFile):
                    assert attr.is_file and attr.nlink == node.nlink and attr.size == len(node.data)
                    assert stat.S_IMODE(attr.mode) == node.mode
                    assert attr.blocks == len(node.mapped) * (BLOCK_SIZE // 512)  # st_blocks: holes take none
                    assert fs.read(node.ino, 0, len(node.data) + 10) == bytes(node.data)
                elif isinstance(node, MLink):
                    assert attr.is_symlink and fs.readlink(node.ino) == node.target
                else:
                    assert attr.is_dir
                # the remembered directory names (path resolution's) agree with the model
                try:
                    opened: int | None = fs.open_directory(directory.ino, name)
                except OSError as error:
                    assert error.errno == errno.ENOTDIR and not isinstance(node, MDir)
                    opened = None
                if opened is not None:
                    assert isinstance(node, MDir) and opened == node.ino
                    fs.release(opened)


FilesystemModel.TestCase.settings = settings(
    max_examples=40, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TestFilesystemModel = pytest.mark.slow(FilesystemModel.TestCase)
