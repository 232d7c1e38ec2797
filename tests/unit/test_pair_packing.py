"""Packed pairs with a shared prompt give exactly the log-probabilities of separate forward passes."""

from __future__ import annotations

import pytest
import torch

from tunery.data.feedback import check_feedback_example, tokenize_feedback
from tunery.data.packing import pack_pairs
from tunery.models.forward import output_head, sequence_logps


def _pair(tokenizer, line: int, prompt, chosen, rejected):
    example, problems = check_feedback_example(
        {"prompt": prompt, "chosen": chosen, "rejected": rejected}, line
    )
    assert example is not None, problems
    return tokenize_feedback(tokenizer, example)[0]


def _separate_logps(model, ids: list[int], mask: list[bool]) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logps = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    return float(logps[torch.tensor(mask[1:])].sum())


def test_shared_prompt_packing_matches_separate_passes(tiny) -> None:
    model, tokenizer = tiny
    pairs = [
        _pair(tokenizer, 1, "What are your hours?", "Mon-Fri 8-6.", "No idea, look it up yourself."),
        _pair(
            tokenizer,
            2,
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Can I return a helmet?"},
                {"role": "assistant", "content": "Which one?"},
                {"role": "user", "content": "The red one, bought last week."},
            ],
            "Yes, within 30 days.",
            "No.",
        ),
        _pair(
            tokenizer, 3, "hi", "Hello! How can I help?", "Hello! How can I help you with your bike today?"
        ),
    ]
    assert all(p.prompt_ids for p in pairs)
    row = pack_pairs(pairs)
    with torch.no_grad():
        summed, counts, _ = sequence_logps(model, output_head(model), row)
    for k, pair in enumerate(pairs):
        for seq, ids, mask in (
            (2 * k, pair.chosen_ids, pair.chosen_mask),
            (2 * k + 1, pair.rejected_ids, pair.rejected_mask),
        ):
            full, full_mask = pair.prompt_ids + ids, [False] * len(pair.prompt_ids) + mask
            assert summed[seq].item() == pytest.approx(_separate_logps(model, full, full_mask), abs=1e-4)
            assert counts[seq].item() == sum(mask)


def test_gradients_flow_through_both_branches(tiny) -> None:
    model, tokenizer = tiny
    row = pack_pairs([_pair(tokenizer, 1, "q?", "yes", "no way")])
    summed, _, _ = sequence_logps(model, output_head(model), row)
    (summed[0] - summed[1]).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_a_group_of_answers_sharing_one_prompt_matches_separate_passes(tiny) -> None:
    """GRPO packs `prompt | answer 1 | ... | answer k`: each answer sees the prompt and itself only."""
    from tunery.data.packing import pack_branches

    model, tokenizer = tiny
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    groups = [
        (encode("What is 3 + 4?"), [encode(a) for a in ("7", "3 + 4 = 7.", "", "It is eight")]),
        (encode("Name a colour"), [encode(a) for a in ("red", "Blue!")]),
    ]
    segments = [(prompt, [(ids, [True] * len(ids)) for ids in answers]) for prompt, answers in groups]
    row = pack_branches(segments)
    assert row.n_sequences == 6 and row.branch_lens[0] == tuple(len(a) for a in groups[0][1])
    with torch.no_grad():
        summed, counts, _ = sequence_logps(model, output_head(model), row)
    seq = 0
    for prompt, answers in groups:
        for ids in answers:
            expected = _separate_logps(model, prompt + ids, [False] * len(prompt) + [True] * len(ids))
            assert summed[seq].item() == pytest.approx(expected, abs=1e-4)
            assert counts[seq].item() == len(ids)
            seq += 1
