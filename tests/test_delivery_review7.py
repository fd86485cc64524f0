"""Session 7's second adversarial review of delivery, keep.toml sockets, TLS and the compile
cache: each test reproduces a defect found by treating the host (its cache directory, its
network) as the attacker, and fails on the code before its fix."""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import io
import json
import os
import re
import resource
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
import wasmtime
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from net.errors import CertificateError, ConnectFailed
from net.streams import ReadinessBoard, open_connection
from net.tls import FileCertificateProvider, KeepIdentity, ServerVerification, server_context
from shim.attest import (
    EVIDENCE_OIDS,
    AttestedIdentity,
    Conversation,
    Deploy,
    MalformedEvidence,
    NilBackend,
    Policy,
    VolumeGrant,
    owner_client_context,
    parse_policy,
)
from shim.attest import _protocol as attest_protocol
from shim.attest._certificate import der_octet_string
from shim.cache import CompileCache
from shim.config import ConnectFile, KeepConfig, ListenFile, TlsSettings, parse_config
from shim.deploy import DeployRefused, deploy_to
from shim.engine import EngineSettings
from shim.errors import KeepError
from shim.serve import Deployment, Keep, RunOutcome, run_deployment
from shim.sockets import NetworkError, open_keep_network

WASM = bytes(wasmtime.wat2wasm('(module (func (export "answer") (result i32) (i32.const 42)))'))


