"""Session 11 review of recent user-facing changes in shim/ (cache pruning, `keep run FILE.wat`,
`keep volume` on a closed stdout, the mount's stop signals and commit timer): regression tests
for the defects found."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import wasmtime
from test_cache import MARKER, module_bytes
from test_volume_cli import FAST_KDF, PASSPHRASE, keep, ok

from shim.cache import CompileCache
from shim.engine import EngineSettings
from shim.errors import KeepError


def test_pruning_never_deletes_through_a_modules_symlink_nor_other_names(tmp_path: Path) -> None:
    """The cache directory is the host's: its `modules` may be a symlink planted to another
    directory. Pruning (dc625c8) followed it and deleted that directory's `*.sealed` files and
    `.entry-*` files older than an hour (here: after one cache miss under a small limit, all of
    them). It also deleted any `*.sealed` name in the cache, not only an entry's."""
    victim = tmp_path / "victim"
    victim.mkdir()
    entry_like = victim / ("ab" * 32 + ".sealed")
    for path in (victim / "precious.sealed", entry_like, victim / ".entry-backup"):
        path.write_bytes(b"the user's own file")
        os.utime(path, (time.time() - 7200,) * 2)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / "modules").symlink_to(victim)
    cache = CompileCache.open(cache_dir)
    cache.size_limit = 1
    settings = EngineSettings()
    module, hit = cache.load_module(settings.make_engine(), settings, module_bytes(MARKER + b"s"))
    assert not hit and isinstance(module, wasmtime.Module)
    for path in (victim / "precious.sealed", entry_like, victim / ".entry-backup"):
        assert path.read_bytes() == b"the user's own file", path

    # in a real entries directory, a name that is not an entry's is left alone too
    own = tmp_path / "own"
    cache = CompileCache.open(own)
    cache.size_limit = 1
    engine = settings.make_engine()
    cache.load_module(engine, settings, module_bytes(MARKER + b"a"))
    (own / "modules" / "notes.sealed").write_bytes(b"x" * 100)
    os.utime(own / "modules" / "notes.sealed", (time.time() - 7200,) * 2)
    cache.load_module(engine, settings, module_bytes(MARKER + b"b"))
    names = sorted(path.name for path in (own / "modules").iterdir())
    assert names == sorted(["notes.sealed", cache.entry_path(module_bytes(MARKER + b"b"), settings).name])
    assert cache.statistics.pruned == 1  # the first entry, the least recently used


def test_a_cache_limit_of_too_many_digits_is_a_one_line_error(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """KEEPSHIM_CACHE_LIMIT of more than 4300 digits passed the isdigit() check and int()
    raised ValueError (Python's limit on converting long digit strings): `keep run` said
    'internal error: ValueError: Exceeds the limit (4300 digits) ...', exit 70."""
    monkeypatch.setenv("KEEPSHIM_CACHE_LIMIT", "1" * 5000)
    with pytest.raises(KeepError, match=r"KEEPSHIM_CACHE_LIMIT=.*5000 characters.*expected a number of bytes"):
        CompileCache.open(tmp_path)
    monkeypatch.setenv("KEEPSHIM_CACHE_LIMIT", " 000000000000000000000000000000000000000000000042 ")
    assert CompileCache.open(tmp_path).size_limit == 42


def _keep_run(*arguments: str, cache_dir: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "shim", "run", *arguments], capture_output=True,
                          env={**os.environ, "KEEPSHIM_CACHE_DIR": str(cache_dir)}, timeout=120, check=False)


