"""Adapters served beside one copy of their base model: the decoding engine applies an adapter's low-rank
updates on the shared base weights, and gets the answers a merged copy of the model gets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tunery.models.load import load_for_inference, load_model
from tunery.models.sampling import SamplingParams, sample

TEXTS = ["Hello there, how", "Bikes", "A much longer prompt that needs left padding in the batch"]


def save_adapter(name: str, path: Path, targets: str, seed: int, rank: int = 4, **config: object) -> Path:
    """A LoRA adapter of `name` with its B matrices nudged off zero, saved as a run's final/ holds it."""
    from tunery.models.lora import apply_lora

    model, _ = load_model(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # A's initialisation
        peft = apply_lora(model, rank=rank, alpha=8, dropout=0.0, targets=targets)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in peft.named_parameters():
            if "lora_B" in key:
                p.normal_(0, 0.1, generator=generator)
    peft.save_pretrained(str(path))
    if config:  # settings peft writes but Tunery never trains with (read_lora must refuse them)
        settings = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**settings, **config}))
    return path


def answers(model, tokenizer, adapter=None, params=None):  # type: ignore[no-untyped-def]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    params = params or SamplingParams(max_new_tokens=12)
    return sample(model, tokenizer, prompts, params, adapter=adapter)


def factors(base, path: Path):  # type: ignore[no-untyped-def]
    from tunery.models.decode import decode_model_for
    from tunery.models.lora import read_lora

    updates = read_lora(path)
    assert not isinstance(updates, str), updates
    engine = decode_model_for(base)
    assert engine is not None
    lora = engine.adapter(updates)
    assert not isinstance(lora, str), lora
    return lora


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
def test_an_adapter_beside_the_base_answers_as_the_merged_model(tmp_path: Path, family: str) -> None:
    name = "tiny-random" if family == "llama" else f"tiny-random-{family}"
    adapter = save_adapter(name, tmp_path / "a", "all-linear", seed=1)
    merged, tokenizer = load_for_inference(name, str(adapter), precision="fp32")
    base, _ = load_for_inference(name, precision="fp32")
    lora = factors(base, adapter)
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3)
    for params in (SamplingParams(max_new_tokens=12), sampled):
        expected, got = answers(merged, tokenizer, params=params), answers(base, tokenizer, lora, params)
        assert [c.token_ids for c in got] == [c.token_ids for c in expected]
        for g, e in zip(got, expected, strict=True):
            assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(e.logprobs), atol=1e-4)
    plain = answers(base, tokenizer)
    assert [c.token_ids for c in plain] != [c.token_ids for c in answers(merged, tokenizer)]  # it does change


def test_partial_targets_and_an_adapter_on_top_of_another(tmp_path: Path) -> None:
    """Only q and v (k's rows stay the base's), and a DPO-after-SFT adapter whose base_adapter is applied
    too (their ranks stacked)."""
    first = save_adapter("tiny-random", tmp_path / "sft", "q_proj,v_proj", seed=2)
    second = save_adapter("tiny-random", tmp_path / "dpo", "all-linear", seed=4, rank=2)
    shutil.copytree(first, second / "base_adapter")
    base, tokenizer = load_for_inference("tiny-random", precision="fp32")
    lora = factors(base, second)
    assert lora.head is None and lora.layers[0]["qkv"][0].shape[1] == 4 + 4 + 2 + 2 + 2  # q, v, then q, k, v
    merged, _ = load_for_inference("tiny-random", str(second), precision="fp32")
    expected, got = answers(merged, tokenizer), answers(base, tokenizer, lora)
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(e.logprobs), atol=1e-4)


def test_an_update_of_the_lm_head(tmp_path: Path) -> None:
    """A LoRA update on the LM head, against peft's own model with that adapter. (Saved by peft's default,
    an adapter on a tied head carries the whole embedding, and is refused below; Tunery's own saving
    leaves the embedding out.)"""
    from tunery.models.decode import decode_model_for
    from tunery.models.lora import apply_lora, read_lora

    base, tokenizer = load_for_inference("tiny-random", precision="fp32")
    model, _ = load_model("tiny-random")
    peft = apply_lora(model, rank=4, alpha=8, dropout=0.0, targets="lm_head,down_proj")
    with torch.no_grad():
        for key, p in peft.named_parameters():
            if "lora_B" in key:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(7))
    peft.eval().requires_grad_(False)
    updates = {
        key.removeprefix("base_model.model."): [(m.lora_A["default"].weight, m.lora_B["default"].weight, 2.0)]
        for key, m in peft.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }
    assert "lm_head" in updates
    engine = decode_model_for(base)
    assert engine is not None
    lora = engine.adapter(updates)
    assert not isinstance(lora, str) and lora.head is not None
    expected, got = answers(peft, tokenizer), answers(base, tokenizer, lora)
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    saved = save_adapter("tiny-random", tmp_path / "head", "lm_head", seed=1)
    reason = read_lora(saved)
    assert isinstance(reason, str) and "lm_head" in reason


