"""shim.sockets over net.streams in-process: a Python thread plays the guest (as the WASI host's
worker thread does) against real TLS clients on loopback. Covers what the WASI fixtures cannot
show directly: bounded buffers (backpressure both ways), non-blocking send's EAGAIN, the poll
waiter with a host fd next to keep sockets, and refusing to set up a keep that breaks policy."""

from __future__ import annotations

import errno
import os
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from cryptography import x509
from keep_net import STDIO, connect_entry, free_port, listen_entry

import net.streams
from net.policy import NetworkPolicy
from net.streams import BUFFER_LIMIT
from net.tls import KeepIdentity, spki_sha256
from shim.config import parse_config
from shim.sockets import (
    ConnectionSocket,
    KeepNetwork,
    ListenerSocket,
    NetworkError,
    open_keep_network,
)
from wasi_host.streams import OsStream


@asynccontextmanager
async def keep_with_listener() -> AsyncIterator[tuple[KeepNetwork, int, ssl.SSLContext]]:
    port = free_port()
    config = parse_config(STDIO + listen_entry("l", port))
    async with open_keep_network(config) as network:
        assert network.identity is not None
        context = ssl.create_default_context(cadata=network.identity.leaf_pem().decode())
        yield network, port, context


async def run_guest(network: KeepNetwork, function: Callable[[], object]) -> object:
    """Run `function` on a worker thread as the guest would; a watchdog stops the keep's sockets
    (the blocked call fails with ECANCELED) instead of letting a broken test hang."""
    async def watchdog() -> None:
        await trio.sleep(30)
        network.stop()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watchdog)
        result = await trio.to_thread.run_sync(function)
        nursery.cancel_scope.cancel()
    return result


async def test_receive_buffer_is_bounded_and_refills_as_the_guest_reads() -> None:
    async with keep_with_listener() as (network, port, context):
        listener = network.sockets[0]
        assert isinstance(listener, ListenerSocket)
        payload = os.urandom(4 * BUFFER_LIMIT)
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
        await stream.do_handshake()
        connection = await run_guest(network, lambda: listener.accept(nonblocking=False))
        assert isinstance(connection, ConnectionSocket)
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, payload)
            with trio.fail_after(10):
                while connection.connection.buffered() < BUFFER_LIMIT:
                    await trio.sleep(0.01)
            await trio.sleep(0.2)  # the sender keeps pushing; the keep must not keep reading
            assert connection.connection.buffered() < BUFFER_LIMIT + 64 * 1024
            received = await run_guest(network, lambda: connection.recv(len(payload), peek=False,
                                                               waitall=True, nonblocking=False))
            assert received == payload


async def test_nonblocking_send_says_eagain_when_the_peer_does_not_read() -> None:
    async with keep_with_listener() as (network, port, context):
        listener = network.sockets[0]
        assert isinstance(listener, ListenerSocket)
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
        await stream.do_handshake()
        connection = await run_guest(network, lambda: listener.accept(nonblocking=False))
        assert isinstance(connection, ConnectionSocket)

        def fill() -> tuple[int, int]:
            chunk = b"z" * 65536
            total = 0
            for _ in range(10_000):  # the kernel buffers take a few MiB, then our buffer fills
                try:
                    total += connection.send(chunk, nonblocking=True)
                except OSError as error:
                    return total, error.errno or 0
            return total, 0

        async with stream:
            total, code = await run_guest(network, fill)  # type: ignore[misc]
            assert code == errno.EAGAIN and total >= BUFFER_LIMIT
            received = 0
            while received < total:  # reading drains everything that was accepted, in order
                received += len(await stream.receive_some(1 << 20))
            assert received == total


