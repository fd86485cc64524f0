/* keepshim's native sector loops: the per-sector loops of storage/xts.py, one call per run.
 *
 * Why: through ctypes every OpenSSL call costs about 2 us of argument conversion, more than the
 * AES-XTS work on a 4 KiB sector (about 1 us); a run of sectors handled in ONE call costs that
 * once. This file holds NO cryptography of its own: it only loops over sectors calling OpenSSL
 * entry points that the caller (storage/native.py) looked up in the already-loaded libcrypto and
 * passes in as function pointers. So it needs no headers, no libc and no linking: it is built
 * freestanding (`-nostdlib`, `-z defs`: any undefined symbol is a build error).
 *
 * Contract (checked by the Python caller before every call, see storage/native.py):
 * - `context` is an EVP_CIPHER_CTX keyed for AES-XTS in one direction, used by one thread at a
 *   time; EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, -1) changes only the tweak and keeps the
 *   direction;
 * - buffers hold `count` * `sector_size` bytes, `digests`/`expected` hold `count` * 32 bytes,
 *   `mismatches` holds `count` bytes,
 *   0 < sector_size <= 4096 and a multiple of 16;
 * - the tweak of sector i is first_tweak + i * tweak_step, with no 64-bit overflow; it is the
 *   plain64 IV: little-endian in the first 8 bytes of the 16-byte IV, zeros after.
 * Nothing here allocates, keeps state between calls or touches memory outside those buffers.
 */

typedef __SIZE_TYPE__ size_t;
typedef unsigned long long u64;
typedef unsigned char u8;

#define DIGEST_SIZE 32

/* The OpenSSL 3 entry points, in the order of the ctypes Structure in storage/native.py. */
struct ks_openssl {
    /* EVP_CipherInit_ex(ctx, cipher, engine, key, iv, enc) */
    int (*cipher_init)(void *, const void *, void *, const u8 *, const u8 *, int);
    /* EVP_CipherUpdate(ctx, out, &out_length, in, in_length) */
    int (*cipher_update)(void *, u8 *, int *, const u8 *, int);
    /* EVP_Digest(data, length, md, &md_length, type, engine) */
    int (*digest)(const void *, size_t, u8 *, unsigned int *, const void *, void *);
    /* EVP_MD_fetch(NULL, "SHA256", NULL), fetched once */
    const void *sha256;
};

int ks_abi_version(void) { return 2; }

static int crypt_sector(const struct ks_openssl *f, void *context, u64 tweak, const u8 *in,
                        u8 *out, int sector_size) {
    u8 iv[16];
    int out_length = 0;
    for (int i = 0; i < 8; i++) {
        iv[i] = (u8)(tweak >> (8 * i));
        iv[8 + i] = 0;
    }
    if (f->cipher_init(context, 0, 0, 0, iv, -1) != 1) return -1;
    if (f->cipher_update(context, out, &out_length, in, sector_size) != 1) return -1;
    return out_length == sector_size ? 0 : -1;
}

static int sha256(const struct ks_openssl *f, const u8 *data, int length, u8 *digest) {
    unsigned int digest_length = 0;
    if (f->digest(data, (size_t)length, digest, &digest_length, f->sha256, 0) != 1) return -1;
    return digest_length == DIGEST_SIZE ? 0 : -1;
}

/* Encrypt (or decrypt, as `context` was keyed) `count` sectors from `in` to `out` (which may be
 * the same buffer). When `digests` is not NULL, also store the SHA-256 of each output sector
 * (for encryption: the ciphertext, i.e. the Merkle leaf) at digests + 32 * i.
 * Returns 0, or -1 when an OpenSSL call failed (the output is then undefined). */
int ks_xts_crypt(const struct ks_openssl *f, void *context, u64 first_tweak, u64 tweak_step,
                 const u8 *in, u8 *out, size_t count, int sector_size, u8 *digests) {
    u64 tweak = first_tweak;
    for (size_t i = 0; i < count; i++) {
        size_t offset = i * (size_t)sector_size;
        if (crypt_sector(f, context, tweak, in + offset, out + offset, sector_size) != 0) return -1;
        if (digests && sha256(f, out + offset, sector_size, digests + i * DIGEST_SIZE) != 0) return -1;
        tweak += tweak_step;
    }
    return 0;
}

/* For each of `count` sectors of ciphertext in `data`: compare its SHA-256 with expected + 32 * i;
 * when equal, decrypt it in place (`context` keyed for decryption) and set mismatches[i] to 0;
 * when not, leave it as it is and set mismatches[i] to 1. Returns the number of mismatching
 * sectors, or -1 when an OpenSSL call failed (the buffers are then undefined). */
long long ks_xts_verify_decrypt(const struct ks_openssl *f, void *context, u64 first_tweak,
                                u64 tweak_step, u8 *data, size_t count, int sector_size,
                                const u8 *expected, u8 *mismatches) {
    long long mismatching = 0;
    u64 tweak = first_tweak;
    for (size_t i = 0; i < count; i++, tweak += tweak_step) {
        u8 digest[DIGEST_SIZE];
        u8 difference = 0;
        u8 *sector = data + i * (size_t)sector_size;
        if (sha256(f, sector, sector_size, digest) != 0) return -1;
        for (int j = 0; j < DIGEST_SIZE; j++) difference |= digest[j] ^ expected[i * DIGEST_SIZE + j];
        mismatches[i] = difference != 0;
        if (difference) {
            mismatching++;
            continue;
        }
        if (crypt_sector(f, context, tweak, sector, sector, sector_size) != 0) return -1;
    }
    return mismatching;
}
