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
    /* EVP_MAC_init(ctx, key, key_length, params): with no key, restarts with the ctx's key */
    int (*mac_init)(void *, const u8 *, size_t, const void *);
    /* EVP_MAC_update(ctx, data, length) */
    int (*mac_update)(void *, const u8 *, size_t);
    /* EVP_MAC_final(ctx, out, &out_length, out_size) */
    int (*mac_final)(void *, u8 *, size_t *, size_t);
};

int ks_abi_version(void) { return 7; }

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

/* The SHA-256 of each `node_size`-byte node of `level` (`length` bytes; the last node, when
 * short, hashed zero-padded to `node_size`) into out + 32 * i: one level of the integrity
 * layer's tree from the one below (MerkleStore._rebuild_levels). Contract: 0 < length,
 * 0 < node_size <= 4096, out holds ceil(length / node_size) * 32 bytes.
 * Returns 0, or -1 when an OpenSSL call failed (the output is then undefined). */
int ks_hash_nodes(const struct ks_openssl *f, const u8 *level, u64 length, u64 node_size, u8 *out) {
    u8 padded[4096];
    if (node_size == 0 || node_size > sizeof padded || length == 0) return -1;
    u64 start = 0;
    for (; start + node_size <= length; start += node_size, out += DIGEST_SIZE)
        if (sha256(f, level + start, (int)node_size, out) != 0) return -1;
    if (start < length) {
        u64 k = 0;
        for (; k < length - start; k++) padded[k] = level[start + k];
        for (; k < node_size; k++) padded[k] = 0;
        if (sha256(f, padded, (int)node_size, out) != 0) return -1;
    }
    return 0;
}

#define SMALL_SECTORS 4
#define MAX_LEVELS 12

/* One small commit of storage/integrity.py (`MerkleStore._append_small_record`), filled in by the
 * caller; the layout of the record and of every message stays in Python, this only runs the
 * cryptography on it, in the order the Python path does. The ctypes Structure `_SmallCommit` in
 * storage/native.py has the same fields in the same order. */
struct ks_small_commit {
    void *context;               /* EVP_CIPHER_CTX keyed for AES-XTS encryption */
    void *mac_context;           /* EVP_MAC_CTX: HMAC-SHA256 keyed with the integrity subkey */
    u8 *record;                  /* the header sector (packed by the caller), then `count` sectors
                                    of plaintext, encrypted here in place */
    u64 count;                   /* 1..SMALL_SECTORS */
    u64 sectors[SMALL_SECTORS];  /* the data sector (leaf index) of each record sector */
    u64 data_tweak;              /* the XTS tweak of data sector (leaf) 0 ... */
    u64 tweak_step;              /* ... and from one data sector to the next */
    u64 header_tweak;            /* the XTS tweak of the header sector */
    u64 entries_at;              /* where entry 0's 32-byte digest goes in the header */
    u64 entry_size;              /* from one entry's digest to the next */
    u64 root_at;                 /* where the tree root goes in the header */
    u64 root_mac_at;             /* where the state MAC goes in the header */
    u8 *root_mac;                /* and a copy of it here (the header ends up encrypted) */
    u8 *state;                   /* the state MAC's message; its last 32 bytes receive the root */
    u64 state_length;
    u64 metadata_at;             /* the client metadata, in the header ... */
    u64 metadata_length;
    u64 metadata_digest_at;      /* ... whose SHA-256 goes here in the state message */
    const u8 *mac_label;         /* the header MAC's message is this label, then the first
                                    `mac_length` bytes of the header; the MAC goes to the last
                                    32 bytes of the header sector */
    u64 mac_label_length;
    u64 depth;                   /* number of tree levels, 2..MAX_LEVELS (leaves ... root) */
    u8 *levels[MAX_LEVELS];      /* level 0 is the leaves; the last level is the root hash */
    u64 level_lengths[MAX_LEVELS];
    u64 sector_size;             /* 4096: a record sector */
    u64 node_size;               /* a tree node: the hashes of `node_size` / 32 nodes (or leaves)
                                    of the level below; 64..sector_size, a multiple of 32 */
    u64 mac_length;              /* at most sector_size - 32 */
};

/* HMAC-SHA256 of `prefix` (`prefix_length` bytes, none when 0) then `data`. */
static int hmac_sha256(const struct ks_openssl *f, const struct ks_small_commit *c, const u8 *prefix,
                       u64 prefix_length, const u8 *data, u64 length, u8 *out) {
    size_t out_length = 0;
    if (f->mac_init(c->mac_context, 0, 0, 0) != 1) return -1;
    if (prefix_length && f->mac_update(c->mac_context, prefix, (size_t)prefix_length) != 1) return -1;
    if (f->mac_update(c->mac_context, data, (size_t)length) != 1) return -1;
    if (f->mac_final(c->mac_context, out, &out_length, DIGEST_SIZE) != 1) return -1;
    return out_length == DIGEST_SIZE ? 0 : -1;
}

