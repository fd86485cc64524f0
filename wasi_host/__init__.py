"""The wasi_snapshot_preview1 ABI, implemented in Python over pluggable backends.

Layering (nothing here imports trio, and nothing names a concrete storage or network backend):

    _abi        preview1 constants: errno, rights, flags, filetypes, struct layouts (from the witx)
    _errors     WasiError(errno), ProcExit(code); the one OSError -> errno table
    _memory     bounds-checked access to guest memory (a bad pointer is EFAULT)
    _backend    the filesystem, socket and waiting protocols that backends implement
    _fdtable    fd -> entry (handle, rights base/inheriting, fdflags)
    _paths      path resolution that never leaves a pre-open
    _functions  one Python function per preview1 name
    _bind       the only module that touches wasmtime's C entry points (unchecked host calls)
    hostdir     backend: a host directory
    memfs       backend: an in-memory tree (tests, and the reference for the others)
"""
