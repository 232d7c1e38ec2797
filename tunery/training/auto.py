"""`auto` hyperparameters, chosen from the dataset as OpenAI documents them.

- n_epochs: OpenAI's published heuristic: 3 epochs, more for tiny datasets (so at least ~100 examples
  are seen), fewer for huge ones (so at most ~25,000 are), between 1 and 25.
- batch_size: OpenAI's documented rule of ~0.2% of the examples, between 1 and 256. Their rule was made
  for GPUs; on a CPU a step's fixed cost (the optimizer, LoRA's small matmuls, Python) dominates a step of
  one short conversation, so chat fine-tuning takes enough conversations to fill one packed row of
  `micro_batch_tokens` (a few, never so many that an epoch has fewer than ~16 steps).
- learning_rate_multiplier: OpenAI does not document its rule; Tunery uses 1.0 (the base learning rate
  is 2e-4 for LoRA and 2e-5 for full fine-tuning).
"""

from __future__ import annotations

import math
from collections.abc import Callable

BASE_LR_LORA = 2e-4
BASE_LR_FULL = 2e-5


def auto_epochs(n_examples: int) -> int:
    if n_examples * 3 < 100:
        return min(25, 100 // max(1, n_examples))
    if n_examples * 3 > 25_000:
        return max(1, 25_000 // n_examples)
    return 3


def auto_batch_size(n_examples: int) -> int:
    return max(1, min(256, round(0.002 * n_examples)))


# an `auto` batch-size rule: examples per step, and why, for the run's log
AutoBatch = Callable[[int], tuple[int, str]]


def openai_batch(n_examples: int) -> tuple[int, str]:
    return auto_batch_size(n_examples), f"OpenAI's rule, 0.2% of {n_examples} examples"


def chat_batch(mean_tokens: float, row_tokens: int) -> AutoBatch:
    """SFT: OpenAI's rule, raised to fill one packed row of `row_tokens` with conversations of
    `mean_tokens`, at most 32 and at most 1/16 of the examples."""

    def rule(n_examples: int) -> tuple[int, str]:
        openai = auto_batch_size(n_examples)
        fill = min(32, max(1, n_examples // 16), math.ceil(row_tokens / max(mean_tokens, 1.0)))
        if fill <= openai:
            return openai_batch(n_examples)
        return fill, (
            f"OpenAI's rule gives {openai} for {n_examples} examples; {fill} conversations of ~"
            f"{mean_tokens:.0f} tokens fill one {row_tokens}-token packed row, several times faster per "
            "token on a CPU than tiny steps"
        )

    return rule


def pair_batch(n_examples: int) -> tuple[int, str]:
    """Preference methods: OpenAI's rule, but at least 8 pairs, since one pair's gradient points almost
    anywhere and the per-step overhead dominates tiny steps."""
    openai = auto_batch_size(n_examples)
    if openai >= 8:
        return openai_batch(n_examples)
    return 8, f"OpenAI's rule gives {openai} for {n_examples} examples; preference steps take at least 8"


def fixed_batch(size: int, what: str) -> AutoBatch:
    return lambda n_examples: (size, what)


def auto_lr_multiplier(n_examples: int) -> float:
    return 1.0


def total_steps(n_examples: int, batch_size: int, epochs: int) -> int:
    return -(-n_examples // batch_size) * epochs
