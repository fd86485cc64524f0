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
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import wasmtime
from fixture_build import WasmFixture

from shim.run import RunConfig, Stdio, run_module, run_module_async
from shim.trace import read_jsonl_trace
from wasi_host.streams import MemoryStream

TRAP = 134
GUEST_WAIT_S = 60  # how long the guests below would wait by themselves
WELL_BEFORE_S = 40  # "stopped long before its own wait would have ended"
HANG_GUARD_S = 120
TIMEOUT_MESSAGE = "keep: the guest was stopped: it ran longer than --timeout 1 s"

# One poll_oneoff call, then `_start` returns at once: no loop or call after it where an epoch
# check could stop the guest, so only the host call itself can end it.
_POLL_ONCE = '''
(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    {subscription}
    (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))))
'''
# A relative monotonic clock subscription of `ns` nanoseconds (tag 0 = clock at offset 8).
_SLEEP = '''(i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const {ns}))'''
# An fd_read subscription on fd 0 (tag 1 = fd_read), no clock: wait for stdin alone.
_STDIN_READABLE = '''(i32.store8 (i32.const 8) (i32.const 1))
    (i32.store (i32.const 16) (i32.const 0))'''


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """In-process runs compile through a cache of their own."""
    cache = tmp_path / "compile-cache"
    monkeypatch.setenv("KEEPSHIM_CACHE_DIR", str(cache))
    yield cache


def poll_module(tmp_path: Path, name: str, subscription: str) -> Path:
    path = tmp_path / f"{name}.wasm"
    path.write_bytes(bytes(wasmtime.wat2wasm(_POLL_ONCE.format(subscription=subscription))))
    return path


def sleeper(tmp_path: Path, seconds: float) -> Path:
    return poll_module(tmp_path, "sleeper", _SLEEP.format(ns=int(seconds * 1e9)))


