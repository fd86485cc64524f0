#!/usr/bin/env bash
# Installs everything keepshim needs on a fresh Debian machine (run as root): the Debian packages
# the tests and tools call (cryptsetup, openssl, curl, FUSE, sqlite3, gocryptfs for the FUSE
# benchmark) and a virtual environment in .venv with keepshim and its test tools (zig from PyPI
# builds the C fixtures to wasm32-wasi on first use; its libc build is cached under
# ~/.cache/keepshim/zig). Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
packages=(libfuse3-dev fuse3 pkg-config cryptsetup-bin openssl curl sqlite3 rsync git tar gcc)
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then packages+=(python3-venv python3-dev); fi
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# gocryptfs is only the benchmark peer; a machine without it still runs everything else.
dpkg -s gocryptfs >/dev/null 2>&1 || apt-get install -y -qq gocryptfs >/dev/null 2>&1 || true

# a venv without pip is one whose creation was interrupted (ensurepip runs last): made again
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then rm -rf .venv; python3 -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[fuse,test,demo]'
# storage's native sector loops (a small C file, built with zig into the package directory;
# without them everything works through slower Python loops, but the test suite insists on them)
.venv/bin/python -m storage.native build >/dev/null || echo "warning: storage.native was not built" >&2
echo "keepshim installed: $(.venv/bin/keep --version 2>/dev/null || echo 'keep not runnable yet')"
