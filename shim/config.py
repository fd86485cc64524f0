"""keep.toml: the keep's configuration, a superset of Enarx.toml.

Enarx's keys load unchanged: top-level `steward`, `args`, `[env]`, and `[[files]]` entries of kind
`stdin`, `stdout`, `stderr`, `null`, `listen` (name, addr, port, prot) and `connect` (host, name,
port, prot), with Enarx's defaults (prot "tls"; port 443 for tls, 80 for tcp; addr "::"; a connect
entry's name defaults to its host). keepshim adds:

    [tls]                      the keep's identity and what to do with it
    certificate = "cert.pem"   use this chain and key instead of an in-memory self-signed one
    key = "key.pem"
    export_certificate = "x.pem"   write the listeners' certificate (public part only) here

    [[files]] kind = "listen": insecure_plaintext = true (allow prot "tcp"), client_ca = "ca.pem"
    [[files]] kind = "connect": insecure_plaintext, ca = "ca.pem", pin_sha256 = "<64 hex>",
                                server_name = "sni.example" (defaults to host)

Relative paths are relative to the directory holding keep.toml.

File descriptors. As in Enarx, the first three entries are fds 0, 1 and 2 and must be stdio kinds
(stdin, stdout, stderr, null); a missing one of the three is `null`. The host's pre-opened
directories come next (fd 3 onwards: wasi-libc stops scanning for pre-opens at the first fd that is
not a directory), then the remaining entries in list order. `FD_COUNT` and `FD_NAMES` describe
every fd from 0 to FD_COUNT-1, so FD_NAMES.split(":")[fd] names fd; a pre-opened directory appears
under its guest path. Without pre-opened directories this is exactly Enarx's numbering.

Errors. Unknown keys and bad values are `ConfigError`s naming the file, the line and the key
(`keep.toml:12: files[3].port: ...`). tomllib reports no positions, so `_LineIndex` finds them in
the text; it understands the table headers and `key =` lines this format uses.
"""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NoReturn

from shim.errors import KeepError

StdioKind = Literal["stdin", "stdout", "stderr", "null"]
Prot = Literal["tls", "tcp"]
KeyPath = tuple[str | int, ...]

STDIO_KINDS: tuple[StdioKind, ...] = ("stdin", "stdout", "stderr", "null")
DEFAULT_PORTS: Mapping[Prot, int] = {"tls": 443, "tcp": 80}
RESERVED_ENV = ("FD_COUNT", "FD_NAMES")


MAX_CONFIG_BYTES = 1 << 20  # a keep.toml is a few hundred bytes


class ConfigError(KeepError):
    """keep.toml is malformed: the message names the file, the line and the key."""

    exit_status = 2


@dataclass(frozen=True)
class StdioFile:
    """fd 0, 1 or 2: the host's stdin/stdout/stderr, or a null device."""

    kind: StdioKind
    name: str


@dataclass(frozen=True)
class ListenFile:
    """A pre-opened listening socket; TLS terminates inside the keep unless prot is "tcp"."""

    name: str
    addr: str
    port: int
    prot: Prot = "tls"
    insecure_plaintext: bool = False
    client_ca: Path | None = None
    kind: Literal["listen"] = "listen"


@dataclass(frozen=True)
class ConnectFile:
    """A socket connected at start; the server is verified by system roots, `ca` or a pin."""

    name: str
    host: str
    port: int
    prot: Prot = "tls"
    insecure_plaintext: bool = False
    ca: Path | None = None
    pin_sha256: str | None = None
    server_name: str | None = None
    kind: Literal["connect"] = "connect"


FileEntry = StdioFile | ListenFile | ConnectFile
SocketFile = ListenFile | ConnectFile


@dataclass(frozen=True)
class TlsSettings:
    """The keep's identity: configured files, or None for an in-memory self-signed one."""

    certificate: Path | None = None
    key: Path | None = None
    export_certificate: Path | None = None


@dataclass(frozen=True)
class FdSlot:
    """One guest fd and what is behind it (`entry` is None for a pre-opened directory)."""

    fd: int
    name: str
    entry: FileEntry | None


