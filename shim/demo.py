"""`keep demo`: the whole idea in one self-contained run, narrated for a person at a terminal.

Theory of operation
-------------------
The demo plays both sides with the real machinery, in this process, in a fresh work directory:

1. the guest: shim/guestbook.c (package data), an ordinary C program compiled to wasm32-wasi by
   zig from PyPI (shim.wasm_compile); the module is cached under the cache directory, so zig is
   needed only the first time;
2. the volume: a new LUKS2 + AES-XTS + Merkle-integrity image (storage.volume) whose random
   passphrase exists only in this process's memory. The keyslot KDF is deliberately cheap
   (argon2id, 4 passes over 32 MiB) so the demo starts fast; `keep volume create` benchmarks a
   2-second unlock instead;
3. keep.toml: one TLS listener on 127.0.0.1 port 0 (any free port), certificate exported to the
   work directory; loaded by shim.config like any other;
4. the keep: the same pieces `keep run --config keep.toml --volume IMG` wires (shim.run_volumes
   opens the volume and pre-opens it at /data through shim.volume_backend; shim.sockets opens the
   listener, TLS terminating inside the keep; shim.run runs the guest on a worker thread);
5. the client: Python `ssl` through trio, trusting only the exported certificate, POSTs a few
   entries and GETs them back; then the keep stops its sockets (the guest's accept() fails with
   ECANCELED and it exits 0), and the volume is committed and closed;
6. the checks: the volume is reopened read-only, pinned to the committed generation, its file
   read back and fsck'd; then everything the host could see (the work directory, image included,
   and the bytes that crossed the host's network, recorded through net.wiretap) is searched for
   the entries and the passphrase in plain, UTF-16 and base64 forms (shim.audit).

Any failure is a `DemoError`: one line, exit status 1. The guest's stdout is shown indented under
the step that caused it (the guestbook prints before it answers, so the order is stable).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.resources
import secrets
import shutil
import ssl
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import outcome
import trio

from net.policy import NetworkPolicy
from net.wiretap import WIRE_TAP
from shim.audit import WireRecorder, audit_host
from shim.config import KeepConfig, load_config
from shim.errors import KeepError, UsageError, point_at_devnull
from shim.run import RunConfig, RunResult, Stdio, run_module_async
from shim.run_volumes import RunVolumes, VolumeMount, describe
from shim.sockets import NullStream, open_keep_network, with_keep_config
from wasi_host import Buffer
from wasi_host.streams import OsStream

LISTENER = "guestbook"
GUEST_FILE = "/data/guestbook.txt"
IMAGE_NAME = "guestbook.img"
IMAGE_SIZE = 32 << 20
CERTIFICATE_NAME = "keep-cert.pem"
CLIENT_DEADLINE_SECONDS = 60.0  # for every request together (compiling is done before)
STOP_DEADLINE_SECONDS = 15.0  # for the guest to end once the keep stops its sockets
DEMO_ARGON2_PASSES = 4  # cryptsetup's minimum time cost
DEMO_ARGON2_MEMORY_KIB = 32 * 1024
ENTRIES = (
    "Ada: the analytical engine weaves algebraic patterns",
    "Grace: it is easier to ask forgiveness than permission",
    "Zoë: hello from a host that cannot read this",
)


class DemoError(KeepError):
    """A step of the demo failed; the message says which one and why."""


@dataclass
class Narrator:
    """Prints the transcript: numbered steps, indented details, the guest's own lines."""

    step: int = 0
    _guest_lines: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self, text: str) -> None:
        self.step += 1
        self._print(f"\n[{self.step}] {text}")

    def detail(self, text: str) -> None:
        self._print(f"    {text}")

    def guest_said(self, line: str) -> None:
        with self._lock:
            self._guest_lines.append(line)

    async def wait_for_guest(self, seconds: float) -> None:
        """Wait (a little) for the guest's first line, so it is shown under the right step."""
        with trio.move_on_after(seconds):
            while not self._guest_lines:
                await trio.sleep(0.01)
        self.show_guest()

    def show_guest(self) -> None:
        """Print what the guest wrote to stdout since the last call."""
        with self._lock:
            lines, self._guest_lines = self._guest_lines, []
        for line in lines:
            self._print(f"      guest | {line}")

    @staticmethod
    def _print(text: str) -> None:
        say(text)


