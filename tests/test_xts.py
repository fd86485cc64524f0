"""storage.xts: IEEE 1619 known answers, the LUKS2 tweak convention, and fast path == pyca.

Known-answer vectors: IEEE Std 1619-2007 Annex B, vectors 4 (XTS-AES-128) and 10 (XTS-AES-256),
each a 512-byte data unit of the bytes 00..ff twice. The hex text was taken from the copy carried
in the CryptX Perl distribution's XTS test (t/mode_xts.t, which states it cross-checked them
against OpenSSL); the same vectors appear in the Linux kernel's crypto/testmgr.h
(aes_xts_tv_template).
"""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st
from xts_reference import xts_decrypt_with_openssl

from storage.xts import SectorCipher

IEEE_PLAINTEXT = bytes(range(256)) * 2

IEEE_VECTOR_4_KEY = bytes.fromhex(
    "2718281828459045235360287471352631415926535897932384626433832795"
)
IEEE_VECTOR_4_CIPHERTEXT = bytes.fromhex(
    "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c"
    "c78cf7f5e543445f8333d8fa7f56000005279fa5d8b5e4ad40e736ddb4d35412"
    "328063fd2aab53e5ea1e0a9f332500a5df9487d07a5c92cc512c8866c7e860ce"
    "93fdf166a24912b422976146ae20ce846bb7dc9ba94a767aaef20c0d61ad0265"
    "5ea92dc4c4e41a8952c651d33174be51a10c421110e6d81588ede82103a252d8"
    "a750e8768defffed9122810aaeb99f9172af82b604dc4b8e51bcb08235a6f434"
    "1332e4ca60482a4ba1a03b3e65008fc5da76b70bf1690db4eae29c5f1badd03c"
    "5ccf2a55d705ddcd86d449511ceb7ec30bf12b1fa35b913f9f747a8afd1b130e"
    "94bff94effd01a91735ca1726acd0b197c4e5b03393697e126826fb6bbde8ecc"
    "1e08298516e2c9ed03ff3c1b7860f6de76d4cecd94c8119855ef5297ca67e9f3"
    "e7ff72b1e99785ca0a7e7720c5b36dc6d72cac9574c8cbbc2f801e23e56fd344"
    "b07f22154beba0f08ce8891e643ed995c94d9a69c9f1b5f499027a78572aeebd"
    "74d20cc39881c213ee770b1010e4bea718846977ae119f7a023ab58cca0ad752"
    "afe656bb3c17256a9f6e9bf19fdd5a38fc82bbe872c5539edb609ef4f79c203e"
    "bb140f2e583cb2ad15b4aa5b655016a8449277dbd477ef2c8d6c017db738b18d"
    "eb4a427d1923ce3ff262735779a418f20a282df920147beabe421ee5319d0568"
)
IEEE_VECTOR_10_KEY = bytes.fromhex(
    "2718281828459045235360287471352662497757247093699959574966967627"
    "3141592653589793238462643383279502884197169399375105820974944592"
)
IEEE_VECTOR_10_CIPHERTEXT = bytes.fromhex(
    "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b"
    "5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd"
    "5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0"
    "c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca"
    "2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0"
    "b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f"
    "93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec"
    "583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a"
    "84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1"
    "505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae"
    "9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29"
    "a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac"
    "6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f"
    "645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385"
    "1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa"
    "773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151"
)

ENGINES = ["pyca", "libcrypto"]


@pytest.mark.parametrize("engine", ENGINES)
def test_ieee_1619_vector_10_xts_aes_256(engine: str) -> None:
    cipher = SectorCipher(IEEE_VECTOR_10_KEY, sector_size=512, engine=engine)  # type: ignore[arg-type]
    assert cipher.engine == engine
    # data unit sequence number 0xff: with 512-byte sectors the tweak is the sector number
    assert cipher.encrypt(0xFF, IEEE_PLAINTEXT) == IEEE_VECTOR_10_CIPHERTEXT
    assert cipher.decrypt(0xFF, IEEE_VECTOR_10_CIPHERTEXT) == IEEE_PLAINTEXT


@pytest.mark.parametrize("engine", ENGINES)
def test_ieee_1619_vector_4_xts_aes_128(engine: str) -> None:
    cipher = SectorCipher(IEEE_VECTOR_4_KEY, sector_size=512, engine=engine)  # type: ignore[arg-type]
    assert cipher.encrypt(0, IEEE_PLAINTEXT) == IEEE_VECTOR_4_CIPHERTEXT
    assert cipher.decrypt_run(0, IEEE_VECTOR_4_CIPHERTEXT) == IEEE_PLAINTEXT