@dataclass(frozen=True)
class KeepConfig:
    """A validated keep.toml."""

    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    files: tuple[FileEntry, ...] = (StdioFile("stdin", "stdin"), StdioFile("stdout", "stdout"),
                                    StdioFile("stderr", "stderr"))
    tls: TlsSettings = TlsSettings()
    steward: str | None = None

    @property
    def stdio(self) -> tuple[StdioFile, StdioFile, StdioFile]:
        """What fds 0, 1 and 2 are (a missing entry is null)."""
        found = [e for e in self.files[:3] if isinstance(e, StdioFile)]
        while len(found) < 3:
            found.append(StdioFile("null", "null"))
        return found[0], found[1], found[2]

    @property
    def sockets(self) -> tuple[SocketFile, ...]:
        """The socket entries in list order (they follow the pre-opened directories)."""
        return tuple(e for e in self.files if isinstance(e, ListenFile | ConnectFile))

    def ca_files(self) -> tuple[tuple[str, str, Path], ...]:
        """(socket name, option, path) of each CA file the sockets read: a listener's
        `client_ca`, a connect entry's `ca`. The files a run must never overwrite (--trace,
        export_certificate) are these and [tls] certificate and key."""
        return tuple((entry.name, option, path) for entry in self.sockets
                     for option, path in ((("client_ca", entry.client_ca),) if isinstance(entry, ListenFile)
                                          else (("ca", entry.ca),))
                     if path is not None)

    def fd_layout(self, preopen_names: Sequence[str] = ()) -> tuple[FdSlot, ...]:
        """Every guest fd from 0: stdio, then pre-opened directories, then sockets."""
        named: list[tuple[str, FileEntry | None]] = [(e.name, e) for e in self.stdio]
        named += [(name, None) for name in preopen_names]
        named += [(e.name, e) for e in self.sockets]
        return tuple(FdSlot(fd, name, entry) for fd, (name, entry) in enumerate(named))

    def guest_env(self, preopen_names: Sequence[str] = ()) -> dict[str, str]:
        """`FD_COUNT` and `FD_NAMES` (as Enarx sets them), then the configured [env]."""
        layout = self.fd_layout(preopen_names)
        bad = [slot.name for slot in layout if ":" in slot.name]
        if bad:
            raise ConfigError(f"fd name {bad[0]!r} contains ':', which FD_NAMES uses as separator")
        env = {"FD_COUNT": str(len(layout)), "FD_NAMES": ":".join(s.name for s in layout)}
        env.update(self.env)
        return env


def load_config(path: Path) -> KeepConfig:
    """Read and validate keep.toml (or an Enarx.toml)."""
    return parse_config(read_config_text(path), source=str(path), base_dir=path.parent)


def read_limited(path: Path, limit: int) -> bytes:
    """A small file's bytes, reading at most `limit` + 1: OSError as usual, and
    ValueError when the file holds more than `limit` bytes (or never ends: /dev/zero), so that
    a wrong path cannot fill memory."""
    with open(path, "rb") as stream:
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return data


def read_config_text(path: Path) -> str:
    """keep.toml's text, with universal newlines. At most MAX_CONFIG_BYTES are read: a bigger
    file (or /dev/zero) is refused instead of filling memory."""
    try:
        data = read_limited(path, MAX_CONFIG_BYTES)
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from None
    except ValueError as error:
        raise ConfigError(f"{path}: {error} (not a keep.toml?)") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as read_text


MAX_DOTTED_KEY_PARTS = 16  # keep.toml's deepest key has three parts
_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*+"|'[^'\n]*+')"""
_TOML_TOKENS = re.compile(
    rf"(?P<long>{_KEY_PART}(?:[ \t]*\.[ \t]*{_KEY_PART}){{{MAX_DOTTED_KEY_PARTS},}})"
    # multi-line strings: a basic one's escapes taken possessively (\""" does not end it), and
    # up to two quotes before the closing three are content; unterminated, the rest of the text
    # (tomllib then reports it), so that a failed match never rescans
    r'|"""(?:[^"\\]|\\[\s\S]|"(?!""))*+(?:"{3,5}|[\s\S]*)'
    r"|'''[\s\S]*?'{3,5}"
    # one-line strings, also unterminated (to the line's end): each "\" of '"\"\"\"...' would
    # otherwise start a string that fails at the line's end, a rescan of the line per quote
    r"""|"(?:[^"\\\n]|\\.)*+"?|'[^'\n]*+'?|[A-Za-z0-9_-]+|#[^\n]*""")
"""Strings, comments and bare words of TOML text, and (group `long`) a dotted key of more than
MAX_DOTTED_KEY_PARTS parts. Linear: every part starts with its own character, and whole words
and strings (terminated or not) are consumed as tokens, so the scan never restarts inside one."""


def long_dotted_key_line(text: str) -> int | None:
    """The line of the first dotted key of more than MAX_DOTTED_KEY_PARTS parts in TOML `text`
    (outside strings and comments), or None. tomllib's time and memory grow with the square of
    a dotted key's length (16,000 parts: 5.6 s and 1 GB), so hostile text is checked first."""
    for match in _TOML_TOKENS.finditer(text):
        if match.group("long") is not None:
            return text.count("\n", 0, match.start()) + 1
    return None


