"""Padding-free packing: several conversations in one row, each with its own positions and attention.

A packed row carries `position_ids` that restart at 0 for every conversation and `cu_seq_lens`, the
cumulative lengths that `models/attention.py` uses to keep attention inside each conversation. Targets are
shifted per conversation before concatenation, so the last token of one conversation never predicts the
first token of the next. The loss of a packed row is therefore exactly the sum of the per-conversation
losses (tests/unit/test_packing.py checks it against unpacked forward passes).

A row's length is rounded up to a multiple of `ROW_MULTIPLE` by a padding tail: a last segment of
`pad_tokens` tokens that nothing attends to, that attends to nothing (models/attention.py gives it zeros)
and that is never trained. On CPU the GEMM library (oneDNN) builds a kernel for each new matrix shape,
~3 ms for one of SmolLM2-135M's projections; with rows of every length, a step whose row length was new
built 25-32 of them (30-40 ms of a ~1 s step). Rounded rows repeat their shapes from step to step; the
tail's tokens cost about as much on a short run (docs/performance.md). On a GPU the tail only costs
its tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch

from tunery.data.feedback import TokenizedPair
from tunery.data.template import TokenizedChat

IGNORE = -100
ROW_MULTIPLE = 32  # packed rows' lengths are rounded up to a multiple of this (see above)
SHARED_PREFIX_MIN = 8  # tokens: items in a row share a common beginning from this length on
SHARED_SEGMENT_MAX = 512  # tokens: at most this many in a segment of items sharing a beginning


# A segment as a tree of token runs, in row order: (length, parent index or -1). A run attends to itself
# (causally) and to its ancestors; its positions continue from its parent's end. A plain sequence is
# ((n, -1),); a pair `prompt | chosen | rejected` is ((p, -1), (c, 0), (r, 0)); pairs sharing a system
# prompt add a trunk: ((s, -1), (p1, 0), (c1, 1), (r1, 1), (p2, 0), ...).
Tree = tuple[tuple[int, int], ...]


def branch_tree(n_prompt: int, branch_lens: tuple[int, ...]) -> Tree:
    """The tree of a segment `prompt | answer 1 | answer 2 | ...` (a plain sequence: no prompt, one
    answer)."""
    return ((n_prompt, -1), *((length, 0) for length in branch_lens))


def tree_positions(tree: Tree) -> list[int]:
    """Each token's position: its run's start depth plus its offset."""
    ends: list[int] = []
    positions: list[int] = []
    for length, parent in tree:
        start = ends[parent] if parent >= 0 else 0
        positions += range(start, start + length)
        ends.append(start + length)
    return positions


class _Sized(Protocol):
    @property
    def n_tokens(self) -> int: ...


Item = TypeVar("Item", bound=_Sized)


class _Row:
    """What every packed row has: tokens, positions, segment bounds and a padding tail."""

    input_ids: torch.Tensor  # (1, T)
    position_ids: torch.Tensor  # (1, T)
    cu_seq_lens: torch.Tensor  # (segments + 1,) cumulative lengths, starting at 0 (with the padding tail's)
    pad_tokens: int  # the padding tail's length: the last segment, when > 0

    @property
    def n_tokens(self) -> int:
        """The segments' tokens (not the padding tail's)."""
        return int(self.input_ids.shape[1]) - self.pad_tokens

    def model_kwargs(self) -> dict[str, object]:
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "cu_seq_lens_q": self.cu_seq_lens,
            "cu_seq_lens_k": self.cu_seq_lens,
            "pad_tokens": self.pad_tokens,
            "use_cache": False,
        }


@dataclass
class PackedRow(_Row):
    input_ids: torch.Tensor  # (1, T)
    position_ids: torch.Tensor  # (1, T)
    cu_seq_lens: torch.Tensor  # (segments + 1,)
    targets: torch.Tensor  # (T,) next-token ids, IGNORE where not trained
    pad_tokens: int = 0
    # Per segment, its tree (`Tree`) when conversations share a beginning (`share_prefixes`); None when
    # every segment is one conversation.
    trees: list[Tree] | None = None
    data_tokens: int = 0  # the conversations' tokens as the data has them (a shared beginning in each)

    @property
    def n_trained(self) -> int:
        return int((self.targets != IGNORE).sum())

    def model_kwargs(self) -> dict[str, object]:
        if self.trees is None:
            return super().model_kwargs()
        return {**super().model_kwargs(), "segment_trees": self.trees}


def shifted_targets(chat: TokenizedChat) -> list[int]:
    """targets[j] is the token position j must predict: input_ids[j + 1] where that token is trained."""
    ids, mask = chat.input_ids, chat.label_mask
    return [ids[j + 1] if mask[j + 1] else IGNORE for j in range(len(ids) - 1)] + [IGNORE]


def padding_tail(n_tokens: int) -> int:
    """The padding tail's length for a row of `n_tokens` tokens."""
    return -n_tokens % ROW_MULTIPLE


