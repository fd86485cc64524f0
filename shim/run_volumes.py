"""`keep run --volume IMG[::GUEST_PATH]`: encrypted volumes pre-opened for a guest.

Theory of operation
-------------------
`RunVolumes.open(args)` reads the key once (the same options as `keep volume`: prompt,
`--passphrase-file`, `--key-file`, `--passphrase-env`; shim.keys), opens every image in this
process (the image lock is held for the whole run; a second run on the same image is refused),
pins generations (`--volume-generation N`, or the entries of `--volume-state FILE` when it
exists) and wraps each volume in a `shim.volume_backend.VolumeSession`, whose root directory is
pre-opened for the guest through `RunConfig.preopens` (after the `--dir` directories, before any
socket: wasi-libc stops its pre-open scan at the first fd that is not a directory).

Keys with several volumes: one key source opens all of them. LUKS2 has eight keyslots, so an
owner whose volumes were made with different passphrases adds a common one to each with
`keep volume add-key`; a run then needs one secret, which is prompted for once.

Ending: the guest is stopped by whatever ends it (it returns, proc_exit, a trap, `--timeout`, or
SIGINT / SIGTERM / SIGHUP to `keep` (less any it was started with ignored), which tick the
engine's epoch so the guest traps at its next loop back-edge: the run is `interruptible`), then
every volume is committed and closed, always, and the final (uuid, generation, root MAC) is
printed with `--verbose` and written to
`--volume-state FILE` (JSON, the format `keep deploy --volume-state` uses, keyed by image path)
so that the owner can pin it. A second signal while the guest is still inside a host call
(blocked reading stdin, say) ends the process at once; the volume stays consistent anyway (the
storage commit protocol is crash-safe) with everything the guest fsync'd.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import trio

from shim.errors import KeepError, UsageError, say
from shim.keys import KeySource, read_key
from shim.run import split_mapping
from shim.signals import receive_stop_signals
from shim.volume_backend import VolumeSession
from shim.volume_state import pin, read_volume_state, update_state_file, writable_state_file
from storage.errors import IntegrityError
from storage.integrity import VolumeState

if TYPE_CHECKING:
    from shim.run import RunConfig, RunResult

DEFAULT_GUEST_PATH = "/data"


@dataclass(frozen=True)
class VolumeMount:
    """`--volume IMG[::GUEST_PATH]`: an image pre-opened for the guest at GUEST_PATH."""

    image: str
    guest: str

    @classmethod
    def parse(cls, spec: str) -> VolumeMount:
        image, guest = split_mapping(spec, "--volume", "IMG")
        return cls(image, DEFAULT_GUEST_PATH if guest is None else guest)


def describe(state: VolumeState) -> str:
    mac = state.root_mac.hex() if state.root_mac else "none (no integrity)"
    return f"uuid {state.uuid}, generation {state.generation}, root MAC {mac}"


def _pins(mounts: Sequence[VolumeMount], generations: Sequence[int],
          recorded: dict[str, dict[str, Any]]) -> list[tuple[int | None, str | None]]:
    """(generation, uuid) to require of each volume: --volume-generation wins over the file."""
    if generations and len(generations) != len(mounts):
        raise UsageError(f"--volume-generation given {len(generations)} times for {len(mounts)} "
                         "volumes: give it once per --volume, in the same order")
    pins: list[tuple[int | None, str | None]] = []
    for index, mount in enumerate(mounts):
        entry = recorded.get(_state_key(mount.image)) or recorded.get(os.path.abspath(mount.image), {})
        uuid = entry.get("uuid")
        generation = generations[index] if generations else entry.get("generation")
        pins.append((generation, uuid if isinstance(uuid, str) else None))
    return pins


def _state_key(image: str) -> str:
    """An image's entry in the --volume-state file: its real path, so that the image named
    through a symlink finds its pin (files written before this key was used hold the absolute
    path as given: `_pins` falls back to it)."""
    return os.path.realpath(image)


def _open_error(image: str, error: BaseException) -> KeepError:
    """One line for a volume that cannot be opened (the storage errors, translated once)."""
    from storage.errors import (
        CorruptHeader,
        NotLuks,
        RollbackError,
        UnsupportedFormat,
        VolumeInUse,
        WrongPassphrase,
    )

    if isinstance(error, WrongPassphrase):
        return KeepError(f"--volume {image}: wrong passphrase", exit_status=2)
    if isinstance(error, FileNotFoundError):
        return UsageError(f"--volume {image}: no such file")
    if isinstance(error, NotLuks):
        return UsageError(f"--volume {image}: not a LUKS2 volume")
    if isinstance(error, VolumeInUse):
        return KeepError(f"--volume {image}: in use by another process")
    if isinstance(error, RollbackError):
        return KeepError(f"--volume {image}: refused, rolled back: {error}")
    if isinstance(error, IntegrityError):
        return KeepError(f"--volume {image}: integrity failure: {error}")
    if isinstance(error, OSError) and error.strerror:  # "Is a directory", not Python's repr
        return KeepError(f"--volume {image}: {error.strerror}")
    if isinstance(error, (CorruptHeader, UnsupportedFormat, OSError)):
        return KeepError(f"--volume {image}: {error}")
    return KeepError(f"--volume {image}: {type(error).__name__}: {error}")


class RunVolumes:
    """The volumes of one `keep run`, open; a context manager that commits and closes them."""

    def __init__(self, mounts: Sequence[VolumeMount], sessions: Sequence[VolumeSession], *,
                 verbose: bool = False, state_file: Path | None = None,
                 recorded: dict[str, dict[str, Any]] | None = None) -> None:
        self.mounts = tuple(mounts)
        self.sessions = tuple(sessions)
        self.verbose = verbose
        self.state_file = state_file
        self._recorded = dict(recorded or {})
        self.final_states: list[VolumeState] = []

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> RunVolumes | None:
        """Open `keep run`'s --volume images (None without any)."""
        specs: list[str] = list(getattr(args, "volume", None) or [])
        generations: list[int] = list(getattr(args, "volume_generation", None) or [])
        state_path = getattr(args, "volume_state", None)
        if not specs:
            if generations or state_path is not None:
                raise UsageError("--volume-generation and --volume-state need --volume")
            return None
        mounts = [VolumeMount.parse(spec) for spec in specs]
        images = [os.path.realpath(mount.image) for mount in mounts]  # a symlink is the same image
        if len(set(images)) != len(images):
            raise UsageError("--volume: the same image is given twice")
        state_file = writable_state_file(Path(state_path)) if state_path is not None else None
        recorded: dict[str, dict[str, Any]] = dict(read_volume_state(
            Path(state_path) if state_path is not None else None))  # named as given
        pins = _pins(mounts, generations, recorded)
        key = read_key(KeySource.from_arguments(args), prompt="Volume passphrase: ")
        verbose = bool(getattr(args, "verbose", False))
        return cls.open(mounts, key, pins, verbose=verbose, state_file=state_file, recorded=recorded)

    @classmethod
    def open(cls, mounts: Sequence[VolumeMount], key: bytes,
             pins: Sequence[tuple[int | None, str | None]], *, verbose: bool = False,
             state_file: Path | None = None,
             recorded: dict[str, dict[str, Any]] | None = None) -> RunVolumes:
        """Open every image (all or nothing: on a failure the ones opened are closed)."""
        from storage.volume import open_volume

        sessions: list[VolumeSession] = []
        try:
            for mount, (generation, uuid) in zip(mounts, pins, strict=True):
                try:
                    volume = open_volume(mount.image, key, writable=True, expected_generation=generation)
                except Exception as error:
                    raise _open_error(mount.image, error) from None
                session = VolumeSession(volume, on_integrity_error=_FirstIntegrityFailure(mount.image))
                sessions.append(session)
                actual = volume.state().uuid
                if uuid is not None and actual != uuid:
                    raise KeepError(f"--volume {mount.image}: another volume (uuid {actual}) than "
                                    f"the pinned one ({uuid})")
                if verbose:
                    say(f"volume {mount.image} at {mount.guest}: opened, {describe(volume.state())}")
        except BaseException:
            for session in sessions:
                session.close()
            raise
        return cls(mounts, sessions, verbose=verbose, state_file=state_file, recorded=recorded)

    def configure(self, config: RunConfig) -> RunConfig:
        """The RunConfig with the volumes pre-opened and the run interruptible (signals)."""
        preopens = tuple((mount.guest, session.root())
                         for mount, session in zip(self.mounts, self.sessions, strict=True))
        return dataclasses.replace(config, preopens=(*config.preopens, *preopens), interruptible=True)

    def close(self) -> None:
        """Commit and close every volume (each one, even when another fails); report the final
        states; write --volume-state. A failure is raised after all are closed."""
        problems: list[str] = []
        self.final_states = []
        ended: dict[str, dict[str, Any]] = {}
        for mount, session in zip(self.mounts, self.sessions, strict=True):
            try:
                state = session.close()
            except OSError as error:
                problems.append(f"--volume {mount.image}: final commit failed: {error}")
                continue
            self.final_states.append(state)
            ended[_state_key(mount.image)] = pin(state.uuid, state.generation, state.root_mac,
                                                 guest_path=mount.guest)
            if self.verbose:
                say(f"volume {mount.image} committed: {describe(state)}")
            if session.integrity_failures > 1:
                say(f"volume {mount.image}: {session.integrity_failures} integrity failures in all "
                    "(each one answered EIO)")
        if self.state_file is not None and ended:
            try:
                update_state_file(self.state_file, self._recorded, ended)
            except OSError as error:
                problems.append(f"cannot write --volume-state {self.state_file}: {error.strerror}")
        if problems:
            raise KeepError("; ".join(problems))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


