"""`keep run --volume IMG` asking for the passphrase on a terminal (a real pty).

Found in review: `keep run` put SIGINT back to its default action before the volumes' key was
read, so Ctrl-C at the `Volume passphrase:` prompt killed the process inside getpass, which had
turned echo off: the user's terminal was left not echoing what they type. SIGTERM at the prompt
(of `keep run` and `keep volume` alike) did the same.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import sys
import termios
import time
from pathlib import Path

import pytest
from fixture_build import WasmFixture
from test_run_volume import image

__all__ = ["image"]  # test_run_volume's fixture, used here too

HANG_GUARD_S = 60


def _read_until(fd: int, needle: bytes) -> bytes:
    seen = b""
    deadline = time.monotonic() + HANG_GUARD_S
    while needle not in seen:
        assert time.monotonic() < deadline, seen
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            seen += os.read(fd, 1024)
    return seen


@pytest.mark.parametrize("how", ["ctrl-c", "SIGTERM"])
def test_an_interrupted_passphrase_prompt_restores_echo(
        how: str, image: Path, wasm_fixture: WasmFixture, keep_environment: dict[str, str]) -> None:
    module = str(wasm_fixture("hello"))
    pid, fd = pty.fork()
    if pid == 0:  # the child: keep on the pty, as on a user's terminal
        os.execve(sys.executable, [sys.executable, "-m", "shim", "run", "--volume", str(image), module],
                  keep_environment)
    status: int | None = None
    try:
        _read_until(fd, b"Volume passphrase: ")
        assert not termios.tcgetattr(fd)[3] & termios.ECHO  # getpass turned echo off
        if how == "ctrl-c":
            os.write(fd, b"\x03")  # the terminal sends SIGINT
        else:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + HANG_GUARD_S
        while (ended := os.waitpid(pid, os.WNOHANG))[0] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        status = os.waitstatus_to_exitcode(ended[1])
        assert termios.tcgetattr(fd)[3] & termios.ECHO, "the terminal was left without echo"
        assert status == (130 if how == "ctrl-c" else 128 + signal.SIGTERM)
    finally:
        if status is None:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
