"""Session 10's third review of `keep volume` and the in-keep filesystem: each test reproduces a
defect found then (it failed on the code before its fix).

Most run `keep volume` as a real process (`python -m shim`), on real image files made with tiny
KDF costs, to see what a user sees: the exit status, stdout's bytes and stderr's one line.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import test_storage_review7 as review7
from fixture_build import WasmFixture
from run_volume_support import PASSPHRASE as RUN_PASSPHRASE
from test_run_volume import image, keep, passphrase_file, volume_options

from storage.fs import ROOT_INODE
from storage.volume import open_volume

PASSPHRASE = review7.PASSPHRASE
KEY_OPTIONS = ["--passphrase-env", "KEEP_REVIEW10_KEY"]
__all__ = ["image", "passphrase_file"]  # the fixtures of test_run_volume, used here too
QUICK_KDF = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]


def keep_volume(*args: str | os.PathLike[str], buffered: bool = False,
                **options: Any) -> subprocess.CompletedProcess[bytes]:
    """`keep volume ARGS` as its own process with the test key (`options` to subprocess.run;
    stdout and stderr captured unless given). Its stdout is strict UTF-8, as Python makes it
    under a locale such as en_US.UTF-8 (C.UTF-8 makes it surrogateescape, which hides what
    users of those locales see); `buffered` drops PYTHONUNBUFFERED, as a user's stdout is."""
    environment = {**os.environ, "KEEP_REVIEW10_KEY": PASSPHRASE.decode(),
                   "PYTHONIOENCODING": "utf-8:strict"}
    if buffered:
        environment.pop("PYTHONUNBUFFERED", None)
    command = [sys.executable, "-m", "shim", "volume", *args, *KEY_OPTIONS]
    options.setdefault("stdout", subprocess.PIPE)
    options.setdefault("stderr", subprocess.PIPE)
    return subprocess.run(command, env=environment, timeout=120, check=False, **options)


def volume_names(image: Path) -> set[bytes]:
    """The names in the volume's root directory."""
    with open_volume(image, PASSPHRASE, writable=False) as volume:
        return {name for name, _, _ in volume.fs.readdir(ROOT_INODE)} - {b".", b".."}


# -- names the locale cannot print ---------------------------------------------------------------


def test_ls_of_names_that_are_not_utf8_or_hold_control_characters(tmp_path: Path) -> None:
    """Any byte but "/" and NUL is a valid name (a guest makes them). Under a UTF-8 locale
    `keep volume ls` crashed on a name that is not UTF-8 ('internal error: UnicodeEncodeError',
    exit 70), and printed a name's newline and escape sequences raw: a name could forge a
    line of the listing or drive the operator's terminal. Such bytes are now shown escaped."""
    image = review7.make_image(tmp_path / "v.img", {b"bad\xffname": b"x", b"new\nline": b"y",
                                            b"esc\x1b[2J": b"z", b"caf\xc3\xa9": b"w"})
    result = keep_volume("ls", image, "/")
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 4
    assert [line.split(maxsplit=5)[-1] for line in lines] == [
        "bad\\xffname", "new\\nline", "esc\\x1b[2J", "café"]
    assert b"\x1b" not in result.stdout


def test_messages_naming_host_paths_that_are_not_utf8_do_not_crash(tmp_path: Path) -> None:
    """The closing line of `create`, `import` and `export` repeats the path the user gave;
    for a path that is not UTF-8 the print failed after the work was done and committed: exit
    70 'internal error: UnicodeEncodeError' for a success. The path is now written as the
    bytes it was given."""
    source = tmp_path / os.fsdecode(b"src\xff")
    (source / "d").mkdir(parents=True)
    (source / "d" / "f").write_bytes(b"hi\n")
    image = tmp_path / os.fsdecode(b"v\xfe.img")
    created = keep_volume("create", image, "--size", "24M", *QUICK_KDF)
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith(b"created " + os.fsencode(image) + b": ")
    imported = keep_volume("import", image, source, os.fsdecode(b"/in\xfd"))
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout == b"imported 2 entries into /in\xfd\n"
    destination = tmp_path / os.fsdecode(b"out\xfc")
    exported = keep_volume("export", image, destination, os.fsdecode(b"/in\xfd"))
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout == b"exported 2 entries to " + os.fsencode(destination) + b"\n"
    assert (destination / "d" / "f").read_bytes() == b"hi\n"


def test_a_stdout_that_cannot_be_written_is_named_and_fails_cleanly(tmp_path: Path) -> None:
    """`keep volume ls IMG / > /dev/full` said 'IMG: no space left on device' (the image is
    fine: stdout is full), and a short output (fsck's one line, info...) failed only in
    Python's flush at exit: exit status 120 and 'Exception ignored in: <_io.TextIOWrapper
    name='<stdout>'...' on stderr. Both now fail in one line naming stdout, exit status 1."""
    image = review7.make_image(tmp_path / "v.img", {b"f%d" % n: b"" for n in range(800)})
    for action in (["ls", image, "/"], ["fsck", image], ["info", image]):
        with open("/dev/full", "wb") as full:
            result = keep_volume(*action, buffered=True, stdout=full)
        assert (result.returncode, result.stderr) == (
            1, b"keep: stdout: no space left on device\n"), action


