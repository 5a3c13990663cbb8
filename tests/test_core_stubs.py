"""The `.pyi` stubs of the compiled core list exactly the functions it exports, with matching parameter names."""

import ast
import inspect
from pathlib import Path

import difattn
from difattn._native import core


def _params(f: ast.FunctionDef) -> list[str]:
    return [a.arg for a in f.args.args if a.arg != "self"]


def _tree() -> ast.Module:
    return ast.parse((Path(difattn.__file__).parent / "_core.pyi").read_text())


def _stubs() -> dict[str, list[str]]:
    return {f.name: _params(f) for f in _tree().body if isinstance(f, ast.FunctionDef)}


def _class_stubs() -> dict[str, dict[str, list[str] | None]]:
    """``{class: {member: parameters, or None for a property}}``."""
    classes = {}
    for c in (node for node in _tree().body if isinstance(node, ast.ClassDef)):
        members = {}
        for f in (node for node in c.body if isinstance(node, ast.FunctionDef)):
            is_property = any(isinstance(d, ast.Name) and d.id == "property" for d in f.decorator_list)
            members[f.name] = None if is_property else _params(f)
        classes[c.name] = members
    return classes


def test_stubs_match_the_compiled_core():
    module = core()
    public = {name: getattr(module, name) for name in dir(module) if not name.startswith("_")}
    exported = {name for name, obj in public.items() if callable(obj) and not isinstance(obj, type)}
    stubs = _stubs()
    assert exported == set(stubs), f"missing stubs: {exported - set(stubs)}; stale stubs: {set(stubs) - exported}"
    for name, params in stubs.items():
        signature = inspect.signature(getattr(module, name))
        assert [p for p in signature.parameters] == params, name


def test_class_stubs_match_the_compiled_core():
    module = core()
    classes = {name for name in dir(module) if not name.startswith("_") and isinstance(getattr(module, name), type)}
    stubs = _class_stubs()
    assert classes == set(stubs), f"missing class stubs: {classes - set(stubs)}; stale: {set(stubs) - classes}"
    for name, members in stubs.items():
        cls = getattr(module, name)
        assert {m for m in dir(cls) if not m.startswith("_")} == set(members), name
        for member, params in members.items():
            if params is None:
                assert isinstance(inspect.getattr_static(cls, member), property) or not callable(
                    inspect.getattr_static(cls, member)), f"{name}.{member} is not a property"
            else:
                listed = [p for p in inspect.signature(getattr(cls, member)).parameters if p != "self"]
                assert listed == params, f"{name}.{member}"


def test_package_ships_typing_marker():
    assert (Path(difattn.__file__).parent / "py.typed").exists()
