"""A process that holds keys never dumps core: `read_key` (every `keep volume` command, `keep run
--volume`, the FUSE mount), `keep serve` and `keep deploy` set RLIMIT_CORE to 0 and mark
themselves not dumpable before any key is in memory.

Found in review: a mount started from a shell with `ulimit -c unlimited` left, on SIGQUIT, a
45 MB core file in its working directory holding the passphrase and a file's plaintext
(test_fuse.py covers the mount); the other key-holding commands had the same exposure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from core_dumps import core_dumps_allowed
from fixture_build import WasmFixture
from run_volume_support import PASSPHRASE
from test_run_volume import image

__all__ = ["image"]  # test_run_volume's fixture, used here too

HANG_GUARD_S = 60


@pytest.fixture(autouse=True)
def allowed() -> Iterator[None]:
    with core_dumps_allowed():
        yield


def _core_limits(pid: int) -> list[str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            return line.split()[4:6]
    raise AssertionError("no core limit line")


def test_read_key_forbids_core_dumps_before_it_returns() -> None:
    script = ("import ctypes, os, resource; from shim.keys import KeySource, read_key;"
              " before = resource.getrlimit(resource.RLIMIT_CORE);"
              " read_key(KeySource(passphrase_env='SECRET'));"
              " libc = ctypes.CDLL(None);"
              " print(before[0] != 0, resource.getrlimit(resource.RLIMIT_CORE)[0], libc.prctl(3, 0, 0, 0, 0))")
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                               env={**os.environ, "SECRET": "s3cret"})
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["True", "0", "0"]  # allowed before; soft limit 0 after, not dumpable


def _wait_for_limit(process: subprocess.Popen[bytes]) -> list[str]:
    """The soft core limit of `process` once it has set it (it starts with the parent's)."""
    deadline = time.monotonic() + HANG_GUARD_S
    while (limits := _core_limits(process.pid))[0] != "0":
        assert process.poll() is None and time.monotonic() < deadline, limits
        time.sleep(0.05)
    return limits


def test_keep_run_with_a_volume_runs_its_guest_without_core_dumps(
        image: Path, wasm_fixture: WasmFixture, keep_environment: dict[str, str]) -> None:
    environment = {**keep_environment, "VOLUME_SECRET": PASSPHRASE.decode()}
    process = subprocess.Popen(
        [sys.executable, "-m", "shim", "run", "--volume", str(image), "--passphrase-env", "VOLUME_SECRET",
         str(wasm_fixture("echo"))], env=environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    try:
        assert _wait_for_limit(process)[0] == "0"  # the guest waits on stdin meanwhile
        _, stderr = process.communicate(b"", timeout=HANG_GUARD_S)
        assert process.returncode == 0, stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_keep_serve_forbids_core_dumps(keep_environment: dict[str, str]) -> None:
    process = subprocess.Popen([sys.executable, "-m", "shim", "serve", "--listen", "127.0.0.1:0"],
                               env=keep_environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert _wait_for_limit(process)[0] == "0"
    finally:
        process.terminate()
        process.wait(HANG_GUARD_S)
