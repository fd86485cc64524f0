"""`keep volume ...`: create and manage encrypted volumes from the command line.

Each action opens the image, does one thing and closes it (closing commits). Storage errors are
translated here, once, into a one-line KeepError: a wrong passphrase is exit status 2 and
"wrong passphrase" (raised before anything is written); a missing image, a non-LUKS file, a
damaged header, an image in use by another process, an integrity failure or a filesystem refusal
(ENOENT, EEXIST, ENOSPC...) is exit status 1 with a message naming the image or path; any other
host OSError is exit status 1 naming the host file; options out of range are usage errors (2).

Failures lose nothing: `put` writes a temporary in the same volume directory and renames it over
the target, so a failed put leaves the old file (and no temporary); `get` removes its host
temporary (decrypted data) on any failure. `export` never follows a host symlink inside the
destination (one an earlier export made from the volume could point anywhere on the host).
Neither ever replaces the open image itself (nor do `put` and `import` copy it into itself);
`get` writes into a device or FIFO (/dev/null, /dev/stdout) rather than replacing it. All four
keep a sparse file's holes (whole 4 KiB blocks of zeros), both ways. A path ending in "/" names a
directory, as on Linux. `ls` shows a name's bytes that are not UTF-8 and its control characters
escaped (a guest makes any name); a failed write to stdout is stdout's ("stdout: no space left
on device"), except that a reader that went away (`keep volume ls IMG | head`, also `get IMG F
/dev/stdout | head` or a FIFO's reader) ends the action quietly with exit status 141, as SIGPIPE
ends `ls` and `cp`.
Trees are walked with lists, not recursion (a volume's tree may be deeper than Python's recursion
limit).

Key management (`add-key`, `remove-key`, `passwd`) touches only the LUKS2 container, so it works on
any LUKS2 image, including ones cryptsetup made. The file actions go through storage.volume.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import secrets
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from shim.errors import CLOSED_AT_START, KeepError, StdoutClosed, UsageError, point_at_devnull
from shim.keys import KeySource, read_key
from shim.volume_state import sync_directory, temporary_prefix
from storage._luks2_header import (
    MAX_ARGON2_LANES,
    MAX_ARGON2_MEMORY_KIB,
    MAX_ARGON2_TIME,
    MAX_PBKDF2_ITERATIONS,
    MIN_ARGON2_MEMORY_KIB,
    encode_label,
)
from storage.blockdev import FileBlockDevice
from storage.errors import (
    CorruptHeader,
    FilesystemError,
    IntegrityError,
    KeyslotError,
    NoSpace,
    NotLuks,
    RollbackError,
    StorageError,
    UnsupportedFormat,
    VolumeInUse,
    WrongPassphrase,
)
from storage.fs import BLOCK_SIZE, ROOT_INODE, Attr, Filesystem
from storage.luks2 import (
    DEFAULT_ARGON2_LANES,
    DEFAULT_ARGON2_MEMORY_KIB,
    MIN_PBKDF2_ITERATIONS,
    KdfCost,
    LuksVolume,
    benchmark_kdf,
    open_luks2,
    read_header_info,
)
from storage.volume import Volume, create_volume, open_volume

COPY_CHUNK = 1 << 20
_ZERO_CHUNK = bytes(COPY_CHUNK)
_ZERO_BLOCK = bytes(BLOCK_SIZE)
_PARTIAL_SUFFIX = ".keep-partial"  # `get` writes to .NAME.XXXXXXXX.keep-partial first
TEMPORARY_PREFIX = b".keep-put-"  # `put` writes here first, then renames over the target
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_LARGEST_FILE = (1 << 63) - 1


def volume_command(args: argparse.Namespace) -> int:
    """Run one `keep volume` action; storage errors become KeepError here and only here.

    Stdout is flushed here, not at exit: a failure there (a full disk, a closed pipe) was
    Python's "Exception ignored" and exit status 120. After any failure what stdout still
    buffers is dropped (its descriptor pointed at /dev/null), so that exit adds no noise.

    A stdout that was closed when keep started (`keep volume ls IMG >&-`) stays one that cannot
    be written: /dev/null took its number (shim.cli), and `ls` or `cat` exited 0 with their
    output gone, where ls and cat say 'write error: Bad file descriptor'. It is /dev/null opened
    read-only now, so a write fails with EBADF ('stdout: bad file descriptor', exit 1) and an
    action that writes nothing to stdout (mkdir, put) still succeeds."""
    if 1 in CLOSED_AT_START:
        _refuse_writes(1)
    try:
        status = _translated(args)
        with _host_errors("stdout"):
            sys.stdout.flush()
        return status
    except BaseException:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            point_at_devnull(1)
        raise


def _refuse_writes(fd: int) -> None:
    """Put /dev/null opened read-only on `fd`: still taken, but a write to it fails (EBADF)."""
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.dup2(null, fd, inheritable=True)
    finally:
        os.close(null)


def _translated(args: argparse.Namespace) -> int:
    """The action, with storage errors translated into one-line KeepErrors."""
    action: Callable[[argparse.Namespace], int] = _ACTIONS[args.volume_action]
    try:
        return action(args)
    except WrongPassphrase:
        raise KeepError("wrong passphrase", exit_status=2) from None
    except FileNotFoundError as error:
        if error.filename is not None:
            raise KeepError(f"{error.filename}: no such file") from None
        raise KeepError(f"{args.image}: no such file") from None
    except NotLuks:
        raise KeepError(f"{args.image} is not a LUKS2 volume") from None
    except (CorruptHeader, UnsupportedFormat) as error:
        raise KeepError(f"{args.image}: {error}") from None
    except VolumeInUse:
        raise KeepError(f"{args.image} is in use by another process") from None
    except RollbackError as error:
        raise KeepError(f"{args.image}: {error}") from None
    except IntegrityError as error:
        message = str(error)
        if not message.startswith("integrity error"):
            message = f"integrity error: {message}"
        raise KeepError(f"{args.image}: {message}") from None
    except NoSpace:
        raise KeepError(f"{args.image}: no space left on the volume") from None
    except (KeyslotError, StorageError) as error:
        raise KeepError(f"{args.image}: {error}") from None
    except FilesystemError as error:
        raise KeepError(f"{getattr(error, 'volume_path', args.image)}: {error.strerror}") from None
    except IsADirectoryError as error:
        raise KeepError(f"{error.filename or args.image}: is a directory") from None
    except PermissionError as error:
        raise KeepError(f"{error.filename or args.image}: permission denied") from None
    except OSError as error:  # anything else the host refused (EINVAL, ENOTDIR, EEXIST...)
        raise _host_failure(error, args.image or "keep volume") from None


# -- helpers -------------------------------------------------------------------------------------


def _reason(error: OSError) -> str:
    """An OSError's reason in the CLI's lower case: "not a directory", "file exists"."""
    reason = str(error.strerror or error)
    if reason[:1].isupper() and not reason[1:2].isupper():
        reason = reason[0].lower() + reason[1:]
    return reason


def _host_failure(error: OSError, fallback: str | os.PathLike[str]) -> KeepError:
    """A host OSError as the CLI's one line: the file(s) it names (else `fallback`), then the
    reason ("IMG: is neither a regular file nor a block device")."""
    names = [os.fsdecode(name) for name in (error.filename, error.filename2) if name is not None]
    return KeepError(f"{' -> '.join(names) or os.fsdecode(fallback)}: {_reason(error)}")


@contextlib.contextmanager
def _host_errors(name: str | os.PathLike[str]) -> Iterator[None]:
    """Report an OSError of the host operations inside as a failure of host file `name`, the
    one the user named (not a temporary or a descriptor the error may carry)."""
    try:
        yield
    except OSError as error:
        if error.errno == errno.EPIPE:  # a pipe's reader is gone: quietly, as SIGPIPE ends cp
            # (stdout, or stdout named /dev/stdout or /proc/self/fd/1 for `get`, or a FIFO)
            raise StdoutClosed(f"{os.fsdecode(name)}: broken pipe") from None
        raise KeepError(f"{os.fsdecode(name)}: {_reason(error)}") from None


def parse_size(text: str) -> int:
    """'64M', '1G', '4GiB', '512k', '10000000' -> bytes (binary units, as cryptsetup)."""
    match = _SIZE.match(text)
    if match is None:
        raise UsageError(f"invalid size {text!r} (examples: 64M, 1G, 4GiB, 10000000)")
    number, unit, _ = match.groups()
    size = int(number) * _UNITS[unit.lower()]
    if size > _LARGEST_FILE:  # the host's ftruncate takes a signed 64-bit offset
        raise UsageError(f"--size {text}: more than the largest file size ({_LARGEST_FILE} bytes)")
    return size


def _key(args: argparse.Namespace, *, confirm: bool = False) -> bytes:
    return read_key(KeySource.from_arguments(args), confirm=confirm)


def _new_key(args: argparse.Namespace) -> bytes:
    return read_key(KeySource.from_arguments(args, "new-"), prompt="New passphrase: ", confirm=True)


def _check_range(option: str, value: int | None, low: int, high: int, what: str) -> None:
    if value is not None and not low <= value <= high:
        raise UsageError(f"{option} {value}: {what} must be in [{low}, {high}]")


def _check_kdf_options(args: argparse.Namespace) -> None:
    """Refuse KDF costs the LUKS2 format (or cryptsetup) would not take, before any prompt or
    file is touched: a usage error naming the limit, not a ValueError from storage.luks2."""
    if args.iter_time <= 0:
        raise UsageError("--iter-time must be positive")
    if args.pbkdf == "pbkdf2":
        _check_range("--pbkdf-force-iterations", args.pbkdf_force_iterations,
                     MIN_PBKDF2_ITERATIONS, MAX_PBKDF2_ITERATIONS, "pbkdf2 iterations")
    else:
        _check_range("--pbkdf-force-iterations", args.pbkdf_force_iterations, 1, MAX_ARGON2_TIME,
                     "the argon2id time cost")
    _check_range("--pbkdf-memory", args.pbkdf_memory, MIN_ARGON2_MEMORY_KIB, MAX_ARGON2_MEMORY_KIB,
                 "argon2id memory (KiB)")
    _check_range("--pbkdf-parallel", args.pbkdf_parallel, 1, MAX_ARGON2_LANES,
                 "argon2id parallel lanes")


def _kdf_cost(args: argparse.Namespace) -> KdfCost | None:
    """Explicit KDF costs from --pbkdf-force-iterations / --pbkdf-memory / --pbkdf-parallel."""
    _check_kdf_options(args)
    memory = args.pbkdf_memory if args.pbkdf_memory is not None else DEFAULT_ARGON2_MEMORY_KIB
    parallel = args.pbkdf_parallel if args.pbkdf_parallel is not None else DEFAULT_ARGON2_LANES
    if args.pbkdf_force_iterations is not None:
        return KdfCost(iterations=args.pbkdf_force_iterations, memory_kib=memory, parallel=parallel)
    if args.pbkdf_memory is not None or args.pbkdf_parallel is not None:
        return benchmark_kdf(args.pbkdf, args.iter_time, memory_kib=memory, parallel=parallel)
    return None


def _split_path(path: str) -> list[bytes]:
    return [part for part in os.fsencode(path).split(b"/") if part and part != b"."]


class _VolumePathError(FilesystemError):
    """A filesystem error that names the path inside the volume."""

    def __init__(self, code: int, volume_path: str) -> None:
        super().__init__(code)
        self.volume_path = volume_path


def _names_a_directory(path: str) -> bool:
    """Whether `path` ends in "/" or "/." past the root: as on Linux, such a path names a
    directory or nothing ("put f /docs/" must not make a file called "docs")."""
    return bool(_split_path(path)) and path.endswith(("/", "/."))


def _resolve(fs: Filesystem, path: str) -> Attr:
    """Walk `path` from the root (no symlinks followed: the CLI names entries literally);
    ENOTDIR for a non-directory named with a trailing "/"."""
    attr = fs.getattr(ROOT_INODE)
    for name in _split_path(path):
        if name == b"..":
            raise _VolumePathError(errno.EINVAL, path)
        try:
            attr = fs.lookup(attr.ino, name)
        except FilesystemError as error:
            raise _VolumePathError(error.errno or errno.EIO, path) from None
    if not attr.is_dir and _names_a_directory(path):
        raise _VolumePathError(errno.ENOTDIR, path)
    return attr


def _is_root(path: str) -> bool:
    return not _split_path(path)


def _parent_and_name(fs: Filesystem, path: str) -> tuple[Attr, bytes]:
    """The directory that holds `path`'s last name, and that name. The root has neither: it is
    a directory that always exists (EISDIR, for putting a file there); ".." is EINVAL here as in
    `_resolve` (a name, not a way up)."""
    parts = _split_path(path)
    if not parts:
        raise _VolumePathError(errno.EISDIR, path)
    if parts[-1] == b"..":
        raise _VolumePathError(errno.EINVAL, path)
    parent = _resolve(fs, "/" + "/".join(os.fsdecode(part) for part in parts[:-1]))
    if not parent.is_dir:
        raise _VolumePathError(errno.ENOTDIR, path)
    return parent, parts[-1]


def _image_identity(volume: Volume) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the volume's image file, None for another kind of device."""
    device = volume.device
    return device.identity if isinstance(device, FileBlockDevice) else None


