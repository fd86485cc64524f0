"""Review findings on `keep run --trace`: a trace that cannot be written never changes what the
guest sees, and JSON lines stay valid JSON for any path bytes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from fixture_build import WasmFixture


def keep_run(arguments: list[str], environment: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["keep", "run", *arguments], capture_output=True, env=environment, check=False)


def test_a_trace_file_that_cannot_be_written_does_not_fail_the_guests_calls(
        wasm_fixture: WasmFixture, tmp_path: Path, keep_environment: dict[str, str]) -> None:
    """/dev/full refuses every write with ENOSPC. The trace write failing used to propagate out of
    the traced host function, so the guest saw ENOSPC for calls that had succeeded (its write was
    on disk, yet it reported `No space left on device`), proc_exit returned, and keep ended with
    `internal error` (exit 70). Now the guest runs as untraced and keep says the trace stopped."""
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    completed = keep_run(["--trace=/dev/full", "--dir", f"{sandbox}::/sandbox",
                          str(wasm_fixture("short_write_ok"))], keep_environment)
    stderr = completed.stderr.decode()
    assert completed.returncode == 0, stderr
    assert completed.stdout == b"wrote 10000 bytes in one call\n"
    assert (sandbox / "out.bin").stat().st_size == 10000
    assert "internal error" not in stderr
    assert "keep: warning: --trace=/dev/full: No space left on device" in stderr
    assert "the trace is incomplete" in stderr


def test_a_failing_sink_leaves_every_outcome_as_it_was_and_is_reported() -> None:
    """Unit level: with a sink that raises, a successful call still returns SUCCESS, a failing one
    still raises its own error, proc_exit still ends the guest, and the first failure is kept."""
    from wasi_host import Guest, ProcExit, WasiError
    from wasi_host._functions import FUNCTIONS
    from wasi_host._trace import TraceEvent, Tracer
    from wasi_host.streams import MemoryStream

    def full_disk(event: TraceEvent) -> None:
        raise OSError(28, "No space left on device")

    stdout = MemoryStream()
    guest = Guest([b"m"], [], [], MemoryStream(), stdout, MemoryStream())
    memory = memoryview(bytearray(4096))
    memory[100:105] = b"hello"
    memory[0:8] = (100).to_bytes(4, "little") + (5).to_bytes(4, "little")
    tracer = Tracer(full_disk)
    traced = tracer.wrap(FUNCTIONS)
    try:
        assert traced["fd_write"].impl(guest, memory, 1, 0, 1, 16) == 0
        assert bytes(stdout.output) == b"hello"
        with pytest.raises(WasiError):
            traced["fd_write"].impl(guest, memory, 9, 0, 1, 16)  # EBADF, not the sink's ENOSPC
        with pytest.raises(ProcExit):
            traced["proc_exit"].impl(guest, memory, 3)
    finally:
        guest.close()
    assert isinstance(tracer.failure, OSError) and tracer.failed_at == 1


def test_after_a_failed_trace_write_calls_are_not_decoded_any_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracing stops at the first failed write: later calls skip decoding their arguments and
    copying data (found in review: they still did all of it, only to drop the event)."""
    from wasi_host import Guest, _trace
    from wasi_host._functions import FUNCTIONS
    from wasi_host.streams import MemoryStream

    decoded: list[str] = []
    real_decode = _trace._decode

    def counting_decode(*arguments: object) -> object:
        decoded.append("call")
        return real_decode(*arguments)  # type: ignore[arg-type]

    monkeypatch.setattr(_trace, "_decode", counting_decode)

    def full_disk(event: _trace.TraceEvent) -> None:
        raise OSError(28, "No space left on device")

    guest = Guest([b"m"], [], [], MemoryStream(), MemoryStream(), MemoryStream())
    memory = memoryview(bytearray(4096))
    memory[0:8] = (100).to_bytes(4, "little") + (5).to_bytes(4, "little")
    traced = _trace.Tracer(full_disk).wrap(FUNCTIONS)
    try:
        for _ in range(3):
            assert traced["fd_write"].impl(guest, memory, 1, 0, 1, 16) == 0
    finally:
        guest.close()
    assert decoded == ["call"]  # the first call only: its event's write failed


