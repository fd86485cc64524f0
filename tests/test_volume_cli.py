"""`keep volume ...` end to end, as a subprocess (real images, small KDF costs for speed)."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shim import volume_cli
from shim.errors import KeepError
from shim.keys import KeySource, read_key
from storage.blockdev import MemoryBlockDevice
from storage.errors import NoSpace
from storage.fs import ROOT_INODE
from storage.luks2 import KdfCost
from storage.volume import create_volume

PASSPHRASE = "volume test passphrase"
FAST_KDF = ["--pbkdf-memory", "8192", "--pbkdf-force-iterations", "1", "--pbkdf-parallel", "1"]


def keep(*args: str | os.PathLike[str], passphrase: str | None = PASSPHRASE,
         env: dict[str, str] | None = None, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """Run `keep volume ARGS` with the key in $KEEP_TEST_KEY (unless passphrase is None)."""
    environment = {**os.environ, **(env or {})}
    command = [sys.executable, "-m", "shim", "volume", *map(str, args)]
    if passphrase is not None:
        environment["KEEP_TEST_KEY"] = passphrase
        command += ["--passphrase-env", "KEEP_TEST_KEY"]
    return subprocess.run(command, env=environment, input=stdin, capture_output=True, timeout=120)


def ok(*args: str | os.PathLike[str], **options: object) -> bytes:
    result = keep(*args, **options)  # type: ignore[arg-type]
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


@pytest.fixture(scope="module")
def pristine_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    image = tmp_path_factory.mktemp("volume") / "base.img"
    ok("create", image, "--size", "24M", *FAST_KDF)
    return image


@pytest.fixture
def image(pristine_image: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "volume.img"
    shutil.copyfile(pristine_image, copy)
    return copy


@pytest.mark.slow
def test_put_ls_cat_get_mkdir_rm_round_trip(image: Path, tmp_path: Path) -> None:
    payload = os.urandom(300_000)
    (tmp_path / "data.bin").write_bytes(payload)
    ok("mkdir", image, "/docs/deep", "-p")
    ok("put", image, tmp_path / "data.bin", "/docs/data.bin")
    ok("put", image, "-", "/docs/deep/note.txt", stdin=b"hello from stdin\n")
    listing = ok("ls", image, "/docs").decode()
    assert "data.bin" in listing and "300000" in listing and "deep/" in listing
    assert ok("cat", image, "/docs/deep/note.txt") == b"hello from stdin\n"
    ok("get", image, "/docs/data.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == payload
    ok("rm", image, "/docs/data.bin")
    missing = keep("cat", image, "/docs/data.bin")
    assert missing.returncode == 1 and b"/docs/data.bin: No such file or directory" in missing.stderr
    refused = keep("rm", image, "/docs")
    assert refused.returncode == 1 and b"is a directory" in refused.stderr
    ok("rm", image, "/docs", "-r")
    assert ok("ls", image).strip() == b""
    assert ok("fsck", image).strip().endswith(b"clean")
    assert payload[:4096] not in image.read_bytes()  # the host sees ciphertext only


def test_import_export_round_trip(image: Path, tmp_path: Path) -> None:
    source = tmp_path / "tree"
    (source / "a" / "b").mkdir(parents=True)
    (source / "a" / "b" / "file.bin").write_bytes(os.urandom(70_000))
    (source / "top.txt").write_text("top\n")
    (source / "empty").mkdir()
    os.symlink("a/b/file.bin", source / "link")
    os.chmod(source / "top.txt", 0o600)
    ok("import", image, source, "/imported")
    out = tmp_path / "out"
    ok("export", image, out, "/imported")
    assert (out / "a" / "b" / "file.bin").read_bytes() == (source / "a" / "b" / "file.bin").read_bytes()
    assert (out / "top.txt").read_text() == "top\n"
    assert os.stat(out / "top.txt").st_mode & 0o777 == 0o600
    assert os.stat(out / "top.txt").st_mtime_ns == os.stat(source / "top.txt").st_mtime_ns
    assert (out / "empty").is_dir()
    assert os.readlink(out / "link") == "a/b/file.bin"


def test_wrong_passphrase_exits_2_and_writes_nothing(image: Path, tmp_path: Path) -> None:
    before = image.read_bytes()
    (tmp_path / "f").write_bytes(b"x")
    attempts: list[tuple[str | Path, ...]] = [
        ("put", image, tmp_path / "f", "/f"), ("ls", image),
        ("add-key", image, "--new-passphrase-env", "NEW_KEY", *FAST_KDF)]
    for args in attempts:
        result = keep(*args, passphrase="not the passphrase", env={"NEW_KEY": "whatever"})
        assert result.returncode == 2, result.stderr
        assert result.stderr.decode().strip() == "keep: wrong passphrase"
    assert image.read_bytes() == before


def test_non_luks_and_missing_images_are_clear_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(1 << 20))
    result = keep("ls", junk)
    assert result.returncode == 1 and b"is not a LUKS2 volume" in result.stderr
    missing = keep("info", tmp_path / "nope.img")
    assert missing.returncode == 1 and b"no such file" in missing.stderr
    assert b"Traceback" not in result.stderr + missing.stderr


def test_an_image_in_use_is_refused(image: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom storage.blockdev import FileBlockDevice\n"
         f"device = FileBlockDevice({str(image)!r}, writable=True)\nprint('locked', flush=True)\n"
         "sys.stdin.read()\n"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        result = keep("ls", image)
        assert result.returncode == 1
        assert b"is in use by another process" in result.stderr
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)


@pytest.mark.slow
def test_add_key_passwd_remove_key(image: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "binary.key"
    key_file.write_bytes(os.urandom(64))
    ok("add-key", image, "--new-key-file", key_file, *FAST_KDF)
    listed = keep("ls", image, "--key-file", key_file, passphrase=None)
    assert listed.returncode == 0, listed.stderr
    (tmp_path / "new.txt").write_text("brand new\n")
    ok("passwd", image, "--new-passphrase-file", tmp_path / "new.txt", *FAST_KDF)
    assert keep("ls", image).returncode == 2  # the old passphrase is gone
    assert keep("ls", image, passphrase="brand new").returncode == 0  # newline dropped
    ok("remove-key", image, "--key-file", key_file, passphrase=None)
    assert keep("ls", image, "--key-file", key_file, passphrase=None).returncode == 2
    last = keep("remove-key", image, passphrase="brand new")
    assert last.returncode == 1 and b"last keyslot" in last.stderr
    if shutil.which("cryptsetup"):
        check = subprocess.run(["cryptsetup", "open", "--test-passphrase", str(image),
                                "--key-file", "-"], input=b"brand new", capture_output=True)
        assert check.returncode == 0, check.stderr


def test_info_and_header_only_info(image: Path) -> None:
    facts = json.loads(ok("info", image, "--json"))
    assert facts["integrity"] == "merkle" and facts["luks2"]["cipher"] == "aes-xts-plain64"
    assert facts["luks2"]["sector_size"] == 4096 and isinstance(facts["generation"], int)
    assert facts["integrity_format"] == 2  # 512-byte tree nodes (storage.integrity)
    header = json.loads(ok("info", image, "--header-only", "--json", passphrase=None))
    assert header["uuid"] == facts["uuid"] and header["keyslots"] == [0]


def test_create_without_integrity_and_refusals(tmp_path: Path) -> None:
    plain = tmp_path / "plain.img"
    ok("create", plain, "--size", "24M", "--integrity", "none", "--pbkdf", "pbkdf2",
       "--pbkdf-force-iterations", "1000")
    ok("put", plain, "-", "/x", stdin=b"plain data area")
    assert ok("cat", plain, "/x") == b"plain data area"
    assert json.loads(ok("info", plain, "--json"))["integrity"] == "none"
    again = keep("create", plain, "--size", "24M", *FAST_KDF)
    assert again.returncode == 1 and b"already exists" in again.stderr
    bad_size = keep("create", tmp_path / "b.img", "--size", "lots", *FAST_KDF)
    assert bad_size.returncode == 2 and b"invalid size" in bad_size.stderr
    tiny = keep("create", tmp_path / "t.img", "--size", "1M", *FAST_KDF)
    assert tiny.returncode == 1 and not (tmp_path / "t.img").exists()


def test_no_key_source_and_no_terminal_is_a_clear_error(image: Path) -> None:
    result = keep("ls", image, passphrase=None)
    assert result.returncode == 1 and b"no passphrase given" in result.stderr


def test_key_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = tmp_path / "pass.txt"
    text.write_bytes(b"line\r\n")
    binary = tmp_path / "key.bin"
    binary.write_bytes(b"\x00\xffkey\n")
    assert read_key(KeySource(passphrase_file=str(text))) == b"line"
    assert read_key(KeySource(key_file=str(binary))) == b"\x00\xffkey\n"
    monkeypatch.setenv("SOME_KEY", "from env")
    assert read_key(KeySource(passphrase_env="SOME_KEY")) == b"from env"
    with pytest.raises(KeepError, match="not set"):
        read_key(KeySource(passphrase_env="UNSET_KEY_VARIABLE"))
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(KeepError, match="empty"):
        read_key(KeySource(key_file=str(tmp_path / "empty")))
    with pytest.raises(KeepError, match="cannot read"):
        read_key(KeySource(key_file=str(tmp_path / "missing")))


def _run_on_a_terminal(command: list[str], typed: bytes,
                       env: dict[str, str] | None = None) -> tuple[int, bytes]:
    """Run `command` with a pseudo-terminal as its controlling terminal, type `typed` at every
    passphrase prompt, and return (exit status, everything the terminal showed)."""
    import fcntl
    import select
    import termios

    main_fd, terminal_fd = os.openpty()

    def take_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    process = subprocess.Popen(command, stdin=terminal_fd, stdout=terminal_fd, stderr=terminal_fd,
                               start_new_session=True, preexec_fn=take_terminal,
                               env=None if env is None else {**os.environ, **env})
    os.close(terminal_fd)
    shown = b""
    answered = 0
    try:
        while True:
            ready, _, _ = select.select([main_fd], [], [], 60)
            if not ready:
                raise AssertionError(f"no output from {command}: {shown!r}")
            try:
                chunk = os.read(main_fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
            if shown.count(b"assphrase: ") > answered:
                os.write(main_fd, typed)
                answered += 1
    finally:
        os.close(main_fd)
    return process.wait(timeout=60), shown


def test_passphrase_prompt_on_a_terminal_does_not_echo(image: Path) -> None:
    status, shown = _run_on_a_terminal(
        [sys.executable, "-m", "shim", "volume", "ls", str(image)], PASSPHRASE.encode() + b"\n")
    assert status == 0, shown
    assert b"Passphrase: " in shown
    assert PASSPHRASE.encode() not in shown  # echo was off while typing


@pytest.mark.slow
def test_create_on_a_terminal_confirms_the_passphrase_and_shows_progress(tmp_path: Path) -> None:
    image = tmp_path / "interactive.img"
    status, shown = _run_on_a_terminal(
        [sys.executable, "-m", "shim", "volume", "create", str(image), "--size", "24M",
         "--iter-time", "1500", "--pbkdf-memory", "65536"], b"typed twice\n",
        env={"KEEPSHIM_PROGRESS_DELAY": "0"})  # the bar at once: no dependence on how long it takes
    assert status == 0, shown
    assert b"Verify passphrase: " in shown and b"typed twice" not in shown
    assert b"creating " in shown and b" done" in shown
    assert keep("ls", image, passphrase="typed twice").returncode == 0


@pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="cryptsetup is not installed")
def test_a_plain_cryptsetup_image_gets_key_management_and_a_clear_info(tmp_path: Path) -> None:
    image = tmp_path / "cryptsetup.img"
    with open(image, "wb") as handle:
        handle.truncate(20 << 20)
    subprocess.run(["cryptsetup", "-q", "luksFormat", "--type", "luks2", "--sector-size", "4096",
                    "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", str(image),
                    "--key-file", "-"], input=PASSPHRASE.encode(), check=True, capture_output=True)
    info = keep("info", image)
    assert info.returncode == 1 and b"cipher: aes-xts-plain64" in info.stdout
    assert b"integrity error" in info.stderr and b"Traceback" not in info.stderr
    ok("add-key", image, "--new-passphrase-env", "SECOND", *FAST_KDF, env={"SECOND": "second"})
    check = subprocess.run(["cryptsetup", "open", "--test-passphrase", str(image), "--key-file", "-"],
                           input=b"second", capture_output=True)
    assert check.returncode == 0, check.stderr


def one_line_error(result: subprocess.CompletedProcess[bytes], status: int) -> str:
    """The single `keep: ...` line a refused action prints (no traceback, no internal error)."""
    text = result.stderr.decode()
    assert result.returncode == status, text
    assert text.startswith("keep: ") and text.count("\n") == 1, text
    assert "internal error" not in text and "Traceback" not in text, text
    return text.strip()


def test_export_never_writes_through_host_symlinks(image: Path, tmp_path: Path) -> None:
    """A volume that once held `x -> victim` (left on the host by an earlier export) and now
    holds a regular file `x` must replace the host symlink, not write through it; the same for
    a symlinked directory, and for a FIFO where the volume has a file (no hang)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious host file\n")
    victim_dir = tmp_path / "victim-dir"
    victim_dir.mkdir()
    stage = tmp_path / "stage"
    stage.mkdir()
    os.symlink(victim, stage / "x")
    os.symlink(victim_dir, stage / "d")
    ok("import", image, stage, "/")
    out = tmp_path / "out"
    ok("export", image, out)
    assert (out / "x").is_symlink() and (out / "d").is_symlink()
    ok("rm", image, "/x")
    ok("rm", image, "/d")
    ok("put", image, "-", "/x", stdin=b"written by the volume\n")
    ok("mkdir", image, "/d")
    ok("put", image, "-", "/d/inner", stdin=b"inner\n")
    ok("put", image, "-", "/fifo", stdin=b"was a fifo\n")
    os.mkfifo(out / "fifo")
    ok("export", image, out)
    assert victim.read_text() == "precious host file\n"
    assert list(victim_dir.iterdir()) == []
    assert not (out / "x").is_symlink() and (out / "x").read_bytes() == b"written by the volume\n"
    assert not (out / "d").is_symlink() and (out / "d" / "inner").read_bytes() == b"inner\n"
    assert (out / "fifo").read_bytes() == b"was a fifo\n"


