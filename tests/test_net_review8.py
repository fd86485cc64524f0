"""Session 8's second review of guest sockets through TLS in the keep (net/, shim/sockets.py and
the WASI socket calls): each test reproduces a defect the review confirmed, against real TLS
clients on loopback (Python ssl, trio, `openssl`, `curl`) and the real `keep run` where the
defect showed there. Every test stops by itself; none asserts a timing.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import secrets
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trustme
from core_dumps import core_dumps_allowed
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fixture_build import WasmFixture
from keep_net import (
    KEEP_COMMAND,
    STDIO,
    free_port,
    keep_env,
    listen_entry,
    run_keep_sync,
    start_listening_keep,
)

import net.streams
from net.errors import ConnectFailed
from net.streams import (
    BUFFER_LIMIT,
    Listener,
    ListenerSettings,
    ReadinessBoard,
    open_connection,
    open_listener,
)
from net.tls import (
    KeepIdentity,
    SelfSignedProvider,
    ServerVerification,
    client_context,
    server_context,
)
from shim.sockets import STOP_GRACE_SECONDS

HANG_GUARD = 30.0  # what a test waits before it calls a hang a failure (not a timing check)


@asynccontextmanager
async def tls_listener(identity: KeepIdentity, **settings: object
                       ) -> AsyncIterator[tuple[Listener, int, ssl.SSLContext]]:
    """A net.streams TLS listener on a free loopback port, and a client context trusting it."""
    board = ReadinessBoard(trio.lowlevel.current_trio_token())
    async with trio.open_nursery() as nursery:
        listener = await open_listener(
            ListenerSettings(name="l", context=server_context(identity), **settings),  # type: ignore[arg-type]
            "127.0.0.1", 0, board, nursery)
        client = ssl.create_default_context(cadata=identity.leaf_pem().decode())
        try:
            yield listener, listener.port, client
        finally:
            listener.close()
            nursery.cancel_scope.cancel()


async def test_idle_connections_filling_the_handshake_slots_do_not_lock_out_a_real_client() -> None:
    """Connections that never send a ClientHello used to hold every handshake slot (the accept
    backlog counted handshakes in progress) until their handshake timeout: 128 idle sockets kept
    a keep from serving anyone for 10 s, again and again. The oldest idle handshake now makes room."""
    identity = SelfSignedProvider().identity()
    async with tls_listener(identity, backlog=3, handshake_timeout=3600.0) as (listener, port, client):
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(5)]
        try:
            with trio.fail_after(HANG_GUARD):
                stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=client,
                                                             https_compatible=True)
                await stream.do_handshake()
                await stream.send_all(b"ping")
                await listener._board.wait_until(listener.readable)
            accepted = listener.try_accept()
            with trio.fail_after(HANG_GUARD):
                await accepted._board.wait_until(lambda: accepted.buffered() >= 4)
            assert accepted.try_receive(4) == b"ping"
            assert listener.handshake_failures >= 3  # the oldest idle handshakes gave way
            await stream.aclose()
        finally:
            for tcp in idle:
                await tcp.aclose()



async def test_a_burst_of_slow_clients_filling_the_handshake_slots_waits_and_is_not_dropped() -> None:
    """The other side of the test above: clients whose ClientHello comes late (a slow link),
    more of them than handshake slots, are delayed while every handshake is young, never dropped."""
    identity = SelfSignedProvider().identity()
    async with tls_listener(identity, backlog=2, handshake_grace=3600.0) as (listener, port, client):
        raws = [socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD) for _ in range(5)]

        def handshake(raw: socket.socket) -> None:  # only now the ClientHello goes out
            with client.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"x")

        async with trio.open_nursery() as clients:
            for raw in raws:
                clients.start_soon(trio.to_thread.run_sync, handshake, raw)
            accepted = 0
            with trio.fail_after(HANG_GUARD):
                while accepted < len(raws):
                    await listener._board.wait_until(listener.readable)
                    listener.try_accept().close()
                    accepted += 1
        assert listener.handshake_failures == 0

def _soft_core_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            return line.split()[4]
    raise AssertionError("no core limit line")


async def test_a_keep_with_tls_sockets_and_no_volume_dumps_no_core_holding_its_key(
        tmp_path: Path, wasm_fixture: WasmFixture, keep_environment: dict[str, str]) -> None:
    """`keep run --config` with a TLS listener and no volume never forbade core dumps (only
    reading a volume key did): started with `ulimit -c unlimited`, SIGQUIT left a 61 MB core file
    in its working directory holding the TLS private key (its PEM and its scalar)."""
    certificate = tmp_path / "keep-cert.pem"
    (tmp_path / "keep.toml").write_text(f'[tls]\nexport_certificate = "{certificate}"\n\n'
                                        + STDIO + listen_entry("web", free_port()))
    command = [*KEEP_COMMAND, "run", "--config", str(tmp_path / "keep.toml"),
               str(wasm_fixture("net_http_server")), "web", "1"]
    with core_dumps_allowed():
        process = await trio.lowlevel.open_process(command, cwd=tmp_path, env=keep_env(keep_environment),
                                                   stdin=subprocess.DEVNULL,
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with trio.fail_after(HANG_GUARD):
            while not certificate.exists():  # written once the key is loaded and listening
                assert process.returncode is None, "keep exited early"
                await trio.sleep(0.02)
        assert _soft_core_limit(process.pid) == "0"
        process.send_signal(signal.SIGQUIT)
        with trio.fail_after(HANG_GUARD):
            await process.wait()
        assert process.returncode == -signal.SIGQUIT
        assert [path.name for path in tmp_path.iterdir() if path.name.startswith("core")] == []
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_exporting_the_certificate_over_the_configured_key_file_is_refused(
        tmp_path: Path, wasm_fixture: WasmFixture, keep_environment: dict[str, str]) -> None:
    """`certificate = key = "combined.pem"` (a layout net.tls supports on purpose) with
    `export_certificate` naming the same file: the keep replaced the owner's combined file with
    the certificate alone, destroying the private key on the owner's disk. Refused at start now,
    the file untouched; exporting over a certificate-only file stays allowed."""
    identity = SelfSignedProvider().identity()
    combined = tmp_path / "combined.pem"
    combined.write_bytes(identity.private_key_pem + identity.certificate_chain_pem)
    original = combined.read_bytes()
    for export in (combined, tmp_path / "." / "combined.pem"):
        toml = (f'[tls]\ncertificate = "{combined}"\nkey = "{combined}"\n'
                f'export_certificate = "{export}"\n\n' + STDIO + listen_entry("web", free_port()))
        result = run_keep_sync(tmp_path, wasm_fixture("net_http_server"), toml, ["web", "1"],
                               keep_env(keep_environment), extra=["--timeout", "5"])
        assert result.returncode == 1, result.stderr
        assert result.stderr.count("\n") == 1 and "key" in result.stderr, result.stderr
        assert str(combined.name) in result.stderr
        assert combined.read_bytes() == original
    certificate_only = tmp_path / "certificate.pem"
    key_only = tmp_path / "key.pem"
    certificate_only.write_bytes(identity.certificate_chain_pem)
    key_only.write_bytes(identity.private_key_pem)
    toml = (f'[tls]\ncertificate = "{certificate_only}"\nkey = "{key_only}"\n'
            f'export_certificate = "{certificate_only}"\n\n' + STDIO + listen_entry("web", free_port()))
    result = run_keep_sync(tmp_path, wasm_fixture("net_http_server"), toml, ["web", "1"],
                           keep_env(keep_environment), extra=["--timeout", "1"])
    assert "accept" in result.stderr and "key" not in result.stderr, result.stderr  # ran, timed out
    assert key_only.read_bytes() == identity.private_key_pem


async def test_connecting_to_a_server_that_never_answers_fails_instead_of_hanging(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A keep.toml `connect` entry whose server never completes the TCP handshake (here: its
    accept queue is full, so the kernel drops our SYNs) held `keep run` at start for the kernel's
    SYN retries (over two minutes; `--timeout` only counts once the guest runs), silently. The
    connect now has a deadline (CONNECT_TIMEOUT) and fails as ConnectFailed saying so."""
    monkeypatch.setattr(net.streams, "CONNECT_TIMEOUT", 0.5, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        try:
            for filler in fillers:  # fill the accept queue; the server never accepts
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
            board = ReadinessBoard(trio.lowlevel.current_trio_token())
            async with trio.open_nursery() as nursery:
                with trio.fail_after(HANG_GUARD), pytest.raises(ConnectFailed, match="timed out"):
                    await open_connection("127.0.0.1", port, None, ServerVerification(), board,
                                          nursery)
        finally:
            for filler in fillers:
                filler.close()


async def test_a_connect_to_localhost_reaches_a_server_listening_on_ipv6_loopback_only(
        tmp_path: Path) -> None:
    """`host = "localhost"` was always dialled as 127.0.0.1, so a server bound to ::1 alone (as
    servers that resolve "localhost" to ::1 first do) was 'all attempts to connect ... failed'.
    Both loopback addresses are tried now, IPv4 first, still without asking the resolver."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(server_context)

    async def handle(stream: trio.SSLStream[trio.SocketStream]) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(b"from ::1")
            await stream.aclose()

    verification = ServerVerification(ca_file=tmp_path / "ca.pem")
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(
            trio.serve_ssl_over_tcp, handle, 0, server_context, host="::1"))
        port = listeners[0].transport_listener.socket.getsockname()[1]
        board = ReadinessBoard(trio.lowlevel.current_trio_token())
        with trio.fail_after(HANG_GUARD):
            connection = await open_connection("localhost", port, client_context(verification),
                                               verification, board, nursery)
            await board.wait_until(lambda: connection.has_at_least(8))
        assert connection.try_receive(100) == b"from ::1"
        connection.close()
        nursery.cancel_scope.cancel()


def _identity_valid_between(not_before: datetime.datetime, not_after: datetime.datetime
                            ) -> KeepIdentity:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(not_before).not_valid_after(not_after)
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                                  critical=False)
                   .sign(key, hashes.SHA256()))
    return KeepIdentity(certificate.public_bytes(serialization.Encoding.PEM),
                        key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))


def test_a_configured_certificate_out_of_its_validity_is_named_at_start(
        tmp_path: Path, wasm_fixture: WasmFixture, keep_environment: dict[str, str]) -> None:
    """An expired (or not yet valid) configured certificate started a keep without a word; every
    client then refused the handshake and the keep only logged SSLV3_ALERT_CERTIFICATE_EXPIRED
    per connection. It still starts (a client that pins the key does not check dates), with one
    warning line naming the file and the date."""
    now = datetime.datetime.now(datetime.UTC)
    cases = {
        "expired": _identity_valid_between(now - datetime.timedelta(days=400),
                                           now - datetime.timedelta(days=30)),
        "not valid before": _identity_valid_between(now + datetime.timedelta(days=30),
                                                    now + datetime.timedelta(days=400)),
        "": _identity_valid_between(now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)),
    }
    for words, identity in cases.items():
        (tmp_path / "cert.pem").write_bytes(identity.certificate_chain_pem)
        (tmp_path / "key.pem").write_bytes(identity.private_key_pem)
        toml = (f'[tls]\ncertificate = "{tmp_path / "cert.pem"}"\nkey = "{tmp_path / "key.pem"}"\n\n'
                + STDIO + listen_entry("web", free_port()))
        result = run_keep_sync(tmp_path, wasm_fixture("net_http_server"), toml, ["web", "1"],
                               keep_env(keep_environment), extra=["--timeout", "1"])
        warnings = [line for line in result.stderr.splitlines() if "warning" in line]
        if not words:
            assert warnings == [], result.stderr
            continue
        assert len(warnings) == 1, result.stderr
        assert words in warnings[0] and str(tmp_path / "cert.pem") in warnings[0], warnings
        assert "accept: Operation canceled" in result.stderr  # it ran until --timeout


def test_a_ca_file_holding_no_certificate_is_a_plain_one_line_error(
        tmp_path: Path, wasm_fixture: WasmFixture, keep_environment: dict[str, str]) -> None:
    """`client_ca` (or a connect entry's `ca`) naming a file with no certificate in it said
    'does not load: [X509: NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found
    (_ssl.c:4154)': OpenSSL's code and CPython's source line instead of the problem."""
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("not a certificate\n")
    toml = STDIO + listen_entry("web", free_port(), client_ca=str(not_pem))
    result = run_keep_sync(tmp_path, wasm_fixture("net_http_server"), toml, ["web", "1"],
                           keep_env(keep_environment))
    assert result.returncode == 1
    assert result.stderr == f"keep: CA file {not_pem} holds no PEM certificate\n"
    not_pem.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    result = run_keep_sync(tmp_path, wasm_fixture("net_http_server"), toml, ["web", "1"],
                           keep_env(keep_environment))
    assert result.returncode == 1 and "_ssl.c" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"keep: CA file {not_pem} does not load: a PEM certificate")


async def test_an_ipv6_peer_is_named_with_brackets_in_the_listeners_log(
        caplog: pytest.LogCaptureFixture) -> None:
    """A refused handshake from ::1 was logged as 'TLS handshake with ::1:40312 refused': the
    port ran into the address. IPv6 peers are written [::1]:40312 now, as URLs and curl do."""
    identity = SelfSignedProvider().identity()
    board = ReadinessBoard(trio.lowlevel.current_trio_token())
    async with trio.open_nursery() as nursery:
        listener = await open_listener(ListenerSettings(name="six", context=server_context(identity)),
                                       "::1", 0, board, nursery)
        tcp = await trio.open_tcp_stream("::1", listener.port)
        client_port = tcp.socket.getsockname()[1]
        await tcp.send_all(b"GET / HTTP/1.0\r\n\r\n")  # plaintext HTTP to the TLS port
        with trio.fail_after(HANG_GUARD):
            await board.wait_until(lambda: listener.handshake_failures == 1)
        await tcp.aclose()
        listener.close()
        nursery.cancel_scope.cancel()
    assert f"TLS handshake with [::1]:{client_port} refused: HTTP_REQUEST" in caplog.text


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("error::ResourceWarning")
async def test_connections_waiting_for_a_handshake_slot_are_closed_when_the_keep_stops() -> None:
    """A connection accepted while every handshake slot was taken, and the one in its handshake,
    were left to the garbage collector when the listener and the keep stopped ('ResourceWarning:
    unclosed <socket.socket ...>'): their fds stayed open until then. Both are closed now."""
    identity = SelfSignedProvider().identity()
    async with tls_listener(identity, backlog=1, handshake_grace=3600.0) as (listener, port, _):
        clients = [socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD)
                   for _ in range(2)]
        with trio.fail_after(HANG_GUARD):  # the first in its handshake, the second accepted
            while len(listener._handshakes) < 1:
                await trio.sleep(0.01)
            await trio.sleep(0.2)
    gc.collect()
    for client in clients:
        assert client.recv(10) == b""  # closed by the keep
        client.close()


