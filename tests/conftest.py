"""Shared pytest fixtures for keepshim's tests.

- `wasm_fixture("name")`: the path of fixtures/name.c compiled to wasm32-wasi (built on first use,
  cached by content under build/fixtures/; see fixture_build.py). A fixture that does not compile
  fails the test with the compiler's message.
- `keep_environment`: the environment for running `keep` as a subprocess, with the compile cache
  in a session-wide temporary directory (tests never write outside temporary directories).

Helper modules next to this file (fixture_build, guest_dirs, reference) are imported by plain name:
pytest puts this directory on sys.path for its conftest.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
from fixture_build import FixtureBuilder, FixtureBuildError, WasmFixture

from shim.signals import STOP_SIGNALS


def _keep_ignoring(number: int, frame: object) -> None:
    """What a stop signal that this test run was started with ignored still does to it: nothing."""


# A test run started under nohup (SIGHUP ignored) or as a non-interactive shell's background job
# (SIGINT ignored) would hand those ignored signals to every keep it starts, through exec, and
# keep leaves an inherited SIG_IGN as it is (shim.signals): the tests that stop a keep with
# SIGHUP or SIGINT would wait for it in vain (seen: `setsid nohup bash .ci/run`, 6 tests timed
# out). The run itself goes on ignoring them, with a handler that does nothing, which unlike
# SIG_IGN is not inherited: every child starts at the default, as the tests expect (the tests of
# the nohup rule ignore the signal in the child themselves).
for _number in STOP_SIGNALS:
    if signal.getsignal(_number) == signal.SIG_IGN:
        signal.signal(_number, _keep_ignoring)

# Tests run `keep` by name, as a user does: the one installed beside this interpreter (the
# README's `.venv/bin/python -m pytest` puts it in .venv/bin), whatever PATH the run inherited.
# Without this, a clean clone's CI found no `keep` (12 tests failed) unless .venv/bin happened to
# be on the caller's PATH.
_KEEP = Path(sys.executable).with_name("keep")
if _KEEP.is_file():
    os.environ["PATH"] = f"{_KEEP.parent}{os.pathsep}{os.environ.get('PATH', '')}"
elif shutil.which("keep") is None:  # installed elsewhere on PATH (pip --user) is fine too
    raise RuntimeError(f"no keep beside {sys.executable} nor on PATH: run the tests with the "
                       "interpreter scripts/install.sh set up (.venv/bin/python -m pytest)")


@pytest.fixture(scope="session")
def fixture_builder() -> FixtureBuilder:
    """The one builder of C fixtures for the session."""
    return FixtureBuilder()


@pytest.fixture(scope="session")
def wasm_fixture(fixture_builder: FixtureBuilder) -> WasmFixture:
    """Returns a function: fixture name -> compiled module path (failing the test if it does not
    compile)."""

    def build(name: str) -> Path:
        try:
            return fixture_builder.build(name)
        except FixtureBuildError as error:
            pytest.fail(str(error), pytrace=False)

    return build


@pytest.fixture(scope="session")
def keep_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compile-cache directory shared by every `keep` subprocess of the session."""
    return tmp_path_factory.mktemp("keep-cache")


@pytest.fixture
def keep_environment(keep_cache_dir: Path) -> dict[str, str]:
    """os.environ for a `keep` subprocess, with KEEPSHIM_CACHE_DIR pointing at `keep_cache_dir`."""
    return {**os.environ, "KEEPSHIM_CACHE_DIR": str(keep_cache_dir)}
