"""`keep run --fault SPEC`: the command line's fault texts as validated FaultSpecs.

The grammar, the parser and the injector live in `wasi_host._faults` (pure Python, no trio);
this module turns a bad spec into the CLI's one-line usage error, and words the warning for a
spec that changed no call in the run (its glob, fd or count never met one: the run passing then
says nothing about the app).
"""

from __future__ import annotations

from collections.abc import Iterable

from shim.errors import UsageError, say
from wasi_host._faults import GRAMMAR, FaultSpec, FaultSpecError, FaultTally
from wasi_host._functions import FUNCTIONS

__all__ = ["GRAMMAR", "FaultSpec", "ineffective_faults", "parse_faults", "warn_ineffective_faults"]


def parse_faults(texts: Iterable[str]) -> tuple[FaultSpec, ...]:
    """Every --fault text parsed against the preview1 names (UsageError on the first bad one)."""
    names = frozenset(FUNCTIONS)
    try:
        return tuple(FaultSpec.parse(text, names) for text in texts)
    except FaultSpecError as error:
        raise UsageError(str(error)) from None


def ineffective_faults(tallies: Iterable[tuple[FaultSpec, FaultTally]]) -> list[str]:
    """One line for each spec that failed or shortened no call in the run its tally counted
    (`FaultInjector.tallies()`)."""
    lines = []
    for spec, tally in tallies:
        if tally.effective:
            continue
        why = ("no call met its conditions" if not tally.matched else
               f"{tally.matched} call{'s' if tally.matched != 1 else ''} met its conditions; none was "
               "failed or shortened")
        lines.append(f"--fault {spec.text!r} never took effect ({why})")
    return lines


def warn_ineffective_faults(lines: Iterable[str]) -> None:
    """`keep run`: print `keep: warning: ...` on stderr for each line of `ineffective_faults`
    (a run's `RunResult.ineffective_faults`)."""
    for line in lines:
        say(f"warning: {line}")
