"""The exceptions of shim.attest: one flat module, one class per refusal reason.

Every refusal of a keep's evidence is an `EvidenceRefused` subclass whose `check` names the check
that failed, and whose message starts with `attestation refused (CHECK):` so an owner reading the
CLI's one line knows exactly which check failed. All are KeepErrors: the CLI prints them as one
line and exits with status 1, never with a traceback.
"""

from __future__ import annotations

from shim.errors import KeepError


class AttestationError(KeepError):
    """Base of everything shim.attest raises on purpose."""


class EvidenceRefused(AttestationError):
    """The owner's verifier refused a keep. `check` names the failed check."""

    check: str = "evidence"

    def __init__(self, detail: str) -> None:
        super().__init__(f"attestation refused ({self.check}): {detail}")
        self.detail = detail


class MalformedEvidence(EvidenceRefused):
    """The certificate or evidence bytes do not parse, or are not in canonical form (a changed byte)."""

    check = "malformed evidence"


class SignatureInvalid(EvidenceRefused):
    """A signature over the certificate or the evidence does not verify."""

    check = "signature"


class NonceMismatch(EvidenceRefused):
    """The evidence binds another nonce than the one this owner sent: stale or replayed."""

    check = "nonce"


class KeyBindingMismatch(EvidenceRefused):
    """The evidence binds another public key than the one in the certificate / TLS session."""

    check = "key binding"


class MeasurementNotAllowed(EvidenceRefused):
    """The keep's measurement is not in the policy's allowed list."""

    check = "measurement"


class BackendNotAllowed(EvidenceRefused):
    """The keep's backend is not in the policy's allowed list."""

    check = "backend"


class InsecureNilNotAllowed(EvidenceRefused):
    """The keep runs on the insecure `nil` backend and the owner did not pass --allow-insecure-nil."""

    check = "insecure nil"


class DebugNotAllowed(EvidenceRefused):
    """The keep is a debug keep (its memory can be inspected) and the policy forbids debug keeps."""

    check = "debug"


class VolumeGenerationTooOld(AttestationError):
    """A pinned or returned volume generation is below the policy's minimum (a rollback)."""


class BackendUnavailable(AttestationError):
    """This machine cannot produce (or this version cannot check) evidence of that backend."""


class PolicyError(AttestationError):
    """A policy.toml is unreadable or invalid; the message names the key."""
