"""RA-TLS on loopback: a keep-side trio server, an owner-side client that verifies the evidence
in the peer certificate of that very connection."""

from __future__ import annotations

import contextlib
import hashlib
import ssl

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from net.tls import server_context
from shim.attest import (
    NO_NONCE,
    AttestedCertificateProvider,
    AttestedIdentity,
    Conversation,
    Deploy,
    InsecureNilNotAllowed,
    KeepTLS,
    KeyBindingMismatch,
    NilBackend,
    NonceMismatch,
    Policy,
    ProtocolError,
    Refused,
    evidence_from_certificate,
    nonce_from_server_name,
    open_verified_stream,
    owner_client_context,
    server_name_for_nonce,
    verify_keep_certificate,
)

NIL_OK = Policy(allow_insecure_nil=True)


async def _serve_one_message(keep: KeepTLS, task_status: trio.TaskStatus[int]) -> None:
    """A keep that answers one deploy with a refusal (enough to show the channel works)."""
    context = keep.server_context()

    async def handle(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, context, server_side=True)
        conversation = Conversation("keep")
        try:
            while (message := conversation.next_message()) is None:
                conversation.receive_data(await stream.receive_some())
            assert isinstance(message, Deploy)
            await stream.send_all(conversation.send(Refused(f"got {len(message.workload)} bytes")))
        except (trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError):
            return  # the owner hung up (e.g. after refusing the evidence)
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


def test_the_nonce_travels_in_the_server_name() -> None:
    nonce = bytes(range(32))
    name = server_name_for_nonce(nonce)
    assert len(name.split(".")[0]) == 52 and name.endswith(".nonce.keepshim.invalid")
    assert nonce_from_server_name(name) == nonce
    assert nonce_from_server_name("example.com") is None
    assert nonce_from_server_name(None) is None
    assert nonce_from_server_name(name.upper()) is None


async def test_owner_verifies_the_certificate_of_this_very_connection() -> None:
    keep = KeepTLS(AttestedIdentity(), NilBackend())
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serve_one_message, keep)
        nonces = iter([b"\x11" * 32, b"\x22" * 32])
        for expected in (b"\x11" * 32, b"\x22" * 32):
            stream, claims = await open_verified_stream("127.0.0.1", port, NIL_OK,
                                                        nonce_source=lambda _size: next(nonces))
            # The evidence binds the key of this session and this connection's nonce.
            session_certificate = x509.load_der_x509_certificate(stream.getpeercert(binary_form=True))
            spki = session_certificate.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            assert spki == keep.identity.spki_der
            assert claims.report_data == hashlib.sha256(spki).digest() + expected
            assert stream.version() == "TLSv1.3"
            # ... and the channel carries the deploy protocol.
            owner = Conversation("owner")
            await stream.send_all(owner.send(Deploy(workload=b"\0asm")))
            while (reply := owner.next_message()) is None:
                owner.receive_data(await stream.receive_some())
            assert reply == Refused("got 4 bytes")
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_nil_keep_is_refused_over_tls_without_the_flag() -> None:
    keep = KeepTLS(AttestedIdentity(), NilBackend())
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serve_one_message, keep)
        with pytest.raises(InsecureNilNotAllowed):
            await open_verified_stream("127.0.0.1", port, Policy())
        nursery.cancel_scope.cancel()


async def test_a_client_without_a_nonce_gets_a_certificate_no_owner_accepts() -> None:
    keep = KeepTLS(AttestedIdentity(), NilBackend())
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serve_one_message, keep)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, owner_client_context(), server_hostname="keep.example")
        await stream.do_handshake()
        certificate = stream.getpeercert(binary_form=True)
        await trio.aclose_forcefully(stream)
        assert evidence_from_certificate(x509.load_der_x509_certificate(certificate))[0] == "nil"
        # Bound to the all-zero nonce: a replay of it to any owner fails the nonce check.
        assert verify_keep_certificate(certificate, NO_NONCE, NIL_OK).backend == "nil"
        with pytest.raises(NonceMismatch):
            verify_keep_certificate(certificate, b"\x33" * 32, NIL_OK)
        nursery.cancel_scope.cancel()


def test_the_keep_context_is_tls13_only() -> None:
    context = KeepTLS(AttestedIdentity(), NilBackend()).server_context()
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3


def test_the_attested_provider_gives_the_guest_sockets_a_nonce_bound_certificate() -> None:
    identity, nonce = AttestedIdentity(), b"\x55" * 32
    net_identity = AttestedCertificateProvider(identity, NilBackend(), nonce).identity()
    leaf = net_identity.leaf.public_bytes(serialization.Encoding.DER)
    claims = verify_keep_certificate(leaf, nonce, NIL_OK)
    assert claims.report_data[:32] == hashlib.sha256(identity.spki_der).digest()
    assert server_context(net_identity).minimum_version == ssl.TLSVersion.TLSv1_3


async def test_a_relay_that_shows_a_real_keeps_evidence_under_its_own_key_is_refused() -> None:
    """The attack channel binding stops: an impostor asks the real keep for evidence bound to the
    owner's nonce, then terminates TLS itself with its own key and that evidence."""
    real = KeepTLS(AttestedIdentity(), NilBackend())
    nonce = b"\x66" * 32
    async with trio.open_nursery() as nursery:
        real_port = await nursery.start(_serve_one_message, real)
        tcp = await trio.open_tcp_stream("127.0.0.1", real_port)
        probe = trio.SSLStream(tcp, owner_client_context(), server_hostname=server_name_for_nonce(nonce))
        await probe.do_handshake()
        stolen = x509.load_der_x509_certificate(probe.getpeercert(binary_form=True))
        await trio.aclose_forcefully(probe)
        # The real keep's evidence is genuine for this nonce:
        assert verify_keep_certificate(stolen.public_bytes(serialization.Encoding.DER), nonce, NIL_OK)

        impostor_key = AttestedIdentity()
        forged = (x509.CertificateBuilder().subject_name(stolen.subject).issuer_name(stolen.issuer)
                  .public_key(impostor_key.private_key.public_key()).serial_number(7)
                  .not_valid_before(stolen.not_valid_before_utc).not_valid_after(stolen.not_valid_after_utc)
                  .add_extension(stolen.extensions[0].value, critical=False)
                  .sign(impostor_key.private_key, hashes.SHA256()))
        context = server_context(impostor_key.net_identity(forged))

        async def impostor(stream: trio.SocketStream) -> None:
            tls = trio.SSLStream(stream, context, server_side=True)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await tls.do_handshake()
                await tls.receive_some()
            await trio.aclose_forcefully(tls)

        listeners = await nursery.start(trio.serve_tcp, impostor, 0)
        impostor_port = listeners[0].socket.getsockname()[1]
        with pytest.raises(KeyBindingMismatch, match=r"\(key binding\)"):
            await open_verified_stream("127.0.0.1", impostor_port, NIL_OK, nonce_source=lambda _n: nonce)
        nursery.cancel_scope.cancel()
