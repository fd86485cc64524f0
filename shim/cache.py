"""The compile cache: compiled modules sealed with AES-GCM so the next start takes milliseconds.

Theory of operation
-------------------
Compiling a large module takes minutes; deserializing wasmtime's compiled form takes
milliseconds. But deserializing bytes is executing them: a changed entry would run arbitrary
native code, and a plaintext entry would put the workload's code on the host disk. So every
entry is sealed:

- a 32-byte cache key comes from a key provider (on the `nil` backend a key file created 0600
  under the cache directory, used only while it is ours and 0600: whoever can read or plant it
  can seal entries; a TEE backend would derive a sealing key instead);
- two subkeys are derived from it with HKDF-SHA256: one names entries, one seals them;
- the entry's *identity* is SHA-256 of (module bytes, engine settings fingerprint, wasmtime
  version); its *file name* is HMAC-SHA256(name key, identity), so the host cannot tell which
  module an entry belongs to;
- the file holds `magic || nonce || AES-256-GCM(seal key, nonce, serialized module, aad)` with
  aad = `magic || key id || file name`: an entry moved to another name, sealed under another key,
  flipped or truncated fails authentication, is deleted and the module is recompiled;
- the decrypted bytes go straight to `Module.deserialize` in memory; no plaintext is ever
  written to disk. Writes are atomic (a temporary file in the same directory, then rename).

The directory is the host's, so what is read from it is hostile: files are opened without
blocking and without following a symlink at an entry's name, and only a regular file of at most
MAX_ENTRY_BYTES is read (a FIFO planted at an entry's name would hang every start, a link to
/dev/zero or a sparse terabyte file would fill memory); anything else is discarded like a
damaged entry.

The cache stays within a size limit (1 GiB, as wasmtime's own cache; `KEEPSHIM_CACHE_LIMIT`
in bytes, 0 for none): after each new entry, the least recently used entries (by modification
time: a hit touches its entry) are removed until the rest fit, and temporaries a crashed
writer left (`.entry-*`, older than an hour) are removed. Entries of an older wasmtime or of
other settings are never hit again, so they age out this way. Pruning removes only names of
entries and temporaries, relative to the entries directory opened without following a symlink
(a `modules` that is a symlink is not pruned: whatever it points at is not the cache's).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import os
import re
import secrets
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import wasmtime
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shim.engine import EngineSettings
from shim.errors import KeepError

_MAGIC = b"keepshim-compile-cache-v1\n"
_NONCE_SIZE = 12
_KEY_SIZE = 32
_KEY_FILE = "cache.key"
_ENTRIES = "modules"
MAX_ENTRY_BYTES = 1 << 30
"""The largest sealed entry read back (wasm modules are at most 128 MiB; their compiled form a
few times that): a bigger file at an entry's name is discarded, never read into memory."""
DEFAULT_SIZE_LIMIT = 1 << 30  # bytes of entries kept (KEEPSHIM_CACHE_LIMIT), as wasmtime's cache
_LIMIT_VARIABLE = "KEEPSHIM_CACHE_LIMIT"
_STALE_TEMPORARY_SECONDS = 3600  # a temporary this old is a crashed writer's
_ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.sealed")  # entry_path's names
_TEMPORARY_NAME = re.compile(r"\.entry-.+", re.DOTALL)  # _write's temporaries (tempfile.mkstemp)


class NotARegularFile(OSError):
    """A cache file that is a FIFO, a device, a directory or a symlink, or too big to be ours."""


