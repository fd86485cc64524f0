"""keep.toml sockets for the guest: net's trio TLS streams behind wasi_host's Socket protocol.

Theory of operation
-------------------
`open_keep_network(config, policy)` runs inside the keep's trio loop. It forbids core dumps (the
TLS key and the sockets' plaintext will be in this process), checks the network policy for every
socket entry first (nothing is opened when one is refused), makes the keep's TLS
identity (in memory; configured files; a pluggable provider later replaced by attestation),
binds the listeners, connects the connect entries, and yields a `KeepNetwork` whose `sockets`
(in keep.toml order) and `waiter` go into `wasi_host.Guest`.

The guest calls these objects from its worker thread. Anything that can be answered from the
connection's buffers is answered there, under a lock, without entering trio (`net.streams`
explains the buffers). A call that must block waits on the keep's readiness board from the guest
thread itself (a condition the trio side notifies, so waking costs one thread switch); only a
poll_oneoff that also watches a host fd (stdin) enters trio through `trio.from_thread.run`.
Handshakes happen in trio tasks of their own, so a blocked or slow peer never holds the guest or
the event loop.

Errors leave here as OSError with the errno the guest should see (wasi_host maps it once):
EAGAIN for a non-blocking call that would block, ECONNRESET when the peer went away (or cut TLS
without close_notify), EPIPE when writing after the peer or our own shutdown closed the write
side, ENOTCONN for data calls on a listener, EINVAL for accept on a connection, ECANCELED once the
keep is stopping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import outcome
import trio

from net.errors import NetError
from net.policy import NetworkPolicy
from net.streams import (
    BUFFER_LIMIT,
    Connection,
    Listener,
    ListenerSettings,
    ReadinessBoard,
    open_connection,
    open_listener,
)
from net.tls import (
    CertificateProvider,
    FileCertificateProvider,
    KeepIdentity,
    SelfSignedProvider,
    ServerVerification,
    client_context,
    server_context,
    validity_problem,
)
from shim.config import ConnectFile, KeepConfig, ListenFile
from shim.errors import KeepError, say
from shim.keys import forbid_core_dumps
from shim.run import TRAP_EXIT_STATUS, RunConfig, RunResult, Stdio
from shim.signals import receive_stop_signals
from shim.trace import same_file
from shim.volume_state import temporary_prefix
from wasi_host._backend import Buffer, Pollable, Readiness, Stream
from wasi_host._guest import GuestStopped

log = logging.getLogger("keep.net")

STOP_GRACE_SECONDS = 2.0  # for queued data and close_notify to leave when the keep is stopped
DRAIN_LIMIT_SECONDS = 120.0  # after a guest that ended by itself (see open_keep_network)
SIGNAL_GRACE_SECONDS = 5.0  # after Ctrl-C, for the guest to end (and the sockets to close)


class NetworkError(KeepError):
    """The keep's sockets could not be set up: policy, certificates, bind or connect."""


class _Bridge:
    """How the guest thread waits for the keep's sockets, and the keep-wide "stopping" flag."""

    def __init__(self, token: trio.lowlevel.TrioToken, board: ReadinessBoard) -> None:
        self.token = token
        self.board = board
        self.stopping = False
        self.stop_requests = 0  # KeepNetwork.stop calls: one during the final drain ends it

    def block_until(self, ready: Callable[[], bool]) -> None:
        """Block this (non-trio) thread until `ready()`; ECANCELED once the keep is stopping."""
        self.board.wait_in_thread(lambda: self.stopping or ready())
        if self.stopping:
            raise OSError(errno.ECANCELED, "the keep is stopping")


