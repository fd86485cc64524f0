"""The wasi_snapshot_preview1 ABI: errno values, rights, flags, enums and struct layouts.

Hand-written once from ``fixtures/witx/typenames.witx``; ``tests/test_wasi_abi.py`` checks the
function table against the witx text, and the layouts below follow the witx record rules
(natural alignment, little endian).  Flags are plain ``int`` constants rather than ``IntFlag``
because they are combined on the hot path of every host call.
"""

from __future__ import annotations

import enum
import struct
from typing import Final


class Errno(enum.IntEnum):
    """WASI errno values (``$errno``, tag u16); the numbering is the witx declaration order."""

    SUCCESS = 0
    TOOBIG = 1
    ACCES = 2
    ADDRINUSE = 3
    ADDRNOTAVAIL = 4
    AFNOSUPPORT = 5
    AGAIN = 6
    ALREADY = 7
    BADF = 8
    BADMSG = 9
    BUSY = 10
    CANCELED = 11
    CHILD = 12
    CONNABORTED = 13
    CONNREFUSED = 14
    CONNRESET = 15
    DEADLK = 16
    DESTADDRREQ = 17
    DOM = 18
    DQUOT = 19
    EXIST = 20
    FAULT = 21
    FBIG = 22
    HOSTUNREACH = 23
    IDRM = 24
    ILSEQ = 25
    INPROGRESS = 26
    INTR = 27
    INVAL = 28
    IO = 29
    ISCONN = 30
    ISDIR = 31
    LOOP = 32
    MFILE = 33
    MLINK = 34
    MSGSIZE = 35
    MULTIHOP = 36
    NAMETOOLONG = 37
    NETDOWN = 38
    NETRESET = 39
    NETUNREACH = 40
    NFILE = 41
    NOBUFS = 42
    NODEV = 43
    NOENT = 44
    NOEXEC = 45
    NOLCK = 46
    NOLINK = 47
    NOMEM = 48
    NOMSG = 49
    NOPROTOOPT = 50
    NOSPC = 51
    NOSYS = 52
    NOTCONN = 53
    NOTDIR = 54
    NOTEMPTY = 55
    NOTRECOVERABLE = 56
    NOTSOCK = 57
    NOTSUP = 58
    NOTTY = 59
    NXIO = 60
    OVERFLOW = 61
    OWNERDEAD = 62
    PERM = 63
    PIPE = 64
    PROTO = 65
    PROTONOSUPPORT = 66
    PROTOTYPE = 67
    RANGE = 68
    ROFS = 69
    SPIPE = 70
    SRCH = 71
    STALE = 72
    TIMEDOUT = 73
    TXTBSY = 74
    XDEV = 75
    NOTCAPABLE = 76


class Rights:
    """``$rights`` bits (u64)."""

    FD_DATASYNC: Final = 1 << 0
    FD_READ: Final = 1 << 1
    FD_SEEK: Final = 1 << 2
    FD_FDSTAT_SET_FLAGS: Final = 1 << 3
    FD_SYNC: Final = 1 << 4
    FD_TELL: Final = 1 << 5
    FD_WRITE: Final = 1 << 6
    FD_ADVISE: Final = 1 << 7
    FD_ALLOCATE: Final = 1 << 8
    PATH_CREATE_DIRECTORY: Final = 1 << 9
    PATH_CREATE_FILE: Final = 1 << 10
    PATH_LINK_SOURCE: Final = 1 << 11
    PATH_LINK_TARGET: Final = 1 << 12
    PATH_OPEN: Final = 1 << 13
    FD_READDIR: Final = 1 << 14
    PATH_READLINK: Final = 1 << 15
    PATH_RENAME_SOURCE: Final = 1 << 16
    PATH_RENAME_TARGET: Final = 1 << 17
    PATH_FILESTAT_GET: Final = 1 << 18
    PATH_FILESTAT_SET_SIZE: Final = 1 << 19
    PATH_FILESTAT_SET_TIMES: Final = 1 << 20
    FD_FILESTAT_GET: Final = 1 << 21
    FD_FILESTAT_SET_SIZE: Final = 1 << 22
    FD_FILESTAT_SET_TIMES: Final = 1 << 23
    PATH_SYMLINK: Final = 1 << 24
    PATH_REMOVE_DIRECTORY: Final = 1 << 25
    PATH_UNLINK_FILE: Final = 1 << 26
    POLL_FD_READWRITE: Final = 1 << 27
    SOCK_SHUTDOWN: Final = 1 << 28
    SOCK_ACCEPT: Final = 1 << 29
    ALL: Final = (1 << 30) - 1

    # The sets wasmtime hands out for a pre-opened directory (base and inheriting), plus
    # PATH_FILESTAT_SET_SIZE (wasmtime checks no rights, so O_TRUNC works there and must here);
    # wasi-libc derives the rights it asks for in path_open from the inheriting set.
    DIRECTORY_BASE: Final = (
        PATH_FILESTAT_SET_SIZE | PATH_CREATE_DIRECTORY | PATH_CREATE_FILE | PATH_LINK_SOURCE | PATH_LINK_TARGET | PATH_OPEN
        | FD_READDIR | PATH_READLINK | PATH_RENAME_SOURCE | PATH_RENAME_TARGET | PATH_SYMLINK
        | PATH_REMOVE_DIRECTORY | PATH_UNLINK_FILE | PATH_FILESTAT_GET | PATH_FILESTAT_SET_TIMES
        | FD_FILESTAT_GET | FD_FILESTAT_SET_TIMES
    )
    FILE_BASE: Final = (
        FD_DATASYNC | FD_READ | FD_SEEK | FD_FDSTAT_SET_FLAGS | FD_SYNC | FD_TELL | FD_WRITE
        | FD_ADVISE | FD_ALLOCATE | FD_FILESTAT_GET | FD_FILESTAT_SET_SIZE | FD_FILESTAT_SET_TIMES
        | POLL_FD_READWRITE
    )
    DIRECTORY_INHERITING: Final = DIRECTORY_BASE | FILE_BASE
    SOCKET_BASE: Final = (
        FD_READ | FD_WRITE | FD_FDSTAT_SET_FLAGS | FD_FILESTAT_GET | POLL_FD_READWRITE
        | SOCK_SHUTDOWN | SOCK_ACCEPT
    )


