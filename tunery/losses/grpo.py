"""Critic-free policy-gradient losses: GRPO's group-relative advantages, RLOO's leave-one-out baseline,
the clipped surrogate, the k3 KL estimator and token-level loss aggregation.

Completions are flat: N completions, G per prompt in consecutive blocks. Token tensors are flat too:
(T,) holds every trained completion token of a micro-batch.
"""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor,  # (N,) one per completion, G consecutive completions per prompt
    group_size: int,
    scale: str = "group",  # group | batch | none
    baseline: str = "mean",  # mean (GRPO) | rloo (leave-one-out)
    eps: float = 1e-4,
) -> torch.Tensor:
    """Advantage of each completion against the others sampled for the same prompt, (N,).

    GRPO (Shao et al. 2024, eq. 3): A_i = (r_i - mean(r_group)) / std(r_group). RLOO (Ahmadian et al.
    2024, eq. 5): A_i = r_i - mean of the other G - 1 rewards, i.e. G / (G - 1) times the GRPO numerator.
    `scale="none"` drops the division by the standard deviation (Dr. GRPO, Liu et al. 2025: the std
    up-weights prompts that are nearly always right or always wrong); `"batch"` divides by the std of the
    whole step. Groups whose rewards are all equal get advantage 0 either way.
    """
    grouped = rewards.view(-1, group_size).float()  # (P, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if baseline == "rloo":
        if group_size < 2:
            raise ValueError("the leave-one-out baseline needs at least 2 completions per prompt")
        centred = centred * group_size / (group_size - 1)
    elif baseline != "mean":
        raise ValueError(f"baseline must be mean or rloo, got {baseline!r}")
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True, unbiased=False) if group_size > 1 else torch.ones_like(centred)
        centred = centred / (std + eps)
    elif scale == "batch":
        centred = centred / (grouped.std(unbiased=False) + eps)
    elif scale != "none":
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    return centred.reshape(-1)


def clipped_surrogate(
    logps: torch.Tensor,  # (T,) log-probs of the sampled tokens under the policy being trained
    old_logps: torch.Tensor,  # (T,) the same under the policy that sampled them (no gradient)
    advantages: torch.Tensor,  # (T,) each token's completion advantage
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective per token, as a loss (T,), and whether the clip was active (T,) bool.

    loss_t = -min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t),  rho_t = exp(logp_t - old_t)
    (Schulman et al. 2017, eq. 7; the asymmetric upper bound is DAPO's clip-higher, Yu et al. 2025).
    With one update per batch, old == logps.detach(): rho = 1 and the gradient is plain REINFORCE.
    """
    ratio = torch.exp(logps - old_logps)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * advantages
    return -torch.min(unclipped, clipped), (clipped < unclipped).detach()


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled from the policy, (T,):
    exp(ref - logp) - (ref - logp) - 1 (Schulman's k3: unbiased, always >= 0, low variance)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def token_weights(
    lengths: torch.Tensor,  # (N,) trained tokens of each completion in the step
    mode: str = "token",  # token | sequence | fixed
    max_tokens: int = 1,
) -> torch.Tensor:
    """The weight every token of completion i carries in the step's loss, (N,): the loss is
    sum over tokens of weight x per-token loss, however the step is split into micro-batches.

    - `token`: 1 / (all tokens of the step), a mean over tokens (DAPO, Yu et al. 2025): each token weighs
      the same, so long wrong answers are not let off lightly nor short right ones over-rewarded.
    - `sequence`: 1 / (N x length_i), a mean per completion then over completions (the original GRPO;
      biased towards length).
    - `fixed`: 1 / (N x max_tokens), a constant (Dr. GRPO, Liu et al. 2025).
    """
    n = lengths.numel()
    if mode == "token":
        return torch.full((n,), 1.0 / max(int(lengths.sum()), 1))
    if mode == "sequence":
        return 1.0 / (n * lengths.clamp(min=1).float())
    if mode == "fixed":
        return torch.full((n,), 1.0 / (n * max_tokens))
    raise ValueError(f"mode must be token, sequence or fixed, got {mode!r}")
