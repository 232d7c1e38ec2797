"""Preference losses against numbers worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from tunery.losses.dpo import dpo_loss, ipo_loss, kto_loss, simpo_loss
from tunery.losses.reward import length_correlation, reward_loss


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def softplus(x: float) -> float:  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


def test_dpo_hand_worked() -> None:
    # rewards: 0.1 * (-10 + 11) = 0.1 and 0.1 * (-12 + 11) = -0.1; h = 0.2; loss = log(1 + e^-0.2)
    losses, chosen, rejected = dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1)
    assert losses.item() == pytest.approx(softplus(-0.2)) == pytest.approx(0.598139, abs=1e-6)
    assert chosen.item() == pytest.approx(0.1) and rejected.item() == pytest.approx(-0.1)


def test_conservative_dpo_mixes_both_labels() -> None:
    losses, _, _ = dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1, label_smoothing=0.25)
    assert losses.item() == pytest.approx(0.75 * softplus(-0.2) + 0.25 * softplus(0.2))


def test_dpo_at_the_reference_is_log_two_and_pushes_the_right_way() -> None:
    chosen, rejected = t(-5.0).requires_grad_(), t(-7.0).requires_grad_()
    losses, c, r = dpo_loss(chosen, rejected, t(-5.0), t(-7.0), beta=0.1)
    assert losses.item() == pytest.approx(math.log(2)) and c.item() == r.item() == 0.0
    losses.sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.05) and rejected.grad.item() == pytest.approx(0.05)


def test_ipo_regresses_the_gap_onto_one_over_two_beta() -> None:
    # beta 0.5: target gap 1. Gap (-1 + 1.5) - (-2 + 1.5) = 1 -> loss 0; gap 0 -> loss 1.
    losses, chosen, _ = ipo_loss(t(-1.0, -1.5), t(-2.0, -1.5), t(-1.5, -1.5), t(-1.5, -1.5), beta=0.5)
    assert losses.tolist() == pytest.approx([0.0, 1.0])
    assert chosen.tolist() == pytest.approx([0.25, 0.0])


def test_simpo_hand_worked() -> None:
    # rewards 2 * -0.5 = -1 and 2 * -1.5 = -3; minus gamma 1 leaves 1; loss = log(1 + e^-1)
    losses, chosen, rejected = simpo_loss(t(-0.5), t(-1.5), beta=2.0, gamma=1.0)
    assert losses.item() == pytest.approx(0.313262, abs=1e-6)
    assert (chosen.item(), rejected.item()) == pytest.approx((-1.0, -3.0))


def test_kto_hand_worked() -> None:
    # r = -10 + 12 = 2, z0 = 0.5: desirable 1 - sigmoid(0.15), undesirable 1 - sigmoid(-0.15)
    sigmoid = 1 / (1 + math.exp(-0.15))
    losses, rewards = kto_loss(
        t(-10.0, -10.0),
        t(-12.0, -12.0),
        torch.tensor([True, False]),
        t(0.5)[0],
        beta=0.1,
        desirable_weight=1.0,
        undesirable_weight=2.0,
    )
    assert losses.tolist() == pytest.approx([1 - sigmoid, 2 * sigmoid])
    assert rewards.tolist() == pytest.approx([0.2, 0.2])


def test_reward_loss_margin_and_centering() -> None:
    assert reward_loss(t(2.0), t(1.0)).item() == pytest.approx(softplus(-1.0))
    assert reward_loss(t(2.0), t(1.0), margin=t(1.0)).item() == pytest.approx(math.log(2))
    assert reward_loss(t(2.0), t(1.0), center_coef=0.01).item() == pytest.approx(softplus(-1.0) + 0.09)


def test_falling_chosen_log_prob_is_flagged_only_when_steady() -> None:
    from tunery.recipes.dpo import chosen_logps_falling

    assert not chosen_logps_falling([0.0, -0.1])  # too few measurements
    assert chosen_logps_falling([0.0, -0.03, -0.06, -0.09])  # falling, and past 0.05 nats per token
    assert not chosen_logps_falling([0.0, -0.01, -0.02, -0.03])  # falling, but by little
    assert not chosen_logps_falling([0.0, -0.1, -0.2, -0.15])  # recovering
    assert not chosen_logps_falling([0.0, 0.1, 0.2, 0.3])  # rising


def test_length_correlation_by_hand() -> None:
    # scores that rise with length: correlation 1
    assert length_correlation(
        torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10, 20, 30])
    ).item() == pytest.approx(1)
    # s - mean = (-1/3, 2/3, -1/3), n - mean = (-1, 0, 1): sum of products 1/3 - 1/3 = 0
    assert length_correlation(torch.tensor([1.0, 2.0, 1.0]), torch.tensor([1, 2, 3])).item() == pytest.approx(
        0
    )
    # (1, -1, 0, 0) against (1, 0, 0, -1) after centring (lengths 3, 2, 2, 1): 1 / sqrt(2 * 2), squared
    scores = torch.tensor([1.0, -1.0, 0.0, 0.0], requires_grad=True)
    value = length_correlation(scores, torch.tensor([3, 2, 2, 1]))
    assert value.item() == pytest.approx(0.25)
    value.backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0  # it trains the scores
    # nothing to correlate: equal lengths, or too few answers
    assert length_correlation(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5, 5, 5])).item() == 0
    assert length_correlation(torch.tensor([1.0, 2.0]), torch.tensor([1, 2])).item() == 0