def _strict_text(value: object) -> bool:
    """Whether every string in a parsed JSON value is Unicode a strict parser accepts (no lone
    surrogates: serde_json rejects them, jq and Go turn them into U+FFFD)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_strict_text(key) and _strict_text(item) for key, item in value.items())
    if isinstance(value, list):
        return all(_strict_text(item) for item in value)
    return True


def test_jsonl_lines_stay_strict_json_for_non_utf8_paths_and_keep_their_bytes(
        wasm_fixture: WasmFixture, tmp_path: Path, keep_environment: dict[str, str]) -> None:
    """`escape` opens paths with invalid UTF-8 bytes. The JSON trace used to carry them as lone
    surrogate escapes (\\udcff), which strict JSON readers reject and others turn into U+FFFD;
    now the path is valid text (U+FFFD for the bad bytes) and the exact bytes are in `raw`."""
    import json

    from shim.trace import read_jsonl_trace

    sandbox, trace = tmp_path / "sandbox", tmp_path / "trace.jsonl"
    sandbox.mkdir()
    completed = keep_run([f"--trace={trace}", "--trace-format", "jsonl", "--dir", f"{sandbox}::/sandbox",
                          str(wasm_fixture("escape"))], keep_environment)
    assert completed.returncode == 0, completed.stderr
    text = trace.read_text(encoding="utf-8")
    records = [json.loads(line) for line in text.splitlines()]
    assert all(_strict_text(record) for record in records)
    events = read_jsonl_trace(text)
    paths = [event.args["path"] for event in events if event.function == "path_open"]
    bad = [path for path in paths if isinstance(path, str) and "\udcff" in path]
    assert bad, "escape.c opens a path with the byte 0xff"
    shown = [record["args"]["path"] for record in records
             if record["call"] == "path_open" and "raw" in record]
    assert shown == [path.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for path in bad]
    assert [event.to_json() for event in events] == records


def test_a_call_ended_by_a_trap_is_shown_as_a_trap_not_as_errno_minus_one(
        wasm_fixture: WasmFixture, tmp_path: Path, keep_environment: dict[str, str]) -> None:
    """--timeout interrupts echo blocked in fd_read on a pipe that stays open; the trace line
    read `fd_read(fd=0, size=65536) = -1 <...>`, an errno that does not exist."""
    import json

    trace, stderr = tmp_path / "trace.jsonl", tmp_path / "stderr"
    with stderr.open("wb") as errors, subprocess.Popen(
            ["keep", "run", "--timeout", "1", f"--trace={trace}", "--trace-format", "jsonl",
             str(wasm_fixture("echo"))], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors,
            env=keep_environment) as process:
        try:  # stdin stays open: the guest waits in fd_read until --timeout stops it
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 134, stderr.read_text()
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert records[-1]["call"] == "fd_read" and records[-1]["errno"] == "TRAP"
    from wasi_host._trace import TraceEvent

    event = TraceEvent.from_json(records[-1])
    assert event.errno == -1 and event.errno_name == "TRAP"
    assert event.format().startswith("fd_read(fd=0, size=65536) = TRAP <")
    from shim.errors import UsageError
    from shim.faults import parse_faults

    with pytest.raises(UsageError, match="'TRAP' is not a WASI errno name"):
        parse_faults(["fd_write:TRAP"])  # a name the trace shows, not an errno to inject


def test_the_trace_file_never_overwrites_a_volume_image_or_a_module(
        wasm_fixture: WasmFixture, tmp_path: Path, keep_environment: dict[str, str]) -> None:
    """`--trace=FILE` truncated FILE before anything else: `--trace=notes.img --volume notes.img`
    (or naming the module) destroyed the encrypted volume (0 bytes, every file in it lost) and
    only then failed with 'not a LUKS2 volume'."""
    import shutil

    from run_volume_support import PASSPHRASE, make_volume

    image, module, key = tmp_path / "notes.img", tmp_path / "hello.wasm", tmp_path / "key"
    make_volume(image)
    key.write_bytes(PASSPHRASE)
    shutil.copy(wasm_fixture("hello"), module)
    before = image.read_bytes(), module.read_bytes()
    for target, kind in ((image, "a LUKS2 volume image"), (module, "a WebAssembly module")):
        completed = keep_run([f"--trace={target}", "--volume", str(image), "--key-file", str(key), str(module)],
                             keep_environment)
        assert completed.returncode == 2
        assert completed.stderr.decode() == (f"keep: --trace={target}: refusing to overwrite {kind} "
                                             "(give the trace a file name of its own)\n")
    assert (image.read_bytes(), module.read_bytes()) == before
    trace = tmp_path / "trace.txt"
    trace.write_text("an old trace\n")  # an ordinary file is still replaced
    completed = keep_run([f"--trace={trace}", str(module)], keep_environment)
    assert completed.returncode == 0 and trace.read_text().startswith("fd_fdstat_get(fd=1) = SUCCESS")
