"""A pytest plugin for testing WASI apps in a keep: the `keep` fixture.

Registered through the `pytest11` entry point (`keepshim = "shim.pytest_plugin"`), so installing
keepshim makes the fixture available to any test suite::

    def test_app_survives_a_full_disk(keep):
        result = keep("app.wasm", files={"config.toml": b"..."}, args=["--save", "/data/out"],
                      faults=["fd_write:enospc-after=4096:path=/data/*"])
        assert result.exit_code == 1
        assert b"disk full" in result.stderr
        assert "out" not in result.files
        assert [event.errno_name for event in result.calls("fd_write")][-1] == "ENOSPC"

Each call runs one module to completion in a keep, in this process, with:

- a guest directory pre-opened at `mount` (default `/data`), filled from `files` (a dict of
  relative path -> bytes or str, or a host directory, a Path or a str, copied in); after the
  run its regular files come back as `result.files` (relative path -> bytes);
- stdin from bytes (or a str, as UTF-8), stdout and stderr captured, args and env as given;
- `faults`: `--fault` texts (the grammar is `wasi_host._faults.GRAMMAR`); one that changed no
  call gives a `FaultNeverTookEffect` warning;
- every host call traced into `result.trace` (a list of `TraceEvent`; `trace_data=True` adds the
  bytes read and written);
- `timeout=` seconds (default 60, None for none): a guest running longer is stopped, exit status
  134, its `result.trap` ending with a line that names the timeout.

Where the guest directory lives: by default an **in-memory encrypted volume** (a LUKS2 +
Merkle-integrity volume over `storage.blockdev.MemoryBlockDevice`, with a random passphrase and a
cheap KDF, served through `shim.volume_backend`, exactly what `keep run --volume` gives a guest;
`volume_size=` bytes, default 32 MiB, of which the LUKS2 header takes 16 MiB: `files=` that do
not fit are an ENOSPC OSError, never a shortened file);
`result.image` is the device's bytes after the final commit (ciphertext: what a host would
see). `directory="memfs"` uses `wasi_host.memfs` instead (faster, no encryption).

`await keep.run_async(...)` does the same from a trio test (the plain call starts its own trio
loop, which cannot nest).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pytest

from wasi_host import Directory, DirEntry, Filetype
from wasi_host._faults import FaultSpec
from wasi_host._functions import FUNCTIONS
from wasi_host._trace import TraceEvent, Tracer
from wasi_host.memfs import MemoryFilesystem
from wasi_host.streams import MemoryStream

if TYPE_CHECKING:
    from shim.volume_backend import VolumeSession
    from storage.blockdev import MemoryBlockDevice

class FaultNeverTookEffect(UserWarning):
    """A `faults=` spec failed or shortened no call of the run (its glob, fd or count never met
    one), so the test's outcome says nothing about how the app handles that fault."""


