"""Session 10's third review of the `keep run` front end: regression tests for what it found.

Each test runs the real `keep` (or `shim.run`) over real wasmtime with modules written in the
text format here (wasmtime.wat2wasm), so the shape under test (several memories, a table grown
in a loop) is explicit.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import wasmtime

_MEBIBYTE = 1 << 20


def _module(tmp_path: Path, name: str, wat: str) -> Path:
    path = tmp_path / f"{name}.wasm"
    path.write_bytes(wasmtime.wat2wasm(wat))
    return path


def _keep_run(environment: dict[str, str], *arguments: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shim", "run", *map(str, arguments)], env=environment,
                          capture_output=True, text=True, timeout=120, check=False)


def test_max_memory_bounds_a_table_grown_in_a_loop(tmp_path: Path, keep_environment: dict[str, str]) -> None:
    """--max-memory 1 MiB let a guest grow a funcref table without end: wasmtime's memory limit
    is for linear memories only, and the run reached 3 GB of host memory in 4 s (then the OOM
    killer). The table may now hold no more elements than --max-memory has bytes for; the
    guest's table.grow fails (-1) and it exits 5 (it stops at 64 MiB of table: exit 0 before)."""
    module = _module(tmp_path, "table_grow", """(module
      (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
      (memory (export "memory") 1)
      (table 1 funcref)
      (func (export "_start")
        (loop $grow  ;; up to 8 Mi elements (64 MiB of host memory), so the old code ends too
          (if (i32.eq (table.grow (ref.null func) (i32.const 65536)) (i32.const -1))
            (then (call $exit (i32.const 5))))
          (br_if $grow (i32.lt_u (table.size) (i32.const 8388608))))))""")
    ended = _keep_run(keep_environment, "--max-memory", _MEBIBYTE, module)
    assert ended.returncode == 5, ended.stderr
    # a table that starts beyond the limit: one line that says what the limit allows
    module = _module(tmp_path, "big_table", '(module (memory (export "memory") 1) (table 10000 funcref) '
                                             '(func (export "_start")))')
    ended = _keep_run(keep_environment, "--max-memory", 65536, module)
    assert ended.returncode == 1 and ended.stderr.count("\n") == 1, ended.stderr
    assert "--max-memory 65536 allows 8192 table elements" in ended.stderr, ended.stderr


def test_max_memory_bounds_a_module_with_several_memories(tmp_path: Path,
                                                           keep_environment: dict[str, str]) -> None:
    """wasmtime's limit is per linear memory: a module with 9 memories grew each to 16 MiB under
    --max-memory 17 MiB (144 MiB in all, exit status 2 * 256 pages = 512, 'invalid exit
    status'). Such a module is now refused with a one-line error naming --max-memory."""
    memories = "\n".join(f"(memory $m{index} 1)" for index in range(8))
    grows = "\n".join(f"(drop (memory.grow $m{index} (i32.const 255)))" for index in range(8))
    module = _module(tmp_path, "memories", f"""(module
      (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
      (memory (export "memory") 1)
      {memories}
      (func (export "_start")
        {grows}
        (call $exit (i32.add (memory.size $m0) (memory.size $m7)))))""")
    ended = _keep_run(keep_environment, "--max-memory", 17 * _MEBIBYTE, module)
    assert ended.returncode == 1, ended.stderr
    assert ended.stderr.count("\n") == 1 and "--max-memory" in ended.stderr, ended.stderr
    # without the limit, the same module runs (each memory ends at 256 pages)
    assert _keep_run(keep_environment, module).returncode == 1  # 512: not a valid exit status


_CANCEL_DURING_COMPILE = """
import sys
from pathlib import Path

import trio

import shim.run as run

module, cache = Path(sys.argv[1]), Path(sys.argv[2])
compile_module = run._compile


async def main() -> None:
    with trio.CancelScope() as scope:
        def compile_then_cancel(*arguments):
            trio.from_thread.run_sync(scope.cancel)  # the stop arrives while the module compiles
            return compile_module(*arguments)

        run._compile = compile_then_cancel
        await run.run_module_async(run.RunConfig(module=module, interruptible=True, cache_dir=cache))
    print("cancelled" if scope.cancelled_caught else "finished")


trio.run(main)
"""


def test_a_stop_while_the_module_compiles_ends_the_run(tmp_path: Path, keep_environment: dict[str, str]) -> None:
    """`keep run --audit-host M` (or with --volume) given SIGTERM while its module compiled
    never ended: the cancelled run left its nursery before the guest thread started, so the
    `finished` event that ends the shielded epoch-ticking task was never set, and the process
    ticked the epoch every 10 ms for good (seen: still running 10 minutes after SIGTERM, a big
    module). In-process here, the cancellation made from inside the compile so that it always
    lands there: the run now ends as cancelled."""
    module = _module(tmp_path, "empty_start", '(module (memory (export "memory") 1) (func (export "_start")))')
    try:
        ended = subprocess.run([sys.executable, "-c", _CANCEL_DURING_COMPILE, str(module), str(tmp_path / "cache")],
                               env=keep_environment, capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        raise AssertionError("the run cancelled while its module compiled did not end") from None
    assert (ended.returncode, ended.stdout) == (0, "cancelled\n"), ended.stderr
