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
