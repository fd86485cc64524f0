"""`keep run` at the edges of its input, as found in the session-6 review: each test is one
confirmed defect (its docstring says what went wrong before the fix).

CLI behaviour runs `keep` as a subprocess, as a user would; helpers come from test_run.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

from fixture_build import FixtureBuilder
from test_run import assert_one_line_error, fixtures, keep, private_cache, wat_file

__all__ = ["fixtures", "private_cache"]  # test_run's fixtures, used here too


def keep_with_cache(cache_dir: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shim", *arguments], capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, "KEEPSHIM_CACHE_DIR": str(cache_dir)})


def test_a_cache_directory_that_cannot_be_made_is_a_one_line_error(
        fixtures: FixtureBuilder, tmp_path: Path) -> None:
    """Before: `keep: internal error: FileExistsError: ...` and exit 70 when KEEPSHIM_CACHE_DIR
    was a file (NotADirectoryError below one). Now a one-line error naming the directory and
    the way out (--no-cache); --no-cache itself runs."""
    hello = str(fixtures.build("hello"))
    a_file = tmp_path / "not-a-directory"
    a_file.write_text("")
    for cache_dir in (a_file, a_file / "below"):
        completed = keep_with_cache(cache_dir, "run", hello)
        assert_one_line_error(completed, f"compile cache {cache_dir}", "--no-cache")
        assert completed.returncode == 1
        assert completed.stdout == ""
        uncached = keep_with_cache(cache_dir, "run", "--no-cache", hello)
        assert (uncached.returncode, uncached.stdout) == (0, "Hello, world!\n"), uncached.stderr


def test_fuel_and_memory_limits_beyond_64_bits_are_refused_not_wrapped(fixtures: FixtureBuilder) -> None:
    """Before: the values went to wasmtime through 64-bit C integers and wrapped silently:
    `--fuel 18446744073709551621` (2**64 + 5) ran with 5 units and trapped at once,
    `--max-memory 18446744073709682688` (2**64 + 128 KiB) refused a 257-page module."""
    hello = str(fixtures.build("hello"))
    for option, value in (("--fuel", 2**64 + 5), ("--max-memory", 2**64 + (128 << 10))):
        completed = keep("run", option, str(value), hello)
        assert_one_line_error(completed, option)
        assert completed.returncode == 2
        assert completed.stdout == ""
    largest = keep("run", "--fuel", str(2**64 - 1), "--max-memory", str(2**63 - 1), hello)
    assert (largest.returncode, largest.stdout) == (0, "Hello, world!\n"), largest.stderr


def test_invoke_integer_arguments_out_of_range_are_refused_not_wrapped(tmp_path: Path) -> None:
    """Before: `--invoke add 99999999999 1` called add(1215752192, 1) (the value wrapped to 32
    bits) and printed a wrong sum with exit 0. The unsigned spellings of a width (0xffffffff
    for an i32) still mean their two's complement value, as in wasmtime."""
    module = wat_file(tmp_path, "identity", IDENTITY)
    for export, text in (("i32", "99999999999"), ("i32", "-2147483649"), ("i32", "0x100000000"),
                         ("i64", str(2**64)), ("i64", str(-2**63 - 1))):
        completed = keep("run", "--invoke", export, str(module), text)
        assert_one_line_error(completed, text, export)
        assert completed.stdout == ""
    for export, text, printed in (("i32", "0xffffffff", "-1"), ("i32", "-2147483648", "-2147483648"),
                                  ("i64", str(2**64 - 1), "-1"), ("i64", str(2**63 - 1), str(2**63 - 1))):
        completed = keep("run", "--invoke", export, str(module), text)
        assert (completed.returncode, completed.stdout) == (0, f"{printed}\n"), completed.stderr


IDENTITY = """(module
  (func (export "i32") (param i32) (result i32) (local.get 0))
  (func (export "i64") (param i64) (result i64) (local.get 0)))"""


def test_invoke_results_that_cannot_be_written_are_one_line(tmp_path: Path) -> None:
    """Before: `keep: internal error: OSError: [Errno 28] No space left on device` (stdout on
    /dev/full) or `internal error: BrokenPipeError` (the reader gone), exit 70."""
    module = str(wat_file(tmp_path, "identity", IDENTITY))
    with open("/dev/full", "wb") as full:
        completed = subprocess.run([sys.executable, "-m", "shim", "run", "--invoke", "i32", module, "7"],
                                   stdout=full, stderr=subprocess.PIPE, text=True, timeout=120, check=False)
    assert_one_line_error(completed, "cannot write", "No space left on device")
    assert completed.returncode == 1
    reader, writer = os.pipe()
    os.close(reader)  # nobody will read the results
    try:
        completed = subprocess.run([sys.executable, "-m", "shim", "run", "--invoke", "i32", module, "7"],
                                   stdout=writer, stderr=subprocess.PIPE, text=True, timeout=120,
                                   check=False)
    finally:
        os.close(writer)
    assert_one_line_error(completed, "cannot write", "Broken pipe")
    assert completed.returncode == 1


