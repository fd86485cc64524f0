"""The aes-xts-plain64 sector cipher, as dm-crypt and LUKS2 use it.

Theory of operation: every sector is its own XTS data unit. The tweak ("plain64" IV) is the
sector's position counted in 512-byte units, little-endian, zero-padded to 16 bytes, plus the
segment's `iv_tweak`; LUKS2 keeps counting 512-byte units even with 4096-byte sectors, so 4 KiB
sector k uses tweak 8k (see research/storage-notes.md §1.1). The 64-byte key is K1 (data) then K2
(tweak), i.e. AES-256-XTS; a 32-byte key gives AES-128-XTS (used by some keyslot areas).

Two interchangeable engines:
* `pyca`: the reference. pyca/cryptography cannot change only the tweak (`reset_nonce` is
  unsupported for XTS), so each sector costs a fresh Cipher (two key schedules), ~10-20 µs.
* `libcrypto`: ctypes into the system OpenSSL. The key is set once per context; per sector only
  the tweak is re-initialised (`EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, iv)`), ~2.5 µs.
  It is used only after a self-test on random sectors with the instance's own key agrees with
  pyca; otherwise pyca is used. `KEEPSHIM_XTS=pyca` (or `engine="pyca"`) forces the reference.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import struct
import threading
from typing import Any, Literal

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from storage.errors import SelfTestFailed

Engine = Literal["auto", "pyca", "libcrypto"]
ENGINE_ENVIRONMENT_VARIABLE = "KEEPSHIM_XTS"
_SELF_TEST_SECTORS = 4
_MAX_SECTOR_SIZE = 4096
_BUFFER_CACHE_LIMIT = 1 << 20  # runs up to this size reuse warm buffers (per cipher) ...
_BUFFER_CACHE_SIZES = 4  # ... for this many distinct sizes
_TWEAK = struct.Struct("<QQ")


class SectorCipher:
    """Encrypts and decrypts whole sectors of one XTS key.

    `iv_offset_512` is added to every tweak (the LUKS2 segment's `iv_tweak`, in 512-byte units).
    Thread-safe: one instance may serve the guest thread and a FUSE thread at once.
    """

    def __init__(self, key: bytes, sector_size: int = 4096, iv_offset_512: int = 0, *,
                 engine: Engine = "auto") -> None:
        if len(key) not in (32, 64):
            raise ValueError(f"XTS keys are 32 or 64 bytes (AES-128/256-XTS), not {len(key)}")
        half = len(key) // 2
        if key[:half] == key[half:]:
            raise ValueError("XTS key halves are identical: such a key is refused (IEEE 1619 / FIPS)")
        if sector_size < 512 or sector_size > _MAX_SECTOR_SIZE or sector_size & (sector_size - 1):
            raise ValueError(f"sector size must be a power of two in 512..4096, not {sector_size}")
        if iv_offset_512 < 0:
            raise ValueError("iv offset must not be negative")
        self._sector_size = sector_size
        self._units_per_sector = sector_size // 512
        self._iv_offset = iv_offset_512
        self._algorithm = algorithms.AES(key)
        self._fast: _LibcryptoXts | None = None
        chosen = engine
        if engine == "auto":
            chosen = "pyca" if os.environ.get(ENGINE_ENVIRONMENT_VARIABLE) == "pyca" else "libcrypto"
        if chosen == "libcrypto":
            fast = _LibcryptoXts.create(key)
            if fast is not None:
                try:
                    self._self_test(fast)
                    self._fast = fast
                except SelfTestFailed:
                    if engine == "libcrypto":
                        raise
            elif engine == "libcrypto":
                raise SelfTestFailed("the system libcrypto has no usable AES-XTS")

    @property
    def sector_size(self) -> int:
        return self._sector_size

    @property
    def engine(self) -> str:
        """"libcrypto" when the self-tested fast path is in use, else "pyca"."""
        return "libcrypto" if self._fast is not None else "pyca"

    def tweak(self, sector_number: int) -> bytes:
        """The 16-byte plain64 tweak of a sector (512-byte units, little-endian)."""
        value = sector_number * self._units_per_sector + self._iv_offset
        if sector_number < 0 or value >= 1 << 64:
            raise ValueError(f"sector number {sector_number} out of the plain64 range")
        return value.to_bytes(16, "little")

    def encrypt(self, sector_number: int, plaintext: bytes | bytearray | memoryview) -> bytes:
        """Encrypt exactly one sector."""
        return self._run(True, sector_number, plaintext, single=True)

    def decrypt(self, sector_number: int, ciphertext: bytes | bytearray | memoryview) -> bytes:
        """Decrypt exactly one sector."""
        return self._run(False, sector_number, ciphertext, single=True)

    def encrypt_run(self, first_sector: int, data: bytes | bytearray | memoryview) -> bytes:
        """Encrypt consecutive whole sectors starting at `first_sector` (one data unit each)."""
        return self._run(True, first_sector, data, single=False)

    def decrypt_run(self, first_sector: int, data: bytes | bytearray | memoryview) -> bytes:
        """Decrypt consecutive whole sectors starting at `first_sector`."""
        return self._run(False, first_sector, data, single=False)

    def encrypt_into(self, first_sector: int, data: bytes | bytearray | memoryview,
                     out: bytearray | memoryview) -> None:
        """`encrypt_run` into a caller-owned buffer of the same length (no allocation)."""
        self._into(True, first_sector, data, out)

    def decrypt_into(self, first_sector: int, data: bytes | bytearray | memoryview,
                     out: bytearray | memoryview) -> None:
        """`decrypt_run` into a caller-owned buffer of the same length."""
        self._into(False, first_sector, data, out)

    def _run(self, encrypting: bool, first_sector: int, data: bytes | bytearray | memoryview, *,
             single: bool) -> bytes:
        tweaks = self._tweaks(first_sector, data, single)
        if self._fast is not None:
            return self._fast.run(encrypting, tweaks, data, self._sector_size)
        return self._pyca_run(encrypting, tweaks, data)

    def _into(self, encrypting: bool, first_sector: int, data: bytes | bytearray | memoryview,
              out: bytearray | memoryview) -> None:
        tweaks = self._tweaks(first_sector, data, False)
        target = memoryview(out).cast("B")
        if target.readonly or target.nbytes != len(tweaks) * self._sector_size:
            raise ValueError("output buffer must be writable and as long as the input")
        if self._fast is not None:
            self._fast.run_into(encrypting, tweaks, data, target, self._sector_size)
        else:
            target[:] = self._pyca_run(encrypting, tweaks, data)

    def _tweaks(self, first_sector: int, data: bytes | bytearray | memoryview,
                single: bool) -> range:
        """The tweak of every sector in `data`, after checking lengths and the plain64 range
        (the one validation point of every public method)."""
        length = len(data) if isinstance(data, bytes) else memoryview(data).nbytes
        size = self._sector_size
        if single and length != size:
            raise ValueError(f"a sector is {size} bytes, not {length}")
        if length == 0 or length % size:
            raise ValueError(f"{length} bytes is not a whole number of {size}-byte sectors")
        units = self._units_per_sector
        start = first_sector * units + self._iv_offset
        end = start + (length // size) * units
        if first_sector < 0 or end - units >= 1 << 64:
            raise ValueError(f"sector number {first_sector} out of the plain64 range")
        return range(start, end, units)

    def _pyca_run(self, encrypting: bool, tweaks: range,
                  data: bytes | bytearray | memoryview) -> bytes:
        view = memoryview(data).cast("B")
        size = self._sector_size
        pieces = []
        for index, tweak in enumerate(tweaks):
            cipher = Cipher(self._algorithm, modes.XTS(tweak.to_bytes(16, "little")))
            context = cipher.encryptor() if encrypting else cipher.decryptor()
            pieces.append(context.update(view[index * size:(index + 1) * size]))
            context.finalize()
        return b"".join(pieces)

    def _self_test(self, fast: _LibcryptoXts) -> None:
        """The fast path must match pyca on random sectors with this very key, both ways."""
        sample = os.urandom(self._sector_size * _SELF_TEST_SECTORS)
        first = int.from_bytes(os.urandom(4), "little")
        tweaks = self._tweaks(first, sample, False)
        reference = self._pyca_run(True, tweaks, sample)
        if fast.run(True, tweaks, sample, self._sector_size) != reference:
            raise SelfTestFailed("libcrypto XTS encryption disagrees with pyca")
        if fast.run(False, tweaks, reference, self._sector_size) != sample:
            raise SelfTestFailed("libcrypto XTS decryption disagrees with pyca")

    def __repr__(self) -> str:  # never shows the key
        return f"SectorCipher(sector_size={self._sector_size}, engine={self.engine!r})"


def _pointer_argument(data: bytes | bytearray | memoryview) -> bytes | ctypes.Array[ctypes.c_char]:
    """`data` as something ctypes passes as a pointer to its first byte, without copying when
    the buffer allows it."""
    if isinstance(data, bytes):
        return data
    view = memoryview(data).cast("B")
    if view.readonly:
        return view.tobytes()
    return (ctypes.c_char * len(view)).from_buffer(view)


def _address_of(data: bytes | bytearray | memoryview) -> tuple[int, object]:
    """The address of `data`'s first byte, and the object that must stay alive while the
    address is used. bytes and writable buffers are not copied; other read-only buffers are
    copied once into bytes."""
    if not isinstance(data, bytes):
        view = memoryview(data).cast("B")
        if not view.readonly:
            anchor = ctypes.c_char.from_buffer(view)
            return ctypes.addressof(anchor), anchor
        data = view.tobytes()
    address = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
    assert address is not None
    return address, data


class _LibcryptoFunctions:
    """The handful of OpenSSL 3 EVP entry points the fast path needs, typed for ctypes."""

    def __init__(self, library: ctypes.CDLL) -> None:
        void_p = ctypes.c_void_p
        self.new_context = library.EVP_CIPHER_CTX_new
        self.new_context.restype = void_p
        self.new_context.argtypes = []
        self.free_context = library.EVP_CIPHER_CTX_free
        self.free_context.restype = None
        self.free_context.argtypes = [void_p]
        self.aes_128_xts = library.EVP_aes_128_xts
        self.aes_128_xts.restype = void_p
        self.aes_128_xts.argtypes = []
        self.aes_256_xts = library.EVP_aes_256_xts
        self.aes_256_xts.restype = void_p
        self.aes_256_xts.argtypes = []
        init_types: list[Any] = [void_p, void_p, void_p, void_p, void_p]
        update_types: list[Any] = [void_p, void_p, ctypes.POINTER(ctypes.c_int), void_p, ctypes.c_int]
        self.encrypt_init = library.EVP_EncryptInit_ex
        self.encrypt_init.restype = ctypes.c_int
        self.encrypt_init.argtypes = init_types
        self.decrypt_init = library.EVP_DecryptInit_ex
        self.decrypt_init.restype = ctypes.c_int
        self.decrypt_init.argtypes = init_types
        self.encrypt_update = library.EVP_EncryptUpdate
        self.encrypt_update.restype = ctypes.c_int
        self.encrypt_update.argtypes = update_types
        self.decrypt_update = library.EVP_DecryptUpdate
        self.decrypt_update.restype = ctypes.c_int
        self.decrypt_update.argtypes = update_types


@functools.cache
def _libcrypto_functions() -> _LibcryptoFunctions | None:
    """Load the system libcrypto once per process (an immutable handle, cached)."""
    name = ctypes.util.find_library("crypto") or "libcrypto.so.3"
    try:
        return _LibcryptoFunctions(ctypes.CDLL(name))
    except (OSError, AttributeError):
        return None


class _LibcryptoXts:
    """Two EVP contexts (encrypt, decrypt) keyed once; per sector only the tweak changes."""

    def __init__(self, functions: _LibcryptoFunctions, encrypt_context: int,
                 decrypt_context: int) -> None:
        self._functions = functions
        self._contexts = {True: encrypt_context, False: decrypt_context}
        self._iv = ctypes.create_string_buffer(16)
        self._out_length = ctypes.c_int(0)
        self._pairs: dict[int, tuple[ctypes.Array[ctypes.c_char], ctypes.Array[ctypes.c_char]]] = {}
        self._lock = threading.Lock()

    @classmethod
    def create(cls, key: bytes) -> _LibcryptoXts | None:
        functions = _libcrypto_functions()
        if functions is None:
            return None
        cipher = functions.aes_256_xts() if len(key) == 64 else functions.aes_128_xts()
        key_buffer = ctypes.create_string_buffer(key, len(key))
        contexts: list[int] = []
        try:
            for init in (functions.encrypt_init, functions.decrypt_init):
                context = functions.new_context()
                if not context:
                    return None
                contexts.append(context)
                if init(context, cipher, None, key_buffer, None) != 1:
                    return None
            return cls(functions, contexts[0], contexts[1])
        finally:
            ctypes.memset(key_buffer, 0, len(key))
            if len(contexts) < 2 or not all(contexts):
                for context in contexts:
                    functions.free_context(context)

    def run(self, encrypting: bool, tweaks: range, data: bytes | bytearray | memoryview,
            sector_size: int) -> bytes:
        """Encrypt or decrypt through warm per-instance buffers and return one new bytes object.

        Why the buffers: on these VMs fresh large buffers cost page faults, and ctypes address
        arithmetic on a bytes object (`cast`) costs more than copying 4 KiB; `.raw` of an
        exact-size buffer is the cheapest way back to bytes."""
        length = len(tweaks) * sector_size
        with self._lock:
            if len(tweaks) == 1 and isinstance(data, bytes):  # the common single-sector call
                output = self._buffers(length)[1]
                self._crypt_one(encrypting, tweaks[0], data, output, sector_size)
                return output.raw
            source, output = self._buffers(length)
            ctypes.memmove(source, _pointer_argument(data), length)
            self._crypt(encrypting, tweaks, ctypes.addressof(source), ctypes.addressof(output),
                        sector_size)
            return output.raw

    def _buffers(self, length: int) -> tuple[ctypes.Array[ctypes.c_char], ctypes.Array[ctypes.c_char]]:
        """An (input, output) pair of exactly `length` bytes, reused for small sizes."""
        pair = self._pairs.get(length)
        if pair is None:
            pair = (ctypes.create_string_buffer(length), ctypes.create_string_buffer(length))
            if length <= _BUFFER_CACHE_LIMIT:
                if len(self._pairs) >= _BUFFER_CACHE_SIZES:
                    self._pairs.clear()
                self._pairs[length] = pair
        return pair

    def _crypt_one(self, encrypting: bool, tweak: int, data: bytes,
                   output: ctypes.Array[ctypes.c_char], sector_size: int) -> None:
        functions = self._functions
        context = self._contexts[encrypting]
        _TWEAK.pack_into(self._iv, 0, tweak, 0)
        init = functions.encrypt_init if encrypting else functions.decrypt_init
        update = functions.encrypt_update if encrypting else functions.decrypt_update
        if init(context, None, None, None, self._iv) != 1:
            raise SelfTestFailed("libcrypto refused an XTS tweak")
        if update(context, output, ctypes.byref(self._out_length), data, sector_size) != 1:
            raise SelfTestFailed("libcrypto XTS update failed")

    def run_into(self, encrypting: bool, tweaks: range, data: bytes | bytearray | memoryview,
                 out: memoryview, sector_size: int) -> None:
        source_address, _source_anchor = _address_of(data)
        output_anchor = ctypes.c_char.from_buffer(out)
        with self._lock:
            self._crypt(encrypting, tweaks, source_address, ctypes.addressof(output_anchor),
                        sector_size)

    def _crypt(self, encrypting: bool, tweaks: range, source_address: int, output_address: int,
               sector_size: int) -> None:
        """The per-sector loop; the caller holds the lock and keeps both buffers alive."""
        functions = self._functions
        init = functions.encrypt_init if encrypting else functions.decrypt_init
        update = functions.encrypt_update if encrypting else functions.decrypt_update
        pack_tweak = _TWEAK.pack_into
        context = self._contexts[encrypting]
        iv = self._iv
        out_length = ctypes.byref(self._out_length)
        offset = 0
        for tweak in tweaks:
            pack_tweak(iv, 0, tweak, 0)
            if init(context, None, None, None, iv) != 1:
                raise SelfTestFailed("libcrypto refused an XTS tweak")
            if update(context, output_address + offset, out_length, source_address + offset,
                      sector_size) != 1:
                raise SelfTestFailed("libcrypto XTS update failed")
            offset += sector_size

    def __del__(self) -> None:
        for context in self._contexts.values():
            self._functions.free_context(context)