def test_export_refuses_to_replace_a_host_directory_with_a_file(image: Path, tmp_path: Path) -> None:
    ok("put", image, "-", "/name", stdin=b"a file in the volume\n")
    out = tmp_path / "out"
    (out / "name").mkdir(parents=True)
    (out / "name" / "keep-me").write_text("host data\n")
    line = one_line_error(keep("export", image, out), 1)
    assert str(out / "name") in line and "is a directory" in line
    assert (out / "name" / "keep-me").read_text() == "host data\n"


def test_a_failed_put_keeps_the_old_file(image: Path, tmp_path: Path) -> None:
    important = os.urandom(1 << 20)
    (tmp_path / "important.bin").write_bytes(important)
    ok("put", image, tmp_path / "important.bin", "/important.bin")
    (tmp_path / "too-big.bin").write_bytes(os.urandom(12 << 20))
    line = one_line_error(keep("put", image, tmp_path / "too-big.bin", "/important.bin"), 1)
    assert "no space left" in line
    assert ok("cat", image, "/important.bin") == important
    assert ok("ls", image).decode().split()[-1] == "important.bin"  # no temporary left behind
    assert ok("fsck", image).strip().endswith(b"clean")


def test_put_replaces_through_a_temporary_that_never_collides(
        image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """In process (to pin the random names): the first temporary name is taken, so put must
    pick another and leave the existing entry alone; replacing keeps the old file's mode."""
    from shim.cli import main

    names = iter(["taken", "taken", "free"])
    monkeypatch.setattr("secrets.token_hex", lambda size=None: next(names))
    monkeypatch.setenv("KEEP_TEST_KEY", PASSPHRASE)
    key = ["--passphrase-env", "KEEP_TEST_KEY"]
    ok("put", image, "-", "/.keep-put-taken", stdin=b"not mine\n")
    ok("put", image, "-", "/file", stdin=b"old\n")
    (tmp_path / "new").write_bytes(b"new contents\n")
    os.chmod(tmp_path / "new", 0o600)
    assert main(["volume", "put", str(image), str(tmp_path / "new"), "/file", *key]) == 0
    assert ok("cat", image, "/file") == b"new contents\n"
    assert ok("cat", image, "/.keep-put-taken") == b"not mine\n"
    listing = ok("ls", image).decode().splitlines()
    assert sorted(line.split()[-1] for line in listing) == [".keep-put-taken", "file"]
    assert [line.split()[0] for line in listing if line.endswith(" file")] == ["-rw-r--r--"]


def test_a_failed_get_leaves_no_plaintext_and_names_the_destination(image: Path,
                                                                   tmp_path: Path) -> None:
    ok("put", image, "-", "/secret.txt", stdin=b"top secret plaintext\n")
    host = tmp_path / "host"
    (host / "dest").mkdir(parents=True)
    line = one_line_error(keep("get", image, "/secret.txt", host / "dest"), 1)
    assert line == f"keep: {host / 'dest'}: is a directory"
    assert sorted(path.name for path in host.iterdir()) == ["dest"]
    assert list((host / "dest").iterdir()) == []
    (host / "plain").write_text("x")
    line = one_line_error(keep("get", image, "/secret.txt", host / "plain" / "x"), 1)
    assert str(host / "plain" / "x") in line and "not a directory" in line
    # a host file named like the old temporary is not touched by a successful get
    (host / "out.keep-partial").write_text("mine\n")
    ok("get", image, "/secret.txt", host / "out")
    assert (host / "out").read_bytes() == b"top secret plaintext\n"
    assert (host / "out.keep-partial").read_text() == "mine\n"
    assert sorted(path.name for path in host.iterdir()) == ["dest", "out", "out.keep-partial",
                                                            "plain"]


def test_get_makes_the_new_file_durable_before_it_replaces_the_old_one(
        image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`get` over an existing host file renamed its temporary over it without an fsync: after a
    crash the host could keep neither version (an empty file in its place). The order of the
    real system calls is recorded: the temporary's data is fsync'd before the rename, the
    directory after it."""
    ok("put", image, "-", "/report.txt", stdin=b"new report\n")
    destination = tmp_path / "report.txt"
    destination.write_text("old report\n")
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def replace(source: str, target: str) -> None:
        calls.append(("replace", str(target)))
        real_replace(source, target)

    from shim.cli import main

    monkeypatch.setenv("KEEP_TEST_KEY", PASSPHRASE)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    assert main(["volume", "get", str(image), "/report.txt", str(destination),
                 "--passphrase-env", "KEEP_TEST_KEY"]) == 0
    assert destination.read_bytes() == b"new report\n"
    renamed = calls.index(("replace", str(destination)))
    before, after = calls[:renamed], calls[renamed + 1:]
    assert any(kind == "fsync" and Path(target).parent == tmp_path
               and Path(target).name.endswith(".keep-partial") for kind, target in before), calls
    assert ("fsync", str(tmp_path)) in after, calls


def test_get_succeeds_where_the_directory_cannot_be_fsynced(
        image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some network and FUSE filesystems refuse fsync on a directory (EINVAL). `get` had already
    renamed the new file into place there, then reported failure (exit 1) for a copy that was
    done; now EINVAL from the directory's fsync is not an error (any other errno still is)."""
    from shim.cli import main

    ok("put", image, "-", "/report.txt", stdin=b"new report\n")
    destination = tmp_path / "report.txt"
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{descriptor}"):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(descriptor)

    monkeypatch.setenv("KEEP_TEST_KEY", PASSPHRASE)
    monkeypatch.setattr(os, "fsync", fsync)
    assert main(["volume", "get", str(image), "/report.txt", str(destination),
                 "--passphrase-env", "KEEP_TEST_KEY"]) == 0
    assert destination.read_bytes() == b"new report\n"


def test_bad_input_is_a_one_line_error(image: Path, tmp_path: Path) -> None:
    for target in (tmp_path, "/dev/null"):
        for args in (("ls", target), ("info", target)):
            line = one_line_error(keep(*args), 1)
            assert line == f"keep: {target}: is neither a regular file nor a block device"
    kdf_cases = [
        (["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "10"], "1000"),
        (["--pbkdf-force-iterations", "1", "--pbkdf-memory", "4", "--pbkdf-parallel", "1"], "KiB"),
        (["--pbkdf-force-iterations", "1000", "--pbkdf-memory", "8192", "--pbkdf-parallel", "1"],
         "time cost"),
        (["--pbkdf-force-iterations", "1", "--pbkdf-memory", "8192", "--pbkdf-parallel", "65"],
         "parallel"),
    ]
    for options, limit in kdf_cases:
        created = tmp_path / "k.img"
        line = one_line_error(keep("create", created, "--size", "24M", *options), 2)
        assert limit in line and not created.exists()
        line = one_line_error(keep("add-key", image, "--new-passphrase-env", "NEW", *options,
                                   env={"NEW": "new"}), 2)
        assert limit in line
    line = one_line_error(keep("create", tmp_path / "l.img", "--size", "24M", "--label", "L" * 48,
                               *FAST_KDF), 2)
    assert "at most 47" in line and not (tmp_path / "l.img").exists()
    # bytes that are not UTF-8 on the command line (they reach Python as lone surrogates)
    line = one_line_error(keep("create", tmp_path / "l.img", "--size", "24M", "--label", "caf\udce9",
                               *FAST_KDF), 2)
    assert "not valid UTF-8" in line and not (tmp_path / "l.img").exists()
    ok("create", tmp_path / "l.img", "--size", "24M", "--label", "L" * 47, *FAST_KDF)
    ok("mkdir", image, "/docs")
    ok("put", image, "-", "/docs/note.txt", stdin=b"note\n")
    plain = tmp_path / "plainfile"
    plain.write_text("x")
    line = one_line_error(keep("export", image, plain), 1)
    assert str(plain) in line and "not a directory" in line
    assert plain.read_text() == "x"
    out = tmp_path / "out"
    out.mkdir()
    (out / "docs").write_text("a host file where the volume has a directory")
    ok("export", image, out)  # the host file is replaced, as a host symlink would be
    assert (out / "docs" / "note.txt").read_bytes() == b"note\n"
    line = one_line_error(keep("get", image, "/docs/note.txt", plain / "x"), 1)
    assert str(plain / "x") in line and "not a directory" in line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["l.img", "out", "plainfile",
                                                                "volume.img"]


def test_the_root_path(image: Path, tmp_path: Path) -> None:
    ok("put", image, "-", "/f", stdin=b"f\n")
    for args in (("rm", image, "/", "-r"), ("rm", image, "/"), ("rm", image, "//.")):
        assert one_line_error(keep(*args), 1) == "keep: refusing to remove the root directory"
    assert one_line_error(keep("put", image, "-", "/", stdin=b"x"), 1) == "keep: /: Is a directory"
    assert one_line_error(keep("mkdir", image, "/"), 1) == "keep: /: File exists"
    ok("mkdir", image, "/", "-p")
    assert one_line_error(keep("cat", image, "/"), 1) == "keep: /: Is a directory"
    assert one_line_error(keep("get", image, "/", tmp_path / "g"), 1) == "keep: /: Is a directory"
    assert not (tmp_path / "g").exists()
    assert one_line_error(keep("rm", image, "/.."), 1) == "keep: /..: Invalid argument"
    assert ok("ls", image, "/").decode().split()[-1] == "f"
    assert ok("cat", image, "/f") == b"f\n"


def test_put_fails_when_the_volume_takes_only_part_of_a_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """storage.fs.write returns a short count when the volume fills up part way through a write
    (POSIX write); put must then fail (and keep the old file), not go on with a hole."""
    with create_volume(MemoryBlockDevice(24 << 20), None, b"pw", pbkdf="pbkdf2",
                       kdf_cost=KdfCost(iterations=1000)) as volume:
        fs = volume.fs
        root = fs.getattr(ROOT_INODE)
        volume_cli._write_file(fs, root, b"f", io.BytesIO(b"old"), 0o644, "/f")
        monkeypatch.setattr(fs, "write", lambda ino, offset, data: len(data) // 2)
        with pytest.raises(NoSpace):
            volume_cli._write_file(fs, root, b"f", io.BytesIO(b"new contents" * 100), 0o644, "/f")
        monkeypatch.undo()
        attr = fs.lookup(ROOT_INODE, b"f")
        assert fs.read(attr.ino, 0, 100) == b"old"
        assert [name for name, _, _ in fs.readdir(ROOT_INODE)] == [b".", b"..", b"f"]


def test_a_reader_that_went_away_ends_the_action_quietly_with_141(image: Path, tmp_path: Path) -> None:
    """`keep volume ls IMG | head`: stdout's reader is gone (EPIPE), which ends the action
    without a word and with exit status 141, as SIGPIPE ends `ls`; a stdout that fails
    otherwise (/dev/full: ENOSPC) is still an error that says so."""
    source = tmp_path / "file"
    source.write_bytes(b"x" * 100_000)
    ok("put", image, source, "/file")
    for action in (["ls", image, "/"], ["cat", image, "/file"]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader went away before the first byte
        environment = {**os.environ, "KEEP_TEST_KEY": PASSPHRASE}
        result = subprocess.run([sys.executable, "-m", "shim", "volume", *map(str, action),
                                 "--passphrase-env", "KEEP_TEST_KEY"],
                                env=environment, stdout=write_end, stderr=subprocess.PIPE, timeout=120)
        os.close(write_end)
        assert (result.returncode, result.stderr) == (141, b""), action
    with open("/dev/full", "wb") as full:
        result = subprocess.run([sys.executable, "-m", "shim", "volume", "cat", str(image), "/file",
                                 "--passphrase-env", "KEEP_TEST_KEY"],
                                env={**os.environ, "KEEP_TEST_KEY": PASSPHRASE}, stdout=full,
                                stderr=subprocess.PIPE, timeout=120)
    assert result.returncode == 1
    assert result.stderr == b"keep: stdout: no space left on device\n"
    assert ok("cat", image, "/file") == b"x" * 100_000  # and the image is as it was
