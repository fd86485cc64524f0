"""Session 9 fixes in net/streams.py and shim/serve.py, against real sockets on loopback only.

The "black hole" (an address whose SYNs are dropped, as by a firewall) is a loopback listener
whose accept queue is full: listen(0), never accept, a few connections queued; Linux then drops
every further SYN to it, and a connect hangs in SYN_SENT. Every test stops by itself; none
asserts a timing.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import resource
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
import trustme
from fixture_build import WasmFixture
from keep_net import STDIO, connect_entry, keep_env, run_keep_sync

from net.errors import ConnectFailed
from net.streams import ReadinessBoard, open_connection
from net.tls import ServerVerification, client_context

HANG_GUARD = 30.0  # what a test waits before it calls a hang a failure (not a timing check)
SYN_SENT = "02"  # /proc/net/tcp's state of a socket whose connect awaits the SYN-ACK


@contextlib.contextmanager
def black_hole(host: str = "127.0.0.1", port: int = 0) -> Iterator[int]:
    """A loopback port at `host` that drops SYNs (a full accept queue); yields the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as server:
        server.bind((host, port))
        server.listen(0)
        port = server.getsockname()[1]
        fillers = [socket.socket(family) for _ in range(3)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect((host, port))
            yield port
        finally:
            for filler in fillers:
                filler.close()


def _connects_pending_to(port: int) -> list[str]:
    """/proc/net/tcp lines of this machine's IPv4 sockets in SYN_SENT towards `port`."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return [line for line in lines
            if line.split()[2].endswith(f":{port:04X}") and line.split()[3] == SYN_SENT]


def _localhost_tls(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context for "localhost" and the CA file that verifies it."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(context)
    return context, tmp_path / "ca.pem"


async def _say_and_close(words: bytes, stream: trio.SSLStream[trio.SocketStream]) -> None:
    """Answer `words: REQUEST` once the client has ended its request (close_notify)."""
    with contextlib.suppress(trio.BrokenResourceError):
        request = bytearray()
        while chunk := await stream.receive_some(4096):
            request += chunk
        await stream.send_all(words + b": " + bytes(request))
        await stream.aclose()


async def _serve(nursery: trio.Nursery, context: ssl.SSLContext, words: bytes, host: str,
                 port: int = 0) -> int:
    """A TLS server on `host`:`port` answering `words: REQUEST`; its port."""
    listeners = await nursery.start(functools.partial(
        trio.serve_ssl_over_tcp, functools.partial(_say_and_close, words), port, context, host=host))
    return int(listeners[0].transport_listener.socket.getsockname()[1])


async def _ask_localhost(nursery: trio.Nursery, port: int, ca_file: Path,
                         check_connected: Callable[[], None] = lambda: None) -> bytes:
    """Connect to localhost:`port` as a keep.toml connect entry does, send 'hi', and return the
    answer; `check_connected` runs as soon as the connection is open."""
    verification = ServerVerification(ca_file=ca_file)
    board = ReadinessBoard(trio.lowlevel.current_trio_token())
    with trio.fail_after(HANG_GUARD):
        connection = await open_connection("localhost", port, client_context(verification),
                                           verification, board, nursery)
        check_connected()
        connection.try_send(b"hi\n")
        connection.shutdown_write()
        await board.wait_until(lambda: connection.has_at_least(100))  # or its end: the server closes
    answer = connection.try_receive(100)
    connection.close()
    return answer


async def test_localhost_reaches_ipv6_loopback_while_ipv4_loopback_drops_syns(tmp_path: Path) -> None:
    """`host = "localhost"` tried 127.0.0.1, then ::1 only once it had failed: with 127.0.0.1's
    SYNs dropped, the connect ran into CONNECT_TIMEOUT (10 s, 'timed out') and ::1 was never
    tried. The addresses are raced now (RFC 8305): ::1 starts 250 ms after 127.0.0.1 and wins,
    and the attempt still waiting on 127.0.0.1 is cancelled, its socket closed."""
    server_context, ca_file = _localhost_tls(tmp_path)
    with black_hole("127.0.0.1") as port:
        fillers_waiting = len(_connects_pending_to(port))

        def loser_closed() -> None:
            assert len(_connects_pending_to(port)) == fillers_waiting

        async with trio.open_nursery() as nursery:
            await _serve(nursery, server_context, b"from ::1", "::1", port)
            assert await _ask_localhost(nursery, port, ca_file, loser_closed) == b"from ::1: hi\n"
            nursery.cancel_scope.cancel()


async def test_localhost_still_prefers_ipv4_loopback_when_both_answer(tmp_path: Path) -> None:
    server_context, ca_file = _localhost_tls(tmp_path)
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, server_context, b"from 127.0.0.1", "127.0.0.1")
        await _serve(nursery, server_context, b"from ::1", "::1", port)
        assert await _ask_localhost(nursery, port, ca_file) == b"from 127.0.0.1: hi\n"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "::1"])
async def test_a_refused_connect_says_connection_refused(host: str) -> None:
    """It said trio's summary, 'all attempts to connect to 127.0.0.1:PORT failed', for localhost
    (whose two addresses both refused: the IPv4 error is reported) and for an address alike."""
    with socket.socket() as probe:  # a port nobody listens on, on either address (bound, not listening)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        board = ReadinessBoard(trio.lowlevel.current_trio_token())
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        async with trio.open_nursery() as nursery:
            with trio.fail_after(HANG_GUARD), pytest.raises(ConnectFailed) as refused:
                await open_connection(host, port, None, ServerVerification(), board, nursery)
    assert str(refused.value) == f"cannot connect to {where}: Connection refused"


def test_keep_run_connects_to_localhost_on_ipv6_while_ipv4_drops_syns(
        tmp_path: Path, wasm_fixture: WasmFixture, keep_environment: dict[str, str]) -> None:
    """The same through `keep run`: a keep.toml connect entry to localhost whose server listens
    on ::1 while 127.0.0.1's port drops SYNs. It said 'connect "upstream": cannot connect to
    localhost:PORT: timed out after 10 s', exit 1; the guest now talks to the server."""
    server_context, ca_file = _localhost_tls(tmp_path)

    async def main(port: int) -> None:
        async with trio.open_nursery() as nursery:
            await _serve(nursery, server_context, b"from ::1", "::1", port)
            toml = STDIO + connect_entry("upstream", "localhost", port, ca=str(ca_file))
            result = await trio.to_thread.run_sync(functools.partial(
                run_keep_sync, tmp_path, wasm_fixture("net_client"), toml, ["upstream", "ping"],
                keep_env(keep_environment), timeout=60))
            assert result.returncode == 0, result.stderr
            assert result.stdout == "from ::1: ping\n[end of stream]\n", result.stderr
            nursery.cancel_scope.cancel()

    with black_hole("127.0.0.1") as port:
        trio.run(main, port)


# keep serve's own lines on stderr go through shim.errors.say, which drops what stderr cannot
# take: a line that cannot be written must not end the keep.


def _few_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))


