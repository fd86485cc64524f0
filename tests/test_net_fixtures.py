"""WASI servers and clients in the keep, driven through the real CLI (`keep run --config`), talking
TLS 1.3 to real clients on loopback: Python's ssl, `openssl s_client`, `curl`, a recording proxy.

Every keep serves a fixed number of connections and exits by itself; `KeepProcess.finish` kills it
and fails the test if it does not.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import secrets
import shutil
import signal
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from keep_net import (
    STDIO,
    RecordingProxy,
    connect_entry,
    free_port,
    keep_env,
    listen_entry,
    run_keep_sync,
    start_keep,
    start_listening_keep,
)

from net.tls import spki_sha256

TEST_DEADLINE = 90.0


def deadline(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Fail an async test that runs longer than TEST_DEADLINE instead of hanging the suite."""

    @functools.wraps(test)
    async def bounded(*args: object, **kwargs: object) -> None:
        with trio.fail_after(TEST_DEADLINE):
            await test(*args, **kwargs)

    return bounded


async def echo_once(port: int, context: ssl.SSLContext, payload: bytes) -> bytes:
    """Send `payload` over TLS, read as many bytes back, close with close_notify."""
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
    received = bytearray()
    async with stream:
        await stream.send_all(payload)
        while len(received) < len(payload):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            received += chunk
    return bytes(received)


@pytest.fixture
def env(keep_environment: dict[str, str]) -> dict[str, str]:
    return keep_env(keep_environment)


@deadline
async def test_echo_server_serves_many_python_ssl_clients_at_once(
        tmp_path: Path, wasm_fixture, env: dict[str, str]) -> None:
    clients = 20
    async with trio.open_nursery() as nursery:
        keep = await start_listening_keep(nursery, tmp_path, wasm_fixture("net_echo_server"),
                                          "echo", [str(clients)], env)
        port = keep.port
        context = keep.client_context()
        payloads = [secrets.token_bytes(1000 * (i + 1)) for i in range(clients)]
        results: dict[int, bytes] = {}

        async def one(index: int) -> None:
            results[index] = await echo_once(port, context, payloads[index])

        async with trio.open_nursery() as clients_nursery:
            for index in range(clients):
                clients_nursery.start_soon(one, index)
        assert [results[i] == payloads[i] for i in range(clients)] == [True] * clients
        assert await keep.finish() == 0
    assert f"served {clients} errors 0" in keep.stdout


@deadline
async def test_socket_calls_peek_waitall_nonblocking_shutdown_and_errors(
        tmp_path: Path, wasm_fixture, env: dict[str, str]) -> None:
    port = free_port()
    async with trio.open_nursery() as nursery:
        keep = await start_keep(nursery, tmp_path, wasm_fixture("net_socket_calls"),
                                STDIO + listen_entry("probe", port), ["probe"], env)
        await keep.wait_for_output("accept nonblocking, nobody there")
        context = keep.client_context()
        await trio.to_thread.run_sync(_socket_calls_client, port, context)
        assert await keep.finish() == 0
    assert keep.stdout.splitlines() == [
        "accept nonblocking, nobody there: EAGAIN",
        "poll listener: 1",
        "listener readable: yes",
        "accept: 0",
        "recv on listener: ENOTCONN",
        'recv PEEK 5: 5 "hello"',
        'recv 5: 5 "hello"',
        "poll buffered plaintext: 1",
        "readable: yes",
        'recv WAITALL 6: 6 " world"',
        "recv nonblocking, nothing sent: EAGAIN",
        "send ready: 5",
        'recv WAITALL 9: 9 "abcdefghi"',
        "shutdown WR: 0",
        "send after shutdown: EPIPE",
        'recv after our shutdown: 14 "after-shutdown"',
        "recv after peer dropped: ECONNRESET",
        "close: 0",
        "accept 2: 0",
        "send until the dropped peer is noticed: EPIPE",
        "close 2: 0",
    ]


def _socket_calls_client(port: int, context: ssl.SSLContext) -> None:
    """The peer of fixtures/net_socket_calls.c (blocking Python ssl, in a thread)."""
    import socket
    import time

    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    # suppress_ragged_eofs=False: an EOF without close_notify raises, so b"" proves close_notify.
    tls = context.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False)
    tls.sendall(b"hello world")
    assert tls.recv(5) == b"ready"
    for part in (b"abc", b"def", b"ghi"):
        tls.sendall(part)
        time.sleep(0.05)
    assert tls.recv(100) == b""  # the keep's shutdown(SHUT_WR) arrived as TLS close_notify
    tls.sendall(b"after-shutdown")  # half-closed: the keep still reads
    time.sleep(0.2)
    raw.close()  # no close_notify: the keep must report ECONNRESET, not a clean end
    second = socket.create_connection(("127.0.0.1", port), timeout=20)
    context.wrap_socket(second, server_hostname="localhost")
    second.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@deadline
