"""Tunery's LoRA linear (models/lora.py: one autograd function, the sums inside GEMMs) computes what peft's
layer computes: the same outputs and gradients in fp32, and at initialisation (B = 0) the base model's
outputs to the bit, which the DPO / KTO / PPO / GRPO references (adapter switched off) rely on."""

from __future__ import annotations

import copy

import torch
from peft.tuners.lora.layer import Linear as LoraLinear

from tunery.models.lora import apply_lora, cast_frozen


def peft_only(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose LoRA layers run peft's own forward."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if type(module) is LoraLinear:
            assert "forward" in module.__dict__  # apply_lora installed Tunery's
            del module.forward
    return twin


def twins(tiny, dropout: float, targets: str) -> tuple[torch.nn.Module, torch.nn.Module]:  # type: ignore[no-untyped-def]
    """A LoRA model with random A and B (B != 0: the adapter contributes) and its peft-only copy."""
    model = apply_lora(tiny[0], 8, 16, dropout, targets)
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    return model, peft_only(model)


def test_outputs_and_gradients_match_peft_in_fp32(tiny) -> None:
    model, twin = twins(tiny, 0.0, "all-linear")
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    results = []
    for m in (model, twin):
        logits = m(input_ids=ids).logits
        logits.pow(2).mean().backward()
        results.append((logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (ours, our_grads), (theirs, their_grads) = results
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert our_grads.keys() == their_grads.keys() and len(our_grads) > 0
    for name, grad in our_grads.items():
        assert torch.allclose(grad, their_grads[name], rtol=1e-4, atol=1e-7), name


def test_at_initialisation_the_bf16_policy_is_the_reference_to_the_bit(tiny) -> None:
    model, _ = tiny
    model = apply_lora(model, 8, 16, 0.0, "all-linear")
    cast_frozen(model, torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        policy = model(input_ids=ids).logits
        with model.disable_adapter():
            reference = model(input_ids=ids).logits
    assert torch.equal(policy, reference)


def test_dropout_and_a_disabled_adapter_take_peft_s_path(tiny) -> None:
    model, twin = twins(tiny, 0.1, "q_proj")
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    model.eval(), twin.eval()  # dropout off: the same numbers on both paths
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, twin(input_ids=ids).logits)
        with model.disable_adapter(), twin.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, twin(input_ids=ids).logits)