static void copy_bytes(u8 *to, const u8 *from, u64 length) {
    for (u64 i = 0; i < length; i++) to[i] = from[i];
}

/* The small commit, in the Python path's order: encrypt each record sector in place and hash
 * its ciphertext (the new leaf: into the leaves and the header's entry); hash the metadata into
 * the state message; rehash the tree nodes above the changed leaves, level by level, up to the
 * root (a level's last node, when short, hashed zero-padded to a whole node); put the root into
 * the header and the state message; HMAC the state message into the header (the root MAC, also
 * copied out), HMAC the label and the header's first mac_length bytes into the header's last
 * 32 bytes; encrypt the header sector in place.
 * Contract (checked by storage/_small_commit.py before the call): every pointer covers what the
 * fields say; sectors[i] < level_lengths[0] / 32 and its tweak does not overflow; each level
 * holds the hashes of the nodes of the level below (32 bytes per node_size bytes, rounded up)
 * and the last one a single hash; the root, entry, metadata and MAC offsets lie inside the header sector
 * before its last 32 bytes, the metadata digest's inside the state message.
 * Returns 0, or -1 when an OpenSSL call failed (the buffers are then undefined). */
int ks_small_commit(const struct ks_openssl *f, const struct ks_small_commit *c) {
    u64 size = c->sector_size;
    u64 node = c->node_size;
    u64 fanout = node / DIGEST_SIZE;
    u64 nodes[SMALL_SECTORS];  /* the node above each changed leaf, then above those, ... */
    u8 padded[4096];
    if (c->count < 1 || c->count > SMALL_SECTORS || c->depth < 2 || c->depth > MAX_LEVELS
        || size > sizeof padded || size % DIGEST_SIZE || node < 2 * DIGEST_SIZE || node > size
        || node % DIGEST_SIZE || c->mac_length > size - DIGEST_SIZE) return -1;
    for (u64 i = 0; i < c->count; i++) {
        u8 *sector = c->record + (i + 1) * size;
        u8 *digest = c->record + c->entries_at + i * c->entry_size;
        u64 tweak = c->data_tweak + c->sectors[i] * c->tweak_step;
        if (crypt_sector(f, c->context, tweak, sector, sector, (int)size) != 0) return -1;
        if (sha256(f, sector, (int)size, digest) != 0) return -1;
        copy_bytes(c->levels[0] + c->sectors[i] * DIGEST_SIZE, digest, DIGEST_SIZE);
        nodes[i] = c->sectors[i] / fanout;
    }
    for (u64 depth = 1; depth < c->depth; depth++) {
        const u8 *below = c->levels[depth - 1];
        u64 below_length = c->level_lengths[depth - 1];
        for (u64 i = 0; i < c->count; i++) {
            int seen = 0;
            for (u64 j = 0; j < i; j++) seen |= nodes[j] == nodes[i];
            if (seen) continue;  /* that node is hashed already */
            u64 start = nodes[i] * node;
            u8 *out = c->levels[depth] + nodes[i] * DIGEST_SIZE;
            if (start + node <= below_length) {
                if (sha256(f, below + start, (int)node, out) != 0) return -1;
            } else {
                u64 length = below_length - start;
                copy_bytes(padded, below + start, length);
                for (u64 k = length; k < node; k++) padded[k] = 0;
                if (sha256(f, padded, (int)node, out) != 0) return -1;
            }
        }
        for (u64 i = 0; i < c->count; i++) nodes[i] /= fanout;
    }
    if (sha256(f, c->record + c->metadata_at, (int)c->metadata_length, c->state + c->metadata_digest_at) != 0)
        return -1;
    const u8 *root = c->levels[c->depth - 1];
    copy_bytes(c->record + c->root_at, root, DIGEST_SIZE);
    copy_bytes(c->state + c->state_length - DIGEST_SIZE, root, DIGEST_SIZE);
    if (hmac_sha256(f, c, 0, 0, c->state, c->state_length, c->record + c->root_mac_at) != 0) return -1;
    copy_bytes(c->root_mac, c->record + c->root_mac_at, DIGEST_SIZE);
    if (hmac_sha256(f, c, c->mac_label, c->mac_label_length, c->record, c->mac_length,
                    c->record + size - DIGEST_SIZE) != 0) return -1;
    return crypt_sector(f, c->context, c->header_tweak, c->record, c->record, (int)size);
}