def shareable(chat: TokenizedChat) -> int:
    """How many leading tokens of `chat` may be shared with other conversations: those whose next token is
    not trained (a shared position predicts nothing, so no conversation's loss depends on the sharing)."""
    first = next((j for j, trained in enumerate(chat.label_mask) if trained), chat.n_tokens)
    return max(first - 1, 0)


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


Grouped = TypeVar("Grouped")


def prefix_groups(
    items: list[Grouped],
    ids: Callable[[Grouped], list[int]],
    shareable_len: Callable[[Grouped], int],
    size: Callable[[Grouped], int],
) -> list[tuple[int, list[Grouped]]]:
    """Group a row's items (conversations, or pairs by their prompt) by a common beginning that may be
    shared (most often the same system prompt and chat template header): each group is (shared length, its
    items), one segment of the row in which the beginning runs once and each item's rest attends to it and
    to itself, as a preference pair's answers attend to their prompt. An item alone has shared length 0.

    Sorted by their shareable tokens, neighbours share the longest beginnings; an item joins the group
    before it while the group's saving (shared x (items - 1)) does not fall, the shared part stays at
    least SHARED_PREFIX_MIN tokens and the segment at most SHARED_SEGMENT_MAX (on CPU attention runs per
    subtree; SDPA, on a GPU, attends over the whole segment with its mask)."""
    groups: list[tuple[int, list[Grouped]]] = []
    for item in sorted(items, key=lambda x: ids(x)[: shareable_len(x)]):
        if groups:
            shared, members = groups[-1]
            last = members[-1]
            common = _common_prefix(ids(last), ids(item), min(shareable_len(last), shareable_len(item)))
            new = common if len(members) == 1 else min(shared, common)
            segment = new + sum(size(m) - new for m in members) + size(item) - new
            if (
                new >= SHARED_PREFIX_MIN
                and new * len(members) >= shared * (len(members) - 1)
                and (segment <= SHARED_SEGMENT_MAX)
            ):
                groups[-1] = (new, [*members, item])
                continue
        groups.append((0, [item]))
    return groups


def share_prefixes(chats: list[TokenizedChat]) -> list[tuple[int, list[TokenizedChat]]]:
    """A row's conversations grouped by a common untrained beginning (`prefix_groups`)."""
    return prefix_groups(chats, lambda c: c.input_ids, shareable, lambda c: c.n_tokens)


