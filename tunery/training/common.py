"""What every training recipe shares: checks of the common config fields, `auto` values, restoring a
run, and the end-of-step checkpoint-or-stop. Recipes call these inline; the loops stay in the recipes."""

from __future__ import annotations

import logging
import math
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

from tunery.errors import TuneryError
from tunery.models.lora import adapter_dir, bf16_is_fast
from tunery.safety.card import check_card_fields
from tunery.training import auto, distributed
from tunery.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tunery.training.config import to_dict
from tunery.training.energy import check_energy_fields
from tunery.training.metrics import MetricsLog
from tunery.training.rundir import file_digest
from tunery.training.signals import GracefulStop

log = logging.getLogger("tunery")


def check_common_fields(cfg: Any) -> None:
    """The fields every recipe's config has (data, out, epochs, batch size, learning rate, LoRA, length,
    precision, schedule, energy and model-card declarations), with messages a user can act on."""
    if not cfg.data:
        raise TuneryError("no training data: pass --data FILE.jsonl")
    if not cfg.out:
        raise TuneryError("no run directory: pass --out DIR")
    for name in ("epochs", "batch_size", "learning_rate_multiplier"):
        value = getattr(cfg, name)
        if value != "auto" and (isinstance(value, str) or value <= 0):
            raise TuneryError(f"{name} must be 'auto' or a positive number, got {value!r}")
    if getattr(cfg, "max_steps", 0) < 0:
        raise TuneryError(f"max_steps must be >= 0 (0: the epochs decide), got {cfg.max_steps}")
    if cfg.lr is not None and not 0 < cfg.lr < 1:
        raise TuneryError(f"lr must be between 0 and 1, got {cfg.lr}")
    if cfg.lora_rank < 0:
        raise TuneryError("lora_rank must be >= 0 (0 means full fine-tuning)")
    if cfg.max_length < 16:
        raise TuneryError("max_length must be at least 16 tokens")
    if cfg.micro_batch_tokens < 16:
        raise TuneryError("micro_batch_tokens must be at least 16")
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise TuneryError(f"precision must be bf16, fp32 or auto, got {cfg.precision!r}")
    if cfg.schedule not in ("cosine", "linear", "constant"):
        raise TuneryError(f"schedule must be cosine, linear or constant, got {cfg.schedule!r}")
    if not 0 <= cfg.warmup_ratio < 1:
        raise TuneryError("warmup_ratio must be in [0, 1)")
    check_energy_fields(cfg)
    check_card_fields(cfg)
    if getattr(cfg, "adapter", None):  # before the run directory is made: a typo must not leave one behind
        adapter_dir(cfg.adapter)
    size = getattr(cfg, "safety_evals", "none")  # the recipes of chat models
    if size not in ("none", "quick", "default", "full"):
        raise TuneryError(f"safety_evals must be none, quick, default or full, got {size!r}")
    patience = getattr(cfg, "early_stopping_patience", 0)  # the recipes that evaluate a validation loss
    if patience < 0 or getattr(cfg, "early_stopping_min_delta", 0.0) < 0:
        raise TuneryError("early_stopping_patience and early_stopping_min_delta must be >= 0")
    if patience and not cfg.valid:
        raise TuneryError("early stopping watches the validation loss: pass --valid FILE.jsonl")


