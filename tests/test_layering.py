"""Import layering: every magseg module imports only from its own layer or the layers below.

``LAYERS`` is the rule, written once: layers bottom to top, each a tuple of module or package
names (a package holds every module under it; the longest name that matches decides). The
check parses each module of ``magseg/`` and ``cli/`` (installed as ``magseg.cli``) with
``ast`` and reads every ``import``: at the top, inside functions (the lazy ones) and under
``if TYPE_CHECKING:`` alike. A lazy import is a dependency that runs later, and a type-only
import is a contract written in terms of the module above: both let a cycle come back, hidden.

The public facade ``magseg`` (``magseg/__init__.py``) sits with config: it imports
``magseg.config`` and ``magseg.errors`` and names the rest in strings, imported when a user
first asks for them (``magseg.predict_raster``); modules below it import ``__version__``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS: list[tuple[str, ...]] = [
    ("magseg.errors", "magseg.geometry"),
    ("magseg.device", "magseg.allocator", "magseg.normalization", "magseg.cache"),
    ("magseg", "magseg.config"),
    ("magseg.io",),  # file primitives: rasters, vectors, atomic writes, provenance, previews
    ("magseg.models",),  # networks built from config: smp models by name, FCtL, offline weights
    ("magseg.engine",),  # the stage loop on one image; runs whatever models/ built
    ("magseg.checkpoint",),
    ("magseg.segmenter",),
    ("magseg.data",),
    ("magseg.evaluation",),
    ("magseg.training",),
    ("magseg.run", "magseg.export", "magseg.quantize"),  # predict over rasters, scene pools, exported graphs
    ("magseg.cli",),
]


def module_files(root: Path) -> dict[str, Path]:
    """Every module's dotted name -> its file, for ``magseg/`` and ``cli/`` under ``root``."""
    found = {}
    for top, package in (("magseg", ("magseg",)), ("cli", ("magseg", "cli"))):
        for path in sorted((root / top).rglob("*.py")):
            parts = [*package, *path.relative_to(root / top).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(name: str, source: str, is_package: bool, known: Sequence[str]) -> Iterator[tuple[int, str]]:
    """``(line, imported magseg module)`` for every import in ``source`` (module ``name``),
    wherever it sits; ``from a import b`` counts as ``a.b`` when that is a module."""
    here = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):  # once per statement, in order
            if target == "magseg" or target.startswith("magseg."):
                yield node.lineno, target


def layer_of(module: str, layers: Sequence[tuple[str, ...]]) -> int | None:
    """The index of ``module``'s layer: the longest entry naming it or a package above it
    (the root ``magseg`` names only itself); None when no layer holds it."""
    best, index = -1, None
    for number, entries in enumerate(layers):
        for entry in entries:
            matches = module == entry or (entry != "magseg" and module.startswith(entry + "."))
            if matches and len(entry) > best:
                best, index = len(entry), number
    return index


def _layer(layers: Sequence[tuple[str, ...]], index: int) -> str:
    return f"layer {index} ({', '.join(layers[index])})"


def violations(files: dict[str, Path], layers: Sequence[tuple[str, ...]],
               sources: dict[str, str] | None = None) -> list[str]:
    """One line per import that runs up the layers (or per module no layer holds).

    ``sources``: module -> text instead of reading ``files`` (a synthetic graph)."""
    problems = []
    known = list(files)
    for name, path in files.items():
        own = layer_of(name, layers)
        if own is None:
            problems.append(f"{name} ({path}) is in no layer: add it to LAYERS in tests/test_layering.py")
            continue
        text = sources[name] if sources is not None else path.read_text(encoding="utf-8")
        for line, target in imports_of(name, text, path.name == "__init__.py", known):
            theirs = layer_of(target, layers)
            if theirs is not None and theirs > own:
                problems.append(
                    f"{path}:{line}: {name} imports {target}, a layer above it: "
                    f"{_layer(layers, theirs)} is above {_layer(layers, own)} in LAYERS "
                    f"(a module imports only its own layer or those below)")
    return problems


def test_no_module_imports_a_layer_above_it():
    files = module_files(ROOT)
    assert "magseg.engine.stages" in files and "magseg.cli.app" in files
    assert violations(files, LAYERS) == []


def _synthetic(sources: dict[str, str]) -> tuple[dict[str, Path], dict[str, str]]:
    files = {name: Path(*name.split(".")).with_suffix(".py") for name in sources}
    return files, sources


SYNTHETIC_LAYERS = [("magseg.errors",), ("magseg.config",), ("magseg.engine",)]


@pytest.mark.parametrize("text", [
    "from magseg.engine.pyramid import stage_sizes\n",
    "def f():\n    from magseg.engine.pyramid import stage_sizes\n",
    "import magseg.engine.pyramid as p\n",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from magseg.engine import pyramid\n",
])
def test_an_upward_import_is_named_with_its_rule(text):
    files, sources = _synthetic({
        "magseg.errors": "",
        "magseg.config": text,
        "magseg.engine.pyramid": "from magseg.config import X\nfrom magseg.errors import Y\n",
    })
    problems = violations(files, SYNTHETIC_LAYERS, sources)
    assert len(problems) == 1
    assert "magseg.config imports magseg.engine" in problems[0]
    assert "layer 2 (magseg.engine) is above layer 1 (magseg.config)" in problems[0]
    assert str(Path("magseg", "config.py")) in problems[0]


def test_downward_and_same_layer_imports_pass_and_relative_ones_resolve():
    files, sources = _synthetic({
        "magseg.errors": "",
        "magseg.config": "from magseg.errors import E\n",
        "magseg.engine.pyramid": "from . import maps\nfrom magseg.config import C\n",
        "magseg.engine.maps": "from .pyramid import Size\n",
    })
    assert violations(files, SYNTHETIC_LAYERS, sources) == []
    assert list(imports_of("magseg.engine.maps", "from .pyramid import Size\n", False,
                           list(files))) == [(1, "magseg.engine.pyramid")]
    assert list(imports_of("magseg.engine.pyramid", "from .. import config\n", False,
                           list(files))) == [(1, "magseg.config")]


def test_a_module_in_no_layer_is_reported():
    files, sources = _synthetic({"magseg.errors": "", "magseg.stray": "from magseg.errors import E\n"})
    problems = violations(files, SYNTHETIC_LAYERS, sources)
    assert len(problems) == 1 and "magseg.stray" in problems[0] and "in no layer" in problems[0]
