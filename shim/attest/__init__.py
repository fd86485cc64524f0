"""Attestation and encrypted delivery: RA-TLS identity, backends, policy, deploy protocol.

Layering (each module imports only those above it):

    _errors       the flat exception hierarchy (KeepError subclasses; refusals name their check)
    _backends     Claims, the Backend protocol, `nil` and the hardware stubs, the nil measurement
    _policy       the owner's policy.toml
    _certificate  the keep's in-memory key, RA-TLS certificates, verify_keep_certificate
    _protocol     the sans-I/O deploy protocol (frames, messages, conversation state)
    _tls          RA-TLS over trio: a nonce-bound certificate per connection (SNI), owner client

Nothing here imports wasmtime, storage or net; wiring a deployment to the guest runner lives in
the serve/deploy modules that use this package.
"""

from shim.attest._backends import (
    KNOWN_BACKENDS,
    REPORT_DATA_BYTES,
    Backend,
    Claims,
    NilBackend,
    UnsupportedBackend,
    backend_named,
    code_manifest,
    expected_nil_measurement,
    launch_config,
    nil_measurement,
)
from shim.attest._certificate import (
    EVIDENCE_OID_ARC,
    EVIDENCE_OIDS,
    KEEPSHIM_OID_ARC,
    NO_NONCE,
    NONCE_BYTES,
    AttestedIdentity,
    evidence_from_certificate,
    report_data_for,
    verify_keep_certificate,
)
from shim.attest._errors import (
    AttestationError,
    BackendNotAllowed,
    BackendUnavailable,
    DebugNotAllowed,
    EvidenceRefused,
    InsecureNilNotAllowed,
    KeyBindingMismatch,
    MalformedEvidence,
    MeasurementNotAllowed,
    NonceMismatch,
    PolicyError,
    SignatureInvalid,
    VolumeGenerationTooOld,
)
from shim.attest._policy import Policy, load_policy, parse_policy
from shim.attest._protocol import (
    Accepted,
    Conversation,
    Deploy,
    Finished,
    LocalProtocolError,
    Message,
    Output,
    ProtocolError,
    Refused,
    RemoteProtocolError,
    VolumeGrant,
    VolumeState,
    encode_message,
)
from shim.attest._tls import (
    OWNER_HANDSHAKE_SECONDS,
    AttestedCertificateProvider,
    KeepTLS,
    nonce_from_server_name,
    open_verified_stream,
    owner_client_context,
    server_name_for_nonce,
)

__all__ = [
    "EVIDENCE_OIDS",
    "EVIDENCE_OID_ARC",
    "KEEPSHIM_OID_ARC",
    "KNOWN_BACKENDS",
    "NONCE_BYTES",
    "NO_NONCE",
    "OWNER_HANDSHAKE_SECONDS",
    "REPORT_DATA_BYTES",
    "Accepted",
    "AttestationError",
    "AttestedCertificateProvider",
    "AttestedIdentity",
    "Backend",
    "BackendNotAllowed",
    "BackendUnavailable",
    "Claims",
    "Conversation",
    "DebugNotAllowed",
    "Deploy",
    "EvidenceRefused",
    "Finished",
    "InsecureNilNotAllowed",
    "KeepTLS",
    "KeyBindingMismatch",
    "LocalProtocolError",
    "MalformedEvidence",
    "MeasurementNotAllowed",
    "Message",
    "NilBackend",
    "NonceMismatch",
    "Output",
    "Policy",
    "PolicyError",
    "ProtocolError",
    "Refused",
    "RemoteProtocolError",
    "SignatureInvalid",
    "UnsupportedBackend",
    "VolumeGenerationTooOld",
    "VolumeGrant",
    "VolumeState",
    "backend_named",
    "code_manifest",
    "encode_message",
    "evidence_from_certificate",
    "expected_nil_measurement",
    "launch_config",
    "load_policy",
    "nil_measurement",
    "nonce_from_server_name",
    "open_verified_stream",
    "owner_client_context",
    "parse_policy",
    "report_data_for",
    "server_name_for_nonce",
    "verify_keep_certificate",
]
