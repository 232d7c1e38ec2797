"""Tunery's LoRA linear (models/lora.py: one autograd function, the sums inside GEMMs) computes what peft's
layer computes: the same outputs and gradients in fp32, and at initialisation (B = 0) the base model's
outputs to the bit, which the DPO / KTO / PPO / GRPO references (adapter switched off) rely on. The same
for q|k|v and gate|up computed joined (`join_projections`)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft.tuners.lora.layer import Linear as LoraLinear

from tunery.models.lora import apply_lora, cast_frozen, join_projections
from tunery.models.native import native_layers
from tunery.models.tiny import tiny_model


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


def joined_twins(family: str, bf16: bool) -> tuple[torch.nn.Module, torch.nn.Module, int]:
    """A LoRA model with random A and B, and its copy with q|k|v and gate|up joined (and how many blocks)."""
    torch.manual_seed(0)
    model = apply_lora(tiny_model(300, seed=1, family=family), 8, 16, 0.0, "all-linear")
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    if bf16:
        cast_frozen(model, torch.bfloat16)
        native_layers(model)
    joined = copy.deepcopy(model)
    return model, joined, join_projections(joined)


def logits_and_grads(model: torch.nn.Module, ids: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, dict]:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=ids).logits.float()
    logits.pow(2).mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_joined_projections_compute_what_the_layers_compute_apart(family: str) -> None:
    model, joined, switched = joined_twins(family, bf16=False)
    assert switched == 4  # two decoder layers' attention and MLP
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    (theirs, their_grads), (ours, our_grads) = (logits_and_grads(m, ids, False) for m in (model, joined))
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert our_grads.keys() == their_grads.keys() and len(our_grads) == 2 * 7 * 2
    for name, grad in our_grads.items():
        assert torch.allclose(grad, their_grads[name], rtol=1e-4, atol=1e-7), name
    # the layers' own weights are views of the stacked ones: no second copy of the model's weights
    attention = joined.base_model.model.model.layers[0].self_attn
    q, k = attention.q_proj.base_layer.weight, attention.k_proj.base_layer.weight
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()


def test_joined_projections_in_bf16_on_the_native_swiglu() -> None:
    model, joined, _ = joined_twins("llama", bf16=True)
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    (theirs, their_grads), (ours, our_grads) = (logits_and_grads(m, ids, True) for m in (model, joined))
    assert (ours - theirs).abs().max() <= 0.02 * theirs.abs().max()
    for name, grad in our_grads.items():
        assert (grad - their_grads[name]).abs().max() <= 0.05 * their_grads[name].abs().max() + 1e-6, name


def test_joined_at_initialisation_the_bf16_policy_is_the_reference_to_the_bit(tiny) -> None:
    model, _ = tiny
    model = apply_lora(model, 8, 16, 0.0, "all-linear")
    cast_frozen(model, torch.bfloat16)
    assert join_projections(model) == 4
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        policy = model(input_ids=ids).logits
        with model.disable_adapter():
            reference = model(input_ids=ids).logits
        merged_like = model(input_ids=ids).logits  # switched back on: joined again
    assert torch.equal(policy, reference) and torch.equal(policy, merged_like)


def test_layers_that_cannot_be_joined_run_apart(tiny) -> None:
    """Dropout (a per-layer random mask) is not joined: the model computes what peft's layers compute."""
    model, twin = twins(tiny, 0.1, "all-linear")
    join_projections(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    model.eval(), twin.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, twin(input_ids=ids).logits)
