"""Attestation backends: where a keep's evidence comes from and how an owner checks it.

Theory of operation. A backend has two halves that never run in the same process in production:
the keep side `evidence(report_data) -> bytes` asks the platform (a TEE's firmware, or nothing on
`nil`) for a statement that binds the 64 bytes of report_data to the keep's measurement, and the
owner side `verify(evidence) -> Claims` checks that statement's own integrity (signature chain,
canonical form) and returns what it claims. Binding the claims to a key, a nonce and a policy is
the caller's job (see `_certificate.verify_keep_certificate`), so it is written once for every
backend.

The `nil` backend has no hardware: its evidence is a canonical JSON statement that anyone could
write. It says so (`"insecure": true`, no signature) and the verifier refuses it unless the owner
explicitly allows insecure keeps. Its measurement is still computed honestly, so an owner can at
least detect that a keep runs different shim code than the owner expects (against an honest host).

SEV-SNP, TDX and SGX are stubs: they raise BackendUnavailable with the reason (no device on this
machine, or not implemented yet) instead of pretending.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from shim import __version__
from shim.attest._errors import BackendUnavailable, MalformedEvidence

REPORT_DATA_BYTES: Final = 64
"""report_data is SHA-256(SPKI DER) (32 bytes) followed by the owner's nonce (32 bytes); 64 bytes
is the report_data size of SEV-SNP, TDX and SGX reports alike."""

MEASURED_PACKAGES: Final = ("net", "shim", "storage", "wasi_host")
"""The keepshim packages whose .py files make up the nil measurement."""

MEASURED_DEPENDENCIES: Final = ("apsw", "cryptography", "trio", "wasmtime")
"""Distributions whose versions are part of the nil keep's launch configuration."""

KNOWN_BACKENDS: Final = ("nil", "sev-snp", "tdx", "sgx")

NIL_FORMAT: Final = "keepshim-nil-evidence-v1"
NIL_WARNING: Final = ("nil backend: a plain process with no hardware isolation and no hardware "
                      "signature; anyone can forge this evidence and root on the host can read "
                      "the keep's memory")
_NIL_KEYS: Final = frozenset({"backend", "code_sha256", "debug", "format", "insecure",
                              "launch_config", "measurement", "report_data", "signature", "warning"})


@dataclass(frozen=True)
class Claims:
    """What verified evidence says about a keep.

    `measurement` identifies the code the keep runs (for nil: see `nil_measurement`); `report_data`
    is the 64 bytes the keep asked its backend to bind; `debug` is true when the keep's memory can
    be inspected by design; `insecure` is true when no hardware stands behind the evidence.
    `details` carries human-readable extras (versions, digests) for reports and logs."""

    backend: str
    measurement: bytes
    report_data: bytes
    debug: bool
    insecure: bool
    details: tuple[tuple[str, str], ...] = ()


class Backend(Protocol):
    """One attestation backend: keep-side evidence and owner-side verification."""

    @property
    def name(self) -> str: ...

    def evidence(self, report_data: bytes) -> bytes:
        """Keep side: evidence binding these 64 bytes of report_data to the keep."""
        ...

    def verify(self, evidence: bytes) -> Claims:
        """Owner side: check the evidence's own integrity and return its claims."""
        ...