async def test_a_guest_that_sends_and_exits_leaves_a_slow_reader_its_whole_answer(
        tmp_path: Path, wasm_fixture: WasmFixture, keep_environment: dict[str, str]) -> None:
    """A one-shot server sends its answer, closes and exits; its client reads slowly. The keep
    gave the data still queued inside it STOP_GRACE_SECONDS (2 s) after the guest ended, then cut
    the connection: the client lost the tail and got a TLS truncation (UNEXPECTED_EOF, 950,272 of
    1,000,000 bytes at 80 KB/s). A native process's unsent data is delivered by the kernel after it
    exits; the keep now lets it leave as after close(2), bounded by CLOSE_TIMEOUT without progress."""
    size = 2_000_000
    async with trio.open_nursery() as nursery:
        keep = await start_listening_keep(nursery, tmp_path, wasm_fixture("net_send_exit"), "web",
                                          [str(size)], keep_env(keep_environment))
        context = keep.client_context()

        def slow_client() -> tuple[int, str]:
            raw = socket.create_connection(("127.0.0.1", keep.port), timeout=HANG_GUARD)
            received, outcome = 0, "clean end"
            with context.wrap_socket(raw, server_hostname="localhost",
                                     suppress_ragged_eofs=False) as tls:
                try:
                    while "sent" not in keep.stdout:  # read slowly until the guest has exited
                        received += len(tls.recv(16384))
                        time.sleep(0.01)
                    time.sleep(STOP_GRACE_SECONDS + 1)  # then a pause
                    while data := tls.recv(65536):
                        received += len(data)
                except (OSError, ssl.SSLError) as error:
                    outcome = repr(error)
            return received, outcome

        received, outcome = await trio.to_thread.run_sync(slow_client)
        assert await keep.finish() == 0
    assert (received, outcome) == (size, "clean end")
    assert keep.stdout == f"sent {size}\n"


