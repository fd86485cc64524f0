"""`keep run --trace` decodes what the calls return, not only what they are passed: the filestat of
fd_filestat_get / path_filestat_get, the fdstat, the prestat, a readlink target, fd_readdir's
entries, poll_oneoff's subscriptions and events; and enums and flags by their witx names (advice,
signal, riflags, sdflags). Each used to be a bare pointer or number in the trace."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from shim.trace import read_jsonl_trace
from shim.wasm_compile import compile_c_to_wasm
from wasi_host._functions import FUNCTIONS
from wasi_host._trace import _ENUM_NAMES, _FLAG_NAMES, TraceEvent, Tracer

WITX = Path(__file__).resolve().parent.parent / "fixtures" / "witx" / "typenames.witx"

# A guest making the calls whose results the trace must decode, on a pre-opened /sandbox.
GUEST = r"""
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <wasi/api.h>

/* wasi-libc declares no proc_raise without its signal emulation */
__attribute__((import_module("wasi_snapshot_preview1"), import_name("proc_raise")))
int32_t raw_proc_raise(int32_t signal);

int main(void) {
    static char buffer[10000];
    memset(buffer, 'x', sizeof buffer);
    int fd = open("/sandbox/data.bin", O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || write(fd, buffer, sizeof buffer) != (ssize_t)sizeof buffer) return 2;
    struct stat st;
    if (fstat(fd, &st) != 0 || stat("/sandbox/data.bin", &st) != 0) return 3;
    if (posix_fadvise(fd, 0, 100, POSIX_FADV_SEQUENTIAL) != 0) return 4;
    if (posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) != 0) return 5;
    if (__wasi_fd_advise((__wasi_fd_t)fd, 0, 1, __WASI_ADVICE_NOREUSE) != 0) return 6;
    if (fcntl(fd, F_GETFL) < 0) return 7;
    if (symlink("data.bin", "/sandbox/link") != 0) return 8;
    char target[64] = {0};
    if (readlink("/sandbox/link", target, sizeof target) != 8) return 9;
    DIR *dir = opendir("/sandbox");
    int entries = 0;
    while (dir != NULL && readdir(dir) != NULL) entries++;
    if (dir == NULL) return 10;
    closedir(dir);
    poll(NULL, 0, 5);
    int raised = raw_proc_raise(10); /* $signal usr1 */
    printf("entries=%d raise=%d\n", entries, raised);
    return 0;
}
"""


@pytest.fixture(scope="module")
def decode_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("decode_guest")
    source = directory / "decode_guest.c"
    source.write_text(GUEST)
    module = directory / "decode_guest.wasm"
    compile_c_to_wasm(source, module)
    return module


def traced_run(module: Path, sandbox: Path, environment: dict[str, str],
               *extra: str) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(["keep", "run", "--trace", *extra, "--dir", f"{sandbox}::/sandbox", str(module)],
                               capture_output=True, text=True, env=environment)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("entries=4 raise=")  # ., .., data.bin, link
    return completed


def line_of(lines: list[str], pattern: str) -> str:
    """The first trace line matching `pattern` (a regular expression, anchored at the start)."""
    found = [line for line in lines if re.match(pattern, line)]
    assert found, f"no line matches {pattern!r} in:\n" + "\n".join(lines)
    return found[0]


def test_the_text_trace_shows_the_stat_records_the_calls_return(
        decode_guest: Path, tmp_path: Path, keep_environment: dict[str, str]) -> None:
    lines = traced_run(decode_guest, tmp_path, keep_environment).stderr.splitlines()
    fstat = line_of(lines, r"fd_filestat_get\(fd=4\) = SUCCESS")
    assert re.fullmatch(r"fd_filestat_get\(fd=4\) = SUCCESS dev=\d+ ino=\d+ filetype=REGULAR_FILE nlink=1 "
                        r"size=10000 atim=\d+ mtim=\d+ ctim=\d+ <[0-9.]+ us>", fstat), fstat
    stat = line_of(lines, r'path_filestat_get\(fd=3, flags=SYMLINK_FOLLOW, path="data.bin"\)')
    assert re.search(r" = SUCCESS dev=\d+ ino=\d+ filetype=REGULAR_FILE nlink=1 size=10000 ", stat), stat
    prestat = line_of(lines, r"fd_prestat_get\(fd=3\)")
    assert re.fullmatch(r"fd_prestat_get\(fd=3\) = SUCCESS type=DIR pr_name_len=8 <[0-9.]+ us>", prestat), prestat
    assert line_of(lines, r"fd_prestat_get\(fd=4\)").startswith("fd_prestat_get(fd=4) = EBADF <")  # no results
    fdstat = line_of(lines, r"fd_fdstat_get\(fd=4\)")
    assert re.fullmatch(r"fd_fdstat_get\(fd=4\) = SUCCESS fs_filetype=REGULAR_FILE fs_flags=0 "
                        r"fs_rights_base=\S+ fs_rights_inheriting=\S+ <[0-9.]+ us>", fdstat), fdstat


def test_the_text_trace_names_the_advice_and_shows_what_readlink_readdir_and_poll_returned(
        decode_guest: Path, tmp_path: Path, keep_environment: dict[str, str]) -> None:
    lines = traced_run(decode_guest, tmp_path, keep_environment).stderr.splitlines()
    advice = [line.split(" <")[0] for line in lines if line.startswith("fd_advise(")]
    assert advice == ["fd_advise(fd=4, offset=0, len=100, advice=SEQUENTIAL) = SUCCESS",
                      "fd_advise(fd=4, offset=0, len=0, advice=DONTNEED) = SUCCESS",
                      "fd_advise(fd=4, offset=0, len=1, advice=NOREUSE) = SUCCESS"]
    readlink = line_of(lines, r"path_readlink\(")
    assert re.fullmatch(r'path_readlink\(fd=3, path="link", size=\d+, target="data.bin"\) = SUCCESS used=8 '
                        r"<[0-9.]+ us>", readlink), readlink
    readdir = line_of(lines, r"fd_readdir\(")
    assert re.search(r" = SUCCESS used=\d+ entries=4 <", readdir), readdir
    poll = line_of(lines, r"poll_oneoff\(")
    assert re.fullmatch(r"poll_oneoff\(subscriptions=\[CLOCK\(REALTIME, timeout=5000000, precision=0, flags=0, "
                        r"userdata=(\d+)\)\], nsubscriptions=1\) = SUCCESS nevents=1 "
                        r"events=\[CLOCK\(userdata=\1, error=SUCCESS\)\] <[0-9.]+ us>", poll), poll
    assert line_of(lines, r"proc_raise\(").startswith("proc_raise(signal=USR1) = ENOTSUP <")


def test_the_jsonl_trace_carries_the_decoded_records_and_reads_them_back(
        decode_guest: Path, tmp_path: Path, keep_environment: dict[str, str]) -> None:
    trace = tmp_path / "trace.jsonl"
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    traced_run(decode_guest, sandbox, keep_environment, f"--trace={trace}", "--trace-format", "jsonl")
    events = read_jsonl_trace(trace.read_text())
    fstat = next(event for event in events if event.function == "fd_filestat_get")
    assert (fstat.results["filetype"], fstat.results["size"], fstat.results["nlink"]) == ("REGULAR_FILE", 10000, 1)
    assert isinstance(fstat.results["mtim"], int) and fstat.results["mtim"] > 0
    prestat = next(event for event in events if event.function == "fd_prestat_get")
    assert prestat.results == {"type": "DIR", "pr_name_len": 8}
    assert [event.to_json() for event in read_jsonl_trace(trace.read_text())] == [event.to_json() for event in events]
    assert TraceEvent.from_json(fstat.to_json()) == fstat


def witx_cases(type_name: str) -> list[str]:
    """The case names of a witx enum or flags type, in order, as the trace spells them."""
    text = WITX.read_text()
    body = text[text.index(f"(typename ${type_name}\n"):]
    body = body[:body.index("\n)\n")]
    return [line.strip()[1:].upper() for line in body.splitlines()
            if line.strip().startswith("$")]


@pytest.mark.parametrize("kind", ["advice", "signal", "whence", "clockid", "filetype", "eventtype"])
def test_every_enum_the_trace_names_matches_the_witx(kind: str) -> None:
    table = _ENUM_NAMES["clock" if kind == "clockid" else kind]
    assert [table[value] for value in range(len(table))] == witx_cases(kind)


@pytest.mark.parametrize("kind", ["riflags", "roflags", "sdflags", "fdflags", "oflags", "fstflags"])
def test_every_flag_the_trace_names_matches_the_witx(kind: str) -> None:
    assert [name for _, name in _FLAG_NAMES[kind]] == witx_cases(kind)
    assert [bit for bit, _ in _FLAG_NAMES[kind]] == [1 << index for index in range(len(_FLAG_NAMES[kind]))]


def test_socket_call_flags_are_named_even_when_the_call_fails() -> None:
    from wasi_host import Guest, WasiError
    from wasi_host.streams import MemoryStream

    guest = Guest([b"m"], [], [], MemoryStream(), MemoryStream(), MemoryStream())
    memory = memoryview(bytearray(4096))
    events: list[TraceEvent] = []
    traced = Tracer(events.append).wrap(FUNCTIONS)
    try:
        for name, arguments in (("sock_shutdown", (0, 3)), ("sock_recv", (0, 0, 0, 1 | 2, 16, 20)),
                                ("fd_advise", (0, 0, 0, 9))):  # stdin is no socket; no advice 9
            with pytest.raises(WasiError):
                traced[name].impl(guest, memory, *arguments)
    finally:
        guest.close()
    shutdown, receive, advise = events
    assert (shutdown.args, shutdown.errno_name) == ({"fd": 0, "how": "RD|WR"}, "ENOTSOCK")
    assert receive.args["ri_flags"] == "RECV_PEEK|RECV_WAITALL"
    assert (advise.args["advice"], advise.errno_name) == ("9", "EINVAL")  # an unknown value as passed
