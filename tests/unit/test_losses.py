"""The fused SFT loss against PyTorch's cross-entropy and a hand-worked case."""

from __future__ import annotations

import math

import pytest
import torch

from tunery.losses import logps
from tunery.losses.sft import sft_loss


def test_hand_worked_two_tokens() -> None:
    # Identity projection: the hidden states are the logits.
    hidden = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    nll, correct = sft_loss(hidden, torch.eye(2), torch.tensor([0, 0]))
    # row 1: -log(1/2); row 2: -log(3/4). Row 1 is a tie, counted correct; row 2 is correct.
    assert nll.item() == pytest.approx(math.log(2) + math.log(4 / 3), rel=1e-6)
    assert correct.item() == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train_weight", [False, True])
def test_matches_torch_cross_entropy_value_and_gradients(monkeypatch, dtype, train_weight) -> None:
    monkeypatch.setattr(logps, "CHUNK_ROWS", 7)  # several chunks, one ragged
    monkeypatch.setattr(logps, "_scratch", {})
    torch.manual_seed(0)
    hidden = torch.randn(20, 8).to(dtype).requires_grad_()
    weight = (2 * torch.randn(50, 8)).to(dtype).requires_grad_(train_weight)
    targets = torch.randint(0, 50, (20,))
    nll, correct = sft_loss(hidden, weight, targets)
    (2.0 * nll).backward()

    ref_hidden = hidden.detach().float().requires_grad_()
    ref_weight = weight.detach().float().requires_grad_(train_weight)
    logits = ref_hidden @ ref_weight.T
    expected = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    (2.0 * expected).backward()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert nll.item() == pytest.approx(expected.item(), rel=tol)
    assert torch.allclose(
        hidden.grad.float(), ref_hidden.grad, rtol=tol, atol=tol * ref_hidden.grad.abs().max()
    )
    if train_weight:
        assert torch.allclose(
            weight.grad.float(), ref_weight.grad, rtol=tol, atol=tol * ref_weight.grad.abs().max()
        )
    assert correct.item() == int((logits.argmax(-1) == targets).sum())


def test_no_gradient_work_without_autograd() -> None:
    hidden, weight = torch.randn(4, 3), torch.randn(5, 3)
    with torch.no_grad():
        nll, _ = sft_loss(hidden, weight, torch.tensor([0, 1, 2, 3]))
    assert nll.grad_fn is None and nll.item() > 0


@pytest.mark.parametrize("grad", [False, True])
def test_entropy_matches_the_softmax_entropy_with_and_without_autograd(monkeypatch, grad) -> None:
    monkeypatch.setattr(logps, "CHUNK_ROWS", 7)
    monkeypatch.setattr(logps, "_scratch", {})
    torch.manual_seed(1)
    hidden = torch.randn(20, 8).requires_grad_(grad)
    weight = 2 * torch.randn(50, 8)
    targets = torch.randint(0, 50, (20,))
    token_lp, entropy = logps.token_logps_and_entropy(hidden, weight, targets)
    log_p = (hidden.detach() @ weight.T).log_softmax(-1)
    expected = -(log_p.exp() * log_p).sum(-1)
    assert torch.allclose(entropy, expected, atol=1e-4)
    assert torch.allclose(token_lp.detach(), log_p.gather(1, targets[:, None]).squeeze(1), atol=1e-5)
    assert not entropy.requires_grad
