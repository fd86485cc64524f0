"""Session 10's third review of attested delivery and configuration: each test reproduces a
defect met with real `keep serve` / `keep deploy` processes on loopback (or the real parser),
and fails on the code before its fix."""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import wasmtime
from test_attest_deploy import Keeper, _owner_key_and_keep_image
from test_blockdev import _attach_loop_device

from shim.attest import (
    AttestedCertificateProvider,
    AttestedIdentity,
    Conversation,
    Deploy,
    NilBackend,
    Policy,
    Refused,
    VolumeGrant,
    open_verified_stream,
)
from shim.config import ConfigError, ConnectFile, parse_config
from shim.demo import DemoError, build_guest, demo_command
from shim.serve import Deployment, Keep, RunOutcome

NIL_OK = Policy(allow_insecure_nil=True)

EXIT_3 = bytes(wasmtime.wat2wasm("""
(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (call $exit (i32.const 3))))"""))

HELLO_EXIT_3 = bytes(wasmtime.wat2wasm("""
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "hello\\n")
  (func (export "_start")
    (i32.store (i32.const 16) (i32.const 0))
    (i32.store (i32.const 20) (i32.const 6))
    (drop (call $write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))
    (drop (call $write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))
    (call $exit (i32.const 3))))"""))

READY_SLEEP_EXIT_5 = bytes(wasmtime.wat2wasm("""
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "ready\\n")
  (func (export "_start")
    (i32.store (i32.const 16) (i32.const 0))
    (i32.store (i32.const 20) (i32.const 6))
    (drop (call $write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))
    ;; one clock subscription at 64 (monotonic, relative, 2 s), its event at 128
    (i32.store (i32.const 80) (i32.const 1))
    (i64.store (i32.const 88) (i64.const 2000000000))
    (drop (call $poll (i32.const 64) (i32.const 128) (i32.const 1) (i32.const 24)))
    (call $exit (i32.const 5))))"""))

NOT_WASM = b"\0asm\x01\0\0\0\xff\xff"  # the right magic, then a malformed section


@pytest.fixture
def keeper(tmp_path: Path) -> Iterator[Keeper]:
    """A `keep serve` process (test_attest_deploy's harness), stopped at the end (after a
    yield, this runs whatever the test's outcome)."""
    serving = Keeper(tmp_path / "keep")
    yield serving
    serving.stop()


def _deploy_command(serving: Keeper, *arguments: str) -> list[str]:
    return [sys.executable, "-m", "shim", "deploy", "--to", f"127.0.0.1:{serving.port}",
            "--allow-insecure-nil", *arguments]


def _finish(serving: Keeper) -> tuple[int, str]:
    """Exit status and the rest of its stderr once `keep serve` has ended."""
    assert serving.process.stderr is not None
    rest = serving.process.stderr.read()
    return serving.process.wait(timeout=30), rest


def _deploy_raw(port: int, deploy: Deploy) -> object:
    """What a keep answers a deployment sent as it is (an owner that skips keep deploy's checks)."""

    async def main() -> object:
        stream, _ = await open_verified_stream("127.0.0.1", port, NIL_OK)
        async with stream:
            conversation = Conversation("owner")
            await stream.send_all(conversation.send(deploy))
            while (message := conversation.next_message()) is None:
                conversation.receive_data(await stream.receive_some())
            return message

    return trio.run(main)


def test_an_invalid_module_does_not_use_up_the_keep(keeper: Keeper, tmp_path: Path) -> None:
    """A module that is not valid WebAssembly used to be `accepted`, fail to compile, and end
    `keep serve` (a keep serves one deployment): the owner's keep was gone and the owner read
    "main.wasm is not a valid module". Now keep deploy refuses it before connecting, naming the
    file, and a keep refuses it before accepting, and waits for the next deployment."""
    module = tmp_path / "garbage.wasm"
    module.write_bytes(NOT_WASM)
    owner = keeper.deploy("--allow-insecure-nil", str(module))
    assert owner.returncode == 1
    assert f"keep: {module} is not a valid WebAssembly module: " in owner.stderr
    assert "attested" not in owner.stderr  # before connecting

    answer = _deploy_raw(keeper.port, Deploy(workload=NOT_WASM))
    assert isinstance(answer, Refused)
    assert "the workload is not a valid WebAssembly module" in answer.reason
    answer = _deploy_raw(keeper.port, Deploy(workload=EXIT_3, args=("a\0b",)))
    assert isinstance(answer, Refused) and "NUL" in answer.reason
    assert keeper.process.poll() is None

    good = tmp_path / "good.wasm"
    good.write_bytes(EXIT_3)
    assert keeper.deploy("--allow-insecure-nil", str(good)).returncode == 3
    assert _finish(keeper)[0] == 0


