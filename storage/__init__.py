"""Encrypted volumes: synchronous, no wasmtime, no trio.

Layering, bottom to top (each module usable and tested alone):

    blockdev    BlockDevice: an image file, a block device path, or memory
    luks2       the LUKS2 container: headers, keyslots, AF splitter, digest (cryptsetup-compatible)
    xts         the aes-xts-plain64 sector cipher (pyca reference, optional libcrypto fast path)
    integrity   Merkle tree over sector ciphertext, MAC'd root, A/B superblocks, redo log
    fs          the filesystem (SQLite through an APSW VFS on the protected device), inode-level API
    volume      create/open a whole volume: image -> LUKS2 -> integrity -> filesystem, with a lock
"""
