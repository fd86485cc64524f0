"""RA-TLS certificates: the keep's key, its evidence in an X.509 extension, and the owner's check.

Layout (the contract between keep and owner):

- The keep's key is ECDSA P-256, generated in memory when the keep starts (`AttestedIdentity`); it
  is serialized only in memory, for net.tls, which hands it to OpenSSL through an anonymous
  in-memory file (memfd), never the host disk.
- report_data (64 bytes) = SHA-256(DER SubjectPublicKeyInfo of the certificate's key)
  || nonce (32 bytes, chosen by the owner for this connection).
- The certificate is self-signed (subject = issuer = CN "keepshim keep") and carries exactly one
  evidence extension, non-critical, whose OID names the backend:
  `EVIDENCE_OID_ARC.<n>` with n = 1 nil, 2 sev-snp, 3 tdx, 4 sgx, where EVIDENCE_OID_ARC =
  KEEPSHIM_OID_ARC.1 and KEEPSHIM_OID_ARC = 2.25.104800065238602234654380733802874138067 (a UUID
  OID, ITU-T X.667: whoever generates the UUID owns the arc, no registration needed).
  extnValue = DER OCTET STRING containing the backend's evidence bytes unchanged.
- The verifier checks, in this order: DER parse, self-signature, one evidence extension, backend
  allowed, nil allowed, the backend's own evidence check, key binding, nonce, debug, measurement.
  The certificate's validity dates are not checked: the keep's clock is the host's, and the nonce
  already gives freshness.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import sys
from dataclasses import dataclass, field
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from net import tls as net_tls
from shim.attest._backends import KNOWN_BACKENDS, REPORT_DATA_BYTES, Backend, Claims, backend_named
from shim.attest._errors import (
    BackendNotAllowed,
    DebugNotAllowed,
    InsecureNilNotAllowed,
    KeyBindingMismatch,
    MalformedEvidence,
    MeasurementNotAllowed,
    NonceMismatch,
    SignatureInvalid,
)
from shim.attest._policy import Policy

KEEPSHIM_OID_ARC: Final = "2.25.104800065238602234654380733802874138067"
EVIDENCE_OID_ARC: Final = f"{KEEPSHIM_OID_ARC}.1"
EVIDENCE_OIDS: Final = {name: x509.ObjectIdentifier(f"{EVIDENCE_OID_ARC}.{index}")
                        for index, name in enumerate(KNOWN_BACKENDS, start=1)}
NONCE_BYTES: Final = 32
NO_NONCE: Final = bytes(NONCE_BYTES)
"""The nonce of the certificate a keep shows a client that sent none: no owner accepts it."""
_VALIDITY: Final = datetime.timedelta(days=1)


def report_data_for(spki_der: bytes, nonce: bytes) -> bytes:
    """report_data = SHA-256(SubjectPublicKeyInfo DER) || nonce (32 bytes)."""
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"a nonce is {NONCE_BYTES} bytes, not {len(nonce)}")
    return hashlib.sha256(spki_der).digest() + nonce


@dataclass(frozen=True)
class AttestedIdentity:
    """The keep's in-memory key pair; makes one RA-TLS certificate per nonce."""

    private_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1()), repr=False)

    @property
    def spki_der(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    def net_identity(self, certificate: x509.Certificate) -> net_tls.KeepIdentity:
        """`certificate` and this key as net.tls's identity (what its TLS contexts load); the
        PEM stays in memory."""
        return net_tls.KeepIdentity(
            certificate_chain_pem=certificate.public_bytes(serialization.Encoding.PEM),
            private_key_pem=self.private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))

    def certificate(self, backend: Backend, nonce: bytes, *,
                    validity: datetime.timedelta = _VALIDITY) -> x509.Certificate:
        """A self-signed certificate whose evidence binds this key and `nonce`, valid from
        five minutes ago for `validity` (owners do not check the dates, see above; the guest's
        own TLS sockets, whose clients may, ask for longer)."""
        evidence = backend.evidence(report_data_for(self.spki_der, nonce))
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keepshim keep")])
        now = datetime.datetime.now(datetime.UTC)
        return (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name)
                .public_key(self.private_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + validity)
                .add_extension(x509.UnrecognizedExtension(EVIDENCE_OIDS[backend.name],
                                                          der_octet_string(evidence)),
                               critical=False)
                .sign(self.private_key, hashes.SHA256()))


