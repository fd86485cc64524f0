"""The sealed compile cache: hits, tamper and truncation handling, no plaintext, key file mode."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
import wasmtime

from shim.cache import CompileCache
from shim.engine import EngineSettings
from shim.errors import KeepError

MARKER = b"KEEPSHIM-PLAINTEXT-MARKER-7f3a9c"


def module_bytes(marker: bytes = MARKER) -> bytes:
    data = "".join(f"\\{byte:02x}" for byte in marker)
    wat = f"""(module (memory (export "memory") 1) (data (i32.const 16) "{data}")
        (func (export "answer") (result i32) (i32.const 42)))"""
    return bytes(wasmtime.wat2wasm(wat))


def entries(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "modules").glob("*.sealed"))


def answer(module: wasmtime.Module, engine: wasmtime.Engine, settings: EngineSettings) -> object:
    store = wasmtime.Store(engine)
    store.set_epoch_deadline(1)
    if settings.consume_fuel:
        store.set_fuel(10_000)
    instance = wasmtime.Instance(store, module, [])
    func = instance.exports(store)["answer"]
    assert isinstance(func, wasmtime.Func)
    return func(store)


def load(cache_dir: Path, wasm: bytes,
         settings: EngineSettings | None = None) -> tuple[CompileCache, bool, object]:
    settings = settings or EngineSettings()
    cache = CompileCache.open(cache_dir)
    engine = settings.make_engine()
    module, hit = cache.load_module(engine, settings, wasm)
    return cache, hit, answer(module, engine, settings)


def test_second_load_hits_the_cache(tmp_path: Path) -> None:
    wasm = module_bytes()
    _, first_hit, first_answer = load(tmp_path, wasm)
    second, second_hit, second_answer = load(tmp_path, wasm)
    assert (first_hit, second_hit) == (False, True)
    assert (first_answer, second_answer) == (42, 42)
    assert second.statistics.hits == 1 and second.statistics.discarded == 0


def test_different_engine_settings_get_different_entries(tmp_path: Path) -> None:
    wasm = module_bytes()
    load(tmp_path, wasm, EngineSettings(consume_fuel=False))
    _, hit, _ = load(tmp_path, wasm, EngineSettings(consume_fuel=True))
    assert not hit
    assert len(entries(tmp_path)) == 2


def test_entry_holds_no_plaintext_and_its_name_hides_the_module_hash(tmp_path: Path) -> None:
    import hashlib

    wasm = module_bytes()
    load(tmp_path, wasm)
    (entry,) = entries(tmp_path)
    sealed = entry.read_bytes()
    assert MARKER not in sealed
    assert MARKER[:12] not in sealed
    assert hashlib.sha256(wasm).hexdigest() not in entry.name
    # the serialized form does contain the marker: the test would catch an unsealed entry
    engine = EngineSettings().make_engine()
    assert MARKER in bytes(wasmtime.Module(engine, wasm).serialize())


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_damaged_entry_is_discarded_and_recompiled(tmp_path: Path, damage: str) -> None:
    wasm = module_bytes()
    load(tmp_path, wasm)
    (entry,) = entries(tmp_path)
    sealed = bytearray(entry.read_bytes())
    if damage == "flip":
        sealed[len(sealed) // 2] ^= 0x01
    elif damage == "truncate":
        del sealed[len(sealed) - 100:]
    else:
        sealed.clear()
    entry.write_bytes(bytes(sealed))
    cache, hit, result = load(tmp_path, wasm)
    assert not hit
    assert cache.statistics.discarded == 1
    assert result == 42
    _, hit_again, _ = load(tmp_path, wasm)  # the recompiled entry is sealed afresh
    assert hit_again


def test_entry_renamed_to_another_module_fails_authentication(tmp_path: Path) -> None:
    wasm_a, wasm_b = module_bytes(), module_bytes(b"another module, another marker!!")
    load(tmp_path, wasm_a)
    (entry_a,) = entries(tmp_path)
    cache = CompileCache.open(tmp_path)
    entry_b = cache.entry_path(wasm_b, EngineSettings())
    entry_a.rename(entry_b)
    _, hit, _ = load(tmp_path, wasm_b)
    assert not hit


def test_entry_sealed_under_another_key_is_discarded(tmp_path: Path) -> None:
    wasm = module_bytes()
    load(tmp_path, wasm)
    (tmp_path / "cache.key").unlink()
    _, hit, _ = load(tmp_path, wasm)
    assert not hit  # a new key gives a new name: the old entry is simply never found
    assert len(entries(tmp_path)) == 2


def test_key_file_is_private(tmp_path: Path) -> None:
    load(tmp_path / "cache", module_bytes())
    key_file = tmp_path / "cache" / "cache.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key_file.read_bytes()) == 32
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700


def test_damaged_key_file_is_a_clear_error(tmp_path: Path) -> None:
    tmp_path.joinpath("cache.key").write_bytes(b"short")
    with pytest.raises(KeepError, match="damaged"):
        CompileCache.open(tmp_path)


def test_invalid_module_is_not_cached(tmp_path: Path) -> None:
    cache = CompileCache.open(tmp_path)
    settings = EngineSettings()
    with pytest.raises(wasmtime.WasmtimeError):
        cache.load_module(settings.make_engine(), settings, b"\0asm\x01\0\0\0garbage")
    assert entries(tmp_path) == []


def test_the_cache_keeps_within_its_limit_least_recently_used_first(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries used least recently go first once the entries pass the size limit (a hit marks
    its entry as used); the entry just written is never pruned; temporaries older than an hour
    (a crashed writer's) go, younger ones (a writer at work) stay; anything else is left."""
    modules = [module_bytes(MARKER + bytes([index])) for index in range(4)]
    settings = EngineSettings()
    engine = settings.make_engine()
    cache = CompileCache.open(tmp_path)
    for index, wasm in enumerate(modules[:3]):
        cache.load_module(engine, settings, wasm)
        os.utime(cache.entry_path(wasm, settings), (time.time() - 100 + index,) * 2)  # distinct ages
    sizes = [cache.entry_path(wasm, settings).stat().st_size for wasm in modules[:3]]
    assert cache.load_module(engine, settings, modules[0])[1]  # a hit: entry 0 is now the newest
    stale = tmp_path / "modules" / ".entry-crashed"
    fresh = tmp_path / "modules" / ".entry-writing"
    other = tmp_path / "modules" / "notes.txt"
    for path in (stale, fresh, other):
        path.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200,) * 2)
    cache.size_limit = sum(sizes)  # three entries fit; the fourth pushes the oldest used out
    cache.load_module(engine, settings, modules[3])
    present = [cache.entry_path(wasm, settings).exists() for wasm in modules]
    assert present == [True, False, True, True]  # entry 1 was the least recently used
    assert cache.statistics.pruned == 1
    assert (stale.exists(), fresh.exists(), other.exists()) == (False, True, True)
    cache.size_limit = 1  # smaller than any entry: all but the one just written go
    cache.load_module(engine, settings, modules[1])
    assert [cache.entry_path(wasm, settings).exists() for wasm in modules] == [False, True, False, False]
    monkeypatch.setenv("KEEPSHIM_CACHE_LIMIT", "0")
    assert CompileCache.open(tmp_path).size_limit == 0  # no limit
    monkeypatch.setenv("KEEPSHIM_CACHE_LIMIT", "1G")
    with pytest.raises(KeepError, match="KEEPSHIM_CACHE_LIMIT"):
        CompileCache.open(tmp_path)
