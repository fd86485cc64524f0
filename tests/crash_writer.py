"""Crash-test writer: random fsync'd operations on a volume until it is killed.

Run as a script by tests/test_crash.py: ``python crash_writer.py IMAGE SEED`` with the volume
key in hex on stdin. Before each operation it prints ``B <json>`` (begun) and after the operation
and its fsync returned, ``A`` (acknowledged), each line flushed, so the parent knows exactly
which operations were promised durable and which one was in flight when SIGKILL arrived.
"""

from __future__ import annotations

import json
import random
import sys

from storage.fs import ROOT_INODE
from storage.volume import open_volume

NAMES = ["a", "b", "c", "d"]


def payload(seed: int, length: int) -> bytes:
    """The bytes a write operation writes (the parent recomputes them from the seed)."""
    return random.Random(seed).randbytes(length)


def choose(rng: random.Random, existing: list[str]) -> dict[str, object]:
    if not existing:
        return {"op": "create", "name": rng.choice(NAMES)}
    kind = rng.choice(["write", "write", "write", "truncate", "rename", "create", "unlink"])
    name = rng.choice(existing)
    if kind == "write":
        return {"op": "write", "name": name, "offset": rng.randrange(0, 40_000),
                "length": rng.randrange(1, 20_000), "seed": rng.randrange(1 << 30)}
    if kind == "truncate":
        return {"op": "truncate", "name": name, "size": rng.randrange(0, 50_000)}
    if kind == "rename":
        return {"op": "rename", "old": name, "new": rng.choice(NAMES)}
    if kind == "unlink":
        return {"op": "unlink", "name": name}
    return {"op": "create", "name": rng.choice([n for n in NAMES if n not in existing] or NAMES)}


def main() -> None:
    image, seed = sys.argv[1], int(sys.argv[2])
    key = bytes.fromhex(sys.stdin.readline().strip())
    rng = random.Random(seed)
    with open_volume(image, volume_key=key) as volume:
        fs = volume.fs
        print("R", flush=True)
        while True:
            existing = sorted(name.decode() for name, _, _ in fs.readdir(ROOT_INODE)
                              if name not in (b".", b".."))
            op = choose(rng, existing)
            if op["op"] == "create" and op["name"] in existing:
                continue
            if op["op"] == "rename" and op["old"] == op["new"]:
                continue
            print("B " + json.dumps(op), flush=True)
            if op["op"] == "create":
                fs.create(ROOT_INODE, str(op["name"]).encode())
            elif op["op"] == "write":
                ino = fs.lookup(ROOT_INODE, str(op["name"]).encode()).ino
                fs.write(ino, int(str(op["offset"])), payload(int(str(op["seed"])), int(str(op["length"]))))
            elif op["op"] == "truncate":
                ino = fs.lookup(ROOT_INODE, str(op["name"]).encode()).ino
                fs.setattr(ino, size=int(str(op["size"])))
            elif op["op"] == "rename":
                fs.rename(ROOT_INODE, str(op["old"]).encode(), ROOT_INODE, str(op["new"]).encode())
            else:
                fs.unlink(ROOT_INODE, str(op["name"]).encode())
            fs.fsync()
            print("A", flush=True)


if __name__ == "__main__":
    main()
