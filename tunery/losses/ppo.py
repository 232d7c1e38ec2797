"""PPO with a learned reward: per-token rewards with a KL penalty, generalised advantage estimation,
advantage whitening, the clipped value loss and the adaptive KL coefficient. The policy's clipped
surrogate is `tunery.losses.grpo.clipped_surrogate`.

A completion's tokens are t = 0 .. T-1; V_t is the value of the state before token t (the position
that predicts it), so the state after the last token is terminal and worth 0.
"""

from __future__ import annotations

import torch


def kl_penalty_rewards(
    logps: torch.Tensor,  # (T,) the sampling policy's log-probs of the completion's tokens
    ref_logps: torch.Tensor,  # (T,) the reference model's log-probs of the same tokens
    score: float,  # the reward model's score of the whole completion
    kl_coef: float,
) -> torch.Tensor:
    """Per-token rewards (T,): r_t = -kl_coef * (logp_t - ref_t), plus the score at the last token.

    The KL-shaped reward of Ziegler et al. 2019 (eq. 2; Stiennon et al. 2020, section 3.4),
    R(x, y) = r(x, y) - beta log(pi(y|x) / pi_ref(y|x)), spread over tokens: the log-ratio of each
    token (the k1 estimator, whose sum over a sampled completion is an unbiased estimate of the sequence
    KL), and the reward model's score where the answer ends.
    """
    rewards = -kl_coef * (logps - ref_logps)
    rewards[-1] = rewards[-1] + score
    return rewards


def gae(
    rewards: torch.Tensor,  # (..., T) per-token rewards; zero-padded after each completion's end
    values: torch.Tensor,  # (..., T) V_t, the value of the state before token t; zero-padded too
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16): advantages and returns, each
    shaped like `rewards`.

        delta_t = r_t + gamma V_{t+1} - V_t        (V_T = 0: the completion has ended)
        A_t     = delta_t + gamma lam A_{t+1}       (A_T = 0)
        R_t     = A_t + V_t                         (the value target; TD(lambda) returns)

    lam = 1 gives Monte-Carlo advantages (discounted reward-to-go minus V_t); lam = 0 the one-step TD
    error. Leading dimensions are a batch: zero rewards and values after a completion's end leave its
    advantages unchanged, so completions of different lengths can be padded together.
    """
    length = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[..., 0])
    next_advantage = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(length)):
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[..., t] = next_advantage
        next_value = values[..., t]
    return advantages, advantages + values


def whiten(values: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over every element (all trained tokens of a batch); with `shift_mean=False` the
    mean is added back, so only the scale changes. Population variance: one element whitens to 0."""
    mean, var = values.mean(), values.var(unbiased=False)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def value_loss(
    values: torch.Tensor,  # (T,) the value head's predictions now
    old_values: torch.Tensor,  # (T,) its predictions when the batch was sampled (no gradient)
    returns: torch.Tensor,  # (T,) GAE returns, the targets
    clip: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss per token (T,), and whether the clipped term was the larger one (T,) bool:

        0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)

    The pessimistic bound the PPO implementations use (OpenAI baselines' ppo2; Huang et al. 2022, "The
    37 implementation details of PPO", detail 9): the value head cannot move far from its old
    predictions in one batch to fit noisy returns.
    """
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    return 0.5 * torch.max(unclipped_loss, clipped_loss), (clipped_loss > unclipped_loss).detach()


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R): 1 when the value head predicts the returns exactly, 0 when it does no
    better than a constant, negative when worse. NaN when the returns do not vary."""
    var_returns = returns.var(unbiased=False)
    return (
        float(1 - (returns - values).var(unbiased=False) / var_returns) if var_returns > 0 else float("nan")
    )


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, n_samples: int, horizon: int) -> float:
    """The next KL coefficient of Ziegler et al. 2019 (section 2.2): a proportional controller that
    raises the coefficient when the KL is above `target` and lowers it below,

        e = clip(KL / target - 1, -0.2, 0.2),   beta <- beta (1 + e n_samples / horizon)

    where `kl` is the batch's mean sequence KL and `n_samples` the completions it was measured on (the
    paper's gain K_beta is n_samples / horizon here, as in its code and in TRL's controller).
    """
    error = min(max(kl / target - 1, -0.2), 0.2)
    return kl_coef * (1 + error * n_samples / horizon)
