"""Compile a benchmark's C program (bench/NAME.c) to wasm32-wasi with zig, cached by content.

Never committed as binaries: the module is built at bench run time into
`$KEEPSHIM_CACHE_DIR/bench` (default ~/.cache/keepshim/bench) under a name carrying the SHA-256
of the source, the flags and the ziglang version.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def cache_dir() -> Path:
    base = os.environ.get("KEEPSHIM_CACHE_DIR") or str(Path.home() / ".cache" / "keepshim")
    return Path(base) / "bench"


def build(name: str) -> Path:
    """The compiled module for bench/NAME.c (built on first use, with the project's zig helper)."""
    from shim.wasm_compile import COMPILE_FLAGS, compile_c_to_wasm, zig_version

    source = BENCH / f"{name}.c"
    digest = hashlib.sha256(source.read_bytes() + " ".join(COMPILE_FLAGS).encode()
                            + zig_version().encode()).hexdigest()[:20]
    output = cache_dir() / f"{name}-{digest}.wasm"
    if output.is_file():
        return output
    compile_c_to_wasm(source, output)  # atomic: a partial build never sits under the final name
    return output


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds and process CPU seconds (the machine is shared: CPU time is the
    steadier of the two, wall time is what a user sees)."""

    wall: float
    cpu: float


class Timer:
    """Starts on construction; `stop()` returns the Timing since then."""

    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._cpu = time.process_time()

    def stop(self) -> Timing:
        return Timing(time.perf_counter() - self._wall, time.process_time() - self._cpu)


def time_builtin_run(module_path: Path, argv: list[str],
                     preopens: tuple[tuple[str, str], ...] = ()) -> Timing:
    """Wall and CPU seconds for one run under wasmtime's BUILT-IN WASI, the peer every bench
    compares against (compile excluded, instantiation included, as for ours; stdout to
    /dev/null, stderr inherited). Exits if the guest fails."""
    import wasmtime

    engine = wasmtime.Engine()
    module = wasmtime.Module.from_file(engine, str(module_path))
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    store = wasmtime.Store(engine)
    wasi = wasmtime.WasiConfig()
    wasi.argv = argv
    wasi.stdout_file = os.devnull
    wasi.inherit_stderr()
    for host, guest in preopens:
        wasi.preopen_dir(host, guest)
    store.set_wasi(wasi)
    timer = Timer()
    instance = linker.instantiate(store, module)
    start = instance.exports(store)["_start"]
    assert isinstance(start, wasmtime.Func)
    try:
        start(store)
    except wasmtime.ExitTrap as exit_trap:
        if exit_trap.code != 0:
            raise SystemExit(f"built-in WASI: {argv} failed (exit {exit_trap.code})") from None
    return timer.stop()


def time_keepshim_run(module_path: Path, args: tuple[str, ...],
                      dirs: tuple[tuple[str, str], ...] = (), *, trace_to: str | None = None) -> Timing:
    """Wall and CPU seconds for one `keep run`-equivalent run in this process (stdio on
    /dev/null; the module comes from the warm compile cache), traced (text format) to
    `trace_to` when given. Exits if the guest fails."""
    from contextlib import ExitStack

    from shim.run import DirectoryMapping, RunConfig, Stdio, run_module
    from shim.trace import open_tracer
    from wasi_host.streams import OsStream

    null = os.open(os.devnull, os.O_RDWR)
    try:
        with ExitStack() as stack:
            tracer = stack.enter_context(open_tracer(trace_to)) if trace_to is not None else None
            config = RunConfig(module=str(module_path), args=args,
                               dirs=tuple(DirectoryMapping(host, guest) for host, guest in dirs),
                               stdio=Stdio(OsStream(null), OsStream(null), OsStream(2)), trace=tracer)
            timer = Timer()
            result = run_module(config)
            elapsed = timer.stop()
    finally:
        os.close(null)
    if result.exit_code != 0:
        raise SystemExit(f"benchmark guest failed: exit {result.exit_code} {result.trap or ''}")
    return elapsed
