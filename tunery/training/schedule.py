"""Learning-rate schedules: linear warmup, then cosine or linear decay (or constant)."""

from __future__ import annotations

import math


def lr_at(
    step: int,
    total_steps: int,
    peak_lr: float,
    warmup_steps: int,
    kind: str = "cosine",
    min_lr_ratio: float = 0.0,
) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if kind == "constant":
        return peak_lr
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif kind == "linear":
        factor = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {kind!r}")
    return peak_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * factor)
