"""Tracing of preview1 calls: one decoded event per host call, for `keep run --trace`.

Theory of operation
-------------------
`Tracer.wrap(functions)` returns a copy of a host-function table in which every implementation is
wrapped: the wrapper decodes the arguments (paths read from guest memory, flags, rights, whence
and clocks by name, fds, buffer sizes), times the call, turns its outcome into an errno exactly as
the binding would (so the event shows what the guest sees), reads the results the call stored
(bytes transferred, the fd opened, the new offset), and hands one `TraceEvent` to the sink. The
exception, if any, is re-raised unchanged, so the binding's handling is untouched.

Nothing is wrapped unless tracing is on: the runner binds the plain `FUNCTIONS` otherwise, so an
untraced run pays nothing.

Buffers are shown only as sizes. With `show_data` the bytes written (before the call) and the
bytes read (after it) are attached to the event; that is plaintext of the guest, so it is opt-in.

The `_LAYOUTS` table says how to decode each function's parameters; every preview1 name has one
(a test checks it against `FUNCTIONS`). `TRANSFERS` names the calls that move buffer contents;
the fault injector uses it as well.
"""

from __future__ import annotations

import base64
import contextlib
import json
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final, Literal, Protocol

from wasi_host._abi import (
    DIRENT,
    EVENT,
    EVENT_FD_READWRITE_HANGUP,
    FDSTAT,
    FILESTAT,
    LOOKUP_SYMLINK_FOLLOW,
    PREOPENTYPE_DIR,
    PRESTAT,
    RIFLAGS_RECV_PEEK,
    RIFLAGS_RECV_WAITALL,
    ROFLAGS_RECV_DATA_TRUNCATED,
    SDFLAGS_RD,
    SDFLAGS_WR,
    SUBSCRIPTION_CLOCK,
    SUBSCRIPTION_CLOCK_ABSTIME,
    SUBSCRIPTION_FD,
    SUBSCRIPTION_HEAD,
    SUBSCRIPTION_SIZE,
    U16,
    U32,
    U32_PAIR,
    U64,
    Clockid,
    Errno,
    Eventtype,
    Fdflags,
    Filetype,
    Fstflags,
    Oflags,
    Rights,
    Whence,
)
from wasi_host._errors import ProcExit, errno_for_exception
from wasi_host._functions import HostFunction
from wasi_host._memory import IOV_MAX, Memory, transfer_limit

TraceValue = int | str
# Subscriptions and events of one poll_oneoff shown in its line; the rest are counted.
POLL_SHOWN: Final = 16


def replace_impl(function: HostFunction, impl: Callable[..., int]) -> HostFunction:
    """`function` with another implementation (same name and signature)."""
    return replace(function, impl=impl)


@dataclass(frozen=True)
class Transfer:
    """A call that moves buffer contents: where its iovec array and its byte count live."""

    iovs: int  # index of the iovec pointer (the count follows it)
    result: int  # index of the pointer receiving the number of bytes moved
    direction: Literal["read", "write"]


TRANSFERS: Final[Mapping[str, Transfer]] = MappingProxyType({
    "fd_read": Transfer(1, 3, "read"),
    "fd_pread": Transfer(1, 4, "read"),
    "fd_write": Transfer(1, 3, "write"),
    "fd_pwrite": Transfer(1, 4, "write"),
    "sock_recv": Transfer(1, 4, "read"),
    "sock_send": Transfer(1, 4, "write"),
})

