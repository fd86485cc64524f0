"""The optional native sector loops (storage/_native.c): build, load, call.

Why: storage.xts's libcrypto fast path pays about 2 us of ctypes argument conversion per OpenSSL
call, two calls per sector, plus a hashlib call per sector in the integrity layer; AES-XTS and
SHA-256 of a 4 KiB sector cost about 1 us and 3 us. The C file loops over a run of sectors in ONE
ctypes call (which also releases the GIL for the whole run). It contains no cryptography: it
calls OpenSSL entry points (EVP_CipherInit_ex / EVP_CipherUpdate / EVP_Digest with a fetched
SHA-256) whose addresses this module takes from the libcrypto that storage.xts already loaded,
so the library needs no headers, no libc and no linking.

Build: ``python -m storage.native build`` (scripts/install.sh runs it after ``pip install -e``)
compiles the source with zig from PyPI (``python -m ziglang cc``, freestanding, ``-z defs`` so any
undefined symbol fails the build) to ``storage/_native-<digest>.so`` next to this file (ignored by
git). <digest> covers the C source and the compiler flags, so an edited source is never paired
with a stale library: it simply is not found until rebuilt.

Use: storage.xts calls `load()`; `None` (no library, ``KEEPSHIM_NATIVE=off``, wrong ABI
version, missing symbols) means the Python loops of storage.xts are used, with identical
results. Even a loaded library is used by a SectorCipher only after its start-up self-test with
the cipher's own key agrees with pyca/cryptography and hashlib (see `SectorCipher._self_test`).
``python -m storage.native check`` says whether the library is built, loads and passes that test.

The functions here take raw addresses: their callers (storage.xts) check every length and the
tweak range before calling; see the contract at the top of the C file. `ks_small_commit` (one
small commit of the integrity layer: XTS, SHA-256 and HMAC-SHA256 through EVP_MAC, in the order
of the Python steps) is driven by storage._small_commit, which checks its own contract.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import hmac
import os
import sys
from collections.abc import Callable
from pathlib import Path

from storage.errors import SelfTestFailed

ABI_VERSION = 7  # ks_abi_version() of the C file this module was written for
DISABLE_ENVIRONMENT_VARIABLE = "KEEPSHIM_NATIVE"  # "off" (or "0") keeps the Python loops
SOURCE = Path(__file__).with_name("_native.c")
# Native OS and architecture, baseline CPU (the loops gain nothing from newer instructions and the
# library must not die of SIGILL on an older machine); freestanding; warnings are errors.
BUILD_FLAGS = ("-shared", "-fPIC", "-O2", "-mcpu=baseline", "-nostdlib", "-ffreestanding",
               "-fno-builtin", "-fno-stack-protector", "-fno-sanitize=all", "-Wall", "-Wextra",
               "-Werror", "-Wl,-z,defs", "-s")


def library_path(directory: Path | None = None) -> Path:
    """Where `build` writes the library for the current source and flags (by default next to
    this file, where `load` looks)."""
    digest = hashlib.sha256(SOURCE.read_bytes() + "\0".join(BUILD_FLAGS).encode()).hexdigest()
    return (directory or SOURCE.parent) / f"_native-{digest[:16]}.so"


def disabled() -> bool:
    """Whether the environment asks for the Python loops (read at each SectorCipher's creation,
    so a test or a benchmark can compare both paths in one process)."""
    return os.environ.get(DISABLE_ENVIRONMENT_VARIABLE, "").lower() in ("off", "0", "no")


def build(directory: Path | None = None) -> Path:
    """Compile the C source with zig into `library_path(directory)` (atomically: written under
    a temporary name, then renamed) and delete the libraries of earlier sources there. Raises
    RuntimeError with the compiler's output.

    The compiler runs through shim.wasm_compile.zig_cc, the project's one zig invocation,
    imported here only: building is an install step, and loading never needs shim."""
    from shim.wasm_compile import CompileError, zig_cc

    output = library_path(directory)
    try:
        zig_cc(SOURCE, output, BUILD_FLAGS)
    except CompileError as error:
        raise RuntimeError(str(error)) from None
    for stale in output.parent.glob("_native-*.so"):  # libraries of earlier sources
        if stale != output:
            stale.unlink(missing_ok=True)
    return output


class _OpenSsl(ctypes.Structure):
    """`struct ks_openssl` of the C file: the OpenSSL entry points the loops call."""

    _fields_ = [("cipher_init", ctypes.c_void_p), ("cipher_update", ctypes.c_void_p),
                ("digest", ctypes.c_void_p), ("sha256", ctypes.c_void_p), ("mac_init", ctypes.c_void_p),
                ("mac_update", ctypes.c_void_p), ("mac_final", ctypes.c_void_p)]


class _OsslParam(ctypes.Structure):
    """OpenSSL 3's OSSL_PARAM (<openssl/core.h>): one named parameter of a fetch or init."""

    _fields_ = [("key", ctypes.c_char_p), ("data_type", ctypes.c_uint), ("data", ctypes.c_void_p),
                ("data_size", ctypes.c_size_t), ("return_size", ctypes.c_size_t)]


