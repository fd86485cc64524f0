"""Host functions bound to wasmtime through its unchecked C entry point.

This is the only module that touches wasmtime's C API directly.

Theory of operation
-------------------
wasmtime-py's `Linker.define_func` boxes every argument into a `Val`, finds the Python function in
a slab and parks exceptions in one process-global slot (20-30 us per call, and with two guest
threads one guest was seen to receive the other's exit code). Instead every host function is
registered with `wasmtime_linker_define_func_unchecked`: wasmtime calls

    size_t callback(void *env, wasmtime_caller_t *caller, wasmtime_val_raw_t *cells, size_t n)

where `cells` holds the arguments (one 16-byte `wasmtime_val_raw_t` each) and receives the results
in place, and the return value is a `wasm_trap_t *` (0 = no trap). We make one ctypes callback per
signature shape (parameter and result types) for each binding; `env` is an index into the
binding's table of host functions. One call does:

1. unpack all arguments with one precompiled `struct.Struct` over a memoryview of `cells`
   (memoryviews are cached by address: wasmtime hands us the same stack slot nearly every time);
2. read the size of the caller's memory (one small C call); when it changed (`memory.grow` may
   extend or move memory, and a move implies a new size), re-read the base pointer and rebuild
   the memoryview of guest memory;
3. call the implementation and write its errno into cell 0.

A binding serves one guest: one store holding one instance. The instance's `memory` export and
the store's context are looked up on the first host call and reused after that.

Every outcome is recorded on the guest's own state object, never in a global: `ProcExit` sets
`guest.exit_code`, an exception that is not an errno sets `guest.host_error`, and both turn into a
trap that unwinds the guest. No Python exception ever reaches wasmtime.

Calls into wasm (`instantiate`, `call_export`) also go straight to the C API so that wasmtime-py's
global exception slot is never consulted.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import wasmtime
from wasmtime import _ffi as ffi

from wasi_host._errors import ProcExit, errno_for_exception

ValueKind = str  # "i32" or "i64": the only value types preview1 uses

# The C signature of wasmtime_func_unchecked_callback_t with every pointer as a plain integer, so
# that ctypes converts arguments as cheaply as it can.
_RawCallback = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                ctypes.c_size_t)
_RawFinalizer = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def _prototype(name: str, restype: Any, argtypes: Sequence[Any]) -> Any:
    """A fresh ctypes function object for a wasmtime C entry point with our own argument types
    (wasmtime-py's shared objects are left untouched)."""
    function = ffi.dll[name]
    function.restype = restype
    function.argtypes = list(argtypes)
    return function


_define_unchecked = _prototype(
    "wasmtime_linker_define_func_unchecked", ctypes.c_void_p,
    [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t,
     ctypes.c_void_p, _RawCallback, ctypes.c_void_p, _RawFinalizer])
_caller_context = _prototype("wasmtime_caller_context", ctypes.c_void_p, [ctypes.c_void_p])
_caller_export_get = _prototype("wasmtime_caller_export_get", ctypes.c_bool,
                                [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p])
_memory_data = _prototype("wasmtime_memory_data", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p])
_memory_data_size = _prototype("wasmtime_memory_data_size", ctypes.c_size_t,
                               [ctypes.c_void_p, ctypes.c_void_p])
_trap_new = _prototype("wasmtime_trap_new", ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_size_t])

_memoryview_from_memory = ctypes.pythonapi.PyMemoryView_FromMemory
_memoryview_from_memory.restype = ctypes.py_object
_memoryview_from_memory.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int]
_PYBUF_WRITE = 0x200

_CELL_SIZE = ctypes.sizeof(ffi.wasmtime_val_raw_t)  # 16: every argument and result is one cell
_NO_FINALIZER = _RawFinalizer()
_MEMORY_EXPORT = b"memory"
_VIEW_CACHE_LIMIT = 64


def _view(address: int, size: int) -> memoryview:
    """A writable 1-D byte memoryview over `size` bytes at `address` (no copy, no ownership)."""
    view: memoryview = _memoryview_from_memory(address, size, _PYBUF_WRITE)
    return view