class ConnectionSocket:
    """A connected socket (accepted, or a keep.toml `connect` entry)."""

    def __init__(self, connection: Connection, bridge: _Bridge) -> None:
        self.connection = connection
        self._bridge = bridge

    def fileno(self) -> int | None:
        return None

    def readiness(self, write: bool) -> Readiness | None:
        connection = self.connection
        if write:
            return Readiness(connection.room()) if connection.writable() else None
        if not connection.readable():
            return None
        buffered = connection.buffered()
        return Readiness(buffered, hangup=buffered == 0)

    def accept(self, nonblocking: bool) -> ConnectionSocket:
        raise OSError(errno.EINVAL, "not a listening socket")

    def recv(self, size: int, *, peek: bool, waitall: bool, nonblocking: bool) -> bytes:
        if size <= 0:
            return b""
        connection = self.connection
        if peek:
            if waitall and not nonblocking:
                wanted = min(size, BUFFER_LIMIT)
                self._wait_for(lambda: connection.has_at_least(wanted))
            return self._receive_once(size, peek=True, nonblocking=nonblocking)
        if not waitall:
            return self._receive_once(size, peek=False, nonblocking=nonblocking)
        chunks: list[bytes] = []
        received = 0
        while received < size:
            try:
                data = self._receive_once(size - received, peek=False, nonblocking=nonblocking)
            except OSError:
                if received:
                    break
                raise
            if not data:
                break
            chunks.append(data)
            received += len(data)
        return b"".join(chunks)

    def _receive_once(self, size: int, *, peek: bool, nonblocking: bool) -> bytes:
        connection = self.connection
        while True:
            try:
                return connection.try_receive(size, peek=peek)
            except BlockingIOError:
                if nonblocking:
                    raise
            self._bridge.block_until(connection.readable)

    def _wait_for(self, ready: Callable[[], bool]) -> None:
        if not ready():
            self._bridge.block_until(ready)

    def send(self, data: Buffer, *, nonblocking: bool) -> int:
        connection = self.connection
        view = memoryview(data).cast("B")
        sent = 0
        while sent < len(view):
            try:
                sent += connection.try_send(view[sent:])
            except BlockingIOError:
                if nonblocking:
                    if sent:
                        return sent
                    raise
                self._bridge.block_until(connection.writable)
            except BrokenPipeError:
                if sent:
                    return sent
                raise
        return sent

    def shutdown(self, read: bool, write: bool) -> None:
        if read:
            self.connection.shutdown_read()
        if write:
            self.connection.shutdown_write()

    def close(self) -> None:
        self.connection.close()


class ListenerSocket:
    """A keep.toml `listen` entry: accept returns connections whose handshake is complete."""

    def __init__(self, listener: Listener, bridge: _Bridge) -> None:
        self.listener = listener
        self._bridge = bridge

    def fileno(self) -> int | None:
        return None

    def readiness(self, write: bool) -> Readiness | None:
        if write:
            return None
        return Readiness(1) if self.listener.readable() else None

    def accept(self, nonblocking: bool) -> ConnectionSocket:
        while True:
            try:
                return ConnectionSocket(self.listener.try_accept(), self._bridge)
            except BlockingIOError:
                if nonblocking:
                    raise
            self._bridge.block_until(self.listener.readable)

    def recv(self, size: int, *, peek: bool, waitall: bool, nonblocking: bool) -> bytes:
        raise OSError(errno.ENOTCONN, "a listening socket carries no data")

    def send(self, data: Buffer, *, nonblocking: bool) -> int:
        raise OSError(errno.ENOTCONN, "a listening socket carries no data")

    def shutdown(self, read: bool, write: bool) -> None:
        raise OSError(errno.ENOTCONN, "a listening socket is not connected")

    def close(self) -> None:
        self.listener.close()