async def test_http_server_answers_curl_and_openssl_s_client(
        tmp_path: Path, wasm_fixture, env: dict[str, str]) -> None:
    async with trio.open_nursery() as nursery:
        keep = await start_listening_keep(nursery, tmp_path, wasm_fixture("net_http_server"),
                                          "https", ["3"], env)
        port = keep.port
        curl = await trio.run_process(
            ["curl", "--silent", "--show-error", "--tlsv1.3", "--cacert", str(keep.certificate),
             f"https://localhost:{port}/from-curl"], capture_stdout=True, capture_stderr=True,
            check=False)
        assert curl.returncode == 0, curl.stderr
        assert curl.stdout == b"hello from the keep: /from-curl\n"
        s_client = await trio.run_process(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
             "-CAfile", str(keep.certificate), "-verify_return_error", "-tls1_3", "-ign_eof",
             "-quiet"], stdin=b"GET /from-s_client HTTP/1.1\r\nHost: localhost\r\n\r\n",
            capture_stdout=True, capture_stderr=True, check=False)
        assert b"hello from the keep: /from-s_client" in s_client.stdout, s_client.stderr
        assert b"HTTP/1.1 200 OK" in s_client.stdout
        context = keep.client_context()
        stream = await trio.open_ssl_over_tcp_stream("localhost", port, ssl_context=context)
        async with stream:
            await stream.send_all(b"GET /from-python HTTP/1.1\r\nHost: localhost\r\n\r\n")
            response = bytearray()
            while chunk := await stream.receive_some(4096):
                response += chunk
        assert response.endswith(b"\r\n\r\nhello from the keep: /from-python\n")
        assert await keep.finish() == 0
    assert keep.stdout.splitlines() == ["served /from-curl", "served /from-s_client",
                                        "served /from-python"]


@deadline
async def test_handshake_failures_are_refused_logged_and_others_still_served(
        tmp_path: Path, wasm_fixture, env: dict[str, str]) -> None:
    ca, other_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "clients-ca.pem"))
    async with trio.open_nursery() as nursery:
        keep = await start_listening_keep(nursery, tmp_path, wasm_fixture("net_echo_server"),
                                          "echo", ["1"], env,
                                          client_ca=str(tmp_path / "clients-ca.pem"))
        port = keep.port

        def client_context(certificate: trustme.LeafCert | None) -> ssl.SSLContext:
            context = keep.client_context()
            if certificate is not None:
                certificate.configure_cert(context)
            return context

        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
        refused = {
            "expired client certificate": client_context(
                ca.issue_cert("client.example", not_before=past - datetime.timedelta(days=30),
                              not_after=past)),
            "client certificate from another CA": client_context(other_ca.issue_cert("c.example")),
            "no client certificate": client_context(None),
        }
        for reason, context in refused.items():
            with pytest.raises((trio.BrokenResourceError, ssl.SSLError)):
                echoed = await echo_once(port, context, b"should not pass")
                assert echoed == b"", reason  # TLS 1.3: the refusal may arrive as EOF after send
                raise trio.BrokenResourceError(reason)
        wrong_server_ca = ssl.create_default_context(cadata=other_ca.cert_pem.bytes().decode())
        ca.issue_cert("client.example").configure_cert(wrong_server_ca)
        with pytest.raises(trio.BrokenResourceError):
            await echo_once(port, wrong_server_ca, b"x")
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        async with tcp:
            await tcp.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = bytearray()
            with trio.fail_after(10):
                try:
                    while chunk := await tcp.receive_some(4096):
                        reply += chunk
                except trio.BrokenResourceError:
                    pass
        assert b"HTTP" not in reply
        good = client_context(ca.issue_cert("client.example"))
        assert await echo_once(port, good, b"still serving") == b"still serving"
        assert await keep.finish() == 0
    assert "served 1 errors 0" in keep.stdout
    refusals = [line for line in keep.stderr.splitlines() if "TLS handshake" in line]
    assert len(refusals) == 5, keep.stderr
    assert any("CERTIFICATE_VERIFY_FAILED" in line or "certificate" in line.lower()
               for line in refusals), refusals
    assert "Traceback" not in keep.stderr


