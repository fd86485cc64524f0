"""`keep deploy`: attest a keep, then send it a workload, its config and volume keys.

Theory of operation
-------------------
1. Before any connection: read the module, keep.toml (validated here too, so a typo is reported
   on the owner's side), the policy, the volume keys and, with --volume-state, the generations to
   pin. A pin below the policy's min_volume_generation is refused (VolumeGenerationTooOld).
2. `open_verified_stream` (shim.attest): TLS 1.3 with a fresh nonce in the server name; the peer
   certificate of that session must carry evidence binding the session's key and the nonce, and
   pass the policy. Nothing is sent before that check succeeds.
3. The deploy protocol: `deploy` -> `accepted` | `refused`; then the guest's stdout and stderr are
   written to ours as they arrive; `finished` gives the exit status (which `keep deploy` exits
   with), a keep-side error, and the volumes' final states, which are checked against the pins
   (an older generation is a rollback) and written back to --volume-state for the next deployment.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO

import trio
import wasmtime
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from net.files import InputFileError, read_input_file
from shim.attest import (
    OWNER_HANDSHAKE_SECONDS,
    Accepted,
    Claims,
    Conversation,
    Deploy,
    Finished,
    Message,
    Output,
    Policy,
    ProtocolError,
    Refused,
    RemoteProtocolError,
    VolumeGenerationTooOld,
    VolumeGrant,
    VolumeState,
    load_policy,
    open_verified_stream,
)
from shim.attest._protocol import MAX_WORKLOAD_BYTES, duplicate_grant, encode_message
from shim.config import parse_config, read_config_text
from shim.engine import EngineSettings
from shim.errors import KeepError, UsageError, point_at_devnull, say
from shim.keys import MAX_KEY_FILE_BYTES, forbid_core_dumps
from shim.volume_state import pin, read_volume_state, update_state_file, writable_state_file

ANSWER_SECONDS = 120.0
"""How long the owner waits for `accepted` or `refused` once the deployment is sent (the keep
checks it and opens its volumes first, which takes seconds, not minutes)."""


class DeployRefused(KeepError):
    """The keep refused the deployment (busy, bad config, unsupported feature)."""


@dataclass(frozen=True)
class DeployResult:
    """What a deployment came back with."""

    claims: Claims
    spki_sha256: str
    exit_status: int
    error: str | None
    volumes: tuple[VolumeState, ...]


def check_workload(deploy: Deploy, source: str = "the workload") -> None:
    """KeepError unless the deployment could start: its module is valid WebAssembly and its
    arguments hold no NUL. Checked by the owner before connecting and by the keep before it
    accepts: a keep serves one deployment, and an invalid module it had accepted used it up
    (the owner got "main.wasm is not a valid module" and the keep had exited). Validation only
    parses (no code is generated), so it costs a fraction of the compile that follows."""
    if any("\0" in arg for arg in deploy.args):
        raise KeepError("a guest argument contains a NUL character, which a guest's arguments "
                        "cannot hold")
    try:
        wasmtime.Module.validate(EngineSettings().make_engine(), deploy.workload)  # the run's wasm features
    except wasmtime.WasmtimeError as error:
        from shim.run import one_line

        raise KeepError(f"{source} is not a valid WebAssembly module: {one_line(str(error))}") from None


def check_pins(deploy: Deploy, policy: Policy) -> None:
    """Refuse to deploy with a pinned generation below the policy's minimum."""
    for grant in deploy.volumes:
        pinned = grant.pinned_generation or 0
        if pinned < policy.min_volume_generation:
            raise VolumeGenerationTooOld(
                f"volume {grant.name!r}: pinned generation {pinned} is below the policy's "
                f"min_volume_generation {policy.min_volume_generation}")


def check_returned_volumes(deploy: Deploy, returned: Sequence[VolumeState]) -> None:
    """Every granted volume comes back, as the pinned volume (uuid), not older than its pin."""
    states = {state.name: state for state in returned}
    for grant in deploy.volumes:
        state = states.get(grant.name)
        if state is None:
            raise VolumeGenerationTooOld(f"volume {grant.name!r}: the keep returned no state for it")
        if grant.pinned_uuid is not None and state.uuid != grant.pinned_uuid:
            raise VolumeGenerationTooOld(f"volume {grant.name!r} came back as another volume "
                                         f"(uuid {state.uuid}, pinned {grant.pinned_uuid})")
        if state.generation < (grant.pinned_generation or 0):
            raise VolumeGenerationTooOld(f"volume {grant.name!r} came back at generation "
                                         f"{state.generation}, older than the pinned "
                                         f"{grant.pinned_generation}")


