"""Crash safety: a writer process is SIGKILLed at random moments, 50 times over one image.

Each time the volume must open (recovering its redo log), pass fsck, hold every acknowledged
(fsync'd) operation, and show the in-flight operation either entirely or not at all: never half
a rename, half a truncate or half a write.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from crash_writer import payload

from storage.fs import ROOT_INODE
from storage.luks2 import KdfCost
from storage.volume import Volume, create_volume, open_volume

WRITER = Path(__file__).with_name("crash_writer.py")
State = dict[str, bytes]


def apply(state: State, op: dict[str, object]) -> State:
    """The model: the directory after `op`, as {name: contents}."""
    after = dict(state)
    kind = op["op"]
    if kind == "create":
        after[str(op["name"])] = b""
    elif kind == "write":
        name, offset = str(op["name"]), int(str(op["offset"]))
        data = bytearray(after[name])
        chunk = payload(int(str(op["seed"])), int(str(op["length"])))
        if len(data) < offset:
            data.extend(bytes(offset - len(data)))
        data[offset:offset + len(chunk)] = chunk
        after[name] = bytes(data)
    elif kind == "truncate":
        name, size = str(op["name"]), int(str(op["size"]))
        after[name] = after[name][:size].ljust(size, b"\0")
    elif kind == "rename":
        after[str(op["new"])] = after.pop(str(op["old"]))
    else:
        del after[str(op["name"])]
    return after


def read_state(volume: Volume) -> State:
    fs = volume.fs
    state = {}
    for name, attr, _ in fs.readdir(ROOT_INODE):
        if name not in (b".", b".."):
            state[name.decode()] = fs.read(attr.ino, 0, attr.size)
    return state


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_acknowledged_work(tmp_path: Path) -> None:
    image = tmp_path / "crash.img"
    with create_volume(image, 24 << 20, b"crash", pbkdf="pbkdf2", kdf_cost=KdfCost(iterations=1000)) as volume:
        key = volume.luks.volume_key
    rng = random.Random(2024)
    state: State = {}
    acknowledged_total = 0
    in_flight_seen = 0
    for round_number in range(50):
        writer = subprocess.Popen([sys.executable, str(WRITER), str(image), str(rng.randrange(1 << 30))],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert writer.stdin is not None and writer.stdout is not None
        writer.stdin.write(key.hex().encode() + b"\n")
        writer.stdin.close()
        assert writer.stdout.readline() == b"R\n", writer.stderr.read() if writer.stderr else b""
        time.sleep(rng.uniform(0.01, 0.4))
        writer.send_signal(signal.SIGKILL)
        output = writer.stdout.read().decode().splitlines()
        writer.wait()
        writer.stdout.close()
        if writer.stderr:
            writer.stderr.close()
        expected = state
        pending = None
        for line in output:
            if line.startswith("B "):
                pending = json.loads(line[2:])
            elif line == "A":
                assert pending is not None
                expected = apply(expected, pending)
                pending = None
                acknowledged_total += 1
        with open_volume(image, volume_key=key) as reopened:
            assert reopened.fsck() == [], f"round {round_number}"
            actual = read_state(reopened)
        if actual != expected:
            assert pending is not None, f"round {round_number}: acknowledged work lost"
            assert actual == apply(expected, pending), f"round {round_number}: half-done {pending}"
            in_flight_seen += 1
        state = actual
    assert acknowledged_total > 100
    _ = in_flight_seen  # how often the in-flight operation had reached the disk (either is fine)
    os.unlink(image)
