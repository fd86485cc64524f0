"""The net package's exceptions, in one flat module.

Each error says whose fault it is: `PlaintextRefused` is the configuration's (local), a
`HandshakeFailed` is usually the peer's (remote), `PinMismatch` means the peer is not who the
configuration said it would be.
"""

from __future__ import annotations


class NetError(Exception):
    """Base of every error raised by the net package."""


class PlaintextRefused(NetError):
    """A `prot = "tcp"` socket was configured without an explicit insecure-plaintext opt-in."""


class CertificateError(NetError):
    """A configured certificate, key or CA file could not be loaded (local fault)."""


class HandshakeFailed(NetError):
    """A TLS handshake did not complete: wrong CA, expired certificate, plaintext peer, timeout."""


class PinMismatch(HandshakeFailed):
    """The server's public key does not match the pinned SPKI SHA-256."""


class ConnectFailed(NetError):
    """An outgoing connection could not be opened (refused, unreachable, name not resolved)."""
