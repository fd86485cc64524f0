"""C source -> wasm32-wasi module with zig from PyPI (`python -m ziglang cc`), written atomically.

Shared by `keep demo` (which builds its embedded guest) and the test suite's fixture builder
(tests/fixture_build.py), so both use the same compiler flags and the same zig cache.

zig's own cache (its wasi-libc build, about a minute the first time on a fresh machine) lives in
ZIG_GLOBAL_CACHE_DIR, default ~/.cache/keepshim/zig. The output is written under a temporary name
and renamed into place, so a concurrent reader never sees a half-written module.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from shim.errors import KeepError

COMPILE_FLAGS = ("-target", "wasm32-wasi", "-O2", "-s")


class CompileError(KeepError):
    """zig is missing or the source did not compile; the message carries the compiler's output."""


def default_zig_cache_dir() -> Path:
    """`$ZIG_GLOBAL_CACHE_DIR`, else ~/.cache/keepshim/zig."""
    configured = os.environ.get("ZIG_GLOBAL_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "keepshim" / "zig"


def zig_version() -> str:
    """The installed ziglang distribution's version (part of every build's cache key)."""
    try:
        return importlib.metadata.version("ziglang")
    except importlib.metadata.PackageNotFoundError:
        raise CompileError("zig is not installed (pip install ziglang, or install keepshim with "
                           "its demo extra: pip install 'keepshim[demo]')") from None


def compile_c_to_wasm(source: Path, output: Path, *, zig_cache_dir: Path | None = None) -> None:
    """Compile one C file to a wasm32-wasi command module at `output` (atomically)."""
    zig_version()  # a clear error when zig is missing, rather than "No module named ziglang"
    zig_cc(source, output, COMPILE_FLAGS, zig_cache_dir=zig_cache_dir)


def zig_cc(source: Path, output: Path, flags: Sequence[str], *,
           zig_cache_dir: Path | None = None) -> None:
    """`python -m ziglang cc FLAGS SOURCE -o OUTPUT`, written under a temporary name and renamed
    into place (also used by storage.native's build of its sector loops). CompileError with the
    compiler's output when it fails."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
    command = [sys.executable, "-m", "ziglang", "cc", *flags, str(source), "-o", str(partial)]
    cache = zig_cache_dir or default_zig_cache_dir()
    environment = {**os.environ, "ZIG_GLOBAL_CACHE_DIR": str(cache)}
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    except OSError as error:
        raise CompileError(f"cannot run zig: {error.strerror}") from None
    if result.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise CompileError(f"{source.name} failed to compile (exit {result.returncode}):\n"
                           f"{result.stderr.strip() or result.stdout.strip()}")
    partial.replace(output)
