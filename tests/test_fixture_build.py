"""The fixture builder: compiles with zig, caches by content, reports compiler errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fixture_build import FixtureBuilder, FixtureBuildError

REFERENCE = Path(__file__).with_name("reference.py")


def make_builder(root: Path) -> FixtureBuilder:
    """A builder over a private fixtures directory: seven.c includes shared.h, not unrelated.h."""
    sources = root / "fixtures"
    sources.mkdir(parents=True)
    (sources / "shared.h").write_text("#define VALUE 7\n")
    (sources / "seven.c").write_text('#include "shared.h"\nint main(void) { return VALUE; }\n')
    (sources / "unrelated.h").write_text("/* not included by seven.c */\n")
    return FixtureBuilder(source_dir=sources, build_dir=root / "build")


def test_builds_a_runnable_module_once(tmp_path: Path) -> None:
    builder = make_builder(tmp_path)
    module = builder.build("seven")
    completed = subprocess.run([sys.executable, str(REFERENCE), str(module)], capture_output=True, check=False)
    assert completed.returncode == 7
    built_at = module.stat().st_mtime_ns
    assert builder.build("seven") == module
    assert module.stat().st_mtime_ns == built_at  # served from the cache, not rebuilt
    assert [path.name for path in (tmp_path / "build").iterdir()] == [module.name]  # no leftovers


def test_only_included_headers_change_the_cache_key(tmp_path: Path) -> None:
    builder = make_builder(tmp_path)
    before = builder.output_path("seven")
    (builder.source_dir / "unrelated.h").write_text("/* changed */\n")
    assert builder.output_path("seven") == before
    (builder.source_dir / "shared.h").write_text("#define VALUE 8\n")
    assert builder.output_path("seven") != before


def test_compile_error_carries_the_compiler_message(tmp_path: Path) -> None:
    builder = make_builder(tmp_path)
    (builder.source_dir / "broken.c").write_text("int main(void) { return undeclared_name; }\n")
    with pytest.raises(FixtureBuildError, match="undeclared_name"):
        builder.build("broken")
    assert not list((tmp_path / "build").glob("*"))  # no partial module left behind


@pytest.mark.parametrize("name", ["missing", "../seven", "seven.c"])
def test_unknown_fixture_name_is_a_clear_error(name: str, tmp_path: Path) -> None:
    with pytest.raises(FixtureBuildError, match="no fixture named"):
        make_builder(tmp_path).build(name)
