"""Session 9: key and certificate files that are not regular files (net.files).

keep.toml's TLS certificate, key and CA files, and a volume's --key-file / --passphrase-file,
were opened with a plain open(2): a FIFO there held `keep run` / `keep volume` in open() for
ever, and, with the keep's signal handlers installed, SIGTERM only restarted the call (SIGKILL
alone ended it). Each test runs the real `keep` in a subprocess with a deadline, so a hang is a
failure, never a stuck suite; none asserts a timing.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fixture_build import WasmFixture
from keep_net import STDIO, connect_entry, free_port, keep_env, listen_entry, run_keep_sync

from net.files import FIFO_WRITER_WAIT, InputFileError, open_regular_file, read_input_file
from net.tls import SelfSignedProvider

HANG_GUARD = 60.0  # what a test waits before it calls a hang a failure (not a timing check)
KEEP = [sys.executable, "-m", "shim"]
PASSPHRASE = b"fifo9 passphrase"


def _tls_files(directory: Path) -> tuple[Path, Path]:
    identity = SelfSignedProvider().identity()
    certificate, key = directory / "cert.pem", directory / "key.pem"
    certificate.write_bytes(identity.certificate_chain_pem)
    key.write_bytes(identity.private_key_pem)
    return certificate, key


def _keep_toml_naming(directory: Path, where: str, path: Path) -> str:
    """A keep.toml whose file `where` (tls.certificate, tls.key, a listener's client_ca, a
    connect entry's ca) is `path`, everything else valid."""
    certificate, key = _tls_files(directory)
    port = free_port()
    if where == "certificate":
        return f'[tls]\ncertificate = "{path}"\nkey = "{key}"\n\n' + STDIO + listen_entry("web", port)
    if where == "key":
        return f'[tls]\ncertificate = "{certificate}"\nkey = "{path}"\n\n' + STDIO + listen_entry("web", port)
    if where == "client_ca":
        return STDIO + listen_entry("web", port, client_ca=str(path))
    return STDIO + listen_entry("web", port) + connect_entry("up", "127.0.0.1", free_port(), ca=str(path))


_LABELS = {"certificate": "tls certificate", "key": "tls key", "client_ca": "CA file", "ca": "CA file"}


@pytest.mark.parametrize("where", ["certificate", "key", "client_ca", "ca"])
def test_a_fifo_as_a_keep_toml_tls_file_is_refused_at_once(
        tmp_path: Path, wasm_fixture: WasmFixture, keep_environment: dict[str, str], where: str) -> None:
    """`key = "x.fifo"` (or the certificate, a client_ca, a connect entry's ca) held `keep run`
    at start for ever, before a word was said; now one line naming the file and what it is."""
    fifo = tmp_path / "named.fifo"
    os.mkfifo(fifo)
    toml = _keep_toml_naming(tmp_path, where, fifo)
    try:
        result = run_keep_sync(tmp_path, wasm_fixture("net_http_server"), toml, ["web", "1"],
                               keep_env(keep_environment), timeout=HANG_GUARD)
    except subprocess.TimeoutExpired:
        pytest.fail(f"keep run with keep.toml's {where} a FIFO hung")
    assert result.returncode == 1, result.stderr
    assert result.stderr == f"keep: {_LABELS[where]} {fifo}: is a FIFO, not a regular file\n"


@pytest.mark.parametrize("where", ["key", "client_ca"])
def test_a_device_or_directory_as_a_keep_toml_tls_file_says_what_it_is(
        tmp_path: Path, wasm_fixture: WasmFixture, keep_environment: dict[str, str], where: str) -> None:
    for path, kind in ((Path("/dev/zero"), "a character device"), (tmp_path, "a directory")):
        toml = _keep_toml_naming(tmp_path, where, path)
        result = run_keep_sync(tmp_path, wasm_fixture("net_http_server"), toml, ["web", "1"],
                               keep_env(keep_environment), timeout=HANG_GUARD)
        assert result.returncode == 1, result.stderr
        assert result.stderr == f"keep: {_LABELS[where]} {path}: is {kind}, not a regular file\n"


def test_a_regular_ca_file_still_loads_through_the_checked_descriptor(
        tmp_path: Path, wasm_fixture: WasmFixture, keep_environment: dict[str, str]) -> None:
    """OpenSSL now reads the CA file through /proc/self/fd of the descriptor that was checked:
    a good CA file starts the keep as before (it runs until --timeout)."""
    certificate, _ = _tls_files(tmp_path)
    toml = STDIO + listen_entry("web", free_port(), client_ca=str(certificate))
    result = run_keep_sync(tmp_path, wasm_fixture("net_http_server"), toml, ["web", "1"],
                           keep_env(keep_environment), extra=["--timeout", "1"], timeout=HANG_GUARD)
    assert "accept: Operation canceled" in result.stderr, result.stderr  # it ran until --timeout
    assert "CA file" not in result.stderr


# A volume's --key-file and --passphrase-file: regular files and pipes (as cryptsetup) are read;
# a FIFO that nobody writes to is refused after FIFO_WRITER_WAIT seconds instead of for ever.


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A small volume whose passphrase is PASSPHRASE (cheap KDF), and the environment to use."""
    directory = tmp_path_factory.mktemp("fifo9-volume")
    environment = {**os.environ, "KEEPSHIM_CACHE_DIR": str(directory / "cache")}
    (directory / "pass.txt").write_bytes(PASSPHRASE + b"\n")
    image = directory / "v.img"
    subprocess.run([*KEEP, "volume", "create", str(image), "--size", "32M", "--passphrase-file",
                    str(directory / "pass.txt"), "--pbkdf", "pbkdf2", "--pbkdf-force-iterations",
                    "1000"], check=True, capture_output=True, env=environment, timeout=120)
    return image, environment


def _limit_memory() -> None:
    """A keep that reads /dev/zero whole (the old code) fails at 2 GiB, not at the machine's end."""
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def _keep(arguments: list[str], environment: dict[str, str], *,
          stdin: int | None = subprocess.DEVNULL, shell: bool = False,
          limit_memory: bool = False) -> subprocess.CompletedProcess[str]:
    command: str | list[str] = " ".join(arguments) if shell else arguments
    try:
        return subprocess.run(command, capture_output=True, text=True, env=environment, stdin=stdin,
                              timeout=HANG_GUARD, shell=shell, executable="/bin/bash" if shell else None,
                              preexec_fn=_limit_memory if limit_memory else None)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{command} hung")


@pytest.mark.parametrize("option", ["--key-file", "--passphrase-file"])
def test_a_fifo_nobody_writes_to_as_the_volume_key_is_refused_instead_of_hanging(
        tmp_path: Path, volume: tuple[Path, dict[str, str]], option: str) -> None:
    """`keep volume ls v.img --key-file x.fifo` hung in open() for ever (SIGTERM too)."""
    image, environment = volume
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)
    what = "key file" if option == "--key-file" else "passphrase file"
    result = _keep([*KEEP, "volume", "ls", str(image), option, str(fifo)], environment)
    assert result.returncode == 1, result.stderr
    assert result.stderr == (f"keep: {what} {fifo}: is a FIFO that no program opened for writing "
                             f"within {FIFO_WRITER_WAIT:g} s\n")