def resolve_common(
    cfg: Any,
    n_train: int,
    world: distributed.World,
    base_lr: float,
    auto_batch: auto.AutoBatch = auto.openai_batch,
) -> dict[str, Any]:
    """The config with every `auto` filled in, as config.yaml records it, and the log saying why. `base_lr`
    is the method's learning rate for a multiplier of 1; `auto_batch` the method's batch-size rule."""
    epochs = auto.auto_epochs(n_train) if cfg.epochs == "auto" else int(cfg.epochs)
    choice = auto_batch(n_train) if cfg.batch_size == "auto" else None
    batch_size = choice.size if choice is not None else int(cfg.batch_size)
    batch_size = max(batch_size, world.size)  # every process needs at least one example per step
    multiplier = (
        auto.auto_lr_multiplier(n_train) * (choice.lr_scale if choice is not None else 1.0)
        if cfg.learning_rate_multiplier == "auto"
        else float(cfg.learning_rate_multiplier)
    )
    if choice is not None and world.is_main:
        log.info("batch_size auto: %d per step (%s)", batch_size, choice.why)
        if choice.lr_scale != 1.0 and cfg.learning_rate_multiplier == "auto" and cfg.lr is None:
            log.info(
                "learning rate auto: %.1e (%.0e x %g: the batch is %g times OpenAI's rule, the rate follows it)",
                base_lr * multiplier, base_lr, multiplier, choice.lr_scale,
            )  # fmt: skip
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if bf16_is_fast(world.device) else "fp32"
    steps = auto.total_steps(n_train, batch_size, epochs)
    if getattr(cfg, "max_steps", 0):
        steps = min(steps, cfg.max_steps)
    resolved = to_dict(cfg)
    resolved.update(
        epochs=epochs,
        batch_size=batch_size,
        learning_rate_multiplier=multiplier,
        lr=cfg.lr if cfg.lr is not None else base_lr * multiplier,
        precision=precision,
        eval_every=cfg.eval_every or max(1, steps // 10),
        save_every=cfg.save_every or max(1, math.ceil(steps / 5)),
        total_steps=steps,
        world_size=world.size,
        data_sha256=file_digest(cfg.data),
        valid_sha256=file_digest(cfg.valid),
    )
    return resolved


def restore(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    resume: bool,
    world: distributed.World,
) -> tuple[int, int, float, MetricsLog | None]:
    """Load the latest checkpoint when resuming: (start step, tokens seen, training seconds, metrics log;
    the log only on the main process, with records past the checkpoint dropped)."""
    start_step, tokens_seen, train_seconds = 0, 0, 0.0
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is not None:
            state = load_checkpoint(ckpt, model, optimizer)
            start_step, tokens_seen, train_seconds = state["step"], state["tokens"], state["train_seconds"]
            if world.is_main:
                log.info("resuming %s from %s", run_dir, ckpt.name)
    metrics = (
        MetricsLog(run_dir / "metrics.jsonl", resume_step=start_step if resume else None)
        if world.is_main
        else None
    )
    return start_step, tokens_seen, train_seconds, metrics


def checkpoint_or_stop(
    run_dir: Path,
    step: int,
    resolved: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    counters: dict[str, Any],
    stop: GracefulStop,
    world: distributed.World,
    command: str,
) -> None:
    """End of a step: checkpoint on schedule, and on Ctrl-C / SIGTERM checkpoint and stop with a resume
    hint. Processes agree on stopping with one all-reduce, so all of them save and stop together."""
    total_steps = resolved["total_steps"]
    stopping = distributed.all_sum([float(stop.requested is not None)], world)[0] > 0
    if step % resolved["save_every"] == 0 or step == total_steps or stopping:
        if world.is_main:
            save_checkpoint(
                run_dir, step, model, optimizer, counters, resolved, keep=resolved["keep_checkpoints"]
            )
        distributed.barrier(world)
    if stopping:
        distributed.teardown(world)
        raise TuneryError(
            f"stopped at step {step}/{total_steps} ({stop.requested or 'signal'}); "
            f"continue with: tunery train {command} --resume {run_dir}"
        )


def run_summary(
    method: str,
    cfg: Any,
    run_dir: Path,
    total_steps: int,
    tokens_seen: int,
    wall_start: float,
    train_seconds: float,
    world: distributed.World,
    final_metrics: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """summary.json: what every run reports (`extra` adds the method's own counts, e.g. pairs/s)."""
    return {
        "method": method,
        "model": cfg.model,
        "run_dir": str(run_dir),
        "steps": total_steps,
        "trained_tokens": tokens_seen,
        "wall_seconds": round(time.monotonic() - wall_start, 2),
        "train_seconds": round(train_seconds, 2),
        "tokens_per_second": round(tokens_seen / max(train_seconds, 1e-9), 1),
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "final_metrics": final_metrics,
        **extra,
        "world_size": world.size,
        "pid": os.getpid(),
    }
