"""TLS that terminates inside the keep: listeners, streams and network policy over trio.

Knows nothing of wasmtime; shim wires these streams to the WASI host's socket protocol
(shim/sockets.py). Layering (each module imports only those above it):

    errors    the flat exception hierarchy (NetError and its kinds)
    policy    NetworkPolicy: plaintext TCP only with an explicit opt-in
    files     an owner's small files (TLS certificate, key, CA; a volume's key file) read
              without blocking on a FIFO and without filling memory (shim.keys uses it too)
    tls       the keep's identity (CertificateProvider: self-signed in memory, configured files,
              RA-TLS later), TLS 1.3-only server/client contexts, client-CA checks, SPKI pins
    wiretap   TappedStream: the raw bytes under TLS reported to a tap (keep run --audit-host)
    streams   Connection (plaintext buffers + pump/writer tasks, usable from a non-trio thread),
              Listener (handshakes in background tasks), ReadinessBoard, open_listener,
              open_connection
"""

from net.errors import (
    CertificateError,
    ConnectFailed,
    HandshakeFailed,
    NetError,
    PinMismatch,
    PlaintextRefused,
)
from net.policy import NetworkPolicy
from net.streams import Connection, Listener, ListenerSettings, ReadinessBoard, open_connection, open_listener
from net.tls import (
    CertificateProvider,
    FileCertificateProvider,
    KeepIdentity,
    SelfSignedProvider,
    ServerVerification,
    client_context,
    server_context,
    spki_sha256,
)

__all__ = [
    "CertificateError",
    "CertificateProvider",
    "ConnectFailed",
    "Connection",
    "FileCertificateProvider",
    "HandshakeFailed",
    "KeepIdentity",
    "Listener",
    "ListenerSettings",
    "NetError",
    "NetworkPolicy",
    "PinMismatch",
    "PlaintextRefused",
    "ReadinessBoard",
    "SelfSignedProvider",
    "ServerVerification",
    "client_context",
    "open_connection",
    "open_listener",
    "server_context",
    "spki_sha256",
]
