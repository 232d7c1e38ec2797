"""Checkpoints that survive SIGKILL: written under a temporary name, fsynced, then renamed.

`DIR/checkpoints/step-N/` holds
    model/          the LoRA adapter in peft's format (usable as `--adapter`), or full weights (safetensors)
    optimizer.pt    optimizer state
    rng.pt          torch, numpy and Python RNG states (dropout draws continue exactly)
    state.json      step and counters
    config.yaml     the resolved run config
A directory named `step-N` is complete by construction; leftovers of a killed write are `.tmp-*` and are
removed on resume.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from peft import PeftModel, set_peft_model_state_dict

from tunery.training.faults import fault_point
from tunery.training.io import atomic_write_json, atomic_write_yaml, fsync_dir


def save_adapter(model: PeftModel, out_dir: Path) -> None:
    """peft's adapter format. Embedding layers are never trained by LoRA here, and asking peft to decide
    ('auto') makes it look the base model up on the Hugging Face hub, which is offline in Tunery's world."""
    model.save_pretrained(str(out_dir), save_embedding_layers=False)


# Heads over an `lm` (models/heads.py), each saved as `<name>.safetensors` next to the LM's weights.
HEADS = ("score", "value_head")


def _head(model: torch.nn.Module) -> tuple[str, torch.nn.Linear] | None:
    for name in HEADS:
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Linear):
            return name, head
    return None


def save_trainable(model: torch.nn.Module, out_dir: Path) -> None:
    """LoRA: the adapter in peft's format. Full fine-tuning: the weights as one safetensors file. A reward
    model (a `score` head over an `lm`) adds `score.safetensors`, a PPO policy `value_head.safetensors`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    head = _head(model)
    if head is not None:
        safetensors.torch.save_model(head[1], str(out_dir / f"{head[0]}.safetensors"))
        model = model.lm  # type: ignore[assignment]
    if isinstance(model, PeftModel):
        save_adapter(model, out_dir)
    else:
        safetensors.torch.save_model(model, str(out_dir / "model.safetensors"))  # type: ignore[arg-type]


def load_trainable(model: torch.nn.Module, src_dir: Path) -> None:
    head = _head(model)
    if head is not None:
        safetensors.torch.load_model(head[1], str(src_dir / f"{head[0]}.safetensors"))
        model = model.lm  # type: ignore[assignment]
    if isinstance(model, PeftModel):
        state = safetensors.torch.load_file(str(src_dir / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, state)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"checkpoint {src_dir} does not match the model: {unexpected[:3]}")
    else:
        safetensors.torch.load_model(model, str(src_dir / "model.safetensors"))


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    config: dict[str, Any],
    keep: int | None = None,
) -> Path:
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_trainable(model, tmp / "model")
    fault_point("during_save", step)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save(rng, tmp / "rng.pt")
    atomic_write_json(tmp / "state.json", {**state, "step": step})
    atomic_write_yaml(tmp / "config.yaml", config)
    for path in tmp.rglob("*"):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(ckpt_root)
    if keep:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [
        p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").exists()
    ]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = run_dir / "checkpoints"
    if root.is_dir():
        for leftover in root.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG states; returns the saved state (step and counters)."""
    load_trainable(model, ckpt / "model")
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    rng = torch.load(ckpt / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return dict(json.loads((ckpt / "state.json").read_text()))