# Parameter kinds: "fd", "int", "sint" (signed 64), "ptr" (not shown), "path" (ptr + len),
# "iovs" (ptr + count, shown as the total size), "buf" (ptr + len, shown as the length),
# "out32:NAME" / "out64:NAME" (a result stored through a pointer, shown after the call),
# "path_out" (ptr + len filled by the call), a record the call stores through a pointer (the kinds
# of _RECORD_RESULTS: its fields become results, named as in the witx), the flag kinds of
# _FLAG_NAMES and the enum kinds of _ENUM_NAMES. What a layout cannot say (a buffer whose contents
# the call fills, poll_oneoff's arrays) is decoded by the function's entry in _DECODE_BEFORE /
# _DECODE_AFTER.
_LAYOUTS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType({
    "args_get": ("ptr", "ptr"),
    "args_sizes_get": ("out32:count", "out32:size"),
    "environ_get": ("ptr", "ptr"),
    "environ_sizes_get": ("out32:count", "out32:size"),
    "clock_res_get": ("clock:id", "out64:resolution"),
    "clock_time_get": ("clock:id", "int:precision", "out64:time"),
    "fd_advise": ("fd", "int:offset", "int:len", "advice:advice"),
    "fd_allocate": ("fd", "int:offset", "int:len"),
    "fd_close": ("fd",),
    "fd_datasync": ("fd",),
    "fd_fdstat_get": ("fd", "fdstat"),
    "fd_fdstat_set_flags": ("fd", "fdflags:flags"),
    "fd_fdstat_set_rights": ("fd", "rights:base", "rights:inheriting"),
    "fd_filestat_get": ("fd", "filestat"),
    "fd_filestat_set_size": ("fd", "int:size"),
    "fd_filestat_set_times": ("fd", "int:atim", "int:mtim", "fstflags:flags"),
    "fd_pread": ("fd", "iovs", "int:offset", "out32:nread"),
    "fd_prestat_get": ("fd", "prestat"),
    "fd_prestat_dir_name": ("fd", "path_out"),
    "fd_pwrite": ("fd", "iovs", "int:offset", "out32:nwritten"),
    "fd_read": ("fd", "iovs", "out32:nread"),
    "fd_readdir": ("fd", "buf", "int:cookie", "out32:used"),
    "fd_renumber": ("fd", "fd:to"),
    "fd_seek": ("fd", "sint:offset", "whence:whence", "out64:offset"),
    "fd_sync": ("fd",),
    "fd_tell": ("fd", "out64:offset"),
    "fd_write": ("fd", "iovs", "out32:nwritten"),
    "path_create_directory": ("fd", "path"),
    "path_filestat_get": ("fd", "lookup:flags", "path", "filestat"),
    "path_filestat_set_times": ("fd", "lookup:flags", "path", "int:atim", "int:mtim", "fstflags:fst_flags"),
    "path_link": ("fd:old_fd", "lookup:old_flags", "path:old_path", "fd:new_fd", "path:new_path"),
    "path_open": ("fd", "lookup:dirflags", "path", "oflags:oflags", "rights:rights_base",
                  "rights:rights_inheriting", "fdflags:fdflags", "out32:opened_fd"),
    "path_readlink": ("fd", "path", "buf", "out32:used"),
    "path_remove_directory": ("fd", "path"),
    "path_rename": ("fd", "path:old_path", "fd:new_fd", "path:new_path"),
    "path_symlink": ("path:old_path", "fd", "path:new_path"),
    "path_unlink_file": ("fd", "path"),
    "poll_oneoff": ("ptr", "ptr", "int:nsubscriptions", "out32:nevents"),
    "proc_exit": ("int:code",),
    "proc_raise": ("signal:signal",),
    "sched_yield": (),
    "random_get": ("buf",),
    "sock_accept": ("fd", "fdflags:flags", "out32:accepted_fd"),
    "sock_recv": ("fd", "iovs", "riflags:ri_flags", "out32:nread", "roflags"),
    "sock_send": ("fd", "iovs", "int:si_flags", "out32:nwritten"),
    "sock_shutdown": ("fd", "sdflags:how"),
})

_TWO_PARAMETER_KINDS = frozenset({"path", "iovs", "buf", "path_out"})


def _flag_names(owner: type, *, skip: tuple[str, ...] = ("ALL",)) -> tuple[tuple[int, str], ...]:
    return tuple((value, name) for name, value in vars(owner).items()
                 if name.isupper() and isinstance(value, int) and name not in skip
                 and value and value & (value - 1) == 0)


