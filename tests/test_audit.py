"""`keep run --audit-host MARKER`: every place outside the keep holding the marker in plaintext
(plain, UTF-16, base64) is reported and makes the run exit 3; an encrypted volume and a TLS
socket show none, a --dir and a plaintext TCP socket do."""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import trio
from fixture_build import WasmFixture
from keep_net import STDIO, free_port, keep_env, listen_entry, start_keep
from run_volume_support import PASSPHRASE, make_volume

from shim.audit import AUDIT_EXIT_STATUS, Finding, WireRecorder, audit_host, marker_forms
from shim.errors import UsageError
from storage.volume import open_volume

ALPHABET_MARKER = "abcdefghijklmnop"  # short_write_ok.c writes the alphabet over and over
MARKER = b"AUDIT-MARKER-7c31e9"


def found_forms(data: bytes, tmp_path: Path, marker: bytes = MARKER) -> set[str]:
    target = tmp_path / "sample.bin"
    target.write_bytes(data)
    return {finding.form for finding in audit_host(marker, [("sample", target)])}


@pytest.mark.parametrize("prefix", [b"", b"x", b"xy", b"xyz", b"\x00\xff\x10\x20"])
def test_base64_is_found_at_every_alignment(prefix: bytes, tmp_path: Path) -> None:
    encoded = base64.b64encode(prefix + MARKER + b"tail")
    assert found_forms(b"header " + encoded + b" trailer", tmp_path) == {"base64"}
    binary = b"\xfb\xef\xff" * 3 + MARKER  # encodes with '+' and '/', which base64url replaces
    assert "base64url" in found_forms(base64.urlsafe_b64encode(prefix + binary), tmp_path, marker=binary)


def test_plain_and_utf16_forms_are_found_and_nothing_else(tmp_path: Path) -> None:
    text = MARKER.decode()
    assert found_forms(b"..." + MARKER, tmp_path) == {"plain"}
    assert found_forms(text.encode("utf-16-le"), tmp_path) == {"utf-16le"}
    assert found_forms(b"\x00" + text.encode("utf-16-be"), tmp_path) == {"utf-16be"}
    assert found_forms(MARKER[:-1] + b"?" + bytes(reversed(MARKER)), tmp_path) == set()


