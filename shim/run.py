"""`keep run`: load a module, build its guest, run it on a worker thread, report the outcome.

Theory of operation
-------------------
A run is described by one frozen `RunConfig` (the CLI fills it from its options; tests and
library users build it directly) and produces one `RunResult`. `run_module(config)` starts trio;
`run_module_async(config)` runs inside an existing trio loop.

1. The module bytes are read (or taken from `RunConfig.module_bytes`, so a workload delivered
   over an attested channel never touches the disk) and compiled on a worker thread, through the
   sealed compile cache unless it is turned off.
2. A `wasi_host.Guest` is built from the config: args (argv[0] is the module as given), env,
   pre-opened directories, stdio (the process's fds 0/1/2 unless the config supplies streams).
3. The guest runs on one trio worker thread with its own Engine, Store and Linker. Its host
   functions are bound through `wasi_host._bind`; exit codes and host errors are recorded on the
   Guest object, never in a global. Meanwhile a trio task enforces `--timeout` by bumping the
   engine's epoch, which traps the guest at its next loop back-edge or function entry; with
   `RunConfig.interruptible`, cancelling the run does the same. (Epoch checks cost about 20% in
   tight loops, so the engine compiles them in only when one of the two asks for them.) The
   same task sets the guest's `StopSignal`, which ends a sleep, a select() or a read of stdin
   the guest is blocked in (the epoch never reaches host code): the host call traps with
   `GuestStopped`, reported exactly as the epoch's interrupt.
4. The outcome: the guest's proc_exit code, 0 when `_start` returns, 134 (as wasmtime) for a
   trap, whose message and wasm backtrace go in `RunResult.trap`.

Adding an option: add a field to `RunConfig` (with a default, so existing callers keep working),
fill it in `shim.cli._add_run_arguments` / `config_from_arguments`, and consume it in
`_build_guest` (for what the guest sees) or `_GuestRun` (for how it runs). Pre-built backends
(an encrypted volume, sockets from keep.toml) plug in through `RunConfig.preopens` and
`RunConfig.sockets` without touching this module.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import decimal
import gc
import math
import os
import re
import signal
import struct
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import outcome
import trio
import wasmtime
from wasmtime import _ffi as ffi

from net.wiretap import WIRE_TAP
from shim.attest._protocol import normal_guest_path
from shim.audit import WireRecorder
from shim.cache import CompileCache
from shim.config import KeepConfig, load_config
from shim.engine import EngineSettings
from shim.errors import KeepError, UsageError, point_at_devnull, say
from shim.faults import ineffective_faults, parse_faults, warn_ineffective_faults
from shim.trace import open_tracer, same_file
from wasi_host import Directory, Guest, Socket, Stream, Waiter
from wasi_host._bind import (
    GuestTrap,
    LinkError,
    Scalar,
    bind_host_functions,
    call_export,
    check_imports,
    instantiate,
)
from wasi_host._faults import FaultInjector, FaultSpec
from wasi_host._functions import FUNCTIONS, HostFunction
from wasi_host._guest import GuestStopped, StopSignal
from wasi_host._trace import Tracer
from wasi_host.hostdir import HostDirectory
from wasi_host.streams import OsStream

TRAP_EXIT_STATUS = 134  # what wasmtime's CLI exits with for a trap (128 + SIGABRT)
MAX_FUEL = 2**64 - 1  # wasmtime's fuel is a u64: larger values wrapped around silently
MAX_MEMORY = 2**63 - 1  # wasmtime-py passes the memory limit as an i64 (negative: no limit)
TABLE_ELEMENT_BYTES = 8  # a table element (a function or extern reference) is a pointer
INVALID_EXIT_STATUS = 126  # proc_exit codes from here on are an error in wasmtime (exit status 1)
WASI_MODULE = "wasi_snapshot_preview1"
_WASM_MAGIC = b"\0asm"


class ModuleError(KeepError):
    """The module cannot be run: unreadable, not wasm, unlinkable, or no entry point."""


@dataclass(frozen=True)
class DirectoryMapping:
    """`--dir HOST[::GUEST]`: a host directory pre-opened for the guest at GUEST (default HOST)."""

    host: str
    guest: str

    @classmethod
    def parse(cls, spec: str) -> DirectoryMapping:
        host, guest = split_mapping(spec, "--dir", "HOST")
        return cls(host, host if guest is None else guest)


def split_mapping(spec: str, option: str, source: str) -> tuple[str, str | None]:
    """`SOURCE[::GUEST]` (the spelling of --dir and --volume) as (SOURCE, GUEST or None); a
    UsageError naming `option` when either side is empty."""
    host, separator, guest = spec.partition("::")
    if not host or (separator and not guest):
        raise UsageError(f"{option} {spec!r}: expected {source} or {source}::GUEST_PATH")
    return host, guest if separator else None


def check_guest_paths(names: Sequence[str]) -> None:
    """A UsageError when two pre-opens (--dir, --volume) name the same guest directory, however
    spelled (`/data`, `/data/`, `//data/.`): wasi-libc would resolve the guest's paths to one of
    them, which one depending on the spelling, and the other would be hidden; a plaintext --dir
    could silently take the place of an encrypted --volume. Nested paths are fine."""
    seen: dict[str, str] = {}
    for name in names:
        key = normal_guest_path(name)
        if key in seen:
            raise UsageError(f"pre-opened directories {seen[key]!r} and {name!r} are the same "
                             "guest path (one would hide the other)")
        seen[key] = name




@dataclass(frozen=True)
class Stdio:
    """The guest's stdin, stdout and stderr (wasi_host Stream objects)."""

    stdin: Stream
    stdout: Stream
    stderr: Stream


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; frozen so it can be shared, logged and compared.

    `module` is the path as given (it becomes argv[0]); `module_bytes`, when set, is used instead
    of reading that path. `args` are the guest's arguments after argv[0] (with `invoke`, the
    exported function's parameters instead). `preopens` and `sockets` are already-open backends
    appended after the `dirs` (pre-opened directories come before sockets, as wasi-libc needs);
    `waiter` blocks poll_oneoff (None: wasi_host's thread waiter; sockets on trio bring their own).
    `stdio` None means the process's own fds 0, 1 and 2. `keep_config` (keep.toml) adds its args,
    environment, stdio and sockets around the run (shim.sockets); `insecure_plaintext` is the
    operator's opt-in to its `prot = "tcp"` sockets. `interruptible` makes cancelling
    `run_module_async` stop the guest (through epoch checks, which cost about 20% in tight loops,
    so it is off unless asked for; `timeout` turns the same checks on). `trace` reports every
    host call to its sink (wasi_host._trace); `faults` make chosen calls fail or misbehave
    (wasi_host._faults); with neither, the plain host functions are bound."""

    module: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    dirs: tuple[DirectoryMapping, ...] = ()
    preopens: tuple[tuple[str, Directory], ...] = ()
    sockets: tuple[Socket, ...] = ()
    waiter: Waiter | None = None
    invoke: str | None = None
    timeout: float | None = None
    max_memory: int | None = None
    fuel: int | None = None
    trap_unknown_imports: bool = False
    cache: bool = True
    cache_dir: Path | None = None
    module_bytes: bytes | None = field(default=None, repr=False)
    stdio: Stdio | None = None
    keep_config: KeepConfig | None = None
    insecure_plaintext: bool = False
    interruptible: bool = False
    trace: Tracer | None = field(default=None, compare=False)
    faults: tuple[FaultSpec, ...] = ()

    def __post_init__(self) -> None:
        if self.timeout is not None and not self.timeout > 0:
            raise UsageError("--timeout must be a positive number of seconds")
        if self.max_memory is not None and not 0 <= self.max_memory <= MAX_MEMORY:
            raise UsageError(f"--max-memory must be 0 to {MAX_MEMORY} bytes")
        if self.fuel is not None and not 0 <= self.fuel <= MAX_FUEL:
            raise UsageError(f"--fuel must be 0 to {MAX_FUEL}")
        check_guest_paths([mapping.guest for mapping in self.dirs]
                          + [name for name, _ in self.preopens])

    @property
    def engine_settings(self) -> EngineSettings:
        return EngineSettings(epoch_interruption=self.timeout is not None or self.interruptible,
                              consume_fuel=self.fuel is not None)


@dataclass(frozen=True)
class RunResult:
    """How a run ended. `trap` is wasmtime's message with the wasm backtrace when the guest
    trapped, or the reason an exit status was refused (proc_exit >= 126, exit status 1, as
    wasmtime); None for a normal end. `results` are `--invoke`'s return values; `cache_hit` is None when the
    compile cache was off. `cut_short` says why a run whose guest ended by itself still ends with
    the timeout's status (TRAP_EXIT_STATUS): --timeout ran out while its connections were still
    sending what it had written (shim.sockets); the CLI prints it."""

    exit_code: int
    trap: str | None = None
    trap_code: wasmtime.TrapCode | None = None
    results: tuple[Scalar, ...] = ()
    cache_hit: bool | None = None
    ineffective_faults: tuple[str, ...] = ()  # one line per --fault that changed no call of this run
    result_types: tuple[str, ...] = ()  # `results`' wasm types ("i32", "f32"...), as printed
    cut_short: str | None = None


def run_module(config: RunConfig) -> RunResult:
    """Run one guest to completion (starts and stops a trio loop)."""
    result: RunResult = trio.run(run_module_async, config)
    return result


async def run_module_async(config: RunConfig) -> RunResult:
    """Run one guest to completion inside the current trio loop."""
    if config.keep_config is not None:  # keep.toml's sockets live exactly as long as the guest
        from net.policy import NetworkPolicy
        from shim.sockets import run_with_keep_config

        return await run_with_keep_config(dataclasses.replace(config, keep_config=None),
                                          config.keep_config,
                                          NetworkPolicy(allow_plaintext=config.insecure_plaintext))
    wasm = _read_module(config)
    settings = config.engine_settings
    engine = settings.make_engine()
    # Only a run that can be stopped waits for a stop signal (a select() per read of stdin).
    stop = StopSignal() if settings.epoch_interruption else None
    guest = _build_guest(config, stop)  # before compiling: a bad --dir should not wait for it
    finished = trio.Event()
    try:
        module, cache_hit = await trio.to_thread.run_sync(_compile, engine, settings, wasm, config)
        run = _GuestRun(config, engine, module, guest)
        async with trio.open_nursery() as nursery:
            if config.timeout is not None and stop is not None:
                nursery.start_soon(_interrupt_after, engine, stop, config.timeout)
            if config.interruptible and stop is not None:
                nursery.start_soon(_interrupt_when_cancelled, engine, stop, finished)
            # The worker thread cannot be abandoned (it owns the guest), so a cancelled run waits
            # here until the epoch tick has stopped the guest. Captured, so that a KeepError leaves
            # the nursery as itself rather than inside an ExceptionGroup.
            # `finished` however this ends: a run cancelled while its module compiled is
            # cancelled here, before the guest thread starts, and _interrupt_when_cancelled's
            # shielded ticking waits for `finished` (it never came: the run never ended).
            try:
                with _frozen_heap():
                    captured = await trio.to_thread.run_sync(outcome.capture, run.execute)
            finally:
                finished.set()
            nursery.cancel_scope.cancel()
    finally:
        guest.close()
        if stop is not None:
            stop.close()
    result = captured.unwrap()
    return RunResult(result.exit_code, result.trap, result.trap_code, result.results, cache_hit,
                     result.ineffective_faults, result.result_types)


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """Keep the objects that exist before the guest starts (modules, the engine, trio) out of
    the collector's sight while it runs. A guest writing 64 MiB to a volume allocates enough
    container objects (a view per staged sector) to trigger a full collection, which walked that
    whole heap: 20 ms of a 0.5 s run, measured with gc.callbacks. Undone afterwards, so nothing
    stays uncollectable; concurrent runs only make it less effective."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def _interrupt_after(engine: wasmtime.Engine, stop: StopSignal, seconds: float) -> None:
    """Stop the guest after `seconds`: its store's epoch deadline is one tick away, and the stop
    signal ends a host call it is waiting in.

    Keeps ticking until cancelled, so a guest whose store was set up only after the first tick
    (a very short timeout) is still stopped."""
    await trio.sleep(seconds)
    while True:
        engine.increment_epoch()
        stop.set()
        await trio.sleep(0.01)


async def _interrupt_when_cancelled(engine: wasmtime.Engine, stop: StopSignal,
                                    finished: trio.Event) -> None:
    """When the run is cancelled (and not merely finished), tick the epoch until the guest
    thread has stopped (and set the stop signal for a guest waiting in a host call)."""
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            while not finished.is_set():
                engine.increment_epoch()
                stop.set()
                await trio.sleep(0.01)


def _read_module(config: RunConfig) -> bytes:
    if config.module_bytes is not None:
        return config.module_bytes
    # The header first: a huge (or endless, /dev/zero) file that is not wasm is refused without
    # being read into memory.
    try:
        with open(config.module, "rb") as stream:
            header = stream.read(len(_WASM_MAGIC))
            if header != _WASM_MAGIC:
                if config.module.lower().endswith(".wat"):
                    return _wat_to_wasm(config, header + stream.read(_WAT_LIMIT + 1 - len(header)))
                raise _not_wasm(config)
            return header + stream.read()
    except OSError as error:
        raise ModuleError(f"cannot read {config.module}: {error.strerror}") from None


_WAT_LIMIT = 64 << 20  # bytes of WebAssembly text `keep run` translates
# Where the parser's error is: "REASON\n     --> <anon>:LINE:COLUMN\n (the line, a caret)" (the
# last such line: REASON may quote a name holding one), or "REASON at <anon>:LINE:COLUMN" at the
# very end (item nesting too deep)
_WAT_LOCATION = re.compile(r"\n[ \t]*-->[ \t]*<anon>:(\d+):(\d+)(?=\n|\Z)")
_WAT_LOCATION_AT_END = re.compile(r"[ \t]+at[ \t]+<anon>:(\d+):(\d+)\Z")


def _wat_to_wasm(config: RunConfig, text: bytes) -> bytes:
    """A module in the WebAssembly text format (a file named *.wat, as wasmtime runs them),
    translated by wasmtime's own parser; its errors in one line, with line and column, and
    printable: the reason may quote a name from the text (`$"\1b[2J\0a"`), whose control
    characters are shown escaped, never sent to the terminal (nor cut the line)."""
    if len(text) > _WAT_LIMIT:
        raise ModuleError(f"{config.module}: WebAssembly text larger than {_WAT_LIMIT >> 20} MiB")
    try:
        return bytes(wasmtime.wat2wasm(text.decode("utf-8")))
    except UnicodeDecodeError as error:
        raise ModuleError(f"{config.module}: WebAssembly text is not UTF-8 (byte {error.start})") from None
    except wasmtime.WasmtimeError as error:
        message = str(error).strip()
        found = list(_WAT_LOCATION.finditer(message))
        where = found[-1] if found else _WAT_LOCATION_AT_END.search(message)
        reason = message[:where.start()] if where else (message.splitlines() or [""])[0]
        reason = _printable(reason.strip()) or "invalid WebAssembly text"
        at = f" at line {where.group(1)}, column {where.group(2)}" if where else ""
        raise ModuleError(f"{config.module}: invalid WebAssembly text: {reason}{at}") from None


def _printable(text: str) -> str:
    """`text` with its control (and other unprintable) characters escaped, as one line."""
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
                   for char in text)