FileTree = Mapping[str, bytes | str]
GuestDirectoryKind = Literal["volume", "memfs"]
VOLUME_SIZE = 32 << 20  # the LUKS2 header takes 16 MiB of it
_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class KeepRun:
    """The outcome of one `keep(...)` call."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    trace: list[TraceEvent] = field(repr=False)
    files: dict[str, bytes] = field(repr=False)
    trap: str | None = None
    image: bytes | None = field(default=None, repr=False)

    def calls(self, name: str) -> list[TraceEvent]:
        """The traced calls of one preview1 function, in order. A name that is no preview1
        function is a ValueError: [] for a misspelling would make `assert not calls(...)` pass
        whatever the app did."""
        if name not in FUNCTIONS:
            raise ValueError(f"calls({name!r}): {name!r} is not a WASI preview1 function")
        return [event for event in self.trace if event.function == name]

    def errors(self) -> list[TraceEvent]:
        """The traced calls that failed (errno other than SUCCESS)."""
        return [event for event in self.trace if event.errno != 0 and event.exit_code is None]


def _split(relative: str) -> list[str]:
    parts = [part for part in relative.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"files: {relative!r} is not a relative path inside the guest directory")
    return parts


def _subdirectory(root: Directory, parts: Sequence[str]) -> Directory:
    directory = root
    for part in parts:
        with contextlib.suppress(FileExistsError):
            directory.mkdir(part)
        directory = directory.open_directory(part)
    return directory


def fill(root: Directory, files: FileTree | Path | str) -> None:
    """Put `files` (relative path -> contents, or a host directory's tree, as a Path or a str)
    into `root`. A host directory that does not exist is an error, not an empty guest tree."""
    if isinstance(files, str | os.PathLike):
        files = Path(files)
        if not files.is_dir():
            raise ValueError(f"files: {str(files)!r} is not a directory (a host directory to copy in)")
        for directory, subdirectories, names in os.walk(files):
            relative = Path(directory).relative_to(files)
            base = list(relative.parts)
            for name in subdirectories:
                link = Path(directory, name)
                if link.is_symlink():  # os.walk lists links to directories here; copy the link
                    _subdirectory(root, base).symlink(os.readlink(link), name)
                else:
                    _subdirectory(root, [*base, name])
            for name in names:
                source = Path(directory, name)
                parent = _subdirectory(root, base)
                if source.is_symlink():
                    parent.symlink(os.readlink(source), name)
                elif source.is_file():
                    _write(parent, name, source.read_bytes())
        return
    for name, contents in files.items():
        parts = _split(name)
        if isinstance(contents, str):
            data = contents.encode()
        elif isinstance(contents, bytes | bytearray | memoryview):
            data = bytes(contents)
        else:  # bytes(3) would be three NUL bytes, not "3"
            raise TypeError(f"files: {name!r} must be bytes or str, not {type(contents).__name__}")
        _write(_subdirectory(root, parts[:-1]), parts[-1], data)


def _write(directory: Directory, name: str, data: bytes) -> None:
    """`data` as the whole of file `name` (a pwrite may take only part: the rest follows it, and
    a volume that takes nothing more is ENOSPC, never a silently shorter file)."""
    handle = directory.open_file(name, create=True, exclusive=False, truncate=True, read=False, write=True)
    try:
        view, offset = memoryview(data), 0
        while offset < len(data):
            written = handle.pwrite(view[offset:], offset)
            if written <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            offset += written
    finally:
        handle.close()


def read_tree(root: Directory, prefix: str = "") -> dict[str, bytes]:
    """Every regular file under `root` as relative path -> contents (symlinks not followed)."""
    tree: dict[str, bytes] = {}
    for entry in _entries(root):
        path = f"{prefix}{entry.name}"
        if entry.filetype == Filetype.DIRECTORY:
            child = root.open_directory(entry.name)
            try:
                tree.update(read_tree(child, path + "/"))
            finally:
                child.close()
        elif entry.filetype == Filetype.REGULAR_FILE:
            handle = root.open_file(entry.name, create=False, exclusive=False, truncate=False,
                                    read=True, write=False)
            try:
                chunks, offset = [], 0
                while chunk := handle.pread(_READ_CHUNK, offset):
                    chunks.append(chunk)
                    offset += len(chunk)
                tree[path] = b"".join(chunks)
            finally:
                handle.close()
    return tree


def _entries(directory: Directory) -> Iterator[DirEntry]:
    yield from sorted(directory.readdir(0), key=lambda entry: entry.name)


class GuestTree:
    """The guest's pre-opened directory for one run: filled before, read back after."""

    def __init__(self, kind: GuestDirectoryKind, files: FileTree | Path | str | None,
                 volume_size: int = VOLUME_SIZE) -> None:
        self.kind = kind
        self._device: MemoryBlockDevice | None = None
        self._session: VolumeSession | None = None
        if kind == "memfs":
            self.directory: Directory = MemoryFilesystem().root()
        elif kind == "volume":
            # Imported here: the plugin loads in every pytest session, the volume stack only
            # when a test asks for it.
            from shim.volume_backend import VolumeSession
            from storage.blockdev import MemoryBlockDevice
            from storage.luks2 import KdfCost
            from storage.volume import create_volume

            self._device = MemoryBlockDevice(volume_size)
            volume = create_volume(self._device, None, secrets.token_bytes(32), pbkdf="pbkdf2",
                                   kdf_cost=KdfCost(iterations=1000))
            self._session = VolumeSession(volume)
            self.directory = self._session.root()
        else:
            raise ValueError(f"directory must be 'volume' or 'memfs', not {kind!r}")
        if files is not None:
            try:
                fill(self.directory, files)
            except BaseException as error:  # a bad `files=`: the volume made for it is let go of at once
                if self._session is not None:
                    self._session.close()
                if isinstance(error, OSError) and error.errno == errno.ENOSPC and kind == "volume":
                    raise OSError(errno.ENOSPC, f"files= do not fit in the guest directory's {volume_size} "
                                  "byte volume (16 MiB of it is the LUKS2 header): pass a larger "
                                  "volume_size=") from None
                raise

    def finish(self) -> tuple[dict[str, bytes], bytes | None]:
        """The files after the run, and (for a volume) the image after its final commit."""
        if self._session is None:
            return read_tree(self.directory), None
        try:
            self._session.commit()
            files = read_tree(self._session.root())  # the run closed the guest's handle
        finally:
            self._session.close()
        assert self._device is not None
        return files, self._device.snapshot()


class KeepRunner:
    """The `keep` fixture's value: call it to run a module (see the module docstring)."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir

    def __call__(self, module: str | os.PathLike[str] | bytes, **options: object) -> KeepRun:
        import trio

        try:
            trio.lowlevel.current_task()
        except RuntimeError:  # not inside a trio run: start one
            pass
        else:
            raise RuntimeError("keep(...) cannot run inside a trio test (trio runs do not nest): "
                               "use `await keep.run_async(...)`")
        result, ineffective = trio.run(lambda: self._run(module, **options))  # type: ignore[arg-type]
        _warn_ineffective(ineffective)  # here, so the warning points at the test's line
        return result

    async def run_async(
        self,
        module: str | os.PathLike[str] | bytes,
        *,
        files: FileTree | Path | str | None = None,
        mount: str = "/data",
        directory: GuestDirectoryKind = "volume",
        stdin: bytes | str = b"",
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        faults: Sequence[str] = (),
        trace_data: bool = False,
        timeout: float | None = 60.0,
        volume_size: int = VOLUME_SIZE,
    ) -> KeepRun:
        """Run `module` (a path, or the module's bytes) to completion; see the module docstring."""
        result, ineffective = await self._run(
            module, files=files, mount=mount, directory=directory, stdin=stdin, args=args, env=env,
            faults=faults, trace_data=trace_data, timeout=timeout, volume_size=volume_size)
        _warn_ineffective(ineffective)  # here, so the warning points at the test's line
        return result

    async def _run(self, module: str | os.PathLike[str] | bytes, *, files: FileTree | Path | str | None = None,
                   mount: str = "/data", directory: GuestDirectoryKind = "volume", stdin: bytes | str = b"",
                   args: Sequence[str] = (), env: Mapping[str, str] | None = None, faults: Sequence[str] = (),
                   trace_data: bool = False, timeout: float | None = 60.0,
                   volume_size: int = VOLUME_SIZE) -> tuple[KeepRun, list[str]]:
        """`run_async`'s work; also returns the lines of the faults that never took effect, for
        the caller to warn about from its own frame (the test's line, not trio's)."""
        import wasmtime

        from shim.run import RunConfig, Stdio, run_module_async

        for option, value in (("args", args), ("faults", faults)):
            if isinstance(value, str):  # a str is a Sequence[str] too: of its letters
                raise TypeError(f"{option}= takes a list of strings, not a str ({option}={[value]!r})")
        if timeout is not None and not timeout > 0:  # (RunConfig would say --timeout, after the volume is made)
            raise ValueError(f"timeout= must be a positive number of seconds or None, not {timeout!r}")
        for name, text in (env or {}).items():
            if not isinstance(name, str) or not isinstance(text, str):
                raise TypeError(f"env= takes str names and values: {name!r}: {text!r}")
        if isinstance(stdin, str):  # as files= contents: text is UTF-8
            stdin = stdin.encode()
        names = frozenset(FUNCTIONS)
        specs = tuple(FaultSpec.parse(text, names) for text in faults)
        tree = GuestTree(directory, files, volume_size)
        events: list[TraceEvent] = []
        stdout, stderr = MemoryStream(), MemoryStream()
        if isinstance(module, bytes):
            module_name, module_bytes = "module.wasm", module
        else:
            module_name, module_bytes = os.fspath(module), None
        config = RunConfig(
            module=module_name, module_bytes=module_bytes, args=tuple(args),
            env=tuple((env or {}).items()), preopens=((mount, tree.directory),),
            stdio=Stdio(MemoryStream(stdin), stdout, stderr), timeout=timeout,
            cache_dir=self.cache_dir, trace=Tracer(events.append, show_data=trace_data),
            faults=specs,
        )
        try:
            outcome = await run_module_async(config)
        finally:
            files_after, image = tree.finish()
        trap = outcome.trap
        if trap is not None and timeout is not None and outcome.trap_code == wasmtime.TrapCode.INTERRUPT:
            # said, as keep run says it: 'wasm trap: interrupt' alone reads like a crash of the app
            trap = f"{trap.rstrip()}\nthe guest was stopped: it ran longer than the fixture's timeout={timeout:g} s"
        return KeepRun(outcome.exit_code, bytes(stdout.output), bytes(stderr.output), events,
                       files_after, trap, image), list(outcome.ineffective_faults)


def _warn_ineffective(lines: list[str]) -> None:
    """A FaultNeverTookEffect per line, attributed to the caller of the fixture's method."""
    for line in lines:
        warnings.warn(line, FaultNeverTookEffect, stacklevel=3)


@pytest.fixture(scope="session")
def keep_plugin_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The compile cache of the `keep` fixture (one per session, in a temporary directory)."""
    return tmp_path_factory.mktemp("keep-plugin-cache")


@pytest.fixture
def keep(keep_plugin_cache: Path) -> KeepRunner:
    """Run a wasm module in a keep and inspect what it did: `keep(module, files=..., stdin=...,
    args=..., env=..., faults=[...])` -> KeepRun(exit_code, stdout, stderr, trace, files)."""
    return KeepRunner(keep_plugin_cache)
