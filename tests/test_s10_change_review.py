"""Defects found by the review of session 10's whole change (a16e221..): each test failed on the
code before its fix (see the commit that added it)."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
import test_storage_review7 as review7
from test_wasi_review10 import flush_meets_a_changed_sector
from wasi_harness import volume_root

from shim.config import KeepConfig, ListenFile, TlsSettings
from shim.sockets import open_keep_network
from shim.volume_backend import VolumeDirectory
from storage.errors import IntegrityError
from storage.fs import ROOT_INODE
from storage.volume import open_volume

PASSPHRASE = review7.PASSPHRASE


def keep_volume_on_stdin(*args: str | Path, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    """`keep volume ARGS` as its own process, `stdin` on a pipe."""
    return subprocess.run([sys.executable, "-m", "shim", "volume", *args], input=stdin,
                          capture_output=True, timeout=120, check=False)


def test_put_from_stdin_with_the_key_from_dev_stdin_is_refused(tmp_path: Path) -> None:
    """19d969c refused `put IMG - PATH --key-file -` (the key took all of stdin and PATH was
    replaced by an EMPTY file, exit 0), but only for the spelling '-': `--key-file /dev/stdin`
    (or /proc/self/fd/0) reads the same pipe and did exactly that. Also `put IMG /dev/stdin
    PATH --key-file -`. Both are now the same usage error."""
    image = review7.make_image(tmp_path / "v.img", {b"f": b"precious\n"})
    for data_source, key_source in (("-", "/dev/stdin"), ("/dev/stdin", "-"),
                                    ("-", "/proc/self/fd/0")):
        for option in ("--key-file", "--passphrase-file"):
            result = keep_volume_on_stdin("put", image, data_source, "/f", option, key_source,
                                          stdin=PASSPHRASE)
            assert (result.returncode, result.stderr) == (
                2, b"keep: stdin ('-') can give the key or the file to put, not both\n"), (
                data_source, option, key_source)
    with open_volume(image, PASSPHRASE, writable=False) as volume:
        attr = volume.fs.lookup(ROOT_INODE, b"f")
        assert volume.fs.read(attr.ino, 0, 100) == b"precious\n"


def test_the_key_and_the_new_key_both_from_stdin_under_another_name_are_refused(tmp_path: Path) -> None:
    """The same for add-key/passwd: --key-file /dev/stdin with --new-key-file - read stdin
    twice (the second read found nothing: 'the passphrase is empty')."""
    image = review7.make_image(tmp_path / "v.img")
    before = image.read_bytes()[:16 << 20]
    for action in ("add-key", "passwd"):
        result = keep_volume_on_stdin(action, image, "--key-file", "/dev/stdin", "--new-key-file", "-",
                                      "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
                                      stdin=PASSPHRASE)
        assert (result.returncode, result.stderr) == (
            2, b"keep: stdin ('-') can give the key or the new key, not both\n"), action
    assert image.read_bytes()[:16 << 20] == before


def test_a_key_file_that_is_the_same_regular_file_as_stdin_is_no_conflict(tmp_path: Path) -> None:
    """A regular file redirected to stdin and also named as the key file is read twice from
    its start (two open file descriptions): nothing is taken from the other, so it is allowed."""
    image = review7.make_image(tmp_path / "v.img")
    key = tmp_path / "key"
    key.write_bytes(PASSPHRASE)
    with key.open("rb") as stdin:
        result = subprocess.run([sys.executable, "-m", "shim", "volume", "put", image, "-", "/k",
                                 "--key-file", "/dev/stdin"], stdin=stdin, capture_output=True,
                                timeout=120, check=False)
    assert (result.returncode, result.stderr) == (0, b"")
    with open_volume(image, PASSPHRASE, writable=False) as volume:
        attr = volume.fs.lookup(ROOT_INODE, b"k")
        assert volume.fs.read(attr.ino, 0, 100) == PASSPHRASE


def test_one_integrity_failure_is_reported_to_the_operator_once(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """57ef12a keeps an integrity failure met while writing a file's buffered bytes (or
    creating a new file with them) on that file, so that its next call and fsync say EIO; but
    the kept IntegrityError, raised again by the file's next call, was counted and told to the
    operator again: one sector changed by the host made keep run say 'N integrity failures in
    all' with N too high (reproduced: 1 after the failure, 2 after a pread of the file, 3 after
    the new file's fstat). The file still says EIO; the operator hears of it once."""
    root = volume_root(tmp_path)
    assert isinstance(root, VolumeDirectory)
    told: list[IntegrityError] = []
    monkeypatch.setattr(root.session, "_on_integrity_error", told.append)
    root.mkdir("elsewhere")
    old = root.open_file("old", create=True, exclusive=True, truncate=False, read=True, write=True)
    old.pwrite(b"a" * 100, 0)
    old.sync()
    old.pwrite(b"b" * 10, 5)

    flush_meets_a_changed_sector(root, monkeypatch, "write")
    new = root.open_file("new", create=True, exclusive=True, truncate=False, read=True, write=True)
    new.pwrite(b"c" * 10, 0)
    flush_meets_a_changed_sector(root, monkeypatch, "create")
    assert (root.session.integrity_failures, len(told)) == (2, 2)
    for call in (lambda: old.pread(10, 0), new.stat, old.sync, new.sync):
        with pytest.raises(OSError) as failure:
            call()
        assert failure.value.errno == errno.EIO
    assert (root.session.integrity_failures, len(told)) == (2, 2)
    old.close()
    new.close()
    root.session.close()


@pytest.mark.parametrize("length", [255, 240])
async def test_export_certificate_to_a_name_of_up_to_255_bytes(tmp_path: Path, length: int) -> None:
    """9c4e1f9 and 673e234 fitted the temporaries of `keep volume get` and --volume-state into
    255 bytes (shim.volume_state.temporary_prefix), but left the third copy of the pattern:
    keep.toml's [tls] export_certificate writes '.NAME.XXXXXXXX.partial' (18 bytes longer) first,
    so a valid name of 238-255 bytes failed the run at its start with 'cannot write the
    certificate to NAME: File name too long'."""
    export = tmp_path / ("c" * (length - 4) + ".pem")
    listen = ListenFile(name="web", addr="127.0.0.1", port=0)
    config = KeepConfig(files=(*KeepConfig().files, listen), tls=TlsSettings(export_certificate=export))
    async with open_keep_network(config) as network:
        assert network.identity is not None
        assert export.read_bytes() == network.identity.certificate_chain_pem
    assert [path.name for path in tmp_path.iterdir()] == [export.name]  # no temporary left
