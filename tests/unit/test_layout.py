"""Imports go one way: server -> cli -> recipes -> run -> {models, data, losses, graders, training, safety}.
Losses import only torch; the run's config and files, and the methods' configs, import no torch (the CLI
and the service read them)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "tunery"
STDLIB_OK = {"__future__", "math", "dataclasses", "typing", "collections", "functools"}
ABOVE_COMPONENTS = (
    "tunery.recipes",
    "tunery.run.lifecycle",
    "tunery.cli",
    "tunery.commands",
    "tunery.server",
)
# what each part of the tree must never import (by module prefix)
FORBIDDEN = {
    **{layer: ABOVE_COMPONENTS for layer in ("data", "models", "losses", "graders", "training", "safety")},
    "run/config.py": ABOVE_COMPONENTS,
    "run/files.py": ABOVE_COMPONENTS,
    "run/lifecycle.py": ("tunery.recipes", "tunery.cli", "tunery.commands", "tunery.server"),
    "recipes": ("tunery.cli", "tunery.commands", "tunery.server"),
    "federated": ("tunery.cli", "tunery.commands", "tunery.server"),  # a recipe's level: it uses SFT's step
}
TORCH_FREE = ("tunery.run.config", "tunery.run.files", "tunery.recipes.configs", "tunery.safety.evals")


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


def test_imports_go_one_way() -> None:
    checked = 0
    for part, forbidden in FORBIDDEN.items():
        paths = [PACKAGE / part] if part.endswith(".py") else sorted((PACKAGE / part).rglob("*.py"))
        for path in paths:
            checked += 1
            for name in imported_modules(path):
                assert not name.startswith(forbidden), f"{path.relative_to(PACKAGE)} imports {name}"
    assert checked > 60  # the globs found the tree


def test_the_configs_and_the_run_directory_contract_import_no_torch() -> None:
    code = f"import sys\nfor m in {TORCH_FREE!r}: __import__(m)\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
