"""A memory device that loses power: what was written since the last sync is kept apart (reads
see it, as a page cache does) and, at a cut, kept, lost or torn per 4 KiB piece.

Used by tests/test_crash_power.py and tests/test_integrity_format_review.py.
"""

from __future__ import annotations

import random

from storage.blockdev import MemoryBlockDevice
from storage.integrity import SECTOR_SIZE


class PowerCut(Exception):
    """Raised by the device to stop the store mid-operation."""


class CutDevice(MemoryBlockDevice):
    """Durable contents plus the writes since the last sync; fails at the `fail_at`-th write or
    sync (counting from creation; `calls` says how many there were)."""

    def __init__(self, size: int, fail_at: int = 1 << 62) -> None:
        super().__init__(size)
        self.unsynced: list[tuple[int, bytes]] = []
        self.calls = 0
        self.fail_at = fail_at

    def _tick(self) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise PowerCut()

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._tick()
        self.unsynced.append((offset, bytes(data)))

    def read(self, offset: int, length: int) -> bytes:
        image = bytearray(super().read(offset, length))
        for at, data in self.unsynced:
            start, end = max(offset, at), min(offset + length, at + len(data))
            if start < end:
                image[start - offset:end - offset] = data[start - at:end - at]
        return bytes(image)

    def readinto(self, offset: int, buffer: bytearray | memoryview) -> None:
        view = memoryview(buffer).cast("B")
        view[:] = self.read(offset, len(view))

    def sync(self) -> None:
        self._tick()
        for offset, data in self.unsynced:
            super().write(offset, data)
        self.unsynced.clear()

    def after_cut(self, rng: random.Random, keep: float = 0.5) -> MemoryBlockDevice:
        """The image after the power cut: each unsynced 4 KiB piece survives with probability
        `keep`."""
        survivor = MemoryBlockDevice(self.size, initial=self.snapshot())
        for offset, data in self.unsynced:
            for piece in range(0, len(data), SECTOR_SIZE):
                if rng.random() < keep:
                    survivor.write(offset + piece, data[piece:piece + SECTOR_SIZE])
        return survivor
