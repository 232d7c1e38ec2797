"""Padding-free packing: same loss as one conversation at a time, no attention across conversations."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import chat_lines
from tunery.data.chat import check_chat_example
from tunery.data.packing import (
    IGNORE,
    ROW_MULTIPLE,
    SHARED_PREFIX_MIN,
    SHARED_SEGMENT_MAX,
    PackedRow,
    pack,
    plan_rows,
    shard,
    share_prefixes,
    shareable,
    shifted_targets,
    step_indices,
)
from tunery.data.template import TokenizedChat, tokenize_chat
from tunery.models.forward import output_head
from tunery.recipes.sft import forward_loss


def tokenized(tokenizer, n: int):
    return [
        tokenize_chat(tokenizer, check_chat_example(obj, i + 1)[0]) for i, obj in enumerate(chat_lines(n))
    ]


def test_packed_loss_equals_unpacked_loss(tiny) -> None:
    model, tokenizer = tiny
    model.eval()
    chats = tokenized(tokenizer, 5)
    with torch.no_grad():
        packed_nll, packed_correct = forward_loss(model, output_head(model), pack(chats))
        separate = [forward_loss(model, output_head(model), pack([c])) for c in chats]
        # And a plain HF forward with the default attention, one conversation at a time, no Tunery code path.
        plain = 0.0
        for c in chats:
            ids = torch.tensor([c.input_ids])
            logits = model(input_ids=ids).logits[0, :-1].float()
            labels = torch.tensor(c.input_ids[1:])
            mask = torch.tensor(c.label_mask[1:])
            plain += torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum").item()
    assert torch.allclose(packed_nll, sum(s[0] for s in separate), rtol=1e-5)
    assert packed_correct == sum(s[1] for s in separate)
    assert abs(packed_nll.item() - plain) < 1e-3 * plain


def per_chat_logprobs(model, chats) -> dict[int, torch.Tensor]:
    """Each conversation's log-probabilities of its trained tokens in one packed row of `chats`, by id.
    A shared prefix predicts nothing, so the row's targets are each conversation's in turn, in the order
    `share_prefixes` lays them out."""
    row = pack(chats)
    logits = model(**row.model_kwargs()).logits[0].float()
    trained = (row.targets != IGNORE).nonzero().squeeze(1)
    logps = logits[trained].log_softmax(-1).gather(1, row.targets[trained, None])[:, 0]
    ordered = [c for _, members in share_prefixes(chats) for c in members]
    return dict(zip([id(c) for c in ordered], logps.split([c.n_trained for c in ordered]), strict=True))


def test_packing_changes_nothing_when_neighbours_change(tiny) -> None:
    """A conversation's predictions do not depend on what is packed beside it, shared prefix or not."""
    model, tokenizer = tiny
    model.eval()
    a, b, c = tokenized(tokenizer, 3)
    other_system = tokenize_chat(
        tokenizer, check_chat_example({"messages": [{"role": "system", "content": "Answer in French."}]
                                       + chat_lines(4)[3]["messages"][1:]}, 1)[0]
    )  # fmt: skip
    with torch.no_grad():
        alone = per_chat_logprobs(model, [b])[id(b)]
        for neighbours in ([a], [c], [a, c], [other_system]):
            beside = per_chat_logprobs(model, [*neighbours, b])[id(b)]
            assert torch.allclose(beside, alone, atol=1e-5)
    assert pack([a, b]).trees is not None  # the first two shared their system prompt


