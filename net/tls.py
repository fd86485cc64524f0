"""The keep's TLS identity and the `ssl` contexts built from it.

Theory of operation
-------------------
A keep has one *identity*: a private key and the certificate chain that names its public key. It is
produced once at start by a `CertificateProvider`:

- `SelfSignedProvider` makes an ECDSA P-256 key inside the keep and a self-signed certificate for
  `localhost` (what Enarx does without a Steward);
- `FileCertificateProvider` loads a certificate and key the owner configured in keep.toml (the
  chain keeps the file's certificates only, re-serialised: it is exported to the host);
- an attestation provider (RA-TLS: evidence binding SHA-256 of the public key in an X.509
  extension) will plug in behind the same protocol later.

The private key never touches the host disk: Python's `ssl` only loads keys from a path, so the PEM
is written to an anonymous in-memory file (`memfd_create`) and loaded through `/proc/self/fd/N`.

Every context is TLS 1.3 only. Server contexts present the identity and optionally require a
client certificate chaining to a configured CA. Client contexts verify the server against the
system trust store, a configured CA file, and/or a pinned SHA-256 of its SubjectPublicKeyInfo
(checked by `check_pin` after the handshake, because `ssl` has no pinning hook).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from net.errors import CertificateError, PinMismatch
from net.files import InputFileError, open_regular_file, read_input_file

SELF_SIGNED_NAMES = ("localhost", "127.0.0.1", "::1")
SELF_SIGNED_VALIDITY = datetime.timedelta(days=365)
MAX_PEM_BYTES = 1 << 20  # a certificate chain or a key is a few KiB
MAX_CA_BYTES = 16 << 20  # a CA bundle: the system's holds ~150 certificates in ~220 KiB


@dataclass(frozen=True, repr=False)
class KeepIdentity:
    """The keep's key pair and certificate chain (leaf first), all PEM.

    `repr` is suppressed so that the key never lands in a log line or a traceback.
    """

    certificate_chain_pem: bytes
    private_key_pem: bytes

    def __post_init__(self) -> None:
        if b"-----BEGIN CERTIFICATE-----" not in self.certificate_chain_pem:
            raise CertificateError("the certificate chain holds no PEM certificate")
        if b"PRIVATE KEY-----" in self.certificate_chain_pem:  # it is exported to the host
            raise CertificateError("the certificate chain holds a private key")
        if b"PRIVATE KEY-----" not in self.private_key_pem:
            raise CertificateError("the private key is not a PEM private key")

    def __repr__(self) -> str:
        return f"KeepIdentity(spki_sha256={self.spki_sha256()})"

    @property
    def leaf(self) -> x509.Certificate:
        """The certificate that names the keep's public key."""
        return x509.load_pem_x509_certificate(self.certificate_chain_pem)

    def leaf_pem(self) -> bytes:
        """The leaf certificate alone, for clients to trust (`curl --cacert`)."""
        return self.leaf.public_bytes(serialization.Encoding.PEM)

    def spki_sha256(self) -> str:
        """Hex SHA-256 of the leaf's DER SubjectPublicKeyInfo (what a client pins)."""
        return spki_sha256(self.leaf)


class CertificateProvider(Protocol):
    """Something that gives the keep its TLS identity once, at start."""

    def identity(self) -> KeepIdentity:
        """Return the identity; called once per keep."""
        ...


@dataclass(frozen=True)
class SelfSignedProvider:
    """A fresh ECDSA P-256 key made in memory and a self-signed certificate for `names`."""

    names: tuple[str, ...] = SELF_SIGNED_NAMES
    validity: datetime.timedelta = SELF_SIGNED_VALIDITY

    def identity(self) -> KeepIdentity:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.names[0])])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + self.validity)
            .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in self.names]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(key, hashes.SHA256())
        )
        return KeepIdentity(
            certificate_chain_pem=certificate.public_bytes(serialization.Encoding.PEM),
            private_key_pem=key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()),
        )