async def test_ctrl_c_while_the_keep_drains_a_finished_guests_connections_exits_130(
        tmp_path: Path, wasm_fixture: WasmFixture, keep_environment: dict[str, str]) -> None:
    """The drain that the test above needs must give way to the operator: Ctrl-C while a reader
    that stopped reading holds it ended the keep only through the signal fallback 5 s later,
    killed by SIGINT without its exit status. It ends the drain at once now: exit 130."""
    async with trio.open_nursery() as nursery:
        keep = await start_listening_keep(nursery, tmp_path, wasm_fixture("net_send_exit"), "web",
                                          ["2000000"], keep_env(keep_environment))
        context = keep.client_context()

        def read_until_the_guest_is_gone() -> ssl.SSLSocket:
            raw = socket.create_connection(("127.0.0.1", keep.port), timeout=HANG_GUARD)
            tls = context.wrap_socket(raw, server_hostname="localhost")
            while "sent" not in keep.stdout:
                tls.recv(16384)
                time.sleep(0.01)
            return tls  # open, and read no more: its data holds the drain

        tls = await trio.to_thread.run_sync(read_until_the_guest_is_gone)
        try:
            keep.process.send_signal(signal.SIGINT)
            assert await keep.finish() == 130
        finally:
            tls.close()
    assert "Traceback" not in keep.stderr


