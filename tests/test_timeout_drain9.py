"""`keep run --timeout N` bounds the whole run, the drain of a finished guest's connections too.

A guest that sends its answer and exits leaves what its peer has not read yet for the keep to
deliver (as the kernel does for a native process): up to 120 s in all, 10 s without progress. That
wait ignored --timeout: with `--timeout 6` and a peer that reads slowly, the run went on for as
long as the peer kept reading, and ended with the guest's own status 0 as if everything had been
delivered. The drain now ends at the run's deadline, says so on stderr, and the run ends with the
timeout's status (134, a trap's, as for a guest stopped by --timeout)."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import trio
from fixture_build import WasmFixture
from keep_net import STDIO, connect_entry, free_port, keep_env, listen_entry, run_keep_sync, start_keep

from shim.run import TRAP_EXIT_STATUS
from shim.wasm_compile import compile_c_to_wasm

SIZE = 300_000  # fits in the keep's send buffer (256 KiB) and the kernel's: the guest ends at once
TIMEOUT = 6  # seconds: room for the keep to start and the guest to end by itself first
PEER_GIVES_UP = 90.0  # the peer's own bound, far beyond the run's: it never ends the run itself


@pytest.mark.slow
@pytest.mark.parametrize("reader", ["never_reads", "reads_slowly"])
async def test_timeout_ends_the_drain_of_a_finished_guests_connections(
        reader: str, tmp_path: Path, wasm_fixture: WasmFixture, keep_environment: dict[str, str]) -> None:
    """never_reads: the old drain waited for 10 s without progress and ended with status 0;
    reads_slowly (8 KiB every 0.5 s: progress within each 10 s): it waited until the peer had
    everything, about 20 s here, again with status 0."""
    port = free_port()
    async with trio.open_nursery() as nursery:
        keep = await start_keep(nursery, tmp_path, wasm_fixture("net_send_exit"), STDIO + listen_entry("web", port),
                                ["web", str(SIZE)], keep_env(keep_environment),
                                extra=["--timeout", str(TIMEOUT)])
        await keep.wait_listening()
        context = keep.client_context()

        def peer() -> tuple[int, str]:
            """Connect, then read as `reader` says until the keep ends the connection (or the
            peer gives up): the bytes received and how the connection ended."""
            raw = socket.create_connection(("127.0.0.1", port), timeout=PEER_GIVES_UP)
            received, ending = 0, "gave up"
            given_up = time.monotonic() + PEER_GIVES_UP
            with context.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False) as tls:
                try:
                    while time.monotonic() < given_up:
                        if reader == "never_reads":
                            if keep.process.returncode is not None:
                                return received, "keep ended"
                            time.sleep(0.2)
                            continue
                        data = tls.recv(8192)
                        if not data:
                            return received, "clean end"
                        received += len(data)
                        time.sleep(0.5)
                except (OSError, ssl.SSLError) as error:
                    ending = type(error).__name__
            return received, ending

        started = time.monotonic()
        received, ending = await trio.to_thread.run_sync(peer)
        status = await keep.finish(timeout=PEER_GIVES_UP)
        elapsed = time.monotonic() - started
    assert keep.stdout == f"sent {SIZE}\n", keep.stderr  # the guest ended by itself, before the timeout
    assert status == TRAP_EXIT_STATUS, (status, ending, keep.stderr)
    assert received < SIZE and ending != "gave up", (received, ending)  # the tail was dropped
    assert (f"keep: --timeout {TIMEOUT} s ran out while the guest's output was still leaving (the guest had "
            "ended with status 0): 1 connection cut short, unsent data dropped\n") in keep.stderr
    assert "Traceback" not in keep.stderr
    assert elapsed < PEER_GIVES_UP - 30, elapsed  # generous: about TIMEOUT s, the old drain 10-20 s


def test_timeout_bounds_the_opening_of_the_sockets(
        tmp_path: Path, wasm_fixture: WasmFixture, keep_environment: dict[str, str]) -> None:
    """A connect entry whose peer accepts TCP but never answers the TLS handshake held `keep run
    --timeout 2` for the handshake's own 10 s limit, then failed with exit 1 ('TLS handshake ...
    timed out'), as if no --timeout had been given. The opening now ends at the run's deadline,
    with the timeout's status."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nobody speaks
        port = silent.getsockname()[1]
        started = time.monotonic()
        result = run_keep_sync(tmp_path, wasm_fixture("hello"), STDIO + connect_entry("up", "127.0.0.1", port),
                               [], keep_env(keep_environment), extra=["--timeout", "2"], timeout=60)
        elapsed = time.monotonic() - started
    assert result.returncode == TRAP_EXIT_STATUS, result.stderr
    assert result.stderr == (f"keep: --timeout ran out while the keep's sockets were being opened (connect \"up\" "
                             f"(127.0.0.1 port {port})): the guest did not start\n")
    assert result.stdout == ""
    assert elapsed < 45, elapsed  # generous: about 2 s (the handshake limit alone was 10 s)


# Writes 64 MiB to stdout, 64 KiB per write(2): far more than a pipe holds.
FLOOD_STDOUT = r"""
#include <string.h>
#include <unistd.h>
int main(void) {
    static char chunk[65536];
    memset(chunk, 'x', sizeof chunk);
    for (int i = 0; i < 1024; i++) if (write(1, chunk, sizeof chunk) < 0) return 1;
    return 0;
}
"""


def test_timeout_stops_a_guest_blocked_writing_to_a_stdout_nobody_reads(
        tmp_path: Path, keep_environment: dict[str, str]) -> None:
    """`keep run --timeout 2 app | reader-that-stopped-reading`: the guest's fd_write blocked in
    write(2) on the full pipe, where neither the epoch nor the stop signal reaches, and the run
    never ended. Writes to a stdout that can block now wait for it to be writable or for the
    stop: the run ends with the timeout's trap, naming fd_write."""
    source = tmp_path / "flood.c"
    source.write_text(FLOOD_STDOUT)
    module = tmp_path / "flood.wasm"
    compile_c_to_wasm(source, module)
    with subprocess.Popen(["keep", "run", "--timeout", "2", str(module)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=keep_environment) as keep:
        try:
            status = keep.wait(timeout=60)  # the pipe is never read: only the stop can end the run
        except subprocess.TimeoutExpired:
            keep.kill()
            raise AssertionError("keep run --timeout 2 still running after 60 s") from None
        assert keep.stderr is not None
        stderr = keep.stderr.read().decode()
    assert status == TRAP_EXIT_STATUS, stderr
    assert "wasm trap: interrupt (while waiting in fd_write)" in stderr
    assert stderr.endswith("keep: the guest was stopped: it ran longer than --timeout 2 s\n")