def parse_config(text: str, *, source: str = "keep.toml", base_dir: Path = Path(".")) -> KeepConfig:
    """Validate keep.toml text; relative paths resolve against `base_dir`."""
    if (line := long_dotted_key_line(text)) is not None:
        raise ConfigError(f"{source}:{line}: a dotted key of more than {MAX_DOTTED_KEY_PARTS} "
                          "parts (no keep.toml key is that deep)")
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: not valid TOML: {error}") from None
    except RecursionError:  # tomllib recurses per nesting level; a deployed keep.toml is hostile
        raise ConfigError(f"{source}: not valid TOML: nested too deeply") from None
    return _Validator(source, _LineIndex(text), base_dir).config(document)


class _LineIndex:
    """Where each table and key starts in the text, since tomllib gives no positions."""

    # Linear on hostile text: a bracket, then everything up to the first closing bracket, whose
    # content is checked separately. (A lazy name group between two runs of optional spaces
    # backtracked cubically over "[" + 2,000 spaces in a multi-line string: 6-10 s a line.)
    _ARRAY_HEADER = re.compile(r"\s*\[\[([^\[\]\n]*)\]\]")
    _HEADER = re.compile(r"\s*\[([^\[\]\n]*)\]")
    _NAME = re.compile(r"[A-Za-z0-9_.\"' -]+")
    _KEY = re.compile(r"^\s*(\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+)\s*=")

    def __init__(self, text: str) -> None:
        self._lines: dict[KeyPath, int] = {}
        table: KeyPath = ()
        counts: dict[KeyPath, int] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            if match := self._header(self._ARRAY_HEADER, line):
                name = self._split(match.group(1))
                index = counts.get(name, 0)
                counts[name] = index + 1
                table = (*name, index)
                self._lines.setdefault(table, number)
            elif match := self._header(self._HEADER, line):
                table = self._split(match.group(1))
                self._lines.setdefault(table, number)
            elif match := self._KEY.match(line):
                self._lines.setdefault((*table, match.group(1).strip("\"'")), number)

    @classmethod
    def _header(cls, pattern: re.Pattern[str], line: str) -> re.Match[str] | None:
        """`pattern`'s match at the start of `line` if its bracketed part is a table name."""
        match = pattern.match(line)
        if match is None or not cls._NAME.fullmatch(match.group(1).strip()):
            return None
        return match

    @staticmethod
    def _split(dotted: str) -> KeyPath:
        return tuple(part.strip().strip("\"'") for part in dotted.split("."))

    def line(self, key: KeyPath) -> int | None:
        """The line of `key`, or of its nearest enclosing table that has one."""
        for length in range(len(key), 0, -1):
            if key[:length] in self._lines:
                return self._lines[key[:length]]
        return None


def _key_name(key: KeyPath) -> str:
    """`files[3].port`; a name that is not printable text is quoted with escapes (`"a\\nb"`), so
    that an error stays one line and a keep.toml cannot send escape sequences to a terminal."""
    text = ""
    for part in key:
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        name = part if part.isprintable() else json.dumps(part, ensure_ascii=False)
        text += f".{name}" if text else name
    return text