def say(text: str) -> None:
    """Print one line now. If stdout is gone (`keep demo | head`), the rest is discarded and the
    demo still runs to its end, so the keep stops and the volume is closed properly."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        point_at_devnull(sys.stdout.fileno())


class GuestOutput(NullStream):
    """The guest's stdout (a wasi_host Stream, otherwise like keep.toml's `null`): complete lines
    go to the narrator."""

    def __init__(self, narrator: Narrator) -> None:
        self._narrator = narrator
        self._partial = bytearray()

    def write(self, data: Buffer) -> int:
        view = memoryview(data).cast("B")
        self._partial += view
        *lines, rest = bytes(self._partial).split(b"\n")
        self._partial = bytearray(rest)
        for line in lines:
            self._narrator.guest_said(line.decode("utf-8", "replace"))
        return len(view)

    def close(self) -> None:
        if self._partial:
            self._narrator.guest_said(self._partial.decode("utf-8", "replace"))
            self._partial.clear()


# -- 1. the guest ------------------------------------------------------------------------------

def guest_source() -> bytes:
    """The guestbook's C source, shipped as package data."""
    return importlib.resources.files("shim").joinpath("guestbook.c").read_bytes()


def build_guest(cache_dir: Path | None = None,
                before_compiling: Callable[[], None] | None = None) -> tuple[bytes, Path, bool]:
    """The compiled guestbook (bytes, cached path, whether it was already cached). The cache
    entry is named by SHA-256 of the source and flags; zig runs only on a miss (after
    `before_compiling` is called, so a person knows why the first run waits)."""
    from shim.cache import default_cache_directory
    from shim.wasm_compile import COMPILE_FLAGS, compile_c_to_wasm

    source = guest_source()
    digest = hashlib.sha256(source + b"\0" + " ".join(COMPILE_FLAGS).encode()).hexdigest()[:20]
    cached = (cache_dir or default_cache_directory()) / "demo" / f"guestbook-{digest}.wasm"
    if cached.is_file() and cached.read_bytes().startswith(b"\0asm"):
        return cached.read_bytes(), cached, True
    if before_compiling is not None:
        before_compiling()
    try:
        scratch = tempfile.TemporaryDirectory(prefix="keep-demo-build-")
    except OSError as error:  # no usable temporary directory (TMPDIR, /tmp, ... all read-only)
        raise DemoError(f"cannot make a directory to compile the guest in: {error.strerror} "
                        "(set TMPDIR to a writable directory)") from None
    with scratch:
        source_path = Path(scratch.name) / "guestbook.c"
        source_path.write_bytes(source)
        try:
            compile_c_to_wasm(source_path, cached)
        except OSError as error:
            raise DemoError(f"cannot write the compiled guest to {cached}: {error.strerror}") from None
    return cached.read_bytes(), cached, False


# -- 2-3. the volume and keep.toml -------------------------------------------------------------

def create_demo_volume(image: Path, passphrase: bytes) -> None:
    """A fresh encrypted volume with a deliberately cheap keyslot KDF (a demo, not a vault)."""
    from storage.errors import StorageError
    from storage.luks2 import KdfCost
    from storage.volume import create_volume

    cost = KdfCost(iterations=DEMO_ARGON2_PASSES, memory_kib=DEMO_ARGON2_MEMORY_KIB, parallel=1)
    try:
        create_volume(image, IMAGE_SIZE, passphrase, pbkdf="argon2id", kdf_cost=cost,
                      label="keep-demo").close()
    except (StorageError, OSError) as error:
        raise DemoError(f"cannot create the volume {image}: {error}") from None


KEEP_TOML = f"""\
# keep demo's keep.toml (a superset of Enarx.toml): fds 0-2, then /data, then the listener.
args = ["{LISTENER}"]

[tls]
export_certificate = "{CERTIFICATE_NAME}"   # the keep's certificate, for clients to trust

[[files]]
kind = "null"

[[files]]
kind = "stdout"

[[files]]
kind = "stderr"

[[files]]
kind = "listen"
name = "{LISTENER}"
addr = "127.0.0.1"
port = 0            # any free port
prot = "tls"        # TLS terminates inside the keep
"""


# -- 4-5. the keep and the client --------------------------------------------------------------

@dataclass(frozen=True)
class Exchange:
    """One HTTPS request the client made and what came back."""

    method: str
    path: str
    sent: bytes
    status: int
    reason: str
    body: bytes
    tls: str


