"""PPO's KL-penalty rewards, GAE, whitening, clipped value loss and adaptive KL, worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from tunery.losses.ppo import (
    adaptive_kl_coef,
    explained_variance,
    gae,
    kl_penalty_rewards,
    value_loss,
    whiten,
)


def test_kl_penalty_rewards_put_the_score_on_the_last_token() -> None:
    logps = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -2.0, -1.0])  # log-ratios 0.5, 0, 0.5
    rewards = kl_penalty_rewards(logps, ref, score=2.0, kl_coef=0.1)
    assert rewards.tolist() == pytest.approx([-0.05, 0.0, -0.05 + 2.0])
    # A one-token answer gets both at once; a token the policy likes less than the reference earns a bonus.
    assert kl_penalty_rewards(torch.tensor([-3.0]), torch.tensor([-1.0]), 1.0, 0.5).tolist() == [2.0]


def test_gae_by_hand() -> None:
    rewards = torch.tensor([0.0, 0.0, 1.0])
    values = torch.tensor([0.5, 0.2, 0.4])
    adv, returns = gae(rewards, values, gamma=0.9, lam=0.5)
    # deltas: t2 = 1 - 0.4 = 0.6; t1 = 0 + 0.9*0.4 - 0.2 = 0.16; t0 = 0 + 0.9*0.2 - 0.5 = -0.32
    # A2 = 0.6; A1 = 0.16 + 0.45*0.6 = 0.43; A0 = -0.32 + 0.45*0.43 = -0.1265
    assert adv.tolist() == pytest.approx([-0.1265, 0.43, 0.6])
    assert returns.tolist() == pytest.approx([0.3735, 0.63, 1.0])


def test_gae_with_lambda_one_is_the_reward_to_go_minus_the_value() -> None:
    rewards = torch.tensor([-0.1, 0.2, 3.0])
    values = torch.tensor([1.0, -2.0, 0.7])
    adv, returns = gae(rewards, values, gamma=1.0, lam=1.0)
    assert returns.tolist() == pytest.approx([3.1, 3.2, 3.0])  # Monte-Carlo returns: values cancel
    assert adv.tolist() == pytest.approx([2.1, 5.2, 2.3])
    # gamma < 1 discounts the reward-to-go: R0 = -0.1 + 0.5*0.2 + 0.25*3 = 0.75
    _, discounted = gae(rewards, values, gamma=0.5, lam=1.0)
    assert discounted.tolist() == pytest.approx([0.75, 1.7, 3.0])


def test_gae_with_lambda_zero_is_the_one_step_td_error() -> None:
    rewards = torch.tensor([0.0, 1.0])
    values = torch.tensor([0.3, 0.8])
    adv, returns = gae(rewards, values, gamma=1.0, lam=0.0)
    assert adv.tolist() == pytest.approx([0.5, 0.2])  # 0 + 0.8 - 0.3, 1 + 0 - 0.8
    assert returns.tolist() == pytest.approx([0.8, 1.0])


def test_gae_of_a_zero_padded_batch_matches_each_completion_alone() -> None:
    a_rewards, a_values = torch.tensor([0.1, -0.2, 2.0]), torch.tensor([0.4, 0.9, 1.1])
    b_rewards, b_values = torch.tensor([-1.0]), torch.tensor([0.3])
    rewards = torch.stack([a_rewards, torch.tensor([-1.0, 0.0, 0.0])])
    values = torch.stack([a_values, torch.tensor([0.3, 0.0, 0.0])])
    adv, returns = gae(rewards, values, gamma=1.0, lam=0.95)
    for row, (r, v) in enumerate([(a_rewards, a_values), (b_rewards, b_values)]):
        alone_adv, alone_returns = gae(r, v, gamma=1.0, lam=0.95)
        assert adv[row, : len(r)].tolist() == pytest.approx(alone_adv.tolist())
        assert returns[row, : len(r)].tolist() == pytest.approx(alone_returns.tolist())
    assert adv[1, 1:].tolist() == [0.0, 0.0]


def test_whiten_centres_and_scales_over_every_element() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])  # mean 3, population variance (4 + 1 + 0 + 9) / 4 = 3.5
    std = math.sqrt(3.5)
    assert whiten(x).tolist() == pytest.approx([-2 / std, -1 / std, 0.0, 3 / std], abs=1e-6)
    assert whiten(x, shift_mean=False).tolist() == pytest.approx(
        [3 - 2 / std, 3 - 1 / std, 3.0, 3 + 3 / std], abs=1e-6
    )
    assert whiten(torch.tensor([5.0])).tolist() == [0.0]  # a lone token: no signal, no division by 0


def test_value_loss_takes_the_larger_of_the_clipped_and_unclipped_errors() -> None:
    old = torch.tensor([0.0, 0.0, 0.0, 0.0])
    values = torch.tensor([1.0, 1.0, 0.1, -1.0])
    returns = torch.tensor([2.0, 0.0, 0.5, 0.0])
    loss, clipped = value_loss(values, old, returns, clip=0.2)
    # 0: v 1 -> clipped to 0.2. (1-2)^2 = 1, (0.2-2)^2 = 3.24: the clipped one is larger -> 1.62.
    # 1: (1-0)^2 = 1, (0.2-0)^2 = 0.04 -> unclipped, 0.5.
    # 2: inside the clip range, both 0.16 -> 0.08, not counted as clipped.
    # 3: v -1 -> -0.2. (-1-0)^2 = 1, (-0.2)^2 = 0.04 -> 0.5.
    assert loss.tolist() == pytest.approx([1.62, 0.5, 0.08, 0.5])
    assert clipped.tolist() == [True, False, False, False]


def test_value_loss_gradient_stops_when_the_clipped_term_wins() -> None:
    values = torch.tensor([1.0, 1.0], requires_grad=True)
    loss, _ = value_loss(values, torch.zeros(2), torch.tensor([2.0, 0.0]), clip=0.2)
    loss.sum().backward()
    # First token: the clipped value is constant in v, so no gradient; second: d 0.5 (v - 0)^2 / dv = 1.
    assert values.grad is not None and values.grad.tolist() == pytest.approx([0.0, 1.0])


def test_explained_variance() -> None:
    returns = torch.tensor([1.0, 2.0, 3.0])
    assert explained_variance(returns.clone(), returns) == pytest.approx(1.0)
    assert explained_variance(torch.full((3,), 2.0), returns) == pytest.approx(0.0)
    # residuals 1, -1, 1: var 8/9 against var(R) 2/3 -> 1 - 4/3
    assert explained_variance(torch.tensor([0.0, 3.0, 2.0]), returns) == pytest.approx(-1 / 3)
    assert math.isnan(explained_variance(torch.zeros(2), torch.ones(2)))


def test_adaptive_kl_coefficient_moves_towards_the_target_with_a_bounded_step() -> None:
    assert adaptive_kl_coef(0.1, kl=6.0, target=6.0, n_samples=100, horizon=1000) == pytest.approx(0.1)
    assert adaptive_kl_coef(0.1, kl=7.2, target=6.0, n_samples=100, horizon=1000) == pytest.approx(0.102)
    assert adaptive_kl_coef(0.1, kl=60.0, target=6.0, n_samples=100, horizon=1000) == pytest.approx(0.102)
    assert adaptive_kl_coef(0.1, kl=0.0, target=6.0, n_samples=100, horizon=1000) == pytest.approx(0.098)
