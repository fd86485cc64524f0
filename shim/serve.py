"""`keep serve`: an empty keep that waits, over RA-TLS, for one attested deployment.

Theory of operation
-------------------
At start the keep makes its key in memory (`AttestedIdentity`) and its start-up certificate (which
asks the backend for evidence, so an unsupported backend fails here), listens, and prints one line
`keep: serving on HOST:PORT (backend B, measurement M)` on stderr.

Each connection: a TLS 1.3 handshake in which the keep presents a certificate bound to the nonce
the owner put in the server name (shim.attest._tls), then the deploy protocol
(shim.attest._protocol). The first valid `deploy` makes the keep busy: it answers `accepted`,
compiles the workload in memory (no compile cache: the module bytes and the compiled code never
reach the host disk), runs it with stdout/stderr streamed back as `output` frames, and ends with
`finished` (exit status, error, final volume states). Any other deployment that arrives meanwhile
is `refused` ("this keep already runs a workload"). A deployment refused before it started
(a bad keep.toml, a module that is not valid WebAssembly, something not wired yet) leaves the
keep waiting for the next one. After the one
deployment has finished, `serve` returns.

The guest's stdio: fd 0 is empty (end of file), fds 1 and 2 go to the owner unless keep.toml makes
them `null`. Nothing of the workload, its config or the volume keys is logged or written to disk.
A deployed keep.toml may not make the workload trust anything of the keep host's: no host files,
and every TLS `connect` pins its server (pin_sha256) instead of trusting the host's CA store.

Hostile or broken input ends one connection, never the keep: a frame the protocol rejects drops
the connection, a deployment that fails its checks is `refused`, and an unexpected error in one
connection is logged as one line and drops that connection only. Before a deployment is accepted
nobody is trusted: a peer gets HANDSHAKE_SECONDS for its handshake and for each silence while its
deploy frame arrives, DEPLOY_SECONDS for the whole frame; what all connections buffer of frames
still arriving shares one budget (PENDING_BYTES_LIMIT, two of the largest frames; the connection
that would overrun it is dropped); and an accept() that fails because peers hold every fd the
keep may open is retried, not fatal.

SIGINT / SIGTERM / SIGHUP (`stop_on_signals`; less those keep was started with ignored, see
shim.signals): an idle keep stops at once; a running deployment is cancelled (its sockets are
stopped and the engine's epoch stops its wasm code), its volumes are committed, the owner gets
`finished` with 128 + the signal, and serve exits with that status. A guest that has not stopped
STOP_GRACE_SECONDS later (stuck in a host call) ends with the process.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import trio

from net.errors import NetError
from net.policy import NetworkPolicy
from net.streams import host_port
from shim.attest import (
    REPORT_DATA_BYTES,
    Accepted,
    AttestedCertificateProvider,
    AttestedIdentity,
    Backend,
    Conversation,
    Deploy,
    Finished,
    KeepTLS,
    Output,
    ProtocolError,
    Refused,
    VolumeGrant,
    VolumeState,
    backend_named,
)
from shim.attest._protocol import (
    MAX_HEADER_BYTES,
    MAX_OUTPUT_CHUNK_BYTES,
    MAX_WORKLOAD_BYTES,
    duplicate_grant,
)
from shim.config import ConfigError, ConnectFile, KeepConfig, StdioFile, parse_config
from shim.deploy import check_workload, parse_address
from shim.errors import KeepError, UsageError, say
from shim.keys import forbid_core_dumps
from shim.signals import receive_stop_signals
from wasi_host._backend import Buffer, Readiness

if TYPE_CHECKING:
    from shim.run import RunConfig, RunResult
    from shim.sockets import KeepNetwork
    from shim.volume_backend import VolumeSession

HANDSHAKE_SECONDS = 30.0  # also the longest silence allowed while a deploy frame arrives
DEPLOY_SECONDS = 600.0  # for the whole deploy frame (a 128 MiB module at 256 KiB/s)
PENDING_BYTES_LIMIT = 2 * (MAX_WORKLOAD_BYTES + MAX_HEADER_BYTES + 8)
"""What all connections together may buffer of deploy frames still arriving: two of the largest."""
ACCEPT_RETRY_SECONDS = 0.1  # after accept() failed (EMFILE: peers hold every fd)
STOP_GRACE_SECONDS = 5.0  # after SIGINT / SIGTERM, for the guest to stop before the process ends
BUSY_REASON = "this keep already runs a workload"
MAX_REASON_CHARS = 16384  # of a refusal's reason or a run's error; JSON: at most 6 bytes each
StreamName = Literal["stdout", "stderr"]


@dataclass(frozen=True)
class RunOutcome:
    """How a deployed workload ended: exit status and a trap or keep-side error;
    `signal_number` when the keep's SIGINT / SIGTERM stopped it (serve then exits 128 + it)."""

    exit_status: int
    error: str | None = None
    signal_number: int | None = None

    @classmethod
    def signalled(cls, signal_number: int) -> RunOutcome:
        """The guest was stopped because the keep received `signal_number`."""
        name = signal.Signals(signal_number).name
        return cls(128 + signal_number, f"the keep received {name}: the guest was stopped",
                   signal_number)


