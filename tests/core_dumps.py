"""For tests of the key-holding processes' core-dump refusal (shim.keys.forbid_core_dumps)."""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator

import pytest


@contextlib.contextmanager
def core_dumps_allowed() -> Iterator[None]:
    """Children started inside the block begin with core dumps allowed (RLIMIT_CORE unlimited),
    as from a shell with `ulimit -c unlimited`; skips where the hard limit forbids that. (An
    in-process read_key before sets the test process's soft limit to 0: raised again here.)"""
    before = resource.getrlimit(resource.RLIMIT_CORE)
    hard = before[1]
    if hard != resource.RLIM_INFINITY and hard < (1 << 30):
        pytest.skip("core dumps are capped here (hard RLIMIT_CORE): cannot start keep with them allowed")
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, before)
