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

On top of `libcrypto`, the native loops of storage.native (a small C library built at install
time) run a whole run of sectors in one ctypes call: ~1 us per sector for XTS plus ~3 us when the
SHA-256 of each ciphertext sector is wanted. Used only when built and after their own self-test
with the instance's key (against pyca and hashlib) passes; `native=False` or `KEEPSHIM_NATIVE=off`
keeps the Python loops. `native` says which. Every method gives the same result either way.
Native runs of 64 sectors or more are cut in two halves done at once, the second on a helper
thread with its own copies of the keyed contexts (ctypes releases the GIL), while a CPU looks
free (load average); on a single CPU, a busy machine, or if the copies do not give the
originals' ciphertext, everything stays on the calling thread.

`encrypt_hash_into` and `verify_decrypt_into` serve the integrity layer: encryption together
with each sector's ciphertext hash (its Merkle leaf), and the check of each sector's ciphertext
against its leaf followed by decryption in place. `native_encryption` hands the self-tested
loops, the encryption context and its lock to a caller running its own native step with this
key (the integrity layer's small commits, storage._small_commit).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import os
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Literal

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from storage import native as native_loops
from storage.errors import SelfTestFailed

Engine = Literal["auto", "pyca", "libcrypto"]
ENGINE_ENVIRONMENT_VARIABLE = "KEEPSHIM_XTS"
_SELF_TEST_SECTORS = 4
_MAX_SECTOR_SIZE = 4096
DIGEST_SIZE = 32  # SHA-256, the integrity layer's leaf hash
_BUFFER_CACHE_LIMIT = 1 << 20  # runs up to this size reuse warm buffers (per cipher) ...
_BUFFER_CACHE_SIZES = 4  # ... for this many distinct sizes
_TWEAK = struct.Struct("<QQ")
# Native runs of at least this many sectors are cut in two halves done at the same time, the
# second on a helper thread with its own copies of the contexts (ctypes calls release the GIL):
# about 0.3 ms of work per half, against some 30 us for the hand-over.
_PARALLEL_SECTORS = 64


@dataclass(frozen=True)
class NativeEncryption:
    """What a caller running its own native step with a cipher's key needs (storage.integrity's
    small commits, `NativeLoops.small_commit`): the loops, the context keyed for encryption, the
    lock that must be held while the context is used, and the tweak arithmetic (sector numbers
    are the caller's, checked by it to stay in the plain64 range)."""

    loops: native_loops.NativeLoops
    context: int
    lock: threading.Lock
    units_per_sector: int
    iv_offset: int

    def tweak(self, sector_number: int) -> int:
        """The plain64 tweak of a sector, as an integer (512-byte units plus the iv offset)."""
        return sector_number * self.units_per_sector + self.iv_offset


class SectorCipher:
    """Encrypts and decrypts whole sectors of one XTS key.

    `iv_offset_512` is added to every tweak (the LUKS2 segment's `iv_tweak`, in 512-byte units).
    Thread-safe: one instance may serve the guest thread and a FUSE thread at once.
    """

    def __init__(self, key: bytes, sector_size: int = 4096, iv_offset_512: int = 0, *,
                 engine: Engine = "auto", native: bool = True) -> None:
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
        if self._fast is not None and native and not native_loops.disabled():
            self._attach_native(self._fast)

    @property
    def sector_size(self) -> int:
        return self._sector_size

    @property
    def engine(self) -> str:
        """"libcrypto" when the self-tested fast path is in use, else "pyca"."""
        return "libcrypto" if self._fast is not None else "pyca"

    @property
    def native(self) -> bool:
        """Whether the self-tested native loops (storage.native) do the per-sector work."""
        return self._fast is not None and self._fast.native is not None

    def native_encryption(self) -> NativeEncryption | None:
        """The self-tested native loops with this key's encryption context (see
        `NativeEncryption`), or None when the Python loops are in use."""
        fast = self._fast
        if fast is None or fast.native is None:
            return None
        return NativeEncryption(fast.native, fast.encryption_context, fast.lock,
                                self._units_per_sector, self._iv_offset)

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

    def encrypt_hash_into(self, first_sector: int, data: bytes | bytearray | memoryview,
                          out: bytearray | memoryview, digests: bytearray | memoryview) -> None:
        """`encrypt_into`, and the SHA-256 of each output (ciphertext) sector into `digests`,
        32 bytes per sector. `out` may be `data` itself."""
        tweaks = self._tweaks(first_sector, data, False)
        target = self._output(out, len(tweaks))
        digest_view = memoryview(digests).cast("B")
        if digest_view.readonly or digest_view.nbytes != len(tweaks) * DIGEST_SIZE:
            raise ValueError(f"digests must be a writable buffer of {DIGEST_SIZE} bytes per sector")
        if self._fast is not None and self._fast.native is not None:
            self._fast.run_into(True, tweaks, data, target, self._sector_size, digest_view)
            return
        self._crypt_into(True, tweaks, data, target)
        size = self._sector_size
        sha256 = hashlib.sha256
        for index in range(len(tweaks)):
            digest_view[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE] = \
                sha256(target[index * size:(index + 1) * size]).digest()

    def verify_decrypt_into(self, first_sector: int, data: bytearray | memoryview,
                            expected: bytes | bytearray | memoryview) -> list[int]:
        """Check each ciphertext sector of `data` against its 32 bytes of `expected` (SHA-256
        of the ciphertext) and decrypt the matching ones in place. Returns the indices of the
        sectors that did not match, ascending (they are left as they were): [] when all did."""
        view = memoryview(data).cast("B")
        if view.readonly:
            raise ValueError("verify_decrypt_into works in place: the buffer must be writable")
        tweaks = self._tweaks(first_sector, view, False)
        wanted = expected if isinstance(expected, bytes) else bytes(expected)
        if len(wanted) != len(tweaks) * DIGEST_SIZE:
            raise ValueError(f"expected digests must be {DIGEST_SIZE} bytes per sector")
        size = self._sector_size
        if self._fast is not None and self._fast.native is not None:
            return self._fast.verify_decrypt(tweaks, view, wanted, size)
        sha256 = hashlib.sha256
        digests = b"".join([sha256(view[offset:offset + size]).digest()
                            for offset in range(0, len(view), size)])
        if digests == wanted:
            self._crypt_into(False, tweaks, view, view)
            return []
        mismatches = [index for index in range(len(tweaks)) if digests[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE]
                      != wanted[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE]]
        start = 0
        for stop in [*mismatches, len(tweaks)]:  # decrypt each run of matching sectors
            if stop > start:
                part = view[start * size:stop * size]
                self._crypt_into(False, tweaks[start:stop], part, part)
            start = stop + 1
        return mismatches

    def _run(self, encrypting: bool, first_sector: int, data: bytes | bytearray | memoryview, *,
             single: bool) -> bytes:
        tweaks = self._tweaks(first_sector, data, single)
        if self._fast is not None:
            return self._fast.run(encrypting, tweaks, data, self._sector_size)
        return self._pyca_run(encrypting, tweaks, data)

    def _into(self, encrypting: bool, first_sector: int, data: bytes | bytearray | memoryview,
              out: bytearray | memoryview) -> None:
        tweaks = self._tweaks(first_sector, data, False)
        self._crypt_into(encrypting, tweaks, data, self._output(out, len(tweaks)))

    def _output(self, out: bytearray | memoryview, sectors: int) -> memoryview:
        """`out` as a byte view, after checking it is writable and `sectors` sectors long."""
        target = memoryview(out).cast("B")
        if target.readonly or target.nbytes != sectors * self._sector_size:
            raise ValueError("output buffer must be writable and as long as the input")
        return target

    def _crypt_into(self, encrypting: bool, tweaks: range, data: bytes | bytearray | memoryview,
                    target: memoryview) -> None:
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

    def _attach_native(self, fast: _LibcryptoXts) -> None:
        """Use the native loops if they are built and agree with pyca and hashlib on random
        sectors with this very key: both directions, the ciphertext hashes, and a verification
        that must decrypt exactly the sectors before a wrong hash and leave the rest alone."""
        loops = native_loops.load(fast.library)
        if loops is None:
            return
        size = self._sector_size
        sample = os.urandom(size * _SELF_TEST_SECTORS)
        tweaks = self._tweaks(int.from_bytes(os.urandom(4), "little"), sample, False)
        reference = self._pyca_run(True, tweaks, sample)
        digests = b"".join(hashlib.sha256(reference[offset:offset + size]).digest()
                           for offset in range(0, len(reference), size))
        fast.native = loops
        try:
            output = bytearray(len(sample))
            hashes = bytearray(len(digests))
            fast.run_into(True, tweaks, sample, memoryview(output), size, memoryview(hashes))
            if output != reference or hashes != digests:
                raise SelfTestFailed("native XTS encryption or SHA-256 disagrees with pyca/hashlib")
            fast.run_into(False, tweaks, reference, memoryview(output), size)
            if output != sample:
                raise SelfTestFailed("native XTS decryption disagrees with pyca")
            if (fast.run(True, tweaks[1:2], sample[size:2 * size], size) != reference[size:2 * size]
                    or fast.run(False, tweaks[1:2], reference[size:2 * size], size) != sample[size:2 * size]):
                raise SelfTestFailed("native single-sector XTS disagrees with pyca")
            wrong = 2  # a mismatch in the middle: only that sector stays ciphertext
            output[:] = reference
            broken = digests[:wrong * DIGEST_SIZE] + bytes(DIGEST_SIZE) + digests[(wrong + 1) * DIGEST_SIZE:]
            expected = bytearray(sample)
            expected[wrong * size:(wrong + 1) * size] = reference[wrong * size:(wrong + 1) * size]
            if fast.verify_decrypt(tweaks, memoryview(output), broken, size) != [wrong] or output != expected:
                raise SelfTestFailed("native verification disagrees with hashlib")
            output[:] = reference
            if fast.verify_decrypt(tweaks, memoryview(output), digests, size) != [] or output != sample:
                raise SelfTestFailed("native verification disagrees with hashlib")
        except (SelfTestFailed, ctypes.ArgumentError, TypeError):  # a wrong build fails here too
            fast.native = None

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
        self.copy_context = library.EVP_CIPHER_CTX_copy
        self.copy_context.restype = ctypes.c_int
        self.copy_context.argtypes = [void_p, void_p]
        self.library = library
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
        self.library = functions.library
        self.native: native_loops.NativeLoops | None = None  # set by SectorCipher once self-tested
        self._contexts = {True: encrypt_context, False: decrypt_context}
        self.encryption_context = encrypt_context  # for `SectorCipher.native_encryption`
        self._iv = ctypes.create_string_buffer(16)
        self._out_length = ctypes.c_int(0)
        self._pairs: dict[int, tuple[ctypes.Array[ctypes.c_char], ctypes.Array[ctypes.c_char]]] = {}
        self.lock = threading.Lock()  # held by any user of the contexts (also `NativeEncryption`)
        # the helper thread of long native runs and its copies of the two contexts (made on
        # first use; empty when copying failed or the process may use a single CPU)
        self._helper: ThreadPoolExecutor | None = None
        self._helper_contexts: dict[bool, int] = {}
        self._cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        self._parallel = self._cpus >= 2

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
        with self.lock:
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
        context = self._contexts[encrypting]
        if self.native is not None:  # one call instead of two
            self.native.crypt(context, tweak, 0, data, ctypes.addressof(output), 1, sector_size, None)
            return
        functions = self._functions
        _TWEAK.pack_into(self._iv, 0, tweak, 0)
        init = functions.encrypt_init if encrypting else functions.decrypt_init
        update = functions.encrypt_update if encrypting else functions.decrypt_update
        if init(context, None, None, None, self._iv) != 1:
            raise SelfTestFailed("libcrypto refused an XTS tweak")
        if update(context, output, ctypes.byref(self._out_length), data, sector_size) != 1:
            raise SelfTestFailed("libcrypto XTS update failed")

    def run_into(self, encrypting: bool, tweaks: range, data: bytes | bytearray | memoryview,
                 out: memoryview, sector_size: int, digests: memoryview | None = None) -> None:
        """Into `out`; with `digests` (native loops only), each output sector's SHA-256 too.
        The caller checked every length."""
        source_address, _source_anchor = _address_of(data)
        output_anchor = ctypes.c_char.from_buffer(out)
        output_address = ctypes.addressof(output_anchor)
        with self.lock:
            if digests is None:
                self._crypt(encrypting, tweaks, source_address, output_address, sector_size)
                return
            if self.native is None:
                raise AssertionError("digests need the native loops")
            digests_anchor = ctypes.c_char.from_buffer(digests)
            self._native_crypt(encrypting, tweaks, source_address, output_address, sector_size,
                               ctypes.addressof(digests_anchor))

    def _native_crypt(self, encrypting: bool, tweaks: range, source_address: int,
                      output_address: int, sector_size: int, digests_address: int | None) -> None:
        """The native loop over the run (split in two halves when long); the caller holds the
        lock and keeps the buffers alive."""
        native = self.native
        assert native is not None
        step = tweaks.step

        def work(start: int, stop: int, contexts: dict[bool, int]) -> int:
            native.crypt(contexts[encrypting], tweaks.start + start * step, step,
                         source_address + start * sector_size, output_address + start * sector_size,
                         stop - start, sector_size,
                         None if digests_address is None else digests_address + start * DIGEST_SIZE)
            return 0
        self._split(len(tweaks), work)

    def _split(self, count: int, work: Callable[[int, int, dict[bool, int]], int]) -> int:
        """`work(start, stop, contexts)` over sectors [0, count), returning the sum of what it
        returns: in one piece on this thread, or for long runs the second half on the helper
        thread (with the helper's contexts) at the same time. The caller holds the lock.

        Only while a CPU looks free (1-minute load average below the CPUs minus one half):
        on a busy machine the halves only take turns, and the hand-over is pure loss
        (measured on 2 shared CPUs at load 4: 10% slower)."""
        if (count < _PARALLEL_SECTORS or os.getloadavg()[0] > self._cpus - 0.5
                or not self._helper_ready()):
            return work(0, count, self._contexts)
        assert self._helper is not None
        half = count // 2
        future = self._helper.submit(work, half, count, self._helper_contexts)
        try:
            result = work(0, half, self._contexts)
        finally:
            wait([future])  # the buffers must outlive the helper's use of them, even on errors
        return result + future.result()

    def _helper_ready(self) -> bool:
        """Whether long runs can be split: a second CPU, and the helper's copies of the contexts
        made (once) and checked to give the same ciphertext as the originals."""
        if self._helper is not None:
            return True
        if not self._parallel or self.native is None:
            return False
        self._parallel = False  # one attempt only
        functions = self._functions
        copies: dict[bool, int] = {}
        for encrypting, context in self._contexts.items():
            copy = functions.new_context()
            if not copy:
                break
            copies[encrypting] = copy
            if functions.copy_context(copy, context) != 1:
                break
        else:
            sample = os.urandom(4096)
            results = []
            for contexts in (self._contexts, copies):
                output = ctypes.create_string_buffer(4096)
                back = ctypes.create_string_buffer(4096)
                self.native.crypt(contexts[True], 8, 8, _address_of(sample)[0], ctypes.addressof(output), 1, 4096, None)
                self.native.crypt(contexts[False], 8, 8, ctypes.addressof(output), ctypes.addressof(back), 1, 4096, None)
                results.append((output.raw, back.raw))
            if results[0] == results[1] and results[0][1] == sample:
                self._helper_contexts = copies
                self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keepshim-xts")
                return True
        for copy in copies.values():
            functions.free_context(copy)
        return False

    def verify_decrypt(self, tweaks: range, data: memoryview, expected: bytes,
                       sector_size: int) -> list[int]:
        """The native `verify_decrypt_into` (the caller checked every length)."""
        if self.native is None:
            raise AssertionError("verification runs in the native loops only")
        native = self.native
        data_anchor = ctypes.c_char.from_buffer(data)
        data_address = ctypes.addressof(data_anchor)
        expected_address = _address_of(expected)[0]  # `expected` is bytes: no copy, kept alive
        flags = ctypes.create_string_buffer(len(tweaks))
        flags_address = ctypes.addressof(flags)
        step = tweaks.step

        def work(start: int, stop: int, contexts: dict[bool, int]) -> int:
            return native.verify_decrypt(contexts[False], tweaks.start + start * step, step,
                                         data_address + start * sector_size, stop - start, sector_size,
                                         expected_address + start * DIGEST_SIZE, flags_address + start)
        with self.lock:
            mismatching = self._split(len(tweaks), work)
        if not mismatching:
            return []
        return [index for index, flag in enumerate(flags.raw) if flag]

    def _crypt(self, encrypting: bool, tweaks: range, source_address: int, output_address: int,
               sector_size: int) -> None:
        """The per-sector loop; the caller holds the lock and keeps both buffers alive."""
        if self.native is not None:
            self._native_crypt(encrypting, tweaks, source_address, output_address, sector_size, None)
            return
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
        if self._helper is not None:
            self._helper.shutdown(wait=False)  # idle: it only works while a caller holds the lock
        for context in [*self._contexts.values(), *self._helper_contexts.values()]:
            self._functions.free_context(context)