_FLAG_NAMES: Final[Mapping[str, tuple[tuple[int, str], ...]]] = MappingProxyType({
    "oflags": _flag_names(Oflags),
    "fdflags": _flag_names(Fdflags),
    "fstflags": _flag_names(Fstflags),
    "rights": _flag_names(Rights),
    "lookup": ((LOOKUP_SYMLINK_FOLLOW, "SYMLINK_FOLLOW"),),
    "riflags": ((RIFLAGS_RECV_PEEK, "RECV_PEEK"), (RIFLAGS_RECV_WAITALL, "RECV_WAITALL")),
    "roflags": ((ROFLAGS_RECV_DATA_TRUNCATED, "RECV_DATA_TRUNCATED"),),
    "sdflags": ((SDFLAGS_RD, "RD"), (SDFLAGS_WR, "WR")),
    "subclockflags": ((SUBSCRIPTION_CLOCK_ABSTIME, "ABSTIME"),),
    "eventrwflags": ((EVENT_FD_READWRITE_HANGUP, "HANGUP"),),
})


def _enum_names(owner: type) -> Mapping[int, str]:
    return MappingProxyType({value: name for name, value in vars(owner).items()
                             if name.isupper() and isinstance(value, int)})


def _witx_order(*names: str) -> Mapping[int, str]:
    """An enum whose cases are numbered in the witx's order (a test checks them against it)."""
    return MappingProxyType(dict(enumerate(names)))



_ENUM_NAMES: Final[Mapping[str, Mapping[int, str]]] = MappingProxyType({
    "whence": _enum_names(Whence),
    "clock": _enum_names(Clockid),
    "filetype": _enum_names(Filetype),
    "eventtype": _enum_names(Eventtype),
    "preopentype": {PREOPENTYPE_DIR: "DIR"},
    "advice": _witx_order("NORMAL", "SEQUENTIAL", "RANDOM", "WILLNEED", "DONTNEED", "NOREUSE"),
    "signal": _witx_order("NONE", "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL",
                          "USR1", "SEGV", "USR2", "PIPE", "ALRM", "TERM", "CHLD", "CONT", "STOP",
                          "TSTP", "TTIN", "TTOU", "URG", "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH",
                          "POLL", "PWR", "SYS"),
})


def enum_text(kind: str, value: int) -> str:
    """The name of `value` in the enum `kind` (ADVICE's SEQUENTIAL...), or the number when the
    witx names no such case (the call then fails with EINVAL: the line shows what was passed)."""
    return _ENUM_NAMES[kind].get(value, str(value))


def flags_text(kind: str, value: int) -> str:
    """`value` as NAME|NAME (unknown bits in hex), or 0."""
    if kind == "rights" and value & Rights.ALL == Rights.ALL:
        return "ALL"
    if kind == "rights" and (value & Rights.ALL).bit_count() > 15:  # most rights: name the missing
        return f"ALL&~({flags_text(kind, Rights.ALL & ~value)})"
    names = []
    rest = value
    for bit, name in _FLAG_NAMES[kind]:
        if value & bit:
            names.append(name)
            rest &= ~bit
    if rest:
        names.append(hex(rest))
    return "|".join(names) or "0"


# An event's errno when the call did not return but ended the guest with a trap (an interrupt
# from --timeout while it waited, or a host error): no errno reached the guest.
TRAPPED: Final = -1
# The witx spells errno 1 `2big`, POSIX E2BIG; the Python enum needs an identifier (TOOBIG).
_ERRNO_NAMES: Final[Mapping[int, str]] = MappingProxyType(
    {TRAPPED: "TRAP", **{int(value): "SUCCESS" if value == 0 else "E2BIG" if value == Errno.TOOBIG
                          else "E" + value.name for value in Errno}})