class TrioWaiter:
    """wasi_host's Waiter for a keep with sockets: blocks poll_oneoff on trio.

    Keep sockets wake it through the readiness board; other pollables with an OS fd (stdin) are
    watched with trio's fd waiting; anything else is re-checked every 10 ms.
    """

    def __init__(self, bridge: _Bridge) -> None:
        self._bridge = bridge

    def wait(self, interests: Sequence[tuple[Pollable, bool]], deadline_ns: int | None) -> None:
        timeout = None if deadline_ns is None else max(0, deadline_ns - time.monotonic_ns()) / 1e9
        bridge = self._bridge
        board = bridge.board

        def ready() -> bool:
            return bridge.stopping or any(p.readiness(w) is not None for p, w in interests)

        if bridge.stopping:
            raise GuestStopped  # the keep is stopping (a signal): the guest goes, it must not spin here
        foreign = [(p, w) for p, w in interests if not isinstance(p, ConnectionSocket | ListenerSocket)]
        if not foreign:  # only keep sockets: wait on the board from this thread, no trio task
            board.wait_in_thread(ready, timeout)
            if bridge.stopping:
                raise GuestStopped
            return

        async def watch_fd(fd: int, write: bool) -> None:
            try:
                await (trio.lowlevel.wait_writable(fd) if write else trio.lowlevel.wait_readable(fd))
            except trio.BusyResourceError:
                await trio.sleep(0.01)
            board.changed()

        async def tick() -> None:
            while True:
                await trio.sleep(0.01)
                board.changed()

        async def wait() -> None:
            async with trio.open_nursery() as nursery:
                if any(pollable.fileno() is None for pollable, _ in foreign):
                    nursery.start_soon(tick)
                for pollable, write in foreign:
                    fd = pollable.fileno()
                    if fd is not None:
                        nursery.start_soon(watch_fd, fd, write)
                with trio.move_on_after(float("inf") if timeout is None else timeout):
                    await board.wait_until(ready)
                nursery.cancel_scope.cancel()

        try:
            trio.from_thread.run(wait, trio_token=bridge.token)
        except trio.RunFinishedError:
            raise GuestStopped from None
        if bridge.stopping:
            raise GuestStopped


class NullStream:
    """keep.toml's `null` file: reads see end of file, writes are accepted and dropped."""

    def read(self, size: int) -> bytes:
        return b""

    def write(self, data: Buffer) -> int:
        return len(memoryview(data))

    def readiness(self, write: bool) -> Readiness | None:
        return Readiness(0, hangup=not write)

    def fileno(self) -> int | None:
        return None

    def is_terminal(self) -> bool:
        return False

    def close(self) -> None:
        pass


def stdio_streams(config: KeepConfig) -> tuple[Stream, Stream, Stream]:
    """fds 0, 1 and 2 as keep.toml describes them: the process's own stdio, or null."""
    from wasi_host.streams import OsStream

    own = {"stdin": 0, "stdout": 1, "stderr": 2}
    streams: list[Stream] = []
    for entry in config.stdio:
        streams.append(NullStream() if entry.kind == "null" else OsStream(own[entry.kind]))
    return streams[0], streams[1], streams[2]


@dataclass
class KeepNetwork:
    """The guest-facing sockets (keep.toml order) and waiter, plus what tests and operators need."""

    sockets: tuple[ListenerSocket | ConnectionSocket, ...]
    waiter: TrioWaiter
    identity: KeepIdentity | None
    listeners: dict[str, Listener]
    bridge: _Bridge
    # Set on exit: the connections still sending when the run's deadline ended the drain.
    cut_short: int = 0

    def stop(self) -> None:
        """From the trio thread: every blocked and later socket call fails with ECANCELED; once
        the guest has ended, the wait for its connections to drain ends too."""
        self.bridge.stopping = True
        self.bridge.stop_requests += 1
        self.bridge.board.changed()


def _identity_provider(config: KeepConfig) -> CertificateProvider:
    if config.tls.certificate is not None and config.tls.key is not None:
        return FileCertificateProvider(config.tls.certificate, config.tls.key)
    return SelfSignedProvider()


def _translate(error: NetError) -> NetworkError:
    return NetworkError(str(error))