@dataclass(frozen=True)
class Deployment:
    """What a runner gets: the owner's message, its validated keep.toml, the guest's output
    streams, and the keep's attested key for the guest's own TLS sockets."""

    message: Deploy
    config: KeepConfig
    stdout: GuestOutput
    stderr: GuestOutput
    certificates: AttestedCertificateProvider
    volumes: Mapping[str, VolumeSession] = field(default_factory=dict)


Runner = Callable[[Deployment], Awaitable[RunOutcome]]


class EmptyInput:
    """The guest's stdin in a deployed keep: always at end of file."""

    def read(self, size: int) -> bytes:
        return b""

    def write(self, data: Buffer) -> int:
        raise OSError(errno.EBADF, "stdin is not writable")

    def readiness(self, write: bool) -> Readiness | None:
        return None if write else Readiness(0, hangup=True)

    def fileno(self) -> int | None:
        return None

    def is_terminal(self) -> bool:
        return False

    def close(self) -> None:
        return None


class GuestOutput:
    """The guest's stdout or stderr: each write is handed to the connection's trio task, which
    frames it as `output`. The guest thread blocks while the channel is full (back-pressure), so
    a slow owner slows the guest down instead of growing memory. `discard` makes it /dev/null."""

    def __init__(self, name: StreamName, channel: trio.MemorySendChannel[tuple[StreamName, bytes]],
                 *, discard: bool = False) -> None:
        self.name: StreamName = name
        self._channel = channel
        self._discard = discard

    def read(self, size: int) -> bytes:
        raise OSError(errno.EBADF, f"{self.name} is not readable")

    def write(self, data: Buffer) -> int:
        chunk = bytes(data)
        if chunk and not self._discard:
            try:
                trio.from_thread.run(self._channel.send, (self.name, chunk))
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError):
                raise OSError(errno.EPIPE, "the owner's connection is gone") from None
        return len(chunk)

    def readiness(self, write: bool) -> Readiness | None:
        return Readiness(MAX_OUTPUT_CHUNK_BYTES) if write else None

    def fileno(self) -> int | None:
        return None

    def is_terminal(self) -> bool:
        return False

    def close(self) -> None:
        return None


