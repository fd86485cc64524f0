"""Path resolution that can never leave the directory it starts from.

Theory of operation.  A guest path is resolved here, component by component, over the
``Directory`` protocol: every intermediate component is looked up with ``stat_at`` (lstat) and
opened with ``open_directory`` (which refuses symlinks), and every symlink is read and expanded
here, so a backend never sees a slash and never follows a link on its own.  A stack of opened
directories makes ``..`` a pop: popping the starting directory is an escape.  The errno for each
corner is wasmtime's (cap-std's): an absolute path, an absolute symlink or too many ``..`` is
EPERM; more than 40 symlink expansions is ELOOP; an empty path is ENOENT; a NUL byte is EINVAL;
a path of PATH_MAX (4096) bytes or more is ENAMETOOLONG (checked between the NUL byte and the
absolute path, as the kernel's getname does under wasmtime), which also bounds the work one call
can ask of the resolver; a trailing slash forces the final component to resolve to a directory
(ENOTDIR otherwise).

The result is the directory holding the final component plus that component's name (never
``..``; ``.`` when the path names the start directory or one of its ancestors inside it).
"""

from __future__ import annotations

import errno
from types import TracebackType

from wasi_host._abi import Errno, Filetype
from wasi_host._backend import Directory, FileStat
from wasi_host._errors import WasiError

MAX_SYMLINK_EXPANSIONS = 40
MAX_NAME_BYTES = 255
PATH_MAX = 4096  # bytes, with the terminating NUL: a path must be shorter


def _components(path: str) -> list[str]:
    """The components of ``path`` in reverse order (a stack), without empty and ``.`` ones.

    A final ``.`` is kept: ``x/.`` names x's ``.``, so x must be an existing directory (ENOENT,
    ENOTDIR otherwise) and the name operated on is ``.``, as in wasmtime (cap-std).
    """
    parts = path.split("/")
    if "" in parts or "." in parts:  # doubled or trailing slashes, "." components: rare
        parts = [part for part in parts if part]
        parts = [part for index, part in enumerate(parts) if part != "." or index == len(parts) - 1]
    for part in parts:
        # up to 63 characters are at most 252 bytes in UTF-8 (4 per character): not encoded
        if len(part) > MAX_NAME_BYTES // 4 and len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise WasiError(Errno.NAMETOOLONG)
    parts.reverse()
    return parts


def _check_shape(path: str) -> None:
    if not path:
        raise WasiError(Errno.NOENT)
    if "\0" in path:
        raise WasiError(Errno.INVAL)
    # Without this a guest could pass megabytes of "d/../": each component costs a directory
    # open and close here, in one host call that --timeout cannot interrupt.
    if len(path) >= PATH_MAX or (len(path) >= PATH_MAX // 4
                                 and len(path.encode("utf-8", "surrogateescape")) >= PATH_MAX):
        raise WasiError(Errno.NAMETOOLONG)
    if path.startswith("/"):
        raise WasiError(Errno.PERM)


class Resolved:
    """The parent directory and final name of a resolved path; closes what resolution opened.

    Use as a context manager: the directory is only valid inside the ``with`` block.
    """

    __slots__ = ("_missing", "_opened", "_status", "directory", "name", "trailing_slash")

    def __init__(self, directory: Directory, name: str, trailing_slash: bool, opened: list[Directory],
                 status: FileStat | None = None, *, missing: bool = False) -> None:
        self.directory = directory
        self.name = name
        self.trailing_slash = trailing_slash
        self._opened = opened
        # what resolution already learnt of the final component (following a symlink there
        # takes its lstat): the lstat, or that it does not exist; spares the backend a lookup
        self._status = status
        self._missing = missing

    def stat(self) -> FileStat:
        """lstat of the final component; ENOTDIR when a trailing slash names a non-directory."""
        status = self._status
        if status is None:
            status = self.directory.stat_at(self.name)
        if self.trailing_slash and status.filetype != Filetype.DIRECTORY:
            raise WasiError(Errno.NOTDIR)
        return status

    def stat_or_none(self) -> FileStat | None:
        """Like :meth:`stat`, but None when the final component does not exist."""
        if self._missing:
            return None
        try:
            return self.stat()
        except FileNotFoundError:
            return None

    def close(self) -> None:
        """Close the intermediate directories resolution opened."""
        opened, self._opened = self._opened, []
        for directory in reversed(opened):
            directory.close()

    def __enter__(self) -> Resolved:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def resolve(start: Directory, path: str, *, follow: bool, slash_follows: bool = True) -> Resolved:
    """Resolve ``path`` relative to ``start``; ``follow`` expands a symlink in the last place.

    A trailing slash follows too, unless ``slash_follows`` is False: then, without ``follow``,
    the final component stays unexpanded and ``trailing_slash`` is set, so the caller sees the
    link itself (rename and mkdir must not act on a link's target because of a "/": wasmtime
    refuses "link/" there).  The final component need not exist (creation calls).
    """
    _check_shape(path)
    trailing_slash = path.endswith("/")
    pending = _components(path)
    stack: list[Directory] = [start]
    expansions = 0
    try:
        while True:
            if not pending:
                return Resolved(stack[-1], ".", trailing_slash, stack[1:])
            name = pending.pop()
            current = stack[-1]
            if name == "..":
                if len(stack) == 1:
                    raise WasiError(Errno.PERM)
                stack.pop().close()
                continue
            last = not pending
            if last and not (follow or (trailing_slash and slash_follows)):
                return Resolved(current, name, trailing_slash, stack[1:])
            if not last:
                # The common case, a plain directory, costs one lookup: open_directory refuses
                # symlinks and non-directories itself. Anything else is sorted out below, by the
                # same lstat-based steps (so errors are exactly what they would have been).
                try:
                    stack.append(current.open_directory(name))
                    continue
                except OSError:
                    pass
            try:
                status = current.stat_at(name)
            except OSError as exc:
                if last and exc.errno == errno.ENOENT:
                    return Resolved(current, name, trailing_slash, stack[1:], missing=True)
                raise
            if status.filetype == Filetype.SYMBOLIC_LINK:
                expansions += 1
                if expansions > MAX_SYMLINK_EXPANSIONS:
                    raise WasiError(Errno.LOOP)
                target = current.readlink(name)
                _check_shape(target)
                if last and target.endswith("/"):
                    trailing_slash = True
                pending.extend(_components(target))
                continue
            if last:
                return Resolved(current, name, trailing_slash, stack[1:], status)
            if status.filetype != Filetype.DIRECTORY:
                raise WasiError(Errno.NOTDIR)
            stack.append(current.open_directory(name))
    except BaseException:
        for directory in reversed(stack[1:]):
            directory.close()
        raise