_ERRNO_VALUES: Final[Mapping[str, int]] = MappingProxyType(
    {**{name: value for value, name in _ERRNO_NAMES.items()},
     **{name[1:]: value for value, name in _ERRNO_NAMES.items() if value > 0},
     "ETOOBIG": Errno.TOOBIG, "TOOBIG": Errno.TOOBIG})


def errno_name(errno: int) -> str:
    """E-prefixed name of a WASI errno (`SUCCESS` for 0, E2BIG for the witx's `2big`, TRAP for
    TRAPPED)."""
    return _ERRNO_NAMES.get(errno) or str(errno)


def errno_from_name(name: str) -> int | None:
    """The WASI errno called `name` in any case, with or without the E (EIO, io, E2BIG, 2big,
    SUCCESS), or None."""
    return _ERRNO_VALUES.get(name.upper())


def _c_string(data: bytes, limit: int) -> str:
    """A C-like quoted, escaped rendering of `data` (at most `limit` bytes, then `...`)."""
    shown = data[:limit]
    text = "".join(chr(byte) if 32 <= byte < 127 and byte not in (0x22, 0x5C) else
                   {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x22: '\\"', 0x5C: "\\\\"}.get(byte, f"\\x{byte:02x}")
                   for byte in shown)
    return '"' + text + '"' + ("..." if len(data) > limit else "")


@dataclass(frozen=True)
class TraceEvent:
    """One host call: decoded arguments, the errno the guest saw, results, duration.

    `args` and `results` keep the order of the parameters. `data` is set only when the tracer
    shows buffer contents (the bytes written, or read). `exit_code` is set for proc_exit.
    `errno` is TRAPPED (shown as TRAP) for a call that ended the guest with a trap."""

    seq: int
    function: str
    args: Mapping[str, TraceValue]
    errno: int
    results: Mapping[str, TraceValue] = field(default_factory=dict)
    duration_us: float = 0.0
    data: bytes | None = None
    exit_code: int | None = None

    @property
    def errno_name(self) -> str:
        return errno_name(self.errno)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (data base64-encoded); `from_json` reverses it.

        A guest path need not be UTF-8; decoded with surrogateescape, its bad bytes would be
        written as lone surrogate escapes, which strict JSON readers reject and others replace.
        Such an argument is shown as valid text (U+FFFD for each bad byte) and its exact bytes go,
        base64-encoded, in `raw` under the argument's name."""
        args: dict[str, TraceValue] = {}
        raw: dict[str, str] = {}
        for key, value in self.args.items():
            if isinstance(value, str) and not value.isascii():
                encoded = value.encode("utf-8", "surrogateescape")
                shown = encoded.decode("utf-8", "replace")
                if shown != value:
                    value = shown
                    raw[key] = base64.b64encode(encoded).decode()
            args[key] = value
        record: dict[str, Any] = {"seq": self.seq, "call": self.function, "args": args,
                                  "errno": self.errno_name, "results": dict(self.results),
                                  "us": round(self.duration_us, 1)}
        if raw:
            record["raw"] = raw
        if self.data is not None:
            record["data"] = base64.b64encode(self.data).decode()
        if self.exit_code is not None:
            record["exit_code"] = self.exit_code
        return record

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> TraceEvent:
        name = str(record["errno"])
        known = errno_from_name(name)
        errno = known if known is not None else int(name)
        data = record.get("data")
        args = dict(record["args"])
        for key, encoded in dict(record.get("raw") or {}).items():
            args[key] = base64.b64decode(encoded).decode("utf-8", "surrogateescape")
        return cls(int(record["seq"]), str(record["call"]), args, errno,
                   {key: value if isinstance(value, str) else int(value)
                    for key, value in dict(record["results"]).items()},
                   float(record["us"]), base64.b64decode(data) if data is not None else None,
                   record.get("exit_code"))

    def format(self, data_limit: int = 256) -> str:
        """The strace-like line: `name(arg=value, ...) = ERRNO result=value <N us>`."""
        shown = []
        for key, value in self.args.items():
            shown.append(f"{key}={_c_string(value.encode('utf-8', 'surrogateescape'), 4096)}"
                         if isinstance(value, str) and _is_path(key) else f"{key}={value}")
        if self.data is not None:
            shown.append(f"data={_c_string(self.data, data_limit)}")
        outcome = f"exit {self.exit_code}" if self.exit_code is not None else self.errno_name
        results = "".join(f" {key}={value}" for key, value in self.results.items())
        return f"{self.function}({', '.join(shown)}) = {outcome}{results} <{self.duration_us:.1f} us>"


