"""TLS that terminates inside the keep: listeners, streams and network policy over trio.

Knows nothing of wasmtime; shim wires these streams to the WASI host's socket protocol.
"""
