"""The deploy protocol, sans-I/O: bytes in, messages out; no sockets, no trio.

Theory of operation. After the TLS handshake (whose certificate the owner has verified, see
_tls), owner and keep exchange frames:

    frame   = header_length (u32, big endian) || payload_length (u32, big endian)
              || header (UTF-8 JSON object, at most MAX_HEADER_BYTES)
              || payload (opaque bytes, at most the limit of the header's "type")

Messages, in the only order the conversation allows (the `_TRANSITIONS` table):

    owner -> keep   deploy    header: args, config (keep.toml text), volumes (name, key_file or
                              volume_key, pinned generation and uuid, guest path),
                              workload_sha256;
                              payload: the module
    keep  -> owner  refused   header: reason                        (conversation ends)
                    accepted  header: workload_sha256
                    output    header: stream ("stdout" | "stderr"); payload: a chunk
                    finished  header: exit_status, error, volumes (name, uuid, generation, root_mac)

Limits are fixed: a frame announcing more than its type allows is refused as soon as its
header arrives, before the payload is buffered. Errors say whose fault they are, as in h11:
LocalProtocolError (this side tried to send something invalid) vs RemoteProtocolError (the peer
sent something invalid; the connection must be dropped).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import posixpath
import struct
from dataclasses import dataclass, field
from typing import Final, Literal

from shim.errors import KeepError

MAX_HEADER_BYTES: Final = 1 << 20
MAX_WORKLOAD_BYTES: Final = 128 << 20
MAX_OUTPUT_CHUNK_BYTES: Final = 64 << 10
MAX_ARGS: Final = 4096
_PREFIX: Final = struct.Struct(">II")


class ProtocolError(KeepError):
    """The deploy conversation broke its rules."""


class LocalProtocolError(ProtocolError):
    """This side tried to send a message that is invalid or out of order (a bug here)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not a valid message in this state; drop the connection."""


@dataclass(frozen=True)
class VolumeGrant:
    """A volume the deployment may open, with exactly one secret: `key_file` (the bytes of a
    LUKS2 key file or passphrase, as cryptsetup's --key-file) or `volume_key` (the raw volume
    key). The pin (`pinned_generation`, `pinned_uuid`) is the state the owner stored after the
    last deployment: an older generation or another volume is refused. `guest_path` is where
    the guest will find it (default `/NAME`). Secrets never appear in repr, so they cannot leak
    into logs or tracebacks."""

    name: str
    key_file: bytes | None = field(default=None, repr=False)
    volume_key: bytes | None = field(default=None, repr=False)
    pinned_generation: int | None = None
    pinned_uuid: str | None = None
    guest_path: str = ""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or "\0" in self.name:
            raise LocalProtocolError(f"volume name {self.name!r} must be non-empty, without '/'")
        if not self.guest_path:
            object.__setattr__(self, "guest_path", "/" + self.name)
        parts = self.guest_path.split("/")
        if not self.guest_path.startswith("/") or "\0" in self.guest_path or ".." in parts:
            raise LocalProtocolError(f"volume {self.name!r}: guest path {self.guest_path!r} must be "
                                     "absolute, without '..'")
        if (self.key_file is None) == (self.volume_key is None):
            raise LocalProtocolError(f"volume {self.name!r}: give exactly one of key_file or volume_key")
        if self.pinned_generation is not None and self.pinned_generation < 0:
            raise LocalProtocolError(f"volume {self.name!r}: a generation is never negative")


def normal_guest_path(name: str) -> str:
    """A pre-opened directory's guest path, spelled one way (`/data`, `/data/`, `//data/.` and
    `/a/../data` all give `/data`), for telling whether two pre-opens are the same directory;
    a relative name stays relative."""
    normal = posixpath.normpath(name).lstrip("/")
    if normal == ".":
        normal = ""
    return f"/{normal}" if name.startswith("/") else normal


def duplicate_grant(grants: tuple[VolumeGrant, ...]) -> str | None:
    """What two grants of one deployment share (a name: the same image opened twice; a guest
    path: one volume hiding the other), or None when they are distinct."""
    names: set[str] = set()
    paths: set[str] = set()
    for grant in grants:
        path = normal_guest_path("/" + grant.guest_path)
        if grant.name in names:
            return f"volume {grant.name!r} is granted twice"
        if path in paths:
            return f"two volumes are granted at guest path {path!r}"
        names.add(grant.name)
        paths.add(path)
    return None


@dataclass(frozen=True)
class VolumeState:
    """A volume's state after the run, as its last commit returned it: the owner stores it and
    pins `generation` in the next deployment."""

    name: str
    uuid: str
    generation: int
    root_mac: bytes


@dataclass(frozen=True)
class Deploy:
    workload: bytes = field(repr=False)
    config: str = ""
    args: tuple[str, ...] = ()
    volumes: tuple[VolumeGrant, ...] = ()

    @property
    def workload_sha256(self) -> bytes:
        return hashlib.sha256(self.workload).digest()


@dataclass(frozen=True)
class Accepted:
    workload_sha256: bytes


@dataclass(frozen=True)
class Refused:
    reason: str


@dataclass(frozen=True)
class Output:
    stream: Literal["stdout", "stderr"]
    data: bytes


@dataclass(frozen=True)
class Finished:
    exit_status: int
    error: str | None = None
    volumes: tuple[VolumeState, ...] = ()


Message = Deploy | Accepted | Refused | Output | Finished
Role = Literal["owner", "keep"]


class State(enum.Enum):
    AWAIT_DEPLOY = "await deploy"
    AWAIT_VERDICT = "await verdict"
    RUNNING = "running"
    DONE = "done"


_TRANSITIONS: Final[dict[tuple[State, str], tuple[Role, State]]] = {
    (State.AWAIT_DEPLOY, "deploy"): ("owner", State.AWAIT_VERDICT),
    (State.AWAIT_VERDICT, "refused"): ("keep", State.DONE),
    (State.AWAIT_VERDICT, "accepted"): ("keep", State.RUNNING),
    (State.RUNNING, "output"): ("keep", State.RUNNING),
    (State.RUNNING, "finished"): ("keep", State.DONE),
}
_PAYLOAD_LIMITS: Final = {"deploy": MAX_WORKLOAD_BYTES, "output": MAX_OUTPUT_CHUNK_BYTES,
                          "accepted": 0, "refused": 0, "finished": 0}
_TYPE_NAMES: Final = {Deploy: "deploy", Accepted: "accepted", Refused: "refused",
                      Output: "output", Finished: "finished"}


def encode_message(message: Message) -> bytes:
    """One frame for `message`; LocalProtocolError if it breaks a limit."""
    kind = _TYPE_NAMES[type(message)]
    payload = b""
    header: dict[str, object]
    match message:
        case Deploy():
            header = {"args": list(message.args), "config": message.config,
                      "volumes": [_grant_to_json(grant) for grant in message.volumes],
                      "workload_sha256": message.workload_sha256.hex()}
            payload = message.workload
        case Accepted():
            header = {"workload_sha256": message.workload_sha256.hex()}
        case Refused():
            header = {"reason": message.reason}
        case Output():
            header = {"stream": message.stream}
            payload = message.data
        case Finished():
            header = {"exit_status": message.exit_status, "error": message.error,
                      "volumes": [{"name": state.name, "uuid": state.uuid,
                                   "generation": state.generation,
                                   "root_mac": state.root_mac.hex()} for state in message.volumes]}
    header["type"] = kind
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise LocalProtocolError(f"{kind} header is {len(header_bytes)} bytes, over the "
                                 f"{MAX_HEADER_BYTES} byte limit")
    if len(payload) > _PAYLOAD_LIMITS[kind]:
        raise LocalProtocolError(f"{kind} payload is {len(payload)} bytes, over the "
                                 f"{_PAYLOAD_LIMITS[kind]} byte limit")
    try:
        decode_header(kind, json.loads(header_bytes), payload)  # never send what we would refuse
    except RemoteProtocolError as error:
        raise LocalProtocolError(str(error)) from None
    return _PREFIX.pack(len(header_bytes), len(payload)) + header_bytes + payload


def _grant_to_json(grant: VolumeGrant) -> dict[str, object]:
    def encoded(secret: bytes | None) -> str | None:
        return None if secret is None else base64.b64encode(secret).decode()

    return {"name": grant.name, "pinned_generation": grant.pinned_generation,
            "pinned_uuid": grant.pinned_uuid, "guest_path": grant.guest_path,
            "key_file": encoded(grant.key_file),
            "volume_key": encoded(grant.volume_key)}


class _Header:
    """Typed accessors over a received JSON header; every failure is the remote's fault."""

    def __init__(self, kind: str, fields: dict[str, object]) -> None:
        self.kind, self.fields = kind, fields

    def get(self, key: str, expected: type | tuple[type, ...], *, optional: bool = False) -> object:
        value = self.fields.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is int):
            raise RemoteProtocolError(f"{self.kind} message: field {key!r} is missing or has the wrong type")
        return value

    def text(self, key: str) -> str:
        value = self.get(key, str)
        assert isinstance(value, str)
        return value

    def integer(self, key: str, *, optional: bool = False) -> int | None:
        value = self.get(key, int, optional=optional)
        assert value is None or isinstance(value, int)
        return value

    def digest(self, key: str) -> bytes:
        value = self.text(key)
        try:
            digest = bytes.fromhex(value)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise RemoteProtocolError(f"{self.kind} message: field {key!r} is not a SHA-256 digest")
        return digest

    def table_list(self, key: str) -> list[_Header]:
        value = self.get(key, list)
        assert isinstance(value, list)
        if not all(isinstance(item, dict) for item in value):
            raise RemoteProtocolError(f"{self.kind} message: {key!r} must be a list of tables")
        return [_Header(f"{self.kind} {key}", item) for item in value]


