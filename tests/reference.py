"""Runs a WASI module under wasmtime's BUILT-IN WASI: the reference for differential tests.

Built-in WASI bypasses everything keepshim adds (encryption, our own host functions), so it must
never serve a guest in keepshim itself; it lives here, under tests/, and only answers "what does
wasmtime do?". It is a command with the same spellings as `keep run` (and wasmtime's CLI), meant
to be run as a subprocess so that a crash or a hang stays isolated:

    python tests/reference.py [--dir HOST[::GUEST]]... [--env NAME=VALUE]... \
        [--max-memory BYTES] [--timeout SECONDS] MODULE.wasm [ARGS...]

The guest's stdin, stdout and stderr are this process's own (the harness points them at files).
argv[0] is MODULE as given, as in wasmtime's CLI. Exit status as wasmtime's CLI on Unix: the
guest's proc_exit code; 0 when `_start` returns; 134 after a trap (message on stderr); 1 for any
other error (such as proc_exit with a status outside [0, 126)).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

import wasmtime

TRAP_EXIT_STATUS = 134


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="reference", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", action="append", default=[], metavar="HOST[::GUEST]")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--max-memory", type=int, metavar="BYTES")
    parser.add_argument("--timeout", type=float, metavar="SECONDS")
    parser.add_argument("module", metavar="MODULE.wasm")
    parser.add_argument("guest_args", nargs=argparse.REMAINDER, metavar="ARGS")
    return parser.parse_args(argv)


def wasi_config(arguments: argparse.Namespace) -> wasmtime.WasiConfig:
    config = wasmtime.WasiConfig()
    config.argv = [arguments.module, *arguments.guest_args]
    environment = []
    for item in arguments.env:
        name, has_value, value = item.partition("=")
        if has_value:
            environment.append((name, value))
        elif name in os.environ:  # `--env NAME` passes the host's value on, as wasmtime's CLI
            environment.append((name, os.environ[name]))
    config.env = environment
    for item in arguments.dir:
        host, _, guest = item.partition("::")
        config.preopen_dir(host, guest or host)
    config.inherit_stdin()
    config.inherit_stdout()
    config.inherit_stderr()
    return config


def run(arguments: argparse.Namespace) -> int:
    engine_config = wasmtime.Config()
    engine_config.epoch_interruption = arguments.timeout is not None
    engine = wasmtime.Engine(engine_config)
    store = wasmtime.Store(engine)
    if arguments.max_memory is not None:
        store.set_limits(memory_size=arguments.max_memory)
    if arguments.timeout is not None:
        store.set_epoch_deadline(1)
        timer = threading.Timer(arguments.timeout, engine.increment_epoch)
        timer.daemon = True
        timer.start()
    store.set_wasi(wasi_config(arguments))
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    module = wasmtime.Module.from_file(engine, arguments.module)
    instance = linker.instantiate(store, module)
    start = instance.exports(store)["_start"]
    assert isinstance(start, wasmtime.Func)
    try:
        start(store)
    except wasmtime.ExitTrap as exit_trap:
        return int(exit_trap.code)
    except wasmtime.Trap as trap:
        sys.stdout.flush()
        print(f"Error: {trap.message}", file=sys.stderr)
        return TRAP_EXIT_STATUS
    except wasmtime.WasmtimeError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    return run(parse_arguments(argv))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