def test_exporting_the_certificate_over_a_configured_ca_file_is_refused(
        tmp_path: Path, wasm_fixture: WasmFixture, keep_environment: dict[str, str]) -> None:
    """The same mistake with a listener's `client_ca` (or a connect entry's `ca`): the export
    replaced the owner's CA file with the keep's own certificate, so the next start trusted the
    keep instead of the clients' CA. Refused at start, the file untouched."""
    ca = trustme.CA()
    ca_file = tmp_path / "clients-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    original = ca_file.read_bytes()
    toml = (f'[tls]\nexport_certificate = "{ca_file}"\n\n'
            + STDIO + listen_entry("web", free_port(), client_ca=str(ca_file)))
    result = run_keep_sync(tmp_path, wasm_fixture("net_http_server"), toml, ["web", "1"],
                           keep_env(keep_environment), extra=["--timeout", "5"])
    assert result.returncode == 1, result.stderr
    assert result.stderr == (f"keep: export_certificate {ca_file} is the client_ca of socket "
                             '"web": writing the certificate there would replace it\n')
    assert ca_file.read_bytes() == original


async def test_a_flood_of_failed_handshakes_is_not_a_flood_of_log_lines(
        caplog: pytest.LogCaptureFixture) -> None:
    """Every refused handshake was one warning line on the host's log, however many a peer
    sent: 1,000 garbage connections made 1,000 lines (the same for accept errors every 0.1 s under
    EMFILE). At most WARNINGS_PER_MINUTE lines a minute now, then a line saying the rest are
    counted; every failure is still counted."""
    identity = SelfSignedProvider().identity()
    garbage = net.streams.WARNINGS_PER_MINUTE + 15
    async with tls_listener(identity) as (listener, port, _):
        for _ in range(garbage):
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            await tcp.send_all(b"GET / HTTP/1.0\r\n\r\n")  # plaintext HTTP to the TLS port
            await tcp.aclose()
        with trio.fail_after(HANG_GUARD):
            await listener._board.wait_until(lambda: listener.handshake_failures == garbage)
    lines = [record.getMessage() for record in caplog.records if record.name == "keep.net"]
    refusals = [line for line in lines if "refused" in line]
    assert len(refusals) == net.streams.WARNINGS_PER_MINUTE, lines
    assert lines[-1].endswith("more are only counted until the next minute"), lines


