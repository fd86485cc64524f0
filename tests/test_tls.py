"""net.tls: the keep's identity, TLS 1.3-only contexts, client-certificate checks and pinning,
exercised with real handshakes over loopback (trio) against Python's ssl and trustme."""

from __future__ import annotations

import datetime
import functools
import ssl
from pathlib import Path

import pytest
import trio
import trustme
from cryptography import x509

from net.errors import CertificateError, PinMismatch, PlaintextRefused
from net.policy import NetworkPolicy
from net.tls import (
    FileCertificateProvider,
    SelfSignedProvider,
    ServerVerification,
    check_pin,
    client_context,
    server_context,
    spki_sha256,
)


def test_self_signed_identity_names_localhost_and_keeps_the_key_out_of_repr() -> None:
    identity = SelfSignedProvider().identity()
    leaf = identity.leaf
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc > datetime.timedelta(days=364)
    assert "PRIVATE" not in repr(identity) and identity.spki_sha256() in repr(identity)
    assert b"PRIVATE" not in identity.leaf_pem()
    assert SelfSignedProvider().identity().spki_sha256() != identity.spki_sha256()  # fresh keys


def test_configured_certificate_must_match_its_key(tmp_path: Path) -> None:
    ca = trustme.CA()
    first, second = ca.issue_cert("a.example"), ca.issue_cert("b.example")
    first.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    first.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    second.private_key_pem.write_to_path(str(tmp_path / "other-key.pem"))
    identity = FileCertificateProvider(tmp_path / "cert.pem", tmp_path / "key.pem").identity()
    assert identity.leaf.subject == x509.load_pem_x509_certificate(
        first.cert_chain_pems[0].bytes()).subject
    with pytest.raises(CertificateError, match="do not load"):
        FileCertificateProvider(tmp_path / "cert.pem", tmp_path / "other-key.pem").identity()
    with pytest.raises(CertificateError, match="cannot read"):
        FileCertificateProvider(tmp_path / "missing.pem", tmp_path / "key.pem").identity()


def test_pins_are_64_hex_digits_and_compared_to_the_spki() -> None:
    identity = SelfSignedProvider().identity()
    der = identity.leaf.public_bytes(serialization_der())
    check_pin(ServerVerification(pin_sha256=identity.spki_sha256().upper()), der)
    with pytest.raises(PinMismatch):
        check_pin(ServerVerification(pin_sha256="00" * 32), der)
    with pytest.raises(PinMismatch, match="no certificate"):
        check_pin(ServerVerification(pin_sha256="00" * 32), None)
    with pytest.raises(ValueError, match="64 hex"):
        ServerVerification(pin_sha256="abcd")
    assert spki_sha256(identity.leaf) == identity.spki_sha256()


def serialization_der():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


def test_plaintext_policy_needs_an_explicit_opt_in() -> None:
    NetworkPolicy().check("web", "tls", entry_allows_plaintext=False)
    NetworkPolicy().check("web", "tcp", entry_allows_plaintext=True)
    NetworkPolicy(allow_plaintext=True).check("web", "tcp", entry_allows_plaintext=False)
    with pytest.raises(PlaintextRefused, match='"web" uses prot = "tcp"'):
        NetworkPolicy().check("web", "tcp", entry_allows_plaintext=False)


async def _handshake(server: ssl.SSLContext, client: ssl.SSLContext,
                     server_hostname: str = "localhost") -> str:
    """Run one handshake over loopback; returns the negotiated version or raises."""
    result: list[str] = []
    failures: list[trio.BrokenResourceError] = []

    async def serve(stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            await stream.do_handshake()
            await stream.send_all(b"ok")
        except trio.BrokenResourceError:
            pass

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_ssl_over_tcp, serve, 0, server, host="127.0.0.1"))
            port = listeners[0].transport_listener.socket.getsockname()[1]
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            stream = trio.SSLStream(tcp, client, server_hostname=server_hostname)
            try:
                await stream.do_handshake()
                assert await stream.receive_some(2) == b"ok"
                result.append(stream.version() or "")
            except trio.BrokenResourceError as error:  # re-raised outside the nursery's group
                failures.append(error)
            finally:
                nursery.cancel_scope.cancel()
    if failures:
        raise failures[0]
    return result[0]


