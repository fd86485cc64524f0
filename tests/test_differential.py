"""Differential tests: every fixture under keepshim and under wasmtime's built-in WASI.

Each case runs one fixture twice with the same arguments, environment, stdin, limits and initial
directory tree: once under the reference (tests/reference.py: wasmtime's own WASI, on a host
directory) and once under `keep run` on each backend of GUEST_DIRECTORY_BACKENDS (guest_dirs.py:
a host directory with --dir, and an encrypted volume with --volume, read back with `keep volume
export`). stdout, stderr, the exit status and the tree left behind must be identical; the volume
needs no exception of its own (every difference below is the same on both backends). The only exceptions are written down per case, with the reason:

- `host_diagnostic`: the run ends in a trap or a host error, and the host then prints its own
  diagnostic on stderr, whose wording is each runtime's own (wasmtime's CLI prints a backtrace,
  keep prints `keep: ...`). The guest's own stderr before it must still match exactly, and both
  hosts must print something.
- `known_differences`: exact text that keepshim prints where wasmtime prints other text, each
  with the reason it is by design. Only those bytes are exempt, and an entry that no longer
  occurs fails the test, so the list stays true.
- `divergence`: by design keepshim goes on where wasmtime ends the guest (an out-of-bounds
  pointer is EFAULT for us, as issue 2 asks; wasmtime stops the guest with a host error). Our
  whole outcome is then pinned instead: the reference's stdout followed by exactly the given
  text, the given status, an empty stderr, and the same tree.
"""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from fixture_build import FixtureBuilder, WasmFixture
from guest_dirs import (
    GUEST_DIRECTORY_BACKENDS,
    Directory,
    GuestDirectory,
    GuestDirectoryFactory,
    HostDirectory,
    Symlink,
    TreeSpec,
    describe_tree,
    materialize,
)

GUEST_PATH = "/sandbox"
REFERENCE_COMMAND = (sys.executable, str(Path(__file__).with_name("reference.py")))
KEEP_RUN_COMMAND = (sys.executable, "-m", "shim", "run")
# A generous bound on one run, so a hang fails the test instead of stalling the suite.
RUN_DEADLINE_SECONDS = 120
TRAP_STATUS = 134


@dataclass(frozen=True)
class KnownDifference:
    """keepshim prints `ours` in `stream` where wasmtime prints `reference`, for `reason`."""

    stream: Literal["stdout", "stderr"]
    reference: bytes
    ours: bytes
    reason: str


@dataclass(frozen=True)
class Divergence:
    """keepshim continues where wasmtime ends the guest: after the reference's stdout it prints
    `stdout_tail` and exits with `status`, for `reason`."""

    reason: str
    stdout_tail: bytes
    status: int = 0


@dataclass(frozen=True)
class Case:
    """One differential run: a fixture with its inputs and the exit status the reference gives."""

    id: str
    fixture: str
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    stdin: bytes = b""
    tree: TreeSpec = field(default_factory=dict)
    options: tuple[str, ...] = ()
    # Set in the environment of both runtimes (`--env NAME` passes the host's value on).
    host_env: Mapping[str, str] = field(default_factory=dict)
    expected_status: int = 0
    # The guest's own stderr before the host's diagnostic (see the module docstring), or None.
    host_diagnostic: bytes | None = None
    known_differences: tuple[KnownDifference, ...] = ()
    divergence: Divergence | None = None
    # False for a variant whose difference from its fixture's other cases does not involve the
    # guest directory (another exit status, another bad pointer): backends other than the host
    # directory then run only the fixture's first case, which keeps the suite fast.
    every_backend: bool = True


@dataclass(frozen=True)
class Outcome:
    """What one run left: its streams, its exit status, and its directory tree as lines."""

    stdout: bytes
    stderr: bytes
    status: int
    tree: list[str]


def _two_mebibytes() -> bytes:
    return random.Random(20261127).randbytes(2 << 20)


