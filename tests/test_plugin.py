"""The pytest plugin: registered through the pytest11 entry point, and the `keep` fixture's
inputs (files from a dict or a directory, stdin, args, env) and outputs (exit status, stdio,
trace, files, the encrypted image)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
from fixture_build import WasmFixture

from shim.pytest_plugin import KeepRunner

pytest_plugins = ["pytester"]

ALPHABET = b"abcdefghijklmnopqrstuvwxyz"
MARKER = b"SECRET-IN-THE-VOLUME-93ab"


def test_the_plugin_is_a_pytest11_entry_point() -> None:
    entry_points = importlib.metadata.entry_points(group="pytest11")
    assert {point.name: point.value for point in entry_points}.get("keepshim") == "shim.pytest_plugin"


def test_another_project_gets_the_keep_fixture_by_installing_keepshim(pytester: pytest.Pytester,
                                                                     wasm_fixture: WasmFixture) -> None:
    module = wasm_fixture("hello")
    pytester.makepyfile(test_app=f'''
        def test_hello(keep):
            result = keep({str(module)!r})
            assert result.exit_code == 0
            assert result.stdout == b"Hello, world!\\n"
            assert result.calls("fd_write")[0].args["fd"] == 1
    ''')
    outcome = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    outcome.assert_outcomes(passed=1)


def test_files_from_a_dict_come_back_with_what_the_guest_wrote(keep: KeepRunner, wasm_fixture: WasmFixture) -> None:
    result = keep(wasm_fixture("short_write_ok"), mount="/sandbox",
                  files={"notes/readme.txt": "text is encoded as UTF-8: é", "out.bin": b"old contents"})
    assert result.exit_code == 0
    assert result.files == {"notes/readme.txt": "text is encoded as UTF-8: é".encode(),
                            "out.bin": (ALPHABET * 385)[:10_000]}


def test_files_from_a_host_directory_are_copied_in(keep: KeepRunner, wasm_fixture: WasmFixture,
                                                   tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "deeper" / "a.dat").write_bytes(b"\x00\x01")
    (tmp_path / "top.txt").write_text("top")
    (tmp_path / "link").symlink_to("top.txt")
    result = keep(wasm_fixture("short_write_naive"), mount="/sandbox", files=tmp_path)
    assert result.exit_code == 0
    assert set(result.files) == {"sub/deeper/a.dat", "top.txt", "out.bin"}  # symlinks are not files
    assert result.files["sub/deeper/a.dat"] == b"\x00\x01"
    assert result.files["top.txt"] == b"top"


def test_stdin_args_and_env_reach_the_guest(keep: KeepRunner, wasm_fixture: WasmFixture) -> None:
    echoed = keep(wasm_fixture("echo"), stdin=b"from stdin")
    assert (echoed.exit_code, echoed.stdout) == (0, b"from stdin")
    shown = keep(wasm_fixture("args_env"), args=["one", "two words"], env={"COLOUR": "blue"})
    assert shown.exit_code == 0
    assert b"one" in shown.stdout and b"two words" in shown.stdout and b"COLOUR=blue" in shown.stdout


def test_the_default_guest_directory_is_an_encrypted_volume(keep: KeepRunner, wasm_fixture: WasmFixture) -> None:
    result = keep(wasm_fixture("short_write_ok"), mount="/sandbox", files={"secret.txt": MARKER})
    assert result.files["secret.txt"] == MARKER and result.files["out.bin"].startswith(ALPHABET)
    assert result.image is not None and len(result.image) == 32 << 20
    assert result.image.startswith(b"LUKS\xba\xbe")
    assert MARKER not in result.image and ALPHABET not in result.image  # only ciphertext
    plain = keep(wasm_fixture("short_write_ok"), mount="/sandbox", directory="memfs")
    assert plain.image is None and plain.files["out.bin"] == result.files["out.bin"]


def test_a_bad_fault_or_directory_kind_is_a_clear_error(keep: KeepRunner, wasm_fixture: WasmFixture) -> None:
    with pytest.raises(ValueError, match="not a WASI errno name"):
        keep(wasm_fixture("hello"), faults=["fd_write:EWHAT"])
    with pytest.raises(ValueError, match="'volume' or 'memfs'"):
        keep(wasm_fixture("hello"), directory="tmpfs")
    with pytest.raises(ValueError, match="not a relative path"):
        keep(wasm_fixture("hello"), files={"../escape": b""})


async def test_run_async_serves_trio_tests(keep: KeepRunner, wasm_fixture: WasmFixture) -> None:
    result = await keep.run_async(wasm_fixture("echo"), stdin=b"async", directory="memfs")
    assert (result.exit_code, result.stdout) == (0, b"async")
    assert [event.results["nread"] for event in result.calls("fd_read")] == [5, 0]
    assert {event.errno_name for event in result.errors()} <= {"EBADF"}  # only the pre-open scan
