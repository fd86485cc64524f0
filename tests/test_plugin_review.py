"""Review findings on the pytest plugin's `keep` fixture: a host directory is copied in as it is
(links to directories stay links, a str path works), and a plain call inside a trio test says to
use run_async."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixture_build import WasmFixture

from shim.pytest_plugin import GuestTree, KeepRunner
from wasi_host import Filetype


@pytest.mark.parametrize("kind", ["memfs", "volume"])
def test_a_symlink_to_a_directory_is_copied_in_as_a_symlink(kind: str, tmp_path: Path) -> None:
    """os.walk lists a link to a directory among the sub-directories, and `fill` used to make a
    real, empty directory of it (its files missing in the guest) while links to files stayed
    links."""
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f.txt").write_text("x")
    (tmp_path / "alias").symlink_to("real")
    (tmp_path / "file-link").symlink_to("real/f.txt")
    tree = GuestTree(kind, tmp_path)  # type: ignore[arg-type]
    kinds = {entry.name: entry.filetype for entry in tree.directory.readdir(0)}
    assert kinds == {"real": Filetype.DIRECTORY, "alias": Filetype.SYMBOLIC_LINK,
                     "file-link": Filetype.SYMBOLIC_LINK}
    assert tree.directory.readlink("alias") == "real"
    files, _ = tree.finish()
    assert files == {"real/f.txt": b"x"}


def test_a_host_directory_may_be_given_as_a_str_and_a_missing_one_is_an_error(tmp_path: Path) -> None:
    """A str path used to fail with `AttributeError: 'str' object has no attribute 'items'`, and a
    Path that does not exist silently gave the guest an empty directory."""
    (tmp_path / "config.toml").write_text("size = 10")
    tree = GuestTree("memfs", str(tmp_path))
    assert tree.finish()[0] == {"config.toml": b"size = 10"}
    for missing in (tmp_path / "nope", str(tmp_path / "nope"), tmp_path / "config.toml"):
        with pytest.raises(ValueError, match=r"files: .* is not a directory"):
            GuestTree("memfs", missing)


async def test_the_plain_call_in_a_trio_test_says_to_await_run_async(keep: KeepRunner, wasm_fixture: WasmFixture) -> None:
    """Under pytest-trio the plain call used to fail with trio's own `Attempted to call run() from
    inside a run()`, which does not say what to do instead."""
    with pytest.raises(RuntimeError, match=r"await keep\.run_async\(\.\.\.\)"):
        keep(wasm_fixture("hello"))
    result = await keep.run_async(wasm_fixture("hello"))
    assert result.exit_code == 0 and result.stdout == b"Hello, world!\n"


def test_a_str_where_a_list_is_expected_is_a_clear_error(keep: KeepRunner, wasm_fixture: WasmFixture) -> None:
    """args="new" used to reach the guest as three arguments n, e, w; faults="fd_write:EIO" was
    parsed letter by letter and refused as `--fault 'f': expected CALLS:ACTION[:CONDITION...]`."""
    module = wasm_fixture("hello")
    with pytest.raises(TypeError, match=r"args= takes a list of strings, not a str \(args=\['new'\]\)"):
        keep(module, args="new")
    with pytest.raises(TypeError, match=r"faults= takes a list of strings, not a str \(faults=\['fd_write:EIO'\]\)"):
        keep(module, faults="fd_write:EIO")


def test_a_bad_files_argument_lets_go_of_the_volume_made_for_it(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """files= pointing at no directory is refused after the run's in-memory volume was made;
    that volume's session is closed then (found in review: it was left open)."""
    from shim.volume_backend import VolumeSession

    closed: list[VolumeSession] = []
    real_close = VolumeSession.close

    def counting_close(session: VolumeSession) -> object:
        closed.append(session)
        return real_close(session)

    monkeypatch.setattr(VolumeSession, "close", counting_close)
    with pytest.raises(ValueError, match=r"is not a directory"):
        GuestTree("volume", tmp_path / "nope")
    assert len(closed) == 1
