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
from pathlib import Path

import pytest
from fixture_build import FixtureBuilder, FixtureBuildError, WasmFixture


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
