"""memfs against the host directory: the same random operation sequences give the same errnos
and the same trees (the host kernel is the reference for the in-memory model)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from wasi_harness import PREOPEN, RESULT, GuestHarness, closing

from wasi_host import Rights
from wasi_host._abi import Oflags
from wasi_host.hostdir import HostDirectory
from wasi_host.memfs import MemoryFilesystem

NAMES = ["a", "b", "c", "l", "a", "b", "c", "l", "a/b", "b/a", "a/c", "a/l", "b/b", "l/a", "x/.", "a/..", "b/", "a/b/c"]


def operation(harness: GuestHarness, rng: random.Random) -> tuple[str, int | tuple[int, ...]]:
    """One random operation; returns a description and its observable outcome."""
    kind = rng.choice(["mkdir", "create", "write", "unlink", "rmdir", "rename", "symlink", "stat", "link"])
    name, other = rng.choice(NAMES), rng.choice(NAMES)
    if kind == "mkdir":
        return f"mkdir {name}", harness.path_call("path_create_directory", name)
    if kind == "create":
        oflags = rng.choice([Oflags.CREAT, Oflags.CREAT | Oflags.EXCL, Oflags.TRUNC, 0, Oflags.DIRECTORY])
        errno = harness.open_errno(name, oflags, rights=rng.choice([0, Rights.FD_READ, Rights.ALL]))
        if errno == 0:
            assert harness.call("fd_close", harness.u32(RESULT)) == 0
        return f"open {name} {oflags}", errno
    if kind == "write":
        errno = harness.open_errno(name, rights=Rights.FD_WRITE)
        if errno:
            return f"write {name}", errno
        fd = harness.u32(RESULT)
        size = harness.write(fd, b"x" * rng.randint(0, 10))
        assert harness.call("fd_close", fd) == 0
        return f"write {name}", (0, size)
    if kind == "unlink":
        return f"unlink {name}", harness.path_call("path_unlink_file", name)
    if kind == "rmdir":
        return f"rmdir {name}", harness.path_call("path_remove_directory", name)
    if kind == "rename":
        return f"rename {name} {other}", harness.rename(name, other)
    if kind == "symlink":
        return f"symlink {other} {name}", harness.symlink(other, name)
    if kind == "link":
        old_ptr, old_len = harness.put(name)
        new_ptr, new_len = harness.put(other)
        return f"link {name} {other}", harness.call("path_link", PREOPEN, 0, old_ptr, old_len, PREOPEN, new_ptr, new_len)
    ptr, length = harness.put(name)
    follow = rng.choice([0, 1])
    errno = harness.call("path_filestat_get", PREOPEN, follow, ptr, length, RESULT)
    if errno:
        return f"stat {name}", errno
    status = harness.stat(name, follow=bool(follow))
    size = status.size if status.filetype != 3 else 0  # directory sizes are the host's business
    return f"stat {name} {follow}", (status.filetype, status.nlink if status.filetype != 3 else 0, size)


def tree(harness: GuestHarness, path: str = ".") -> list[str]:
    fd = harness.open(path, Oflags.DIRECTORY, rights=Rights.DIRECTORY_BASE)
    names = sorted(harness.readdir_names(fd))
    assert harness.call("fd_close", fd) == 0
    listing = []
    for name in names:
        if name in (".", ".."):
            continue
        child = f"{path}/{name}"
        status = harness.stat(child, follow=False)
        listing.append(f"{child} {status.filetype}")
        if status.filetype == 3:
            listing += tree(harness, child)
    return listing


@pytest.mark.parametrize("seed", range(12))
def test_memfs_and_hostdir_agree_on_random_operations(seed: int, tmp_path: Path) -> None:
    rng_memory, rng_host = random.Random(seed), random.Random(seed)
    with closing(GuestHarness(MemoryFilesystem().root())) as memory, closing(GuestHarness(HostDirectory.open(tmp_path))) as host:
        for step in range(150):
            expected = operation(host, rng_host)
            got = operation(memory, rng_memory)
            assert got == expected, f"step {step}: memfs {got} vs host {expected}"
        assert tree(memory) == tree(host)