def _is_the_image(info: os.stat_result, image: tuple[int, int] | None) -> bool:
    """Whether host file `info` is the open image (the same inode, under any name)."""
    return image is not None and (info.st_dev, info.st_ino) == image


def _refuse_the_image(info: os.stat_result, image: tuple[int, int] | None, host_path: str,
                      refused: str = "not replaced") -> None:
    """KeepError when host file `info` is the open image: replacing it would destroy the
    volume being read, copying it in can never fit (as cp refuses "the same file")."""
    if _is_the_image(info, image):
        raise KeepError(f"{host_path}: is the volume image itself ({refused})")


@contextlib.contextmanager
def _opened(args: argparse.Namespace, *, writable: bool) -> Iterator[Volume]:
    key = _key(args)
    with open_volume(args.image, key, writable=writable) as volume:
        yield volume


class _Progress:
    """A progress bar on stderr for work that takes over a second (only on a terminal).

    With `total` it shows a fraction; without, a bar that moves while the work runs. The delay
    before it appears is `$KEEPSHIM_PROGRESS_DELAY` seconds (default 1), so a test can see the bar
    without depending on how long the work takes."""

    def __init__(self, label: str, total: int | None = None) -> None:
        try:
            self._delay = max(0.0, float(os.environ.get("KEEPSHIM_PROGRESS_DELAY", "1")))
        except ValueError:
            self._delay = 1.0
        self._label = label
        self._total = total
        self._done = 0
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._enabled = sys.stderr.isatty()
        self._shown = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def advance(self, amount: int = 1) -> None:
        self._done += amount

    def _line(self) -> str:
        elapsed = time.monotonic() - self._start
        width = 30
        if self._total:
            filled = min(width, width * self._done // self._total)
            bar = "#" * filled + "-" * (width - filled)
            return f"\r{self._label} [{bar}] {self._done}/{self._total} {elapsed:5.1f}s"
        position = int(elapsed * 10) % width
        bar = "-" * position + "#" + "-" * (width - position - 1)
        return f"\r{self._label} [{bar}] {elapsed:5.1f}s"

    def _run(self) -> None:
        if self._stop.wait(self._delay):
            return
        self._shown = True
        while not self._stop.wait(0.1):
            sys.stderr.write(self._line())
            sys.stderr.flush()

    def __enter__(self) -> Self:
        if self._enabled:
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stop.set()
        if self._enabled:
            self._thread.join()
            if self._shown:
                sys.stderr.write(self._line() + (" done\n" if kind is None else " failed\n"))
                sys.stderr.flush()


# -- LUKS-level actions --------------------------------------------------------------------------


def _create(args: argparse.Namespace) -> int:
    size = parse_size(args.size)
    _check_kdf_options(args)
    try:
        encode_label(args.label)  # the length, NUL and encoding rules, before any prompt or file
    except ValueError as error:
        raise UsageError(f"--label: {error}") from None
    if os.path.exists(args.image):
        raise KeepError(f"{args.image} already exists (refusing to overwrite it)")
    key = _key(args, confirm=True)
    with _Progress(f"creating {args.image}"):
        cost = _kdf_cost(args)
        volume = create_volume(args.image, size, key, pbkdf=args.pbkdf, iter_time_ms=args.iter_time,
                               kdf_cost=cost, integrity=args.integrity, label=args.label)
        with volume:
            state = volume.commit()
            size = volume.device.size  # whole 4 KiB sectors: what --size was rounded down to
    _output(f"created {args.image}: {size} bytes, uuid {state.uuid}, integrity {args.integrity}, "
            f"generation {state.generation}")
    return 0


def _output(line: str) -> None:
    """Write `line` and a newline to stdout as the bytes it stands for: a path from the command
    line that is not UTF-8 holds surrogates (os.fsdecode), which a strict stdout (Python's,
    under a locale such as en_US.UTF-8) refused after the work was done: exit 70 for a success.
    The user's own bytes go back out unchanged. A failed write names stdout."""
    stream = sys.stdout
    try:
        data = os.fsencode(line + "\n")
    except UnicodeEncodeError:  # a character the locale's encoding lacks (not the user's bytes)
        data = (line + "\n").encode(sys.getfilesystemencoding(), "backslashreplace")
    binary = getattr(stream, "buffer", None)
    if binary is None:  # a text-only stream (an embedding's): its own encoding, never a failure
        with _host_errors("stdout"):
            stream.write(data.decode(stream.encoding or "utf-8", "backslashreplace"))
        return
    with _host_errors("stdout"):  # a full disk or a closed pipe is stdout's, not the image's
        stream.flush()  # after what was printed before, as text
        binary.write(data)


def _shown_name(name: bytes) -> str:
    """A volume name (or symlink target) as `ls` shows it: bytes that are not UTF-8 as \\xff
    and characters a terminal would act on (newline, escape...) escaped: a guest makes any
    name but "/" and NUL, which must neither forge a line of the listing nor drive the
    operator's terminal."""
    return _printable(name.decode("utf-8", "backslashreplace"))


def _printable(text: str) -> str:
    """`text` with every character a terminal would act on (C0 and C1 controls, line breaks)
    escaped as Python writes it: the label and subsystem are the host's bytes (the header is
    only checksummed), which must not clear the operator's screen or forge a line."""
    if text.isprintable():
        return text
    return "".join(character if character.isprintable() else ascii(character)[1:-1]
                   for character in text)


def _format_info(facts: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(facts, indent=2, sort_keys=True, default=str)
    lines: list[str] = []

    def emit(mapping: dict[Any, Any], indent: str) -> None:
        for name, value in mapping.items():
            if isinstance(value, dict):
                lines.append(f"{indent}{name}:")
                emit(value, indent + "  ")
            else:
                lines.append(f"{indent}{name}: {_printable(str(value))}")

    emit(facts, "")
    return "\n".join(lines)


def _info(args: argparse.Namespace) -> int:
    if args.header_only:
        with FileBlockDevice(args.image, writable=False) as device:
            facts = read_header_info(device)
        _output(_format_info(facts, args.json))
        return 0
    key = _key(args)
    try:
        with open_volume(args.image, key, writable=False) as volume:
            facts = {"luks2": volume.luks.dump(), **volume.info()}
    except (IntegrityError, FilesystemError, StorageError) as error:
        # The LUKS2 container opens but holds no (intact) keepshim volume, e.g. an image that
        # cryptsetup made: show the container, then report why. A plain StorageError (not a
        # subclass: those are the key's or the header's) is a data area keepshim cannot lay
        # out, such as one that is not whole 4 KiB sectors.
        if isinstance(error, StorageError) and type(error) is not StorageError:
            raise
        with FileBlockDevice(args.image, writable=False) as device:
            _output(_format_info({"luks2": open_luks2(device, key).dump()}, args.json))
        raise
    _output(_format_info(facts, args.json))
    return 0


@contextlib.contextmanager
def _luks(args: argparse.Namespace) -> Iterator[tuple[LuksVolume, bytes]]:
    """The image's LUKS2 container, unlocked with the given key, open for writing."""
    key = _key(args)
    with FileBlockDevice(args.image, writable=True) as device:
        yield open_luks2(device, key), key


def _reads_stdin(path: str | None) -> bool:
    """Whether reading file option `path` takes bytes from our stdin: "-", or another name of
    stdin's stream (/dev/stdin, /proc/self/fd/0 on a pipe, a FIFO, a terminal). A regular file
    on stdin is no stream: opened again by name, it is read from its start, taking nothing."""
    if path is None:
        return False
    if path == "-":
        return True
    try:
        standard = os.fstat(0)
        return not stat.S_ISREG(standard.st_mode) and os.path.samestat(os.stat(path), standard)
    except (OSError, ValueError):  # no stdin, or no such file (reading it will say so)
        return False


def _check_one_key_from_stdin(args: argparse.Namespace) -> None:
    """Refuse the key and the new key both from stdin (`-`, or /dev/stdin...): the first read
    takes all of it, and the second found nothing ('the passphrase is empty', which the user
    had not given)."""
    sources = (args.key_file, args.passphrase_file, args.new_key_file, args.new_passphrase_file)
    if sum(map(_reads_stdin, sources)) > 1:
        raise UsageError("stdin ('-') can give the key or the new key, not both")


def _add_key(args: argparse.Namespace) -> int:
    _check_one_key_from_stdin(args)
    _check_kdf_options(args)
    with _luks(args) as (luks, _):
        new_key = _new_key(args)
        with _Progress("deriving the new keyslot key"):
            slot = luks.add_keyslot(new_key, pbkdf=args.pbkdf, iter_time_ms=args.iter_time,
                                    cost=_kdf_cost(args))
    _output(f"added keyslot {slot}")
    return 0


def _remove_key(args: argparse.Namespace) -> int:
    with _luks(args) as (luks, key):
        opened = luks.opened_keyslot
        target = args.key_slot if args.key_slot is not None else opened
        if target is None:
            raise KeepError("cannot tell which keyslot to remove")
        if args.key_slot is not None and opened == target:
            # --key-slot N wants the key of another slot, as cryptsetup luksKillSlot wants a
            # remaining passphrase: the same passphrase may sit in a second slot
            try:
                luks.find_keyslot(key, excluding=target)
            except WrongPassphrase:
                raise KeepError(f"keyslot {target} is the one this key opens: give the key of "
                                "another keyslot to remove it", exit_status=2) from None
        luks.remove_keyslot(target)
    _output(f"removed keyslot {target}")
    return 0


def _passwd(args: argparse.Namespace) -> int:
    _check_one_key_from_stdin(args)
    _check_kdf_options(args)
    with _luks(args) as (luks, _):
        old_slot = luks.opened_keyslot
        if old_slot is None:
            raise KeepError("cannot tell which keyslot to change")
        new_key = _new_key(args)
        with _Progress("deriving the new keyslot key"):
            new_slot = luks.change_passphrase(old_slot, new_key, pbkdf=args.pbkdf,
                                              iter_time_ms=args.iter_time, cost=_kdf_cost(args))
    _output(f"changed the passphrase (keyslot {old_slot} replaced by keyslot {new_slot})")
    return 0


# -- file-level actions --------------------------------------------------------------------------


def _type_letter(attr: Attr) -> str:
    return "d" if attr.is_dir else "l" if attr.is_symlink else "-" if attr.is_file else "?"


def _ls(args: argparse.Namespace) -> int:
    with _opened(args, writable=False) as volume:
        fs = volume.fs
        attr = _resolve(fs, args.path)
        entries: list[tuple[bytes, Attr]]
        if attr.is_dir:
            entries = [(name, entry) for name, entry, _ in fs.readdir(attr.ino)
                       if name not in (b".", b"..")]
        else:
            entries = [(_split_path(args.path)[-1], attr)]
        for name, entry in entries:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.mtime_ns / 1e9))
            text = _shown_name(name)
            if entry.is_symlink:
                text += " -> " + _shown_name(fs.readlink(entry.ino))
            elif entry.is_dir:
                text += "/"
            mode = stat.filemode(entry.mode)
            _output(f"{mode} {entry.nlink:3d} {entry.size:12d} {when} {text}")
    return 0