class _Validator:
    """Turns the parsed document into a KeepConfig, or raises a ConfigError with a position."""

    def __init__(self, source: str, lines: _LineIndex, base_dir: Path) -> None:
        self._source = source
        self._lines = lines
        self._base = base_dir

    def fail(self, key: KeyPath, problem: str) -> NoReturn:
        line = self._lines.line(key)
        where = f"{self._source}:{line}" if line is not None else self._source
        raise ConfigError(f"{where}: {_key_name(key) or 'top level'}: {problem}")

    def check_keys(self, table: Mapping[str, object], key: KeyPath, allowed: Sequence[str]) -> None:
        for name in table:
            if name not in allowed:
                self.fail((*key, name), f"unknown key (allowed here: {', '.join(allowed)})")

    def string(self, value: object, key: KeyPath) -> str:
        if not isinstance(value, str):
            self.fail(key, f"expected a string, got {_describe(value)}")
        return value

    def guest_text(self, value: object, key: KeyPath) -> str:
        """An argument or environment value: the guest gets it as a NUL-terminated C string,
        so a NUL inside could not reach it (TOML allows one as "\\u0000"). Refused here, where
        the error names the line, instead of when the guest starts (a deployed keep had already
        accepted the deployment then, and was used up by it)."""
        text = self.string(value, key)
        if "\0" in text:
            self.fail(key, "contains a NUL character, which a guest's arguments and environment "
                           "cannot hold")
        return text

    def boolean(self, value: object, key: KeyPath) -> bool:
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {_describe(value)}")
        return value

    def path(self, value: object, key: KeyPath) -> Path:
        text = self.string(value, key)
        if not text:
            self.fail(key, "expected a file path, got an empty string")
        return self._base / text

    def config(self, document: Mapping[str, object]) -> KeepConfig:
        self.check_keys(document, (), ("steward", "args", "env", "files", "tls"))
        steward = None
        if "steward" in document:
            steward = self.string(document["steward"], ("steward",))
            if not steward.startswith("https://"):
                self.fail(("steward",), "must be an https:// URL")
        args: tuple[str, ...] = ()
        if "args" in document:
            raw_args = document["args"]
            if not isinstance(raw_args, list):
                self.fail(("args",), f"expected a list of strings, got {_describe(raw_args)}")
            args = tuple(self.guest_text(a, ("args", i)) for i, a in enumerate(raw_args))
        env = self.env(document.get("env", {}))
        files = KeepConfig().files
        if "files" in document:
            raw_files = document["files"]
            if not isinstance(raw_files, list) or not all(isinstance(f, dict) for f in raw_files):
                self.fail(("files",), "expected [[files]] tables")
            files = tuple(self.file(f, ("files", i)) for i, f in enumerate(raw_files))
            self.check_order(files)
        tls = self.tls(document.get("tls", {}))
        return KeepConfig(args=args, env=env, files=files, tls=tls, steward=steward)

    def env(self, raw: object) -> dict[str, str]:
        if not isinstance(raw, dict):
            self.fail(("env",), f"expected a table of strings, got {_describe(raw)}")
        env: dict[str, str] = {}
        for name, value in raw.items():
            if not name or "=" in name or "\0" in name:
                self.fail(("env", name), "not a valid environment variable name")
            if name in RESERVED_ENV:
                self.fail(("env", name), "is set by the keep from [[files]]; do not set it here")
            env[name] = self.guest_text(value, ("env", name))
        return env

    def tls(self, raw: object) -> TlsSettings:
        if not isinstance(raw, dict):
            self.fail(("tls",), f"expected a table, got {_describe(raw)}")
        self.check_keys(raw, ("tls",), ("certificate", "key", "export_certificate"))
        paths = {name: self.path(value, ("tls", name)) for name, value in raw.items()}
        if ("certificate" in paths) != ("key" in paths):
            self.fail(("tls",), "certificate and key must be given together")
        return TlsSettings(certificate=paths.get("certificate"), key=paths.get("key"),
                           export_certificate=paths.get("export_certificate"))

    def name(self, value: object, key: KeyPath) -> str:
        """An fd's name: it goes into FD_NAMES (joined with ':'), so it holds no ':' and,
        as every environment value, no NUL."""
        name = self.guest_text(value, key)
        if not name or ":" in name:
            self.fail(key, f"a name must be non-empty and contain no ':' (got {name!r})")
        return name

    def file(self, raw: Mapping[str, object], key: KeyPath) -> FileEntry:
        if "kind" not in raw:
            self.fail(key, "missing key kind (stdin, stdout, stderr, null, listen or connect)")
        kind = self.string(raw["kind"], (*key, "kind"))
        if kind in STDIO_KINDS:
            self.check_keys(raw, key, ("kind", "name"))
            stdio_kind: StdioKind = kind
            return StdioFile(stdio_kind, self.name(raw.get("name", kind), (*key, "name")))
        if kind == "listen":
            return self.listen(raw, key)
        if kind == "connect":
            return self.connect(raw, key)
        self.fail((*key, "kind"),
                  f"unknown kind {kind!r} (stdin, stdout, stderr, null, listen or connect)")

    def socket_common(self, raw: Mapping[str, object], key: KeyPath) -> tuple[Prot, int, bool]:
        prot_text = self.string(raw.get("prot", "tls"), (*key, "prot"))
        if prot_text not in ("tls", "tcp"):
            self.fail((*key, "prot"), f'expected "tls" or "tcp", got {prot_text!r}')
        prot: Prot = "tls" if prot_text == "tls" else "tcp"
        port = raw.get("port", DEFAULT_PORTS[prot])
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            self.fail((*key, "port"), f"expected a port number 0-65535, got {_describe(port)}")
        plaintext = self.boolean(raw.get("insecure_plaintext", False), (*key, "insecure_plaintext"))
        return prot, port, plaintext

    def tls_only(self, raw: Mapping[str, object], key: KeyPath, prot: Prot,
                 names: Sequence[str]) -> None:
        for name in names:
            if name in raw and prot != "tls":
                self.fail((*key, name), 'only applies to prot = "tls"')

    def listen(self, raw: Mapping[str, object], key: KeyPath) -> ListenFile:
        self.check_keys(raw, key, ("kind", "name", "prot", "addr", "port", "insecure_plaintext",
                                   "client_ca"))
        if "name" not in raw:
            self.fail(key, "a listen entry needs a name")
        name = self.name(raw["name"], (*key, "name"))
        prot, port, plaintext = self.socket_common(raw, key)
        addr = self.string(raw.get("addr", "::"), (*key, "addr"))
        if addr != "localhost":
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                self.fail((*key, "addr"), f"expected an IP address, got {addr!r}")
        self.tls_only(raw, key, prot, ("client_ca",))
        client_ca = self.path(raw["client_ca"], (*key, "client_ca")) if "client_ca" in raw else None
        return ListenFile(name=name, addr=addr, port=port, prot=prot, insecure_plaintext=plaintext,
                          client_ca=client_ca)

    def connect(self, raw: Mapping[str, object], key: KeyPath) -> ConnectFile:
        self.check_keys(raw, key, ("kind", "name", "prot", "host", "port", "insecure_plaintext",
                                   "ca", "pin_sha256", "server_name"))
        if "host" not in raw:
            self.fail(key, "a connect entry needs a host")
        host = self.host_name(raw["host"], (*key, "host"), "a host name or IP address")
        if not host:
            self.fail((*key, "host"), "must not be empty")
        if "name" not in raw and ":" in host:  # an IPv6 address: blame the missing name
            self.fail(key, f"a connect entry's name defaults to its host, and {host!r} holds "
                           "':', which FD_NAMES uses as separator: give the entry a name")
        name = self.name(raw.get("name", host), (*key, "name"))
        prot, port, plaintext = self.socket_common(raw, key)
        self.tls_only(raw, key, prot, ("ca", "pin_sha256", "server_name"))
        pin = None
        if "pin_sha256" in raw:
            pin = self.string(raw["pin_sha256"], (*key, "pin_sha256")).lower().replace(":", "")
            if not re.fullmatch(r"[0-9a-f]{64}", pin):
                self.fail((*key, "pin_sha256"), "expected 64 hex digits (SHA-256 of the SPKI)")
        ca = self.path(raw["ca"], (*key, "ca")) if "ca" in raw else None
        server_name = None
        if "server_name" in raw:
            # "": the host's name is sent, as without the key
            server_name = self.host_name(raw["server_name"], (*key, "server_name"),
                                         "a host name TLS can send (SNI)")
        return ConnectFile(name=name, host=host, port=port, prot=prot, insecure_plaintext=plaintext,
                           ca=ca, pin_sha256=pin, server_name=server_name)

    def host_name(self, value: object, key: KeyPath, what: str) -> str:
        """A DNS host name or IP address as resolvers and TLS's server_name (RFC 6066) take it:
        IDNA encoded, no empty label, none over 63 bytes, at most 253 bytes, no NUL. Others
        used to fail only once the socket was being opened, as a ValueError or UnicodeError
        from `ssl` or the resolver (an internal error), or mid-handshake ("SSL3_EXT_INVALID_
        SERVERNAME"). An empty string is returned as it is (the caller decides)."""
        name = self.string(value, key)
        if not name:
            return name
        try:
            encoded = name.encode("idna")
        except UnicodeError:
            self.fail(key, f"not {what}: {name!r} has an empty label or one over 63 bytes")
        if b"\0" in encoded or len(encoded) > 253:
            self.fail(key, f"not {what}: {name!r} holds a NUL or is over 253 bytes")
        return name

    def check_order(self, files: Sequence[FileEntry]) -> None:
        for index, entry in enumerate(files):
            is_stdio = isinstance(entry, StdioFile)
            if index < 3 and not is_stdio and any(isinstance(e, StdioFile) for e in files[index:]):
                self.fail(("files", index), "stdin/stdout/stderr/null entries must come first")
            if index >= 3 and is_stdio:
                self.fail(("files", index),
                          "stdin/stdout/stderr/null entries are fds 0-2: only the first three "
                          "entries can be of these kinds")


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, int | float):
        return str(value)
    return type(value).__name__.replace("dict", "table").replace("list", "array")
