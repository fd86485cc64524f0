"""Compiles the C fixtures under fixtures/ to wasm32-wasi with zig from PyPI, cached.

Fixtures are never committed as binaries: each one is built on first use and stored under a name
that carries the SHA-256 of everything that decides its bytes (its source, every shared header in
fixtures/, the compiler flags and the ziglang version). A rerun, or a second test asking for the
same fixture, costs one hash; a changed source builds a new file next to the old one, so parallel
test processes never see a half-written module (the compiler writes to a temporary name that is
renamed into place).

Locations, each overridable through the environment:
- compiled modules: KEEPSHIM_FIXTURE_BUILD_DIR, default build/fixtures/ in the repository
  (gitignored);
- zig's own cache (its wasi-libc build, ~1 minute the first time on a fresh machine):
  ZIG_GLOBAL_CACHE_DIR, default ~/.cache/keepshim/zig.

Also a command: `python tests/fixture_build.py [NAME...]` builds the named fixtures (all of them
without names) and prints one `NAME PATH` line each, for benchmarks and manual runs.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from shim.wasm_compile import COMPILE_FLAGS, CompileError, compile_c_to_wasm, zig_version
from shim.wasm_compile import default_zig_cache_dir as default_zig_cache_dir

REPOSITORY = Path(__file__).resolve().parent.parent
FIXTURE_SOURCES = REPOSITORY / "fixtures"

# What the `wasm_fixture` pytest fixture returns: fixture name -> compiled module path.
WasmFixture = Callable[[str], Path]


class FixtureBuildError(Exception):
    """A fixture is missing or did not compile; the message carries the compiler's output."""


def default_build_dir() -> Path:
    configured = os.environ.get("KEEPSHIM_FIXTURE_BUILD_DIR")
    return Path(configured) if configured else REPOSITORY / "build" / "fixtures"


@dataclass
class FixtureBuilder:
    """Builds fixtures by name (`hello` means fixtures/hello.c) into `build_dir`, lazily."""

    source_dir: Path = FIXTURE_SOURCES
    build_dir: Path = field(default_factory=default_build_dir)
    zig_cache_dir: Path = field(default_factory=default_zig_cache_dir)

    def names(self) -> list[str]:
        """Every fixture that can be built, sorted."""
        return sorted(path.stem for path in self.source_dir.glob("*.c"))

    def source(self, name: str) -> Path:
        path = self.source_dir / f"{name}.c"
        if not name.isidentifier() or not path.is_file():
            raise FixtureBuildError(f"no fixture named {name!r} (expected {path})")
        return path

    def output_path(self, name: str) -> Path:
        """Where the module for the current source of `name` lives (built or not)."""
        digest = hashlib.sha256()
        for part in self._inputs(self.source(name)):
            digest.update(part.name.encode() + b"\0" + part.read_bytes() + b"\0")
        digest.update(" ".join(COMPILE_FLAGS).encode() + b"\0")
        digest.update(zig_version().encode())
        return self.build_dir / f"{name}-{digest.hexdigest()[:20]}.wasm"

    def _inputs(self, source: Path) -> list[Path]:
        """`source` and every header it includes with `#include "..."`, transitively, sorted."""
        found: set[Path] = set()
        pending = [source]
        while pending:
            path = pending.pop()
            if path in found or not path.is_file():
                continue
            found.add(path)
            for line in path.read_text(errors="replace").splitlines():
                words = line.replace("#", "# ", 1).split()
                if words[:2] == ["#", "include"] and len(words) > 2 and words[2].startswith('"'):
                    pending.append(path.parent / words[2].strip('"'))
        return sorted(found)

    def build(self, name: str) -> Path:
        """Returns the compiled module for `name`, compiling it only if this source never was."""
        output = self.output_path(name)
        if output.is_file():
            return output
        try:
            compile_c_to_wasm(self.source(name), output, zig_cache_dir=self.zig_cache_dir)
        except CompileError as error:
            raise FixtureBuildError(f"fixture {name}: {error}") from None
        return output

    def build_many(self, names: Iterable[str], jobs: int = 2) -> dict[str, Path]:
        """Builds several fixtures with up to `jobs` compilers at once (the machine has 2 cores)."""
        wanted = list(names)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            return dict(zip(wanted, pool.map(self.build, wanted), strict=True))


def main(arguments: list[str]) -> int:
    builder = FixtureBuilder()
    try:
        built = builder.build_many(arguments or builder.names())
    except FixtureBuildError as error:
        print(error, file=sys.stderr)
        return 1
    for name, path in built.items():
        print(name, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
