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

from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch

from tunery.data.feedback import TokenizedPair
from tunery.data.template import TokenizedChat

IGNORE = -100
ROW_MULTIPLE = 32  # packed rows' lengths are rounded up to a multiple of this (see above)


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
    cu_seq_lens: torch.Tensor  # (n + 1,)
    targets: torch.Tensor  # (T,) next-token ids, IGNORE where not trained
    pad_tokens: int = 0

    @property
    def n_trained(self) -> int:
        return int((self.targets != IGNORE).sum())


def shifted_targets(chat: TokenizedChat) -> list[int]:
    """targets[j] is the token position j must predict: input_ids[j + 1] where that token is trained."""
    ids, mask = chat.input_ids, chat.label_mask
    return [ids[j + 1] if mask[j + 1] else IGNORE for j in range(len(ids) - 1)] + [IGNORE]


def padding_tail(n_tokens: int) -> int:
    """The padding tail's length for a row of `n_tokens` tokens."""
    return -n_tokens % ROW_MULTIPLE


def pack(chats: list[TokenizedChat]) -> PackedRow:
    input_ids: list[int] = []
    position_ids: list[int] = []
    targets: list[int] = []
    bounds = [0]
    for chat in chats:
        input_ids += chat.input_ids
        position_ids += range(chat.n_tokens)
        targets += shifted_targets(chat)
        bounds.append(len(input_ids))
    pad = padding_tail(len(input_ids))
    if pad:
        input_ids += [0] * pad
        position_ids += range(pad)
        targets += [IGNORE] * pad
        bounds.append(len(input_ids))
    return PackedRow(
        input_ids=torch.tensor([input_ids], dtype=torch.long),
        position_ids=torch.tensor([position_ids], dtype=torch.long),
        cu_seq_lens=torch.tensor(bounds, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        pad_tokens=pad,
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
    branch_lens: list[tuple[int, ...]]  # per segment: the lengths of its answers
    prompt_lens: list[int]  # per segment: shared prompt length
    positions: torch.Tensor  # (N,)
    targets: torch.Tensor  # (N,)
    sequence: torch.Tensor  # (N,)
    last_positions: torch.Tensor  # (n_sequences,) each answer's last token (a reward model scores there)
    n_sequences: int
    pad_tokens: int = 0

    @property
    def n_pairs(self) -> int:
        return self.n_sequences // 2

    def model_kwargs(self) -> dict[str, object]:
        return {**super().model_kwargs(), "branch_lens": self.branch_lens, "prompt_lens": self.prompt_lens}


# A segment to pack: the prompt's token ids and its answers as (token ids, trained-token mask).
Segment = tuple[list[int], list[tuple[list[int], list[bool]]]]


def pack_branches(segments: list[Segment]) -> BranchRow:
    input_ids: list[int] = []
    position_ids: list[int] = []
    bounds, branch_lens, prompt_lens = [0], [], []
    positions: list[int] = []
    targets: list[int] = []
    sequence: list[int] = []
    last_positions: list[int] = []
    for prompt, answers in segments:
        start, n_prompt = len(input_ids), len(prompt)
        input_ids += prompt
        position_ids += range(n_prompt)
        for ids, mask in answers:
            offset = len(input_ids)
            seq = len(last_positions)
            for j, (token, trained) in enumerate(zip(ids, mask, strict=True)):
                if trained:
                    # The token before answer token j: the prompt's last token for j = 0.
                    positions.append(offset + j - 1 if j else start + n_prompt - 1)
                    targets.append(token)
                    sequence.append(seq)
            last_positions.append(offset + len(ids) - 1 if ids else start + n_prompt - 1)
            input_ids += ids
            position_ids += range(n_prompt, n_prompt + len(ids))
        branch_lens.append(tuple(len(ids) for ids, _ in answers))
        prompt_lens.append(n_prompt)
        bounds.append(len(input_ids))
    pad = padding_tail(len(input_ids))
    if pad:
        input_ids += [0] * pad
        position_ids += range(pad)
        branch_lens.append((pad,))
        prompt_lens.append(0)
        bounds.append(len(input_ids))
    return BranchRow(
        input_ids=torch.tensor([input_ids], dtype=torch.long),
        position_ids=torch.tensor([position_ids], dtype=torch.long),
        cu_seq_lens=torch.tensor(bounds, dtype=torch.long),
        branch_lens=branch_lens,
        prompt_lens=prompt_lens,
        positions=torch.tensor(positions, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        sequence=torch.tensor(sequence, dtype=torch.long),
        last_positions=torch.tensor(last_positions, dtype=torch.long),
        n_sequences=len(last_positions),
        pad_tokens=pad,
    )


def pack_pairs(pairs: list[TokenizedPair]) -> BranchRow:
    """Pairs as `prompt | chosen | rejected` segments: answer 2k is pair k's chosen one, 2k + 1 its
    rejected one (empty for unpaired feedback)."""
    return pack_branches(
        [(p.prompt_ids, [(p.chosen_ids, p.chosen_mask), (p.rejected_ids, p.rejected_mask)]) for p in pairs]
    )