@deadline
async def test_recording_proxy_sees_no_plaintext_marker(
        tmp_path: Path, wasm_fixture, env: dict[str, str]) -> None:
    marker = secrets.token_hex(16).encode()
    for prot in ("tls", "tcp"):
        directory = tmp_path / prot
        directory.mkdir()
        port = free_port()
        extra = {"prot": "tcp", "insecure_plaintext": True} if prot == "tcp" else {}
        toml = STDIO + listen_entry("echo", port, **extra)
        if prot == "tcp":  # something must be TLS for the certificate export that signals ready
            toml += listen_entry("unused", free_port())
        async with trio.open_nursery() as nursery:
            keep = await start_keep(nursery, directory, wasm_fixture("net_echo_server"), toml,
                                    ["echo", "1"], env)
            await keep.wait_listening()
            proxy = RecordingProxy(port)
            await nursery.start(proxy.serve)
            payload = b"to the keep " + marker + b" and back"
            if prot == "tls":
                echoed = await echo_once(proxy.port, keep.client_context(), payload)
            else:
                stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
                async with stream:
                    await stream.send_all(payload)
                    echoed = bytearray()
                    while len(echoed) < len(payload):
                        echoed += await stream.receive_some(65536)
                    await stream.send_eof()
            assert echoed == payload
            assert await keep.finish() == 0
            nursery.cancel_scope.cancel()
        wire = bytes(proxy.to_server) + bytes(proxy.to_client)
        assert len(proxy.to_server) >= len(payload) and len(proxy.to_client) >= len(payload)
        # The control (plaintext TCP, explicitly allowed) shows the proxy does see plaintext.
        assert (marker in wire) == (prot == "tcp")


@deadline
async def test_wasi_client_connects_out_with_a_configured_ca_and_with_a_pin(
        tmp_path: Path, wasm_fixture, env: dict[str, str]) -> None:
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_cert.configure_cert(server_context)
    received: list[bytes] = []

    async def handle(stream: trio.SSLStream[trio.SocketStream]) -> None:
        request = bytearray()
        while chunk := await stream.receive_some(4096):
            request += chunk
        received.append(bytes(request))
        await stream.send_all(b"pong: " + bytes(request))
        await stream.aclose()

    from cryptography import x509
    pin = spki_sha256(x509.load_pem_x509_certificate(server_cert.cert_chain_pems[0].bytes()))
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_ssl_over_tcp, handle, 0, server_context)
        port = listeners[0].transport_listener.socket.getsockname()[1]
        wasm = wasm_fixture("net_client")
        cases = {
            "ca": connect_entry("upstream", "localhost", port, ca=str(tmp_path / "ca.pem")),
            "pin": connect_entry("upstream", "127.0.0.1", port, pin_sha256=pin),
        }
        for case, entry in cases.items():
            directory = tmp_path / case
            directory.mkdir()
            result = await trio.to_thread.run_sync(
                lambda d=directory, e=entry, c=case: run_keep_sync(
                    d, wasm, STDIO + e, ["upstream", f"ping via {c}"], env))
            assert result.returncode == 0, result.stderr
            assert result.stdout == f"pong: ping via {case}\n[end of stream]\n"
        nursery.cancel_scope.cancel()
    assert received == [b"ping via ca\n", b"ping via pin\n"]


@deadline
async def test_connect_refuses_a_server_it_cannot_verify(
        tmp_path: Path, wasm_fixture, env: dict[str, str]) -> None:
    ca, other_ca = trustme.CA(), trustme.CA()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(server_context)
    other_ca.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))

    async def handle(stream: trio.SSLStream[trio.SocketStream]) -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # the keep refuses us: expected
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_ssl_over_tcp, handle, 0, server_context)
        port = listeners[0].transport_listener.socket.getsockname()[1]
        wasm = wasm_fixture("net_client")
        cases = {
            "wrong CA": (connect_entry("upstream", "localhost", port,
                                       ca=str(tmp_path / "other-ca.pem")), "CERTIFICATE_VERIFY_FAILED"),
            "wrong pin": (connect_entry("upstream", "localhost", port, pin_sha256="00" * 32),
                          "does not match the pin"),
        }
        for case, (entry, expected) in cases.items():
            directory = tmp_path / case.replace(" ", "-")
            directory.mkdir()
            result = await trio.to_thread.run_sync(
                lambda d=directory, e=entry: run_keep_sync(d, wasm, STDIO + e, ["upstream", "x"], env))
            assert result.returncode != 0
            assert expected in result.stderr, result.stderr
            assert "Traceback" not in result.stderr
            assert result.stdout == ""
        nursery.cancel_scope.cancel()


