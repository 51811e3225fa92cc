"""The package's layout rules (issue 17), checked on the source: they cannot drift.

* TensorFlow and Keras are imported only under ``jacstream/engine``;
* the layers import only the ones below them (planning < engine, store < run...);
* no function has more than 60 lines of code (docstring, comments and blank lines
  not counted) and no module more than 500 lines;
* the strategy names are listed in one table only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jacstream"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 500

# What each layer may import of jacstream (besides the leaf modules errors, events,
# _memory and _version, which import nothing of jacstream).
ALLOWED = {
    "planning": {"planning"},
    "engine": {"planning", "engine"},
    "store": {"planning", "store"},
    "analysis": {"planning", "store", "analysis"},
    "run": {"planning", "engine", "store", "run"},
}
LEAVES = {"errors", "events", "_memory", "_version"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imported(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    package = parts if path.name == "__init__.py" else parts[:-1]
    names = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    return names


def _room(path: Path) -> str:
    rel = path.relative_to(PACKAGE).parts
    return rel[0] if len(rel) > 1 else path.stem


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_tensorflow_only_in_the_engine(path):
    tf = {n for n in _imported(path) if n.split(".")[0] in ("tensorflow", "keras")}
    if _room(path) != "engine":
        assert not tf, f"{path.name} imports {sorted(tf)}: only jacstream/engine may"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_layers_import_only_the_layers_below(path):
    room = _room(path)
    ours = {n.split(".")[1] for n in _imported(path)
            if n.startswith("jacstream.") and len(n.split(".")) > 1}
    if room in LEAVES:
        assert not ours - {"errors"} - {room}, f"{path.name} (a leaf) imports {sorted(ours)}"
    elif room in ALLOWED:
        extra = ours - ALLOWED[room] - LEAVES
        assert not extra, f"{path} ({room}/) imports {sorted(extra)}"


def _code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> int:
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        doc = set(range(body[0].lineno, body[0].end_lineno + 1))
    else:
        doc = set()
    start = fn.lineno
    end = fn.end_lineno or fn.lineno
    return sum(1 for i in range(start, end + 1) if i not in doc
               and lines[i - 1].strip() and not lines[i - 1].strip().startswith("#"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_functions_and_modules_stay_small(path):
    text = path.read_text()
    lines = text.splitlines()
    assert len(lines) <= MAX_MODULE_LINES, f"{path.name}: {len(lines)} lines"
    long = [(node.name, n) for node in ast.walk(_tree(path))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and (n := _code_lines(node, lines)) > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} code lines: {long}"


def test_strategy_names_live_in_one_table():
    from jacstream.planning.strategies import REGISTRY

    names = set(REGISTRY)
    listed = []
    for path in MODULES:
        if path.name == "strategies.py" and path.parent.name == "planning":
            continue
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                strs = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                if len(strs & names) >= 2:
                    listed.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not listed, f"strategy names listed outside planning/strategies.py: {listed}"


def test_every_registered_strategy_has_its_engine_module():
    pytest.importorskip("tensorflow")
    from jacstream.engine.strategies import function_class
    from jacstream.planning.strategies import REGISTRY

    for name, info in REGISTRY.items():
        cls = function_class(name)
        assert cls.axis == info.axis and cls.impls, name
