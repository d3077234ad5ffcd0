"""Which rooms of the library may import which, read from the source with ``ast``.

As go-containerregistry's ``pkg/registry/depcheck_test.go``: the layering is
model → partial → cache, remote, formats → CLI, and no import runs back up.
Nothing is imported here; every ``import`` statement of src/ is parsed,
those inside functions too, and chains are followed (importing a module
also runs its parent packages' ``__init__``).
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "aiolayercache"
IO = {"aiohttp", "aiofiles"}


def _module_files() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in sorted((SRC / PKG).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _module_files()


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` names in an import: ours in full, others by full dotted name."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package[: len(package) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            # ``from . import partial`` imports a module, not a name.
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _with_parents(module: str) -> list[str]:
    """``module`` and, for one of ours, the packages whose ``__init__`` importing it runs."""
    if not module.startswith(PKG):
        return [module]
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _chain(start: str, bad: Callable[[str], bool], *, direct: bool = False) -> list[str] | None:
    """The import chain from ``start`` to the first module ``bad`` accepts, or None."""
    came_from: dict[str, str] = {}
    todo = [start]
    seen = {start}
    while todo:
        current = todo.pop(0)
        for dep in sorted(GRAPH.get(current, ())):
            for target in _with_parents(dep):
                if target in seen:
                    continue
                seen.add(target)
                came_from[target] = current
                if bad(target):
                    chain = [target]
                    while chain[-1] != start:
                        chain.append(came_from[chain[-1]])
                    return chain[::-1]
                if not direct and target in MODULES:
                    todo.append(target)
    return None


def _under(*prefixes: str) -> Callable[[str], bool]:
    names = [f"{PKG}.{p}" if p else PKG for p in prefixes]
    return lambda m: any(m == n or m.startswith(n + ".") for n in names)


def _io(m: str) -> bool:
    return m.split(".")[0] in IO


def _aiohttp(m: str) -> bool:
    return m.split(".")[0] == "aiohttp"


def _modules(pred: Callable[[str], bool]) -> list[str]:
    return [m for m in MODULES if pred(m)]


# The value model and the wrapping machinery: no I/O at all, however far imports go.
CORE = _modules(
    _under(
        "_hash",
        "_types",
        "_media_types",
        "_json",
        "_manifest",
        "_config",
        "_protocols",
        "_errors",
        "_wrap",
        "_attrs",
        "_once",
    )
)
# partial builds on streams (which open files): no I/O module of its own, and no HTTP.
PARTIAL = _modules(_under("partial", "_partial_layers", "_partial_manifests"))
CACHE = _modules(_under("cache"))
REMOTE = _modules(_under("remote"))
CLI = _under("cli", "_cli")
LIBRARY = [m for m in MODULES if not CLI(m) and m != f"{PKG}.__main__"]


def _check(modules: Iterable[str], bad: Callable[[str], bool], *, direct: bool = False) -> None:
    chains = [c for m in modules if (c := _chain(m, bad, direct=direct)) is not None]
    if chains:
        pytest.fail("imports across a boundary:\n" + "\n".join(" -> ".join(c) for c in chains))


def test_the_parser_sees_known_imports() -> None:
    # Guards the others against passing on an empty graph.
    assert len(CORE) >= 8 and PARTIAL and CACHE and REMOTE
    assert _chain(f"{PKG}.tarball", _io, direct=True) == [f"{PKG}.tarball", "aiofiles"]
    assert _chain(f"{PKG}.remote", _aiohttp) is not None
    assert _chain(f"{PKG}.__main__", CLI) is not None
    assert f"{PKG}.partial" in GRAPH[f"{PKG}.cache._layers"]  # from .. import partial


@pytest.mark.parametrize("module", CORE)
def test_the_model_imports_no_io_module(module: str) -> None:
    _check([module], _io)


@pytest.mark.parametrize("module", PARTIAL)
def test_partial_imports_no_io_module_itself_and_no_http(module: str) -> None:
    _check([module], _io, direct=True)
    _check([module], _aiohttp)


def test_cache_imports_neither_remote_nor_the_formats() -> None:
    _check(CACHE, _under("remote", "layout", "tarball", "_tarball_write"))


def test_cache_never_imports_aiohttp() -> None:
    _check(CACHE, _aiohttp)


def test_remote_does_not_import_the_cache() -> None:
    _check(REMOTE, _under("cache"))


def test_nothing_but_the_cli_imports_the_cli() -> None:
    _check(LIBRARY, CLI)


FLEET = _modules(_under("fleet"))


def test_the_fleet_sits_beside_the_formats_and_is_imported_by_neither_cache_nor_remote() -> None:
    # The fleet is a client of a registry (remote) that plays a cache: it may import both;
    # the cache (tiered included) and remote never import it, nor do the formats.
    assert FLEET
    _check([*CACHE, *REMOTE], _under("fleet"))
    _check(
        _modules(_under("layout", "tarball", "_layout_write", "_tarball_write")), _under("fleet")
    )
    _check(FLEET, _under("layout", "tarball", "_layout_write", "_tarball_write"))