ESCAPE_TREE: TreeSpec = {
    "inside.txt": b"inside\n",
    "sub/ok": Symlink("../inside.txt"),
    "sub/upup": Symlink("../../outside.txt"),
    "abs": Symlink("/etc/passwd"),
    "abs_inside": Symlink("/sandbox/inside.txt"),
    "up": Symlink("../outside.txt"),
    "loop1": Symlink("loop2"),
    "loop2": Symlink("loop1"),
    "self": Symlink("self"),
}

EFAULT_REASON = ("issue 2, point 3: a bad guest pointer or length is EFAULT and the guest goes on; "
                 "wasmtime ends the guest with a host error (exit status 1)")
INVALID_ENUM_REASON = ("an out-of-range enum argument is EINVAL, the spec's errno for an invalid argument, "
                       "and the guest goes on (as for bad pointers); wasmtime's generated bindings end the "
                       "guest with a host error (exit status 1)")
SHORT_TRANSFER_REASON = ("wasmtime's preview1 moves only the first non-empty iovec per fd_write/fd_read "
                         "on a file (a legal short transfer); keepshim moves them all, as Linux does: "
                         "the fixture completes the short write, so the files still match")
BAD_POINTER_CALLS = (
    "fd_write_iovs", "fd_write_buffer", "fd_write_result", "fd_read_buffer", "random_get",
    "clock_time_get_result", "args_sizes_get", "args_get", "path_open_path", "path_open_result",
    "path_create_directory", "fd_prestat_dir_name", "fd_filestat_get_result",
)

