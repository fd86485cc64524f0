"""The LUKS anti-forensic information splitter (AF), as cryptsetup's lib/luks1/af.c defines it.

A key of n bytes is expanded into `stripes` blocks of n bytes so that destroying any one stripe
on disk destroys the key: stripes 0..k-2 are random, each folded into a running block with XOR
and the "diffuse" hash, and the last stripe is the key XOR the running block. LUKS2 keyslots use
stripes=4000 and sha256. Merging reverses the fold.

diffuse(block): for each digest-sized chunk i (and a short final chunk), chunk := H(be32(i) ||
chunk) truncated to the chunk's length.
"""

from __future__ import annotations

import hashlib
import os

SUPPORTED_HASHES = frozenset({"sha1", "sha256", "sha512"})


def _diffuse(block: bytes, hash_name: str) -> bytes:
    hash_function = getattr(hashlib, hash_name)
    digest_size = hash_function().digest_size
    return b"".join(
        hash_function(index.to_bytes(4, "big") + block[start:start + digest_size]).digest()[
            :min(digest_size, len(block) - start)]
        for index, start in enumerate(range(0, len(block), digest_size)))


def _xor(left: bytes, right: bytes) -> bytes:
    return (int.from_bytes(left, "little") ^ int.from_bytes(right, "little")).to_bytes(
        len(left), "little")


def af_split(key: bytes, stripes: int, hash_name: str) -> bytes:
    """Expand `key` into `stripes * len(key)` bytes of split material."""
    if hash_name not in SUPPORTED_HASHES:
        raise ValueError(f"unsupported AF hash {hash_name!r}")
    size = len(key)
    running = bytes(size)
    material = []
    for _ in range(stripes - 1):
        stripe = os.urandom(size)
        material.append(stripe)
        running = _diffuse(_xor(running, stripe), hash_name)
    material.append(_xor(running, key))
    return b"".join(material)


def af_merge(material: bytes, key_size: int, stripes: int, hash_name: str) -> bytes:
    """Recover the key from split material (the inverse of `af_split`)."""
    if hash_name not in SUPPORTED_HASHES:
        raise ValueError(f"unsupported AF hash {hash_name!r}")
    if len(material) < key_size * stripes:
        raise ValueError("split material is shorter than key_size * stripes")
    running = bytes(key_size)
    for index in range(stripes - 1):
        stripe = material[index * key_size:(index + 1) * key_size]
        running = _diffuse(_xor(running, stripe), hash_name)
    last = material[(stripes - 1) * key_size:stripes * key_size]
    return _xor(running, last)
