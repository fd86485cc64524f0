"""Network policy: TLS everywhere unless plaintext TCP is explicitly allowed.

The host can read and change every byte on the network (DESIGN.md, threat model), so a `prot =
"tcp"` socket is only opened when either the socket's own configuration or the operator (the
command line) says `insecure-plaintext`. Kept as a value object so the decision is made once, at
start, before any socket exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from net.errors import PlaintextRefused

Protocol = Literal["tls", "tcp"]


@dataclass(frozen=True)
class NetworkPolicy:
    """`allow_plaintext` is the command line's `--insecure-plaintext`."""

    allow_plaintext: bool = False

    def check(self, socket_name: str, protocol: Protocol, *, entry_allows_plaintext: bool) -> None:
        """Raise PlaintextRefused for plaintext TCP without an explicit opt-in."""
        if protocol == "tls":
            return
        if not (self.allow_plaintext or entry_allows_plaintext):
            raise PlaintextRefused(
                f'socket "{socket_name}" uses prot = "tcp" (plaintext the host can read); '
                'set insecure_plaintext = true on it or pass --insecure-plaintext to allow it'
            )
