"""Session-8 review findings on `keep run`, its trace, and the pytest plugin: each test reproduces
a defect found by running the real thing (real wasmtime, real files, real volumes)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from fixture_build import WasmFixture
from run_volume_support import PASSPHRASE, make_volume

from shim.pytest_plugin import KeepRunner


def keep_run(arguments: list[str], environment: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["keep", "run", *arguments], capture_output=True, env=environment, check=False)


def test_the_trace_file_never_overwrites_a_key_a_state_file_or_a_config(
        wasm_fixture: WasmFixture, tmp_path: Path, keep_environment: dict[str, str]) -> None:
    """`--trace=FILE` was opened (and emptied) before the volumes' key was read: a mistyped
    `--trace=key.bin --key-file key.bin` destroyed the only key of the volume (then failed with
    'the passphrase is empty'), and `--trace=state.json --volume-state state.json` wiped the
    rollback pins. Every file the run reads is now refused as a trace target, untouched."""
    image, module, key, state = (tmp_path / "notes.img", tmp_path / "hello.wasm", tmp_path / "key.bin",
                                 tmp_path / "state.json")
    make_volume(image)
    key.write_bytes(PASSPHRASE)
    shutil.copy(wasm_fixture("hello"), module)
    completed = keep_run(["--volume", str(image), "--key-file", str(key), "--volume-state", str(state),
                          str(module)], keep_environment)
    assert completed.returncode == 0, completed.stderr
    config = tmp_path / "keep.toml"
    config.write_text('args = ["from-config"]\n')
    before = {path: path.read_bytes() for path in (key, state, config)}
    for target, option in ((key, "--key-file"), (state, "--volume-state"), (config, "--config")):
        extra = ["--config", str(config)] if option == "--config" else []
        completed = keep_run([f"--trace={target}", "--volume", str(image), "--key-file", str(key),
                              "--volume-state", str(state), *extra, str(module)], keep_environment)
        assert completed.returncode == 2, completed.stderr
        assert completed.stderr.decode() == (f"keep: --trace={target}: refusing to overwrite the file of "
                                             f"{option} (give the trace a file name of its own)\n")
    assert {path: path.read_bytes() for path in before} == before
    link = tmp_path / "another-name"  # however the trace file is spelled
    link.symlink_to(key)
    completed = keep_run([f"--trace={link}", "--volume", str(image), "--key-file", str(key), str(module)],
                         keep_environment)
    assert completed.returncode == 2 and key.read_bytes() == PASSPHRASE
    trace = tmp_path / "trace.txt"
    completed = keep_run([f"--trace={trace}", "--volume", str(image), "--key-file", str(key),
                          "--volume-state", str(state), str(module)], keep_environment)
    assert completed.returncode == 0, completed.stderr
    assert "fd_write(fd=1" in trace.read_text()
    new_state = tmp_path / "new-state.json"  # not there yet: refused, and not left behind empty
    completed = keep_run([f"--trace={tmp_path}/./new-state.json", "--volume", str(image), "--key-file",
                          str(key), "--volume-state", str(new_state), str(module)], keep_environment)
    assert completed.returncode == 2 and b"refusing to overwrite the file of --volume-state" in completed.stderr
    assert not new_state.exists()


def test_files_too_big_for_the_plugins_volume_are_an_error_not_a_truncated_file(
        wasm_fixture: WasmFixture, keep: KeepRunner) -> None:
    """The `keep` fixture wrote `files=` with one pwrite and ignored its count: a 16 MiB file on
    the default 32 MiB volume (16 MiB of it the LUKS2 header) reached the guest as about 12 MiB,
    silently, and the test then ran against data it never gave. Now a short write is continued
    until the volume is full, and a tree that does not fit is an error naming `volume_size=`,
    which gives a larger volume."""
    big = bytes(range(256)) * (16 << 12)  # 16 MiB
    with pytest.raises(OSError, match=r"do not fit .* volume_size="):
        keep(wasm_fixture("hello"), files={"big.bin": big})
    result = keep(wasm_fixture("hello"), files={"big.bin": big}, volume_size=48 << 20)
    assert result.exit_code == 0
    assert result.files["big.bin"] == big


def test_invoking_an_export_with_v128_values_is_a_one_line_error_not_an_abort(
        tmp_path: Path, keep_environment: dict[str, str]) -> None:
    """`keep run --invoke` of a function taking or returning a v128 (or an `_initialize` returning
    one) killed keep with SIGABRT: wasmtime's C API panics ('support for v128 is not implemented')
    when asked a v128's kind, which reading the parameters and converting the results did. The exit
    status, 134, is the one a guest trap gives, so a script blamed the guest. Now it is refused
    before anything asks for the kind: `cannot invoke ...`, exit status 1."""
    import wasmtime

    module = tmp_path / "simd.wasm"
    module.write_bytes(wasmtime.wat2wasm('''(module
        (func (export "make") (result v128) v128.const i32x4 1 2 3 4)
        (func (export "take") (param v128) (result i32) i32.const 7)
        (func (export "mixed") (param i32) (result i32 v128) local.get 0 v128.const i64x2 0 0)
        (func (export "plain") (param i32) (result i32) local.get 0))'''))
    for export, arguments in (("make", []), ("take", ["1"]), ("mixed", ["1"])):
        completed = keep_run(["--invoke", export, str(module), *arguments], keep_environment)
        assert completed.returncode == 1, completed.stderr
        assert completed.stderr.decode() == (f"keep: cannot invoke `{export}`: values of type v128 "
                                             "are not supported\n")
    completed = keep_run(["--invoke", "plain", str(module), "41"], keep_environment)
    assert (completed.returncode, completed.stdout) == (0, b"41\n")
    reactor = tmp_path / "reactor.wasm"
    reactor.write_bytes(wasmtime.wat2wasm('''(module
        (func (export "_initialize") (result v128) v128.const i32x4 0 0 0 0)
        (func (export "plain") (result i32) i32.const 5))'''))
    completed = keep_run(["--invoke", "plain", str(reactor)], keep_environment)
    assert completed.returncode == 1, completed.stderr
    assert completed.stderr.decode() == ("keep: cannot invoke `_initialize`: values of type v128 "
                                         "are not supported\n")


def test_a_plugin_run_stopped_by_its_timeout_says_so(wasm_fixture: WasmFixture, keep: KeepRunner) -> None:
    """The fixture stops every guest after `timeout=` (60 s unless given), but a guest stopped that
    way came back as exit status 134 with only wasmtime's 'wasm trap: interrupt': a test failing
    on it read like a crash of the app, with nothing naming the fixture's own limit (keep run says
    'it ran longer than --timeout'). The trap text now ends with the limit that stopped it; a
    guest's own trap is left as it was."""
    result = keep(wasm_fixture("endless_loop"), timeout=0.5)
    assert result.exit_code == 134 and result.stdout == b"looping\n"
    assert result.trap is not None and "wasm trap: interrupt" in result.trap
    assert result.trap.endswith("\nthe guest was stopped: it ran longer than the fixture's timeout=0.5 s")
    trapped = keep(wasm_fixture("exit_code"), args=["trap"])
    assert trapped.exit_code == 134 and trapped.trap is not None
    assert "stopped" not in trapped.trap and "timeout" not in trapped.trap