async def deploy_to(host: str, port: int, deploy: Deploy, policy: Policy, *,
                    stdout: BinaryIO, stderr: BinaryIO, announce: TextIO | None = None,
                    handshake_seconds: float = OWNER_HANDSHAKE_SECONDS,
                    answer_seconds: float = ANSWER_SECONDS) -> DeployResult:
    """Attest the keep at host:port, deploy, stream its output into `stdout`/`stderr`.

    With `announce`, one line names the attested keep and the SHA-256 of its key (the key its
    keep.toml TLS sockets use too, so clients of the workload can pin it) before anything is sent.
    Connecting and the handshake get `handshake_seconds`; the keep's `accepted` or `refused` must
    come within `answer_seconds` once the deployment is sent. After `accepted` there is no
    deadline: a workload may compute for a long time without writing anything."""
    check_pins(deploy, policy)
    encode_message(deploy)  # an oversize module, args or config: refused before connecting
    try:
        stream, claims = await open_verified_stream(host, port, policy,
                                                    handshake_seconds=handshake_seconds)
    except OSError as error:
        raise KeepError(f"cannot connect to {host}:{port}: {error.strerror or error}") from None
    except trio.BrokenResourceError as error:
        raise KeepError(f"no TLS 1.3 keep at {host}:{port}: {error.__cause__ or error}") from None
    certificate = x509.load_der_x509_certificate(stream.getpeercert(binary_form=True) or b"")
    spki_sha256 = hashlib.sha256(certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()
    if announce is not None:
        print(f"keep: attested a {claims.backend} keep at {host}:{port}: measurement "
              f"{claims.measurement.hex()}, key spki-sha256 {spki_sha256}", file=announce, flush=True)
    try:
        async with stream:
            conversation = Conversation("owner")
            await stream.send_all(conversation.send(deploy))
            with trio.move_on_after(answer_seconds) as answering:
                first = await _next_message(stream, conversation)
            if answering.cancelled_caught:
                raise KeepError(f"the keep at {host}:{port} did not answer the deployment within "
                                f"{answer_seconds:g} s")
            return await _converse(stream, conversation, first, deploy, claims, spki_sha256,
                                   stdout, stderr)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
        raise KeepError(f"the connection to the keep broke: {error.__cause__ or error}") from None


async def _next_message(stream: trio.SSLStream[trio.SocketStream],
                        conversation: Conversation) -> Message:
    """The keep's next message (RemoteProtocolError for anything invalid)."""
    while (message := conversation.next_message()) is None:
        conversation.receive_data(await stream.receive_some())
    return message


async def _converse(stream: trio.SSLStream[trio.SocketStream], conversation: Conversation,
                    first: Message, deploy: Deploy, claims: Claims, spki_sha256: str,
                    stdout: BinaryIO, stderr: BinaryIO) -> DeployResult:
    """The owner's half of the deploy protocol after the keep's `first` answer."""
    message = first
    while True:
        match message:
            case Refused():
                raise DeployRefused(f"the keep refused the deployment: {message.reason}")
            case Accepted():
                if message.workload_sha256 != deploy.workload_sha256:
                    raise RemoteProtocolError("the keep accepted another workload than ours")
            case Output():
                _write_output(stdout if message.stream == "stdout" else stderr, message.data,
                              message.stream)
            case Finished():
                check_returned_volumes(deploy, message.volumes)
                return DeployResult(claims, spki_sha256, message.exit_status, message.error,
                                    message.volumes)
            case _:
                raise RemoteProtocolError(f"unexpected message {type(message).__name__}")
        message = await _next_message(stream, conversation)


def _write_output(sink: BinaryIO, data: bytes, name: str) -> None:
    """Write the guest's output to ours. If our reader has gone (`keep deploy ... | head`), the
    rest is dropped quietly, as `keep demo` does, and the deployment still runs to its end: its
    exit status and volume states still count. Any other write error (a full disk, EIO) is
    said once, and the rest is dropped the same way: it used to end keep deploy as an
    "internal error" (exit 70), the deployment's exit status and volume states lost."""
    try:
        sink.write(data)
        sink.flush()
    except OSError as error:
        if not isinstance(error, BrokenPipeError):
            say(f"cannot write the guest's {name}: {error.strerror or error}; the rest of it is "
                "dropped")
        try:
            descriptor = sink.fileno()
        except (OSError, ValueError):  # not a file (an in-memory sink): nothing left to drop
            return
        # Later writes and the interpreter's final flush of what is buffered go to /dev/null
        # instead of failing again ("Exception ignored ... BrokenPipeError" at exit).
        point_at_devnull(descriptor)


def _volume_grants(specs: Sequence[str], pins: dict[str, dict[str, object]]) -> tuple[VolumeGrant, ...]:
    """`--volume-key NAME[::GUEST_PATH]=KEYFILE` options as grants, pinned from --volume-state."""
    grants = []
    for spec in specs:
        target, separator, key_path = spec.partition("=")
        name, _, guest_path = target.partition("::")
        if not name or not separator or not key_path:
            raise UsageError(f"--volume-key {spec!r}: expected NAME[::GUEST_PATH]=KEYFILE")
        try:  # as keep run's --key-file: never blocks on a FIFO nobody feeds, never fills memory
            key = read_input_file(key_path, MAX_KEY_FILE_BYTES, pipes=True)
        except OSError as error:
            raise UsageError(f"--volume-key {name}: cannot read {key_path}: {error.strerror}") from None
        except InputFileError as error:
            raise UsageError(f"--volume-key {name}: {error}") from None
        pin = pins.get(name, {})
        generation, uuid = pin.get("generation"), pin.get("uuid")
        try:
            grants.append(VolumeGrant(
                name, key_file=key, guest_path=guest_path,
                pinned_generation=generation if isinstance(generation, int) else None,
                pinned_uuid=uuid if isinstance(uuid, str) else None))
        except ProtocolError as error:
            raise UsageError(f"--volume-key {spec!r}: {error}") from None
    if (duplicate := duplicate_grant(tuple(grants))) is not None:
        raise UsageError(f"--volume-key: {duplicate}")
    return tuple(grants)


def parse_address(text: str, option: str) -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT, as given to --listen / --to."""
    host, separator, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not separator or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"{option} {text!r}: expected HOST:PORT")
    return host, int(port_text)


def deploy_command(args: argparse.Namespace) -> int:
    """`keep deploy --to ADDR:PORT ... MODULE.wasm [ARGS...]`: exits with the guest's status."""
    host, port = parse_address(args.to, "--to")
    forbid_core_dumps()  # the owner's volume keys will be in this process
    try:  # at most what a deploy frame carries: /dev/zero used to fill memory (MemoryError)
        workload = read_input_file(args.module, MAX_WORKLOAD_BYTES, pipes=True)
    except OSError as error:
        raise UsageError(f"cannot read {args.module}: {error.strerror}") from None
    except InputFileError as error:
        raise UsageError(f"module {error}") from None  # (the largest a deploy frame carries)
    config_text = ""
    if args.config is not None:
        config_text = read_config_text(Path(args.config))  # at most MAX_CONFIG_BYTES
        parse_config(config_text, source=args.config)  # report mistakes here, before connecting
    if args.policy is not None:
        policy = load_policy(Path(args.policy), allow_insecure_nil=args.allow_insecure_nil)
    else:
        policy = Policy(allow_insecure_nil=args.allow_insecure_nil)
    state_path = None if args.volume_state is None else Path(args.volume_state)
    state_file = None if state_path is None else writable_state_file(state_path)  # before connecting
    previous = read_volume_state(state_path)
    deploy = Deploy(workload=workload, config=config_text, args=tuple(args.guest_args),
                    volumes=_volume_grants(args.volume_key, previous))
    check_workload(deploy, args.module)  # before connecting: an invalid module would use up the keep
    from shim.serve import preflight

    preflight(deploy)  # what the keep would refuse (host files, an unpinned connect, FD_NAMES)
    result = trio.run(functools.partial(deploy_to, host, port, deploy, policy,
                                        stdout=sys.stdout.buffer, stderr=sys.stderr.buffer,
                                        announce=sys.stderr))
    if state_file is not None and result.volumes:
        ended = {state.name: pin(state.uuid, state.generation, state.root_mac) for state in result.volumes}
        try:
            update_state_file(state_file, previous, ended)
        except OSError as error:
            raise KeepError(f"cannot write --volume-state {state_path}: {error.strerror}") from None
    if result.error is not None:
        say(f"the keep reports: {result.error}")
    if not 0 <= result.exit_status <= 255:  # exiting with 256 would read as success (0)
        raise KeepError(f"the keep reported exit status {result.exit_status}, which no process "
                        "exits with (0-255)")
    return result.exit_status
