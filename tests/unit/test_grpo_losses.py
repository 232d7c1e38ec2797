"""GRPO / RLOO advantages, the clipped surrogate, k3 KL and token weights, worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from tunery.losses.grpo import clipped_surrogate, group_advantages, kl_k3, token_weights


def test_group_advantages_centre_and_scale_within_each_group() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])  # two groups of 4
    adv = group_advantages(rewards, 4, scale="none")
    assert adv.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    # Group 1: mean 0.5, population std 0.5 -> +-1; group 2 all equal -> 0, not a division by zero.
    adv = group_advantages(rewards, 4, scale="group", eps=0.0 + 1e-12)
    assert adv.tolist() == pytest.approx([1, -1, -1, 1, 0, 0, 0, 0], abs=1e-6)


def test_rloo_baseline_is_the_mean_of_the_other_completions() -> None:
    rewards = torch.tensor([3.0, 1.0, 2.0])
    adv = group_advantages(rewards, 3, scale="none", baseline="rloo")
    # 3 - (1+2)/2 = 1.5; 1 - (3+2)/2 = -1.5; 2 - (3+1)/2 = 0
    assert adv.tolist() == pytest.approx([1.5, -1.5, 0.0])


def test_batch_scaling_uses_the_std_of_the_whole_step() -> None:
    rewards = torch.tensor([1.0, 0.0, 3.0, 3.0])
    adv = group_advantages(rewards, 2, scale="batch", eps=0.0)
    std = torch.tensor([1.0, 0.0, 3.0, 3.0]).std(unbiased=False).item()  # 1.299
    assert adv.tolist() == pytest.approx([0.5 / std, -0.5 / std, 0.0, 0.0])


def test_clipped_surrogate_clips_only_in_the_direction_that_helps() -> None:
    old = torch.zeros(4)
    logps = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))  # ratios 1.5, 1.5, 0.5, 0.5
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipped = clipped_surrogate(logps, old, adv, 0.2, 0.2)
    # A>0, rho 1.5: min(1.5, 1.2) -> 1.2, clipped. A<0, rho 1.5: min(-1.5, -1.2) -> -1.5, not clipped.
    # A>0, rho 0.5: min(0.5, 0.8) -> 0.5, not clipped. A<0, rho 0.5: min(-0.5, -0.8) -> -0.8, clipped.
    assert loss.tolist() == pytest.approx([-1.2, 1.5, -0.5, 0.8])
    assert clipped.tolist() == [True, False, False, True]
    high, _ = clipped_surrogate(logps, old, adv, 0.2, 0.28)  # clip-higher
    assert high[0].item() == pytest.approx(-1.28)


def test_one_update_per_batch_gives_the_policy_gradient() -> None:
    logps = torch.tensor([-1.0, -2.0], requires_grad=True)
    loss, _ = clipped_surrogate(logps, logps.detach(), torch.tensor([2.0, -1.0]))
    loss.sum().backward()
    assert logps.grad is not None and logps.grad.tolist() == pytest.approx([-2.0, 1.0])  # -A


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere() -> None:
    logps = torch.tensor([-1.0, -1.0, -3.0])
    ref = torch.tensor([-1.0, -2.0, -1.0])
    kl = kl_k3(logps, ref)
    assert kl[0].item() == 0.0
    assert kl[1].item() == pytest.approx(math.exp(-1) + 1 - 1)
    assert kl[2].item() == pytest.approx(math.exp(2) - 2 - 1)


def test_token_weights_reproduce_the_three_aggregations() -> None:
    per_token = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0])]  # two completions
    lengths = torch.tensor([3, 1])
    flat = torch.cat(per_token)

    def loss(mode: str) -> float:
        w = token_weights(lengths, mode, max_tokens=4)
        return float((flat * w.repeat_interleave(lengths)).sum())

    assert loss("token") == pytest.approx(16 / 4)
    assert loss("sequence") == pytest.approx((2.0 + 10.0) / 2)
    assert loss("fixed") == pytest.approx(16 / (2 * 4))
