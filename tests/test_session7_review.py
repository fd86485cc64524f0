"""Session 7's final review of the whole session's diff: each test reproduces a defect found
then (it failed on the code before its fix).

The CLI runs in-process through `shim.cli.main` (the exit status it returns and the one line it
prints on stderr), on real image files made with tiny KDF costs.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shim.cli import main
from storage.fs import ROOT_INODE
from storage.luks2 import KdfCost
from storage.volume import create_volume, open_volume

PASSPHRASE = b"final review"
KEY_OPTIONS = ["--passphrase-env", "KEEP_FINAL_REVIEW_KEY"]


@pytest.fixture(autouse=True)
def _key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEP_FINAL_REVIEW_KEY", PASSPHRASE.decode())


def make_image(path: Path, files: dict[bytes, bytes]) -> Path:
    """A 24 MiB volume at `path` holding `files` (names in the root directory)."""
    with create_volume(path, 24 << 20, PASSPHRASE, kdf_cost=KdfCost(1, 8, 1)) as volume:
        for name, data in files.items():
            attr = volume.fs.create(ROOT_INODE, name)
            volume.fs.write(attr.ino, 0, data)
        volume.commit()
    return path


def keep_volume(*args: str | os.PathLike[str]) -> int:
    """`keep volume ARGS` in this process, with the test key; returns the exit status."""
    return main(["volume", *(os.fspath(arg) for arg in args), *KEY_OPTIONS])


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node needs root")
def test_get_into_a_full_device_names_the_device_not_the_image(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`keep volume get v.img /small /dev/full` (d310101 writes into devices) said
    'v.img: no space left on device', blaming the encrypted volume: a file smaller than the
    write buffer fails only when the buffer is written out, and closing the sink wrote it out
    again outside the host-error naming. The device is named, whatever the file's size."""
    image = make_image(tmp_path / "v.img", {b"small": b"hello\n", b"big": os.urandom(3 << 20)})
    full = tmp_path / "full"
    os.mknod(full, stat.S_IFCHR | 0o666, os.makedev(1, 7))  # a /dev/full of our own
    for name in ("/small", "/big"):
        assert keep_volume("get", image, name, full) == 1
        assert capsys.readouterr().err.splitlines() == [f"keep: {full}: no space left on device"]
    assert stat.S_ISCHR(full.lstat().st_mode)


@pytest.mark.parametrize("value", [
    '"""he said \\""""',  # a multi-line basic string ending in an escaped quote
    '"""a \\""" b"""',  # an escaped triple quote inside one
    '"""ends in a quote""""',  # up to two quotes before the closing three are content
    "'''ends in a quote''''",
])
def test_a_valid_keep_toml_with_escaped_quotes_is_not_refused_as_a_long_dotted_key(value: str) -> None:
    """8c4b1a8's scan for long dotted keys ended a multi-line basic string at an escaped
    triple quote (and any string at its first three closing quotes), so the rest of the text
    was read out of step: a later string holding a dotted name of 17 parts (a Java class, a
    DNS name) was taken for a bare dotted key and a valid keep.toml refused."""
    from shim.config import parse_config

    name = ".".join(f"p{index}" for index in range(18))
    text = f'args = [{value}, "{name}"]\n'
    config = parse_config(text)
    assert config.args[-1] == name


def test_a_keep_toml_with_an_unterminated_string_of_escaped_quotes_is_refused_at_once(
        tmp_path: Path) -> None:
    """8c4b1a8's scan for long dotted keys (run before tomllib, also on a deployed keep.toml
    from anyone who connects) restarted a one-line string at every quote of an unterminated
    'x = "\\"\\"\\"...', each rescanning the line: quadratic (16 KB: 3.8 s; a 400 KB keep.toml
    about 40 minutes of the keep's event loop). Now it is tomllib's one-line error at once."""
    import subprocess
    import sys

    config = tmp_path / "keep.toml"
    config.write_text('x = "' + '\\"' * 30000 + "\n")
    try:
        done = subprocess.run([sys.executable, "-m", "shim", "run", "--config", str(config),
                               str(tmp_path / "absent.wasm")], capture_output=True, text=True,
                              timeout=30, env={**os.environ, "KEEPSHIM_CACHE_DIR": str(tmp_path)})
    except subprocess.TimeoutExpired:
        pytest.fail("keep run spent more than 30 s scanning a 60 KB keep.toml")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("keep: ") and "keep.toml" in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr


def test_a_volume_cut_to_one_data_sector_says_the_segment_is_too_small(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bc94864 reads both superblocks before the layout is known: an image cut by the host to
    one data sector said 'read [...) is past the end of the ...-byte device' instead of the
    layout's 'a 4096-byte data segment is too small for integrity' (as two or three sectors
    still say)."""
    image = make_image(tmp_path / "v.img", {b"a": b"a\n"})
    with open_volume(image, PASSPHRASE, writable=False) as volume:
        offset = volume.luks.data_offset
    os.truncate(image, offset + 4096)
    assert keep_volume("ls", image, "/") == 1
    assert capsys.readouterr().err.splitlines() == [
        f"keep: {image}: a 4096-byte data segment is too small for integrity"]


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/setpriv").exists(),
                    reason="runs keep as root without the DAC capabilities (setpriv)")
def test_export_of_a_deep_tree_with_an_unsearchable_directory_succeeds(tmp_path: Path) -> None:
    """5dc1c9a's export keeps at most 64 host directories open and reopens a closed parent
    through its child's "..", but did so after giving the child its mode: a volume directory
    of mode 0600 (no search) more than 64 levels above the tree's deepest made an export as
    any user but a privileged root fail with 'd0/.../d5: permission denied' (it worked before).
    The parent is reopened first."""
    import subprocess
    import sys

    image = tmp_path / "v.img"
    with create_volume(image, 24 << 20, PASSPHRASE, kdf_cost=KdfCost(1, 8, 1)) as volume:
        ino = ROOT_INODE
        for depth in range(70):
            ino = volume.fs.mkdir(ino, b"d%d" % depth, 0o600 if depth == 3 else 0o755).ino
        volume.commit()
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m", "shim",
         "volume", "export", str(image), str(out), "/", *KEY_OPTIONS],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"exported 70 entries to {out}\n"
    assert stat.S_IMODE((out / "d0" / "d1" / "d2" / "d3").stat().st_mode) == 0o600


def test_grants_and_pre_opens_spell_guest_paths_one_way() -> None:
    """The duplicate-grant check (keep deploy, the keep) and keep run's pre-open check share one
    guest-path spelling, shim.attest._protocol.normal_guest_path (the grant check had its own
    copy); a grant's path with `..` is refused before either runs."""
    from shim.attest._protocol import LocalProtocolError, VolumeGrant, duplicate_grant, normal_guest_path

    grants = (VolumeGrant("one", key_file=b"k", guest_path="//data/."),
              VolumeGrant("two", key_file=b"k", guest_path="/data/"))
    assert duplicate_grant(grants) == "two volumes are granted at guest path '/data'"
    assert duplicate_grant(grants[:1]) is None
    with pytest.raises(LocalProtocolError, match=r"without '\.\.'"):
        VolumeGrant("three", key_file=b"k", guest_path="/a/../data")
    assert [normal_guest_path(name) for name in ("/data", "//data/.", "/a/../data", "data/", ".")] == \
        ["/data", "/data", "/data", "data", ""]
