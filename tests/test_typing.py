"""Type hints of the public API: present, and resolvable where the config reads them.

The config checks an algorithm's, model's or data set's keys by the annotations of its constructor
(``typing.get_type_hints``); an annotation that does not resolve at run time (a name imported only
for type checkers) would silently turn that check off, so every registered component is resolved
here. The public API (what ``metatl``, ``metatl.meta``, ``metatl.transfer``, ``metatl.data`` and
``metatl.stats`` export, with their classes' public methods, and the registered estimators) keeps
an annotation on every parameter and return value."""

from __future__ import annotations

import inspect
import typing

import pytest

from metatl.registry import ALGORITHMS, BACKBONES, DATASETS, ESTIMATORS

MODULES = ("metatl", "metatl.meta", "metatl.transfer", "metatl.data", "metatl.stats")


@pytest.mark.parametrize("registry", [ALGORITHMS, BACKBONES, DATASETS], ids=lambda r: r.kind)
def test_registered_components_annotations_resolve(registry):
    unresolved = []
    for name, obj in registry.items():
        target = obj.__init__ if isinstance(obj, type) else obj
        try:
            typing.get_type_hints(target)
        except Exception as err:  # a name the module does not hold at run time
            unresolved.append(f"{registry.kind} {name}: {err!r}")
    assert len(registry.items()) > 0, f"no {registry.kind} registered"
    assert not unresolved, f"{unresolved}; import what the constructors' annotations name at run time"


def _own_functions(obj) -> list[tuple[str, typing.Callable]]:
    """``obj`` itself (a function) or a class's public methods and ``__init__``, defined in metatl."""
    if inspect.isfunction(obj):
        return [(obj.__qualname__, obj)] if obj.__module__.startswith("metatl") else []
    if not inspect.isclass(obj) or not obj.__module__.startswith("metatl"):
        return []
    return [
        (f"{obj.__qualname__}.{name}", f)
        for name, f in vars(obj).items()
        if (not name.startswith("_") or name == "__init__")
        and inspect.isfunction(f)
        and f.__module__.startswith("metatl")
    ]


def public_functions() -> dict[str, typing.Callable]:
    import importlib

    found = {}
    for module in map(importlib.import_module, MODULES):
        names = getattr(module, "__all__", [n for n in vars(module) if not n.startswith("_")])
        for name in names:
            for qualname, f in _own_functions(getattr(module, name)):
                found[f"{f.__module__}.{qualname}"] = f
    for _, estimator in ESTIMATORS.items():
        for qualname, f in _own_functions(estimator):
            found[f"{f.__module__}.{qualname}"] = f
    return found


def missing_annotations(f) -> list[str]:
    sig = inspect.signature(f)
    missing = [
        p.name
        for p in sig.parameters.values()
        if p.name not in ("self", "cls")
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.annotation is inspect.Parameter.empty
    ]
    if sig.return_annotation is inspect.Signature.empty and f.__name__ != "__init__":
        missing.append("return")
    return missing


def test_the_public_api_is_annotated():
    functions = public_functions()
    assert "metatl.load" in functions and "metatl.meta.maml.MAML.adapt" in functions and len(functions) > 100
    unannotated = {name: m for name, f in functions.items() if (m := missing_annotations(f))}
    assert not unannotated, f"add type hints: {unannotated}"


def test_the_check_sees_a_missing_annotation():
    def f(x, y: int = 0):
        return x

    assert missing_annotations(f) == ["x", "return"]
