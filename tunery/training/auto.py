"""`auto` hyperparameters, chosen from the dataset as OpenAI documents them.

- n_epochs: OpenAI's published heuristic: 3 epochs, more for tiny datasets (so at least ~100 examples
  are seen), fewer for huge ones (so at most ~25,000 are), between 1 and 25.
- batch_size: OpenAI's documented rule of ~0.2% of the examples, between 1 and 256.
- learning_rate_multiplier: OpenAI does not document its rule; Tunery uses 1.0 (the base learning rate
  is 2e-4 for LoRA and 2e-5 for full fine-tuning).
"""

from __future__ import annotations

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


def auto_pair_batch_size(n_examples: int) -> int:
    """Preference methods: OpenAI's rule, but at least 8 pairs, since one pair's gradient points almost
    anywhere and the per-step overhead dominates tiny steps."""
    return max(8, auto_batch_size(n_examples))


def auto_lr_multiplier(n_examples: int) -> float:
    return 1.0


def total_steps(n_examples: int, batch_size: int, epochs: int) -> int:
    return -(-n_examples // batch_size) * epochs
