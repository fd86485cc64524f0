"""`keep run`'s limits and interruptions reaching a guest that waits inside a host call, and the
trace file surviving an interrupted run.

`--timeout` (and cancelling an interruptible run) bumps the engine's epoch, which stops wasm code
only; a guest sleeping in poll_oneoff or blocked reading stdin must be woken by the run's stop
signal and end the same way (exit 134, the timeout named on stderr). `--trace=FILE` must hold the
calls made before a SIGINT / SIGTERM ended the process.

The CLI runs as a subprocess (real stdin pipes, real signals). Durations are never asserted
tightly: a stopped guest must merely end long before its own wait would have (60 s), and every
wait has a hang guard.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixture_build import WasmFixture

from shim.trace import read_jsonl_trace

HANG_GUARD_S = 120


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """In-process runs compile through a cache of their own."""
    cache = tmp_path / "compile-cache"
    monkeypatch.setenv("KEEPSHIM_CACHE_DIR", str(cache))
    yield cache


# --trace=FILE and signals ----------------------------------------------------------------------

@pytest.mark.parametrize(("signal_number", "trace_format"),
                         [(signal.SIGINT, "text"), (signal.SIGTERM, "jsonl")])
def test_a_trace_file_keeps_the_calls_made_before_a_signal(
        wasm_fixture: WasmFixture, keep_environment: dict[str, str], tmp_path: Path,
        signal_number: signal.Signals, trace_format: str) -> None:
    """The echo guest reads and writes one line, then blocks in its second read; the signal ends
    the process there (its default action), and the trace file has both calls."""
    trace = tmp_path / "trace.out"
    process = subprocess.Popen(
        [sys.executable, "-m", "shim", "run", f"--trace={trace}", "--trace-format", trace_format,
         str(wasm_fixture("echo"))],
        env=keep_environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(b"hello\n")
        process.stdin.flush()
        assert process.stdout.readline() == b"hello\n"
        # The event of a call is written when the call returns, just after the guest's output:
        # give it a moment (a file that stays empty fails below just the same).
        deadline = time.monotonic() + 10
        while b"fd_write" not in trace.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal_number)
        process.wait(timeout=HANG_GUARD_S)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    assert process.returncode in (-signal_number, 128 + signal_number)
    text = trace.read_text()
    if trace_format == "jsonl":
        events = read_jsonl_trace(text)
        assert [(event.function, event.errno) for event in events[:2]] == [("fd_read", 0), ("fd_write", 0)]
    else:
        lines = text.splitlines()
        assert len(lines) >= 2, f"the trace file has {len(lines)} line(s): {text!r}"
        assert lines[0].startswith("fd_read(fd=0, ") and "nread=6" in lines[0], text
        assert lines[1].startswith("fd_write(fd=1, ") and "nwritten=6" in lines[1], text
    assert os.stat(trace).st_mode & 0o777 == 0o600
