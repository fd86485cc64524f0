"""Review findings on `--fault`: errnos by their usual names (E2BIG), the same names in the trace."""

from __future__ import annotations

import pytest

from shim.errors import UsageError
from shim.faults import parse_faults
from wasi_host._abi import Errno
from wasi_host._trace import TraceEvent, errno_name


def test_e2big_is_accepted_and_shown_by_its_posix_and_witx_name() -> None:
    """Errno 1 is `2big` in the witx and E2BIG in POSIX; --fault refused `E2BIG` ("not a WASI errno
    name") and only took the made-up ETOOBIG, which is also what the trace showed."""
    (spec,) = parse_faults(["fd_write:E2BIG"])
    assert spec.errno == Errno.TOOBIG
    assert parse_faults(["fd_write:2big"])[0].errno == Errno.TOOBIG
    assert errno_name(Errno.TOOBIG) == "E2BIG"
    event = TraceEvent(1, "fd_write", {"fd": 1, "size": 3}, int(Errno.TOOBIG))
    assert event.format().startswith("fd_write(fd=1, size=3) = E2BIG <")
    assert TraceEvent.from_json(event.to_json()) == event
    with pytest.raises(UsageError, match="'EBIG' is not a WASI errno name"):
        parse_faults(["fd_write:EBIG"])
