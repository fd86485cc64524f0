"""`keep run --fault SPEC`: the command line's fault texts as validated FaultSpecs.

The grammar, the parser and the injector live in `wasi_host._faults` (pure Python, no trio);
this module only turns a bad spec into the CLI's one-line usage error.
"""

from __future__ import annotations

from collections.abc import Iterable

from shim.errors import UsageError
from wasi_host._faults import GRAMMAR, FaultSpec, FaultSpecError
from wasi_host._functions import FUNCTIONS

__all__ = ["GRAMMAR", "FaultSpec", "parse_faults"]


def parse_faults(texts: Iterable[str]) -> tuple[FaultSpec, ...]:
    """Every --fault text parsed against the preview1 names (UsageError on the first bad one)."""
    names = frozenset(FUNCTIONS)
    try:
        return tuple(FaultSpec.parse(text, names) for text in texts)
    except FaultSpecError as error:
        raise UsageError(str(error)) from None
