"""The unchecked binding (wasi_host._bind) with stand-in host functions in small WAT modules.

These tests do not depend on which preview1 functions exist: they define their own table, so
they pin down the binding's contract (argument decoding, errno write-back, per-guest exit codes
and host errors, traps, link errors, memory views after growth) on its own.
"""

from __future__ import annotations

import contextlib
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import wasmtime

from wasi_host._bind import (
    GuestTrap,
    HostBinding,
    LinkError,
    bind_host_functions,
    call_export,
    check_imports,
    instantiate,
)
from wasi_host._errors import ProcExit, WasiError

MODULE = "wasi_snapshot_preview1"


@dataclass(frozen=True)
class FakeFunction:
    name: str
    params: tuple[str, ...]
    results: tuple[str, ...]
    impl: Callable[..., int]


@dataclass
class FakeGuest:
    exit_code: int | None = None
    host_error: BaseException | None = None
    written: list[bytes] = field(default_factory=list)


def fake_write(guest: FakeGuest, memory: memoryview | None, fd: int, pointer: int, length: int,
               result_pointer: int) -> int:
    """Copy guest bytes out and store the count: a one-buffer fd_write."""
    if memory is None or pointer + length > len(memory):
        raise WasiError(21)  # EFAULT
    guest.written.append(bytes(memory[pointer:pointer + length]))
    struct.pack_into("<I", memory, result_pointer, length)
    return 0


def fake_exit(guest: FakeGuest, memory: memoryview | None, code: int) -> int:
    raise ProcExit(code)


def fake_wide(guest: FakeGuest, memory: memoryview | None, small: int, wide: int, result: int) -> int:
    """Echo an i32 and an i64 back into memory, to check unsigned decoding of both widths."""
    assert memory is not None
    struct.pack_into("<IQ", memory, result, small, wide)
    return 0


def fake_bug(guest: FakeGuest, memory: memoryview | None) -> int:
    raise RuntimeError("host bug")


def fake_oserror(guest: FakeGuest, memory: memoryview | None) -> int:
    raise FileNotFoundError(2, "gone")


FUNCTIONS = {f.name: f for f in [
    FakeFunction("write", ("i32", "i32", "i32", "i32"), ("i32",), fake_write),
    FakeFunction("exit", ("i32",), (), fake_exit),
    FakeFunction("wide", ("i32", "i64", "i32"), ("i32",), fake_wide),
    FakeFunction("bug", (), ("i32",), fake_bug),
    FakeFunction("oserror", (), ("i32",), fake_oserror),
]}

IMPORTS = f"""
 (import "{MODULE}" "write" (func $write (param i32 i32 i32 i32) (result i32)))
 (import "{MODULE}" "exit" (func $exit (param i32)))
 (import "{MODULE}" "wide" (func $wide (param i32 i64 i32) (result i32)))
 (import "{MODULE}" "bug" (func $bug (result i32)))
 (import "{MODULE}" "oserror" (func $oserror (result i32)))
"""


def wat_module(engine: wasmtime.Engine, body: str, *, imports: str = IMPORTS) -> wasmtime.Module:
    return wasmtime.Module(engine, bytes(wasmtime.wat2wasm(f"(module {imports} {body})")))


@dataclass
class Loaded:
    store: wasmtime.Store
    instance: wasmtime.Instance
    binding: HostBinding
    guest: FakeGuest

    def call(self, name: str, *arguments: int) -> list[int | float]:
        func = self.instance.exports(self.store)[name]
        assert isinstance(func, wasmtime.Func)
        return call_export(self.store, func, arguments)


def load(body: str, *, imports: str = IMPORTS, trap_unknown: bool = False) -> Loaded:
    engine = wasmtime.Engine()
    module = wat_module(engine, body, imports=imports)
    linker = wasmtime.Linker(engine)
    guest = FakeGuest()
    binding = bind_host_functions(linker, MODULE, FUNCTIONS, guest)
    check_imports(module, binding, trap_unknown=trap_unknown, linker=linker)
    store = wasmtime.Store(engine)
    return Loaded(store, instantiate(linker, store, module), binding, guest)


MEMORY = '(memory (export "memory") 1) (data (i32.const 100) "hello, binding!!")'


def test_arguments_reach_the_host_and_errno_comes_back() -> None:
    loaded = load(MEMORY + """
      (func (export "run") (result i32)
        (call $write (i32.const 1) (i32.const 100) (i32.const 16) (i32.const 200)))
      (func (export "count") (result i32) (i32.load (i32.const 200)))""")
    assert loaded.call("run") == [0]
    assert loaded.guest.written == [b"hello, binding!!"]
    assert loaded.call("count") == [16]


def test_wasi_error_becomes_the_returned_errno() -> None:
    loaded = load(MEMORY + """
      (func (export "run") (result i32)
        (call $write (i32.const 1) (i32.const 65530) (i32.const 16) (i32.const 200)))""")
    assert loaded.call("run") == [21]
    assert loaded.guest.host_error is None