def test_plaintext_tcp_needs_an_explicit_opt_in(tmp_path: Path, wasm_fixture,
                                                 env: dict[str, str]) -> None:
    wasm = wasm_fixture("net_client")
    toml = STDIO + connect_entry("upstream", "127.0.0.1", free_port(), prot="tcp")
    refused = run_keep_sync(tmp_path, wasm, toml, ["upstream", "x"], env)
    assert refused.returncode != 0
    assert 'prot = "tcp"' in refused.stderr and "insecure" in refused.stderr
    assert "Traceback" not in refused.stderr
    # With the opt-in the policy passes and the keep goes on to connect (nobody listens there).
    allowed = run_keep_sync(tmp_path, wasm, toml, ["upstream", "x"], env,
                            extra=["--insecure-plaintext"])
    assert allowed.returncode != 0
    assert "cannot connect" in allowed.stderr and "insecure" not in allowed.stderr


def test_a_bad_keep_toml_names_the_line_and_key(tmp_path: Path, wasm_fixture,
                                                env: dict[str, str]) -> None:
    toml = STDIO + '[[files]]\nkind = "listen"\nname = "x"\nport = "https"\n'
    result = run_keep_sync(tmp_path, wasm_fixture("net_client"), toml, [], env)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"keep: {tmp_path / 'keep.toml'}:13: files[3].port: "
        "expected a port number 0-65535, got 'https'")


