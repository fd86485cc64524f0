"""`keep`: all argument parsing lives here; the work lives in the library modules.

Each subcommand has one `_add_*_arguments` function below and one handler module that it calls
lazily (so `keep --version` or `keep volume ...` never pays for importing wasmtime). Errors are
translated once, here: a KeepError becomes `keep: MESSAGE` on stderr and its exit status; any other
exception is a bug and shows a traceback only with --debug.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence

from shim import __version__
from shim.errors import KeepError

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"keep: {message} (see `{self.prog} --help`)\n")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """`keep run`: owned by the WASI host / guest lifecycle work."""
    parser.add_argument("module", metavar="MODULE.wasm", help="the WebAssembly module to run")
    parser.add_argument("guest_args", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="arguments passed to the guest")

    def handler(args: argparse.Namespace) -> int:
        from shim.run import run_command

        return run_command(args)

    parser.set_defaults(handler=handler)


def _add_volume_arguments(parser: argparse.ArgumentParser) -> None:
    """`keep volume ...`: owned by the encrypted volume work."""

    def handler(args: argparse.Namespace) -> int:
        from shim.volume_cli import volume_command

        return volume_command(args)

    parser.set_defaults(handler=handler)


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """`keep serve`: owned by the attestation work (shim/serve.py)."""
    parser.add_argument("--listen", required=True, metavar="ADDR:PORT",
                        help="where to wait for the owner's deployment (port 0: any free port)")
    parser.add_argument("--backend", default="nil", choices=["nil", "sev-snp", "tdx", "sgx"],
                        help="attestation backend (default nil: INSECURE, no hardware)")

    def handler(args: argparse.Namespace) -> int:
        from shim.serve import serve_command

        return serve_command(args)

    parser.set_defaults(handler=handler)


def _add_deploy_arguments(parser: argparse.ArgumentParser) -> None:
    """`keep deploy`: owned by the attestation work (shim/deploy.py)."""
    parser.add_argument("--to", required=True, metavar="ADDR:PORT", help="the keep to deploy to")
    parser.add_argument("--config", metavar="KEEP.toml", help="the workload's keep.toml")
    parser.add_argument("--policy", metavar="POLICY.toml",
                        help="what keeps to accept (backends, measurements, debug, volume generation)")
    parser.add_argument("--allow-insecure-nil", action="store_true",
                        help="accept a keep on the nil backend (no hardware, forgeable evidence)")
    parser.add_argument("--volume-key", action="append", default=[], metavar="NAME=KEYFILE",
                        help="send volume NAME's key (the file's exact bytes) to the attested keep")
    parser.add_argument("--volume-state", metavar="STATE.json",
                        help="pin volume generations from this file and store the returned ones")
    parser.add_argument("module", metavar="MODULE.wasm", help="the WebAssembly module to deploy")
    parser.add_argument("guest_args", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="arguments passed to the guest")

    def handler(args: argparse.Namespace) -> int:
        from shim.deploy import deploy_command

        return deploy_command(args)

    parser.set_defaults(handler=handler)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="keep", description="Run unmodified WASI programs inside a keep.")
    parser.add_argument("--version", action="version", version=f"keep {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    _add_run_arguments(commands.add_parser("run", help="run a WASI module in a keep"))
    _add_volume_arguments(commands.add_parser("volume", help="create and manage encrypted volumes"))
    _add_serve_arguments(commands.add_parser("serve", help="wait for one attested deployment"))
    _add_deploy_arguments(commands.add_parser("deploy", help="attest a keep and deploy a module to it"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeepError as error:
        if args.debug:
            traceback.print_exc()
        print(f"keep: {error}", file=sys.stderr)
        return error.exit_status
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a bug: say so in one line unless asked for the traceback
        if args.debug:
            traceback.print_exc()
        else:
            print(f"keep: internal error: {type(error).__name__}: {error} (rerun with --debug)",
                  file=sys.stderr)
        return 70