@pytest.mark.parametrize("text", ['args = ["a\\u0000b"]\n', '[env]\nX = "p\\u0000q"\n'])
def test_a_nul_in_keep_toml_args_or_env_is_a_config_error_naming_the_line(text: str) -> None:
    """TOML allows "\\u0000"; the guest's C strings cannot hold it. It used to pass keep.toml's
    checks on both sides and fail only when the guest started, after the keep had accepted."""
    with pytest.raises(ConfigError, match=r"keep\.toml:\d: (args\[0\]|env\.X): contains a NUL"):
        parse_config("# a keep.toml\n" + text)


def test_a_full_disk_under_keep_deploys_stdout_is_one_line_and_the_status_still_counts(
        keeper: Keeper, tmp_path: Path) -> None:
    """`keep deploy ... > /dev/full` (a full disk) ended keep deploy with "internal error:
    OSError: [Errno 28]" (exit 70) at the guest's first line: the deployment's exit status and
    volume states were lost. Now one line says so and the deployment runs to its end."""
    module = tmp_path / "hello.wasm"
    module.write_bytes(HELLO_EXIT_3)
    with open("/dev/full", "wb") as full:
        owner = subprocess.run(_deploy_command(keeper, str(module)), stdout=full,
                               stderr=subprocess.PIPE, text=True, timeout=60)
    assert owner.returncode == 3, owner.stderr
    assert owner.stderr.count("keep: cannot write the guest's stdout: No space left on device") == 1
    assert "internal error" not in owner.stderr
    assert _finish(keeper)[0] == 0


def _limit_memory() -> None:
    """In the child: reading /dev/zero whole fails fast (old code) instead of eating the host."""
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def test_a_policy_that_never_ends_is_one_clear_error(tmp_path: Path) -> None:
    """`--policy /dev/zero` was read whole (keep.toml and key files are bounded, the policy was
    not): memory filled until "internal error: MemoryError" (exit 70). Now it is refused as a
    device, before connecting."""
    module = tmp_path / "good.wasm"
    module.write_bytes(EXIT_3)
    owner = subprocess.run([sys.executable, "-m", "shim", "deploy", "--to", "127.0.0.1:1",
                            "--policy", "/dev/zero", str(module)], capture_output=True, text=True,
                           timeout=60, preexec_fn=_limit_memory)
    assert owner.returncode == 1
    assert owner.stderr == ("keep: policy /dev/zero: is a character device, not a regular file or "
                            "a pipe (not a policy.toml?)\n")


