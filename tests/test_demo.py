"""`keep demo` end to end, as the README's first command runs it: a subprocess, then the test
checks the outcome itself (the image it left behind, with cryptsetup and its own scan), not just
the transcript."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shim.audit import marker_forms, scan_file
from shim.demo import ENTRIES, IMAGE_NAME

DEMO_TIMEOUT = 180.0


def run_demo(arguments: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shim", "demo", *arguments], capture_output=True,
                          text=True, env=env, stdin=subprocess.DEVNULL, timeout=DEMO_TIMEOUT,
                          check=False)


def test_demo_round_trips_the_entries_and_leaves_only_ciphertext(
        tmp_path: Path, keep_environment: dict[str, str]) -> None:
    workdir = tmp_path / "demo"
    result = run_demo(["--workdir", str(workdir)], keep_environment)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    tag_match = re.search(r"#(kd-[0-9a-f]{12})", out)
    assert tag_match, out
    posted = [f"{entry} #{tag_match.group(1)}" for entry in ENTRIES]
    # every POST was stored, the GET and the reopened volume gave back exactly what was posted
    assert out.count("-> 201 Created: stored entry") == len(ENTRIES)
    listing = out.split("-> 200 OK", 1)[1].split("\n[", 1)[0]
    assert [line.strip() for line in listing.splitlines()[1:] if line.strip()] == posted
    reopened = [line.split("/data/guestbook.txt: ", 1)[1] for line in out.splitlines()
                if "/data/guestbook.txt: " in line]
    assert reopened == posted
    assert "the guest exited with status 0" in out
    assert "FOUND" not in out and out.count(": not found") == len(ENTRIES) + 2

    # Independently of the demo's own scan: the image is a LUKS2 volume holding no entry in any form.
    image = workdir / IMAGE_NAME
    assert image.stat().st_size == 32 << 20
    for text in [*posted, tag_match.group(1)]:
        assert scan_file(image, marker_forms(text.encode())) == []
    for other in workdir.iterdir():
        assert scan_file(other, marker_forms(tag_match.group(1).encode())) == []
    uuid = re.search(r"uuid\s+([0-9a-f-]{36})\n", out)
    assert uuid, out
    if shutil.which("cryptsetup"):
        luks_uuid = subprocess.run(["cryptsetup", "luksUUID", str(image)], capture_output=True,
                                   text=True, check=True).stdout.strip()
        assert luks_uuid == uuid.group(1)
    assert (workdir / "keep-cert.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")


def test_demo_without_workdir_removes_its_temporary_directory(
        tmp_path: Path, keep_environment: dict[str, str]) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    result = run_demo([], {**keep_environment, "TMPDIR": str(scratch)})
    assert result.returncode == 0, result.stderr
    assert "done: 3 entries went in over TLS" in result.stdout
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("prepare", ["image", "file"])
def test_demo_refuses_an_unusable_workdir_in_one_line(
        tmp_path: Path, keep_environment: dict[str, str], prepare: str) -> None:
    if prepare == "image":
        workdir = tmp_path / "used"
        workdir.mkdir()
        (workdir / IMAGE_NAME).write_bytes(b"an earlier demo's image")
    else:
        workdir = tmp_path / "a-file"
        workdir.write_text("not a directory")
    result = run_demo(["--workdir", str(workdir)], keep_environment)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("keep: --workdir ")
    assert "Traceback" not in result.stderr
    if prepare == "image":
        assert (workdir / IMAGE_NAME).read_bytes() == b"an earlier demo's image"