def test_a_shared_prefix_gives_the_loss_and_gradients_of_separate_rows(tiny) -> None:
    """Conversations with the same system prompt run it once in their row; each one's rest attends to it
    and to itself. Loss, correct count and every LoRA gradient are those of one row per conversation, and
    the sharing stops before any trained token."""
    from tests.conftest import nudged_lora

    model, tokenizer = tiny
    peft = nudged_lora(model)
    chats = tokenized(tokenizer, 6)
    # two that are the same up to the end of a trained first answer: sharing must stop before it
    first = {"messages": chat_lines(1)[0]["messages"][:3]}
    twin_a = {"messages": [*first["messages"], {"role": "user", "content": "And then?"},
                           {"role": "assistant", "content": "Then we ship it."}]}  # fmt: skip
    twin_b = {"messages": [*first["messages"], {"role": "user", "content": "Why?"},
                           {"role": "assistant", "content": "Policy."}]}  # fmt: skip
    twins = [tokenize_chat(tokenizer, check_chat_example(t, 1)[0]) for t in (twin_a, twin_b)]
    chats += twins
    row = pack(chats)
    assert row.trees is not None and max(tree[0][0] for tree in row.trees) >= SHARED_PREFIX_MIN
    assert row.n_tokens < row.data_tokens == sum(c.n_tokens for c in chats)
    assert row.n_trained == sum(c.n_trained for c in chats)
    assert all(shared <= shareable(c) for shared, members in share_prefixes(chats) for c in members)
    assert shareable(twins[0]) < twins[0].label_mask.index(True)

    def loss_and_grads(rows):
        peft.zero_grad()
        nll = correct = 0.0
        for r in rows:
            n, k = forward_loss(peft, output_head(peft), r)
            n.backward()
            nll, correct = nll + n.detach(), correct + k
        grads = [p.grad.clone() for p in peft.parameters() if p.requires_grad]
        return nll, correct, grads

    nll, correct, grads = loss_and_grads([row])
    sep_nll, sep_correct, sep_grads = loss_and_grads([pack([c]) for c in chats])
    assert torch.allclose(nll, sep_nll, rtol=1e-5) and correct == sep_correct
    # equal up to fp32 summation order (the prefix's gradient is summed over its conversations in one pass)
    assert all((g - h).abs().max() <= 1e-5 * h.abs().max() for g, h in zip(grads, sep_grads, strict=True))
    assert any(g.abs().sum() > 0 for g in grads)


def test_prefix_sharing_groups_and_limits(tiny) -> None:
    """Different system prompts make different groups; a segment stays within SHARED_SEGMENT_MAX tokens;
    a common prefix shorter than SHARED_PREFIX_MIN is not shared; a conversation alone is as before."""
    _, tokenizer = tiny

    def chat(system: str, user: str, answer: str = "Sure."):
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": user},
                {"role": "assistant", "content": answer}]  # fmt: skip
        return tokenize_chat(tokenizer, check_chat_example({"messages": msgs}, 1)[0])

    long_a = "You answer for a bicycle shop: returns, repairs, sizes and deliveries, politely."
    long_b = "You are a tutor for fractions; explain each step and check the learner's answer."
    chats = [chat(long_a, f"question {i}") for i in range(3)] + [
        chat(long_b, f"question {i}") for i in range(3)
    ]
    groups = share_prefixes(chats)
    assert sorted(len(m) for _, m in groups) == [3, 3]
    assert all(shared >= SHARED_PREFIX_MIN for shared, _ in groups)
    # a cap: many conversations sharing a prefix are split into segments of at most SHARED_SEGMENT_MAX
    many = [chat(long_a, f"question {i}", "An answer.") for i in range(40)]
    total = sum(c.n_tokens for c in many)
    segments = share_prefixes(many)
    assert len(segments) > 1 and sum(len(m) for _, m in segments) == 40
    assert all(shared + sum(c.n_tokens - shared for c in m) <= SHARED_SEGMENT_MAX for shared, m in segments)
    assert pack(many).n_tokens < total
    # nothing in common worth sharing, and one conversation alone: plain segments, no prefix kwargs
    alone = pack([chat("A.", "hi")])
    assert alone.trees is None and "segment_trees" not in alone.model_kwargs()

    def ids(common: int):  # two conversations whose first `common` tokens are equal, then 4 trained
        return [TokenizedChat(1, [5] * common + [k] * 6, [False] * (common + 2) + [True] * 4) for k in (7, 8)]

    assert all(shared == 0 for shared, _ in share_prefixes(ids(SHARED_PREFIX_MIN - 1)))
    assert [shared for shared, _ in share_prefixes(ids(SHARED_PREFIX_MIN))] == [SHARED_PREFIX_MIN]