def test_oserror_is_mapped_through_the_errno_table() -> None:
    loaded = load(MEMORY + '(func (export "run") (result i32) (call $oserror))')
    assert loaded.call("run") == [44]  # ENOENT


def test_arguments_are_unsigned_in_both_widths() -> None:
    loaded = load(MEMORY + """
      (func (export "run") (result i32)
        (call $wide (i32.const -1) (i64.const -2) (i32.const 0)))
      (func (export "small") (result i32) (i32.load (i32.const 0)))
      (func (export "wide") (result i64) (i64.load (i32.const 4)))""")
    assert loaded.call("run") == [0]
    memory = loaded.instance.exports(loaded.store)["memory"]
    assert isinstance(memory, wasmtime.Memory)
    raw = bytes(memory.read(loaded.store, 0, 12))
    assert struct.unpack("<IQ", raw) == (2**32 - 1, 2**64 - 2)


def test_proc_exit_is_recorded_on_the_guest_and_unwinds() -> None:
    loaded = load(MEMORY + """
      (func (export "_start") (call $exit (i32.const 7)) (unreachable))""")
    with pytest.raises(GuestTrap):
        loaded.call("_start")
    assert loaded.guest.exit_code == 7
    assert loaded.guest.host_error is None


def test_host_bug_traps_with_the_function_name_and_is_kept_on_the_guest() -> None:
    loaded = load(MEMORY + '(func (export "run") (result i32) (call $bug))')
    with pytest.raises(GuestTrap, match="host function bug failed"):
        loaded.call("run")
    assert isinstance(loaded.guest.host_error, RuntimeError)
    assert loaded.guest.exit_code is None


def test_memory_view_follows_memory_growth() -> None:
    loaded = load(MEMORY + """
      (func (export "grow_and_write") (result i32)
        (drop (memory.grow (i32.const 3)))
        (i32.store (i32.const 200000) (i32.const 0x41414141))
        (call $write (i32.const 1) (i32.const 200000) (i32.const 4) (i32.const 200)))
      (func (export "write_low") (result i32)
        (call $write (i32.const 1) (i32.const 100) (i32.const 5) (i32.const 200)))""")
    assert loaded.call("write_low") == [0]  # first call sees one page
    assert loaded.call("grow_and_write") == [0]  # the next sees the grown memory
    assert loaded.guest.written == [b"hello", b"AAAA"]


def test_module_without_memory_gets_none() -> None:
    loaded = load("""(func (export "run") (result i32)
        (call $write (i32.const 1) (i32.const 0) (i32.const 4) (i32.const 8)))""")
    assert loaded.call("run") == [21]


def test_wasm_trap_carries_message_and_backtrace() -> None:
    loaded = load(MEMORY + '(func $inner (unreachable)) (func (export "run") (call $inner))')
    with pytest.raises(GuestTrap) as caught:
        loaded.call("run")
    assert "unreachable" in str(caught.value)
    assert "backtrace" in str(caught.value)
    assert caught.value.code == wasmtime.TrapCode.UNREACHABLE


def test_unknown_import_is_a_one_line_link_error_naming_it() -> None:
    imports = IMPORTS + '(import "env" "mystery" (func $mystery))'
    with pytest.raises(LinkError) as caught:
        load(MEMORY + '(func (export "run") (call $mystery))', imports=imports)
    assert "env::mystery" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_unknown_import_traps_only_when_called_with_trap_unknown() -> None:
    imports = IMPORTS + '(import "env" "mystery" (func $mystery))'
    loaded = load(MEMORY + """(func (export "fine") (result i32) (i32.const 5))
        (func (export "run") (call $mystery))""", imports=imports, trap_unknown=True)
    assert loaded.call("fine") == [5]
    with pytest.raises(GuestTrap):
        loaded.call("run")


def test_wrong_import_signature_is_a_one_line_link_error() -> None:
    imports = f'(import "{MODULE}" "write" (func $write (param i32) (result i32)))'
    with pytest.raises(LinkError) as caught:
        load(MEMORY, imports=imports)
    assert "write" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_two_guests_in_two_threads_keep_their_own_exit_codes_and_output() -> None:
    """wasmtime-py's global exception slot once gave one guest the other's exit code."""
    body = MEMORY + """
      (func (export "_start") (param $code i32) (param $n i32) (local $i i32)
        (loop $again
          (drop (call $write (i32.const 1) (i32.const 100) (i32.const 5) (i32.const 200)))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $again (i32.lt_u (local.get $i) (local.get $n))))
        (call $exit (local.get $code)))"""
    failures: list[str] = []

    def run(code: int, rounds: int) -> None:
        for _ in range(rounds):
            loaded = load(body)
            with contextlib.suppress(GuestTrap):
                loaded.call("_start", code, 200 + code)
            if loaded.guest.exit_code != code or len(loaded.guest.written) != 200 + code:
                failures.append(f"guest {code}: exit {loaded.guest.exit_code}, "
                                f"{len(loaded.guest.written)} writes")

    threads = [threading.Thread(target=run, args=(code, 25)) for code in (3, 42)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
