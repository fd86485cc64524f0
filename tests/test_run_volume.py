"""`keep run --volume`: the CLI end to end, in subprocesses, on real images.

Covers issue 4's points 1, 2, 5 and 6 (points 3 and 4 live in test_differential.py's volume
backend and test_leak.py): options and key sources, pins and rollback refusal, the final state
printed and written, EIO plus one stderr line for a tampered sector, and a consistent volume with
every fsync'd byte after a --timeout, a trap, SIGINT or SIGTERM.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from fixture_build import WasmFixture
from keep_net import STDIO, free_port, listen_entry
from run_volume_support import PASSPHRASE, data_sectors, flip, make_volume

from storage.volume import open_volume

KEEP = (sys.executable, "-m", "shim")
DEADLINE = 120
SYNCED_LINE = b"everything in this file was fsync'd before the guest was stopped\n"
TRAP_STATUS = 134


def keep(arguments: list[str], environment: Mapping[str, str], *,
         stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*KEEP, *arguments], input=stdin, capture_output=True, env=dict(environment),
                          timeout=DEADLINE, check=False)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "data.img"
    make_volume(path)
    return path


@pytest.fixture
def passphrase_file(tmp_path: Path) -> Path:
    path = tmp_path / "passphrase"
    path.write_bytes(PASSPHRASE + b"\n")
    return path


def volume_options(image: Path, passphrase_file: Path, guest: str = "/sandbox") -> list[str]:
    return ["--volume", f"{image}::{guest}", "--passphrase-file", str(passphrase_file)]


def read_file(image: Path, path: str) -> bytes:
    with open_volume(image, PASSPHRASE, writable=False) as volume:
        ino = 1
        for name in path.strip("/").split("/"):
            ino = volume.fs.lookup(ino, name.encode()).ino
        return volume.fs.read(ino, 0, volume.fs.getattr(ino).size)


def fsck(image: Path) -> list[str]:
    with open_volume(image, PASSPHRASE, writable=False) as volume:
        return volume.fsck()


def test_default_guest_path_and_every_key_source(image: Path, passphrase_file: Path, tmp_path: Path,
                                                 wasm_fixture: WasmFixture,
                                                 keep_environment: dict[str, str]) -> None:
    """`--volume IMG` is at /data; --passphrase-file, --key-file and --passphrase-env open it."""
    completed = keep(["volume", "put", str(image), "-", "/hello.txt", "--passphrase-file", str(passphrase_file)],
                     keep_environment, stdin=b"hello\n")
    assert completed.returncode == 0, completed.stderr
    key_file = tmp_path / "key"
    key_file.write_bytes(PASSPHRASE)  # exact bytes, no newline
    environment = {**keep_environment, "VOLUME_SECRET": PASSPHRASE.decode()}
    module = str(wasm_fixture("volume_read_errno"))  # reads /sandbox/ARG
    for key_options in (["--passphrase-file", str(passphrase_file)], ["--key-file", str(key_file)],
                        ["--passphrase-env", "VOLUME_SECRET"]):
        at_data = keep(["run", "--volume", str(image), *key_options, module, "hello.txt"], environment)
        assert (at_data.returncode, at_data.stdout) == (1, b"open: -1 ENOENT\n"), at_data.stderr
        at_sandbox = keep(["run", "--volume", f"{image}::/sandbox", *key_options, module, "hello.txt"], environment)
        assert (at_sandbox.returncode, at_sandbox.stdout, at_sandbox.stderr) == (0, b"open: ok\nread: 6 bytes\n", b"")


@pytest.mark.parametrize(("arguments", "status", "message"), [
    (["--volume", "{tmp}/missing.img", "--passphrase-file", "{pass}"], 2, "no such file"),
    (["--volume", "{image}::", "--passphrase-file", "{pass}"], 2, "expected IMG or IMG::GUEST_PATH"),
    (["--volume-generation", "3"], 2, "need --volume"),
    (["--volume", "{image}", "--volume-generation", "1", "--volume-generation", "2", "--passphrase-file", "{pass}"],
     2, "once per --volume"),
    (["--volume", "{image}", "--passphrase-env", "KEEPSHIM_TEST_UNSET_VARIABLE"], 1, "is not set"),
    (["--volume", "{image}", "--passphrase-env", "X", "--key-file", "{pass}"], 2, "give only one of"),
    (["--volume", "{image}", "--passphrase-file", "{tmp}/wrong"], 2, "wrong passphrase"),
    (["--volume", "{tmp}/wrong", "--passphrase-file", "{pass}"], 2, "not a LUKS2 volume"),
])
def test_bad_volume_options_are_one_line(arguments: list[str], status: int, message: str, image: Path,
                                         passphrase_file: Path, tmp_path: Path, wasm_fixture: WasmFixture,
                                         keep_environment: dict[str, str]) -> None:
    (tmp_path / "wrong").write_bytes(b"not the passphrase\n")
    before = image.read_bytes()
    filled = [item.format(tmp=tmp_path, image=image, **{"pass": passphrase_file}) for item in arguments]
    completed = keep(["run", *filled, str(wasm_fixture("hello"))], keep_environment)
    assert completed.returncode == status, completed.stderr
    assert message.encode() in completed.stderr and completed.stderr.count(b"\n") == 1, completed.stderr
    assert completed.stdout == b""
    assert image.read_bytes() == before


def test_no_terminal_and_no_key_option_is_a_clear_error(image: Path, wasm_fixture: WasmFixture,
                                                        keep_environment: dict[str, str]) -> None:
    completed = keep(["run", "--volume", str(image), str(wasm_fixture("hello"))], keep_environment)
    assert completed.returncode == 1
    assert b"no passphrase given and no terminal" in completed.stderr


def test_verbose_prints_and_volume_state_records_the_final_commit(
        image: Path, passphrase_file: Path, tmp_path: Path, wasm_fixture: WasmFixture,
        keep_environment: dict[str, str]) -> None:
    state_file = tmp_path / "state.json"
    module = str(wasm_fixture("volume_sync_then"))
    completed = keep(["run", "--verbose", *volume_options(image, passphrase_file), "--volume-state",
                      str(state_file), module, "exit"], keep_environment)
    assert completed.returncode == 0, completed.stderr
    recorded = json.loads(state_file.read_text())[str(image)]
    with open_volume(image, PASSPHRASE, writable=False) as volume:
        state = volume.state()
    assert recorded == {"uuid": state.uuid, "generation": state.generation, "root_mac": state.root_mac.hex(),
                        "guest_path": "/sandbox"}
    assert completed.stderr.decode().splitlines()[-1] == (
        f"keep: volume {image} committed: uuid {state.uuid}, generation {state.generation}, "
        f"root MAC {state.root_mac.hex()}")
    assert read_file(image, "synced.txt") == SYNCED_LINE * 100
    assert read_file(image, "dirty.txt") == SYNCED_LINE * 100  # committed at exit, unsynced or not


def test_a_rolled_back_image_is_refused(image: Path, passphrase_file: Path, tmp_path: Path,
                                        wasm_fixture: WasmFixture, keep_environment: dict[str, str]) -> None:
    """The owner keeps the state file; the host swaps in an older copy of the image: refused,
    with --volume-state (its pin) or --volume-generation, and nothing written."""
    old_copy = tmp_path / "old.img"
    shutil.copyfile(image, old_copy)
    state_file = tmp_path / "state.json"
    module = str(wasm_fixture("volume_sync_then"))
    completed = keep(["run", *volume_options(image, passphrase_file), "--volume-state", str(state_file),
                      module, "exit"], keep_environment)
    assert completed.returncode == 0, completed.stderr
    generation = json.loads(state_file.read_text())[str(image)]["generation"]
    shutil.copyfile(old_copy, image)  # the rollback
    before = image.read_bytes()
    for pin in (["--volume-state", str(state_file)], ["--volume-generation", str(generation)]):
        completed = keep(["run", *volume_options(image, passphrase_file), *pin, module, "exit"], keep_environment)
        assert completed.returncode == 1
        assert completed.stderr.startswith(f"keep: --volume {image}: refused, rolled back".encode())
        assert completed.stderr.count(b"\n") == 1
        assert image.read_bytes() == before


def test_two_volumes_and_a_host_directory_are_pre_opened_in_order(
        tmp_path: Path, passphrase_file: Path, wasm_fixture: WasmFixture,
        keep_environment: dict[str, str]) -> None:
    """--dir first, then each --volume in order, all before any socket (fd_prestat order)."""
    first, second = tmp_path / "one.img", tmp_path / "two.img"
    make_volume(first)
    make_volume(second)
    host = tmp_path / "host"
    host.mkdir()
    module = str(wasm_fixture("volume_sync_then"))
    completed = keep(["run", "--dir", f"{host}::/plain", "--volume", f"{first}::/sandbox", "--volume",
                      f"{second}::/other", "--passphrase-file", str(passphrase_file), "--trace", module, "exit"],
                     keep_environment)
    assert completed.returncode == 0, completed.stderr
    prestats = [line for line in completed.stderr.decode().splitlines() if "fd_prestat_dir_name" in line]
    names = [name for line in prestats for name in ("/plain", "/sandbox", "/other") if f'"{name}"' in line]
    assert names == ["/plain", "/sandbox", "/other"], prestats
    assert read_file(first, "synced.txt") == SYNCED_LINE * 100
    assert fsck(second) == []


def test_a_tampered_sector_is_eio_for_the_guest_and_one_line_for_the_operator(
        image: Path, passphrase_file: Path, wasm_fixture: WasmFixture, keep_environment: dict[str, str]) -> None:
    put = ["volume", "put", str(image), "-", "/victim.bin", "--passphrase-file", str(passphrase_file)]
    create = keep([*put[:3], "-", "/victim.bin", *put[5:]], keep_environment, stdin=b"")
    assert create.returncode == 0, create.stderr
    before = image.read_bytes()
    contents = bytes(range(256)) * 256  # 64 KiB: 16 data sectors
    completed = keep(put, keep_environment, stdin=contents)
    assert completed.returncode == 0, completed.stderr
    sectors = data_sectors(image, PASSPHRASE, before, "victim.bin")
    assert len(sectors) >= 1
    module = str(wasm_fixture("volume_read_errno"))
    intact = keep(["run", *volume_options(image, passphrase_file), module, "victim.bin"], keep_environment)
    assert (intact.returncode, intact.stdout, intact.stderr) == (0, b"open: ok\nread: 65536 bytes\n", b"")
    flip(image, sectors)
    completed = keep(["run", *volume_options(image, passphrase_file), module, "victim.bin"], keep_environment)
    assert completed.stdout == b"open: ok\nread: -1 EIO\n"
    assert completed.returncode == 1
    lines = completed.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"keep: volume {image}: integrity failure: ")
    assert "guest got EIO" in lines[0]


def _wait_for_line(process: subprocess.Popen[bytes], expected: bytes) -> None:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line == expected, (line, process.stderr.read() if process.stderr else b"")


@pytest.mark.parametrize("way", ["timeout", "trap", "SIGINT", "SIGTERM"])
def test_a_stopped_guest_leaves_a_consistent_volume_with_its_fsynced_file(
        way: str, image: Path, passphrase_file: Path, wasm_fixture: WasmFixture,
        keep_environment: dict[str, str]) -> None:
    module = str(wasm_fixture("volume_sync_then"))
    options = ["run", *volume_options(image, passphrase_file)]
    if way in ("timeout", "trap"):
        extra = ["--timeout", "2"] if way == "timeout" else []
        completed = keep([*options, *extra, module, "loop" if way == "timeout" else "trap"], keep_environment)
        assert completed.returncode == TRAP_STATUS
        assert completed.stdout == b"synced\n"
        assert (b"interrupt" if way == "timeout" else b"unreachable") in completed.stderr
    else:
        process = subprocess.Popen([*KEEP, *options, module, "loop"], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=keep_environment)
        try:
            _wait_for_line(process, b"synced\n")
            time.sleep(0.2)  # well inside the loop
            process.send_signal(getattr(signal, way))
            _, stderr = process.communicate(timeout=DEADLINE)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert process.returncode == 128 + getattr(signal, way), stderr
        assert stderr == f"keep: {way}: guest stopped, volumes committed\n".encode()
    assert fsck(image) == []
    assert read_file(image, "synced.txt") == SYNCED_LINE * 100
    # committed at the end as well: the unsynced file is there too, whole
    assert read_file(image, "dirty.txt") == SYNCED_LINE * 100


def test_dir_warns_that_the_host_sees_plaintext_with_verbose(tmp_path: Path, wasm_fixture: WasmFixture,
                                                              keep_environment: dict[str, str]) -> None:
    module = str(wasm_fixture("hello"))
    quiet = keep(["run", "--dir", f"{tmp_path}::/sandbox", module], keep_environment)
    loud = keep(["run", "--verbose", "--dir", f"{tmp_path}::/sandbox", module], keep_environment)
    assert quiet.stdout == loud.stdout
    warning = f"keep: warning: --dir {tmp_path}::/sandbox: the host sees these files in plaintext".encode()
    assert warning not in quiet.stderr
    assert loud.stderr.startswith(warning)


def test_the_same_image_twice_is_refused(image: Path, passphrase_file: Path, wasm_fixture: WasmFixture,
                                         keep_environment: dict[str, str]) -> None:
    completed = keep(["run", "--volume", str(image), "--volume", f"{image}::/b", "--passphrase-file",
                      str(passphrase_file), str(wasm_fixture("hello"))], keep_environment)
    assert completed.returncode == 2
    assert b"the same image is given twice" in completed.stderr


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_with_keep_toml_sockets_is_named_and_commits(
        stop: signal.Signals, image: Path, passphrase_file: Path, tmp_path: Path,
        wasm_fixture: WasmFixture, keep_environment: dict[str, str]) -> None:
    """With keep.toml sockets the sockets layer stops the guest (blocked in accept) on the
    signal; the volume path must still report the signal that came (it said SIGINT, status 130,
    for a SIGTERM). A SIGHUP is one too (shim.signals); it used to kill keep at once, without
    the final commit."""
    certificate = tmp_path / "cert.pem"
    config = tmp_path / "keep.toml"
    config.write_text(f'[tls]\nexport_certificate = "{certificate}"\n\n' + STDIO
                      + listen_entry("web", free_port()))
    process = subprocess.Popen([*KEEP, "run", "--config", str(config),
                                *volume_options(image, passphrase_file),
                                str(wasm_fixture("net_http_server")), "web", "5"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=keep_environment)
    try:
        deadline = time.monotonic() + DEADLINE
        while not certificate.exists():  # written last: the keep is listening
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(stop)
        _, stderr = process.communicate(timeout=DEADLINE)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + stop, stderr
    # the guest's own line about its cancelled accept comes first
    assert stderr.endswith(f"\nkeep: {stop.name}: guest stopped, volumes committed\n".encode()), stderr
    assert b"SIGINT" not in stderr
    assert fsck(image) == []


def _ignoring(number: int | None) -> Callable[[], None] | None:
    """A preexec_fn that starts the child with `number` ignored (as nohup does for SIGHUP, and a
    shell for its background jobs' SIGINT): inherited through exec."""
    if number is None:
        return None

    def ignore() -> None:
        signal.signal(number, signal.SIG_IGN)
    return ignore


@pytest.mark.parametrize("ignored", [None, signal.SIGHUP, signal.SIGINT], ids=["hangup", "nohup", "background"])
def test_a_hangup_commits_the_volume_and_ignored_signals_stay_ignored(
        ignored: signal.Signals | None, image: Path, passphrase_file: Path, wasm_fixture: WasmFixture,
        keep_environment: dict[str, str]) -> None:
    """SIGHUP (the terminal went away) stops the guest and commits, as SIGTERM does: the
    guest's writes since its last fsync live in keep's memory, where a process killed by a
    hangup would lose them (a POSIX program's writes are in the kernel by then). A signal keep
    was started with ignored (nohup's SIGHUP, a background job's SIGINT) stays ignored: the
    guest runs on until a SIGTERM."""
    module = str(wasm_fixture("volume_sync_then"))
    process = subprocess.Popen([*KEEP, "run", *volume_options(image, passphrase_file), module, "loop"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=keep_environment, preexec_fn=_ignoring(ignored))
    try:
        _wait_for_line(process, b"synced\n")
        time.sleep(0.2)  # well inside the loop
        process.send_signal(ignored or signal.SIGHUP)
        if ignored is not None:
            with pytest.raises(subprocess.TimeoutExpired):
                process.wait(timeout=1.0)
            process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=DEADLINE)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stopped_by = signal.SIGHUP if ignored is None else signal.SIGTERM
    assert process.returncode == 128 + stopped_by, stderr
    assert stderr == f"keep: {stopped_by.name}: guest stopped, volumes committed\n".encode()
    assert fsck(image) == []
    assert read_file(image, "dirty.txt") == SYNCED_LINE * 100  # never fsync'd: committed at the end


def _ignore_stop_signals() -> None:
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)


def test_a_run_started_with_every_stop_signal_ignored_still_ends_and_commits(
        image: Path, passphrase_file: Path, wasm_fixture: WasmFixture,
        keep_environment: dict[str, str]) -> None:
    """Nothing to watch is no error: the guest runs to its end and the volume is committed."""
    completed = subprocess.run([*KEEP, "run", *volume_options(image, passphrase_file),
                                str(wasm_fixture("volume_sync_then")), "exit"],
                               stdin=subprocess.DEVNULL, capture_output=True, env=keep_environment,
                               timeout=DEADLINE, check=False, preexec_fn=_ignore_stop_signals)
    assert completed.stdout == b"synced\n", completed.stderr
    assert completed.stderr == b""
    assert read_file(image, "dirty.txt") == SYNCED_LINE * 100