_OSSL_PARAM_UTF8_STRING = 4
_OSSL_PARAM_UNMODIFIED = ctypes.c_size_t(-1).value


class HmacContext:
    """An EVP_MAC_CTX for HMAC-SHA256 keyed once (OpenSSL keeps the key's inner and outer
    states; EVP_MAC_init with no key restarts from them): the small commit's two MACs without
    a key schedule and a fetch each. Freed (and cleansed by OpenSSL) with this object."""

    def __init__(self, libcrypto: ctypes.CDLL, key: bytes) -> None:
        pointer = ctypes.c_void_p
        self._free_mac = libcrypto.EVP_MAC_free
        self._free_mac.argtypes = [pointer]
        self._free_context = libcrypto.EVP_MAC_CTX_free
        self._free_context.argtypes = [pointer]
        fetch = libcrypto.EVP_MAC_fetch
        fetch.restype = pointer
        fetch.argtypes = [pointer, ctypes.c_char_p, ctypes.c_char_p]
        new = libcrypto.EVP_MAC_CTX_new
        new.restype = pointer
        new.argtypes = [pointer]
        init = libcrypto.EVP_MAC_init
        init.restype = ctypes.c_int
        init.argtypes = [pointer, ctypes.c_char_p, ctypes.c_size_t, pointer]
        self._update = libcrypto.EVP_MAC_update
        self._update.restype = ctypes.c_int
        self._update.argtypes = [pointer, ctypes.c_char_p, ctypes.c_size_t]
        self._final = libcrypto.EVP_MAC_final
        self._final.restype = ctypes.c_int
        self._final.argtypes = [pointer, pointer, ctypes.POINTER(ctypes.c_size_t), ctypes.c_size_t]
        self._init = init
        self._mac: int | None = fetch(None, b"HMAC", None)
        self.address: int | None = new(self._mac) if self._mac else None
        digest = ctypes.create_string_buffer(b"SHA256")
        params = (_OsslParam * 2)(_OsslParam(b"digest", _OSSL_PARAM_UTF8_STRING, ctypes.addressof(digest), 6,
                                             _OSSL_PARAM_UNMODIFIED))
        if not self.address or init(self.address, key, len(key), params) != 1:
            self.close()
            raise SelfTestFailed("libcrypto has no usable HMAC-SHA256 (EVP_MAC)")

    def digest(self, data: bytes) -> bytes:
        """HMAC of `data` through the context, as the C code uses it (restart, update, final)."""
        out = ctypes.create_string_buffer(32)
        length = ctypes.c_size_t(0)
        if (self.address is None or self._init(self.address, None, 0, None) != 1
                or self._update(self.address, data, len(data)) != 1
                or self._final(self.address, out, ctypes.byref(length), 32) != 1 or length.value != 32):
            raise SelfTestFailed("libcrypto HMAC-SHA256 (EVP_MAC) failed")
        return out.raw

    def close(self) -> None:
        """Free the context (OpenSSL cleanses the key material). Idempotent."""
        if self.address is not None:
            self._free_context(self.address)
            self.address = None
        if self._mac is not None:
            self._free_mac(self._mac)
            self._mac = None

    def __del__(self) -> None:
        self.close()


SMALL_COMMIT_SECTORS = 4  # SMALL_SECTORS of the C file: the most data sectors of one small commit
SMALL_COMMIT_LEVELS = 12  # MAX_LEVELS of the C file: the deepest tree (16**11 sectors) it handles


