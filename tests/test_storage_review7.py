"""Session 7's second review of the encrypted volume library and `keep volume`: each test
reproduces a defect found then (it failed on the code before its fix).

The CLI runs in-process through `shim.cli.main` (the exit status it returns and the one line it
prints on stderr), on real image files made with tiny KDF costs.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import functools
import os
import resource
import shutil
import signal
import stat
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from shim.cli import main
from storage._luks2_header import build_header_area, read_metadata
from storage.blockdev import FileBlockDevice
from storage.errors import CorruptHeader, FilesystemError
from storage.fs import ROOT_INODE
from storage.luks2 import KdfCost
from storage.volume import create_volume, open_volume

PASSPHRASE = b"review seven"
KEY_OPTIONS = ["--passphrase-env", "KEEP_REVIEW7_KEY"]
T = TypeVar("T")


@pytest.fixture(autouse=True)
def _key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEP_REVIEW7_KEY", PASSPHRASE.decode())


def make_image(path: Path, files: dict[bytes, bytes] | None = None) -> Path:
    """A 24 MiB volume at `path` holding `files` (names in the root directory)."""
    with create_volume(path, 24 << 20, PASSPHRASE, kdf_cost=KdfCost(1, 8, 1)) as volume:
        for name, data in (files or {}).items():
            volume.fs.create(ROOT_INODE, name, data=data)
        volume.commit()
    return path


def keep_volume(*args: str | os.PathLike[str]) -> int:
    """`keep volume ARGS` in this process, with the test key; returns the exit status."""
    return main(["volume", *(os.fspath(arg) for arg in args), *KEY_OPTIONS])


def stderr_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def volume_names(image: Path) -> set[bytes]:
    with open_volume(image, PASSPHRASE, writable=False) as volume:
        return {name for name, _, _ in volume.fs.readdir(ROOT_INODE)} - {b".", b".."}


# -- the image itself as a destination --------------------------------------------------------


def test_export_into_the_images_directory_never_replaces_the_image(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A volume holding a file named like its own image, exported into the image's directory:
    export unlinked the image (open, being read) and wrote the 6-byte file in its place, so the
    whole volume was lost ("v.img is not a LUKS2 volume" afterwards)."""
    image = make_image(tmp_path / "v.img", {b"v.img": b"hello\n", b"a.txt": b"a\n"})
    assert keep_volume("export", image, tmp_path, "/") == 1
    assert stderr_line(capsys) == f"keep: {image}: is the volume image itself (not replaced)"
    assert volume_names(image) == {b"v.img", b"a.txt"}  # still a volume, still whole


