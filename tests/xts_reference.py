"""An XTS decryption independent of storage.xts and pyca, for cross-checks in tests.

`openssl enc` offers no XTS, so this builds XTS-AES-256 decryption (IEEE 1619-2007 §5.4) from the
openssl command line's AES-256-ECB: T = E_K2(tweak); P_j = D_K1(C_j xor T_j) xor T_j with
T_{j+1} = T_j * x in GF(2^128) (little-endian, reduction 0x87). Whole blocks only.
"""

from __future__ import annotations

import subprocess


def _openssl_aes_256_ecb(key: bytes, data: bytes, *, decrypt: bool) -> bytes:
    command = ["openssl", "enc", "-d" if decrypt else "-e", "-aes-256-ecb", "-K", key.hex(), "-nopad"]
    return subprocess.run(command, input=data, capture_output=True, check=True).stdout


def xts_decrypt_with_openssl(key: bytes, tweak_value: int, ciphertext: bytes) -> bytes:
    """Decrypt one XTS-AES-256 data unit whose tweak is the integer `tweak_value`."""
    assert len(key) == 64 and len(ciphertext) % 16 == 0
    tweak = int.from_bytes(_openssl_aes_256_ecb(key[32:], tweak_value.to_bytes(16, "little"),
                                                decrypt=False), "little")
    masks = bytearray()
    for _ in range(len(ciphertext) // 16):
        masks += tweak.to_bytes(16, "little")
        tweak <<= 1
        if tweak >> 128:
            tweak = (tweak & ((1 << 128) - 1)) ^ 0x87
    masked = bytes(a ^ b for a, b in zip(ciphertext, masks, strict=True))
    decrypted = _openssl_aes_256_ecb(key[:32], masked, decrypt=True)
    return bytes(a ^ b for a, b in zip(decrypted, masks, strict=True))
