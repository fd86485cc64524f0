"""Fault injection (`keep run --fault SPEC`): the grammar, each action, each condition, determinism
under a seed, and the point of it all: a program that handles short writes and one that does
not are told apart by a fault."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from fixture_build import WasmFixture

from shim.pytest_plugin import FaultNeverTookEffect, KeepRunner
from shim.run import RunConfig, Stdio, run_module
from wasi_host._faults import GRAMMAR, FaultSpec, FaultSpecError
from wasi_host._functions import FUNCTIONS
from wasi_host.streams import MemoryStream, OsSocket

NAMES = frozenset(FUNCTIONS)
PATTERN = bytes(ord("a") + index % 26 for index in range(10_000))  # what short_write_*.c write


def parse(text: str) -> FaultSpec:
    return FaultSpec.parse(text, NAMES)


# --- grammar -------------------------------------------------------------------------------------


def test_an_errno_spec_parses_with_or_without_the_e_prefix() -> None:
    for text in ("fd_write:EIO", "fd_write:io", "fd_write:eio"):
        spec = parse(text)
        assert (spec.calls, spec.action, spec.errno) == (("fd_write",), "errno", 29)


def test_conditions_and_actions_parse_into_fields() -> None:
    spec = parse("fd_write|fd_pwrite:enospc-after=4096:path=/data/*.log:fd=5")
    assert (spec.calls, spec.action, spec.amount, spec.errno, spec.path, spec.fd) == (
        ("fd_write", "fd_pwrite"), "limit", 4096, 51, "/data/*.log", 5)
    spec = parse("fd_read:short=1:nth=3")
    assert (spec.action, spec.amount, spec.nth) == ("short", 1, 3)
    spec = parse("path_*:EACCES:probability=0.25:seed=9")
    assert (spec.probability, spec.seed, spec.names("path_open"), spec.names("fd_write")) == (0.25, 9, True, False)
    assert parse("sock_send:reset-after=10").errno == 15


@pytest.mark.parametrize(("text", "complaint"), [
    ("fd_write", "expected CALLS:ACTION"),
    ("fd_wrote:EIO", "no preview1 function matches 'fd_wrote'"),
    ("fd_write:EWHAT", "not a WASI errno name"),
    ("fd_write:SUCCESS", "not a WASI errno name"),
    ("fd_write:short=0", "short=N needs N >= 1"),
    ("fd_write:short=x", "needs a whole number"),
    ("path_open:short=5", "applies to transfers"),
    ("fd_write:EIO:nth=0", "counts from 1"),
    ("fd_write:EIO:probability=2", "between 0 and 1"),
    ("fd_write:EIO:color=red", "unknown condition"),
    ("fd_write:EIO:fd=1:fd=2", "given twice"),
    ("proc_exit:EIO", "proc_exit cannot fail"),
    ("fd_write:explode=3", "unknown action"),
])
def test_a_bad_spec_is_refused_with_the_reason(text: str, complaint: str) -> None:
    with pytest.raises(FaultSpecError, match=complaint):
        parse(text)


def test_keep_run_help_documents_the_grammar() -> None:
    completed = subprocess.run(["keep", "run", "--help"], capture_output=True, text=True, check=True)
    assert "fault SPEC grammar" in completed.stdout
    assert "enospc-after=N" in completed.stdout and "probability=P" in completed.stdout
    assert GRAMMAR.splitlines()[0] in completed.stdout


def test_keep_run_refuses_a_bad_spec_in_one_line(wasm_fixture: WasmFixture,
                                                keep_environment: dict[str, str]) -> None:
    completed = subprocess.run(["keep", "run", "--fault", "fd_write:EWHAT", str(wasm_fixture("hello"))],
                               capture_output=True, text=True, env=keep_environment)
    assert completed.returncode == 2
    assert completed.stderr == "keep: --fault 'fd_write:EWHAT': 'EWHAT' is not a WASI errno name (EIO, ENOSPC, ...)\n"


# --- actions ------------------------------------------------------------------------------------


def test_every_fd_write_fails_with_eio_from_the_command_line(wasm_fixture: WasmFixture, tmp_path: Path,
                                                            keep_environment: dict[str, str]) -> None:
    completed = subprocess.run(
        ["keep", "run", "--fault", "fd_write:EIO", "--dir", f"{tmp_path}::/sandbox",
         str(wasm_fixture("short_write_ok"))], capture_output=True, env=keep_environment)
    assert completed.returncode == 1
    assert completed.stdout == b"" and completed.stderr == b""  # even its error message failed
    assert (tmp_path / "out.bin").read_bytes() == b""


def test_short_writes_separate_a_correct_writer_from_a_naive_one(keep: KeepRunner,
                                                                wasm_fixture: WasmFixture) -> None:
    fault = ["fd_write:short=3000:path=/sandbox/*"]
    correct = keep(wasm_fixture("short_write_ok"), mount="/sandbox", faults=fault)
    naive = keep(wasm_fixture("short_write_naive"), mount="/sandbox", faults=fault)
    # Without the fault both leave the complete file:
    assert keep(wasm_fixture("short_write_naive"), mount="/sandbox").files == {"out.bin": PATTERN}
    assert (correct.exit_code, correct.stdout) == (0, b"wrote 10000 bytes in several calls\n")
    assert correct.files == {"out.bin": PATTERN}
    assert [event.results["nwritten"] for event in correct.calls("fd_write")][:4] == [3000, 3000, 3000, 1000]
    assert (naive.exit_code, naive.stdout) == (0, b"wrote 10000 bytes\n")  # it believes it did
    assert naive.files == {"out.bin": PATTERN[:3000]}  # but the file is truncated


def test_enospc_after_n_bytes_fills_the_disk_at_exactly_n(keep: KeepRunner, wasm_fixture: WasmFixture) -> None:
    result = keep(wasm_fixture("short_write_ok"), mount="/sandbox", faults=["fd_write:enospc-after=4500:path=*.bin"])
    assert (result.exit_code, result.stderr) == (1, b"write: ENOSPC\n")
    assert result.files == {"out.bin": PATTERN[:4500]}
    writes = [(event.errno_name, event.results.get("nwritten")) for event in result.calls("fd_write")]
    assert writes[:3] == [("SUCCESS", 4500), ("ENOSPC", None), ("SUCCESS", 14)]  # then stderr


def test_short_reads_deliver_a_byte_at_a_time(keep: KeepRunner, wasm_fixture: WasmFixture) -> None:
    result = keep(wasm_fixture("echo"), stdin=b"abcdef", faults=["fd_read:short=1:fd=0"])
    assert result.stdout == b"abcdef"
    reads = [event.results["nread"] for event in result.calls("fd_read")]
    assert reads == [1, 1, 1, 1, 1, 1, 0]


def test_a_connection_reset_after_n_bytes_on_a_socket(wasm_fixture: WasmFixture, tmp_path: Path) -> None:
    guest_end, peer = socket.socketpair()
    with peer:
        stdout = MemoryStream()
        config = RunConfig(module=str(wasm_fixture("sock_send_chunks")), sockets=(OsSocket(guest_end),),
                           stdio=Stdio(MemoryStream(), stdout, MemoryStream()), cache_dir=tmp_path,
                           faults=(parse("sock_send:reset-after=250"),))
        result = run_module(config)
        peer.settimeout(5)
        received = b""
        while chunk := peer.recv(4096):
            received += chunk
    assert (result.exit_code, bytes(stdout.output)) == (1, b"send: ECONNRESET after 250 bytes\n")
    assert received == b"k" * 250


# --- conditions -----------------------------------------------------------------------------------


def pattern(keep: KeepRunner, wasm_fixture: WasmFixture, *faults: str) -> str:
    result = keep(wasm_fixture("fault_writes"), faults=list(faults))
    assert result.exit_code == 0, result.stderr
    return result.stderr.decode().strip()


def test_nth_every_and_fd_pick_the_calls(keep: KeepRunner, wasm_fixture: WasmFixture) -> None:
    assert pattern(keep, wasm_fixture, "fd_write:EIO:fd=1:nth=3") == "..E" + "." * 37 + " EIO"
    assert pattern(keep, wasm_fixture, "fd_write:EBADF:fd=1:every=10") == ("." * 9 + "E") * 4 + " EBADF"
    # fd=2 hits only stderr: stdout gets all 40 bytes, and the report on stderr is what fails.
    stderr_only = keep(wasm_fixture("fault_writes"), faults=["fd_write:EIO:fd=2"])
    assert (stderr_only.stdout, stderr_only.stderr) == (b"x" * 40, b"")
    assert {event.errno_name for event in stderr_only.calls("fd_write") if event.args["fd"] == 2} == {"EIO"}


def test_path_narrows_to_files_opened_under_the_glob(keep: KeepRunner, wasm_fixture: WasmFixture) -> None:
    hit = keep(wasm_fixture("short_write_ok"), mount="/sandbox", faults=["fd_write:EIO:path=/sandbox/*.bin"])
    assert (hit.exit_code, hit.stderr) == (1, b"write: EIO\n")  # stderr has no path: not faulted
    with pytest.warns(FaultNeverTookEffect, match="no call met its conditions"):
        missed = keep(wasm_fixture("short_write_ok"), mount="/sandbox", faults=["fd_write:EIO:path=*.txt"])
    assert missed.exit_code == 0 and missed.files == {"out.bin": PATTERN}
    opened = keep(wasm_fixture("short_write_ok"), mount="/sandbox", faults=["path_open:EACCES:path=out.*"])
    assert (opened.exit_code, opened.stderr) == (1, b"open: EACCES\n")


def test_the_same_seed_gives_the_same_faults_and_the_same_trace(keep: KeepRunner,
                                                                wasm_fixture: WasmFixture) -> None:
    spec = "fd_write:EIO:fd=1:probability=0.5:seed=1234"
    runs = [keep(wasm_fixture("fault_writes"), faults=[spec]) for _ in range(2)]
    first, second = ([(event.function, event.args, event.errno, event.results) for event in run.trace]
                     for run in runs)
    assert first == second
    assert runs[0].stderr == runs[1].stderr
    failures = runs[0].stderr.decode().split()[0].count("E")
    assert 5 < failures < 35  # a coin per call, not all or nothing
    other = pattern(keep, wasm_fixture, "fd_write:EIO:fd=1:probability=0.5:seed=99")
    assert other != runs[0].stderr.decode().strip()


def test_each_run_of_a_reused_config_reports_its_own_ineffective_faults(wasm_fixture: WasmFixture,
                                                                        tmp_path: Path) -> None:
    """The tallies behind "never took effect" lived on the (shared, frozen) FaultSpec and added
    up over runs: a spec that worked in the first run of a RunConfig was never reported for a
    later run where it changed nothing. Here the second run finds stdin used up, writes nothing,
    and must say so."""
    config = RunConfig(module=str(wasm_fixture("echo")), cache_dir=tmp_path,
                       stdio=Stdio(MemoryStream(b"hello\n"), MemoryStream(), MemoryStream()),
                       faults=(parse("fd_write:EIO:fd=1"),))
    first = run_module(config)
    assert first.ineffective_faults == ()  # its echo of "hello" failed with EIO
    second = run_module(config)  # stdin is at its end now: nothing to echo
    assert second.ineffective_faults == ("--fault 'fd_write:EIO:fd=1' never took effect "
                                         "(no call met its conditions)",)


def test_faults_leave_the_plain_functions_alone_when_none_is_given() -> None:
    from shim.run import host_functions

    assert host_functions(RunConfig(module="m.wasm")) is FUNCTIONS
    faulted = host_functions(RunConfig(module="m.wasm", faults=(parse("fd_write:EIO"),)))
    assert faulted["fd_write"].impl is not FUNCTIONS["fd_write"].impl
    assert faulted["fd_read"] is FUNCTIONS["fd_read"]  # functions no spec names stay unwrapped


def test_a_catch_all_spec_fails_every_call_but_proc_exit(keep: KeepRunner, wasm_fixture: WasmFixture) -> None:
    result = keep(wasm_fixture("hello"), faults=["*:EIO"], directory="memfs")
    assert (result.exit_code, result.stdout, result.stderr, result.trap) == (0, b"", b"", None)
    assert {event.errno_name for event in result.trace} == {"EIO"}  # _start returned; no proc_exit
    # wasi-libc gives up on its pre-open scan with EX_OSERR: that proc_exit is not faulted.
    exits = keep(wasm_fixture("short_write_ok"), faults=["*:EIO"], directory="memfs")
    assert (exits.exit_code, exits.trace[-1].function, exits.trace[-1].exit_code) == (71, "proc_exit", 71)