def first_logps(model, tokenizer, adapter=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Log-probabilities of the first token after each prompt, from the engine's prefill."""
    from tunery.models.decode import decode_model_for
    from tunery.models.sampling import _left_pad

    engine = decode_model_for(model)
    assert engine is not None
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    input_ids, valid = _left_pad(tokenizer, prompts, engine.device)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cache = engine.new_cache(len(prompts), input_ids.shape[1])
    return engine.prefill(input_ids, positions, valid, cache, adapter).log_softmax(-1)


def test_in_bf16_the_answers_match_the_merged_model_within_rounding(tmp_path: Path) -> None:
    """Against fp32, the first token's log-probabilities are off by bf16 rounding, about as far as the
    merged bf16 copy's are."""
    adapter = save_adapter("tiny-random", tmp_path / "a", "all-linear", seed=1)
    exact, tokenizer = load_for_inference("tiny-random", str(adapter), precision="fp32")
    merged, _ = load_for_inference("tiny-random", str(adapter), precision="bf16")
    base, _ = load_for_inference("tiny-random", precision="bf16")
    lora = factors(base, adapter)
    assert lora.layers[0]["qkv"][0].dtype == torch.float32  # the update in fp32 on bf16 weights
    reference = first_logps(exact, tokenizer)
    copy_error = (first_logps(merged, tokenizer) - reference).abs().max().item()
    beside_error = (first_logps(base, tokenizer, lora) - reference).abs().max().item()
    unadapted = (first_logps(base, tokenizer) - reference).abs().max().item()
    assert beside_error < 0.15 and beside_error < 3 * copy_error + 0.02, (beside_error, copy_error)
    assert unadapted > 5 * beside_error  # the adapter's change is far larger than the rounding


@pytest.mark.parametrize(
    ("setting", "why"),
    [
        ({"use_dora": True}, "use_dora"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
        ({"alpha_pattern": {"q_proj": 32}}, "alpha_pattern"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
        ({"lora_bias": True}, "lora_bias"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens"),  # applied only after these tokens
        ({"init_lora_weights": "pissa"}, "changes the base weights"),
        ({"init_lora_weights": "loftq"}, "could not be read"),  # peft refuses it without loftq_config
    ],
)
def test_adapters_that_are_not_plain_low_rank_updates_say_why(tmp_path: Path, setting, why) -> None:  # type: ignore[no-untyped-def]
    from tunery.models.lora import read_lora

    adapter = save_adapter("tiny-random", tmp_path / "a", "all-linear", seed=1, **setting)
    reason = read_lora(adapter)
    assert isinstance(reason, str) and why in reason


def test_factors_for_another_model_are_refused(tmp_path: Path) -> None:
    from tunery.models.decode import decode_model_for
    from tunery.models.lora import read_lora

    adapter = save_adapter("tiny-random-qwen3", tmp_path / "a", "all-linear", seed=1)
    base, _ = load_for_inference("tiny-random-phi3", precision="fp32")
    engine = decode_model_for(base)
    assert engine is not None
    updates = read_lora(adapter)
    assert not isinstance(updates, str)
    reason = engine.adapter(updates)
    assert isinstance(reason, str) and "does not apply updates to" in reason  # Phi-3 fuses q, k, v


def test_rslora_scaling_and_factors_of_the_wrong_width(tmp_path: Path) -> None:
    from tunery.models.decode import decode_model_for

    adapter = save_adapter("tiny-random", tmp_path / "a", "all-linear", seed=5, rank=16)
    settings = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(
        json.dumps({**settings, "use_rslora": True})
    )  # alpha/sqrt(r)
    merged, tokenizer = load_for_inference("tiny-random", str(adapter), precision="fp32")
    base, _ = load_for_inference("tiny-random", precision="fp32")
    expected, got = answers(merged, tokenizer), answers(base, tokenizer, factors(base, adapter))
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(e.logprobs), atol=1e-4)
    engine = decode_model_for(base)
    assert engine is not None
    wide = {"model.layers.0.self_attn.q_proj": [(torch.zeros(4, 65), torch.zeros(64, 4), 1.0)]}
    reason = engine.adapter(wide)
    assert isinstance(reason, str) and "do not fit" in reason


def test_a_dora_adapter_runs_on_the_models_own_forward(tmp_path: Path) -> None:
    """The engine merges plain LoRA updates; DoRA's magnitudes would be lost, so it steps aside."""
    from peft import LoraConfig, get_peft_model

    from tunery.models.decode import unsupported_reason
    from tunery.models.sampling import _sample_generic

    model, tokenizer = load_model("tiny-random")
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True))
    with torch.no_grad():
        for key, p in peft.named_parameters():
            if "lora_B" in key:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
            if "magnitude" in key:
                p.mul_(1.5)
    peft.eval()
    assert "DoRA" in str(unsupported_reason(peft))
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    params = SamplingParams(max_new_tokens=8)
    got, expected = (
        sample(peft, tokenizer, prompts, params),
        _sample_generic(peft, tokenizer, prompts, params),
    )
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
