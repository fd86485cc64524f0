"""Storage benchmark: the encrypted, integrity-protected filesystem beside plain files.

Prints numbers and ratios; asserts nothing. Each workload runs on a keepshim volume (an image
file in a temporary directory) and, as the peer, on plain files in the same directory (same disk),
plus `openssl speed -evp aes-256-xts` as the crypto ceiling.

    python bench/bench_storage.py [--size-mib 256] [--random-ops 3000] [--rounds 3] [--files 5000]
                                  [--integrity merkle|none|both] [--dir DIR]

Targets from issue 3 (integrity on): sequential write >= 150 MiB/s, durable random 4 KiB
overwrites >= 3,000 ops/s; the target column says met / not met (it is printed, never asserted).
The plain peer's durable random overwrites are bounded by the disk's fdatasync rate: that is the
ceiling for any design that syncs once per operation, and the line says so.
The sequential writes (a new file each round) and the durable overwrites run in ROUNDS rounds,
ours, plain (and the floor below) taking turns, and the medians are printed (with every round's
figure): the disk's sync latency drifts within minutes, and the machine slows down now and then. The floor line times 8 KiB O_DIRECT+RWF_DSYNC writes on the same disk, one per
operation: the floor of the integrity layer's small commits (one direct write of a log record:
a header sector and the data sector), so ours / floor shows how much the rest (Python, crypto,
hashing, amortised checkpoints) costs.
"""

from __future__ import annotations

import argparse
import functools
import mmap
import os
import random
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from storage.fs import ROOT_INODE
from storage.luks2 import KdfCost
from storage.volume import Volume, create_volume

MIB = 1 << 20
BLOCK = 4096


