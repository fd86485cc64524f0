"""`keep run --volume IMG`: what IMG may be, and one-line errors when it cannot be used."""

from __future__ import annotations

from pathlib import Path

from fixture_build import WasmFixture
from test_run_volume import image, keep, passphrase_file

__all__ = ["image", "passphrase_file"]  # test_run_volume's fixtures, used here too


def test_the_same_image_through_a_symlink_is_the_same_image_twice(
        image: Path, passphrase_file: Path, tmp_path: Path, wasm_fixture: WasmFixture,
        keep_environment: dict[str, str]) -> None:
    """Found in review: only the absolute paths were compared, so a symlink to the image got as
    far as opening it twice and was reported as `in use by another process` (exit 1)."""
    link = tmp_path / "link.img"
    link.symlink_to(image)
    completed = keep(["run", "--volume", f"{image}::/a", "--volume", f"{link}::/b", "--passphrase-file",
                      str(passphrase_file), str(wasm_fixture("hello"))], keep_environment)
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr == b"keep: --volume: the same image is given twice\n"


def test_a_directory_as_the_image_is_one_plain_line(
        passphrase_file: Path, tmp_path: Path, wasm_fixture: WasmFixture,
        keep_environment: dict[str, str]) -> None:
    """Found in review: `keep: --volume DIR: [Errno 21] Is a directory: 'DIR'` (Python's repr)."""
    directory = tmp_path / "a-directory"
    directory.mkdir()
    completed = keep(["run", "--volume", str(directory), "--passphrase-file", str(passphrase_file),
                      str(wasm_fixture("hello"))], keep_environment)
    assert completed.returncode == 1
    assert completed.stderr == f"keep: --volume {directory}: Is a directory\n".encode()
