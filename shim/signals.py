"""Which signals stop a keep's guest (and which a foreground mount), as one rule.

SIGINT, SIGTERM and SIGHUP stop the guest gracefully: its volumes are committed, its sockets
closed. SIGHUP belongs there because a closed terminal must not cost the guest's writes since
its last fsync: they live in keep's memory until the commit, where a POSIX program's writes would
already be in the kernel. A signal that keep was started with ignored stays ignored: nohup
ignores SIGHUP so that a job outlives its terminal, and a shell starts background jobs with
SIGINT ignored; installing a receiver would undo that.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stop_signals() -> tuple[signal.Signals, ...]:
    """STOP_SIGNALS less those ignored now (SIG_IGN), in that order; possibly empty."""
    return tuple(number for number in STOP_SIGNALS if signal.getsignal(number) is not signal.SIG_IGN)