def _copy_out(fs: Filesystem, attr: Attr, sink: IO[bytes], sink_name: str, *,
              sparse: bool = False) -> None:
    """Copy a volume file to `sink`; a failed write is reported as `sink_name`'s (the host's),
    a failed read as the volume's. With `sparse` (`sink` a new regular file) a chunk of zeros
    is skipped with a seek and the size set at the end, so holes stay holes, as cp makes them:
    a guest can make a 16 TiB sparse file in an instant, and its zeros would fill the host."""
    offset = 0
    skipped = False
    while offset < attr.size:
        chunk = fs.read(attr.ino, offset, min(COPY_CHUNK, attr.size - offset))
        if not chunk:
            break
        with _host_errors(sink_name):
            if sparse and chunk == _ZERO_CHUNK[:len(chunk)]:
                sink.seek(len(chunk), os.SEEK_CUR)
                skipped = True
            else:
                sink.write(chunk)
        offset += len(chunk)
    if skipped:
        with _host_errors(sink_name):
            sink.truncate(offset)  # the size, when the file ends in a hole


def _cat(args: argparse.Namespace) -> int:
    with _opened(args, writable=False) as volume:
        attr = _resolve(volume.fs, args.path)
        if not attr.is_file:  # named here: the filesystem's own refusal would blame the image
            raise _VolumePathError(errno.EISDIR if attr.is_dir else errno.EINVAL, args.path)
        _copy_out(volume.fs, attr, sys.stdout.buffer, "stdout")
        with _host_errors("stdout"):
            sys.stdout.buffer.flush()
    return 0


