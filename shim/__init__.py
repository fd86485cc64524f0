"""The keep: CLI, config, trio event loop, guest lifecycle, compile cache, attestation.

The only package that starts trio and wires wasi_host, storage and net together.
"""

__version__ = "0.1.0"
