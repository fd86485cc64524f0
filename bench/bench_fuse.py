"""`keep volume mount` vs a gocryptfs mount vs a plain directory, measured in the same run.

    python bench/bench_fuse.py [--mib 256] [--files 5000] [--tree /usr/include/linux] [--workdir DIR]

Workloads, each on all three targets:
- dd write: `dd if=/dev/zero bs=1M count=MIB conv=fsync` (the fsync makes each target durable:
  an integrity commit for keep, an fsync of the ciphertext files for gocryptfs);
- dd read: the same file read back with `dd bs=1M` after dropping its cached pages
  (posix_fadvise DONTNEED; FUSE also drops them at open);
- creates: FILES small files (100 bytes each) written in one directory, then a syncfs;
- tar -x: a tar archive of a source tree (default /usr/include/linux) unpacked, then a syncfs.
Printed as MB/s or operations/s and as keep/gocryptfs and keep/plain ratios; asserts nothing.
The target in issue 6: sequential throughput at least half of gocryptfs.

keep runs with the default commit interval (5 s), as an operator would. gocryptfs is created
with `-scryptn 10` (a fast KDF: only the mount is faster, the data path is unchanged).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

PASSWORD = "bench password"
FAST_KDF = ["--pbkdf-memory", "8192", "--pbkdf-force-iterations", "1", "--pbkdf-parallel", "1"]


@dataclass
class Result:
    dd_write: float = 0.0  # MB/s
    dd_read: float = 0.0  # MB/s
    creates: float = 0.0  # files/s
    tar_x: float = 0.0  # seconds


def _is_mount(path: Path) -> bool:
    text = Path("/proc/self/mountinfo").read_text()
    return any(line.split()[4] == str(path) for line in text.splitlines())


def _wait_for_mount(path: Path, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while not _is_mount(path):
        if process.poll() is not None:
            _, errors = process.communicate()
            raise SystemExit(f"{what} mount failed: {errors.decode().strip()}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not mount within 60 s")
        time.sleep(0.02)


def _unmount(path: Path, process: subprocess.Popen[bytes] | None) -> None:
    for flags in (["-u"], ["-u", "-z"]):
        if _is_mount(path):
            subprocess.run(["fusermount3", *flags, str(path)], capture_output=True, timeout=60)
    if process is not None:
        try:
            process.wait(timeout=300)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def _serving(what: str, command: list[str], mountpoint: Path,
             environment: dict[str, str] | None = None) -> Iterator[Path]:
    """Run a foreground FUSE server until the block ends, then unmount it and wait for it."""
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        _wait_for_mount(mountpoint, process, what)
        yield mountpoint
    finally:
        _unmount(mountpoint, process)


@contextlib.contextmanager
def keep_mount(work: Path, size_mib: int) -> Iterator[Path]:
    image = work / "keep.img"
    mountpoint = work / "keep-mnt"
    mountpoint.mkdir()
    environment = {**os.environ, "KEEP_BENCH_KEY": PASSWORD}
    key = ["--passphrase-env", "KEEP_BENCH_KEY"]
    subprocess.run([sys.executable, "-m", "shim", "volume", "create", str(image), "--size",
                    f"{size_mib}M", *FAST_KDF, *key], env=environment, check=True,
                   capture_output=True)
    with _serving("keep", [sys.executable, "-m", "shim", "volume", "mount", str(image), str(mountpoint),
                   *key], mountpoint, environment) as mounted:
        yield mounted


@contextlib.contextmanager
def gocryptfs_mount(work: Path) -> Iterator[Path]:
    cipher = work / "gocryptfs-cipher"
    mountpoint = work / "gocryptfs-mnt"
    cipher.mkdir()
    mountpoint.mkdir()
    extpass = ["-extpass", f"echo {PASSWORD}"]
    subprocess.run(["gocryptfs", "-init", "-q", "-scryptn", "10", *extpass, str(cipher)],
                   check=True, capture_output=True)
    with _serving("gocryptfs", ["gocryptfs", "-fg", "-q", *extpass, str(cipher), str(mountpoint)],
                  mountpoint) as mounted:
        yield mounted


def _syncfs(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)  # FUSE: fsyncdir (keep commits); plain: the directory's metadata
        os.sync()
    finally:
        os.close(descriptor)


def _timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def measure(root: Path, mib: int, files: int, archive: Path) -> Result:
    result = Result()
    big = root / "big.bin"
    seconds = _timed(lambda: subprocess.run(
        ["dd", "if=/dev/zero", f"of={big}", "bs=1M", f"count={mib}", "conv=fsync"],
        check=True, capture_output=True))
    result.dd_write = mib * 1.048576 / seconds
    descriptor = os.open(big, os.O_RDONLY)
    os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(descriptor)
    seconds = _timed(lambda: subprocess.run(["dd", f"if={big}", "of=/dev/null", "bs=1M"],
                                            check=True, capture_output=True))
    result.dd_read = mib * 1.048576 / seconds
    os.unlink(big)

    small = root / "small"
    small.mkdir()
    payload = b"s" * 100

    def create_files() -> None:
        for index in range(files):
            with open(small / f"f{index:05d}", "wb") as handle:
                handle.write(payload)
        _syncfs(small)

    result.creates = files / _timed(create_files)

    tree = root / "tree"
    tree.mkdir()

    def unpack() -> None:
        subprocess.run(["tar", "-xf", str(archive), "-C", str(tree)], check=True)
        _syncfs(tree)

    result.tar_x = _timed(unpack)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="dd size in MiB (default 256)")
    parser.add_argument("--files", type=int, default=5000, help="small files to create (default 5000)")
    parser.add_argument("--tree", default="/usr/include/linux", help="source tree for tar -x")
    parser.add_argument("--workdir", help="where to put the images and mounts (default: a temp dir)")
    args = parser.parse_args()
    for tool in ("fusermount3", "gocryptfs", "dd", "tar"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (Debian: fuse3, gocryptfs, coreutils, tar)")
    with tempfile.TemporaryDirectory(prefix="bench-fuse-", dir=args.workdir) as temporary:
        work = Path(temporary)
        archive = work / "tree.tar"
        subprocess.run(["tar", "-cf", str(archive), "-C", str(Path(args.tree).parent),
                        Path(args.tree).name], check=True)
        tree_mib = archive.stat().st_size / (1 << 20)
        results: dict[str, Result] = {}
        plain = work / "plain"
        plain.mkdir()
        results["plain"] = measure(plain, args.mib, args.files, archive)
        with gocryptfs_mount(work) as mountpoint:
            results["gocryptfs"] = measure(mountpoint, args.mib, args.files, archive)
        size = args.mib * 2 + int(tree_mib * 3) + 256
        with keep_mount(work, size) as mountpoint:
            results["keep"] = measure(mountpoint, args.mib, args.files, archive)

    print(f"dd {args.mib} MiB, {args.files} small files, tar -x of {args.tree} "
          f"({tree_mib:.1f} MiB archive)")
    print(f"{'':12}{'dd write MB/s':>15}{'dd read MB/s':>15}{'creates/s':>12}{'tar -x s':>10}")
    for name, result in results.items():
        print(f"{name:12}{result.dd_write:15.1f}{result.dd_read:15.1f}{result.creates:12.0f}"
              f"{result.tar_x:10.2f}")
    keep, peer, plain_result = results["keep"], results["gocryptfs"], results["plain"]
    for label, other in (("keep/gocryptfs", peer), ("keep/plain", plain_result)):
        print(f"{label:15} dd write {keep.dd_write / other.dd_write:.2f}x, "
              f"dd read {keep.dd_read / other.dd_read:.2f}x, "
              f"creates {keep.creates / other.creates:.2f}x, "
              f"tar -x speed {other.tar_x / keep.tar_x:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