def _create_temporary(fs: Filesystem, parent: Attr, mode: int, volume_path: str) -> bytes:
    """A new empty file in `parent` under a fresh random name (`create` is exclusive: a name
    that exists is never reused, another is drawn)."""
    for _ in range(16):
        name = TEMPORARY_PREFIX + secrets.token_hex(8).encode()
        try:
            fs.create(parent.ino, name, mode)
        except FilesystemError as error:
            if error.errno == errno.EEXIST:
                continue
            raise _VolumePathError(error.errno or errno.EIO, volume_path) from None
        return name
    raise _VolumePathError(errno.EEXIST, volume_path)


def _write_file(fs: Filesystem, parent: Attr, name: bytes, source: IO[bytes], mode: int,
                volume_path: str, progress: _Progress | None = None) -> Attr:
    """Create or replace the regular file `name` in `parent` with the bytes of `source`.

    The bytes go to a temporary file in the same directory, which then replaces `name` in one
    rename: a failure (the volume full, the source unreadable, ^C) leaves the old file as it was
    and removes the temporary, so the commit that closing the volume makes keeps neither a
    half-written file nor a stray name. A replaced file keeps its permission bits, as cp does.
    A failed read of `source` names it (its `name`), not the image."""
    source_name = source.name if isinstance(getattr(source, "name", None), str) else "stdin"
    try:
        existing = fs.find(parent.ino, name)
    except FilesystemError as error:
        raise _VolumePathError(error.errno or errno.EIO, volume_path) from None
    if existing is not None:
        if not existing.is_file:
            raise _VolumePathError(errno.EISDIR if existing.is_dir else errno.EEXIST, volume_path)
        mode = existing.mode
    temporary = _create_temporary(fs, parent, mode, volume_path)
    try:
        attr = fs.lookup(parent.ino, temporary)
        offset = 0
        while True:
            with _host_errors(source_name):
                chunk = source.read(COPY_CHUNK)
            if not chunk:
                break
            _write_data(fs, attr.ino, offset, chunk)
            offset += len(chunk)
            if progress is not None:
                progress.advance(len(chunk))
        if fs.getattr(attr.ino).size < offset:  # the source ends in a hole
            fs.setattr(attr.ino, size=offset)
        fs.rename(parent.ino, temporary, parent.ino, name)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.unlink(parent.ino, temporary)
        raise
    return fs.getattr(attr.ino)


