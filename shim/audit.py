"""`keep run --audit-host MARKER`: after a run, find every place outside the keep holding MARKER.

Theory of operation
-------------------
The keep promises that what a guest stores or sends leaves it only as ciphertext. The audit
checks that promise for one run: a test (or an operator) lets the guest handle a known MARKER and
then searches everything the host can see for it, in the forms plaintext usually takes:

- the bytes as given, UTF-16LE and UTF-16BE (Windows-ish and Java-ish encodings of text);
- base64 and base64url, at each of the three byte alignments (only the characters that depend on
  the marker alone are searched, so a marker embedded at any offset is found).

Places: the image files of the volumes the run used, the compile-cache directory, host
directories given with --dir (plaintext by design: a finding there is expected and still
reported, so a leak test that wants none must not use --dir), the trace file (or a trace on
stderr, a pipe or a terminal, as it is written), and the bytes that crossed the host's sockets
as the network layer saw them (a `WireRecorder`, when the run's sockets were tapped). In a directory the host sees names
as well as contents, so the names of files, directories and symlinks below it and the targets of
its symlinks are searched too. Files are read in chunks with an overlap, so a marker across a
chunk boundary is found.
"""

from __future__ import annotations

import argparse
import base64
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shim.errors import UsageError, say

if TYPE_CHECKING:
    from shim.run import RunConfig

AUDIT_EXIT_STATUS = 3  # the run's exit status when the marker was found somewhere
MINIMUM_MARKER = 6  # shorter markers turn up by chance in binary data (and in base64 of anything)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Finding:
    """The marker, in one form, at one place (a file and offset, or a socket direction)."""

    place: str
    form: str
    offset: int

    def __str__(self) -> str:
        return f"{self.place}: {self.form} at offset {self.offset}"


