"""`keep run` and the guest lifecycle (shim.run): exit statuses, traps, limits, bad input.

CLI-facing behaviour (one-line errors, exit statuses, nothing like a traceback on stderr) runs
`keep` as a subprocess; the rest calls `shim.run.run_module` in-process with in-memory stdio.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import wasmtime
from fixture_build import FixtureBuilder

from shim.run import DirectoryMapping, RunConfig, RunResult, Stdio, run_module, run_module_async
from wasi_host._backend import Buffer
from wasi_host.streams import MemoryStream

TRAP = 134
WASI = "wasi_snapshot_preview1"


@dataclass
class Captured:
    result: RunResult
    stdout: bytes
    stderr: bytes


@pytest.fixture(scope="session")
def fixtures() -> FixtureBuilder:
    return FixtureBuilder()


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    cache = tmp_path / "compile-cache"
    monkeypatch.setenv("KEEPSHIM_CACHE_DIR", str(cache))
    yield cache


def run(module: Path | str, *args: str, **options: object) -> Captured:
    stdout, stderr = MemoryStream(), MemoryStream()
    config = RunConfig(module=str(module), args=args,
                       stdio=Stdio(MemoryStream(), stdout, stderr), **options)  # type: ignore[arg-type]
    result = run_module(config)
    return Captured(result, bytes(stdout.output), bytes(stderr.output))


def keep(*arguments: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shim", *arguments], capture_output=True,
                          text=True, timeout=120, cwd=cwd, check=False,
                          env={**os.environ})


def assert_one_line_error(completed: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert completed.returncode != 0
    assert "Traceback" not in completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("keep: ")
    for needle in needles:
        assert needle in lines[0]


def wat_file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.wasm"
    path.write_bytes(bytes(wasmtime.wat2wasm(text)))
    return path


# exit statuses ------------------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "code"), [("exit", 3), ("exit", 0), ("return", 5), ("return", 0)])
def test_exit_status_is_the_guests(fixtures: FixtureBuilder, mode: str, code: int) -> None:
    captured = run(fixtures.build("exit_code"), mode, str(code))
    assert captured.result.exit_code == code
    assert captured.stdout == f"mode={mode} code={code}\n".encode()
    assert captured.stderr == f"stderr before {mode}\n".encode()
    assert captured.result.trap is None


def test_start_returning_is_exit_status_zero(tmp_path: Path) -> None:
    module = wat_file(tmp_path, "returns", '(module (memory (export "memory") 1) (func (export "_start")))')
    assert run(module).result.exit_code == 0


def test_the_heap_is_frozen_only_while_the_guest_runs(fixtures: FixtureBuilder) -> None:
    """The pre-existing heap is hidden from the collector during the run (seen from a host call)
    and handed back after it, whether the guest exits or traps (else every run would leave
    objects uncollectable)."""
    import gc

    class FreezeProbe(MemoryStream):
        def __init__(self) -> None:
            super().__init__()
            self.frozen_during_writes: list[int] = []

        def write(self, data: Buffer) -> int:
            self.frozen_during_writes.append(gc.get_freeze_count())
            return super().write(data)

    assert gc.get_freeze_count() == 0
    for mode in ("exit", "trap"):
        probe = FreezeProbe()
        config = RunConfig(module=str(fixtures.build("exit_code")), args=(mode, "0"),
                           stdio=Stdio(MemoryStream(), probe, MemoryStream()))
        result = run_module(config)
        assert (result.trap is not None) == (mode == "trap")
        assert probe.frozen_during_writes and all(count > 0 for count in probe.frozen_during_writes)
        assert gc.get_freeze_count() == 0


def test_cli_exit_status_and_output(fixtures: FixtureBuilder) -> None:
    completed = keep("run", str(fixtures.build("exit_code")), "exit", "42")
    assert completed.returncode == 42
    assert completed.stdout == "mode=exit code=42\n"


def test_trap_exits_134_with_message_and_backtrace(fixtures: FixtureBuilder) -> None:
    completed = keep("run", str(fixtures.build("exit_code")), "trap")
    assert completed.returncode == TRAP
    assert completed.stdout == "mode=trap code=0\n"
    assert "unreachable" in completed.stderr
    assert "wasm backtrace" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_args_and_env_reach_the_guest(fixtures: FixtureBuilder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEP_TEST_INHERITED", "from the host")
    module = str(fixtures.build("args_env"))
    completed = keep("run", "--env", "ANSWER=42", "--env", "KEEP_TEST_INHERITED",
                     "--env", "KEEP_TEST_UNSET_ANYWHERE", module, "one", "--two")
    assert completed.returncode == 0, completed.stderr
    assert f"argv[0]=[{module}]" in completed.stdout
    assert "argv[1]=[one]" in completed.stdout and "argv[2]=[--two]" in completed.stdout
    assert "ANSWER=42" in completed.stdout
    assert "KEEP_TEST_INHERITED=from the host" in completed.stdout
    assert "KEEP_TEST_UNSET_ANYWHERE" not in completed.stdout
    assert "PATH=" not in completed.stdout  # nothing of the host's environment leaks in


def test_dir_maps_a_host_directory_at_a_guest_path(tmp_path: Path) -> None:
    (tmp_path / "inside.txt").write_bytes(b"x")
    # path_open("inside.txt") relative to fd 3 (the first pre-open), then exit with the errno
    module = wat_file(tmp_path, "opener", f"""(module
      (import "{WASI}" "path_open" (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
      (import "{WASI}" "proc_exit" (func $exit (param i32)))
      (memory (export "memory") 1) (data (i32.const 16) "inside.txt")
      (func (export "_start")
        (call $exit (call $open (i32.const 3) (i32.const 0) (i32.const 16) (i32.const 10)
                                (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 64)))))""")
    assert run(module, dirs=(DirectoryMapping(str(tmp_path), "/data"),)).result.exit_code == 0
    (tmp_path / "inside.txt").unlink()
    assert run(module, dirs=(DirectoryMapping(str(tmp_path), "/data"),)).result.exit_code == 44  # ENOENT


# imports --------------------------------------------------------------------------------------

UNKNOWN_IMPORT = f"""(module
  (import "env" "mystery" (func $mystery))
  (import "{WASI}" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (if (i32.eqz (i32.const %s)) (then (call $mystery))) (call $exit (i32.const 9))))"""


def test_unknown_import_is_a_one_line_link_error(tmp_path: Path) -> None:
    module = wat_file(tmp_path, "unknown", UNKNOWN_IMPORT % "1")
    assert_one_line_error(keep("run", str(module)), "env::mystery")


def test_trap_unknown_imports_links_and_traps_only_when_called(tmp_path: Path) -> None:
    uncalled = wat_file(tmp_path, "uncalled", UNKNOWN_IMPORT % "1")
    called = wat_file(tmp_path, "called", UNKNOWN_IMPORT % "0")
    assert run(uncalled, trap_unknown_imports=True).result.exit_code == 9
    completed = keep("run", "--trap-unknown-imports", str(called))
    assert completed.returncode == TRAP
    assert "mystery" in completed.stderr or "unknown import" in completed.stderr


# --invoke ---------------------------------------------------------------------------------------

REACTOR = """(module
  (memory (export "memory") 1)
  (global $base (mut i32) (i32.const 0))
  (func (export "_initialize") (global.set $base (i32.const 1000)))
  (func (export "add") (param i32 i64) (result i32) (i32.add (global.get $base) (i32.add (local.get 0) (i32.wrap_i64 (local.get 1)))))
  (func (export "pair") (result i32 f64) (i32.const -7) (f64.const 2.5)))"""


def test_invoke_calls_initialize_first_and_prints_results(tmp_path: Path) -> None:
    module = wat_file(tmp_path, "reactor", REACTOR)
    completed = keep("run", "--invoke", "add", str(module), "20", "3")
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == "1023\n"
    assert run(module, invoke="pair").result.results == (-7, 2.5)


def test_invoke_of_a_missing_export_or_bad_argument_is_a_one_line_error(tmp_path: Path) -> None:
    module = wat_file(tmp_path, "reactor", REACTOR)
    assert_one_line_error(keep("run", "--invoke", "nothing", str(module)), "nothing")
    assert_one_line_error(keep("run", "--invoke", "add", str(module), "x", "1"), "add")
    assert_one_line_error(keep("run", "--invoke", "add", str(module), "1"), "add")


# limits -----------------------------------------------------------------------------------------

def test_timeout_stops_an_endless_loop(fixtures: FixtureBuilder) -> None:
    captured = run(fixtures.build("endless_loop"), timeout=0.5)
    assert captured.result.exit_code == TRAP
    assert captured.stdout == b"looping\n"
    assert captured.result.trap_code == wasmtime.TrapCode.INTERRUPT


def test_a_timeout_says_which_limit_stopped_the_guest(fixtures: FixtureBuilder) -> None:
    completed = keep("run", "--timeout", "0.5", str(fixtures.build("endless_loop")))
    assert completed.returncode == TRAP
    assert "keep: the guest was stopped: it ran longer than --timeout 0.5 s" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_fuel_stops_an_endless_loop(fixtures: FixtureBuilder) -> None:
    completed = keep("run", "--fuel", "2000000", str(fixtures.build("endless_loop")))
    assert completed.returncode == TRAP
    assert "keep: the guest was stopped: it used up its --fuel 2000000" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_a_guest_trap_is_not_blamed_on_a_limit(fixtures: FixtureBuilder) -> None:
    completed = keep("run", "--timeout", "60", str(fixtures.build("exit_code")), "trap")
    assert completed.returncode == TRAP
    assert "unreachable" in completed.stderr
    assert "the guest was stopped" not in completed.stderr


def test_enough_fuel_lets_a_program_finish(fixtures: FixtureBuilder) -> None:
    captured = run(fixtures.build("exit_code"), "return", "4", fuel=10_000_000)
    assert captured.result.exit_code == 4


def test_max_memory_makes_growth_fail(fixtures: FixtureBuilder) -> None:
    captured = run(fixtures.build("memory_hog"), "1", "1", "32", max_memory=32 << 20)
    assert captured.result.exit_code == 0, captured.stderr
    assert captured.stdout == (b"malloc failed: yes\nallocated >= 1 MiB: yes\n"
                               b"allocated <= 32 MiB: yes\n")


def test_max_memory_below_the_initial_memory_is_a_clear_error(tmp_path: Path) -> None:
    module = wat_file(tmp_path, "big", '(module (memory (export "memory") 20) (func (export "_start")))')
    assert_one_line_error(keep("run", "--max-memory", "65536", str(module)), str(module))


# bad input ----------------------------------------------------------------------------------------

def test_missing_module_file(tmp_path: Path) -> None:
    assert_one_line_error(keep("run", str(tmp_path / "absent.wasm")), "absent.wasm")


def test_non_wasm_file(tmp_path: Path) -> None:
    path = tmp_path / "text.wasm"
    path.write_text("#!/bin/sh\necho not wasm\n")
    assert_one_line_error(keep("run", str(path)), "not a WebAssembly module")


HELLO_WAT = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello from wat\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 15))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $exit (i32.const 3))))
"""


def test_a_module_in_the_text_format_runs_and_its_errors_say_where(tmp_path: Path) -> None:
    """A file named *.wat is WebAssembly text, as wasmtime runs it: translated by wasmtime's
    parser, then run through our WASI host like any module. Its errors are one line with the
    place; a .wat that is not UTF-8 or is over 64 MiB is refused before parsing."""
    hello = tmp_path / "hello.wat"
    hello.write_text(HELLO_WAT)
    completed = keep("run", str(hello))
    assert (completed.returncode, completed.stdout, completed.stderr) == (3, "hello from wat\n", "")
    bad = tmp_path / "bad.wat"
    bad.write_text('(module\n  (func (export "_start") (nonsense)))\n')
    assert_one_line_error(keep("run", str(bad)), "bad.wat: invalid WebAssembly text", "line 2, column 28")
    binary = tmp_path / "binary.wat"
    binary.write_bytes(b"(module)\xff")
    assert_one_line_error(keep("run", str(binary)), "binary.wat: WebAssembly text is not UTF-8 (byte 8)")
    huge = tmp_path / "huge.wat"
    with open(huge, "wb") as stream:
        stream.truncate((64 << 20) + 1)
    assert_one_line_error(keep("run", str(huge)), "huge.wat: WebAssembly text larger than 64 MiB")


def test_truncated_module(fixtures: FixtureBuilder, tmp_path: Path) -> None:
    path = tmp_path / "truncated.wasm"
    path.write_bytes(fixtures.build("hello").read_bytes()[:300])
    assert_one_line_error(keep("run", str(path)), "not a valid module")


def test_module_without_start(tmp_path: Path) -> None:
    module = wat_file(tmp_path, "library", '(module (memory (export "memory") 1) (func (export "f")))')
    assert_one_line_error(keep("run", str(module)), "_start")


def test_module_without_memory_gets_efault_not_a_crash(tmp_path: Path) -> None:
    module = wat_file(tmp_path, "memoryless", f"""(module
      (import "{WASI}" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
      (import "{WASI}" "proc_exit" (func $exit (param i32)))
      (func (export "_start")
        (call $exit (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 0)))))""")
    completed = keep("run", str(module))
    assert completed.returncode == 21  # EFAULT
    assert completed.stderr == ""


@pytest.mark.parametrize("problem", ["missing", "file"])
def test_bad_dir(fixtures: FixtureBuilder, tmp_path: Path, problem: str) -> None:
    target = tmp_path / "nowhere"
    if problem == "file":
        target.write_text("not a directory")
    assert_one_line_error(keep("run", "--dir", str(target), str(fixtures.build("hello"))), "--dir")


@pytest.mark.parametrize("arguments", [
    ["run", "--bogus", "x.wasm"],
    ["run", "--timeout", "soon", "x.wasm"],
    ["run", "--timeout", "-1", "x.wasm"],
    ["run", "--fuel", "-5", "x.wasm"],
    ["run"],
])
def test_bad_options_are_one_line_usage_errors(arguments: list[str]) -> None:
    completed = keep(*arguments)
    assert_one_line_error(completed)
    assert completed.returncode == 2


# compile cache ------------------------------------------------------------------------------

def test_second_run_hits_the_compile_cache(fixtures: FixtureBuilder, private_cache: Path) -> None:
    module = fixtures.build("hello")
    first, second = run(module), run(module)
    assert (first.result.cache_hit, second.result.cache_hit) == (False, True)
    assert second.stdout == b"Hello, world!\n"
    assert any((private_cache / "modules").iterdir())


def test_no_cache_leaves_no_entries(fixtures: FixtureBuilder, private_cache: Path) -> None:
    completed = keep("run", "--no-cache", str(fixtures.build("hello")))
    assert completed.returncode == 0 and completed.stdout == "Hello, world!\n"
    assert not private_cache.exists()


# threads ------------------------------------------------------------------------------------------

def test_two_guests_in_two_threads_each_get_their_own_result(fixtures: FixtureBuilder) -> None:
    module = fixtures.build("exit_code")
    run(module, "exit", "0")  # warm the cache so both threads start from it
    failures: list[str] = []

    def worker(mode: str, code: int) -> None:
        for _ in range(50):
            captured = run(module, mode, str(code))
            expected = f"mode={mode} code={code}\n".encode()
            if captured.result.exit_code != code or captured.stdout != expected:
                failures.append(f"{mode} {code}: got {captured.result.exit_code} {captured.stdout!r}")

    threads = [threading.Thread(target=worker, args=args) for args in (("exit", 17), ("return", 0))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


# cancellation -------------------------------------------------------------------------------------

def test_cancelling_an_interruptible_run_stops_the_guest(fixtures: FixtureBuilder) -> None:
    """The guest thread cannot be abandoned, so cancellation must reach it through the epoch."""
    module = fixtures.build("endless_loop")
    stdout = MemoryStream()
    config = RunConfig(module=str(module), interruptible=True,
                       stdio=Stdio(MemoryStream(), stdout, MemoryStream()))
    outcomes: list[str] = []

    async def cancel_once_looping() -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_module_async, config)
                while stdout.output != b"looping\n":
                    await trio.sleep(0.01)
                scope.cancel()
        outcomes.append("cancelled" if scope.cancelled_caught else "finished")

    # a hang guard, not a timing assertion: without interruption the loop never ends
    thread = threading.Thread(target=trio.run, args=(cancel_once_looping,), daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the cancelled guest kept running"
    assert outcomes == ["cancelled"]


def test_ctrl_c_ends_keep_run_at_once(fixtures: FixtureBuilder) -> None:
    process = subprocess.Popen([sys.executable, "-m", "shim", "run", str(fixtures.build("endless_loop"))],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"looping\n"
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)  # a hang guard
    finally:
        process.kill()
        process.wait()
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()
        process.stderr.close()
    assert process.returncode == -signal.SIGINT


@pytest.mark.parametrize("code", [126, 255])
def test_exit_status_from_126_on_is_an_error_as_in_wasmtime(fixtures: FixtureBuilder, code: int) -> None:
    completed = keep("run", str(fixtures.build("exit_code")), "exit", str(code))
    assert completed.returncode == 1
    assert "invalid exit status" in completed.stderr
    assert completed.stderr.startswith("stderr before exit\n")


class BrokenStream(MemoryStream):
    """A stream whose write fails with a host bug (not an OSError, so not an errno)."""

    def write(self, data: bytes | bytearray | memoryview) -> int:
        raise RuntimeError("the host stream is broken")


def test_host_bug_surfaces_as_the_hosts_exception_not_a_guest_status(fixtures: FixtureBuilder) -> None:
    config = RunConfig(module=str(fixtures.build("hello")),
                       stdio=Stdio(MemoryStream(), BrokenStream(), MemoryStream()))
    with pytest.raises(RuntimeError, match="the host stream is broken"):
        run_module(config)


def test_start_with_a_signature_is_a_one_line_error(tmp_path: Path) -> None:
    module = wat_file(tmp_path, "odd", '(module (func (export "_start") (param i32)))')
    assert_one_line_error(keep("run", str(module)), "_start")


@pytest.mark.parametrize(("option", "spec", "expected"), [
    ("--dir", "::/data", "expected HOST or HOST::GUEST_PATH"),
    ("--dir", "here::", "expected HOST or HOST::GUEST_PATH"),
    ("--volume", "::/data", "expected IMG or IMG::GUEST_PATH"),
    ("--volume", "notes.img::", "expected IMG or IMG::GUEST_PATH"),
])
def test_malformed_preopen_spec(fixtures: FixtureBuilder, option: str, spec: str, expected: str) -> None:
    """A SOURCE::GUEST spelling with an empty side is refused before anything is opened."""
    completed = keep("run", option, spec, str(fixtures.build("hello")))
    assert completed.returncode == 2
    assert_one_line_error(completed, option, repr(spec), expected)