@dataclass(frozen=True)
class FileCertificateProvider:
    """A certificate chain and private key the owner configured (PEM files)."""

    certificate_path: Path
    key_path: Path

    def identity(self) -> KeepIdentity:
        chain = _read_pem_file(self.certificate_path, "tls certificate")
        key = _read_pem_file(self.key_path, "tls key")
        identity = KeepIdentity(certificate_chain_pem=self._certificates_only(chain),
                                private_key_pem=self._checked_key(key))
        try:
            _load_identity(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), identity)  # key matches?
        except CertificateError as error:
            raise CertificateError(f"{self.certificate_path} and {self.key_path}: {error}") from None
        return identity

    def _certificates_only(self, chain: bytes) -> bytes:
        """The CERTIFICATE blocks of the configured file, re-serialised. The chain is exported
        to the host (`export_certificate`) and the file may also hold the key (`certificate =
        key = "combined.pem"`, a common layout): nothing but certificates may leave it."""
        if b"-----BEGIN CERTIFICATE-----" not in chain:
            raise CertificateError(f"{self.certificate_path}: holds no PEM certificate")
        try:
            certificates = x509.load_pem_x509_certificates(chain)
        except ValueError:  # cryptography's text is a parser dump: say what is wrong instead
            raise CertificateError(f"{self.certificate_path}: a PEM certificate in it is "
                                   "malformed (its DER does not parse)") from None
        return b"".join(certificate.public_bytes(serialization.Encoding.PEM)
                        for certificate in certificates)

    def _checked_key(self, key: bytes) -> bytes:
        """`key` once it is known to hold a usable private key: `ssl` would only say "PEM lib"
        (or nothing) about a bad one."""
        if b"PRIVATE KEY-----" not in key:
            raise CertificateError(f"{self.key_path}: holds no PEM private key")
        try:
            loaded = serialization.load_pem_private_key(key, password=None)
        except TypeError:
            raise CertificateError(f"{self.key_path}: the private key is encrypted (the keep "
                                   "needs it unencrypted)") from None
        except ValueError:
            raise CertificateError(f"{self.key_path}: the private key is malformed or of an "
                                   "unsupported type") from None
        if not _signs_tls13(loaded):  # it would load, then every handshake would fail
            kind = (f"ECDSA {loaded.curve.name}" if isinstance(loaded, ec.EllipticCurvePrivateKey)
                    else type(loaded).__name__.removesuffix("PrivateKey").lstrip("_"))
            raise CertificateError(f"{self.key_path}: {kind} keys cannot sign TLS 1.3 handshakes "
                                   "(use RSA, ECDSA P-256/P-384/P-521, Ed25519 or Ed448)")
        return key


def _signs_tls13(key: PrivateKeyTypes) -> bool:
    """Whether TLS 1.3 has a signature scheme for `key` (RFC 8446 4.2.3): RSA (PSS), ECDSA on
    P-256, P-384 or P-521 only, Ed25519, Ed448. Not DSA, not other curves, not X25519/DH."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1 | ec.SECP521R1)
    return isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)


def validity_problem(certificate: x509.Certificate,
                     now: datetime.datetime | None = None) -> str | None:
    """Why `certificate` is not valid at `now` (default: this moment), in words ("expired on
    ..."), or None. The keep still serves with it (a client that pins the key does not check
    dates), but an owner must hear why every other client refuses the handshake."""
    now = now or datetime.datetime.now(datetime.UTC)
    if now > certificate.not_valid_after_utc:
        return f"expired on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if now < certificate.not_valid_before_utc:
        return f"is not valid before {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    return None


def _read_pem_file(path: Path, what: str) -> bytes:
    """The bytes of keep.toml's `what` file (its "tls certificate", its "tls key"): a regular
    file of at most MAX_PEM_BYTES. Anything else is one CertificateError naming the path: a FIFO
    held the keep's start in open() for ever (even SIGTERM only restarted the call), /dev/zero
    or a huge file would fill memory (net.files)."""
    try:
        return read_input_file(path, MAX_PEM_BYTES)
    except OSError as error:
        raise CertificateError(f"cannot read {path}: {error.strerror}") from None
    except InputFileError as error:
        hint = " (not a PEM file?)" if error.reason.startswith("larger") else ""
        raise CertificateError(f"{what} {error}{hint}") from None


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def spki_sha256(certificate: x509.Certificate) -> str:
    """Hex SHA-256 of a certificate's DER SubjectPublicKeyInfo."""
    spki = certificate.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def _load_identity(context: ssl.SSLContext, identity: KeepIdentity) -> None:
    """Load the identity into `context` through an in-memory file, never the host disk."""
    fd = os.memfd_create("keep-identity", os.MFD_CLOEXEC)
    try:
        os.write(fd, identity.certificate_chain_pem + b"\n" + identity.private_key_pem)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    except ssl.SSLError as error:
        reason = ("the key does not match the certificate" if error.reason == "KEY_VALUES_MISMATCH"
                  else error.reason or error.strerror or str(error))  # reason can be None
        raise CertificateError(f"the certificate and key do not load: {reason}") from None
    finally:
        os.close(fd)


