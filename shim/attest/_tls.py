"""RA-TLS over trio: a fresh, nonce-bound certificate for every connection.

Nonce flow (chosen so that the evidence checked is the certificate of this very TLS session, with
no extra round trip and no trust in anything the keep says after the handshake):

1. The owner draws a 32-byte nonce and sends it in the TLS ClientHello's server name (SNI):
   `<base32(nonce), lower case, no padding: 52 characters>.nonce.keepshim.invalid`.
2. The keep's SNI callback makes a certificate for its (per-process, in-memory) key whose
   evidence binds SHA-256(SPKI) || nonce, and switches the handshake to it.
3. TLS 1.3 CertificateVerify proves that the keep holds that key, so the key the evidence binds
   is the key that terminates this session. The owner takes the peer certificate of this session
   (its client does no CA checking: the certificate is pinned by the evidence instead) and runs
   `verify_keep_certificate(cert, nonce, policy)` before sending a single byte of application data.

A client that sends no such server name (openssl s_client, curl) gets the start-up certificate,
bound to the all-zero nonce: fine for inspection, refused by every owner.

The nonce is public (it travels in clear in the ClientHello); it only has to be unpredictable and
fresh, which os.urandom per connection gives. The key reaches OpenSSL through net.tls, which loads
it from an anonymous in-memory file (memfd): it never reaches the host disk.
"""

from __future__ import annotations

import base64
import os
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import trio
from cryptography import x509

from net.errors import NetError
from net.tls import SELF_SIGNED_VALIDITY, server_context
from net.tls import KeepIdentity as NetKeepIdentity
from shim.attest._backends import Backend, Claims
from shim.attest._certificate import NO_NONCE, NONCE_BYTES, AttestedIdentity, verify_keep_certificate
from shim.attest._errors import AttestationError, MalformedEvidence
from shim.attest._policy import Policy
from shim.errors import KeepError

NONCE_DOMAIN: Final = "nonce.keepshim.invalid"
OWNER_HANDSHAKE_SECONDS: Final = 30.0
"""How long the owner waits for the TCP connection and the TLS handshake together (as long as
`keep serve` waits for a client's handshake): a peer that accepts and never answers the
ClientHello (a wedged keep, a wrong port) is an error, not a wait forever."""
_SERVER_NAME: Final = re.compile(r"([a-z2-7]{52})\." + re.escape(NONCE_DOMAIN))


def server_name_for_nonce(nonce: bytes) -> str:
    """The SNI host name that carries `nonce` to the keep."""
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"a nonce is {NONCE_BYTES} bytes, not {len(nonce)}")
    return base64.b32encode(nonce).decode().rstrip("=").lower() + "." + NONCE_DOMAIN


def nonce_from_server_name(server_name: str | None) -> bytes | None:
    """The nonce an owner put in the SNI host name, or None for any other name."""
    if server_name is None:
        return None
    match = _SERVER_NAME.fullmatch(server_name)
    if match is None:
        return None
    nonce = base64.b32decode(match.group(1).upper() + "====")
    return nonce if len(nonce) == NONCE_BYTES else None


def _server_context(identity: AttestedIdentity, certificate: x509.Certificate) -> ssl.SSLContext:
    """A TLS 1.3 server context presenting `certificate` with the identity's key (loaded by
    net.tls through an in-memory file, never the host disk)."""
    return server_context(identity.net_identity(certificate))


@dataclass(frozen=True)
class KeepTLS:
    """The keep's TLS server side: one identity, one backend, a certificate per connection."""

    identity: AttestedIdentity
    backend: Backend

    def server_context(self) -> ssl.SSLContext:
        """The listening context: the start-up (zero-nonce) certificate, switched per connection
        to a certificate bound to the nonce in the client's SNI.

        Making the start-up certificate asks the backend for evidence, so a backend this machine
        cannot serve fails here, when the keep starts, not on the first connection."""
        context = _server_context(self.identity, self.identity.certificate(self.backend, NO_NONCE))
        context.sni_callback = self._on_server_name
        return context

    def _on_server_name(self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                        _context: ssl.SSLContext) -> int | None:
        nonce = nonce_from_server_name(server_name)
        if nonce is None:
            return None
        try:
            connection.context = _server_context(self.identity,
                                                 self.identity.certificate(self.backend, nonce))
        except (AttestationError, NetError, OSError, ssl.SSLError):
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        return None


def owner_client_context() -> ssl.SSLContext:
    """The owner's TLS 1.3 client context: no CA or host name check, because the keep's
    certificate is self-signed and is checked through its evidence instead (pinning)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def open_verified_stream(
        host: str, port: int, policy: Policy, *,
        nonce_source: Callable[[int], bytes] = os.urandom,
        handshake_seconds: float = OWNER_HANDSHAKE_SECONDS,
) -> tuple[trio.SSLStream[trio.SocketStream], Claims]:
    """Owner side: connect, handshake with a fresh nonce, and verify the evidence in the peer
    certificate of this very session. Returns the stream (safe to send secrets on) and the claims;
    raises an EvidenceRefused subclass (the stream is closed) if any check fails, and a KeepError
    if connecting and the handshake take longer than `handshake_seconds`."""
    nonce = nonce_source(NONCE_BYTES)
    deadline = trio.current_time() + handshake_seconds
    with trio.move_on_at(deadline) as connecting:
        tcp = await trio.open_tcp_stream(host, port)
    if connecting.cancelled_caught:
        raise KeepError(f"connecting to {host}:{port} timed out after {handshake_seconds:g} s")
    stream = trio.SSLStream(tcp, owner_client_context(), server_hostname=server_name_for_nonce(nonce))
    try:
        with trio.move_on_at(deadline) as handshake:
            await stream.do_handshake()
        if handshake.cancelled_caught:
            raise KeepError(f"TLS handshake with {host}:{port} timed out after {handshake_seconds:g} s")
        certificate = stream.getpeercert(binary_form=True)
        if not certificate:
            raise MalformedEvidence("the keep presented no certificate")
        claims = verify_keep_certificate(certificate, nonce, policy)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream, claims


@dataclass(frozen=True)
class AttestedCertificateProvider:
    """net.tls's CertificateProvider for the guest's own TLS sockets (keep.toml listen/connect):
    the keep's attested key with a certificate whose evidence binds `nonce` (by default none:
    clients of a deployed workload pin the key's SPKI that keep deploy announced). It is made
    once, when the sockets open, and serves as long as the workload runs: it is valid as long
    as keep run's self-signed one (net.tls.SELF_SIGNED_VALIDITY), not one day, after which a
    client that checks its dates (one trusting it as its anchor) refused every handshake."""

    identity_key: AttestedIdentity
    backend: Backend
    nonce: bytes = NO_NONCE

    def identity(self) -> NetKeepIdentity:
        return self.identity_key.net_identity(self.identity_key.certificate(
            self.backend, self.nonce, validity=SELF_SIGNED_VALIDITY))