def _flood_until_refused_then_handshake(port: int, process: subprocess.Popen[str]) -> None:
    """Hold more connections than keep serve has fds (its accept() fails: EMFILE), let them go,
    then wait until a TLS handshake succeeds again (or the keep has exited: the caller asserts)."""
    flood = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(80)]
    time.sleep(1)  # the keep tries to accept them all (not a timing check: a pause)
    for connection in flood:
        connection.close()
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    deadline = time.monotonic() + HANG_GUARD
    while process.poll() is None and time.monotonic() < deadline:
        try:
            with (socket.create_connection(("127.0.0.1", port), timeout=10) as tcp,
                  context.wrap_socket(tcp) as tls):
                assert tls.getpeercert(binary_form=True)
            return
        except (OSError, ssl.SSLError):
            time.sleep(0.2)


def _stop(process: subprocess.Popen[str]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=HANG_GUARD)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def test_keep_serve_whose_stderr_reader_is_gone_survives_a_failing_accept(tmp_path: Path) -> None:
    """accept() failing (EMFILE: peers hold every fd) printed 'keep: cannot accept connections
    for now' with a bare print: with stderr a pipe whose reader had gone (a supervisor that
    restarted, `keep serve 2>&1 | head -1`), the print raised BrokenPipeError out of the accept
    loop and anyone who could open enough connections ended the keep. It goes through say now."""
    environment = {**os.environ, "KEEPSHIM_CACHE_DIR": str(tmp_path / "cache")}
    process = subprocess.Popen([sys.executable, "-m", "shim", "serve", "--listen", "127.0.0.1:0"],
                               stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=environment, preexec_fn=_few_fds)
    try:
        assert process.stderr is not None
        found = re.search(r"serving on 127\.0\.0\.1:(\d+)", process.stderr.readline())
        assert found
        process.stderr.close()  # the reader goes: every later line meets EPIPE
        _flood_until_refused_then_handshake(int(found.group(1)), process)
        assert process.poll() is None, f"keep serve ended: status {process.returncode}"
    finally:
        status = _stop(process)
    assert status == 128 + signal.SIGTERM


def test_keep_serve_says_once_that_it_cannot_accept(tmp_path: Path) -> None:
    """The line itself, on a stderr that takes it: once per run of failures, with the prefix."""
    environment = {**os.environ, "KEEPSHIM_CACHE_DIR": str(tmp_path / "cache")}
    with open(tmp_path / "stderr", "w+") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "shim", "serve", "--listen", "127.0.0.1:0"],
                                   stdin=subprocess.DEVNULL, stderr=stderr, text=True,
                                   env=environment, preexec_fn=_few_fds)
        try:
            deadline = time.monotonic() + HANG_GUARD
            while not (found := re.search(r"serving on 127\.0\.0\.1:(\d+)",
                                          (tmp_path / "stderr").read_text())):
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
            _flood_until_refused_then_handshake(int(found.group(1)), process)
        finally:
            status = _stop(process)
    lines = (tmp_path / "stderr").read_text().splitlines()
    assert status == 128 + signal.SIGTERM, lines
    assert lines.count("keep: cannot accept connections for now: Too many open files") == 1, lines
    assert lines[-1] == "keep: SIGTERM: stopped", lines


def test_keep_serve_names_an_ipv6_address_it_cannot_listen_on_in_brackets(tmp_path: Path) -> None:
    """'keep: cannot listen on ::1:PORT: Address already in use': the port ran into the address.
    Written [::1]:PORT now, as the 'serving on' line and the listeners' log already did."""
    environment = {**os.environ, "KEEPSHIM_CACHE_DIR": str(tmp_path / "cache")}
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "shim", "serve", "--listen", f"[::1]:{port}"],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                env=environment, timeout=HANG_GUARD)
    assert result.returncode == 1, result.stderr
    assert result.stderr == f"keep: cannot listen on [::1]:{port}: Address already in use\n"
