"""`keep run --trace[=FILE]`: where the trace goes and in which format.

The tracing itself is `wasi_host._trace` (pure Python: a wrapper around each host function that
is installed only when tracing is on). This module opens the destination (stderr by default, or
FILE, created with mode 0600 since paths in a trace are metadata of the guest) and picks the
format: strace-like text or JSON Lines (one `TraceEvent.to_json` object per call: strict JSON even
for a path that is not UTF-8, whose exact bytes are then in `raw`). Each event is flushed as it
is written, so the calls made before a run was killed or interrupted are in the file. A trace that
cannot be written (a full disk, a closed pipe) stops with a warning; the run goes on untraced.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Final, TextIO

from shim.errors import UsageError, say
from wasi_host._trace import TextOutput, TraceEvent, Tracer, jsonl_writer, text_writer

if TYPE_CHECKING:
    from shim.audit import WireRecorder

__all__ = ["STDERR", "TraceEvent", "Tracer", "open_tracer", "read_jsonl_trace", "same_file"]

STDERR = "-"
FORMATS = ("text", "jsonl")


STDERR_PLACE = "the trace on stderr"


class _Audited:
    """stderr (or a pipe, a terminal, a FIFO named by --trace=FILE), with every line also handed
    to `keep run --audit-host`'s recorder under `place`: no file keeps what the host read there,
    so the audit searches it as it is written."""

    def __init__(self, stream: TextIO, audit: WireRecorder, place: str = STDERR_PLACE) -> None:
        self._stream = stream
        self._audit = audit
        self._place = place
        audit.record_output(place, b"")  # searched (and named in the report) from the start

    def write(self, text: str, /) -> int:
        self._audit.record_output(self._place, text.encode("utf-8", "backslashreplace"))
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()


@contextmanager
def open_tracer(target: str, trace_format: str = "text", *, show_data: bool = False,
                audit: WireRecorder | None = None,
                inputs: Sequence[tuple[str, str]] = ()) -> Iterator[Tracer]:
    """A Tracer writing to `target` (`-` for stderr) in `trace_format`, closed on exit. With
    `audit` (--audit-host), a trace on stderr, a pipe or a terminal is searched as it is written
    (a regular trace file is searched after the run). `inputs` are the (option, path) pairs of the files the run reads
    (a key file, a state file...): a target that is one of them is refused, not emptied."""
    if trace_format not in FORMATS:
        raise UsageError(f"--trace-format {trace_format!r}: expected one of {', '.join(FORMATS)}")
    stream: TextIO
    searched_after = False  # a regular file, which the audit reads after the run
    if target == STDERR:
        stream, owned = sys.stderr, False
    else:
        descriptor = _open_for_writing(target, inputs)
        searched_after = stat.S_ISREG(os.fstat(descriptor).st_mode)
        stream, owned = os.fdopen(descriptor, "w", encoding="utf-8", errors="backslashreplace"), True
    # Every line is flushed as it is written, to a file as to stderr: a trace is read when a run
    # went wrong, and such a run often ends by a signal (SIGINT, SIGTERM, SIGKILL from a
    # supervisor) or a crash, which would drop a block buffer and with it the calls that led
    # there. The price is one write(2) per call: 1-2 us of CPU per event (0.15 -> 1.1 us to
    # /dev/null, 0.19 -> 2.0 us to a file), against 15-25 us for a traced host call; untraced runs
    # are not affected.
    writer = jsonl_writer if trace_format == "jsonl" else text_writer
    output: TextOutput = stream
    if audit is not None and not searched_after:  # what the host read there is kept nowhere else
        output = _Audited(stream, audit, STDERR_PLACE if target == STDERR else f"the trace on {target}")
    tracer = Tracer(writer(output, flush=True), show_data=show_data)
    try:
        yield tracer
    finally:
        closing_error: OSError | None = None
        if owned:
            try:
                stream.close()
            except OSError as error:  # the last buffered line could not be written either
                closing_error = error
        if tracer.failure is not None:
            _warn_incomplete(target, tracer.failure, tracer.failed_at)
        elif closing_error is not None:
            _warn_incomplete(target, closing_error, None)


# The first bytes of files a mistyped --trace=FILE must not destroy (a volume image's loss is
# every file in it): a LUKS2 header, a WebAssembly module.
_PRECIOUS: Final = ((b"LUKS\xba\xbe", "a LUKS2 volume image"), (b"\0asm", "a WebAssembly module"))


def same_file(one: str | os.PathLike[str], other: str | os.PathLike[str]) -> bool:
    """Whether two paths name the same file, however spelled (same device and inode); when
    either is missing (or unreadable), whether they resolve to the same path."""
    try:
        return os.path.samefile(one, other)
    except OSError:
        return os.path.realpath(one) == os.path.realpath(other)


def _open_for_writing(target: str, inputs: Sequence[tuple[str, str]] = ()) -> int:
    """`target` opened for writing (created 0600, emptied if it is a regular file), or a
    UsageError; an existing volume image or module, or one of the run's `inputs` ((option, path)
    pairs, however the target spells the same file), is refused, not truncated."""
    for option, path in inputs:  # before opening: O_CREAT would leave an empty file at a path not there yet
        if same_file(target, path):
            raise UsageError(f"--trace={target}: refusing to overwrite the file of {option} "
                             "(give the trace a file name of its own)")
    try:
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise UsageError(f"--trace={target}: {error.strerror}") from None
    try:
        opened = os.fstat(descriptor)
        standard = _standard_stream(opened, target)
        if standard is not None:  # /dev/stderr, /proc/self/fd/1...: that stream, not a new file on it
            os.close(descriptor)
            return standard
        if stat.S_ISREG(opened.st_mode):
            with contextlib.suppress(OSError), open(target, "rb") as existing:
                head = existing.read(8)
                for magic, kind in _PRECIOUS:
                    if head.startswith(magic):
                        raise UsageError(f"--trace={target}: refusing to overwrite {kind} (give the trace "
                                         "a file name of its own)")
            os.ftruncate(descriptor, 0)
    except OSError as error:
        os.close(descriptor)
        raise UsageError(f"--trace={target}: {error.strerror}") from None
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def _standard_stream(opened: os.stat_result, target: str) -> int | None:
    """A duplicate of keep's stdout or stderr when the trace target is the same file, so that the
    trace shares its offset and append mode: opened afresh (`--trace=/dev/stderr 2>>log`), it was
    emptied, and the trace and the guest's output overwrote each other. A regular file that is
    keep's stdin (the guest's input) is a UsageError, as the run's other inputs."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            stream = os.fstat(fd)
        except OSError:
            continue
        if not os.path.samestat(opened, stream):
            continue
        if fd == 0:
            if stat.S_ISREG(stream.st_mode):
                raise UsageError(f"--trace={target}: refusing to overwrite the file of {name} (give the "
                                 "trace a file name of its own)")
            continue  # a terminal or pipe that is stdin as well: writing to it harms no input
        return os.dup(fd)
    return None


def _warn_incomplete(target: str, failure: Exception, failed_at: int | None) -> None:
    """Say on stderr that the trace lacks calls (a failed trace write never fails the run: the
    guest's calls went on untraced, and its exit status is the run's)."""
    reason = failure.strerror if isinstance(failure, OSError) and failure.strerror else str(failure)
    where = f"it stops before call {failed_at}" if failed_at is not None else "its end was not written"
    name = "--trace" if target == STDERR else f"--trace={target}"
    say(f"warning: {name}: {reason}; the trace is incomplete ({where}, the run went on untraced)")


def read_jsonl_trace(text: str) -> list[TraceEvent]:
    """The events of a `--trace-format jsonl` trace (lines that are not JSON objects are skipped:
    with the default --trace=- the trace shares stderr with the guest)."""
    import json

    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                events.append(TraceEvent.from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError):
                continue
    return events
