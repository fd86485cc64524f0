"""`keep`: all argument parsing lives here; the work lives in the library modules.

Each subcommand has one `_add_*_arguments` function below and one handler module that it calls
lazily (so `keep --version` or `keep volume ...` never pays for importing wasmtime). Errors are
translated once, here: a KeepError becomes `keep: MESSAGE` on stderr and its exit status; any other
exception is a bug and shows a traceback only with --debug.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

from shim import __version__
from shim.errors import CLOSED_AT_START, KeepError, StdoutClosed, point_at_devnull, say

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"keep: {message} (see `{self.prog} --help`)\n")

    #: Options whose value is optional but may only be attached with `=` (`--trace` alone means
    #: its default, so `--trace MODULE.wasm` never takes the module as the trace file).
    attached_only: Mapping[str, str] = MappingProxyType({})

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        if self.attached_only and args is not None:
            args = self._attach_defaults(list(args))
        return super().parse_known_args(args, namespace)

    def _attach_defaults(self, args: list[str]) -> list[str]:
        """`--trace` before the first positional argument becomes `--trace=DEFAULT`."""
        rewritten = list(args)
        index = 0
        while index < len(rewritten):
            token = rewritten[index]
            if token == "--" or not token.startswith("-"):
                break
            if token in self.attached_only:
                rewritten[index] = f"{token}={self.attached_only[token]}"
            else:
                action = self._option_string_actions.get(token)
                if action is not None and action.nargs is None:
                    index += 1  # the option's value, whatever it looks like
            index += 1
        return rewritten


def _add_key_options(sub: argparse.ArgumentParser, prefix: str = "", what: str = "the key",
                     title: str | None = None) -> argparse._ArgumentGroup:
    """The key options of `keep volume` and `keep run --volume` (read by shim.keys.KeySource)."""
    group = sub.add_argument_group(title or f"{what} (default: prompt without echo)")
    group.add_argument(f"--{prefix}passphrase-file", metavar="FILE",
                       help=f"{what}: a text file (one trailing newline is dropped)")
    group.add_argument(f"--{prefix}key-file", metavar="FILE",
                       help=f"{what}: the file's exact bytes ('-' for stdin)")
    group.add_argument(f"--{prefix}passphrase-env", metavar="NAME",
                       help=f"{what}: the value of environment variable NAME")
    return group


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """`keep run`: owned by the WASI host / guest lifecycle work (wasmtime CLI spellings)."""

    def count(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
        return value

    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
        return value

    parser.add_argument("--dir", action="append", default=[], metavar="HOST[::GUEST]",
                        help="pre-open host directory HOST for the guest (at GUEST, default HOST)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                        help="set a guest environment variable (NAME alone passes the host's value)")
    parser.add_argument("--invoke", metavar="EXPORT",
                        help="call this export (after _initialize) instead of _start; "
                             "ARGS are its parameters")
    parser.add_argument("--timeout", type=seconds, metavar="SECONDS",
                        help="stop the guest (a trap) after this many seconds")
    parser.add_argument("--max-memory", type=count, metavar="BYTES",
                        help="refuse to grow guest memory beyond this many bytes (the guest may "
                        "then have one linear memory and one table, of at most BYTES/8 elements)")
    parser.add_argument("--fuel", type=count, metavar="N",
                        help="trap after N units of fuel (roughly wasm instructions)")
    parser.add_argument("--trap-unknown-imports", action="store_true",
                        help="link imports the keep does not provide as functions that trap")
    parser.add_argument("--no-cache", action="store_true", help="do not use the compile cache")
    parser.add_argument("--config", metavar="KEEP.toml",
                        help="keep.toml (or an Enarx.toml): args, env, stdio and TLS sockets")
    parser.add_argument("--insecure-plaintext", action="store_true",
                        help='allow keep.toml sockets with prot = "tcp" (the host sees plaintext)')
    volumes = _add_key_options(parser, what="the volume key", title="encrypted volumes (one key "
                               "opens every --volume; default: prompt without echo)")
    volumes.add_argument("--volume", action="append", default=[], metavar="IMG[::GUEST_PATH]",
                         help="pre-open encrypted volume image IMG for the guest at GUEST_PATH "
                              "(default /data); repeatable. Unlike --dir, the host sees only "
                              "ciphertext")
    volumes.add_argument("--volume-generation", action="append", type=count, default=[], metavar="N",
                         help="refuse a volume older than generation N (a rollback); once per "
                              "--volume, in order")
    volumes.add_argument("--volume-state", metavar="FILE.json",
                         help="pin the volumes' generations from FILE (when it exists) and write "
                              "their final (uuid, generation, root MAC) to it")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="report volume states (opened, final commit) and --dir warnings")
    testing = parser.add_argument_group("testing an app's I/O (trace, faults, leak audit)")
    testing.add_argument("--trace", nargs="?", const="-", metavar="FILE",
                         help="log every WASI call (decoded, errno, duration) to stderr, or "
                              "--trace=FILE; buffers appear only as sizes")
    testing.add_argument("--trace-format", choices=["text", "jsonl"], default="text",
                         help="strace-like text (default) or JSON Lines")
    testing.add_argument("--trace-data", action="store_true",
                         help="also show the bytes read and written (the guest's PLAINTEXT)")
    testing.add_argument("--fault", action="append", default=[], metavar="SPEC",
                         help="make chosen WASI calls fail or misbehave (repeatable; grammar below)")
    testing.add_argument("--audit-host", metavar="MARKER",
                         help="after the run, search the host's view (volume images, compile cache, "
                              "--dir directories, trace file, socket bytes) for MARKER in plaintext; "
                              "exit 3 if found (a first Ctrl-C stops the guest and the audit still runs)")
    if isinstance(parser, _Parser):
        parser.attached_only = {"--trace": "-"}
    from wasi_host._faults import GRAMMAR

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = GRAMMAR
    parser.add_argument("module", metavar="MODULE.wasm", help="the WebAssembly module to run")
    parser.add_argument("guest_args", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="arguments passed to the guest")

    def handler(args: argparse.Namespace) -> int:
        from shim.run import run_command

        return run_command(args)

    parser.set_defaults(handler=handler)


def _add_volume_arguments(parser: argparse.ArgumentParser) -> None:
    """`keep volume ACTION IMG ...`: owned by the encrypted volume work (shim/volume_cli.py).
    Option spellings follow cryptsetup where they overlap (--key-file, --pbkdf, --iter-time,
    --pbkdf-memory, --pbkdf-force-iterations, --pbkdf-parallel, --key-slot)."""

    key_options = _add_key_options

    def kdf_options(sub: argparse.ArgumentParser) -> None:
        group = sub.add_argument_group("keyslot KDF")
        group.add_argument("--pbkdf", choices=["argon2id", "pbkdf2"], default="argon2id",
                           help="keyslot KDF (default argon2id)")
        group.add_argument("--iter-time", type=int, metavar="MS", default=2000,
                           help="milliseconds one unlock should take here (default 2000)")
        group.add_argument("--pbkdf-memory", type=int, metavar="KIB",
                           help="argon2id memory cost in KiB (default 262144)")
        group.add_argument("--pbkdf-force-iterations", type=int, metavar="N",
                           help="fixed iterations (pbkdf2) or time cost (argon2id); no benchmark")
        group.add_argument("--pbkdf-parallel", type=int, metavar="N",
                           help="argon2id lanes (default 4)")

    actions = parser.add_subparsers(dest="volume_action", metavar="ACTION", parser_class=_Parser)
    actions.required = True

    def action(name: str, summary: str, *, key: bool = True) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=summary, description=summary)
        sub.add_argument("image", metavar="IMG", help="the volume image file (or block device)")
        if key:
            key_options(sub)
        return sub

    create = action("create", "create a new encrypted volume image (sparse)")
    create.add_argument("--size", required=True, help="image size, e.g. 64M, 1G, 4GiB, 10000000")
    create.add_argument("--integrity", choices=["merkle", "none"], default="merkle",
                        help="integrity layer (default merkle; none = plain LUKS2 data area)")
    create.add_argument("--label", default="", help="LUKS2 label")
    kdf_options(create)
    info = action("info", "show LUKS2, integrity and usage details")
    info.add_argument("--header-only", action="store_true",
                      help="show only what the LUKS2 header says (no key needed)")
    info.add_argument("--json", action="store_true", help="print JSON")
    ls = action("ls", "list a directory of the volume")
    ls.add_argument("path", metavar="PATH", nargs="?", default="/")
    cat = action("cat", "write a file of the volume to stdout")
    cat.add_argument("path", metavar="PATH")
    put = action("put", "copy a host file into the volume")
    put.add_argument("host_file", metavar="HOSTFILE", help="host file ('-' for stdin)")
    put.add_argument("path", metavar="PATH")
    get = action("get", "copy a file of the volume to the host")
    get.add_argument("path", metavar="PATH")
    get.add_argument("host_file", metavar="HOSTFILE", help="host file ('-' for stdout)")
    rm = action("rm", "remove a file (or, with -r, a directory tree) from the volume")
    rm.add_argument("path", metavar="PATH")
    rm.add_argument("-r", "--recursive", action="store_true", help="remove directories too")
    mkdir = action("mkdir", "make a directory in the volume")
    mkdir.add_argument("path", metavar="PATH")
    mkdir.add_argument("-p", "--parents", action="store_true", help="make parents as needed")
    import_ = action("import", "copy a host directory tree into the volume")
    import_.add_argument("host_dir", metavar="HOSTDIR")
    import_.add_argument("path", metavar="PATH", nargs="?", default="/")
    export = action("export", "copy a directory tree of the volume to the host")
    export.add_argument("host_dir", metavar="HOSTDIR")
    export.add_argument("path", metavar="PATH", nargs="?", default="/")
    action("fsck", "check every sector and the filesystem")
    add_key = action("add-key", "add a keyslot for a new passphrase or key file")
    key_options(add_key, "new-", "the new key")
    kdf_options(add_key)
    remove_key = action("remove-key", "remove the keyslot the given key opens (or --key-slot N)")
    remove_key.add_argument("--key-slot", type=int, metavar="N",
                            help="remove keyslot N (the given key must open another slot)")
    passwd = action("passwd", "change the passphrase of the keyslot the given key opens")
    key_options(passwd, "new-", "the new key")
    kdf_options(passwd)
    mount = action("mount", "mount the volume with FUSE (serves in the foreground until unmounted)")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory")
    mount.add_argument("--read-only", action="store_true", help="mount read-only (nothing written)")
    mount.add_argument("--foreground", action="store_true",
                       help="stay in the foreground (the default); Ctrl-C / SIGTERM unmounts cleanly")
    mount.add_argument("--allow-other", action="store_true",
                       help="let other users access the mount (needs user_allow_other for non-root)")
    mount.add_argument("--volume-generation", type=int, metavar="N",
                       help="refuse a volume older than generation N (a rollback)")
    mount.add_argument("--commit-interval", type=float, metavar="SECONDS", default=5.0,
                       help="commit changes this often (default 5; 0: only on fsync and unmount)")
    umount = actions.add_parser(
        "umount", help="unmount a mounted volume (fusermount3 -u) and report its final commit",
        description="unmount a mounted volume (fusermount3 -u), then wait for the mount process's "
                    "commit at unmount: exit status 0 ('unmounted MOUNTPOINT') only if that commit "
                    "succeeded; 1 with the mount process's error if it failed, or if the process "
                    "ended without a report (killed) or has not reported after 30 s (stopped, hung)")
    umount.add_argument("mountpoint", metavar="MOUNTPOINT")
    umount.set_defaults(image=None)

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
    parser.add_argument("--volume", action="append", default=[], metavar="NAME=IMAGE",
                        help="offer encrypted volume image IMAGE as NAME (the owner sends its key)")

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
    parser.add_argument("--volume-key", action="append", default=[],
                        metavar="NAME[::GUEST_PATH]=KEYFILE",
                        help="send volume NAME's key file (its exact bytes, as cryptsetup --key-file) "
                             "to the attested keep; the guest sees it at GUEST_PATH (default /NAME)")
    parser.add_argument("--volume-state", metavar="STATE.json",
                        help="pin volume generations from this file and store the returned ones")
    parser.add_argument("module", metavar="MODULE.wasm", help="the WebAssembly module to deploy")
    parser.add_argument("guest_args", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="arguments passed to the guest")

    def handler(args: argparse.Namespace) -> int:
        from shim.deploy import deploy_command

        return deploy_command(args)

    parser.set_defaults(handler=handler)


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """`keep demo`: a self-contained tour (shim/demo.py): a WASI guestbook on a fresh encrypted
    volume serving TLS from inside the keep, visited by an HTTPS client, then checked."""
    parser.add_argument("--workdir", metavar="DIR",
                        help="put the image, keep.toml and certificate in DIR (created if missing, "
                             "kept afterwards; default: a temporary directory, removed)")
    parser.add_argument("--keep-files", action="store_true",
                        help="keep the temporary work directory and print where it is")

    def handler(args: argparse.Namespace) -> int:
        from shim.demo import demo_command

        return demo_command(args)

    parser.set_defaults(handler=handler)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="keep", description="Run unmodified WASI programs inside a keep.")
    parser.add_argument("--version", action="version", version=f"keep {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    _add_demo_arguments(commands.add_parser("demo", help="a self-contained tour: an encrypted "
                                            "volume and TLS inside the keep, checked"))
    _add_run_arguments(commands.add_parser("run", help="run a WASI module in a keep"))
    _add_volume_arguments(commands.add_parser("volume", help="create and manage encrypted volumes"))
    _add_serve_arguments(commands.add_parser("serve", help="wait for one attested deployment"))
    _add_deploy_arguments(commands.add_parser("deploy", help="attest a keep and deploy a module to it"))
    return parser


def _fill_closed_standard_fds() -> None:
    """Put /dev/null on fd 0, 1 or 2 if it is closed. Otherwise the first file `keep` opens takes
    that number, and the guest's stdio is fds 0-2: with stdout closed (`keep run ... >&-`), the
    guest's output went in plaintext into the encrypted volume image and broke it."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            CLOSED_AT_START.add(fd)
            point_at_devnull(fd)
            os.set_inheritable(fd, True)
            if getattr(sys, name) is None:  # Python found the fd closed at start-up
                setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))  # noqa: SIM115


def main(argv: Sequence[str] | None = None) -> int:
    _fill_closed_standard_fds()  # first: before anything opens a file
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    # keep's own lines on stderr start with 'keep: ' (shim.errors.say), to stand apart from the
    # guest's stderr on the same stream: the loggers' (keep.net's listeners) too
    logging.basicConfig(format="keep: %(message)s", level=logging.WARNING, stream=sys.stderr)
    try:
        return handler(args)
    except StdoutClosed as error:
        point_at_devnull(1)  # what stdout still buffers goes nowhere at exit
        return error.exit_status
    except KeepError as error:
        if args.debug:
            traceback.print_exc()
        say(str(error))
        return error.exit_status
    except KeyboardInterrupt as interrupt:
        # A run with keep.toml sockets stops on SIGINT or SIGTERM itself and says which
        # (shim.sockets.GuestSignalled, not imported here: `keep --version` stays light).
        return 128 + int(getattr(interrupt, "signal_number", signal.SIGINT))
    except Exception as error:  # a bug: say so in one line unless asked for the traceback
        if args.debug:
            traceback.print_exc()
        else:
            say(f"internal error: {type(error).__name__}: {error} (rerun with --debug)")
        return 70