def test_calls_of_a_name_that_is_no_preview1_function_is_an_error(
        wasm_fixture: WasmFixture, keep: KeepRunner) -> None:
    """`result.calls("fd_wirte")` (or "write", or "path_open " with a space) returned [] like a
    call the guest never made, so `assert not result.calls(...)` passed whatever the app did: a
    test that cannot fail. A name that is no preview1 function is now a ValueError naming it."""
    result = keep(wasm_fixture("hello"), directory="memfs")
    assert result.calls("fd_write")
    assert result.calls("sock_accept") == []  # a real name the guest did not call
    for wrong in ("fd_wirte", "write", "path_open "):
        with pytest.raises(ValueError, match=f"{wrong!r} is not a WASI preview1 function"):
            result.calls(wrong)


def test_a_trace_to_dev_stderr_appends_to_the_log_instead_of_overwriting_it(
        wasm_fixture: WasmFixture, tmp_path: Path, keep_environment: dict[str, str]) -> None:
    """`--trace=/dev/stderr` with `2>>build.log` reopened the log through /proc/self/fd/2 as a new
    file (its own offset, no O_APPEND) and emptied it: everything the log held before was lost,
    and the trace and the guest's own stderr then overwrote each other. A target that is one of
    keep's standard streams is now written through that stream (shared offset and append mode);
    `--trace=FILE < FILE` is refused instead of emptying the guest's stdin."""
    log = tmp_path / "build.log"
    log.write_bytes(b"an earlier line\n")
    echo = wasm_fixture("echo")
    with log.open("ab") as stderr:
        completed = subprocess.run(["keep", "run", "--trace=/dev/stderr", str(echo)], input=b"x" * 5,
                                   stdout=subprocess.PIPE, stderr=stderr, env=keep_environment, check=False)
    assert completed.returncode == 0 and completed.stdout == b"x" * 5
    lines = log.read_text().splitlines()
    assert lines[0] == "an earlier line"
    assert "echoed 5 bytes" in lines  # the guest's stderr, whole, on a line of its own
    assert [line for line in lines[1:] if line != "echoed 5 bytes"] and all(
        "(" in line and ") = " in line for line in lines[1:] if line != "echoed 5 bytes")
    stdin = tmp_path / "input.txt"
    stdin.write_bytes(b"the guest's input\n")
    with stdin.open("rb") as source:
        completed = subprocess.run(["keep", "run", f"--trace={stdin}", str(echo)], stdin=source,
                                   capture_output=True, env=keep_environment, check=False)
    assert completed.returncode == 2
    assert completed.stderr.decode() == (f"keep: --trace={stdin}: refusing to overwrite the file of "
                                         "stdin (give the trace a file name of its own)\n")
    assert stdin.read_bytes() == b"the guest's input\n"