def preflight(deploy: Deploy) -> KeepConfig:
    """Check a deployment before accepting it; a KeepError here becomes `refused`. A deployed
    keep.toml may not make the workload trust anything of the keep host's: no host files, and
    every TLS connect pins its server (pin_sha256). Whatever the run would refuse at its start
    (plaintext TCP without insecure_plaintext, FD_NAMES it cannot build) is refused here too:
    once accepted, the keep is used up by the deployment even if the guest never starts."""
    config = parse_config(deploy.config, source="keep.toml (deployed)") if deploy.config else KeepConfig()
    if (duplicate := duplicate_grant(deploy.volumes)) is not None:
        raise KeepError(duplicate)
    # FD_NAMES names every fd, the granted volumes' guest paths too: a ':' in one is refused
    # here, not when the guest starts (the keep would have accepted, and been used up).
    config.guest_env([grant.guest_path for grant in deploy.volumes])
    if config.tls.certificate is not None or config.tls.export_certificate is not None:
        raise KeepError("a deployed keep.toml cannot name host files ([tls] paths): the keep's "
                        "TLS sockets use its attested key")
    for entry in config.sockets:
        try:  # the policy the run applies (NetworkPolicy(): no --insecure-plaintext in a keep)
            NetworkPolicy().check(entry.name, entry.prot,
                                  entry_allows_plaintext=entry.insecure_plaintext)
        except NetError:
            raise KeepError(f"socket {entry.name!r} uses prot = \"tcp\" (plaintext the host can "
                            "read): a deployed keep.toml allows it only with "
                            "insecure_plaintext = true on the entry") from None
        if getattr(entry, "client_ca", None) is not None or getattr(entry, "ca", None) is not None:
            raise KeepError(f"socket {entry.name!r}: CA files on the keep host cannot be trusted "
                            "by a deployed workload (use pin_sha256)")
        # Without ca and pin, net.tls trusts the default CA store: the keep HOST's (its
        # /etc/ssl/certs, or SSL_CERT_FILE in its environment), which could add its own CA.
        if isinstance(entry, ConnectFile) and entry.prot == "tls" and entry.pin_sha256 is None:
            raise KeepError(f"socket {entry.name!r}: a deployed workload's TLS connect needs "
                            "pin_sha256: without it the keep host's CA store would decide which "
                            "server it talks to")
    return config


async def run_deployment(deployment: Deployment) -> RunOutcome:
    """The default runner: shim.run with the module bytes in memory and the compile cache off;
    each granted volume pre-opened at its guest path (shim.volume_backend); keep.toml (args,
    env, FD_NAMES, sockets) applied by shim.sockets, whose TLS sockets use the keep's attested
    key. The guest's stdio is the deployment's whatever keep.toml says: its stdout and stderr
    go to the owner, never to the host's terminal."""
    from shim.run import RunConfig, Stdio

    message = deployment.message
    preopens = tuple((grant.guest_path, deployment.volumes[grant.name].root())
                     for grant in message.volumes)
    # interruptible: cancelling this runner (Keep.interrupt, on SIGINT / SIGTERM) stops the
    # guest at its next loop back-edge, so its volumes are committed and the owner gets `finished`.
    run_config = RunConfig(module="main.wasm", module_bytes=message.workload, args=message.args,
                           preopens=preopens, cache=False, interruptible=True,
                           stdio=Stdio(EmptyInput(), deployment.stdout, deployment.stderr))
    try:
        result = await _run_in_keep_network(run_config, deployment.config, deployment.certificates)
    except KeepError as error:
        return RunOutcome(exit_status=1, error=str(error))
    return RunOutcome(exit_status=result.exit_code,
                      error=None if result.trap is None else f"guest trapped: {result.trap}")


async def _run_in_keep_network(run_config: RunConfig, keep_config: KeepConfig,
                               certificates: AttestedCertificateProvider) -> RunResult:
    """Run the guest with keep.toml's sockets (TLS with the keep's attested key) open around it.

    Not shim.sockets.run_with_keep_config: that one takes SIGINT / SIGTERM for itself and only
    stops the sockets (then, after a grace period, kills the process), which can neither stop a
    guest computing in wasm code nor let the keep commit its volumes and tell the owner. Here the
    keep's own signal handler cancels this run: the sockets are stopped (a guest blocked in
    accept or poll gets ECANCELED) and the engine's epoch stops the guest's wasm code."""
    from shim.run import run_module_async
    from shim.sockets import open_keep_network, with_keep_config

    if not keep_config.sockets:
        return await run_module_async(with_keep_config(run_config, keep_config, None))
    async with (open_keep_network(keep_config, NetworkPolicy(), certificates) as network,
                trio.open_nursery() as nursery):
        nursery.start_soon(_stop_when_cancelled, network)
        result = await run_module_async(with_keep_config(run_config, keep_config, network))
        nursery.cancel_scope.cancel()
    return result


async def _stop_when_cancelled(network: KeepNetwork) -> None:
    """Stop the keep's sockets when the run is cancelled (or has ended)."""
    try:
        await trio.sleep_forever()
    finally:
        network.stop()