def keep_with_open_stdin(arguments: list[str], environment: dict[str, str]) -> tuple[int, str, float]:
    """Run `keep` with a stdin pipe that stays open and silent; (exit status, stderr, seconds).
    The process is killed (and the test fails) if it outlives the hang guard."""
    silent, writer = os.pipe()  # `writer` stays open: the guest never sees an end of input
    try:
        started = time.monotonic()
        try:
            process = subprocess.Popen([sys.executable, "-m", "shim", *arguments], env=environment,
                                       stdin=silent, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE)
        finally:
            os.close(silent)
        try:
            _, stderr = process.communicate(timeout=HANG_GUARD_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            pytest.fail(f"keep {' '.join(arguments)} was still running after {HANG_GUARD_S} s")
        return process.returncode, stderr.decode(errors="replace"), time.monotonic() - started
    finally:
        os.close(writer)


def assert_stopped_by_timeout(status: int, stderr: str, elapsed: float) -> None:
    assert status == TRAP, stderr
    assert TIMEOUT_MESSAGE in stderr
    assert "wasm trap: interrupt" in stderr  # worded as the epoch's interrupt, backtrace kept
    assert "wasm backtrace" in stderr
    assert "Traceback" not in stderr
    assert elapsed < WELL_BEFORE_S, f"the guest was stopped only after {elapsed:.1f} s"


# --timeout while the guest waits in a host call ---------------------------------------------

def test_timeout_stops_a_guest_sleeping_in_poll_oneoff(tmp_path: Path,
                                                        keep_environment: dict[str, str]) -> None:
    module = sleeper(tmp_path, GUEST_WAIT_S)
    assert_stopped_by_timeout(*keep_with_open_stdin(["run", "--timeout", "1", str(module)],
                                                    keep_environment))


def test_timeout_stops_a_guest_polling_a_silent_stdin(tmp_path: Path,
                                                      keep_environment: dict[str, str]) -> None:
    module = poll_module(tmp_path, "poll_stdin", _STDIN_READABLE)
    assert_stopped_by_timeout(*keep_with_open_stdin(["run", "--timeout", "1", str(module)],
                                                    keep_environment))


def test_timeout_stops_a_guest_blocked_reading_a_silent_stdin(
        wasm_fixture: WasmFixture, keep_environment: dict[str, str]) -> None:
    status, stderr, elapsed = keep_with_open_stdin(
        ["run", "--timeout", "1", str(wasm_fixture("echo"))], keep_environment)
    assert_stopped_by_timeout(status, stderr, elapsed)
    assert "echoed" not in stderr  # stopped inside its read, not after an end of input


def test_timeout_stops_a_sleeping_guest_whose_keep_has_sockets(
        tmp_path: Path, keep_environment: dict[str, str]) -> None:
    """With keep.toml sockets, poll_oneoff waits through the shim's socket waiter, which wakes
    when the keep's network stops; the guest must then be stopped, not spin until its sleep
    ends."""
    config = tmp_path / "keep.toml"
    config.write_text('[[files]]\nkind = "stdin"\n\n[[files]]\nkind = "stdout"\n\n'
                      '[[files]]\nkind = "stderr"\n\n[[files]]\nkind = "listen"\nname = "l"\n'
                      'addr = "127.0.0.1"\nport = 0\nprot = "tcp"\n')
    assert_stopped_by_timeout(*keep_with_open_stdin(
        ["run", "--insecure-plaintext", "--config", str(config), "--timeout", "1",
         str(sleeper(tmp_path, GUEST_WAIT_S))], keep_environment))


def test_the_interrupted_host_call_is_in_the_trace(tmp_path: Path,
                                                   keep_environment: dict[str, str]) -> None:
    """The stopped call is reported as a trap (errno -1 in JSON Lines), as the guest saw it."""
    trace = tmp_path / "trace.jsonl"
    status, stderr, elapsed = keep_with_open_stdin(
        ["run", "--timeout", "1", f"--trace={trace}", "--trace-format", "jsonl",
         str(sleeper(tmp_path, GUEST_WAIT_S))], keep_environment)
    assert_stopped_by_timeout(status, stderr, elapsed)
    events = read_jsonl_trace(trace.read_text())
    assert [event.function for event in events] == ["poll_oneoff"]
    assert events[0].errno == -1


def test_a_short_sleep_within_the_timeout_ends_normally(tmp_path: Path) -> None:
    """The stop signal is armed but never fires: the sleep runs to its end, exit status 0."""
    config = RunConfig(module=str(sleeper(tmp_path, 0.05)), timeout=60,
                       stdio=Stdio(MemoryStream(), MemoryStream(), MemoryStream()))
    result = run_module(config)
    assert (result.exit_code, result.trap) == (0, None)


def test_cancelling_an_interruptible_run_stops_a_sleeping_guest(tmp_path: Path) -> None:
    """Cancellation reaches a guest asleep in poll_oneoff, which has no epoch check to meet."""
    config = RunConfig(module=str(sleeper(tmp_path, GUEST_WAIT_S)), interruptible=True,
                       stdio=Stdio(MemoryStream(), MemoryStream(), MemoryStream()))
    outcomes: list[str] = []

    async def cancel_while_asleep() -> None:
        with trio.move_on_after(0.5) as scope:
            await run_module_async(config)
        outcomes.append("cancelled" if scope.cancelled_caught else "finished")

    started = time.monotonic()
    thread = threading.Thread(target=trio.run, args=(cancel_while_asleep,), daemon=True)
    thread.start()
    thread.join(timeout=HANG_GUARD_S)
    assert not thread.is_alive(), "the cancelled guest kept sleeping"
    assert outcomes == ["cancelled"]
    assert time.monotonic() - started < WELL_BEFORE_S


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


# SIGINT / SIGTERM while the guest waits in a keep with sockets ---------------------------------

_READY_THEN_SLEEP = '''
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 300) "ready\\n")
  (func (export "_start")
    (i32.store (i32.const 200) (i32.const 300))
    (i32.store (i32.const 204) (i32.const 6))
    (drop (call $write (i32.const 1) (i32.const 200) (i32.const 1) (i32.const 208)))
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const 60000000000))
    (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))))
'''


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_a_sleeping_guest_whose_keep_has_sockets(
        tmp_path: Path, keep_environment: dict[str, str], signal_number: signal.Signals) -> None:
    """The signal stops the keep's network; the socket waiter must then stop the guest (it
    returned at once instead, so the guest's poll_oneoff spun at full CPU until the grace
    period killed the process by the signal's default action)."""
    config = tmp_path / "keep.toml"
    config.write_text('[[files]]\nkind = "stdin"\n\n[[files]]\nkind = "stdout"\n\n'
                      '[[files]]\nkind = "stderr"\n\n[[files]]\nkind = "listen"\nname = "l"\n'
                      'addr = "127.0.0.1"\nport = 0\nprot = "tcp"\n')
    module = tmp_path / "ready_then_sleep.wasm"
    module.write_bytes(bytes(wasmtime.wat2wasm(_READY_THEN_SLEEP)))
    process = subprocess.Popen(
        [sys.executable, "-m", "shim", "run", "--insecure-plaintext", "--config", str(config), str(module)],
        env=keep_environment, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"ready\n"  # the keep runs the guest: handlers are in place
        time.sleep(0.5)  # into its poll_oneoff
        process.send_signal(signal_number)
        process.wait(timeout=HANG_GUARD_S)
    finally:
        if process.poll() is None:
            process.kill()
        _, stderr = process.communicate()
    assert process.returncode == 128 + signal_number, stderr.decode(errors="replace")
    assert b"Traceback" not in stderr
