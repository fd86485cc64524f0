"""Host-call speed: 200,000 16-byte fd_write calls, ours vs wasmtime's built-in WASI.

Prints calls/s to a file (in a pre-opened directory) and to /dev/null (the guest's stdout), and
the ratio built-in / ours, and the same run traced (`--trace` to /dev/null) with the cost of
tracing as untraced / traced. wasmtime's built-in WASI (written in Rust) is used here only as the
peer to measure against; it never serves a keepshim guest.

Each configuration runs the program with COUNT writes and with 0 writes, and the rate is
COUNT / (time(COUNT) - time(0)): start-up and compilation cancel out. The best of REPEATS runs
is kept (the machine is shared). Targets from the design: >= 120,000 calls/s, and no worse than
9x the built-in WASI. Asserts nothing.

usage: python bench/bench_fd_write.py [COUNT] [REPEATS]
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from _build import Timing, build, time_builtin_run, time_keepshim_run


def builtin(module_path: Path, count: int, target: str, directory: Path) -> Timing:
    """One run under wasmtime's built-in WASI."""
    argv = ["fd_write_loop", str(count)] + ([] if target == "null" else ["/out/bench.dat"])
    return time_builtin_run(module_path, argv, ((str(directory), "/out"),))


def _guest_args(count: int, target: str) -> tuple[str, ...]:
    return (str(count),) + (() if target == "null" else ("/out/bench.dat",))


def ours(module_path: Path, count: int, target: str, directory: Path) -> Timing:
    """One keepshim run."""
    return time_keepshim_run(module_path, _guest_args(count, target), ((str(directory), "/out"),))


def ours_traced(module_path: Path, count: int, target: str, directory: Path) -> Timing:
    """One keepshim run with `--trace=/dev/null` (text format): the price of tracing (without it
    the plain host functions are bound, so the untraced column is the same run as before tracing
    existed)."""
    return time_keepshim_run(module_path, _guest_args(count, target), ((str(directory), "/out"),),
                             trace_to=os.devnull)


def rates(runner: Callable[[Path, int, str, Path], Timing], module_path: Path, count: int,
          target: str, directory: Path, repeats: int) -> tuple[float, float]:
    """Best (wall, CPU) calls/s over `repeats` runs, start-up subtracted."""
    best_wall = best_cpu = 0.0
    for _ in range(repeats):
        empty = runner(module_path, 0, target, directory)
        full = runner(module_path, count, target, directory)
        best_wall = max(best_wall, count / max(full.wall - empty.wall, 1e-9))
        best_cpu = max(best_cpu, count / max(full.cpu - empty.cpu, 1e-9))
    return best_wall, best_cpu


def main(arguments: list[str]) -> int:
    count = int(arguments[0]) if arguments else 200_000
    repeats = int(arguments[1]) if len(arguments) > 1 else 3
    module_path = build("fd_write_loop")
    with tempfile.TemporaryDirectory(prefix="keepshim-bench-") as scratch:
        directory = Path(scratch)
        ours(module_path, 0, "null", directory)  # fill the compile cache
        print(f"fd_write benchmark: {count:,} writes of 16 bytes, best of {repeats}")
        print(f"{'target':<6} {'clock':<5} {'built-in WASI':>16} {'keepshim':>16} {'ratio':>8}"
              f" {'keepshim --trace':>20} {'trace cost':>10}")
        for target in ("file", "null"):
            reference = rates(builtin, module_path, count, target, directory, repeats)
            measured = rates(ours, module_path, count, target, directory, repeats)
            traced = rates(ours_traced, module_path, count, target, directory, repeats)
            for clock, index in (("wall", 0), ("cpu", 1)):
                print(f"{target:<6} {clock:<5} {reference[index]:>12,.0f} c/s "
                      f"{measured[index]:>12,.0f} c/s {reference[index] / measured[index]:>7.2f}x"
                      f" {traced[index]:>16,.0f} c/s {measured[index] / traced[index]:>9.2f}x")
    print("targets: >= 120,000 calls/s; ratio <= 9x; the keepshim column binds the plain host "
          "functions (tracing off adds nothing)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
