"""Fault injection for preview1 calls: make chosen calls fail or misbehave, deterministically.

Theory of operation
-------------------
A `FaultSpec` is parsed from one `--fault` text (grammar in `GRAMMAR`, which the CLI shows in
its help). `FaultInjector(specs).wrap(functions)` returns a copy of the host-function table in
which each function some spec names is wrapped; the others are left as they are. Per call, each
spec that names the function is checked in order:

1. filters: `fd=N` (the call's fd) and `path=GLOB` (the path argument of a path_* call joined to
   its directory, either of the two for path_rename and path_link, or the path an fd was opened
   with; `fnmatch`, so `*` also crosses `/`, and a glob without `/` also matches the last
   component);
2. when: the calls passing the filters are counted, and `nth=N` picks the Nth, `every=N` every
   Nth, `probability=P` a pseudo-random share from `random.Random(seed)` (default seed 0), drawn
   only for calls that passed the other conditions, so one seed always gives the same faults for
   the same guest;
3. the action: an errno fails the call without running it; `short=N` lets a transfer move at
   most N bytes; `enospc-after=N` / `reset-after=N` let transfers move N bytes in total, the call
   crossing the limit moves what is left, and later calls fail with ENOSPC / ECONNRESET.

Short transfers lower the lengths in the guest's iovec array for the duration of the call and
restore them after it: the guest is blocked in the call, so nothing else can see the change, and
the real implementation runs unchanged. The injector keeps per-run state (counters, the fd ->
path map), so build one per run.
"""

from __future__ import annotations

import fnmatch
import posixpath
import random
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal

from wasi_host._abi import U32, U32_PAIR, Errno
from wasi_host._errors import WasiError
from wasi_host._fdtable import OpenDirectory
from wasi_host._functions import HostFunction
from wasi_host._memory import IOV_MAX, Memory
from wasi_host._trace import TRANSFERS, errno_from_name, replace_impl

GRAMMAR: Final = """\
fault SPEC grammar:  CALLS:ACTION[:CONDITION...]
  CALLS      preview1 names or globs joined by '|': fd_write, fd_read|fd_pread, path_*, sock_*
  ACTION     ERRNO           fail the call with this errno, not running it (EIO, ENOSPC, EACCES...)
             short=N         transfer at most N bytes per call (fd_read/fd_write/fd_pread/
                             fd_pwrite/sock_recv/sock_send): a short read or write
             enospc-after=N  transfers move N bytes in total, then fail with ENOSPC
             reset-after=N   transfers move N bytes in total, then fail with ECONNRESET
  CONDITION  fd=N            only calls on fd N
             path=GLOB       only calls whose guest path (or the path the fd was opened with;
                             either end of a rename or link) matches; '*' crosses '/'; a GLOB
                             without '/' matches the name
             nth=N           only the Nth matching call (1 = the first)
             every=N         every Nth matching call
             probability=P   each matching call with probability P (0..1)
             seed=S          seed for probability (default 0): same seed, same faults
examples: --fault fd_write:EIO   --fault 'path_open:EACCES:path=*.conf'
          --fault fd_write:short=100:fd=3   --fault 'fd_read:EIO:nth=2'
          --fault 'fd_write|fd_pwrite:enospc-after=4096'   --fault sock_send:reset-after=1000
          --fault 'fd_write:EIO:probability=0.1:seed=7'"""

Action = Literal["errno", "short", "limit"]
_LIMIT_ACTIONS: Final = {"enospc-after": Errno.NOSPC, "reset-after": Errno.CONNRESET}
_CONDITIONS: Final = ("fd", "path", "nth", "every", "probability", "seed")
_PATH_ARGUMENTS: Final[Mapping[str, tuple[int, int]]] = MappingProxyType({
    # function: (index of its directory fd, index of its path pointer); the length follows it
    "path_create_directory": (0, 1), "path_filestat_get": (0, 2), "path_filestat_set_times": (0, 2),
    "path_link": (0, 2), "path_open": (0, 2), "path_readlink": (0, 1),
    "path_remove_directory": (0, 1), "path_rename": (0, 1), "path_symlink": (2, 3),
    "path_unlink_file": (0, 1),
})
_SECOND_PATH_ARGUMENTS: Final[Mapping[str, tuple[int, int]]] = MappingProxyType({
    # the calls naming two paths: where the destination's directory fd and path pointer are
    "path_link": (4, 5), "path_rename": (3, 4),
})


@dataclass
class FaultTally:
    """How one spec fared in a run: the calls that met its conditions, and those it changed
    (failed, or shortened). A spec that changed nothing is worth a warning: the run passing says
    nothing about how the app handles the fault."""

    matched: int = 0
    effective: int = 0


