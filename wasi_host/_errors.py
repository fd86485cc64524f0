"""The exceptions of the preview1 host and the one table from host errors to WASI errno.

A host function reports a guest-visible failure by raising :class:`WasiError` (or by letting an
``OSError`` from a backend propagate); the binding turns either into the errno it returns to the
guest with :func:`errno_for_exception`.  Anything else that escapes a host function is a bug in
the host, never the guest's fault, and traps the guest.
"""

from __future__ import annotations

import errno as _os_errno
from typing import Final

from wasi_host._abi import Errno


class WasiError(Exception):
    """A failure the guest sees as ``errno`` (the guest's fault, or the backend's answer)."""

    def __init__(self, errno: int) -> None:
        super().__init__(errno)
        self.errno = errno

    def __str__(self) -> str:
        try:
            return f"WASI errno {Errno(self.errno).name.lower()}"
        except ValueError:
            return f"WASI errno {self.errno}"


class ProcExit(BaseException):
    """Raised by ``proc_exit``: unwinds the guest; the code is also recorded on the Guest.

    A ``BaseException`` so that no ``except Exception`` on the way can swallow it.
    """

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _table() -> dict[int, int]:
    names = {
        "E2BIG": Errno.TOOBIG, "EACCES": Errno.ACCES, "EADDRINUSE": Errno.ADDRINUSE,
        "EADDRNOTAVAIL": Errno.ADDRNOTAVAIL, "EAFNOSUPPORT": Errno.AFNOSUPPORT,
        "EAGAIN": Errno.AGAIN, "EWOULDBLOCK": Errno.AGAIN, "EALREADY": Errno.ALREADY,
        "EBADF": Errno.BADF, "EBADMSG": Errno.BADMSG, "EBUSY": Errno.BUSY,
        "ECANCELED": Errno.CANCELED, "ECHILD": Errno.CHILD, "ECONNABORTED": Errno.CONNABORTED,
        "ECONNREFUSED": Errno.CONNREFUSED, "ECONNRESET": Errno.CONNRESET,
        "EDEADLK": Errno.DEADLK, "EDESTADDRREQ": Errno.DESTADDRREQ, "EDOM": Errno.DOM,
        "EDQUOT": Errno.DQUOT, "EEXIST": Errno.EXIST, "EFAULT": Errno.FAULT,
        "EFBIG": Errno.FBIG, "EHOSTUNREACH": Errno.HOSTUNREACH, "EIDRM": Errno.IDRM,
        "EILSEQ": Errno.ILSEQ, "EINPROGRESS": Errno.INPROGRESS, "EINTR": Errno.INTR,
        "EINVAL": Errno.INVAL, "EIO": Errno.IO, "EISCONN": Errno.ISCONN, "EISDIR": Errno.ISDIR,
        "ELOOP": Errno.LOOP, "EMFILE": Errno.MFILE, "EMLINK": Errno.MLINK,
        "EMSGSIZE": Errno.MSGSIZE, "EMULTIHOP": Errno.MULTIHOP,
        "ENAMETOOLONG": Errno.NAMETOOLONG, "ENETDOWN": Errno.NETDOWN,
        "ENETRESET": Errno.NETRESET, "ENETUNREACH": Errno.NETUNREACH, "ENFILE": Errno.NFILE,
        "ENOBUFS": Errno.NOBUFS, "ENODEV": Errno.NODEV, "ENOENT": Errno.NOENT,
        "ENOEXEC": Errno.NOEXEC, "ENOLCK": Errno.NOLCK, "ENOLINK": Errno.NOLINK,
        "ENOMEM": Errno.NOMEM, "ENOMSG": Errno.NOMSG, "ENOPROTOOPT": Errno.NOPROTOOPT,
        "ENOSPC": Errno.NOSPC, "ENOSYS": Errno.NOSYS, "ENOTCONN": Errno.NOTCONN,
        "ENOTDIR": Errno.NOTDIR, "ENOTEMPTY": Errno.NOTEMPTY,
        "ENOTRECOVERABLE": Errno.NOTRECOVERABLE, "ENOTSOCK": Errno.NOTSOCK,
        "ENOTSUP": Errno.NOTSUP, "EOPNOTSUPP": Errno.NOTSUP, "ENOTTY": Errno.NOTTY,
        "ENXIO": Errno.NXIO, "EOVERFLOW": Errno.OVERFLOW, "EOWNERDEAD": Errno.OWNERDEAD,
        "EPERM": Errno.PERM, "EPIPE": Errno.PIPE, "EPROTO": Errno.PROTO,
        "EPROTONOSUPPORT": Errno.PROTONOSUPPORT, "EPROTOTYPE": Errno.PROTOTYPE,
        "ERANGE": Errno.RANGE, "EROFS": Errno.ROFS, "ESPIPE": Errno.SPIPE, "ESRCH": Errno.SRCH,
        "ESTALE": Errno.STALE, "ETIMEDOUT": Errno.TIMEDOUT, "ETXTBSY": Errno.TXTBSY,
        "EXDEV": Errno.XDEV,
    }
    return {getattr(_os_errno, name): int(wasi) for name, wasi in names.items() if hasattr(_os_errno, name)}


OS_TO_WASI: Final[dict[int, int]] = _table()


def errno_for_exception(exc: BaseException) -> int | None:
    """The WASI errno for ``exc``, or None when ``exc`` is a host bug that must trap the guest.

    ``OSError`` without a known errno (or one WASI has no name for) becomes EIO: the guest
    learns that the operation failed, never garbage.
    """
    if isinstance(exc, WasiError):
        return exc.errno
    if isinstance(exc, OSError):
        if exc.errno is None:
            return int(Errno.IO)
        return OS_TO_WASI.get(exc.errno, int(Errno.IO))
    return None