def decode_header(kind: str, fields: dict[str, object], payload: bytes) -> Message:
    """Build a message from a parsed header and its payload; RemoteProtocolError if invalid."""
    header = _Header(kind, fields)
    match kind:
        case "deploy":
            args = header.get("args", list)
            assert isinstance(args, list)
            if len(args) > MAX_ARGS or not all(isinstance(arg, str) for arg in args):
                raise RemoteProtocolError("deploy message: args must be a list of strings")
            message = Deploy(workload=payload, config=header.text("config"), args=tuple(args),
                             volumes=tuple(_grant_from_json(item) for item in header.table_list("volumes")))
            if message.workload_sha256 != header.digest("workload_sha256"):
                raise RemoteProtocolError("deploy message: the workload does not match its SHA-256")
            return message
        case "accepted":
            return Accepted(workload_sha256=header.digest("workload_sha256"))
        case "refused":
            return Refused(reason=header.text("reason"))
        case "output":
            stream = header.text("stream")
            if stream not in ("stdout", "stderr"):
                raise RemoteProtocolError(f"output message: unknown stream {stream!r}")
            return Output(stream="stdout" if stream == "stdout" else "stderr", data=payload)
        case "finished":
            status = header.integer("exit_status")
            assert status is not None
            error = header.get("error", str, optional=True)
            assert error is None or isinstance(error, str)
            return Finished(exit_status=status, error=error,
                            volumes=tuple(_state_from_json(item) for item in header.table_list("volumes")))
    raise RemoteProtocolError(f"unknown message type {kind!r}")


