"""Helpers for the network tests: run `keep run --config` as a subprocess, pick loopback ports,
write keep.toml, and a recording TCP proxy.

Each KeepProcess writes stdout and stderr to files in the test's tmp dir; `wait_listening` waits
for the listeners' exported certificate (the keep writes it only after every listener is bound),
`wait_for_output` for a line of stdout. Everything has a deadline: a test never hangs.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import trio

STARTUP_TIMEOUT = 30.0
KEEP_COMMAND = [sys.executable, "-m", "shim"]


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


STDIO = '[[files]]\nkind = "stdin"\n\n[[files]]\nkind = "stdout"\n\n[[files]]\nkind = "stderr"\n\n'


def listen_entry(name: str, port: int, **extra: object) -> str:
    lines = [f'[[files]]\nkind = "listen"\nname = "{name}"\naddr = "127.0.0.1"\nport = {port}']
    lines += [f"{key} = {_toml(value)}" for key, value in extra.items()]
    return "\n".join(lines) + "\n\n"


def connect_entry(name: str, host: str, port: int, **extra: object) -> str:
    lines = [f'[[files]]\nkind = "connect"\nname = "{name}"\nhost = "{host}"\nport = {port}']
    lines += [f"{key} = {_toml(value)}" for key, value in extra.items()]
    return "\n".join(lines) + "\n\n"


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class KeepProcess:
    """A `keep run --config` subprocess and its captured output."""

    process: trio.Process
    directory: Path
    certificate: Path
    stdout_path: Path
    stderr_path: Path
    port: int = 0
    args: list[str] = field(default_factory=list)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def wait_listening(self) -> None:
        with trio.fail_after(STARTUP_TIMEOUT):
            while not self.certificate.exists():
                if self.process.returncode is not None:
                    raise AssertionError(f"keep exited early ({self.process.returncode}):\n"
                                         f"{self.stderr}")
                await trio.sleep(0.02)

    async def wait_for_output(self, text: str) -> None:
        with trio.fail_after(STARTUP_TIMEOUT):
            while text not in self.stdout:
                if self.process.returncode is not None:
                    raise AssertionError(f"keep exited before printing {text!r}:\n{self.stderr}")
                await trio.sleep(0.02)

    async def finish(self, timeout: float = 30.0) -> int:
        """Wait for the keep to exit by itself; kill it (and fail) past `timeout`."""
        try:
            with trio.fail_after(timeout):
                return await self.process.wait()
        except trio.TooSlowError:
            self.process.kill()
            await self.process.wait()
            raise AssertionError(f"keep did not stop by itself; stderr:\n{self.stderr}") from None

    def client_context(self) -> ssl.SSLContext:
        """A Python ssl client context trusting the keep's exported certificate."""
        context = ssl.create_default_context(cafile=str(self.certificate))
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        return context


async def start_keep(nursery: trio.Nursery, directory: Path, wasm: Path, toml: str,
                     args: list[str], env: dict[str, str], *, extra: list[str] | None = None,
                     export: bool = True) -> KeepProcess:
    """Write keep.toml (with `[tls] export_certificate` unless told otherwise) and start keep."""
    certificate = directory / "keep-cert.pem"
    if export:
        toml = f'[tls]\nexport_certificate = "{certificate}"\n\n' + toml
    config = directory / "keep.toml"
    config.write_text(toml)
    stdout_path, stderr_path = directory / "keep.stdout", directory / "keep.stderr"
    command = [*KEEP_COMMAND, "run", "--config", str(config), *(extra or []),
               str(wasm), *args]
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        process = await nursery.start(_run_process, command, out.fileno(), err.fileno(), env)
    return KeepProcess(process, directory, certificate, stdout_path, stderr_path, args=command)


async def _run_process(command: list[str], stdout: int, stderr: int, env: dict[str, str],
                       *, task_status: trio.TaskStatus[trio.Process]) -> None:
    process = await trio.lowlevel.open_process(command, stdin=subprocess.DEVNULL, stdout=stdout,
                                               stderr=stderr, env=env)
    task_status.started(process)
    try:
        await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


async def start_listening_keep(nursery: trio.Nursery, directory: Path, wasm: Path, name: str,
                               args: list[str], env: dict[str, str],
                               **listen_options: object) -> KeepProcess:
    """A keep whose one socket is a TLS listener `name` on a free loopback port (passed to the
    guest as its first argument), started and listening."""
    port = free_port()
    keep = await start_keep(nursery, directory, wasm, STDIO + listen_entry(name, port, **listen_options),
                            [name, *args], env)
    keep.port = port
    await keep.wait_listening()
    return keep


def run_keep_sync(directory: Path, wasm: Path, toml: str, args: list[str], env: dict[str, str],
                  *, extra: list[str] | None = None, timeout: float = 30.0
                  ) -> subprocess.CompletedProcess[str]:
    """Run keep to completion (for configurations that fail at start or need no peer)."""
    config = directory / "keep.toml"
    config.write_text(toml)
    return subprocess.run([*KEEP_COMMAND, "run", "--config", str(config),
                           *(extra or []), str(wasm), *args],
                          capture_output=True, text=True, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


class RecordingProxy:
    """A loopback TCP proxy that keeps every byte it forwards, per direction."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.to_server = bytearray()
        self.to_client = bytearray()
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(self._copy, client, server, self.to_server, nursery.cancel_scope)
            nursery.start_soon(self._copy, server, client, self.to_client, nursery.cancel_scope)

    @staticmethod
    async def _copy(source: trio.SocketStream, sink: trio.SocketStream, record: bytearray,
                    scope: trio.CancelScope) -> None:
        try:
            while data := await source.receive_some(65536):
                record += data
                await sink.send_all(data)
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            scope.cancel()


def keep_env(base: dict[str, str]) -> dict[str, str]:
    """The subprocess environment with Python's output unbuffered (timely stdout lines)."""
    return {**base, "PYTHONUNBUFFERED": "1", **({} if "PATH" in base else {"PATH": os.defpath})}