def _write_data(fs: Filesystem, ino: int, offset: int, chunk: bytes) -> None:
    """Write `chunk` at `offset` (block-aligned) of new file `ino`, whole blocks of zeros left
    as holes: they read back as zeros, and a sparse host file (a disk image, what `get` or
    `export` wrote) takes only its data's room, not its size's. A short write (the volume
    filled up part way through) is NoSpace."""
    view = memoryview(chunk)
    run = 0  # where the data not yet written starts
    for start in range(0, len(view), BLOCK_SIZE):
        block = view[start:start + BLOCK_SIZE]
        if block == _ZERO_BLOCK[:len(block)]:
            if run < start and fs.write(ino, offset + run, view[run:start]) < start - run:
                raise NoSpace()
            run = start + BLOCK_SIZE
    if run < len(view) and fs.write(ino, offset + run, view[run:]) < len(view) - run:
        raise NoSpace()


def _put(args: argparse.Namespace) -> int:
    source: IO[bytes]
    if _reads_stdin(args.host_file) and (_reads_stdin(args.key_file) or _reads_stdin(args.passphrase_file)):
        # the key would take all of stdin, and an empty file would replace PATH (exit 0)
        raise UsageError("stdin ('-') can give the key or the file to put, not both")
    if args.host_file == "-":
        source = sys.stdin.buffer
        mode = 0o644
    else:
        host = os.stat(args.host_file)
        if stat.S_ISDIR(host.st_mode):
            raise KeepError(f"{args.host_file} is a directory (use `keep volume import`)")
        source = open(args.host_file, "rb")  # noqa: SIM115 - closed below
        mode = stat.S_IMODE(host.st_mode)
    try:
        with _opened(args, writable=True) as volume:
            if source is not sys.stdin.buffer:
                _refuse_the_image(os.fstat(source.fileno()), _image_identity(volume), args.host_file,
                                  "not copied into it")
            fs = volume.fs
            parent, name = _parent_and_name(fs, args.path)
            if _names_a_directory(args.path):  # "/docs/": a directory or nothing, never a file
                existing = fs.find(parent.ino, name)
                raise _VolumePathError(errno.EISDIR if existing is not None and existing.is_dir
                                       else errno.ENOTDIR, args.path)
            with _Progress(f"writing {args.path}"):
                _write_file(fs, parent, name, source, mode, args.path)
            volume.commit()
    finally:
        if source is not sys.stdin.buffer:
            source.close()
    return 0