def test_export_never_replaces_a_hard_link_of_the_image(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = make_image(tmp_path / "v.img", {b"other.img": b"hello\n"})
    out = tmp_path / "out"
    out.mkdir()
    os.link(image, out / "other.img")
    assert keep_volume("export", image, out, "/") == 1
    assert stderr_line(capsys) == f"keep: {out / 'other.img'}: is the volume image itself (not replaced)"
    assert (out / "other.img").stat().st_size == image.stat().st_size


def test_get_onto_the_image_itself_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`keep volume get v.img /x v.img` renamed the file over the image: the volume was lost."""
    image = make_image(tmp_path / "v.img", {b"x": b"hello\n"})
    assert keep_volume("get", image, "/x", image) == 1
    assert stderr_line(capsys) == f"keep: {image}: is the volume image itself (not replaced)"
    assert volume_names(image) == {b"x"}
    assert not [path for path in tmp_path.iterdir() if path.name != "v.img"]  # no temporary left



def test_import_of_the_images_own_directory_skips_the_image(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`keep volume import v.img .` in the image's directory copied the image into itself
    (it can never fit: always "no space left on the volume", exit 1, after a partial import
    was committed); `put v.img v.img /x` the same."""
    image = make_image(tmp_path / "v.img")
    (tmp_path / "notes.txt").write_bytes(b"notes\n")
    assert keep_volume("import", image, tmp_path, "/") == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert captured.err == f"keep: skipping {image} (the volume image itself)\n"
    assert captured.out == "imported 1 entries into /\n"
    assert volume_names(image) == {b"notes.txt"}
    assert keep_volume("put", image, image, "/copy.img") == 1
    assert stderr_line(capsys) == f"keep: {image}: is the volume image itself (not copied into it)"
    assert volume_names(image) == {b"notes.txt"}

# -- trees deeper than Python's recursion limit ---------------------------------------------------

DEPTH = 1100  # above the default recursion limit (1000) and the usual 1024 descriptors


def make_deep_image(path: Path) -> Path:
    """A volume with /deep/d/d/.../d (DEPTH levels below /deep) and a file at the bottom."""
    make_image(path)
    with open_volume(path, PASSPHRASE) as volume:
        ino = volume.fs.mkdir(ROOT_INODE, b"deep").ino
        for _ in range(DEPTH):
            ino = volume.fs.mkdir(ino, b"d").ino
        volume.fs.create(ino, b"bottom.txt", data=b"at the bottom\n")
        volume.commit()
    return path


def remove_deep_tree(root: Path) -> None:
    """Remove a host tree bottom-up without recursion (pytest's clean-up of old temporary
    directories, shutil.rmtree, recurses: it would fail on these trees)."""
    directories = [root]
    for directory in directories:  # grows while it runs: every directory, parents first
        directories += [entry for entry in directory.iterdir() if entry.is_dir() and not entry.is_symlink()]
    for directory in reversed(directories):
        for entry in directory.iterdir():
            if not entry.is_dir() or entry.is_symlink():
                entry.unlink()
        directory.rmdir()


def test_rm_r_and_export_of_a_tree_deeper_than_the_recursion_limit(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A guest (or a FUSE user) can nest directories without bound; `rm -r` and `export` of
    such a tree ended in "internal error: RecursionError" (exit 70). The export runs with 256
    descriptors allowed: it must not hold one per level."""
    image = make_deep_image(tmp_path / "v.img")
    out = tmp_path / "out"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, soft), hard))
        try:
            assert keep_volume("export", image, out, "/") == 0, capsys.readouterr().err
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        bottom = out.joinpath("deep", *["d"] * DEPTH, "bottom.txt")
        assert bottom.read_bytes() == b"at the bottom\n"
        assert capsys.readouterr().out == f"exported {DEPTH + 2} entries to {out}\n"
    finally:
        remove_deep_tree(out)
    assert keep_volume("rm", "-r", image, "/deep") == 0, capsys.readouterr().err
    assert volume_names(image) == set()
    with open_volume(image, PASSPHRASE, writable=False) as volume:
        assert volume.fsck() == []


def test_import_of_a_host_tree_deeper_than_the_recursion_limit(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = make_image(tmp_path / "v.img")
    source = tmp_path / "source"
    bottom = source / "deep"
    try:
        source.mkdir()
        bottom.mkdir()
        for _ in range(DEPTH):  # not mkdir(parents=True), which recurses
            bottom /= "d"
            bottom.mkdir()
        (bottom / "bottom.txt").write_bytes(b"at the bottom\n")
        assert keep_volume("import", image, source, "/") == 0, capsys.readouterr().err
    finally:
        remove_deep_tree(source)
    assert capsys.readouterr().out == f"imported {DEPTH + 2} entries into /\n"
    with open_volume(image, PASSPHRASE, writable=False) as volume:
        ino = volume.fs.lookup(ROOT_INODE, b"deep").ino
        for _ in range(DEPTH):
            ino = volume.fs.lookup(ino, b"d").ino
        assert volume.fs.read(volume.fs.lookup(ino, b"bottom.txt").ino, 0, 100) == b"at the bottom\n"


# -- what the image path names ---------------------------------------------------------------------


def test_a_fifo_as_the_image_is_refused_at_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`keep volume info FIFO` (or ls, or keep run --volume FIFO) hung for ever in open(),
    waiting for a writer, instead of saying what the path is."""
    fifo = tmp_path / "named.pipe"
    os.mkfifo(fifo)
    for args in (("info", "--header-only", fifo), ("ls", fifo)):
        assert run_with_alarm(functools.partial(keep_volume, *args)) == 1
        assert stderr_line(capsys) == f"keep: {fifo}: is neither a regular file nor a block device"
    with pytest.raises(OSError, match="neither a regular file"):
        run_with_alarm(lambda: FileBlockDevice(fifo, writable=True))


def run_with_alarm(work: Callable[[], T], seconds: int = 10) -> T:
    """`work()`, interrupted by SIGALRM (a test failure, not a hung run) after `seconds`."""
    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"still blocked after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        return work()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- an image that grew -----------------------------------------------------------------------------


@pytest.mark.parametrize("growth", [4096, 1 << 20])
def test_a_volume_copied_to_a_bigger_image_still_opens(tmp_path: Path, growth: int) -> None:
    """The data segment is "dynamic" (to the end of the device), so an image copied onto a
    bigger block device, or extended by 4 KiB, had a longer segment: the integrity layout was
    recomputed from it, no superblock matched it, and the volume was reported "no valid
    superblock (wrong key or damaged image)" for ever. The layout the (MAC'd) superblocks
    record is used now; the tail past it is left alone."""
    image = make_image(tmp_path / "v.img", {b"kept.txt": b"still here\n"})
    with open(image, "r+b") as handle:
        handle.truncate(image.stat().st_size + growth)
    with open_volume(image, PASSPHRASE) as volume:
        attr = volume.fs.lookup(ROOT_INODE, b"kept.txt")
        assert volume.fs.read(attr.ino, 0, 100) == b"still here\n"
        volume.fs.create(ROOT_INODE, b"new.txt", data=b"written after\n")
        volume.commit()
    with open_volume(image, PASSPHRASE, writable=False) as volume:
        assert volume.fsck() == []
        assert volume.fs.read(volume.fs.lookup(ROOT_INODE, b"new.txt").ino, 0, 100) == b"written after\n"


# -- sizes ------------------------------------------------------------------------------------------


def test_a_size_past_what_a_file_offset_holds_is_a_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`keep volume create --size 99999999T` ended in "internal error: OverflowError: Python int
    too large to convert to C long" (exit 70) from ftruncate."""
    image = tmp_path / "v.img"
    for size in ("99999999T", str(1 << 63)):
        assert keep_volume("create", image, "--size", size, "--pbkdf-force-iterations", "1",
                           "--pbkdf-memory", "8", "--pbkdf-parallel", "1") == 2
        assert stderr_line(capsys) == (f"keep: --size {size}: more than the largest file size "
                                       f"({(1 << 63) - 1} bytes)")
    assert not image.exists()


def test_cat_of_a_symlink_names_the_volume_path(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`keep volume cat v.img /link` said "v.img: Invalid argument", blaming the image; `get`
    of the same link names the link."""
    image = make_image(tmp_path / "v.img")
    with open_volume(image, PASSPHRASE) as volume:
        volume.fs.symlink(ROOT_INODE, b"link", b"target")
    assert keep_volume("cat", image, "/link") == 1
    assert stderr_line(capsys) == "keep: /link: Invalid argument"
    assert keep_volume("get", image, "/link", tmp_path / "out") == 1
    assert stderr_line(capsys) == "keep: /link: Invalid argument"


# -- hostile LUKS2 metadata -------------------------------------------------------------------------


def test_a_keyslots_area_larger_than_cryptsetup_allows_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The header is only checksummed: the host can rewrite `config.keyslots_size`. Above
    cryptsetup's limit (128 MiB, LUKS2_MAX_KEYSLOTS_SIZE; cryptsetup refuses such a header) it
    was accepted, and a keyslot area may span all of it, so removing that keyslot wiped it
    with one os.urandom of the area's size: gigabytes of memory on a big image."""
    image = make_image(tmp_path / "v.img")
    keyslots_size = 1 << 30
    with FileBlockDevice(image, writable=True) as device:
        state = read_metadata(device)
        raw = copy.deepcopy(state.raw)
        raw["config"]["keyslots_size"] = str(keyslots_size)
        raw["segments"]["0"]["offset"] = str(2 * state.binary.hdr_size + keyslots_size)
        for offset in (state.binary.hdr_size, 0):
            header = dataclasses.replace(state.binary, seqid=state.binary.seqid + 1, hdr_offset=offset)
            device.write(offset, build_header_area(header, bytes(64), raw))
    with open(image, "r+b") as handle:  # room for the moved data segment (sparse)
        handle.truncate(2 * state.binary.hdr_size + keyslots_size + (1 << 20))
    with FileBlockDevice(image, writable=False) as device, pytest.raises(CorruptHeader, match="keyslots_size"):
        read_metadata(device)
    assert keep_volume("info", "--header-only", image) == 1
    assert stderr_line(capsys) == (
        f"keep: {image}: no valid LUKS2 header: LUKS2 metadata: config.keyslots_size = "
        f"{keyslots_size} is outside [0, {128 << 20}]")


def test_get_into_a_directory_named_with_a_slash_says_it_is_a_directory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`keep volume get v.img /x outdir/` said "outdir/: not a directory" about a directory
    (the rename of the temporary onto "outdir/" failed); without the slash it said "is a
    directory". Both say "is a directory" now, and leave no temporary."""
    image = make_image(tmp_path / "v.img", {b"x": b"hello\n"})
    out = tmp_path / "out"
    out.mkdir()
    for name in (f"{out}/", str(out)):
        assert keep_volume("get", image, "/x", name) == 1
        assert stderr_line(capsys) == f"keep: {name}: is a directory"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "v.img"]
    assert not list(out.iterdir())


def test_import_of_a_symlink_over_a_volume_directory_names_the_path(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A host symlink imported where the volume has a directory of that name failed with
    "v.img: File exists", blaming the image instead of naming the entry."""
    image = make_image(tmp_path / "v.img")
    assert keep_volume("mkdir", image, "/thing") == 0
    source = tmp_path / "source"
    source.mkdir()
    (source / "thing").symlink_to("target")
    assert keep_volume("import", image, source, "/") == 1
    assert stderr_line(capsys) == "keep: /thing: File exists"


def test_a_plain_volume_whose_database_is_unreadable_is_a_clear_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without integrity nothing tells a moved or damaged database from a good one: a plain
    (`--integrity none`) image grown by 4 KiB (its regions move with the segment's size) made
    SQLite read garbage, and every action ended in "internal error: NotADBError" (exit 70)."""
    image = tmp_path / "plain.img"
    create_volume(image, 24 << 20, PASSPHRASE, kdf_cost=KdfCost(1, 8, 1), integrity="none").close()
    with open(image, "r+b") as handle:
        handle.truncate(image.stat().st_size + 4096)
    with pytest.raises(FilesystemError) as raised:
        open_volume(image, PASSPHRASE)
    assert raised.value.errno == errno.EIO
    assert keep_volume("ls", image, "/") == 1
    assert stderr_line(capsys) == (f"keep: {image}: no keepshim filesystem on this volume "
                                   "(file is not a database)")
    with FileBlockDevice(image, writable=True):  # the failed opens let go of the image
        pass


# -- get onto something that is not a regular file ----------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node needs root")
def test_get_onto_a_device_or_its_symlink_writes_into_it_and_never_replaces_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`keep volume get v.img /secret /dev/null` renamed its temporary over /dev/null: the
    device node became a regular file holding the decrypted plaintext (and /dev/stdout, a
    symlink, the same). A device, FIFO or socket destination (or a symlink to one) is written
    into, as cp does; it stays what it was and no temporary is left beside it."""
    image = make_image(tmp_path / "v.img", {b"secret": b"decrypted plaintext\n"})
    host = tmp_path / "host"
    host.mkdir()
    null = host / "null"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a /dev/null of our own
    (host / "stdout").symlink_to("null")
    for destination in (null, host / "stdout"):
        assert keep_volume("get", image, "/secret", destination) == 0, capsys.readouterr().err
    assert stat.S_ISCHR(null.lstat().st_mode) and (host / "stdout").is_symlink()
    assert sorted(path.name for path in host.iterdir()) == ["null", "stdout"]
    fifo = host / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    try:
        assert keep_volume("get", image, "/secret", fifo) == 0, capsys.readouterr().err
    finally:
        reader.join(10)
    assert received == [b"decrypted plaintext\n"] and stat.S_ISFIFO(fifo.lstat().st_mode)


# -- keyslots -------------------------------------------------------------------------------------


def test_remove_key_slot_needs_a_key_of_another_slot(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`remove-key --key-slot N` promises (--help) "the given key must open another slot", as
    cryptsetup luksKillSlot wants a remaining passphrase; given the key of slot N itself it
    removed slot N, and that key opened the volume no more."""
    image = make_image(tmp_path / "v.img")
    monkeypatch.setenv("KEEP_REVIEW7_OTHER", "the other passphrase")
    fast = ["--pbkdf-force-iterations", "1", "--pbkdf-memory", "8", "--pbkdf-parallel", "1"]
    assert keep_volume("add-key", image, "--new-passphrase-env", "KEEP_REVIEW7_OTHER", *fast) == 0
    capsys.readouterr()
    assert keep_volume("remove-key", image, "--key-slot", "0") == 2
    assert stderr_line(capsys) == ("keep: keyslot 0 is the one this key opens: give the key of "
                                   "another keyslot to remove it")
    with open_volume(image, PASSPHRASE, writable=False) as volume:
        assert volume.luks.keyslots == [0, 1]
    # the same passphrase in a second slot is a key of another slot
    monkeypatch.setenv("KEEP_REVIEW7_SAME", PASSPHRASE.decode())
    assert keep_volume("add-key", image, "--new-passphrase-env", "KEEP_REVIEW7_SAME", *fast) == 0
    assert keep_volume("remove-key", image, "--key-slot", "0") == 0
    with open_volume(image, PASSPHRASE, writable=False) as volume:
        assert volume.luks.keyslots == [1, 2]


# -- sparse files -----------------------------------------------------------------------------------


def test_get_and_export_of_a_sparse_file_keep_its_holes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A guest makes a sparse file of any size up to 16 TiB in an instant; `get` and `export`
    wrote every zero of it to the host (a 1 GiB hole: 1.1 GiB of host disk and 5 s; 16 TiB
    would fill any host disk). Holes stay holes now, as cp makes them."""
    image = make_image(tmp_path / "v.img")
    size = 256 << 20
    with open_volume(image, PASSPHRASE) as volume:
        attr = volume.fs.create(ROOT_INODE, b"sparse")
        volume.fs.write(attr.ino, 0, b"head")
        volume.fs.write(attr.ino, size - 4, b"tail")
        volume.commit()
    got = tmp_path / "got"
    assert keep_volume("get", image, "/sparse", got) == 0, capsys.readouterr().err
    out = tmp_path / "out"
    assert keep_volume("export", image, out, "/") == 0, capsys.readouterr().err
    for copy_ in (got, out / "sparse"):
        assert copy_.stat().st_size == size
        assert copy_.stat().st_blocks * 512 <= 4 << 20  # the chunks with data: not 256 MiB
        with open(copy_, "rb") as handle:
            assert handle.read(4) == b"head"
            assert handle.read(1 << 20) == bytes(1 << 20)
            handle.seek(size - 4)
            assert handle.read() == b"tail"


def test_info_never_prints_the_headers_control_characters(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The label and subsystem are the host's bytes (the header is only checksummed): `info`
    printed them raw, so escape sequences reached the operator's terminal (clear the screen,
    forge an "integrity: ok" line with CR/LF). Text output escapes them; JSON escapes anyway."""
    image = make_image(tmp_path / "v.img")
    forged = b"\x1b[2J\x1b[1;1Hintegrity: ok\r\n"
    with FileBlockDevice(image, writable=True) as device:
        state = read_metadata(device)
        for offset in (state.binary.hdr_size, 0):
            header = dataclasses.replace(state.binary, seqid=state.binary.seqid + 1, hdr_offset=offset,
                                         raw_label=forged, raw_subsystem="\a\x9b".encode())
            device.write(offset, build_header_area(header, bytes(64), state.raw))
    for args in (("--header-only",), ()):
        assert keep_volume("info", image, *args) == 0
        out = capsys.readouterr().out
        assert not any(not character.isprintable() for character in out.replace("\n", ""))
        assert "label: \\x1b[2J\\x1b[1;1Hintegrity: ok\\r\\n\n" in out
        assert "subsystem: \\x07\\x9b\n" in out
        assert out.count("\n") == len(out.splitlines())  # no line but ours


def test_key_management_on_a_header_whose_seqid_is_at_its_maximum(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The host can set the headers' seqid (a u64, only checksummed) to 2**64 - 1: add-key,
    remove-key and passwd then ended in "internal error: error: int too large to convert"
    (exit 70) packing seqid + 1. It wraps to 0, as cryptsetup's u64 increment does."""
    image = make_image(tmp_path / "v.img")
    with FileBlockDevice(image, writable=True) as device:
        state = read_metadata(device)
        for offset in (state.binary.hdr_size, 0):
            header = dataclasses.replace(state.binary, seqid=(1 << 64) - 1, hdr_offset=offset)
            device.write(offset, build_header_area(header, bytes(64), state.raw))
    monkeypatch.setenv("KEEP_REVIEW7_OTHER", "the other passphrase")
    assert keep_volume("add-key", image, "--new-passphrase-env", "KEEP_REVIEW7_OTHER",
                       "--pbkdf-force-iterations", "1", "--pbkdf-memory", "8",
                       "--pbkdf-parallel", "1") == 0, capsys.readouterr().err
    with FileBlockDevice(image, writable=False) as device:
        state = read_metadata(device)
        assert state.binary.seqid == 0 and state.both_copies_valid
    with open_volume(image, b"the other passphrase", writable=False) as volume:
        assert volume.luks.keyslots == [0, 1]


def test_a_host_file_that_fails_to_read_is_named_not_the_image(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`put` of a host file whose read fails (EIO: /proc/self/mem at offset 0, unmapped) said
    "v.img: input/output error", telling the operator the encrypted volume was damaged."""
    image = make_image(tmp_path / "v.img", {b"kept": b"as it was\n"})
    assert keep_volume("put", image, "/proc/self/mem", "/x") == 1
    assert stderr_line(capsys) == "keep: /proc/self/mem: input/output error"
    assert volume_names(image) == {b"kept"}  # and no temporary left behind


@pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="needs cryptsetup")
def test_info_of_a_cryptsetup_image_with_512_byte_sectors_shows_the_container(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`info` shows the LUKS2 container of an image that holds no keepshim volume (README:
    cryptsetup images get key management and a clear info). A cryptsetup image with 512-byte
    sectors whose data area is not whole 4 KiB sectors printed nothing but "data segment ...
    is not made of 4 KiB sectors"."""
    image = tmp_path / "cryptsetup.img"
    with open(image, "wb") as handle:
        handle.truncate((20 << 20) + 512)
    subprocess.run(["cryptsetup", "-q", "luksFormat", "--type", "luks2", "--sector-size", "512",
                    "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", str(image),
                    "--key-file", "-"], input=PASSPHRASE, check=True, capture_output=True)
    assert keep_volume("info", image) == 1
    captured = capsys.readouterr()
    assert "cipher: aes-xts-plain64" in captured.out and "sector_size: 512" in captured.out
    assert captured.err == (f"keep: {image}: data segment [16777216, +4194816) is not made of "
                            "4 KiB sectors\n")