def test_large_sectors_count_the_tweak_in_512_byte_units() -> None:
    key = os.urandom(64)
    cipher = SectorCipher(key, sector_size=4096, iv_offset_512=3, engine="pyca")
    plaintext = os.urandom(4096)
    tweak = (5 * 8 + 3).to_bytes(16, "little")
    encryptor = Cipher(algorithms.AES(key), modes.XTS(tweak)).encryptor()
    assert cipher.encrypt(5, plaintext) == encryptor.update(plaintext) + encryptor.finalize()
    assert cipher.tweak(5) == tweak


def test_a_run_is_one_data_unit_per_sector() -> None:
    cipher = SectorCipher(os.urandom(64))
    data = os.urandom(4096 * 3)
    run = cipher.encrypt_run(7, data)
    assert run == b"".join(cipher.encrypt(7 + index, data[index * 4096:(index + 1) * 4096])
                           for index in range(3))
    same = bytes(4096) * 2
    first, second = cipher.encrypt_run(0, same)[:4096], cipher.encrypt_run(0, same)[4096:]
    assert first != second  # equal plaintext in different sectors: different ciphertext


@settings(max_examples=60, deadline=None)
@given(key=st.binary(min_size=64, max_size=64).filter(lambda k: k[:32] != k[32:]),
       first=st.integers(min_value=0, max_value=(1 << 61) - 64),
       sectors=st.integers(min_value=1, max_value=9),
       seed=st.binary(min_size=16, max_size=16))
def test_fast_path_equals_pyca_on_random_data(key: bytes, first: int, sectors: int,
                                             seed: bytes) -> None:
    data = (seed * 256) * sectors
    reference = SectorCipher(key, engine="pyca")
    fast = SectorCipher(key, engine="libcrypto")
    ciphertext = reference.encrypt_run(first, data)
    assert fast.encrypt_run(first, data) == ciphertext
    assert fast.encrypt_run(first, bytearray(data)) == ciphertext
    assert fast.decrypt_run(first, ciphertext) == data
    assert fast.decrypt_run(first, memoryview(ciphertext)) == data
    assert fast.decrypt_run(first, memoryview(bytearray(ciphertext))) == data
    assert fast.encrypt(first, data[:4096]) == ciphertext[:4096]
    out = bytearray(len(data))
    fast.decrypt_into(first, memoryview(ciphertext), out)
    assert out == data
    reference.encrypt_into(first, bytearray(data), out)
    assert out == ciphertext


def test_identical_key_halves_are_refused() -> None:
    with pytest.raises(ValueError, match="identical"):
        SectorCipher(b"k" * 64)


@pytest.mark.parametrize("length", [0, 100, 4095, 4097])
def test_partial_sectors_are_refused(length: int) -> None:
    cipher = SectorCipher(os.urandom(64))
    with pytest.raises(ValueError):
        cipher.encrypt_run(0, bytes(length))


def test_environment_variable_forces_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEPSHIM_XTS", "pyca")
    assert SectorCipher(os.urandom(64)).engine == "pyca"
    monkeypatch.delenv("KEEPSHIM_XTS")
    assert SectorCipher(os.urandom(64)).engine == "libcrypto"


def test_repr_never_shows_the_key() -> None:
    key = os.urandom(64)
    assert key.hex() not in repr(SectorCipher(key)) and "key" not in repr(SectorCipher(key))


def test_openssl_aes_decrypts_one_sector_with_the_luks2_tweak() -> None:
    """An independent implementation (XTS built from the openssl CLI's AES) agrees, with the
    LUKS2 tweak 8 * sector for 4096-byte sectors."""
    key = os.urandom(64)
    cipher = SectorCipher(key, sector_size=4096)
    plaintext = os.urandom(4096)
    ciphertext = cipher.encrypt(9, plaintext)
    assert xts_decrypt_with_openssl(key, 9 * 8, ciphertext) == plaintext


def test_sector_numbers_outside_plain64_are_refused() -> None:
    cipher = SectorCipher(os.urandom(64), sector_size=4096)
    last = ((1 << 64) - 8) // 8  # the last 4 KiB sector whose tweak fits 64 bits
    assert len(cipher.encrypt(last, bytes(4096))) == 4096
    with pytest.raises(ValueError, match="plain64"):
        cipher.encrypt(last + 1, bytes(4096))
    with pytest.raises(ValueError, match="plain64"):
        cipher.encrypt_run(last, bytes(8192))  # the run's second sector overflows
    with pytest.raises(ValueError, match="plain64"):
        cipher.decrypt(-1, bytes(4096))