def _get(args: argparse.Namespace) -> int:
    with _opened(args, writable=False) as volume:
        attr = _resolve(volume.fs, args.path)
        if not attr.is_file:
            raise _VolumePathError(errno.EISDIR if attr.is_dir else errno.EINVAL, args.path)
        if args.host_file == "-":
            _copy_out(volume.fs, attr, sys.stdout.buffer, "stdout")
            with _host_errors("stdout"):
                sys.stdout.buffer.flush()
            return 0
        _get_into(volume.fs, attr, args.host_file, _image_identity(volume))
    return 0


def _get_into(fs: Filesystem, attr: Attr, host_file: str, image: tuple[int, int] | None) -> None:
    """Write a volume file to `host_file` through a fresh temporary (mode 0600 while the
    plaintext arrives) in the same host directory, fsync'd and then renamed over `host_file`
    (and the directory fsync'd): a crash leaves the old `host_file` or the new one whole,
    never an empty or short file in its place. Any failure removes the temporary (it holds
    decrypted data) and names `host_file`. The open image itself (`image`) is never replaced;
    a device, FIFO or socket (or a symlink to one: /dev/null, /dev/stdout) is written into, as
    cp does, never replaced by a file of plaintext."""
    directory, base = os.path.split(os.path.abspath(host_file))
    try:
        existing: os.stat_result | None = os.lstat(host_file)
    except OSError:
        existing = None
    if existing is not None:
        _refuse_the_image(existing, image, host_file)
        if stat.S_ISDIR(existing.st_mode):  # also "DIR/", where the rename says "not a directory"
            raise KeepError(f"{host_file}: is a directory")
    try:
        target: os.stat_result | None = os.stat(host_file)  # through a symlink: what a write reaches
    except OSError:
        target = None
    if target is not None and not (stat.S_ISREG(target.st_mode) or stat.S_ISDIR(target.st_mode)):
        _write_into_special(fs, attr, host_file)
        return
    with _host_errors(host_file):
        descriptor, temporary = tempfile.mkstemp(prefix=temporary_prefix(base, _PARTIAL_SUFFIX),
                                                 suffix=_PARTIAL_SUFFIX, dir=directory)
    try:
        with _host_sink(descriptor, host_file) as sink:
            _copy_out(fs, attr, sink, host_file, sparse=True)
            with _host_errors(host_file):
                sink.flush()
                os.fchmod(sink.fileno(), stat.S_IMODE(attr.mode))
                os.fsync(sink.fileno())
        with _host_errors(host_file):
            os.replace(temporary, host_file)
            sync_directory(directory)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _write_into_special(fs: Filesystem, attr: Attr, host_file: str) -> None:
    """Copy a volume file into the existing device, FIFO or socket `host_file` (a FIFO waits
    for its reader, as cp does)."""
    with _host_errors(host_file):
        descriptor = os.open(host_file, os.O_WRONLY | os.O_CLOEXEC)
    with _host_sink(descriptor, host_file) as sink:
        _copy_out(fs, attr, sink, host_file)
        with _host_errors(host_file):
            sink.flush()


@contextlib.contextmanager
def _host_sink(descriptor: int, host_file: str) -> Iterator[IO[bytes]]:
    """A buffered writer on `descriptor` (closed at the end) whose closing is a failure of
    `host_file` too: closing writes out what is still buffered, so a failed flush (ENOSPC on a
    full device) failed again in `os.fdopen`'s own close, outside `_host_errors`, and the
    error was reported as the image's. After a failure the close's own error is dropped."""
    sink = os.fdopen(descriptor, "wb")
    try:
        yield sink
    except BaseException:
        with contextlib.suppress(OSError):
            sink.close()
        raise
    with _host_errors(host_file):
        sink.close()


def _children(fs: Filesystem, directory: Attr) -> list[tuple[bytes, Attr]]:
    """The entries of volume directory `directory` but "." and "..", listed once."""
    return [(name, attr) for name, attr, _ in fs.readdir(directory.ino) if name not in (b".", b"..")]


def _remove_tree(fs: Filesystem, parent: Attr, name: bytes) -> None:
    """Remove `name` from `parent`, a directory with everything under it. Depth first with a
    list, not recursion: a volume's tree may be deeper than Python's recursion limit (a guest
    or a FUSE user can nest directories without bound)."""
    attr = fs.lookup(parent.ino, name)
    if not attr.is_dir:
        fs.unlink(parent.ino, name)
        return
    # (parent, name, directory, its children still to remove)
    stack = [(parent, name, attr, _children(fs, attr))]
    while stack:
        parent, name, directory, children = stack[-1]
        if not children:
            fs.rmdir(parent.ino, name)
            stack.pop()
            continue
        child_name, child = children.pop()
        if child.is_dir:
            stack.append((directory, child_name, child, _children(fs, child)))
        else:
            fs.unlink(directory.ino, child_name)


def _rm(args: argparse.Namespace) -> int:
    if _is_root(args.path):
        raise KeepError("refusing to remove the root directory")
    with _opened(args, writable=True) as volume:
        fs = volume.fs
        parent, name = _parent_and_name(fs, args.path)
        attr = _resolve(fs, args.path)
        if attr.is_dir and not args.recursive:
            raise KeepError(f"{args.path}: is a directory (use rm -r)")
        try:
            _remove_tree(fs, parent, name)
        except FilesystemError as error:
            raise _VolumePathError(error.errno or errno.EIO, args.path) from None
        volume.commit()
    return 0


def _mkdir(args: argparse.Namespace) -> int:
    with _opened(args, writable=True) as volume:
        fs = volume.fs
        if args.parents:
            _make_directories(fs, args.path)
        elif _is_root(args.path):
            raise _VolumePathError(errno.EEXIST, args.path)
        else:
            parent, name = _parent_and_name(fs, args.path)
            try:
                fs.mkdir(parent.ino, name)
            except FilesystemError as error:
                raise _VolumePathError(error.errno or errno.EIO, args.path) from None
        volume.commit()
    return 0


