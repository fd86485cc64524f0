"""Where a guest's pre-opened directory lives during a differential run, and how it is compared.

A differential test starts a guest on a known directory tree, lets it run, and compares the tree
it leaves behind with the one wasmtime's built-in WASI left. The "where" is pluggable: a
`GuestDirectory` is one place a tree can live for one run (a host directory, or an encrypted
volume), with three steps:

    prepare(initial)      fill it with the tree found in the host directory `initial`
    keep_arguments(guest) the `keep run` options that pre-open it at guest path `guest`
    read_back()           the tree as it is after the run, as a `Tree`

Adding a backend is writing one subclass (for the volume: create an image and import `initial`
into it; return `--volume IMG::GUEST` plus key options; `keep volume export` into a temporary
directory and `snapshot` that) and listing it in `GUEST_DIRECTORY_BACKENDS`. The reference always
runs on a `HostDirectory`, since built-in WASI only knows host directories.

A `Tree` maps each relative path to an `Entry` with the facts that must match: the type, the
contents of files (so sizes too), and symlink targets. Timestamps, permissions and inode numbers
are not compared: they belong to the host, not to the program.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

EntryKind = Literal["file", "dir", "symlink", "other"]


@dataclass(frozen=True)
class Entry:
    """One node of a tree: `data` is a file's contents or a symlink's target (empty otherwise)."""

    kind: EntryKind
    data: bytes = b""

    def describe(self) -> str:
        """A one-line summary for diffs: big contents are shown as size and digest."""
        if self.kind == "symlink":
            return f"symlink -> {self.data.decode(errors='backslashreplace')}"
        if self.kind != "file":
            return self.kind
        shown = repr(self.data) if len(self.data) <= 64 else hashlib.sha256(self.data).hexdigest()[:16]
        return f"file size={len(self.data)} {shown}"


Tree = dict[str, Entry]


@dataclass(frozen=True)
class Symlink:
    """In a tree specification: a symbolic link with this target."""

    target: str


@dataclass(frozen=True)
class Directory:
    """In a tree specification: an empty directory (parents of other entries appear by themselves)."""


TreeItem = bytes | Symlink | Directory
TreeSpec = Mapping[str, TreeItem]


def materialize(spec: TreeSpec, root: Path) -> None:
    """Creates the tree `spec` (relative path -> item) under the existing directory `root`."""
    for relative, item in sorted(spec.items()):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(item, Directory):
            path.mkdir(exist_ok=True)
        elif isinstance(item, Symlink):
            path.symlink_to(item.target)
        else:
            path.write_bytes(item)


def snapshot(root: Path) -> Tree:
    """Reads the tree under `root` without following symlinks."""
    tree: Tree = {}
    for directory, subdirectories, files in os.walk(root):
        for name in [*subdirectories, *files]:
            path = Path(directory, name)
            relative = path.relative_to(root).as_posix()
            if path.is_symlink():
                tree[relative] = Entry("symlink", os.readlink(path).encode())
            elif path.is_dir():
                tree[relative] = Entry("dir")
            elif path.is_file():
                tree[relative] = Entry("file", path.read_bytes())
            else:
                tree[relative] = Entry("other")
    return tree


def describe_tree(tree: Tree) -> list[str]:
    """The tree as sorted `path: summary` lines, so pytest shows a readable diff."""
    return [f"{path}: {tree[path].describe()}" for path in sorted(tree)]


class GuestDirectory(ABC):
    """One place where a guest's directory lives for one run (see the module docstring)."""

    name: ClassVar[str]

    def __init__(self, workdir: Path) -> None:
        """`workdir` is an empty directory this backend may use as it likes."""
        self.workdir = workdir

    @abstractmethod
    def prepare(self, initial: Path) -> None:
        """Fills the guest directory with a copy of the tree in the host directory `initial`."""

    @abstractmethod
    def keep_arguments(self, guest_path: str) -> list[str]:
        """The `keep run` options that pre-open the directory at `guest_path`."""

    @abstractmethod
    def read_back(self) -> Tree:
        """The tree after the run. Raises AssertionError if the run changed anything outside."""