async def test_server_context_is_tls13_only_and_trusted_through_the_exported_cert() -> None:
    identity = SelfSignedProvider().identity()
    server = server_context(identity)
    client = client_context(ServerVerification(pin_sha256=identity.spki_sha256()))
    assert await _handshake(server, client) == "TLSv1.3"
    trusting = ssl.create_default_context(cadata=identity.leaf_pem().decode())
    assert await _handshake(server, trusting) == "TLSv1.3"
    old_client = ssl.create_default_context(cadata=identity.leaf_pem().decode())
    old_client.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(trio.BrokenResourceError):
        await _handshake(server, old_client)


async def test_client_certificates_are_checked_against_the_configured_ca(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    identity = SelfSignedProvider().identity()
    server = server_context(identity, client_ca=tmp_path / "ca.pem")
    good = ssl.create_default_context(cadata=identity.leaf_pem().decode())
    ca.issue_cert("client").configure_cert(good)
    assert await _handshake(server, good) == "TLSv1.3"
    anonymous = ssl.create_default_context(cadata=identity.leaf_pem().decode())
    with pytest.raises(trio.BrokenResourceError):
        await _handshake(server, anonymous)


async def test_client_context_verifies_with_a_ca_file_and_sni(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("db.internal").configure_cert(server)
    client = client_context(ServerVerification(ca_file=tmp_path / "ca.pem"))
    assert await _handshake(server, client, server_hostname="db.internal") == "TLSv1.3"
    with pytest.raises(trio.BrokenResourceError):
        await _handshake(server, client, server_hostname="other.internal")
    system_roots = client_context(ServerVerification())
    with pytest.raises(trio.BrokenResourceError):
        await _handshake(server, system_roots, server_hostname="db.internal")
    with pytest.raises(CertificateError, match="does not exist"):
        client_context(ServerVerification(ca_file=tmp_path / "missing.pem"))


def test_a_combined_pem_gives_an_identity_whose_chain_holds_certificates_only(
        tmp_path: Path) -> None:
    ca = trustme.CA()
    issued = ca.issue_cert("a.example")
    combined = tmp_path / "combined.pem"
    combined.write_bytes(issued.private_key_pem.bytes() + b"\n"
                         + b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    identity = FileCertificateProvider(combined, combined).identity()
    assert b"PRIVATE" not in identity.certificate_chain_pem
    assert len(x509.load_pem_x509_certificates(identity.certificate_chain_pem)) == len(
        issued.cert_chain_pems)
    assert identity.leaf.subject == x509.load_pem_x509_certificate(
        issued.cert_chain_pems[0].bytes()).subject
    server_context(identity)  # the chain and the key still load together


BAD_CERTIFICATE = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
BAD_KEY = b"-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n"


@pytest.mark.parametrize(("certificate", "key", "named", "problem"), [
    (BAD_CERTIFICATE, None, "cert.pem", "a PEM certificate in it is malformed"),
    (b"no PEM here\n", None, "cert.pem", "holds no PEM certificate"),
    (None, BAD_KEY, "key.pem", "the private key is malformed or of an unsupported type"),
    (None, b"no PEM here\n", "key.pem", "holds no PEM private key"),
    (None, "other", "cert.pem and", "the key does not match the certificate"),
], ids=["malformed-certificate", "no-certificate", "malformed-key", "no-key", "mismatch"])
def test_a_bad_configured_certificate_or_key_names_the_file_and_the_problem(
        tmp_path: Path, certificate: bytes | None, key: bytes | str | None, named: str,
        problem: str) -> None:
    ca = trustme.CA()
    issued = ca.issue_cert("a.example")
    (tmp_path / "cert.pem").write_bytes(certificate or issued.cert_chain_pems[0].bytes())
    if key == "other":
        key = ca.issue_cert("b.example").private_key_pem.bytes()
    assert not isinstance(key, str)
    (tmp_path / "key.pem").write_bytes(key or issued.private_key_pem.bytes())
    with pytest.raises(CertificateError) as raised:
        FileCertificateProvider(tmp_path / "cert.pem", tmp_path / "key.pem").identity()
    message = str(raised.value)
    assert f"{tmp_path / named}" in message and problem in message, message
    assert "None" not in message and "\n" not in message
