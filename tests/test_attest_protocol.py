"""The deploy protocol codec, sans-I/O: no socket is ever opened here."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shim.attest import (
    Accepted,
    Conversation,
    Deploy,
    Finished,
    LocalProtocolError,
    Message,
    Output,
    Refused,
    RemoteProtocolError,
    VolumeGrant,
    VolumeState,
)
from shim.attest._protocol import MAX_HEADER_BYTES, MAX_OUTPUT_CHUNK_BYTES, MAX_WORKLOAD_BYTES, State

DEPLOY = Deploy(workload=b"\0asm\1\0\0\0" + bytes(range(256)), config='[[files]]\nkind = "stdout"\n',
                args=("--flag", "ünïcode", ""),
                volumes=(VolumeGrant("data", volume_key=bytes(range(64)), pinned_generation=3,
                                     pinned_uuid="8d1c-uuid"),
                         VolumeGrant("logs", key_file=b"correct horse", guest_path="/var/log")))
FINISHED = Finished(exit_status=3, error=None,
                    volumes=(VolumeState("data", "8d1c-uuid", 4, bytes(range(32))),))


def _deliver(sender: Conversation, receiver: Conversation, message: Message) -> Message | None:
    receiver.receive_data(sender.send(message))
    return receiver.next_message()


def test_a_whole_conversation_round_trips() -> None:
    owner, keep = Conversation("owner"), Conversation("keep")
    assert _deliver(owner, keep, DEPLOY) == DEPLOY
    script: list[Message] = [Accepted(DEPLOY.workload_sha256), Output("stdout", b"hello\n"),
                             Output("stderr", b""), Output("stdout", bytes(MAX_OUTPUT_CHUNK_BYTES)),
                             FINISHED]
    for message in script:
        assert _deliver(keep, owner, message) == message
    owner.receive_data(b"")
    assert owner.next_message() is None  # a clean end after `finished`


def test_refusal_ends_the_conversation() -> None:
    owner, keep = Conversation("owner"), Conversation("keep")
    _deliver(owner, keep, DEPLOY)
    assert _deliver(keep, owner, Refused("this keep already runs a workload")) == Refused(
        "this keep already runs a workload")
    with pytest.raises(LocalProtocolError, match="may not send 'output'"):
        keep.send(Output("stdout", b"x"))


def test_bytes_arriving_one_at_a_time_make_the_same_message() -> None:
    frame = Conversation("owner").send(DEPLOY)
    keep = Conversation("keep")
    results = []
    for index in range(len(frame)):
        keep.receive_data(frame[index:index + 1])
        results.append(keep.next_message())
    assert results[:-1] == [None] * (len(frame) - 1) and results[-1] == DEPLOY


def test_two_frames_in_one_read_are_two_messages() -> None:
    keep, owner = Conversation("keep"), Conversation("owner")
    keep.state = owner.state = State.RUNNING
    owner.receive_data(keep.send(Output("stdout", b"a")) + keep.send(Output("stderr", b"b")))
    assert owner.next_message() == Output("stdout", b"a")
    assert owner.next_message() == Output("stderr", b"b")
    assert owner.next_message() is None


@pytest.mark.parametrize("cut", [1, 7, 8, 20, -1])
def test_a_truncated_frame_is_a_remote_error_at_end_of_stream(cut: int) -> None:
    frame = Conversation("owner").send(DEPLOY)
    keep = Conversation("keep")
    keep.receive_data(frame[:cut])
    assert keep.next_message() is None
    keep.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="in the middle of a frame"):
        keep.next_message()


def test_end_of_stream_before_finished_is_a_remote_error() -> None:
    owner = Conversation("owner")
    owner.send(DEPLOY)
    owner.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed in state 'await verdict'"):
        owner.next_message()


def _raw_frame(header: dict[str, object], payload: bytes = b"", *, payload_length: int | None = None) -> bytes:
    encoded = json.dumps(header).encode()
    length = len(payload) if payload_length is None else payload_length
    return struct.pack(">II", len(encoded), length) + encoded + payload


def test_an_oversize_header_is_refused_before_it_is_buffered() -> None:
    keep = Conversation("keep")
    keep.receive_data(struct.pack(">II", MAX_HEADER_BYTES + 1, 0))
    with pytest.raises(RemoteProtocolError, match=r"header of .* over"):
        keep.next_message()


def test_an_oversize_workload_is_refused_before_it_is_buffered() -> None:
    keep = Conversation("keep")
    keep.receive_data(struct.pack(">II", 10, MAX_WORKLOAD_BYTES + 1))
    with pytest.raises(RemoteProtocolError, match=r"payload of .* over"):
        keep.next_message()


def test_an_oversize_output_chunk_is_refused_after_its_header() -> None:
    owner = Conversation("owner")
    owner.state = State.RUNNING
    owner.receive_data(_raw_frame({"type": "output", "stream": "stdout"},
                                  payload_length=MAX_OUTPUT_CHUNK_BYTES + 1))
    with pytest.raises(RemoteProtocolError, match="output payload"):
        owner.next_message()


def test_sending_oversize_output_is_a_local_error() -> None:
    keep = Conversation("keep")
    keep.state = State.RUNNING
    with pytest.raises(LocalProtocolError, match="over the"):
        keep.send(Output("stdout", bytes(MAX_OUTPUT_CHUNK_BYTES + 1)))


@pytest.mark.parametrize(("header", "payload", "complaint"), [
    ({"type": "launch"}, b"", "unknown message type"),
    ({"kind": "deploy"}, b"", "with a 'type'"),
    ({"type": "accepted"}, b"", "may not send 'accepted'"),
    ({"type": "deploy", "args": [], "config": "", "volumes": [], "workload_sha256": "00" * 32},
     b"wasm", "does not match its SHA-256"),
    ({"type": "deploy", "args": [1], "config": "", "volumes": [], "workload_sha256": "00" * 32},
     b"", "args must be a list of strings"),
    ({"type": "deploy", "args": [], "config": 5, "volumes": [], "workload_sha256": "00" * 32},
     b"", "'config'"),
    ({"type": "deploy", "args": [], "config": "", "workload_sha256": "00" * 32,
      "volumes": [{"name": "v", "key_file": "AA==", "volume_key": "AA=="}]}, b"", "exactly one of"),
    ({"type": "deploy", "args": [], "config": "", "workload_sha256": "00" * 32,
      "volumes": [{"name": "v", "volume_key": "%%%"}]}, b"", "not base64"),
])
def test_invalid_frames_from_the_owner_are_remote_errors(header: dict[str, object], payload: bytes,
                                                         complaint: str) -> None:
    keep = Conversation("keep")
    keep.receive_data(_raw_frame(header, payload))
    with pytest.raises(RemoteProtocolError, match=complaint):
        keep.next_message()


def test_a_header_that_is_not_json_is_a_remote_error() -> None:
    keep = Conversation("keep")
    keep.receive_data(struct.pack(">II", 3, 0) + b"\xff{}")
    with pytest.raises(RemoteProtocolError, match="not UTF-8 JSON"):
        keep.next_message()


def test_the_owner_cannot_send_keep_messages() -> None:
    with pytest.raises(LocalProtocolError, match="the owner may not send 'accepted'"):
        Conversation("owner").send(Accepted(bytes(32)))


def test_volume_secrets_never_show_in_repr() -> None:
    text = repr(DEPLOY)
    assert "correct horse" not in text and bytes(range(64)).hex() not in text
    assert "\\x00\\x01\\x02" not in text and "data" in text


def test_a_volume_grant_needs_exactly_one_secret() -> None:
    with pytest.raises(LocalProtocolError, match="exactly one"):
        VolumeGrant("v")
    with pytest.raises(LocalProtocolError, match="exactly one"):
        VolumeGrant("v", key_file=b"k", volume_key=b"k")


def test_a_volume_grant_has_a_safe_guest_path() -> None:
    assert VolumeGrant("data", key_file=b"k").guest_path == "/data"
    assert VolumeGrant("data", key_file=b"k", guest_path="/srv/db").guest_path == "/srv/db"
    for bad in ("relative", "/a/../etc", "/a\0b"):
        with pytest.raises(LocalProtocolError, match="guest path"):
            VolumeGrant("data", key_file=b"k", guest_path=bad)
    with pytest.raises(LocalProtocolError, match="volume name"):
        VolumeGrant("a/b", key_file=b"k")


@given(workload=st.binary(max_size=2048), args=st.lists(st.text(max_size=20), max_size=5),
       config=st.text(max_size=200), generation=st.none() | st.integers(0, 2**63),
       key=st.binary(min_size=1, max_size=64), status=st.integers(-2**31, 2**31),
       chunks=st.lists(st.tuples(st.sampled_from(["stdout", "stderr"]), st.binary(max_size=100)), max_size=4))
def test_any_conversation_round_trips(workload: bytes, args: list[str], config: str,
                                      generation: int | None, key: bytes, status: int,
                                      chunks: list[tuple[str, bytes]]) -> None:
    owner, keep = Conversation("owner"), Conversation("keep")
    deploy = Deploy(workload=workload, config=config, args=tuple(args),
                    volumes=(VolumeGrant("v", key_file=key, pinned_generation=generation),))
    assert _deliver(owner, keep, deploy) == deploy
    assert _deliver(keep, owner, Accepted(deploy.workload_sha256)) == Accepted(deploy.workload_sha256)
    for stream, data in chunks:
        output = Output("stdout" if stream == "stdout" else "stderr", data)
        assert _deliver(keep, owner, output) == output
    finished = Finished(exit_status=status, error="trap" if status < 0 else None,
                        volumes=(VolumeState("v", "u", generation or 0, key),))
    assert _deliver(keep, owner, finished) == finished


def test_a_deeply_nested_json_header_is_a_remote_protocol_error() -> None:
    """200,000 nested arrays fit in the header limit but overflow json's recursion: the peer's
    fault (RemoteProtocolError, the connection is dropped), never a RecursionError."""
    header = b"[" * 200_000
    keep = Conversation("keep")
    keep.receive_data(struct.pack(">II", len(header), 0) + header)
    with pytest.raises(RemoteProtocolError, match="frame header is not UTF-8 JSON"):
        keep.next_message()
