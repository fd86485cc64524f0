"""The owner's policy: which keeps may receive a workload (policy.toml).

Example:

    allowed_backends = ["sev-snp", "nil"]     # default: every known backend
    allowed_measurements = ["3f0a...64 hex"]   # default (key absent): any measurement
    min_volume_generation = 12                 # default 0
    allow_debug = false                        # default false

`--allow-insecure-nil` is deliberately NOT a policy key: accepting forgeable evidence must be
asked for on the command line of each deployment, where the operator sees it. Unknown keys,
wrong types and bad hex are PolicyErrors that name the key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from net.files import InputFileError, read_input_file
from shim.attest._backends import KNOWN_BACKENDS
from shim.attest._errors import PolicyError
from shim.config import MAX_CONFIG_BYTES, MAX_DOTTED_KEY_PARTS, long_dotted_key_line


@dataclass(frozen=True)
class Policy:
    """What the owner accepts. `allowed_measurements is None` accepts any measurement."""

    allowed_backends: frozenset[str] = field(default_factory=lambda: frozenset(KNOWN_BACKENDS))
    allowed_measurements: frozenset[bytes] | None = None
    min_volume_generation: int = 0
    allow_debug: bool = False
    allow_insecure_nil: bool = False

    def __post_init__(self) -> None:
        unknown = self.allowed_backends - set(KNOWN_BACKENDS)
        if unknown:
            raise PolicyError(f"unknown backends {sorted(unknown)} (known: {', '.join(KNOWN_BACKENDS)})")
        if self.min_volume_generation < 0:
            raise PolicyError("min_volume_generation must not be negative")


_KEYS = ("allowed_backends", "allowed_measurements", "min_volume_generation", "allow_debug")


def parse_policy(text: str, *, source: str = "policy.toml", allow_insecure_nil: bool = False) -> Policy:
    """Parse policy TOML text; `source` names the file in error messages."""
    if (line := long_dotted_key_line(text)) is not None:  # tomllib is quadratic in them
        raise PolicyError(f"{source}:{line}: a dotted key of more than {MAX_DOTTED_KEY_PARTS} "
                          "parts (policy keys have one)")
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise PolicyError(f"{source}: not valid TOML: {error}") from None
    except RecursionError:  # tomllib recurses per nesting level
        raise PolicyError(f"{source}: not valid TOML: nested too deeply") from None
    for key in table:
        if key == "allow_insecure_nil":
            raise PolicyError(f"{source}: allow_insecure_nil is not a policy key; pass "
                              "--allow-insecure-nil to the deployment that needs it")
        if key not in _KEYS:
            raise PolicyError(f"{source}: unknown key {key!r} (known: {', '.join(_KEYS)})")

    backends = frozenset(KNOWN_BACKENDS)
    if "allowed_backends" in table:
        names = _string_list(table["allowed_backends"], source, "allowed_backends")
        for name in names:
            if name not in KNOWN_BACKENDS:
                raise PolicyError(f"{source}: allowed_backends: unknown backend {name!r} "
                                  f"(known: {', '.join(KNOWN_BACKENDS)})")
        if not names:
            raise PolicyError(f"{source}: allowed_backends is empty: no keep could ever be accepted")
        backends = frozenset(names)

    measurements: frozenset[bytes] | None = None
    if "allowed_measurements" in table:
        values = _string_list(table["allowed_measurements"], source, "allowed_measurements")
        if not values:
            raise PolicyError(f"{source}: allowed_measurements is empty: no keep could ever be "
                              "accepted (omit the key to accept any measurement)")
        decoded = []
        for index, value in enumerate(values):
            try:
                digest = bytes.fromhex(value)
            except ValueError:
                digest = b""
            if len(digest) not in (32, 48):
                raise PolicyError(f"{source}: allowed_measurements[{index}]: {value!r} is not a "
                                  "SHA-256 or SHA-384 digest in hex (64 or 96 hex digits)")
            decoded.append(digest)
        measurements = frozenset(decoded)

    generation = table.get("min_volume_generation", 0)
    if type(generation) is not int or generation < 0:
        raise PolicyError(f"{source}: min_volume_generation must be a non-negative integer, "
                          f"not {generation!r}")
    allow_debug = table.get("allow_debug", False)
    if type(allow_debug) is not bool:
        raise PolicyError(f"{source}: allow_debug must be true or false, not {allow_debug!r}")
    return Policy(allowed_backends=backends, allowed_measurements=measurements,
                  min_volume_generation=generation, allow_debug=allow_debug,
                  allow_insecure_nil=allow_insecure_nil)


def load_policy(path: Path, *, allow_insecure_nil: bool = False) -> Policy:
    """Read and parse a policy.toml file: a regular file or a pipe (`--policy <(...)`) of at
    most MAX_CONFIG_BYTES, as keep.toml. A device or an endless file used to be read whole:
    `--policy /dev/zero` filled memory until a MemoryError ("internal error", exit 70)."""
    try:
        data = read_input_file(path, MAX_CONFIG_BYTES, pipes=True)
        text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except OSError as error:
        raise PolicyError(f"cannot read policy {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise PolicyError(f"policy {path}: not UTF-8 text") from None
    except InputFileError as error:
        raise PolicyError(f"policy {error} (not a policy.toml?)") from None
    return parse_policy(text, source=str(path), allow_insecure_nil=allow_insecure_nil)


def _string_list(value: object, source: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise PolicyError(f"{source}: {key} must be a list of strings, not {value!r}")
    return value
