"""Defects found by the session-7 review of the preview1 host and the volume backend.

Each test runs one section of fixtures/edge_calls.c under wasmtime's built-in WASI (the
reference, on a host directory) and under `keep run` on each guest-directory backend (a host
directory with --dir, an encrypted volume with --volume), through the differential machinery of
tests/test_differential.py, and requires the same output, exit status and tree. Every section
printed something else under keepshim before its fix (see the commit that added it).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fixture_build import WasmFixture
from guest_dirs import GUEST_DIRECTORY_BACKENDS, Directory, Symlink, TreeSpec
from test_differential import Case, lines, run_both

EDGE_TREE: TreeSpec = {
    "f": b"0123456789",
    "d/inner": b"in\n",
    "e": Directory(),
    "l": Symlink("f"),
    "dl": Symlink("missing"),
    "ld": Symlink("d"),
}
BACKENDS = sorted(GUEST_DIRECTORY_BACKENDS)


def assert_section_matches_wasmtime(section: str, backend: str, wasm_fixture: WasmFixture, tmp_path: Path,
                                    keep_environment: dict[str, str]) -> None:
    """edge_calls SECTION prints, exits and leaves behind the same under keepshim on `backend` as
    under the reference."""
    case = Case(f"edge-{section}", "edge_calls", args=(section,), tree=EDGE_TREE)
    reference, ours = run_both(case, GUEST_DIRECTORY_BACKENDS[backend], wasm_fixture("edge_calls"), tmp_path,
                               keep_environment)
    assert (reference.status, reference.stderr) == (0, b""), reference.stderr[-2000:]
    assert lines(ours.stdout) == lines(reference.stdout), f"ours: stderr {ours.stderr[-2000:]!r}"
    assert (ours.status, ours.stderr) == (0, b"")
    assert ours.tree == reference.tree


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_path_of_path_max_bytes_or_more_is_enametoolong(backend: str, wasm_fixture: WasmFixture,
                                                          tmp_path: Path, keep_environment: dict[str, str]) -> None:
    """4096 bytes or more is ENAMETOOLONG before the path is walked (it resolved, and a megabyte of
    "d/../" kept the host busy in one call that --timeout could not interrupt: 13 s for 10 MB)."""
    assert_section_matches_wasmtime("long_paths", backend, wasm_fixture, tmp_path, keep_environment)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclusive_create_never_follows_a_symlink_in_the_last_place(
        backend: str, wasm_fixture: WasmFixture, tmp_path: Path, keep_environment: dict[str, str]) -> None:
    """open(O_CREAT|O_EXCL) on a dangling symlink is EEXIST (it created the link's target, so a
    lock file taken through a link 'succeeded' where it must fail); links earlier in the path
    are still followed, and O_CREAT alone follows the link."""
    assert_section_matches_wasmtime("excl_links", backend, wasm_fixture, tmp_path, keep_environment)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linking_with_symlink_follow_is_einval_as_in_wasmtime(
        backend: str, wasm_fixture: WasmFixture, tmp_path: Path, keep_environment: dict[str, str]) -> None:
    """path_link with SYMLINK_FOLLOW linked the link's target; wasmtime refuses the flag (EINVAL,
    after EBADF for a bad fd), so a program tested there never depends on it."""
    assert_section_matches_wasmtime("link_follow", backend, wasm_fixture, tmp_path, keep_environment)


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncating_to_the_same_size_still_sets_the_modification_time(
        backend: str, wasm_fixture: WasmFixture, tmp_path: Path, keep_environment: dict[str, str]) -> None:
    """On the volume, ftruncate to the current size and open(O_TRUNC) of an empty file left mtime
    alone, where a host directory (the kernel's do_truncate) moves it: make-like tools comparing
    times saw a different answer on --volume than on --dir."""
    assert_section_matches_wasmtime("truncate_times", backend, wasm_fixture, tmp_path, keep_environment)
