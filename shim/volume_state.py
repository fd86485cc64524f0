"""`--volume-state FILE`: the pins (uuid, generation, root MAC) that `keep run` and `keep deploy`
record after a run and check at the next one, one JSON document per file, keyed by volume.

Losing a pin silently would let a rolled-back image through unnoticed, so the file is checked
before a run (its directory must exist and be writable), replaced atomically (a temporary file,
fsync, rename: a full disk or a crash leaves the previous pins whole) and updated under a lock,
re-read first (two runs sharing the file keep each other's entries).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from shim.config import read_limited
from shim.errors import KeepError, UsageError

MAX_STATE_BYTES = 4 << 20  # a pin is about 200 bytes


def read_volume_state(path: Path | None) -> dict[str, dict[str, Any]]:
    """The pins recorded in `path` ({} when there is none or no file yet); UsageError if the
    file is not a pins document."""
    if path is None or not path.exists():
        return {}
    try:
        document = json.loads(read_limited(path, MAX_STATE_BYTES).decode("utf-8"))
    except OSError as error:
        raise UsageError(f"--volume-state {path}: unreadable ({error.strerror})") from None
    except ValueError as error:  # too large, not UTF-8, not JSON
        raise UsageError(f"--volume-state {path}: unreadable ({error})") from None
    except RecursionError:  # json recurses per nesting level
        raise UsageError(f"--volume-state {path}: unreadable (nested too deeply)") from None
    if not isinstance(document, dict) or not all(
            isinstance(entry, dict) and type(entry.get("generation")) is int for entry in document.values()):
        raise UsageError(f"--volume-state {path}: expected {{name: {{generation: N, ...}}}}")
    return document


def writable_state_file(path: Path) -> Path:
    """Where `--volume-state FILE` will be written: FILE itself, or the file a symlink points at
    (the replacement happens next to it, so the link stays). Refused now, before any volume is
    opened, if its directory is missing or not writable: found only after the run, the guest's
    changes would be committed at a new generation that nothing records."""
    target = Path(os.path.realpath(path))
    if target.exists() and not target.is_file():  # a device or a FIFO would be renamed over
        raise UsageError(f"--volume-state {path}: not a regular file")
    if not target.parent.is_dir():
        raise UsageError(f"--volume-state {path}: directory {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise UsageError(f"--volume-state {path}: directory {target.parent} is not writable")
    return target


def pin(uuid: str, generation: int, root_mac: bytes, **extra: str) -> dict[str, Any]:
    """One volume's entry in the file: what a later run requires of it (and `extra` facts)."""
    return {"uuid": uuid, "generation": generation, "root_mac": root_mac.hex(), **extra}


def update_state_file(path: Path, recorded: dict[str, dict[str, Any]], ended: dict[str, dict[str, Any]]) -> None:
    """Write this run's final states (`ended`) into the state file, keeping every other entry as
    the file holds it NOW: another run sharing the file may have written its own since this one
    read it (`recorded`, used only if the file has become unreadable). Under an exclusive flock
    on the file's directory, so that two runs ending together do not drop each other's pins."""
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):  # a filesystem without flock: update it unlocked
            fcntl.flock(directory, fcntl.LOCK_EX)
        try:
            current: dict[str, dict[str, Any]] = dict(read_volume_state(path))
        except KeepError:
            current = dict(recorded)
        current.update(ended)
        replace_atomically(path, (json.dumps(current, indent=2, sort_keys=True) + "\n").encode())
    finally:
        os.close(directory)  # and the lock with it


def replace_atomically(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file next to `path`, fsync it and rename it over `path` (then
    fsync the directory): a full disk or a crash leaves the previous pins whole, never a
    truncated file. The previous file's mode is kept (0644 for a new one)."""
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, suffix=".partial",
                                             prefix=temporary_prefix(path.name, ".partial"))
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fchmod(stream.fileno(), mode)
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    sync_directory(path.parent)


_NAME_MAX = 255  # bytes in a host file name (Linux)
_RANDOM_CHARACTERS = 8  # what tempfile.mkstemp puts between the prefix and the suffix


def temporary_prefix(name: str, suffix: str) -> str:
    """The prefix of a temporary made beside host file `name` with `suffix` (tempfile.mkstemp):
    ".NAME." with NAME cut to the bytes that leave the whole name within a file name. A name of
    up to 255 bytes is valid, and its temporary (22 bytes longer) failed with 'file name too
    long': after a run had committed, for --volume-state. (A cut through a character is
    harmless: the temporary is renamed away or removed.)"""
    room = _NAME_MAX - len(os.fsencode(suffix)) - _RANDOM_CHARACTERS - 2  # the two dots
    return f".{os.fsdecode(os.fsencode(name)[:room])}."


def sync_directory(directory: str | os.PathLike[str]) -> None:
    """fsync `directory`: a rename into it (or a file created there) is then durable. A
    filesystem that cannot fsync a directory (EINVAL: some network and FUSE ones) makes its
    renames durable its own way; that is not a failure of the rename already done."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
    finally:
        os.close(descriptor)
