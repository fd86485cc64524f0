"""`keep run --trace`: one decoded line (or JSON object) per WASI call; buffers never shown unless
--trace-data; nothing installed when tracing is off."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from fixture_build import WasmFixture

from shim.cli import build_parser
from shim.pytest_plugin import KeepRunner
from shim.run import RunConfig, host_functions
from shim.trace import read_jsonl_trace
from wasi_host._functions import FUNCTIONS
from wasi_host._trace import _LAYOUTS, TraceEvent, Tracer, flags_text

MARKER = b"PLAINTEXT-MARKER-5f1c"


def keep_run(arguments: list[str], environment: dict[str, str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["keep", "run", *arguments], input=stdin, capture_output=True, env=environment)


def test_every_preview1_function_has_a_decoding_layout() -> None:
    assert set(_LAYOUTS) == set(FUNCTIONS)
    for name, layout in _LAYOUTS.items():
        consumed = sum(2 if item.partition(":")[0] in ("path", "iovs", "buf", "path_out") else 1
                       for item in layout)
        assert consumed == len(FUNCTIONS[name].params), name


def test_the_text_trace_decodes_paths_flags_sizes_results_and_errnos(
        wasm_fixture: WasmFixture, tmp_path: Path, keep_environment: dict[str, str]) -> None:
    completed = keep_run(["--trace", "--dir", f"{tmp_path}::/sandbox", str(wasm_fixture("short_write_ok"))],
                         keep_environment)
    assert completed.returncode == 0, completed.stderr
    lines = completed.stderr.decode().splitlines()
    opened = next(line for line in lines if line.startswith("path_open("))
    assert re.fullmatch(r'path_open\(fd=3, dirflags=SYMLINK_FOLLOW, path="out.bin", oflags=CREAT\|TRUNC, '
                        r"rights_base=\S+, rights_inheriting=\S+, fdflags=0\) = SUCCESS opened_fd=4 <[0-9.]+ us>",
                        opened), opened
    assert re.fullmatch(r"fd_write\(fd=4, size=10000\) = SUCCESS nwritten=10000 <[0-9.]+ us>",
                        lines[lines.index(opened) + 1])
    assert "fd_prestat_get(fd=4) = EBADF" in completed.stderr.decode()  # errno by name
    assert lines[-1].startswith("fd_write(fd=1, size=30) = SUCCESS nwritten=30 <")
    assert completed.stdout == b"wrote 10000 bytes in one call\n"


def test_bare_trace_before_the_module_does_not_swallow_it() -> None:
    parser = build_parser()
    bare = parser.parse_args(["run", "--trace", "m.wasm", "--trace", "x"])
    assert (bare.trace, bare.module, bare.guest_args) == ("-", "m.wasm", ["--trace", "x"])
    to_file = parser.parse_args(["run", "--dir", "d", "--trace=t.log", "m.wasm"])
    assert (to_file.dir, to_file.trace, to_file.module) == (["d"], "t.log", "m.wasm")
    assert parser.parse_args(["run", "m.wasm"]).trace is None


@pytest.mark.parametrize("trace_format", ["text", "jsonl"])
def test_the_default_trace_never_shows_buffer_contents_and_trace_data_does(
        trace_format: str, wasm_fixture: WasmFixture, tmp_path: Path, keep_environment: dict[str, str]) -> None:
    quiet, loud = tmp_path / f"quiet.{trace_format}", tmp_path / f"loud.{trace_format}"
    module = str(wasm_fixture("echo"))
    for trace_file, extra in ((quiet, []), (loud, ["--trace-data"])):
        completed = keep_run([f"--trace={trace_file}", "--trace-format", trace_format, *extra, module],
                             keep_environment, stdin=MARKER)
        assert completed.returncode == 0 and completed.stdout == MARKER
        assert b"fd_write" not in completed.stderr  # the trace went to the file
    quiet_text, loud_text = quiet.read_bytes(), loud.read_bytes()
    assert b"fd_read" in quiet_text and b"fd_write" in quiet_text
    assert MARKER not in quiet_text
    if trace_format == "text":
        assert MARKER in loud_text
    else:
        events = read_jsonl_trace(loud_text.decode())
        assert next(event.data for event in events if event.function == "fd_read") == MARKER
        assert next(event.data for event in events if event.function == "fd_write") == MARKER
    assert quiet.stat().st_mode & 0o777 == 0o600  # a trace holds the guest's paths


def test_the_jsonl_trace_is_one_object_per_call_and_reads_back(wasm_fixture: WasmFixture, tmp_path: Path,
                                                             keep_environment: dict[str, str]) -> None:
    completed = keep_run(["--trace", "--trace-format", "jsonl", "--dir", f"{tmp_path}::/sandbox",
                          "--fault", "fd_write:EIO:path=*.bin", str(wasm_fixture("short_write_ok"))],
                         keep_environment)
    assert completed.returncode == 1
    lines = [line for line in completed.stderr.decode().splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    assert [record["seq"] for record in records] == list(range(1, len(records) + 1))
    failed = next(record for record in records if record["call"] == "fd_write")
    assert failed["args"] == {"fd": 4, "size": 10000} and failed["errno"] == "EIO" and failed["results"] == {}
    assert records[-1] == {**records[-1], "call": "proc_exit", "args": {"code": 1}, "exit_code": 1}
    events = read_jsonl_trace(completed.stderr.decode())
    assert [event.to_json() for event in events] == records
    assert events[-1].format().startswith("proc_exit(code=1) = exit 1 <")


def test_tracing_off_binds_the_plain_functions_and_on_wraps_them() -> None:
    assert host_functions(RunConfig(module="m.wasm")) is FUNCTIONS
    traced = host_functions(RunConfig(module="m.wasm", trace=Tracer(lambda event: None)))
    assert set(traced) == set(FUNCTIONS)
    assert all(traced[name].impl is not FUNCTIONS[name].impl for name in FUNCTIONS)


def test_flags_and_rights_are_named() -> None:
    assert flags_text("oflags", 0b1001) == "CREAT|TRUNC"
    assert flags_text("fdflags", 0) == "0"
    assert flags_text("fdflags", 1 | 64) == "APPEND|0x40"
    assert flags_text("rights", (1 << 30) - 1) == "ALL"
    assert flags_text("rights", ((1 << 30) - 1) & ~2) == "ALL&~(FD_READ)"
    assert flags_text("rights", 2 | 64) == "FD_READ|FD_WRITE"


def test_the_keep_fixture_returns_the_trace_as_events(keep: KeepRunner, wasm_fixture: WasmFixture) -> None:
    result = keep(wasm_fixture("hello"))
    assert result.exit_code == 0
    writes = result.calls("fd_write")
    assert [(event.args["fd"], event.errno_name) for event in writes] == [(1, "SUCCESS"), (2, "SUCCESS")]
    assert all(isinstance(event, TraceEvent) and event.duration_us >= 0 and event.data is None
               for event in result.trace)
    assert writes[0].results["nwritten"] == len(result.stdout)


def test_decoding_survives_bad_pointers_and_shows_read_data_only_when_asked() -> None:
    import struct

    from wasi_host import Guest, WasiError
    from wasi_host.memfs import MemoryFilesystem
    from wasi_host.streams import MemoryStream

    def guest() -> Guest:
        return Guest([b"m"], [], [("/data", MemoryFilesystem().root())], MemoryStream(b"secret input"),
                     MemoryStream(), MemoryStream())

    memory = memoryview(bytearray(4096))
    struct.pack_into("<II", memory, 0, 100, 6)  # one iovec: 6 bytes at 100
    for show_data, expected in ((False, None), (True, b"secret")):
        events: list[TraceEvent] = []
        traced = Tracer(events.append, show_data=show_data).wrap(FUNCTIONS)
        assert traced["fd_read"].impl(guest(), memory, 0, 0, 1, 8) == 0
        with pytest.raises(WasiError):  # raised on, unchanged, for the binding to map
            traced["path_open"].impl(guest(), memory, 3, 0, 5000, 4, 0, 0, 0, 0, 16)
        read, opened = events
        assert (read.args, read.results, read.data) == ({"fd": 0, "size": 6}, {"nread": 6}, expected)
        assert opened.args["path"] == "<bad pointer>" and opened.errno_name == "EFAULT"
        assert opened.format().startswith('path_open(fd=3, dirflags=0, path="<bad pointer>", oflags=0')


def test_trace_data_copies_at_most_what_the_call_can_move() -> None:
    """--trace-data copies a write's buffers before the call: overlapping iovecs add up to far more
    than memory, and the copy must stop at the memory size as the call itself does (1024 iovecs
    over 64 KiB once made the tracer allocate 128 MiB)."""
    import struct
    import tracemalloc

    from wasi_host import Guest
    from wasi_host.streams import MemoryStream

    memory_size, count = 1 << 16, 1024
    stdout = MemoryStream()
    guest = Guest([b"m"], [], [], MemoryStream(), stdout, MemoryStream())
    memory = memoryview(bytearray(memory_size))
    array = memory_size - 8 * count
    for index in range(count):  # every iovec covers the whole memory
        struct.pack_into("<II", memory, array + 8 * index, 0, memory_size)
    events: list[TraceEvent] = []
    traced = Tracer(events.append, show_data=True).wrap(FUNCTIONS)
    tracemalloc.start()
    try:
        assert traced["fd_write"].impl(guest, memory, 1, array, count, 0) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        guest.close()
    assert len(stdout.output) == memory_size
    assert events[-1].data == bytes(stdout.output)
    assert peak < 16 * memory_size, f"the traced call allocated {peak} bytes"