@asynccontextmanager
async def open_keep_network(config: KeepConfig, policy: NetworkPolicy | None = None,
                            provider: CertificateProvider | None = None, *,
                            deadline: float | None = None) -> AsyncIterator[KeepNetwork]:
    """Open every keep.toml socket; on exit close them and stop their tasks once queued data
    and close_notify have left (or, when the keep was stopped, after `STOP_GRACE_SECONDS`).

    `deadline` (trio's clock: `keep run --timeout`) bounds the opening (NetworkError with the
    timeout's exit status) and ends the wait for a guest that ended by itself: the whole run was
    promised to end by then. The connections still sending at that moment (their unsent data is
    dropped) are counted in the network's `cut_short`."""
    policy = policy or NetworkPolicy()
    entries = config.sockets
    # The TLS private key, session keys and every socket's plaintext are about to be in this
    # process: a crash or SIGQUIT must not write them to the host's disk in a core file.
    forbid_core_dumps()
    _refuse_export_over_inputs(config)
    try:
        for entry in entries:
            policy.check(entry.name, entry.prot, entry_allows_plaintext=entry.insecure_plaintext)
        identity = None
        if any(entry.prot == "tls" for entry in entries):
            identity = (provider or _identity_provider(config)).identity()
    except NetError as error:
        raise _translate(error) from None
    if identity is not None and (problem := validity_problem(identity.leaf)) is not None:
        configured = provider is None and config.tls.certificate is not None
        which = f"in {config.tls.certificate}" if configured else "of the keep"
        say(f"warning: the certificate {which} {problem}: clients that check its dates will "
            "refuse every TLS handshake")
    board = ReadinessBoard(trio.lowlevel.current_trio_token())
    bridge = _Bridge(trio.lowlevel.current_trio_token(), board)
    # Errors leave after the nursery closes, so callers see them as themselves, not in a group.
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        sockets: list[ListenerSocket | ConnectionSocket] = []
        listeners: dict[str, Listener] = {}
        # The run's deadline bounds the opening too: a connect entry's peer that never answers
        # the handshake would otherwise hold `keep run --timeout 2` for HANDSHAKE_TIMEOUT.
        opening = trio.CancelScope()
        if deadline is not None:
            opening.deadline = deadline
        try:
            with opening:
                for entry in entries:
                    if isinstance(entry, ListenFile):
                        listener = await _listen(entry, identity, board, nursery)
                        listeners[entry.name] = listener
                        sockets.append(ListenerSocket(listener, bridge))
                    else:
                        connection = await _connect(entry, identity, board, nursery)
                        sockets.append(ConnectionSocket(connection, bridge))
            if opening.cancelled_caught:
                where = f'connect "{entry.name}" ({entry.host} port {entry.port})' \
                    if isinstance(entry, ConnectFile) else f'listen "{entry.name}"'
                raise NetworkError(f"--timeout ran out while the keep's sockets were being opened ({where}): "
                                   "the guest did not start", exit_status=TRAP_EXIT_STATUS)
            if identity is not None and config.tls.export_certificate is not None:
                _export_certificate(config, identity)  # last: its appearance means "listening"
        except NetError as error:
            failure = _translate(error)
        except OSError as error:
            failure = NetworkError(f"cannot open the keep's sockets: {error.strerror or error}")
        except NetworkError as error:
            failure = error
        if failure is None:
            network = KeepNetwork(tuple(sockets), TrioWaiter(bridge), identity, listeners, bridge)
            try:
                yield network
            except BaseException as error:  # the guest run's own outcome, re-raised below
                failure = error
            stopped = bridge.stopping or failure is not None  # a signal, --timeout, an error
            bridge.stopping = True
            for socket in sockets:
                socket.close()
            for listener in listeners.values():  # and what the guest accepted and left open
                listener.close_connections()
            board.changed()
            # A guest that ended by itself leaves its queued data to go out as a process's does
            # after exit(2): each connection until sent, or until its peer reads nothing for
            # CLOSE_TIMEOUT (net.streams), and at most until the run's deadline. A stopped keep
            # gives it a moment only.
            grace = STOP_GRACE_SECONDS if stopped else DRAIN_LIMIT_SECONDS
            end = trio.current_time() + grace
            by_deadline = not stopped and deadline is not None and deadline < end
            requests = bridge.stop_requests
            with trio.move_on_at(deadline if by_deadline and deadline is not None else end) as scope:
                scope.shield = True  # Ctrl-C meanwhile (a stop request) ends the wait
                await board.wait_until(lambda: board.live_connections == 0
                                       or bridge.stop_requests != requests)
            if by_deadline and scope.cancelled_caught:
                network.cut_short = board.live_connections
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


