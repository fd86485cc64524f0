"""XTS sector encryption: our engines against the AES-NI ceiling, measured in the same run.

    python bench/bench_crypto.py [--mib M] [--repeat R]

Rows (4096-byte sectors, one XTS data unit each, tweak = 8 * sector as LUKS2 uses):
- pyca per sector:       storage.xts.SectorCipher(engine="pyca"), a new pyca Cipher per sector;
- libcrypto per sector:  SectorCipher(engine="libcrypto"), key set once, tweak re-initialised per
                         sector; `run` returns new bytes, `into` writes into a reused buffer;
- ceiling:               `openssl speed -evp aes-256-xts -bytes 4096` (one core, C, no Python).
Encrypt and decrypt are both measured; each figure is the best of R repeats (the VMs are noisy).
Times are CPU time of this process, as `openssl speed` divides by CPU user time by default, so
the ratios stay fair when other processes share the cores.
Printed as MiB/s, µs per sector, and as a fraction of the ceiling; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import time
from collections.abc import Callable

from storage.xts import SectorCipher

SECTOR = 4096


def _best(work: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        work()
        best = min(best, time.process_time() - start)
    return best


def _openssl_ceiling() -> float | None:
    """MiB/s of `openssl speed -evp aes-256-xts -bytes 4096`, or None if it cannot run."""
    try:
        result = subprocess.run(["openssl", "speed", "-evp", "aes-256-xts", "-bytes", str(SECTOR),
                                 "-seconds", "2"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"^AES-256-XTS\s+([\d.]+)k", result.stdout, re.MULTILINE | re.IGNORECASE)
    if match is None:
        return None
    return float(match.group(1)) * 1000 / (1 << 20)  # openssl prints 1000-byte kB/s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=64, help="data per measurement (default 64)")
    parser.add_argument("--repeat", type=int, default=3, help="repeats, best kept (default 3)")
    options = parser.parse_args()
    key = os.urandom(64)
    total = options.mib << 20
    run_sectors = 256  # 1 MiB runs, as a sequential writer would hand them over
    data = os.urandom(run_sectors * SECTOR)
    runs = total // len(data)
    reused = bytearray(len(data))
    pyca = SectorCipher(key, engine="pyca")
    fast = SectorCipher(key, engine="libcrypto")
    ciphertext = fast.encrypt_run(0, data)

    def loop(call: Callable[[int], object]) -> Callable[[], object]:
        def work() -> None:  # results are dropped at once, as a writer would
            for index in range(runs):
                call(index * run_sectors)
        return work

    def per_sector(cipher: SectorCipher, encrypting: bool) -> Callable[[], object]:
        single = data[:SECTOR]
        method = cipher.encrypt if encrypting else cipher.decrypt

        def work() -> None:
            for index in range(runs * run_sectors):
                method(index, single)
        return work

    cases: list[tuple[str, Callable[[], object]]] = [
        ("pyca, one sector per call, encrypt", per_sector(pyca, True)),
        ("pyca, one sector per call, decrypt", per_sector(pyca, False)),
        ("pyca, 1 MiB runs, encrypt", loop(lambda first: pyca.encrypt_run(first, data))),
        ("libcrypto, one sector per call, encrypt", per_sector(fast, True)),
        ("libcrypto, one sector per call, decrypt", per_sector(fast, False)),
        ("libcrypto, 1 MiB runs, encrypt", loop(lambda first: fast.encrypt_run(first, data))),
        ("libcrypto, 1 MiB runs, decrypt", loop(lambda first: fast.decrypt_run(first, ciphertext))),
        ("libcrypto, 1 MiB runs into a buffer, encrypt",
         loop(lambda first: fast.encrypt_into(first, data, reused))),
        ("libcrypto, 1 MiB runs into a buffer, decrypt",
         loop(lambda first: fast.decrypt_into(first, ciphertext, reused))),
    ]
    ceiling = _openssl_ceiling()
    print(f"XTS-AES-256, {SECTOR}-byte sectors, {options.mib} MiB per measurement, "
          f"best of {options.repeat}")
    print(f"{'case':48s} {'MiB/s':>9s} {'µs/sector':>10s} {'of ceiling':>11s}")
    rates: dict[str, float] = {}
    for name, work in cases:
        seconds = _best(work, options.repeat)
        rate = (runs * len(data)) / seconds / (1 << 20)
        rates[name] = rate
        share = f"{rate / ceiling:10.1%}" if ceiling else "       n/a"
        print(f"{name:48s} {rate:9.0f} {seconds / (runs * run_sectors) * 1e6:10.2f} {share:>11s}")
    if ceiling:
        print(f"{'openssl speed -evp aes-256-xts -bytes 4096':48s} {ceiling:9.0f} "
              f"{SECTOR / (ceiling * (1 << 20)) * 1e6:10.2f} {1:10.1%}")
    else:
        print("openssl speed: not available")
    speedup = rates["libcrypto, one sector per call, encrypt"] / rates["pyca, one sector per call, encrypt"]
    print(f"libcrypto / pyca, one sector per call (encrypt): {speedup:.1f}x")


if __name__ == "__main__":
    main()
