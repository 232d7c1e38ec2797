"""Supervised fine-tuning loss: next-token cross-entropy over the trained positions only, fused with the
output projection (losses/logps.py) so the (tokens x vocabulary) logits never exist in full."""

from __future__ import annotations

import torch

from tunery.losses.logps import OutputHead, token_logps


def sft_loss(
    hidden: torch.Tensor, head: OutputHead, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the targets, and the number of argmax-correct tokens.

    hidden:  (N, H) final hidden states at the N trained positions only
    head:    the output layer: logits z = hidden @ W.T for most models (W: (V, H)), capped for Gemma 2
    targets: (N,)   the token each position must predict

    nll = sum_i [ logsumexp(z_i) - z_i[targets_i] ]

    The sum (not the mean) is returned so a step can divide by its total trained-token count across
    micro-batches and processes: every token weighs the same however the batch is split, which avoids the
    gradient-accumulation normalisation bug of per-micro-batch means.
    """
    logps, correct = token_logps(hidden, head, targets)
    return -logps.sum(), correct.sum()