def test_the_padding_tail_rounds_the_row_and_changes_nothing(tiny) -> None:
    """A row is rounded up to a multiple of ROW_MULTIPLE by an untrained tail that attends to nothing and
    that nothing attends to: the loss and its gradient are those of the row without it."""
    model, tokenizer = tiny
    chats = tokenized(tokenizer, 3)
    row = pack(chats)
    length = row.n_tokens  # the conversations' tokens, a shared beginning once
    assert row.trees is not None and length < sum(c.n_tokens for c in chats)  # (they share one)
    assert row.pad_tokens == -length % ROW_MULTIPLE > 0 and row.input_ids.shape[1] % ROW_MULTIPLE == 0
    assert row.cu_seq_lens.tolist()[-2:] == [length, length + row.pad_tokens]
    assert (row.targets[length:] == IGNORE).all() and row.n_trained == sum(c.n_trained for c in chats)
    bare = PackedRow(row.input_ids[:, :length], row.position_ids[:, :length], row.cu_seq_lens[:-1],
                     row.targets[:length], trees=row.trees[:-1])  # fmt: skip
    results = []
    for r in (row, bare):
        model.zero_grad()
        nll, correct = forward_loss(model, output_head(model), r)
        nll.backward()
        results.append((nll.detach(), correct, [p.grad.clone() for p in model.parameters()]))
    (nll, correct, grads), (bare_nll, bare_correct, bare_grads) = results
    assert torch.allclose(nll, bare_nll, rtol=1e-6) and correct == bare_correct
    # (equal up to fp32 summation order: the weights' gradients sum over more rows, of zeros)
    assert all(torch.allclose(g, h, rtol=1e-5, atol=1e-5) for g, h in zip(grads, bare_grads, strict=True))
    # a tail the row does not end with is refused, not silently taken from the last conversation
    with pytest.raises(ValueError, match="pad_tokens"):
        model(**{**bare.model_kwargs(), "pad_tokens": row.pad_tokens})


def test_targets_never_cross_conversations(tiny) -> None:
    _, tokenizer = tiny
    chats = tokenized(tokenizer, 3)
    row = pack(chats)
    bounds = row.cu_seq_lens.tolist()
    assert bounds[0] == 0 and bounds[-1] == row.n_tokens + row.pad_tokens
    ends = []  # where each conversation's tokens end in the row
    for (shared, members), segment_start in zip(share_prefixes(chats), bounds, strict=False):
        end = segment_start + shared
        for c in members:
            end += c.n_tokens - shared
            ends.append(end)
            assert row.position_ids[0, end - 1] == c.n_tokens - 1  # positions continue from the beginning
    for end in ends:
        assert row.targets[end - 1] == IGNORE  # the last token of a conversation predicts nothing
    assert row.position_ids[0, bounds[1]] == 0
    assert row.n_trained == sum(c.n_trained for c in chats)
    assert shifted_targets(chats[0])[:-1] == [
        t if m else IGNORE for t, m in zip(chats[0].input_ids[1:], chats[0].label_mask[1:], strict=True)
    ]


def test_rows_respect_the_budget_and_keep_every_chat(tiny) -> None:
    _, tokenizer = tiny
    chats = tokenized(tokenizer, 12)
    budget = max(len(c.input_ids) for c in chats) + 10
    rows = plan_rows(chats, budget)
    assert sorted(id(c) for r in rows for c in r) == sorted(id(c) for c in chats)
    assert all(sum(len(c.input_ids) for c in r) <= budget for r in rows)
    shards = [shard(chats, r, 3) for r in range(3)]
    assert sorted(id(c) for s in shards for c in s) == sorted(id(c) for c in chats)


def test_step_indices_cover_each_epoch_once() -> None:
    n, batch = 10, 4
    steps = [step_indices(s, n, batch, seed=1) for s in range(3)]
    assert [len(s) for s in steps] == [4, 4, 2]
    assert sorted(i for s in steps for i in s) == list(range(n))
    assert step_indices(3, n, batch, seed=1) != steps[0] or step_indices(4, n, batch, seed=1) != steps[1]
    assert step_indices(1, n, batch, seed=1) == steps[1]  # no state needed to resume


def test_examples_seen_counts_the_short_last_batch_of_each_epoch() -> None:
    from tunery.data.packing import examples_seen

    # 10 examples in batches of 4: each epoch is 4 + 4 + 2
    assert [examples_seen(s, 10, 4) for s in range(7)] == [0, 4, 8, 10, 14, 18, 20]
