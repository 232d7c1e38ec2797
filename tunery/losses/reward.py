"""Reward-model loss: Bradley-Terry on pairs of scalar scores."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reward_loss(
    chosen_rewards: torch.Tensor,  # (B,) scores of the preferred answers
    rejected_rewards: torch.Tensor,  # (B,)
    margin: torch.Tensor | None = None,  # (B,) optional required score gap per pair
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Per-pair Bradley-Terry loss (Ouyang et al. 2022, eq. 1), optionally with a margin (Llama 2's
    graded preferences) and a centring penalty that keeps scores near zero (Eisenstein et al. 2023):

        loss = -log sigmoid(r_chosen - r_rejected - margin) + center_coef * (r_chosen + r_rejected)^2

    The Bradley-Terry term only sees score differences, so without centring the scores can drift by a
    constant; RL against the model is easier when a score of 0 means "average".
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
    return losses


def length_correlation(scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Squared Pearson correlation between answers' scores and their lengths, over a batch of answers (a
    scalar; 0 when either does not vary). Added to the Bradley-Terry loss with a weight (`length_coef`),
    it keeps a reward model from ranking by length, the shortcut reward models learn most readily (ODIN,
    Chen et al. 2024, decorrelates its quality head from length the same way); the comparisons themselves
    still decide what is better."""
    s = scores.float() - scores.float().mean()
    n = lengths.to(s) - lengths.to(s).mean()
    denominator = (s.pow(2).sum() * n.pow(2).sum()).sqrt()
    if scores.numel() < 3 or float(denominator) < 1e-8:
        return s.sum() * 0.0  # keeps the graph (and the dtype) of the scores
    return ((s * n).sum() / denominator).pow(2)
