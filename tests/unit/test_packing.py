"""Padding-free packing: same loss as one conversation at a time, no attention across conversations."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import chat_lines
from tunery.data.chat import check_chat_example
from tunery.data.packing import (
    IGNORE,
    ROW_MULTIPLE,
    PackedRow,
    pack,
    plan_rows,
    shard,
    shifted_targets,
    step_indices,
)
from tunery.data.template import tokenize_chat
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


def test_packing_changes_nothing_when_neighbours_change(tiny) -> None:
    """The first conversation's logits do not depend on what is packed after it, nor vice versa."""
    model, tokenizer = tiny
    model.eval()
    a, b, c = tokenized(tokenizer, 3)
    with torch.no_grad():

        def logits(row):
            return model(
                input_ids=row.input_ids, position_ids=row.position_ids, cu_seq_lens_q=row.cu_seq_lens
            ).logits[0]

        ab, cb = logits(pack([a, b])), logits(pack([c, b]))
    n_a, n_b, n_c = len(a.input_ids), len(b.input_ids), len(c.input_ids)
    assert torch.allclose(ab[n_a : n_a + n_b], cb[n_c : n_c + n_b], atol=1e-5)


def test_the_padding_tail_rounds_the_row_and_changes_nothing(tiny) -> None:
    """A row is rounded up to a multiple of ROW_MULTIPLE by an untrained tail that attends to nothing and
    that nothing attends to: the loss and its gradient are those of the row without it."""
    model, tokenizer = tiny
    chats = tokenized(tokenizer, 3)
    row = pack(chats)
    length = sum(c.n_tokens for c in chats)
    assert row.pad_tokens == -length % ROW_MULTIPLE > 0 and row.input_ids.shape[1] % ROW_MULTIPLE == 0
    assert row.n_tokens == length and row.cu_seq_lens.tolist()[-2:] == [length, length + row.pad_tokens]
    assert (row.targets[length:] == IGNORE).all() and row.n_trained == sum(c.n_trained for c in chats)
    bare = PackedRow(row.input_ids[:, :length], row.position_ids[:, :length], row.cu_seq_lens[:-1],
                     row.targets[:length])  # fmt: skip
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
    for end in bounds[1:]:
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