CASES: tuple[Case, ...] = (
    Case("hello", "hello"),
    Case("args-env", "args_env",
         args=("one", "two words", "", "--dir", "ünïcode ✓"),
         env=("GREETING=hello world", "EMPTY=", "WITH_EQUALS=a=b=c")),
    Case("args-env-many", "args_env", args=tuple(f"argument number {index}" for index in range(500)),
         env=tuple(f"VARIABLE_{index}=value {index}" for index in range(200)), every_backend=False),
    Case("env-from-host", "args_env", env=("KEEPSHIM_TEST_FROM_HOST", "KEEPSHIM_TEST_NOT_SET", "PLAIN=1"),
         host_env={"KEEPSHIM_TEST_FROM_HOST": "the host's value"}, every_backend=False),
    Case("exit-0", "exit_code", args=("exit", "0")),
    Case("exit-3", "exit_code", args=("exit", "3"), expected_status=3, every_backend=False),
    Case("exit-125", "exit_code", args=("exit", "125"), expected_status=125, every_backend=False),
    Case("return-42", "exit_code", args=("return", "42"), expected_status=42, every_backend=False),
    # wasmtime refuses proc_exit statuses outside [0, 126) with a host error: its CLI exits 1.
    Case("exit-126", "exit_code", args=("exit", "126"), expected_status=1,
         host_diagnostic=b"stderr before exit\n", every_backend=False),
    Case("trap", "exit_code", args=("trap",), expected_status=TRAP_STATUS,
         host_diagnostic=b"stderr before trap\n", every_backend=False),
    Case("echo-2mib", "echo", stdin=_two_mebibytes()),
    Case("echo-empty", "echo", every_backend=False),
    Case("stdio", "stdio", stdin=b"input\n"),
    Case("files-basic", "files_basic",
         tree={"input.txt": b"prepared by the test\n", "dir": Directory()},
         known_differences=(
             KnownDifference("stdout", b"writev 3 iovecs: 4\nwrite the rest: 4\n", b"writev 3 iovecs: 8\n",
                             SHORT_TRANSFER_REASON),
             KnownDifference("stdout", b"readv 2 iovecs: 4\nreadv data: [one ][]\n",
                             b"readv 2 iovecs: 8\nreadv data: [one ][two\n]\n", SHORT_TRANSFER_REASON),
         )),
    Case("stat-times", "stat_times", tree={"data.txt": b"0123456789", "dir": Directory()}),
    Case("truncate-sparse", "truncate_sparse", tree={"shrink.txt": b"abcdefghij"}),
    Case("dirs", "dirs", tree={"file.txt": b"f", "full/inner.txt": b"inner\n"}),
    Case("readdir-many", "readdir_many"),
    Case("rename", "rename",
         tree={"a.txt": b"A", "b.txt": b"B", "src/x.txt": b"x\n", "empty": Directory(),
               "full/y.txt": b"y\n"}),
    Case("unlink-open", "unlink_open", tree={"doomed.txt": b"still here\n"}),
    Case("links", "links", tree={"target.txt": b"target\n", "d": Directory()}),
    Case("fd-ops", "fd_ops", tree={"data.txt": b"0123456789", "dir": Directory()}),
    Case("dir-handles", "dir_handles", tree={"d/old.txt": b"old\n", "target.txt": b"t"},
         known_differences=(KnownDifference(
             "stdout", b"faccessat renamed.txt W_OK: -1 EACCES\n", b"faccessat renamed.txt W_OK: 0\n",
             "wasi-libc answers access(W_OK) from the directory fd's inheriting rights. wasmtime reports "
             "the rights wasi-libc asked for when opening the directory O_RDONLY (no FD_WRITE) but "
             "enforces none, so files opened through it are still writable there; keepshim enforces "
             "rights (issue 2), so FD_WRITE must stay inheritable for those writes to work"),)),
    Case("stdio-kinds", "stdio_kinds"),
    Case("open-flags", "open_flags",
         tree={"f": b"0123456789", "e": Directory(), "d/inner": b"inner\n", "l": Symlink("f"),
               "ld": Symlink("d"), "dl": Symlink("missing")}),
    Case("slash-links", "slash_links",
         tree={"f": b"0123456789", "d/inner": b"inner\n", "e": Directory(), "l": Symlink("f"),
               "ld": Symlink("d"), "dl": Symlink("missing")}),
    Case("big-file", "big_file"),
    Case("offsets", "offsets"),
    Case("short-write-naive", "short_write_naive"),
    Case("short-write-ok", "short_write_ok"),
    Case("fault-writes", "fault_writes"),
    Case("escape", "escape", tree=ESCAPE_TREE),
    Case("poll", "poll", stdin=b"ready\n"),
    Case("clocks-random", "clocks_random", known_differences=tuple(
        KnownDifference("stdout", f"{clock}_cputime clock_res_get: EBADF; clock_time_get: EBADF".encode(),
                        f"{clock}_cputime clock_res_get: SUCCESS, resolution in (0, 1 s]: yes; "
                        "clock_time_get: SUCCESS".encode(),
                        "issue 2, point 2 asks for the process and thread CPU-time clocks; "
                        "wasmtime does not provide them (EBADF)")
        for clock in ("process", "thread"))),
    *(Case(f"bad-pointer-{call}", "bad_pointers", args=(call,), expected_status=1, host_diagnostic=b"",
           divergence=Divergence(EFAULT_REASON, f"{call}: EFAULT\nsurvived\n".encode()),
           every_backend=call.startswith(("path_", "fd_write_result")))
      for call in BAD_POINTER_CALLS),
    *(Case(f"invalid-enum-{kind}", "invalid_enum", args=(kind,), expected_status=1, host_diagnostic=b"",
           divergence=Divergence(INVALID_ENUM_REASON, f"{call} {kind} 99: EINVAL\nsurvived\n".encode()),
           every_backend=kind != "clock")
      for kind, call in (("whence", "fd_seek"), ("clock", "clock_time_get"), ("advice", "fd_advise"))),
    # zig reserves 16 MiB (stack and data) before the heap, so 32 MiB leaves room for a few MiB.
    Case("memory-hog", "memory_hog", args=("1", "4", "32"), options=("--max-memory", str(32 << 20))),
    Case("endless-loop", "endless_loop", options=("--timeout", "1"), expected_status=TRAP_STATUS,
         host_diagnostic=b""),
)