def test_keep_run_with_a_fifo_nobody_writes_to_as_the_volume_key_is_refused(
        tmp_path: Path, volume: tuple[Path, dict[str, str]], wasm_fixture: WasmFixture) -> None:
    image, environment = volume
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)
    result = _keep([*KEEP, "run", "--volume", str(image), "--passphrase-file", str(fifo),
                    str(wasm_fixture("hello"))], environment)
    assert result.returncode == 1, result.stderr
    assert "passphrase file" in result.stderr and "is a FIFO that no program opened" in result.stderr


def test_a_process_substitution_or_stdin_pipe_still_gives_the_volume_key(
        volume: tuple[Path, dict[str, str]]) -> None:
    """What cryptsetup accepts as a key file and keep did before: `<(...)` (a pipe whose writer
    is still producing when keep opens it), /dev/stdin on a pipe, /dev/stdin on a file."""
    image, environment = volume
    secret = PASSPHRASE.decode()
    ls = [*KEEP, "volume", "ls", str(image)]
    substituted = _keep([*ls, "--passphrase-file", f"<(sleep 0.5; echo '{secret}')"], environment,
                        shell=True)
    assert substituted.returncode == 0, substituted.stderr
    piped = _keep([f"echo '{secret}' |", *ls, "--passphrase-file", "/dev/stdin"], environment,
                  shell=True)
    assert piped.returncode == 0, piped.stderr
    with open(image.parent / "pass.txt", "rb") as passphrase:
        redirected = _keep([*ls, "--passphrase-file", "/dev/stdin"], environment, stdin=passphrase.fileno())
    assert redirected.returncode == 0, redirected.stderr
    wrong = _keep([*ls, "--passphrase-file", "<(echo wrong)"], environment, shell=True)
    assert wrong.returncode == 2 and "wrong passphrase" in wrong.stderr, wrong.stderr  # it was read