def timed(work: Callable[[], None]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def openssl_xts_ceiling() -> float | None:
    """MB/s of `openssl speed -evp aes-256-xts` at 4 KiB blocks (None if unavailable)."""
    try:
        result = subprocess.run(["openssl", "speed", "-seconds", "2", "-bytes", "4096", "-evp", "aes-256-xts"],
                                capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in result.stdout.splitlines():
        if line.lower().startswith("aes-256-xts"):
            match = re.findall(r"([\d.]+)k", line)
            if match:
                return float(match[-1]) * 1000 / 1e6
    return None


class VolumeWorkloads:
    def __init__(self, volume: Volume, size: int) -> None:
        self.volume = volume
        self.fs = volume.fs
        self.size = size

    def sequential_write(self, name: bytes = b"seq") -> None:
        ino = self.fs.create(ROOT_INODE, name).ino
        chunk = os.urandom(MIB)
        for offset in range(0, self.size, MIB):
            self.fs.write(ino, offset, chunk)
        self.fs.fsync(ino)

    def sequential_read(self) -> None:
        ino = self.fs.lookup(ROOT_INODE, b"seq").ino
        for offset in range(0, self.size, MIB):
            self.fs.read(ino, offset, MIB)

    def random_overwrites(self, ops: int, span: int) -> None:
        ino = self.fs.lookup(ROOT_INODE, b"seq").ino
        rng = random.Random(1)
        block = os.urandom(BLOCK)
        for _ in range(ops):
            self.fs.write(ino, rng.randrange(span // BLOCK) * BLOCK, block)
            self.fs.fsync(ino)

    def small_files(self, count: int) -> None:
        directory = self.fs.mkdir(ROOT_INODE, b"small").ino
        body = os.urandom(1000)
        for index in range(count):
            ino = self.fs.create(directory, b"file%05d" % index).ino
            self.fs.write(ino, 0, body)
        self.fs.fsync()


class PlainWorkloads:
    def __init__(self, directory: Path, size: int) -> None:
        self.directory = directory
        self.size = size
        self.path = directory / "plain-seq"

    def sequential_write(self, name: str = "plain-seq") -> None:
        chunk = os.urandom(MIB)
        fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for _ in range(0, self.size, MIB):
                os.write(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)

    def sequential_read(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            while os.read(fd, MIB):
                pass
        finally:
            os.close(fd)

    def random_overwrites(self, ops: int, span: int) -> None:
        rng = random.Random(1)
        block = os.urandom(BLOCK)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            for _ in range(ops):
                os.pwrite(fd, block, rng.randrange(span // BLOCK) * BLOCK)
                os.fdatasync(fd)
        finally:
            os.close(fd)

    def direct_record_writes(self, ops: int) -> float | None:
        """ops/s of durable 8 KiB writes (a small commit's log record: header and one sector)
        with O_DIRECT and RWF_DSYNC over written blocks of the plain file: the floor of any
        design that makes one such write per operation. None where direct I/O is refused."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_DIRECT)
        except (OSError, AttributeError):
            return None
        buffer = mmap.mmap(-1, 2 * BLOCK)  # page-aligned, as O_DIRECT wants
        buffer.write(os.urandom(2 * BLOCK))
        ring = max(1, min(self.size // (2 * BLOCK), 2048))
        try:
            start = time.perf_counter()
            for index in range(ops):
                os.pwritev(fd, [buffer], (index % ring) * 2 * BLOCK, os.RWF_DSYNC)
            return ops / (time.perf_counter() - start)
        except OSError:
            return None
        finally:
            os.close(fd)
            buffer.close()

    def small_files(self, count: int) -> None:
        directory = self.directory / "plain-small"
        directory.mkdir()
        body = os.urandom(1000)
        for index in range(count):
            fd = os.open(directory / f"file{index:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, body)
            os.close(fd)
        os.sync()


TARGETS = {"sequential write": 150.0, "durable random 4 KiB overwrites": 3000.0}


def row(label: str, ours: float, peer: float, unit: str, *, ceiling: float | None = None,
        integrity: str = "merkle", note: str = "") -> None:
    """One figure beside the plain-file peer (and the openssl XTS ceiling for throughputs), with
    ratios and the issue 3 target verdict."""
    ratio = ours / peer if peer else float("nan")
    line = f"  {label:<32} {ours:>9.1f} {unit:<7} plain {peer:>9.1f} ({ratio:5.2f})"
    if ceiling is not None:
        line += f"  openssl {ceiling:>7.0f} ({ours * MIB / 1e6 / ceiling:5.3f})"
    else:
        line += " " * 25
    target = TARGETS.get(label)
    if target is not None and integrity == "merkle":
        line += f"  target >= {target:,.0f}: {'met' if ours >= target else 'not met'}"
    print(line + (f"  {note}" if note else ""))


def run(options: argparse.Namespace, integrity: Literal["merkle", "none"], ceiling: float | None) -> None:
    """Every workload on a fresh volume with `integrity`, each beside the plain peer."""
    size = options.size_mib * MIB
    with tempfile.TemporaryDirectory(dir=options.dir, prefix="keepshim-bench-") as scratch:
        directory = Path(scratch)
        image = directory / "bench.img"
        image_size = 16 * MIB + size * (options.rounds + 1) + 64 * MIB  # a new file per round
        with create_volume(image, image_size, b"bench", pbkdf="pbkdf2", kdf_cost=KdfCost(iterations=1000),
                           integrity=integrity) as volume:
            ours = VolumeWorkloads(volume, size)
            plain = PlainWorkloads(directory, size)
            print(f"integrity={integrity}: {options.size_mib} MiB, cipher engine {volume.cipher_engine},"
                  f" dir {directory}   (ratios in brackets)")
            # a new file each round (ours and plain taking turns; the first one stays for the
            # reads and the overwrites below), medians: one sample met a passing slowdown of the
            # whole machine (openssl's ceiling a quarter down in that run)
            writes: dict[str, list[float]] = {"ours": [], "plain": []}
            for turn in range(options.rounds):
                suffix = b"" if turn == 0 else b"-%d" % turn
                writes["ours"].append(size / MIB / timed(functools.partial(ours.sequential_write, b"seq" + suffix)))
                writes["plain"].append(size / MIB / timed(functools.partial(plain.sequential_write,
                                                                            "plain-seq" + suffix.decode())))
            row("sequential write", statistics.median(writes["ours"]), statistics.median(writes["plain"]), "MiB/s",
                ceiling=ceiling, integrity=integrity)
            read_ours = timed(ours.sequential_read)
            read_plain = timed(plain.sequential_read)
            row("sequential read", size / MIB / read_ours, size / MIB / read_plain, "MiB/s",
                ceiling=ceiling, integrity=integrity, note="(plain: page cache)")
            ops = options.random_ops
            span = min(size, 64 * MIB)
            # The disk's sync latency drifts by a third within minutes here: the three take
            # turns, round by round, and the medians are compared.
            rates: dict[str, list[float]] = {"ours": [], "plain": [], "floor": []}
            for _ in range(options.rounds):
                rates["ours"].append(ops / timed(lambda: ours.random_overwrites(ops, span)))
                rates["plain"].append(ops / timed(lambda: plain.random_overwrites(ops, span)))
                direct = plain.direct_record_writes(ops)
                if direct is not None:
                    rates["floor"].append(direct)
            random_ours, random_plain = statistics.median(rates["ours"]), statistics.median(rates["plain"])
            row("durable random 4 KiB overwrites", random_ours, random_plain, "ops/s",
                integrity=integrity, note="(plain = this disk's fdatasync ceiling)")
            if rates["floor"]:
                floor = statistics.median(rates["floor"])
                print(f"  {'  8 KiB O_DIRECT+RWF_DSYNC':<32} {floor:>9.1f} ops/s  (one log record per op:"
                      f" the direct-write floor; ours {random_ours / floor:5.2f} of it)")
            if options.rounds > 1:
                for label, figures in (("writes", writes), ("overwrites", rates)):
                    print(f"  {'  (' + label + ', medians of ' + str(options.rounds) + ' rounds:':<32} "
                          + "; ".join(f"{name} " + "/".join(f"{rate:.0f}" for rate in values)
                                      for name, values in figures.items() if values) + ")")
            files = options.files
            small_ours = timed(lambda: ours.small_files(files))
            small_plain = timed(lambda: plain.small_files(files))
            row(f"{files} small-file creates", files / small_ours, files / small_plain, "files/s",
                integrity=integrity)
            info = volume.info()
        print(f"  generation {info['generation']}, image {image.stat().st_blocks * 512 / MIB:.0f} MiB allocated")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--random-ops", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of the sequential writes and durable random overwrites (ours, plain, floor in turn); medians")
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--integrity", choices=["merkle", "none", "both"], default="both")
    parser.add_argument("--dir", default=None, help="where the image and plain files go (same disk)")
    options = parser.parse_args()
    ceiling = openssl_xts_ceiling()
    load = os.getloadavg()[0]
    print(f"keepshim storage benchmark (load average {load:.1f} on {os.cpu_count()} cores; openssl "
          f"aes-256-xts 4 KiB ceiling {'unavailable' if ceiling is None else f'{ceiling:.0f} MB/s'})")
    for integrity in ("merkle", "none"):
        if options.integrity in (integrity, "both"):
            run(options, integrity, ceiling)


if __name__ == "__main__":
    main()
