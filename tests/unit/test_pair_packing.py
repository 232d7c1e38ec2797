"""Packed pairs with a shared prompt give exactly the log-probabilities of separate forward passes."""

from __future__ import annotations

import pytest
import torch

from tunery.data.feedback import check_feedback_example, tokenize_feedback
from tunery.data.packing import pack_pairs
from tunery.models.forward import sequence_logps


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
        summed, counts, _ = sequence_logps(model, model.get_output_embeddings().weight, row)
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
    summed, _, _ = sequence_logps(model, model.get_output_embeddings().weight, row)
    (summed[0] - summed[1]).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