def _not_wasm(config: RunConfig) -> ModuleError:
    return ModuleError(f"{config.module} is not a WebAssembly module (no \\0asm header)")


def _compile(engine: wasmtime.Engine, settings: EngineSettings, wasm: bytes,
             config: RunConfig) -> tuple[wasmtime.Module, bool | None]:
    if not wasm.startswith(_WASM_MAGIC):
        raise _not_wasm(config)
    try:
        if config.cache:
            cache = CompileCache.open(config.cache_dir)
            module, hit = cache.load_module(engine, settings, wasm)
            return module, hit
        return wasmtime.Module(engine, wasm), None
    except wasmtime.WasmtimeError as error:
        raise ModuleError(f"{config.module} is not a valid module: {one_line(str(error))}") from None


def one_line(message: str) -> str:
    """wasmtime's multi-line error chain ("X\\n\\nCaused by:\\n    Y") as `X: Y`."""
    parts = [line.strip() for line in message.splitlines()]
    kept = [part for part in parts if part and part != "Caused by:"]
    return ": ".join(kept) if kept else "unknown error"


def _build_guest(config: RunConfig, stop: StopSignal | None = None) -> Guest:
    """The wasi_host Guest this config describes (args, env, pre-opens, stdio, sockets), waiting
    for `stop` too when the run can be stopped."""
    opened: list[HostDirectory] = []
    try:
        for mapping in config.dirs:
            opened.append(_open_host_directory(mapping.host))
        preopens: list[tuple[str, Directory]] = [(mapping.guest, directory)
                    for mapping, directory in zip(config.dirs, opened, strict=True)]
        preopens.extend(config.preopens)
        stdio = config.stdio or Stdio(OsStream(0), OsStream(1), OsStream(2))
        argv = [os.fsencode(config.module)]
        if config.invoke is None:
            argv.extend(os.fsencode(argument) for argument in config.args)
        env = [(os.fsencode(name), os.fsencode(value)) for name, value in config.env]
        try:
            return Guest(args=argv, env=env, preopens=preopens, stdin=stdio.stdin,
                         stdout=stdio.stdout, stderr=stdio.stderr, sockets=config.sockets,
                         waiter=config.waiter, stop=stop)
        except ValueError as error:  # NUL bytes or a bad name in args or env
            raise UsageError(str(error)) from None
    except BaseException:
        for directory in opened:
            directory.close()
        raise


