"""Checkpoints that survive SIGKILL: written under a temporary name, fsynced, then renamed.

`DIR/checkpoints/step-N/` holds
    model/          the LoRA adapter in peft's format (usable as `--adapter`), or full weights (safetensors)
    optimizer.pt    optimizer state
    rng.pt          torch, numpy and Python RNG states (dropout draws continue exactly)
or, for a run with --shard (training/sharding.py),
    sharded/        every process's shards of the weights and optimizer state (PyTorch's DCP format)
    rng-R.pt        process R's RNG states
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
import threading
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from peft import PeftModel, set_peft_model_state_dict

from tunery.training import distributed
from tunery.training.faults import fault_point
from tunery.training.io import atomic_write_json, atomic_write_yaml, fsync_dir


def save_adapter(model: PeftModel, out_dir: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """peft's adapter format (from `state_dict`, the model's named weights, when given). Embedding layers
    are never trained by LoRA here, and asking peft to decide ('auto') makes it look the base model up on
    the Hugging Face hub, which is offline in Tunery's world."""
    model.save_pretrained(str(out_dir), save_embedding_layers=False, state_dict=state_dict)


# Heads over an `lm` (models/heads.py), each saved as `<name>.safetensors` next to the LM's weights.
HEADS = ("score", "value_head")


def _head(model: torch.nn.Module) -> tuple[str, torch.nn.Linear] | None:
    for name in HEADS:
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Linear):
            return name, head
    return None


def save_trainable(
    model: torch.nn.Module, out_dir: Path, weights: dict[str, torch.Tensor] | None = None
) -> None:
    """LoRA: the adapter in peft's format. Full fine-tuning: the weights as one safetensors file. A reward
    model (a `score` head over an `lm`) adds `score.safetensors`, a PPO policy `value_head.safetensors`.
    `weights`: a copy of the LoRA run's trainable weights by `named_parameters` name, saved instead of
    the live ones (a background checkpoint), or a sharded run's gathered weights (`sharding.full_weights`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    head = _head(model)
    if head is not None:
        name, layer = head
        if weights is None:
            safetensors.torch.save_model(layer, str(out_dir / f"{name}.safetensors"))
        else:
            own = {k.removeprefix(f"{name}."): v for k, v in weights.items() if k.startswith(f"{name}.")}
            safetensors.torch.save_file(own, str(out_dir / f"{name}.safetensors"))
            weights = {k.removeprefix("lm."): v for k, v in weights.items() if k.startswith("lm.")}
        model = model.lm  # type: ignore[assignment]
    if isinstance(model, PeftModel):
        save_adapter(model, out_dir, weights)
    elif weights is not None:  # each tied weight once, under its first name, as save_model writes it
        first: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            first.setdefault(id(p), name)
        kept = set(first.values()) | {name for name, _ in model.named_buffers()}
        weights = {k: v.contiguous() for k, v in weights.items() if k in kept}
        safetensors.torch.save_file(weights, str(out_dir / "model.safetensors"))
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


class CheckpointWriter:
    """Checkpoints written on a background thread while training goes on. The step's trainable weights,
    optimizer state and RNG states are copied in memory first (a LoRA adapter's are tens of MB, a few ms);
    serialising and fsyncing them took ~0.15 s a checkpoint on SmolLM2-135M, which a short run with ~5
    checkpoints otherwise waits for. Full fine-tuning saves on this thread instead (a copy would double
    the weights' memory), and so does every save with `background=False`. One write is in flight at a
    time: `save` and `wait` finish the previous one first and raise its error, if it had one."""

    def __init__(self, background: bool = True) -> None:
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(
        self,
        run_dir: Path,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        state: dict[str, Any],
        config: dict[str, Any],
        keep: int | None = None,
        world: distributed.World | None = None,
    ) -> None:
        """Called by the main process; with --shard (`world.sharded`) by every process, each writing its
        shards on this thread."""
        self.wait()
        if world is not None and world.sharded:
            tmp = _write_shards(run_dir, step, model, optimizer, world)
            if world.is_main:
                atomic_write_json(tmp / "state.json", {**state, "step": step})
                atomic_write_yaml(tmp / "config.yaml", config)
                _publish(tmp, run_dir / "checkpoints" / f"step-{step}", run_dir, keep)
            return
        head = _head(model)
        if not self.background or not isinstance(model.lm if head is not None else model, PeftModel):
            _write(run_dir, step, model, None, optimizer.state_dict(), _rng_state(), state, config, keep)
            return
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if head is not None:  # the whole head, as save_model writes it
            weights |= {f"{head[0]}.{k}": v.detach().clone() for k, v in head[1].state_dict().items()}
        optimizer_state = _cloned(optimizer.state_dict())
        args = (run_dir, step, model, weights, optimizer_state, _rng_state(), state, config, keep)
        self._thread = threading.Thread(target=self._write, args=args, name=f"checkpoint-{step}")
        self._thread.start()

    def _write(self, *args: Any) -> None:
        try:
            _write(*args)
        except BaseException as exc:  # raised on the training thread by the next save() or wait()
            self._error = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _cloned(value: Any) -> Any:
    """A copy of an optimizer state dict whose tensors the next step cannot change."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cloned(v) for v in value)
    return value


def _write(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    weights: dict[str, torch.Tensor] | None,  # a copy of the trainable weights, or None: the live ones
    optimizer_state: dict[str, Any],
    rng: dict[str, Any],
    state: dict[str, Any],
    config: dict[str, Any],
    keep: int | None,
) -> Path:
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_trainable(model, tmp / "model", weights)
    fault_point("during_save", step)
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(rng, tmp / "rng.pt")
    atomic_write_json(tmp / "state.json", {**state, "step": step})
    atomic_write_yaml(tmp / "config.yaml", config)
    _publish(tmp, final, run_dir, keep)
    return final


def _write_shards(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  world: distributed.World) -> Path:  # fmt: skip
    """Every process's shards of a sharded run's checkpoint, and its RNG states, into the checkpoint's
    temporary directory (returned); the main process publishes it once all have written."""
    from tunery.training import sharding

    tmp = run_dir / "checkpoints" / f".tmp-step-{step}"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier(world)
    sharding.save_state(tmp / sharding.SHARDED, model, optimizer)
    torch.save(_rng_state(), tmp / f"rng-{world.rank}.pt")
    fault_point("during_save", step)
    distributed.barrier(world)
    return tmp


def _publish(tmp: Path, final: Path, run_dir: Path, keep: int | None) -> None:
    """fsync a checkpoint's files, rename it into place and keep the `keep` newest."""
    for path in tmp.rglob("*"):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(final.parent)
    if keep:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


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
    """Restore weights, optimizer and RNG states; returns the saved state (step and counters). A sharded
    checkpoint loads into the sharded model, each process taking its rank's RNG states (the main
    process's when its rank wrote none)."""
    if (ckpt / "sharded").is_dir():  # sharding.SHARDED
        from tunery.training import sharding

        sharding.load_state(ckpt / sharding.SHARDED, model, optimizer)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        own = ckpt / f"rng-{rank}.pt"
        rng = torch.load(own if own.is_file() else ckpt / "rng-0.pt", weights_only=False)
    else:
        load_trainable(model, ckpt / "model")
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        rng = torch.load(ckpt / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return dict(json.loads((ckpt / "state.json").read_text()))
