"""Which signals stop a keep's guest (and which a foreground mount), as one rule.

SIGINT, SIGTERM and SIGHUP stop the guest gracefully: its volumes are committed, its sockets
closed. SIGHUP belongs there because a closed terminal must not cost the guest's writes since
its last fsync: they live in keep's memory until the commit, where a POSIX program's writes would
already be in the kernel. A signal that keep was started with ignored stays ignored: nohup
ignores SIGHUP so that a job outlives its terminal, and a shell starts background jobs with
SIGINT ignored; installing a receiver would undo that.

`receive_stop_signals` is the one way keep listens for them (keep run's volumes and sockets,
keep serve, keep volume mount).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import AsyncIterator, Iterator, Sequence

import trio

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stop_signals() -> tuple[signal.Signals, ...]:
    """STOP_SIGNALS less those ignored now (SIG_IGN), in that order; possibly empty."""
    return tuple(number for number in STOP_SIGNALS if signal.getsignal(number) is not signal.SIG_IGN)


@contextlib.contextmanager
def receive_stop_signals(signals: Sequence[int] | None = None) -> Iterator[AsyncIterator[int]]:
    """trio's receiver of `signals` (default: `stop_signals()`), for the duration of the block.
    With none to watch (every one ignored), or outside the main thread (library use: only the
    main thread may take signals, and the caller handles them), an iterator that never yields:
    the task reading it waits until it is cancelled."""
    watched = stop_signals() if signals is None else tuple(signals)
    if not watched or threading.current_thread() is not threading.main_thread():
        yield _never()
        return
    with trio.open_signal_receiver(*watched) as received:
        yield received


async def _never() -> AsyncIterator[int]:
    await trio.sleep_forever()
    yield 0  # (unreachable: makes this an async generator)