def _grant_from_json(header: _Header) -> VolumeGrant:
    secrets: dict[str, bytes | None] = {}
    for key in ("key_file", "volume_key"):
        text = header.get(key, str, optional=True)
        secrets[key] = None
        if isinstance(text, str):
            try:
                secrets[key] = base64.b64decode(text, validate=True)
            except ValueError:
                raise RemoteProtocolError(f"deploy message: a volume's {key} is not base64") from None
    uuid = header.get("pinned_uuid", str, optional=True)
    assert uuid is None or isinstance(uuid, str)
    guest_path = header.get("guest_path", str, optional=True) or ""
    assert isinstance(guest_path, str)
    try:
        return VolumeGrant(name=header.text("name"), key_file=secrets["key_file"],
                           volume_key=secrets["volume_key"], pinned_uuid=uuid, guest_path=guest_path,
                           pinned_generation=header.integer("pinned_generation", optional=True))
    except LocalProtocolError as error:
        raise RemoteProtocolError(f"deploy message: {error}") from None


def _state_from_json(header: _Header) -> VolumeState:
    root_mac = header.text("root_mac")
    try:
        mac = bytes.fromhex(root_mac)
    except ValueError:
        raise RemoteProtocolError("finished message: a root_mac is not hex") from None
    generation = header.integer("generation")
    assert generation is not None
    return VolumeState(name=header.text("name"), uuid=header.text("uuid"), generation=generation,
                       root_mac=mac)