def _open_host_directory(path: str) -> HostDirectory:
    try:
        return HostDirectory.open(path)
    except NotADirectoryError:
        raise UsageError(f"--dir {path}: not a directory") from None
    except OSError as error:
        raise UsageError(f"--dir {path}: {error.strerror}") from None


@dataclass(frozen=True)
class _Outcome:
    exit_code: int
    trap: str | None = None
    trap_code: wasmtime.TrapCode | None = None
    results: tuple[Scalar, ...] = ()
    ineffective_faults: tuple[str, ...] = ()
    result_types: tuple[str, ...] = ()


class _GuestRun:
    """One guest's Store, Linker and host binding, used only on the guest's worker thread."""

    def __init__(self, config: RunConfig, engine: wasmtime.Engine, module: wasmtime.Module,
                 guest: Guest) -> None:
        self._config = config
        self._engine = engine
        self._module = module
        self._guest = guest

    def execute(self) -> _Outcome:
        """Run the guest; the outcome says which --fault specs changed none of its calls."""
        faults = FaultInjector(self._config.faults) if self._config.faults else None
        ended = self._execute(faults)
        if faults is None:
            return ended
        return dataclasses.replace(ended, ineffective_faults=tuple(ineffective_faults(faults.tallies())))

    def _execute(self, faults: FaultInjector | None) -> _Outcome:
        config = self._config
        store = wasmtime.Store(self._engine)
        linker = wasmtime.Linker(self._engine)
        binding = bind_host_functions(linker, WASI_MODULE, host_functions(config, faults), self._guest)
        try:
            if config.engine_settings.epoch_interruption:
                store.set_epoch_deadline(1)  # one increment_epoch() stops the guest
            if config.max_memory is not None:
                _limit_memory(store, config.max_memory)
            if config.fuel is not None:
                store.set_fuel(config.fuel)
            try:
                check_imports(self._module, binding, trap_unknown=config.trap_unknown_imports,
                              linker=linker)
                instance = instantiate(linker, store, self._module)
            except LinkError as error:
                # A start function's host call ended it (proc_exit, or a stop while it waited):
                # wasmtime reports that as an error, not a trap, but it is the guest's outcome.
                if self._guest.exit_code is not None or isinstance(self._guest.host_error, GuestStopped):
                    # (_trapped takes the exit code, or reports the stop with this text)
                    return self._trapped(GuestTrap("wasm trap: interrupt (while waiting in a host call of the "
                                                   "start function)", None))
                limited = ""
                if config.max_memory is not None and "count too high" in str(error):
                    limited = " (--max-memory allows one linear memory and one table)"
                elif config.max_memory is not None and "exceeds table limits" in str(error):
                    limited = f" (--max-memory {config.max_memory} allows {_table_elements(config.max_memory)})"
                raise ModuleError(f"cannot instantiate {config.module}: {error}{limited}") from None
            except GuestTrap as trap:
                return self._trapped(trap)
            try:
                return self._call_entry(store, instance)
            except GuestTrap as trap:
                return self._trapped(trap)
        finally:
            store.close()
            linker.close()
            binding.close()

    def _call_entry(self, store: wasmtime.Store, instance: wasmtime.Instance) -> _Outcome:
        config = self._config
        exports = instance.exports(store)
        if config.invoke is None:
            start = exports.get("_start")
            if not isinstance(start, wasmtime.Func):
                raise ModuleError(f"{config.module} has no `_start` function to run "
                                  "(for a reactor module use --invoke EXPORT)")
            start_type = start.type(store)
            if start_type.params or start_type.results:
                raise ModuleError(f"{config.module}: `_start` must take and return nothing")
            call_export(store, start, [])
            return _Outcome(0)
        target = exports.get(config.invoke)
        if not isinstance(target, wasmtime.Func):
            raise ModuleError(f"{config.module} exports no function named `{config.invoke}`")
        initialize = exports.get("_initialize")
        if isinstance(initialize, wasmtime.Func):
            _refuse_v128(initialize.type(store), "_initialize")
            call_export(store, initialize, [])
        _refuse_v128(target.type(store), config.invoke)
        arguments = _parse_invoke_arguments(target.type(store), config.args, config.invoke)
        try:
            results = call_export(store, target, arguments)
        except ValueError as error:
            raise ModuleError(f"cannot invoke `{config.invoke}`: {error}") from None
        return _Outcome(0, results=tuple(results),
                        result_types=tuple(str(kind) for kind in target.type(store).results))

    def _trapped(self, trap: GuestTrap) -> _Outcome:
        guest = self._guest
        if guest.exit_code is not None:
            code = int(guest.exit_code)
            if code >= INVALID_EXIT_STATUS:  # wasmtime refuses these: an error, exit status 1
                return _Outcome(1, "exit with invalid exit status outside of [0..126)")
            return _Outcome(code)
        if isinstance(guest.host_error, GuestStopped):  # stopped in a host call, not in wasm code
            return _Outcome(TRAP_EXIT_STATUS, _interrupt_message(str(trap), guest.host_error),
                            wasmtime.TrapCode.INTERRUPT)
        if guest.host_error is not None:
            raise guest.host_error
        return _Outcome(TRAP_EXIT_STATUS, str(trap), trap.code)


