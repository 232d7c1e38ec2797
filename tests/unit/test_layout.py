"""Imports go one way: losses import only torch (and each other); lower layers never import recipes or the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "tunery"
STDLIB_OK = {"__future__", "math", "dataclasses", "typing", "collections", "functools"}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_losses_import_only_torch() -> None:
    for path in (PACKAGE / "losses").glob("*.py"):
        for name in imported_modules(path):
            ok = name.split(".")[0] in {"torch"} | STDLIB_OK or name.startswith("tunery.losses.")
            assert ok, f"{path.name} imports {name}"


def test_lower_layers_never_import_recipes_or_cli() -> None:
    for layer in ("data", "models", "losses", "training"):
        for path in (PACKAGE / layer).glob("*.py"):
            for name in imported_modules(path):
                assert not name.startswith(("tunery.recipes", "tunery.cli", "tunery.server")), (
                    f"{path} imports {name}"
                )


def test_recipes_never_import_the_cli() -> None:
    for path in (PACKAGE / "recipes").glob("*.py"):
        assert not any(n.startswith(("tunery.cli", "tunery.server")) for n in imported_modules(path)), path