def test_keep_serve_says_why_the_owner_got_no_outcome(keeper: Keeper, tmp_path: Path) -> None:
    """An owner whose `keep deploy` died mid-run: the workload ran to its end and keep serve
    exited 0 without a word, so its operator could not tell a delivered deployment from a lost
    one. Now one line says the outcome could not be delivered (and not what it was: that is
    the owner's)."""
    module = tmp_path / "ready.wasm"
    module.write_bytes(READY_SLEEP_EXIT_5)
    owner = subprocess.Popen(_deploy_command(keeper, str(module)), stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
    try:
        assert owner.stdout is not None
        assert owner.stdout.readline() == b"ready\n"
    finally:
        owner.kill()
        owner.wait(timeout=10)
        assert owner.stdout is not None
        owner.stdout.close()
    status, said = _finish(keeper)
    assert status == 0
    assert said == ("keep: the owner's connection broke before the deployment ended: its outcome "
                    "could not be delivered (the workload ran to its end)\n")


def test_a_nul_in_an_fd_name_is_a_config_error_naming_the_line() -> None:
    """An fd's name goes into FD_NAMES, an environment value: a NUL in it passed keep.toml's
    checks and failed as the guest started ("arguments and environment must not contain NUL
    bytes", no line or key; a deployed keep had accepted and was used up)."""
    text = '[[files]]\nkind = "stdin"\n[[files]]\nkind = "listen"\nname = "a\\u0000b"\nport = 1\n'
    with pytest.raises(ConfigError, match=r"keep\.toml:5: files\[1\]\.name: contains a NUL"):
        parse_config(text)


def test_a_volume_guest_path_with_a_colon_is_refused_before_the_keep_accepts(tmp_path: Path) -> None:
    """A granted volume's guest path names its fd in FD_NAMES, whose separator is ':'. Granted
    at '/a:b', it passed every check, the keep accepted, and the guest's start failed ("fd name
    '/a:b' contains ':'"): the keep was used up. Now keep deploy refuses it before connecting,
    and a keep before accepting, waiting for the next deployment."""
    key_file, image = _owner_key_and_keep_image(tmp_path / "keep", tmp_path / "owner")
    serving = Keeper(tmp_path / "keep", "--volume", f"data={image}")
    try:
        module = tmp_path / "good.wasm"
        module.write_bytes(EXIT_3)
        owner = serving.deploy("--allow-insecure-nil", "--volume-key", f"data::/a:b={key_file}",
                               str(module))
        assert owner.returncode == 2
        assert "fd name '/a:b' contains ':'" in owner.stderr and "attested" not in owner.stderr
        grant = VolumeGrant("data", key_file=key_file.read_bytes(), guest_path="/a:b")
        answer = _deploy_raw(serving.port, Deploy(workload=EXIT_3, volumes=(grant,)))
        assert isinstance(answer, Refused) and "contains ':'" in answer.reason
        assert serving.deploy("--allow-insecure-nil", "--volume-key", f"data::/ab={key_file}",
                              str(module)).returncode == 3
        assert _finish(serving)[0] == 0
    finally:
        serving.stop()


def test_keep_demo_without_a_usable_temporary_directory_is_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With TMPDIR, /tmp, /var/tmp, /usr/tmp and the cwd all unwritable (seen with read-only
    tmpfs mounts in a mount namespace, and the cwd /proc), `keep demo` ended with "internal
    error: FileNotFoundError: No usable temporary directory found" (exit 70); so did compiling
    its guest. Here tempfile's directory is pinned to one that does not exist, the same error."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))
    with pytest.raises(DemoError, match=r"^cannot make a temporary work directory: .* give "
                                        r"--workdir DIR\)$"):
        demo_command(argparse.Namespace(workdir=None, keep_files=False))
    with pytest.raises(DemoError, match=r"^cannot make a directory to compile the guest in: "):
        build_guest(cache_dir=tmp_path / "empty cache")


def test_keep_deploy_of_a_module_that_never_ends_is_one_clear_error() -> None:
    """`keep deploy /dev/zero` read the module whole before any check: memory filled until
    "internal error: MemoryError" (exit 70). Now the module is read as keep.toml is, at most
    the largest a deploy frame carries."""
    owner = subprocess.run([sys.executable, "-m", "shim", "deploy", "--to", "127.0.0.1:1",
                            "/dev/zero"], capture_output=True, text=True, timeout=60,
                           preexec_fn=_limit_memory)
    assert owner.returncode == 2
    assert owner.stderr == ("keep: module /dev/zero: is a character device, not a regular file "
                            "or a pipe\n")


def test_keep_deploy_refuses_what_the_keep_would_refuse_before_connecting(
        keeper: Keeper, tmp_path: Path) -> None:
    """A keep.toml the keep refuses for a deployed workload (host files, a TLS connect without
    a pin) passed keep deploy's own checks: the owner attested the keep and sent the workload
    and its volume keys, only to read the refusal. keep deploy now runs the keep's checks
    first, as its text promises for keep.toml mistakes."""
    module = tmp_path / "good.wasm"
    module.write_bytes(EXIT_3)
    config = tmp_path / "keep.toml"
    config.write_text('[tls]\ncertificate = "c.pem"\nkey = "k.pem"\n')
    owner = keeper.deploy("--allow-insecure-nil", "--config", str(config), str(module))
    assert owner.returncode == 1
    assert owner.stderr == ("keep: a deployed keep.toml cannot name host files ([tls] paths): "
                            "the keep's TLS sockets use its attested key\n")
    assert keeper.process.poll() is None


def test_a_deployed_workloads_tls_certificate_outlives_a_day(tmp_path: Path) -> None:
    """The guest's TLS sockets get the keep's attested certificate once, when they open, and
    keep it as long as the workload serves; it was valid for one day, so from the second day a
    client that checks its dates refused every handshake (`openssl verify -attime` two days
    on: "certificate has expired"). It now lasts as long as keep run's self-signed one."""
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(AttestedCertificateProvider(AttestedIdentity(), NilBackend()).identity()
                     .certificate_chain_pem)
    two_days_on = str(int(time.time()) + 2 * 86400)
    checked = subprocess.run(["openssl", "verify", "-CAfile", str(leaf), "-attime", two_days_on,
                              str(leaf)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout == f"{leaf}: OK\n"


def test_keep_serve_offers_a_volume_on_a_block_device(tmp_path: Path) -> None:
    """keep run --volume and keep volume open a volume on a block device (a loop device, a
    partition); keep serve --volume refused one: "--volume data: /dev/loop0 is not a volume
    image file" (exit 2). Now a deployment opens it there like an image."""
    key_file, image = _owner_key_and_keep_image(tmp_path / "keep", tmp_path / "owner")
    loop = _attach_loop_device(image)
    if loop is None:
        pytest.skip("needs root and loop devices (losetup) to get a real block device")
    try:
        serving = Keeper(tmp_path / "keep", "--volume", f"data={loop}")
        try:
            module = tmp_path / "good.wasm"
            module.write_bytes(EXIT_3)
            owner = serving.deploy("--allow-insecure-nil", "--volume-key", f"data={key_file}",
                                   str(module))
            assert owner.returncode == 3, owner.stderr
            assert _finish(serving)[0] == 0
        finally:
            serving.stop()
    finally:
        subprocess.run(["losetup", "--detach", loop], check=True)


def test_a_connect_entry_to_an_ipv6_address_without_a_name_says_to_name_it() -> None:
    """A connect entry's name defaults to its host; for an IPv6 address that name holds ':'.
    The error blamed a key the file does not have ("files[0].name: a name must be non-empty
    and contain no ':' (got '::1')"); it now says where the name came from and what to do."""
    text = '[[files]]\nkind = "connect"\nhost = "::1"\nport = 9\n'
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert str(caught.value) == ("keep.toml:1: files[0]: a connect entry's name defaults to its "
                                 "host, and '::1' holds ':', which FD_NAMES uses as separator: "
                                 "give the entry a name")
    named = parse_config(text + 'name = "db"\n').sockets[0]
    assert isinstance(named, ConnectFile) and (named.name, named.host) == ("db", "::1")


@pytest.mark.parametrize("status", [256, -1])
async def test_an_exit_status_keep_deploy_cannot_exit_with_is_an_error(status: int,
                                                                       tmp_path: Path) -> None:
    """keep deploy exits with the status the keep's `finished` states: a keep's 256 became
    exit status 0 (a success) in the shell, -1 became 255. Now one line and exit 1."""

    async def runner(_deployment: Deployment) -> RunOutcome:
        return RunOutcome(exit_status=status)

    module = tmp_path / "good.wasm"
    module.write_bytes(EXIT_3)
    keep = Keep(NilBackend(), runner)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(keep.serve, "127.0.0.1", 0)
        owner = await trio.run_process(
            [sys.executable, "-m", "shim", "deploy", "--to", f"{host}:{port}",
             "--allow-insecure-nil", str(module)], capture_stdout=True, capture_stderr=True,
            check=False)
    assert owner.returncode == 1
    assert owner.stderr.decode().endswith(f"keep: the keep reported exit status {status}, which "
                                          "no process exits with (0-255)\n")


def test_a_deployed_plaintext_listener_without_its_opt_in_does_not_use_up_the_keep(
        keeper: Keeper, tmp_path: Path) -> None:
    """prot = "tcp" without insecure_plaintext passed the keep's checks, so the keep accepted,
    the run refused the socket ('... or pass --insecure-plaintext', an option keep deploy does
    not have) and keep serve exited: used up. Now both sides refuse it first."""
    listener = ('[[files]]\nkind = "stdin"\n[[files]]\nkind = "stdout"\n[[files]]\nkind = "stderr"\n'
                '[[files]]\nkind = "listen"\nname = "x"\nprot = "tcp"\naddr = "127.0.0.1"\nport = 0\n')
    module = tmp_path / "good.wasm"
    module.write_bytes(EXIT_3)
    config = tmp_path / "keep.toml"
    config.write_text(listener)
    owner = keeper.deploy("--allow-insecure-nil", "--config", str(config), str(module))
    assert (owner.returncode, owner.stderr) == (1, (
        "keep: socket 'x' uses prot = \"tcp\" (plaintext the host can read): a deployed keep.toml "
        "allows it only with insecure_plaintext = true on the entry\n"))
    answer = _deploy_raw(keeper.port, Deploy(workload=EXIT_3, config=listener))
    assert isinstance(answer, Refused) and "insecure_plaintext = true" in answer.reason
    config.write_text(listener + "insecure_plaintext = true\n")
    assert keeper.deploy("--allow-insecure-nil", "--config", str(config), str(module)).returncode == 3
    assert _finish(keeper)[0] == 0


def test_keep_serve_refuses_a_volume_name_no_deployment_could_grant(tmp_path: Path) -> None:
    """A grant's volume name never holds '/' (the protocol refuses it), so `keep serve --volume
    a/b=IMG` offered a volume no deployment could ever open, and said nothing: it served."""
    image = tmp_path / "data.img"
    image.write_bytes(b"")
    served = subprocess.run([sys.executable, "-m", "shim", "serve", "--listen", "127.0.0.1:0",
                             "--volume", f"a/b={image}"], capture_output=True, text=True, timeout=30)
    assert (served.returncode, served.stderr) == (
        2, f"keep: --volume 'a/b={image}': a volume name has no '/'\n")