def pack(chats: list[TokenizedChat]) -> PackedRow:
    """One row of `chats`; conversations with a common untrained beginning share it (`share_prefixes`)."""
    input_ids: list[int] = []
    position_ids: list[int] = []
    targets: list[int] = []
    bounds = [0]
    trees: list[Tree] = []
    for shared, members in share_prefixes(chats):
        input_ids += members[0].input_ids[:shared]
        position_ids += range(shared)
        targets += [IGNORE] * shared
        for chat in members:
            input_ids += chat.input_ids[shared:]
            position_ids += range(shared, chat.n_tokens)
            targets += shifted_targets(chat)[shared:]
        trees.append(branch_tree(shared, tuple(chat.n_tokens - shared for chat in members)))
        bounds.append(len(input_ids))
    pad = padding_tail(len(input_ids))
    if pad:
        input_ids += [0] * pad
        position_ids += range(pad)
        targets += [IGNORE] * pad
        bounds.append(len(input_ids))
        trees.append(branch_tree(0, (pad,)))
    return PackedRow(
        input_ids=torch.tensor([input_ids], dtype=torch.long),
        position_ids=torch.tensor([position_ids], dtype=torch.long),
        cu_seq_lens=torch.tensor(bounds, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        pad_tokens=pad,
        trees=trees if any(len(tree) > 2 for tree in trees) else None,
        data_tokens=sum(chat.n_tokens for chat in chats),
    )


def plan_rows(chats: list[Item], token_budget: int) -> list[list[Item]]:
    """Group chats into rows of at most `token_budget` tokens (first-fit decreasing; long chats sit alone)."""
    rows: list[list[Item]] = []
    room: list[int] = []
    for chat in sorted(chats, key=lambda c: -c.n_tokens):
        n = chat.n_tokens
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(chat)
                room[r] -= n
                break
        else:
            rows.append([chat])
            room.append(token_budget - n)
    return rows


def shard(chats: list[Item], rank: int, world_size: int) -> list[Item]:
    """This rank's share of a step's chats, balanced by token count. Every rank computes the same split."""
    loads = [0] * world_size
    owned: list[list[Item]] = [[] for _ in range(world_size)]
    for chat in sorted(chats, key=lambda c: -c.n_tokens):
        r = loads.index(min(loads))
        owned[r].append(chat)
        loads[r] += chat.n_tokens
    return owned[rank]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A fixed shuffle per (seed, epoch): the data order needs no saved state to resume exactly."""
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(n)]


def step_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Dataset indices of optimizer step `step` (0-based): `batch_size` examples, the last batch of an epoch
    may be smaller, as OpenAI counts steps (`ceil(n / batch_size) * n_epochs`)."""
    steps_per_epoch = -(-n // batch_size)
    epoch, within = divmod(step, steps_per_epoch)
    order = epoch_order(n, seed, epoch)
    return order[within * batch_size : (within + 1) * batch_size]


def examples_seen(steps: int, n: int, batch_size: int) -> int:
    """Examples trained in the first `steps` optimizer steps (fewer than epochs x n after an early stop)."""
    epochs, within = divmod(steps, -(-n // batch_size))
    return epochs * n + min(within * batch_size, n)


# --- preference pairs ------------------------------------------------------------------------------------


@dataclass
class BranchRow(_Row):
    """Segments `prompt | answer 1 | ... | answer k` packed in one row; the prompt runs once for all its
    answers. A preference pair is a segment with two answers (chosen, rejected), a GRPO group one with k.

    Answers are numbered in row order across segments (pair k: chosen 2k, rejected 2k + 1).
    `positions[i]` is a row position whose output predicts `targets[i]`, a trained token of answer
    `sequence[i]`; summing token log-probs by answer gives each answer's log-probability.
    """

    input_ids: torch.Tensor  # (1, T)
    position_ids: torch.Tensor  # (1, T)
    cu_seq_lens: torch.Tensor  # (segments + 1,)
    trees: list[Tree]  # per segment: its prompts and answers as a tree of runs
    positions: torch.Tensor  # (N,)
    targets: torch.Tensor  # (N,)
    sequence: torch.Tensor  # (N,)
    last_positions: torch.Tensor  # (n_sequences,) each answer's last token (a reward model scores there)
    n_sequences: int
    pad_tokens: int = 0
    data_tokens: int = (
        0  # each segment's prompt and answers, as the data has them (a shared beginning in each)
    )

    @property
    def n_pairs(self) -> int:
        return self.n_sequences // 2

    def model_kwargs(self) -> dict[str, object]:
        return {**super().model_kwargs(), "segment_trees": self.trees}


# A segment to pack: the prompt's token ids and its answers as (token ids, trained-token mask).
Segment = tuple[list[int], list[tuple[list[int], list[bool]]]]


def pack_branches(segments: list[Segment]) -> BranchRow:
    """Segments in one row; those whose prompts begin alike (the same system prompt) share that beginning
    as a trunk (`prefix_groups`), each keeping at least its prompt's last token (which predicts its
    answers' first tokens)."""
    input_ids: list[int] = []
    position_ids: list[int] = []
    bounds: list[int] = [0]
    trees: list[Tree] = []
    # Trained tokens and answers are listed in the segments' given order, whatever their order in the row:
    # answer numbers, and the order of `positions`, are what callers index by.
    first_answer = [0]
    for _, answers in segments:
        first_answer.append(first_answer[-1] + len(answers))
    trained: list[list[tuple[int, int, int]]] = [
        [] for _ in segments
    ]  # per segment: (position, token, answer)
    last_positions = [0] * first_answer[-1]

    def size(i: int) -> int:
        return len(segments[i][0]) + sum(len(ids) for ids, _ in segments[i][1])

    groups = prefix_groups(
        list(range(len(segments))), lambda i: segments[i][0], lambda i: max(len(segments[i][0]) - 1, 0), size
    )
    for shared, members in groups:
        tree: list[tuple[int, int]] = []
        if shared:
            input_ids += segments[members[0]][0][:shared]
            position_ids += range(shared)
            tree.append((shared, -1))
        for i in members:
            prompt, answers = segments[i]
            prompt_node, n_prompt = len(tree), len(prompt)
            tree.append((n_prompt - shared, 0 if shared else -1))
            input_ids += prompt[shared:]
            position_ids += range(shared, n_prompt)
            prompt_last = len(input_ids) - 1  # predicts each answer's first token
            for a, (ids, mask) in enumerate(answers):
                offset, seq = len(input_ids), first_answer[i] + a
                trained[i] += [
                    (offset + j - 1 if j else prompt_last, token, seq)
                    for j, (token, on) in enumerate(zip(ids, mask, strict=True))
                    if on
                ]
                last_positions[seq] = offset + len(ids) - 1 if ids else prompt_last
                input_ids += ids
                position_ids += range(n_prompt, n_prompt + len(ids))
                tree.append((len(ids), prompt_node))
        trees.append(tuple(tree))
        bounds.append(len(input_ids))
    flat = [x for per_segment in trained for x in per_segment]
    positions, targets, sequence = ([x[k] for x in flat] for k in range(3))
    pad = padding_tail(len(input_ids))
    if pad:
        input_ids += [0] * pad
        position_ids += range(pad)
        trees.append(branch_tree(0, (pad,)))
        bounds.append(len(input_ids))
    return BranchRow(
        input_ids=torch.tensor([input_ids], dtype=torch.long),
        position_ids=torch.tensor([position_ids], dtype=torch.long),
        cu_seq_lens=torch.tensor(bounds, dtype=torch.long),
        trees=trees,
        positions=torch.tensor(positions, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        sequence=torch.tensor(sequence, dtype=torch.long),
        last_positions=torch.tensor(last_positions, dtype=torch.long),
        n_sequences=len(last_positions),
        pad_tokens=pad,
        data_tokens=sum(size(i) for i in range(len(segments))),
    )


def pack_pairs(pairs: list[TokenizedPair]) -> BranchRow:
    """Pairs as `prompt | chosen | rejected` segments: answer 2k is pair k's chosen one, 2k + 1 its
    rejected one (empty for unpaired feedback)."""
    return pack_branches(
        [(p.prompt_ids, [(p.chosen_ids, p.chosen_mask), (p.rejected_ids, p.rejected_mask)]) for p in pairs]
    )
