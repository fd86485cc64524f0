"""Session 10's third review of guest sockets through TLS in the keep (net/, shim/sockets.py):
each test reproduces a defect the review confirmed, against real sockets and TLS clients on
loopback. Every test stops by itself; none asserts a timing.
"""

from __future__ import annotations

import socket

import trio

from net.streams import ListenerSettings, ReadinessBoard, open_listener

TEST_DEADLINE = 60.0


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


async def test_a_listener_on_every_address_with_port_0_has_one_port_for_both_families() -> None:
    """addr "::" (the default) with port = 0 bound 0.0.0.0 and :: to two different free ports,
    and `Listener.port` named the IPv4 one alone: an IPv6 client of that port was refused. Both
    families now listen on the one port the listener names and take a connection from each."""
    if not _has_ipv6_loopback():
        return
    settings = ListenerSettings(name="web", context=None)
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            board = ReadinessBoard(trio.lowlevel.current_trio_token())
            listener = await open_listener(settings, "::", 0, board, nursery)
            ports = {socket_listener.socket.getsockname()[1]
                     for socket_listener in listener._listeners}
            assert ports == {listener.port}
            for address in ("127.0.0.1", "::1"):  # the port reaches the keep from both families
                tcp = await trio.open_tcp_stream(address, listener.port)
                assert await listener.wait_readable(trio.current_time() + TEST_DEADLINE)
                listener.try_accept().close()
                await tcp.aclose()
            listener.close_connections()
            nursery.cancel_scope.cancel()