def _refuse_export_over_inputs(config: KeepConfig) -> None:
    """NetworkError when `export_certificate` names a file the keep reads: the configured key
    (`certificate = key = "combined.pem"` and the same name for the export would destroy the
    owner's private key), a listener's `client_ca` or a connect entry's `ca` (replaced by the
    keep's own certificate, the next start would trust the keep instead of that CA)."""
    export = config.tls.export_certificate
    if export is None:
        return
    inputs: list[tuple[Path, str]] = []
    if config.tls.key is not None:
        inputs.append((config.tls.key, "the configured key file: writing the certificate there "
                                       "would destroy the private key"))
    for name, option, ca in config.ca_files():
        inputs.append((ca, f'the {option} of socket "{name}": writing the certificate there would '
                           "replace it"))
    for path, what in inputs:
        if same_file(export, path):
            raise NetworkError(f"export_certificate {export} is {what}")


def _export_certificate(config: KeepConfig, identity: KeepIdentity) -> None:
    """Write the certificate chain (public) to export_certificate, atomically: a fresh temporary
    file (O_EXCL: a symlink planted at a predictable name in a shared directory is never
    followed), readable by clients (0644), renamed over the path."""
    path = config.tls.export_certificate
    assert path is not None
    try:
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, suffix=".partial",
                                                 prefix=temporary_prefix(path.name, ".partial"))
        try:
            with os.fdopen(descriptor, "wb") as stream:
                os.fchmod(stream.fileno(), 0o644)
                stream.write(identity.certificate_chain_pem)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    except OSError as error:
        raise NetworkError(f"cannot write the certificate to {path}: {error.strerror}") from None


async def _listen(entry: ListenFile, identity: KeepIdentity | None, board: ReadinessBoard,
                  nursery: trio.Nursery) -> Listener:
    context = None
    if entry.prot == "tls":
        assert identity is not None
        context = server_context(identity, entry.client_ca)
    settings = ListenerSettings(name=entry.name, context=context)
    try:
        return await open_listener(settings, entry.addr, entry.port, board, nursery)
    except OSError as error:
        raise NetworkError(f'listen "{entry.name}" on {entry.addr} port {entry.port}: '
                           f"{error.strerror or error}") from None


async def _connect(entry: ConnectFile, identity: KeepIdentity | None, board: ReadinessBoard,
                   nursery: trio.Nursery) -> Connection:
    verification = ServerVerification(ca_file=entry.ca, pin_sha256=entry.pin_sha256)
    context = client_context(verification, identity) if entry.prot == "tls" else None
    try:
        return await open_connection(entry.host, entry.port, context, verification, board, nursery,
                                     server_name=entry.server_name)
    except NetError as error:
        raise NetworkError(f'connect "{entry.name}": {error}') from None


def preopen_names(run_config: RunConfig) -> list[str]:
    """The guest paths of a run's pre-opened directories, in fd order."""
    return [mapping.guest for mapping in run_config.dirs] + [name for name, _ in run_config.preopens]


def with_keep_config(run_config: RunConfig, keep_config: KeepConfig,
                     network: KeepNetwork | None) -> RunConfig:
    """`run_config` completed from keep.toml: its args come first (then the command line's), its
    environment (FD_COUNT, FD_NAMES, [env]) under the command line's --env, stdio as its first
    three entries say, and the network's sockets and waiter."""
    env = dict(keep_config.guest_env(preopen_names(run_config)))
    env.update(dict(run_config.env))
    stdin, stdout, stderr = stdio_streams(keep_config)
    return dataclasses.replace(
        run_config,
        args=keep_config.args + run_config.args,
        env=tuple(env.items()),
        stdio=run_config.stdio or Stdio(stdin, stdout, stderr),
        sockets=network.sockets if network is not None else (),
        waiter=network.waiter if network is not None else None,
    )