def read_regular_file(path: Path, limit: int, *,
                      follow_symlinks: bool = True) -> tuple[bytes, os.stat_result]:
    """The bytes and status of `path` if it is a regular file of at most `limit` bytes;
    NotARegularFile otherwise (without blocking: a FIFO is opened O_NONBLOCK and refused after
    fstat), OSError when it cannot be opened. With follow_symlinks=False a symlink is refused
    (ELOOP). The status is that of the file actually read (fstat), so checks on it are race-free."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    descriptor = os.open(path, flags)
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise NotARegularFile(f"{path} is not a regular file")
        if status.st_size > limit:
            raise NotARegularFile(f"{path} is larger than {limit} bytes")
        with os.fdopen(descriptor, "rb", closefd=False) as stream:
            data = stream.read(limit + 1)
    finally:
        os.close(descriptor)
    if len(data) > limit:  # grew after fstat
        raise NotARegularFile(f"{path} is larger than {limit} bytes")
    return data, status


def default_cache_directory() -> Path:
    """`$KEEPSHIM_CACHE_DIR`, else `$XDG_CACHE_HOME/keepshim`, else `~/.cache/keepshim`."""
    explicit = os.environ.get("KEEPSHIM_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "keepshim"


def load_or_create_key_file(path: Path) -> bytes:
    """The `nil` backend's cache key: read `path`, or create it (mode 0600) with 32 random bytes.

    Creation is race-free between processes: the key is written to a private temporary file and
    hard-linked into place, so exactly one key wins and everyone reads that one. A directory that
    cannot be made or written is a one-line KeepError naming it (and --no-cache)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists():
            _create_key_file(path)
    except OSError as error:
        raise KeepError(f"cannot use the compile cache {path.parent}: {error.strerror} (set "
                        "KEEPSHIM_CACHE_DIR to a writable directory, or run with --no-cache)") from None
    try:
        key, status = read_regular_file(path, 4096)  # more than _KEY_SIZE: "damaged" below
    except NotARegularFile:
        raise KeepError(f"compile cache key {path} is not a regular file of {_KEY_SIZE} bytes: "
                        "remove it to start a new cache") from None
    except OSError as error:
        raise KeepError(f"cannot read the compile cache key {path}: {error.strerror}") from None
    if len(key) != _KEY_SIZE:
        raise KeepError(f"compile cache key {path} is damaged (not {_KEY_SIZE} bytes): "
                        "remove it to start a new cache")
    # Whoever can read the key (or wrote it) can seal an entry that runs their code in place of
    # a module's: only a key that is ours and private is used, as ssh treats its private keys.
    if status.st_uid != os.geteuid():
        raise KeepError(f"compile cache key {path} is owned by uid {status.st_uid}, not by this "
                        "user: whoever made it could make keep run their code; remove it to "
                        "start a new cache")
    if status.st_mode & 0o077:
        raise KeepError(f"compile cache key {path} has mode {stat.S_IMODE(status.st_mode):04o}: "
                        "others who can read it could make keep run their code; remove it to "
                        "start a new cache")
    return key