class FaultSpecError(ValueError):
    """A --fault text that does not follow the grammar (the message says what is wrong)."""


# proc_exit never fails: a guest whose exit returned would run into unreachable code.
_NEVER_FAULTED = "proc_exit"


@dataclass(frozen=True)
class FaultSpec:
    """One parsed --fault: which calls, what happens to them, and when."""

    calls: tuple[str, ...]
    action: Action
    errno: int = 0
    amount: int = 0  # short: bytes per call; limit: bytes in total
    fd: int | None = None
    path: str | None = None
    nth: int | None = None
    every: int | None = None
    probability: float | None = None
    seed: int = 0
    text: str = ""

    @classmethod
    def parse(cls, text: str, names: frozenset[str] | None = None) -> FaultSpec:
        """Parse `text`; with `names` (the preview1 names) each CALLS glob must match one."""
        parts = text.split(":")
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise FaultSpecError(f"--fault {text!r}: expected CALLS:ACTION[:CONDITION...]")
        calls = tuple(part.strip() for part in parts[0].split("|"))
        if names is not None:
            for pattern in calls:
                if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                    raise FaultSpecError(f"--fault {text!r}: no preview1 function matches {pattern!r}")
                if fnmatch.fnmatchcase(_NEVER_FAULTED, pattern) and pattern != "*":
                    raise FaultSpecError(f"--fault {text!r}: {_NEVER_FAULTED} cannot fail")
        fields: dict[str, object] = {"calls": calls, "text": text}
        action_text = parts[1].strip()
        key, separator, value = action_text.partition("=")
        if separator:
            amount = _whole(text, key, value)
            if key == "short":
                if amount < 1:
                    raise FaultSpecError(f"--fault {text!r}: short=N needs N >= 1 (0 bytes is end of file)")
                fields.update(action="short", amount=amount)
            elif key in _LIMIT_ACTIONS:
                fields.update(action="limit", amount=amount, errno=int(_LIMIT_ACTIONS[key]))
            else:
                raise FaultSpecError(f"--fault {text!r}: unknown action {key!r} "
                                     "(an errno, short=N, enospc-after=N or reset-after=N)")
            if names is not None:
                for pattern in calls:
                    if not any(fnmatch.fnmatchcase(name, pattern) for name in TRANSFERS):
                        raise FaultSpecError(f"--fault {text!r}: {key} applies to transfers "
                                             f"({', '.join(TRANSFERS)}), not {pattern!r}")
        else:
            fields.update(action="errno", errno=_errno(text, action_text))
        for condition in parts[2:]:
            key, separator, value = condition.partition("=")
            key = key.strip()
            if not separator or key not in _CONDITIONS:
                raise FaultSpecError(f"--fault {text!r}: unknown condition {condition!r} "
                                     f"(one of {', '.join(k + '=' for k in _CONDITIONS)})")
            if key in fields:
                raise FaultSpecError(f"--fault {text!r}: {key}= given twice")
            if key == "path":
                fields["path"] = value
            elif key == "probability":
                try:
                    probability = float(value)
                except ValueError:
                    probability = -1.0
                if not 0.0 <= probability <= 1.0:
                    raise FaultSpecError(f"--fault {text!r}: probability must be between 0 and 1")
                fields["probability"] = probability
            else:
                number = _whole(text, key, value)
                if key in ("nth", "every") and number < 1:
                    raise FaultSpecError(f"--fault {text!r}: {key} counts from 1")
                fields[key] = number
        if names is not None:
            _check_filters(text, calls, names, fields)
        return cls(**fields)  # type: ignore[arg-type]

    def names(self, name: str) -> bool:
        """Whether this spec applies to the preview1 function `name`."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.calls)


def _takes_fd(name: str) -> bool:
    """Whether the preview1 function `name` has an fd argument for `fd=N` to compare."""
    return name.startswith(("fd_", "sock_", "path_"))


def _names_path(name: str) -> bool:
    """Whether a call of `name` is about a guest path `path=GLOB` can match (its own argument, or
    the path its fd was opened with: sockets are not opened with a path)."""
    return name in _PATH_ARGUMENTS or name.startswith("fd_")


def _check_filters(text: str, calls: tuple[str, ...], names: frozenset[str],
                   fields: Mapping[str, object]) -> None:
    """Refuse fd= or path= on calls that can never meet it: the spec would silently never fire."""
    for key, able, lacking in (("fd", _takes_fd, "takes no fd"), ("path", _names_path, "names no path")):
        if fields.get(key) is None:
            continue
        for pattern in calls:
            matched = [name for name in names if fnmatch.fnmatchcase(name, pattern) and name != _NEVER_FAULTED]
            if matched and not any(able(name) for name in matched):
                raise FaultSpecError(f"--fault {text!r}: {key}= never matches {pattern}: it {lacking}")


def _whole(text: str, key: str, value: str) -> int:
    try:  # decimal (leading zeros allowed: int(value, 0) reads them as bad octal) or 0x hex
        number = int(value, 16) if value.strip().lower().startswith("0x") else int(value, 10)
    except ValueError:
        raise FaultSpecError(f"--fault {text!r}: {key}= needs a whole number, not {value!r}") from None
    if number < 0:
        raise FaultSpecError(f"--fault {text!r}: {key}= must not be negative")
    return number


def _errno(text: str, name: str) -> int:
    errno = errno_from_name(name.strip())
    if errno is not None and errno > 0:  # SUCCESS is not a fault, TRAP is not an errno
        return errno
    raise FaultSpecError(f"--fault {text!r}: {name!r} is not a WASI errno name (EIO, ENOSPC, ...)")


class _SpecState:
    """The run-time counters of one spec in one run (a FaultSpec is immutable and may serve
    several runs, even at once)."""

    def __init__(self, spec: FaultSpec) -> None:
        self.spec = spec
        self.tally = FaultTally()  # tally.matched counts the calls that met the conditions
        self.moved = 0
        self.random = random.Random(spec.seed)

    def due(self) -> bool:
        """Count one matching call; whether the when-conditions pick it."""
        spec = self.spec
        self.tally.matched += 1
        matched = self.tally.matched
        if spec.nth is not None and matched != spec.nth:
            return False
        if spec.every is not None and matched % spec.every:
            return False
        return spec.probability is None or self.random.random() < spec.probability


class FaultInjector:
    """Applies a list of FaultSpecs to the calls of one run."""

    def __init__(self, specs: tuple[FaultSpec, ...]) -> None:
        self._states = [_SpecState(spec) for spec in specs]
        self._fd_paths: dict[int, str] = {}

    def tallies(self) -> list[tuple[FaultSpec, FaultTally]]:
        """How each spec fared in this injector's run so far, in the order given."""
        return [(state.spec, FaultTally(state.tally.matched, state.tally.effective)) for state in self._states]

    def wrap(self, functions: Mapping[str, HostFunction]) -> Mapping[str, HostFunction]:
        """A copy of `functions` in which the calls some spec names misbehave as told (and the
        calls that name fds are tracked, so path= can narrow fd calls)."""
        wrapped: dict[str, HostFunction] = {}
        for name, function in functions.items():
            states = [state for state in self._states if state.spec.names(name) and name != _NEVER_FAULTED]
            impl = function.impl
            if states:
                impl = self._faulty(name, impl, states)
            if name in ("path_open", "fd_close", "fd_renumber"):
                impl = self._tracking(name, impl)
            wrapped[name] = replace_impl(function, impl) if impl is not function.impl else function
        return MappingProxyType(wrapped)

    # --- which path a call is about ------------------------------------------------------------

    def _directory_path(self, guest: object, fd: int) -> str:
        known = self._fd_paths.get(fd)
        if known is not None:
            return known
        entries = getattr(getattr(guest, "fds", None), "entries", {})
        entry = entries.get(fd)
        if isinstance(entry, OpenDirectory) and entry.preopen_name is not None:
            return entry.preopen_name.decode("utf-8", "surrogateescape")
        return ""

    def _call_path(self, name: str, guest: object, memory: Memory, arguments: tuple[int, ...],
                   place: tuple[int, int] | None = None) -> str | None:
        """The guest path a call is about: its (first) path argument joined to its directory, or
        the path its fd was opened with. `place` picks another (fd, path) argument pair."""
        place = place or _PATH_ARGUMENTS.get(name)
        if place is not None:
            fd_index, path_index = place
            relative = _string(memory, arguments[path_index], arguments[path_index + 1])
            if relative is None:
                return None
            return posixpath.join(self._directory_path(guest, arguments[fd_index]), relative)
        if name.startswith(("fd_", "sock_")) and arguments:
            return self._fd_paths.get(arguments[0])
        return None

    def _call_paths(self, name: str, guest: object, memory: Memory, arguments: tuple[int, ...]) -> list[str]:
        """Every guest path a call names: both ends of a rename or a link."""
        paths = [self._call_path(name, guest, memory, arguments)]
        second = _SECOND_PATH_ARGUMENTS.get(name)
        if second is not None:
            paths.append(self._call_path(name, guest, memory, arguments, second))
        return [path for path in paths if path is not None]

    def _tracking(self, name: str, impl: Callable[..., int]) -> Callable[..., int]:
        paths = self._fd_paths

        def tracked(guest: object, memory: Memory, *arguments: int) -> int:
            opened = self._call_path(name, guest, memory, arguments) if name == "path_open" else None
            errno = impl(guest, memory, *arguments)
            if errno == 0:
                if name == "path_open" and opened is not None:
                    fd = _load_u32(memory, arguments[8])
                    if fd is not None:
                        paths[fd] = posixpath.normpath(opened)
                elif name == "fd_close":
                    paths.pop(arguments[0], None)
                elif name == "fd_renumber":
                    moved = paths.pop(arguments[0], None)
                    paths.pop(arguments[1], None)
                    if moved is not None:
                        paths[arguments[1]] = moved
            return errno

        return tracked

    # --- the faults ----------------------------------------------------------------------------

    def _faulty(self, name: str, impl: Callable[..., int], states: list[_SpecState]) -> Callable[..., int]:
        fd_index = _PATH_ARGUMENTS.get(name, (0, 0))[0]
        has_fd = _takes_fd(name)
        transfer = TRANSFERS.get(name)

        def faulty(guest: object, memory: Memory, *arguments: int) -> int:
            paths: list[str] | None = None
            limit: int | None = None
            limit_state: list[_SpecState] = []
            short_state: list[_SpecState] = []
            for state in states:
                spec = state.spec
                if spec.fd is not None and not (has_fd and arguments and arguments[fd_index] == spec.fd):
                    continue
                if spec.path is not None:
                    if paths is None:
                        paths = self._call_paths(name, guest, memory, arguments)
                    if not any(_path_matches(path, spec.path) for path in paths):
                        continue
                if spec.action == "limit":
                    if not state.due():
                        continue
                    remaining = spec.amount - state.moved
                    if remaining <= 0:
                        state.tally.effective += 1
                        raise WasiError(spec.errno)
                    limit = remaining if limit is None else min(limit, remaining)
                    limit_state.append(state)
                    continue
                if not state.due():
                    continue
                if spec.action == "errno":
                    state.tally.effective += 1
                    raise WasiError(spec.errno)
                limit = spec.amount if limit is None else min(limit, spec.amount)
                short_state.append(state)
            if transfer is None or limit is None:
                return impl(guest, memory, *arguments)
            errno, shortened = _limited(impl, guest, memory, arguments, transfer.iovs, limit)
            if shortened:  # credited to the specs whose own cap was the one applied
                for state in (*limit_state, *short_state):
                    spec = state.spec
                    if (spec.amount if spec.action == "short" else spec.amount - state.moved) == limit:
                        state.tally.effective += 1
            if errno == 0 and limit_state:
                moved = _load_u32(memory, arguments[transfer.result]) or 0
                for state in limit_state:
                    state.moved += moved
            return errno

        return faulty


