"""The KV-cache sampler: batching and padding change nothing, log-probs match the training forward pass."""

from __future__ import annotations

import torch

from tunery.models.sampling import SamplingParams, _choose, _filter_logits, sample


def prompts(tokenizer) -> list[list[int]]:
    texts = ["Hello there, how", "Bikes", "A much longer prompt that needs left padding in the batch"]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_batched_greedy_equals_one_at_a_time(tiny) -> None:
    model, tokenizer = tiny
    model.eval()
    params = SamplingParams(max_new_tokens=12)
    batched = sample(model, tokenizer, prompts(tokenizer), params)
    single = [sample(model, tokenizer, [p], params)[0] for p in prompts(tokenizer)]
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in batched)


def test_logprobs_agree_with_a_full_forward_pass(tiny) -> None:
    model, tokenizer = tiny
    model.eval()
    ps = prompts(tokenizer)
    completions = sample(model, tokenizer, ps, SamplingParams(max_new_tokens=8, temperature=1.0, seed=3))
    for prompt, c in zip(ps, completions, strict=True):
        ids = torch.tensor([prompt + c.token_ids])
        with torch.no_grad():
            logps = model(input_ids=ids).logits[0].float().log_softmax(-1)
        expected = [logps[len(prompt) - 1 + j, t].item() for j, t in enumerate(c.token_ids)]
        assert torch.allclose(torch.tensor(c.logprobs), torch.tensor(expected), atol=1e-4)


def test_seed_makes_sampling_repeatable_and_stop_strings_cut(tiny) -> None:
    model, tokenizer = tiny
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=7)
    a = sample(model, tokenizer, prompts(tokenizer), params)
    b = sample(model, tokenizer, prompts(tokenizer), params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    text = a[0].text
    # A single ASCII character from the middle of the first completion (the tiny model writes random bytes).
    stop = next(ch for ch in text[2:] if ch.isascii() and ch.isprintable())
    cut = sample(
        model,
        tokenizer,
        prompts(tokenizer),
        SamplingParams(max_new_tokens=10, temperature=1.0, seed=7, stop=[stop]),
    )
    assert cut[0].text == text[: text.find(stop)] and cut[0].finish_reason == "stop"


def test_top_k_and_top_p_filtering() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top_k = _filter_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.isinf(top_k[0, 2:]).all() and not torch.isinf(top_k[0, :2]).any()
    top_p = _filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert not torch.isinf(top_p[0, :2]).any() and torch.isinf(top_p[0, 2:]).all()  # 0.5 + 0.3 crosses 0.7


def test_draws_follow_the_distribution_and_log_probs_are_at_temperature_one() -> None:
    """The inverse-CDF draw over unnormalised exps: each token as often as its probability (tempered and
    filtered as asked), and its log-probability the temperature-1 one, whichever way it was computed."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = (probs.log() + 7.0).repeat(20000, 1)  # shifted: the draw must not assume normalised logits
    log_probs = probs.log()
    for params, expected in [
        (SamplingParams(temperature=1.0, seed=0), probs),
        (SamplingParams(temperature=2.0, seed=0), probs.sqrt() / probs.sqrt().sum()),
        (SamplingParams(temperature=1.0, top_k=2, seed=0), torch.tensor([0.625, 0.375, 0, 0, 0])),
    ]:
        ids, logps = _choose(logits.clone(), params, torch.Generator().manual_seed(1))
        counts = torch.bincount(ids, minlength=5).float() / len(ids)
        assert torch.allclose(counts, expected, atol=0.015), (params, counts)
        assert torch.allclose(logps, log_probs[ids], atol=1e-5)
    ids, logps = _choose(logits[:3].clone(), SamplingParams(temperature=0.0), torch.Generator())
    assert ids.tolist() == [0, 0, 0] and torch.allclose(logps, log_probs[:1].expand(3), atol=1e-6)


def lora_model(tiny):  # type: ignore[no-untyped-def]
    """The tiny model with a LoRA adapter on every linear layer, its B matrices nudged off zero."""
    from tunery.models.lora import apply_lora

    model, tokenizer = tiny
    with torch.random.fork_rng(devices=[]):
        # A's initialisation seeded: sampled tokens of two paths agree up to float rounding, which can
        # flip a draw that falls within ~1e-6 of a boundary between two tokens; this adapter has none
        torch.manual_seed(0)
        peft = apply_lora(model, rank=4, alpha=8, dropout=0.0, targets="all-linear")
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return peft.eval(), tokenizer


def test_engine_matches_the_models_own_forward_with_lora_and_follows_weight_updates(tiny) -> None:
    from tunery.models.decode import decode_model_for
    from tunery.models.sampling import _sample_generic

    model, tokenizer = lora_model(tiny)
    assert decode_model_for(model) is not None  # the fast path is the one under test
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=5)
    ps = prompts(tokenizer)
    fast, slow = sample(model, tokenizer, ps, params), _sample_generic(model, tokenizer, ps, params)
    assert [c.token_ids for c in fast] == [c.token_ids for c in slow]
    for f, s in zip(fast, slow, strict=True):
        assert torch.allclose(torch.tensor(f.logprobs), torch.tensor(s.logprobs), atol=1e-4)
    greedy = SamplingParams(max_new_tokens=10)
    before = sample(model, tokenizer, ps, greedy)
    with torch.no_grad():  # an optimizer step on the adapter: the engine must see the new weights
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(-20.0)
    after, expected = sample(model, tokenizer, ps, greedy), _sample_generic(model, tokenizer, ps, greedy)
    assert [c.token_ids for c in after] == [c.token_ids for c in expected]
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    with model.disable_adapter():  # the reference policy: base weights only
        base, expected = sample(model, tokenizer, ps, greedy), _sample_generic(model, tokenizer, ps, greedy)
    assert [c.token_ids for c in base] == [c.token_ids for c in expected]
    assert [c.token_ids for c in base] != [c.token_ids for c in after]


def test_rows_that_finish_early_leave_the_batch_without_disturbing_the_others(tiny) -> None:
    model, tokenizer = tiny
    model.eval()
    ps = prompts(tokenizer) + [prompts(tokenizer)[0]]  # a repeated prompt shares its prefill
    params = SamplingParams(max_new_tokens=12)
    full = sample(model, tokenizer, ps, params)
    assert full[0].token_ids == full[3].token_ids
    # Make the 4th token of row 1 an end-of-turn token: row 1 stops there, the others run on.
    stop = full[1].token_ids[3]
    assert all(stop not in c.token_ids for i, c in enumerate(full) if i != 1)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    cut = sample(model, tokenizer, ps, params)
    assert cut[1].token_ids == full[1].token_ids[:3] and cut[1].finish_reason == "stop"
    assert [c.token_ids for i, c in enumerate(cut) if i != 1] == [
        c.token_ids for i, c in enumerate(full) if i != 1
    ]