DECOY_NAME = "outside.txt"
DECOY_CONTENTS = b"SECRET: outside the pre-opened directory\n"


class HostDirectory(GuestDirectory):
    """A plain host directory pre-opened with `--dir HOST::GUEST` (what built-in WASI uses too).

    A decoy file sits next to it (`outside.txt`, the target of the escape fixture's `..` links),
    so an escape that works finds something to read, and `read_back` notices anything created,
    changed or removed beside the directory.
    """

    name = "host-dir"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.root = workdir / "sandbox"

    def prepare(self, initial: Path) -> None:
        shutil.copytree(initial, self.root, symlinks=True)
        (self.workdir / DECOY_NAME).write_bytes(DECOY_CONTENTS)

    def keep_arguments(self, guest_path: str) -> list[str]:
        return ["--dir", f"{self.root}::{guest_path}"]

    def read_back(self) -> Tree:
        beside = {path.name for path in self.workdir.iterdir()} - {self.root.name}
        assert beside == {DECOY_NAME}, f"the guest changed names outside its directory: {sorted(beside)}"
        decoy = self.workdir / DECOY_NAME
        assert decoy.read_bytes() == DECOY_CONTENTS, "the guest changed the decoy outside its directory"
        return snapshot(self.root)


class EncryptedVolume(GuestDirectory):
    """An encrypted volume image pre-opened with `--volume IMG::GUEST` (issue 4, point 3).

    `prepare` creates the image (a cheap KDF: tests only) and copies the initial tree in with
    `keep volume import`; `read_back` copies the tree out with `keep volume export`, after
    checking that the run left the volume consistent (every sector against the Merkle tree,
    SQLite's integrity check, the filesystem invariants).
    """

    name = "volume"
    PASSPHRASE = b"differential tests"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.image = workdir / "sandbox.img"
        self.passphrase_file = workdir / "passphrase"

    def _keep_volume(self, *arguments: str) -> None:
        """`keep volume ARGUMENTS`, in this process (the CLI's own entry point, without the cost
        of starting Python; `keep run` itself is still a separate process)."""
        from shim.cli import main

        status = main(["volume", *arguments, "--passphrase-file", str(self.passphrase_file)])
        assert status == 0, f"keep volume {arguments[0]} exited {status}"

    def prepare(self, initial: Path) -> None:
        from storage.luks2 import KdfCost
        from storage.volume import create_volume

        self.passphrase_file.write_bytes(self.PASSPHRASE + b"\n")
        create_volume(self.image, 64 << 20, self.PASSPHRASE, pbkdf="pbkdf2",
                      kdf_cost=KdfCost(iterations=1000)).close()
        if any(initial.iterdir()):
            self._keep_volume("import", str(self.image), str(initial), "/")

    def keep_arguments(self, guest_path: str) -> list[str]:
        return ["--volume", f"{self.image}::{guest_path}", "--passphrase-file", str(self.passphrase_file)]

    def read_back(self) -> Tree:
        from storage.volume import open_volume

        with open_volume(self.image, self.PASSPHRASE, writable=False) as volume:
            problems = volume.fsck()
        assert problems == [], f"the run left the volume inconsistent: {problems}"
        exported = self.workdir / "exported"
        self._keep_volume("export", str(self.image), str(exported), "/")
        return snapshot(exported)


GuestDirectoryFactory = Callable[[Path], GuestDirectory]

# Every backend the differential tests run keepshim on; the reference always uses HostDirectory.
GUEST_DIRECTORY_BACKENDS: Mapping[str, GuestDirectoryFactory] = {
    HostDirectory.name: HostDirectory,
    EncryptedVolume.name: EncryptedVolume,
}
