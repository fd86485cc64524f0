"""Guest file I/O on the encrypted volume vs a host directory, in one run (issue 4, point 7).

Three workloads (bench/volume_workloads.c): `seq` 64 MiB written in 64 KiB chunks, fsync'd and
read back; `files` 2,000 files of 4 KiB created, stat'd and deleted; `small` 200,000 16-byte
writes and an fsync. Each runs:

- on an encrypted volume under keepshim (`--volume`: a fresh image, LUKS2 + XTS + Merkle
  integrity; the final commit and close are inside the timing),
- on a host directory under keepshim (`--dir`),
- on a host directory under wasmtime's built-in WASI (the peer; it never serves a keep guest).

Each configuration also runs the program with `none` (start-up only), which is subtracted. The
best of REPEATS runs is kept (the machine is shared), and the configurations take turns round by
round. Printed: wall and process-CPU seconds per
workload and the ratios volume / keepshim-dir (target: within 2x) and volume / built-in.
Asserts nothing.

usage: python bench/bench_volume.py [REPEATS] [WORKLOAD...]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from _build import Timer, Timing, build, time_builtin_run, time_keepshim_run

WORKLOADS = ("seq", "files", "small")
IMAGE_SIZE = 192 << 20
PASSPHRASE = b"bench"


def builtin(module_path: Path, workload: str, directory: Path) -> Timing:
    return time_builtin_run(module_path, ["volume_workloads", workload], ((str(directory), "/data"),))


def keepshim_dir(module_path: Path, workload: str, directory: Path) -> Timing:
    return time_keepshim_run(module_path, (workload,), ((str(directory), "/data"),))


def keepshim_volume(module_path: Path, workload: str, directory: Path) -> Timing:
    """A fresh image (not timed); the run and the final commit + close (timed)."""
    from shim.run import RunConfig, Stdio, run_module
    from shim.volume_backend import VolumeSession
    from storage.luks2 import KdfCost
    from storage.volume import create_volume
    from wasi_host.streams import OsStream

    image = directory / "bench.img"
    image.unlink(missing_ok=True)
    volume = create_volume(image, IMAGE_SIZE, PASSPHRASE, pbkdf="pbkdf2", kdf_cost=KdfCost(iterations=1000))
    session = VolumeSession(volume)
    null = os.open(os.devnull, os.O_RDWR)
    try:
        config = RunConfig(module=str(module_path), args=(workload,), preopens=(("/data", session.root()),),
                           stdio=Stdio(OsStream(null), OsStream(null), OsStream(2)))
        timer = Timer()
        result = run_module(config)
        session.close()
        elapsed = timer.stop()
    finally:
        os.close(null)
        session.close()
        image.unlink(missing_ok=True)
    if result.exit_code != 0:
        raise SystemExit(f"volume: {workload} failed (exit {result.exit_code})")
    return elapsed


Runner = Callable[[Path, str, Path], Timing]
CONFIGURATIONS: dict[str, Runner] = {"volume": keepshim_volume, "keepshim-dir": keepshim_dir,
                                     "builtin-dir": builtin}


def measure(module: Path, workload: str, repeats: int) -> dict[str, Timing]:
    """Per configuration: best wall and best CPU seconds of `workload` minus those of `none`
    (start-up), each run in a fresh directory. The configurations take turns, round by round,
    so that a slow spell of the shared machine (the directory runs swing 2-6x) falls on all of
    them alike rather than on one configuration's whole series."""
    runs: dict[str, dict[str, list[Timing]]] = {name: {workload: [], "none": []} for name in CONFIGURATIONS}
    for _ in range(repeats):
        for name, runner in CONFIGURATIONS.items():
            for which in (workload, "none"):
                directory = Path(tempfile.mkdtemp(prefix="bench-volume-"))
                try:
                    runs[name][which].append(runner(module, which, directory))
                finally:
                    shutil.rmtree(directory)

    def net(name: str) -> Timing:
        total, start_up = runs[name][workload], runs[name]["none"]
        return Timing(max(min(t.wall for t in total) - min(t.wall for t in start_up), 1e-6),
                      max(min(t.cpu for t in total) - min(t.cpu for t in start_up), 1e-6))
    return {name: net(name) for name in CONFIGURATIONS}


def main(argv: list[str]) -> None:
    repeats = int(argv[0]) if argv else 3
    workloads = argv[1:] or list(WORKLOADS)
    module = build("volume_workloads")
    keepshim_dir(module, "none", Path(tempfile.gettempdir()))  # warm the compile cache
    print("seconds (wall / CPU of this process) and ratios; the machine is shared, so CPU is the steadier")
    print(f"{'workload':8} {'volume':>14} {'keepshim-dir':>14} {'builtin-dir':>14} "
          f"{'vol/keep-dir':>14} {'vol/builtin':>14}")
    for workload in workloads:
        seconds = measure(module, workload, repeats)
        volume, keep_dir, peer = seconds["volume"], seconds["keepshim-dir"], seconds["builtin-dir"]
        print(f"{workload:8} {volume.wall:6.2f}/{volume.cpu:6.2f} {keep_dir.wall:6.2f}/{keep_dir.cpu:6.2f} "
              f"{peer.wall:6.2f}/{peer.cpu:6.2f} "
              f"{volume.wall / keep_dir.wall:6.2f}/{volume.cpu / keep_dir.cpu:5.2f}x "
              f"{volume.wall / peer.wall:6.2f}/{volume.cpu / peer.cpu:5.2f}x", flush=True)
    print("target: volume within 2x of keepshim on a host directory (vol/keep-dir <= 2)")


if __name__ == "__main__":
    main(sys.argv[1:])