def der_octet_string(content: bytes) -> bytes:
    """DER encoding of an OCTET STRING."""
    size = len(content)
    if size < 0x80:
        return b"\x04" + bytes([size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return b"\x04" + bytes([0x80 | len(length)]) + length + content


def parse_der_octet_string(encoded: bytes) -> bytes:
    """The content of a DER OCTET STRING that spans all of `encoded` (strict: minimal length)."""
    if len(encoded) < 2 or encoded[0] != 0x04:
        raise MalformedEvidence("evidence extension is not a DER OCTET STRING")
    first = encoded[1]
    if first < 0x80:
        size, start = first, 2
    else:
        count = first & 0x7F
        length = encoded[2:2 + count]
        if count == 0 or count > 4 or len(length) != count or length[0] == 0:
            raise MalformedEvidence("evidence extension has a bad DER length")
        size, start = int.from_bytes(length, "big"), 2 + count
        if size < 0x80:
            raise MalformedEvidence("evidence extension has a non-minimal DER length")
    if start + size != len(encoded):
        raise MalformedEvidence("evidence extension length does not match its content")
    return encoded[start:]


def evidence_from_certificate(certificate: x509.Certificate) -> tuple[str, bytes]:
    """(backend name, evidence bytes) of the one keepshim evidence extension."""
    found = [(name, extension) for extension in certificate.extensions
             for name, oid in EVIDENCE_OIDS.items() if extension.oid == oid]
    if len(found) != 1:
        raise MalformedEvidence(f"the certificate has {len(found)} keepshim evidence extensions, "
                                "not exactly one")
    name, extension = found[0]
    value = extension.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise MalformedEvidence("the evidence extension has an unexpected type")
    return name, parse_der_octet_string(value.value)


def verify_keep_certificate(cert_der: bytes, expected_nonce: bytes, policy: Policy) -> Claims:
    """Check an RA-TLS certificate against the nonce this owner sent and the owner's policy.

    Returns the keep's claims; raises an EvidenceRefused subclass naming the failed check. The
    caller must pass the certificate of the TLS session it will use (see _tls), so that the key
    bound by the evidence is the key that terminates that session. Accepting an insecure (nil)
    keep prints a warning on stderr every time."""
    try:
        certificate = x509.load_der_x509_certificate(cert_der)
        spki_der = certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, UnsupportedAlgorithm) as error:
        raise MalformedEvidence(f"the keep's certificate does not parse: {error}") from None
    try:
        certificate.verify_directly_issued_by(certificate)
    except (ValueError, TypeError, InvalidSignature) as error:
        raise SignatureInvalid(f"the keep's certificate self-signature does not verify ({error or 'bad signature'})") from None
    try:
        backend_name, evidence = evidence_from_certificate(certificate)
    except (ValueError, x509.DuplicateExtension) as error:  # a mangled extension list
        raise MalformedEvidence(f"the certificate's extensions do not parse: {error}") from None

    if backend_name not in policy.allowed_backends:
        raise BackendNotAllowed(f"the keep runs on {backend_name!r}; the policy allows only "
                                f"{', '.join(sorted(policy.allowed_backends))}")
    if backend_name == "nil" and not policy.allow_insecure_nil:
        raise InsecureNilNotAllowed("the keep runs on the insecure nil backend (no hardware, "
                                    "forgeable evidence); pass --allow-insecure-nil to accept it")
    claims = backend_named(backend_name).verify(evidence)
    if claims.backend != backend_name or len(claims.report_data) != REPORT_DATA_BYTES:
        raise MalformedEvidence("the evidence does not match its extension's backend")

    if not hmac.compare_digest(claims.report_data[:32], hashlib.sha256(spki_der).digest()):
        raise KeyBindingMismatch("the evidence binds another public key than the certificate's "
                                 "(and this TLS session's)")
    if len(expected_nonce) != NONCE_BYTES or not hmac.compare_digest(claims.report_data[32:],
                                                                      expected_nonce):
        raise NonceMismatch("the evidence binds another nonce than the one sent for this "
                            "connection (stale or replayed evidence)")
    if claims.debug and not policy.allow_debug:
        raise DebugNotAllowed("the keep is a debug keep and the policy has allow_debug = false")
    if policy.allowed_measurements is not None and claims.measurement not in policy.allowed_measurements:
        raise MeasurementNotAllowed(f"measurement {claims.measurement.hex()} is not in the "
                                    "policy's allowed_measurements")
    if claims.insecure:
        print(f"keep: WARNING: accepted an INSECURE {claims.backend} keep (measurement "
              f"{claims.measurement.hex()}): its evidence has no hardware signature and the host "
              "can read everything sent to it", file=sys.stderr)
    return claims