class SmallCommit(ctypes.Structure):
    """`struct ks_small_commit` of the C file: one small commit of storage.integrity, whose
    caller fills every field (see the contract there); `NativeLoops.small_commit` runs it."""

    _fields_ = [("context", ctypes.c_void_p), ("mac_context", ctypes.c_void_p),
                ("record", ctypes.c_void_p), ("count", ctypes.c_uint64),
                ("sectors", ctypes.c_uint64 * SMALL_COMMIT_SECTORS),
                ("data_tweak", ctypes.c_uint64), ("tweak_step", ctypes.c_uint64),
                ("header_tweak", ctypes.c_uint64),
                ("entries_at", ctypes.c_uint64), ("entry_size", ctypes.c_uint64),
                ("root_at", ctypes.c_uint64), ("root_mac_at", ctypes.c_uint64), ("root_mac", ctypes.c_void_p),
                ("state", ctypes.c_void_p), ("state_length", ctypes.c_uint64),
                ("metadata_at", ctypes.c_uint64), ("metadata_length", ctypes.c_uint64),
                ("metadata_digest_at", ctypes.c_uint64),
                ("mac_label", ctypes.c_void_p), ("mac_label_length", ctypes.c_uint64),
                ("depth", ctypes.c_uint64), ("levels", ctypes.c_void_p * SMALL_COMMIT_LEVELS),
                ("level_lengths", ctypes.c_uint64 * SMALL_COMMIT_LEVELS),
                ("sector_size", ctypes.c_uint64), ("node_size", ctypes.c_uint64),
                ("mac_length", ctypes.c_uint64)]


