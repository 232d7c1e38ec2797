"""The fused SFT loss against PyTorch's cross-entropy and a hand-worked case; the fused output layer with
Gemma 2's soft-capped logits and a sampling temperature against plain autograd."""

from __future__ import annotations

import math

import pytest
import torch

from tunery.losses import logps
from tunery.losses.logps import OutputHead
from tunery.losses.sft import sft_loss


def test_hand_worked_two_tokens() -> None:
    # Identity projection: the hidden states are the logits.
    hidden = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    nll, correct = sft_loss(hidden, OutputHead(torch.eye(2)), torch.tensor([0, 0]))
    # row 1: -log(1/2); row 2: -log(3/4). Row 1 is a tie, counted correct; row 2 is correct.
    assert nll.item() == pytest.approx(math.log(2) + math.log(4 / 3), rel=1e-6)
    assert correct.item() == 2


# (soft-capping c, temperature T): logits z = c tanh(a / c) / T. At c = 3 the logits here (|a| up to ~10)
# are well into tanh's bend, so a loss that ignored the cap would be far off.
HEADS = {"plain": (None, 1.0), "capped": (3.0, 1.0), "temperature": (None, 0.7), "capped+T": (3.0, 0.7)}


def reference_logits(hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None, temperature: float):
    logits = hidden @ weight.T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature


@pytest.mark.parametrize("head_kind", list(HEADS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train_weight", [False, True])
def test_matches_torch_cross_entropy_value_and_gradients(monkeypatch, dtype, train_weight, head_kind) -> None:
    monkeypatch.setattr(logps, "CHUNK_ROWS", 7)  # several chunks, one ragged
    monkeypatch.setattr(logps, "_scratch", {})
    softcap, temperature = HEADS[head_kind]
    torch.manual_seed(0)
    hidden = torch.randn(20, 8).to(dtype).requires_grad_()
    weight = (2 * torch.randn(50, 8)).to(dtype).requires_grad_(train_weight)
    targets = torch.randint(0, 50, (20,))
    nll, correct = sft_loss(hidden, OutputHead(weight, softcap, temperature), targets)
    (2.0 * nll).backward()

    ref_hidden = hidden.detach().float().requires_grad_()
    ref_weight = weight.detach().float().requires_grad_(train_weight)
    logits = reference_logits(ref_hidden, ref_weight, softcap, temperature)
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


def test_the_cap_matters_here() -> None:
    """The capped case above tests something: its loss is far from the uncapped one."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(20, 8), 2 * torch.randn(50, 8)
    targets = torch.randint(0, 50, (20,))
    capped, _ = sft_loss(hidden, OutputHead(weight, 3.0), targets)
    plain, _ = sft_loss(hidden, OutputHead(weight), targets)
    assert abs(capped.item() - plain.item()) > 0.2 * plain.item()


def test_unfused_logits_are_the_capped_ones() -> None:
    torch.manual_seed(2)
    hidden, weight = torch.randn(5, 8), 2 * torch.randn(50, 8)
    head = OutputHead(weight, 3.0).at(0.5)
    assert torch.allclose(head.logits(hidden), reference_logits(hidden, weight, 3.0, 0.5), atol=1e-5)


def test_no_gradient_work_without_autograd() -> None:
    hidden, weight = torch.randn(4, 3), torch.randn(5, 3)
    with torch.no_grad():
        nll, _ = sft_loss(hidden, OutputHead(weight), torch.tensor([0, 1, 2, 3]))
    assert nll.grad_fn is None and nll.item() > 0


@pytest.mark.parametrize("head_kind", list(HEADS))
@pytest.mark.parametrize("grad", [False, True])
def test_entropy_matches_the_softmax_entropy_with_and_without_autograd(monkeypatch, grad, head_kind) -> None:
    monkeypatch.setattr(logps, "CHUNK_ROWS", 7)
    monkeypatch.setattr(logps, "_scratch", {})
    softcap, temperature = HEADS[head_kind]
    torch.manual_seed(1)
    hidden = torch.randn(20, 8).requires_grad_(grad)
    weight = 2 * torch.randn(50, 8)
    targets = torch.randint(0, 50, (20,))
    token_lp, entropy = logps.token_logps_and_entropy(
        hidden, OutputHead(weight, softcap, temperature), targets
    )
    log_p = reference_logits(hidden.detach(), weight, softcap, temperature).log_softmax(-1)
    expected = -(log_p.exp() * log_p).sum(-1)
    assert torch.allclose(entropy, expected, atol=1e-4)
    assert torch.allclose(token_lp.detach(), log_p.gather(1, targets[:, None]).squeeze(1), atol=1e-5)
    assert not entropy.requires_grad
