"""The host sees only ciphertext (issue 4, point 4): a guest stores a random marker in file
names, directory names, a symlink target and file contents on an encrypted volume; afterwards
every byte the run left on the host disk is searched for the marker in plain, UTF-16 (LE and BE)
and base64 / base64url forms (at the three byte alignments): none is found.

"Everything the run wrote" is made enumerable: the run gets its own working directory, compile
cache (KEEPSHIM_CACHE_DIR) and temporary directory (TMPDIR), all inside the test's tmp_path along
with the image and the captured stdout/stderr, and the whole tmp_path is searched. The same
search on a run that uses `--dir` instead finds the marker (the positive control: the search
cannot pass vacuously). The scanner here is independent of `keep run --audit-host`.
"""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from fixture_build import WasmFixture
from run_volume_support import PASSPHRASE, make_volume

from storage.volume import open_volume

KEEP_RUN = (sys.executable, "-m", "shim", "run")


def marker_forms(marker: bytes) -> dict[str, bytes]:
    """Each form the marker can take in plaintext: name -> bytes to look for."""
    forms = {"plain": marker, "utf-16-le": marker.decode().encode("utf-16-le"),
             "utf-16-be": marker.decode().encode("utf-16-be")}
    for alignment in range(3):
        encoded = base64.b64encode(bytes(alignment) + marker)
        # only the characters whose 6 bits all come from the marker
        first, end = -(-8 * alignment // 6), 8 * (alignment + len(marker)) // 6
        forms[f"base64@{alignment}"] = encoded[first:end]
        forms[f"base64url@{alignment}"] = encoded[first:end].replace(b"+", b"-").replace(b"/", b"_")
    return forms


def files_under(root: Path) -> Iterator[Path]:
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory, name)
            if path.is_file() and not path.is_symlink():
                yield path


def find(root: Path, marker: bytes) -> list[str]:
    """Every (file, form) where the marker is found, names of files and links included."""
    forms = marker_forms(marker)
    found = []
    for directory, subdirectories, names in os.walk(root):
        for name in [*subdirectories, *names]:
            path = Path(directory, name)
            text = os.fsencode(name) + (os.fsencode(os.readlink(path)) if path.is_symlink() else b"")
            found += [f"name {path} ({form})" for form, needle in forms.items() if needle in text]
    for path in files_under(root):
        data = path.read_bytes()
        found += [f"{path} ({form})" for form, needle in forms.items() if needle in data]
    return found


def run_marker_guest(tmp_path: Path, module: Path, marker: str, storage: list[str]) -> subprocess.CompletedProcess[bytes]:
    workdir, cache, temporary = tmp_path / "cwd", tmp_path / "cache", tmp_path / "tmp"
    for directory in (workdir, cache, temporary):
        directory.mkdir()
    environment = {**os.environ, "KEEPSHIM_CACHE_DIR": str(cache), "TMPDIR": str(temporary)}
    with open(tmp_path / "stdout", "wb") as stdout, open(tmp_path / "stderr", "wb") as stderr:
        completed = subprocess.run([*KEEP_RUN, *storage, str(module), marker], stdin=subprocess.DEVNULL,
                                   stdout=stdout, stderr=stderr, cwd=workdir, env=environment, timeout=120,
                                   check=False)
    assert completed.returncode == 0, (tmp_path / "stderr").read_bytes()
    assert (tmp_path / "stdout").read_bytes() == b"stored\n"
    assert any(files_under(cache)), "the compile cache was not used: the search would not cover it"
    return completed


def test_the_marker_forms_are_found_in_their_encodings() -> None:
    marker = b"KSM-0123456789abcdef"
    forms = marker_forms(marker)
    for prefix in (b"", b"x", b"xy", b"xyz"):
        blob = base64.b64encode(prefix + marker + b"tail")
        assert forms[f"base64@{len(prefix) % 3}"] in blob
    assert forms["utf-16-be"] in ("zz" + marker.decode()).encode("utf-16-be")


def test_a_volume_run_leaves_no_plaintext_on_the_host(tmp_path: Path, wasm_fixture: WasmFixture) -> None:
    marker = f"KSM{secrets.token_hex(10)}"
    module = wasm_fixture("volume_marker")
    assert find(module.parent, marker.encode()) == []  # not in the module itself
    image = tmp_path / "data.img"
    make_volume(image)
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_bytes(PASSPHRASE)
    run_marker_guest(tmp_path, module, marker,
                     ["--volume", f"{image}::/sandbox", "--passphrase-file", str(passphrase_file)])
    assert find(tmp_path, marker.encode()) == []
    # and the guest did store it: the volume holds it in every place it was put
    with open_volume(image, PASSPHRASE, writable=False) as volume:
        fs = volume.fs
        names = [entry[0] for entry in fs.readdir(1)][2:]
        assert sorted(names) == sorted([f"{marker}-dir".encode(), f"{marker}-link".encode()])
        directory = fs.lookup(1, f"{marker}-dir".encode())
        inner = fs.lookup(directory.ino, f"{marker}.txt".encode())
        contents = fs.read(inner.ino, 0, inner.size)
        assert contents.count(marker.encode()) == 50
        assert contents.count(marker.encode("utf-16-le")) == 50
        link = fs.lookup(1, f"{marker}-link".encode())
        assert fs.readlink(link.ino) == f"{marker}-dir/{marker}.txt".encode()


def test_the_same_search_finds_a_dir_runs_plaintext(tmp_path: Path, wasm_fixture: WasmFixture) -> None:
    """Positive control: with --dir the host holds the marker in names and contents."""
    marker = f"KSM{secrets.token_hex(10)}"
    host = tmp_path / "host"
    host.mkdir()
    run_marker_guest(tmp_path, wasm_fixture("volume_marker"), marker, ["--dir", f"{host}::/sandbox"])
    found = find(tmp_path, marker.encode())
    assert any("(plain)" in place and place.startswith("name ") for place in found)
    assert any(place.endswith(f"{marker}.txt (plain)") for place in found)
    assert any(place.endswith(f"{marker}.txt (utf-16-le)") for place in found)
