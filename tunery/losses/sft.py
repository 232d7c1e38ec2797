"""Supervised fine-tuning loss: next-token cross-entropy over the trained positions only."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sft_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood and the number of argmax-correct tokens.

    logits:  (N, V) at the N trained positions only (the caller never computes the others)
    targets: (N,)   the token each position must predict

    The sum (not the mean) is returned so a step can divide by its total trained-token count across
    micro-batches and processes: every token weighs the same however the batch is split, which avoids the
    gradient-accumulation normalisation bug of per-micro-batch means.
    """
    nll_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
    n_correct = (logits.argmax(dim=-1) == targets).sum()
    return nll_sum, n_correct
