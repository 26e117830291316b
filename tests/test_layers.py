"""Imports point down only: each layer of the package imports from the layers below it (and its
own), never from one above, so each can be read, tested and replaced without those above it.
Every import counts, a function's deferred ones too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "fundament"

# Top to bottom. A module is in the layer of its first path component under fundament/.
LAYERS = [
    ["cli", "__main__", "__init__"],  # the package root re-exports the public API, lazily
    ["evals"],
    ["server"],
    ["registry"],
    ["jobs"],
    ["adapt"],
    ["engine"],
    ["models"],
    ["config", "errors"],
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def layer_of(module: str) -> str:
    """'fundament.server.app' -> 'server'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] + (["__init__"] if len(parts) == 1 else [])
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import of fundament's own modules in one file."""
    me = module_name(path)
    package = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            out += [(node.lineno, n) for n in names if n.startswith("fundament")]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("fundament")]
    return out


def violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mine = layer_of(module_name(path))
        assert mine in RANK, f"{path}: its layer {mine!r} is not in LAYERS"
        for line, target in imports(path):
            theirs = layer_of(target)
            if theirs in RANK and RANK[theirs] < RANK[mine]:
                found.append(
                    f"{path.relative_to(PACKAGE)}:{line} ({mine}) imports {target} ({theirs}), a layer above it"
                )
    return found


def test_imports_point_down_only():
    found = violations()
    assert not found, "\n".join(found)


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """It can fail: a models module importing the server is reported."""
    pkg = tmp_path / "fundament"
    (pkg / "models").mkdir(parents=True)
    (pkg / "server").mkdir()
    for f in ("__init__.py", "models/__init__.py", "server/__init__.py", "server/app.py"):
        (pkg / f).write_text("")
    (pkg / "models" / "bad.py").write_text("def f():\n    from ..server.app import create_app\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    assert violations() == ["models/bad.py:2 (models) imports fundament.server.app (server), a layer above it"]