async def run_with_keep_config(run_config: RunConfig, keep_config: KeepConfig,
                               policy: NetworkPolicy,
                               provider: CertificateProvider | None = None) -> RunResult:
    """Run a guest with keep.toml's files: the sockets live exactly as long as the guest.
    `provider` replaces keep.toml's identity (an attested deployment passes its RA-TLS one)."""
    from shim.run import run_module_async

    if not keep_config.sockets:
        return await run_module_async(with_keep_config(run_config, keep_config, None))
    interrupts = _Interrupts()

    async def run_in_network() -> RunResult:
        # --timeout bounds the whole run: the drain of a finished guest's connections as well
        deadline = None if run_config.timeout is None else trio.current_time() + run_config.timeout
        async with open_keep_network(keep_config, policy, provider, deadline=deadline) as network:
            interrupts.network = network
            if interrupts.received:  # a signal came while the sockets were being opened
                network.stop()
            async with trio.open_nursery() as nursery:
                if deadline is not None:
                    # The engine's epoch only stops wasm code; a guest blocked in accept or recv
                    # must be woken too (ECANCELED), then it traps at its next instruction.
                    nursery.start_soon(_stop_at, network, deadline)
                result = await outcome.acapture(
                    run_module_async, with_keep_config(run_config, keep_config, network))
                nursery.cancel_scope.cancel()
        return _with_drain_outcome(result.unwrap(), network, run_config.timeout)

    async with trio.open_nursery() as nursery:
        await nursery.start(_stop_on_signal, interrupts)  # before anything is opened
        result = await outcome.acapture(run_in_network)
        nursery.cancel_scope.cancel()
    if interrupts.received:
        raise GuestSignalled(interrupts.received[0])
    return result.unwrap()


def _with_drain_outcome(result: RunResult, network: KeepNetwork, timeout: float | None) -> RunResult:
    """`result`, with the timeout's exit status and a line saying why when --timeout ended the
    drain of a guest that had ended by itself: its peers did not get all it wrote, which its own
    exit status (often 0) would hide."""
    if not network.cut_short or timeout is None:
        return result
    connections = "1 connection" if network.cut_short == 1 else f"{network.cut_short} connections"
    return dataclasses.replace(result, exit_code=TRAP_EXIT_STATUS, cut_short=(
        f"--timeout {timeout:g} s ran out while the guest's output was still leaving (the guest had "
        f"ended with status {result.exit_code}): {connections} cut short, unsent data dropped"))


class GuestSignalled(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP stopped a run with keep.toml sockets. A KeyboardInterrupt, as before,
    that carries which signal it was, so that `keep` names it and exits 128 + its number."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal_number)
        self.signal_number = signal_number


async def _stop_at(network: KeepNetwork, deadline: float) -> None:
    """At the run's deadline (trio's clock), wake a guest blocked on a socket (ECANCELED)."""
    await trio.sleep_until(deadline)
    network.stop()


@dataclass
class _Interrupts:
    """Signals received during a run, and the network to stop when one arrives."""

    network: KeepNetwork | None = None
    received: list[int] = dataclasses.field(default_factory=list)


async def _stop_on_signal(interrupts: _Interrupts,
                          *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Ctrl-C, SIGTERM or SIGHUP (shim.signals: less those keep was started with ignored) while
    the guest is blocked on a socket: trio cannot deliver KeyboardInterrupt into a worker thread,
    so wake the guest (ECANCELED) and let the run end."""
    with receive_stop_signals() as signals:  # (none off the main thread: the caller's)
        task_status.started()
        async for signal_number in signals:
            interrupts.received.append(signal_number)
            if interrupts.network is not None:
                interrupts.network.stop()
            break
        else:
            return
    # The previous handlers are back. A guest busy in wasm code does not notice ECANCELED: if the
    # run has not ended after a grace period (this task is cancelled when it does), the signal
    # ends the process as it would have without us.
    await trio.sleep(SIGNAL_GRACE_SECONDS)
    signal.signal(signal_number, signal.SIG_DFL)
    os.kill(os.getpid(), signal_number)
