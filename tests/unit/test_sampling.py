"""The KV-cache sampler: batching and padding change nothing, log-probs match the training forward pass."""

from __future__ import annotations

import torch

from tunery.models.sampling import SamplingParams, _filter_logits, sample


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
