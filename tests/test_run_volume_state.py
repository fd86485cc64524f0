"""`keep run --volume-state FILE`: the file that pins the volumes' generations against rollback.

Losing it, or leaving it half-written, silently drops the owner's rollback protection, so: a
FILE that cannot be written is refused before the guest runs (nothing in the volume changes),
and FILE is replaced atomically (a failed write leaves the previous pins intact).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixture_build import WasmFixture
from run_volume_support import make_volume
from test_run_volume import DEADLINE, KEEP, image, keep, passphrase_file, volume_options

__all__ = ["image", "passphrase_file"]  # the fixtures of test_run_volume, used here too


@pytest.mark.parametrize("where", ["missing-directory/state.json", "a-file/state.json", "a-directory"])
def test_an_unwritable_state_file_is_refused_before_the_guest_runs(
        where: str, image: Path, passphrase_file: Path, tmp_path: Path, wasm_fixture: WasmFixture,
        keep_environment: dict[str, str]) -> None:
    """Found in review: the guest ran, the volume was committed at a new generation, and only
    then `cannot write --volume-state` (exit 1, the guest's own status lost, no pin recorded)."""
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-directory").mkdir()
    before = image.read_bytes()
    completed = keep(["run", *volume_options(image, passphrase_file), "--volume-state",
                      str(tmp_path / where), str(wasm_fixture("volume_sync_then")), "exit"],
                     keep_environment)
    assert completed.returncode == 2, completed.stderr
    assert completed.stdout == b""  # the guest never ran
    assert completed.stderr.startswith(f"keep: --volume-state {tmp_path / where}: ".encode())
    assert completed.stderr.count(b"\n") == 1, completed.stderr
    assert image.read_bytes() == before


def test_a_symlinked_state_file_is_updated_where_it_points(
        image: Path, passphrase_file: Path, tmp_path: Path, wasm_fixture: WasmFixture,
        keep_environment: dict[str, str]) -> None:
    """An owner who keeps the state file elsewhere and links to it keeps the link (the atomic
    replacement happens next to the target)."""
    target = tmp_path / "kept" / "state.json"
    target.parent.mkdir()
    link = tmp_path / "state.json"
    link.symlink_to(target)
    completed = keep(["run", *volume_options(image, passphrase_file), "--volume-state", str(link),
                      str(wasm_fixture("volume_sync_then")), "exit"], keep_environment)
    assert completed.returncode == 0, completed.stderr
    assert link.is_symlink()
    assert json.loads(target.read_text())[str(image)]["generation"] > 0


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 16 KiB tmpfs (root only), unmounted afterwards."""
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mountpoint)],
                             capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_a_failed_write_leaves_the_previous_pins_intact(
        image: Path, passphrase_file: Path, tiny_filesystem: Path, wasm_fixture: WasmFixture,
        keep_environment: dict[str, str]) -> None:
    """Found in review: the state file was rewritten in place, so a full disk left it truncated
    (unreadable JSON: every pin in it lost, and the next run refused). Now a failed write is one
    line, exit 1, and the old file is untouched."""
    state_file = tiny_filesystem / "state.json"
    pins = {f"/elsewhere/volume-{index}.img": {"generation": 7, "uuid": "u" * 36}
            for index in range(30)}
    pins["/elsewhere/padding.img"] = {"generation": 1, "uuid": ""}
    unpadded = len(json.dumps(pins, indent=2, sort_keys=True)) + 1
    pins["/elsewhere/padding.img"]["uuid"] = "p" * (4000 - unpadded)
    previous = json.dumps(pins, indent=2, sort_keys=True) + "\n"
    assert len(previous) == 4000  # one page; the new file (one more entry) needs two
    state_file.write_text(previous)
    filler = tiny_filesystem / "filler"
    with open(filler, "wb", buffering=0) as stream, pytest.raises(OSError):
        while True:
            stream.write(b"\0" * 1024)
    completed = keep(["run", *volume_options(image, passphrase_file), "--volume-state",
                      str(state_file), str(wasm_fixture("volume_sync_then")), "exit"],
                     keep_environment)
    assert completed.returncode == 1, completed.stderr
    assert completed.stderr.startswith(f"keep: cannot write --volume-state {state_file}".encode())
    assert state_file.read_text() == previous
    assert [path.name for path in tiny_filesystem.iterdir()] == sorted(["filler", "state.json"])


def test_two_runs_sharing_a_state_file_keep_each_others_pins(
        image: Path, passphrase_file: Path, tmp_path: Path, wasm_fixture: WasmFixture,
        keep_environment: dict[str, str]) -> None:
    """Found in review: each run wrote back the file as it had read it at its start plus its own
    volumes, so of two concurrent runs on different images the one ending last dropped the
    other's pin (its rollback protection, silently). The file is now re-read and updated under
    a lock when a run ends."""
    other = tmp_path / "other.img"
    make_volume(other)
    state_file = tmp_path / "state.json"
    module = str(wasm_fixture("volume_sync_then"))
    longer = subprocess.Popen([*KEEP, "run", *volume_options(image, passphrase_file), "--volume-state",
                               str(state_file), "--timeout", "3", module, "loop"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=keep_environment)
    try:
        assert longer.stdout is not None
        assert longer.stdout.readline() == b"synced\n"  # it has read the (missing) state file
        shorter = keep(["run", *volume_options(other, passphrase_file), "--volume-state", str(state_file),
                        module, "exit"], keep_environment)
        assert shorter.returncode == 0, shorter.stderr
        _, stderr = longer.communicate(timeout=DEADLINE)
    finally:
        if longer.poll() is None:
            longer.kill()
            longer.wait()
    assert longer.returncode == 134, stderr
    assert sorted(json.loads(state_file.read_text())) == sorted([str(image), str(other)])


@pytest.mark.parametrize(("state", "says"), [("huge", "larger than"), ("/dev/zero", "not a regular file"),
                                             ("/dev/null", "not a regular file")])
def test_a_huge_state_file_or_a_device_is_refused_without_reading_it_all(
        state: str, says: str, image: Path, passphrase_file: Path, tmp_path: Path, wasm_fixture: WasmFixture,
        keep_environment: dict[str, str]) -> None:
    """Found in review: the state file was read whole (/dev/zero: an internal MemoryError), and
    a device was accepted as the file to replace (as root, the new pins would have been renamed
    over /dev/null). A state file is at most shim.volume_state.MAX_STATE_BYTES, and a regular file."""
    if state == "huge":
        state = str(tmp_path / "huge.json")
        with open(state, "wb") as huge:
            huge.truncate(1 << 30)  # sparse: 1 GiB of zeros, read whole before
    before = image.read_bytes()
    completed = keep(["run", *volume_options(image, passphrase_file), "--volume-state", state,
                      str(wasm_fixture("volume_sync_then")), "exit"], keep_environment)
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.startswith(f"keep: --volume-state {state}: ".encode())
    assert says.encode() in completed.stderr and completed.stderr.count(b"\n") == 1, completed.stderr
    assert image.read_bytes() == before and os.path.exists("/dev/null")


def test_the_pin_follows_the_image_through_a_symlink(
        image: Path, passphrase_file: Path, tmp_path: Path, wasm_fixture: WasmFixture,
        keep_environment: dict[str, str]) -> None:
    """Found in review: pins were keyed by the path as given, so a run through `link.img` and a
    later one through the real name did not see each other's pin (a rolled-back image passed
    unnoticed). The key is the image's real path now; a file keyed the old way still works."""
    link = tmp_path / "link.img"
    link.symlink_to(image)
    state = tmp_path / "pins.json"
    old_copy = image.read_bytes()
    run = keep(["run", *volume_options(link, passphrase_file), "--volume-state", str(state),
                str(wasm_fixture("volume_sync_then")), "exit"], keep_environment)
    assert run.returncode == 0, run.stderr
    image.write_bytes(old_copy)  # the host rolls the image back
    again = keep(["run", *volume_options(image, passphrase_file), "--volume-state", str(state),
                  str(wasm_fixture("volume_sync_then")), "exit"], keep_environment)
    assert again.returncode != 0 and b"older than the pinned generation" in again.stderr, again.stderr
    pins = json.loads(state.read_text())
    state.write_text(json.dumps({str(link.absolute()): pins[str(image.resolve())]}))  # written the old way
    through_link = keep(["run", *volume_options(link, passphrase_file), "--volume-state", str(state),
                         str(wasm_fixture("volume_sync_then")), "exit"], keep_environment)
    assert through_link.returncode != 0 and b"older than the pinned generation" in through_link.stderr