def _is_path(key: str) -> bool:
    """Whether an argument is a guest path (shown quoted and escaped): `path`, `old_path`... and
    path_readlink's `target`."""
    return key.endswith("path") or key == "target"


TraceSink = Callable[[TraceEvent], None]


class Tracer:
    """Wraps host functions so that each call produces one TraceEvent for `sink`.

    One Tracer per run (it numbers the events). `show_data` attaches buffer contents.

    A sink that fails (a full disk under the trace file, a closed pipe) must not change what the
    guest sees: its exception would otherwise leave the host function in place of the call's own
    outcome, failing a call that succeeded and even making proc_exit return. The first failure is
    kept in `failure` (with `failed_at`, the number of the first event lost), tracing stops, and
    the run goes on; the owner of the sink reports it."""

    def __init__(self, sink: TraceSink, *, show_data: bool = False) -> None:
        self.sink = sink
        self.show_data = show_data
        self._seq = 0
        self.failure: Exception | None = None
        self.failed_at = 0

    def _emit(self, event: TraceEvent) -> None:
        """Hand `event` to the sink, unless an earlier event failed; never raises."""
        if self.failure is not None:
            return
        try:
            self.sink(event)
        except Exception as error:  # whatever the sink raises, the guest's call is unaffected
            self.failure, self.failed_at = error, event.seq

    def wrap(self, functions: Mapping[str, HostFunction]) -> Mapping[str, HostFunction]:
        """A copy of `functions` whose implementations report every call."""
        return MappingProxyType({name: replace_impl(function, self._traced(name, function.impl))
                                 for name, function in functions.items()})

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _traced(self, name: str, impl: Callable[..., int]) -> Callable[..., int]:
        layout = _compile_layout(_LAYOUTS.get(name, ()))
        decode_before = _DECODE_BEFORE.get(name)
        decode_after = _DECODE_AFTER.get(name)
        transfer = TRANSFERS.get(name)
        show_data = self.show_data
        sink = self._emit
        clock = time.perf_counter_ns

        def traced(guest: object, memory: Memory, *arguments: int) -> int:
            if self.failure is not None:  # the sink failed: tracing stopped, the call costs nothing more
                return impl(guest, memory, *arguments)
            decoded, outputs = _decode(layout, memory, arguments)
            if decode_before is not None:  # the arrays it reads are the first parameters: shown first
                decoded = {**decode_before(memory, arguments), **decoded}
            # at most what the call can move: overlapping iovecs may add up to far more than memory
            written = (_iovec_bytes(memory, arguments[transfer.iovs], arguments[transfer.iovs + 1],
                                    transfer_limit(memory))
                       if show_data and transfer is not None and transfer.direction == "write" else None)
            start = clock()
            try:
                errno = impl(guest, memory, *arguments)
            except ProcExit as exit_request:
                sink(TraceEvent(self._next_seq(), name, decoded, 0, {}, (clock() - start) / 1000,
                                None, exit_request.code))
                raise
            except Exception as error:
                mapped = errno_for_exception(error)
                sink(TraceEvent(self._next_seq(), name, decoded, TRAPPED if mapped is None else mapped, {},
                                (clock() - start) / 1000))
                raise
            elapsed = (clock() - start) / 1000
            results: dict[str, TraceValue] = {}
            data = written
            if errno == 0:
                _read_outputs(outputs, memory, arguments, decoded, results)
                if decode_after is not None:
                    decode_after(memory, arguments, decoded, results)
                if show_data and transfer is not None and transfer.direction == "read":
                    count = _load(U32, memory, arguments[transfer.result])
                    data = _iovec_bytes(memory, arguments[transfer.iovs], arguments[transfer.iovs + 1], count)
                elif data is not None and transfer is not None:
                    data = data[:_load(U32, memory, arguments[transfer.result]) or 0]
            else:
                data = None
            sink(TraceEvent(self._next_seq(), name, decoded, errno, results, elapsed, data))
            return errno

        return traced


