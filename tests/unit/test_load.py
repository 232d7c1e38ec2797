"""Model loading (models/load.py): what every `from_pretrained` of Tunery's gets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tunery.models.load import load_model

REPO = Path(__file__).resolve().parents[2]


def test_a_loaded_model_keeps_transformers_own_layers(tmp_path: Path) -> None:
    """transformers 5 kernelizes every model it loads with hub kernels unless told not to (a download
    where there is a network); Tunery's loads say no, and load where `kernels` is hidden (the CLI's
    process, `_imports.hide_hub_kernels`) as where it is installed."""
    model, tokenizer = load_model("tiny-random")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    loaded, _ = load_model(str(tmp_path / "model"))
    assert loaded.use_kernels is False
    script = f"""
from tunery._imports import hide_hub_kernels
hide_hub_kernels()
from tunery.models.load import load_model
model, _ = load_model({str(tmp_path / "model")!r})
print("loaded:", type(model).__name__, model.use_kernels)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded: LlamaForCausalLM False" in done.stdout
