"""Session 10's third review of guest sockets through TLS in the keep (net/, shim/sockets.py):
each test reproduces a defect the review confirmed, against real sockets and TLS clients on
loopback. Every test stops by itself; none asserts a timing.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
import trio
import trustme
from fixture_build import WasmFixture
from keep_net import STDIO, connect_entry, keep_env, run_keep_sync

from net.streams import ListenerSettings, ReadinessBoard, open_listener
from net.tls import SelfSignedProvider, server_context

TEST_DEADLINE = 60.0


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


async def test_a_listener_on_every_address_with_port_0_has_one_port_for_both_families() -> None:
    """addr "::" (the default) with port = 0 bound 0.0.0.0 and :: to two different free ports,
    and `Listener.port` named the IPv4 one alone: an IPv6 client of that port was refused. Both
    families now listen on the one port the listener names and take a connection from each."""
    if not _has_ipv6_loopback():
        return
    settings = ListenerSettings(name="web", context=None)
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            board = ReadinessBoard(trio.lowlevel.current_trio_token())
            listener = await open_listener(settings, "::", 0, board, nursery)
            ports = {socket_listener.socket.getsockname()[1]
                     for socket_listener in listener._listeners}
            assert ports == {listener.port}
            for address in ("127.0.0.1", "::1"):  # the port reaches the keep from both families
                tcp = await trio.open_tcp_stream(address, listener.port)
                assert await listener.wait_readable(trio.current_time() + TEST_DEADLINE)
                listener.try_accept().close()
                await tcp.aclose()
            listener.close_connections()
            nursery.cancel_scope.cancel()


async def test_a_server_refusing_the_keeps_client_certificate_after_the_handshake_is_named(
        tmp_path: Path, wasm_fixture: WasmFixture, keep_environment: dict[str, str]) -> None:
    """A connect entry's server that requires a client certificate from another CA: in TLS 1.3
    the keep's handshake completes before the server judges the keep's certificate, so the
    refusal (the server's alert) reached the guest as a bare EPIPE or ECONNRESET and keep's
    stderr said nothing of why. The server's alert is now named on stderr, once."""
    ca, other_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(server_context)
    server_context.verify_mode = ssl.CERT_REQUIRED
    other_ca.configure_trust(server_context)  # not the keep's self-signed certificate

    result, port = await _run_client_against(server_context, tmp_path, wasm_fixture("net_client"),
                                             keep_env(keep_environment))
    assert result.returncode == 1  # the guest's own: its send or recv failed
    assert "Broken pipe" in result.stdout or "reset" in result.stdout, result.stdout
    named = [line for line in result.stderr.splitlines() if "ALERT_UNKNOWN_CA" in line]
    assert len(named) == 1, result.stderr
    assert f"localhost:{port}" in named[0] and named[0].startswith("keep: "), named


async def test_a_server_certificate_that_fails_verification_is_refused_saying_why(
        tmp_path: Path, wasm_fixture: WasmFixture, keep_environment: dict[str, str]) -> None:
    """A connect entry whose server's certificate is from the configured CA but for another name:
    keep said only 'TLS handshake with localhost:PORT failed: CERTIFICATE_VERIFY_FAILED', the
    same for a wrong name, an expired certificate or an unknown issuer. It now carries OpenSSL's
    verification message (here the host name mismatch)."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("other.example").configure_cert(server_context)

    result, port = await _run_client_against(server_context, tmp_path, wasm_fixture("net_client"),
                                             keep_env(keep_environment))
    assert result.returncode != 0 and result.stdout == ""  # the guest never started
    assert result.stderr.count("\n") == 1, result.stderr
    assert f'connect "upstream": TLS handshake with localhost:{port} failed' in result.stderr
    assert "Hostname mismatch" in result.stderr and "localhost" in result.stderr, result.stderr


async def test_a_client_that_does_not_trust_the_keeps_certificate_is_named_as_such(
        caplog: pytest.LogCaptureFixture) -> None:
    """curl or Python's ssl without the exported certificate (the commonest first try) abort the
    handshake with an unknown_ca alert, and the keep logged 'TLS handshake with ... refused:
    TLSV1_ALERT_UNKNOWN_CA': as if the keep had refused the client. The line now says the client
    does not trust the keep's certificate."""
    identity = SelfSignedProvider().identity()
    board = ReadinessBoard(trio.lowlevel.current_trio_token())
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            listener = await open_listener(
                ListenerSettings(name="web", context=server_context(identity)), "127.0.0.1", 0,
                board, nursery)

            def connect_untrusting() -> None:
                """Python's blocking ssl, as curl does, sends its alert before it goes."""
                untrusting = ssl.create_default_context()  # the system's CAs: not the keep's
                with (socket.create_connection(("127.0.0.1", listener.port)) as raw,
                      pytest.raises(ssl.SSLCertVerificationError)):
                    untrusting.wrap_socket(raw, server_hostname="localhost")

            await trio.to_thread.run_sync(connect_untrusting)
            await board.wait_until(lambda: listener.handshake_failures == 1)
            listener.close()
            nursery.cancel_scope.cancel()
    lines = [line for line in caplog.text.splitlines() if "TLSV1_ALERT_UNKNOWN_CA" in line]
    assert len(lines) == 1 and "does not trust the keep's certificate" in lines[0], caplog.text


async def _run_client_against(server_context: ssl.SSLContext, directory: Path, wasm: Path,
                              env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], int]:
    """`keep run` of net_client ("hello") whose connect entry "upstream" (trusting
    directory/ca.pem) reaches a one-connection server on `server_context`: Python's blocking
    ssl, as most servers are, so that a refusal goes out as an alert. The run and the port."""

    def serve_once(listening: socket.socket) -> None:
        listening.settimeout(TEST_DEADLINE)  # a keep that never connects ends the test
        with contextlib.suppress(ssl.SSLError, OSError):
            connection, _ = listening.accept()
            with connection:
                server_context.wrap_socket(connection, server_side=True).close()

    with socket.create_server(("127.0.0.1", 0)) as listening:
        port = listening.getsockname()[1]
        entry = connect_entry("upstream", "localhost", port, ca=str(directory / "ca.pem"))
        with trio.fail_after(TEST_DEADLINE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, serve_once, listening)
                result = await trio.to_thread.run_sync(lambda: run_keep_sync(
                    directory, wasm, STDIO + entry, ["upstream", "hello"], env))
    return result, port
