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


def answers(pair):
    """(answer number within the pair, ids, trained mask) of a pair's chosen and rejected answers."""
    return ((0, pair.chosen_ids, pair.chosen_mask), (1, pair.rejected_ids, pair.rejected_mask))


def assert_separate_logps(model, pairs, row) -> None:
    """Each answer's summed log-prob and trained-token count in `row` are those of its own forward pass."""
    with torch.no_grad():
        summed, counts, _ = sequence_logps(model, output_head(model), row)
    for k, pair in enumerate(pairs):
        for a, ids, mask in answers(pair):
            full, full_mask = pair.prompt_ids + ids, [False] * len(pair.prompt_ids) + mask
            expected = _separate_logps(model, full, full_mask)
            assert summed[2 * k + a].item() == pytest.approx(expected, abs=1e-4)
            assert counts[2 * k + a].item() == sum(mask)


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
    assert_separate_logps(model, pairs, row)


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
    assert row.n_sequences == 6
    assert ((len(groups[0][0]), -1),) + tuple((len(a), 0) for a in groups[0][1]) in row.trees
    with torch.no_grad():
        summed, counts, _ = sequence_logps(model, output_head(model), row)
    seq = 0
    for prompt, answers in groups:
        for ids in answers:
            expected = _separate_logps(model, prompt + ids, [False] * len(prompt) + [True] * len(ids))
            assert summed[seq].item() == pytest.approx(expected, abs=1e-4)
            assert counts[seq].item() == len(ids)
            seq += 1


def test_pairs_sharing_a_system_prompt_run_it_once_and_keep_their_order(tiny) -> None:
    """Pairs whose prompts begin alike (the same system prompt) share that beginning in their row: each
    prompt's rest and its answers attend to it. Log-probabilities are those of separate passes; answers
    keep their given numbers (chosen 2k, rejected 2k + 1) and the trained tokens their given order, though
    the row lays the pairs out sorted by prompt."""
    from tunery.data.packing import SHARED_PREFIX_MIN
    from tunery.recipes.rollouts import split_by_sequence

    model, tokenizer = tiny
    system = {"role": "system", "content": "You answer for a bicycle shop, in one short sentence."}
    other = {"role": "system", "content": "You are a maths tutor."}
    pairs = [
        _pair(tokenizer, k + 1, [sys_msg, {"role": "user", "content": question}], chosen, rejected)
        for k, (sys_msg, question, chosen, rejected) in enumerate([
            (system, "Zebra-striped tyres?", "Yes, in 700c.", "No."),
            (system, "Are you open on Sunday?", "No, Monday to Saturday.", "Maybe."),
            (other, "What is 3 + 4?", "7.", "8."),
            (system, "Can I return a helmet?", "Yes, within 30 days.", "Never."),
        ])
    ]  # fmt: skip
    row = pack_pairs(pairs)
    trunks = [tree[0][0] for tree in row.trees if tree[0][1] == -1 and len(tree) > 1 and tree[1][1] == 0]
    assert trunks and max(trunks) >= SHARED_PREFIX_MIN  # the bicycle pairs share their beginning
    assert row.n_tokens < sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    assert row.sequence.tolist() == sorted(row.sequence.tolist())  # trained tokens in answer order
    assert_separate_logps(model, pairs, row)
    # the reward model reads each answer's last token: the same hidden state as the answer run alone
    with torch.no_grad():
        hidden = model(**row.model_kwargs(), output_hidden_states=True).hidden_states[-1][0]
        for k, pair in enumerate(pairs):
            alone = model(input_ids=torch.tensor([pair.prompt_ids + pair.rejected_ids]),
                          output_hidden_states=True).hidden_states[-1][0, -1]  # fmt: skip
            assert torch.allclose(hidden[row.last_positions[2 * k + 1]], alone, atol=1e-4)
    # the row lays the pairs out in another order than given...
    assert row.last_positions.tolist() != sorted(row.last_positions.tolist())
    # ...and per-answer splits (GRPO, PPO) still get each answer's own trained tokens, in order
    pieces = split_by_sequence(row.targets, row)
    for k, pair in enumerate(pairs):
        for a, ids, mask in answers(pair):
            assert pieces[2 * k + a].tolist() == [t for t, on in zip(ids, mask, strict=True) if on]