def test_the_plugins_stdin_takes_text_and_a_bad_env_is_named(wasm_fixture: WasmFixture, keep: KeepRunner) -> None:
    """`stdin="text"` failed deep in wasi_host with 'string argument without an encoding' (files=
    takes str contents, so stdin= looked as if it would too), and `env={"N": 1}` with 'expected
    str, bytes or os.PathLike object, not int' from os.fsencode. stdin= now takes a str as UTF-8;
    an env entry that is not str -> str is a TypeError naming env=."""
    result = keep(wasm_fixture("echo"), stdin="héllo", directory="memfs")
    assert (result.exit_code, result.stdout) == (0, "héllo".encode())
    with pytest.raises(TypeError, match=r"env= takes str names and values: 'N': 1"):
        keep(wasm_fixture("echo"), env={"N": 1}, directory="memfs")  # type: ignore[dict-item]


def test_a_trace_on_a_pipe_or_terminal_given_by_name_is_audited(
        wasm_fixture: WasmFixture, keep_environment: dict[str, str]) -> None:
    """`--audit-host` searched a named trace target only as a file after the run: for
    `--trace=/dev/stderr` on a pipe (or a terminal, a FIFO) there is no file to read, so the audit
    said 'not found in plaintext (searched ... trace file /dev/stderr ...)' and exited 0 while
    the trace it had just written there (--trace-data) held the marker. A trace target that is
    not a regular file is now searched as it is written, as `--trace` on stderr is."""
    marker = b"AUDITED-MARKER-8"
    completed = subprocess.run(["keep", "run", "--trace=/dev/stderr", "--trace-data", "--audit-host",
                                marker.decode(), str(wasm_fixture("echo"))], input=marker + b"\n",
                               capture_output=True, env=keep_environment, check=False)
    stderr = completed.stderr.decode()
    assert completed.returncode == 3, stderr
    assert "keep: audit-host:   the trace on /dev/stderr: plain at offset" in stderr
    assert "trace file /dev/stderr" not in stderr  # not claimed as searched when it cannot be
    completed = subprocess.run(["keep", "run", "--trace=/dev/stderr", "--audit-host", marker.decode(),
                                str(wasm_fixture("echo"))], input=marker + b"\n",
                               capture_output=True, env=keep_environment, check=False)
    assert completed.returncode == 0, completed.stderr  # sizes only: no plaintext in the trace


def test_trace_data_or_a_trace_format_without_trace_is_a_usage_error(
        wasm_fixture: WasmFixture, keep_environment: dict[str, str]) -> None:
    """`keep run --trace-data app.wasm` (or `--trace-format jsonl` alone) ran the app untraced and
    said nothing: the user asked to see the bytes and got no trace, with no hint that `--trace`
    turns tracing on. Now a usage error, exit 2, before the run."""
    for option in ("--trace-data", "--trace-format=jsonl"):
        completed = keep_run([option, str(wasm_fixture("hello"))], keep_environment)
        assert completed.returncode == 2 and completed.stdout == b""
        assert completed.stderr.decode() == f"keep: {option.split('=')[0]} needs --trace[=FILE]\n"
    completed = keep_run(["--trace", "--trace-data", str(wasm_fixture("hello"))], keep_environment)
    assert completed.returncode == 0 and b'data="Hello, world!\\n"' in completed.stderr