async def test_waiter_wakes_for_a_host_fd_next_to_keep_sockets() -> None:
    async with keep_with_listener() as (network, _port, _context):
        read_end, write_end = os.pipe()
        pipe = OsStream(read_end, owned=True)
        listener = network.sockets[0]
        woke: list[float] = []

        def guest() -> None:
            start = time.monotonic()
            network.waiter.wait([(listener, False), (pipe, False)], None)
            woke.append(time.monotonic() - start)

        thread = threading.Thread(target=guest)
        thread.start()
        await trio.sleep(0.2)
        assert not woke  # nothing is ready: the guest is still waiting
        os.write(write_end, b"!")
        with trio.fail_after(10):
            while not woke:
                await trio.sleep(0.01)
        thread.join()
        assert pipe.readiness(False) is not None
        pipe.close()
        os.close(write_end)


async def test_deadline_without_events_returns_in_time() -> None:
    async with keep_with_listener() as (network, _port, _context):
        listener = network.sockets[0]
        start = time.monotonic_ns()
        await run_guest(network, lambda: network.waiter.wait([(listener, False)], start + 50_000_000))
        assert time.monotonic_ns() - start >= 50_000_000


async def test_plaintext_socket_refused_before_anything_is_opened(tmp_path: Path) -> None:
    port = free_port()
    config = parse_config(STDIO + listen_entry("l", port) + connect_entry("c", "127.0.0.1", 9,
                                                                          prot="tcp"))
    with pytest.raises(NetworkError, match='"c" uses prot = "tcp"'):
        async with open_keep_network(config):
            pass
    with trio.socket.socket() as probe:  # the TLS listener before it was never bound
        await probe.bind(("127.0.0.1", port))
    with pytest.raises(NetworkError, match="cannot connect"):
        async with open_keep_network(config, NetworkPolicy(allow_plaintext=True)):
            pass


async def test_an_attested_identity_plugs_in_as_the_certificate_provider() -> None:
    from shim.attest import NO_NONCE, AttestedIdentity, NilBackend, evidence_from_certificate

    class AttestedProvider:
        def __init__(self) -> None:
            self.key = AttestedIdentity()

        def identity(self) -> KeepIdentity:
            return self.key.net_identity(self.key.certificate(NilBackend(), NO_NONCE))

    port = free_port()
    config = parse_config(STDIO + listen_entry("l", port))
    async with open_keep_network(config, provider=AttestedProvider()) as network:
        assert network.identity is not None
        context = ssl.create_default_context(cadata=network.identity.leaf_pem().decode())
        context.check_hostname = False  # the RA-TLS certificate names no host; trust is its key
        stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), context)
        async with stream:
            await stream.do_handshake()
            peer = x509.load_der_x509_certificate(stream.getpeercert(binary_form=True) or b"")
    assert evidence_from_certificate(peer)[0] == "nil"
    assert spki_sha256(peer) == network.identity.spki_sha256()


async def test_a_closed_connection_to_a_peer_that_stopped_reading_is_released(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest fills every buffer towards a client that never reads, then closes: the chunk
    already in flight and the close_notify get CLOSE_TIMEOUT, then the connection is released
    (it used to live, with its tasks and fd, until the whole keep stopped)."""
    monkeypatch.setattr(net.streams, "CLOSE_TIMEOUT", 0.5)
    async with keep_with_listener() as (network, port, context):
        listener = network.sockets[0]
        assert isinstance(listener, ListenerSocket)
        client = await trio.open_tcp_stream("127.0.0.1", port)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stream = trio.SSLStream(client, context, server_hostname="localhost")
        await stream.do_handshake()  # and then never reads
        connection = await run_guest(network, lambda: listener.accept(nonblocking=False))
        assert isinstance(connection, ConnectionSocket)

        def fill_then_close() -> None:
            quiet_since = time.monotonic()
            while time.monotonic() - quiet_since < 1:  # until nothing more fits anywhere
                try:
                    connection.send(b"x" * 65536, nonblocking=True)
                    quiet_since = time.monotonic()
                except BlockingIOError:
                    time.sleep(0.02)
            connection.close()

        board = network.bridge.board
        assert board.live_connections == 1
        await run_guest(network, fill_then_close)
        with trio.move_on_after(20):
            await board.wait_until(lambda: board.live_connections == 0)
        assert board.live_connections == 0
        await stream.aclose()