def _tls13_only(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def server_context(identity: KeepIdentity, client_ca: Path | None = None) -> ssl.SSLContext:
    """A TLS 1.3 server context presenting `identity`; with `client_ca`, clients must present a
    certificate chaining to it."""
    context = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_identity(context, identity)
    if client_ca is not None:
        _load_ca(context, client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@dataclass(frozen=True)
class ServerVerification:
    """How a connect socket checks the server it reached.

    With neither `ca_file` nor `pin_sha256`, the system trust store is used. With only a pin, the
    pin is the whole check (the certificate may be self-signed). With both, both must hold.
    """

    ca_file: Path | None = None
    pin_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.pin_sha256 is not None:
            pin = self.pin_sha256.lower().replace(":", "")
            if len(pin) != 64 or any(c not in "0123456789abcdef" for c in pin):
                raise ValueError("a SPKI pin is 64 hex digits (SHA-256)")
            object.__setattr__(self, "pin_sha256", pin)


def client_context(verification: ServerVerification,
                   identity: KeepIdentity | None = None) -> ssl.SSLContext:
    """A TLS 1.3 client context that checks the server as `verification` says and, when given,
    presents the keep's identity as client certificate (as Enarx does)."""
    context = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    if verification.ca_file is not None:
        _load_ca(context, verification.ca_file)
    elif verification.pin_sha256 is not None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if identity is not None:
        _load_identity(context, identity)
    return context


def check_pin(verification: ServerVerification, peer_certificate_der: bytes | None) -> None:
    """Raise PinMismatch unless the peer's certificate carries the pinned public key."""
    if verification.pin_sha256 is None:
        return
    if peer_certificate_der is None:
        raise PinMismatch("the server presented no certificate")
    try:  # OpenSSL, which took it, is laxer (BER) than cryptography's DER parser
        actual = spki_sha256(x509.load_der_x509_certificate(peer_certificate_der))
    except (ValueError, UnsupportedAlgorithm):  # cryptography's text is a parser dump
        raise PinMismatch("the server's certificate does not parse as DER, so its public key "
                          "cannot be checked against the pin") from None
    if not hmac.compare_digest(actual, verification.pin_sha256):
        raise PinMismatch(f"server public key SHA-256 {actual} does not match the pin")


def _load_ca(context: ssl.SSLContext, ca_file: Path) -> None:
    """Trust the certificates of `ca_file`, a regular file (net.files: a FIFO there held the
    keep's start for ever in OpenSSL's open). OpenSSL reads the very file that was checked,
    through /proc/self/fd, so that it parses as it always has (certificates and CRLs)."""
    try:
        with open_regular_file(ca_file, MAX_CA_BYTES) as descriptor:
            context.load_verify_locations(cafile=f"/proc/self/fd/{descriptor}")
    except FileNotFoundError:
        raise CertificateError(f"CA file {ca_file} does not exist") from None
    except InputFileError as error:
        raise CertificateError(f"CA file {error}") from None
    except ssl.SSLError as error:  # its str() carries OpenSSL's code and CPython's source line
        if error.reason == "NO_CERTIFICATE_OR_CRL_FOUND":
            raise CertificateError(f"CA file {ca_file} holds no PEM certificate") from None
        raise CertificateError(f"CA file {ca_file} does not load: a PEM certificate in it is "
                               f"malformed ({error.reason or 'PEM lib'})") from None
    except OSError as error:
        raise CertificateError(f"CA file {ca_file} does not load: "
                               f"{error.strerror or error}") from None
