"""keep.toml: Enarx.toml compatibility, keepshim's additions, fd numbering, positioned errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim.config import (
    ConfigError,
    ConnectFile,
    ListenFile,
    StdioFile,
    load_config,
    parse_config,
)

DATA = Path(__file__).parent / "data" / "enarx"


@pytest.mark.parametrize("path", sorted(DATA.glob("*.toml")), ids=lambda p: p.name)
def test_real_enarx_toml_loads_unchanged(path: Path) -> None:
    config = load_config(path)
    assert [f.kind for f in config.files[:3]] == ["stdin", "stdout", "stderr"]
    layout = config.fd_layout()
    assert config.guest_env()["FD_COUNT"] == str(len(config.files)) == str(len(layout))
    assert config.guest_env()["FD_NAMES"] == ":".join(f.name for f in config.files)


def test_enarx_defaults_apply_to_listen_and_connect() -> None:
    http = load_config(DATA / "codex-rust-tokio-http.toml")
    assert http.steward == "https://attest.profian.com"
    assert http.sockets == (ListenFile(name="TCP_LISTEN", addr="::", port=10020, prot="tls"),)
    chat = load_config(DATA / "codex-chat-client.toml")
    assert chat.sockets == (ConnectFile(name="server", host="127.0.0.1", port=50000, prot="tcp"),)
    default_port = parse_config('[[files]]\nkind = "connect"\nhost = "example.com"\n')
    assert default_port.sockets == (ConnectFile(name="example.com", host="example.com", port=443),)


def test_preopened_directories_sit_between_stdio_and_sockets() -> None:
    config = parse_config(
        '[[files]]\nkind = "stdin"\n[[files]]\nkind = "null"\nname = "quiet"\n'
        '[[files]]\nkind = "stderr"\n'
        '[[files]]\nkind = "listen"\nname = "web"\nport = 8443\n'
        '[[files]]\nkind = "connect"\nhost = "localhost"\nname = "db"\nport = 5432\n'
    )
    layout = config.fd_layout(["/data", "/tmp"])
    assert [(s.fd, s.name) for s in layout] == [
        (0, "stdin"), (1, "quiet"), (2, "stderr"), (3, "/data"), (4, "/tmp"), (5, "web"), (6, "db")]
    assert config.guest_env(["/data", "/tmp"]) == {
        "FD_COUNT": "7", "FD_NAMES": "stdin:quiet:stderr:/data:/tmp:web:db"}


def test_missing_stdio_entries_become_null() -> None:
    config = parse_config('[[files]]\nkind = "stdin"\n[[files]]\nkind = "listen"\nname = "l"\n')
    assert config.stdio == (StdioFile("stdin", "stdin"), StdioFile("null", "null"),
                            StdioFile("null", "null"))
    assert config.guest_env()["FD_NAMES"] == "stdin:null:null:l"


def test_keepshim_additions_resolve_paths_against_the_config_directory(tmp_path: Path) -> None:
    (tmp_path / "keep.toml").write_text(
        'args = ["a", "b"]\n[env]\nGREETING = "hi"\n'
        '[tls]\ncertificate = "cert.pem"\nkey = "key.pem"\nexport_certificate = "out/keep.pem"\n'
        '[[files]]\nkind = "stdin"\n[[files]]\nkind = "stdout"\n[[files]]\nkind = "stderr"\n'
        '[[files]]\nkind = "listen"\nname = "api"\naddr = "127.0.0.1"\nport = 0\n'
        'client_ca = "clients.pem"\n'
        '[[files]]\nkind = "connect"\nhost = "127.0.0.1"\nport = 9\nca = "/etc/ca.pem"\n'
        'pin_sha256 = "' + "AB" * 32 + '"\nserver_name = "db.internal"\n'
        '[[files]]\nkind = "listen"\nname = "plain"\nprot = "tcp"\ninsecure_plaintext = true\n'
    )
    config = load_config(tmp_path / "keep.toml")
    assert config.args == ("a", "b")
    assert config.env == {"GREETING": "hi"}
    assert config.tls.certificate == tmp_path / "cert.pem"
    assert config.tls.export_certificate == tmp_path / "out" / "keep.pem"
    listen, connect, plain = config.sockets
    assert isinstance(listen, ListenFile) and listen.client_ca == tmp_path / "clients.pem"
    assert isinstance(connect, ConnectFile)
    assert connect.ca == Path("/etc/ca.pem") and connect.pin_sha256 == "ab" * 32
    assert connect.server_name == "db.internal"
    assert isinstance(plain, ListenFile) and plain.port == 80 and plain.insecure_plaintext


@pytest.mark.parametrize(("text", "expected"), [
    ('args = ["x"]\nbogus = 1\n', "keep.toml:2: bogus: unknown key"),
    ('[[files]]\nkind = "stdin"\n\n[[files]]\nkind = "listen"\nname = "x"\nport = "https"\n',
     "keep.toml:7: files[1].port: expected a port number 0-65535, got 'https'"),
    ('[[files]]\nkind = "listen"\nname = "x"\nport = 70000\n', "keep.toml:4: files[0].port"),
    ('[[files]]\nkind = "listen"\nname = "x"\nport = true\n', "got true"),
    ('[[files]]\nkind = "listen"\nname = "x"\ncolour = "red"\n',
     "keep.toml:4: files[0].colour: unknown key"),
    ('[[files]]\nkind = "socket"\n', "keep.toml:2: files[0].kind: unknown kind 'socket'"),
    ('[[files]]\nname = "x"\n', "keep.toml:1: files[0]: missing key kind"),
    ('[[files]]\nkind = "listen"\nport = 1\n', "keep.toml:1: files[0]: a listen entry needs a name"),
    ('[[files]]\nkind = "listen"\nname = "a:b"\n', "keep.toml:3: files[0].name: a name must"),
    ('[[files]]\nkind = "listen"\nname = "x"\nprot = "udp"\n',
     "keep.toml:4: files[0].prot: expected \"tls\" or \"tcp\""),
    ('[[files]]\nkind = "listen"\nname = "x"\naddr = "example.com"\n', "files[0].addr"),
    ('[[files]]\nkind = "connect"\nhost = "h"\nprot = "tcp"\nca = "x.pem"\n',
     'keep.toml:5: files[0].ca: only applies to prot = "tls"'),
    ('[[files]]\nkind = "connect"\nhost = "h"\npin_sha256 = "abc"\n',
     "keep.toml:4: files[0].pin_sha256: expected 64 hex digits"),
    ('[env]\nA = "1"\nB = 2\n', "keep.toml:3: env.B: expected a string, got 2"),
    ('[env]\nFD_COUNT = "9"\n', "keep.toml:2: env.FD_COUNT: is set by the keep"),
    ('args = "x"\n', "keep.toml:1: args: expected a list of strings"),
    ('[tls]\ncertificate = "c.pem"\n', "keep.toml:1: tls: certificate and key must be given"),
    ('steward = "http://attest"\n', "keep.toml:1: steward: must be an https:// URL"),
    ('[[files]]\nkind = "stdin"\n[[files]]\nkind = "stdout"\n[[files]]\nkind = "stderr"\n'
     '[[files]]\nkind = "null"\n', "keep.toml:7: files[3]: stdin/stdout/stderr/null entries are"),
    ('[[files]]\nkind = "listen"\nname = "x"\n[[files]]\nkind = "stdout"\n',
     "keep.toml:1: files[0]: stdin/stdout/stderr/null entries must come first"),
    ("[[files]\n", "keep.toml: not valid TOML"),
])
def test_bad_config_names_the_line_and_the_key(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert expected in str(caught.value)
    assert caught.value.exit_status == 2


def test_unreadable_config_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_deeply_nested_toml_is_a_config_error_not_a_recursion_error(tmp_path: Path) -> None:
    """tomllib recurses once per nesting level: 5000 levels overflow Python's stack. That must be
    a ConfigError (exit 2, one line), never a RecursionError reaching the CLI or `keep serve`."""
    text = "a = " + "[" * 5000 + "]" * 5000 + "\n"
    with pytest.raises(ConfigError, match=r"keep\.toml: not valid TOML: nested too deeply"):
        parse_config(text)
    path = tmp_path / "deep.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"deep\.toml: not valid TOML: nested too deeply"):
        load_config(path)


def test_a_config_larger_than_one_mebibyte_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    """Found in review: load_config read the whole file first, so `--config /dev/zero` grew until
    `keep: internal error: MemoryError` (exit 70). A keep.toml is a few hundred bytes; more than
    1 MiB is refused after reading just past the limit."""
    path = tmp_path / "huge.toml"
    path.write_text("# padding\n" * (120 << 10))  # 1.2 MiB of valid TOML
    with pytest.raises(ConfigError, match=r"huge\.toml: larger than 1048576 bytes"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"/dev/zero: larger than 1048576 bytes"):
        load_config(Path("/dev/zero"))


@pytest.mark.parametrize(("text", "expected"), [
    ('"\\u001b]0;pwned\\u0007" = 1\n', 'keep.toml: "\\u001b]0;pwned\\u0007": unknown key'),
    ('"a\\nb" = 1\n', 'keep.toml: "a\\nb": unknown key'),
    ('[env]\n"A=\\r" = "x"\n', 'env."A=\\r": not a valid environment variable name'),
])
def test_key_names_with_control_characters_are_escaped_in_errors(text: str, expected: str) -> None:
    """Found in review: a key's name was printed raw, so a newline split the one-line error and
    a terminal escape sequence in a keep.toml (one deployed by someone else, say) reached the
    operator's terminal. Such names are now shown quoted with TOML-style escapes."""
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert expected in str(caught.value)
    assert str(caught.value).isprintable()
