"""CPU-bound guest: keepshim vs wasmtime's built-in WASI, same module, same engine settings.

A guest that makes no host calls in its hot loop should run at the same speed under both; the
design's target is within 5%. Runs alternate between the two and the best of REPEATS is kept
(the machine is shared). Asserts nothing.

Start-up (a run of 0 rounds) is measured and printed separately; the compute ratio compares
the rest.

usage: python bench/bench_cpu.py [ROUNDS] [REPEATS]
"""

from __future__ import annotations

import sys
from pathlib import Path

from _build import Timing, build, time_builtin_run, time_keepshim_run


def builtin(module_path: Path, rounds: int) -> Timing:
    return time_builtin_run(module_path, ["cpu_loop", str(rounds)])


def ours(module_path: Path, rounds: int) -> Timing:
    return time_keepshim_run(module_path, (str(rounds),))


def main(arguments: list[str]) -> int:
    rounds = int(arguments[0]) if arguments else 100
    repeats = int(arguments[1]) if len(arguments) > 1 else 5
    module_path = build("cpu_loop")
    ours(module_path, 1)  # fill the compile cache
    references: dict[int, list[Timing]] = {0: [], rounds: []}
    measured: dict[int, list[Timing]] = {0: [], rounds: []}
    for _ in range(repeats):
        for count in (0, rounds):
            references[count].append(builtin(module_path, count))
            measured[count].append(ours(module_path, count))
    print(f"CPU-bound benchmark (sieve, {rounds} rounds), best of {repeats}")
    print(f"{'clock':<6} {'':<9} {'built-in WASI':>14} {'keepshim':>10} {'ratio':>7}")
    for clock in ("wall", "cpu"):
        best = {name: {count: min(getattr(timing, clock) for timing in runs[count]) for count in runs}
                for name, runs in (("reference", references), ("ours", measured))}
        start_up = (best["reference"][0], best["ours"][0])
        work = (best["reference"][rounds] - start_up[0], best["ours"][rounds] - start_up[1])
        print(f"{clock:<6} {'start-up':<9} {start_up[0]:>12.3f} s {start_up[1]:>8.3f} s")
        print(f"{clock:<6} {'compute':<9} {work[0]:>12.3f} s {work[1]:>8.3f} s {work[1] / work[0]:>7.3f}")
    print("target: compute ratio <= 1.05 (start-up: ours reads, decrypts and deserializes the "
          "cached module and starts trio and a thread)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