def canonical_json(value: object) -> bytes:
    """The one JSON serialization used for evidence: sorted keys, no spaces, ASCII only."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def code_manifest(packages: tuple[str, ...] = MEASURED_PACKAGES) -> bytes:
    """`sha256sum` output for every .py file of the installed keepshim packages, sorted by path.

    The same bytes as `cd SRC && find net shim storage wasi_host -name '*.py' -not -path
    '*/__pycache__/*' | LC_ALL=C sort | xargs sha256sum`, so an owner can reproduce the digest
    with coreutils from a source checkout."""
    entries: list[tuple[str, str]] = []
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise BackendUnavailable(f"cannot measure the shim: package {package!r} is not installed")
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in root.rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            relative = f"{package}/{path.relative_to(root).as_posix()}"
            entries.append((relative, hashlib.sha256(path.read_bytes()).hexdigest()))
    entries.sort(key=lambda entry: entry[0].encode())
    return "".join(f"{digest}  {relative}\n" for relative, digest in entries).encode()


def launch_config() -> dict[str, str]:
    """The nil keep's configuration that is part of its measurement: interpreter and library
    versions (they are as much the keep's code as the .py files are)."""
    config = {"python": platform.python_version(), "implementation": platform.python_implementation(),
              "keepshim": __version__}
    for distribution in MEASURED_DEPENDENCIES:
        try:
            config[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            config[distribution] = "absent"
    return config


def nil_measurement(code_sha256: bytes, config: dict[str, str]) -> bytes:
    """measurement = SHA-256(canonical JSON {"code_sha256": hex, "launch_config": {...}})."""
    return hashlib.sha256(canonical_json({"code_sha256": code_sha256.hex(),
                                          "launch_config": config})).digest()


def expected_nil_measurement() -> bytes:
    """The measurement a nil keep running this very installation reports (for owners' policies)."""
    return nil_measurement(hashlib.sha256(code_manifest()).digest(), launch_config())


@dataclass(frozen=True)
class NilBackend:
    """The insecure software backend: a plain process, software evidence, no signature.

    `debug` states whether the keep was started in a debugging mode (tracebacks that may show
    secrets). The code is measured once, at the first evidence (the keep makes its first
    certificate when it starts), so later edits of the files on disk do not change it."""

    debug: bool = False
    name: str = "nil"

    @functools.cached_property
    def _measured(self) -> tuple[bytes, dict[str, str]]:
        return hashlib.sha256(code_manifest()).digest(), launch_config()

    def evidence(self, report_data: bytes) -> bytes:
        if len(report_data) != REPORT_DATA_BYTES:
            raise ValueError(f"report_data must be {REPORT_DATA_BYTES} bytes, not {len(report_data)}")
        code_sha256, config = self._measured
        return canonical_json({
            "backend": self.name,
            "code_sha256": code_sha256.hex(),
            "debug": self.debug,
            "format": NIL_FORMAT,
            "insecure": True,
            "launch_config": config,
            "measurement": nil_measurement(code_sha256, config).hex(),
            "report_data": report_data.hex(),
            "signature": None,
            "warning": NIL_WARNING,
        })

    def verify(self, evidence: bytes) -> Claims:
        """Check that the evidence is exactly what a nil keep writes: canonical JSON, every
        constant in place, hex in lower case, the measurement recomputed from its parts. A changed
        byte anywhere fails one of these. (It proves consistency, not origin: nil has no signer.)"""
        try:
            document = json.loads(evidence.decode("ascii"))
        except (UnicodeDecodeError, ValueError) as error:
            raise MalformedEvidence(f"nil evidence is not ASCII JSON: {error}") from None
        except RecursionError:  # '[' * 5000 fits in a certificate but not in Python's stack
            raise MalformedEvidence("nil evidence is not ASCII JSON: nested too deeply") from None
        if not isinstance(document, dict) or set(document) != _NIL_KEYS:
            raise MalformedEvidence("nil evidence does not have exactly the nil fields")
        if canonical_json(document) != evidence:
            raise MalformedEvidence("nil evidence is not in canonical form (a byte was changed)")
        expected_constants = {"backend": self.name, "format": NIL_FORMAT, "insecure": True,
                              "signature": None, "warning": NIL_WARNING}
        for key, expected in expected_constants.items():
            if document[key] != expected or type(document[key]) is not type(expected):
                raise MalformedEvidence(f"nil evidence field {key!r} is not {expected!r}")
        if not isinstance(document["debug"], bool):
            raise MalformedEvidence("nil evidence field 'debug' is not a boolean")
        config = document["launch_config"]
        if not isinstance(config, dict) or not all(
                isinstance(key, str) and isinstance(value, str) for key, value in config.items()):
            raise MalformedEvidence("nil evidence field 'launch_config' is not a table of strings")
        code_sha256 = _lower_hex(document, "code_sha256", 32)
        measurement = _lower_hex(document, "measurement", 32)
        report_data = _lower_hex(document, "report_data", REPORT_DATA_BYTES)
        if nil_measurement(code_sha256, config) != measurement:
            raise MalformedEvidence("nil evidence measurement does not match its code digest and "
                                    "launch configuration")
        details = (("code_sha256", code_sha256.hex()),
                   *sorted((f"launch_config.{key}", value) for key, value in config.items()))
        return Claims(backend=self.name, measurement=measurement, report_data=report_data,
                      debug=document["debug"], insecure=True, details=details)


def _lower_hex(document: dict[str, object], key: str, size: int) -> bytes:
    """Decode a field that must be exactly `size` bytes of lower-case hex."""
    value = document[key]
    if (not isinstance(value, str) or len(value) != 2 * size
            or any(character not in "0123456789abcdef" for character in value)):
        raise MalformedEvidence(f"nil evidence field {key!r} is not {size} bytes of lower-case hex")
    return bytes.fromhex(value)


@dataclass(frozen=True)
class UnsupportedBackend:
    """A hardware backend this version cannot use: both halves raise BackendUnavailable.

    The keep side names the missing guest device when it is absent ("not supported on this
    machine"); where the device exists it still refuses, because producing and checking that
    evidence (and its vendor certificate chain) is not implemented yet."""

    name: str
    device: str

    def _refuse(self, action: str) -> BackendUnavailable:
        if not os.path.exists(self.device):
            return BackendUnavailable(f"{self.name} is not supported on this machine "
                                      f"({self.device} is missing); cannot {action}")
        return BackendUnavailable(f"{self.name} is not supported by this keepshim version yet; "
                                  f"cannot {action}")

    def evidence(self, report_data: bytes) -> bytes:
        raise self._refuse(f"produce {self.name} evidence")

    def verify(self, evidence: bytes) -> Claims:
        raise BackendUnavailable(f"verifying {self.name} evidence is not supported by this "
                                 "keepshim version yet")


def backend_named(name: str, *, debug: bool = False) -> Backend:
    """The backend called `name` (one of KNOWN_BACKENDS); BackendUnavailable for any other."""
    if name == "nil":
        return NilBackend(debug=debug)
    devices = {"sev-snp": "/dev/sev-guest", "tdx": "/dev/tdx_guest", "sgx": "/dev/sgx_enclave"}
    if name in devices:
        return UnsupportedBackend(name=name, device=devices[name])
    raise BackendUnavailable(f"unknown attestation backend {name!r} (known: {', '.join(KNOWN_BACKENDS)})")
