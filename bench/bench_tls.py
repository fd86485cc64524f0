"""TLS echo in the keep vs a plain trio TLS echo server, measured in the same run.

    python bench/bench_tls.py [--seconds S] [--bulk-mib M]

Both servers run as their own process on loopback with the same certificate and TLS 1.3:
- keep:  `keep run --config keep.toml net_echo_server.wasm` (fixtures/net_echo_server.c: one
         WASI thread, non-blocking sockets and poll_oneoff; TLS terminates in the keep's trio loop);
- peer:  a plain Python trio server (`trio.serve_ssl_over_tcp`, one task per connection).
The clients (trio, in this process) measure, with 1 and 50 concurrent connections:
- round trips/s: 64-byte messages, each waiting for its echo;
- bulk MB/s: each connection streams M MiB and reads it back concurrently.
Printed as numbers and keep/peer ratios; asserts nothing (the target is a ratio of at least 0.5).
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

REPOSITORY = Path(__file__).resolve().parent.parent
SMALL = 64
CONCURRENCY = (1, 50)


def _serve_plain(port: int, certificate: str, key: str) -> None:
    """The peer: a plain trio TLS echo server (runs in its own process)."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(certificate, key)

    async def echo(stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
            await stream.aclose()
        except trio.BrokenResourceError:
            pass

    trio.run(functools.partial(trio.serve_ssl_over_tcp, echo, port, context, host="127.0.0.1"))


async def _client(port: int, context: object) -> trio.SSLStream[trio.SocketStream]:
    import ssl

    assert isinstance(context, ssl.SSLContext)
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
    await stream.do_handshake()
    return stream


async def round_trips(port: int, context: object, clients: int, seconds: float) -> float:
    """Echo round trips per second, all clients together."""
    counts = [0] * clients
    message = b"x" * SMALL

    async def one(index: int, deadline: float) -> None:
        stream = await _client(port, context)
        async with stream:
            while trio.current_time() < deadline:
                await stream.send_all(message)
                received = 0
                while received < SMALL:
                    received += len(await stream.receive_some(SMALL - received))
                counts[index] += 1

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for index in range(clients):
            nursery.start_soon(one, index, start + seconds)
    return sum(counts) / (trio.current_time() - start)


async def bulk(port: int, context: object, clients: int, mib: float) -> float:
    """MB/s echoed (bytes sent and received back, counted once), all clients together."""
    size = int(mib * 1024 * 1024)
    chunk = os.urandom(16384)

    async def one() -> None:
        stream = await _client(port, context)
        async with stream:
            async def send() -> None:
                sent = 0
                while sent < size:
                    piece = chunk[: size - sent]
                    await stream.send_all(piece)
                    sent += len(piece)

            async def receive() -> None:
                received = 0
                while received < size:
                    data = await stream.receive_some(65536)
                    if not data:
                        raise RuntimeError("server closed early")
                    received += len(data)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                nursery.start_soon(receive)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(one)
    return clients * size / (time.perf_counter() - start) / 1e6


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _wait_port(port: int, process: subprocess.Popen[bytes]) -> None:
    """Wait until something accepts on `port` without opening a TLS session on it."""
    with trio.fail_after(60):
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited early with status {process.returncode}")
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


async def _measure(name: str, port: int, context: object, seconds: float, mib: float,
                   results: dict[tuple[str, str, int], float]) -> None:
    for clients in CONCURRENCY:
        results[(name, "round trips/s", clients)] = await round_trips(port, context, clients, seconds)
        per_client = mib if clients == 1 else max(mib / 10, 0.25)
        results[(name, "bulk MB/s", clients)] = await bulk(port, context, clients, per_client)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per round-trip measurement")
    parser.add_argument("--bulk-mib", type=float, default=32.0, help="per single bulk client")
    parser.add_argument("--serve-plain", nargs=3, metavar=("PORT", "CERT", "KEY"),
                        help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve_plain:
        port, certificate, key = options.serve_plain
        _serve_plain(int(port), certificate, key)
        return 0

    import ssl

    from net.tls import SelfSignedProvider

    built = subprocess.run([sys.executable, str(REPOSITORY / "tests" / "fixture_build.py"),
                            "net_echo_server"], capture_output=True, text=True, check=True)
    wasm = Path(built.stdout.split()[-1])
    identity = SelfSignedProvider().identity()
    connections = 2 * sum(CONCURRENCY)  # one per client per measurement (probes never reach it)
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        (work / "cert.pem").write_bytes(identity.certificate_chain_pem)
        (work / "key.pem").write_bytes(identity.private_key_pem)  # bench only: a throwaway key
        keep_port, plain_port = _free_port(), _free_port()
        (work / "keep.toml").write_text(
            f'[tls]\ncertificate = "cert.pem"\nkey = "key.pem"\n\n'
            '[[files]]\nkind = "stdin"\n[[files]]\nkind = "stdout"\n[[files]]\nkind = "stderr"\n'
            f'[[files]]\nkind = "listen"\nname = "echo"\naddr = "127.0.0.1"\nport = {keep_port}\n')
        env = {**os.environ, "KEEPSHIM_CACHE_DIR": str(work / "cache")}
        keep = subprocess.Popen(
            [sys.executable, "-m", "shim", "run", "--config", str(work / "keep.toml"), str(wasm),
             "echo", str(connections)], env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        plain = subprocess.Popen([sys.executable, __file__, "--serve-plain", str(plain_port),
                                  str(work / "cert.pem"), str(work / "key.pem")])
        context = ssl.create_default_context(cafile=str(work / "cert.pem"))
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        results: dict[tuple[str, str, int], float] = {}

        async def run() -> None:
            await _wait_port(keep_port, keep)
            await _wait_port(plain_port, plain)
            measurements: list[Callable[[], Awaitable[None]]] = [
                lambda: _measure("peer", plain_port, context, options.seconds, options.bulk_mib,
                                 results),
                lambda: _measure("keep", keep_port, context, options.seconds, options.bulk_mib,
                                 results),
            ]
            for measurement in measurements:
                await measurement()

        try:
            trio.run(run)
        finally:
            plain.kill()
            keep.kill()
            plain.wait()
            keep.wait()
    print(f"{'measure':<16}{'clients':>8}{'keep':>14}{'trio peer':>14}{'keep/peer':>11}")
    for measure in ("round trips/s", "bulk MB/s"):
        for clients in CONCURRENCY:
            mine, theirs = results[("keep", measure, clients)], results[("peer", measure, clients)]
            print(f"{measure:<16}{clients:>8}{mine:>14.1f}{theirs:>14.1f}{mine / theirs:>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