def _limit_memory(store: wasmtime.Store, max_memory: int) -> None:
    """--max-memory for one store. wasmtime's `memory_size` limit is per linear memory and
    leaves tables alone, so on its own it bounded neither a module with several memories (each
    grew to the limit) nor a table grown in a loop (3 GB of host memory in 4 s under --max-memory
    1 MiB): the guest may have one memory and one table, and the table at most as many elements
    as the limit has bytes for (`TABLE_ELEMENT_BYTES` each)."""
    store.set_limits(memory_size=max_memory, table_elements=max_memory // TABLE_ELEMENT_BYTES,
                     memories=1, tables=1)


def _table_elements(max_memory: int) -> str:
    """How many table elements --max-memory allows, in words."""
    return f"{max_memory // TABLE_ELEMENT_BYTES} table elements of {TABLE_ELEMENT_BYTES} bytes"


def _refuse_v128(func_type: wasmtime.FuncType, name: str) -> None:
    """A ModuleError when the function takes or returns a v128. wasmtime's C API panics (and so
    aborts the process, exit status 134 like a guest trap) when asked a v128's kind, which reading
    the parameters or converting the results does; comparing with a v128 type does not."""
    v128 = ffi.wasmtime_wasm_valtype_v128()
    try:
        if any(ffi.wasmtime_wasm_valtype_equal(kind.ptr(), v128)
               for kind in (*func_type.params, *func_type.results)):
            raise ModuleError(f"cannot invoke `{name}`: values of type v128 are not supported")
    finally:
        ffi.wasm_valtype_delete(v128)