def test_a_huge_or_endless_non_wasm_file_is_refused_from_its_header(tmp_path: Path) -> None:
    """Before: the whole file was read before its header was looked at: a 3 GB sparse file took
    3.2 GB of memory to be called 'not a WebAssembly module', and /dev/zero ended in
    `keep: internal error: MemoryError` (exit 70) under a 2 GB address-space limit."""
    sparse = tmp_path / "huge.wasm"
    with open(sparse, "wb") as stream:
        stream.truncate(3 << 30)
    for module in ("/dev/zero", str(sparse)):
        completed = subprocess.run(
            [sys.executable, "-m", "shim", "run", "--no-cache", module], capture_output=True, text=True,
            timeout=120, check=False, preexec_fn=lambda: resource.setrlimit(
                resource.RLIMIT_AS, (2 << 30, 2 << 30)))
        assert_one_line_error(completed, module, "not a WebAssembly module")
        assert completed.returncode == 1


def test_the_exit_status_survives_a_stderr_that_cannot_be_written(
        fixtures: FixtureBuilder, tmp_path: Path) -> None:
    """Before: with keep's stderr on a full disk, a trap exited 1 (not 134) and a bad --dir 1
    (not 2): printing the one-line report failed, and that failure replaced the status."""
    exit_code = str(fixtures.build("exit_code"))
    cases = ((["run", exit_code, "trap"], 134), (["run", exit_code, "exit", "7"], 7),
             (["run", "--dir", str(tmp_path / "missing"), exit_code], 2),
             (["run", str(tmp_path / "missing.wasm")], 1))
    for arguments, status in cases:
        with open("/dev/full", "wb") as full:
            completed = subprocess.run([sys.executable, "-m", "shim", *arguments], stdout=subprocess.DEVNULL,
                                       stderr=full, timeout=120, check=False)
        assert completed.returncode == status, arguments


def test_proc_exit_in_a_start_function_is_the_exit_status(tmp_path: Path) -> None:
    """Before: a module whose start function called proc_exit(9) was reported as `cannot
    instantiate M: error while executing at wasm backtrace:` (half a message), exit 1; wasmtime
    exits 9, as for proc_exit anywhere else."""
    module = wat_file(tmp_path, "exit_in_start", """(module
      (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
      (func $start (call $exit (i32.const 9)))
      (start $start)
      (func (export "_start") unreachable))""")
    completed = keep("run", str(module))
    assert (completed.returncode, completed.stderr) == (9, "")


def test_a_timeout_in_a_start_function_waiting_in_a_host_call_is_a_timeout(tmp_path: Path) -> None:
    """Before: a start function sleeping in poll_oneoff, stopped by --timeout, was reported as
    `cannot instantiate M: ...`, exit 1, instead of the timeout's trap (134, limit named)."""
    module = wat_file(tmp_path, "sleep_in_start", """(module
      (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func $start
        (i32.store (i32.const 16) (i32.const 1))
        (i64.store (i32.const 24) (i64.const 60000000000))
        (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128))))
      (start $start)
      (func (export "_start")))""")
    completed = keep("run", "--timeout", "1", str(module))
    assert completed.returncode == 134, completed.stderr
    assert completed.stderr.splitlines() == [
        f"keep: {module}: wasm trap: interrupt (while waiting in a host call of the start function)",
        "keep: the guest was stopped: it ran longer than --timeout 1 s"]


def test_invoke_with_stdout_closed_at_start_still_runs(tmp_path: Path) -> None:
    """With fd 1 closed at start-up, Python sets sys.stdout to None; keep puts /dev/null on fd 1
    (so no file keep opens takes it) and must give Python a stdout on it too: `--invoke ... >&-`
    ended in 'internal error: AttributeError: NoneType ... flush', exit 70."""
    module = str(wat_file(tmp_path, "identity", IDENTITY))
    completed = subprocess.run([sys.executable, "-m", "shim", "run", "--invoke", "i32", module, "7"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120,
                               check=False, preexec_fn=lambda: os.close(1))
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""


def test_an_audit_report_that_cannot_be_written_keeps_the_exit_status(tmp_path: Path) -> None:
    """`--audit-host` printed its report with print(): with stderr on /dev/full the run of a
    guest that exits 0 ended in an internal error, exit 70. Its lines go through shim.errors.say
    now, which loses a line it cannot write, not the status."""
    module = str(wat_file(tmp_path, "identity", IDENTITY))
    with open("/dev/full", "wb") as full:
        completed = subprocess.run([sys.executable, "-m", "shim", "run", "--audit-host", "SECRETMARK",
                                    "--invoke", "i32", module, "7"],
                                   stdout=subprocess.PIPE, stderr=full, text=True, timeout=120, check=False)
    assert completed.returncode == 0
    assert completed.stdout == "7\n"