class _FirstIntegrityFailure:
    """Prints a volume's first integrity failure as one line on stderr (the guest got EIO; the
    total is said at the end when there were more). Called on the guest's thread with the
    session lock held; never raises."""

    def __init__(self, image: str) -> None:
        self._image = image
        self._said = False

    def __call__(self, error: IntegrityError) -> None:
        if not self._said:
            self._said = True
            say(f"volume {self._image}: integrity failure: {error} (the host changed the image; "
                "the guest got EIO)")


@dataclass(frozen=True)
class SignalledRun:
    """The guest was stopped because `keep` received `signal_number`."""

    signal_number: int

    @property
    def exit_status(self) -> int:
        return 128 + self.signal_number


def run_until_signalled(config: RunConfig) -> RunResult | SignalledRun:
    """`shim.run.run_module`, but SIGINT / SIGTERM / SIGHUP (`stop_signals`) stop the guest
    (epoch interruption) instead of the process, so the caller commits its volumes; returns the
    RunResult or a SignalledRun. After the first signal the default handlers are back: a second
    one ends the process at once."""
    from shim.run import run_module_async
    from shim.sockets import GuestSignalled

    async def main() -> RunResult | SignalledRun:
        box: dict[str, Any] = {}
        guest_scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            async def guest() -> None:
                with guest_scope:
                    try:
                        box["result"] = await run_module_async(config)
                    except OSError as error:
                        # Backends' errors reach the guest as errno; one escapes only while the
                        # guest's fds are closed after it ended: a volume's last buffered bytes.
                        box["error"] = KeepError(f"writing the guest's files when it ended failed: "
                                                 f"{error.strerror or error}")
                    except Exception as error:  # re-raised below, as itself (not in a group)
                        box["error"] = error
                    except KeyboardInterrupt as interrupt:  # keep.toml's sockets stop on signals
                        box.setdefault("signal", interrupt.signal_number
                                       if isinstance(interrupt, GuestSignalled) else signal.SIGINT)
                nursery.cancel_scope.cancel()

            async def watch() -> None:
                with receive_stop_signals() as signals:  # (none: nohup and a background job)
                    async for number in signals:
                        box["signal"] = number
                        break
                guest_scope.cancel()

            nursery.start_soon(guest)
            nursery.start_soon(watch)
        if "error" in box:
            raise box["error"]
        if "signal" in box:
            return SignalledRun(int(box["signal"]))
        result: RunResult = box["result"]
        return result

    outcome: RunResult | SignalledRun = trio.run(main)
    return outcome


def warn_plaintext_dirs(args: argparse.Namespace) -> None:
    """`--dir` gives the guest a host directory: say that the host sees it in plaintext. Said
    on a terminal or with --verbose only, so that a script's stderr stays the guest's own."""
    directories: list[str] = list(getattr(args, "dir", None) or [])
    if directories and (getattr(args, "verbose", False) or sys.stderr.isatty()):
        for spec in directories:
            say(f"warning: --dir {spec}: the host sees these files in plaintext (use --volume IMG "
                "for an encrypted volume)")