class GuestState(Protocol):
    """What the binding records about one guest: set from host calls, read by the runner."""

    exit_code: int | None
    host_error: BaseException | None


class HostFunction(Protocol):
    """A preview1 function as wasi_host._functions describes it."""

    @property
    def name(self) -> str: ...

    @property
    def params(self) -> tuple[ValueKind, ...]: ...

    @property
    def results(self) -> tuple[ValueKind, ...]: ...

    @property
    def impl(self) -> Callable[..., int]: ...


class LinkError(Exception):
    """The module cannot be linked: an import we do not provide, or one with the wrong type."""


class GuestTrap(Exception):
    """The guest trapped (a wasm trap, a timeout, fuel exhausted or a failing host function).

    `str()` is wasmtime's message including the wasm backtrace; `code` names the trap kind when
    wasmtime reports one (e.g. TrapCode.INTERRUPT for an epoch deadline)."""

    def __init__(self, message: str, code: wasmtime.TrapCode | None) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Entry:
    """One host function in a binding's dispatch table."""

    name: str
    impl: Callable[..., int]


class _GuestMemory:
    """The calling instance's exported memory, found once and then re-read cheaply per call.

    A binding serves one store with one instance (one guest), so the `memory` export found on the
    first call is the right one for every later call."""

    def __init__(self) -> None:
        self._looked_up = False
        self._extern = ffi.wasmtime_extern_t()
        self._memory_address: int | None = None
        self._context: int | None = None
        self._size = -1
        self._view: memoryview | None = None

    def current(self, caller: int) -> memoryview | None:
        """The whole guest memory as a writable memoryview, valid for the current call only."""
        if not self._looked_up:
            self._look_up(caller)
        memory_address = self._memory_address
        if memory_address is None:
            return None
        context = self._context
        size = _memory_data_size(context, memory_address)
        if size != self._size:
            # Memory only moves when it grows, and growing changes its size: an unchanged size
            # means an unchanged base pointer, so the base is re-read only after a change.
            data = _memory_data(context, memory_address) or 0
            self._size = size
            self._view = _view(data, size) if data else memoryview(bytearray())
        return self._view

    def _look_up(self, caller: int) -> None:
        self._looked_up = True
        # The caller's context is its store's context (the same `StoreInner` for every call into
        # this store), so it is fetched once rather than on every call.
        self._context = _caller_context(caller)
        found = _caller_export_get(caller, _MEMORY_EXPORT, len(_MEMORY_EXPORT),
                                   ctypes.addressof(self._extern))
        if found and cast(int, self._extern.kind) == ffi.WASMTIME_EXTERN_MEMORY.value:
            self._memory_address = ctypes.addressof(self._extern.of.memory)