# -- paths ---------------------------------------------------------------------------------------


def test_a_path_with_a_trailing_slash_names_a_directory_or_nothing(tmp_path: Path) -> None:
    """`keep volume put IMG report.pdf /docs/` with no directory /docs made a regular FILE
    called "docs" (exit 0), where cp says "Not a directory"; `cat`, `get` and `rm` of "/f/"
    took the file f, where Linux says ENOTDIR. A path ending in "/" (or "/.") now names a
    directory: put refuses it, the others refuse a non-directory, and nothing is written."""
    image = review7.make_image(tmp_path / "v.img", {b"f": b"data\n"})
    host = tmp_path / "report.pdf"
    host.write_bytes(b"%PDF\n")
    put = keep_volume("put", image, host, "/docs/")
    assert (put.returncode, put.stderr) == (1, b"keep: /docs/: Not a directory\n")
    put_onto_a_file = keep_volume("put", image, host, "/f/.")
    assert (put_onto_a_file.returncode, put_onto_a_file.stderr) == (
        1, b"keep: /f/.: Not a directory\n")
    for action in (["cat", image, "/f/"], ["get", image, "/f/", tmp_path / "out"],
                   ["rm", image, "/f/"], ["ls", image, "/f/"]):
        result = keep_volume(*action)
        assert (result.returncode, result.stderr) == (1, b"keep: /f/: Not a directory\n"), action
    assert volume_names(image) == {b"f"}
    assert not (tmp_path / "out").exists()
    # a directory named with the slash is still a directory
    assert keep_volume("mkdir", image, "/docs/").returncode == 0
    into_directory = keep_volume("put", image, host, "/docs/")
    assert (into_directory.returncode, into_directory.stderr) == (
        1, b"keep: /docs/: Is a directory\n")
    assert keep_volume("ls", image, "/docs/").returncode == 0
    assert keep_volume("rm", image, "-r", "/docs/").returncode == 0
    assert volume_names(image) == {b"f"}


# -- sparse host files -----------------------------------------------------------------------------


def test_put_and_import_keep_a_sparse_host_files_holes(tmp_path: Path) -> None:
    """The volume holds sparse files (unmapped blocks read as zeros) and `get`/`export` keep
    their holes, but `put` and `import` wrote every zero: a host file of 200 MiB with 4 KiB of
    data could not go into a 24 MiB volume ('no space left on the volume'), not even one that
    `export` had just written from a volume of the same size. Whole zero blocks of the source
    are now holes in the volume's file, its size and bytes unchanged."""
    image = review7.make_image(tmp_path / "v.img")
    sparse = tmp_path / "sparse.bin"
    with open(sparse, "wb") as file:
        file.seek(100 << 20)
        file.write(b"middle")
        file.seek(200 << 20)
        file.write(b"end\n")
    tree = tmp_path / "tree"
    tree.mkdir()
    os.link(sparse, tree / "copy.bin")
    put = keep_volume("put", image, sparse, "/sparse.bin")
    assert (put.returncode, put.stderr) == (0, b"")
    imported = keep_volume("import", image, tree, "/tree")
    assert (imported.returncode, imported.stderr) == (0, b"")
    with open_volume(image, PASSPHRASE, writable=False) as volume:
        fs = volume.fs
        for directory, name in ((ROOT_INODE, b"sparse.bin"),
                                (fs.lookup(ROOT_INODE, b"tree").ino, b"copy.bin")):
            attr = fs.lookup(directory, name)
            assert attr.size == (200 << 20) + 4
            assert attr.blocks <= 3 * 8  # the two blocks with data (and a spare), not 51,201
            assert fs.read(attr.ino, (100 << 20) - 2, 10) == b"\0\0middle\0\0"
            assert fs.read(attr.ino, 200 << 20, 10) == b"end\n"
            assert fs.read(attr.ino, 4096, 8) == bytes(8)
        assert volume.fsck() == []


# -- a failed export ---------------------------------------------------------------------------


