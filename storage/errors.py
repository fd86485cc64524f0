"""Every exception the storage package raises, in one flat module (as pyca/cryptography does).

Callers translate these exactly once at their edge: the CLI to a one-line message and an exit
status, wasi_host to an errno, the FUSE operations to `FUSEError`. Errors that a file operation
can meet at run time (`IntegrityError`, `NoSpace`) are `OSError` subclasses carrying the right
errno, so that a generic `except OSError` edge maps them without knowing storage.

Whose fault it is, as h11 spells it out: `WrongPassphrase` is the user's, `NotLuks` /
`CorruptHeader` / `IntegrityError` are the image's (possibly hostile host), `VolumeInUse` is
another process's, `UnsupportedFormat` is a valid image this code does not handle.
"""

from __future__ import annotations

import errno
import os


class StorageError(Exception):
    """Base of every storage failure that is not a plain I/O `OSError`."""


class NotLuks(StorageError):
    """The image has no LUKS2 header at all (wrong file, or a LUKS1 / other format)."""


class CorruptHeader(StorageError):
    """A LUKS2 header exists but is damaged or violates the format: bad checksum, truncated,
    out-of-range offsets, absurd KDF costs, malformed JSON. Treated as hostile input."""


class UnsupportedFormat(StorageError):
    """A well-formed LUKS2 header this implementation deliberately does not handle (online
    reencryption requirements, integrity segments, ciphers other than aes-xts-plain64, ...)."""


class WrongPassphrase(StorageError):
    """No keyslot opens with the given passphrase or key file."""


class KeyslotError(StorageError):
    """Keyslot management refused: no free slot, removing the last slot, unknown slot."""


class VolumeInUse(StorageError):
    """Another process holds the image's lock (one process opens a volume at a time)."""


class SelfTestFailed(StorageError):
    """An optional accelerated implementation disagreed with the reference one."""


class IntegrityError(OSError):
    """Data read back does not match what was written (tampered, moved, replayed or rolled
    back). Callers see EIO; never garbage."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)

    def __str__(self) -> str:
        return str(self.strerror)


class NoSpace(OSError):
    """The volume is full. Callers see ENOSPC; the volume stays consistent."""

    def __init__(self, message: str = "no space left on the volume") -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.strerror)


class ShortRead(OSError):
    """A read reached past the end of the device or image: never padded with zeros silently."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)

    def __str__(self) -> str:
        return str(self.strerror)


class RollbackError(StorageError):
    """The image is older than the generation the owner pinned: a rolled-back volume."""


class FilesystemError(OSError):
    """A filesystem operation refused with a POSIX errno (ENOENT, EEXIST, ENOTEMPTY, ...), so
    that every caller maps errno once."""

    def __init__(self, code: int, message: str | None = None) -> None:
        super().__init__(code, message or os.strerror(code))

    def __str__(self) -> str:
        return str(self.strerror)
