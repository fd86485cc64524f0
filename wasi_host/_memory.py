"""Bounds-checked access to guest linear memory.

Every host function receives ``memory``: a writable one-dimensional byte memoryview of the whole
linear memory, valid only for the duration of the call (``memory.grow`` may move it), or None
when the module exports no memory.  Guest pointers and lengths are unsigned ints; the helpers
here turn any pointer or length that does not fit (including ``ptr + len`` past the end, and a
missing memory) into ``WasiError(EFAULT)`` so no IndexError or struct.error ever leaves a host
function.  Python ints do not wrap, so ``ptr + len`` overflowing 2**32 is just "past the end".
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from wasi_host._abi import U32, U32_PAIR, Errno
from wasi_host._errors import WasiError

Memory = memoryview | None

#: The most iovecs one call takes (Linux's IOV_MAX; more is EINVAL there too). keepshim moves
#: every buffer of a call, as Linux does, with one Python object per iovec: without a bound a
#: guest could name its whole memory as zero-length iovecs (8 M for 64 MiB), which cost 2.4 GB of
#: host memory and 20 s in one call. wasmtime takes any number (it moves only the first
#: non-empty buffer).
IOV_MAX = 1024


def fault() -> WasiError:
    """The error for a guest pointer that does not point into its memory."""
    return WasiError(Errno.FAULT)


def view(memory: Memory, ptr: int, length: int) -> memoryview:
    """A zero-copy slice ``memory[ptr:ptr+length]``, EFAULT unless it lies wholly inside."""
    if memory is None or ptr + length > len(memory):
        raise fault()
    return memory[ptr : ptr + length]


def read_bytes(memory: Memory, ptr: int, length: int) -> bytes:
    """A copy of ``length`` guest bytes at ``ptr``."""
    return bytes(view(memory, ptr, length))


def write_bytes(memory: Memory, ptr: int, data: bytes | bytearray | memoryview) -> None:
    """Copy ``data`` into guest memory at ``ptr``."""
    view(memory, ptr, len(data))[:] = data


def store(layout: struct.Struct, memory: Memory, ptr: int, *values: int) -> None:
    """Pack ``values`` with ``layout`` at ``ptr`` (EFAULT when it does not fit)."""
    try:
        layout.pack_into(memory, ptr, *values)  # type: ignore[arg-type]
    except (struct.error, TypeError):
        raise fault() from None


def store_u32(memory: Memory, ptr: int, value: int) -> None:
    """Store one u32 (the commonest result: a size, an fd) at ``ptr``."""
    try:
        U32.pack_into(memory, ptr, value)  # type: ignore[arg-type]
    except (struct.error, TypeError):
        raise fault() from None


def load(layout: struct.Struct, memory: Memory, ptr: int) -> tuple[int, ...]:
    """Unpack ``layout`` at ``ptr`` (EFAULT when it does not fit)."""
    try:
        return layout.unpack_from(memory, ptr)  # type: ignore[arg-type]
    except (struct.error, TypeError):
        raise fault() from None


def read_path(memory: Memory, ptr: int, length: int) -> str:
    """A guest path string: EFAULT when out of bounds, EILSEQ when not UTF-8 (as wasmtime)."""
    raw = view(memory, ptr, length)
    try:
        return str(raw, "utf-8")
    except UnicodeDecodeError:
        raise WasiError(Errno.ILSEQ) from None


def iovecs(memory: Memory, ptr: int, count: int) -> list[memoryview]:
    """The buffers of an iovec/ciovec array, each checked to lie inside guest memory; EINVAL
    for more than IOV_MAX of them (an array that does not fit is EFAULT first)."""
    if memory is None or ptr + 8 * count > len(memory):
        raise fault()
    if count > IOV_MAX:
        raise WasiError(Errno.INVAL)
    size = len(memory)
    buffers = []
    for buf, buf_len in U32_PAIR.iter_unpack(memory[ptr : ptr + 8 * count]):
        if buf + buf_len > size:
            raise fault()
        buffers.append(memory[buf : buf + buf_len])
    return buffers


def transfer_limit(memory: Memory) -> int:
    """The most bytes one read or write moves: the memory size.

    Overlapping iovecs could otherwise add up to far more than memory (an allocation the guest
    controls); a shorter transfer than asked is always allowed.
    """
    return len(memory) if memory is not None else 0


def gather(memory: Memory, ptr: int, count: int) -> memoryview | bytes:
    """The concatenated contents of a ciovec array (zero-copy for a single buffer), at most
    :func:`transfer_limit` bytes."""
    if count == 1:
        try:
            buf, buf_len = U32_PAIR.unpack_from(memory, ptr)  # type: ignore[arg-type]
        except (struct.error, TypeError):
            raise fault() from None
        if buf + buf_len > len(memory):  # type: ignore[arg-type]
            raise fault()
        return memory[buf : buf + buf_len]  # type: ignore[index]
    limit = transfer_limit(memory)
    chunks = []
    total = 0
    for buffer in iovecs(memory, ptr, count):
        if total + len(buffer) > limit:
            chunks.append(buffer[: limit - total])
            break
        chunks.append(buffer)
        total += len(buffer)
    return b"".join(chunks)


def scatter(buffers: Sequence[memoryview], data: bytes | memoryview) -> int:
    """Copy ``data`` across ``buffers`` in order; returns the number of bytes placed."""
    offset = 0
    total = len(data)
    for buffer in buffers:
        if offset >= total:
            break
        chunk = min(len(buffer), total - offset)
        buffer[:chunk] = data[offset : offset + chunk]
        offset += chunk
    return offset
