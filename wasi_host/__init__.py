"""The wasi_snapshot_preview1 ABI, implemented in Python over pluggable backends.

Layering (nothing here imports trio, and nothing names a concrete storage or network backend;
each module only imports the ones above it):

    _abi        preview1 constants: errno, rights, flags, filetypes, struct layouts (from the witx)
    _errors     WasiError(errno), ProcExit(code); the one OSError -> errno table
    _memory     bounds-checked access to guest memory (a bad pointer is EFAULT)
    _backend    the protocols backends implement: Directory, File, Stream, Socket, Waiter, Clock
    _fdtable    fd -> tagged union of open things (file, directory, stream, socket) with rights
    _paths      path resolution, component by component, that never leaves a pre-open
    _guest      Guest: the per-instance context (args, env, fds, clocks, exit code)
    _functions  one Python function per preview1 name; FUNCTIONS is the table the binding installs
    _bind       the only module that touches wasmtime's C entry points (unchecked host calls)
    _trace      Tracer: wraps the table so every call yields a decoded TraceEvent (--trace)
    _faults     FaultSpec / FaultInjector: wraps the table so chosen calls misbehave (--fault)

_trace and _faults return wrapped copies of FUNCTIONS; the runner binds them only when asked,
so an untraced run calls the plain functions.

Backends shipped here, all behind the protocols only:

    hostdir     a host directory, through *at() calls on directory fds with no-follow
    memfs       an in-memory tree (tests, and the reference for the encrypted volume)
    streams     stdio over an OS fd, or in memory
"""

from wasi_host._abi import Errno, Filetype, Rights
from wasi_host._backend import (
    Buffer,
    Clock,
    Directory,
    DirEntry,
    File,
    FileStat,
    Now,
    Pollable,
    Readiness,
    Socket,
    Stream,
    TimeUpdate,
    Waiter,
)
from wasi_host._errors import ProcExit, WasiError, errno_for_exception
from wasi_host._functions import FUNCTIONS, HostFunction
from wasi_host._guest import Guest, SystemClock, ThreadWaiter

__all__ = [
    "FUNCTIONS",
    "Buffer",
    "Clock",
    "DirEntry",
    "Directory",
    "Errno",
    "File",
    "FileStat",
    "Filetype",
    "Guest",
    "HostFunction",
    "Now",
    "Pollable",
    "ProcExit",
    "Readiness",
    "Rights",
    "Socket",
    "Stream",
    "SystemClock",
    "ThreadWaiter",
    "TimeUpdate",
    "Waiter",
    "WasiError",
    "errno_for_exception",
]