_Output = tuple[str, str, int]  # (kind, name, parameter index)


_Step = tuple[str, str, int]  # (kind, shown name, parameter index)


def _compile_layout(layout: tuple[str, ...]) -> tuple[_Step, ...]:
    """A layout as (kind, name, parameter index) steps, worked out once per function."""
    steps = []
    index = 0
    for item in layout:
        kind, _, name = item.partition(":")
        if kind in ("iovs", "buf"):
            name = "size"
        elif kind == "path_out":
            name = "path"
        steps.append((kind, name or kind, index))
        index += 2 if kind in _TWO_PARAMETER_KINDS else 1
    return tuple(steps)


def _decode(steps: tuple[_Step, ...], memory: Memory,
            arguments: tuple[int, ...]) -> tuple[dict[str, TraceValue], list[_Output]]:
    decoded: dict[str, TraceValue] = {}
    outputs: list[_Output] = []
    for kind, name, index in steps:
        value = arguments[index]
        if kind == "fd" or kind == "int":
            decoded[name] = value
        elif kind == "iovs":
            decoded[name] = _iovec_size(memory, value, arguments[index + 1])
        elif kind == "out32" or kind == "out64" or kind == "path_out" or kind in _RECORD_RESULTS:
            outputs.append((kind, name, index))
        elif kind == "path":
            decoded[name] = _path(memory, value, arguments[index + 1])
        elif kind == "sint":
            decoded[name] = value - (1 << 64) if value >= 1 << 63 else value
        elif kind == "buf":
            decoded[name] = arguments[index + 1]
        elif kind in _FLAG_NAMES:
            decoded[name] = flags_text(kind, value)
        elif kind in _ENUM_NAMES:
            decoded[name] = enum_text(kind, value)
    return decoded, outputs


def _read_outputs(outputs: list[_Output], memory: Memory, arguments: tuple[int, ...],
                  decoded: dict[str, TraceValue], results: dict[str, TraceValue]) -> None:
    for kind, name, index in outputs:
        if kind == "path_out":
            decoded[name] = _path(memory, arguments[index], arguments[index + 1])
            continue
        if kind in _RECORD_RESULTS:
            with contextlib.suppress(struct.error, TypeError):  # stored by the call: it fits
                results.update(_RECORD_RESULTS[kind](memory, arguments[index]))
            continue
        value = _load(U32 if kind == "out32" else U64, memory, arguments[index])
        if value is not None:
            results[name] = value


def _fdstat(memory: Memory, pointer: int) -> dict[str, TraceValue]:
    filetype, flags, base, inheriting = FDSTAT.unpack_from(memory, pointer)  # type: ignore[arg-type]
    return {"fs_filetype": enum_text("filetype", filetype), "fs_flags": flags_text("fdflags", flags),
            "fs_rights_base": flags_text("rights", base),
            "fs_rights_inheriting": flags_text("rights", inheriting)}


def _filestat(memory: Memory, pointer: int) -> dict[str, TraceValue]:
    dev, ino, filetype, nlink, size, atim, mtim, ctim = FILESTAT.unpack_from(memory, pointer)  # type: ignore[arg-type]
    return {"dev": dev, "ino": ino, "filetype": enum_text("filetype", filetype), "nlink": nlink,
            "size": size, "atim": atim, "mtim": mtim, "ctim": ctim}