def open_granted_volumes(grants: Sequence[VolumeGrant], images: Mapping[str, Path],
                         integrity_failures: list[str]) -> dict[str, VolumeSession]:
    """Open every granted volume with the owner's secret, refusing an image older than the pin
    (RollbackError) or another volume than the pinned one (uuid), as a VolumeSession for the
    guest. All or nothing: on any failure the volumes already opened are closed and a KeepError
    names the volume. Integrity failures the guest meets (EIO) are noted in `integrity_failures`
    for the owner."""
    from shim.volume_backend import VolumeSession
    from storage.errors import StorageError
    from storage.volume import open_volume

    opened: dict[str, VolumeSession] = {}
    try:
        for grant in grants:
            image = images.get(grant.name)
            if image is None:
                raise KeepError(f"this keep has no volume {grant.name!r} "
                                "(the operator names it with keep serve --volume NAME=IMAGE)")
            try:
                volume = open_volume(image, grant.key_file, volume_key=grant.volume_key,
                                     writable=True, expected_generation=grant.pinned_generation)
            except (StorageError, OSError) as error:
                raise KeepError(f"volume {grant.name!r}: {type(error).__name__}: {error}") from None

            def note(error: OSError, name: str = grant.name) -> None:
                integrity_failures.append(f"volume {name!r}: integrity failure: {error}")

            opened[grant.name] = VolumeSession(volume, on_integrity_error=note)
            uuid = volume.state().uuid
            if grant.pinned_uuid is not None and uuid != grant.pinned_uuid:
                raise KeepError(f"volume {grant.name!r} is another volume (uuid {uuid}, pinned "
                                f"{grant.pinned_uuid})")
    except BaseException:
        with contextlib.suppress(KeepError):
            close_volumes(opened)
        raise
    return opened


def close_volumes(sessions: Mapping[str, VolumeSession]) -> tuple[VolumeState, ...]:
    """Commit and close every volume; the final states (after the closing checkpoint) are what
    the owner pins next time. A volume that fails to commit is closed anyway and reported."""
    states: list[VolumeState] = []
    problems: list[str] = []
    for name, session in sessions.items():
        try:
            state = session.close()
            states.append(VolumeState(name, state.uuid, state.generation, state.root_mac))
        except OSError as error:
            problems.append(f"volume {name!r}: {error}")
    if problems:
        raise KeepError("; ".join(problems))
    return tuple(states)


