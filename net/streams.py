"""TLS listeners and connections over trio, usable from a thread that is not trio's.

Theory of operation
-------------------
The guest runs in a worker thread and makes blocking or non-blocking socket calls; TLS runs in
trio. To keep both sides simple and fast, every connection owns two buffers and two trio tasks:

    peer --TLS--> [pump task]   --plaintext--> receive buffer --try_receive()--> guest thread
    peer <--TLS-- [writer task] <--plaintext-- send buffer    <--try_send()----- guest thread

`try_receive` / `try_send` are plain synchronous methods guarded by a lock: they never enter trio,
so a guest reading data that has already arrived pays no thread hop. They raise BlockingIOError
when they would block; the caller then waits on the board from its own thread
(`ReadinessBoard.wait_in_thread`), or in trio with `Connection.wait_readable` / `wait_writable`. Plaintext already decrypted and buffered counts as
readable, which is what `poll_oneoff` must report (Enarx looked at the raw TCP socket instead).

Every state change (data arrived, space freed, connection accepted, peer gone) calls
`ReadinessBoard.changed()`, which wakes whoever waits on the board; waiters re-check their own
predicate. One board per keep: at most a handful of waiters exist at any time.

A `Listener` accepts TCP connections and runs each TLS handshake in its own task with a timeout, so
a slow or hostile client never delays the event loop, the guest or other clients. Failed
handshakes are logged and dropped; completed connections wait in a bounded queue for the guest's
`sock_accept`. Handshakes in progress are bounded too (`backlog` of them). When they are all
taken, a new connection waits for one to end, or for the oldest to have run HANDSHAKE_GRACE
seconds: then the oldest gives way. Peers that connect and send nothing cannot lock real clients
out for their whole handshake timeout, and a burst of real clients on a slow link (every
handshake young) is only delayed, never dropped.

Errors are reported as the OSError subclasses the WASI layer maps to errno: ConnectionResetError
when the peer went away (including a TLS stream cut without close_notify: a truncation the guest
must not mistake for a clean end), BrokenPipeError when writing after the write side is gone.

Half-close: `shutdown_write` drains the send buffer, then sends TLS close_notify once (SSL_shutdown
without waiting for the peer's reply, as trio's own `aclose` does) and keeps receiving.

Close: `close` lets queued data and close_notify leave, as close(2) does, while the peer keeps
reading: a deadline on a cancel scope around the writer, CLOSE_TIMEOUT from the close and again
from every chunk handed on since. A peer that stops reading must not keep a closed connection,
its tasks and its fd for the rest of the keep's life; a slow one still gets everything.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import logging
import math
import os
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

from net.errors import ConnectFailed, HandshakeFailed
from net.tls import ServerVerification, check_pin
from net.wiretap import tapped

log = logging.getLogger("keep.net")

RECEIVE_CHUNK = 64 * 1024
SEND_CHUNK = 64 * 1024  # handed to TLS at a time: the guest can refill while it is encrypted
BUFFER_LIMIT = 256 * 1024
HANDSHAKE_TIMEOUT = 10.0
HANDSHAKE_GRACE = 1.0  # a handshake this old may give way to a new connection when all are taken
LOCALHOST_ADDRESSES = ("127.0.0.1", "::1")
HAPPY_EYEBALLS_DELAY = 0.25  # RFC 8305's Connection Attempt Delay (trio's default too)
CONNECT_TIMEOUT = 10.0  # an outgoing TCP connect; the kernel alone retries SYNs for minutes
CLOSE_TIMEOUT = 10.0
ACCEPT_BACKLOG = 128
PORT_0_ATTEMPTS = 10  # port 0 on every address: tries at one free port for all (see _bind_listeners)
# A client's alerts that say it refused the keep's certificate (RFC 8446 6.2): no CA of its own
# vouches for it, most often a client not given the exported certificate.
UNTRUSTED_ALERTS = frozenset({"TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE",
                              "SSLV3_ALERT_CERTIFICATE_UNKNOWN"})
WARNINGS_PER_MINUTE = 10  # a listener's log lines (refused handshakes, accept errors) per minute


class ReadinessBoard:
    """Wakes every trio-side waiter when any socket's state changes."""

    def __init__(self, trio_token: trio.lowlevel.TrioToken) -> None:
        self._event = trio.Event()
        self._token = trio_token
        self._condition = threading.Condition()
        self.live_connections = 0

    def changed(self) -> None:
        """Call from the trio thread after a state change."""
        self._event.set()
        self._event = trio.Event()
        with self._condition:
            self._condition.notify_all()

    def wait_in_thread(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """From a thread that is not trio's: block until `predicate()` holds (True) or `timeout`
        seconds pass (False). Waking goes straight from `changed` to this thread, without a trio
        task in between: the guest's blocking calls cost one thread switch, not three."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            while not predicate():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._condition.wait(remaining)
        return True

    def changed_from_thread(self) -> None:
        """Call from any other thread: schedules `changed` without waiting for it."""
        self.run_soon(self.changed)

    def run_soon(self, function: Callable[[], object]) -> None:
        """Run `function` in the trio thread soon; callable from any thread (trio's included).
        Dropped once the keep's trio loop has finished."""
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(function)

    async def wait_until(self, predicate: Callable[[], bool], deadline: float = math.inf) -> bool:
        """Wait until `predicate()` holds (True) or the trio clock passes `deadline` (False)."""
        while not predicate():
            if trio.current_time() >= deadline:
                return False
            event = self._event
            with trio.move_on_at(deadline):
                await event.wait()
        return True


class _WarningLimit:
    """One listener's warnings, at most WARNINGS_PER_MINUTE a minute: any peer can make a
    handshake fail, and each failure must not be a line on the host's log (a flood of garbage
    connections would fill it). The lines past the limit are counted, and the count is logged
    with the first warning of a later minute. Trio thread only."""

    def __init__(self, listener_name: str) -> None:
        self._name = listener_name
        self._minute_start = -math.inf
        self._shown = 0
        self._held_back = 0

    def warn(self, message: str, *args: object) -> None:
        now = trio.current_time()
        if now >= self._minute_start + 60:
            if self._held_back:
                log.warning("listener %s: %d more warnings were not shown one by one",
                            self._name, self._held_back)
            self._minute_start, self._shown, self._held_back = now, 0, 0
        if self._shown < WARNINGS_PER_MINUTE:
            self._shown += 1
            log.warning(message, *args)
            if self._shown == WARNINGS_PER_MINUTE:
                log.warning("listener %s: %d warnings within a minute; more are only counted "
                            "until the next minute", self._name, WARNINGS_PER_MINUTE)
        else:
            self._held_back += 1


def _describe_failure(error: BaseException) -> str:
    """OpenSSL's reason for a failed TLS stream; for a certificate that failed verification,
    with OpenSSL's word on why (a host name mismatch, expired, an unknown issuer), which the
    reason alone (CERTIFICATE_VERIFY_FAILED) does not tell apart."""
    cause = error.__cause__ or error
    if isinstance(cause, ssl.SSLError):  # one raised by Python code has no `reason`
        reason = getattr(cause, "reason", None) or str(cause)
        why = getattr(cause, "verify_message", None)  # ssl.SSLCertVerificationError's
        return f"{reason} ({why.rstrip('.')})" if why else reason
    return str(cause) or type(cause).__name__


class Connection:
    """A connected stream (TLS or, when policy allows, plaintext TCP) with plaintext buffers."""

    def __init__(self, stream: trio.abc.Stream, board: ReadinessBoard, peer: str,
                 *, buffer_limit: int = BUFFER_LIMIT, name_alerts: bool = False) -> None:
        self.peer = peer
        # An outgoing connection's peer ending TLS with an alert is said on the log, once: in TLS
        # 1.3 a server judges the keep's client certificate after the keep's handshake is over,
        # and its refusal would otherwise reach the guest as a bare EPIPE or ECONNRESET.
        self._name_alerts = name_alerts
        self._stream = stream
        self._board = board
        self._limit = buffer_limit
        self._lock = threading.Lock()
        self._received = bytearray()
        self._to_send = bytearray()
        self._sending = 0
        self._eof = False
        self._read_error: OSError | None = None
        self._write_error: OSError | None = None
        self._read_shut = False
        self._write_shut_requested = False
        self._write_shut_done = False
        self._close_requested = False
        # Bounds what is left to send once the guest closes: close() gives it a deadline of
        # CLOSE_TIMEOUT, so a peer that stops reading cannot keep the connection forever.
        self._close_scope = trio.CancelScope()

    @property
    def is_tls(self) -> bool:
        return isinstance(self._stream, trio.SSLStream)

    # ---- guest-thread side: synchronous, never blocks -----------------------------------------

    def try_receive(self, max_bytes: int, *, peek: bool = False) -> bytes:
        """Up to `max_bytes` of buffered plaintext; b"" at end of stream; BlockingIOError if none
        yet; ConnectionResetError if the peer went away."""
        with self._lock:
            if self._read_shut:
                return b""
            if self._received:
                data = bytes(self._received[:max_bytes])
                if not peek:
                    was_full = len(self._received) >= self._limit
                    del self._received[:max_bytes]
                    if was_full and len(self._received) < self._limit:
                        self._board.changed_from_thread()
                return data
            if self._read_error is not None:
                raise self._read_error
            if self._eof:
                return b""
        raise BlockingIOError(errno.EAGAIN, "no data buffered yet")

    def try_send(self, data: bytes | memoryview) -> int:
        """Queue as much of `data` as fits; BlockingIOError if nothing fits; BrokenPipeError after
        the write side is shut or the peer went away."""
        with self._lock:
            if self._write_shut_requested or self._close_requested:
                raise BrokenPipeError(errno.EPIPE, "the write side is shut down")
            if self._write_error is not None:
                raise self._write_error
            room = self._limit - len(self._to_send) - self._sending
            if room <= 0:
                raise BlockingIOError(errno.EAGAIN, "send buffer full")
            was_empty = not self._to_send
            accepted = data[:room]
            self._to_send += accepted
        if was_empty:
            self._board.changed_from_thread()
        return len(accepted)

    def readable(self) -> bool:
        """True when a receive would not block (data, end of stream or an error)."""
        with self._lock:
            return bool(self._received or self._eof or self._read_error or self._read_shut)

    def buffered(self) -> int:
        """Bytes of plaintext ready to receive now."""
        with self._lock:
            return len(self._received)

    def has_at_least(self, size: int) -> bool:
        """True when `size` bytes are buffered, or no more will come (end, error, shut down)."""
        with self._lock:
            return (len(self._received) >= size or self._eof or self._read_error is not None
                    or self._read_shut)

    def room(self) -> int:
        """Bytes a send could queue now."""
        with self._lock:
            return max(0, self._limit - len(self._to_send) - self._sending)

    def writable(self) -> bool:
        """True when a send would not block (room in the buffer, or an error to report)."""
        with self._lock:
            return (len(self._to_send) + self._sending < self._limit
                    or self._write_error is not None or self._write_shut_requested)

    def shutdown_read(self) -> None:
        """Later receives return end of stream; data still arriving is discarded."""
        with self._lock:
            self._read_shut = True
            self._received.clear()
        self._board.changed_from_thread()

    def shutdown_write(self) -> None:
        """Send what is queued, then TLS close_notify (or a TCP FIN for plaintext)."""
        with self._lock:
            self._write_shut_requested = True
        self._board.changed_from_thread()

    def close(self) -> None:
        """Like close(2) on a socket: queued data is still sent, then the stream is closed; what
        cannot leave because the peer read nothing for CLOSE_TIMEOUT is dropped."""
        with self._lock:
            self._close_requested = True
            self._read_shut = True
            self._received.clear()
        self._board.run_soon(self._start_close_deadline)

    def _start_close_deadline(self) -> None:
        """In trio: give the rest of the connection's sending CLOSE_TIMEOUT from now."""
        self._close_scope.deadline = min(self._close_scope.deadline,
                                         trio.current_time() + CLOSE_TIMEOUT)
        self._board.changed()

    # ---- trio side -------------------------------------------------------------------------

    async def wait_readable(self, deadline: float = math.inf) -> bool:
        return await self._board.wait_until(self.readable, deadline)

    async def wait_writable(self, deadline: float = math.inf) -> bool:
        return await self._board.wait_until(self.writable, deadline)

    async def wait_sent(self) -> None:
        """Wait until everything queued so far has been handed to the transport (or failed)."""
        def drained() -> bool:
            with self._lock:
                return (not self._to_send and not self._sending) or self._write_error is not None
        await self._board.wait_until(drained)

    async def run(self) -> None:
        """Run the pump and the writer until the connection is closed and flushed."""
        self._board.live_connections += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump)
                with self._close_scope:
                    await self._writer()
                nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                with contextlib.suppress(trio.BrokenResourceError, OSError):
                    await self._stream.aclose()
            self._board.live_connections -= 1
            self._board.changed()

    async def _pump(self) -> None:
        def room() -> bool:
            with self._lock:
                return len(self._received) < self._limit or self._read_shut
        while True:
            await self._board.wait_until(room)
            try:
                data = await self._stream.receive_some(RECEIVE_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                if not isinstance(error.__cause__, ssl.SSLZeroReturnError):
                    self._name_alert(error)
                    with self._lock:
                        self._read_error = ConnectionResetError(
                            errno.ECONNRESET, "peer reset the connection or cut TLS without "
                            "close_notify: " + _describe_failure(error))
                    self._board.changed()
                    return
                # The peer's close_notify after our own: CPython's SSLObject.read raises
                # SSLZeroReturnError instead of returning b"" once both directions are shut.
                data = b""
            with self._lock:
                if not data:
                    self._eof = True
                elif not self._read_shut:
                    self._received += data
            self._board.changed()
            if not data:
                return

    def _name_alert(self, error: BaseException) -> None:
        """Log the TLS alert that ended an outgoing connection (see `__init__`), once."""
        reason = _describe_failure(error)
        if self._name_alerts and "ALERT" in reason:
            self._name_alerts = False
            log.warning("the TLS connection to %s was ended by the peer's alert %s%s", self.peer,
                        reason, " (the server refused the keep's client certificate)"
                        if "CERTIFICATE" in reason or "UNKNOWN_CA" in reason else "")

    async def _writer(self) -> None:
        def work() -> bool:
            with self._lock:
                return bool(self._to_send or self._write_shut_requested or self._close_requested)
        while True:
            await self._board.wait_until(work)
            with self._lock:
                chunk = bytes(self._to_send[:SEND_CHUNK])
                del self._to_send[:SEND_CHUNK]
                self._sending = len(chunk)
                closing = self._close_requested
                shut = self._write_shut_requested or closing
            try:
                if chunk:
                    await self._stream.send_all(chunk)
                    if closing:  # progress: the peer is still reading (see `close`)
                        self._close_scope.deadline = trio.current_time() + CLOSE_TIMEOUT
                elif shut:
                    await self._send_end_of_stream()
                    if closing:
                        return
                    await self._board.wait_until(lambda: self._close_requested)
                    return
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                with self._lock:
                    self._write_error = BrokenPipeError(errno.EPIPE, _describe_failure(error))
                    self._to_send.clear()
                self._board.changed()
                if closing:
                    return
                await self._board.wait_until(lambda: self._close_requested)
                return
            finally:
                with self._lock:
                    self._sending = 0
                self._board.changed()

    async def _send_end_of_stream(self) -> None:
        if self._write_shut_done:
            return
        self._write_shut_done = True
        stream = self._stream
        if isinstance(stream, trio.SSLStream):
            # SSL_shutdown: close_notify goes out and receiving continues (trio's own aclose
            # makes the same call). CPython calls SSL_shutdown a second time, which reads on to
            # wait for the peer's close_notify and would consume records not yet decrypted as
            # part of the shutdown: they are held out of its way meanwhile, so close_notify
            # leaves at once, as a FIN does, even while the guest leaves a peer's data unread.
            # Plaintext OpenSSL holds of a partly read record is left to the pump first, and so
            # are the records when the peer's TCP has ended (the buffer then takes no writes).
            await self._board.wait_until(lambda: _can_shut_down_past_unread(stream)
                                         or self._read_shut)
            await stream._retry(functools.partial(_shutdown_past_unread, stream),
                                ignore_want_read=True)
        elif isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()


def _can_shut_down_past_unread(stream: trio.SSLStream[trio.abc.Stream]) -> bool:
    """Whether `_shutdown_past_unread` can put the held records back: no plaintext inside
    OpenSSL, and the incoming buffer either empty or still open for writing (no EOF in it)."""
    if stream._ssl_object.pending():
        return False
    if not stream._incoming.pending:
        return True
    try:
        stream._incoming.write(b"")  # raises once the transport's EOF is in the buffer
    except ssl.SSLError:
        return False
    return True


def _shutdown_past_unread(stream: trio.SSLStream[trio.abc.Stream]) -> None:
    """SSLObject.unwrap with the incoming records set aside and put back in order after it (no
    await in between: trio's tasks cannot touch the buffer meanwhile)."""
    held = stream._incoming.read()
    try:
        stream._ssl_object.unwrap()
    finally:
        if held:  # (a write, even of nothing, raises once the transport's EOF is in the buffer)
            stream._incoming.write(held)


@dataclass(frozen=True)
class ListenerSettings:
    """What a listener needs beyond its address: TLS context (None = plaintext TCP). `backlog`
    bounds both the completed connections waiting for `sock_accept` and the handshakes in
    progress; `handshake_grace` is how long a handshake is safe from giving way to a newer one."""

    name: str
    context: ssl.SSLContext | None
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    backlog: int = ACCEPT_BACKLOG
    handshake_grace: float = HANDSHAKE_GRACE


class Listener:
    """Accepts connections and completes their TLS handshakes in the background."""

    def __init__(self, settings: ListenerSettings, socket_listeners: list[trio.SocketListener],
                 board: ReadinessBoard, nursery: trio.Nursery) -> None:
        self.settings = settings
        self._listeners = socket_listeners
        self._board = board
        self._nursery = nursery
        self._lock = threading.Lock()
        self._ready: deque[Connection] = deque()
        self._connections: set[Connection] = set()  # every one still running (trio thread only)
        # Handshakes in progress, oldest first, with their start times (trio thread only).
        self._handshakes: deque[tuple[float, trio.CancelScope]] = deque()
        self._closed = False
        self.handshake_failures = 0
        self._warnings = _WarningLimit(settings.name)

    @property
    def port(self) -> int:
        """The bound port (useful when the configuration asked for port 0)."""
        address = self._listeners[0].socket.getsockname()
        return int(address[1])

    def try_accept(self) -> Connection:
        """A connection whose handshake completed, or BlockingIOError."""
        with self._lock:
            if self._ready:
                connection = self._ready.popleft()
                self._board.changed_from_thread()
                return connection
        raise BlockingIOError(errno.EAGAIN, "no connection ready")

    def readable(self) -> bool:
        with self._lock:
            return bool(self._ready)

    async def wait_readable(self, deadline: float = math.inf) -> bool:
        return await self._board.wait_until(self.readable, deadline)

    def close(self) -> None:
        """Stop accepting; connections already accepted but not taken are closed."""
        with self._lock:
            self._closed = True
            pending = list(self._ready)
            self._ready.clear()
        for connection in pending:
            connection.close()
        self._board.changed_from_thread()

    def close_connections(self) -> None:
        """From the trio thread, when the keep's network ends: close every connection this
        listener made, the guest's accepted ones too, as a process's exit closes its sockets
        (queued data still leaves, see `Connection.close`)."""
        self.close()
        for connection in list(self._connections):
            connection.close()

    async def serve(self) -> None:
        """Accept until closed. Run as a task in the keep's nursery; the listening sockets are
        closed also when that nursery is cancelled first (the keep stopping)."""
        try:
            async with trio.open_nursery() as nursery:
                for listener in self._listeners:
                    nursery.start_soon(self._accept_loop, listener)
                await self._board.wait_until(lambda: self._closed)
                nursery.cancel_scope.cancel()
        finally:
            for listener in self._listeners:
                listener.socket.close()

    def _has_room(self) -> bool:
        with self._lock:
            return len(self._ready) < self.settings.backlog

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        while True:
            await self._board.wait_until(self._has_room)
            try:
                tcp = await listener.accept()
            except OSError as error:  # EMFILE and friends: log, back off, keep serving
                self._warnings.warn("listener %s: accept failed: %s", self.settings.name, error)
                await trio.sleep(0.1)
                continue
            try:
                await self._make_handshake_room()
            except BaseException:  # the listener closes meanwhile: this connection goes too
                tcp.socket.close()
                raise
            handshake = (trio.current_time(), trio.CancelScope())
            self._handshakes.append(handshake)
            self._nursery.start_soon(self._handshake, tcp, handshake)

    async def _make_handshake_room(self) -> None:
        """Return once fewer than `backlog` handshakes are in progress: wait for one to end, or
        cancel the oldest once it has run `handshake_grace` seconds (see `_handshake`)."""
        limit, grace = self.settings.backlog, self.settings.handshake_grace
        while len(self._handshakes) >= limit:
            started, scope = self._handshakes[0]
            if trio.current_time() >= started + grace:
                self._handshakes.popleft()
                scope.cancel()
                continue
            await self._board.wait_until(lambda: len(self._handshakes) < limit, started + grace)

    async def _handshake(self, tcp: trio.SocketStream,
                         handshake: tuple[float, trio.CancelScope]) -> None:
        """Complete one TLS handshake within the timeout, unless its scope is cancelled first
        to make room for a newer connection (`_make_handshake_room`)."""
        scope = handshake[1]
        peer = _peer_name(tcp)
        stream: trio.abc.Stream = tapped(tcp, f"{self.settings.name} <- {peer}")  # audit only
        reason = None
        try:
            with scope:
                try:
                    if self.settings.context is not None:
                        tls = trio.SSLStream(stream, self.settings.context, server_side=True)
                        with trio.fail_after(self.settings.handshake_timeout):
                            await tls.do_handshake()
                        stream = tls
                except (trio.BrokenResourceError, trio.TooSlowError, OSError) as error:
                    reason = ("timed out" if isinstance(error, trio.TooSlowError)
                              else _describe_failure(error))
                    if reason in UNTRUSTED_ALERTS:  # the client refused us, not we the client
                        reason += " (the client does not trust the keep's certificate)"
        except BaseException:  # the keep is stopping (its nursery is cancelled): close and go
            tcp.socket.close()
            raise
        with contextlib.suppress(ValueError):  # not there once cancelled: it gave way
            self._handshakes.remove(handshake)
        if scope.cancelled_caught:
            reason = (f"dropped unfinished after {self.settings.handshake_grace:g} s or more, to make room: "
                      f"{self.settings.backlog} handshakes were in progress")
        if reason is not None:
            self._warnings.warn("listener %s: TLS handshake with %s refused: %s",
                                self.settings.name, peer, reason)
            self.handshake_failures += 1
            with trio.CancelScope(shield=True):
                await tcp.aclose()
            self._board.changed()
            return
        connection = Connection(stream, self._board, peer)
        with self._lock:
            closed = self._closed
            if not closed:
                self._ready.append(connection)
        if closed:
            connection.close()
        self._board.changed()
        self._connections.add(connection)
        try:
            await connection.run()
        finally:
            self._connections.discard(connection)


async def _open_tcp(host: str, port: int) -> trio.SocketStream:
    """A TCP connection to `host`:`port`. A host name is resolved and its addresses raced by
    trio.open_tcp_stream (Happy Eyeballs); an IP address is connected to as it is. "localhost"
    is both loopback addresses without asking the resolver (an /etc/hosts may name 127.0.0.1
    alone while the server listens on ::1 alone), raced the same way: `_connect_first`."""
    if host == "localhost":
        return await _connect_first(LOCALHOST_ADDRESSES, port)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    return await _connect_first((host,), port)  # an address: its own error, not trio's summary


async def _connect_first(addresses: tuple[str, ...], port: int) -> trio.SocketStream:
    """The first of `addresses` (IP literals) to accept a TCP connection on `port`, as RFC 8305
    (Happy Eyeballs) connects: an attempt per address, in order, the next one started when the
    previous has failed or HAPPY_EYEBALLS_DELAY has passed without an answer; the first to
    connect wins and the others are cancelled (their sockets closed). Tried one after the other,
    an address whose SYNs are dropped held the next one back for the whole CONNECT_TIMEOUT.
    The same algorithm as trio.open_tcp_stream, which takes a name, not a list of addresses.
    When every attempt fails, the first address's error is the one raised."""
    errors: dict[int, OSError] = {}
    winner: list[trio.SocketStream] = []

    def give_up(index: int, error: OSError, failed: trio.Event) -> None:
        errors[index] = error
        failed.set()

    async def attempt(index: int, failed: trio.Event) -> None:
        address = addresses[index]
        try:  # inside the handling too: an error escaping the nursery is an ExceptionGroup
            tcp = trio.socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET,
                                     socket.SOCK_STREAM)
        except OSError as error:  # EMFILE; EAFNOSUPPORT for ::1 on a kernel without IPv6
            give_up(index, error, failed)
            return
        try:
            await tcp.connect((address, port))
        except OSError as error:  # trio words it "Error connecting to (ADDRESS, PORT): ..."
            tcp.close()
            give_up(index, OSError(error.errno, os.strerror(error.errno)) if error.errno else error, failed)
            return
        except BaseException:  # cancelled: another address won, or the deadline passed
            tcp.close()
            raise
        if winner:  # another attempt won in the same instant
            tcp.close()
            return
        winner.append(trio.SocketStream(tcp))
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for index in range(len(addresses)):
            failed = trio.Event()
            nursery.start_soon(attempt, index, failed)
            with trio.move_on_after(HAPPY_EYEBALLS_DELAY):
                await failed.wait()
    if winner:
        return winner[0]
    raise errors[0]


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "unknown peer"
    return host_port(address[0], address[1])


def host_port(host: str, port: int) -> str:
    """`host:port`, an IPv6 address in brackets ([::1]:443) so that the port stands apart (as
    URLs and curl write it); for every message that names an address, keep serve's too."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _bind_listeners(host: str | None, port: int) -> list[trio.SocketListener]:
    """Listening sockets on every address of `host` (None: 0.0.0.0 and ::), all on `port`. With
    port 0 each family's bind picked its own free port: 0.0.0.0 and :: listened on two ports and
    the listener named one. The port the first picked is then bound on every address; should
    another family have it taken (a race with other programs), the choice is made again."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    attempts = PORT_0_ATTEMPTS
    while port == 0 and len({item.socket.getsockname()[1] for item in listeners}) > 1:
        chosen = listeners[0].socket.getsockname()[1]
        for item in listeners:
            item.socket.close()
        attempts -= 1
        try:
            return await trio.open_tcp_listeners(chosen, host=host)
        except OSError as error:
            if error.errno != errno.EADDRINUSE or attempts <= 0:
                raise
        listeners = await trio.open_tcp_listeners(0, host=host)
    return listeners


async def open_listener(settings: ListenerSettings, host: str, port: int, board: ReadinessBoard,
                        nursery: trio.Nursery) -> Listener:
    """Bind `host`:`port` and start accepting in `nursery`."""
    bind_host = None if host in ("", "::") else host  # "::" (Enarx's default): every address
    socket_listeners = await _bind_listeners(bind_host, port)
    listener = Listener(settings, socket_listeners, board, nursery)
    nursery.start_soon(listener.serve)
    return listener


async def open_connection(host: str, port: int, context: ssl.SSLContext | None,
                          verification: ServerVerification, board: ReadinessBoard,
                          nursery: trio.Nursery, *, server_name: str | None = None,
                          handshake_timeout: float = HANDSHAKE_TIMEOUT) -> Connection:
    """Connect out, complete the TLS handshake and check the pin; start the connection's tasks.
    The TCP connect gets CONNECT_TIMEOUT: a server that never answers (its SYNs dropped) would
    otherwise hold the keep's start for the kernel's SYN retries, over two minutes."""
    where = host_port(host, port)
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            tcp = await _open_tcp(host, port)
    except trio.TooSlowError:
        raise ConnectFailed(f"cannot connect to {where}: timed out after "
                            f"{CONNECT_TIMEOUT:g} s") from None
    except OSError as error:
        raise ConnectFailed(f"cannot connect to {where}: {error.strerror or error}") from None
    except UnicodeError:  # the resolver's IDNA encoding: an empty label, one over 63 bytes
        raise ConnectFailed(f"cannot connect to {where}: not a valid host name") from None
    stream: trio.abc.Stream = tapped(tcp, f"-> {where}")  # audit only (net.wiretap)
    if context is not None:
        tls = trio.SSLStream(stream, context, server_hostname=server_name or host)
        try:
            with trio.fail_after(handshake_timeout):
                await tls.do_handshake()
            check_pin(verification, tls.getpeercert(binary_form=True))
        except BaseException as error:
            with trio.CancelScope(shield=True):
                await tcp.aclose()
            if isinstance(error, trio.TooSlowError):
                raise HandshakeFailed(f"TLS handshake with {where} timed out") from None
            if isinstance(error, trio.BrokenResourceError):
                raise HandshakeFailed(
                    f"TLS handshake with {where} failed: {_describe_failure(error)}") from None
            raise
        stream = tls
    connection = Connection(stream, board, where, name_alerts=context is not None)
    nursery.start_soon(connection.run)
    return connection