def _make_directories(fs: Filesystem, path: str) -> Attr:
    attr = fs.getattr(ROOT_INODE)
    for name in _split_path(path):
        try:
            attr = fs.lookup(attr.ino, name)
        except FilesystemError as error:
            if error.errno != errno.ENOENT:
                raise _VolumePathError(error.errno or errno.EIO, path) from None
            attr = fs.mkdir(attr.ino, name)
        if not attr.is_dir:
            raise _VolumePathError(errno.ENOTDIR, path)
    return attr


def _walk_size(root: Path) -> int:
    """The bytes of the files under `root` (for the progress bar; unreadable parts count 0).
    A list of directories, not os.walk, which recurses in Python 3.11."""
    total = 0
    directories = [os.fspath(root)]
    while directories:
        with contextlib.suppress(OSError), os.scandir(directories.pop()) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False):
                        directories.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
    return total


def _import(args: argparse.Namespace) -> int:
    host_root = Path(args.host_dir)
    if not host_root.is_dir():
        raise KeepError(f"{args.host_dir} is not a directory")
    with _opened(args, writable=True) as volume:
        fs = volume.fs
        target = _make_directories(fs, args.path)
        count = 0
        with _Progress(f"importing {args.host_dir}", total=_walk_size(host_root)) as progress:
            count = _import_tree(fs, host_root, target, args.path, progress, _image_identity(volume))
        volume.commit()
    _output(f"imported {count} entries into {args.path}")
    return 0


def _host_entries(host_dir: Path) -> list[os.DirEntry[str]]:
    """The entries of `host_dir`, in reverse name order (popped from the end: name order)."""
    with os.scandir(host_dir) as entries:
        return sorted(entries, key=lambda item: item.name, reverse=True)


def _import_tree(fs: Filesystem, host_dir: Path, target: Attr, volume_path: str,
                 progress: _Progress, image: tuple[int, int] | None) -> int:
    """Copy host directory `host_dir` into volume directory `target` (`volume_path` names it),
    all but the open image itself (`image`: it could never fit). Depth first with a list, not
    recursion: a host tree may be deeper than Python's recursion limit."""
    count = 0
    # (volume directory, its path, the host entries still to copy into it)
    stack = [(target, volume_path, _host_entries(host_dir))]
    while stack:
        target, volume_path, entries = stack[-1]
        if not entries:
            stack.pop()
            continue
        entry = entries.pop()
        name = os.fsencode(entry.name)
        inner = f"{volume_path.rstrip('/')}/{entry.name}"
        info = entry.stat(follow_symlinks=False)
        if entry.is_symlink():
            with contextlib.suppress(FilesystemError):
                fs.unlink(target.ino, name)
            try:
                fs.symlink(target.ino, name, os.fsencode(os.readlink(entry.path)))
            except FilesystemError as error:  # e.g. a directory of that name: EEXIST
                raise _VolumePathError(error.errno or errno.EIO, inner) from None
        elif entry.is_dir(follow_symlinks=False):
            try:
                child = fs.lookup(target.ino, name)
            except FilesystemError:
                child = fs.mkdir(target.ino, name, stat.S_IMODE(info.st_mode))
            if not child.is_dir:
                raise _VolumePathError(errno.ENOTDIR, inner)
            stack.append((child, inner, _host_entries(Path(entry.path))))
        elif entry.is_file(follow_symlinks=False) and _is_the_image(info, image):
            print(f"keep: skipping {entry.path} (the volume image itself)", file=sys.stderr)
            continue
        elif entry.is_file(follow_symlinks=False):
            with open(entry.path, "rb") as source:
                attr = _write_file(fs, target, name, source, stat.S_IMODE(info.st_mode), inner,
                                   progress)
            fs.setattr(attr.ino, mode=stat.S_IMODE(info.st_mode), atime_ns=info.st_atime_ns,
                       mtime_ns=info.st_mtime_ns)
        else:
            print(f"keep: skipping {entry.path} (not a file, directory or symlink)", file=sys.stderr)
            continue
        count += 1
    return count