async def https_request(port: int, context: ssl.SSLContext, method: str, path: str,
                        body: bytes = b"") -> Exchange:
    """One HTTP/1.1 request over TLS to 127.0.0.1:port (the server closes after answering)."""
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
    async with stream:
        await stream.do_handshake()
        tls = f"{stream.version()}, {stream.cipher()[0]}"
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        await stream.send_all(head + body)
        response = bytearray()
        while chunk := await stream.receive_some(65536):
            response += chunk
    head_bytes, _, content = bytes(response).partition(b"\r\n\r\n")
    status_line = head_bytes.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise DemoError(f"{method} {path}: not an HTTP response: {status_line[:80]!r}")
    return Exchange(method, path, body, int(parts[1]), parts[2] if len(parts) > 2 else "",
                    content, tls)


async def visit_guestbook(port: int, certificate: Path, entries: Sequence[str],
                          narrator: Narrator) -> list[Exchange]:
    """The client's side: POST every entry, then GET them all back."""
    context = ssl.create_default_context(cafile=str(certificate))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    exchanges: list[Exchange] = []
    for entry in entries:
        exchange = await https_request(port, context, "POST", "/entries", entry.encode())
        exchanges.append(exchange)
        narrator.detail(f"POST /entries {entry!r}")
        narrator.show_guest()
        narrator.detail(f"  -> {exchange.status} {exchange.reason}: "
                        f"{exchange.body.decode('utf-8', 'replace').strip()}")
        if len(exchanges) == 1:
            narrator.detail(f"     ({exchange.tls}; the keep's certificate verified)")
        if exchange.status != 201:
            raise DemoError(f"POST /entries answered {exchange.status} {exchange.reason}")
    exchange = await https_request(port, context, "GET", "/entries")
    exchanges.append(exchange)
    narrator.detail("GET /entries")
    narrator.show_guest()
    narrator.detail(f"  -> {exchange.status} {exchange.reason}, {len(exchange.body)} bytes:")
    for line in exchange.body.decode("utf-8", "replace").splitlines():
        narrator.detail(f"       {line}")
    return exchanges


@dataclass
class ServeOutcome:
    """What the keep's run produced: the client's exchanges, the guest's exit, the wire."""

    exchanges: list[Exchange]
    exit_code: int
    trap: str | None
    port: int


async def serve_and_visit(run_config: RunConfig, keep_config: KeepConfig, entries: Sequence[str],
                          certificate: Path, narrator: Narrator) -> ServeOutcome:
    """Open the keep's sockets, run the guest, visit it, stop the keep, wait for the guest."""
    async with open_keep_network(keep_config, NetworkPolicy()) as network:
        port = network.listeners[LISTENER].port
        narrator.detail(f"listening on 127.0.0.1:{port}: TLS 1.3 terminates inside the keep, with a "
                        "key pair made in memory (self-signed; `keep serve` uses an attested one)")
        narrator.detail(f"certificate (public part only) exported to {certificate}")
        config = with_keep_config(run_config, keep_config, network)
        guest_done = trio.Event()
        box: dict[str, outcome.Outcome[object]] = {}
        async with trio.open_nursery() as nursery:
            async def guest() -> None:
                box["guest"] = await outcome.acapture(run_module_async, config)
                guest_done.set()

            nursery.start_soon(guest)
            try:
                await narrator.wait_for_guest(2.0)
                narrator.begin("The owner's client (Python ssl, trusting only that certificate) "
                               "talks to the guest:")
                with trio.move_on_after(CLIENT_DEADLINE_SECONDS) as deadline:
                    async with trio.open_nursery() as client_nursery:
                        async def stop_client_if_guest_ends() -> None:
                            await guest_done.wait()
                            client_nursery.cancel_scope.cancel()

                        client_nursery.start_soon(stop_client_if_guest_ends)
                        box["client"] = await outcome.acapture(visit_guestbook, port, certificate,
                                                               entries, narrator)
                        client_nursery.cancel_scope.cancel()
                narrator.begin("Stopping the keep: its sockets close, the guest's accept() fails "
                               "(ECANCELED)")
            finally:  # whatever happened above: a guest blocked in accept() must be woken
                network.stop()
            with trio.move_on_after(STOP_DEADLINE_SECONDS):
                await guest_done.wait()
            if not guest_done.is_set():
                nursery.cancel_scope.cancel()  # interruptible: the epoch stops the guest
        narrator.show_guest()
    if "guest" not in box:
        raise DemoError(f"the guest did not end within {STOP_DEADLINE_SECONDS:.0f} s of the stop")
    result = box["guest"].unwrap()
    assert isinstance(result, RunResult)
    if "client" not in box:
        if deadline.cancelled_caught:
            raise DemoError(f"the guest did not answer within {CLIENT_DEADLINE_SECONDS:.0f} s")
        raise DemoError(f"the guest ended before the client was done (exit status "
                        f"{result.exit_code}{': ' + result.trap if result.trap else ''})")
    try:
        exchanges = box["client"].unwrap()
    except (OSError, ssl.SSLError, trio.BrokenResourceError) as error:
        raise DemoError(f"the HTTPS client failed: {error}") from None
    assert isinstance(exchanges, list)
    return ServeOutcome(exchanges, result.exit_code, result.trap, port)