class Conversation:
    """One side of a deploy conversation: `send` returns the bytes to write; `receive_data`
    feeds bytes read; `next_message` returns the next complete message or None (need more data).

    Both directions share one state, because the conversation is strictly ordered."""

    def __init__(self, role: Role) -> None:
        self.role: Role = role
        self.state = State.AWAIT_DEPLOY
        self._buffer = bytearray()
        self._eof = False
        self._pending: tuple[int, int, str, dict[str, object]] | None = None  # a parsed header

    def _advance(self, kind: str, sender: Role) -> None:
        transition = _TRANSITIONS.get((self.state, kind))
        if transition is None or transition[0] != sender:
            error = LocalProtocolError if sender == self.role else RemoteProtocolError
            raise error(f"the {sender} may not send {kind!r} in state {self.state.value!r}")
        self.state = transition[1]

    def send(self, message: Message) -> bytes:
        """The frame to write for `message`, after checking it is this role's turn to send it."""
        frame = encode_message(message)
        self._advance(_TYPE_NAMES[type(message)], self.role)
        return frame

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes from the peer; b"" means end of stream."""
        if not data:
            self._eof = True
        self._buffer += data

    def next_message(self) -> Message | None:
        """The next complete message from the peer, or None if more bytes are needed.

        RemoteProtocolError for anything invalid, oversize, out of order, or a stream that ended
        in the middle of a frame."""
        if self._pending is None:
            self._pending = self._parse_header()
            if self._pending is None:
                return None
        header_end, frame_end, kind, fields = self._pending
        if len(self._buffer) < frame_end:
            self._check_not_ended()
            return None
        payload = bytes(self._buffer[header_end:frame_end])
        del self._buffer[:frame_end]
        self._pending = None
        message = decode_header(kind, fields, payload)
        self._advance(kind, "keep" if self.role == "owner" else "owner")
        return message

    def _parse_header(self) -> tuple[int, int, str, dict[str, object]] | None:
        """(header end, frame end, type, fields) of the frame at the start of the buffer, once
        its header has arrived (None before), checked against the limits and the state. Done
        once per frame: the payload may arrive in thousands of pieces, and parsing a header of
        up to MAX_HEADER_BYTES again for each would cost the keep seconds per frame."""
        if len(self._buffer) < _PREFIX.size:
            self._check_not_ended()
            return None
        header_length, payload_length = _PREFIX.unpack_from(self._buffer)
        if header_length > MAX_HEADER_BYTES:
            raise RemoteProtocolError(f"frame header of {header_length} bytes is over the "
                                      f"{MAX_HEADER_BYTES} byte limit")
        if payload_length > MAX_WORKLOAD_BYTES:
            raise RemoteProtocolError(f"frame payload of {payload_length} bytes is over the "
                                      f"{MAX_WORKLOAD_BYTES} byte limit")
        header_end = _PREFIX.size + header_length
        if len(self._buffer) < header_end:
            self._check_not_ended()
            return None
        try:
            fields = json.loads(bytes(self._buffer[_PREFIX.size:header_end]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise RemoteProtocolError("frame header is not UTF-8 JSON") from None
        except RecursionError:  # deep nesting fits in the size limit but not in Python's stack
            raise RemoteProtocolError("frame header is not UTF-8 JSON: nested too deeply") from None
        if not isinstance(fields, dict) or not isinstance(fields.get("type"), str):
            raise RemoteProtocolError("frame header is not a JSON object with a 'type'")
        kind = fields["type"]
        if kind not in _PAYLOAD_LIMITS:
            raise RemoteProtocolError(f"unknown message type {kind!r}")
        if payload_length > _PAYLOAD_LIMITS[kind]:
            raise RemoteProtocolError(f"{kind} payload of {payload_length} bytes is over the "
                                      f"{_PAYLOAD_LIMITS[kind]} byte limit")
        sender: Role = "keep" if self.role == "owner" else "owner"
        transition = _TRANSITIONS.get((self.state, kind))
        if transition is None or transition[0] != sender:
            raise RemoteProtocolError(f"the {sender} may not send {kind!r} in state {self.state.value!r}")
        return header_end, header_end + payload_length, kind, fields

    def _check_not_ended(self) -> None:
        if self._eof:
            if self._buffer:
                raise RemoteProtocolError(f"the {'keep' if self.role == 'owner' else 'owner'} "
                                          f"closed the connection in the middle of a frame "
                                          f"({len(self._buffer)} bytes buffered)")
            if self.state is not State.DONE:
                raise RemoteProtocolError(f"the connection closed in state {self.state.value!r}")
        return None