def marker_forms(marker: bytes) -> Mapping[str, tuple[bytes, ...]]:
    """The byte strings to look for, by form name."""
    if len(marker) < MINIMUM_MARKER:
        raise UsageError(f"--audit-host: the marker must be at least {MINIMUM_MARKER} bytes")
    text = marker.decode("utf-8", "surrogateescape")
    forms: dict[str, tuple[bytes, ...]] = {"plain": (marker,)}
    try:
        forms["utf-16le"] = (text.encode("utf-16-le"),)
        forms["utf-16be"] = (text.encode("utf-16-be"),)
    except UnicodeEncodeError:  # not text: the binary form only
        pass
    standard, urlsafe = [], []
    for shift in range(3):
        encoded = base64.b64encode(bytes(shift) + marker)
        first = -(-8 * shift // 6)  # the first character whose bits all come from the marker
        last = 8 * (shift + len(marker)) // 6  # one past the last such character
        core = encoded[first:last]
        standard.append(core)
        urlsafe.append(core.translate(bytes.maketrans(b"+/", b"-_")))
    forms["base64"] = tuple(standard)
    if urlsafe != standard:
        forms["base64url"] = tuple(urlsafe)
    return forms


class _Scanner:
    """Finds every form in a stream of chunks (keeps an overlap between chunks)."""

    def __init__(self, forms: Mapping[str, tuple[bytes, ...]]) -> None:
        self._needles = [(form, needle) for form, needles in forms.items() for needle in needles]
        self._overlap = max(len(needle) for _, needle in self._needles) - 1
        self._tail = b""
        self._position = 0  # offset of the tail's first byte in the whole stream
        self.found: list[tuple[str, int]] = []

    def feed(self, data: bytes) -> None:
        window = self._tail + data
        seen = {offset for _, offset in self.found}
        for form, needle in self._needles:
            start = window.find(needle)
            while start >= 0:
                offset = self._position + start
                if offset not in seen:
                    self.found.append((form, offset))
                    seen.add(offset)
                start = window.find(needle, start + 1)
        keep = min(self._overlap, len(window))
        self._position += len(window) - keep
        self._tail = window[len(window) - keep:] if keep else b""


def scan_file(path: Path, forms: Mapping[str, tuple[bytes, ...]]) -> list[tuple[str, int]]:
    """(form, offset) of every occurrence in one file."""
    scanner = _Scanner(forms)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            scanner.feed(chunk)
    return scanner.found


def _entries(root: Path) -> Iterator[Path]:
    """Every entry below `root` (files, directories, symlinks and the rest; links not followed),
    or `root` itself when it is not a directory."""
    if not root.is_dir():
        yield root
        return
    for directory, subdirectories, names in os.walk(root, followlinks=False):
        for name in sorted(subdirectories + names):
            yield Path(directory, name)


def _scan_bytes(data: bytes, forms: Mapping[str, tuple[bytes, ...]]) -> list[tuple[str, int]]:
    scanner = _Scanner(forms)
    scanner.feed(data)
    return scanner.found


def _scan_entry(path: Path, top: bool, forms: Mapping[str, tuple[bytes, ...]]) -> list[tuple[str, int]]:
    """(form, offset) of the marker in what the host sees of one entry: its name (below the
    place searched), a symlink's target, a regular file's contents."""
    if top:  # a place named by the run (an image, the trace file): its contents, links followed
        return scan_file(path, forms) if path.is_file() else []
    found = [(f"{form} in the name", offset) for form, offset in _scan_bytes(os.fsencode(path.name), forms)]
    if path.is_symlink():
        found += [(f"{form} in the link target", offset)
                  for form, offset in _scan_bytes(os.fsencode(os.readlink(path)), forms)]
    elif path.is_file():
        found += scan_file(path, forms)
    return found


class WireRecorder:
    """Scans the bytes a socket layer sends and receives on the host side, as they pass.

    `record(label, direction, data)` is called by the network layer (from any thread) with the
    raw bytes of one connection (TLS records for a TLS socket); only findings are kept.
    `record_output(place, data)` takes what keep itself writes where the host reads it but no
    file holds it (the trace on stderr); `outputs` names those places for the report."""

    def __init__(self, marker: bytes) -> None:
        self._forms = marker_forms(marker)
        self._scanners: dict[str, _Scanner] = {}
        self._lock = threading.Lock()
        self.byte_count = 0
        self.outputs: list[str] = []

    def _feed(self, key: str, data: bytes) -> None:
        scanner = self._scanners.get(key)
        if scanner is None:
            scanner = self._scanners[key] = _Scanner(self._forms)
        scanner.feed(bytes(data))

    def record(self, label: str, direction: str, data: bytes) -> None:
        with self._lock:
            self._feed(f"socket {label} ({direction})", data)
            self.byte_count += len(data)

    def record_output(self, place: str, data: bytes) -> None:
        with self._lock:
            if place not in self.outputs:
                self.outputs.append(place)
            self._feed(place, data)

    def findings(self) -> list[Finding]:
        with self._lock:
            return [Finding(place, form, offset) for place, scanner in self._scanners.items()
                    for form, offset in scanner.found]


def audit_host(marker: bytes, places: Iterable[tuple[str, Path]],
               wire: WireRecorder | None = None) -> list[Finding]:
    """Every occurrence of `marker` (in every form) in `places` ((what, path) pairs: a file or a
    directory searched recursively; missing paths are skipped) and on the recorded wire."""
    forms = marker_forms(marker)
    findings: list[Finding] = []
    for what, root in places:
        if not root.exists():
            continue
        for path in _entries(root):
            try:
                found = _scan_entry(path, path == root, forms)
            except OSError as error:
                findings.append(Finding(f"{what} {path}", f"unreadable ({error.strerror})", 0))
                continue
            findings.extend(Finding(f"{what} {path}", form, offset) for form, offset in found)
    if wire is not None:
        findings.extend(wire.findings())
    return findings


def report(marker: str, findings: list[Finding], places: list[tuple[str, Path]],
           wire: WireRecorder | None) -> list[str]:
    """The audit's summary lines for stderr (without the `keep: ` prefix `say` adds): what was
    searched, and each finding on its own line."""
    searched = ", ".join(f"{what} {path}" for what, path in places) or "no files"
    if wire is not None:
        searched += "".join(f", {place}" for place in wire.outputs) + f", {wire.byte_count} socket bytes"
    if not findings:
        return [f"audit-host: {marker!r} not found in plaintext (searched {searched})"]
    grouped: dict[tuple[str, str], list[int]] = {}
    for finding in findings:
        grouped.setdefault((finding.place, finding.form), []).append(finding.offset)
    lines = [f"audit-host: {marker!r} found in plaintext in {len(grouped)} place(s) (searched {searched}):"]
    for (place, form), offsets in grouped.items():
        times = f" ({len(offsets)} times)" if len(offsets) > 1 else ""
        lines.append(f"audit-host:   {place}: {form} at offset {offsets[0]}{times}")
    return lines


def audit_places(config: RunConfig, args: argparse.Namespace) -> list[tuple[str, Path]]:
    """What `keep run --audit-host` searches for one run: the --dir host directories, the
    compile cache's entries, the trace file and the volume images the run used."""
    from shim.cache import default_cache_directory

    places: list[tuple[str, Path]] = [("--dir", Path(mapping.host)) for mapping in config.dirs]
    cache = config.cache_dir if config.cache_dir is not None else default_cache_directory()
    places.append(("compile cache", cache / "modules"))
    trace = getattr(args, "trace", None)
    if trace not in (None, "-") and Path(trace).is_file():  # other targets: searched as written
        places.append(("trace file", Path(trace)))
    for spec in getattr(args, "volume", None) or ():  # `--volume IMG[::GUEST]` (run's volumes)
        places.append(("volume image", Path(str(spec).split("::", 1)[0])))
    return places


def audit_run(marker: str, places: list[tuple[str, Path]], wire: WireRecorder | None = None) -> bool:
    """Search, print the report to stderr, and say whether the marker was found."""
    findings = audit_host(os.fsencode(marker), places, wire)
    for line in report(marker, findings, places, wire):
        say(line)  # a stderr that cannot be written must not change the exit status
    return bool(findings)


def audited_exit_status(args: argparse.Namespace, config: RunConfig, wire: WireRecorder | None,
                        status: int) -> int:
    """`status`, or AUDIT_EXIT_STATUS when `keep run --audit-host` was given and found the marker
    (for the ways a run ends besides its plain return, such as a signal)."""
    if args.audit_host is None:
        return status
    return AUDIT_EXIT_STATUS if audit_run(args.audit_host, audit_places(config, args), wire) else status
