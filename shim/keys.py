"""Where a volume key comes from: a prompt, a passphrase file, a key file or an environment
variable. Shared by `keep volume` and `keep run --volume`.

The spellings follow cryptsetup where they overlap: `--key-file FILE` uses the file's bytes
exactly (binary keys welcome; `-` is stdin); `--passphrase-file FILE` is a text file whose one
trailing newline is dropped (what `echo secret > file` makes); `--passphrase-env NAME` reads the
variable's bytes. Without any of them the passphrase is prompted for on the terminal without echo
(twice when a new passphrase is being set). Key material is only ever returned, never logged.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import getpass
import os
import resource
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

from net.files import InputFileError, read_input_file
from shim.errors import KeepError, UsageError

MAX_KEY_FILE_BYTES = 8 << 20  # cryptsetup's default key file size limit
_PR_SET_DUMPABLE = 4  # prctl(2), from <linux/prctl.h>


@dataclass(frozen=True)
class KeySource:
    """One way to obtain a key; at most one of the fields is set (none: prompt)."""

    passphrase_file: str | None = None
    key_file: str | None = None
    passphrase_env: str | None = None

    @classmethod
    def from_arguments(cls, args: argparse.Namespace, prefix: str = "") -> KeySource:
        """Read `--{prefix}passphrase-file` etc. as parsed by argparse (dest uses `_`)."""
        stem = prefix.replace("-", "_")
        source = cls(passphrase_file=getattr(args, f"{stem}passphrase_file", None),
                     key_file=getattr(args, f"{stem}key_file", None),
                     passphrase_env=getattr(args, f"{stem}passphrase_env", None))
        given = [name for name in (source.passphrase_file, source.key_file, source.passphrase_env)
                 if name is not None]
        if len(given) > 1:
            raise UsageError(f"give only one of --{prefix}passphrase-file, --{prefix}key-file, "
                             f"--{prefix}passphrase-env")
        return source

    @property
    def prompts(self) -> bool:
        return self.passphrase_file is None and self.key_file is None and self.passphrase_env is None


def forbid_core_dumps() -> None:
    """This process is about to hold keys and plaintext: a crash (SIGQUIT, SIGSEGV, an abort)
    must not write them to the host's disk in a core file, even where the operator's shell
    allows core dumps (a mount's SIGQUIT left a 45 MB core holding the passphrase and a file's
    plaintext). Not dumpable stops the core file and a core_pattern pipe (systemd-coredump), and
    ptrace by other users; a soft RLIMIT_CORE of 0 says so to anyone reading /proc/PID/limits
    (the hard limit is left: lowering it cannot be undone without CAP_SYS_RESOURCE, and not
    dumpable already decides). Idempotent."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise KeepError(f"cannot mark the process not dumpable: {os.strerror(ctypes.get_errno())}")


def read_key(source: KeySource, *, prompt: str = "Passphrase: ", confirm: bool = False) -> bytes:
    """The key bytes from `source`; a clear KeepError if they cannot be had (never empty).
    Core dumps are forbidden first (`forbid_core_dumps`): the key and what it opens stay in
    this process's memory."""
    forbid_core_dumps()
    if source.key_file is not None:
        key = _read_file(source.key_file, "key file")
    elif source.passphrase_file is not None:
        key = _read_file(source.passphrase_file, "passphrase file")
        if key.endswith(b"\n"):
            key = key[:-1]
            if key.endswith(b"\r"):
                key = key[:-1]
    elif source.passphrase_env is not None:
        value = os.environb.get(os.fsencode(source.passphrase_env))
        if value is None:
            raise KeepError(f"environment variable {source.passphrase_env} is not set")
        key = value
    else:
        key = _prompt(prompt, confirm)
    if not key:
        raise KeepError("the passphrase is empty")
    return key


def _read_file(path: str, what: str) -> bytes:
    """The bytes of a key or passphrase file (`-`: stdin), at most MAX_KEY_FILE_BYTES. As with
    cryptsetup, a pipe or FIFO is a file too (a process substitution, /dev/stdin on a pipe, a
    FIFO a program feeds); it is opened without blocking (net.files: a FIFO that nobody writes
    to held keep in open() for ever, deaf to SIGTERM), and a device or directory is refused."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_KEY_FILE_BYTES + 1)
            if len(data) > MAX_KEY_FILE_BYTES:
                raise InputFileError(path, f"larger than {MAX_KEY_FILE_BYTES} bytes")
        else:
            data = read_input_file(path, MAX_KEY_FILE_BYTES, pipes=True)
    except OSError as error:
        raise KeepError(f"cannot read {what} {path}: {error.strerror}") from None
    except InputFileError as error:
        raise KeepError(f"{what} {error}") from None
    return data


def _prompt(prompt: str, confirm: bool) -> bytes:
    if not sys.stdin.isatty():
        raise KeepError("no passphrase given and no terminal to ask on: use --passphrase-file, "
                        "--key-file or --passphrase-env")
    try:
        with _sigterm_unwinds():
            first = getpass.getpass(prompt)
            if confirm and getpass.getpass("Verify passphrase: ") != first:
                raise KeepError("passphrases do not match")
    except EOFError:
        raise KeepError("no passphrase entered") from None
    except _Terminated:
        raise KeepError("terminated (SIGTERM) at the passphrase prompt",
                        exit_status=128 + signal.SIGTERM) from None
    return first.encode()


class _Terminated(Exception):
    """SIGTERM arrived while getpass had the terminal's echo off."""


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While prompting, SIGTERM raises (as SIGINT does) instead of ending the process at once,
    so that getpass turns the terminal's echo back on: killed inside getpass, keep left the
    user's terminal not echoing. Only the main thread can handle signals; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def unwind(number: int, frame: FrameType | None) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