class HostBinding:
    """The host functions of one guest defined in one linker.

    Keeps the ctypes callbacks alive for as long as wasmtime may call them: keep this object
    alive as long as the linker and every store instantiated through it, then `close()` it."""

    def __init__(self, guest: GuestState) -> None:
        self._guest = guest
        self._entries: list[_Entry] = []
        self._callbacks: dict[tuple[tuple[ValueKind, ...], tuple[ValueKind, ...]], Any] = {}
        self._memory = _GuestMemory()
        self.defined: set[tuple[str, str]] = set()

    def define(self, linker: wasmtime.Linker, module: str, function: HostFunction) -> None:
        """Define `module::function.name` in `linker`, calling `function.impl` for this guest."""
        shape = (tuple(function.params), tuple(function.results))
        unsupported = [kind for kind in shape[0] + shape[1] if kind not in _FORMATS]
        if unsupported:
            raise ValueError(f"{function.name}: unsupported value types {unsupported}")
        callback = self._callbacks.get(shape)
        if callback is None:
            callback = self._callbacks[shape] = self._make_callback(*shape)
        index = len(self._entries)
        self._entries.append(_Entry(function.name, function.impl))
        func_type = wasmtime.FuncType([_VALUE_TYPES[kind]() for kind in shape[0]],
                                      [_VALUE_TYPES[kind]() for kind in shape[1]])
        module_bytes, name_bytes = module.encode(), function.name.encode()
        error = _define_unchecked(
            ctypes.cast(linker.ptr(), ctypes.c_void_p), module_bytes, len(module_bytes),
            name_bytes, len(name_bytes), ctypes.cast(func_type.ptr(), ctypes.c_void_p), callback,
            index, _NO_FINALIZER)
        if error:
            raise LinkError(_error_message(error))
        self.defined.add((module, function.name))

    def close(self) -> None:
        """Drop the callbacks and the dispatch table (call only after the linker and its stores
        are gone: wasmtime must never call a freed callback)."""
        self._callbacks.clear()
        self._entries.clear()

    def _make_callback(self, params: tuple[ValueKind, ...], results: tuple[ValueKind, ...]) -> Any:
        """One ctypes callback serving every host function with this signature."""
        cells = max(len(params), len(results))
        cells_size = cells * _CELL_SIZE
        unpack_arguments = struct.Struct(
            "<" + "".join(_FORMATS[kind] + f"{_CELL_SIZE - _SIZES[kind]}x" for kind in params)
            if params else "<").unpack_from
        write_result = struct.Struct("<Q").pack_into if results else None
        entries = self._entries
        guest = self._guest
        current_memory = self._memory.current
        cell_views: dict[int, memoryview] = {}

        def call(env: int | None, caller: int, cells_address: int, _count: int) -> int:
            try:
                entry = entries[env or 0]
                view = cell_views.get(cells_address)
                if view is None:
                    if len(cell_views) >= _VIEW_CACHE_LIMIT:
                        cell_views.clear()
                    view = cell_views[cells_address] = _view(cells_address, cells_size)
                arguments = unpack_arguments(view)
                try:
                    errno = entry.impl(guest, current_memory(caller), *arguments)
                except ProcExit as exit_request:
                    guest.exit_code = exit_request.code
                    return _new_trap(f"guest exited with status {exit_request.code}")
                except Exception as error:
                    mapped = errno_for_exception(error)
                    if mapped is None:
                        guest.host_error = error
                        return _new_trap(f"host function {entry.name} failed: "
                                         f"{type(error).__name__}: {error}")
                    errno = mapped
                if write_result is not None:
                    write_result(view, 0, errno & 0xFFFFFFFF)
                return 0
            except BaseException as error:  # nothing may unwind into wasmtime's frames
                guest.host_error = error
                return _new_trap(f"host call failed: {type(error).__name__}")

        return _RawCallback(call)


_FORMATS: Mapping[str, str] = {"i32": "I", "i64": "Q"}
_SIZES: Mapping[str, int] = {"i32": 4, "i64": 8}
_VALUE_TYPES: Mapping[str, Callable[[], wasmtime.ValType]] = {
    "i32": wasmtime.ValType.i32, "i64": wasmtime.ValType.i64}


def _new_trap(message: str) -> int:
    encoded = message.encode()
    trap: int = _trap_new(encoded, len(encoded))
    return trap


def _error_message(error: int) -> str:
    """Take ownership of a `wasmtime_error_t *` and return its message."""
    pointer = ctypes.cast(error, ctypes.POINTER(ffi.wasmtime_error_t))
    return str(wasmtime.WasmtimeError._from_ptr(pointer))


def bind_host_functions(linker: wasmtime.Linker, module: str, functions: Mapping[str, HostFunction],
                        guest: GuestState) -> HostBinding:
    """Define every function of `functions` as `module::name` in `linker`, for one guest."""
    binding = HostBinding(guest)
    for function in functions.values():
        binding.define(linker, module, function)
    return binding


def check_imports(module: wasmtime.Module, binding: HostBinding, *, trap_unknown: bool,
                  linker: wasmtime.Linker) -> None:
    """Refuse a module importing something the binding does not define (a one-line LinkError
    naming `module::name`), or with `trap_unknown`, define such function imports as traps."""
    for item in module.imports:
        key = (item.module, item.name or "")
        if key in binding.defined:
            continue
        if trap_unknown and isinstance(item.type, wasmtime.FuncType):
            continue
        raise LinkError(f"unknown import: `{key[0]}::{key[1]}` has not been defined")
    if trap_unknown:
        try:
            linker.define_unknown_imports_as_traps(module)
        except wasmtime.WasmtimeError as error:
            raise LinkError(_first_line(str(error))) from None


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unknown wasmtime error"