def run_guest(command: tuple[str, ...], directory: GuestDirectory, case: Case, module: Path,
              streams: Path, environment: Mapping[str, str]) -> Outcome:
    """Runs `case` with `command` (the reference or `keep run`) on `directory`, which has been
    prepared; `streams` is a directory for the stdin/stdout/stderr files."""
    streams.mkdir()
    (streams / "stdin").write_bytes(case.stdin)
    arguments = [*directory.keep_arguments(GUEST_PATH)]
    for item in case.env:
        arguments += ["--env", item]
    with (open(streams / "stdin", "rb") as stdin, open(streams / "stdout", "wb") as stdout,
          open(streams / "stderr", "wb") as stderr):
        completed = subprocess.run([*command, *arguments, *case.options, str(module), *case.args],
                                   stdin=stdin, stdout=stdout, stderr=stderr,
                                   env={**environment, **case.host_env},
                                   cwd=streams, timeout=RUN_DEADLINE_SECONDS, check=False)
    return Outcome(stdout=(streams / "stdout").read_bytes(), stderr=(streams / "stderr").read_bytes(),
                   status=completed.returncode, tree=describe_tree(directory.read_back()))


def compared_stderr(case: Case, outcome: Outcome, side: str) -> bytes:
    """stderr as compared: with a host diagnostic, only the guest's part before it."""
    if case.host_diagnostic is None:
        return outcome.stderr
    assert outcome.stderr.startswith(case.host_diagnostic), (
        f"{side}: stderr does not start with the guest's own output: {outcome.stderr[:400]!r}")
    assert len(outcome.stderr) > len(case.host_diagnostic), f"{side}: no diagnostic on stderr"
    return case.host_diagnostic


def lines(data: bytes) -> list[str]:
    """Output as text lines, so a failing comparison shows a line-by-line diff."""
    return data.decode(errors="backslashreplace").splitlines(keepends=True)


def apply_known_differences(case: Case, reference: Outcome, ours: Outcome) -> Outcome:
    """Our outcome with each known difference replaced by the reference's text; fails if a listed
    difference no longer occurs (remove it from the list then)."""
    streams = {"stdout": ours.stdout, "stderr": ours.stderr}
    for difference in case.known_differences:
        reference_stream = reference.stdout if difference.stream == "stdout" else reference.stderr
        assert difference.reference in reference_stream, f"reference no longer prints {difference}"
        assert difference.ours in streams[difference.stream], f"known difference is gone: {difference}"
        streams[difference.stream] = streams[difference.stream].replace(difference.ours, difference.reference)
    return Outcome(streams["stdout"], streams["stderr"], ours.status, ours.tree)


def run_both(case: Case, backend: GuestDirectoryFactory, module: Path, work: Path,
             environment: Mapping[str, str]) -> tuple[Outcome, Outcome]:
    """Runs `case` under the reference on a host directory and under keepshim on `backend`, both
    starting from copies of the same initial tree."""
    initial = work / "initial"
    initial.mkdir()
    materialize(case.tree, initial)
    sides = (("reference", REFERENCE_COMMAND, HostDirectory), ("ours", KEEP_RUN_COMMAND, backend))
    directories = []
    for side, _, factory in sides:
        (work / side).mkdir()
        directories.append(factory(work / side))
        directories[-1].prepare(initial)
    with ThreadPoolExecutor(max_workers=2) as pool:  # the two runs are independent processes
        reference, ours = pool.map(
            lambda index: run_guest(sides[index][1], directories[index], case, module,
                                    work / f"{sides[index][0]}-streams", environment), (0, 1))
    return reference, ours


def backend_cases() -> list[object]:
    """(case, backend) pairs: every case on the host directory; on other backends the cases that
    run on every backend plus each fixture's first case, so every fixture runs on every backend."""
    first_case = {case.fixture: case.id for case in reversed(CASES)}
    return [pytest.param(case, backend, id=f"{case.id}-{backend}")
            for case in CASES for backend in sorted(GUEST_DIRECTORY_BACKENDS)
            if case.every_backend or backend == HostDirectory.name or first_case[case.fixture] == case.id]