def test_invoke_prints_floats_as_wasmtime_does(tmp_path: Path, keep_environment: dict[str, str]) -> None:
    """`--invoke` printed an f32 result as its f64 widening, 0.1 as 0.10000000149011612 (digits
    the f32 does not hold), and floats in Python's spelling (1.0, nan, 1e+40) where wasmtime's
    CLI prints Rust's (1, NaN, 10000000000000000000000000000000000000000). Now each result is
    printed as wasmtime prints it: the shortest digits that give back the value at its own width,
    never an exponent."""
    import wasmtime

    module = tmp_path / "floats.wasm"
    module.write_bytes(wasmtime.wat2wasm('''(module
        (func (export "floats") (result f32 f64 f64 f32 f64 f64 f64 f32 i32 i64)
            f32.const 0.1 f64.const 1.0 f64.const 1e40 f32.const nan f64.const -0.0
            f64.const 1e-7 f64.const -inf f32.const 3.4028235e38 i32.const -1 i64.const 5)
        (func (export "half") (param f32) (result f32) local.get 0))'''))
    completed = keep_run(["--invoke", "floats", str(module)], keep_environment)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.decode().splitlines() == [
        "0.1", "1", "10000000000000000000000000000000000000000", "NaN", "-0", "0.0000001", "-inf",
        "340282350000000000000000000000000000000", "-1", "5"]
    completed = keep_run(["--invoke", "half", str(module), "0.3"], keep_environment)
    assert completed.stdout == b"0.3\n"


def test_the_trace_file_never_overwrites_the_tls_key_of_keep_toml(
        wasm_fixture: WasmFixture, tmp_path: Path, keep_environment: dict[str, str]) -> None:
    """keep.toml's TLS files are read when the sockets open, after the trace file was opened and
    emptied: `--trace=key.pem --config keep.toml` (whose [tls] key is key.pem) destroyed the
    keep's private key, then failed with 'key.pem: holds no PEM private key'."""
    import trustme

    authority = trustme.CA()
    server = authority.issue_cert("localhost")
    certificate, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    server.cert_chain_pems[0].write_to_path(str(certificate))
    server.private_key_pem.write_to_path(str(key))
    config = tmp_path / "keep.toml"
    config.write_text('[tls]\ncertificate = "cert.pem"\nkey = "key.pem"\n\n'
                      '[[files]]\nkind = "stdin"\n[[files]]\nkind = "stdout"\n[[files]]\nkind = "stderr"\n'
                      '[[files]]\nkind = "listen"\nname = "web"\naddr = "127.0.0.1"\nport = 0\n')
    before = key.read_bytes(), certificate.read_bytes()
    for target, what in ((key, "tls.key"), (certificate, "tls.certificate")):
        completed = keep_run([f"--trace={target}", "--config", str(config), str(wasm_fixture("hello"))],
                             keep_environment)
        assert completed.returncode == 2, completed.stderr
        assert completed.stderr.decode() == (f"keep: --trace={target}: refusing to overwrite the file of "
                                             f"keep.toml's {what} (give the trace a file name of its own)\n")
    assert (key.read_bytes(), certificate.read_bytes()) == before
    completed = keep_run([f"--trace={tmp_path / 'trace.txt'}", "--config", str(config),
                          str(wasm_fixture("hello"))], keep_environment)
    assert completed.returncode == 0, completed.stderr


def test_files_contents_that_are_not_bytes_or_text_are_refused(wasm_fixture: WasmFixture, keep: KeepRunner) -> None:
    """`files={"count.txt": 3}` gave the guest three NUL bytes (bytes(3)), not "3": the contents
    went through bytes() whatever they were. Contents must now be bytes-like or str; anything else
    is a TypeError naming the file."""
    with pytest.raises(TypeError, match=r"files: 'count.txt' must be bytes or str, not int"):
        keep(wasm_fixture("hello"), files={"count.txt": 3}, directory="memfs")  # type: ignore[dict-item]
    result = keep(wasm_fixture("hello"), files={"a.bin": bytearray(b"ab"), "b.bin": memoryview(b"cd"),
                                                "c.txt": "é"}, directory="memfs")  # type: ignore[dict-item]
    assert result.files == {"a.bin": b"ab", "b.bin": b"cd", "c.txt": "é".encode()}


def test_a_bad_timeout_for_the_fixture_is_worded_for_the_fixture(wasm_fixture: WasmFixture, keep: KeepRunner) -> None:
    """`keep(..., timeout=0)` failed with keep run's usage error, '--timeout must be a positive
    number of seconds', an option the test never used, and only after the guest's volume had been
    made and filled. Now a ValueError naming `timeout=`, before anything is built."""
    for bad in (0, -1.5, float("nan")):
        with pytest.raises(ValueError, match=r"^timeout= must be a positive number of seconds or None"):
            keep(wasm_fixture("hello"), timeout=bad)