async def test_shutdown_write_sends_close_notify_while_unread_data_waits() -> None:
    """A guest that answers, then shutdown(SHUT_WR)s while the peer's upload sits unread in the
    keep: close_notify waited until the guest read the upload (the peer saw 'bye', then nothing),
    where Linux sends the FIN at once. It leaves at once now, and the upload stays readable."""
    identity = SelfSignedProvider().identity()
    async with tls_listener(identity) as (listener, port, client_context_):
        client = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=client_context_)
        upload = secrets.token_bytes(2 << 20)
        async with client, trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, upload)
            with trio.fail_after(HANG_GUARD):
                await listener._board.wait_until(listener.readable)
                connection = listener.try_accept()
                await connection._board.wait_until(lambda: not connection.has_at_least(1 << 30)
                                                   and connection.buffered() >= BUFFER_LIMIT)
            assert connection.try_send(b"bye") == 3
            connection.shutdown_write()  # without reading the upload
            answer = bytearray()
            with trio.fail_after(HANG_GUARD):
                while data := await client.receive_some(65536):
                    answer += data
            assert answer == b"bye"  # and then close_notify: the end of the stream
            received = bytearray()
            with trio.fail_after(HANG_GUARD):
                while len(received) < len(upload):
                    await connection._board.wait_until(connection.readable)
                    received += connection.try_receive(1 << 20)
            assert received == upload
            connection.close()


