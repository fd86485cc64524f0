"""`keep` started with its standard fds closed (`keep run ... >&-`, a daemon's child).

Found in review: a closed fd 0, 1 or 2 was taken by the first file `keep` opened, and the
guest's stdio is fds 0, 1 and 2: with stdout closed, `keep run --volume IMG hello` wrote the
guest's "Hello, world!" in plaintext into the encrypted image (which then failed its integrity
check). `keep` now puts /dev/null on any of the three that is closed, before anything else.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixture_build import WasmFixture
from run_volume_support import PASSPHRASE
from test_run_volume import fsck, image, passphrase_file

__all__ = ["image", "passphrase_file"]  # test_run_volume's fixtures, used here too


@pytest.mark.parametrize("closed", [0, 1, 2])
def test_a_closed_standard_fd_never_becomes_the_volume_image(
        closed: int, image: Path, passphrase_file: Path, wasm_fixture: WasmFixture,
        keep_environment: dict[str, str]) -> None:
    other = (subprocess.DEVNULL, subprocess.PIPE, subprocess.PIPE)
    completed = subprocess.run(
        [sys.executable, "-m", "shim", "run", "--volume", f"{image}::/sandbox", "--passphrase-file",
         str(passphrase_file), str(wasm_fixture("hello"))],
        stdin=other[0], stdout=other[1], stderr=other[2], env=keep_environment, timeout=120,
        check=False, preexec_fn=lambda: os.close(closed))
    assert completed.returncode == 0, completed.stderr
    contents = image.read_bytes()
    assert b"Hello, world!" not in contents and b"hello on stderr" not in contents
    assert PASSPHRASE not in contents
    assert fsck(image) == []
    if closed != 1:
        assert completed.stdout == b"Hello, world!\n"