def _run_isolated(code: str, *arguments: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter that the test can kill if it hangs."""
    return subprocess.run([sys.executable, "-c", code, *arguments], capture_output=True,
                          text=True, timeout=timeout)


def _limit_memory() -> None:
    """In the child: reading a planted /dev/zero whole fails fast instead of eating the host."""
    resource.setrlimit(resource.RLIMIT_DATA, (2 << 30, 2 << 30))


# The compile cache directory is the host's: what it plants there must never hang, crash or
# fill the keep's memory; the entry is discarded and the module recompiled.

_LOAD_WITH_PLANTED_ENTRY = """
import os, sys
from pathlib import Path
import wasmtime
from shim.cache import CompileCache
from shim.engine import EngineSettings
wasm = bytes(wasmtime.wat2wasm('(module (func (export "answer") (result i32) (i32.const 42)))'))
settings = EngineSettings()
cache = CompileCache.open(Path(sys.argv[1]))
entry = cache.entry_path(wasm, settings)
entry.parent.mkdir(parents=True, exist_ok=True)
if sys.argv[2] == "fifo":
    os.mkfifo(entry)
elif sys.argv[2] == "dev-zero":
    os.symlink("/dev/zero", entry)
elif sys.argv[2] == "huge-sparse":
    with open(entry, "wb") as stream:
        stream.truncate(1 << 40)
module, hit = cache.load_module(settings.make_engine(), settings, wasm)
print("hit" if hit else "recompiled", cache.statistics.discarded)
"""


@pytest.mark.parametrize("planted", ["fifo", "dev-zero", "huge-sparse"])
def test_a_planted_cache_entry_is_discarded_without_hanging_or_reading_it_all(
        tmp_path: Path, planted: str) -> None:
    """A FIFO at an entry's name made every later `keep run` of that module hang in open();
    a symlink to /dev/zero (or a sparse 1 TiB file) was read whole: MemoryError traceback."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _LOAD_WITH_PLANTED_ENTRY, str(tmp_path), planted],
            capture_output=True, text=True, timeout=20, preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading with a planted {planted} entry hung")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["recompiled", "1"]


def test_a_cache_key_file_that_is_not_a_regular_file_is_one_clear_error(tmp_path: Path) -> None:
    """A FIFO in place of cache.key made `keep run` hang before it started the guest."""
    os.mkfifo(tmp_path / "cache.key")
    code = ("import sys\nfrom pathlib import Path\nfrom shim.cache import CompileCache\n"
            "from shim.errors import KeepError\n"
            "try:\n    CompileCache.open(Path(sys.argv[1]))\n"
            "except KeepError as error:\n    print(error)\n")
    try:
        done = _run_isolated(code, str(tmp_path), timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("opening a cache whose key file is a FIFO hung")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cache.key" in done.stdout and "not a regular file" in done.stdout


def test_an_ordinary_cache_still_hits(tmp_path: Path) -> None:
    settings = EngineSettings()
    first = CompileCache.open(tmp_path)
    assert first.load_module(settings.make_engine(), settings, WASM)[1] is False
    second = CompileCache.open(tmp_path)
    assert second.load_module(settings.make_engine(), settings, WASM)[1] is True
    assert second.key == first.key


# `keep serve` faces the network before anyone is attested: a peer must not be able to end it
# or to hold its connections forever.


def test_a_flood_of_connections_that_exhausts_fds_does_not_end_keep_serve(tmp_path: Path) -> None:
    """accept() failing with EMFILE escaped serve's accept loop: 'keep: internal error:
    ExceptionGroup', exit 70, by anyone who could open more TCP connections than its fd limit."""
    def few_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    environment = {**os.environ, "KEEPSHIM_CACHE_DIR": str(tmp_path / "cache")}
    process = subprocess.Popen([sys.executable, "-m", "shim", "serve", "--listen", "127.0.0.1:0"],
                               stderr=subprocess.PIPE, text=True, env=environment,
                               preexec_fn=few_fds)
    try:
        assert process.stderr is not None
        found = re.search(r"serving on 127\.0\.0\.1:(\d+)", process.stderr.readline())
        assert found
        port = int(found.group(1))
        flood = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(80)]
        time.sleep(1)  # the keep tries to accept them all
        for connection in flood:
            connection.close()
        assert process.poll() is None, process.stderr.read()
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        deadline = time.monotonic() + 20
        while True:  # the keep accepts again once the flood's fds are free
            try:
                with (socket.create_connection(("127.0.0.1", port), timeout=10) as tcp,
                      context.wrap_socket(tcp) as tls):
                    assert tls.getpeercert(binary_form=True)
                break
            except (OSError, ssl.SSLError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert status == 128 + signal.SIGTERM


async def test_a_peer_that_handshakes_and_never_sends_its_deployment_is_dropped() -> None:
    """After the handshake the keep waited for the deploy frame forever: every such connection
    (a slowloris) held an fd and a task for the keep's whole life."""
    keep = Keep(NilBackend(), run_deployment, handshake_seconds=0.5)
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(keep.serve, "127.0.0.1", 0)
        for stalled in (b"", struct.pack(">II", 100, 0) + b'{"ty'):  # nothing; half a frame
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            stream = trio.SSLStream(tcp, owner_client_context())
            with trio.fail_after(20):
                await stream.do_handshake()
                if stalled:
                    await stream.send_all(stalled)
                try:
                    while await stream.receive_some():
                        pass  # the keep ends the connection: b"" or a broken stream
                except trio.BrokenResourceError:
                    pass
            await trio.aclose_forcefully(stream)
        nursery.cancel_scope.cancel()


# The owner meets whatever answers at the keep's address (a man in the middle) before anything is
# attested: any certificate it shows is a clear refusal, never a crash.


async def _tls_server(context: ssl.SSLContext, tcp: trio.SocketStream) -> None:
    """A TLS server that is not a keep: handshake with `context`, read, hang up."""
    stream = trio.SSLStream(tcp, context, server_side=True)
    with contextlib.suppress(trio.BrokenResourceError):
        await stream.do_handshake()
        await stream.receive_some()
    await trio.aclose_forcefully(stream)


def _builder(key: CertificateIssuerPrivateKeyTypes, common_name: str = "localhost"
             ) -> x509.CertificateBuilder:
    """A self-signed certificate for `key`, valid now, ready for extensions and signing."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)))


def _pem_key(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate_with_evidence(evidence: bytes) -> tuple[bytes, bytes]:
    """A self-signed RA-TLS-shaped certificate carrying `evidence` as nil evidence, and its key
    (both PEM)."""
    identity = AttestedIdentity()
    certificate = (_builder(identity.private_key, "not a keep")
                   .add_extension(x509.UnrecognizedExtension(EVIDENCE_OIDS["nil"],
                                                             der_octet_string(evidence)),
                                  critical=False)
                   .sign(identity.private_key, hashes.SHA256()))
    net_identity = identity.net_identity(certificate)
    return net_identity.certificate_chain_pem, net_identity.private_key_pem


async def test_deeply_nested_nil_evidence_from_a_man_in_the_middle_is_a_refusal() -> None:
    """json.loads of '[' * 5000 raised RecursionError out of NilBackend.verify: `keep deploy`
    ended with an internal error instead of refusing the keep."""
    chain, key = _certificate_with_evidence(b"[" * 5000 + b"]" * 5000)
    context = server_context(KeepIdentity(certificate_chain_pem=chain, private_key_pem=key))
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, functools.partial(_tls_server, context), 0)
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(20), pytest.raises(MalformedEvidence, match="nested too deeply"):
            await deploy_to("127.0.0.1", port, Deploy(workload=b"\0asm"),
                            Policy(allow_insecure_nil=True), stdout=io.BytesIO(),
                            stderr=io.BytesIO())
        nursery.cancel_scope.cancel()


async def test_large_frames_from_many_peers_share_one_bounded_buffer() -> None:
    """Each connection could buffer a whole 128 MiB deploy frame, however many there were: six
    peers sending 120 MiB each and stalling grew `keep serve` from 41 to 758 MiB (enough of them
    end it, and a workload it runs, out of memory). The connection that would overrun the
    keep's budget is dropped; the budget is free again once the peers are gone."""
    ran = []

    async def runner(deployment: Deployment) -> RunOutcome:
        ran.append(deployment.message.args)
        return RunOutcome(exit_status=0)

    keep = Keep(NilBackend(), runner, pending_bytes_limit=1 << 20)
    header = json.dumps({"type": "deploy", "args": [], "config": "", "volumes": [],
                         "workload_sha256": "00" * 32}).encode()
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(keep.serve, "127.0.0.1", 0)
        peers = []
        for _ in range(2):
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            stream = trio.SSLStream(tcp, owner_client_context())
            await stream.do_handshake()
            peers.append(stream)

        async def stall(stream: trio.SSLStream[trio.SocketStream], dropped: list[int]) -> None:
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(struct.pack(">II", len(header), 900 << 10) + header
                                      + bytes(600 << 10))
                while await stream.receive_some():
                    pass
            dropped.append(1)

        dropped: list[int] = []
        with trio.move_on_after(20):  # the handshake deadline (30 s) must not be what ends them
            async with trio.open_nursery() as peers_nursery:
                for stream in peers:
                    peers_nursery.start_soon(stall, stream, dropped)
                while not dropped:
                    await trio.sleep(0.05)
                peers_nursery.cancel_scope.cancel()
        assert dropped, "neither peer was dropped: 1.2 MiB buffered against a 1 MiB budget"
        for stream in peers:
            await trio.aclose_forcefully(stream)
        with trio.fail_after(30):
            result = await deploy_to("127.0.0.1", port, Deploy(workload=b"\0asm", args=("ok",)),
                                     Policy(allow_insecure_nil=True), stdout=io.BytesIO(),
                                     stderr=io.BytesIO())
        assert result.exit_status == 0 and ran == [("ok",)]
        nursery.cancel_scope.cancel()


def _forge_entry(cache_dir: Path, key: bytes, victim: bytes, evil: bytes) -> None:
    """What someone who knows the cache key can do: seal `evil`'s compiled code under the name
    of `victim`'s entry."""
    settings = EngineSettings()
    forger = CompileCache(cache_dir, key)
    compiled = wasmtime.Module(settings.make_engine(), evil)
    forger._write(forger.entry_path(victim, settings), bytes(compiled.serialize()))


@pytest.mark.parametrize("planted", ["group-readable", "another-owner"])
def test_a_cache_key_that_others_can_read_or_own_is_refused(tmp_path: Path, planted: str) -> None:
    """cache.key was used whoever owned it and whatever its mode: another user who planted it
    in a shared KEEPSHIM_CACHE_DIR (or could read it) forged an entry, and `keep run` of the
    victim's module ran the forger's code. Only a key file of ours, mode 0600, is used."""
    key = bytes(range(32))
    key_file = tmp_path / "cache.key"
    key_file.write_bytes(key)
    key_file.chmod(0o640 if planted == "group-readable" else 0o600)
    if planted == "another-owner":
        os.chown(key_file, 65534, 65534)
    evil = bytes(wasmtime.wat2wasm(
        '(module (func (export "answer") (result i32) (i32.const 666)))'))
    _forge_entry(tmp_path, key, WASM, evil)
    with pytest.raises(KeepError, match=r"cache\.key .*(mode 0640|owned by uid 65534)"):
        settings = EngineSettings()
        engine = settings.make_engine()
        module, _ = CompileCache.open(tmp_path).load_module(engine, settings, WASM)
        store = wasmtime.Store(engine)
        answer = wasmtime.Instance(store, module, []).exports(store)["answer"]
        assert isinstance(answer, wasmtime.Func)
        assert answer(store) == 42, "the forger's code ran"


# One deployment's volume grants must be distinct: the same name twice opened one image twice,
# two grants at one guest path hid one volume behind the other.


def test_keep_deploy_refuses_a_volume_granted_twice_before_connecting(tmp_path: Path) -> None:
    key = tmp_path / "data.key"
    key.write_bytes(b"k")
    module = tmp_path / "m.wasm"
    module.write_bytes(WASM)
    for specs, complaint in [((f"data={key}", f"data::/other={key}"), "'data' is granted twice"),
                             ((f"a::/data={key}", f"b::/data/.={key}"),
                              "two volumes are granted at guest path '/data'")]:
        arguments = [argument for spec in specs for argument in ("--volume-key", spec)]
        completed = subprocess.run(
            [sys.executable, "-m", "shim", "deploy", "--to", "127.0.0.1:1", *arguments, str(module)],
            capture_output=True, text=True, timeout=60)
        assert completed.returncode == 2, completed.stderr
        assert complaint in completed.stderr and len(completed.stderr.splitlines()) == 1


async def test_a_keep_refuses_a_deployment_that_grants_a_volume_twice(tmp_path: Path) -> None:
    """The keep opened the image twice and refused with 'VolumeInUse: ... is in use by another
    process' (no other process was involved)."""
    ran = []

    async def runner(deployment: Deployment) -> RunOutcome:
        ran.append(deployment)
        return RunOutcome(exit_status=0)

    keep = Keep(NilBackend(), runner, volumes={"data": tmp_path / "absent.img"})
    grants = (VolumeGrant("data", key_file=b"k"), VolumeGrant("data", key_file=b"k", guest_path="/b"))
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(keep.serve, "127.0.0.1", 0)
        with trio.fail_after(30), pytest.raises(DeployRefused, match="'data' is granted twice"):
            await deploy_to("127.0.0.1", port, Deploy(workload=b"\0asm", volumes=grants),
                            Policy(allow_insecure_nil=True), stdout=io.BytesIO(),
                            stderr=io.BytesIO())
        nursery.cancel_scope.cancel()
    assert not ran


# A keep.toml connect entry that pins its server meets whatever answers on the network.


def _certificate_only_openssl_accepts(directory: Path) -> tuple[Path, Path, str]:
    """A certificate whose critical flag is the BER boolean 0x01 (DER demands 0xFF): OpenSSL
    loads and sends it, cryptography's strict DER parser does not. Returns (certificate file,
    key file, SPKI SHA-256 of the key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (_builder(key)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    der = certificate.public_bytes(serialization.Encoding.DER)
    flag = der.index(bytes.fromhex("0101ff"))
    ber = der[:flag] + bytes.fromhex("010101") + der[flag + 3:]
    with pytest.raises(ValueError):
        x509.load_der_x509_certificate(ber)
    certificate_file, key_file = directory / "ber.pem", directory / "ber.key"
    certificate_file.write_text(ssl.DER_cert_to_PEM_cert(ber))
    key_file.write_bytes(_pem_key(key))
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return certificate_file, key_file, hashlib.sha256(spki).hexdigest()


async def test_a_pinned_server_whose_certificate_does_not_parse_is_a_clear_network_error(
        tmp_path: Path) -> None:
    """check_pin parsed the peer's certificate with cryptography and let its ValueError out:
    `keep run` with a pinned connect entry ended with 'keep: internal error: ExceptionGroup'
    (exit 70), a deployed workload with 'keep internal error', instead of refusing the server."""
    certificate_file, key_file, spki = _certificate_only_openssl_accepts(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certificate_file, key_file)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, functools.partial(_tls_server, server), 0)
        port = listeners[0].socket.getsockname()[1]
        config = KeepConfig(files=(*KeepConfig().files, ConnectFile(
            name="up", host="127.0.0.1", port=port, pin_sha256=spki)))
        with trio.fail_after(20), pytest.raises(NetworkError, match=r'connect "up": .*does not parse'):
            async with open_keep_network(config):
                pass
        nursery.cancel_scope.cancel()


# keep.toml's [tls] certificate and key: a key TLS 1.3 cannot use is one clear error at start.


def _self_signed_files(directory: Path, key: CertificateIssuerPrivateKeyTypes) -> tuple[Path, Path]:
    certificate = _builder(key).sign(
        key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    certificate_file, key_file = directory / "cert.pem", directory / "key.pem"
    certificate_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(_pem_key(key))
    return certificate_file, key_file


@pytest.mark.parametrize("kind", ["dsa", "secp256k1"])
def test_a_configured_key_tls13_cannot_sign_with_is_refused_at_start(tmp_path: Path, kind: str) -> None:
    """A DSA key (or ECDSA on a curve TLS 1.3 does not allow) loaded without complaint; then
    every client's handshake failed, logged as 'UNSUPPORTED_PROTOCOL', which points elsewhere."""
    key: CertificateIssuerPrivateKeyTypes = (
        dsa.generate_private_key(2048) if kind == "dsa" else ec.generate_private_key(ec.SECP256K1()))
    certificate_file, key_file = _self_signed_files(tmp_path, key)
    with pytest.raises(CertificateError, match=r"key\.pem: .*cannot sign TLS 1\.3 handshakes"):
        FileCertificateProvider(certificate_file, key_file).identity()


@pytest.mark.parametrize("kind", ["p384", "ed25519", "rsa"])
def test_keys_tls13_can_sign_with_still_load(tmp_path: Path, kind: str) -> None:
    key: CertificateIssuerPrivateKeyTypes
    if kind == "p384":
        key = ec.generate_private_key(ec.SECP384R1())
    elif kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = rsa.generate_private_key(65537, 2048)
    certificate_file, key_file = _self_signed_files(tmp_path, key)
    assert FileCertificateProvider(certificate_file, key_file).identity().spki_sha256()


_LOAD_IDENTITY = """
import sys
from pathlib import Path
from net.errors import CertificateError
from net.tls import FileCertificateProvider
try:
    FileCertificateProvider(Path(sys.argv[1]), Path(sys.argv[2])).identity()
except CertificateError as error:
    print(error)
"""


@pytest.mark.parametrize("which", ["certificate", "key"])
def test_a_configured_certificate_or_key_that_never_ends_is_one_clear_error(
        tmp_path: Path, which: str) -> None:
    """`certificate = "/dev/zero"` (or a huge file) was read whole: MemoryError, 'keep: internal
    error', exit 70, after eating the memory it could get. At most 1 MiB is read now."""
    certificate_file, key_file = _self_signed_files(tmp_path, ec.generate_private_key(ec.SECP256R1()))
    arguments = ("/dev/zero", str(key_file)) if which == "certificate" else (str(certificate_file),
                                                                             "/dev/zero")
    done = subprocess.run([sys.executable, "-c", _LOAD_IDENTITY, *arguments], capture_output=True,
                          text=True, timeout=60, preexec_fn=_limit_memory)
    assert done.returncode == 0, done.stderr[-2000:]
    # a device is refused unread since session 9 (net.files); a huge regular file by its size
    assert done.stdout.strip() == f"tls {which} /dev/zero: is a character device, not a regular file"


# keep.toml's error positions come from regular expressions run over hostile text (a deployed
# keep.toml arrives from anyone who connects, before anything is attested).

_BACKTRACKING_TOML = 'note = """\n' + ("[" + " " * 20000 + "a\n") * 3 + '"""\n'
"""Valid TOML (a multi-line string) whose lines look like the start of a table header: the
header expressions backtracked cubically over the spaces (2,000 spaces: 6-10 s a line)."""


def _keep_run_with_config(tmp_path: Path, text: str, *, timeout: float = 60,
                          limit_memory: bool = False) -> subprocess.CompletedProcess[str]:
    """`keep run --config keep.toml` with `text` as keep.toml (and a module that need not
    exist: the config is checked first)."""
    config = tmp_path / "keep.toml"
    config.write_text(text)
    return subprocess.run([sys.executable, "-m", "shim", "run", "--config", str(config),
                           str(tmp_path / "absent.wasm")], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=_limit_memory if limit_memory else None,
                          env={**os.environ, "KEEPSHIM_CACHE_DIR": str(tmp_path)})


def test_a_keep_toml_that_makes_the_line_index_backtrack_is_refused_at_once(tmp_path: Path) -> None:
    try:
        done = _keep_run_with_config(tmp_path, _BACKTRACKING_TOML, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("keep run spent more than 30 s locating keys in a 60 KB keep.toml")
    assert done.returncode == 2, done.stderr
    assert "keep.toml:1: note: unknown key" in done.stderr


def test_a_deployed_keep_toml_that_makes_the_line_index_backtrack_does_not_freeze_the_keep(
        tmp_path: Path) -> None:
    """preflight parses the deployed keep.toml on the keep's event loop: one such frame from
    anyone froze every connection of `keep serve` (and its signal handling) for hours."""
    environment = {**os.environ, "KEEPSHIM_CACHE_DIR": str(tmp_path / "cache")}
    process = subprocess.Popen([sys.executable, "-m", "shim", "serve", "--listen", "127.0.0.1:0"],
                               stderr=subprocess.PIPE, text=True, env=environment)
    try:
        assert process.stderr is not None
        found = re.search(r"serving on 127\.0\.0\.1:(\d+)", process.stderr.readline())
        assert found
        frame = Conversation("owner").send(Deploy(workload=b"\0asm", config=_BACKTRACKING_TOML))
        context = owner_client_context()
        with (socket.create_connection(("127.0.0.1", int(found.group(1))), timeout=30) as tcp,
              context.wrap_socket(tcp) as tls):
            tls.sendall(frame)
            try:
                answer = tls.recv(1 << 16)
            except TimeoutError:
                pytest.fail("the keep did not answer a deployment with a 60 KB keep.toml in 30 s")
        assert b'"type":"refused"' in answer and b"unknown key" in answer
    finally:
        process.kill()
        process.wait(timeout=20)


def test_a_keep_toml_with_a_very_long_dotted_key_is_refused_before_tomllib_sees_it(
        tmp_path: Path) -> None:
    """tomllib's time and memory grow with the square of a dotted key's length (16,000 parts:
    5.6 s and 1 GB; a 400 KB keep.toml of 'a.a.a...=1' needs ~150 GB): a deployed keep.toml
    from anyone who connects ran keep serve out of memory. Keys of keep.toml are at most three
    parts deep, so a dotted key of more than 16 is refused before parsing."""
    done = _keep_run_with_config(tmp_path, "args = []\n" + ".".join(["a"] * 60000) + " = 1\n",
                                 limit_memory=True)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "keep.toml:2: a dotted key of more than 16 parts" in done.stderr


def test_dotted_keys_and_dotted_values_of_an_ordinary_keep_toml_still_load() -> None:
    config = parse_config('env.HOST = "a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q.r"\n'
                          "[[files]]\nkind = 'null'\n[ tls ]\n")
    assert config.env["HOST"].count(".") == 17


def test_a_policy_with_a_very_long_dotted_key_is_one_clear_error() -> None:
    """(3,000 parts: small enough that tomllib would parse it here, in the test's process.)"""
    with pytest.raises(KeepError, match=r"policy\.toml:1: a dotted key of more than 16 parts"):
        parse_policy(".".join(["a"] * 3000) + " = 1\n")


async def test_exporting_the_certificate_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    """export_certificate wrote `NAME.partial` with an ordinary open: someone who can write the
    directory (export_certificate = "/tmp/keep-cert.pem") planted a symlink there and keep
    overwrote its target (as root: any file) with the certificate."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    export = tmp_path / "shared" / "keep-cert.pem"
    export.parent.mkdir()
    export.with_name("keep-cert.pem.partial").symlink_to(victim)
    listen = ListenFile(name="web", addr="127.0.0.1", port=0)
    config = KeepConfig(files=(*KeepConfig().files, listen), tls=TlsSettings(export_certificate=export))
    async with open_keep_network(config) as network:
        assert network.identity is not None
        assert export.read_bytes() == network.identity.certificate_chain_pem
    assert victim.read_text() == "precious\n"


_CONNECT = ('[[files]]\nkind = "null"\n[[files]]\nkind = "stdout"\n[[files]]\nkind = "stderr"\n'
            '[[files]]\nkind = "connect"\nname = "up"\nhost = "127.0.0.1"\nport = 9\n'
            'pin_sha256 = "' + "ab" * 32 + '"\n')


@pytest.mark.parametrize("server_name", [".example", "x\\u0000y", "a" * 64 + ".example",
                                         "a." * 130 + "b"])
def test_a_server_name_tls_cannot_send_is_a_config_error(tmp_path: Path, server_name: str) -> None:
    """server_name = ".example" (or with a NUL) made ssl raise ValueError while opening the
    socket: 'keep: internal error: ExceptionGroup', exit 70 (a deployed workload: 'keep internal
    error'); an over-long one failed in the handshake as 'SSL3_EXT_INVALID_SERVERNAME'."""
    done = _keep_run_with_config(tmp_path, _CONNECT + f'server_name = "{server_name}"\n')
    assert done.returncode == 2, done.stderr
    assert re.fullmatch(r"keep: .*keep\.toml:13: files\[3\]\.server_name: not a host name TLS can "
                        r"send \(SNI\): .*\n", done.stderr), done.stderr


def test_ordinary_server_names_still_load() -> None:
    for name in ("example.com", "é.example", "127.0.0.1", "a" * 63 + ".example"):
        entry = parse_config(_CONNECT + f'server_name = "{name}"\n').sockets[0]
        assert isinstance(entry, ConnectFile) and entry.server_name == name


@pytest.mark.parametrize("host", ["a..b", ".example", "a" * 70 + ".example"])
def test_a_connect_host_the_resolver_cannot_encode_is_a_config_error(tmp_path: Path, host: str) -> None:
    """The resolver's IDNA encoding raised UnicodeError for these: 'keep: internal error:
    ExceptionGroup', exit 70."""
    done = _keep_run_with_config(tmp_path, _CONNECT.replace('host = "127.0.0.1"', f'host = "{host}"'))
    assert done.returncode == 2, done.stderr
    assert re.fullmatch(r"keep: .*keep\.toml:10: files\[3\]\.host: not a host name or IP "
                        r"address: .*\n", done.stderr), done.stderr


async def test_net_refuses_a_host_name_the_resolver_cannot_encode_as_a_connect_failure() -> None:
    board = ReadinessBoard(trio.lowlevel.current_trio_token())
    async with trio.open_nursery() as nursery:
        with pytest.raises(ConnectFailed, match=r"cannot connect to a\.\.b:9: not a valid host name"):
            await open_connection("a..b", 9, None, ServerVerification(), board, nursery)


def test_a_frame_arriving_in_many_pieces_has_its_header_parsed_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Conversation.next_message re-parsed the (up to 1 MiB) JSON header for every piece of the
    payload that arrived: a 0.8 MiB header with 32 MiB of payload in 16 KiB TLS records cost
    9.2 s of the keep's event loop (a 128 MiB one ~37 s), for anyone who connects, over and
    over. The header is parsed once per frame now."""
    parsed: list[int] = []

    class CountingJson:
        dumps = staticmethod(json.dumps)

        @staticmethod
        def loads(text: str | bytes) -> object:
            parsed.append(len(text))
            return json.loads(text)

    deploy = Deploy(workload=bytes(1 << 20), args=("x" * 1000,))
    frame = Conversation("owner").send(deploy)
    monkeypatch.setattr(attest_protocol, "json", CountingJson)
    keep = Conversation("keep")
    messages = []
    for start in range(0, len(frame), 4096):
        keep.receive_data(frame[start:start + 4096])
        if (message := keep.next_message()) is not None:
            messages.append(message)
    assert messages == [deploy]
    assert len(parsed) == 1, f"the header was parsed {len(parsed)} times"


async def test_a_deployment_over_the_protocol_limits_is_refused_before_connecting() -> None:
    """A module over 128 MiB (or args over the 1 MiB header) was found too big only after
    `keep deploy` had connected, attested and announced the keep, leaving the keep a silent
    connection; it is refused before any connection now (nothing listens on the port)."""
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for deploy, limit in [(Deploy(workload=bytes(attest_protocol.MAX_WORKLOAD_BYTES + 1)),
                           "payload"),
                          (Deploy(workload=b"\0asm", args=("x" * (1 << 20),)), "header")]:
        with pytest.raises(attest_protocol.LocalProtocolError, match=f"deploy {limit} is"):
            await deploy_to("127.0.0.1", port, deploy, Policy(allow_insecure_nil=True),
                            stdout=io.BytesIO(), stderr=io.BytesIO())


async def test_a_refusal_whose_reason_is_huge_still_reaches_the_owner() -> None:
    """A deployed keep.toml whose args is a 400 KB string of single quotes (and one double
    quote) made a ConfigError quoting the value with repr, two bytes per quote, three in JSON:
    the refusal broke the 1 MiB header limit, sending it raised, and the owner saw 'the
    connection to the keep broke' instead of why. Reasons are shortened."""
    async def runner(deployment: Deployment) -> RunOutcome:
        return RunOutcome(exit_status=0)

    keep = Keep(NilBackend(), runner)
    config = 'args = "' + "'" * 400_000 + '\\""\n'
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(keep.serve, "127.0.0.1", 0)
        with trio.fail_after(30), pytest.raises(DeployRefused, match=r"args: expected a list .*\(shortened\)"):
            await deploy_to("127.0.0.1", port, Deploy(workload=b"\0asm", config=config),
                            Policy(allow_insecure_nil=True), stdout=io.BytesIO(),
                            stderr=io.BytesIO())
        nursery.cancel_scope.cancel()


async def test_a_huge_run_error_still_reaches_the_owner_with_the_volume_states() -> None:
    """The same for `finished`: an error over the header limit (a run that noted thousands of
    integrity failures) could not be sent, so the owner lost the exit status and the volumes'
    states it pins next time."""
    async def runner(deployment: Deployment) -> RunOutcome:
        return RunOutcome(exit_status=3, error="volume 'v': integrity failure; " * 60_000)

    keep = Keep(NilBackend(), runner)
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(keep.serve, "127.0.0.1", 0)
        with trio.fail_after(30):
            result = await deploy_to("127.0.0.1", port, Deploy(workload=b"\0asm"),
                                     Policy(allow_insecure_nil=True), stdout=io.BytesIO(),
                                     stderr=io.BytesIO())
        nursery.cancel_scope.cancel()
    assert result.exit_status == 3
    assert result.error is not None and result.error.endswith("… (shortened)")
