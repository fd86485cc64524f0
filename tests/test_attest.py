"""Attestation core: nil evidence, RA-TLS certificates, the owner's verifier and policy.toml."""

from __future__ import annotations

import datetime
import hashlib
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

import shim
from shim.attest import (
    EVIDENCE_OIDS,
    NONCE_BYTES,
    AttestedIdentity,
    BackendNotAllowed,
    BackendUnavailable,
    DebugNotAllowed,
    EvidenceRefused,
    InsecureNilNotAllowed,
    KeyBindingMismatch,
    MalformedEvidence,
    MeasurementNotAllowed,
    NilBackend,
    NonceMismatch,
    Policy,
    PolicyError,
    SignatureInvalid,
    backend_named,
    code_manifest,
    evidence_from_certificate,
    expected_nil_measurement,
    load_policy,
    parse_policy,
    report_data_for,
    verify_keep_certificate,
)
from shim.attest._certificate import der_octet_string
from shim.errors import KeepError

NONCE = bytes(range(1, NONCE_BYTES + 1))
NIL_OK = Policy(allow_insecure_nil=True)


def _der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(Encoding.DER)


def _builder(identity: AttestedIdentity, serial: int = 1) -> x509.CertificateBuilder:
    """A certificate builder for `identity`'s key, with no extension yet."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keepshim keep")])
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(identity.private_key.public_key()).serial_number(serial)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(hours=1)))


def _certificate_with_evidence(identity: AttestedIdentity, evidence: bytes, backend: str = "nil") -> bytes:
    """A certificate signed by `identity` carrying arbitrary evidence bytes (forged or tampered)."""
    extension = x509.UnrecognizedExtension(EVIDENCE_OIDS[backend], der_octet_string(evidence))
    return _der(_builder(identity).add_extension(extension, critical=False)
                .sign(identity.private_key, hashes.SHA256()))


def test_nil_certificate_is_accepted_with_the_flag_and_warns(capsys: pytest.CaptureFixture[str]) -> None:
    identity = AttestedIdentity()
    claims = verify_keep_certificate(_der(identity.certificate(NilBackend(), NONCE)), NONCE, NIL_OK)
    assert claims.backend == "nil" and claims.insecure and not claims.debug
    assert claims.report_data == hashlib.sha256(identity.spki_der).digest() + NONCE
    assert claims.measurement == expected_nil_measurement()
    assert "WARNING: accepted an INSECURE nil keep" in capsys.readouterr().err


def test_every_acceptance_of_nil_warns_again(capsys: pytest.CaptureFixture[str]) -> None:
    identity = AttestedIdentity()
    certificate = _der(identity.certificate(NilBackend(), NONCE))
    for _ in range(3):
        verify_keep_certificate(certificate, NONCE, NIL_OK)
    assert capsys.readouterr().err.count("WARNING") == 3


def test_nil_without_allow_flag_is_refused() -> None:
    identity = AttestedIdentity()
    with pytest.raises(InsecureNilNotAllowed, match=r"\(insecure nil\).*--allow-insecure-nil"):
        verify_keep_certificate(_der(identity.certificate(NilBackend(), NONCE)), NONCE, Policy())


def test_wrong_nonce_is_refused() -> None:
    certificate = _der(AttestedIdentity().certificate(NilBackend(), NONCE))
    with pytest.raises(NonceMismatch, match=r"\(nonce\)"):
        verify_keep_certificate(certificate, bytes(NONCE_BYTES), NIL_OK)


def test_evidence_bound_to_another_key_is_refused() -> None:
    keep, thief = AttestedIdentity(), AttestedIdentity()
    stolen_evidence = NilBackend().evidence(report_data_for(keep.spki_der, NONCE))
    with pytest.raises(KeyBindingMismatch, match=r"\(key binding\)"):
        verify_keep_certificate(_certificate_with_evidence(thief, stolen_evidence), NONCE, NIL_OK)


def test_disallowed_measurement_is_refused_and_named() -> None:
    certificate = _der(AttestedIdentity().certificate(NilBackend(), NONCE))
    policy = replace(NIL_OK, allowed_measurements=frozenset({bytes(32)}))
    with pytest.raises(MeasurementNotAllowed, match=expected_nil_measurement().hex()):
        verify_keep_certificate(certificate, NONCE, policy)
    allowed = replace(NIL_OK, allowed_measurements=frozenset({expected_nil_measurement()}))
    assert verify_keep_certificate(certificate, NONCE, allowed).backend == "nil"


def test_backend_missing_from_policy_is_refused() -> None:
    certificate = _der(AttestedIdentity().certificate(NilBackend(), NONCE))
    with pytest.raises(BackendNotAllowed, match=r"\(backend\)"):
        verify_keep_certificate(certificate, NONCE, replace(NIL_OK, allowed_backends=frozenset({"sev-snp"})))


def test_debug_keep_is_refused_unless_policy_allows_debug() -> None:
    certificate = _der(AttestedIdentity().certificate(NilBackend(debug=True), NONCE))
    with pytest.raises(DebugNotAllowed, match=r"\(debug\)"):
        verify_keep_certificate(certificate, NONCE, NIL_OK)
    assert verify_keep_certificate(certificate, NONCE, replace(NIL_OK, allow_debug=True)).debug


def test_a_changed_byte_anywhere_in_the_evidence_is_refused() -> None:
    identity = AttestedIdentity()
    evidence = NilBackend().evidence(report_data_for(identity.spki_der, NONCE))
    assert verify_keep_certificate(_certificate_with_evidence(identity, evidence), NONCE, NIL_OK)
    checks: set[str] = set()
    for position in range(len(evidence)):
        for flip in (0x01, 0x20):
            tampered = bytearray(evidence)
            tampered[position] ^= flip
            with pytest.raises(EvidenceRefused) as refusal:
                verify_keep_certificate(_certificate_with_evidence(identity, bytes(tampered)), NONCE, NIL_OK)
            checks.add(refusal.value.check)
    # The check that fires says why: mostly canonical form, but a changed hex digit of report_data
    # shows up as a wrong key binding or nonce.
    assert {"malformed evidence", "key binding", "nonce"} <= checks


def test_a_changed_byte_in_the_certificate_is_refused() -> None:
    certificate = bytearray(_der(AttestedIdentity().certificate(NilBackend(), NONCE)))
    refused = 0
    for position in range(0, len(certificate), 7):
        tampered = bytearray(certificate)
        tampered[position] ^= 0x01
        with pytest.raises(EvidenceRefused):
            verify_keep_certificate(bytes(tampered), NONCE, NIL_OK)
        refused += 1
    assert refused > 50


def test_certificate_signed_by_another_key_is_refused() -> None:
    keep, other = AttestedIdentity(), AttestedIdentity()
    template = keep.certificate(NilBackend(), NONCE)
    forged = (_builder(keep, serial=2).add_extension(template.extensions[0].value, critical=False)
              .sign(other.private_key, hashes.SHA256()))
    with pytest.raises(SignatureInvalid, match=r"\(signature\)"):
        verify_keep_certificate(_der(forged), NONCE, NIL_OK)


def test_certificate_without_evidence_is_malformed() -> None:
    identity = AttestedIdentity()
    bare = _builder(identity, serial=3).sign(identity.private_key, hashes.SHA256())
    with pytest.raises(MalformedEvidence, match="0 keepshim evidence extensions"):
        verify_keep_certificate(_der(bare), NONCE, NIL_OK)
    with pytest.raises(MalformedEvidence):
        verify_keep_certificate(b"not a certificate", NONCE, NIL_OK)


def test_certificate_with_two_evidence_extensions_is_malformed() -> None:
    identity = AttestedIdentity()
    evidence = NilBackend().evidence(report_data_for(identity.spki_der, NONCE))
    both = (_builder(identity)
            .add_extension(x509.UnrecognizedExtension(EVIDENCE_OIDS["nil"], der_octet_string(evidence)),
                           critical=False)
            .add_extension(x509.UnrecognizedExtension(EVIDENCE_OIDS["sev-snp"], der_octet_string(b"x")),
                           critical=False)
            .sign(identity.private_key, hashes.SHA256()))
    with pytest.raises(MalformedEvidence, match="2 keepshim evidence extensions"):
        verify_keep_certificate(_der(both), NONCE, NIL_OK)


def test_certificate_carries_nil_evidence_under_the_documented_oid() -> None:
    certificate = AttestedIdentity().certificate(NilBackend(), NONCE)
    extension = certificate.extensions.get_extension_for_oid(
        x509.ObjectIdentifier("2.25.104800065238602234654380733802874138067.1.1"))
    assert not extension.critical
    backend, evidence = evidence_from_certificate(certificate)
    assert backend == "nil" and b'"insecure":true' in evidence and b'"signature":null' in evidence


def test_hardware_backends_do_not_pretend() -> None:
    for name in ("sev-snp", "tdx", "sgx"):
        backend = backend_named(name)
        with pytest.raises(BackendUnavailable, match=name):
            backend.evidence(bytes(64))
        with pytest.raises(BackendUnavailable, match="not supported"):
            backend.verify(b"{}")
    with pytest.raises(BackendUnavailable, match="unknown attestation backend"):
        backend_named("trustzone")


def test_hardware_backend_missing_device_says_not_supported_on_this_machine() -> None:
    backend = backend_named("sev-snp")
    if Path("/dev/sev-guest").exists():
        pytest.skip("this machine has /dev/sev-guest")
    with pytest.raises(BackendUnavailable, match="not supported on this machine"):
        backend.evidence(bytes(64))


def test_nil_measurement_is_reproducible_with_coreutils() -> None:
    source = Path(shim.__file__).resolve().parent.parent
    listing = subprocess.run(
        "find net shim storage wasi_host -name '*.py' -not -path '*/__pycache__/*' "
        "| LC_ALL=C sort | xargs sha256sum",
        shell=True, cwd=source, check=True, capture_output=True).stdout
    assert listing == code_manifest()


# policy.toml


def test_policy_parses_every_key(tmp_path: Path) -> None:
    digest = "ab" * 32
    path = tmp_path / "policy.toml"
    path.write_text(f'allowed_backends = ["nil", "sev-snp"]\nallowed_measurements = ["{digest}"]\n'
                    "min_volume_generation = 7\nallow_debug = true\n")
    policy = load_policy(path, allow_insecure_nil=True)
    assert policy == Policy(allowed_backends=frozenset({"nil", "sev-snp"}),
                            allowed_measurements=frozenset({bytes.fromhex(digest)}),
                            min_volume_generation=7, allow_debug=True, allow_insecure_nil=True)
    assert parse_policy("") == Policy()


@pytest.mark.parametrize(("text", "named"), [
    ("colour = 1", "unknown key 'colour'"),
    ("allow_insecure_nil = true", "--allow-insecure-nil"),
    ('allowed_backends = "nil"', "allowed_backends must be a list of strings"),
    ('allowed_backends = ["nil", "trustzone"]', "unknown backend 'trustzone'"),
    ("allowed_backends = []", "allowed_backends is empty"),
    ('allowed_measurements = ["xyz"]', "allowed_measurements[0]"),
    (f'allowed_measurements = ["{"ab" * 32}", "{"ab" * 31}"]', "allowed_measurements[1]"),
    ("allowed_measurements = []", "allowed_measurements is empty"),
    ("min_volume_generation = -1", "min_volume_generation"),
    ("min_volume_generation = true", "min_volume_generation"),
    ('min_volume_generation = "3"', "min_volume_generation"),
    ('allow_debug = "yes"', "allow_debug"),
    ("allow_debug = ", "not valid TOML"),
])
def test_bad_policy_is_a_clear_error_naming_the_key(text: str, named: str) -> None:
    with pytest.raises(PolicyError, match=re.escape(named)) as error:
        parse_policy(text, source="p.toml")
    assert isinstance(error.value, KeepError) and str(error.value).startswith("p.toml: ")


def test_missing_policy_file_is_a_keep_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy"):
        load_policy(tmp_path / "absent.toml")


def test_a_deeply_nested_policy_is_a_policy_error() -> None:
    with pytest.raises(PolicyError, match=r"p\.toml: not valid TOML: nested too deeply"):
        parse_policy("a = " + "[" * 5000 + "]" * 5000 + "\n", source="p.toml")
