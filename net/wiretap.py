"""A tap on the host side of the keep's sockets: the exact bytes the host's network sees.

`keep run --audit-host` (shim.audit) needs to know whether a marker ever crossed the wire in
plaintext. The bytes that matter are the ones below TLS: the TCP payload, as a recording proxy or
the host kernel would see it. `TappedStream` wraps the raw `trio.SocketStream` before TLS is
layered on top, and reports every chunk sent and received to a tap.

The tap is found through the context variable `WIRE_TAP` rather than a parameter threaded through
every constructor: the code that wants the audit (the CLI) and the code that opens sockets
(net.streams, reached through shim.sockets) are far apart, and trio copies the context into
every task it starts, so a tap set before `trio.run` reaches every listener and connection of
that run and no other. Unset (the default), nothing is wrapped.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable

import trio

#: `tap(label, direction, data)`: label names the connection ("listen 127.0.0.1:443 <- peer"),
#: direction is "sent" or "received"; called from trio tasks, so it must be quick and not block.
WireTap = Callable[[str, str, bytes], None]

WIRE_TAP: contextvars.ContextVar[WireTap | None] = contextvars.ContextVar("keepshim_wire_tap",
                                                                          default=None)


class TappedStream(trio.abc.HalfCloseableStream):
    """A socket stream that reports its raw bytes to a tap, otherwise unchanged."""

    def __init__(self, inner: trio.SocketStream, tap: WireTap, label: str) -> None:
        self.inner = inner
        self._tap = tap
        self._label = label

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._tap(self._label, "sent", bytes(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        if data:
            self._tap(self._label, "received", bytes(data))
        return data

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


def tapped(stream: trio.SocketStream, label: str) -> trio.abc.HalfCloseableStream:
    """`stream` wrapped for the current context's tap, or `stream` itself when there is none."""
    tap = WIRE_TAP.get()
    if tap is None:
        return stream
    return TappedStream(stream, tap, label)