def _prestat(memory: Memory, pointer: int) -> dict[str, TraceValue]:
    tag, name_len = PRESTAT.unpack_from(memory, pointer)  # type: ignore[arg-type]
    return {"type": enum_text("preopentype", tag), "pr_name_len": name_len}


def _roflags(memory: Memory, pointer: int) -> dict[str, TraceValue]:
    (flags,) = U16.unpack_from(memory, pointer)  # type: ignore[arg-type]
    return {"ro_flags": flags_text("roflags", flags)}


# The records a call stores through a pointer, by layout kind: their fields become the event's
# results, named as in the witx (prestat's union tag as `type`), enums and flags by name.
_RECORD_RESULTS: Final[Mapping[str, Callable[[Memory, int], dict[str, TraceValue]]]] = MappingProxyType({
    "fdstat": _fdstat, "filestat": _filestat, "prestat": _prestat, "roflags": _roflags,
})


def _listed(items: list[str], total: int) -> str:
    """`[a, b, ...]`, with `+N more` when only the first POLL_SHOWN of `total` are listed."""
    more = f", +{total - len(items)} more" if total > len(items) else ""
    return "[" + ", ".join(items) + more + "]"


def _subscriptions(memory: Memory, arguments: tuple[int, ...]) -> dict[str, TraceValue]:
    """poll_oneoff's subscriptions, read before the call: what the guest waits for."""
    pointer, count = arguments[0], arguments[2]
    shown = min(count, POLL_SHOWN)
    if memory is None or pointer + SUBSCRIPTION_SIZE * shown > len(memory):
        return {"subscriptions": "<bad pointer>"}
    items = []
    for index in range(shown):
        base = pointer + index * SUBSCRIPTION_SIZE
        userdata, tag = SUBSCRIPTION_HEAD.unpack_from(memory, base)
        kind = enum_text("eventtype", tag)
        if tag == Eventtype.CLOCK:
            clock, timeout, precision, flags = SUBSCRIPTION_CLOCK.unpack_from(memory, base + 16)
            items.append(f"CLOCK({enum_text('clock', clock)}, timeout={timeout}, precision={precision}, "
                         f"flags={flags_text('subclockflags', flags)}, userdata={userdata})")
        elif tag in (Eventtype.FD_READ, Eventtype.FD_WRITE):
            (fd,) = SUBSCRIPTION_FD.unpack_from(memory, base + 16)
            items.append(f"{kind}(fd={fd}, userdata={userdata})")
        else:
            items.append(f"{kind}(userdata={userdata})")
    return {"subscriptions": _listed(items, count)}


def _events(memory: Memory, arguments: tuple[int, ...], decoded: dict[str, TraceValue],
            results: dict[str, TraceValue]) -> None:
    """poll_oneoff's events, read after the call: what woke the guest (matched to the
    subscriptions by userdata)."""
    pointer, count = arguments[1], results.get("nevents")
    if not isinstance(count, int) or memory is None or pointer + EVENT.size * min(count, POLL_SHOWN) > len(memory):
        return
    items = []
    for index in range(min(count, POLL_SHOWN)):
        userdata, error, tag, nbytes, flags = EVENT.unpack_from(memory, pointer + index * EVENT.size)
        detail = "" if tag == Eventtype.CLOCK else f", nbytes={nbytes}, flags={flags_text('eventrwflags', flags)}"
        items.append(f"{enum_text('eventtype', tag)}(userdata={userdata}, error={errno_name(error)}{detail})")
    results["events"] = _listed(items, count)


def _readlink_target(memory: Memory, arguments: tuple[int, ...], decoded: dict[str, TraceValue],
                     results: dict[str, TraceValue]) -> None:
    """path_readlink's answer: the link's contents, shown as a path (`target`)."""
    used = results.get("used")
    if isinstance(used, int):
        decoded["target"] = _path(memory, arguments[3], used)


