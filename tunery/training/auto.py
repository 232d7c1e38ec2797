"""`auto` hyperparameters, chosen from the dataset as OpenAI documents them.

- n_epochs: OpenAI's published heuristic: 3 epochs, more for tiny datasets (so at least ~100 examples
  are seen), fewer for huge ones (so at most ~25,000 are), between 1 and 25.
- batch_size: OpenAI's documented rule of ~0.2% of the examples, between 1 and 256. Their rule was made
  for GPUs; on a CPU a step's fixed cost (the optimizer, LoRA's small matmuls, Python) dominates a step of
  one short conversation, so chat fine-tuning takes enough conversations to fill one packed row of
  `micro_batch_tokens` (a few, never so many that an epoch has fewer than ~16 steps).
- learning_rate_multiplier: OpenAI does not document its rule; Tunery uses 1.0 (the base learning rate
  is 2e-4 for LoRA and 2e-5 for full fine-tuning), times how many times OpenAI's batch size the chat
  rule took (at most 10): fewer, bigger steps need a proportionally larger rate to learn as much. On the
  support data (191 chats, 3 epochs, bundled model) batch 1 at 2e-4 reached a held-out loss of 1.596 in
  573 steps; batch 10 reached 2.380 at 2e-4, 1.828 at 6.3e-4 (square-root scaling), 1.575 at 1e-3 and
  1.387 at 2e-3, in 60 steps at 2.3 times the tokens per second.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

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


MAX_LR_SCALE = 10  # the most an `auto` learning rate follows a batch size raised for speed


@dataclass(frozen=True)
class BatchChoice:
    """What an `auto` batch-size rule chose: examples per step, why (for the run's log), and the factor an
    `auto` learning-rate multiplier takes with it."""

    size: int
    why: str
    lr_scale: float = 1.0


# an `auto` batch-size rule: the number of training examples -> its choice
AutoBatch = Callable[[int], BatchChoice]


def openai_batch(n_examples: int) -> BatchChoice:
    return BatchChoice(auto_batch_size(n_examples), f"OpenAI's rule, 0.2% of {n_examples} examples")


def chat_batch(mean_tokens: float, row_tokens: int) -> AutoBatch:
    """SFT: OpenAI's rule, raised to fill one packed row of `row_tokens` with conversations of
    `mean_tokens`, at most 32 and at most 1/16 of the examples."""

    def rule(n_examples: int) -> BatchChoice:
        openai = auto_batch_size(n_examples)
        fill = min(32, max(1, n_examples // 16), math.ceil(row_tokens / max(mean_tokens, 1.0)))
        if fill <= openai:
            return openai_batch(n_examples)
        why = (
            f"OpenAI's rule gives {openai} for {n_examples} examples; {fill} conversations of ~"
            f"{mean_tokens:.0f} tokens fill one {row_tokens}-token packed row, about twice as fast per token "
            "on a CPU as tiny steps"
        )
        return BatchChoice(fill, why, min(float(MAX_LR_SCALE), fill / openai))

    return rule


def pair_batch(n_examples: int) -> BatchChoice:
    """Preference methods: OpenAI's rule, but at least 8 pairs, since one pair's gradient points almost
    anywhere and the per-step overhead dominates tiny steps (their learning rates are set for that)."""
    openai = auto_batch_size(n_examples)
    if openai >= 8:
        return openai_batch(n_examples)
    return BatchChoice(
        8, f"OpenAI's rule gives {openai} for {n_examples} examples; preference steps take at least 8"
    )


def fixed_batch(size: int, what: str) -> AutoBatch:
    return lambda n_examples: BatchChoice(size, what)


def auto_lr_multiplier(n_examples: int) -> float:
    return 1.0


def total_steps(n_examples: int, batch_size: int, epochs: int) -> int:
    return -(-n_examples // batch_size) * epochs