def test_a_marker_across_a_chunk_boundary_and_in_subdirectories_is_found(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    big = tmp_path / "a" / "b" / "big.bin"
    boundary = 1 << 20
    big.write_bytes(bytes(boundary - 5) + MARKER + bytes(100))
    (tmp_path / "clean.txt").write_text("nothing here")
    assert audit_host(MARKER, [("--dir", tmp_path)]) == [Finding(f"--dir {big}", "plain", boundary - 5)]
    assert audit_host(MARKER, [("missing", tmp_path / "nope")]) == []


def test_a_short_marker_is_refused() -> None:
    with pytest.raises(UsageError, match="at least 6 bytes"):
        marker_forms(b"abc")
    with pytest.raises(UsageError, match="at least 6 bytes"):
        WireRecorder(b"short")


def test_the_wire_recorder_finds_a_marker_split_across_chunks() -> None:
    recorder = WireRecorder(MARKER)
    recorder.record("conn", "sent", b"xx" + MARKER[:5])
    recorder.record("conn", "sent", MARKER[5:] + b"yy")
    recorder.record("conn", "received", MARKER[:5])  # another direction: never joined
    recorder.record("other", "received", MARKER[5:])
    assert recorder.findings() == [Finding("socket conn (sent)", "plain", 2)]
    assert recorder.byte_count == 2 * len(MARKER) + 4


def run_keep(arguments: list[str], environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["keep", "run", *arguments], capture_output=True, text=True, env=environment)


def test_a_guest_writing_the_marker_to_a_host_dir_is_flagged(wasm_fixture: WasmFixture, tmp_path: Path,
                                                            keep_environment: dict[str, str]) -> None:
    completed = run_keep(["--audit-host", ALPHABET_MARKER, "--dir", f"{tmp_path}::/sandbox",
                          str(wasm_fixture("short_write_ok"))], keep_environment)
    assert completed.returncode == AUDIT_EXIT_STATUS
    assert completed.stdout == "wrote 10000 bytes in one call\n"
    assert f"keep: audit-host: {ALPHABET_MARKER!r} found in plaintext in 1 place(s)" in completed.stderr
    assert f"keep: audit-host:   --dir {tmp_path}/out.bin: plain at offset 0 (385 times)" in completed.stderr


def test_the_same_guest_on_an_encrypted_volume_leaves_no_plaintext(
        wasm_fixture: WasmFixture, tmp_path: Path, keep_environment: dict[str, str]) -> None:
    image = tmp_path / "volume.img"
    make_volume(image)
    (tmp_path / "key").write_bytes(PASSPHRASE)
    completed = run_keep(["--audit-host", ALPHABET_MARKER, "--volume", f"{image}::/sandbox",
                          "--key-file", str(tmp_path / "key"), str(wasm_fixture("short_write_ok"))],
                         keep_environment)
    assert completed.returncode == 0, completed.stderr
    assert f"keep: audit-host: {ALPHABET_MARKER!r} not found in plaintext (searched " in completed.stderr
    assert f"volume image {image}" in completed.stderr
    with open_volume(image, PASSPHRASE, writable=False) as volume:  # the plaintext is inside
        inode = volume.fs.lookup(1, b"out.bin").ino
        assert volume.fs.read(inode, 0, 100).startswith(ALPHABET_MARKER.encode())


def test_a_trace_with_data_is_itself_a_leak(wasm_fixture: WasmFixture, tmp_path: Path,
                                            keep_environment: dict[str, str]) -> None:
    trace = tmp_path / "trace.log"
    quiet = run_keep(["--audit-host", "Hello, world", f"--trace={trace}", str(wasm_fixture("hello"))],
                     keep_environment)
    assert quiet.returncode == 0 and "not found in plaintext" in quiet.stderr
    loud = run_keep(["--audit-host", "Hello, world", f"--trace={trace}", "--trace-data",
                     str(wasm_fixture("hello"))], keep_environment)
    assert loud.returncode == AUDIT_EXIT_STATUS
    assert f"keep: audit-host:   trace file {trace}: plain at offset" in loud.stderr


def _echo_through(port: int, payload: bytes, certificate: Path | None) -> bytes:
    """Blocking client (run in a thread): connect, retrying until the keep listens; send
    `payload` over TLS (trusting `certificate`) or plain TCP; read as many bytes back."""
    deadline = time.monotonic() + 30
    while True:
        try:
            connection = socket.create_connection(("127.0.0.1", port), timeout=30)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    if certificate is not None:
        context = ssl.create_default_context(cafile=str(certificate))
        connection = context.wrap_socket(connection, server_hostname="127.0.0.1")
    with connection, connection.makefile("rb") as replies:
        connection.sendall(payload)
        return replies.read(len(payload))


@pytest.mark.parametrize("prot", ["tls", "tcp"])
async def test_socket_bytes_are_audited_as_the_host_network_sees_them(
        prot: str, wasm_fixture: WasmFixture, tmp_path: Path, keep_environment: dict[str, str]) -> None:
    port = free_port()
    extra = ["--audit-host", MARKER.decode()] + (["--insecure-plaintext"] if prot == "tcp" else [])
    payload = b"request " + MARKER + b" end"
    async with trio.open_nursery() as nursery:
        keep = await start_keep(nursery, tmp_path, wasm_fixture("net_echo_server"),
                                STDIO + listen_entry("echo", port, prot=prot), ["echo", "1"],
                                keep_env(keep_environment), extra=extra, export=prot == "tls")
        if prot == "tls":
            await keep.wait_listening()
        echoed = await trio.to_thread.run_sync(_echo_through, port, payload,
                                               keep.certificate if prot == "tls" else None)
        status = await keep.finish()
    assert echoed == payload
    if prot == "tls":
        assert status == 0, keep.stderr
        assert "not found in plaintext" in keep.stderr and "socket bytes" in keep.stderr
    else:  # the positive control: the tap does see plaintext TCP
        assert status == AUDIT_EXIT_STATUS, keep.stderr
        assert "keep: audit-host:   socket echo <- 127.0.0.1:" in keep.stderr
        assert "(received): plain at offset 8" in keep.stderr and "(sent): plain at offset 8" in keep.stderr


def test_a_marker_in_a_name_or_a_link_target_is_found(tmp_path: Path) -> None:
    """The host sees the names in a --dir as well as the contents: a file, a directory or a
    symlink named after the marker, or a link pointing at it, is plaintext on the host. The audit
    used to read file contents only (and skip symlinks), so all of these passed as clean."""
    text = MARKER.decode()
    (tmp_path / f"notes-{text}.txt").write_text("clean contents")
    (tmp_path / "sub" / text).mkdir(parents=True)
    (tmp_path / "link").symlink_to(f"../{text}")
    (tmp_path / "utf16").mkdir()
    (tmp_path / "utf16" / base64.b64encode(b"x" + MARKER).decode()).write_bytes(b"")
    found = {(finding.place, finding.form) for finding in audit_host(MARKER, [("--dir", tmp_path)])}
    assert found == {
        (f"--dir {tmp_path / f'notes-{text}.txt'}", "plain in the name"),
        (f"--dir {tmp_path / 'sub' / text}", "plain in the name"),
        (f"--dir {tmp_path / 'link'}", "plain in the link target"),
        (f"--dir {tmp_path / 'utf16' / base64.b64encode(b'x' + MARKER).decode()}", "base64 in the name"),
    }



def test_keep_run_reports_the_names_a_guest_gave_in_a_host_dir(
        wasm_fixture: WasmFixture, tmp_path: Path, keep_environment: dict[str, str]) -> None:
    marker = MARKER.decode()
    completed = run_keep(["--audit-host", marker, "--dir", f"{tmp_path}::/sandbox",
                          str(wasm_fixture("volume_marker")), marker], keep_environment)
    assert completed.returncode == AUDIT_EXIT_STATUS, completed.stderr
    assert f"keep: audit-host:   --dir {tmp_path}/{marker}-dir: plain in the name at offset 0" in completed.stderr
    assert f"--dir {tmp_path}/{marker}-link: plain in the link target at offset 0" in completed.stderr


def test_the_audit_still_runs_when_a_signal_stops_the_guest(
        wasm_fixture: WasmFixture, tmp_path: Path, keep_environment: dict[str, str]) -> None:
    """A server-like guest is stopped by a signal; with --volume, keep commits the volumes and
    exits 128+N, and it used to return before the audit: --audit-host printed nothing at all."""
    import signal

    image, key, stderr = tmp_path / "volume.img", tmp_path / "key", tmp_path / "stderr"
    make_volume(image)
    key.write_bytes(PASSPHRASE)
    marker = MARKER.decode()
    with stderr.open("wb") as errors, subprocess.Popen(
            ["keep", "run", "--audit-host", marker, "--volume", f"{image}::/sandbox", "--key-file", str(key),
             str(wasm_fixture("echo"))], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors,
            env=keep_environment) as process:
        try:
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(b"hello\n")
            process.stdin.flush()
            # echoed back: the guest runs, and now waits in fd_read on the open pipe (b"" if keep
            # ended instead, and the assertions below say why)
            echoed = process.stdout.read(6)
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    text = stderr.read_text()
    assert echoed == b"hello\n", text
    assert process.returncode == 128 + signal.SIGTERM, text
    assert "keep: SIGTERM: guest stopped, volumes committed" in text
    assert f"keep: audit-host: {marker!r} not found in plaintext (searched " in text


def test_ctrl_c_without_volumes_stops_the_guest_and_still_audits(
        wasm_fixture: WasmFixture, tmp_path: Path, keep_environment: dict[str, str]) -> None:
    """Without --volume, Ctrl-C ended `keep run` at once (as wasmtime's CLI does), so a server
    run with --audit-host, which typically ends that way, was never audited. With --audit-host
    the first Ctrl-C stops the guest (here one busy in a wasm loop) and the audit runs."""
    import signal

    marker = MARKER.decode()
    host_dir = tmp_path / "shared"
    host_dir.mkdir()
    (host_dir / "note").write_text(f"left here: {marker}\n")
    with subprocess.Popen(
            ["keep", "run", "--audit-host", marker, "--dir", f"{host_dir}::/shared",
             str(wasm_fixture("endless_loop"))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=keep_environment) as process:
        try:
            assert process.stdout is not None
            assert process.stdout.readline() == b"looping\n"
            process.send_signal(signal.SIGINT)
            _, errors = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    text = errors.decode()
    assert "keep: SIGINT: guest stopped\n" in text
    assert f"keep: audit-host: {marker!r} found in plaintext in 1 place(s)" in text
    assert f"--dir {host_dir}/note: plain at offset 11" in text
    assert process.returncode == AUDIT_EXIT_STATUS, text


@pytest.mark.parametrize("trace_format", ["text", "jsonl"])
def test_a_trace_with_data_on_stderr_is_audited_too(trace_format: str, wasm_fixture: WasmFixture,
                                                     keep_environment: dict[str, str]) -> None:
    """`--trace --trace-data` writes the guest's bytes to the host's stderr; the audit searched
    the trace only when it went to a file, so it said 'not found in plaintext' right under
    trace lines holding the marker."""
    quiet = run_keep(["--audit-host", "Hello, world", "--trace", "--trace-format", trace_format,
                      str(wasm_fixture("hello"))], keep_environment)
    assert quiet.returncode == 0 and "not found in plaintext" in quiet.stderr
    assert "the trace on stderr" in quiet.stderr  # searched, and said so
    loud = run_keep(["--audit-host", "Hello, world", "--trace", "--trace-format", trace_format, "--trace-data",
                     str(wasm_fixture("hello"))], keep_environment)
    assert loud.returncode == AUDIT_EXIT_STATUS, loud.stderr
    form = "plain" if trace_format == "text" else "base64"
    assert f"keep: audit-host:   the trace on stderr: {form} at offset" in loud.stderr