class Keep:
    """One keep: its identity, its backend, the volume images the operator offers, and whether
    it already runs a workload."""

    def __init__(self, backend: Backend, runner: Runner = run_deployment, *,
                 volumes: Mapping[str, Path] | None = None,
                 handshake_seconds: float = HANDSHAKE_SECONDS,
                 deploy_seconds: float = DEPLOY_SECONDS,
                 pending_bytes_limit: int = PENDING_BYTES_LIMIT,
                 check: Callable[[Deploy], None] | None = None) -> None:
        """`check` refuses a deployment its runner could not start (KeepError), before the keep
        accepts it; by default `check_workload` for `run_deployment` (it compiles the module)
        and nothing for another runner, which decides what its workload bytes are."""
        self.identity = AttestedIdentity()
        self._check = check if check is not None or runner is not run_deployment else check_workload
        self._volume_images = dict(volumes or {})
        self.backend = backend
        self.tls = KeepTLS(self.identity, backend)
        self._runner = runner
        self._handshake_seconds = handshake_seconds
        self._deploy_seconds = deploy_seconds
        self._pending_bytes_limit = pending_bytes_limit
        self._pending_bytes = 0  # buffered by connections whose deploy frame is still arriving
        self._busy = False
        self._run_scope: trio.CancelScope | None = None
        self.signal_number: int | None = None
        self.stopped_a_guest = False
        self._guest_stopped = trio.Event()  # after a signal: no guest runs (any more)
        self.finished = trio.Event()

    def measurement(self) -> bytes:
        """The measurement this keep's evidence states (from a throw-away piece of evidence)."""
        return self.backend.verify(self.backend.evidence(bytes(REPORT_DATA_BYTES))).measurement

    async def listen(self, host: str, port: int) -> list[trio.SocketListener]:
        """Bind host:port (port 0 picks a free port); KeepError if it cannot."""
        try:
            return await trio.open_tcp_listeners(port, host=host)
        except OSError as error:
            raise KeepError(f"cannot listen on {host_port(host, port)}: {error.strerror or error}") from None

    async def serve_on(self, listeners: list[trio.SocketListener]) -> None:
        """Accept connections on `listeners` until one deployment has finished."""
        context = self.tls.server_context()
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, context, nursery)
            await self.finished.wait()
            nursery.cancel_scope.cancel()

    async def serve(self, host: str, port: int, *,
                    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        """`listen` then `serve_on`; `task_status.started` gets the bound address."""
        listeners = await self.listen(host, port)
        address = listeners[0].socket.getsockname()
        task_status.started((str(address[0]), int(address[1])))
        await self.serve_on(listeners)

    def interrupt(self, signal_number: int) -> None:
        """Stop: the running deployment's guest is stopped (its volumes are still committed and
        the owner still gets `finished`), or, with none running, serving ends at once."""
        self.signal_number = signal_number
        if self._run_scope is not None:
            self._run_scope.cancel()
        else:
            self._guest_stopped.set()
            self.finished.set()

    async def stop_on_signals(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                              ) -> None:
        """The first SIGINT, SIGTERM or SIGHUP (shim.signals: less those keep was started with
        ignored) `interrupt`s the keep (as `keep run` stops a guest that has volumes). After it
        the default handlers are back, so a second one ends the process."""
        with receive_stop_signals() as signals:  # (none: nothing stops the keep but its end)
            task_status.started()
            async for signal_number in signals:
                self.interrupt(signal_number)
                break
            else:
                return
        # A guest stuck inside a host call that never returns (neither the epoch nor ECANCELED
        # reach it) would keep the process forever: after a grace period the signal ends the
        # process as it would have without us (as `keep run` does with keep.toml sockets).
        with trio.move_on_after(STOP_GRACE_SECONDS):
            await self._guest_stopped.wait()
            return
        signal.signal(signal_number, signal.SIG_DFL)
        os.kill(os.getpid(), signal_number)

    def _free(self) -> None:
        """A deployment was refused before it started: wait for the next one (unless stopped)."""
        self._busy = False
        self._run_scope = None
        if self.signal_number is not None:
            self._guest_stopped.set()
            self.finished.set()

    async def _accept_loop(self, listener: trio.SocketListener, context: ssl.SSLContext,
                           nursery: trio.Nursery) -> None:
        """Accept until serving ends. accept() failing (EMFILE when peers hold every fd the
        process may have, ENOBUFS, ...) is the network's doing: one line on stderr, a short
        pause, and accepting goes on once connections have been dropped (by the deadlines)."""
        failing = False
        async with listener:
            while True:
                try:
                    tcp = await listener.accept()
                except OSError as error:
                    if not failing:  # (say: a stderr whose reader is gone must not end serve)
                        say(f"cannot accept connections for now: {error.strerror or error}")
                    failing = True
                    await trio.sleep(ACCEPT_RETRY_SECONDS)
                    continue
                failing = False
                nursery.start_soon(self._connection, tcp, context)

    async def _connection(self, tcp: trio.SocketStream, context: ssl.SSLContext) -> None:
        stream = trio.SSLStream(tcp, context, server_side=True)
        try:
            with trio.fail_after(self._handshake_seconds):
                await stream.do_handshake()
            await self._converse(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, ProtocolError):
            return  # the peer went away, stalled its handshake or broke the protocol
        except Exception as error:  # a bug met by one connection must not end the keep
            say(f"a connection was dropped: keep internal error: {type(error).__name__}: {error}")
        finally:
            await trio.aclose_forcefully(stream)

    async def _converse(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        conversation = Conversation("keep")
        # Anyone can connect: the deploy frame must keep arriving (no gap longer than the
        # handshake's deadline) and be complete within DEPLOY_SECONDS, or the connection is
        # dropped (TooSlowError), so that silent or trickling peers cannot hold fds forever.
        # The bytes every connection has buffered count against one budget, so that many peers
        # each sending a large frame cannot make the keep (and a workload it runs) run out of
        # memory: the connection whose bytes would overrun it is dropped.
        held = 0
        try:
            with trio.fail_after(self._deploy_seconds):
                while (message := conversation.next_message()) is None:
                    with trio.fail_after(self._handshake_seconds):
                        data = await stream.receive_some()
                    if self._pending_bytes + len(data) > self._pending_bytes_limit:
                        raise trio.BrokenResourceError("the keep's buffer budget is used up")
                    self._pending_bytes += len(data)
                    held += len(data)
                    conversation.receive_data(data)
        finally:
            self._pending_bytes -= held
        assert isinstance(message, Deploy)
        if self._busy:
            await stream.send_all(conversation.send(Refused(BUSY_REASON)))
            return
        self._busy = True
        self._run_scope = trio.CancelScope()  # a signal from now on stops this deployment
        try:
            config = preflight(message)
            if self._check is not None:  # (in a thread: parsing a 128 MiB module takes a while)
                await trio.to_thread.run_sync(self._check, message)
            integrity_failures: list[str] = []
            volumes = await trio.to_thread.run_sync(open_granted_volumes, message.volumes,
                                                    self._volume_images, integrity_failures)
        except (ConfigError, KeepError) as error:
            self._free()
            await stream.send_all(conversation.send(_refusal(str(error))))
            return
        except Exception as error:  # a bug in the checks: refuse, and stay free for the next one
            self._free()
            await stream.send_all(conversation.send(_refusal(
                f"keep internal error while checking the deployment: {type(error).__name__}: {error}")))
            return
        owner_gone = trio.Event()
        try:  # from here on this keep has run its one deployment, however the owner behaves
            try:
                await stream.send_all(conversation.send(Accepted(message.workload_sha256)))
                outcome = await self._run(stream, conversation, message, config, volumes,
                                          owner_gone)
            finally:
                try:
                    states = await trio.to_thread.run_sync(close_volumes, volumes)
                except KeepError as error:
                    states, outcome = (), RunOutcome(exit_status=1, error=str(error))
            if integrity_failures:
                outcome = RunOutcome(outcome.exit_status, "; ".join(
                    [*([outcome.error] if outcome.error else []), *integrity_failures]))
            run_error = None if outcome.error is None else _shortened(outcome.error)
            try:
                if owner_gone.is_set():
                    raise trio.BrokenResourceError("the owner's connection ended")
                await stream.send_all(conversation.send(Finished(outcome.exit_status, run_error,
                                                                 states)))
                await stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # Serving ends either way; the operator learns why the owner got no outcome
                # (which stays the owner's: it is not said here).
                ended = "was stopped" if outcome.signal_number is not None else "ran to its end"
                say("the owner's connection broke before the deployment ended: its outcome "
                    f"could not be delivered (the workload {ended}"
                    + (", its volumes were committed)" if states else ")"))
        finally:
            self.finished.set()

    async def _run(self, stream: trio.SSLStream[trio.SocketStream], conversation: Conversation,
                   deploy: Deploy, config: KeepConfig,
                   volumes: Mapping[str, VolumeSession], owner_gone: trio.Event) -> RunOutcome:
        send, receive = trio.open_memory_channel[tuple[StreamName, bytes]](16)
        watching = trio.CancelScope()
        kinds = [entry.kind if isinstance(entry, StdioFile) else "null" for entry in config.stdio]
        stdout = GuestOutput("stdout", send, discard=kinds[1] == "null")
        stderr = GuestOutput("stderr", send, discard=kinds[2] == "null")
        outcome = RunOutcome(exit_status=1, error="the workload did not run")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_forward_output, stream, conversation, receive)
            nursery.start_soon(_watch_owner, stream, watching, owner_gone)
            async with send:
                assert self._run_scope is not None
                try:
                    with self._run_scope:
                        outcome = await self._runner(Deployment(
                            deploy, config, stdout, stderr,
                            AttestedCertificateProvider(self.identity, self.backend), volumes))
                except Exception as error:  # a bug in the keep: the owner still gets an answer
                    outcome = RunOutcome(exit_status=70, error=f"keep internal error: "
                                         f"{type(error).__name__}: {error}")
                finally:
                    self._guest_stopped.set()
                    watching.cancel()
        if self._run_scope.cancelled_caught and self.signal_number is not None:
            outcome = RunOutcome.signalled(self.signal_number)
        if outcome.signal_number is not None:
            self.signal_number = outcome.signal_number
            self.stopped_a_guest = True
        return outcome


def _shortened(text: str) -> str:
    """`text` cut to MAX_REASON_CHARS. A reason or error goes into a header of at most 1 MiB:
    an error about a hostile keep.toml may quote it (repr doubles quotes and backslashes, JSON
    again), a run may note thousands of integrity failures, and a header over the limit could
    not be sent at all (the owner saw only a broken connection, and no volume states)."""
    if len(text) > MAX_REASON_CHARS:
        return text[:MAX_REASON_CHARS] + "… (shortened)"
    return text


def _refusal(reason: str) -> Refused:
    return Refused(_shortened(reason))


async def _forward_output(stream: trio.SSLStream[trio.SocketStream], conversation: Conversation,
                          receive: trio.MemoryReceiveChannel[tuple[StreamName, bytes]]) -> None:
    """Frame the guest's output as `output` messages, in the order it was written. If the
    owner goes away, the rest is drained and dropped, so the guest still runs to its end (and
    its volumes are committed) instead of blocking on a full channel."""
    async with receive:
        try:
            async for name, data in receive:
                for start in range(0, len(data), MAX_OUTPUT_CHUNK_BYTES):
                    await stream.send_all(conversation.send(
                        Output(name, data[start:start + MAX_OUTPUT_CHUNK_BYTES])))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            async for _ in receive:
                pass


async def _watch_owner(stream: trio.SSLStream[trio.SocketStream], scope: trio.CancelScope,
                       gone: trio.Event) -> None:
    """Note when the owner goes away while its deployment runs (until `scope` is cancelled, as
    the run ends). The owner sends nothing after `deploy`, so whatever this receive returns -
    end of stream, a broken connection, bytes the protocol does not allow - means no outcome
    will reach it; and a peer that died quietly may not even break the keep's last send, so
    this is how the keep knows. (Cancelling a receive after the handshake leaves the stream
    usable for the sends that follow.)"""
    with scope:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.receive_some()
        gone.set()


def _volume_images(specs: Sequence[str]) -> dict[str, Path]:
    images: dict[str, Path] = {}
    for spec in specs:
        name, separator, image = spec.partition("=")
        if not name or not separator or not image:
            raise UsageError(f"--volume {spec!r}: expected NAME=IMAGE")
        if "/" in name:  # (a grant's name never holds one: such a volume could never be granted)
            raise UsageError(f"--volume {spec!r}: a volume name has no '/'")
        if name in images:
            raise UsageError(f"--volume {name}: given twice")
        # (a block device, e.g. a loop device or a disk partition, is a volume too, as for keep
        # run --volume and keep volume: it used to be refused here as "not a volume image file")
        if not (Path(image).is_file() or Path(image).is_block_device()):
            raise UsageError(f"--volume {name}: {image} is not a volume image file or block device")
        images[name] = Path(image)
    return images


def serve_command(args: argparse.Namespace) -> int:
    """`keep serve --listen ADDR:PORT [--backend NAME] [--volume NAME=IMAGE ...]`: serve one
    deployment, then exit 0; SIGINT / SIGTERM stop it (a running guest is stopped, its volumes
    committed, the owner told) and it exits 128 + the signal's number."""
    host, port = parse_address(args.listen, "--listen")
    images = _volume_images(args.volume)
    backend = backend_named(args.backend, debug=bool(args.debug))
    forbid_core_dumps()  # the deployed workload, its keys and its plaintext will be in this process

    keep = Keep(backend, volumes=images)
    measurement = keep.measurement()  # an unsupported backend fails here, as one line

    async def main() -> None:
        listeners = await keep.listen(host, port)
        async with trio.open_nursery() as nursery:
            # before the line that says the keep is ready: a signal sent on seeing it must stop
            # the keep, not meet the default action (SIGTERM killed it, status -15, not 143)
            await nursery.start(keep.stop_on_signals)
            bound_host, bound_port = listeners[0].socket.getsockname()[:2]
            say(f"serving on {host_port(bound_host, bound_port)} (backend {backend.name}, "
                f"measurement {measurement.hex()})")
            await keep.serve_on(listeners)
            nursery.cancel_scope.cancel()

    trio.run(main)
    if keep.signal_number is None:
        return 0
    # (say: a terminal that hung up, whose SIGHUP stopped the keep, takes no more lines)
    say(f"{signal.Signals(keep.signal_number).name}: stopped"
        + (", guest stopped, volumes committed" if keep.stopped_a_guest else ""))
    return 128 + keep.signal_number
