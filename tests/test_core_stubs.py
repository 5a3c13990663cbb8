"""The `.pyi` stubs of the compiled core list exactly the functions it exports, with matching parameter names."""

import ast
import inspect
from pathlib import Path

import difattn
from difattn._native import core


def _stubs() -> dict[str, list[str]]:
    tree = ast.parse((Path(difattn.__file__).parent / "_core.pyi").read_text())
    return {f.name: [a.arg for a in f.args.args] for f in tree.body if isinstance(f, ast.FunctionDef)}


def test_stubs_match_the_compiled_core():
    module = core()
    exported = {name for name in dir(module) if not name.startswith("_") and callable(getattr(module, name))}
    stubs = _stubs()
    assert exported == set(stubs), f"missing stubs: {exported - set(stubs)}; stale stubs: {set(stubs) - exported}"
    for name, params in stubs.items():
        signature = inspect.signature(getattr(module, name))
        assert [p for p in signature.parameters] == params, name


def test_package_ships_typing_marker():
    assert (Path(difattn.__file__).parent / "py.typed").exists()
