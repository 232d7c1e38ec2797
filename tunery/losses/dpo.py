"""Direct preference losses: DPO (with conservative label smoothing), IPO, SimPO, and KTO for unpaired
thumbs up/down feedback.

Every function takes per-sequence log-probabilities (B,) and returns per-example losses (B,) so the
recipe chooses how to average across micro-batches and processes. `*_logps` are sums over the completion
tokens; `*_mean_logps` are the same sums divided by the completion length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen_logps: torch.Tensor,  # (B,)
    policy_rejected_logps: torch.Tensor,  # (B,)
    ref_chosen_logps: torch.Tensor,  # (B,)
    ref_rejected_logps: torch.Tensor,  # (B,)
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023, eq. 7), and conservative DPO when `label_smoothing` > 0.

    With implicit rewards r = beta * (log pi(y|x) - log pi_ref(y|x)) and h = r_chosen - r_rejected:
        loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)
    eps is the assumed probability that a label is flipped (cDPO, Mitchell 2023); eps = 0 is DPO.
    Returns (losses, chosen_rewards, rejected_rewards); the rewards are detached, for metrics.
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    h = chosen_rewards - rejected_rewards
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def ipo_loss(
    policy_chosen_mean_logps: torch.Tensor,  # (B,)
    policy_rejected_mean_logps: torch.Tensor,  # (B,)
    ref_chosen_mean_logps: torch.Tensor,  # (B,)
    ref_rejected_mean_logps: torch.Tensor,  # (B,)
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO (Azar et al. 2023, eq. 17): regress the log-ratio gap onto 1 / (2 beta) instead of pushing it
    to infinity, which keeps the policy near the reference even on deterministic preferences.

        h = (log pi(yw) - log ref(yw)) - (log pi(yl) - log ref(yl)),   loss = (h - 1 / (2 beta))^2

    Log-probs are per-token means (as the IPO authors and TRL do), so the target gap does not depend on
    answer length. Rewards are beta times the mean log-ratios.
    """
    chosen_logratios = policy_chosen_mean_logps - ref_chosen_mean_logps
    rejected_logratios = policy_rejected_mean_logps - ref_rejected_mean_logps
    losses = (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2
    return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()


def simpo_loss(
    policy_chosen_mean_logps: torch.Tensor,  # (B,)
    policy_rejected_mean_logps: torch.Tensor,  # (B,)
    beta: float = 2.0,
    gamma: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024, eq. 6): reference-free, length-normalised, with a target margin gamma.

        r = beta * mean log pi(y|x),   loss = -log sigmoid(r_chosen - r_rejected - gamma)

    The paper's rewards are scaled up (beta around 2 and gamma / beta around 0.5 for its models) because
    mean log-probs differ by much less than summed ones.
    """
    chosen_rewards = beta * policy_chosen_mean_logps
    rejected_rewards = beta * policy_rejected_mean_logps
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def kto_loss(
    policy_logps: torch.Tensor,  # (B,) summed completion log-probs
    ref_logps: torch.Tensor,  # (B,)
    desirable: torch.Tensor,  # (B,) bool: thumbs up
    kl: torch.Tensor,  # () estimate of KL(policy || reference), detached, >= 0
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 8) for unpaired feedback.

    With r = log pi(y|x) - log ref(y|x) and z0 the KL reference point:
        desirable:    w_d * (1 - sigmoid(beta * (r - z0)))
        undesirable:  w_u * (1 - sigmoid(beta * (z0 - r)))
    z0 is estimated from mismatched (prompt, completion) pairs of the batch, clamped at 0 and not
    differentiated through, as in the paper's implementation. Returns (losses, rewards = beta * r).
    """
    logratios = policy_logps - ref_logps
    value = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios))),
    )
    return value, (beta * logratios).detach()