def _interrupt_message(trap_text: str, stopped: GuestStopped) -> str:
    """The trap text of a guest stopped inside a host call, worded as the epoch's interrupt
    (`wasm trap: interrupt`, naming the call) rather than as a failed host function; the wasm
    backtrace stays. Unchanged if the binding words its message differently."""
    failed = re.compile(rf"host function (\w+) failed: {type(stopped).__name__}: {re.escape(str(stopped))}")
    return failed.sub(r"wasm trap: interrupt (while waiting in \1)", trap_text, count=1)


def limit_reached(trap_code: wasmtime.TrapCode | None, config: RunConfig) -> str | None:
    """Which of the run's own limits a trap comes from, in words (None for a guest's own trap),
    so that `wasm trap: interrupt` is never the only thing a user is told."""
    if trap_code == wasmtime.TrapCode.INTERRUPT and config.timeout is not None:
        return f"the guest was stopped: it ran longer than --timeout {config.timeout:g} s"
    if trap_code == wasmtime.TrapCode.OUT_OF_FUEL and config.fuel is not None:
        return f"the guest was stopped: it used up its --fuel {config.fuel}"
    return None


def host_functions(config: RunConfig, faults: FaultInjector | None = None) -> Mapping[str, HostFunction]:
    """The preview1 table to bind: the plain `FUNCTIONS` unless the run injects faults or is
    traced (so an untraced run pays nothing); faults inside, so the trace shows what the guest
    saw. The fault injector (the run's own: its counters belong to one run) is `faults`, or a
    fresh one for `config.faults`."""
    functions: Mapping[str, HostFunction] = FUNCTIONS
    if config.faults:
        functions = (faults or FaultInjector(config.faults)).wrap(functions)
    if config.trace is not None:
        functions = config.trace.wrap(functions)
    return functions