class NativeLoops:
    """The loaded library bound to one libcrypto. Stateless and thread-safe (each call gets
    its own cipher context from the caller); calls run without the GIL."""

    def __init__(self, library: ctypes.CDLL, openssl: _OpenSsl, libcrypto: ctypes.CDLL) -> None:
        self._library = library  # keeps the mapping alive as long as the bound functions
        self._libcrypto = libcrypto
        self._openssl = openssl
        self._openssl_pointer = ctypes.byref(openssl)
        u64, size, pointer = ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p
        self._crypt = library.ks_xts_crypt
        self._crypt.restype = ctypes.c_int
        self._crypt.argtypes = [pointer, pointer, u64, u64, pointer, pointer, size, ctypes.c_int, pointer]
        self._verify = library.ks_xts_verify_decrypt
        self._verify.restype = ctypes.c_longlong
        self._verify.argtypes = [pointer, pointer, u64, u64, pointer, size, ctypes.c_int, pointer, pointer]
        self._small_commit = library.ks_small_commit
        self._small_commit.restype = ctypes.c_int
        self._small_commit.argtypes = [pointer, ctypes.POINTER(SmallCommit)]
        self._hash_nodes = library.ks_hash_nodes
        self._hash_nodes.restype = ctypes.c_int
        self._hash_nodes.argtypes = [pointer, pointer, u64, u64, pointer]

    def hash_nodes(self, level: bytearray, node_size: int) -> bytearray:
        """The SHA-256 of each `node_size`-byte node of `level` (the last one, when short,
        zero-padded): the level above it in the integrity layer's tree, in one call."""
        if not level or not 0 < node_size <= 4096:
            raise ValueError("hash_nodes: empty level or node size out of range")
        out = bytearray(-(-len(level) // node_size) * 32)
        source = (ctypes.c_char * len(level)).from_buffer(level)  # TypeError for read-only memory
        target = (ctypes.c_char * len(out)).from_buffer(out)
        try:
            if self._hash_nodes(self._openssl_pointer, ctypes.addressof(source), len(level), node_size,
                                ctypes.addressof(target)) != 0:
                raise SelfTestFailed("libcrypto SHA-256 failed in the native loop")
        finally:
            del source, target  # the exports end: `level` may be resized again
        return out

    def crypt(self, context: int, first_tweak: int, tweak_step: int, source: int | bytes,
              target: int, count: int, sector_size: int, digests: int | None) -> None:
        """`count` sectors from `source` (an address, or bytes) to address `target` through
        `context` (keyed for one direction); with `digests`, the SHA-256 of each output sector
        there (32 bytes each)."""
        if self._crypt(self._openssl_pointer, context, first_tweak, tweak_step, source, target,
                       count, sector_size, digests) != 0:
            raise SelfTestFailed("libcrypto XTS failed in the native loop")

    def verify_decrypt(self, context: int, first_tweak: int, tweak_step: int, data: int,
                       count: int, sector_size: int, expected: int, mismatches: int) -> int:
        """Check each sector's SHA-256 against `expected`; decrypt the matching ones in place
        and flag the others with a 1 byte in `mismatches` (one byte per sector). Returns how
        many did not match."""
        mismatching = int(self._verify(self._openssl_pointer, context, first_tweak, tweak_step,
                                       data, count, sector_size, expected, mismatches))
        if mismatching < 0 or mismatching > count:
            raise SelfTestFailed("libcrypto XTS or SHA-256 failed in the native loop")
        return mismatching

    def hmac_context(self, key: bytes) -> HmacContext:
        """An HMAC-SHA256 context keyed with `key`, checked once against Python's hmac (for
        `SmallCommit.mac_context`); SelfTestFailed when libcrypto cannot make one that agrees."""
        context = HmacContext(self._libcrypto, key)
        sample = os.urandom(100)
        if context.digest(sample) != hmac.digest(key, sample, "sha256") \
                or context.digest(sample) != hmac.digest(key, sample, "sha256"):  # restarts with the key
            context.close()
            raise SelfTestFailed("libcrypto HMAC-SHA256 (EVP_MAC) disagrees with hmac")
        return context

    def small_commit_call(self, commit: SmallCommit) -> Callable[[], None]:
        """A function of no arguments that runs one small commit (`ks_small_commit`) as
        `commit` describes it at the time of the call, its ctypes arguments prepared once (the
        caller runs the same structure commit after commit). Every address and offset in
        `commit` is the caller's responsibility, as is holding the lock of its cipher context."""
        function, openssl, pointer = self._small_commit, self._openssl_pointer, ctypes.pointer(commit)

        def call() -> None:
            if function(openssl, pointer) != 0:
                raise SelfTestFailed("libcrypto XTS, SHA-256 or HMAC failed in the native small commit")
        return call


def _function_address(library: ctypes.CDLL, name: str) -> int:
    address = ctypes.cast(getattr(library, name), ctypes.c_void_p).value
    if not address:
        raise AttributeError(name)
    return address


@functools.cache
def load(libcrypto: ctypes.CDLL) -> NativeLoops | None:
    """The native loops bound to `libcrypto`, or None when the library is not built (or is
    from another ABI version, or libcrypto lacks an entry point). Cached per process: the
    handles are immutable."""
    path = library_path()
    if not path.is_file():
        return None
    try:
        library = ctypes.CDLL(str(path))
        version = library.ks_abi_version
        version.restype = ctypes.c_int
        version.argtypes = []
        if version() != ABI_VERSION:
            return None
        fetch = libcrypto.EVP_MD_fetch
        fetch.restype = ctypes.c_void_p
        fetch.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        sha256 = fetch(None, b"SHA256", None)  # lives as long as the process
        if not sha256:
            return None
        openssl = _OpenSsl(_function_address(libcrypto, "EVP_CipherInit_ex"),
                           _function_address(libcrypto, "EVP_CipherUpdate"),
                           _function_address(libcrypto, "EVP_Digest"), sha256,
                           _function_address(libcrypto, "EVP_MAC_init"),
                           _function_address(libcrypto, "EVP_MAC_update"),
                           _function_address(libcrypto, "EVP_MAC_final"))
        return NativeLoops(library, openssl, libcrypto)
    except (OSError, AttributeError):
        return None


def main(arguments: list[str]) -> int:
    """``python -m storage.native build|check``."""
    if arguments == ["build"]:
        try:
            print(f"built {build()}")
        except RuntimeError as error:
            print(f"storage.native: {error}", file=sys.stderr)
            return 1
        return 0
    if arguments == ["check"]:
        from storage.xts import SectorCipher  # the self-test lives with the cipher

        path = library_path()
        native = SectorCipher(os.urandom(64)).native
        print(f"{path}: {'built' if path.is_file() else 'not built'}; "
              f"{'loaded and self-tested: in use' if native else 'not in use'}")
        return 0 if native else 1
    print("usage: python -m storage.native build|check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
