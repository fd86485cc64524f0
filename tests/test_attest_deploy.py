"""`keep serve` + `keep deploy` on loopback: attested delivery end to end.

The CLI tests run both sides as real `keep` processes; the concurrency tests run a `Keep` in
process with a runner that waits on an event, so "a second deployment while one runs" is
deterministic."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fixture_build import WasmFixture

import shim.serve
from shim.attest import (
    NO_NONCE,
    Conversation,
    Deploy,
    InsecureNilNotAllowed,
    NilBackend,
    Policy,
    VolumeGenerationTooOld,
    VolumeGrant,
    open_verified_stream,
    owner_client_context,
    verify_keep_certificate,
)
from shim.config import KeepConfig
from shim.deploy import DeployRefused, DeployResult, deploy_to
from shim.errors import KeepError
from shim.serve import BUSY_REASON, Deployment, Keep, RunOutcome, run_deployment
from storage.luks2 import KdfCost
from storage.volume import MIN_VOLUME_SIZE, create_volume, open_volume

NIL_OK = Policy(allow_insecure_nil=True)


class Keeper:
    """A `keep serve` process on a free loopback port, in its own cwd/HOME/TMPDIR/cache dirs."""

    def __init__(self, root: Path, *serve_arguments: str) -> None:
        self.root = root
        for name in ("cwd", "home", "tmp", "cache"):
            (root / name).mkdir(parents=True, exist_ok=True)
        environment = {**os.environ, "HOME": str(root / "home"), "TMPDIR": str(root / "tmp"),
                       "KEEPSHIM_CACHE_DIR": str(root / "cache")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "shim", "serve", "--listen", "127.0.0.1:0", *serve_arguments],
            cwd=root / "cwd",
            env=environment, stderr=subprocess.PIPE, text=True)
        assert self.process.stderr is not None
        first = self.process.stderr.readline()
        found = re.search(r"serving on 127\.0\.0\.1:(\d+) \(backend nil, measurement ([0-9a-f]{64})\)", first)
        assert found, first
        self.port, self.measurement = int(found.group(1)), found.group(2)

    def deploy(self, *arguments: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "shim", "deploy", "--to", f"127.0.0.1:{self.port}",
                               *arguments], capture_output=True, text=True, timeout=60, cwd=cwd)

    def wait(self) -> int:
        return self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        assert self.process.stderr is not None
        self.process.stderr.close()


@pytest.fixture
def keeper(tmp_path: Path) -> Iterator[Keeper]:
    started = Keeper(tmp_path / "keep")
    try:
        yield started
    finally:
        started.stop()


def test_deploy_streams_output_and_exit_status_then_the_keep_exits(keeper: Keeper,
                                                                   wasm_fixture: WasmFixture) -> None:
    completed = keeper.deploy("--allow-insecure-nil", str(wasm_fixture("exit_code")), "exit", "7")
    assert completed.returncode == 7
    assert completed.stdout == "mode=exit code=7\n"
    assert "stderr before exit\n" in completed.stderr
    assert "WARNING: accepted an INSECURE nil keep" in completed.stderr
    assert f"measurement {keeper.measurement}" in completed.stderr
    assert keeper.wait() == 0  # one deployment, then the keep is done


def test_guest_args_and_keep_toml_reach_the_guest(keeper: Keeper, wasm_fixture: WasmFixture,
                                                  tmp_path: Path) -> None:
    config = tmp_path / "keep.toml"
    config.write_text('args = ["from-config"]\n[env]\nGREETING = "hi there"\n')
    completed = keeper.deploy("--allow-insecure-nil", "--config", str(config),
                              str(wasm_fixture("args_env")), "from command", "")
    assert completed.returncode == 0, completed.stderr
    assert "argv[0]=[main.wasm]\nargv[1]=[from-config]\nargv[2]=[from command]\nargv[3]=[]\n" in completed.stdout
    assert "getenv(GREETING)=[hi there]" in completed.stdout
    assert "getenv(HOME)=(unset)" in completed.stdout  # the keep host's environment stays out


def test_a_trap_comes_back_as_134_with_the_message(keeper: Keeper, wasm_fixture: WasmFixture) -> None:
    completed = keeper.deploy("--allow-insecure-nil", str(wasm_fixture("exit_code")), "trap")
    assert completed.returncode == 134
    assert "the keep reports: guest trapped" in completed.stderr


def test_nil_without_the_flag_is_refused_and_the_keep_keeps_waiting(keeper: Keeper,
                                                                    wasm_fixture: WasmFixture) -> None:
    refused = keeper.deploy(str(wasm_fixture("hello")))
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.startswith("keep: attestation refused (insecure nil):")
    assert len(refused.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert keeper.process.poll() is None
    accepted = keeper.deploy("--allow-insecure-nil", str(wasm_fixture("hello")))
    assert accepted.returncode == 0 and accepted.stdout == "Hello, world!\n"


def test_a_policy_with_another_measurement_is_refused_naming_it(keeper: Keeper, wasm_fixture: WasmFixture,
                                                                 tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(f'allowed_measurements = ["{"00" * 32}"]\n')
    refused = keeper.deploy("--allow-insecure-nil", "--policy", str(policy), str(wasm_fixture("hello")))
    assert refused.returncode == 1
    assert f"attestation refused (measurement): measurement {keeper.measurement}" in refused.stderr
    policy.write_text(f'allowed_backends = ["nil"]\nallowed_measurements = ["{keeper.measurement}"]\n')
    accepted = keeper.deploy("--allow-insecure-nil", "--policy", str(policy), str(wasm_fixture("hello")))
    assert accepted.returncode == 0, accepted.stderr


def test_bad_policy_and_bad_config_fail_on_the_owners_side(keeper: Keeper, wasm_fixture: WasmFixture,
                                                           tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("allow_debug = 1\n")
    completed = keeper.deploy("--allow-insecure-nil", "--policy", str(policy), str(wasm_fixture("hello")))
    assert completed.returncode == 1 and "allow_debug must be true or false" in completed.stderr
    config = tmp_path / "keep.toml"
    config.write_text("colour = 1\n")
    completed = keeper.deploy("--allow-insecure-nil", "--config", str(config), str(wasm_fixture("hello")))
    assert completed.returncode == 2 and "colour" in completed.stderr
    assert keeper.process.poll() is None


def _owner_key_and_keep_image(keep_root: Path, owner: Path) -> tuple[Path, Path]:
    """The owner's key file (owner/data.key) and a new volume it opens, on the keep host
    (keep_root/cwd/data.img, inside the directories the scans cover)."""
    (keep_root / "cwd").mkdir(parents=True)
    owner.mkdir()
    key_file = owner / "data.key"
    key_file.write_bytes(b"owner-key-" + os.urandom(16).hex().encode())
    image = keep_root / "cwd" / "data.img"
    create_volume(image, MIN_VOLUME_SIZE, key_file.read_bytes(), pbkdf="pbkdf2",
                  kdf_cost=KdfCost(iterations=1000)).close()
    return key_file, image


@pytest.mark.slow  # two keep processes, two volume opens: 5-12 s on a shared 2-core machine
def test_volume_state_comes_back_is_pinned_and_a_rollback_is_refused(tmp_path: Path,
                                                                     wasm_fixture: WasmFixture) -> None:
    """The owner's key opens the volume inside the keep; the final state returns and is stored;
    the next deployment pins it, so the host's older copy of the image is refused."""
    keep_root, owner = tmp_path / "keep", tmp_path / "owner"
    key_file, image = _owner_key_and_keep_image(keep_root, owner)
    old_copy = image.read_bytes()
    with open_volume(image, key_file.read_bytes()) as volume:  # a later change (an earlier run)
        note = volume.fs.create(1, b"note")
        volume.fs.write(note.ino, 0, b"written after the host's copy")
    state_file = owner / "volumes.json"
    hello = str(wasm_fixture("hello"))

    first = Keeper(keep_root, "--volume", f"data={image}")
    try:
        wrong = owner / "wrong.key"
        wrong.write_bytes(b"not the key")
        refused = first.deploy("--allow-insecure-nil", "--volume-key", f"data={wrong}", hello)
        assert refused.returncode == 1 and "volume 'data': WrongPassphrase" in refused.stderr
        completed = first.deploy("--allow-insecure-nil", "--volume-key", f"data={key_file}",
                                 "--volume-state", str(state_file), hello)
        assert completed.returncode == 0, completed.stderr
        assert first.wait() == 0
    finally:
        first.stop()
    stored = json.loads(state_file.read_text())["data"]
    assert stored["generation"] > 0 and re.fullmatch(r"[0-9a-f]{64}", stored["root_mac"])
    for path in keep_root.rglob("*"):  # the key file's bytes never reach the keep's host
        assert not path.is_file() or key_file.read_bytes() not in path.read_bytes(), path

    image.write_bytes(old_copy)  # the host rolls the image back
    second = Keeper(keep_root, "--volume", f"data={image}")
    try:
        rolled_back = second.deploy("--allow-insecure-nil", "--volume-key", f"data={key_file}",
                                    "--volume-state", str(state_file), hello)
        assert rolled_back.returncode == 1
        assert "refused the deployment: volume 'data': RollbackError" in rolled_back.stderr
        assert json.loads(state_file.read_text())["data"] == stored  # the pin is kept
    finally:
        second.stop()


