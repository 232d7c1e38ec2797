"""The API process never imports torch: training and inference run in worker processes."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SERVER = Path(__file__).resolve().parents[2] / "tunery" / "server"
HEAVY = (
    "torch",
    "transformers",
    "peft",
    "safetensors",
    "tunery.models",
    *(
        f"tunery.recipes.{m}"
        for m in ("sft", "reward_model", "dpo", "kto", "grpo", "ppo", "compare", "rollouts", "pairs")
    ),
    "tunery.run.lifecycle",
)


def test_importing_the_app_imports_no_torch() -> None:
    code = (
        "import sys, tunery.server.app, tunery.cli; app = tunery.server.app.create_app; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or m.startswith({HEAVY!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_only_the_inference_worker_may_import_models() -> None:
    for path in SERVER.rglob("*.py"):
        if path.name == "inference.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith(HEAVY), f"{path.name} imports {name}"
