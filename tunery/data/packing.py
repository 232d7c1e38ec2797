"""Padding-free packing: several conversations in one row, each with its own positions and attention.

A packed row carries `position_ids` that restart at 0 for every conversation and `cu_seq_lens`, the
cumulative lengths that `models/attention.py` uses to keep attention inside each conversation. Targets are
shifted per conversation before concatenation, so the last token of one conversation never predicts the
first token of the next. The loss of a packed row is therefore exactly the sum of the per-conversation
losses (tests/unit/test_packing.py checks it against unpacked forward passes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tunery.data.template import TokenizedChat

IGNORE = -100


@dataclass
class PackedRow:
    input_ids: torch.Tensor  # (1, T)
    position_ids: torch.Tensor  # (1, T)
    cu_seq_lens: torch.Tensor  # (n + 1,) cumulative lengths, starting at 0
    targets: torch.Tensor  # (T,) next-token ids, IGNORE where not trained

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def n_trained(self) -> int:
        return int((self.targets != IGNORE).sum())


def shifted_targets(chat: TokenizedChat) -> list[int]:
    """targets[j] is the token position j must predict: input_ids[j + 1] where that token is trained."""
    ids, mask = chat.input_ids, chat.label_mask
    return [ids[j + 1] if mask[j + 1] else IGNORE for j in range(len(ids) - 1)] + [IGNORE]


def pack(chats: list[TokenizedChat]) -> PackedRow:
    input_ids: list[int] = []
    position_ids: list[int] = []
    targets: list[int] = []
    bounds = [0]
    for chat in chats:
        input_ids += chat.input_ids
        position_ids += range(len(chat.input_ids))
        targets += shifted_targets(chat)
        bounds.append(len(input_ids))
    return PackedRow(
        input_ids=torch.tensor([input_ids], dtype=torch.long),
        position_ids=torch.tensor([position_ids], dtype=torch.long),
        cu_seq_lens=torch.tensor(bounds, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
    )


def plan_rows(chats: list[TokenizedChat], token_budget: int) -> list[list[TokenizedChat]]:
    """Group chats into rows of at most `token_budget` tokens (first-fit decreasing; long chats sit alone)."""
    rows: list[list[TokenizedChat]] = []
    room: list[int] = []
    for chat in sorted(chats, key=lambda c: -len(c.input_ids)):
        n = len(chat.input_ids)
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(chat)
                room[r] -= n
                break
        else:
            rows.append([chat])
            room.append(token_budget - n)
    return rows


def shard(chats: list[TokenizedChat], rank: int, world_size: int) -> list[TokenizedChat]:
    """This rank's share of a step's chats, balanced by token count. Every rank computes the same split."""
    loads = [0] * world_size
    owned: list[list[TokenizedChat]] = [[] for _ in range(world_size)]
    for chat in sorted(chats, key=lambda c: -len(c.input_ids)):
        r = loads.index(min(loads))
        owned[r].append(chat)
        loads[r] += len(chat.input_ids)
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