def _readdir_entries(memory: Memory, arguments: tuple[int, ...], decoded: dict[str, TraceValue],
                     results: dict[str, TraceValue]) -> None:
    """fd_readdir's answer as a count of whole entries (`entries`): a count short of a full buffer
    is the end of the directory, a cut last entry the sign of a buffer too small."""
    used = results.get("used")
    if not isinstance(used, int) or memory is None or arguments[1] + used > len(memory):
        return
    offset, entries = 0, 0
    while offset + DIRENT.size <= used:
        name_length = DIRENT.unpack_from(memory, arguments[1] + offset)[2]
        offset += DIRENT.size + name_length
        if offset > used:
            break
        entries += 1
    results["entries"] = entries


_DecodeBefore = Callable[[Memory, tuple[int, ...]], dict[str, TraceValue]]
_DecodeAfter = Callable[[Memory, tuple[int, ...], dict[str, TraceValue], dict[str, TraceValue]], None]
_DECODE_BEFORE: Final[Mapping[str, _DecodeBefore]] = MappingProxyType({"poll_oneoff": _subscriptions})
_DECODE_AFTER: Final[Mapping[str, _DecodeAfter]] = MappingProxyType({
    "poll_oneoff": _events, "path_readlink": _readlink_target, "fd_readdir": _readdir_entries,
})


def _load(layout: struct.Struct, memory: Memory, pointer: int) -> int | None:
    try:
        value: int = layout.unpack_from(memory, pointer)[0]  # type: ignore[arg-type]
    except (struct.error, TypeError):
        return None
    return value


def _path(memory: Memory, pointer: int, length: int) -> str:
    if memory is None or pointer + length > len(memory):
        return "<bad pointer>"
    return bytes(memory[pointer:pointer + length]).decode("utf-8", "surrogateescape")


def _iovecs(memory: Memory, pointer: int, count: int) -> list[tuple[int, int]] | None:
    if memory is None or count > IOV_MAX or pointer + 8 * count > len(memory):  # the call refuses them
        return None
    return [(buf, length) for buf, length in U32_PAIR.iter_unpack(memory[pointer:pointer + 8 * count])]


def _iovec_size(memory: Memory, pointer: int, count: int) -> int:
    vectors = _iovecs(memory, pointer, count)
    return -1 if vectors is None else sum(length for _, length in vectors)


def _iovec_bytes(memory: Memory, pointer: int, count: int, limit: int | None) -> bytes | None:
    """The contents of an iovec array (the first `limit` bytes), or None for a bad pointer."""
    vectors = _iovecs(memory, pointer, count)
    if vectors is None or memory is None:
        return None
    chunks = []
    remaining = limit if limit is not None else sum(length for _, length in vectors)
    for buf, length in vectors:
        take = min(length, remaining)
        if buf + take > len(memory):
            return None
        chunks.append(bytes(memory[buf:buf + take]))
        remaining -= take
        if remaining <= 0:
            break
    return b"".join(chunks)


class TextOutput(Protocol):
    """Where a writer puts its lines: a text stream, or anything with write and flush."""

    def write(self, text: str, /) -> int: ...

    def flush(self) -> None: ...


def text_writer(stream: TextOutput, *, flush: bool = True) -> TraceSink:
    """A sink printing one strace-like line per event. `flush` after each line keeps the order
    with other writers of the same stream (the guest's stderr), and keeps a trace file whole when
    a signal ends the process (shim.trace flushes its files too)."""

    def write(event: TraceEvent) -> None:
        stream.write(event.format() + "\n")
        if flush:
            stream.flush()

    return write


def jsonl_writer(stream: TextOutput, *, flush: bool = True) -> TraceSink:
    """A sink printing one JSON object per line (`TraceEvent.from_json` reads them back)."""

    def write(event: TraceEvent) -> None:
        stream.write(json.dumps(event.to_json(), separators=(",", ":")) + "\n")
        if flush:
            stream.flush()

    return write