def _path_matches(path: str, pattern: str) -> bool:
    """The guest path (pre-open name joined with the relative path) against the glob; a glob
    without '/' is matched against the last component too."""
    if "/" not in pattern and fnmatch.fnmatchcase(posixpath.basename(path), pattern):
        return True
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path.lstrip("/"), pattern.lstrip("/"))


def _string(memory: Memory, pointer: int, length: int) -> str | None:
    if memory is None or pointer + length > len(memory):
        return None
    return bytes(memory[pointer:pointer + length]).decode("utf-8", "surrogateescape")


def _load_u32(memory: Memory, pointer: int) -> int | None:
    try:
        value: int = U32.unpack_from(memory, pointer)[0]  # type: ignore[arg-type]
    except (struct.error, TypeError):
        return None
    return value


def _limited(impl: Callable[..., int], guest: object, memory: Memory, arguments: tuple[int, ...],
             iovs_index: int, limit: int) -> tuple[int, bool]:
    """Run a transfer with its iovec lengths lowered to `limit` bytes in total (then restored):
    the errno, and whether the limit shortened the transfer the guest asked for."""
    pointer, count = arguments[iovs_index], arguments[iovs_index + 1]
    if memory is None or count > IOV_MAX or pointer + 8 * count > len(memory):
        return impl(guest, memory, *arguments), False  # the real call reports EINVAL or EFAULT
    original = bytes(memory[pointer:pointer + 8 * count])
    remaining = limit
    shortened = False
    for index, (buf, length) in enumerate(U32_PAIR.iter_unpack(original)):
        take = min(length, remaining)
        shortened = shortened or take < length
        U32_PAIR.pack_into(memory, pointer + 8 * index, buf, take)
        remaining -= take
    try:
        return impl(guest, memory, *arguments), shortened
    finally:
        memory[pointer:pointer + 8 * count] = original
