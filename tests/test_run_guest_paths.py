"""`keep run`: two pre-opens (--dir, --volume) at the same guest path are refused before the run.

Found in review: they were accepted silently and one shadowed the other, which one depending on
the spelling. `--dir HOST::/sandbox/ --volume IMG::/sandbox` sent everything the guest wrote under
/sandbox to the host directory in plaintext, while the operator believed it went to the
encrypted volume; two volumes at one path left the first unreachable.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fixture_build import WasmFixture
from run_volume_support import make_volume
from test_run_volume import image, keep, passphrase_file

from shim.errors import UsageError
from shim.run import DirectoryMapping, RunConfig

__all__ = ["image", "passphrase_file"]  # test_run_volume's fixtures, used here too


@pytest.mark.parametrize(("dir_guest", "volume_guest"), [
    ("/sandbox/", "/sandbox"), ("/sandbox", "/sandbox"), ("//sandbox", "/sandbox/."),
])
def test_a_plaintext_dir_at_a_volumes_guest_path_is_refused(
        dir_guest: str, volume_guest: str, image: Path, passphrase_file: Path, tmp_path: Path,
        wasm_fixture: WasmFixture, keep_environment: dict[str, str]) -> None:
    host = tmp_path / "host"
    host.mkdir()
    before = image.read_bytes()
    completed = keep(["run", "--dir", f"{host}::{dir_guest}", "--volume", f"{image}::{volume_guest}",
                      "--passphrase-file", str(passphrase_file), str(wasm_fixture("volume_marker")),
                      "MARKER"], keep_environment)
    assert completed.returncode == 2, completed.stderr
    assert completed.stdout == b""
    assert completed.stderr.startswith(b"keep: ") and b"same guest path" in completed.stderr
    assert completed.stderr.count(b"\n") == 1, completed.stderr
    assert list(host.iterdir()) == []
    assert image.read_bytes() == before


def test_two_volumes_at_one_guest_path_are_refused(
        image: Path, passphrase_file: Path, tmp_path: Path, wasm_fixture: WasmFixture,
        keep_environment: dict[str, str]) -> None:
    other = tmp_path / "other.img"
    make_volume(other)
    completed = keep(["run", "--volume", f"{image}::/sandbox", "--volume", f"{other}::/sandbox/",
                      "--passphrase-file", str(passphrase_file), str(wasm_fixture("hello"))],
                     keep_environment)
    assert completed.returncode == 2, completed.stderr
    assert b"same guest path" in completed.stderr and completed.stderr.count(b"\n") == 1


def test_run_config_refuses_the_same_guest_path_twice(tmp_path: Path) -> None:
    """Library users (and `keep serve`'s pre-opens) get the same check from RunConfig."""
    with pytest.raises(UsageError, match="same guest path"):
        RunConfig(module="m.wasm", dirs=(DirectoryMapping(str(tmp_path), "/a"),
                                         DirectoryMapping(str(tmp_path), "/a/")))
    nested = RunConfig(module="m.wasm", dirs=(DirectoryMapping(str(tmp_path), "/a"),
                                              DirectoryMapping(str(tmp_path), "/a/b")))
    assert len(nested.dirs) == 2  # nesting is fine: the longer prefix wins, as in wasmtime