def _parse_invoke_arguments(func_type: wasmtime.FuncType, texts: Sequence[str],
                            name: str) -> list[Scalar]:
    params = func_type.params
    if len(texts) != len(params):
        raise ModuleError(f"`{name}` takes {len(params)} argument(s), {len(texts)} given")
    values: list[Scalar] = []
    for kind, text in zip(params, texts, strict=True):
        try:
            value: Scalar = float(text) if str(kind) in ("f32", "f64") else int(text, 0)
        except ValueError:
            raise ModuleError(f"`{name}`: cannot read {text!r} as {kind}") from None
        bits = {"i32": 32, "i64": 64}.get(str(kind))
        # Signed or unsigned spellings of the width (0xffffffff is an i32's -1, as in wasmtime);
        # anything wider used to wrap silently into a different argument.
        if bits is not None and not -(1 << (bits - 1)) <= value < (1 << bits):
            raise ModuleError(f"`{name}`: {text!r} is out of range for {kind}")
        values.append(value)
    return values


def result_text(value: Scalar, kind: str) -> str:
    """One `--invoke` result as wasmtime's CLI prints it (Rust's Display): integers in decimal;
    floats with the shortest digits that give back the value at the result's own width (an f32's
    0.1 is `0.1`, not its f64 widening 0.10000000149011612), never an exponent, no `.0`, and
    `NaN`, `inf`, `-inf`."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    digits = repr(value)
    if kind == "f32":
        for precision in range(9):  # 9 significant digits always give an f32 back
            candidate = f"{value:.{precision}e}"
            with contextlib.suppress(OverflowError):  # rounded up past the largest f32
                if struct.unpack("<f", struct.pack("<f", float(candidate)))[0] == value:
                    digits = candidate
                    break
    return format(decimal.Decimal(digits).normalize(), "f")


def _print_results(results: Sequence[Scalar], kinds: Sequence[str] = ()) -> None:
    """`--invoke`'s return values on stdout, one a line, spelled by `result_text` (`kinds` are
    their wasm types). A stdout that cannot take them (a full disk, a reader that went away) is
    a one-line KeepError; stdout is then pointed at /dev/null so that the interpreter's last
    flush does not fail (and complain) a second time."""
    if not results:
        return
    try:
        for index, value in enumerate(results):
            print(result_text(value, kinds[index] if index < len(kinds) else "f64"))
        sys.stdout.flush()
    except OSError as error:
        with contextlib.suppress(OSError, ValueError):
            point_at_devnull(sys.stdout.fileno())
        raise KeepError(f"cannot write the results of --invoke to stdout: "
                        f"{error.strerror or error}") from None


def config_from_arguments(args: argparse.Namespace) -> RunConfig:
    """The RunConfig for parsed `keep run` arguments."""
    env: list[tuple[str, str]] = []
    for item in args.env:
        name, separator, value = item.partition("=")
        if not name:
            raise UsageError(f"--env {item!r}: expected NAME=VALUE or NAME")
        if not separator:
            inherited = os.environ.get(name)
            if inherited is None:
                continue
            value = inherited
        env.append((name, value))
    return RunConfig(
        module=args.module,
        args=tuple(args.guest_args),
        env=tuple(env),
        dirs=tuple(DirectoryMapping.parse(spec) for spec in args.dir),
        invoke=args.invoke,
        timeout=args.timeout,
        max_memory=args.max_memory,
        fuel=args.fuel,
        trap_unknown_imports=args.trap_unknown_imports,
        cache=not args.no_cache,
        keep_config=load_config(Path(args.config)) if args.config else None,
        insecure_plaintext=args.insecure_plaintext,
        faults=parse_faults(args.fault),
    )


def files_read(args: argparse.Namespace, keep_config: KeepConfig | None = None) -> list[tuple[str, str]]:
    """(option, path) of the files `keep run` reads besides the module and the volume images
    (which open_tracer knows by their first bytes): `--trace=FILE` must never empty one of them.
    The trace is opened before the volumes' key and keep.toml's TLS files are read, so
    `--trace=key.bin --key-file key.bin` destroyed the volume's only key, `--trace=FILE
    --volume-state FILE` its rollback pins, and `--trace=key.pem` keep.toml's TLS key."""
    named = []
    for option in ("key_file", "passphrase_file", "volume_state", "config"):
        path = getattr(args, option, None)
        if path is not None and path != "-":  # `--key-file -`: stdin
            named.append((f"--{option.replace('_', '-')}", str(path)))
    if keep_config is not None:
        tls = keep_config.tls
        for key, tls_path in (("certificate", tls.certificate), ("key", tls.key)):
            if tls_path is not None:
                named.append((f"keep.toml's tls.{key}", str(tls_path)))
        for name, _, ca in keep_config.ca_files():
            named.append((f"keep.toml's files {name!r} CA", str(ca)))
    return named


def refuse_export_over_inputs(args: argparse.Namespace, keep_config: KeepConfig | None,
                              images: Sequence[str]) -> None:
    """A KeepError when keep.toml's [tls] export_certificate names a file this run reads: the
    module, a volume image (`images`), the volume key or passphrase file, --volume-state,
    keep.toml itself (`files_read`; keep.toml's own TLS key and CA files are refused by
    shim.sockets, for keep serve too). The certificate is written when the sockets open, after
    the volumes' key was read: `export_certificate = "vol.key"` with `--key-file vol.key`
    replaced the volume's only key, and the volume could never be opened again."""
    export = keep_config.tls.export_certificate if keep_config is not None else None
    if export is None:
        return
    named = [*files_read(args), *(("--volume", image) for image in images), ("the module", str(args.module))]
    for option, path in named:
        if same_file(export, path):
            raise KeepError(f"export_certificate {export}: refusing to overwrite the file of {option} "
                            "(give the certificate a file name of its own)")


def run_command(args: argparse.Namespace) -> int:
    """`keep run`: run the module, print a trap or `--invoke` results, return the exit status."""
    if args.trace is None:  # alone, they would run the guest untraced and say nothing
        for given, option in ((args.trace_data, "--trace-data"), (args.trace_format != "text", "--trace-format")):
            if given:
                raise UsageError(f"{option} needs --trace[=FILE]")
    config = config_from_arguments(args)
    wire: WireRecorder | None = None
    if args.audit_host is not None:
        wire = WireRecorder(os.fsencode(args.audit_host))  # a bad marker fails before the run
    from shim.run_volumes import (
        RunVolumes,
        SignalledRun,
        VolumeMount,
        run_until_signalled,
        warn_plaintext_dirs,
    )

    refuse_export_over_inputs(args, config.keep_config,
                              [VolumeMount.parse(spec).image for spec in args.volume])
    warn_plaintext_dirs(args)
    check_guest_paths([mapping.guest for mapping in config.dirs]
                      + [VolumeMount.parse(spec).guest for spec in args.volume])  # before opening
    with contextlib.ExitStack() as stack:
        if args.trace is not None:
            tracer = stack.enter_context(open_tracer(args.trace, args.trace_format, show_data=args.trace_data,
                                                     audit=wire, inputs=files_read(args, config.keep_config)))
            config = dataclasses.replace(config, trace=tracer)
        if wire is not None:  # trio copies this context into every socket task of the run
            stack.callback(WIRE_TAP.reset, WIRE_TAP.set(wire.record))
        volumes = RunVolumes.from_arguments(args)  # --volume: committed and closed however the run ends
        # From here Ctrl-C ends the process at once, as in wasmtime's CLI (trio would otherwise
        # wait for a guest that has no epoch checks to notice it); with volumes or --audit-host,
        # the first one stops the guest (run_until_signalled), so that the volumes are committed
        # and the audit runs (a server is typically ended that way). Not earlier: a Ctrl-C at the
        # passphrase prompt must unwind through getpass, which turns the terminal's echo back on.
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # (an inherited SIG_IGN stays)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        if volumes is None and wire is None:
            result = run_module(config)
        else:
            with volumes if volumes is not None else contextlib.nullcontext():
                config = volumes.configure(config) if volumes is not None else \
                    dataclasses.replace(config, interruptible=True)
                ended = run_until_signalled(config)
            if isinstance(ended, SignalledRun):
                committed = ", volumes committed" if volumes is not None else ""
                say(f"{signal.Signals(ended.signal_number).name}: guest stopped{committed}")
                from shim.audit import audited_exit_status  # --audit-host: a signal ends servers too

                return audited_exit_status(args, config, wire, ended.exit_status)
            result = ended
    warn_ineffective_faults(result.ineffective_faults)  # a --fault that changed no call: the run proves nothing
    if result.trap is not None:
        say(f"{config.module}: {result.trap}")
        limit = limit_reached(result.trap_code, config)
        if limit is not None:
            say(limit)
    if result.cut_short is not None:
        say(result.cut_short)
    _print_results(result.results, result.result_types)
    from shim.audit import audited_exit_status

    return audited_exit_status(args, config, wire, result.exit_code)