def test_keep_toml_args_env_and_fd_names_reach_the_guest(tmp_path: Path, wasm_fixture,
                                                         env: dict[str, str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    toml = ('args = ["from-toml"]\n[env]\nGREETING = "hello from keep.toml"\n\n' + STDIO
            + listen_entry("web", free_port()))
    result = run_keep_sync(tmp_path, wasm_fixture("args_env"), toml, ["from-cli"], env,
                           extra=["--dir", f"{data}::/data", "--env", "EMPTY="])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "argc=3" in lines and "argv[1]=[from-toml]" in lines and "argv[2]=[from-cli]" in lines
    assert "env[FD_COUNT=5]" in lines
    assert "env[FD_NAMES=stdin:stdout:stderr:/data:web]" in lines
    assert "getenv(GREETING)=[hello from keep.toml]" in lines
    assert "getenv(EMPTY)=[]" in lines


def test_preopened_directories_still_work_next_to_sockets(tmp_path: Path, wasm_fixture,
                                                          env: dict[str, str]) -> None:
    outputs = []
    for case, toml in (("plain", STDIO), ("sockets", STDIO + listen_entry("a", free_port())
                                                     + listen_entry("b", free_port()))):
        sandbox = tmp_path / case / "sandbox"
        sandbox.mkdir(parents=True)
        result = run_keep_sync(tmp_path / case, wasm_fixture("files_basic"), toml, [], env,
                               extra=["--dir", f"{sandbox}::/sandbox"])
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1]
    assert "open O_WRONLY: ok" in outputs[1]  # the pre-open was found: files were opened


def test_null_stdout_discards_output(tmp_path: Path, wasm_fixture, env: dict[str, str]) -> None:
    toml = '[[files]]\nkind = "stdin"\n[[files]]\nkind = "null"\n[[files]]\nkind = "stderr"\n'
    result = run_keep_sync(tmp_path, wasm_fixture("hello"), toml, [], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    plain = run_keep_sync(tmp_path, wasm_fixture("hello"), STDIO, [], env)
    assert plain.stdout != ""


@deadline
async def test_a_client_stuck_in_its_handshake_does_not_hold_up_others(
        tmp_path: Path, wasm_fixture, env: dict[str, str]) -> None:
    async with trio.open_nursery() as nursery:
        keep = await start_listening_keep(nursery, tmp_path, wasm_fixture("net_echo_server"),
                                          "echo", ["3"], env)
        port = keep.port
        silent = await trio.open_tcp_stream("127.0.0.1", port)  # never sends a ClientHello
        half = await trio.open_tcp_stream("127.0.0.1", port)
        await half.send_all(b"\x16\x03\x01\x02\x00")  # the first bytes of a record, then nothing
        context = keep.client_context()
        for index in range(3):
            payload = f"served while two handshakes hang ({index})".encode()
            assert await echo_once(port, context, payload) == payload
        assert await keep.finish() == 0
        await silent.aclose()
        await half.aclose()
    assert "served 3 errors 0" in keep.stdout


def test_timeout_stops_a_guest_blocked_in_accept(tmp_path: Path, wasm_fixture,
                                                 env: dict[str, str]) -> None:
    toml = STDIO + listen_entry("https", free_port())
    result = run_keep_sync(tmp_path, wasm_fixture("net_http_server"), toml, ["https", "1"], env,
                           extra=["--timeout", "1"], timeout=30)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "served" not in result.stdout


@deadline
async def test_ctrl_c_stops_a_guest_blocked_in_accept(tmp_path: Path, wasm_fixture,
                                                      env: dict[str, str]) -> None:
    async with trio.open_nursery() as nursery:
        keep = await start_listening_keep(nursery, tmp_path, wasm_fixture("net_http_server"),
                                          "https", ["1"], env)
        keep.process.send_signal(signal.SIGINT)
        assert await keep.finish(timeout=20) == 130
    assert "Traceback" not in keep.stderr


@deadline
async def test_ctrl_c_still_ends_a_guest_busy_in_wasm_code(tmp_path: Path, wasm_fixture,
                                                           env: dict[str, str]) -> None:
    async with trio.open_nursery() as nursery:
        keep = await start_listening_keep(nursery, tmp_path, wasm_fixture("endless_loop"),
                                          "unused", [], env)
        await keep.wait_for_output("looping")
        keep.process.send_signal(signal.SIGINT)
        assert await keep.finish(timeout=20) == -signal.SIGINT  # as without keep.toml


def test_exported_certificate_of_a_combined_pem_holds_no_key(tmp_path: Path, wasm_fixture,
                                                            env: dict[str, str]) -> None:
    """`certificate = key = "combined.pem"` (chain and key in one file): export_certificate is
    the public part for clients, so the key must not be written next to it on the host."""
    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    combined = tmp_path / "combined.pem"
    combined.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems)
                         + issued.private_key_pem.bytes())
    exported = tmp_path / "exported.pem"
    toml = (f'[tls]\ncertificate = "{combined}"\nkey = "{combined}"\n'
            f'export_certificate = "{exported}"\n\n' + STDIO + listen_entry("web", free_port()))
    result = run_keep_sync(tmp_path, wasm_fixture("net_echo_server"), toml, ["web", "0"], env)
    assert result.returncode == 0, result.stderr
    written = exported.read_bytes()
    assert b"PRIVATE KEY" not in written
    assert [c.public_bytes(serialization.Encoding.PEM)
            for c in x509.load_pem_x509_certificates(written)] == [
        x509.load_pem_x509_certificate(blob.bytes()).public_bytes(serialization.Encoding.PEM)
        for blob in issued.cert_chain_pems]


@deadline
async def test_sigterm_stops_a_guest_blocked_in_accept_with_sigterms_status(
        tmp_path: Path, wasm_fixture, env: dict[str, str]) -> None:
    """keep.toml's sockets stop the guest on SIGTERM themselves; the status still says which
    signal it was (128 + 15), as a run without sockets does."""
    async with trio.open_nursery() as nursery:
        keep = await start_listening_keep(nursery, tmp_path, wasm_fixture("net_http_server"),
                                          "https", ["1"], env)
        keep.process.send_signal(signal.SIGTERM)
        assert await keep.finish(timeout=20) == 128 + signal.SIGTERM
    assert "Traceback" not in keep.stderr and "SIGINT" not in keep.stderr


def test_a_malformed_configured_certificate_is_one_line_naming_the_file(
        tmp_path: Path, wasm_fixture, env: dict[str, str]) -> None:
    (tmp_path / "key.pem").write_bytes(trustme.CA().issue_cert("localhost").private_key_pem.bytes())
    (tmp_path / "cert.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n"
                                        b"-----END CERTIFICATE-----\n")
    toml = (f'[tls]\ncertificate = "{tmp_path / "cert.pem"}"\nkey = "{tmp_path / "key.pem"}"\n\n'
            + STDIO + listen_entry("web", free_port()))
    result = run_keep_sync(tmp_path, wasm_fixture("net_echo_server"), toml, ["web", "0"], env)
    assert result.returncode != 0
    assert result.stderr == (f"keep: {tmp_path / 'cert.pem'}: a PEM certificate in it is "
                             "malformed (its DER does not parse)\n")