def test_a_wat_error_is_one_printable_line_with_its_place(tmp_path: Path) -> None:
    """`keep run FILE.wat` (196d7cd) printed the parser's first line as it came: a quoted name
    in the text (`$"\\1b[2J..."`, which the parser echoes decoded) sent its escape sequence to
    the terminal raw and a \\0a in it cut the line (and the name) short; 'item nesting too
    deep' came as 'at <anon>:1:1102' instead of the line and column."""
    named = tmp_path / "named.wat"
    named.write_text('(module (func (export "_start") (call $"\\1b[2J\\0anext")))\n')
    completed = _keep_run(str(named), cache_dir=tmp_path / "cache")
    assert completed.returncode == 1
    assert completed.stderr == (f"keep: {named}: invalid WebAssembly text: unknown func: failed to find "
                                "name `$\\x1b[2J\\nnext` at line 1, column 39\n").encode()
    deep = tmp_path / "deep.wat"
    deep.write_text("(component " * 2000 + ")" * 2000)
    completed = _keep_run(str(deep), cache_dir=tmp_path / "cache")
    assert completed.returncode == 1
    assert completed.stderr.endswith(b": invalid WebAssembly text: item nesting too deep at line 1, column 1102\n")


def test_get_into_dev_stdout_whose_reader_went_away_ends_quietly_with_141(tmp_path: Path) -> None:
    """4f3bcc8 made a reader that went away end `keep volume cat/get -` quietly with 141 (as
    SIGPIPE ends cp), but `get IMG F /dev/stdout | head` (stdout by name, which `get` documents)
    still said 'keep: /dev/stdout: broken pipe' with exit status 1. A pipe's EPIPE is the same
    either way now; other failures of the file still say so (/dev/full)."""
    image = tmp_path / "v.img"
    ok("create", image, "--size", "24M", *FAST_KDF)
    source = tmp_path / "file"
    source.write_bytes(b"x" * 300_000)
    ok("put", image, source, "/file")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader went away before the first byte
    result = subprocess.run([sys.executable, "-m", "shim", "volume", "get", str(image), "/file", "/dev/stdout",
                             "--passphrase-env", "KEEP_TEST_KEY"], env={**os.environ, "KEEP_TEST_KEY": PASSPHRASE},
                            stdout=write_end, stderr=subprocess.PIPE, timeout=120, check=False)
    os.close(write_end)
    assert (result.returncode, result.stderr) == (141, b"")
    full = keep("get", image, "/file", "/dev/full")
    assert (full.returncode, full.stderr) == (1, b"keep: /dev/full: no space left on device\n")
    assert ok("cat", image, "/file") == b"x" * 300_000


def test_a_stdout_closed_at_start_is_a_write_error_for_volume_output(tmp_path: Path) -> None:
    """`keep volume ls IMG >&-` and `cat` exited 0 with their output gone (keep puts /dev/null on
    a closed fd 1, so that no file it opens takes the number), where ls and cat say 'write
    error: Bad file descriptor' and fail. Now output to such a stdout is 'stdout: bad file
    descriptor', exit 1; an action that prints nothing (mkdir) still succeeds, and the image
    never receives stdout's bytes."""
    image = tmp_path / "v.img"
    ok("create", image, "--size", "24M", *FAST_KDF)
    source = tmp_path / "file"
    source.write_bytes(b"secret-bytes " * 1000)
    ok("put", image, source, "/file")
    environment = {**os.environ, "KEEP_TEST_KEY": PASSPHRASE}
    for action, expected in ((["ls", str(image), "/"], 1), (["cat", str(image), "/file"], 1),
                             (["mkdir", str(image), "/made"], 0)):
        result = subprocess.run([sys.executable, "-m", "shim", "volume", *action, "--passphrase-env", "KEEP_TEST_KEY"],
                                env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120,
                                check=False, preexec_fn=lambda: os.close(1))
        assert result.returncode == expected, (action, result.stderr)
        assert result.stderr == (b"keep: stdout: bad file descriptor\n" if expected else b""), action
    assert b"made/" in ok("ls", image, "/")
    assert ok("cat", image, "/file") == b"secret-bytes " * 1000
    assert b"secret-bytes" not in image.read_bytes()
    assert ok("fsck", image).strip().endswith(b"clean")
