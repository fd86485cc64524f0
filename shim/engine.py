"""wasmtime engines for guests: one Engine per guest, configured from a small settings value.

Every guest gets its own Engine (about 0.1 ms to make) so that epoch interruption - how timeouts
and cancellation stop a running guest - never touches another guest. The settings that change
the compiled code (fuel metering, epoch checks) are part of the compile cache key, so they live in
one frozen value with a stable fingerprint.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass

import wasmtime


@dataclass(frozen=True)
class EngineSettings:
    """The compilation-relevant knobs of a guest's Engine.

    `epoch_interruption` lets a trio task stop the guest (`--timeout`) at the cost of a check
    per loop back-edge and function entry: measured 25-30% on a CPU-bound loop, so it is off
    unless a run asks for it (as in wasmtime's CLI). `consume_fuel` is needed for `--fuel`."""

    epoch_interruption: bool = False
    consume_fuel: bool = False

    def fingerprint(self) -> bytes:
        """A stable digest of these settings and the wasmtime version (compiled code from one
        version or setting is never valid for another)."""
        text = (f"wasmtime={wasmtime_version()};epoch={int(self.epoch_interruption)};"
                f"fuel={int(self.consume_fuel)}")
        return hashlib.sha256(text.encode()).digest()

    def make_engine(self) -> wasmtime.Engine:
        """A fresh Engine with these settings."""
        config = wasmtime.Config()
        config.epoch_interruption = self.epoch_interruption
        config.consume_fuel = self.consume_fuel
        return wasmtime.Engine(config)


def wasmtime_version() -> str:
    """The installed wasmtime-py version (its native library has the same version)."""
    return importlib.metadata.version("wasmtime")
