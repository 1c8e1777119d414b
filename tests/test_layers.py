"""The dependency direction: the engine imports the components, never the other way round.

Data, models, algorithms and transfer methods (and the neutral modules beside them: config,
registry, statistics, checkpoints, building a learner) must run without the engine, so no module
of theirs may import ``metatl.engine``, at the top or inside a function. Read from the source with
``ast`` (nothing is imported), so a lazy import inside a rarely called function is caught too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "metatl"
BELOW_ENGINE = ("data", "nn", "meta", "transfer", "build.py", "checkpoint.py", "config.py", "registry.py", "stats.py")


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = PACKAGE.parent) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``path``, relative ones resolved, with
    ``from X import Y`` giving ``X.Y`` (``Y`` may be a module); ``importlib.import_module("...")``
    and ``__import__("...")`` with a literal name count too. ``root`` holds the ``metatl`` folder."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] if node.level else [])
            module = ".".join(p for p in (base, node.module or "") if p)
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def engine_imports(paths, root: Path = PACKAGE.parent) -> list[str]:
    return [
        f"{path.relative_to(root).as_posix()}:{line} imports {name}"
        for path in paths
        for line, name in imported_modules(path, root)
        if name == "metatl.engine" or name.startswith("metatl.engine.")
    ]


def below_engine() -> list[Path]:
    files = []
    for entry in BELOW_ENGINE:
        path = PACKAGE / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def test_nothing_below_the_engine_imports_it():
    files = below_engine()
    assert len(files) > 50  # the folders are where this test thinks they are
    offending = engine_imports(files)
    assert not offending, (
        "modules below the engine import it; move what they need beside them (metatl.checkpoint, "
        "metatl.build, metatl.stats, metatl.meta.images) or let the engine pass it in:\n" + "\n".join(offending)
    )


@pytest.mark.parametrize(
    "source",
    [
        "from ..engine.build import load_learner",  # a lazy relative import, as rkd.py once had
        "from .. import engine",
        "import metatl.engine.checkpoint as io",
        "from metatl.engine import predict",
        "importlib.import_module('metatl.engine.run')",
    ],
)
def test_the_check_sees_every_way_of_importing_the_engine(tmp_path, source):
    fake = tmp_path / "metatl" / "transfer" / "x.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(f"import importlib\n\n\ndef f():\n    {source}\n")
    found = engine_imports([fake], tmp_path)
    assert len(found) == 1 and found[0].startswith("metatl/transfer/x.py:5 imports metatl.engine")


def test_relative_imports_resolve_to_their_package():
    rkd = PACKAGE / "transfer" / "relation" / "rkd.py"
    names = {name for _, name in imported_modules(rkd)}
    assert {"metatl.registry.ALGORITHMS", "metatl.transfer._deep.DeepTransfer", "metatl.build.load_learner"} <= names


def test_old_import_paths_still_work():
    from metatl import build, checkpoint
    from metatl.engine import build as engine_build
    from metatl.engine import checkpoint as engine_checkpoint
    from metatl.engine import predict
    from metatl.meta import images

    assert engine_build.load_learner is build.load_learner and engine_build.build_learner is build.build_learner
    assert engine_checkpoint.load is checkpoint.load and engine_checkpoint.save_atomic is checkpoint.save_atomic
    assert predict.adapt_images is images.adapt_images and predict.ImagePredictor is images.ImagePredictor