def _export(args: argparse.Namespace) -> int:
    with _opened(args, writable=False) as volume:
        fs = volume.fs
        source = _resolve(fs, args.path)
        if not source.is_dir:
            raise _VolumePathError(errno.ENOTDIR, args.path)
        with _host_errors(args.host_dir):  # the directory the user named: a symlink is followed
            if not os.path.lexists(args.host_dir):
                os.makedirs(args.host_dir)
            directory = os.open(args.host_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with _Progress(f"exporting to {args.host_dir}"):
                count = _export_tree(fs, source, directory, args.host_dir, _image_identity(volume))
        finally:
            os.close(directory)
    _output(f"exported {count} entries to {args.host_dir}")
    return 0


_EXPORT_OPEN = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_EXPORT_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _clear_host_entry(directory: int, name: bytes, host_path: str, image: tuple[int, int] | None, *,
                      keep_directory: bool) -> bool:
    """Make room for an exported entry called `name` in host directory `directory`, never
    following a symlink there (one an earlier export made from the volume may point anywhere).
    Anything but a real directory is unlinked; a real directory is kept when `keep_directory`
    (the volume has a directory there too), else refused: a host tree is not deleted for a file.
    The open image (`image`: a file of the volume named like it, exported into its directory)
    is refused, never replaced. Returns whether a directory is there to reuse."""
    try:
        info = os.stat(name, dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        return False
    _refuse_the_image(info, image, host_path)
    if stat.S_ISDIR(info.st_mode):
        if keep_directory:
            return True
        raise KeepError(f"{host_path}: is a directory on the host where the volume has a "
                        "non-directory (not replaced; remove it first)")
    os.unlink(name, dir_fd=directory)
    return False


@dataclass
class _ExportLevel:
    """One host directory of an export in progress: the volume directory it copies, the
    entries still to copy, and its descriptor (None while closed to bound how many are open:
    reopened through the ".." of the level below, and checked to be the same directory)."""

    attr: Attr
    host_path: str
    identity: tuple[int, int]
    descriptor: int | None
    children: list[tuple[bytes, Attr]]


def _export_tree(fs: Filesystem, source: Attr, directory: int, host_dir: str,
                 image: tuple[int, int] | None) -> int:
    """Copy volume directory `source` into the open host directory `directory` (`host_dir` names
    it in messages). Every host call is relative to a directory descriptor and refuses symlinks
    (O_NOFOLLOW, O_EXCL, lstat), so what an earlier export left there can redirect nothing; a
    file is written fresh (never through an existing inode, which may be linked elsewhere).

    Depth first with a list, not recursion, and at most `_EXPORT_OPEN_DIRECTORIES` descriptors
    open: a volume's tree may be deeper than Python's recursion limit or the descriptor limit."""
    count = 0
    info = os.fstat(directory)
    levels = [_ExportLevel(source, host_dir, (info.st_dev, info.st_ino), directory,
                           _children(fs, source)[::-1])]
    try:
        while levels:
            level = levels[-1]
            assert level.descriptor is not None  # the deepest level is always open
            if not level.children:
                levels.pop()
                if levels:  # a subdirectory is done: back to its parent (through its "..",
                    # while it can still be searched), then its mode last
                    with _host_errors(level.host_path):
                        try:
                            _reopen_parent(levels[-1], level.descriptor)
                            os.fchmod(level.descriptor, stat.S_IMODE(level.attr.mode))
                        finally:  # popped: the cleanup below no longer sees it
                            os.close(level.descriptor)
                    level.descriptor = None
                continue
            name, attr = level.children.pop()
            host_path = os.path.join(level.host_path, os.fsdecode(name))
            with _host_errors(host_path):
                if attr.is_dir:
                    levels.append(_export_directory(fs, level.descriptor, name, attr, host_path, image))
                    _close_shallow_levels(levels)
                elif not _export_entry(fs, level.descriptor, name, attr, host_path, image):
                    continue
            count += 1
    finally:
        for level in levels[1:]:  # the first descriptor is the caller's
            if level.descriptor is not None:
                os.close(level.descriptor)
    return count


_EXPORT_OPEN_DIRECTORIES = 64  # host directory descriptors an export keeps open at most


def _export_directory(fs: Filesystem, directory: int, name: bytes, attr: Attr, host_path: str,
                      image: tuple[int, int] | None) -> _ExportLevel:
    """The host directory for volume directory `attr`, made (or reused) in `directory`."""
    if not _clear_host_entry(directory, name, host_path, image, keep_directory=True):
        os.mkdir(name, 0o700, dir_fd=directory)
    child = os.open(name, _EXPORT_DIRECTORY, dir_fd=directory)
    try:
        info = os.fstat(child)
        return _ExportLevel(attr, host_path, (info.st_dev, info.st_ino), child,
                            _children(fs, attr)[::-1])
    except BaseException:
        os.close(child)
        raise


def _close_shallow_levels(levels: list[_ExportLevel]) -> None:
    """Close the descriptor `_EXPORT_OPEN_DIRECTORIES` levels above the deepest (never the
    caller's first one)."""
    index = len(levels) - 1 - _EXPORT_OPEN_DIRECTORIES
    descriptor = levels[index].descriptor if index >= 1 else None
    if descriptor is not None:
        levels[index].descriptor = None
        os.close(descriptor)


def _reopen_parent(parent: _ExportLevel, child: int) -> None:
    """Open `parent`'s directory again, if it was closed, through the ".." of its child: it
    must still be the directory made for it (a host directory moved meanwhile is an error)."""
    if parent.descriptor is not None:
        return
    descriptor = os.open("..", _EXPORT_DIRECTORY, dir_fd=child)
    info = os.fstat(descriptor)
    if (info.st_dev, info.st_ino) != parent.identity:
        os.close(descriptor)
        raise KeepError(f"{parent.host_path}: the host directory moved during the export")
    parent.descriptor = descriptor


def _export_entry(fs: Filesystem, directory: int, name: bytes, attr: Attr, host_path: str,
                  image: tuple[int, int] | None) -> bool:
    """Export a file or symlink of the volume as `name` in host directory `directory`; False
    for another kind (skipped: the filesystem makes none). A file that fails part way (the
    host disk full, a sector of the volume unreadable) is removed: the export stops with an
    error, and no partial copy stays behind under the file's name (as `get` removes its own)."""
    if attr.is_symlink:
        _clear_host_entry(directory, name, host_path, image, keep_directory=False)
        os.symlink(fs.readlink(attr.ino), name, dir_fd=directory)
    elif attr.is_file:
        _clear_host_entry(directory, name, host_path, image, keep_directory=False)
        descriptor = os.open(name, _EXPORT_OPEN, 0o600, dir_fd=directory)
        try:
            with os.fdopen(descriptor, "wb") as sink:
                _copy_out(fs, attr, sink, host_path, sparse=True)
                sink.flush()
                os.fchmod(descriptor, stat.S_IMODE(attr.mode))
                os.utime(descriptor, ns=(attr.atime_ns, attr.mtime_ns))
        except BaseException:  # no part of a file under its name, to pass for the whole
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=directory)
            raise
    else:
        return False
    return True


def _fsck(args: argparse.Namespace) -> int:
    with _opened(args, writable=False) as volume, _Progress(f"checking {args.image}"):
        problems = volume.fsck()
    for problem in problems:
        _output(problem)
    if problems:
        raise KeepError(f"{args.image}: {len(problems)} problem(s) found")
    _output(f"{args.image}: clean")
    return 0


def _mount(args: argparse.Namespace) -> int:
    from shim.fuse import mount_command  # pyfuse3 only when mounting

    return mount_command(args)


def _umount(args: argparse.Namespace) -> int:
    from shim.fuse import umount_command

    return umount_command(args)


_ACTIONS: dict[str, Callable[[argparse.Namespace], int]] = {
    "create": _create, "info": _info, "ls": _ls, "cat": _cat, "put": _put, "get": _get,
    "rm": _rm, "mkdir": _mkdir, "import": _import, "export": _export, "fsck": _fsck,
    "add-key": _add_key, "remove-key": _remove_key, "passwd": _passwd,
    "mount": _mount, "umount": _umount,
}
