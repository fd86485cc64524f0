"""Review findings on `--fault`: errnos by their usual names (E2BIG), the same names in the trace."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from fixture_build import WasmFixture

from shim.errors import UsageError
from shim.faults import parse_faults
from shim.pytest_plugin import FaultNeverTookEffect, KeepRunner
from wasi_host._abi import Errno
from wasi_host._trace import TraceEvent, errno_name


def test_e2big_is_accepted_and_shown_by_its_posix_and_witx_name() -> None:
    """Errno 1 is `2big` in the witx and E2BIG in POSIX; --fault refused `E2BIG` ("not a WASI errno
    name") and only took the made-up ETOOBIG, which is also what the trace showed."""
    (spec,) = parse_faults(["fd_write:E2BIG"])
    assert spec.errno == Errno.TOOBIG
    assert parse_faults(["fd_write:2big"])[0].errno == Errno.TOOBIG
    assert [spec.errno for spec in parse_faults(["fd_write:TOOBIG", "fd_write:etoobig"])] == [Errno.TOOBIG] * 2
    assert errno_name(Errno.TOOBIG) == "E2BIG"
    event = TraceEvent(1, "fd_write", {"fd": 1, "size": 3}, int(Errno.TOOBIG))
    assert event.format().startswith("fd_write(fd=1, size=3) = E2BIG <")
    assert TraceEvent.from_json(event.to_json()) == event
    with pytest.raises(UsageError, match="'EBIG' is not a WASI errno name"):
        parse_faults(["fd_write:EBIG"])


def test_path_matches_the_destination_of_a_rename_or_a_link_too() -> None:
    """path_rename and path_link name two paths; path=GLOB looked at the first only, so a fault on
    'moves into archive/' (`path_rename:EXDEV:path=/data/archive/*`) never fired."""
    from wasi_host import Guest, WasiError
    from wasi_host._faults import FaultInjector, FaultSpec
    from wasi_host._functions import FUNCTIONS
    from wasi_host.memfs import MemoryFilesystem
    from wasi_host.streams import MemoryStream

    root = MemoryFilesystem().root()
    root.mkdir("archive")
    names = frozenset(FUNCTIONS)
    specs = (FaultSpec.parse("path_rename|path_link:EXDEV:path=/data/archive/*", names),)
    functions = FaultInjector(specs).wrap(FUNCTIONS)
    guest = Guest([b"m"], [], [("/data", root)], MemoryStream(), MemoryStream(), MemoryStream())
    memory = memoryview(bytearray(4096))
    for offset, text in ((100, b"a.txt"), (200, b"archive/a.txt"), (300, b"b.txt")):
        memory[offset:offset + len(text)] = text
    try:
        assert functions["path_open"].impl(guest, memory, 3, 0, 100, 5, 1, 2**29 - 1, 2**29 - 1, 0, 0) == 0
        assert functions["path_rename"].impl(guest, memory, 3, 100, 5, 3, 300, 5) == 0  # a.txt -> b.txt
        with pytest.raises(WasiError) as failed:
            functions["path_rename"].impl(guest, memory, 3, 300, 5, 3, 200, 13)  # b.txt -> archive/
        assert failed.value.errno == Errno.XDEV
        with pytest.raises(WasiError) as failed:
            functions["path_link"].impl(guest, memory, 3, 0, 300, 5, 3, 200, 13)
        assert failed.value.errno == Errno.XDEV
    finally:
        guest.close()
    assert sorted(entry.name for entry in root.readdir(0)) == ["archive", "b.txt"]


@pytest.mark.parametrize(("text", "complaint"), [
    ("random_get:EIO:fd=3", "fd= never matches random_get: it takes no fd"),
    ("clock_time_get|args_get:EIO:path=*.txt", "path= never matches clock_time_get: it names no path"),
    ("poll_oneoff:EINTR:fd=0", "fd= never matches poll_oneoff: it takes no fd"),
    ("sock_send:reset-after=9:path=/data/*", "path= never matches sock_send: it names no path"),
])
def test_a_condition_the_calls_cannot_meet_is_refused(text: str, complaint: str) -> None:
    """A spec narrowed by fd= or path= to calls that have neither was accepted and silently never
    fired, so a test believed it had injected a fault."""
    with pytest.raises(UsageError, match=complaint):
        parse_faults([text])
    for fine in ("fd_*:EIO:fd=3", "*:EIO:path=*.txt", "sock_send:reset-after=9:fd=4", "path_symlink:EIO:fd=3"):
        parse_faults([fine])


def test_numbers_with_leading_zeros_are_whole_numbers() -> None:
    """int(value, 0) refuses '08' and '010' (Python's octal rule), so `nth=08` was refused as
    "nth= needs a whole number, not '08'"; hex (0x10) still reads as before."""
    (spec,) = parse_faults(["fd_write:short=0x10:nth=08:every=010:seed=007"])
    assert (spec.amount, spec.nth, spec.every, spec.seed) == (16, 8, 10, 7)
    with pytest.raises(UsageError, match="nth= needs a whole number, not '8x'"):
        parse_faults(["fd_write:EIO:nth=8x"])


def test_a_fault_that_never_took_effect_is_reported(wasm_fixture: WasmFixture, tmp_path: Path,
                                                    keep_environment: dict[str, str]) -> None:
    """A spec whose glob or count never meets a call changed nothing, silently: the run passed and
    looked like an app that handles the fault. keep now says so after the run."""
    completed = subprocess.run(
        ["keep", "run", "--dir", f"{tmp_path}::/sandbox", "--fault", "fd_write:EIO:path=/elsewhere/*",
         "--fault", "fd_write:enospc-after=1000000", "--fault", "fd_write:short=10:fd=1",
         str(wasm_fixture("short_write_ok"))], capture_output=True, text=True, env=keep_environment, check=False)
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr.splitlines() == [
        "keep: warning: --fault 'fd_write:EIO:path=/elsewhere/*' never took effect (no call met its conditions)",
        "keep: warning: --fault 'fd_write:enospc-after=1000000' never took effect (4 calls met its "
        "conditions; none was failed or shortened)",
    ]


def test_the_keep_fixture_warns_about_a_fault_that_never_took_effect(keep: KeepRunner,
                                                                    wasm_fixture: WasmFixture) -> None:
    expected = r"--fault 'fd_read:EIO:nth=5' never took effect"
    with pytest.warns(FaultNeverTookEffect, match=expected) as caught:
        result = keep(wasm_fixture("hello"), faults=["fd_read:EIO:nth=5", "fd_write:EIO:fd=2"])
    assert result.exit_code == 0 and result.stderr == b""
    assert [warning.filename for warning in caught] == [__file__]  # the test's line, not trio's


async def test_run_async_warns_too(keep: KeepRunner, wasm_fixture: WasmFixture) -> None:
    expected = r"--fault 'fd_read:EIO:nth=5' never took effect"
    with pytest.warns(FaultNeverTookEffect, match=expected) as caught:
        await keep.run_async(wasm_fixture("hello"), faults=["fd_read:EIO:nth=5"])
    assert [warning.filename for warning in caught] == [__file__]


def test_only_the_short_fault_that_set_the_length_took_effect(keep: KeepRunner, wasm_fixture: WasmFixture) -> None:
    """Two short= specs on the same writes: the smaller cap shortens them, the larger one never
    does (found in review: every short spec was credited whenever any of them shortened a call)."""
    with pytest.warns(FaultNeverTookEffect, match=r"--fault 'fd_write:short=100000:fd=1' never took effect") as caught:
        result = keep(wasm_fixture("hello"), faults=["fd_write:short=3:fd=1", "fd_write:short=100000:fd=1"])
    assert result.exit_code == 0 and result.stdout == b"Hello, world!\n"  # short writes retried
    assert len(caught) == 1
