"""Review of session 8's changes (net, sockets, fuse, run, signals): defects the change brought in
or left behind, each test failing on the code before its fix."""

from __future__ import annotations

import os
import pty
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fixture_build import WasmFixture
from fuse_harness import (
    MOUNT_TIMEOUT,
    PASSPHRASE,
    create_image,
    force_unmount,
    fuse_skip_reason,
)
from keep_net import STDIO, listen_entry
from run_volume_support import PASSPHRASE as VOLUME_PASSPHRASE
from run_volume_support import make_volume

from shim.config import parse_config
from shim.run import RunConfig, RunResult, run_module

KEEP = (sys.executable, "-m", "shim")


def _is_mounted(mountpoint: Path) -> bool:
    """From mountinfo, never through the (dead) mount point itself."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
        return any(line.split()[4] == str(mountpoint) for line in table)


@pytest.mark.fuse
@pytest.mark.skipif(fuse_skip_reason() is not None, reason=str(fuse_skip_reason()))
def test_umount_of_a_dead_mount_whose_image_moved_is_no_false_failure(tmp_path: Path) -> None:
    """A mount whose process was killed (SIGKILL, OOM) and whose image was then moved or
    deleted: `keep volume umount` clears it. Since 629faa4 it judged staleness by the image's
    lock and waited for the image after the unmount; an image it cannot open counted as 'still
    held', so it said 'unmounted MNT, but the keep process still holds IMG', exit 1, about a
    process that no longer exists (the old code saw ENOTCONN and cleared the mount, exit 0)."""
    image = create_image(tmp_path / "volume.img", "64M")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    process = subprocess.Popen([*KEEP, "volume", "mount", str(image), str(mountpoint),
                                "--passphrase-env", "KEEP_TEST_KEY"],
                               env={"KEEP_TEST_KEY": PASSPHRASE, "PATH": "/usr/bin:/bin"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not _is_mounted(mountpoint):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        shutil.move(image, tmp_path / "moved.img")
        umount = subprocess.run([*KEEP, "volume", "umount", str(mountpoint)], capture_output=True,
                                timeout=60, check=False)
        assert not _is_mounted(mountpoint)
        assert umount.returncode == 0, umount.stderr
        assert b"still holds" not in umount.stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if _is_mounted(mountpoint):
            force_unmount(mountpoint)


def test_a_run_with_keep_toml_from_another_thread_leaves_signals_to_the_caller(
        wasm_fixture: WasmFixture, capfd: pytest.CaptureFixture[str]) -> None:
    """Library use: shim.run.run_module with a keep.toml, called from a thread that is not the
    main one. shim.sockets._stop_on_signal means to leave signals to the caller there (only the
    main thread may take them), but it caught the RuntimeError around the call of
    trio.open_signal_receiver, which raises only on entering it: the run died of
    'RuntimeError: Sorry, open_signal_receiver is only possible when running in Python
    interpreter's main thread' before the guest started."""
    keep_toml = parse_config("".join(f'[[files]]\nkind = "{kind}"\n' for kind in ("stdin", "stdout", "stderr"))
                             + '[[files]]\nkind = "listen"\nname = "api"\naddr = "127.0.0.1"\nport = 0\n')
    config = RunConfig(module=str(wasm_fixture("hello")), keep_config=keep_toml)
    results: list[object] = []
    worker = threading.Thread(target=lambda: results.append(_outcome_of(config)))
    worker.start()
    worker.join(timeout=60)
    assert results and isinstance(results[0], RunResult), results
    assert results[0].exit_code == 0
    assert capfd.readouterr().out != ""


def _outcome_of(config: RunConfig) -> object:
    try:
        return run_module(config)
    except BaseException as error:  # reported by the test, which runs in the main thread
        return error


def test_a_signal_sent_on_seeing_keep_serve_ready_stops_it_gracefully() -> None:
    """keep serve printed 'keep: serving on ...' before it listened for the stop signals: a
    supervisor (or a test) that sends SIGTERM on seeing that line killed it by the default
    action, status -15 and no 'keep: SIGTERM: stopped' (6 of 6 tries), instead of 143."""
    process = subprocess.Popen([*KEEP, "serve", "--listen", "127.0.0.1:0"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert process.stderr is not None
        assert b"serving on" in process.stderr.readline()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 128 + signal.SIGTERM, stderr
        assert stderr == b"keep: SIGTERM: stopped\n"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

def test_keep_serve_stopped_by_a_hangup_exits_129_on_a_terminal_that_is_gone() -> None:
    """keep serve in a terminal that closes: SIGHUP stops it gracefully since f5ee935 (it used
    to die of it), and then its last line ('keep: SIGHUP: stopped') met EIO on the hung-up
    terminal, which made it 'keep: internal error: OSError', exit 70, instead of 128 + SIGHUP
    as keep run gives. The line now goes through shim.errors.say, which drops what stderr
    cannot take."""
    master, slave = pty.openpty()
    process = subprocess.Popen([*KEEP, "serve", "--listen", "127.0.0.1:0"],
                               stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    try:
        seen = b""
        while b"serving on" not in seen:
            chunk = os.read(master, 4096)
            assert chunk, seen
            seen += chunk
        os.close(master)  # the terminal window closes: writes to it now fail (EIO)
        process.send_signal(signal.SIGHUP)
        assert process.wait(timeout=60) == 128 + signal.SIGHUP
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("victim", ["passphrase", "volume_state", "image", "module", "config"])
def test_exporting_the_certificate_over_a_file_the_run_reads_is_refused(
        victim: str, tmp_path: Path, wasm_fixture: WasmFixture, keep_environment: dict[str, str]) -> None:
    """keep.toml's export_certificate was only compared with keep.toml's own TLS files: one
    naming --passphrase-file/--key-file (the volume's only key), --volume-state, a volume image,
    the module or keep.toml itself was replaced by the certificate when the sockets opened
    (repro: export_certificate = "vol.key" with --key-file vol.key: the key file then held
    '-----BEGIN CERTIFICATE-----', the volume 'wrong passphrase' for ever). Refused at start
    now, exit 1, every file untouched."""
    image, passphrase = tmp_path / "data.img", tmp_path / "passphrase"
    make_volume(image)
    passphrase.write_bytes(VOLUME_PASSPHRASE + b"\n")
    state, module, config = tmp_path / "state.json", tmp_path / "app.wasm", tmp_path / "keep.toml"
    state.write_text("{}")
    shutil.copyfile(wasm_fixture("hello"), module)
    target = {"passphrase": passphrase, "volume_state": state, "image": image, "module": module,
              "config": config}[victim]
    config.write_text(f'[tls]\nexport_certificate = "{target}"\n\n' + STDIO + listen_entry("api", 0))
    before = {path: path.read_bytes() for path in (image, passphrase, state, module, config)}
    completed = subprocess.run(
        [*KEEP, "run", "--config", str(config), "--volume", f"{image}::/data", "--passphrase-file",
         str(passphrase), "--volume-state", str(state), str(module)],
        stdin=subprocess.DEVNULL, capture_output=True, env=keep_environment, timeout=120, check=False)
    assert completed.returncode == 1, completed.stderr
    assert b"refusing to overwrite the file of" in completed.stderr
    assert {path: path.read_bytes() for path in before} == before
