"""Early stopping on the validation loss, and final/ written from the best evaluation's weights.

An evaluation counts as an improvement when its validation loss is lower than the reference by more
than `min_delta`; the reference is the loss of the last improvement (Keras's rule), so a slow, steady fall
still resets the count. After `patience` evaluations in a row without one, training stops (0: never).
The best weights are those of the lowest validation loss however small the margin (the rule of
Hugging Face's `load_best_model_at_end`). With `select_best` they are written to DIR/best/step-N/ when
they appear, and final/ is written from them.

Resume: the state (best step and loss, reference, count) travels in the checkpoint counters. On resume,
every best/step-N/ except the one the checkpoint names is deleted: older ones were superseded, newer
ones belong to steps that are about to be redone (exactly, so they come back).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunery.training import distributed
from tunery.training.checkpoint import list_checkpoints, load_trainable, save_trainable

log = logging.getLogger("tunery")


@dataclass
class EarlyStopping:
    """What the evaluations so far say: the best step, and how many evaluations have not improved.

    >>> early = EarlyStopping(patience=2)
    >>> [early.update(step, loss) for step, loss in [(10, 1.0), (20, 0.8), (30, 0.9), (40, 0.85)]]
    [True, True, False, False]
    >>> early.best_step, early.should_stop
    (20, True)
    """

    patience: int = 0  # evaluations without improvement before stopping; 0 never stops
    min_delta: float = 0.0  # an improvement must lower the loss by more than this
    best_step: int | None = None
    best_loss: float = math.inf
    reference_loss: float = math.inf  # the loss at the last improvement
    bad_evals: int = 0

    def update(self, step: int, valid_loss: float) -> bool:
        """Record an evaluation; True when its weights are the best so far. A NaN loss never improves."""
        if valid_loss < self.reference_loss - self.min_delta:
            self.reference_loss, self.bad_evals = valid_loss, 0
        else:
            self.bad_evals += 1
        if valid_loss < self.best_loss:
            self.best_step, self.best_loss = step, valid_loss
            return True
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    def state(self) -> dict[str, Any]:
        """For the checkpoint counters (JSON has no infinity: no evaluation yet is None)."""
        finite = math.isfinite
        return {
            "best_step": self.best_step,
            "best_loss": self.best_loss if finite(self.best_loss) else None,
            "reference_loss": self.reference_loss if finite(self.reference_loss) else None,
            "bad_evals": self.bad_evals,
        }

    @classmethod
    def from_state(cls, patience: int, min_delta: float, state: dict[str, Any] | None) -> EarlyStopping:
        early = cls(patience, min_delta)
        if state:
            early.best_step = state.get("best_step")
            early.best_loss = math.inf if state.get("best_loss") is None else float(state["best_loss"])
            ref = state.get("reference_loss")
            early.reference_loss = math.inf if ref is None else float(ref)
            early.bad_evals = int(state.get("bad_evals", 0))
        return early

    def summary(self, final_step: int, last_step: int, total_steps: int) -> dict[str, Any]:
        """What summary.json and the last metrics record say about it."""
        return {
            "best_step": self.best_step,
            "best_valid_loss": self.best_loss if math.isfinite(self.best_loss) else None,
            "stopped_early": self.should_stop and last_step < total_steps,
            "final_step": final_step,
        }


def resume_early_stopping(run_dir: Path, cfg: Any, resume: bool, world: distributed.World) -> EarlyStopping:
    """The state saved in the checkpoint a run resumes from (a fresh one otherwise), with the config's
    `early_stopping_patience` and `early_stopping_min_delta`."""
    checkpoints = list_checkpoints(run_dir) if resume else []
    state = json.loads((checkpoints[-1] / "state.json").read_text()) if checkpoints else {}
    early = EarlyStopping.from_state(
        cfg.early_stopping_patience, cfg.early_stopping_min_delta, state.get("early_stopping")
    )
    if world.is_main:
        for path in _best_dirs(run_dir):
            if _step(path) != early.best_step:
                shutil.rmtree(path, ignore_errors=True)
    return early


def save_best(run_dir: Path, model: torch.nn.Module, step: int, world: distributed.World) -> None:
    """Write DIR/best/step-N atomically (the main process; every process its shards with --shard). Older
    best weights go, except those the latest checkpoint names: a run resumed from it needs them."""
    root = run_dir / "best"
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    if world.sharded:
        from tunery.training import sharding

        distributed.barrier(world)
        sharding.save_state(tmp / sharding.SHARDED, model, None)
        distributed.barrier(world)
    elif world.is_main:
        save_trainable(model, tmp)
    if world.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _prune(run_dir, step)


def restore_best(
    run_dir: Path, model: torch.nn.Module, early: EarlyStopping, last_step: int, world: distributed.World
) -> int:
    """Load the best weights into `model` on every process; returns the step whose weights it now holds."""
    if early.best_step is None:
        return last_step
    if early.best_step != last_step:
        distributed.barrier(world)  # the main process wrote them
        path = run_dir / "best" / f"step-{early.best_step}"
        if not path.is_dir():
            log.warning("best weights of step %d are missing from %s; final/ keeps the last step's",
                        early.best_step, run_dir / "best")  # fmt: skip
            return last_step
        if world.sharded:
            from tunery.training import sharding

            sharding.load_state(path / sharding.SHARDED, model, None)
        else:
            load_trainable(model, path)
    if world.is_main:
        _prune(run_dir, early.best_step)
    return early.best_step


def _prune(run_dir: Path, keep: int) -> None:
    """Delete best weights other than step `keep` and the best step the latest checkpoint names."""
    checkpoints = list_checkpoints(run_dir)
    state = json.loads((checkpoints[-1] / "state.json").read_text()) if checkpoints else {}
    named = (state.get("early_stopping") or {}).get("best_step")
    for path in _best_dirs(run_dir):
        if _step(path) not in (keep, named):
            shutil.rmtree(path, ignore_errors=True)


def _best_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / "best"
    return [p for p in root.glob("step-*") if p.is_dir()] if root.is_dir() else []


def _step(path: Path) -> int:
    return int(path.name.split("-")[1])