def _limit_file_size() -> None:
    """In the child: writes past 1 MiB fail with EFBIG (SIGXFSZ ignored), as on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))


def test_a_file_export_fails_on_leaves_no_partial_file_under_its_name(tmp_path: Path) -> None:
    """An export that failed part way through a file (the host disk full, an unreadable
    sector of the volume) left the part written under the file's own name, mode and all, to
    pass for the whole file; `get` removes its partial copy. The partial file is now removed;
    the files exported before it stay."""
    image = review7.make_image(tmp_path / "v.img", {b"a.txt": b"small\n"})
    with open_volume(image, PASSPHRASE, writable=True) as volume:
        big = volume.fs.create(ROOT_INODE, b"b.bin")
        volume.fs.write(big.ino, 0, os.urandom(3 << 20))
        volume.commit()
    destination = tmp_path / "out"
    result = keep_volume("export", image, destination, "/", preexec_fn=_limit_file_size)
    assert (result.returncode, result.stderr) == (
        1, f"keep: {destination / 'b.bin'}: file too large\n".encode())
    assert sorted(os.listdir(destination)) == ["a.txt"]
    assert (destination / "a.txt").read_bytes() == b"small\n"


def test_create_reports_the_size_it_made(tmp_path: Path) -> None:
    """`create --size` not a multiple of 4 KiB makes an image of whole 4 KiB sectors (rounded
    down), but said 'created v.img: 25165825 bytes' for a file of 25165824."""
    image = tmp_path / "v.img"
    result = keep_volume("create", image, "--size", str((24 << 20) + 1), *QUICK_KDF)
    assert result.returncode == 0, result.stderr
    assert image.stat().st_size == 24 << 20
    assert result.stdout.startswith(f"created {image}: {24 << 20} bytes, uuid ".encode())


def test_get_into_a_host_name_of_up_to_255_bytes(tmp_path: Path) -> None:
    """`get` writes a temporary ".NAME.XXXXXXXX.keep-partial" beside the host file: for a
    valid host name of 233 to 255 bytes that temporary's name was too long, and get failed
    with 'NAME: file name too long'. The temporary's name is now cut to fit."""
    image = review7.make_image(tmp_path / "v.img", {b"f": b"data\n"})
    for name in ("h" * 255, "é" * 127, "x" * 233):
        result = keep_volume("get", image, "/f", tmp_path / name)
        assert (result.returncode, result.stderr) == (0, b""), name
        assert (tmp_path / name).read_bytes() == b"data\n"
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".keep-partial")]


def test_a_volume_state_file_named_with_up_to_255_bytes_records_the_run(
        image: Path, passphrase_file: Path, tmp_path: Path, wasm_fixture: WasmFixture,
        keep_environment: dict[str, str]) -> None:
    """`--volume-state NAME` is replaced through a temporary ".NAME.XXXXXXXX.partial", 18
    bytes longer: for a valid NAME of 238 to 255 bytes the guest ran, the volume committed at
    a new generation, and only then 'cannot write --volume-state ...: File name too long'
    (exit 1, no pin recorded: what the early check of the state file is there to prevent).
    The temporary's name is now cut to fit."""
    state = tmp_path / ("s" * 250)
    completed = keep(["run", *volume_options(image, passphrase_file), "--volume-state", str(state),
                      str(wasm_fixture("volume_sync_then")), "exit"], keep_environment)
    assert (completed.returncode, completed.stderr) == (0, b"")
    with open_volume(image, RUN_PASSPHRASE, writable=False) as volume:
        generation = volume.state().generation
    assert json.loads(state.read_text())[str(image)]["generation"] == generation
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".partial")]


def test_put_from_stdin_with_the_key_from_stdin_is_refused(tmp_path: Path) -> None:
    """`put IMG - PATH --key-file -`: the key took all of stdin (key and data alike), then
    put read nothing more and replaced PATH by an EMPTY file, exit 0 (with --passphrase-file -
    the same when the data is one line). It is now a usage error (2) before anything is read
    or written."""
    image = review7.make_image(tmp_path / "v.img", {b"f": b"precious\n"})
    for option in ("--key-file", "--passphrase-file"):
        result = subprocess.run(
            [sys.executable, "-m", "shim", "volume", "put", image, "-", "/f", option, "-"],
            input=PASSPHRASE, capture_output=True, timeout=120, check=False)
        assert (result.returncode, result.stderr) == (
            2, b"keep: stdin ('-') can give the key or the file to put, not both\n"), option
    with open_volume(image, PASSPHRASE, writable=False) as volume:
        attr = volume.fs.lookup(ROOT_INODE, b"f")
        assert volume.fs.read(attr.ino, 0, 100) == b"precious\n"


def test_the_key_and_the_new_key_both_from_stdin_are_refused(tmp_path: Path) -> None:
    """`add-key`/`passwd` with --key-file - and --new-key-file -: the first read took all of
    stdin, so with both keys on it the key was 'wrong passphrase' (it was right), and with the
    key alone the new one was 'the passphrase is empty'. Now a usage error naming the
    conflict, the header untouched."""
    image = review7.make_image(tmp_path / "v.img")
    before = image.read_bytes()[:16 << 20]
    for action in ("add-key", "passwd"):
        result = subprocess.run(
            [sys.executable, "-m", "shim", "volume", action, image, "--key-file", "-",
             "--new-key-file", "-", *QUICK_KDF],
            input=PASSPHRASE + b"\nnew", capture_output=True, timeout=120, check=False)
        assert (result.returncode, result.stderr) == (
            2, b"keep: stdin ('-') can give the key or the new key, not both\n"), action
    assert image.read_bytes()[:16 << 20] == before