@pytest.mark.parametrize("writer_first", [True, False])
def test_a_fifo_a_program_feeds_still_gives_the_volume_key(
        tmp_path: Path, volume: tuple[Path, dict[str, str]], writer_first: bool) -> None:
    """`mkfifo f; keep volume ls v.img --key-file f & producer > f`, in either order."""
    image, environment = volume
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(PASSPHRASE), daemon=True)
    if writer_first:
        writer.start()
    process = subprocess.Popen([*KEEP, "volume", "ls", str(image), "--key-file", str(fifo)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=environment)
    if not writer_first:
        writer.start()
    try:
        _, stderr = process.communicate(timeout=HANG_GUARD)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail("keep volume ls with a fed FIFO as --key-file hung")
    writer.join(HANG_GUARD)
    assert process.returncode == 0, stderr


def test_a_device_as_the_volume_key_is_refused_naming_it(volume: tuple[Path, dict[str, str]]) -> None:
    image, environment = volume
    result = _keep([*KEEP, "volume", "ls", str(image), "--key-file", "/dev/zero"], environment,
                   limit_memory=True)
    assert result.returncode == 1
    assert result.stderr == ("keep: key file /dev/zero: is a character device, not a regular file "
                             "or a pipe\n")


# net.files itself: the one reader behind both.


def test_read_input_file_refuses_what_it_must_and_reads_what_it_may(tmp_path: Path) -> None:
    regular = tmp_path / "small"
    regular.write_bytes(b"x" * 100)
    assert read_input_file(regular, 100) == b"x" * 100
    with pytest.raises(InputFileError, match=r"small: larger than 99 bytes"):
        read_input_file(regular, 99)
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as stream:
        stream.truncate(1 << 40)  # a terabyte of nothing: refused by its size, unread
    with pytest.raises(InputFileError, match="larger than 1024 bytes"):
        read_input_file(sparse, 1024)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InputFileError, match=r"fifo: is a FIFO, not a regular file$"):
        read_input_file(fifo, 100)
    with pytest.raises(InputFileError, match=r"is a FIFO, not a regular file$"), open_regular_file(fifo, 100):
        pass
    with pytest.raises(FileNotFoundError):
        read_input_file(tmp_path / "absent", 100)


def test_read_input_file_bounds_a_pipe_that_never_ends() -> None:
    """`--key-file <(yes)`: at most limit + 1 bytes are read, then it is refused."""
    reader, writer = os.pipe()
    feeder = threading.Thread(target=_feed_until_closed, args=(writer,), daemon=True)
    feeder.start()
    try:
        with pytest.raises(InputFileError, match="larger than 4096 bytes"):
            read_input_file(f"/proc/self/fd/{reader}", 4096, pipes=True)
    finally:
        os.close(reader)
        feeder.join(HANG_GUARD)


def _feed_until_closed(descriptor: int) -> None:
    try:
        while True:
            os.write(descriptor, b"y\n" * 1024)
    except BrokenPipeError:
        pass
    finally:
        os.close(descriptor)


@pytest.mark.parametrize("planted", ["fifo", "/dev/zero"])
def test_keep_deploy_volume_key_that_is_a_fifo_or_a_device_is_one_clear_line(
        tmp_path: Path, wasm_fixture: WasmFixture, keep_environment: dict[str, str], planted: str) -> None:
    """`keep deploy --volume-key data=KEYFILE` read the file with Path.read_bytes: a FIFO nobody
    feeds held it for ever (before it even connected), /dev/zero ate memory until 'keep:
    internal error: MemoryError', exit 70. Read as keep run's --key-file now (net.files)."""
    if planted == "fifo":
        key_file = tmp_path / "key.fifo"
        os.mkfifo(key_file)
        says = f"is a FIFO that no program opened for writing within {FIFO_WRITER_WAIT:g} s"
    else:
        key_file, says = Path(planted), "is a character device, not a regular file or a pipe"
    result = _keep([*KEEP, "deploy", "--to", f"127.0.0.1:{free_port()}", "--allow-insecure-nil",
                    "--volume-key", f"data={key_file}", str(wasm_fixture("hello"))], keep_environment,
                   limit_memory=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"keep: --volume-key data: {key_file}: {says}\n"
