"""The function table and constants against the witx text kept in fixtures/witx/."""

from __future__ import annotations

from pathlib import Path

from wasi_host import FUNCTIONS, Errno, Rights
from wasi_host._errors import WasiError, errno_for_exception

WITX = Path(__file__).resolve().parent.parent / "fixtures" / "witx"

SExpr = str | list["SExpr"]


def parse(text: str) -> list[SExpr]:
    """A minimal s-expression reader for witx (comments, strings, atoms, lists)."""
    tokens: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if text.startswith(";;", index):
            index = text.index("\n", index) if "\n" in text[index:] else len(text)
        elif char in "()":
            tokens.append(char)
            index += 1
        elif char.isspace():
            index += 1
        elif char == '"':
            end = text.index('"', index + 1)
            tokens.append(text[index : end + 1])
            index = end + 1
        else:
            end = index
            while end < len(text) and not text[end].isspace() and text[end] not in "()":
                end += 1
            tokens.append(text[index:end])
            index = end
    stack: list[list[SExpr]] = [[]]
    for token in tokens:
        if token == "(":
            stack.append([])
        elif token == ")":
            done = stack.pop()
            stack[-1].append(done)
        else:
            stack[-1].append(token)
    return stack[0]


def typenames() -> dict[str, SExpr]:
    return {item[1]: item[2] for item in parse((WITX / "typenames.witx").read_text()) if isinstance(item, list) and item[0] == "typename"}  # type: ignore[misc]


def lower(typ: SExpr, names: dict[str, SExpr]) -> list[str]:
    """The core wasm parameter types a witx parameter type lowers to."""
    if isinstance(typ, str):
        if typ == "string":
            return ["i32", "i32"]
        if typ in ("u64", "s64"):
            return ["i64"]
        if typ in ("u8", "u16", "u32", "s32"):
            return ["i32"]
        return lower(names[typ], names)
    head = typ[0]
    if head in ("handle", "@witx"):
        return ["i32"]  # handles and pointers
    if head == "list":
        return ["i32", "i32"]
    if head in ("enum", "flags"):
        repr_type = typ[1][2]  # (@witx tag u8) / (@witx repr u64)
        assert isinstance(repr_type, str)
        return lower(repr_type, names)
    raise AssertionError(f"cannot lower {typ}")


def witx_signatures() -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    names = typenames()
    (module,) = [item for item in parse((WITX / "wasi_snapshot_preview1.witx").read_text()) if isinstance(item, list) and item[0] == "module"]
    signatures = {}
    for item in module:
        if not (isinstance(item, list) and item[0] == "@interface"):
            continue
        export = item[2]
        assert isinstance(export, list)
        name = export[1].strip('"')  # type: ignore[union-attr]
        params: list[str] = []
        results: list[str] = []
        for part in item[3:]:
            assert isinstance(part, list)
            if part[0] == "param":
                params += lower(part[2], names)
            elif part[0] == "result":
                expected = part[2]
                assert isinstance(expected, list) and expected[0] == "expected"
                results = ["i32"]  # the errno
                ok = expected[1]
                if isinstance(ok, list) and ok[0] == "tuple":
                    params += ["i32"] * (len(ok) - 1)  # one out-pointer per element
                elif not (isinstance(ok, list) and ok[0] == "error"):
                    params += ["i32"]  # one out-pointer
        signatures[name] = (tuple(params), tuple(results))
    return signatures


def test_every_preview1_function_is_implemented_with_the_witx_signature() -> None:
    expected = witx_signatures()
    assert len(expected) == 46
    assert set(FUNCTIONS) == set(expected)
    for name, function in FUNCTIONS.items():
        assert (function.params, function.results) == expected[name], name
        assert function.name == name


def test_errno_numbering_follows_the_witx_declaration_order() -> None:
    errno_enum = typenames()["$errno"]
    assert isinstance(errno_enum, list)
    declared = [str(member).removeprefix("$") for member in errno_enum[2:]]
    assert [member.name.lower() for member in Errno] == [name if name != "2big" else "toobig" for name in declared]


def test_rights_bits_follow_the_witx_declaration_order() -> None:
    rights = typenames()["$rights"]
    assert isinstance(rights, list)
    declared = [str(member).removeprefix("$").upper() for member in rights[2:]]
    assert [getattr(Rights, name) for name in declared] == [1 << bit for bit in range(len(declared))]
    assert (1 << len(declared)) - 1 == Rights.ALL


def test_errno_for_exception_translates_once() -> None:
    assert errno_for_exception(WasiError(Errno.NOTCAPABLE)) == Errno.NOTCAPABLE
    assert errno_for_exception(FileNotFoundError(2, "x")) == Errno.NOENT
    assert errno_for_exception(OSError(95, "x")) == Errno.NOTSUP
    assert errno_for_exception(OSError(9999, "unknown")) == Errno.IO
    assert errno_for_exception(OSError("no errno")) == Errno.IO
    assert errno_for_exception(KeyError("host bug")) is None
