"""Session 7's second review of the encrypted volume library and `keep volume`: each test
reproduces a defect found then (it failed on the code before its fix).

The CLI runs in-process through `shim.cli.main` (the exit status it returns and the one line it
prints on stderr), on real image files made with tiny KDF costs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shim.cli import main
from storage.fs import ROOT_INODE
from storage.luks2 import KdfCost
from storage.volume import create_volume, open_volume

PASSPHRASE = b"review seven"
KEY_OPTIONS = ["--passphrase-env", "KEEP_REVIEW7_KEY"]


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