@pytest.mark.parametrize(("case", "backend"), backend_cases())
def test_keepshim_matches_builtin_wasi(case: Case, backend: str, wasm_fixture: WasmFixture,
                                       tmp_path: Path, keep_environment: dict[str, str]) -> None:
    module = wasm_fixture(case.fixture)
    reference, ours = run_both(case, GUEST_DIRECTORY_BACKENDS[backend], module, tmp_path, keep_environment)
    assert reference.status == case.expected_status, (
        f"the reference itself exits {reference.status}: {reference.stderr[-2000:]!r}")
    ours = apply_known_differences(case, reference, ours)
    if case.divergence is not None:
        compared_stderr(case, reference, "reference")
        assert lines(ours.stdout) == lines(reference.stdout + case.divergence.stdout_tail)
        assert (ours.status, ours.stderr) == (case.divergence.status, b"")
    else:
        assert lines(ours.stdout) == lines(reference.stdout), f"ours: stderr {ours.stderr[-2000:]!r}"
        assert ours.status == reference.status, f"ours: stderr {ours.stderr[-2000:]!r}"
        assert lines(compared_stderr(case, ours, "ours")) == lines(compared_stderr(case, reference, "reference"))
    assert ours.tree == reference.tree


# Fixtures with no differential case, by name prefix, and why. A single fixture can instead say
# so itself with a line `not differential: REASON` in its source.
NOT_DIFFERENTIAL = {
    "net_": "socket programs: wasmtime-py's built-in WASI cannot pre-open sockets, so there is no "
            "reference to compare with; tests/test_net_fixtures.py runs them against real clients",
    "sock_": "needs a pre-opened socket (fd 3), which built-in WASI cannot provide; tests/test_faults.py",
}
OPT_OUT_MARKER = "not differential:"


def test_every_fixture_has_a_differential_case(fixture_builder: FixtureBuilder) -> None:
    """Issue 2, point 9: every fixture runs under both runtimes, unless it says why it cannot."""
    exempt = {name for name in fixture_builder.names()
              if name.startswith(tuple(NOT_DIFFERENTIAL))
              or OPT_OUT_MARKER in fixture_builder.source(name).read_text(errors="replace")}
    missing = set(fixture_builder.names()) - exempt - {case.fixture for case in CASES}
    assert not missing, (f"fixtures without a differential case: {sorted(missing)}; add a Case to CASES in "
                         f"tests/test_differential.py, or a line `{OPT_OUT_MARKER} REASON` to the fixture")
    assert not {case.fixture for case in CASES} & exempt


def run_keep(arguments: list[str], environment: Mapping[str, str]) -> subprocess.CompletedProcess[bytes]:
    """`keep run ARGUMENTS` with no stdin, its output captured, under the generous deadline."""
    return subprocess.run([*KEEP_RUN_COMMAND, *arguments], stdin=subprocess.DEVNULL, capture_output=True,
                          env=dict(environment), timeout=RUN_DEADLINE_SECONDS, check=False)


@pytest.mark.parametrize(("limit_mib", "low_mib"), [(32, 4), (128, 32)])
def test_max_memory_is_where_guest_allocation_fails(limit_mib: int, low_mib: int, wasm_fixture: WasmFixture,
                                                    keep_environment: dict[str, str]) -> None:
    """The guest sees malloc fail (memory.grow refused) somewhere below the limit, not a crash;
    with a larger limit it gets correspondingly further."""
    module = wasm_fixture("memory_hog")
    completed = run_keep(["--max-memory", str(limit_mib << 20), str(module), "1", str(low_mib),
                          str(limit_mib)], keep_environment)
    assert (completed.returncode, completed.stderr) == (0, b"")
    assert completed.stdout == (f"malloc failed: yes\nallocated >= {low_mib} MiB: yes\n"
                                f"allocated <= {limit_mib} MiB: yes\n").encode()


def test_timeout_stops_an_endless_loop(wasm_fixture: WasmFixture, keep_environment: dict[str, str]) -> None:
    """The guest is stopped (a trap, exit status 134 as wasmtime's CLI), after printing what it
    printed, with a one-line-per-cause diagnostic and no Python traceback."""
    completed = run_keep(["--timeout", "1", str(wasm_fixture("endless_loop"))], keep_environment)
    assert completed.returncode == TRAP_STATUS
    assert completed.stdout == b"looping\n"
    assert completed.stderr and b"Traceback" not in completed.stderr
