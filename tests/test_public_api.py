"""Each public module says what it offers in ``__all__``, and says it truly.

As anyio's ``tests/test_all_attributes.py`` and httpx's ``test_exported_members.py``:
every name in ``__all__`` exists, none is listed twice, and no public class or
function the module defines (itself, or in a private submodule of a package)
is left out. Names a module imports from elsewhere do not count.
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType

import pytest

PUBLIC = [
    "aiolayercache",
    "aiolayercache.cache",
    "aiolayercache.layout",
    "aiolayercache.mutate",
    "aiolayercache.partial",
    "aiolayercache.random",
    "aiolayercache.remote",
    "aiolayercache.streams",
    "aiolayercache.tarball",
    "aiolayercache.validate",
]


def _all(mod: ModuleType) -> list[str]:
    names = getattr(mod, "__all__", None)
    assert names is not None, f"{mod.__name__} has no __all__"
    return list(names)


def _defined_here(mod: ModuleType, obj: object) -> bool:
    """True for a class or function ``mod`` defines (itself, or a package's private rooms)."""
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        return False
    home = getattr(obj, "__module__", None) or ""
    return home == mod.__name__ or (
        hasattr(mod, "__path__") and home.startswith(mod.__name__ + "._")
    )


@pytest.mark.parametrize("name", PUBLIC)
def test_every_name_in_all_exists(name: str) -> None:
    mod = importlib.import_module(name)
    assert [n for n in _all(mod) if not hasattr(mod, n)] == []


@pytest.mark.parametrize("name", PUBLIC)
def test_all_lists_each_name_once(name: str) -> None:
    names = _all(importlib.import_module(name))
    assert sorted(n for n in set(names) if names.count(n) > 1) == []


@pytest.mark.parametrize("name", PUBLIC)
def test_all_holds_every_public_class_and_function_defined_there(name: str) -> None:
    mod = importlib.import_module(name)
    listed = set(_all(mod))
    left_out = sorted(
        n
        for n, obj in vars(mod).items()
        if not n.startswith("_") and n not in listed and _defined_here(mod, obj)
    )
    assert left_out == []


@pytest.mark.parametrize("name", PUBLIC)
def test_all_lists_no_private_name(name: str) -> None:
    assert [n for n in _all(importlib.import_module(name)) if n.startswith("_")] == []