@pytest.mark.parametrize(
    ("tree", "window", "multiple"),
    [
        (((5, -1), (7, 0), (3, 0), (9, 0)), None, 16),  # conversations sharing a system prompt
        (((5, -1), (7, 0), (3, 0), (9, 0)), None, 1),
        (((24, -1), (10, 0), (20, 1), (15, 1), (12, 0), (30, 4), (2, 4)), None, 16),  # pairs under a trunk
        (((24, -1), (10, 0), (20, 1), (15, 1), (12, 0), (30, 4), (0, 4)), 16, 16),  # a sliding window
    ],
)
def test_attention_per_subtree_equals_one_masked_segment(tree, window, multiple) -> None:
    """A segment with a trunk runs attention per subtree (its queries over the trunk's keys and its own);
    outputs and gradients are those of one attention over the whole segment with the tree's mask."""
    from tunery.models import attention

    torch.manual_seed(0)
    n = sum(length for length, _ in tree)
    q = torch.randn(1, 6, n, 8, requires_grad=True)
    k, v = (torch.randn(1, 2, n, 8, requires_grad=True) for _ in range(2))
    parts = attention._subtrees(tree)
    assert parts is not None and len(parts) >= 2
    split = attention._tree_attention(q, k, v, tree, parts, 0.3, None, window, multiple, 0.0)
    whole = attention._segment_attention(q, k, v, attention._blocked(tree, q.device, window, multiple), 0.3)
    weights = torch.randn_like(whole)
    grads = [torch.autograd.grad((out * weights).sum(), (q, k, v)) for out in (split, whole)]
    assert torch.allclose(split, whole, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads, strict=True))
    assert attention._subtrees(((5, -1), (7, 0))) is None  # one child: a plain causal segment
    assert attention._subtrees(((0, -1), (7, 0), (3, 0))) is None  # no trunk: a pair without a prompt


@pytest.mark.parametrize(
    ("lengths", "trees", "pad_tokens", "window"),
    [
        ([5, 9, 7], [((5, -1),), ((9, -1),), ((7, -1),)], 0, None),  # plain conversations
        (
            [20, 30, 4],
            [((4, -1), (8, 0), (8, 0)), ((10, -1), (12, 0), (8, 0)), ((4, -1),)],
            4,
            None,
        ),  # pairs, a tail
        ([20, 30], [((4, -1), (8, 0), (8, 0)), ((10, -1), (12, 0), (8, 0))], 0, 6),  # a sliding window
        ([40, 30], [((10, -1), (10, 0), (5, 1), (15, 0)), ((0, -1), (30, 0))], 0, None),  # a deeper tree
    ],
)
def test_a_row_of_short_segments_attended_as_one_batch_equals_one_at_a_time(
    lengths, trees, pad_tokens, window
) -> None:
    """Short segments (and a trunk's subtrees) go through attention as one padded batch; in float64 the
    outputs and gradients are those of attending to each on its own."""
    from tunery.models import attention

    torch.manual_seed(0)
    total = sum(lengths)
    q = torch.randn(1, 6, total, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, total, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    module = torch.nn.Module()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    kwargs = {"cu_seq_lens_q": cu, "segment_trees": trees, "pad_tokens": pad_tokens, "sliding_window": window}
    shape = tuple(tuple(tree) for tree in trees)
    pad_tail = len(lengths) - 1 if pad_tokens else None
    assert attention._batch_plan(tuple(lengths), shape, pad_tail, window, q.device) is not None
    batched, _ = attention.varlen_attention_forward(module, q, k, v, None, 0.0, 0.25, **kwargs)
    weights = torch.randn_like(batched)
    expected_grads = torch.autograd.grad((batched * weights).sum(), (q, k, v))
    original = attention._batch_plan
    try:
        attention._batch_plan = lambda *args: None  # type: ignore[assignment]
        alone, _ = attention.varlen_attention_forward(module, q, k, v, None, 0.0, 0.25, **kwargs)
    finally:
        attention._batch_plan = original
    grads = torch.autograd.grad((alone * weights).sum(), (q, k, v))
    assert torch.allclose(batched, alone, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(expected_grads, grads, strict=True))
    long_segment = attention._batch_plan((600,), (((600, -1),),), None, None, q.device)
    assert long_segment is None  # longer than BATCH_MAX_KEYS: one at a time