def _take_trap(trap: Any) -> GuestTrap:
    trap_object = wasmtime.Trap._from_ptr(trap)
    return GuestTrap(str(trap_object), trap_object.trap_code)


def instantiate(linker: wasmtime.Linker, store: wasmtime.Store,
                module: wasmtime.Module) -> wasmtime.Instance:
    """Instantiate `module` in `store` (raises LinkError or GuestTrap)."""
    trap = ctypes.POINTER(ffi.wasm_trap_t)()
    instance = ffi.wasmtime_instance_t()
    error = ffi.wasmtime_linker_instantiate(linker.ptr(), store._context(), module.ptr(),
                                            ctypes.byref(instance), ctypes.byref(trap))
    if error:
        message = str(wasmtime.WasmtimeError._from_ptr(error))
        raise LinkError(_first_line(message))
    if trap:
        raise _take_trap(trap)
    return wasmtime.Instance._from_raw(instance)


Scalar = int | float


def call_export(store: wasmtime.Store, func: wasmtime.Func, arguments: Sequence[Scalar]) -> list[Scalar]:
    """Call an exported function with numeric arguments; return its numeric results.

    Raises GuestTrap for a trap and ValueError for arguments or results that are not i32, i64,
    f32 or f64 (or the wrong number of arguments)."""
    func_type = func.type(store)
    params, results = func_type.params, func_type.results
    if len(arguments) != len(params):
        raise ValueError(f"expected {len(params)} argument(s), got {len(arguments)}")
    argument_cells = (ffi.wasmtime_val_t * max(len(params), 1))()
    for index, (kind, value) in enumerate(zip(params, arguments, strict=True)):
        argument_cells[index] = _to_val(kind, value)
    for kind in results:
        _kind_code(kind)
    result_cells = (ffi.wasmtime_val_t * max(len(results), 1))()
    trap = ctypes.POINTER(ffi.wasm_trap_t)()
    error = ffi.wasmtime_func_call(store._context(), ctypes.byref(func._func), argument_cells,
                                   len(params), result_cells, len(results), ctypes.byref(trap))
    if error:
        raise GuestTrap(str(wasmtime.WasmtimeError._from_ptr(error)), None)
    if trap:
        raise _take_trap(trap)
    return [_from_val(result_cells[index]) for index in range(len(results))]


def _kind_code(kind: wasmtime.ValType) -> int:
    for name, code in (("i32", ffi.WASMTIME_I32), ("i64", ffi.WASMTIME_I64),
                       ("f32", ffi.WASMTIME_F32), ("f64", ffi.WASMTIME_F64)):
        if str(kind) == name:
            return int(code.value)
    raise ValueError(f"values of type {kind} are not supported")


def _to_val(kind: wasmtime.ValType, value: Scalar) -> Any:
    code = _kind_code(kind)
    cell = ffi.wasmtime_val_t()
    cell.kind = code  # type: ignore[assignment]  # ctypes stores a plain int here
    if code == ffi.WASMTIME_I32.value:
        cell.of.i32 = ctypes.c_int32(int(value)).value
    elif code == ffi.WASMTIME_I64.value:
        cell.of.i64 = ctypes.c_int64(int(value)).value
    elif code == ffi.WASMTIME_F32.value:
        cell.of.f32 = float(value)
    else:
        cell.of.f64 = float(value)
    return cell


def _from_val(cell: Any) -> Scalar:
    kind = cell.kind
    if kind == ffi.WASMTIME_I32.value:
        return int(cell.of.i32)
    if kind == ffi.WASMTIME_I64.value:
        return int(cell.of.i64)
    if kind == ffi.WASMTIME_F32.value:
        return float(cell.of.f32)
    return float(cell.of.f64)