class Filetype:
    """``$filetype`` (u8)."""

    UNKNOWN: Final = 0
    BLOCK_DEVICE: Final = 1
    CHARACTER_DEVICE: Final = 2
    DIRECTORY: Final = 3
    REGULAR_FILE: Final = 4
    SOCKET_DGRAM: Final = 5
    SOCKET_STREAM: Final = 6
    SYMBOLIC_LINK: Final = 7


class Fdflags:
    """``$fdflags`` (u16)."""

    APPEND: Final = 1 << 0
    DSYNC: Final = 1 << 1
    NONBLOCK: Final = 1 << 2
    RSYNC: Final = 1 << 3
    SYNC: Final = 1 << 4
    ALL: Final = (1 << 5) - 1


class Oflags:
    """``$oflags`` (u16)."""

    CREAT: Final = 1 << 0
    DIRECTORY: Final = 1 << 1
    EXCL: Final = 1 << 2
    TRUNC: Final = 1 << 3
    ALL: Final = (1 << 4) - 1


class Fstflags:
    """``$fstflags`` (u16)."""

    ATIM: Final = 1 << 0
    ATIM_NOW: Final = 1 << 1
    MTIM: Final = 1 << 2
    MTIM_NOW: Final = 1 << 3
    ALL: Final = (1 << 4) - 1


LOOKUP_SYMLINK_FOLLOW: Final = 1
SUBSCRIPTION_CLOCK_ABSTIME: Final = 1
EVENT_FD_READWRITE_HANGUP: Final = 1
RIFLAGS_RECV_PEEK: Final = 1
RIFLAGS_RECV_WAITALL: Final = 2
ROFLAGS_RECV_DATA_TRUNCATED: Final = 1
SDFLAGS_RD: Final = 1
SDFLAGS_WR: Final = 2
PREOPENTYPE_DIR: Final = 0


class Clockid:
    """``$clockid`` (u32)."""

    REALTIME: Final = 0
    MONOTONIC: Final = 1
    PROCESS_CPUTIME_ID: Final = 2
    THREAD_CPUTIME_ID: Final = 3


class Whence:
    """``$whence`` (u8)."""

    SET: Final = 0
    CUR: Final = 1
    END: Final = 2


class Eventtype:
    """``$eventtype`` (u8)."""

    CLOCK: Final = 0
    FD_READ: Final = 1
    FD_WRITE: Final = 2


ADVICE_MAX: Final = 5  # $advice: normal .. noreuse
#: off_t's largest value: a file offset, size or the end of a transfer beyond it is EINVAL.
MAX_FILE_OFFSET: Final = (1 << 63) - 1
SIGNAL_MAX: Final = 30  # $signal: none .. sys

# Struct layouts (little endian, natural alignment, as the witx record rules lay them out).
U8: Final = struct.Struct("<B")
U16: Final = struct.Struct("<H")
U32: Final = struct.Struct("<I")
U64: Final = struct.Struct("<Q")
U32_PAIR: Final = struct.Struct("<II")  # two $size results, or an iovec/ciovec (buf, buf_len)
FDSTAT: Final = struct.Struct("<BxH4xQQ")  # filetype, flags, rights_base, rights_inheriting
FILESTAT: Final = struct.Struct("<QQB7xQQQQQ")  # dev, ino, filetype, nlink, size, atim, mtim, ctim
DIRENT: Final = struct.Struct("<QQIB3x")  # d_next, d_ino, d_namlen, d_type
PRESTAT: Final = struct.Struct("<B3xI")  # tag, pr_name_len
SUBSCRIPTION_SIZE: Final = 48
SUBSCRIPTION_HEAD: Final = struct.Struct("<QB")  # userdata, tag (union payload at offset 16)
SUBSCRIPTION_CLOCK: Final = struct.Struct("<I4xQQH")  # id, timeout, precision, flags (at 16)
SUBSCRIPTION_FD: Final = struct.Struct("<I")  # file_descriptor (at 16)
EVENT: Final = struct.Struct("<QHB5xQH6x")  # userdata, error, type, nbytes, flags
assert FDSTAT.size == 24 and FILESTAT.size == 64 and DIRENT.size == 24 and EVENT.size == 32