# -- the command -------------------------------------------------------------------------------

def demo_command(args: argparse.Namespace) -> int:
    """`keep demo [--workdir DIR] [--keep-files]`."""
    chosen: str | None = args.workdir
    if chosen is not None:
        workdir = Path(chosen)
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"--workdir {chosen}: {error.strerror}") from None
        if (workdir / IMAGE_NAME).exists():
            raise UsageError(f"--workdir {chosen} already holds {IMAGE_NAME} (from an earlier demo): "
                             "give an empty directory")
    else:
        try:
            workdir = Path(tempfile.mkdtemp(prefix="keep-demo-"))
        except OSError as error:  # TMPDIR, /tmp, /var/tmp, /usr/tmp and the cwd all unusable
            raise DemoError(f"cannot make a temporary work directory: {error.strerror} (set "
                            "TMPDIR to a writable directory, or give --workdir DIR)") from None
    remove = chosen is None and not args.keep_files
    try:
        run_demo(workdir.resolve())
    finally:
        if remove:
            shutil.rmtree(workdir, ignore_errors=True)
    if not remove:
        say(f"\nfiles kept in {workdir} (the passphrase is gone: the image can no longer be opened)")
    return 0


def run_demo(workdir: Path, entries: Sequence[str] = ENTRIES) -> None:
    """Every step of the demo, narrated on stdout; raises DemoError at the first failure."""
    narrator = Narrator()
    say("keep demo: a WASI guestbook keeps its entries on an encrypted volume and serves them "
        "over TLS\nthat terminates inside the keep (nil backend: the keep is this process).")
    say(f"work directory (the host's view): {workdir}")
    tag = "kd-" + secrets.token_hex(6)  # makes this run's entries unique on the host
    tagged = [f"{entry} #{tag}" for entry in entries]

    narrator.begin("The guest: shim/guestbook.c, plain C compiled to wasm32-wasi with zig")
    wasm, cached_path, was_cached = build_guest(before_compiling=lambda: narrator.detail(
        "compiling (the first time on a machine, zig also builds its wasi-libc: about a minute)"))
    narrator.detail(f"{len(wasm):,} bytes, {'from the cache' if was_cached else 'compiled now'}: "
                    f"{cached_path}")

    narrator.begin("A fresh encrypted volume (LUKS2, aes-xts-plain64, Merkle integrity)")
    image = workdir / IMAGE_NAME
    passphrase = secrets.token_urlsafe(32).encode()
    create_demo_volume(image, passphrase)
    narrator.detail(f"{image.name}: {IMAGE_SIZE >> 20} MiB sparse image; random passphrase kept in "
                    "memory only, never written anywhere")
    narrator.detail(f"keyslot KDF: argon2id, {DEMO_ARGON2_PASSES} passes, {DEMO_ARGON2_MEMORY_KIB >> 10} "
                    "MiB: cheap so the demo starts fast (`keep volume create` tunes it to 2 s)")

    narrator.begin("keep.toml: one TLS listener on 127.0.0.1, any free port")
    toml_path = workdir / "keep.toml"
    toml_path.write_text(KEEP_TOML, encoding="utf-8")
    keep_config = load_config(toml_path)
    certificate = workdir / CERTIFICATE_NAME
    narrator.detail(f"written to {toml_path}; the guest gets /data (the volume) at fd 3 and the "
                    "listener at fd 4")

    narrator.begin("The keep starts: volume opened and pre-opened at /data, listener bound, guest "
                   "running")
    try:
        volumes = RunVolumes.open([VolumeMount(str(image), "/data")], passphrase, [(None, None)])
    except KeepError as error:
        raise DemoError(f"cannot open the volume: {error}") from None
    narrator.detail(f"volume opened: {describe(volumes.sessions[0].volume.state())}")
    run_config = RunConfig(module="guestbook.wasm", module_bytes=wasm,
                           stdio=Stdio(NullStream(), GuestOutput(narrator), OsStream(2)))
    run_config = dataclasses.replace(volumes.configure(run_config), interruptible=True)
    wire = WireRecorder(tag.encode())
    token = WIRE_TAP.set(wire.record)  # trio copies the context into every socket task
    try:
        with volumes:
            served = trio.run(serve_and_visit, run_config, keep_config, tagged, certificate, narrator)
    finally:
        WIRE_TAP.reset(token)
    narrator.detail(f"the guest exited with status {served.exit_code}")
    if served.exit_code != 0:
        raise DemoError(f"the guest exited with status {served.exit_code}"
                        f"{': ' + served.trap if served.trap else ''}")
    listed = served.exchanges[-1].body.decode("utf-8", "replace").splitlines()
    if listed != tagged:
        raise DemoError(f"GET /entries returned {listed!r}, expected the {len(tagged)} entries posted")

    narrator.begin("The volume was committed and closed; the state an owner pins:")
    final = volumes.final_states[0]
    narrator.detail(f"uuid        {final.uuid}")
    narrator.detail(f"generation  {final.generation}")
    narrator.detail(f"root MAC    {final.root_mac.hex() if final.root_mac else 'none'}")

    narrator.begin(f"Reopened read-only, pinned to generation {final.generation}: did the entries "
                   "persist?")
    stored = read_back(image, passphrase, final.generation)
    stored_lines = stored.decode("utf-8", "replace").splitlines()
    for line in stored_lines:
        narrator.detail(f"{GUEST_FILE}: {line}")
    if stored_lines != tagged:
        raise DemoError(f"{GUEST_FILE} on the reopened volume holds {stored_lines!r}, expected the "
                        "entries posted")
    narrator.detail(f"all {len(tagged)} entries there; fsck clean (every sector against the Merkle "
                    "tree, then the filesystem)")

    narrator.begin("The host's view: search it for the plaintext (plain, UTF-16, base64 forms)")
    places = [("work directory", workdir)]
    searched = {f"entry {index + 1}": text.encode() for index, text in enumerate(tagged)}
    searched["the run's tag"] = tag.encode()
    searched["the passphrase"] = passphrase
    found_any = False
    for what, marker in searched.items():
        findings = audit_host(marker, places, wire if what == "the run's tag" else None)
        found_any = found_any or bool(findings)
        shown = what if what == "the passphrase" else f"{what} {marker.decode()!r}"
        narrator.detail(f"{shown}: " + ("FOUND at " + "; ".join(map(str, findings))
                                               if findings else "not found"))
    files = sorted(path.name for path in workdir.iterdir())
    narrator.detail(f"searched: {', '.join(files)} ({image.stat().st_size:,}-byte image included) and "
                    f"the {wire.byte_count:,} bytes that crossed the host's network")
    if found_any:
        raise DemoError("plaintext found on the host (see above)")
    say(f"\ndone: {len(tagged)} entries went in over TLS, persisted on the encrypted volume, "
        "and the host saw none of them in plaintext.")


def read_back(image: Path, passphrase: bytes, generation: int) -> bytes:
    """The guestbook file of a committed volume, opened read-only and pinned; fsck must be clean."""
    from storage.errors import FilesystemError, StorageError
    from storage.fs import ROOT_INODE
    from storage.volume import open_volume

    name = GUEST_FILE.removeprefix("/data/").encode()
    try:
        with open_volume(image, passphrase, writable=False, expected_generation=generation) as volume:
            attr = volume.fs.lookup(ROOT_INODE, name)
            data = volume.fs.read(attr.ino, 0, attr.size)
            problems = volume.fsck()
    except (StorageError, FilesystemError, OSError) as error:
        raise DemoError(f"reopening the volume: {error}") from None
    if problems:
        raise DemoError(f"fsck of the reopened volume: {'; '.join(problems)}")
    return data