async def test_shutdown_write_after_the_peer_cut_its_tcp_connection_is_not_an_error() -> None:
    """The other side of the test above: when the peer's TCP has ended (its EOF is in TLS's
    incoming buffer, which then refuses writes), setting records aside must not break the
    shutdown; the guest still reads what came and then the cut (ECONNRESET)."""
    identity = SelfSignedProvider().identity()
    async with tls_listener(identity) as (listener, port, client_context_):
        def client() -> None:
            raw = socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD)
            tls = client_context_.wrap_socket(raw, server_hostname="localhost")
            tls.sendall(b"last words")
            socket.socket(fileno=tls.detach()).close()  # the TCP ends without close_notify

        await trio.to_thread.run_sync(client)
        with trio.fail_after(HANG_GUARD):
            await listener._board.wait_until(listener.readable)
        connection = listener.try_accept()
        with trio.fail_after(HANG_GUARD):
            await connection._board.wait_until(lambda: connection.has_at_least(1 << 20))
        connection.shutdown_write()
        assert connection.try_receive(100) == b"last words"
        with pytest.raises(ConnectionResetError):
            connection.try_receive(100)
        connection.close()
        with trio.fail_after(HANG_GUARD):  # its tasks end (an error in them would fail the test)
            await listener._board.wait_until(lambda: not listener._connections)


async def test_the_listeners_warnings_on_stderr_carry_the_keep_prefix(
        tmp_path: Path, wasm_fixture: WasmFixture, keep_environment: dict[str, str]) -> None:
    """keep's own lines on stderr start with 'keep: ', so that they stand apart from the
    guest's stderr, which shares the stream; the listeners' warnings (keep.net's logger) came
    bare: 'listener web: TLS handshake with ... refused: HTTP_REQUEST'."""
    async with trio.open_nursery() as nursery:
        keep = await start_listening_keep(nursery, tmp_path, wasm_fixture("net_http_server"), "web",
                                          ["1"], keep_env(keep_environment))

        def speak_plain_http() -> None:
            with socket.create_connection(("127.0.0.1", keep.port), timeout=HANG_GUARD) as raw:
                raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
                raw.recv(4096)  # the keep hangs up

        await trio.to_thread.run_sync(speak_plain_http)
        with trio.fail_after(HANG_GUARD):
            while "HTTP_REQUEST" not in keep.stderr:
                await trio.sleep(0.02)
        keep.process.send_signal(signal.SIGTERM)
        await keep.finish()
    lines = [line for line in keep.stderr.splitlines() if "HTTP_REQUEST" in line]
    assert lines and all(line.startswith("keep: listener web: TLS handshake with ") for line in lines), lines