def test_a_volume_the_keep_does_not_offer_is_refused(keeper: Keeper, wasm_fixture: WasmFixture,
                                                     tmp_path: Path) -> None:
    key = tmp_path / "volume.key"
    key.write_bytes(os.urandom(64))
    completed = keeper.deploy("--allow-insecure-nil", "--volume-key", f"data={key}", str(wasm_fixture("hello")))
    assert completed.returncode == 1
    assert "refused the deployment: this keep has no volume 'data'" in completed.stderr


def test_the_keep_host_never_sees_the_workload_or_the_keys(keeper: Keeper, wasm_fixture: WasmFixture,
                                                           tmp_path: Path) -> None:
    module = wasm_fixture("args_env").read_bytes()
    secret_argument = "secret-" + os.urandom(8).hex()
    completed = keeper.deploy("--allow-insecure-nil", str(wasm_fixture("args_env")), secret_argument)
    assert completed.returncode == 0 and secret_argument in completed.stdout
    assert keeper.wait() == 0
    windows = [module[offset:offset + 64] for offset in range(0, len(module) - 64, len(module) // 8)]
    # Everything the keep process could write to without naming an absolute path: its cwd,
    # HOME, TMPDIR and compile cache directory.
    for path in keeper.root.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert not any(window in content for window in windows), f"workload bytes in {path}"
            assert secret_argument.encode() not in content, f"guest argument in {path}"


# In process: a keep that already runs a workload refuses another.


async def test_a_keep_that_already_runs_a_workload_refuses_another() -> None:
    started, release = trio.Event(), trio.Event()

    async def runner(deployment: Deployment) -> RunOutcome:
        started.set()
        await release.wait()
        await trio.to_thread.run_sync(deployment.stdout.write, b"first done\n")
        return RunOutcome(exit_status=5)

    keep = Keep(NilBackend(), runner)
    first_out = io.BytesIO()
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(keep.serve, "127.0.0.1", 0)
        results = []

        async def first() -> None:
            results.append(await deploy_to("127.0.0.1", port, Deploy(workload=b"\0asm one"), NIL_OK,
                                           stdout=first_out, stderr=io.BytesIO()))

        nursery.start_soon(first)
        await started.wait()
        with pytest.raises(DeployRefused, match=BUSY_REASON):
            await deploy_to("127.0.0.1", port, Deploy(workload=b"\0asm two"), NIL_OK,
                            stdout=io.BytesIO(), stderr=io.BytesIO())
        release.set()
        await keep.finished.wait()
    assert results[0].exit_status == 5 and first_out.getvalue() == b"first done\n"


async def test_the_owner_refuses_before_sending_anything_when_evidence_fails() -> None:
    received = []

    async def runner(deployment: Deployment) -> RunOutcome:
        received.append(deployment.message)
        return RunOutcome(0)

    keep = Keep(NilBackend(), runner)
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(keep.serve, "127.0.0.1", 0)
        with pytest.raises(InsecureNilNotAllowed):
            await deploy_to("127.0.0.1", port, Deploy(workload=b"\0asm"), Policy(),
                            stdout=io.BytesIO(), stderr=io.BytesIO())
        nursery.cancel_scope.cancel()
    assert received == []


async def test_a_pin_below_the_policy_minimum_is_refused_before_connecting() -> None:
    deploy = Deploy(workload=b"\0asm", volumes=(VolumeGrant("data", key_file=b"k" * 64, pinned_generation=3),))
    with pytest.raises(VolumeGenerationTooOld, match="below the policy's min_volume_generation 4"):
        await deploy_to("127.0.0.1", 1, deploy, Policy(min_volume_generation=4, allow_insecure_nil=True),
                        stdout=io.BytesIO(), stderr=io.BytesIO())


def test_a_deployed_tls_server_uses_the_attested_key(keeper: Keeper, wasm_fixture: WasmFixture,
                                                     tmp_path: Path) -> None:
    """keep.toml's listen socket terminates TLS inside the keep with the key the owner attested:
    a client pins the SPKI `keep deploy` announced, and the certificate carries nil evidence."""
    port = _free_port()
    config = tmp_path / "keep.toml"
    config.write_text(STDIO_TOML + _listen_toml("echo", port))
    deploy = subprocess.Popen(
        [sys.executable, "-m", "shim", "deploy", "--to", f"127.0.0.1:{keeper.port}", "--allow-insecure-nil",
         "--config", str(config), str(wasm_fixture("net_echo_server")), "echo", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        spki = _announced_spki(deploy)
        payload = os.urandom(3000)
        certificate, echoed = _echo_with_retries(port, payload)
        assert echoed == payload
        assert _spki_sha256(certificate) == spki
        assert verify_keep_certificate(certificate, NO_NONCE, NIL_OK).backend == "nil"
        stdout, _ = deploy.communicate(timeout=60)
        assert deploy.returncode == 0
        assert "served 1 errors 0" in stdout
    finally:
        if deploy.poll() is None:
            deploy.kill()
            deploy.communicate(timeout=10)


def _tls_client_with_retries(port: int) -> ssl.SSLSocket:
    """A TLS connection to the guest's listener, which opens once the keep accepted the
    deployment (the client pins by SPKI afterwards, so no CA check here)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    deadline = time.monotonic() + 30
    while True:
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=30)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    return context.wrap_socket(raw)


def _echo_with_retries(port: int, payload: bytes) -> tuple[bytes, bytes]:
    """Send the payload, read it back, end with close_notify; returns (peer certificate DER,
    echoed bytes)."""
    with _tls_client_with_retries(port) as tls:
        certificate = tls.getpeercert(binary_form=True)
        assert certificate is not None
        tls.sendall(payload)
        received = bytearray()
        while len(received) < len(payload):
            chunk = tls.recv(65536)
            if not chunk:
                break
            received += chunk
        tls.unwrap().close()  # close_notify both ways, as the echo server expects
    return certificate, bytes(received)


def _announced_spki(deploy: subprocess.Popen[str]) -> str:
    """The key SHA-256 `keep deploy` announces once the keep is attested."""
    assert deploy.stderr is not None
    while True:
        line = deploy.stderr.readline()
        assert line, "keep deploy ended before announcing the keep"
        found = re.search(r"key spki-sha256 ([0-9a-f]{64})", line)
        if found:
            return found.group(1)


def _spki_sha256(certificate_der: bytes) -> str:
    public_key = x509.load_der_x509_certificate(certificate_der).public_key()
    return hashlib.sha256(public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def _free_port() -> int:
    with socket.socket() as probe:  # a loopback port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


STDIO_TOML = '[[files]]\nkind = "stdin"\n[[files]]\nkind = "stdout"\n[[files]]\nkind = "stderr"\n'


def _listen_toml(name: str, port: int) -> str:
    return f'[[files]]\nkind = "listen"\nname = "{name}"\naddr = "127.0.0.1"\nport = {port}\n'


@pytest.mark.slow  # two keeps, two deployments, two volume opens
def test_a_deployed_workload_serves_tls_and_keeps_its_files_on_the_encrypted_volume(
        tmp_path: Path, wasm_fixture: WasmFixture) -> None:
    """Issue 7's full deployment: attest, deploy with a keep.toml TLS listener and a volume key;
    a client (pinning the attested key) hands the guest a secret line that it writes to the
    volume; the next deployment (a new keep) reads it back. The keep host's disk, image included,
    never holds the line, the key file or the workload in plaintext."""
    keep_root, owner = tmp_path / "keep", tmp_path / "owner"
    key_file, image = _owner_key_and_keep_image(keep_root, owner)
    module = wasm_fixture("net_deploy_store")
    state_file = owner / "volumes.json"
    markers: list[str] = []
    generations: list[int] = []
    for round_number in (1, 2):
        port = _free_port()
        config = owner / "keep.toml"
        config.write_text(STDIO_TOML + _listen_toml("store", port))
        keeper = Keeper(keep_root, "--volume", f"data={image}")
        deploy = subprocess.Popen(
            [sys.executable, "-m", "shim", "deploy", "--to", f"127.0.0.1:{keeper.port}",
             "--allow-insecure-nil", "--config", str(config), "--volume-key", f"data={key_file}",
             "--volume-state", str(state_file), str(module), "store"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            spki = _announced_spki(deploy)
            markers.append(f"secret-{round_number}-{os.urandom(12).hex()}")
            with _tls_client_with_retries(port) as tls:
                assert _spki_sha256(tls.getpeercert(binary_form=True) or b"") == spki
                tls.sendall(markers[-1].encode() + b"\n")
                reply = bytearray()
                while chunk := tls.recv(4096):
                    reply += chunk
            assert bytes(reply) == f"stored {len(markers[-1]) + 1} bytes\n".encode()
            stdout, stderr = deploy.communicate(timeout=60)
            assert deploy.returncode == 0, stderr
            assert stdout == "".join(f"{marker}\n" for marker in markers)  # round 2 sees round 1
            assert keeper.wait() == 0
        finally:
            if deploy.poll() is None:
                deploy.kill()
                deploy.communicate(timeout=10)
            keeper.stop()
        generations.append(json.loads(state_file.read_text())["data"]["generation"])
    assert generations[1] > generations[0]

    workload = module.read_bytes()
    forbidden = [key_file.read_bytes(), *(workload[i:i + 64] for i in range(0, len(workload) - 64, 4096))]
    for marker in markers:
        forbidden += [marker.encode(), marker.encode("utf-16-le"), base64.b64encode(marker.encode())]
    for path in keep_root.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert not any(needle in content for needle in forbidden), f"plaintext in {path}"


async def test_an_owner_that_goes_away_mid_run_does_not_wedge_the_keep() -> None:
    owner_gone, wrote = trio.Event(), []

    async def runner(deployment: Deployment) -> RunOutcome:
        await owner_gone.wait()
        for _ in range(40):  # more than the output channel holds: must not block forever
            wrote.append(await trio.to_thread.run_sync(deployment.stdout.write, b"x" * 1000))
        return RunOutcome(exit_status=0)

    keep = Keep(NilBackend(), runner)
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(keep.serve, "127.0.0.1", 0)
        stream, _claims = await open_verified_stream("127.0.0.1", port, NIL_OK)
        owner = Conversation("owner")
        await stream.send_all(owner.send(Deploy(workload=b"\0asm")))
        while owner.next_message() is None:
            owner.receive_data(await stream.receive_some())
        await trio.aclose_forcefully(stream)
        owner_gone.set()
        with trio.fail_after(30):
            await keep.finished.wait()
    assert len(wrote) == 40


async def test_deploying_to_something_that_is_not_a_keep_is_one_clear_error() -> None:
    async def plaintext(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, plaintext, 0)
        port = listeners[0].socket.getsockname()[1]
        with pytest.raises(KeepError, match=r"no TLS 1\.3 keep at 127\.0\.0\.1"):
            await deploy_to("127.0.0.1", port, Deploy(workload=b"\0asm"), NIL_OK,
                            stdout=io.BytesIO(), stderr=io.BytesIO())
        nursery.cancel_scope.cancel()
    with pytest.raises(KeepError, match=r"cannot connect to 127\.0\.0\.1"):
        await deploy_to("127.0.0.1", port, Deploy(workload=b"\0asm"), NIL_OK,
                        stdout=io.BytesIO(), stderr=io.BytesIO())


def test_bad_volume_key_options_fail_before_connecting(tmp_path: Path, wasm_fixture: WasmFixture) -> None:
    key = tmp_path / "data.key"
    key.write_bytes(b"k")
    for spec, complaint in [(f"data::relative={key}", "must be absolute"),
                            (f"={key}", "expected NAME[::GUEST_PATH]=KEYFILE"),
                            (f"data={tmp_path / 'absent.key'}", "cannot read")]:
        completed = subprocess.run(
            [sys.executable, "-m", "shim", "deploy", "--to", "127.0.0.1:1", "--volume-key", spec,
             str(wasm_fixture("hello"))], capture_output=True, text=True, timeout=60)
        assert completed.returncode == 2, completed.stderr
        assert complaint in completed.stderr and len(completed.stderr.splitlines()) == 1


@pytest.mark.parametrize(("backend", "device"), [("sev-snp", "/dev/sev-guest"), ("tdx", "/dev/tdx_guest"),
                                                 ("sgx", "/dev/sgx_enclave")])
def test_serve_on_a_hardware_backend_this_machine_lacks_is_one_clear_line(backend: str, device: str) -> None:
    if Path(device).exists():
        pytest.skip(f"this machine has {device}")
    completed = subprocess.run([sys.executable, "-m", "shim", "serve", "--listen", "127.0.0.1:0",
                                "--backend", backend], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 1
    assert completed.stderr == (f"keep: {backend} is not supported on this machine ({device} is missing); "
                                f"cannot produce {backend} evidence\n")


# Hostile input before any deployment: one connection can never end the keep.

DEEP_TOML = "a = " + "[" * 5000 + "]" * 5000 + "\n"


async def _quiet_deploy(port: int, deploy: Deploy | None = None) -> DeployResult:
    """deploy_to the in-process keep on `port` (a tiny workload by default), its output dropped."""
    return await deploy_to("127.0.0.1", port, deploy or Deploy(workload=b"\0asm"), NIL_OK,
                           stdout=io.BytesIO(), stderr=io.BytesIO())


async def _send_raw_frame(port: int, frame: bytes) -> bytes:
    """Any TLS client (no nonce, no attestation): send `frame`, return what the keep answers
    before it closes the connection."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, owner_client_context())
    answer = b""
    with trio.fail_after(30):
        try:
            await stream.send_all(frame)
            while chunk := await stream.receive_some():
                answer += chunk
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)
    return answer


async def test_nested_json_and_nested_toml_do_not_end_the_keep() -> None:
    ran = []

    async def runner(deployment: Deployment) -> RunOutcome:
        ran.append(deployment.message.workload)
        return RunOutcome(0)

    keep = Keep(NilBackend(), runner)
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(keep.serve, "127.0.0.1", 0)
        header = b"[" * 200_000  # under MAX_HEADER_BYTES, too deep for json's recursion
        assert await _send_raw_frame(port, struct.pack(">II", len(header), 0) + header) == b""
        with pytest.raises(DeployRefused, match="nested too deeply"):
            await _quiet_deploy(port, Deploy(workload=b"\0asm", config=DEEP_TOML))
        result = await _quiet_deploy(port, Deploy(workload=b"\0asm ok"))
        with trio.fail_after(30):
            await keep.finished.wait()
    assert result.exit_status == 0 and ran == [b"\0asm ok"]


async def test_an_unexpected_error_in_preflight_is_a_refusal_and_the_keep_stays_free(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_preflight(deploy: Deploy) -> KeepConfig:
        raise RuntimeError("a bug in preflight")

    async def runner(deployment: Deployment) -> RunOutcome:
        return RunOutcome(0)

    keep = Keep(NilBackend(), runner)
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(keep.serve, "127.0.0.1", 0)
        with monkeypatch.context() as patched:
            patched.setattr(shim.serve, "preflight", broken_preflight)
            with pytest.raises(DeployRefused, match="RuntimeError: a bug in preflight"):
                await _quiet_deploy(port)
        result = await _quiet_deploy(port)
        with trio.fail_after(30):
            await keep.finished.wait()
    assert result.exit_status == 0


async def test_an_unexpected_error_in_one_connection_drops_only_that_connection(
        capsys: pytest.CaptureFixture[str]) -> None:
    class FlakyKeep(Keep):
        failed = False

        async def _converse(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
            if not self.failed:
                self.failed = True
                raise RuntimeError("a bug in one conversation")
            await super()._converse(stream)

    async def runner(deployment: Deployment) -> RunOutcome:
        return RunOutcome(3)

    keep = FlakyKeep(NilBackend(), runner)
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(keep.serve, "127.0.0.1", 0)
        with pytest.raises(KeepError, match="the connection to the keep broke"):
            await deploy_to("127.0.0.1", port, Deploy(workload=b"\0asm"), NIL_OK,
                            stdout=io.BytesIO(), stderr=io.BytesIO())
        result = await _quiet_deploy(port)
        with trio.fail_after(30):
            await keep.finished.wait()
    assert result.exit_status == 3
    assert "RuntimeError: a bug in one conversation" in capsys.readouterr().err


def test_deeply_nested_owner_files_are_one_line_errors(tmp_path: Path, wasm_fixture: WasmFixture) -> None:
    deep_toml = tmp_path / "deep.toml"
    deep_toml.write_text(DEEP_TOML)
    deep_json = tmp_path / "deep.json"
    deep_json.write_text("[" * 100_000)
    for option, path, status in [("--config", deep_toml, 2), ("--policy", deep_toml, 1),
                                 ("--volume-state", deep_json, 2)]:
        completed = subprocess.run(
            [sys.executable, "-m", "shim", "deploy", "--to", "127.0.0.1:1", option, str(path),
             str(wasm_fixture("hello"))], capture_output=True, text=True, timeout=60)
        assert completed.returncode == status, (option, completed.stderr)
        assert "nested too deeply" in completed.stderr and len(completed.stderr.splitlines()) == 1


# A deployed workload trusts nothing of the keep host's: not its CA files, not its CA store.

CONNECT_TOML = '[[files]]\nkind = "connect"\nname = "api"\nhost = "127.0.0.1"\nport = 9\n'


@pytest.mark.parametrize(("extra", "refusal"), [
    ("", "a deployed workload's TLS connect needs pin_sha256: without it the keep host's CA store"),
    ('ca = "/etc/ssl/certs/ca-certificates.crt"\n', "CA files on the keep host cannot be trusted"),
])
async def test_a_deployed_tls_connect_without_a_pin_is_refused(extra: str, refusal: str) -> None:
    """Without `ca` and pin, net.tls verifies the server with load_default_certs(): the host's
    /etc/ssl/certs or the SSL_CERT_FILE of the host's environment, so the host could add its own
    CA and read the attested workload's outgoing TLS. Refused before the deployment starts."""
    ran = []

    async def runner(deployment: Deployment) -> RunOutcome:
        ran.append(deployment)
        return RunOutcome(0)

    keep = Keep(NilBackend(), runner)
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(keep.serve, "127.0.0.1", 0)
        with pytest.raises(DeployRefused, match=re.escape(f"socket 'api': {refusal}")):
            await _quiet_deploy(port, Deploy(workload=b"\0asm", config=CONNECT_TOML + extra))
        pinned = CONNECT_TOML + f'pin_sha256 = "{"ab" * 32}"\n'
        assert (await _quiet_deploy(port, Deploy(workload=b"\0asm", config=pinned))).exit_status == 0
        with trio.fail_after(30):
            await keep.finished.wait()
    assert len(ran) == 1


# A silent peer is an error after a deadline, not a wait forever.


async def test_a_peer_that_never_answers_the_handshake_times_out() -> None:
    """A wedged keep or a wrong port that accepts TCP and never answers the ClientHello."""
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, silent, 0)
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(30), pytest.raises(
                KeepError, match=rf"TLS handshake with 127\.0\.0\.1:{port} timed out after 0\.5 s"):
            await deploy_to("127.0.0.1", port, Deploy(workload=b"\0asm"), NIL_OK,
                            stdout=io.BytesIO(), stderr=io.BytesIO(), handshake_seconds=0.5)
        nursery.cancel_scope.cancel()


async def test_a_keep_that_never_answers_the_deployment_times_out() -> None:
    class SilentKeep(Keep):
        async def _converse(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
            await trio.sleep_forever()

    keep = SilentKeep(NilBackend(), run_deployment)
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(keep.serve, "127.0.0.1", 0)
        with trio.fail_after(30), pytest.raises(
                KeepError, match=rf"the keep at 127\.0\.0\.1:{port} did not answer the deployment "
                                 r"within 0\.5 s"):
            await deploy_to("127.0.0.1", port, Deploy(workload=b"\0asm"), NIL_OK,
                            stdout=io.BytesIO(), stderr=io.BytesIO(), answer_seconds=0.5)
        nursery.cancel_scope.cancel()


# SIGINT / SIGTERM stop `keep serve`, a running guest included.


async def test_interrupting_the_keep_stops_the_guest_and_the_owner_is_told() -> None:
    started = trio.Event()

    async def runner(deployment: Deployment) -> RunOutcome:
        started.set()
        await trio.sleep_forever()  # a guest computing forever (the real runner is interruptible)
        raise AssertionError("not reached")

    keep = Keep(NilBackend(), runner)
    results = []
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(keep.serve, "127.0.0.1", 0)

        async def owner() -> None:
            results.append(await _quiet_deploy(port))

        nursery.start_soon(owner)
        await started.wait()
        keep.interrupt(signal.SIGTERM)
        with trio.fail_after(30):
            await keep.finished.wait()
    assert results[0].exit_status == 143
    assert results[0].error == "the keep received SIGTERM: the guest was stopped"
    assert keep.signal_number == signal.SIGTERM and keep.stopped_a_guest


async def test_interrupting_an_idle_keep_ends_serving() -> None:
    keep = Keep(NilBackend(), run_deployment)
    async with trio.open_nursery() as nursery:
        await nursery.start(keep.serve, "127.0.0.1", 0)
        keep.interrupt(signal.SIGINT)
        with trio.fail_after(30):
            await keep.finished.wait()
    assert not keep.stopped_a_guest


@pytest.mark.parametrize(("signal_number", "with_socket"),
                         [(signal.SIGINT, False), (signal.SIGTERM, True), (signal.SIGHUP, True)])
def test_a_signal_stops_keep_serve_running_a_guest_that_computes(
        keeper: Keeper, wasm_fixture: WasmFixture, tmp_path: Path, signal_number: int,
        with_socket: bool) -> None:
    """The guest loops in wasm code forever: the signal must stop it through the engine's epoch
    (the deployed run is interruptible), then serve exits 128 + the signal, as `keep run`. With
    a keep.toml socket open too (whose own signal handling would only stop the sockets and kill
    the process after a grace period, its volumes uncommitted). SIGHUP (a closed terminal) is
    one of them (shim.signals): it used to kill the keep at once, its volumes uncommitted."""
    config = tmp_path / "keep.toml"
    stdio = '[[files]]\nkind = "null"\n[[files]]\nkind = "stdout"\n[[files]]\nkind = "stderr"\n'
    config.write_text(stdio + (_listen_toml("api", _free_port()) if with_socket else ""))
    owner = subprocess.Popen(
        [sys.executable, "-m", "shim", "deploy", "--to", f"127.0.0.1:{keeper.port}",
         "--allow-insecure-nil", "--config", str(config), str(wasm_fixture("endless_loop"))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(120, owner.kill)  # a deployment that never starts fails, never hangs
    watchdog.start()
    try:
        assert owner.stdout is not None
        assert owner.stdout.readline()  # the guest runs
        keeper.process.send_signal(signal_number)
        assert keeper.wait() == 128 + signal_number
        _, owner_errors = owner.communicate(timeout=30)
    finally:
        watchdog.cancel()
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    name = signal.Signals(signal_number).name
    assert owner.returncode == 128 + signal_number, owner_errors
    assert f"the keep reports: the keep received {name}: the guest was stopped" in owner_errors
    assert keeper.process.stderr is not None
    assert keeper.process.stderr.read() == f"keep: {name}: stopped, guest stopped, volumes committed\n"


def test_keep_deploy_into_a_pipe_closed_early_drops_the_rest_quietly(keeper: Keeper,
                                                                    wasm_fixture: WasmFixture) -> None:
    """`keep deploy ... | head -c 100`: the rest of the guest's output is dropped, the deployment
    still ends normally (exit status, volume states), and no BrokenPipeError reaches the user."""
    owner = subprocess.Popen(
        [sys.executable, "-m", "shim", "deploy", "--to", f"127.0.0.1:{keeper.port}",
         "--allow-insecure-nil", str(wasm_fixture("args_env")), *["x" * 200] * 2000],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert owner.stdout is not None and owner.stderr is not None
        assert len(owner.stdout.read(100)) == 100
        owner.stdout.close()  # as `head -c 100` exits
        errors = owner.stderr.read().decode()
        assert owner.wait(timeout=60) == 0, errors
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    assert "Error" not in errors and "internal error" not in errors, errors
    assert keeper.wait() == 0


def test_a_volume_state_file_that_cannot_be_written_is_refused_before_connecting(
        tmp_path: Path, wasm_fixture: WasmFixture) -> None:
    """`keep deploy --volume-state` in a missing directory is refused before the deployment
    (exit 2): found after it, the keep would have committed its volumes at generations that
    nothing records. (The file itself is replaced atomically, as `keep run`'s: shim.volume_state.)"""
    missing = tmp_path / "no-such-directory" / "volumes.json"
    completed = subprocess.run(
        [sys.executable, "-m", "shim", "deploy", "--to", "127.0.0.1:1", "--volume-state", str(missing),
         str(wasm_fixture("hello"))], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.strip() == (f"keep: --volume-state {missing}: directory {missing.parent} "
                                        "does not exist")


def test_an_endless_config_is_refused_without_reading_it_all(wasm_fixture: WasmFixture) -> None:
    """`keep deploy --config /dev/zero` reads at most shim.config.MAX_CONFIG_BYTES (it read the
    whole file: memory grew until an internal MemoryError); one line, exit 2, before connecting."""
    completed = subprocess.run(
        [sys.executable, "-c", "import resource, sys; from shim.cli import main;"
         " resource.setrlimit(resource.RLIMIT_AS, (1 << 31, 1 << 31));"
         " sys.exit(main(['deploy', '--to', '127.0.0.1:1', '--config', '/dev/zero', sys.argv[1]]))",
         str(wasm_fixture("hello"))], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.strip() == "keep: /dev/zero: larger than 1048576 bytes (not a keep.toml?)"