def _create_key_file(path: Path) -> None:
    """Write 32 random bytes to a private temporary file and hard-link it to `path` (a key that
    another process linked first wins)."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".key-")
    try:
        try:
            os.fchmod(descriptor, 0o600)
            os.write(descriptor, secrets.token_bytes(_KEY_SIZE))
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


@dataclass
class CacheStatistics:
    """What this cache object did (for tests and --debug; no timings involved)."""

    hits: int = 0
    misses: int = 0
    discarded: int = 0
    write_failures: int = 0
    pruned: int = 0


@dataclass
class CompileCache:
    """Sealed compiled modules in `directory`, under a 32-byte `key`."""

    directory: Path
    key: bytes = field(repr=False)
    statistics: CacheStatistics = field(default_factory=CacheStatistics)
    size_limit: int = DEFAULT_SIZE_LIMIT  # bytes of entries kept; 0: no limit

    def __post_init__(self) -> None:
        if len(self.key) != _KEY_SIZE:
            raise ValueError(f"the cache key must be {_KEY_SIZE} bytes")
        self._name_key = _derive(self.key, b"keepshim compile cache: entry names")
        self._seal = AESGCM(_derive(self.key, b"keepshim compile cache: sealing"))
        self._key_id = _derive(self.key, b"keepshim compile cache: key id")[:16]

    @classmethod
    def open(cls, directory: Path | None = None) -> CompileCache:
        """The `nil` backend cache: key file `cache.key` (0600) in `directory` (default:
        `default_cache_directory()`)."""
        directory = directory if directory is not None else default_cache_directory()
        return cls(directory, load_or_create_key_file(directory / _KEY_FILE), size_limit=size_limit_from_environment())

    def entry_path(self, wasm: bytes, settings: EngineSettings) -> Path:
        """Where the entry for this module and these settings lives (the name reveals nothing
        about the module without the key)."""
        identity = hashlib.sha256()
        for part in (b"module", hashlib.sha256(wasm).digest(), b"settings", settings.fingerprint()):
            identity.update(len(part).to_bytes(8, "little") + part)
        name = hmac.new(self._name_key, identity.digest(), hashlib.sha256).hexdigest()
        return self.directory / _ENTRIES / f"{name}.sealed"

    def load_module(self, engine: wasmtime.Engine, settings: EngineSettings,
                    wasm: bytes) -> tuple[wasmtime.Module, bool]:
        """The compiled module for `wasm`: from the cache if a valid entry exists (True), else
        compiled now and stored (False). Raises wasmtime.WasmtimeError for an invalid module."""
        path = self.entry_path(wasm, settings)
        module = self._read(engine, path)
        if module is not None:
            self.statistics.hits += 1
            with contextlib.suppress(OSError):
                os.utime(path, follow_symlinks=False)  # recently used: the last to be pruned
            return module, True
        self.statistics.misses += 1
        module = wasmtime.Module(engine, wasm)
        if self._write(path, bytes(module.serialize())):
            self.prune(keep=path)
        return module, False

    def prune(self, *, keep: Path | None = None) -> None:
        """Remove the least recently used entries (never `keep`) until the rest fit within
        `size_limit`, and temporaries older than an hour. Only names this class makes (an
        entry's, a temporary's) that are not directories are touched, and only in the entries
        directory itself: it is opened without following a symlink and every name is removed
        relative to it (a `modules` planted as a symlink elsewhere had that directory's
        `*.sealed` and old `.entry-*` files deleted). Failures are ignored (another process may
        prune at the same time)."""
        try:
            directory = os.open(self.directory / _ENTRIES,
                                os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return
        try:
            self._prune_in(directory, keep.name if keep is not None else None)
        finally:
            os.close(directory)

    def _prune_in(self, directory: int, keep: str | None) -> None:
        entries: list[tuple[float, str, int]] = []
        kept = 0
        now = time.time()
        try:
            with os.scandir(directory) as found:
                for item in found:
                    is_entry = _ENTRY_NAME.fullmatch(item.name) is not None
                    is_temporary = _TEMPORARY_NAME.fullmatch(item.name) is not None
                    if not (is_entry or is_temporary):
                        continue
                    try:
                        status = item.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if stat.S_ISDIR(status.st_mode):
                        continue
                    if is_temporary:
                        if now - status.st_mtime > _STALE_TEMPORARY_SECONDS:
                            with contextlib.suppress(OSError):
                                os.unlink(item.name, dir_fd=directory)
                    elif item.name == keep:
                        kept = status.st_size
                    else:
                        entries.append((status.st_mtime, item.name, status.st_size))
        except OSError:
            return
        if not self.size_limit:
            return
        total = kept + sum(size for _, _, size in entries)
        for _, name, size in sorted(entries):  # oldest first
            if total <= self.size_limit:
                break
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=directory)
                self.statistics.pruned += 1
            total -= size

    def _aad(self, path: Path) -> bytes:
        return _MAGIC + self._key_id + path.name.encode()

    def _read(self, engine: wasmtime.Engine, path: Path) -> wasmtime.Module | None:
        try:
            sealed, _ = read_regular_file(path, MAX_ENTRY_BYTES, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except (NotARegularFile, OSError) as error:
            if isinstance(error, NotARegularFile) or error.errno == errno.ELOOP:
                self._discard(path)  # planted: remove it so the next start does not meet it
            else:
                self.statistics.discarded += 1
            return None
        header = len(_MAGIC) + _NONCE_SIZE
        if len(sealed) < header + 16 or not sealed.startswith(_MAGIC):
            self._discard(path)
            return None
        nonce = sealed[len(_MAGIC):header]
        try:
            serialized = self._seal.decrypt(nonce, sealed[header:], self._aad(path))
        except InvalidTag:
            self._discard(path)
            return None
        try:
            return wasmtime.Module.deserialize(engine, serialized)
        except wasmtime.WasmtimeError:  # authentic but incompatible (e.g. another CPU's features)
            self._discard(path)
            return None

    def _discard(self, path: Path) -> None:
        self.statistics.discarded += 1
        with contextlib.suppress(OSError):
            path.unlink()

    def _write(self, path: Path, serialized: bytes) -> bool:
        """Seal and store an entry atomically; False (counted) when it cannot be written."""
        nonce = secrets.token_bytes(_NONCE_SIZE)
        sealed = _MAGIC + nonce + self._seal.encrypt(nonce, serialized, self._aad(path))
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".entry-")
            try:
                with os.fdopen(descriptor, "wb") as stream:
                    stream.write(sealed)
                os.replace(temporary, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
        except OSError:  # a cache that cannot be written only costs the next start time
            self.statistics.write_failures += 1
            return False
        return True


def size_limit_from_environment() -> int:
    """`KEEPSHIM_CACHE_LIMIT` (bytes; 0: no limit), else DEFAULT_SIZE_LIMIT; a value that is not
    a number of bytes is a one-line KeepError."""
    text = os.environ.get(_LIMIT_VARIABLE, "").strip()
    if not text:
        return DEFAULT_SIZE_LIMIT
    try:
        if not (text.isascii() and text.isdigit()):
            raise ValueError(text)
        return int(text)  # ValueError past Python's 4300 digits: was an internal error, exit 70
    except ValueError:
        shown = text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"
        raise KeepError(f"{_LIMIT_VARIABLE}={shown!r}: expected a number of bytes (0: no limit)") from None


def _derive(key: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(key)
